"""Photo conversion: every mode users export comes out as an RGB square of the configured side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_steps.images import (
    IMAGE_MISSING,
    ImageTask,
    convert_images,
    pad_to_square,
    prepare_image,
    resize_to_fit,
    resolve_workers,
    to_rgb,
)

SIZE = 32
PAD = (10, 200, 30)


def _palette_image(width: int, height: int, transparent_index: int | None = None) -> Image.Image:
    image = Image.new("P", (width, height), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, width // 2, height))
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def _sixteen_bit(width: int, height: int) -> Image.Image:
    values = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return Image.fromarray(values)


# (label, factory, file format) for each stored mode a user export can hold.
MODE_CASES = {
    "RGB": (lambda w, h: Image.new("RGB", (w, h), (200, 100, 50)), "JPEG"),
    "L": (lambda w, h: Image.new("L", (w, h), 128), "JPEG"),
    "1": (lambda w, h: Image.new("1", (w, h), 1), "PNG"),
    "LA": (lambda w, h: Image.new("LA", (w, h), (128, 255)), "PNG"),
    "RGBA": (lambda w, h: Image.new("RGBA", (w, h), (200, 100, 50, 128)), "PNG"),
    "P": (lambda w, h: _palette_image(w, h), "PNG"),
    "P+transparency": (lambda w, h: _palette_image(w, h, transparent_index=0), "PNG"),
    "P-gif": (lambda w, h: _palette_image(w, h, transparent_index=0), "GIF"),
    "CMYK": (lambda w, h: Image.new("CMYK", (w, h), (0, 255, 0, 0)), "JPEG"),
    "I;16": (_sixteen_bit, "PNG"),
}
SHAPES = {"square": (40, 40), "tiny": (1, 1), "small": (3, 2), "very_wide": (1000, 3), "very_tall": (2, 700)}


def _write(tmp_path: Path, name: str, image: Image.Image, fmt: str) -> Path:
    path = tmp_path / f"{name}.jpg"  # the raw layout names every photo .jpg whatever its real format
    save_kwargs = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(path, format=fmt, **save_kwargs)
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_every_mode_and_shape_becomes_an_rgb_square(tmp_path: Path, mode: str, shape: str) -> None:
    factory, fmt = MODE_CASES[mode]
    path = _write(tmp_path, "photo", factory(*SHAPES[shape]), fmt)

    result = prepare_image(path, SIZE, PAD)

    assert result.mode == "RGB"
    assert result.size == (SIZE, SIZE)


def test_stored_modes_are_what_the_cases_claim(tmp_path: Path) -> None:
    """Guards the test above: each case really reaches prepare_image in its mode."""
    expected = {"P-gif": "P", "P+transparency": "P"}
    for mode, (factory, fmt) in MODE_CASES.items():
        with Image.open(_write(tmp_path, mode, factory(8, 8), fmt)) as image:
            assert image.mode == expected.get(mode, mode), mode


def test_transparent_areas_take_the_pad_colour() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # invisible red
    assert to_rgb(image, PAD).getcolors() == [(64, PAD)]


def test_half_transparent_pixels_blend_with_the_pad_colour() -> None:
    image = Image.new("RGBA", (2, 2), (250, 0, 0, 128))
    red, green, _ = to_rgb(image, (0, 0, 0)).getpixel((0, 0))
    assert 120 <= red <= 130 and green == 0


def test_palette_transparency_takes_the_pad_colour(tmp_path: Path) -> None:
    path = _write(tmp_path, "p", _palette_image(8, 8, transparent_index=0), "PNG")
    result = prepare_image(path, 8, PAD)
    assert result.getpixel((0, 4)) == PAD  # left half used the transparent palette entry
    assert result.getpixel((7, 4)) == (0, 0, 255)


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    pixels = [to_rgb(image).getpixel((x, 0)) for x in range(3)]
    assert pixels == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_becomes_rgb_colours() -> None:
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


def test_aspect_ratio_is_kept_and_padding_is_centred(tmp_path: Path) -> None:
    path = _write(tmp_path, "wide", Image.new("RGB", (100, 50), (255, 255, 255)), "PNG")
    result = prepare_image(path, 64, (0, 0, 0))
    assert result.getpixel((32, 5)) == (0, 0, 0)  # top band is padding
    assert result.getpixel((32, 58)) == (0, 0, 0)  # bottom band too
    assert result.getpixel((32, 32)) == (255, 255, 255)
    assert result.getpixel((1, 32)) == (255, 255, 255)  # the long side fills the square


def test_exif_orientation_is_applied_before_padding(tmp_path: Path) -> None:
    stored = Image.new("RGB", (60, 20), (255, 255, 255))  # stored sideways: wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": upright it is tall
    path = tmp_path / "phone.jpg"
    stored.save(path, format="JPEG", exif=exif)

    result = prepare_image(path, 30, (0, 0, 0))

    assert result.getpixel((15, 2)) == pytest.approx((255, 255, 255), abs=8)  # content reaches top
    assert result.getpixel((2, 15)) == (0, 0, 0)  # padding left and right, not top and bottom


def test_damaged_exif_does_not_cost_the_photo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "odd", Image.new("RGB", (20, 10), (255, 255, 255)), "JPEG")

    def broken(image: Image.Image) -> Image.Image:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr("pipeline_steps.images.ImageOps.exif_transpose", broken)
    assert prepare_image(path, 16, PAD).size == (16, 16)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [("I", [0, 100, 255], [0, 100, 255]), ("I", [0, 65535], [0, 255]), ("F", [-1.0, 1.0], [0, 255])],
)
def test_32_bit_and_float_images_are_scaled_into_8_bits(mode: str, values: list, expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype="int32" if mode == "I" else "float32"))
    assert image.mode == mode
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(len(values))] == expected


@pytest.mark.parametrize(("size_in", "expected"), [((100, 50), (64, 32)), ((1, 1), (64, 64)), ((5000, 2), (64, 1))])
def test_resize_to_fit_sets_the_long_side(size_in: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resize_to_fit(Image.new("RGB", size_in), 64).size == expected


def test_pad_to_square_centres() -> None:
    result = pad_to_square(Image.new("RGB", (4, 2), (255, 255, 255)), 4, PAD)
    assert result.getpixel((0, 0)) == PAD and result.getpixel((0, 1)) == (255, 255, 255)


def test_bad_pad_colour_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "x", Image.new("RGB", (4, 4)), "PNG")
    with pytest.raises(ValueError, match="pad colour"):
        prepare_image(path, 8, (0, 0, 300))


def _tasks(tmp_path: Path, n_good: int) -> list[ImageTask]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    tasks = []
    for index in range(n_good):
        image = Image.new("RGB", (20 + index, 10), (index * 20, 0, 0))
        image.save(src / f"g{index}.jpg", format="JPEG")
        tasks.append(ImageTask(f"g{index}", src / f"g{index}.jpg", dst / f"g{index}.jpg"))
    (src / "corrupt.jpg").write_bytes(b"not an image at all")
    tasks.insert(1, ImageTask("corrupt", src / "corrupt.jpg", dst / "corrupt.jpg"))
    tasks.append(ImageTask("missing", src / "missing.jpg", dst / "missing.jpg"))
    return tasks


def test_convert_images_reports_failures_without_raising(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path, 3)

    results = convert_images(tasks, SIZE, PAD, workers=1, progress=False)

    assert [r.image_id for r in results] == [t.image_id for t in tasks]  # task order kept
    by_id = {r.image_id: r for r in results}
    assert by_id["missing"].error == IMAGE_MISSING
    assert by_id["corrupt"].error and "UnidentifiedImageError" in by_id["corrupt"].error
    assert by_id["g0"].error is None and by_id["g0"].source_mode == "RGB"
    assert not (tmp_path / "dst" / "corrupt.jpg").exists()
    with Image.open(tmp_path / "dst" / "g2.jpg") as saved:
        assert (saved.format, saved.mode, saved.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_worker_threads_give_the_same_results_and_bytes(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path, 6)
    serial = convert_images(tasks, SIZE, PAD, workers=1, progress=False)
    serial_bytes = {t.image_id: t.dst.read_bytes() for t in tasks if t.dst.exists()}
    for task in tasks:
        task.dst.unlink(missing_ok=True)

    threaded = convert_images(tasks, SIZE, PAD, workers=3, progress=False)

    assert threaded == serial
    assert {t.image_id: t.dst.read_bytes() for t in tasks if t.dst.exists()} == serial_bytes


def test_resolve_workers() -> None:
    assert resolve_workers(4, 2) == 2  # never more threads than photos
    assert resolve_workers(2, 1000) == 2
    assert resolve_workers("auto", 0) == 1
    assert resolve_workers("auto", 1000) >= 1
    with pytest.raises(ValueError, match="workers"):
        resolve_workers("many", 10)
