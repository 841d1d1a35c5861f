"""The scope guard's pixel check, fitted at export time: an out-of-distribution score that
the model computes itself, as one more ONNX output (`scope_score`, shape (N,)).

The guard reads the image through its own view (modelling/stored_view.py): the model's input
stored as the training images were (a quality-75 JPEG round trip, unless the model's own
preprocessing has one) and averaged over 2x2 pixels, through a copy of the network's trunk;
or, with the "direct" view, the network's own activations in the same pass (for networks
that do not tell an original scan from a training copy by its JPEG artefacts, such as those
with an input low-pass).
Each tapped layer's activations are pooled to their per-channel mean and standard deviation.
On the training images, a Gaussian per layer is fitted in the probabilistic-PCA form: the
top principal components with their own variances, and one variance for everything outside
them. An image's distance from it is the Mahalanobis distance in those components plus its
residual energy outside them over that variance (the residual is where images unlike any
training image show most). Each layer's log distance is standardised on the validation
images, and the score is their mean over the layers: layers from the first convolutions
(exposure, texture, noise) to the last ones (anatomy) each see different departures, and
the last layer alone misses many adults. The threshold is set so that at most
`VAL_FLAG_RATE` of the validation images are flagged.

Only ONNX and ONNX Runtime are needed (no torch): the same fit serves a fresh export and an
ONNX model that has no checkpoint any more (`pneumoscan scope-guard`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pneumoscan.inference.model import META_PREFIX, open_session
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.modelling.onnx_files import save_checked
from pneumoscan.modelling.stored_view import StoredViewError, add_stored_view

SCORE_OUTPUT = "scope_score"
METADATA_KEY = "scope_guard"
VAL_FLAG_RATE = 0.05
COMPONENTS = 64
POWER_ITERATIONS = 4
FIT_PREFIX = "scope_fit"  # the fit's own statistics outputs: apart from a guard's nodes
STD_FLOOR = 0.01  # activations are O(1) (ReLU6: 0-6)
ACTIVATIONS = ("Clip", "Relu")
# The guard's view of every input: stored as the Kermany 224 px training images were, and
# averaged over 4x4 pixels (what is left of storage at that scale is below what the layers
# see; the trunk's copy costs a sixteenth of the network, and at 2x2 the guard flagged the
# same images at twice the cost: docs/BENCHMARKS.md).
TRAINING_JPEG_QUALITY = 75
VIEW_REDUCTION = 4
# What the guard reads: "stored", the view above through a copy of the trunk (for networks
# whose activations tell an original scan from a training copy by its missing JPEG
# artefacts); "direct", the network's own activations in the same pass (no copy; meant for
# networks that do not, such as those with an input low-pass, architectures.GaussianLowPass,
# although on issue 21's candidates it flagged 9 of 100 originals: docs/MODEL_CARD.md).
VIEWS = ("stored", "direct")
# The direct view taps the last activations of the three coarsest resolutions only (28, 14
# and 7 px for a 224 px input): on the 2026.12.06 low-pass candidate, the 112 and 56 px
# layers cost about 40% of the network's time (their statistics over large maps, in the
# layout ORT's convolutions do not use) and flagging did not need them (docs/MODEL_CARD.md).
DIRECT_LAYERS = 3


class ScopeFitError(RuntimeError):
    pass


@dataclass
class LayerFit:
    tensor: str
    mean: np.ndarray  # (2C,)
    components: np.ndarray  # (2C, k), orthonormal columns
    inverse_variances: np.ndarray  # (k,)
    inverse_residual_variance: float
    log_distance_centre: float  # on validation images
    log_distance_scale: float


def tapped_layers(model) -> list[str]:
    """The activations the guard reads: the last one at each of the trunk's resolutions,
    from the highest (exposure, texture, noise) to the last conv maps (anatomy). Chosen by
    measurement (docs/MODEL_CARD.md, "Scope guard"): one layer alone, first or last, misses
    many adults; one per scale flags them all on adult-dev while keeping the Kermany
    originals in."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output)}
    activations = [node.output[0] for node in model.graph.node
                   if node.op_type in ACTIVATIONS and not is_guard_node(node)
                   and len(shapes.get(node.output[0], [])) == 4]
    if not activations:
        raise ScopeFitError("no 4-D activations found to fit the scope guard on")
    return [name for name, after in zip(activations, [*activations[1:], None])
            if after is None or shapes[after][2:] != shapes[name][2:]]


