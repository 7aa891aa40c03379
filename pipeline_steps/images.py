"""Turning raw listing photos into uniform model inputs.

Every cleaned photo is an RGB JPEG of `cleaning.image_size` squared: the
models, the pixel baseline and the thumbnails in the service all assume one
shape and three channels. Users' exports hold greyscale, palette, transparent,
CMYK and 16-bit photos, phone photos whose pixels are stored sideways (EXIF
orientation), thumbnails and panoramas, so each of those is handled here
explicitly instead of trusting `Image.convert("RGB")` (which, for example,
clips 16-bit greyscale to white and turns transparent areas black or noisy).

Conversion never raises for one bad file: `convert_images` returns a per-image
result with the error, so the caller can put the row in rejects.csv.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline_steps.faults import crash_point
from tqdm import tqdm

JPEG_QUALITY = 90
IMAGE_MISSING = "image file not found"
# Modes whose samples are wider than 8 bits: converting them with PIL clips, so they are rescaled.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ImageTask:
    """One photo to convert: where it is, where its cleaned copy goes."""

    image_id: str
    src: Path
    dst: Path


@dataclass(frozen=True)
class ImageResult:
    """What happened to one photo; `error` is None on success."""

    image_id: str
    source_mode: str | None
    error: str | None


def prepare_image(src_path: str | Path, size: int, pad_colour: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Open one photo and return it as an RGB `size` x `size` image, aspect ratio kept.

    The photo is turned upright (EXIF orientation) before anything else so the
    padding ends up on the correct sides, converted to RGB with transparency
    flattened onto the pad colour (the same colour as the letterbox, so a cut-out
    product on a transparent background looks like the other photos), scaled so
    its longer side is `size`, then centred on a square of the pad colour.
    """
    return _prepare(src_path, size, pad_colour)[0]


def _prepare(src_path: str | Path, size: int, pad_colour: Sequence[int]) -> tuple[Image.Image, str]:
    """prepare_image, also returning the mode the photo was stored in (for the manifest)."""
    pad = _as_rgb_colour(pad_colour)
    with Image.open(src_path) as opened:
        source_mode = opened.mode
        if opened.format == "JPEG":
            # Decode at a reduced DCT scale when the photo is far bigger than needed: a large speed-up
            # for camera-sized JPEGs, no visible loss since the result is downscaled anyway.
            opened.draft(opened.mode, (size, size))
        opened.load()
        image = upright(opened)
    rgb = to_rgb(image, pad)
    return pad_to_square(resize_to_fit(rgb, size), size, pad), source_mode


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a photo whose EXIF block is damaged is used as stored.

    Broken metadata is common in phone exports and says nothing about the pixels,
    so it must not cost the listing its photo.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure: keep the stored orientation
        return image.copy()


def to_rgb(image: Image.Image, pad_colour: RGB = (0, 0, 0)) -> Image.Image:
    """Convert any PIL mode to RGB without the lossy surprises of a bare `convert("RGB")`."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        # 16/32-bit and float photos are greyscale; a transparent colour in them is too rare to honour.
        return Image.fromarray(_wide_to_uint8(image)).convert("RGB")
    if _has_transparency(image):
        return _flatten_alpha(image, pad_colour)
    # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV: PIL's own conversion is right for these.
    return image.convert("RGB")


def resize_to_fit(image: Image.Image, size: int) -> Image.Image:
    """Scale so the longer side is exactly `size` (up or down); the shorter side is at least 1 pixel.

    Tiny photos are scaled up too, so every cleaned photo fills the square the same way.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def pad_to_square(image: Image.Image, size: int, pad_colour: RGB = (0, 0, 0)) -> Image.Image:
    """Centre `image` (no side larger than `size`) on a `size` x `size` canvas of the pad colour."""
    canvas = Image.new("RGB", (size, size), pad_colour)
    width, height = image.size
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas


