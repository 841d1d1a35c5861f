"""DICOM reading: real files from samples/, data sets written here for the cases no
committed file covers, and dcmtk's dcmj2pnm as an independent renderer."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_SAMPLES, RAMP_12_BIT, cr_dataset, save
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    CTImageStorage,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from pneumoscan.inputs import dicom
from pneumoscan.inputs.discover import identify_file
from pneumoscan.inputs.loading import load, load_path
from pneumoscan.records import FileResult, LoadedImage

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def dcmtk_render(dcmj2pnm: str, path: Path, out_dir: Path) -> np.ndarray:
    """dcmtk's display rendering with the file's first VOI window (+Wi 1), as load_dicom
    uses; dcmtk also applies the modality LUT and MONOCHROME1 polarity."""
    out = out_dir / f"{path.stem}.png"
    subprocess.run([dcmj2pnm, "--quiet", "+Wi", "1", "+on2", str(path), str(out)], check=True)
    return np.asarray(Image.open(out))


@pytest.fixture(scope="module")
def rg1() -> dict[str, LoadedImage]:
    return {name: load_path(DICOM_SAMPLES / f"{name}.dcm")
            for name in ("RG1_UNCR", "RG1_J2KR", "RG1_J2KI")}


@pytest.fixture(scope="module")
def chest_crop() -> np.ndarray:
    """Real 15-bit chest CR values, subsampled to keep the encoders quick."""
    stored = pydicom.dcmread(DICOM_SAMPLES / "RG1_UNCR.dcm").pixel_array
    return np.ascontiguousarray(stored[::4, ::4])


# --- the real files -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KR", "RG1_J2KI"])
def test_rg1_transfer_syntaxes_decode(rg1, name):
    image = rg1[name]
    assert isinstance(image, LoadedImage), image
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (1955, 1841)
    assert image.study == RG1_STUDY
    assert image.metadata["PatientName"] == "CompressedSamples^RG1"
    assert image.metadata["Modality"] == "CR" and image.metadata["ViewPosition"] == "PA"
    assert image.pixels.std() > 20  # a picture, not a flat field


def test_rg1_lossless_syntaxes_give_identical_pixels(rg1):
    assert np.array_equal(rg1["RG1_UNCR"].pixels, rg1["RG1_J2KR"].pixels)


def test_rg1_lossy_jpeg2000_is_close(rg1):
    r = correlation(rg1["RG1_UNCR"].pixels, rg1["RG1_J2KI"].pixels)
    assert r > 0.999, f"correlation lossy vs lossless {r:.5f}"


def test_scans_are_decoded_at_the_size_asked_for_whatever_the_syntax(rg1, monkeypatch):
    """With a size to cover (twice the model's), lossy JPEG 2000 is decoded at a reduced
    resolution from its wavelet levels, never in full; uncompressed data, and lossless
    JPEG 2000 decoded in full, are box-averaged to the same size, and give the very same
    pixels (a lossless file scores as its uncompressed twin). Each is close to the
    full-size image brought down to that size."""
    full = Image.fromarray(rg1["RG1_UNCR"].pixels)
    reduced = {name: load_path(DICOM_SAMPLES / f"{name}.dcm", min_size=(448, 448))
               for name in ("RG1_UNCR", "RG1_J2KR")}
    with monkeypatch.context() as m:
        m.setattr(Dataset, "pixel_array", property(lambda ds: pytest.fail("decoded in full")))
        reduced["RG1_J2KI"] = load_path(DICOM_SAMPLES / "RG1_J2KI.dcm", min_size=(448, 448))
    assert np.array_equal(reduced["RG1_UNCR"].pixels, reduced["RG1_J2KR"].pixels)
    for name, image in reduced.items():
        assert isinstance(image, LoadedImage), image
        # 1841 x 1955: halved twice, or box-averaged by 4 (rounded up), to cover 448 x 448.
        assert image.pixels.shape == (489, 461)
        reference = np.asarray(full.resize((461, 489), Image.Resampling.BOX))
        assert correlation(reference, image.pixels) > 0.995, name
        assert np.abs(reference.astype(float) - image.pixels).mean() < 3, name


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_reduced_jpeg2000_keeps_the_stored_values(chest_crop, tmp_path, bits):
    """Pillow widens samples to 8 or 16 bits; the reduced decode gives the stored values
    back, as a box average of the full decode would give them."""
    stored = (chest_crop.astype(np.int64) << bits >> 15).astype(
        np.uint8 if bits == 8 else np.uint16)
    ds = cr_dataset(stored, BitsStored=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds = pydicom.dcmread(save(ds, tmp_path / "j2k.dcm"))
    reduced = dicom._decode_jpeg2000_reduced(ds, (100, 100))
    assert reduced is not None and reduced.dtype == stored.dtype
    assert reduced.shape == (123, 116)  # 489 x 461 halved twice, rounded up
    box = np.asarray(Image.fromarray(stored.astype(np.float32)).resize((116, 123),
                                                                        Image.Resampling.BOX))
    assert np.abs(reduced - box).mean() < 0.02 * (2 ** bits)
    assert correlation(box, reduced) > 0.98  # the wavelet low band is not quite a box filter


def test_reduced_jpeg2000_decodes_as_pillows_own_reduce(chest_crop):
    """The contract with Pillow that the reduced decode relies on (its JPEG 2000 decoder's
    arguments): where Pillow's public `reduce` works (sides that are multiples of 2^n),
    `ReducedJpeg2000` gives the very same pixels, and it also reduces the sides where
    Pillow's own rounding fails (461 and 489 px: the RG1 scans' halves)."""
    from openjpeg.utils import encode_array

    for crop, size in (((448, 448), (112, 112)), ((489, 461), (116, 123))):
        stream = encode_array(np.ascontiguousarray(chest_crop[:crop[0], :crop[1]]),
                              bits_stored=16)
        ours = dicom.ReducedJpeg2000(io.BytesIO(stream), 2)
        assert ours.size == size
        if crop == (448, 448):
            pillows = Image.open(io.BytesIO(stream))
            pillows.reduce = 2
            pillows.load()
            assert np.array_equal(np.asarray(ours), np.asarray(pillows))
        else:
            with pytest.raises(OSError):  # why ReducedJpeg2000 exists
                pillows = Image.open(io.BytesIO(stream))
                pillows.reduce = 2
                pillows.load()
            assert np.asarray(ours).shape == size[::-1]


def test_small_scans_and_signed_jpeg2000_are_decoded_in_full(tmp_path, chest_crop):
    image = load_path(DICOM_SAMPLES / "RG1_J2KI.dcm", min_size=(1000, 1000))
    assert image.pixels.shape == (1955, 1841)  # no halving covers 1000 x 1000
    signed = cr_dataset(chest_crop.astype(np.int16) - 8000)
    signed.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])  # lossy
    path = save(signed, tmp_path / "signed.dcm")
    image = load_path(path, min_size=(200, 200))
    assert isinstance(image, LoadedImage), image
    assert image.pixels.shape == (245, 231)  # 489 x 461 decoded in full, then box-averaged
    reference = np.asarray(Image.fromarray(load_path(path).pixels).resize(
        (231, 245), Image.Resampling.BOX))
    assert correlation(reference, image.pixels) > 0.99


def test_rg1_matches_dcmtk(rg1, dcmj2pnm, tmp_path):
    """dcmtk's free build has no JPEG 2000 decoder, so only RG1_UNCR is rendered by it
    (RG1_J2KR is pixel-identical, see above)."""
    reference = dcmtk_render(dcmj2pnm, DICOM_SAMPLES / "RG1_UNCR.dcm", tmp_path)
    r = correlation(reference, rg1["RG1_UNCR"].pixels)
    assert r > 0.99, f"correlation with dcmj2pnm {r:.5f}"


def test_cr_without_file_meta_is_read_and_inverted(chest, dcmj2pnm, tmp_path):
    """A CR as older devices wrote them (fo-dicom's CR-MONO1-10-chest is one): no preamble
    nor file meta, implicit VR little endian, 10 bits MONOCHROME1 (air bright as stored)."""
    stored = (1023 - chest.astype(np.int32) * 1023 // 255).astype(np.uint16)
    ds = cr_dataset(stored, PhotometricInterpretation="MONOCHROME1", BitsStored=10,
                    WindowCenter=512, WindowWidth=1024)
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "CR-MONO1-10-chest"
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"  # no preamble, no file meta
    image = load_path(path)
    assert isinstance(image, LoadedImage), image
    assert image.pixels.shape == chest.shape and image.metadata["Modality"] == "CR"
    # MONOCHROME1 shown the usual way round: the chest as it was before it was stored.
    assert correlation(image.pixels, chest) > 0.999
    r = correlation(dcmtk_render(dcmj2pnm, path, tmp_path), image.pixels)
    assert r > 0.99, f"correlation with dcmj2pnm {r:.5f}"


@pytest.mark.parametrize("name, reason", [
    ("RG3_J2KI", "body part examined is EXTREMITY, not the chest"),
    ("MR2_J2KI", "modality MR: not a radiograph (CR or DX)"),
])
def test_not_a_chest_radiograph_is_skipped(name, reason):
    result = load_path(DICOM_SAMPLES / f"{name}.dcm")
    assert isinstance(result, FileResult)
    assert (result.status, result.reason) == ("skipped", reason)
    # Grouped and labelled like the study's readable images.
    assert result.study == pydicom.dcmread(DICOM_SAMPLES / f"{name}.dcm").StudyInstanceUID
    assert result.metadata["PatientID"]


def test_text_file_named_dcm_is_an_unknown_type(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not a DICOM file, just text\n" * 20)
    result = load_path(path)
    assert (result.status, result.reason) == ("skipped",
                                              "unknown file type (not DICOM, PNG, JPEG or TIFF)")


# --- which objects are classified ---------------------------------------------------------

@pytest.mark.parametrize("attributes, reason", [
    ({"Modality": "CT", "SOPClassUID": CTImageStorage}, "modality CT"),
    ({"Modality": None}, "modality not given"),
    ({"ViewPosition": "LL"}, "view position LL"),
    ({"ViewPosition": "LATERAL"}, "view position LATERAL"),
    ({"ViewPosition": None, "SeriesDescription": "Chest lat"}, "names a lateral"),
    ({"BodyPartExamined": "KNEE"}, "body part examined is KNEE"),
    ({"BodyPartExamined": None, "StudyDescription": "Knee AP"}, "StudyDescription names KNEE"),
    ({"NumberOfFrames": 2}, "multi-frame object (2 frames)"),
    ({"PhotometricInterpretation": "RGB"}, "colour image (RGB)"),
])
def test_skipped_by_metadata(tmp_path, attributes, reason):
    result = load_path(save(cr_dataset(RAMP_12_BIT, **attributes), tmp_path / "x.dcm"))
    assert isinstance(result, FileResult) and result.status == "skipped", result
    assert reason in result.reason


@pytest.mark.parametrize("attributes", [
    {"BodyPartExamined": "THORAX", "ViewPosition": "AP"},
    {"BodyPartExamined": None, "StudyDescription": "CHEST PA AND LAT"},  # names the chest
    {"ViewPosition": "LLD", "Modality": "DX"},  # decubitus is a frontal projection
])
def test_frontal_chest_radiographs_are_read(tmp_path, attributes):
    image = load_path(save(cr_dataset(RAMP_12_BIT, **attributes), tmp_path / "x.dcm"))
    assert isinstance(image, LoadedImage), image
    assert np.abs(image.pixels - RAMP_12_BIT / 4095 * 255).max() <= 0.5  # read, not just let in


@pytest.mark.parametrize("syntax, reason", [
    (JPEG2000MC, "unsupported transfer syntax: JPEG 2000 Part 2 Multi-component Image "
                 "Compression (1.2.840.10008.1.2.4.93)"),
    ("1.2.826.0.1.3680043.8.498.99", "unknown transfer syntax 1.2.826.0.1.3680043.8.498.99"),
])
def test_unsupported_transfer_syntax_is_an_error(tmp_path, syntax, reason):
    ds = cr_dataset(RAMP_12_BIT)
    ds.PixelData = encapsulate([RAMP_12_BIT.tobytes()])
    ds.file_meta.TransferSyntaxUID = syntax
    result = load_path(save(ds, tmp_path / "x.dcm"))
    assert (result.status, result.reason) == ("error", reason)


def test_missing_pixel_data_is_an_error(tmp_path):
    result = load_path(save(cr_dataset(RAMP_12_BIT, PixelData=None), tmp_path / "x.dcm"))
    assert (result.status, result.reason) == ("error", "no pixel data")


def test_truncated_pixel_data_is_an_error(tmp_path):
    path = save(cr_dataset(RAMP_12_BIT), tmp_path / "x.dcm")
    path.write_bytes(path.read_bytes()[:-1000])
    result = load_path(path)
    assert result.status == "error" and "Explicit VR Little Endian" in result.reason


def test_file_that_disappears_before_reading_is_an_error(tmp_path):
    item = identify_file(save(cr_dataset(RAMP_12_BIT), tmp_path / "x.dcm"))
    item.path.unlink()
    result = load(item)
    assert (result.status, result.reason) == ("error",
                                              "file disappeared before it could be read")


# --- pixel pipeline -----------------------------------------------------------------------

def test_headerless_implicit_little_endian_file(tmp_path):
    ds = cr_dataset(RAMP_12_BIT, BitsStored=12)
    del ds.file_meta
    path = tmp_path / "old_cr"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[:2] == b"\x08\x00"
    image = load_path(path)
    assert isinstance(image, LoadedImage), image
    assert image.pixels[0, 0] == 0 and image.pixels[-1, -1] == 255


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_rescale_and_window_match_pydicom(tmp_path, function):
    """Our float32 pipeline against pydicom's float64 reference functions."""
    ds = cr_dataset(RAMP_12_BIT, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1000,
                    WindowCenter=[3000, 100], WindowWidth=[4000, 50], VOILUTFunction=function)
    image = load_path(save(ds, tmp_path / "x.dcm"))
    reference = apply_voi_lut(apply_modality_lut(RAMP_12_BIT, ds), ds)
    low, high = -1000, 4095 * 2 - 1000  # pydicom's output range: the rescaled stored range
    expected = (reference - low) / (high - low) * 255
    assert np.abs(image.pixels - expected).max() <= 1.0


def test_voi_lut_sequence_uses_the_bits_its_entries_use(tmp_path):
    """A 12-bit table declared as 16 bits, as some modalities write them."""
    table = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)
    voi = Dataset()
    voi.add_new("LUTDescriptor", "US", [4096, 0, 16])
    voi.add_new("LUTData", "US", table.tolist())
    ds = cr_dataset(RAMP_12_BIT, BitsStored=12, WindowCenter=100, WindowWidth=10,
                    VOILUTSequence=[voi])
    image = load_path(save(ds, tmp_path / "x.dcm"))
    assert np.abs(image.pixels - table.reshape(64, 64) / 4095 * 255).max() <= 0.5


