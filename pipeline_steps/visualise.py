"""The pipeline's figures: model quality (evaluate stage) and search results (index stage).

- `save_confusion_matrix`, `save_per_class_bar`, `save_training_curves`: a model's test
  confusion matrix, per-class F1 and per-epoch curves, logged to its MLflow run;
- `neighbour_figure` / `save_neighbour_grid`: people judge similar-listing search by looking
  at it: a grid with one test listing per row (its photo first) followed by the photos of its
  nearest listings, each captioned with its score, logged next to the retrieval metrics.

Drawn on a bare `matplotlib.figure.Figure` (the Agg renderer, no pyplot): no global backend
is switched (at import or later), nothing needs a display, and concurrent flows in one process
share no current-figure state. Every PNG is written to a temporary sibling first and moved
into place, so DVC never tracks half a PNG.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import confusion_matrix

from pipeline_steps.clean_schema import load_classes
from pipeline_steps.evaluation import label_codes
from pipeline_steps.io_utils import atomic_path

if TYPE_CHECKING:  # the evaluate stage draws its plots without faiss
    from pipeline_steps.index import SimilarityIndex

Thumb = tuple[Path, str]  # (photo path, caption)


# --------------------------------------------------------------------------- model quality (evaluate stage)


def _save_figure(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def _wrap(label: str, width: int = 18) -> str:
    return textwrap.fill(str(label), width=width, break_long_words=False) or str(label)


def save_confusion_matrix(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw the confusion matrix as a PNG (rows: true class, columns: predicted class).

    `normalize=True` divides each row by its support, so the diagonal reads as per-class
    recall and small classes are as visible as large ones; rows with no samples stay 0.
    Long class names ("Phones, Mobile Phones & Telecoms") are wrapped and the figure grows
    with the number of classes so 13 labels stay readable.
    """
    classes = list(classes)
    n = len(classes)
    y = label_codes(y_true, classes)
    yp = label_codes(y_pred, classes)
    counts = confusion_matrix(y, yp, labels=list(range(n)))
    if normalize:
        totals = counts.sum(axis=1, keepdims=True).astype(float)
        values = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    else:
        values = counts.astype(float)

    side = max(5.0, 0.8 * n + 3.0)
    figure = Figure(figsize=(side + 1.5, side))
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0))
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    labels = [_wrap(c) for c in classes]
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), labels=labels, fontsize=8)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    accuracy = float(np.trace(counts) / counts.sum()) if counts.sum() else float("nan")
    ax.set_title(title or f"Confusion matrix ({'row-normalised' if normalize else 'counts'}), "
                          f"n={int(counts.sum())}, accuracy={accuracy:.3f}")
    threshold = values.max() / 2.0 if values.size else 0.0
    fontsize = 7 if n > 8 else 9
    for i in range(n):
        for j in range(n):
            value = values[i, j]
            if value == 0:
                continue
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if value > threshold else "black")
    return _save_figure(figure, path)


def save_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Plot loss and accuracy per epoch for train and val as a two-panel PNG.

    Reads the standard history keys (`train_loss`, `val_loss`, `train_accuracy`,
    `val_accuracy`; `epoch` defaults to 1, 2, ...); keys a model does not log are skipped,
    so a one-entry history from a scikit-learn baseline still gives a (dotted) plot.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        drawn = False
        for split, style in (("train", "-o"), ("val", "--s")):
            key = f"{split}_{metric}"
            points = [(e, row.get(key)) for e, row in zip(epochs, history, strict=True)]
            points = [(e, float(v)) for e, v in points if v is not None and math.isfinite(float(v))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, markersize=3, label=split)
                drawn = True
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        figure.suptitle(title)
    return _save_figure(figure, path)


