"""The scope guard's stored view: a baseline JPEG round trip inside the ONNX graph, held to
Pillow's encoder (libjpeg) on real scans."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from pneumoscan.inference.preprocess import Preprocessing, normalise, prepare_pixels
from pneumoscan.modelling.stored_view import (StoredViewError, add_stored_view,
                                              quantisation_table)

from conftest import SAMPLES

PREP = Preprocessing(224, 224, 3, (0.498,) * 3, (0.502,) * 3)


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 95, 100])
def test_quantisation_tables_are_libjpegs(quality):
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as stored:
        assert quantisation_table(quality).ravel().tolist() == list(stored.quantization[0])


def view_session(prep: Preprocessing, quality: int, reduction: int = 1) -> ort.InferenceSession:
    """A graph whose only node passes the input on, with the view added and that node's
    copy (which reads the view) as its second output."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["activation"])], "view",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["n", 3, prep.height, prep.width])],
        [helper.make_tensor_value_info("activation", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=9)
    (copy,) = add_stored_view(model, "input", prep, quality, ["activation"], reduction)
    model.graph.output.append(helper.make_tensor_value_info(copy, TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_the_view_is_pillows_round_trip(quality):
    """On the real scans of samples/, resized as `run` resizes them: almost every pixel is
    the grey level Pillow's encoder and decoder give, and the few others are next to it
    (libjpeg's integer DCT rounds a coefficient the other way now and then). The plain
    input is much further from the round trip: the view does change the image."""
    session = view_session(PREP, quality)
    stored_prep = Preprocessing(**{**PREP.__dict__, "jpeg_quality": quality})
    for path in sorted(SAMPLES.rglob("*.jpeg"))[:6]:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"))
        plain = prepare_pixels(pixels, PREP)
        expected = prepare_pixels(pixels, stored_prep).astype(float)
        plain_out, view_out = session.run(None, {"input": normalise(plain[None], PREP)})
        assert np.array_equal(plain_out, normalise(plain[None], PREP))
        assert np.array_equal(view_out[0, 0], view_out[0, 2])  # grey in every channel
        # The view leaves out the decoder's rounding and clamping to 8 bits: done here.
        got = np.clip(np.round((view_out[0, 0] * 0.502 + 0.498) * 255), 0, 255)
        gap = np.abs(got - expected)
        assert (gap == 0).mean() > 0.8 and (gap <= 2).mean() > 0.99 and gap.max() <= 12
        assert gap.mean() < 0.2 < np.abs(plain - expected).mean()


@pytest.mark.parametrize("reduction", [2, 4, 8])
def test_the_reduced_view_is_the_views_average(reduction):
    """The decoder folds the averaging into its transposed convolution: the same as the
    full-size view averaged over reduction x reduction pixels, on a real scan."""
    with Image.open(sorted(SAMPLES.rglob("*.jpeg"))[0]) as img:
        pixels = normalise(prepare_pixels(np.asarray(img.convert("L")), PREP)[None], PREP)
    _, full = view_session(PREP, 75).run(None, {"input": pixels})
    _, reduced = view_session(PREP, 75, reduction).run(None, {"input": pixels})
    side = 224 // reduction
    averaged = full.reshape(1, 3, side, reduction, side, reduction).mean(axis=(3, 5))
    assert reduced.shape == (1, 3, side, side)
    assert np.abs(reduced - averaged).max() < 1e-4
    assert np.abs(reduced - averaged).max() < 1e-3 * np.abs(np.diff(averaged, axis=-1)).max()


def test_the_view_is_averaged_over_a_divisor_of_the_block():
    with pytest.raises(StoredViewError, match="divisor"):
        view_session(PREP, 75, 3)


def test_the_view_needs_whole_blocks():
    with pytest.raises(StoredViewError, match="8x8 blocks"):
        view_session(Preprocessing(220, 224, 3, (0.5,) * 3, (0.5,) * 3), 75)