def save_jpeg(image: Image.Image, dst: str | Path) -> Path:
    """Save as baseline JPEG, quality 90, no metadata: identical inputs give identical bytes."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst, format="JPEG", quality=JPEG_QUALITY)
    return dst


def convert_one(task: ImageTask, size: int, pad_colour: Sequence[int]) -> ImageResult:
    """Convert one photo, reporting (not raising) any failure so one bad file cannot stop a run."""
    try:
        image, source_mode = _prepare(task.src, size, pad_colour)
        save_jpeg(image, task.dst)
        crash_point("convert_image")  # test hook (pipeline_steps/faults.py); a no-op otherwise
    except FileNotFoundError:
        return ImageResult(task.image_id, None, IMAGE_MISSING)
    except Exception as error:  # noqa: BLE001 - any decoder failure is a reject, not a crash
        task.dst.unlink(missing_ok=True)
        return ImageResult(task.image_id, None, f"{type(error).__name__}: {error}"[:300])
    return ImageResult(task.image_id, source_mode, None)


def convert_images(
    tasks: Iterable[ImageTask],
    size: int,
    pad_colour: Sequence[int] = (0, 0, 0),
    workers: int | str | None = 1,
    progress: bool = True,
) -> list[ImageResult]:
    """Convert every photo with a tqdm bar; results come back in task order whatever `workers` is.

    `workers` > 1 uses threads: Pillow releases the GIL while it decodes, resizes
    and encodes. Not processes: each spawned worker re-imports the caller's
    `__main__` (for the Prefect flow, ~2 s of CPU importing Prefect again) and a
    script without an `if __name__ == "__main__":` guard breaks the pool.
    On the real export (7,597 photos of 256 px, 2 shared cores) one thread takes
    about 5 s of CPU; neither 2 threads nor 2 processes gave a consistent gain on
    the busy shared machine, hence the default of 1 (params.yaml cleaning.num_workers).
    """
    task_list = list(tasks)
    n_workers = resolve_workers(workers, len(task_list))
    convert = partial(convert_one, size=size, pad_colour=tuple(pad_colour))
    with tqdm(total=len(task_list), desc="clean images", unit="img", disable=not progress, mininterval=1.0) as bar:
        if n_workers == 1:
            return [_counted(bar, convert(task)) for task in task_list]
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="clean-images") as pool:
            return [_counted(bar, result) for result in pool.map(convert, task_list)]


def _counted(bar: tqdm, result: ImageResult) -> ImageResult:
    bar.update()
    return result


def resolve_workers(workers: int | str | None, n_tasks: int) -> int:
    """Threads to use: 'auto'/0/None means one per CPU; never more than there are photos."""
    if workers in (None, 0, "auto"):
        workers = os.cpu_count() or 1
    try:
        count = int(workers)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}") from None
    if count < 0:
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}")
    return max(1, min(count, n_tasks))


def _has_transparency(image: Image.Image) -> bool:
    """True for modes with an alpha band and for palette/greyscale images with a transparent colour."""
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _flatten_alpha(image: Image.Image, pad_colour: RGB) -> Image.Image:
    """Composite a transparent image onto the pad colour (not onto whatever the hidden pixels hold)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*pad_colour, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    """Rescale 16/32-bit or float samples to 0..255 instead of clipping them.

    16-bit modes use their full range (0..65535). For 32-bit and float images the
    range is not fixed: values already within 0..255 are kept, 0..65535 is treated
    as 16-bit, anything else is stretched min..max.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 255:
            scaled = values
        elif low >= 0 and high <= 65535:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _as_rgb_colour(colour: Sequence[int]) -> RGB:
    """Validate the pad colour early: three integers 0..255."""
    values = tuple(int(channel) for channel in colour)
    if len(values) != 3 or any(not 0 <= channel <= 255 for channel in values):
        raise ValueError(f"pad colour must be three integers in 0..255, got {list(colour)!r}")
    return values  # type: ignore[return-value]
