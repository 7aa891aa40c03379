"""Data-parallel training under torchrun: DistributedDataParallel over processes and machines.

    torchrun --nproc_per_node 2 -m pipeline_steps.ddp_train --data train.npz --out model_dir
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m pipeline_steps.ddp_train ...

What it trains: the classification head the CPU default trains (`train.image.mode: frozen`): an
MLP (features -> `hidden_dim` -> classes) on precomputed features (``.npz`` with ``x_train``,
``y_train``, ``x_val``, ``y_val``). Backend ``gloo`` on CPU, ``nccl`` on CUDA (one GPU per local
rank). Each process sees its `DistributedSampler` slice of every epoch; the effective batch is
``batch_size`` × world size, so the learning rate is scaled by the world size (linear scaling) unless
``--no-lr-scaling``. Rank 0 evaluates on the validation set and writes ``<out>/head.pt`` and
``<out>/result.json`` (val accuracy, world size, seconds).

`launch(nproc, ...)` runs it through ``torchrun`` from Python (``train.distributed.nproc``); with
``nproc`` 1 it still goes through torchrun, so 1 and N processes run the same code.

Not done here: the train stage (flows/train.py) does not call this yet; see the issue's report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _setup() -> tuple[int, int, Any]:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() and os.environ.get("DDP_FORCE_CPU") != "1"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    rank, world, device = _setup()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    data = np.load(args.data)
    x_train, y_train = torch.from_numpy(data["x_train"]).float(), torch.from_numpy(data["y_train"]).long()
    x_val, y_val = torch.from_numpy(data["x_val"]).float(), torch.from_numpy(data["y_val"]).long()
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    model = nn.Sequential(nn.Linear(x_train.shape[1], args.hidden_dim), nn.ReLU(), nn.Dropout(args.dropout),
                          nn.Linear(args.hidden_dim, n_classes)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = args.lr * (world if args.lr_scaling else 1)
    optimiser = torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=args.weight_decay)
    sampler = DistributedSampler(TensorDataset(x_train, y_train), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for xb, yb in loader:
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(xb.to(device)), yb.to(device))
            loss.backward()  # gradients all-reduced (averaged) across the processes here
            optimiser.step()
    seconds = time.perf_counter() - started
    result = None
    if rank == 0:
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_val.to(device)).argmax(1).cpu() == y_val).float().mean())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "head.pt")
        result = {"val_accuracy": accuracy, "world_size": world, "backend": dist.get_backend(), "epochs": args.epochs,
                  "lr": lr, "train_seconds": seconds}
        (out / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-lr-scaling", dest="lr_scaling", action="store_false")
    return p


def launch(nproc: int, data: str | Path, out: str | Path, extra: list[str] | None = None,
           timeout_s: float = 600) -> dict[str, Any]:
    """`torchrun --standalone --nproc_per_node nproc -m pipeline_steps.ddp_train ...`; returns rank 0's result."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={int(nproc)}", "-m", "pipeline_steps.ddp_train",
           "--data", str(data), "--out", str(out), *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads((Path(out) / "result.json").read_text())


if __name__ == "__main__":
    train(parser().parse_args())
