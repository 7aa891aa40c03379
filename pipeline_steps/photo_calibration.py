"""The multimodal model's photo calibration: a stacker on the val split over the fused and the photo logits.

Why: the towers and the fusion head all learned on the train split; the val split holds
outputs none of them trained on, so a small per-class stacker fitted there can weigh the
image tower's own photo prediction against the fused logits
(`train.multimodal.photo_calibration: val`, frozen towers only). Its L2 strength is chosen
by cross-validation inside val, so the accuracy it reports is held-out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline_steps import datasets as ds
from pipeline_steps import models

PHOTO_CALIBRATIONS = ("none", "val")


@torch.no_grad()
def _val_outputs(model: models.MultimodalClassifier, trained: nn.Module, val_set: Dataset) -> tuple[torch.Tensor, ...]:
    trained.eval()
    base, photo, present, labels = [], [], [], []
    for inputs, y in DataLoader(val_set, batch_size=256, shuffle=False, collate_fn=ds.collate_tensor_dicts):
        base.append(trained(**inputs).float())
        photo.append(model.photo_log_proba(inputs["image_emb"]))
        present.append(inputs["image_present"].bool())
        labels.append(y)
    return torch.cat(base), torch.cat(photo), torch.cat(present), torch.cat(labels)


def _fit_calibration(
    base: torch.Tensor, photo: torch.Tensor, labels: torch.Tensor, l2: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, b, log s) minimising cross-entropy of s * base + w * photo + b (+ l2 on all three) by L-BFGS."""
    n_classes = base.shape[1]
    weight = torch.zeros(n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    log_scale = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias, log_scale], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = base * log_scale.exp() + photo * weight + bias
        loss = F.cross_entropy(logits, labels) + l2 * (weight.square().sum() + bias.square().sum() + log_scale.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), log_scale.detach()


PHOTO_CALIBRATION_L2 = (1e-1, 1e-2, 1e-3, 1e-4)


def fit_photo_calibration(
    model: models.MultimodalClassifier, trained: nn.Module, val_set: Dataset, steps: int = 200, folds: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Fit the multimodal model's photo term on the val split: for a product with a photo,
    logits = s * fusion logits + w * log P_image(pooled photos) + b (w, b per class, s a scalar): a stacker
    on outputs the towers did not train on. The L2 strength is chosen by `folds`-fold cross-validation
    inside val (lowest held-out cross-entropy), then w, b, s are refitted on all of val and written into
    `model`. The summary's `val_cv_accuracy_*` are honest (each product scored by a fit that did not see it).

    Args:
        model: the multimodal model; its photo_weight, photo_bias and photo_scale are set.
        trained: the module that was trained on stored tower vectors (fusion head, + wide).
        val_set: the val split's stored vectors (ds.TensorDictDataset).
        steps: L-BFGS iterations per fit.
        folds: cross-validation folds inside val.
        seed: the fold assignment's seed.

    Returns:
        config.json's `architecture.photo_calibration` record.
    """
    base, photo, present, labels = _val_outputs(model, trained, val_set)
    rows = torch.nonzero(present).squeeze(1)
    fold = torch.from_numpy(np.random.default_rng(seed).integers(0, folds, len(rows)))
    cv: dict[float, tuple[float, int]] = {}
    for l2 in PHOTO_CALIBRATION_L2:
        loss, correct = 0.0, 0
        for f in range(folds):
            fit_rows, held = rows[fold != f], rows[fold == f]
            w, b, log_s = _fit_calibration(base[fit_rows], photo[fit_rows], labels[fit_rows], l2, steps)
            logits = base[held] * log_s.exp() + photo[held] * w + b
            loss += float(F.cross_entropy(logits, labels[held], reduction="sum"))
            correct += int((logits.argmax(1) == labels[held]).sum())
        cv[l2] = (loss / max(len(rows), 1), correct)
    best = min(cv, key=lambda key: cv[key][0])
    weight, bias, log_scale = _fit_calibration(base[rows], photo[rows], labels[rows], best, steps)
    with torch.no_grad():
        model.photo_weight.copy_(weight)
        model.photo_bias.copy_(bias)
        model.photo_scale.copy_(log_scale.exp())
        base_correct = int((base.argmax(1) == labels).sum())
        no_photo_correct = int((base[~present].argmax(1) == labels[~present]).sum())
        after_logits = torch.where(present[:, None], base * log_scale.exp() + photo * weight + bias, base)
        after = float((after_logits.argmax(1) == labels).float().mean())
    n = max(len(labels), 1)
    return {
        "mode": "val",
        "fitted_on": int(len(rows)),
        "l2": best,
        "cv_folds": folds,
        "cv_loss_by_l2": {str(k): round(v[0], 4) for k, v in cv.items()},
        "mean_weight": round(float(weight.mean()), 4),
        "fused_scale": round(float(log_scale.exp()), 4),
        "val_accuracy_before": round(base_correct / n, 4),
        "val_cv_accuracy_after": round((cv[best][1] + no_photo_correct) / n, 4),  # honest: held-out folds
        "val_accuracy_after_in_sample": round(after, 4),
    }
