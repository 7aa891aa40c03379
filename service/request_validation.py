"""Pure request checks for the marketplace service.

Nothing here needs BentoML, a model or a server: every function takes plain
values, returns the cleaned value, or raises `RequestError` whose message tells
the caller what to change. The service turns a `RequestError` into a 4xx JSON
response `{"error": message, "status": code}`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

# Formats we decode. Anything else (EPS/PDF/SVG, a text file...) is refused before decoding.
ACCEPTED_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _openable_formats() -> list[str]:
    """The accepted formats this Pillow build can open (multi-picture JPEGs open as JPEG)."""
    Image.init()
    return [fmt for fmt in ACCEPTED_IMAGE_FORMATS if fmt in Image.OPEN]

BAD_REQUEST = 400
PAYLOAD_TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
UNPROCESSABLE = 422


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status code (4xx)."""

    def __init__(self, message: str, status: int = BAD_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class Limits:
    """The `serve:` limits of params.yaml."""

    max_k: int = 50
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 40_000_000
    # The hard limit against abuse (413): far above any real listing (real name + description:
    # at most ~9,900 characters). Text up to it is accepted and cut to model_text_chars.
    max_text_chars: int = 100_000
    # What the models read: longer text is cut to this, and the response says so (text_truncated).
    # The sentence encoder reads 128 tokens; the TF-IDF branch reads what training saw (names up to
    # validation.text.max_chars.product_name, descriptions up to ...product_description).
    model_text_chars: int = 20_000

    @classmethod
    def from_params(cls, serve: Mapping[str, Any] | None) -> Limits:
        serve = serve or {}
        values = {}
        for name in ("max_k", "max_image_bytes", "max_image_pixels", "max_text_chars", "model_text_chars"):
            if name in serve and serve[name] is not None:
                value = serve[name]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"params.yaml key 'serve.{name}' must be a positive integer, got {value!r}")
                values[name] = value
        limits = cls(**values)
        if "model_text_chars" in values and limits.model_text_chars > limits.max_text_chars:
            raise ValueError(
                f"params.yaml key 'serve.model_text_chars' ({limits.model_text_chars}) must not exceed "
                f"'serve.max_text_chars' ({limits.max_text_chars})"
            )
        return limits


def check_text(text: Any, limits: Limits) -> str | None:
    """Return the stripped text, or None when absent/blank; refuse non-strings and long texts."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise RequestError(f"'text' must be a string, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise RequestError(
            f"'text' is {len(text):,} characters long; send at most {limits.max_text_chars:,} characters "
            "(e.g. the listing's name and the start of its description)",
            PAYLOAD_TOO_LARGE,
        )
    stripped = text.strip()
    return stripped or None


def fit_text(text: str | None, limits: Limits) -> tuple[str | None, dict[str, Any] | None]:
    """Cut text the models do not read; return it with a note for the response (None when uncut).

    A real listing is never refused for its length: check_text refuses only text beyond the hard
    limit (serve.max_text_chars); between the two limits the text is accepted, cut to
    serve.model_text_chars, and the response reports `text_truncated`.
    """
    limit = min(limits.model_text_chars, limits.max_text_chars)
    if text is None or len(text) <= limit:
        return text, None
    kept = text[:limit].rstrip()
    return kept, {
        "original_chars": len(text),
        "used_chars": len(kept),
        "limit": limit,
        "note": f"the text was cut to its first {limit:,} characters (serve.model_text_chars): "
                "the models read no further",
    }


def check_location(value: Any, name: str, max_chars: int) -> str | None:
    """An optional `town` / `county` for the price estimate: stripped, None when absent or blank.

    Matched exactly as the clean stage splits a listing's location ("Leeds, West Yorkshire" ->
    town "Leeds", county "West Yorkshire"); one the price model never saw counts as no location.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(f"'{name}' is {len(value):,} characters long; send at most {max_chars:,} characters")
    return value.strip() or None