def _pooled_statistics(graph, tensor: str, index: int, prefix: str = "scope") -> str:
    """Nodes giving (N, 2C): per-channel mean and standard deviation of `tensor`. The
    variance is the mean squared deviation (E[x^2] - E[x]^2 loses all its digits in float32
    on nearly constant channels, such as saturated ReLU6 ones), and STD_FLOOR^2 is added
    under the root so that what is left of rounding cannot dominate a distance."""
    from onnx import helper

    name = f"{prefix}/{index}/"
    graph.node.extend([
        helper.make_node("ReduceMean", [tensor, f"{prefix}/spatial_axes"], [name + "mean_map"],
                         keepdims=1),
        helper.make_node("Sub", [tensor, name + "mean_map"], [name + "deviation"]),
        helper.make_node("Mul", [name + "deviation", name + "deviation"], [name + "square"]),
        helper.make_node("ReduceMean", [name + "square", f"{prefix}/spatial_axes"],
                         [name + "var"], keepdims=0),
        helper.make_node("Add", [name + "var", f"{prefix}/variance_floor"],
                         [name + "var_floored"]),
        helper.make_node("Sqrt", [name + "var_floored"], [name + "std"]),
        helper.make_node("Flatten", [name + "mean_map"], [name + "mean"], axis=1),
        helper.make_node("Concat", [name + "mean", name + "std"], [name + "stats"], axis=1),
    ])
    return name + "stats"


def _graph_constants(graph, prefix: str = "scope") -> None:
    _constant(graph, f"{prefix}/spatial_axes", np.array([2, 3], np.int64))
    _constant(graph, f"{prefix}/variance_floor", np.array(STD_FLOOR ** 2, np.float32))


def _constant(graph, name: str, value) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def with_statistics_outputs(model, tensors: Sequence[str]):
    """A copy of `model` that also outputs each tapped layer's pooled statistics."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _graph_constants(model.graph, FIT_PREFIX)
    for index, tensor in enumerate(tensors):
        stats = _pooled_statistics(model.graph, tensor, index, FIT_PREFIX)
        model.graph.output.append(helper.make_tensor_value_info(stats, TensorProto.FLOAT, None))
    return model


def layer_statistics(model, tensors: Sequence[str], paths: Sequence[Path],
                     log: Callable[[str], None]) -> list[np.ndarray]:
    """Each tapped layer's pooled statistics in `model` (an ONNX ModelProto) over the
    images at `paths` that can be read, each as `run` feeds it to the model."""
    import onnx

    from pneumoscan.inference.pipeline import preprocessed_batches

    prep = model_preprocessing(model)
    tapped = with_statistics_outputs(model, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(tapped, str(Path(tmp) / "tapped.onnx"))
        session, _ = open_session(Path(tmp) / "tapped.onnx", "cpu", cache=False)
    names = [o.name for o in tapped.graph.output[-len(tensors):]]
    source = tapped.graph.input[0].name
    collected: list[list[np.ndarray]] = [[] for _ in tensors]
    for batch, _ in preprocessed_batches(list(paths), prep):
        for store, value in zip(collected, session.run(names, {source: batch})):
            store.append(value)
    if not collected[0]:
        raise ScopeFitError("none of the scope guard's images could be read")
    stats = [np.concatenate(parts).astype(np.float64) for parts in collected]
    log(f"scope guard: statistics of {len(tensors)} layers over {len(stats[0])} images")
    return stats


def model_preprocessing(model) -> Preprocessing:
    """The preprocessing in an exported model's metadata."""
    key = META_PREFIX + "preprocessing"
    text = next((p.value for p in model.metadata_props if p.key == key), None)
    if text is None:
        raise ScopeFitError("the model lacks pneumoscan metadata; export it with "
                            "`pneumoscan export-onnx`")
    return Preprocessing.from_json(text)