def test_without_window_the_data_range_is_stretched(tmp_path):
    stored = (RAMP_12_BIT // 4 + 1000).astype(np.uint16)  # 1000..2023 of 16 bits
    image = load_path(save(cr_dataset(stored), tmp_path / "x.dcm"))
    assert (image.pixels.min(), image.pixels.max()) == (0, 255)
    assert np.all(np.diff(image.pixels.ravel().astype(int)) >= 0)


def test_monochrome1_lowest_value_is_white(tmp_path):
    ds = cr_dataset(RAMP_12_BIT, BitsStored=12, PhotometricInterpretation="MONOCHROME1")
    image = load_path(save(ds, tmp_path / "x.dcm"))
    assert image.pixels[0, 0] == 255 and image.pixels[-1, -1] == 0


def test_bits_above_bits_stored_are_ignored(tmp_path):
    dirty = RAMP_12_BIT.copy()
    dirty[::2] |= 0xF000  # e.g. an old overlay kept in the unused high bits
    clean = load_path(save(cr_dataset(RAMP_12_BIT, BitsStored=12), tmp_path / "clean.dcm"))
    image = load_path(save(cr_dataset(dirty, BitsStored=12), tmp_path / "dirty.dcm"))
    assert np.array_equal(image.pixels, clean.pixels)


def test_signed_values_are_sign_extended(tmp_path):
    values = np.arange(-2048, 2048, dtype=np.int16).reshape(64, 64)
    stored = (values & 0x0FFF).astype(np.int16)  # 12-bit two's complement, high bits 0
    image = load_path(save(cr_dataset(stored, BitsStored=12), tmp_path / "x.dcm"))
    assert image.pixels[0, 0] == 0 and image.pixels[-1, -1] == 255
    assert np.all(np.diff(image.pixels.ravel().astype(int)) >= 0)


# --- compressed transfer syntaxes ---------------------------------------------------------

def test_rle_lossless(tmp_path, chest_crop):
    ds = cr_dataset(chest_crop, BitsStored=15, PhotometricInterpretation="MONOCHROME1")
    native = load_path(save(ds, tmp_path / "native.dcm"))
    ds.compress(RLELossless, generate_instance_uid=False)
    image = load_path(save(ds, tmp_path / "rle.dcm"))
    assert np.array_equal(image.pixels, native.pixels)


def test_jpeg_lossless(tmp_path, chest_crop):
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg is None:
        pytest.skip("dcmcjpeg not installed (Debian package dcmtk)")
    native_path = save(cr_dataset(chest_crop, BitsStored=15), tmp_path / "native.dcm")
    jpeg_path = tmp_path / "jpeg-lossless.dcm"
    subprocess.run([dcmcjpeg, "--quiet", "+e1", str(native_path), str(jpeg_path)], check=True)
    assert pydicom.dcmread(jpeg_path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(load_path(jpeg_path).pixels, load_path(native_path).pixels)


def test_jpeg_baseline(tmp_path, chest_crop):
    grey = (chest_crop >> 7).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(grey).save(encoded, "JPEG", quality=95)
    ds = cr_dataset(grey)
    ds.PixelData = encapsulate([encoded.getvalue()])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    image = load_path(save(ds, tmp_path / "baseline.dcm"))
    assert correlation(image.pixels, grey) > 0.99
