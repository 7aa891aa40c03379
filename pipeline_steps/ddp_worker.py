"""One neural model trained by several processes: torchrun + DistributedDataParallel (`train.distributed.nproc` > 1).

Why: the train stage's one training loop (training_loop.fit) is data-parallel when torch.distributed
is initialised; this module starts those processes and is what each of them runs.

* `launch` (the train stage, through training.train_model): writes the resolved `train:` section to
  a temporary JSON file and runs

      python -m torch.distributed.run --standalone --nproc_per_node N -m pipeline_steps.ddp_worker --kind image ...

  (`torchrun`), relays rank 0's per-epoch metrics to `on_epoch_end` while it runs (the flow logs
  them to MLflow, as for one process), and fails with the command and its exit code.
* `main` (each rank): initialises the process group (gloo on CPU; NCCL on CUDA with the GPU of
  LOCAL_RANK), then trains through the same entry point as one process
  (training.train_in_process -> training_recipe.run_recipe). Rank 0 writes the model directory
  and the checkpoint; the other ranks write nothing.

Every rank gets the same params and seed; each trains on its DistributedSampler slice, so the
effective batch is `batch_size` x N and an epoch is 1/N of the steps, so the learning rate is scaled
by `train.distributed.lr_scaling` (linear: x N, training_loop.lr_scale). Several machines: run torchrun yourself with `--nnodes/--node_rank/--master_addr` and the
same worker arguments (untested here, as is the CUDA/NCCL path).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_steps.config import PROJECT_ROOT
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.model_kinds import NEURAL_KINDS
from pipeline_steps.train_params import required_key
from pipeline_steps.training_loop import EpochCallback, lr_scale

#: the worker module torchrun runs (`-m`).
WORKER = "pipeline_steps.ddp_worker"


def distributed_nproc(train_params: Mapping[str, Any]) -> int:
    """`train.distributed.nproc`: how many processes train one neural model.

    Args:
        train_params: params.yaml's `train:` section (or the whole params).

    Returns:
        The number, >= 1.

    Raises:
        ConfigError: the key is missing or not an integer >= 1.
    """
    train = train_params["train"] if isinstance(train_params.get("train"), Mapping) else train_params
    section = required_key(train, "distributed", "train.distributed")
    nproc = required_key(section, "nproc", "train.distributed.nproc")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"params.yaml key 'train.distributed.nproc' must be an integer >= 1, got {nproc!r}")
    return nproc


def worker_command(nproc: int, worker_args: list[str]) -> list[str]:
    """The torchrun command line: this interpreter's `torch.distributed.run` (= `torchrun`), one machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}", "-m", WORKER, *worker_args]


def _relay_epochs(events: Path, offset: int, on_epoch_end: EpochCallback | None) -> int:
    """Pass the complete lines rank 0 appended to `events` since `offset` to `on_epoch_end`; the new offset."""
    if not events.is_file():
        return offset
    with events.open("rb") as stream:
        stream.seek(offset)
        chunk = stream.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if line.strip() and on_epoch_end is not None:
            event = json.loads(line)
            on_epoch_end(int(event["epoch"]), event["metrics"])
    return offset + len(complete)


def launch(
    kind: str,
    nproc: int,
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    models_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> Path:
    """Train `kind` with `nproc` processes under torchrun; rank 0 writes `models_dir/kind`.

    Args:
        kind: image, text or multimodal (multimodal reads the towers in `models_dir/image` and `models_dir/text`).
        nproc: processes (`train.distributed.nproc`).
        clean_dir: the clean layer.
        train_params: params.yaml's `train:` section (or the whole params), overrides applied.
        models_dir: `train.models_dir`.
        resume: continue from the model's checkpoint (written by a run with as many processes).
        on_epoch_end: called here with (epoch, metrics) as rank 0 finishes each epoch.
        progress: rank 0 shows progress bars.

    Returns:
        The model directory rank 0 wrote.

    Raises:
        PipelineError: torchrun or a rank failed (the message names the command and its exit code).
    """
    out_dir = Path(models_dir) / kind
    lr_scale(train_params, nproc)  # train.distributed.lr_scaling is checked before any process starts
    with tempfile.TemporaryDirectory(prefix=f"ddp-{kind}-") as tmp:
        params_file, events = Path(tmp) / "train_params.json", Path(tmp) / "epochs.jsonl"
        params_file.write_text(json.dumps(dict(train_params), default=str))
        args = [
            "--kind", kind, "--clean-dir", str(Path(clean_dir).resolve()), "--train-params", str(params_file),
            "--models-dir", str(Path(models_dir).resolve()), "--epochs-file", str(events),
            *(["--resume"] if resume else []), *([] if progress else ["--no-progress"]),
        ]
        command = worker_command(nproc, args)
        process = subprocess.Popen(command, cwd=PROJECT_ROOT)  # output goes to this stage's log as it comes
        offset, code = 0, None
        try:
            while code is None:
                try:
                    code = process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                offset = _relay_epochs(events, offset, on_epoch_end)
        finally:
            if process.poll() is None:  # on_epoch_end raised, or this process is being stopped
                process.terminate()
                process.wait(timeout=60)
    if code != 0:
        raise PipelineError(
            f"distributed training of the {kind} model failed: `{shlex.join(command)}` exited with code {code} "
            "(the ranks' output is above; train.distributed.nproc: 1 trains in one process)"
        )
    return out_dir


def _epoch_writer(events: Path) -> EpochCallback:
    def write(epoch: int, metrics: dict[str, float]) -> None:
        with events.open("a") as stream:
            stream.write(json.dumps({"epoch": epoch, "metrics": metrics}) + "\n")

    return write


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One rank of a model's distributed training (run by torchrun; see the module docstring).")
    p.add_argument("--kind", required=True, choices=NEURAL_KINDS)
    p.add_argument("--clean-dir", required=True)
    p.add_argument("--train-params", required=True, help="JSON file: params.yaml's train: section, overrides applied")
    p.add_argument("--models-dir", required=True, help="train.models_dir: <models-dir>/<kind> is written")
    p.add_argument("--epochs-file", help="rank 0 appends one JSON line per epoch (epoch, metrics) here")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> None:
    """One rank: join the process group torchrun set up (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) and train."""
    import torch
    import torch.distributed as dist

    from pipeline_steps import training
    from pipeline_steps.training_loop import resolve_device

    args = parser().parse_args(argv)
    train_params = json.loads(Path(args.train_params).read_text())
    train = train_params["train"] if isinstance(train_params.get("train"), Mapping) else train_params
    device = resolve_device(required_key(train, "device", "train.device"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process on this machine
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        main_rank = dist.get_rank() == 0
        on_epoch_end = _epoch_writer(Path(args.epochs_file)) if main_rank and args.epochs_file else None
        training.train_in_process(
            args.kind, args.clean_dir, train_params, args.models_dir, args.resume, on_epoch_end, args.progress and main_rank
        )
        dist.barrier()  # the other ranks wait until rank 0 has written the model directory
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
