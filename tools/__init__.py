"""Developer tooling run from the repository root (`python -m tools.<name>`); no pipeline code imports it."""
