"""A warm process that runs pipeline stages, so each `dvc repro` stage skips its imports.

Every DVC stage is a fresh `python -m flows.<stage>` process, and on two busy cores its
imports (Prefect, torch, MLflow, great-expectations, FAISS) took 4-14 s per stage, most of
the orchestration overhead of the demo (BENCHMARKS.md, "Orchestration overhead"). The
runner imports every stage module once and forks a copy of itself per stage: the copy
runs the stage exactly as `python -m` would (runpy, same arguments, working directory and
environment, the caller's stdin/stdout/stderr), and its exit code goes back to the caller.
It answers from its start and imports the stage modules between requests (a request's own
module first), so the imports overlap the Prefect server's start and the first stages.

    python -m flows.stage_runner --socket /tmp/x/runner.sock   # flows.prefect_server starts it

The caller is flows/stage_client.py, which flows/__init__.py runs first: when
MARKETPLACE_STAGE_RUNNER names the socket, `python -m flows.train --model image` hands
itself over (dvc.yaml is unchanged). The runner refuses, and the stage runs in its own
process as before, when the caller's interpreter, checkout, working directory or any
environment variable that libraries read at import (PREFECT_*, MLFLOW_*, HF_*, ...)
differs from the runner's: those were fixed when the runner imported them.

Each stage gets a supervisor (a fork of the runner) that waits for it and reports how it
ended; the stage stops when the client or the client's parent (dvc) goes
(MARKETPLACE_WATCH_PIDS, flows/common.stop_with_parent).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from flows.process_tree import WATCH_PIDS_ENV
from flows.stage_client import MAX_MESSAGE

log = logging.getLogger("marketplace.stage_runner")

#: What the runner imports up front: the modules dvc.yaml's stages run, plus the sample generator.
STAGE_MODULES = (
    "flows.generate_sample", "flows.validate", "flows.clean", "flows.train", "flows.evaluate",
    "flows.register", "flows.index", "flows.package",
)
#: Variables read when a library is imported (or by the runtime it loads): they must match.
IMPORT_TIME_PREFIXES = (
    "PREFECT_", "MLFLOW_", "BENTOML_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "SENTENCE_TRANSFORMERS",
    "TORCH", "OMP_", "MKL_", "OPENBLAS_", "CUDA", "GX_", "DO_NOT_TRACK", "PYTHON", "MARKETPLACE_OFFLINE",
)
READY_LINE = "stage-runner: ready"
#: How long the idle runner waits for a request before it looks at its imports and children again.
IDLE_WAIT_S = 0.5


def import_time_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment that must be the same in the runner and in a caller."""
    return {key: value for key, value in environ.items() if key.startswith(IMPORT_TIME_PREFIXES)}


def refusal(header: Mapping[str, object], served: Sequence[str], cwd: str, environ: Mapping[str, str]) -> str | None:
    """Why this runner must not run the request (None: it can).

    Args:
        header: the client's request (module, cwd, env, executable, package).
        served: the modules this runner serves.
        cwd: the runner's working directory.
        environ: the runner's environment before it imported the stages (imports add to it).
    """
    if header.get("module") not in served:
        return f"{header.get('module')} is not a stage this runner serves ({', '.join(served)})"
    if header.get("executable") != os.path.realpath(sys.executable):
        return f"another interpreter ({header.get('executable')})"
    if header.get("package") != str(Path(__file__).resolve().parent):
        return f"another checkout ({header.get('package')})"
    if header.get("cwd") != cwd:
        return f"another working directory ({header.get('cwd')}; the runner's: {cwd})"
    env = header.get("env")
    if not isinstance(env, Mapping):
        return "no environment sent"
    theirs, ours = import_time_env(env), import_time_env(environ)
    differing = sorted(key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key))
    if differing:
        return f"environment differs in {', '.join(differing[:5])}"
    return None


