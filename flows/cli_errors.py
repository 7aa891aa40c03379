"""Expected errors end a stage with one message and an exit code; unexpected ones keep their traceback.

A data or configuration problem (the project's own PipelineError types, pipeline_steps/errors.py)
is not a crash: `python -m flows.<stage>` prints `error: <message>` and exits with a code that
says which kind it was. Prefect still marks the run Failed with the message, but its loggers
would print the whole traceback after it ("Encountered exception during execution"), so while a
flow runs under run_cli the traceback is left off every log record whose exception is a
PipelineError. Set MARKETPLACE_DEBUG=1 to keep the tracebacks (and re-raise).

Exit codes (sysexits.h): 65 data error, 78 configuration error, 69 any other PipelineError
(a service the stage needs, such as the MLflow server, is unavailable; a stage run out of order);
1 with a traceback for anything unexpected; 2 for a command-line usage error (argparse).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline_steps.errors import ConfigError, DataValidationError, PipelineError

DEBUG_ENV = "MARKETPLACE_DEBUG"
EXIT_DATA = 65
EXIT_CONFIG = 78
EXIT_OTHER = 69


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def project_error(exc: BaseException | None) -> PipelineError | None:
    """The PipelineError behind `exc` (itself, or one in its cause/context chain), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PipelineError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_code(error: PipelineError) -> int:
    if isinstance(error, DataValidationError):
        return EXIT_DATA
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    return EXIT_OTHER


class DropProjectTracebacks(logging.Filter):
    """Keep the record (its message names the error) but not the traceback of a PipelineError."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info, tuple) and project_error(record.exc_info[1]) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


@contextmanager
def quiet_project_tracebacks() -> Iterator[None]:
    """While the flow runs: no traceback in any log record of a PipelineError (unless debugging).

    Done in the log-record factory rather than on handlers, because Prefect (re)configures its
    handlers when a flow starts; the factory sees every record of every logger first.
    """
    if debug_enabled():
        yield
        return
    previous = logging.getLogRecordFactory()
    drop = DropProjectTracebacks()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        drop.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def fail(error: PipelineError) -> SystemExit:
    """The SystemExit run_cli raises: one line on stderr, the error's exit code."""
    import sys

    print(f"error: {error}", file=sys.stderr, flush=True)
    exit_ = SystemExit(exit_code(error))
    exit_.error = error  # type: ignore[attr-defined]
    return exit_
