"""Tests that start real processes (coordinator / hospital daemons, SuperLink, SuperNode, Flower
simulation and Ray, netns hosts, nginx, Prometheus, Chromium, DCMTK, a wheel install) or are slow
throughout. `make test` runs them with the unit tests."""