def fit_layer(tensor: str, train: np.ndarray, components: int = COMPONENTS) -> LayerFit:
    """The probabilistic-PCA Gaussian of one layer's training statistics (N, D). The top
    components come from a randomised SVD (a few passes over the data, O(N D k)), not from
    the D x D covariance: the last layer has D = 2560, and export runs on small CPUs."""
    mean = train.mean(axis=0)
    centred = train - mean
    n, dims = centred.shape
    k = max(1, min(components, n - 1, dims - 1))
    sketch = centred @ np.random.default_rng(0).standard_normal((dims, k + 10))
    for _ in range(POWER_ITERATIONS):  # sharpens the sketch towards the top components
        sketch = centred @ (centred.T @ np.linalg.qr(sketch)[0])
    basis = np.linalg.qr(sketch)[0]
    _, singular, rows = np.linalg.svd(basis.T @ centred, full_matrices=False)
    variances = singular[:k] ** 2 / n
    total = float((centred ** 2).sum()) / n
    # Directions of (almost) no variance: dead channels, and the STD_FLOOR of saturated ones.
    floor = max(total / dims, 1e-12) * 1e-4
    residual = max((total - float(variances.sum())) / (dims - k), floor)
    return LayerFit(tensor, mean, rows[:k].T.copy(), 1 / np.maximum(variances, floor),
                    1 / residual, 0.0, 1.0)


def log_distances(fit: LayerFit, stats: np.ndarray) -> np.ndarray:
    """What the ONNX graph computes for one layer, in numpy (fitting, and its test)."""
    centred = stats - fit.mean
    projected = centred @ fit.components
    inside = (projected ** 2) @ fit.inverse_variances
    outside = np.maximum((centred ** 2).sum(1) - (projected ** 2).sum(1), 0)
    return np.log(inside + outside * fit.inverse_residual_variance)


def standardise(fit: LayerFit, val: np.ndarray) -> None:
    values = log_distances(fit, val)
    fit.log_distance_centre = float(np.median(values))
    fit.log_distance_scale = float(max(values.std(), 1e-6))


