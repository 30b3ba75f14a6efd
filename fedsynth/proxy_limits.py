"""The limits of the coordinator's Fleet-only proxy (``fedsynth.fleet_proxy``), and why each.

Issue 25 items 2 and 3; docs/security.md, "Limits at the Fleet-only proxy". Every limit is per
client address except the worker's size; the coordinator's own 127.0.0.1 / ::1 door has none.
"""

from __future__ import annotations

from typing import Sequence

# Connections. Every connection to the public port is counted per client address the moment it
# is accepted (nginx's stream module, before TLS: an unfinished handshake or request counts), so
# one address cannot fill the worker: a stranger's ~1,020 held TLS connections once took all of
# nginx's 1,024 and cut every hospital off. A SuperNode uses a handful (its poll, heartbeat and
# 2 object transfers at a time, one keep-alive pool); 32 leaves room for a few behind one NAT.
PER_ADDRESS_CONNECTIONS = 32
# One public connection holds up to 4 of the worker's connections (client, stream-to-http
# socket, the http side, the SuperLink upstream): 16,384 serve 4,096 public ones, 128 capped
# addresses' worth, and the loopback door is never capped.
WORKER_CONNECTIONS = 16384
WORKER_NOFILE = 65536
# A request's headers (and, nginx < 1.25.3, its TLS handshake) must arrive within this; a body
# may pause this long between two reads (a 5 Mbit/s hospital sends 64 kB in 0.1 s).
HEADER_TIMEOUT_S = 10
BODY_TIMEOUT_S = 20
KEEPALIVE_TIMEOUT_S = 60
# Requests per address: a SuperNode polls every 0.25 s and moves a model as a burst of 5 MiB
# object requests (each retried at 0.02-0.25 s until it is there: protocol.flower_private); a
# request over the rate answers 503, which Flower retries (a 429 would make it give up).
PER_ADDRESS_RATE = "100r/s"
PER_ADDRESS_BURST = 1000
REFUSED_STATUS = 503
# Bodies. Flower 1.42 moves a message as its metadata (push-messages: the message without its
# content, plus the tree of its object ids) and then one request per object (push-object);
# arrays travel as chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), so no legitimate
# body grows with the model. Measured on fedsynth's own reply (protocol.records.train_reply, a
# packed model, tests/system/test_fleet_proxy_limits.py): the largest push-object is one chunk + 179
# bytes; push-messages is ~0.6 kB + 68 bytes per object. The largest model a run can ask for
# today (no width cap yet, issue 25 item 5) e.g. aae at 256x256 and width 64 is 358 MiB of fp32
# weights: 72 chunks, a 6 kB push-messages. Each route gets its largest message times a margin:
#   push-object    5 MiB chunk + header, x1.5, rounded up  ->  8 MiB
#   push-messages  6 kB for that model; 1 MiB holds the tree of a ~75 GiB model
#   every other    < 1 kB (node id, run id, a public key, message ids)  ->  64 KiB
# Any route a future Flower adds gets the small limit until it is sized here.
SMALL_BODY = 64 * 1024
MESSAGES_BODY = 1024 * 1024
OBJECT_BODY_MARGIN = 1.5
# Each Fleet body is read whole into a buffer this much larger than its limit, so that a chunked
# body (no length up front) is refused at the limit before it could spill to a temporary file.
BUFFER_SLACK = 16 * 1024
# At most this many large bodies (push-object, push-messages) in flight per address: with the
# limits above at most 4 x 8 MiB of one address's bodies are ever in memory, at nginx (which
# reads each whole before passing it on) or at the SuperLink. A SuperNode sends 2 at a time.
PER_ADDRESS_BODIES = 4
# The coordinator's own host (127.0.0.1: fedsynth launch / status, flwr run's FAB) is trusted.
LOOPBACK_MAX_BODY = "1024m"


def worker_files() -> tuple[int, int]:
    """(worker_rlimit_nofile, worker_connections) within this process's hard file limit, which
    nginx's worker inherits and (as ``nobody`` under a root master) cannot raise."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = WORKER_NOFILE if hard == resource.RLIM_INFINITY else min(WORKER_NOFILE, hard)
    return nofile, max(256, min(WORKER_CONNECTIONS, nofile - 64))


def nginx_size(n: int) -> str:
    """Bytes as nginx writes a size: ``8m``, ``64k``, or plain bytes."""
    for unit, div in (("m", 1024 * 1024), ("k", 1024)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _mib_up(n: float) -> int:
    return int(-(-n // (1024 * 1024))) * 1024 * 1024


def route_body_limits(routes: Sequence[str]) -> dict[str, int]:
    """The largest body (bytes) each Fleet route accepts: see the table above."""
    from protocol.flower_private import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as chunk

    sized = {"/v1/fleet/push-object": _mib_up(OBJECT_BODY_MARGIN * (int(chunk) + 64 * 1024)),
             "/v1/fleet/push-messages": MESSAGES_BODY}
    return {r: sized.get(r, SMALL_BODY) for r in routes}


LARGE_BODY_ROUTES = ("/v1/fleet/push-object", "/v1/fleet/push-messages")
