"""A small synthetic clean layer (docs/ARCHITECTURE.md, "Clean") for training and inference tests.

Moved here from pipeline_steps/datasets.py: only tests use it, so it is test tooling, not a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline_steps.clean_schema import IMAGE_COLUMNS
from pipeline_steps.io_utils import write_json, write_parquet


def write_synthetic_clean(
    clean_dir: str | Path,
    n_classes: int = 13,
    products_per_class: int = 4,
    images_per_product: Sequence[int] = (0, 1, 2),
    image_size: int = 32,
    splits: Sequence[str] = ("train", "train", "val", "test"),
    seed: int = 0,
) -> Path:
    """Write a small clean folder following the Clean contract (for tests and timings).

    Class k has its own colour and keyword, so every model can learn it within an epoch
    or two. Product i of a class gets split `splits[i % len(splits)]` and
    `images_per_product[i % len(...)]` photos (0 = a listing without photo).
    """
    rng = np.random.default_rng(seed)
    clean_dir = Path(clean_dir)
    (clean_dir / "images").mkdir(parents=True, exist_ok=True)
    classes = [f"Category {chr(65 + k % 26)}{k // 26 or ''}" for k in range(n_classes)]
    palette = rng.integers(0, 256, size=(n_classes, 3))
    words = ["sofa", "bike", "phone", "guitar", "drill", "dress", "pram", "lamp", "tyre", "kettle", "tent", "book", "puppy"]
    products, images = [], []
    for label in range(n_classes):
        word = words[label % len(words)] + ("" if label < len(words) else str(label))
        for i in range(products_per_class):
            product_id = f"p{label:02d}-{i:04d}"
            split = splits[i % len(splits)]
            n_images = images_per_product[(i + label) % len(images_per_product)]
            name = f"{word} number {i}"
            description = f"A used {word} in good condition, collect from town {rng.integers(100)}."
            products.append(
                {
                    "product_id": product_id,
                    "product_name": name,
                    "product_description": description,
                    "text": f"{name}. {description}",
                    "category_path": f"{classes[label]} / Sub",
                    "category": classes[label],
                    "label": label,
                    "price": float(rng.integers(1, 500)),
                    "price_is_outlier": False,
                    "location": "Town, County",
                    "town": "Town",
                    "county": "County",
                    "n_images": n_images,
                    "split": split,
                }
            )
            for j in range(n_images):
                image_id = f"{product_id}-img{j}"
                noise = rng.integers(-40, 40, size=(image_size, image_size, 3))
                pixels = np.clip(palette[label][None, None, :] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(clean_dir / "images" / f"{image_id}.jpg", quality=90)
                images.append({"image_id": image_id, "product_id": product_id, "path": f"images/{image_id}.jpg", "split": split, "label": label})
    product_frame = pd.DataFrame(products)
    image_frame = pd.DataFrame(images, columns=list(IMAGE_COLUMNS))
    write_parquet(product_frame, clean_dir / "products.parquet")
    write_parquet(image_frame, clean_dir / "images.parquet")
    listings = product_frame.merge(image_frame[["product_id", "image_id"]], on="product_id", how="left")
    write_parquet(listings, clean_dir / "listings.parquet")
    write_json(clean_dir / "labels.json", {"classes": classes, "label_to_index": {name: k for k, name in enumerate(classes)}})
    return clean_dir
