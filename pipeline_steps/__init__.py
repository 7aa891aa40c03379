"""Plain, importable building blocks of the marketplace pipeline.

Nothing in this package knows about Prefect, DVC or BentoML: flows wire these
functions together, tests call them directly on small frames.
"""
