"""Which process a stage should live and die with (Linux /proc; standard library only).

Kept free of Prefect and the project's heavy imports: the stage runner's client
(flows/_stage_client.py) uses it before anything else is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

#: "pid:start,pid:start": the processes a stage run by the stage runner must outlive no
#: longer than (the client dvc started, and the process that started that client).
WATCH_PIDS_ENV = "MARKETPLACE_WATCH_PIDS"

# Shells a stage command may be wrapped in: dvc runs each stage as `$SHELL -c "<cmd>"`, and
# dash (Debian's /bin/sh, what dvc uses when SHELL is unset) stays as the stage's parent
# instead of exec-ing the command, so that shell, not dvc, is what the stage sees die first.
_WRAPPER_SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"})


def proc_stat(pid: int) -> tuple[str, int, int]:
    """(state, parent pid, start time in clock ticks) of a process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None where /proc cannot tell."""
    try:
        return proc_stat(pid)[2]
    except (OSError, IndexError, ValueError):
        return None


def watched_ancestor(pid: int | None = None) -> int:
    """The process whose end should stop `pid`: its parent, skipping `<shell> -c` wrappers.

    Args:
        pid: the process to look up from (default: this process).

    Returns:
        The pid of the first ancestor that is not a shell running `-c`; the direct parent
        when /proc cannot be read (not Linux) or the chain is unusually long.
    """
    child = os.getpid() if pid is None else pid
    ancestor = proc_stat(child)[1] if Path("/proc").is_dir() else os.getppid()
    for _ in range(4):
        try:
            argv = Path(f"/proc/{ancestor}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            parent = proc_stat(ancestor)[1]
        except (OSError, IndexError, ValueError):
            return ancestor
        name = os.path.basename(argv[0].decode(errors="replace")).lstrip("-")
        if name not in _WRAPPER_SHELLS or b"-c" not in argv[1:] or parent <= 1:
            return ancestor
        ancestor = parent
    return ancestor


def still_running(pid: int, started: int | None) -> bool:
    """True while `pid` is the same process as when first seen and not a zombie."""
    try:
        state, _, start = proc_stat(pid)
    except (OSError, IndexError, ValueError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return started is None
    return state != "Z" and (started is None or start == started)


def watch_list(pids: list[int]) -> str:
    """The WATCH_PIDS_ENV value for these processes (each with its start time)."""
    starts = {pid: start_time(pid) for pid in pids}
    return ",".join(f"{pid}:{'' if start is None else start}" for pid, start in starts.items())


def watch_list_from_env(environ: dict[str, str] | None = None) -> list[tuple[int, int | None]]:
    """Parse WATCH_PIDS_ENV: [(pid, start time or None)]; empty when unset or malformed."""
    raw = (os.environ if environ is None else environ).get(WATCH_PIDS_ENV, "")
    watched: list[tuple[int, int | None]] = []
    for item in filter(None, raw.split(",")):
        pid, _, start = item.partition(":")
        try:
            watched.append((int(pid), int(start) if start else None))
        except ValueError:
            return []
    return watched