class StageImports:
    """The stage modules, imported one at a time between requests (a request's own module first).

    The runner answers from the start: a stage asked for before its module is imported waits
    for that import (what its own process would have spent anyway), and the imports of the
    later stages go on while the early ones run.
    """

    def __init__(self, modules: Sequence[str]) -> None:
        self.served = tuple(modules)
        self.pending = list(modules)
        self.failed: dict[str, str] = {}

    def import_next(self) -> None:
        if self.pending:
            self._import(self.pending.pop(0))

    def ready(self, module: str) -> str | None:
        """Import `module` if needed; None when it can be forked, else why not."""
        if module in self.pending:
            self.pending.remove(module)
            self._import(module)
        if module in self.failed:
            return f"{module} did not import in the runner ({self.failed[module]})"
        extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if extra:  # a fork copies only this thread: a lock another one holds would stay held
            return f"the runner's imports started threads ({', '.join(extra)}); forking it is not safe"
        return None

    def _import(self, name: str) -> None:
        started = time.monotonic()
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - the stage itself will report it when run in place
            self.failed[name] = f"{type(error).__name__}: {error}"
            print(f"stage-runner: {name} not imported ({self.failed[name]})", file=sys.stderr, flush=True)
            return
        print(f"stage-runner: imported {name} in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def run_stage(header: Mapping[str, object], fds: Sequence[int], added_env: Mapping[str, str]) -> None:
    """In the forked stage process: become `python -m <module> <args>` and exit with its code.

    The environment is the caller's plus what the runner's imports added to it (torch sets
    TORCHINDUCTOR_CACHE_DIR, for one), as if the stage had imported them itself.
    """
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(str(header["cwd"]))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in dict(header["env"]).items()})  # type: ignore[arg-type]
    for key, value in added_env.items():
        os.environ.setdefault(key, value)
    os.environ[WATCH_PIDS_ENV] = str(header.get("watch", ""))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    module = str(header["module"])
    sys.argv = [module, *[str(a) for a in header.get("args", [])]]  # type: ignore[union-attr]
    code: int = 0
    try:
        with warnings.catch_warnings():
            # runpy warns that the module was imported before being run as __main__: that is the point.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then exit
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def supervise(conn: socket.socket, header: Mapping[str, object], fds: Sequence[int], added_env: Mapping[str, str]) -> None:
    """In a fork of the runner: start the stage, tell the client its pid, then how it ended."""
    signal.set_wakeup_fd(-1)  # the runner's wake-up pipe is the runner's alone
    stage = os.fork()
    if stage == 0:
        conn.close()
        run_stage(header, fds, added_env)
    for fd in fds:
        os.close(fd)
    code = 70
    request = " ".join([str(header["module"]), *[str(a) for a in header.get("args", [])]])  # type: ignore[union-attr]
    print(f"stage-runner: {request} started as pid {stage}", file=sys.stderr, flush=True)
    try:
        conn.send(json.dumps({"pid": stage}).encode())
        _, status = os.waitpid(stage, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"stage-runner: pid {stage} ended with exit code {code}", file=sys.stderr, flush=True)
        conn.send(json.dumps({"exit": code}).encode())
    except OSError:
        pass  # the client is gone: the stage notices it too (MARKETPLACE_WATCH_PIDS) and stops
    finally:
        os._exit(0)


def serve(socket_path: Path, modules: Sequence[str] = STAGE_MODULES) -> int:
    """Answer requests at once; import the stage modules between them; run each request in a fork."""
    before = dict(os.environ)
    imports = StageImports(modules)
    cwd = os.getcwd()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server.bind(str(socket_path))
    socket_path.chmod(0o600)
    server.listen(16)
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    # A signal also writes a byte to this pipe, so the wait below ends at once instead of at
    # its next timeout (make demo's last step is stopping the runner).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{READY_LINE} (pid {os.getpid()}; importing {len(modules)} stage modules between requests)", file=sys.stderr, flush=True)
    try:
        while not stopping:
            _reap()
            waiting, _, _ = select.select([server, wake_read], [], [], 0 if imports.pending else IDLE_WAIT_S)
            if stopping:
                break
            if server not in waiting:
                if not waiting:
                    imports.import_next()
                else:
                    os.read(wake_read, 512)  # another signal (SIGCHLD, ...): drain and go on
                continue
            conn, _ = server.accept()
            _handle(conn, imports, cwd, server, before)
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for fd in (wake_read, wake_write):
            os.close(fd)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
    return 0


def _handle(conn: socket.socket, imports: StageImports, cwd: str, listener: socket.socket, environ: Mapping[str, str]) -> None:
    fds: list[int] = []
    try:
        conn.settimeout(10)
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        header = json.loads(message)
        reason = refusal(header, imports.served, cwd, environ) if len(fds) == 3 else "expected stdin, stdout and stderr"
        reason = reason or imports.ready(str(header["module"]))
        if reason:
            print(f"stage-runner: refused {header.get('module')}: {reason}", file=sys.stderr, flush=True)
            conn.send(json.dumps({"refused": reason}).encode())
            return
        # what the imports so far added to the environment (torch sets TORCHINDUCTOR_CACHE_DIR, ...)
        added_env = {key: value for key, value in os.environ.items() if key not in environ}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if os.fork() == 0:
            listener.close()
            supervise(conn, header, fds, added_env)
    except (OSError, ValueError) as error:
        print(f"stage-runner: a request failed ({error})", file=sys.stderr)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.close()


def _reap() -> None:
    """Collect finished supervisors (they exit as soon as their stage has)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stage_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    args = parser.parse_args(argv)
    return serve(args.socket)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of the imported libraries.

    Tearing down torch, FAISS, MLflow and the rest took 2.5-3 s on 2 cores (C-level
    finalisation, no Python frame), the last seconds of every `make demo` and `make repro`.
    The runner holds nothing that needs it: each stage ran and exited in a fork of its own.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
