"""What every flow shares: params loading, offline settings, stage caching and the CLI shape.

Flows stay thin: they read params.yaml, call pipeline_steps functions inside
Prefect tasks and write metrics. DVC stages call the same flows through their
command line, so `dvc repro` and a run triggered from the Prefect UI execute
the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy, TASK_SOURCE

from flows.process_tree import WATCH_PIDS_ENV
from pipeline_steps import config
from pipeline_steps.io_utils import write_json

ROOT = config.PROJECT_ROOT
STAMP_NAME = "_stage_stamp.json"
log = logging.getLogger("marketplace")


def load_params(params_path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load params.yaml and apply `key=value` overrides (values parsed as YAML), checked again after."""
    import yaml

    params = config.load_params(params_path)
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep:
            raise config.ConfigError(f"override '{override}' must look like key.path=value")
        config.set_value(params, key.strip(), yaml.safe_load(raw_value))
    if overrides:
        from pipeline_steps import settings

        settings.validate(params, source="params.yaml with --set " + " ".join(overrides))
    return params


def path_of(params: dict[str, Any], key: str) -> Path:
    """A params.yaml path resolved against the repository root."""
    return config.resolve_path(config.get(params, key), ROOT)


def fingerprint_paths(paths: Iterable[str | Path]) -> str:
    """Content hash of files and folders: the identity of a stage's inputs.

    Folders are hashed file by file in sorted order, so the same data in another
    place gives the same fingerprint and a single changed photo changes it.
    """
    digest = hashlib.sha256()
    for raw_path in paths:
        path = Path(raw_path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != STAMP_NAME)
        elif path.exists():
            files = [path]
        else:
            digest.update(f"missing:{path.name}".encode())
            continue
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _settings_hash(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    stamp = Path(out_dir) / STAMP_NAME
    if not stamp.is_file():
        return None
    return json.loads(stamp.read_text(encoding="utf-8"))


def write_stamp(out_dir: Path, inputs_fingerprint: str, settings: Any) -> None:
    """Record what an output folder was built from, so an identical re-run is a no-op."""
    write_json(Path(out_dir) / STAMP_NAME, {"inputs": inputs_fingerprint, "settings": _settings_hash(settings)})


def is_fresh(out_dir: Path, inputs_fingerprint: str, settings: Any) -> bool:
    stamp = read_stamp(out_dir)
    return bool(stamp) and stamp == {"inputs": inputs_fingerprint, "settings": _settings_hash(settings)}


def _stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key built only from serialisable task inputs: input paths and settings.

    The content of every input path is hashed, so the same data under another
    name hits the cache and one changed photo misses it.
    """
    inputs = fingerprint_paths(parameters.get("inputs", []))
    return _settings_hash([inputs, parameters.get("settings")])


# Tasks that take (inputs, outputs, settings) use this policy; call them through
# `stage_task(...)` so that a missing or stale output refreshes the cache instead
# of trusting it (dvc repro deletes a stage's outputs before running it).
STAGE_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_stage_cache_key)


def stage_task(task_fn: Any, inputs: list[str], outputs: list[str], settings: Any) -> Any:
    """Run a STAGE_CACHE task: a no-op when its first output is stamped with these very inputs."""
    fresh = is_fresh(Path(outputs[0]), fingerprint_paths(inputs), settings) and all(Path(p).exists() for p in outputs)
    if fresh:
        log.info("%s: outputs are up to date with their inputs", task_fn.name)
    return task_fn.with_options(refresh_cache=not fresh)(inputs, outputs, settings)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Every flow CLI accepts --params and repeated --set key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(config.DEFAULT_PARAMS), help="params.yaml to read")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one params.yaml key for this run, e.g. --set train.image.epochs=1",
    )
    return parser


#: Exit code of a stage stopped by Ctrl-C or SIGTERM (the shell's 128 + SIGINT).
EXIT_STOPPED = 130
#: Seconds a stopped stage may spend unwinding (Prefect marks its runs Crashed, its temporary
#: API shuts down) before the process exits regardless.
STOP_DEADLINE_S = 8.0


def install_stop_handlers(deadline_s: float = STOP_DEADLINE_S) -> None:
    """Make SIGTERM stop a stage the way Ctrl-C does, within `deadline_s` seconds.

    Python's default SIGTERM ends the process at once, skipping `finally` blocks and
    atexit: the temporary Prefect API a serverless run started was left running, orphaned.
    Here SIGTERM raises KeyboardInterrupt instead, so Prefect marks the run Crashed and
    stops its temporary server; a watchdog exits the process if unwinding hangs (e.g. on
    an API that went away), and a second signal kills it at once.
    """

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        watchdog = threading.Timer(deadline_s, os._exit, args=(128 + signum,))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def stop_with_parent(poll_s: float = 0.5) -> None:
    """Stop this stage (as SIGTERM would) when the process that started it goes away.

    `dvc repro` dies on SIGTERM without passing it to the running stage, which then went
    on alone, with its temporary Prefect API. The process watched is dvc itself even when a
    `sh -c` wrapper sits between (flows/process_tree.watched_ancestor); a stage run by the
    stage runner (flows/stage_runner.py) watches the client dvc started and that client's
    own parent, named in MARKETPLACE_WATCH_PIDS. Only used under dvc or the runner: a stage
    started by hand with `nohup` keeps running when its shell exits.
    """
    from flows import process_tree

    parent = os.getppid()
    named = process_tree.watch_list_from_env()
    if named:
        watched, check_parent = named, False
    else:
        ancestor = process_tree.watched_ancestor()
        watched, check_parent = [(ancestor, process_tree.start_time(ancestor))], True

    def watch() -> None:
        while (not check_parent or os.getppid() == parent) and all(
            process_tree.still_running(pid, started) for pid, started in watched
        ):
            time.sleep(poll_s)
        log.warning("the process that started this stage (pid %s) has gone: stopping",
                    ", ".join(str(pid) for pid, _ in watched))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def check_prefect_api() -> None:
    """With PREFECT_API_URL set, fail within seconds (naming it) when nothing answers there.

    Prefect's own client would retry for minutes before the flow's first task.
    """
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        from flows.prefect_server import require_api

        require_api(api_url)


def flow_run_settings() -> contextlib.AbstractContextManager[Any]:
    """The Prefect settings this process's flow runs get.

    Under the per-run server that flows.prefect_server starts (it exports
    MARKETPLACE_PREFECT_SERVER_PID), flow-run heartbeats are off. They feed the detection of
    crashed runs, an automation served by the server's triggers service, which that server
    runs without (prefect_server.IDLE_SERVICES_OFF); and every run paid 0.6-0.8 s at its end
    while Prefect joined the heartbeat thread out of its one-second sleep
    (flow_engine._send_heartbeats), 11 times per `make demo`. Against a server of the user's
    own (PREFECT_API_URL), Prefect's default stands.
    """
    from flows.prefect_server import SERVER_PID_ENV

    if not os.environ.get(SERVER_PID_ENV):
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def run_cli(flow_fn: Callable[..., Any], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Any:
    """Parse arguments and call the flow, turning user errors into a one-line message.

    A PipelineError (data or configuration) ends the process with `error: <message>` on
    stderr and its exit code (65 data, 78 config, 69 other; flows/cli_errors.py), without a
    traceback from us or from Prefect's loggers; the Prefect run is still marked Failed with
    the message. MARKETPLACE_DEBUG=1 keeps the tracebacks. Anything else is a bug: traceback.
    """
    from flows.cli_errors import debug_enabled, fail, quiet_project_tracebacks
    from pipeline_steps.errors import PipelineError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = vars(parser.parse_args(argv))
    install_stop_handlers()
    stage = os.environ.get("DVC_STAGE")
    if stage or os.environ.get(WATCH_PIDS_ENV):
        stop_with_parent()
    if stage:
        # The Prefect UI lists the run under the DVC stage's name (train_image, not "train").
        flow_fn = flow_fn.with_options(flow_run_name=stage.replace("{", "(").replace("}", ")"))
    try:
        check_prefect_api()
        with quiet_project_tracebacks(), flow_run_settings():
            return flow_fn(**args)
    except PipelineError as error:
        if debug_enabled():
            raise
        raise fail(error) from None
    except KeyboardInterrupt as stop:
        # Outputs are written atomically, so nothing half-written is left: `dvc repro` redoes the stage.
        print(f"stopped ({stop or 'interrupted'}); run the stage again to finish it", file=sys.stderr)
        raise SystemExit(EXIT_STOPPED) from None
