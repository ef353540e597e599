"""Generated bench images: deterministic, photo-like JPEGs of the asked size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.bench.images import generate, load, parse_size


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = generate(2, (160, 90), seed=3)
    assert a == generate(2, (160, 90), seed=3)
    assert a[0] != a[1]
    assert generate(1, (160, 90), seed=4)[0] != a[0]


def test_images_are_jpegs_of_the_size_and_not_flat() -> None:
    data = generate(1, (320, 240))[0]
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        assert img.size == (320, 240)
        gray = np.asarray(img.convert("L"))
    assert int(gray.max()) - int(gray.min()) > 100
    assert float(gray.std()) > 10


@pytest.mark.parametrize(("text", "size"), [("3840x2160", (3840, 2160)), ("8X8", (8, 8))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "3840", "x2160", "4x4", "abcxdef", "20000x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_load_reads_images_in_name_order_and_skips_other_files(tmp_path: Path) -> None:
    imgs = generate(3, (32, 24))
    for name, data in zip(("b.jpg", "a.JPEG", "c.jpg"), imgs, strict=True):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image")
    assert load(tmp_path) == [imgs[1], imgs[0], imgs[2]]
    assert load(tmp_path, 1) == [imgs[1]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load(empty)
