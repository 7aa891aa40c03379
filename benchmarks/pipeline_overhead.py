"""How much of the demo pipeline's time is orchestration, stage by stage.

Runs the demo the way `make demo` does (after the install): `make sample repro` inside one
Prefect server started by flows/prefect_server.py (generate the sample, `dvc add` it, then
`dvc repro`, with `REPRO_FLAGS=--force` so every stage runs although its outputs exist).
For each DVC stage it reports the wall time (from dvc's "Running stage" line to the next
one) beside the flow's own work (the Prefect flow run's start → end, read back from the
server's API), then repeats `dvc repro` with nothing changed (the README's `make repro`).

    .venv/bin/python benchmarks/pipeline_overhead.py --out benchmarks/results/pipeline_overhead.json

Overhead = pipeline wall time − the flows' own work: process start-up, imports, the
Prefect server's start, dvc's hashing and bookkeeping between stages.

By default the run keeps the caches an earlier run left (the image feature cache, the text
embedding cache, the index embeddings): a re-run. `--cold` deletes them first, so the stages
compute what `make demo` computes on a fresh clone; `--cold-report` puts such a run beside
the warm one in the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows import prefect_server  # noqa: E402  (applies the project's environment first)

sys.path.insert(0, str(ROOT / "benchmarks"))
from markdown_report import replace_section  # noqa: E402

SECTION_HEADING = "## Orchestration overhead (the demo pipeline)"
COMMAND = ("for i in 1 2 3 4; do .venv/bin/python benchmarks/pipeline_overhead.py --priority --cold "
           "--out benchmarks/results/pipeline_overhead_cold_$i.json; sleep 90; done; "
           ".venv/bin/python benchmarks/pipeline_overhead.py --render benchmarks/results/pipeline_overhead_cold_[1234].json "
           "--update-markdown BENCHMARKS.md")
# What a fresh clone lacks and a re-run reuses (params.yaml keys; the caches are rebuilt by the stages).
CACHE_KEYS = ("train.image.features_dir", "train.checkpoints_dir", "index.embeddings_dir")

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
REFUSAL_LINE = "stage-client: the stage runner refused"
#: make's own bookkeeping variables: passed on, they would make the inner make silent (no echo).
MAKE_INTERNALS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
#: make echoes this recipe line of `make sample` before running it: the sample flow has ended.
DVC_ADD_LINE = re.compile(r"^\S*dvc add data/raw\s*$")
DVC_ADD_MARK = "dvc add data/raw, dvc repro's start"


def run_timed(cmd: list[str], env: dict[str, str], label: str | None = None) -> tuple[float, list[tuple[str, float]]]:
    """Run `cmd`, echoing its output; returns its wall time and (stage, wall-clock start) marks.

    A command given a `label` is one mark itself; `make sample repro` gets one more when make
    echoes the `dvc add` line, and one per "Running stage" line of `dvc repro`.
    """
    started = time.monotonic()
    marks: list[tuple[str, float]] = [(label, time.time())] if label else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if REFUSAL_LINE in line and env.get("MARKETPLACE_STAGE_RUNNER", "off") != "off":
            proc.kill()
            raise SystemExit(f"a stage ran without the stage runner, so this run would not measure it: {line.strip()}")
        match = STAGE_LINE.search(line)
        if match:
            marks.append((match.group(1), time.time()))
        elif DVC_ADD_LINE.match(line):
            marks.append((DVC_ADD_MARK, time.time()))
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return time.monotonic() - started, marks


def make_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment the Makefile gives its commands (its `export`s: PATH, VIRTUAL_ENV, ...), as make computes it.

    `make demo` starts the Prefect wrapper, and with it the stage runner, in this environment; the
    runner refuses a stage whose import-time variables differ from its own, so the benchmark's
    wrapper must start from the same one.
    """
    printed = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", "print-environment-for-benchmark: ; @env -0",
         "print-environment-for-benchmark"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout
    pairs = (item.split("=", 1) for item in printed.split("\0") if "=" in item)
    return {key: value for key, value in pairs if key not in MAKE_INTERNALS}


