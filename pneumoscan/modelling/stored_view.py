"""The scope guard's view of an image stored as the training images were: an 8-bit
greyscale baseline JPEG round trip (ITU-T T.81) of the model's input, computed inside the
ONNX graph, and a copy of the network's trunk that reads it.

Why: the Kermany 224 px training images are quality-75 JPEGs, and every activation the guard
is fitted on carries those artefacts. A model trained to ignore storage (the 2026.12.01
default model, docs/MODEL_CARD.md) reads original scans without a round trip, and a guard
on its own activations then tells an original from a training copy by its missing artefacts alone
(it flagged 96 of the 100 Kermany originals). Read through this view, an original is stored as
a training copy was, and what is left for the guard to see is the image itself. In the graph,
not in `run`'s preprocessing: every caller of the model (run, ray actors, eval, quantize)
feeds the one input it always did.

The round trip is the standard's: level shift, 8x8 DCT-II per block, division by the
quantisation table of the quality (libjpeg's scaling of Annex K's Table K.1) rounded to the
nearest, then the inverse. libjpeg's integer DCT rounds a coefficient the other way now and
then: on the Kermany originals of samples/ at quality 75, 91% of the pixels come out as
Pillow's encoder gives them, 99.7% within 2 grey levels (tests/test_stored_view.py). The
decoder's last step, rounding and clamping the samples to 8 bits, is left out: the view is
averaged over pixel squares before the trunk's copy reads it, and the averaging is folded
into the inverse DCT (_add_round_trip).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pneumoscan.inference.preprocess import Preprocessing

PREFIX = "scope/view/"  # guard nodes (scope_guard.is_guard_node): not quantised by --int8
BLOCK = 8

# ITU-T T.81 Annex K, Table K.1: luminance quantisation table, in natural (row) order.
LUMINANCE_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
])


class StoredViewError(ValueError):
    pass


def quantisation_table(quality: int) -> np.ndarray:
    """The 8x8 table libjpeg (and so Pillow) uses at `quality` 1-100 for baseline JPEG:
    jpeg_quality_scaling, then each entry scaled, rounded and clamped to 1-255."""
    if not 1 <= quality <= 100:
        raise StoredViewError(f"JPEG quality must be 1-100, not {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((LUMINANCE_TABLE * scale + 50) // 100, 1, 255)


def dct_basis() -> np.ndarray:
    """(64, 1, 8, 8): the orthonormal 2-D DCT-II basis, one block function per output
    channel; T.81's forward DCT of a block is its correlation with each (A.3.3)."""
    k = np.arange(BLOCK)
    scale = np.where(k == 0, np.sqrt(1 / BLOCK), np.sqrt(2 / BLOCK))
    cosines = scale[:, None] * np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / (2 * BLOCK))
    return np.einsum("ux,vy->uvxy", cosines, cosines).reshape(BLOCK * BLOCK, 1, BLOCK, BLOCK)


def add_stored_view(model, source: str, prep: Preprocessing, quality: int | None,
                    tapped: Sequence[str], reduction: int = 1) -> list[str]:
    """Add to `model` the round trip of `source` (the model's normalised input) at
    `quality` (None: no round trip), averaged over `reduction` x `reduction` pixels, and
    copies of the nodes leading from `source` to `tapped` that read it (they share the
    network's weights); return the names of the tapped tensors' copies."""
    from onnx import helper

    if quality is not None:
        view = _add_round_trip(model.graph, source, prep, quality, reduction)
    elif reduction > 1:
        view = PREFIX + "reduced"
        model.graph.node.append(helper.make_node(
            "AveragePool", [source], [view], name=view,
            kernel_shape=[reduction, reduction], strides=[reduction, reduction]))
    else:
        view = source
    return _add_trunk_copy(model.graph, source, view, tapped)


