"""The wire between coordinator and hospitals, below both: what travels and how it is checked.

- ``protocol.keys``: record names, metric keys, config entries (no Flower: the trainer and the GPU
  benchmark use them);
- ``protocol.records``: Flower records to and from numpy arrays, the replies a hospital may send;
- ``protocol.signing``: the coordinator's Ed25519 signature over everything a hospital acts on;
- ``protocol.flower_private``: every use of Flower's non-public modules, in one place;
- ``protocol.logs``: how every process logs (plain lines, quiet libraries, reworded Flower lines):
  the daemons read their children's lines, so the format is shared like the wire.

``server/`` and ``client/`` both import this package and never each other; it imports only
``shared_models`` and Flower (tests/unit/test_import_graph.py).
"""
