"""The scope guard's view of an image stored as the training images were: an 8-bit
greyscale baseline JPEG round trip (ITU-T T.81) of the model's input, computed inside the
ONNX graph, and a copy of the network's trunk that reads it.

Why: the Kermany 224 px training images are quality-75 JPEGs, and every activation the guard
is fitted on carries those artefacts. A model trained to ignore storage (the default model
since 2026.12.01, docs/MODEL_CARD.md) reads original scans without a round trip, and a guard
on its own activations then tells an original from a training copy by its missing artefacts alone
(it flagged 96 of the 100 Kermany originals). Read through this view, an original is stored as
a training copy was, and what is left for the guard to see is the image itself. In the graph,
not in `run`'s preprocessing: every caller of the model (run, ray actors, eval, quantize)
feeds the one input it always did.

The round trip is the standard's: level shift, 8x8 DCT-II per block, division by the
quantisation table of the quality (libjpeg's scaling of Annex K's Table K.1) rounded half
away from zero as libjpeg does, then the inverse and rounding to 8 bits. libjpeg's integer
DCT rounds a coefficient the other way now and then: on Kermany originals, 92% of the pixels
come out as Pillow's encoder gives them, 99.8% within 2 grey levels (tests/test_stored_view.py).
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

    view = source if quality is None else _add_round_trip(model.graph, source, prep, quality)
    if reduction > 1:
        reduced = PREFIX + "reduced"
        model.graph.node.append(helper.make_node(
            "AveragePool", [view], [reduced], name=reduced,
            kernel_shape=[reduction, reduction], strides=[reduction, reduction]))
        view = reduced
    return _add_trunk_copy(model.graph, source, view, tapped)


def _add_round_trip(graph, source: str, prep: Preprocessing, quality: int) -> str:
    from onnx import helper, numpy_helper

    if prep.height % BLOCK or prep.width % BLOCK:
        raise StoredViewError(f"the stored view needs an input of whole {BLOCK}x{BLOCK} "
                              f"blocks, not {prep.height}x{prep.width}")

    def constant(name: str, value, dtype=np.float32) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype),
                                                         PREFIX + name))
        return PREFIX + name

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        graph.node.append(helper.make_node(op, inputs, [PREFIX + output],
                                           name=PREFIX + output, **attributes))
        return PREFIX + output

    def round_half_away(x: str, name: str) -> str:  # libjpeg's rounding; ONNX Round is to even
        magnitude = node("Floor", [node("Add", [node("Abs", [x], name + "/abs"), half],
                                        name + "/shifted")], name + "/magnitude")
        return node("Mul", [magnitude, node("Sign", [x], name + "/sign")], name)

    half = constant("half", 0.5)
    mean, std = (np.asarray(v, np.float32)[None, :, None, None] for v in (prep.mean, prep.std))
    # The grey levels 0-255 from the first channel (the others replicate it), made whole
    # again (normalising left them a few ulps off).
    first = node("Slice", [source, constant("first", [0], np.int64),
                           constant("end", [1], np.int64), constant("channel_axis", [1], np.int64)],
                 "grey/normalised")
    scaled = node("Mul", [first, constant("std", std[:, :1])], "grey/scaled")
    unit = node("Add", [scaled, constant("mean", mean[:, :1])], "grey/unit")
    levels = node("Mul", [unit, constant("levels", 255.0)], "grey/levels")
    levels = node("Round", [levels], "grey/whole")
    # Encoding (T.81 A.3.1, A.3.3, A.3.4): level shift, DCT of each block, quantisation.
    shifted = node("Sub", [levels, constant("level_shift", 128.0)], "encode/shifted")
    basis = constant("dct_basis", dct_basis())
    coefficients = node("Conv", [shifted, basis], "encode/coefficients",
                        strides=[BLOCK, BLOCK], kernel_shape=[BLOCK, BLOCK])
    table = constant("table", quantisation_table(quality).reshape(1, BLOCK * BLOCK, 1, 1))
    quantised = round_half_away(node("Div", [coefficients, table], "encode/scaled"),
                                "encode/quantised")
    # Decoding: dequantisation, inverse DCT (the transposed correlation), 8-bit samples.
    dequantised = node("Mul", [quantised, table], "decode/dequantised")
    samples = node("ConvTranspose", [dequantised, basis], "decode/samples",
                   strides=[BLOCK, BLOCK], kernel_shape=[BLOCK, BLOCK])
    decoded = node("Clip", [round_half_away(node("Add", [samples, PREFIX + "level_shift"],
                                                 "decode/unshifted"), "decode/rounded"),
                            constant("black", 0.0), PREFIX + "levels"], "decode/levels")
    # Normalised as the model's input, the grey broadcast to every channel.
    unit = node("Div", [decoded, PREFIX + "levels"], "view/unit")
    centred = node("Sub", [unit, constant("channel_mean", mean)], "view/centred")
    return node("Div", [centred, constant("channel_std", std)], "view")


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