def flow_runs_since(api_url: str, since: datetime) -> list[dict]:
    """Top-level flow runs that started after `since`, oldest first (Prefect REST API)."""
    body = {
        "flow_runs": {"start_time": {"after_": since.isoformat()}, "parent_task_run_id": {"is_null_": True}},
        "sort": "START_TIME_ASC",
        "limit": 200,
    }
    request = urllib.request.Request(
        api_url.rstrip("/") + "/flow_runs/filter", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _take_priority(pid: int | str = "self") -> str:
    """Raise a process's session (autogroup) to nice -20, so other jobs' sessions barely slow the run."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text("-20")
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    except OSError as error:
        return f"unchanged ({error})"


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def dvc_lock_cost(path: Path) -> dict:
    """How big dvc.lock is and what one round-trip YAML read of it costs (dvc does it per stage)."""
    from ruamel.yaml import YAML

    text = path.read_text()
    started = time.perf_counter()
    YAML(typ="rt").load(text)
    roundtrip = time.perf_counter() - started
    started = time.perf_counter()
    YAML(typ="safe").load(text)  # C-backed when ruamel.yaml's libyaml extra is installed (pyproject.toml)
    return {"md5_entries": text.count("md5:"), "bytes": len(text.encode()), "roundtrip_load_s": round(roundtrip, 3), "safe_load_s": round(time.perf_counter() - started, 3)}


def where_it_goes(report: dict) -> list[str]:
    """The overhead split into its fixed parts, and the work that would bring it to 10%."""
    stages = [s for s in report["stages"] if "before_flow_s" in s and s["stage"] != "generate_sample"]
    per_stage = sum(s["overhead_s"] for s in stages)
    before = sum(s["before_flow_s"] for s in stages)
    outside = sum(s["overhead_s"] for s in report["stages"] if s not in stages)
    rest = report["overhead_s"] - report["prefect_server_start_s"] - per_stage - outside
    lines = [
        "Where the overhead goes (this run):",
        "",
        f"- the Prefect server's start: {report['prefect_server_start_s']:.1f} s;",
        f"- outside the flows' work: the sample's generation, `dvc add`, dvc repro's start and its `code` stage"
        f" (the code fingerprints, no flow): {outside:.1f} s;",
        f"- the {len(stages)} `dvc repro` stages: {per_stage:.1f} s, {per_stage / max(len(stages), 1):.1f} s each on average;"
        f" {before:.1f} s of it before the flows start (process start, hand-over to the stage runner, flow-run set-up),"
        f" the rest after them (process exit, dvc hashing and caching the outputs, rewriting dvc.lock, the next stage's set-up);",
        f"- the rest ({rest:.1f} s): the run's end (the last stage's exit, stopping the stage runner and the server).",
    ]
    lock = report.get("dvc_lock")
    if lock:
        lines.append(
            f"- dvc.lock holds {lock['md5_entries']} hashes ({lock.get('bytes', 0) / 1024:.0f} KB; each stage's code is one"
            " fingerprint, `artifacts/code/<module>.txt`). dvc checks"
            " stages with ruamel's safe loader"
            + (f" ({lock['safe_load_s']:.2f} s per read here: the C parser, ruamel.yaml's libyaml extra)" if "safe_load_s" in lock else "")
            + f" and updates the file after every stage with the pure-Python round-trip loader ({lock['roundtrip_load_s']:.2f} s per"
            " read here) and dumper."
        )
    lines += [
        "",
        f"These costs are fixed: for the same {report['overhead_s']:.0f} s to be 10% of the wall time the flows' own work"
        f" would have to be {9 * report['overhead_s']:.0f} s; the demo's is {report['flows_work_s']:.0f} s.",
    ]
    return lines


def cache_dirs(params_file: Path) -> list[Path]:
    """The cache folders `--cold` deletes (CACHE_KEYS), read from params.yaml as the stages read them."""
    from pipeline_steps import config

    params = config.load_params(params_file)
    return [config.resolve_path(config.get(params, key), ROOT) for key in CACHE_KEYS]


TOTALS = (
    ("orchestration overhead", lambda r: f"{r['overhead_s']:.0f} s = **{r['overhead_share']:.1%}**"),
    ("demo pipeline wall time", lambda r: f"{r['pipeline_wall_s'] / 60:.1f} min"),
    ("flows' own work", lambda r: f"{r['flows_work_s']:.0f} s"),
    ("load average at start", lambda r: f"{r['machine']['load_avg_at_start'][0]:.1f}"),
)


def side_by_side(intro: str, names: tuple[str, str], runs: tuple[dict, dict], stage_keys: tuple[tuple[str, str], ...]) -> list[str]:
    """Two runs compared: their totals (TOTALS), then per stage the `stage_keys` ((column, key) pairs) of each.

    Args:
        intro: the paragraph above the tables.
        names: the two runs' column names.
        runs: the two reports; the stages are listed in the second one's order.
        stage_keys: which per-stage numbers to show, e.g. (("wall s", "wall_s"),).
    """
    first, second = runs
    lines = [intro, "", f"| | {names[0]} | {names[1]} |", "|---|---:|---:|"]
    lines += [f"| {name} | {show(first)} | {show(second)} |" for name, show in TOTALS]
    columns = [f"{column}, {name}" for column, _ in stage_keys for name in names]
    lines += ["", "| stage | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    by_stage = {stage["stage"]: stage for stage in first["stages"]}
    for stage in second["stages"]:
        pair = (by_stage.get(stage["stage"], {}), stage)
        cells = [f"{run.get(key, float('nan')):.1f}" for _, key in stage_keys for run in pair]
        lines.append(f"| {stage['stage']} | " + " | ".join(cells) + " |")
    return lines


def median_run(runs: list[dict]) -> dict:
    """The run whose overhead share is the median (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda run: run["overhead_share"])
    return ordered[(len(ordered) - 1) // 2]


def repeats_table(runs: list[dict]) -> list[str]:
    """One row per run of the same command: the share moves with the machine's load (a shared host)."""
    lines = [
        f"The same command run {len(runs)} times (the run above is the middle one, the lower of the two middle ones"
        " for an even count); the machine is shared, so the load"
        " and with it the flows' own work and the server's start move between runs:",
        "",
        "| run started (UTC) | caches | load average at start | server start s | flows' own work s | overhead s | share | pipeline wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda r: r["started"]):
        lines.append(
            f"| {run['started'][:16].replace('T', ' ')} | {run.get('caches', '?')} | {run['machine']['load_avg_at_start'][0]:.1f}"
            f" | {run['prefect_server_start_s']:.1f} | {run['flows_work_s']:.0f} | {run['overhead_s']:.1f}"
            f" | **{run['overhead_share']:.1%}** | {run['pipeline_wall_s'] / 60:.1f} min |"
        )
    shares = [run["overhead_share"] for run in runs]
    lines += ["", f"Overhead share: median {statistics.median(shares):.1%}, range {min(shares):.1%}–{max(shares):.1%}."]
    return lines


def to_markdown(report: dict, baseline: dict | None = None, cold: dict | None = None, repeats: list[dict] | None = None) -> str:
    """The BENCHMARKS.md section: targets, totals, the per-stage table (and the run without the stage runner)."""
    share = report["overhead_share"]
    caches = ("caches deleted first (`--cold`: " + ", ".join(report.get("caches_deleted", [])) + "), as on a fresh clone"
              if report.get("caches") == "cold" else "caches kept from an earlier run")
    lines = [
        SECTION_HEADING,
        "",
        f"`{COMMAND}` (`make sample repro REPRO_FLAGS=--force` inside one Prefect server, as `make demo` runs it, then `make repro` and `dvc repro`",
        f"with nothing changed; {caches}). {report['machine']['cpus']} cores; load average at start {report['machine']['load_avg_at_start'][0]:.1f}"
        f" (the 1-minute average: other jobs, and for a run started right after another, that run's tail), run started {report['started'][:16]} UTC"
        + (f"; this run's processes had the scheduler's priority over them ({report['machine']['autogroup']})."
           if report["machine"].get("autogroup") else "."),
        "",
        "| what | measured | target |",
        "|---|---:|---:|",
        f"| orchestration overhead (wall − flows' own work) | {report['overhead_s']:.0f} s = **{share:.1%}** of {report['pipeline_wall_s']:.0f} s | ≤ 10% |",
        f"| demo pipeline after the install (server + sample + all stages) | **{report['pipeline_wall_s'] / 60:.1f} min** | ≤ 8 min |",
        f"| `make repro` with nothing changed (server start included) | **{report['repro_unchanged_make_s']:.0f} s** | ≤ 30 s |",
        f"| plain `dvc repro` with nothing changed | {report['repro_unchanged_plain_s']:.0f} s | |",
        f"| Prefect server start (once per run) | {report['prefect_server_start_s']:.0f} s | |",
        "",
        f"Stage runner (flows/stage_runner.py): {'on' if report.get('stage_runner') else 'off'}.",
        "",
        "| stage | wall s | flow's own work s | overhead s | of which before the flow / after it |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in report["stages"]:
        split = f"{stage['before_flow_s']:.1f} / {stage['after_flow_s']:.1f}" if "before_flow_s" in stage else ""
        lines.append(f"| {stage['stage']} | {stage['wall_s']:.1f} | {stage['work_s']:.1f} | {stage['overhead_s']:.1f} | {split} |")
    lines.append("")
    lines.append(
        "Wall = from the stage's start (dvc's \"Running stage\" line) to the next one's; work = the stage's top-level"
        " Prefect flow run, start to end, read back from the server's API. The overhead is what remains: process start,"
        " imports of the libraries the stage uses, dvc's hashing and lock-file updates, the server's start."
    )
    lines += ["", *where_it_goes(report)]
    if repeats:
        lines += ["", *repeats_table(repeats)]
    if cold:
        intro = (f"The same pipeline with the caches deleted first (`--cold`: {', '.join(cold.get('caches_deleted', []))}), as"
                 f" `make demo` runs on a fresh clone, started {cold['started'][:16]} UTC:")
        lines += ["", *side_by_side(intro, ("re-run (caches kept)", "fresh clone's run (`--cold`)"), (report, cold),
                                    (("wall s", "wall_s"), ("work s", "work_s")))]
    if baseline:
        intro = (f"The same run without the stage runner (`--no-runner`, same machine and caches, started"
                 f" {baseline['started'][:16]} UTC): each stage imports its own libraries, some of them inside its tasks"
                 " (hence the flows' own work differs too).")
        lines += ["", *side_by_side(intro, ("without the runner", "with it"), (baseline, report),
                                    (("overhead s", "overhead_s"), ("before the flow s", "before_flow_s")))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline_overhead.json")
    parser.add_argument("--skip-sample", action="store_true", help="reuse data/raw as it is (default: generate it again, as a fresh clone does)")
    parser.add_argument("--update-markdown", type=Path, default=None, help="rewrite this file's '## Orchestration overhead' section")
    parser.add_argument("--priority", action="store_true",
                        help="on a shared machine: give this run's process group the scheduler's priority (autogroup nice -20; root)")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="no run: render these JSON reports (with --update-markdown); with several, the run of median"
                             " overhead share is shown in detail and every run in a table of repeats")
    parser.add_argument("--no-runner", action="store_true", help="without the stage runner: each stage imports its own libraries")
    parser.add_argument("--baseline", type=Path, default=None, help="a --no-runner report to compare with, in the Markdown")
    parser.add_argument("--cold", action="store_true", help="delete the caches first (CACHE_KEYS in params.yaml), as on a fresh clone")
    parser.add_argument("--cold-report", type=Path, default=None, help="a --cold report to put beside this run, in the Markdown")
    args = parser.parse_args()
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    cold = json.loads(args.cold_report.read_text()) if args.cold_report else None
    if args.render:
        runs = [json.loads(path.read_text()) for path in args.render]
        section = to_markdown(median_run(runs), baseline, cold, repeats=runs if len(runs) > 1 else None)
        if args.update_markdown:
            replace_section(args.update_markdown, SECTION_HEADING, section)
        else:
            print(section)
        return

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind: the server is stopped on the way out
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_API_URL", None)
    if args.no_runner:
        os.environ["MARKETPLACE_STAGE_RUNNER"] = env["MARKETPLACE_STAGE_RUNNER"] = "off"
    else:
        os.environ.pop("MARKETPLACE_STAGE_RUNNER", None)
        env.pop("MARKETPLACE_STAGE_RUNNER", None)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env = make_environment(env)
    os.environ.update(env)  # the wrapper below starts the server and the stage runner from os.environ
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}, "started": datetime.now(timezone.utc).isoformat()}
    if args.priority:
        if os.getsid(0) != os.getpid():
            # The priority belongs to a session (autogroup): take a session of our own first, or
            # the shell's whole session (and whatever else it starts later) keeps nice -20.
            os.execvp("setsid", ["setsid", "--wait", sys.executable, *sys.argv])
        report["machine"]["autogroup"] = _take_priority()

    report["caches"] = "cold" if args.cold else "kept"
    if args.cold:
        report["caches_deleted"] = []
        for folder in cache_dirs(ROOT / "params.yaml"):
            shutil.rmtree(folder, ignore_errors=True)
            report["caches_deleted"].append(str(folder.relative_to(ROOT)))

    since = datetime.now(timezone.utc)
    t_server = time.monotonic()
    marks: list[tuple[str, float]] = []
    with prefect_server.prefect_api() as server_env:
        server_start_s = time.monotonic() - t_server
        if args.priority and prefect_server.SERVER_PID_ENV in server_env:
            # the server answers every stage's API calls: it is part of the run, so it gets the priority too
            _take_priority(int(server_env[prefect_server.SERVER_PID_ENV]))
        if args.priority and prefect_server.RUNNER_PID_ENV in server_env:
            _take_priority(int(server_env[prefect_server.RUNNER_PID_ENV]))  # the stages run in its forks
        run_env = {**env, **server_env}  # what `make demo`'s commands get from the wrapper
        report["stage_runner"] = "MARKETPLACE_STAGE_RUNNER" in run_env and run_env["MARKETPLACE_STAGE_RUNNER"] != "off"
        # `make demo` runs `make sample repro` inside its wrapper: the same make targets here.
        targets = ["repro"] if args.skip_sample else ["sample", "repro"]
        if not args.skip_sample:
            shutil.rmtree(ROOT / "data" / "raw", ignore_errors=True)  # generated as on a fresh clone
        make_cmd = ["make", "--no-print-directory", *targets, "REPRO_FLAGS=--force"]
        repro_s, marks = run_timed(make_cmd, run_env, label=None if args.skip_sample else "generate_sample")
        t_end, t_end_mono = time.time(), time.monotonic()
        runs = flow_runs_since(server_env["PREFECT_API_URL"], since)
        t_stop = time.monotonic()
    # The wall time leaves out this script's own question to the API, not the runner's and server's stop.
    pipeline_wall = (t_end_mono - t_server) + (time.monotonic() - t_stop)

    # Stage wall time: from its mark to the next one (the last: to the end). Each top-level
    # flow run belongs to the stage whose window holds its start.
    bounds = [t for _, t in marks] + [t_end]
    stages = [{"stage": stage, "wall_s": round(bounds[i + 1] - start, 1), "work_s": 0.0} for i, (stage, start) in enumerate(marks)]
    finished = [r for r in runs if r.get("start_time") and r.get("end_time")]
    for run in finished:
        start = _parse(run["start_time"]).timestamp()
        for i, stage in enumerate(stages):
            if bounds[i] <= start < bounds[i + 1]:
                stage["work_s"] = round(stage["work_s"] + (_parse(run["end_time"]) - _parse(run["start_time"])).total_seconds(), 1)
                stage["before_flow_s"] = round(start - bounds[i], 1)  # process start, imports, flow-run set-up
                stage["after_flow_s"] = round(bounds[i + 1] - _parse(run["end_time"]).timestamp(), 1)  # exit, dvc bookkeeping
                stage.setdefault("flows", []).append(run.get("name"))
    for stage in stages:
        stage["overhead_s"] = round(stage["wall_s"] - stage["work_s"], 1)

    work_total = sum(s["work_s"] for s in stages)
    report.update({
        "prefect_server_start_s": round(server_start_s, 1),
        "make_sample_repro_s": round(repro_s, 1),
        "pipeline_wall_s": round(pipeline_wall, 1),
        "flows_work_s": round(work_total, 1),
        "overhead_s": round(pipeline_wall - work_total, 1),
        "overhead_share": round((pipeline_wall - work_total) / pipeline_wall, 3),
        "flow_runs_seen": len(finished),
        "stages": stages,
    })

    # Nothing changed: what `make repro` costs (server start included) and plain `dvc repro`.
    t0 = time.monotonic()
    run_timed(["make", "--no-print-directory", "repro"], env)
    report["repro_unchanged_make_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    run_timed([str(bin_dir / "dvc"), "repro"], env)
    report["repro_unchanged_plain_s"] = round(time.monotonic() - t0, 1)

    report["dvc_lock"] = dvc_lock_cost(ROOT / "dvc.lock")
    report["finished"] = datetime.now(timezone.utc).isoformat()
    report["load_avg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_markdown:
        replace_section(args.update_markdown, SECTION_HEADING, to_markdown(report, baseline, cold))
    print(json.dumps({k: v for k, v in report.items() if k != "stages"}, indent=2))
    print(f"{'stage':20s} {'wall s':>8s} {'work s':>8s} {'overhead s':>10s}")
    for s in stages:
        print(f"{s['stage']:20s} {s['wall_s']:8.1f} {s['work_s']:8.1f} {s['overhead_s']:10.1f}")


if __name__ == "__main__":
    main()
