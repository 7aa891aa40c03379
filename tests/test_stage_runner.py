"""The stage runner: stages handed over to a warm process run as they would on their own."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows import stage_runner
from flows.stage_client import requested_stage

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python", "-m", "flows.train", "--model", "image"], ("flows.train", ["--model", "image"])),
        (["python", "-X", "importtime", "-m", "flows.clean"], None),  # an option with a value: not parsed, run here
        (["python", "-u", "-m", "flows.clean"], ("flows.clean", [])),
        (["python", "-mflows.index", "--kind", "text"], ("flows.index", ["--kind", "text"])),
        (["python", "-m", "flows.prefect_server", "--", "dvc", "repro"], None),
        (["python", "-m", "flows.stage_runner", "--socket", "x"], None),
        (["python", "-m", "pytest"], None),
        (["python", "-c", "import flows"], None),
        (["python", "script.py"], None),
    ],
)
def test_only_python_dash_m_of_a_stage_module_is_handed_over(argv: list[str], expected) -> None:  # noqa: ANN001
    assert requested_stage(argv) == expected


def _request(**changes: object) -> dict:
    env = stage_runner.import_time_env(os.environ) | {"PATH": "/somewhere/else"}  # PATH may differ
    header = {
        "module": "flows.clean", "cwd": "/project", "env": env,
        "executable": os.path.realpath(sys.executable), "package": str(ROOT / "flows"),
    }
    return header | changes


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"module": "flows.pipeline"}, "not a stage this runner serves"),
        ({"cwd": "/elsewhere"}, "another working directory"),
        ({"executable": "/usr/bin/python3"}, "another interpreter"),
        ({"package": "/other/checkout/flows"}, "another checkout"),
    ],
)
def test_the_runner_refuses_what_it_cannot_run_as_the_caller_would(changes: dict, reason: str | None) -> None:
    refused = stage_runner.refusal(_request(**changes), ["flows.clean"], "/project", os.environ)
    assert refused is None if reason is None else reason in refused


def test_a_library_setting_read_at_import_must_match() -> None:
    """Prefect read PREFECT_* when the runner imported it: a caller with other values runs on its own."""
    header = _request()
    header["env"] = {**header["env"], "PREFECT_LOGGING_LEVEL": "DEBUG"}
    environ = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    assert "PREFECT_LOGGING_LEVEL" in stage_runner.refusal(header, ["flows.clean"], "/project", environ)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SCRIPT = textwrap.dedent("""
    set -u
    runner_log="$(dirname "$MARKETPLACE_STAGE_RUNNER")/runner.log"
    stage() {{ {python} -m flows.generate_sample "$@"; }}
    stage --set sample.n_products=60 --out {work}/handed; echo "handed $?" >> {work}/codes
    stage --set sample.n_prodcts=60 --out {work}/typo 2> {work}/typo.err; echo "typo $?" >> {work}/codes
    HF_HUB_VERBOSITY=debug stage --set sample.n_products=60 --out {work}/refused 2> {work}/refused.err; echo "refused $?" >> {work}/codes
    {python} -m flows.generate_sample --set sample.n_products=4000 --out {work}/stopped & client=$!
    for i in $(seq 600); do grep -q "n_products=4000 --out {work}/stopped started" "$runner_log" && break; sleep 0.5; done
    sleep 4
    kill -TERM $client; wait $client; echo "stopped $?" >> {work}/codes
    sleep 3
    cp "$runner_log" {work}/runner.log
""")


@pytest.mark.integration
def test_stages_handed_to_the_runner_behave_like_their_own_process(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MARKETPLACE_STAGE_RUNNER")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.prefect_server", "--port", str(_free_port()), "--", "bash", "-c",
         SCRIPT.format(python=sys.executable, work=work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = dict(line.split() for line in (work / "codes").read_text().splitlines())
    log = (work / "runner.log").read_text()

    # handed over: run by the runner, same output and exit code as its own process
    assert codes["handed"] == "0"
    assert "flows.generate_sample --set sample.n_products=60 --out" in log
    assert (work / "handed" / "Products.csv").is_file()
    # a project error keeps its one-line message and exit code, no traceback
    assert codes["typo"] == "78"
    typo = (work / "typo.err").read_text()
    assert "unknown key 'sample.n_prodcts'" in typo and "Traceback" not in typo
    # another value of a variable libraries read at import: refused, run in its own process
    assert codes["refused"] == "0"
    assert "refused flows.generate_sample: environment differs in HF_HUB_VERBOSITY" in log
    # ... and the stage says so itself: it now pays for its own imports, and the reason says why
    assert "stage runner refused this stage (environment differs in HF_HUB_VERBOSITY)" in (work / "refused.err").read_text()
    assert (work / "refused" / "Products.csv").is_file()
    # SIGTERM to the process dvc started stops the stage the runner runs for it
    assert codes["stopped"] in ("130", "143"), codes
    pid = int(re.search(r"n_products=4000 --out \S+ started as pid (\d+)", log).group(1))
    assert f"pid {pid} ended with exit code" in log
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (work / "stopped" / "Products.csv").exists()
    # the runner and its forks are gone with the wrapper
    runner_pid = int(re.search(r"ready \(pid (\d+)", log).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(runner_pid, 0)


@pytest.mark.integration
def test_a_nested_wrapper_uses_the_outer_runner(tmp_path: Path) -> None:
    """`make demo` wraps `make repro`, which wraps `dvc repro` again: one runner, not two."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MARKETPLACE_STAGE_RUNNER")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    wrap = f"{sys.executable} -m flows.prefect_server"
    command = f"echo OUTER $MARKETPLACE_STAGE_RUNNER; {wrap} -- bash -c 'echo INNER $MARKETPLACE_STAGE_RUNNER'"
    proc = subprocess.run([sys.executable, "-m", "flows.prefect_server", "--port", str(_free_port()), "--", "bash", "-c", command],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("OUTER", "INNER")))
    assert seen["OUTER"].endswith("runner.sock") and seen["INNER"] == seen["OUTER"]
    assert proc.stderr.count("stage runner ready") == 1


@pytest.mark.integration
def test_sigterm_ends_an_idle_runner_at_once(tmp_path: Path) -> None:
    """The signal wakes the runner's wait: it does not sit out the wait's timeout first."""
    sock = tmp_path / "runner.sock"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from flows import stage_runner
        stage_runner.IDLE_WAIT_S = 60.0
        stage_runner.exit_now(stage_runner.serve(Path({str(sock)!r}), modules=()))
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert runner.stderr is not None and stage_runner.READY_LINE in runner.stderr.readline()
        runner.terminate()
        assert runner.wait(timeout=20) == 0
    finally:
        runner.kill()
    assert not sock.exists()


@pytest.mark.integration
def test_the_runner_leaves_without_the_libraries_teardown(tmp_path: Path) -> None:
    """exit_now: output flushed, exit code kept, no atexit/finalisation work (2.5-3 s with torch loaded)."""
    script = textwrap.dedent("""
        import atexit, sys
        from flows import stage_runner
        atexit.register(lambda: print("teardown ran", flush=True))
        print("buffered", end="")
        sys.stderr.write("to stderr")
        stage_runner.exit_now(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "buffered" and proc.stderr == "to stderr"
