"""Torch datasets over the clean tables (see docs/ARCHITECTURE.md, "Clean").

* image dataset: one example per photo, labelled with its product's category;
* text dataset: one example per product (`text` = name + ". " + description);
* multimodal dataset: one example per product with all of its photos (0..n).

Batches are `(inputs: dict[str, Tensor], labels: Tensor)`, the one shape the
training loop knows; the dict keys are the keyword arguments of the model's
forward. Loading checks the columns the contract promises, so a stale or
foreign clean folder fails with a message naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline_steps.clean_schema import (  # noqa: F401  (re-exported: datasets.<name>)
    IMAGE_COLUMNS,
    IMAGES_FILE,
    PRODUCTS_FILE,
    SPLITS,
    load_classes,
    read_table,
)
from pipeline_steps.errors import DataValidationError

PRODUCT_COLUMNS = ("product_id", "text", "label", "split")
"""The products.parquet columns the torch datasets read (the whole contract: clean_schema.PRODUCT_COLUMNS)."""

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CleanData:
    """The clean tables a model needs, read once."""

    clean_dir: Path
    products: pd.DataFrame
    images: pd.DataFrame
    classes: list[str]

    def products_of(self, split: str | None) -> pd.DataFrame:
        frame = self.products if split is None else self.products[self.products["split"] == split]
        return frame.reset_index(drop=True)

    def images_of(self, split: str | None) -> pd.DataFrame:
        frame = self.images if split is None else self.images[self.images["split"] == split]
        return frame.reset_index(drop=True)

    def image_paths_by_product(self) -> dict[Any, list[Path]]:
        """product_id -> absolute paths of its photos, in images.parquet order."""
        grouped: dict[Any, list[Path]] = {}
        for product_id, rel in zip(self.images["product_id"], self.images["path"], strict=True):
            grouped.setdefault(product_id, []).append(self.clean_dir / rel)
        return grouped


def load_clean(clean_dir: str | Path) -> CleanData:
    """Read products.parquet, images.parquet and labels.json and check labels and splits."""
    clean_dir = Path(clean_dir)
    classes = load_classes(clean_dir)
    products = read_table(clean_dir, PRODUCTS_FILE, PRODUCT_COLUMNS)
    images = read_table(clean_dir, IMAGES_FILE, IMAGE_COLUMNS)
    for name, frame in (("products.parquet", products), ("images.parquet", images)):
        labels = pd.to_numeric(frame["label"], errors="coerce")
        bad = frame[labels.isna() | (labels < 0) | (labels >= len(classes))]
        if len(bad):
            raise DataValidationError(
                f"{clean_dir / name}: {len(bad)} row(s) have a label outside 0..{len(classes) - 1} (labels.json), "
                f"e.g. {bad['label'].iloc[0]!r}"
            )
        frame["label"] = labels.astype("int64")
        unknown = sorted(set(frame["split"].dropna()) - set(SPLITS))
        if unknown or frame["split"].isna().any():
            raise DataValidationError(f"{clean_dir / name}: column 'split' must be one of {SPLITS}, found {unknown or [None]}")
    products["text"] = products["text"].fillna("").astype(str)
    return CleanData(clean_dir, products, images, classes)


def load_rgb(path: str | Path) -> Image.Image:
    """Open a photo fully (the file handle is closed) as RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageDataset(Dataset):
    """One example per photo: (transformed pixels, label)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[index])), self.labels[index]


class TextDataset(Dataset):
    """One example per product: (text, label); tokenised per batch by `TextCollate`."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        self.texts = [str(text) for text in texts]
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]


class MultimodalDataset(Dataset):
    """One example per product: (its photos' pixels (0..n), text, label)."""

    def __init__(
        self,
        image_paths: Sequence[Sequence[Path]],
        texts: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.image_paths = [list(paths) for paths in image_paths]
        self.texts = [str(text) for text in texts]
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], str, int]:
        pixels = [self.transform(load_rgb(path)) for path in self.image_paths[index]]
        return pixels, self.texts[index], self.labels[index]


