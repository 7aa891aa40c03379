"""Pictures of search results: people judge similar-listing search by looking at it.

A grid with one test listing per row (its photo first) followed by the photos
of its nearest listings, each captioned with its score, saved as a PNG and
logged to MLflow next to the retrieval metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline_steps.io_utils import atomic_path  # noqa: E402

Thumb = tuple[Path, str]  # (photo path, caption)


def save_neighbour_grid(rows: Sequence[tuple[Thumb, Sequence[Thumb]]], path: str | Path, title: str = "") -> Path:
    """Draw query photo + neighbour photos per row; missing photos leave an empty cell."""
    if not rows:
        raise ValueError("no rows to draw")
    n_cols = 1 + max(len(found) for _, found in rows)
    figure, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 2.1 * len(rows)), squeeze=False)
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
    plt.close(figure)
    return Path(path)
