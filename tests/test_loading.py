"""Plain images through `load`: the samples, odd pixel formats and broken files. Broken
inputs are made here from the real samples, so no binary test file is committed."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from conftest import SAMPLE_JPEG, SAMPLES, png_chunk
from PIL import Image

from pneumoscan.inputs.discover import identify_file
from pneumoscan.inputs.loading import load, load_path
from pneumoscan.records import LoadedImage


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("study-*/*.jpeg")), ids=lambda p: p.name)
def test_samples_load_grouped_by_folder(path):
    image = load_path(path)
    assert isinstance(image, LoadedImage), image
    assert image.study == str(path.parent)
    with Image.open(path) as img:
        assert np.array_equal(image.pixels, np.asarray(img.convert("L")))  # the whole image


def test_jpeg_decoded_smaller_when_allowed():
    image = load_path(SAMPLE_JPEG, min_size=(224, 224))  # 1776 x 1416 stored
    assert image.pixels.shape == (1416 // 4, 1776 // 4)  # DCT scaling stops above 224
    with Image.open(SAMPLE_JPEG) as img:  # libjpeg's own 1/4 scale decoding
        img.draft("L", (1776 // 4, 1416 // 4))
        assert np.array_equal(image.pixels, np.asarray(img))


def test_zero_byte_file(tmp_path):
    (tmp_path / "scan.png").touch()
    result = load_path(tmp_path / "scan.png")
    assert (result.status, result.reason) == ("skipped", "empty file (0 bytes)")


def test_corrupt_jpeg(tmp_path):
    path = tmp_path / "corrupt.jpeg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    result = load_path(path)
    assert (result.status, result.reason) == (
        "error", "not a decodable image (unidentified or corrupt header)")


def test_truncated_jpeg(tmp_path):
    data = SAMPLE_JPEG.read_bytes()
    path = tmp_path / "truncated.jpeg"
    path.write_bytes(data[: len(data) // 2])
    result = load_path(path)
    assert result.status == "error" and "truncated or corrupt JPEG" in result.reason


def test_truncated_png(tmp_path, chest):
    whole = tmp_path / "whole.png"
    Image.fromarray(chest).save(whole)
    path = tmp_path / "truncated.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = load_path(path)
    assert result.status == "error" and "truncated or corrupt PNG" in result.reason


def test_decompression_bomb_png_is_refused(tmp_path):
    """A 69-byte PNG declaring 50000 x 50000 pixels is refused before any decoding."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)  # 8-bit grey
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))
    result = load_path(path)
    assert result.status == "error" and "refused" in result.reason
    assert "decompression bomb" in result.reason


def test_16_bit_png_is_stretched_to_8_bit(tmp_path, chest):
    deep = chest.astype(np.uint16) * 16 + 3000  # 12-bit values in a 16-bit file
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    image = load_path(path)
    assert image.pixels.dtype == np.uint8
    assert (image.pixels.min(), image.pixels.max()) == (0, 255)
    expected = (chest.astype(np.float32) - chest.min()) / (chest.max() - chest.min()) * 255
    assert np.abs(image.pixels - expected).max() <= 1.0


def test_rgba_png_is_grey_on_black(tmp_path, chest):
    rgba = np.dstack([chest, chest, chest, np.full_like(chest, 255)])
    rgba[:10, :, 3] = 0  # a transparent band
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_path(path)
    assert np.array_equal(image.pixels[10:], chest[10:])
    assert not image.pixels[:10].any()


def test_cmyk_jpeg_is_grey(tmp_path, chest):
    path = tmp_path / "cmyk.jpeg"
    Image.fromarray(chest).convert("CMYK").save(path, quality=95)
    image = load_path(path)
    assert image.pixels.shape == chest.shape
    assert np.abs(image.pixels.astype(int) - chest).mean() < 2


def test_multi_frame_tiff_is_skipped(tmp_path, chest):
    path = tmp_path / "stack.tiff"
    frames = [Image.fromarray(chest), Image.fromarray(255 - chest)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = load_path(path)
    assert (result.status, result.reason) == ("skipped", "multi-frame image (2 frames)")


def test_file_that_disappears_before_reading_is_an_error(tmp_path, chest):
    path = tmp_path / "gone.png"
    Image.fromarray(chest).save(path)
    item = identify_file(path)
    path.unlink()
    result = load(item)
    assert (result.status, result.reason) == ("error", "file disappeared before it could be read")


# Our own code raising a decoder's error types after decoding (ValueError, RuntimeError...)
# is no more "cannot read this file" than a TypeError of the loader itself. (OSError stays
# "cannot read": the file's own reads raise it.)
@pytest.mark.parametrize("broken, error", [
    ("load_raster", TypeError), ("to_grey_uint8", ValueError), ("to_grey_uint8", RuntimeError),
    ("to_grey_uint8", EOFError), ("to_grey_uint8", NotImplementedError)])
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "-v"])
def test_a_bug_of_ours_is_not_passed_off_as_a_bad_file(broken, error, verbose, monkeypatch,
                                                       caplog):
    """The file's reason says it is a pneumoscan bug, a warning is logged, with its
    traceback under -v (INFO), and the run goes on."""
    from pneumoscan.inputs import loading, raster

    def broken_code(*args, **kwargs):
        raise error("our own mistake")

    monkeypatch.setattr(loading if broken == "load_raster" else raster, broken, broken_code)
    with caplog.at_level("INFO" if verbose else "WARNING", logger="pneumoscan"):
        result = load_path(SAMPLE_JPEG)
    assert result.status == "error"
    assert result.reason.startswith("unexpected error, a pneumoscan bug")
    assert f"{error.__name__}: our own mistake" in result.reason
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert ("Traceback" in caplog.text) == verbose
    if verbose:
        assert "broken_code" in caplog.text
