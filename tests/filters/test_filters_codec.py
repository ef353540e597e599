"""The codec: formats by their bytes, the pixel limit from the header, safe decoding.

Hostile inputs (truncated, empty, text, other formats, headers claiming huge sizes, a
real decompression bomb) must give typed errors; the bomb must be refused from its
header: the pixel decoders are replaced by ones that fail the test if called.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from imgpipe.core.errors import ImageError, ImageTooLarge
from imgpipe.filters import (
    apply_chain,
    check_pixels,
    content_type,
    decode,
    encode,
    ext,
    output_format,
    parse_chain,
    probe,
    sniff,
)
from tests import images
from tests.filters.images import Pixels, from_pil, photo, psnr, save, to_pil


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A real 20000×20000 1-bit PNG of zeros: about 50 kB that decodes to 400 megapixels."""
    return images.png_bomb(20000)


def jpeg_bytes(img: Pixels, *, orientation: int = 1, mode: str = "RGB", quality: int = 95) -> bytes:
    im = to_pil(img).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return save(im, "JPEG", quality=quality, exif=exif)


# --- recognising formats -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "jpeg"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF89a" + b"\x00" * 20, "gif"),
        (b"GIF87a" + b"\x00" * 20, "gif"),
        (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00" + b"\x00" * 10, "bmp"),
    ],
)
def test_sniff_recognises_accepted_formats(data: bytes, fmt: str) -> None:
    assert sniff(data) == fmt


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (b"", "empty"),
        (b"hello, world\n", "text"),
        (b"BM is the start of this text too", "text"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"  <svg width='10' height='10'></svg>", "SVG"),
        (b"II*\x00\x08\x00\x00\x00" + b"\x00" * 20, "TIFF"),
        (b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 20, "TIFF"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF"),
        (bytes(range(7, 60)), "not an accepted image format"),
        (b"\x00" * 64, "not an accepted image format"),
    ],
)
def test_sniff_refuses_everything_else(data: bytes, word: str) -> None:
    with pytest.raises(ImageError) as info:
        sniff(data)
    assert word in str(info.value)
    assert info.value.status == 415
    with pytest.raises(ImageError):
        decode(data)


def test_svg_tiff_and_pdf_made_by_real_tools_are_refused() -> None:
    tiff = save(Image.new("RGB", (4, 4)), "TIFF")
    pdf = save(Image.new("RGB", (4, 4)), "PDF")
    for data in (tiff, pdf):
        with pytest.raises(ImageError) as info:
            decode(data)
        assert not isinstance(info.value, ImageTooLarge)


# --- the pixel limit, from the header ---------------------------------------------------


