"""Benchmarks of fedsynth against the floor (``make bench``); each figure is a side-by-side ratio."""