class TensorDictDataset(Dataset):
    """Precomputed features (e.g. frozen-encoder embeddings): row i of every tensor + label i.

    `sparse`: optional scipy CSR matrix (e.g. the wide branch's TF-IDF features), one row per
    example; row i comes out under the key `"sparse"` as (indices, values) and
    `collate_tensor_dicts` turns a batch of them into the wide branch's EmbeddingBag inputs.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], labels: Sequence[int] | torch.Tensor, sparse: Any = None) -> None:
        self.tensors = dict(tensors)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.sparse = sparse.tocsr() if sparse is not None else None
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != len(self.labels):
                raise ValueError(f"feature '{name}' has {tensor.shape[0]} rows for {len(self.labels)} labels")
        if self.sparse is not None and self.sparse.shape[0] != len(self.labels):
            raise ValueError(f"sparse features have {self.sparse.shape[0]} rows for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], torch.Tensor]:
        row: dict[str, Any] = {name: tensor[index] for name, tensor in self.tensors.items()}
        if self.sparse is not None:
            start, stop = self.sparse.indptr[index], self.sparse.indptr[index + 1]
            row["sparse"] = (self.sparse.indices[start:stop], self.sparse.data[start:stop])
        return row, self.labels[index]


# --------------------------------------------------------------------------- builders per split


def image_dataset(data: CleanData, split: str | None, transform: Callable[[Image.Image], torch.Tensor]) -> ImageDataset:
    frame = data.images_of(split)
    return ImageDataset([data.clean_dir / rel for rel in frame["path"]], frame["label"].tolist(), transform)


def text_dataset(data: CleanData, split: str | None) -> TextDataset:
    frame = data.products_of(split)
    return TextDataset(frame["text"].tolist(), frame["label"].tolist())


def multimodal_dataset(data: CleanData, split: str | None, transform: Callable[[Image.Image], torch.Tensor]) -> MultimodalDataset:
    frame = data.products_of(split)
    by_product = data.image_paths_by_product()
    paths = [by_product.get(product_id, []) for product_id in frame["product_id"]]
    return MultimodalDataset(paths, frame["text"].tolist(), frame["label"].tolist(), transform)


# --------------------------------------------------------------------------- collate functions


def collate_images(batch: Sequence[tuple[torch.Tensor, int]]) -> Batch:
    pixels, labels = zip(*batch, strict=True)
    return {"pixels": torch.stack(pixels)}, torch.tensor(labels, dtype=torch.long)


def collate_tensor_dicts(batch: Sequence[tuple[dict[str, Any], torch.Tensor]]) -> Batch:
    features, labels = zip(*batch, strict=True)
    inputs = {name: torch.stack([row[name] for row in features]) for name in features[0] if name != "sparse"}
    if "sparse" in features[0]:
        inputs.update(sparse_rows_to_bags([row["sparse"] for row in features]))
    return inputs, torch.stack(list(labels))


def sparse_rows_to_bags(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Sparse rows (indices, values) -> the wide branch's inputs: `wide_indices` (all rows'
    feature indices, concatenated), `wide_offsets` (where each row starts), `wide_weights` (values)."""
    lengths = [len(indices) for indices, _ in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if rows else np.zeros(0)
    indices = np.concatenate([np.asarray(i) for i, _ in rows]) if rows else np.zeros(0)
    values = np.concatenate([np.asarray(v) for _, v in rows]) if rows else np.zeros(0)
    return {
        "wide_indices": torch.as_tensor(indices.astype(np.int64)),
        "wide_offsets": torch.as_tensor(np.asarray(offsets, dtype=np.int64)),
        "wide_weights": torch.as_tensor(values.astype(np.float32)),
    }


def csr_to_bags(matrix: Any) -> dict[str, torch.Tensor]:
    """A scipy CSR matrix (one row per example) -> the wide branch's inputs (see `sparse_rows_to_bags`)."""
    matrix = matrix.tocsr()
    return {
        "wide_indices": torch.as_tensor(matrix.indices.astype(np.int64)),
        "wide_offsets": torch.as_tensor(matrix.indptr[:-1].astype(np.int64)),
        "wide_weights": torch.as_tensor(matrix.data.astype(np.float32)),
    }


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text of the batch (not to max_length): much less work on short texts."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length), return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class TextCollate:
    """Tokenise a batch of (text, label) rows (a class, so DataLoader workers can pickle it).

    `wide`: a fitted `models.WideFeaturizer` (anything with `transform(texts) -> CSR`): the batch
    then also carries the wide branch's TF-IDF inputs.
    """

    def __init__(self, tokenizer: Any, max_length: int, wide: Any = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.wide = wide

    def __call__(self, batch: Sequence[tuple[str, int]]) -> Batch:
        texts, labels = zip(*batch, strict=True)
        inputs = tokenize(self.tokenizer, texts, self.max_length)
        if self.wide is not None:
            inputs.update(csr_to_bags(self.wide.transform(list(texts))))
        return inputs, torch.tensor(labels, dtype=torch.long)


def stack_product_images(per_product: Sequence[Sequence[torch.Tensor]], image_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All photos of a batch in one tensor + the product row each belongs to."""
    pixels = [pixel for photos in per_product for pixel in photos]
    owner = [row for row, photos in enumerate(per_product) for _ in photos]
    stacked = torch.stack(pixels) if pixels else torch.zeros((0, *image_shape))
    return stacked, torch.tensor(owner, dtype=torch.long)


class MultimodalCollate:
    """Batch products with 0..n photos each: flat `pixels` + `image_owner`, tokens, `text_present`."""

    def __init__(self, tokenizer: Any, max_length: int, input_size: int, wide: Any = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.image_shape = (3, int(input_size), int(input_size))
        self.wide = wide

    def __call__(self, batch: Sequence[tuple[list[torch.Tensor], str | None, int]]) -> Batch:
        photos, texts, labels = zip(*batch, strict=True)
        pixels, owner = stack_product_images(photos, self.image_shape)
        present = torch.tensor([bool(text) for text in texts], dtype=torch.bool)
        inputs = tokenize(self.tokenizer, [text or "" for text in texts], self.max_length)
        inputs.update({"pixels": pixels, "image_owner": owner, "text_present": present})
        if self.wide is not None:
            inputs.update(csr_to_bags(self.wide.transform([text or "" for text in texts])))
        return inputs, torch.tensor(labels, dtype=torch.long)