def save_per_class_bar(metrics: Mapping[str, Any], path: str | Path, metric: str = "f1",
                       title: str | None = None) -> Path:
    """Horizontal bars of one per-class metric (from `classification_metrics`), worst at the top.

    Shows at a glance which categories a model confuses, which the averages hide.
    """
    per_class = metrics.get("per_class")
    if not per_class:
        raise ValueError("metrics has no 'per_class' entry (use classification_metrics output)")
    items = sorted(per_class.items(), key=lambda kv: kv[1].get(metric, 0.0), reverse=True)
    names = [_wrap(name, 30) for name, _ in items]
    values = [float(v.get(metric, 0.0)) for _, v in items]
    supports = [int(v.get("support", 0)) for _, v in items]
    figure = Figure(figsize=(8, max(3.0, 0.45 * len(items) + 1.2)))
    ax = figure.add_subplot()
    bars = ax.barh(range(len(items)), values, color="tab:blue")
    ax.set_yticks(range(len(items)), labels=names, fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(metric)
    for bar, value, support in zip(bars, values, supports, strict=True):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.2f} (n={support})",
                va="center", fontsize=7)
    ax.set_title(title or f"Per-class {metric}")
    ax.grid(axis="x", alpha=0.3)
    return _save_figure(figure, path)


# --------------------------------------------------------------------------- search results (index stage)


def save_neighbour_grid(rows: Sequence[tuple[Thumb, Sequence[Thumb]]], path: str | Path, title: str = "") -> Path:
    """Draw query photo + neighbour photos per row; missing photos leave an empty cell."""
    if not rows:
        raise ValueError("no rows to draw")
    n_cols = 1 + max(len(found) for _, found in rows)
    figure = Figure(figsize=(1.9 * n_cols, 2.1 * len(rows)))
    axes = figure.subplots(len(rows), n_cols, squeeze=False)
    for r, (query, found) in enumerate(rows):
        cells = [query, *found]
        for c in range(n_cols):
            axis = axes[r][c]
            axis.axis("off")
            if c >= len(cells):
                continue
            photo, caption = cells[c]
            with Image.open(photo) as image:
                axis.imshow(image.convert("RGB"))
            axis.set_title(("query: " if c == 0 else "") + caption, fontsize=7, color="darkred" if c == 0 else "black")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)


def neighbour_figure(
    built: "SimilarityIndex", vectors: np.ndarray, ids: pd.DataFrame, clean_dir: str | Path, out: str | Path,
    n_queries: int = 6, k: int = 5,
) -> Path | None:
    """Thumbnails of a few test listings and their nearest neighbours: how search looks to a user.

    Args:
        built: the index (row i = `vectors[i]` = `ids` row i).
        vectors: the indexed vectors; test rows are the queries.
        ids: the rows' ids with `split`, `product_id` and `label`.
        clean_dir: the clean layer (images.parquet, the photos, labels.json for the captions).
        out: the PNG to write.
        n_queries, k: how many test listings (rows of the grid) and neighbours each.

    Returns:
        The PNG's path, or None when no test listing has a photo (nothing to show).
    """
    clean_dir = Path(clean_dir)
    images = pd.read_parquet(clean_dir / "images.parquet", columns=["image_id", "product_id", "path"])
    first_photo = images.drop_duplicates("product_id").set_index("product_id")["path"]
    classes = load_classes(clean_dir)
    test_rows = [
        i for i in np.flatnonzero((ids["split"] == "test").to_numpy()) if ids.at[i, "product_id"] in first_photo.index
    ][:n_queries]
    if not test_rows:
        return None
    hits = built.search(vectors[test_rows], k=k, exclude_product_ids=[ids.at[i, "product_id"] for i in test_rows])
    rows = []
    for row, row_hits in zip(test_rows, hits):
        query = (clean_dir / first_photo[ids.at[row, "product_id"]], classes[int(ids.at[row, "label"])])
        found = [
            (clean_dir / first_photo[h.product_id], f"{h.score:.2f}") for h in row_hits if h.product_id in first_photo.index
        ]
        rows.append((query, found))
    return save_neighbour_grid(rows, out, title=f"{built.metadata.kind} index: test queries and nearest listings")
