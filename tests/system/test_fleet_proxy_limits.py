"""The coordinator's nginx bounds what one client address can take (issue 25 items 2 and 3).

* the generated config (no nginx needed): a per-address connection cap counted at accept, a
  request rate, header/body timeouts, a worker big enough, and one body limit per Fleet route;
* those limits hold fedsynth's own largest messages, measured on Flower's wire format;
* with a real nginx in front of a stand-in SuperLink (tests/system/test_fleet_proxy.py's): a
  stranger holding ~1,100 unfinished TLS connections from one address (more than the 1,024 that once
  filled nginx) does not keep a hospital at another address out; and bodies over a route's limit
  are refused with 413 by nginx, before the SuperLink sees a byte.

Addresses: 127.0.0.2 is the coordinator's "public" address (served like any non-loopback one);
the stranger connects from 127.0.0.3, the hospital from 127.0.0.4 (all on this host's loopback).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time
from pathlib import Path

import numpy as np
import pytest

from fedsynth.certs import init_federation
from fedsynth.fleet_proxy import FleetProxy, ProxyTLS, fleet_routes, write_proxy
from fedsynth.proxy_limits import (BODY_TIMEOUT_S, BUFFER_SLACK, HEADER_TIMEOUT_S,
                                   LARGE_BODY_ROUTES, MESSAGES_BODY, OBJECT_BODY_MARGIN,
                                   PER_ADDRESS_BODIES, PER_ADDRESS_CONNECTIONS, SMALL_BODY,
                                   route_body_limits)

from tests.harness.deploy_helpers import free_port
from tests.system.test_fleet_proxy import SIGNED, _start_nginx, _stop, _Upstream, needs_nginx

PUBLIC, STRANGER, HOSPITAL = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def _locations(text: str) -> dict[str, str]:
    return dict(re.findall(r"location = (\S+) \{\n(.*?)\n        \}", text, re.S))


def _size(value: str) -> int:
    unit = {"k": 1024, "m": 1024 * 1024}.get(value[-1], 1)
    return int(value.rstrip("km")) * unit


# ------------------------------------------------------------------ the config (fast, no nginx)

def test_config_caps_each_address_and_sizes_each_route(tmp_path: Path) -> None:
    text = FleetProxy(tmp_path, "0.0.0.0", 8000, 8001, None, MODULE).render()
    assert text.startswith("# Written by") and f"load_module {MODULE};" in text
    stream, http_part = text.split("\nhttp {", 1)
    # the stream server owns the port and counts every connection per address at accept
    assert "    listen 8000;" in stream and "listen 8000" not in http_part
    assert "default $binary_remote_addr;" in stream
    assert "limit_conn_zone $fedsynth_peer zone=fedsynth_conns" in stream
    assert f"limit_conn fedsynth_conns {PER_ADDRESS_CONNECTIONS};" in stream
    assert '127.0.0.1 "";' in stream  # the coordinator's own host is not capped
    # the http doors only hear the stream server (unix sockets) and trust its PROXY header
    listens = re.findall(r"^\s*listen (\S+)", http_part, re.M)
    assert len(listens) == 2 and all(x.startswith("unix:") for x in listens), listens
    assert "real_ip_header proxy_protocol;" in http_part
    connections = int(re.search(r"worker_connections (\d+);", text).group(1))
    assert connections >= 4 * 32 * PER_ADDRESS_CONNECTIONS  # >= 4,096: 32 capped addresses
    assert f"client_header_timeout {HEADER_TIMEOUT_S}s;" in http_part and HEADER_TIMEOUT_S <= 15
    assert f"client_body_timeout {BODY_TIMEOUT_S}s;" in http_part and BODY_TIMEOUT_S <= 30
    assert "limit_req_zone $binary_remote_addr zone=fedsynth_rate" in http_part
    assert "limit_conn_zone $binary_remote_addr zone=fedsynth_bodies" in http_part
    assert "limit_req_status 503;" in http_part  # Flower retries 503 (a 429 ends its retries)
    fleet, local = http_part.split("# the coordinator's own host")
    assert "limit_req zone=fedsynth_rate" in fleet and "proxy_request_buffering on;" in fleet
    assert "limit_req" not in local and "limit_conn" not in local
    # one location per Fleet route, each with its own limit, read whole into memory
    blocks = _locations(fleet)
    assert sorted(blocks) == fleet_routes()
    limits = {}
    for path, block in blocks.items():
        limit = _size(re.search(r"client_max_body_size (\S+);", block).group(1))
        buffer = _size(re.search(r"client_body_buffer_size (\S+);", block).group(1))
        assert buffer == limit + BUFFER_SLACK, path  # read whole, in memory
        assert ("limit_conn fedsynth_bodies" in block) == (path in LARGE_BODY_ROUTES), path
        limits[path] = limit
    assert limits == route_body_limits(fleet_routes())
    assert limits["/v1/fleet/push-object"] == 8 * 1024 * 1024
    assert limits["/v1/fleet/push-messages"] == 1024 * 1024
    assert {v for k, v in limits.items() if k not in LARGE_BODY_ROUTES} == {64 * 1024}
    assert f"limit_conn fedsynth_bodies {PER_ADDRESS_BODIES};" in blocks["/v1/fleet/push-object"]
    assert max(limits.values()) * PER_ADDRESS_BODIES <= 32 * 1024 * 1024  # per address in memory
    # loopback-only: no Fleet door, nothing but the coordinator's own host
    lo = FleetProxy(tmp_path, "127.0.0.1", 8000, 8001, None, MODULE).render()
    assert _locations(lo) == {} and "listen 127.0.0.1:8000;" in lo


def test_route_limits_hold_fedsynth_s_largest_messages() -> None:
    """Measured on Flower's wire format: a packed fedsynth reply's biggest request per route."""
    from flwr.app import Metadata
    from flwr.app.message.message import make_message, remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto import fab_pb2, fleet_pb2, heartbeat_pb2, message_pb2, run_pb2
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects,
                                                             get_object_tree)

    from protocol import records
    from protocol.keys import EVAL_METRICS, TRAIN_METRICS

    limits = route_body_limits(fleet_routes())
    node, run, oid = Node(node_id=2**63 - 1), 2**63 - 1, "f" * 64

    def reply(mib: int) -> tuple[int, int, int]:
        arrays = {f"g.layer{i}.weight": np.full(mib * 2**18 // 4, i, np.float32)
                  for i in range(4)}
        content = records.train_reply(arrays, {k: 1.0 for k in TRAIN_METRICS + EVAL_METRICS})
        meta = Metadata(run_id=run, message_id="a" * 64, src_node_id=run, dst_node_id=1,
                        reply_to_message_id="b" * 64, group_id="9" * 20,
                        created_at=time.time(), ttl=43200.0, message_type="train")
        msg = make_message(metadata=meta, content=content)
        objects = get_all_nested_objects(msg)
        biggest = max(message_pb2.PushObjectRequest(
            node=node, run_id=run, object_id=k, object_content=o.deflate(),
            session_id=oid).ByteSize() for k, o in objects.items())
        push = fleet_pb2.PushMessagesRequest(
            node=node, messages_list=[message_to_proto(remove_content_from_message(msg))],
            message_object_trees=[get_object_tree(msg)], clientapp_runtime_list=[1.0])
        return biggest, push.ByteSize(), len(objects)

    big_a, push_a, n_a = reply(1)
    big_b, push_b, n_b = reply(40)  # 160 MiB of weights: 32 chunks
    # push-object: one 5 MiB chunk and its header, whatever the model's size
    assert big_a < big_b == max(big_a, big_b) < 5 * 2**20 + 1024
    assert big_b * OBJECT_BODY_MARGIN <= limits["/v1/fleet/push-object"]
    # push-messages grows by one object id per chunk: the reference model (aae, 256x256,
    # width 64: 358 MiB of fp32 weights, fleet_proxy's comment) is 72 chunks
    per_object = (push_b - push_a) / (n_b - n_a)
    assert per_object < 100
    reference = push_a + per_object * 80
    assert reference * 100 < MESSAGES_BODY, reference
    # every other route: its largest request (a 1 kB public key, the longest ids) is far below
    small = {
        "/v1/fleet/activate-node": fleet_pb2.ActivateNodeRequest(public_key=b"k" * 1024,
                                                                 heartbeat_interval=30.0),
        "/v1/fleet/confirm-message-received": message_pb2.ConfirmMessageReceivedRequest(
            node=node, run_id=run, message_object_id=oid),
        "/v1/fleet/deactivate-node": fleet_pb2.DeactivateNodeRequest(node_id=run),
        "/v1/fleet/get-fab": fab_pb2.GetFabRequest(node=node, hash_str=oid, run_id=run),
        "/v1/fleet/get-run": run_pb2.GetRunRequest(node=node, run_id=run),
        "/v1/fleet/pull-messages": fleet_pb2.PullMessagesRequest(node=node, message_ids=[oid]),
        "/v1/fleet/pull-object": message_pb2.PullObjectRequest(node=node, run_id=run,
                                                               object_id=oid),
        "/v1/fleet/register-node": fleet_pb2.RegisterNodeFleetRequest(public_key=b"k" * 1024),
        "/v1/fleet/send-node-heartbeat": heartbeat_pb2.SendNodeHeartbeatRequest(
            node=node, heartbeat_interval=30.0),
        "/v1/fleet/unregister-node": fleet_pb2.UnregisterNodeFleetRequest(node_id=run),
    }
    assert sorted([*small, *LARGE_BODY_ROUTES]) == fleet_routes()  # a new route: size it here
    for route, request in small.items():
        assert request.ByteSize() * 10 < limits[route] == SMALL_BODY, route


def test_reference_model_is_the_largest_family_at_its_size() -> None:
    import torch

    from shared_models.config import ModelConfig
    from shared_models.registry import families, get_family

    def weights(family: str) -> int:
        cfg = ModelConfig(family=family, image_size=256, width=64,
                          num_classes=4 if family == "cdcgan" else 0)
        with torch.device("meta"):
            nets = get_family(family).build(cfg)
        modules = nets.values() if isinstance(nets, dict) else vars(nets).values()
        return sum(t.numel() * 4 for m in modules if isinstance(m, torch.nn.Module)
                   for t in m.state_dict().values())

    sizes = {f: weights(f) for f in families()}
    assert max(sizes, key=sizes.get) == "aae"
    assert 350 * 2**20 < sizes["aae"] < 360 * 2**20  # 72 chunks of 5 MiB


# ------------------------------------------------------------------ a real nginx

def _tls(tmp_path: Path):  # noqa: ANN202
    keys = init_federation(tmp_path / "keys", hosts=[PUBLIC])
    return keys, ProxyTLS(keys.ca_cert, keys.server_cert, keys.server_key)


def _post(keys, port: int, path: str, body: bytes, source: str = HOSPITAL,
          timeout: float = 10) -> int:
    ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    conn = http.client.HTTPSConnection(PUBLIC, port, timeout=timeout, context=ctx,
                                       source_address=(source, 0))
    try:
        conn.putrequest("POST", path)
        for k, v in SIGNED.items():
            conn.putheader(k, v)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@needs_nginx
@pytest.mark.timeout(120)
def test_a_flood_of_unfinished_tls_connections_from_one_address_leaves_hospitals_in(
        tmp_path: Path) -> None:
    keys, tls = _tls(tmp_path)
    upstream = _Upstream(keys)
    port = free_port()
    nginx = _start_nginx(write_proxy(tmp_path / "proxy", (PUBLIC, port), upstream.port, tls))
    ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    held: list[ssl.SSLSocket] = []
    cut = 0
    try:
        assert _post(keys, port, "/v1/fleet/pull-messages", b"x") == 200
        t0 = time.monotonic()
        for _ in range(1100):  # more than the 1,024 worker connections that once ran out
            raw = socket.create_connection((PUBLIC, port), timeout=5,
                                           source_address=(STRANGER, 0))
            try:
                s = ctx.wrap_socket(raw, server_hostname=PUBLIC)
                s.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")  # unfinished
                held.append(s)
            except (OSError, ssl.SSLError):
                raw.close()
                cut += 1
        flood_s = time.monotonic() - t0
        # nginx kept PER_ADDRESS_CONNECTIONS of them and closed the rest at once
        assert len(held) <= PER_ADDRESS_CONNECTIONS and cut >= 1100 - PER_ADDRESS_CONNECTIONS
        # while they are held, a hospital at another address is served, every time, promptly
        seen = len(upstream.seen)
        waits = []
        for _ in range(20):
            t = time.monotonic()
            assert _post(keys, port, "/v1/fleet/pull-messages", b"x") == 200
            waits.append(time.monotonic() - t)
        assert max(waits) < 3.0, waits
        assert len(upstream.seen) == seen + 20  # the stranger's unfinished requests: none
        # the stranger's held connections end at the header timeout
        deadline = t0 + flood_s + HEADER_TIMEOUT_S + 8
        open_ = list(held)
        while open_ and time.monotonic() < deadline:
            still = []
            for s in open_:
                s.settimeout(0.05)
                try:
                    if s.recv(4096):
                        still.append(s)  # e.g. a 408 being sent: read on
                except (TimeoutError, ssl.SSLWantReadError, socket.timeout):
                    still.append(s)
                except (OSError, ssl.SSLError):
                    pass
            open_ = still
            time.sleep(0.2)
        assert not open_, f"{len(open_)} stranger connections outlived the header timeout"
        print(f"\n[flood] 1100 connections from one address in {flood_s:.1f} s: {len(held)} "
              f"held, {cut} closed at once; a hospital's request took <= {max(waits):.2f} s")
    finally:
        for s in held:
            s.close()
        log = _stop(nginx)
        upstream.close()
    assert "worker_connections are not enough" not in log


@needs_nginx
@pytest.mark.timeout(120)
def test_bodies_over_a_routes_limit_are_refused_before_the_superlink(tmp_path: Path) -> None:
    keys, tls = _tls(tmp_path)
    upstream = _Upstream(keys)
    port = free_port()
    nginx = _start_nginx(write_proxy(tmp_path / "proxy", (PUBLIC, port), upstream.port, tls))
    ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    held: list[ssl.SSLSocket] = []
    try:
        heartbeat, obj = "/v1/fleet/send-node-heartbeat", "/v1/fleet/push-object"
        assert _post(keys, port, heartbeat, b"h" * SMALL_BODY) == 200
        assert _post(keys, port, heartbeat, b"h" * (SMALL_BODY + 1)) == 413
        assert _post(keys, port, "/v1/fleet/pull-messages", b"p" * 1024 * 1024) == 413
        assert _post(keys, port, obj, b"o" * (8 * 2**20 + 1)) == 413
        assert len(upstream.seen) == 1 and len(upstream.seen[0][3]) == SMALL_BODY

        def raw(head: bytes, source: str = STRANGER) -> ssl.SSLSocket:
            s = ctx.wrap_socket(socket.create_connection((PUBLIC, port), timeout=10,
                                                         source_address=(source, 0)),
                                server_hostname=PUBLIC)
            s.sendall(head)
            return s

        def status(s: ssl.SSLSocket) -> int:
            line = s.recv(4096).split(b"\r\n", 1)[0]
            return int(line.split()[1])

        # item 3's attack: an unauthenticated 300 MB body is refused on its headers alone
        s = raw(f"POST {obj} HTTP/1.1\r\nHost: x\r\nContent-Length: {300 * 2**20}\r\n\r\n"
                .encode())
        assert status(s) == 413
        s.close()
        # a chunked body (no length up front) over the limit: refused, and never forwarded
        s = raw(f"POST {heartbeat} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .encode())
        piece = b"c" * 16384
        for _ in range(5):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert status(s) == 413
        s.close()
        assert len(upstream.seen) == 1
        # large bodies in flight from one address: PER_ADDRESS_BODIES at a time, then 503
        head = (f"POST {obj} HTTP/1.1\r\nHost: x\r\nContent-Length: {8 * 2**20}\r\n\r\n"
                .encode() + b"o" * 1024)
        held = [raw(head) for _ in range(PER_ADDRESS_BODIES)]
        time.sleep(0.5)
        extra = raw(head)
        assert status(extra) == 503
        extra.close()
        # ... which a hospital elsewhere does not feel; and nothing half-sent reached upstream
        assert _post(keys, port, obj, b"o" * (5 * 2**20)) == 200
        assert len(upstream.seen) == 2 and len(upstream.seen[1][3]) == 5 * 2**20
    finally:
        for s in held:
            s.close()
        _stop(nginx)
        upstream.close()