def _add_round_trip(graph, source: str, prep: Preprocessing, quality: int,
                    reduction: int) -> str:
    """The round trip, decoded straight to the normalised view averaged over `reduction`
    pixels: the inverse DCT, the averaging and the normalisation are linear, so they are
    one transposed convolution from the quantised coefficients (no node left at full size
    after the quantisation). The decoder's
    rounding to 8 bits and clamping to 0-255 are left out: they move a sample by half a
    grey level, or where the inverse DCT rings past black or white, and the view is
    averaged before the trunk reads it."""
    from onnx import helper, numpy_helper

    if prep.height % BLOCK or prep.width % BLOCK:
        raise StoredViewError(f"the stored view needs an input of whole {BLOCK}x{BLOCK} "
                              f"blocks, not {prep.height}x{prep.width}")
    if BLOCK % reduction:
        raise StoredViewError(f"the stored view is averaged over 1, 2, 4 or 8 pixels "
                              f"(a divisor of the {BLOCK}-pixel block), not {reduction}")

    def constant(name: str, value, dtype=np.float32) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype),
                                                         PREFIX + name))
        return PREFIX + name

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        graph.node.append(helper.make_node(op, inputs, [PREFIX + output],
                                           name=PREFIX + output, **attributes))
        return PREFIX + output

    mean, std = (np.asarray(v, np.float64) for v in (prep.mean, prep.std))
    basis = dct_basis().astype(np.float64)
    table = quantisation_table(quality).reshape(BLOCK * BLOCK).astype(np.float64)
    # Encoding (T.81 A.3.1, A.3.3, A.3.4) in one convolution of the first channel (the
    # others replicate it): the grey level 0-255 is the channel * std * 255 + mean * 255,
    # less the level shift of 128; each block's DCT coefficients, divided by their
    # quantisation table entries. The affine steps become the weights and the bias (the
    # DC basis function sums to 8; the others to 0).
    grey = node("Slice", [source, constant("first", [0], np.int64),
                          constant("end", [1], np.int64), constant("channel_axis", [1], np.int64)],
                "grey")
    encoder = basis * (std[0] * 255 / table)[:, None, None, None]
    encoder_bias = (mean[0] * 255 - 128) * basis.sum(axis=(1, 2, 3)) / table
    coefficients = node("Conv", [grey, constant("encoder", encoder),
                                 constant("encoder_bias", encoder_bias)],
                        "encode/scaled", strides=[BLOCK, BLOCK], kernel_shape=[BLOCK, BLOCK])
    # Rounded to the nearest. libjpeg rounds ties away from zero, ONNX Round to even; only
    # the DC coefficient meets ties (its sum of grey levels is a multiple of 1/8), and here
    # float rounding of the folded convolution breaks them either way: such a block's mean
    # may move by one grey level.
    quantised = node("Round", [coefficients], "encode/quantised")
    # Decoding: dequantisation, inverse DCT (the transposed correlation), averaging over
    # reduction x reduction pixels, level shift back and the model's normalisation, folded.
    size = BLOCK // reduction
    averaged = basis.reshape(-1, size, reduction, size, reduction).mean(axis=(2, 4))
    weights = (table[:, None, None, None] * averaged[:, None]
               / (255 * std)[None, :, None, None])
    bias = (128 / 255 - mean) / std
    return node("ConvTranspose", [quantised, constant("decoder", weights),
                                  constant("decoder_bias", bias)],
                "view", strides=[size, size], kernel_shape=[size, size])


def _add_trunk_copy(graph, source: str, view: str, tapped: Sequence[str]) -> list[str]:
    """Copies of the nodes that lead from `source` to any of `tapped`, reading `view`."""
    from onnx import helper

    nodes = list(graph.node)
    needed, wanted = set(), set(tapped)
    for index in reversed(range(len(nodes))):  # ONNX nodes are topologically sorted
        if wanted & set(nodes[index].output):
            needed.add(index)
            wanted.update(nodes[index].input)
    renamed = {source: view}
    copies = []
    for index, node in enumerate(nodes):
        if index not in needed or not any(name in renamed for name in node.input):
            continue
        outputs = [PREFIX + "trunk/" + name for name in node.output]
        renamed.update(zip(node.output, outputs))
        copy = helper.make_node(node.op_type, [renamed.get(name, name) for name in node.input],
                                outputs, name=outputs[0], domain=node.domain)
        copy.attribute.extend(node.attribute)
        copies.append(copy)
    graph.node.extend(copies)
    missing = [name for name in tapped if name not in renamed]
    if missing:
        raise StoredViewError(f"no path from the input to {missing}")
    return [renamed[name] for name in tapped]