def combined_scores(fits: Sequence[LayerFit], stats: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean([(log_distances(f, s) - f.log_distance_centre) / f.log_distance_scale
                    for f, s in zip(fits, stats)], axis=0)


def flag_threshold(val_scores: np.ndarray, rate: float = VAL_FLAG_RATE) -> float:
    """A threshold (score > threshold is flagged) flagging at most `rate` of the scores:
    midway between the highest score it keeps and the next higher score (ties are kept
    together), or above the highest by a hundredth of the scores' range (at least 1e-3)
    when it flags none. Never one of the scores: that image's float32 score in the graph, a
    few ulps from its float64 fit here, would be in or out of scope by rounding (one was, in
    a test run)."""
    ordered = np.sort(val_scores)
    allowed = int(np.floor(rate * len(ordered)))
    kept = ordered[len(ordered) - allowed - 1]
    above = ordered[ordered > kept]
    if above.size:
        return float((kept + above[0]) / 2)
    return float(kept + max((ordered[-1] - ordered[0]) / 100, 1e-3))


def add_score_output(model, fits: Sequence[LayerFit]):
    """`model` with the output `scope_score` (N,) computed from `fits`."""
    from onnx import TensorProto, helper

    graph = model.graph
    _graph_constants(graph)
    _constant(graph, "scope/feature_axis", np.array([1], np.int64))
    standardised = []
    for index, fit in enumerate(fits):
        stats = _pooled_statistics(graph, fit.tensor, index)
        name = f"scope/{index}/"
        f32 = lambda value: np.asarray(value, np.float32)  # noqa: E731
        graph.node.extend([
            helper.make_node("Sub", [stats, _constant(graph, name + "mu", f32(fit.mean))],
                             [name + "centred"]),
            helper.make_node("MatMul", [name + "centred",
                                        _constant(graph, name + "P", f32(fit.components))],
                             [name + "projected"]),
            helper.make_node("Mul", [name + "projected", name + "projected"],
                             [name + "projected_sq"]),
            helper.make_node("MatMul", [name + "projected_sq", _constant(
                graph, name + "inv_var", f32(fit.inverse_variances[:, None]))],
                [name + "inside"]),
            helper.make_node("Mul", [name + "centred", name + "centred"], [name + "centred_sq"]),
            helper.make_node("ReduceSum", [name + "centred_sq", "scope/feature_axis"],
                             [name + "energy"], keepdims=1),
            helper.make_node("ReduceSum", [name + "projected_sq", "scope/feature_axis"],
                             [name + "energy_inside"], keepdims=1),
            helper.make_node("Sub", [name + "energy", name + "energy_inside"],
                             [name + "residual_raw"]),
            helper.make_node("Relu", [name + "residual_raw"], [name + "residual"]),
            helper.make_node("Mul", [name + "residual", _constant(
                graph, name + "inv_residual_var", f32(fit.inverse_residual_variance))],
                [name + "outside"]),
            helper.make_node("Add", [name + "inside", name + "outside"], [name + "distance"]),
            helper.make_node("Log", [name + "distance"], [name + "log_distance"]),
            helper.make_node("Sub", [name + "log_distance", _constant(
                graph, name + "centre", f32(fit.log_distance_centre))], [name + "shifted"]),
            helper.make_node("Mul", [name + "shifted", _constant(
                graph, name + "inv_scale", f32(1 / fit.log_distance_scale))],
                [name + "standardised"]),
        ])
        standardised.append(name + "standardised")
    graph.node.extend([
        helper.make_node("Concat", standardised, ["scope/layers"], axis=1),
        helper.make_node("ReduceMean", ["scope/layers", "scope/feature_axis"], [SCORE_OUTPUT],
                         keepdims=0),
    ])
    graph.output.append(helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]))
    name_guard_nodes(graph)
    return model


def is_guard_node(node) -> bool:
    return node.output[0].startswith("scope/") or node.output[0] == SCORE_OUTPUT


def name_guard_nodes(graph) -> None:
    """Each guard node named after its output (tools such as the int8 quantiser select
    nodes by name)."""
    for node in graph.node:
        if not node.name and is_guard_node(node):
            node.name = node.output[0]


