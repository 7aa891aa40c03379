"""A test hook that kills the process at a named point, to prove a crash anywhere is recoverable.

Set MARKETPLACE_CRASH_AT=<point>[:<n>] and the n-th time (default 1st) the process reaches
`crash_point(<point>)` it sends itself SIGKILL: no `finally`, no atexit, exactly what an OOM
killer or a pulled plug does. Points (tests/test_crash_recovery.py):

- `convert_image`: after each cleaned photo is written (into the stage's temporary folder);
- `replace:<file name>`: a file written by io_utils.atomic_path, complete in its temporary
  sibling, just before it replaces its target (e.g. `replace:checkpoint.pt`);
- `replaced:<file name>`: just after it replaced its target (e.g. after a training checkpoint);
- `swap:<dir name>`: a directory built by io_utils.atomic_dir, just before it replaces its target;
- `registered_version`: a model version created (with its metric tags), before it is promoted.

Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MARKETPLACE_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.rpartition(":") if wanted.rsplit(":", 1)[-1].isdigit() else (wanted, "", "1")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
