"""Test tooling shared by tests and benchmarks; nothing here is served or packaged.

`tiny_bundle` (a tiny real serving bundle) and `serving` (a `bentoml serve` subprocess manager)
moved here from service/devtools.py; `synthetic` writes synthetic clean-layer data.
"""