def without_guard(model):
    """`model` (an ONNX ModelProto, changed in place) without its scope guard: the guard's
    nodes, its output and its metadata taken out, the network's nodes and weights as they
    are."""
    graph = model.graph
    kept = [node for node in graph.node if not is_guard_node(node)]
    del graph.node[:]
    graph.node.extend(kept)
    outputs = [o for o in graph.output if o.name != SCORE_OUTPUT]
    del graph.output[:]
    graph.output.extend(outputs)
    read = {name for node in kept for name in node.input}
    weights = [w for w in graph.initializer if w.name in read]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    metadata = [m for m in model.metadata_props if m.key != META_PREFIX + METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(metadata)
    return model


def guard_of(model) -> ScopeGuard | None:
    """The scope guard `model` (an ONNX ModelProto) says it has, from its metadata."""
    for entry in model.metadata_props:
        if entry.key == META_PREFIX + METADATA_KEY:
            # Guards fitted before the direct view existed do not name their view.
            return ScopeGuard(**{"view": "stored", **json.loads(entry.value)})
    return None


def read_split(path: Path) -> tuple[list[Path], list[Path]]:
    """(train, validation) images still there, from a split.json as training writes it."""
    try:
        split = json.loads(Path(path).read_text())
        return tuple([p for p in map(Path, split[part]) if p.exists()]  # type: ignore
                     for part in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ScopeFitError(f"cannot read the split {path}: {exc}") from exc


@dataclass(frozen=True)
class ScopeGuard:
    """What the model's metadata says about its guard."""
    threshold: float
    layers: list[str]
    components: int
    train_images: int
    val_images: int
    val_flagged: float
    view: str  # one of VIEWS
    # The stored view (stored_view.py): the input through a JPEG round trip at this
    # quality (None: the model's preprocessing has its own, or the view is direct),
    # averaged over pixel squares
    view_jpeg_quality: int | None
    view_reduction: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def fit_scope_guard(model_path: Path, train: Sequence[Path], val: Sequence[Path],
                    out: Path | None = None, log: Callable[[str], None] = print,
                    max_train: int | None = None, view: str = "stored",
                    layers: Sequence[str] | None = None,
                    view_reduction: int = VIEW_REDUCTION,
                    replace: bool = False) -> ScopeGuard:
    """Fit the guard on `train` (`max_train` of them at most, evenly spread), set its
    threshold on `val`, and write the model with the `scope_score` output and the guard in
    its metadata to `out` (default: in place). `view` is what the guard reads (VIEWS);
    `layers`, with the direct view, the activations it taps (default: `tapped_layers`);
    `view_reduction`, with the stored view, the pixel squares it is averaged over.
    `replace`: a guard the model has is taken out first (else it is an error)."""
    import onnx

    if view not in VIEWS:
        raise ScopeFitError(f"unknown scope guard view {view!r}: one of {', '.join(VIEWS)}")
    model = onnx.load(str(model_path))
    if any(o.name == SCORE_OUTPUT for o in model.graph.output):
        if not replace:
            raise ScopeFitError(f"{model_path} already has a scope guard")
        without_guard(model)
    prep = model_preprocessing(model)
    if view == "direct":
        quality, reduction = None, 1
        tensors = list(layers) if layers else tapped_layers(model)[-DIRECT_LAYERS:]
    else:
        quality = None if prep.jpeg_quality is not None else TRAINING_JPEG_QUALITY
        reduction = view_reduction
        try:
            tensors = add_stored_view(model, model.graph.input[0].name, prep, quality,
                                      tapped_layers(model), reduction)
        except StoredViewError as exc:
            raise ScopeFitError(str(exc)) from exc
    if max_train is not None and len(train) > max_train:
        train = [train[round(i * len(train) / max_train)] for i in range(max_train)]
    train_stats = layer_statistics(model, tensors, train, log)
    val_stats = layer_statistics(model, tensors, val, log)
    guard = add_fitted_guard(model, tensors, train_stats, val_stats, view, quality, reduction)
    save_checked(model, out or model_path)
    log(f"scope guard: {len(tensors)} layers ({view}), threshold {guard.threshold:.4f}, "
        f"{guard.val_flagged:.1%} of {guard.val_images} validation images flagged")
    return guard


def add_fitted_guard(model, tensors: Sequence[str], train_stats: Sequence[np.ndarray],
                     val_stats: Sequence[np.ndarray], view: str,
                     view_jpeg_quality: int | None, view_reduction: int) -> ScopeGuard:
    """Fit on the layers' statistics and add the guard to `model` (graph and metadata)."""
    fits = [fit_layer(t, s) for t, s in zip(tensors, train_stats)]
    for fit, stats in zip(fits, val_stats):
        standardise(fit, stats)
    val_scores = combined_scores(fits, val_stats)
    threshold = flag_threshold(val_scores)
    guard = ScopeGuard(threshold=threshold, layers=list(tensors), components=COMPONENTS,
                       train_images=len(train_stats[0]), val_images=len(val_scores),
                       val_flagged=float((val_scores > threshold).mean()),
                       view=view, view_jpeg_quality=view_jpeg_quality,
                       view_reduction=view_reduction)
    add_score_output(model, fits)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_PREFIX + METADATA_KEY, guard.to_json()
    return guard
