"""Hand `python -m flows.<stage>` over to a running stage runner (flows/stage_runner.py).

Imported by flows/__init__.py before any flow module, so a stage started by `dvc repro`
costs a bare interpreter (~0.1 s) instead of importing Prefect, torch and MLflow again
(5-15 s each stage on 2 busy cores). Only when MARKETPLACE_STAGE_RUNNER names the
runner's socket (flows.prefect_server sets it for `make demo` / `make repro`); without
it, or when the runner refuses (another environment, another checkout) or is not there,
the stage runs in this process as before. Standard library only: nothing heavy may be
imported before the hand-over.

The stage's standard input, output and error are this process's own (passed to the
runner as file descriptors), so dvc sees its output and exit code as usual; SIGINT,
SIGTERM and SIGHUP sent to this process are passed on to the stage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

RUNNER_ENV = "MARKETPLACE_STAGE_RUNNER"
#: Modules that are never handed over (the wrappers that start the runner, the runner itself).
NOT_STAGES = frozenset({"flows.prefect_server", "flows.stage_runner", "flows.deploy", "flows.deployments"})
MAX_MESSAGE = 1 << 20
REPLY_TIMEOUT_S = 900.0


def requested_stage(orig_argv: list[str] | None = None) -> tuple[str, list[str]] | None:
    """(module, its arguments) when this interpreter was started as `python -m flows.<x> ...`."""
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    for position, arg in enumerate(argv[1:], start=1):
        if arg == "-m" and position + 1 < len(argv):
            module = argv[position + 1]
            if module.startswith("flows.") and module not in NOT_STAGES:
                return module, argv[position + 2:]
            return None
        if arg.startswith("-m") and len(arg) > 2:  # `-mflows.train`
            module = arg[2:]
            return (module, argv[position + 1:]) if module.startswith("flows.") and module not in NOT_STAGES else None
        if arg in ("-c", "-") or not arg.startswith("-"):
            return None
    return None


def hand_over_if_served() -> None:
    """Run this stage in the stage runner and exit with its code; return to run it here otherwise."""
    path = os.environ.get(RUNNER_ENV, "")
    if not path or path == "off":
        return
    stage = requested_stage()
    if stage is None:
        return
    module, args = stage
    from flows import process_tree

    header = {
        "module": module,
        "args": args,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "executable": os.path.realpath(sys.executable),
        "package": os.path.dirname(os.path.abspath(__file__)),
        # the stage stops when this client goes, or when whatever started it does (dvc: its
        # SIGTERM is not passed on to its children)
        "watch": process_tree.watch_list([os.getpid(), process_tree.watched_ancestor()]),
    }
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(path)
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(sock, [json.dumps(header).encode()], [0, 1, 2])
    except OSError as error:  # no runner there (yet, or any more): nothing was started
        _note(f"stage runner at {path} not usable ({error}); running the stage in this process")
        return
    # The answer comes once the runner has imported the stage's module (seconds, what this
    # process would have spent on it). No fallback after this point: the runner may already
    # have started the stage, which must not run twice.
    sock.settimeout(REPLY_TIMEOUT_S)
    try:
        reply = json.loads(sock.recv(MAX_MESSAGE) or b'{"refused": "the runner closed the connection"}')
    except (OSError, ValueError) as error:
        print(f"error: the stage runner at {path} did not answer ({error}); "
              f"run again, or with {RUNNER_ENV}=off", file=sys.stderr)
        sys.exit(70)
    if "pid" not in reply:
        # Said every time, not only with MARKETPLACE_DEBUG: the stage now pays for its own imports
        # (seconds each), and the reason names what to change (e.g. a variable set for one stage).
        print(f"stage-client: the stage runner refused this stage ({reply.get('refused', 'no answer')});"
              " running it in this process", file=sys.stderr)
        sock.close()
        return
    sys.exit(_wait_for_stage(sock, int(reply["pid"])))


def _wait_for_stage(sock: socket.socket, pid: int) -> int:
    """Pass signals to the stage until its exit code arrives; that code (128+N for signal N)."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    sock.settimeout(None)
    while True:
        try:
            message = sock.recv(MAX_MESSAGE)
        except InterruptedError:  # pragma: no cover - Python retries recv after a handler
            continue
        if not message:
            print("error: the stage runner went away before the stage finished", file=sys.stderr)
            return 70
        reply = json.loads(message)
        if "exit" in reply:
            code = int(reply["exit"])
            return 128 - code if code < 0 else code


def _note(message: str) -> None:
    if os.environ.get("MARKETPLACE_DEBUG"):
        print(f"stage-client: {message}", file=sys.stderr)
