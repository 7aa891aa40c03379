"""torchrun + DistributedDataParallel on CPU (gloo): 2 processes reach the validation accuracy of 1.

Tolerance: 0.03 absolute (3 points) on a 600-row validation set of a learnable synthetic task
(DDP with 2 processes sees the same data per epoch as 1 process, in half the steps, with the
learning rate scaled linearly by the world size).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_steps import ddp_train

TOLERANCE = 0.03
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists() and shutil.which("torchrun") is None,
                       reason="torchrun is not installed"),
]


def _data(path: Path, n_classes: int = 5, dim: int = 32, n: int = 2400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 1.2
    y = rng.integers(0, n_classes, size=n)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    split = int(n * 0.75)
    np.savez(path, x_train=x[:split], y_train=y[:split], x_val=x[split:], y_val=y[split:])
    return path


def test_two_processes_reach_the_accuracy_of_one(tmp_path):
    data = _data(tmp_path / "features.npz")
    args = ["--epochs", "8", "--batch-size", "32", "--hidden-dim", "64"]
    one = ddp_train.launch(1, data, tmp_path / "one", args)
    two = ddp_train.launch(2, data, tmp_path / "two", args)
    print("1 process:", one, "2 processes:", two)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["backend"] == "gloo"
    assert one["val_accuracy"] > 0.7  # it learned something
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= TOLERANCE, (one, two)
    assert (tmp_path / "two" / "head.pt").is_file()
