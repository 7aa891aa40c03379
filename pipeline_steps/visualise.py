"""Pictures of search results: people judge similar-listing search by looking at it.

A grid with one test listing per row (its photo first) followed by the photos
of its nearest listings, each captioned with its score, saved as a PNG and
logged to MLflow next to the retrieval metrics.

Drawn on a bare `matplotlib.figure.Figure` (the Agg renderer, no pyplot), like the
evaluation plots: no global backend is switched at import and concurrent flows share no
current-figure state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from pipeline_steps.index import SimilarityIndex
from pipeline_steps.io_utils import atomic_path, read_json

Thumb = tuple[Path, str]  # (photo path, caption)


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
    built: SimilarityIndex, vectors: np.ndarray, ids: pd.DataFrame, clean_dir: str | Path, out: str | Path,
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
    classes = read_json(clean_dir / "labels.json")["classes"]
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