def check_k(k: Any, limits: Limits) -> int:
    """`k` (number of results) must be an integer in [1, max_k]."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(f"'k' must be an integer between 1 and {limits.max_k}, got {k!r}")
    if k <= 0 or k > limits.max_k:
        raise RequestError(f"'k' must be between 1 and {limits.max_k}, got {k}")
    return k


def check_category(category: Any, accepted: Iterable[str]) -> str | None:
    """Return the canonical category name (case-insensitive match) or None when not given."""
    if category is None:
        return None
    if not isinstance(category, str):
        raise RequestError(f"'category' must be a string, got {type(category).__name__}")
    wanted = category.strip()
    if not wanted:
        return None
    accepted_list = list(accepted)
    by_lower = {name.lower(): name for name in accepted_list}
    match = by_lower.get(wanted.lower())
    if match is None:
        shown = wanted if len(wanted) <= 80 else wanted[:77] + "..."
        raise RequestError(
            f"unknown category {shown!r}; accepted categories: {', '.join(accepted_list)}"
        )
    return match


def require_input(has_image: bool, has_text: bool) -> None:
    if not has_image and not has_text:
        raise RequestError(
            "send a photo (multipart file field 'image') and/or a non-empty 'text'; the request had neither"
        )


def choose_kind(has_image: bool, has_text: bool) -> str:
    """Which model/index answers: image only -> image, text only -> text, both -> multimodal."""
    require_input(has_image, has_text)
    if has_image and has_text:
        return "multimodal"
    return "image" if has_image else "text"


def check_image_size(n_bytes: int, limits: Limits) -> None:
    if n_bytes == 0:
        raise RequestError("the uploaded 'image' is empty; attach a JPEG or PNG photo")
    if n_bytes > limits.max_image_bytes:
        raise RequestError(
            f"the uploaded 'image' is {n_bytes:,} bytes; send at most {limits.max_image_bytes:,} bytes "
            "(resize or re-compress the photo)",
            PAYLOAD_TOO_LARGE,
        )


def check_pixels(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise RequestError(f"the uploaded 'image' has an invalid size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"the uploaded 'image' is {width}x{height} = {width * height:,} pixels; send at most "
            f"{limits.max_image_pixels:,} pixels (downscale the photo)",
            PAYLOAD_TOO_LARGE,
        )


def decode_image(data: bytes | str | Path, limits: Limits) -> Image.Image:
    """Check and decode an uploaded photo into an RGB PIL image.

    Order: byte size -> format sniffing (415 for non-images) -> pixel count from
    the header (before any pixel is decoded) -> full decode (400 for corrupt or
    truncated files) -> RGB conversion.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            n_bytes = path.stat().st_size
        except OSError as exc:
            raise RequestError(f"the uploaded 'image' could not be read: {exc.strerror}") from exc
        check_image_size(n_bytes, limits)
        payload = path.read_bytes()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
        check_image_size(len(payload), limits)
    else:
        raise RequestError(f"'image' must be an uploaded file, got {type(data).__name__}")

    accepted = ", ".join(ACCEPTED_IMAGE_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(payload), formats=_openable_formats())
        except Image.DecompressionBombError as exc:
            raise RequestError(
                f"the uploaded 'image' has too many pixels; send at most {limits.max_image_pixels:,} pixels",
                PAYLOAD_TOO_LARGE,
            ) from exc
        except UnidentifiedImageError as exc:
            raise RequestError(
                f"the uploaded 'image' is not a photo in a supported format; accepted formats: {accepted}",
                UNSUPPORTED_MEDIA_TYPE,
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError) as exc:
            raise RequestError(f"the uploaded 'image' is corrupt and could not be read ({exc})") from exc

        width, height = image.size
        check_pixels(width, height, limits)
        try:
            image.load()
            rgb = image.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise RequestError(
                f"the uploaded 'image' has too many pixels; send at most {limits.max_image_pixels:,} pixels",
                PAYLOAD_TOO_LARGE,
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise RequestError(
                f"the uploaded {image.format or ''} image is corrupt or truncated and could not be decoded ({exc}); "
                "re-export the photo and upload it again".replace("  ", " ")
            ) from exc
    return rgb
