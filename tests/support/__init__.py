"""Test tooling shared by tests and benchmarks; nothing here is served or packaged.

`tiny_bundle` (a tiny real serving bundle) and `serving` (a `bentoml serve` subprocess manager)
moved here from service/devtools.py; `synthetic` writes synthetic clean-layer data;
`flow_helpers` (a tiny raw export and `--set` overrides that send every path of params.yaml
into a temporary folder) sets up the tests that run the real flows. Only tests and benchmarks
import this package (tests/test_architecture.py checks it).
"""
