"""``fedsynth certs init DIR`` / ``fedsynth certs node DIR NAME``: the federation's key material."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make the CA, TLS, node and model-signing keys")
    csub = p.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="CA + coordinator TLS certificate + model-signing pair")
    init.add_argument("dir", type=Path)
    init.add_argument("--host", action="append", default=[], metavar="HOST",
                      help="a DNS name or IP the coordinator is reached at (repeatable); "
                           "localhost and 127.0.0.1 are always included")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=run_init)
    node = csub.add_parser("node", help="a hospital's node-authentication key (OpenSSH EC)")
    node.add_argument("dir", type=Path)
    node.add_argument("name")
    node.add_argument("--force", action="store_true", help="replace an existing key")
    node.set_defaults(func=run_node)


def run_init(args: argparse.Namespace) -> int:
    from fedsynth.certs import CertError, init_federation
    from fedsynth.errors import UserError

    try:
        keys = init_federation(args.dir, args.host, force=args.force)
    except CertError as exc:
        raise UserError(str(exc)) from None
    print(f"coordinator : {keys.server_cert} {keys.server_key}  (CA {keys.ca_cert})")
    print(f"hospitals   : pin {keys.signing_pub} and trust {keys.ca_cert}")
    print(f"next        : fedsynth certs node {args.dir} HOSPITAL_NAME")
    return 0


def run_node(args: argparse.Namespace) -> int:
    from fedsynth.certs import CertError, new_node_key
    from fedsynth.errors import UserError

    try:
        private, public = new_node_key(args.dir, args.name, force=args.force)
    except CertError as exc:
        raise UserError(str(exc)) from None
    print(f"node key    : {private}  (stays at the hospital, 0600)")
    print(f"public key  : {public}  (the coordinator registers it)")
    return 0