def test_a_header_claiming_60000_squared_is_refused_from_the_header() -> None:
    data = images.png_file(60000, 60000, zlib.compress(b"\x00" * 100))
    info = probe(data)
    assert (info.format, info.width, info.height) == ("png", 60000, 60000)
    with pytest.raises(ImageTooLarge) as exc:
        decode(data)
    assert exc.value.status == 413
    assert "60000×60000" in str(exc.value)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything decodes pixel data (Pillow's load or OpenCV's imdecode)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(cv2, "imdecode", refuse)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_png_bomb_is_refused_from_its_header(png_bomb: bytes) -> None:
    assert len(png_bomb) < 200_000
    assert (probe(png_bomb).width, probe(png_bomb).height) == (20000, 20000)
    with pytest.raises(ImageTooLarge):
        decode(png_bomb)


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_probe_reads_only_the_header(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    options = {"exif": exif} if fmt in ("JPEG", "PNG", "WEBP") else {}
    info = probe(save(to_pil(photo(30, 50)), fmt, **options))
    oriented = (30, 50) if options else (50, 30)  # orientation 6 swaps width and height
    assert (info.format, info.width, info.height) == (fmt.lower(), *oriented)


def test_a_huge_webp_canvas_is_refused_before_pillow_allocates_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import _webp

    def refuse(*args: object) -> None:
        raise AssertionError("the WebP decoder was created")

    monkeypatch.setattr(_webp, "WebPAnimDecoder", refuse)
    side = (16383 - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + side + side
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    with pytest.raises(ImageTooLarge, match="16383×16383"):
        decode(data)
    with pytest.raises(ImageTooLarge):
        probe(data)


def test_a_png_bomb_is_refused_without_decoding(png_bomb: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode(png_bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


def test_the_limit_is_configurable(png_bomb: bytes) -> None:
    data = save(to_pil(photo(100, 100)), "PNG")
    with pytest.raises(ImageTooLarge):
        decode(data, max_pixels=9_999)
    assert decode(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageTooLarge):
        check_pixels(probe(png_bomb), 50_000_000)


# --- truncated and corrupt data -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_data_is_refused_not_filled_in(fmt: str, keep: float) -> None:
    data = save(to_pil(photo(64, 96)), fmt)
    with pytest.raises(ImageError) as info:
        decode(data[: int(len(data) * keep)])
    assert not isinstance(info.value, ImageTooLarge)


def test_a_jpeg_missing_only_its_end_marker_is_refused() -> None:
    data = jpeg_bytes(photo(64, 96))
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(ImageError, match="truncated"):
        decode(data[:-2])


def test_a_png_with_a_broken_header_chunk_is_refused() -> None:
    data = bytearray(save(to_pil(photo(8, 8)), "PNG"))
    data[20] ^= 0xFF  # inside IHDR, so its CRC no longer matches
    with pytest.raises(ImageError):
        decode(bytes(data))


# --- orientation -----------------------------------------------------------------------------


def test_exif_orientation_6_swaps_the_dimensions() -> None:
    data = jpeg_bytes(photo(60, 80), orientation=6)
    info = probe(data)
    assert (info.width, info.height, info.orientation) == (60, 80, 6)
    assert decode(data).shape == (80, 60, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    data = jpeg_bytes(photo(30, 50), orientation=orientation)
    ours = decode(data)
    theirs = from_pil(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert ours.shape == theirs.shape
    assert psnr(ours, theirs) >= 45


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_in_png_and_webp(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    img = photo(30, 50)
    data = save(to_pil(img), fmt, exif=exif, lossless=True)
    assert np.array_equal(decode(data), np.rot90(img))


def test_reduced_decode_is_oriented_too() -> None:
    data = jpeg_bytes(photo(64, 96), orientation=6)
    assert decode(data, reduce=2).shape == (48, 32, 3)


# --- normalising unusual inputs -------------------------------------------------------


def test_cmyk_jpeg_decodes_to_rgb_and_encodes_to_jpeg() -> None:
    img = photo(40, 60)
    data = jpeg_bytes(img, mode="CMYK")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    assert out.shape == (40, 60, 3)
    reference = from_pil(Image.open(io.BytesIO(data)).convert("RGB"))
    assert psnr(out, reference) >= 35
    assert decode(encode(out, "jpeg")).shape == (40, 60, 3)


def test_gray_jpeg_stays_one_channel() -> None:
    data = jpeg_bytes(photo(20, 30), mode="L")
    assert probe(data).channels == 1
    assert decode(data).shape == (20, 30, 1)
    assert decode(data, reduce=2).shape == (10, 15, 1)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_png_is_scaled_to_8_bits(channels: int) -> None:
    img8 = photo(20, 30, channels)
    img16 = img8.astype(np.uint16) * 257  # 8-bit value v becomes v·257, so v = (v·257) >> 8
    bgr = (
        img16
        if channels == 1
        else cv2.cvtColor(img16, cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA)
    )
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    out = decode(buf.tobytes())
    assert np.array_equal(out, img8)
    assert decode(encode(out, "jpeg")).shape[:2] == (20, 30)


def test_16_bit_gray_png_from_pillow() -> None:
    values = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    data = save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data)
    assert out.shape == (20, 30, 1)
    assert np.array_equal(out[..., 0], (values >> 8).astype(np.uint8))


def test_palette_png_with_and_without_transparency() -> None:
    pal = to_pil(photo(20, 30)).convert("P")
    plain = decode(save(pal, "PNG"))
    assert plain.shape == (20, 30, 3)
    assert np.array_equal(plain, from_pil(pal.convert("RGB")))
    clear = decode(save(pal, "PNG", transparency=0))
    assert clear.shape == (20, 30, 4)
    assert np.array_equal(clear, from_pil(pal.convert("RGBA")))


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_png_decodes_to_rgba(mode: str) -> None:
    im = to_pil(photo(20, 30, 4)).convert(mode)
    out = decode(save(im, "PNG"))
    assert out.shape == (20, 30, 4)
    assert np.array_equal(out, from_pil(im.convert("RGBA")))


def test_gray_png_with_a_transparent_colour_key() -> None:
    im = to_pil(photo(20, 30, 1))
    key = int(np.asarray(im)[0, 0])
    out = decode(save(im, "PNG", transparency=key))
    assert out.shape == (20, 30, 4)
    assert out[0, 0, 3] == 0


def test_gif_first_frame_and_transparency() -> None:
    frames = [to_pil(photo(20, 30, seed=s)).convert("P") for s in range(3)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.array_equal(decode(data), from_pil(frames[0].convert("RGB")))
    key = int(np.asarray(frames[0])[0, 0])
    clear = decode(save(frames[0], "GIF", transparency=key))
    assert clear.shape == (20, 30, 4)
    assert clear[0, 0, 3] == 0


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1"])
def test_bmp(mode: str) -> None:
    im = to_pil(photo(20, 30)).convert(mode)
    out = decode(save(im, "BMP"))
    expected = from_pil(im.convert("L" if mode in ("L", "1") else "RGB"))
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("channels", [3, 4])
def test_webp_lossless_round_trips(channels: int) -> None:
    img = photo(20, 30, channels)
    assert np.array_equal(decode(save(to_pil(img), "WEBP", lossless=True)), img)


# --- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_encode_round_trips(fmt: str, channels: int) -> None:
    img = photo(48, 64, channels)
    data = encode(img, fmt, 90)
    assert sniff(data) == fmt
    out = decode(data)
    if fmt == "png":
        assert np.array_equal(out, img)
        return
    if channels == 4 and fmt == "jpeg":
        assert out.shape == (48, 64, 3)
        return
    if channels == 1 and fmt == "webp":
        out = out[..., :1]
    assert out.shape == img.shape
    # As good as Pillow's encoder at the same quality.
    pil_fmt = {"jpeg": "JPEG", "webp": "WEBP"}[fmt]
    theirs = from_pil(Image.open(io.BytesIO(save(to_pil(img), pil_fmt, quality=90))))
    assert psnr(out, img) >= psnr(theirs[..., : out.shape[2]], img) - 1.5


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_avif_round_trips_through_pillow(channels: int) -> None:
    img = photo(180, 320, channels)
    data = encode(img, "avif", 90)
    assert data[4:12] == b"ftypavif"
    mode = "RGBA" if channels == 4 else "RGB"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "AVIF" and im.size == (320, 180)
        out = from_pil(im.convert(mode))
    theirs = from_pil(Image.open(io.BytesIO(save(to_pil(img), "AVIF", quality=90))).convert(mode))
    if channels == 1:  # decoded as RGB: the three planes are equal
        out, theirs = out[..., :1], theirs[..., :1]
    assert out.shape == img.shape
    # Chroma is subsampled 4:2:0, so colour scores lower than gray; as good as Pillow's
    # slower default speed within 1 dB.
    assert psnr(out[..., :3], img[..., :3]) >= (45 if channels == 1 else 32)
    assert psnr(out[..., :3], img[..., :3]) >= psnr(theirs[..., :3], img[..., :3]) - 1
    if channels == 4:
        assert psnr(out[..., 3:], img[..., 3:]) >= 45


def test_avif_is_encoded_but_not_accepted_as_input() -> None:
    data = encode(photo(8, 8), "avif")
    with pytest.raises(ImageError, match="AVIF is not an accepted"):
        sniff(data)


def test_avif_encode_is_heavy_and_charged() -> None:
    from imgpipe.filters import parse_chain
    from imgpipe.filters.chain import estimate_ms

    avif, webp = parse_chain("encode:format=avif"), parse_chain("invert|encode:format=webp")
    assert avif.cost == "heavy" and webp.cost == "light"
    assert estimate_ms(avif, 3840, 2160) > estimate_ms(parse_chain("encode"), 3840, 2160) + 700


def test_jpeg_puts_transparency_on_white() -> None:
    img = np.zeros((16, 16, 4), np.uint8)
    img[..., 0] = 255  # red, fully transparent
    out = decode(encode(img, "jpeg", 95))
    assert out.min() >= 245


def test_quality_changes_the_size() -> None:
    img = photo()
    assert len(encode(img, "jpeg", 30)) < len(encode(img, "jpeg", 95))
    assert len(encode(img, "webp", 30)) < len(encode(img, "webp", 95))
    assert len(encode(img, "avif", 30)) < len(encode(img, "avif", 95))


def test_encode_refuses_bad_arguments() -> None:
    img = photo(4, 4)
    with pytest.raises(ValueError):
        encode(img, "gif")
    with pytest.raises(ValueError):
        encode(img, "jpeg", 0)
    with pytest.raises(ImageError, match="16383"):
        encode(np.zeros((1, 16384, 3), np.uint8), "webp")


def test_format_names() -> None:
    assert content_type("jpeg") == "image/jpeg"
    assert content_type("webp") == "image/webp"
    assert content_type("avif") == "image/avif"
    assert ext("avif") == "avif"
    assert output_format("png", "avif") == "avif"
    assert output_format("gif", "auto") == "png"  # unresolved auto: the input's
    assert ext("jpeg") == "jpg"
    assert ext("png") == "png"
    assert output_format("gif") == "png"
    assert output_format("bmp") == "png"
    assert output_format("webp") == "webp"
    assert output_format("png", "jpeg") == "jpeg"
    with pytest.raises(ValueError):
        content_type("tiff")


# --- reduced decode -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "factor"),
    [
        ("resize:w=480", 2),
        ("resize:w=240", 4),
        ("resize:w=120", 8),
        ("resize:w=100,h=100,fit=cover", 4),
    ],
)
def test_reduced_decode_then_resize_matches_full_decode(spec: str, factor: int) -> None:
    data = jpeg_bytes(photo(540, 960), quality=92)
    chain = parse_chain(spec)
    info = probe(data)
    assert chain.reduce_factor(info.width, info.height) == factor
    fast = apply_chain(decode(data, reduce=factor), chain)
    full = apply_chain(decode(data), chain)
    assert fast.shape == full.shape
    assert psnr(fast, full) >= 35


def test_reduce_rounds_up_and_is_ignored_by_other_formats() -> None:
    img = photo(101, 99)
    assert decode(jpeg_bytes(img), reduce=4).shape == (26, 25, 3)
    assert decode(save(to_pil(img), "PNG"), reduce=4).shape == (101, 99, 3)
    with pytest.raises(ValueError):
        decode(jpeg_bytes(img), reduce=3)


def test_decode_accepts_a_memoryview_and_returns_a_writable_image() -> None:
    data = jpeg_bytes(photo(10, 12))
    out = decode(memoryview(data))
    assert out.shape == (10, 12, 3)
    assert out.flags.writeable and out.flags.c_contiguous
