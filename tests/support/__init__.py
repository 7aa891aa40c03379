"""Test tooling shared by tests and benchmarks: a tiny real bundle (tiny_bundle) and a `bentoml serve`
subprocess manager (serving). Moved here from service/devtools.py: nothing here is served."""
