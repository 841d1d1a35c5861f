"""`export-onnx --int8 / --fp16`: reduced-precision copies of an exported float32 model,
judged against it on labelled validation images before they are written.

int8: ONNX Runtime static quantisation in QDQ format, weights int8 per output channel,
activations uint8 calibrated (min/max) on training images; ORT runs it with VNNI dot products
where the CPU has them, AVX2 otherwise. Weights use the full 8 bits: ORT's advice for CPUs
without VNNI is 7 (`reduce_range`, against saturation), but on the default model and an
AVX2-only CPU 8 bits gave the better validation accuracy and CAM agreement, and were faster.
The head (pooling, classifier, CAM convolution) stays float32: it is a sliver of the cost,
and CAMs are then the float classifier applied to the (dequantised) last feature maps.

fp16: every float tensor in half precision for GPUs, with float32 inputs and outputs, so the
run path feeds it the same batches. (CPUs run it too, through casts, slowly.)

A copy is written only when its validation AUC is within MAX_AUC_DROP of the float32
model's; otherwise `QuantizeError` says by how much it missed, and nothing is written.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.evaluation.datasets import CLASS_NAMES
from pneumoscan.evaluation.metrics import binary_metrics
from pneumoscan.files import atomic_path
from pneumoscan.inference.pipeline import preprocessed_batches
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.modelling.scope_guard import (
    ScopeFitError,
    fit_scope_guard,
    guard_of,
    without_guard,
)
from pneumoscan.workers import available_cores

MAX_AUC_DROP = 0.005
CALIBRATION_IMAGES = 200
# A reduced copy must flag about the share of validation images float32's guard does (within
# this share, or this many images near the threshold, whichever is more): a guard that reads
# the network's own activations (scope_guard's "direct" view) reads them quantised, and its
# float32 fit then flagged every image in one measurement.
MAX_FLAG_RATE_CHANGE = 0.02
FLAG_SLACK_IMAGES = 1


class QuantizeError(RuntimeError):
    pass


@dataclass
class Comparison:
    """A reduced-precision model against the float32 one on the same labelled images."""
    images: int
    reference: dict[str, float]  # float32: auc, accuracy
    candidate: dict[str, float]
    max_probability_difference: float
    cam_correlation_mean: float  # Pearson r of the decided class's CAM, per image
    cam_correlation_min: float
    speedup: float  # float32 seconds / candidate seconds, model calls only, this machine
    # Shares of the images the scope guard flags (float32, this model); None: no guard
    flagged: tuple[float, float] | None = None

    @property
    def auc_drop(self) -> float:
        return self.reference["auc"] - self.candidate["auc"]

    def summary(self, name: str) -> str:
        ref, new = self.reference, self.candidate
        return (f"{name} vs float32 on {self.images} validation images: "
                f"AUC {ref['auc']:.4f} -> {new['auc']:.4f} ({-self.auc_drop:+.4f}), "
                f"accuracy {ref['accuracy']:.4f} -> {new['accuracy']:.4f} "
                f"({new['accuracy'] - ref['accuracy']:+.4f}), max |probability difference| "
                f"{self.max_probability_difference:.2e}, CAM correlation mean "
                f"{self.cam_correlation_mean:.3f} (min {self.cam_correlation_min:.3f}), "
                f"model {self.speedup:.2f}x the speed of float32 on this machine"
                + (f", scope guard flags {self.flagged[0]:.1%} -> {self.flagged[1]:.1%}"
                   if self.flagged is not None else ""))

    def to_json(self) -> dict:
        return {"images": self.images, "float32": self.reference, "this_model": self.candidate,
                "max_probability_difference": self.max_probability_difference,
                "cam_correlation_mean": self.cam_correlation_mean,
                "cam_correlation_min": self.cam_correlation_min,
                "speedup_vs_float32": self.speedup,
                "scope_flagged": None if self.flagged is None else
                {"float32": self.flagged[0], "this_model": self.flagged[1]}}


def labelled_images(paths: list[Path]) -> tuple[list[Path], np.ndarray]:
    """Images whose folder names their class (NORMAL/ or PNEUMONIA/), as in the checkpoint's
    split; others are left out."""
    kept = [p for p in paths if p.parent.name in CLASS_NAMES]
    return kept, np.array([CLASS_NAMES.index(p.parent.name) for p in kept])


def quantize_int8(fp32: Path, out: Path, calibration: list[Path], prep: Preprocessing,
                  log=print, guard_split: tuple[list[Path], list[Path]] | None = None) -> None:
    """Static QDQ quantisation of `fp32`, calibrated on the `calibration` images. A scope
    guard that reads the network's own activations (the direct view) is fitted again on
    the int8 network, on `guard_split` (its training and validation images)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = (batch for batch, _ in preprocessed_batches(calibration, prep))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    model = onnx.load(str(fp32))
    guard = guard_of(model)
    # float32's fit of a guard that reads the network's own activations reads them quantised
    # as out of distribution (it flagged every validation image): it is fitted anew on
    # the activations the int8 network computes.
    refit = guard is not None and guard.view == "direct"
    if refit and guard_split is None:
        raise QuantizeError("the int8 copy's scope guard must be fitted on the int8 network: "
                            "its training and validation images are needed (split.json)")
    log(f"int8: calibrating on {len(calibration)} training images")
    with tempfile.TemporaryDirectory() as tmp:
        # ONNX Runtime's own step before quantising: shapes inferred and the graph cleaned
        # up, so that every tensor gets its quantisation parameters.
        prepared = Path(tmp) / "prepared.onnx"
        if refit:  # before the clean-up, which may fuse the guard's nodes past recognition
            source = Path(tmp) / "unguarded.onnx"
            onnx.save(without_guard(onnx.load(str(fp32))), str(source))
            quant_pre_process(str(source), str(prepared))
        else:
            quant_pre_process(str(fp32), str(prepared))
            onnx.save(separate_guard_weights(onnx.load(str(prepared))), str(prepared))
        network = onnx.load(str(prepared))
        quantize_static(str(prepared), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=head_nodes(network)
                        + (producers(network, guard.layers) if refit else []))
    if not refit:
        onnx.save(guard_reads_float_input(onnx.load(str(out))), str(out))
    set_metadata(out, {"precision": f"int8 static QDQ, per-channel weights, calibrated on "
                                    f"{len(calibration)} training images"},
                 source=without_guard(model) if refit else model)
    if refit:
        train, val = guard_split  # type: ignore[misc]  # checked above
        try:
            fit_scope_guard(out, train, val, log=log, max_train=guard.train_images,
                            view=guard.view, layers=guard.layers)
        except ScopeFitError as exc:
            raise QuantizeError(f"int8 scope guard: {exc}") from exc


def convert_fp16(fp32: Path, out: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    model = separate_read_outputs(onnx.load(str(fp32)))
    with warnings.catch_warnings():
        # One per weight too small for float16 (flushed to 1e-7): expected, not news.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(out))
    set_metadata(out, {"precision": "float16, float32 inputs and outputs"})


def separate_read_outputs(model):
    """Graph outputs that nodes also read (`features`, read by the head) handed out through
    an Identity instead: the float16 converter casts outputs for keep_io_types, and would
    otherwise feed the head the float32 cast."""
    from onnx import helper

    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    for output in [o.name for o in graph.output if o.name in read]:
        inner = f"{output}.inner"
        for node in graph.node:
            node.input[:] = [inner if name == output else name for name in node.input]
            node.output[:] = [inner if name == output else name for name in node.output]
        graph.node.append(helper.make_node("Identity", [inner], [output], name=f"{output}.out"))
    return model


def separate_guard_weights(model):
    """`model` with the scope guard reading its own copies of the weights it shares with the
    network (modelling/stored_view.py): ONNX Runtime's quantiser swaps a quantised weight
    for its int8 round trip in every node that reads it, excluded nodes too, and the
    guard's threshold was fitted on the float weights."""
    import onnx

    from pneumoscan.modelling.scope_guard import is_guard_node

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    network_reads = {name for node in graph.node if not is_guard_node(node)
                     for name in node.input}
    copies: dict[str, str] = {}
    for node in graph.node:
        if not is_guard_node(node):
            continue
        for k, name in enumerate(node.input):
            if name not in initializers or name not in network_reads:
                continue
            if name not in copies:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = copies[name] = f"scope/weights/{name}"
                graph.initializer.append(copy)
            node.input[k] = copies[name]
    return model


def guard_reads_float_input(model):
    """`model` (quantised) with the scope guard reading the float input, not its uint8 round
    trip: the quantiser feeds every reader of the input through it, and its step is not
    one grey level, which the stored view's JPEG quantisation turns into whole steps of a
    coefficient now and then."""
    from pneumoscan.modelling.scope_guard import is_guard_node

    graph = model.graph
    source = graph.input[0].name
    quantised = {node.output[0] for node in graph.node
                 if node.op_type == "QuantizeLinear" and node.input[0] == source}
    round_trip = {node.output[0] for node in graph.node
                  if node.op_type == "DequantizeLinear" and node.input[0] in quantised}
    for node in graph.node:
        if is_guard_node(node):
            node.input[:] = [source if name in round_trip else name for name in node.input]
    return model


def producers(model, tensors: list[str]) -> list[str]:
    """The names of the nodes of `model` that make `tensors`: kept in float (the quantiser
    would fold an activation into its convolution's output range, and the tensor a direct
    scope guard reads would be gone)."""
    return [node.name for node in model.graph.node if node.output[0] in tensors]


def head_nodes(model) -> list[str]:
    """The nodes downstream of the `features` output (pooling, classifier, CAM conv) and
    the scope guard's (its score is a distance fitted in float)."""
    from pneumoscan.modelling.scope_guard import is_guard_node

    graph = model.graph
    reached, names = {"features"}, []
    for node in graph.node:  # ONNX nodes are topologically sorted
        if any(name in reached for name in node.input) or is_guard_node(node):
            reached.update(node.output)
            names.append(node.name)
    return names


def set_metadata(path: Path, entries: dict[str, str], source=None) -> None:
    """Add pneumoscan metadata `entries` to the model at `path`, after replacing all its
    metadata with that of the `source` model when given."""
    import onnx

    from pneumoscan.inference.model import metadata_props

    model = onnx.load(str(path))
    if source is not None:
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
    for key, value in metadata_props(entries).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def compare(fp32: Path, candidate: Path, paths: list[Path], labels: np.ndarray) -> Comparison:
    """Both models on the same decoded images: metrics, probability and CAM agreement, and
    the time each spends in its model calls."""
    from pneumoscan.inference.cam import normalised_cams
    from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

    from pneumoscan.inference.scope import scope_threshold

    # One batch at a time on every core: the speed-up compares the two models' own calls.
    models = [OnnxCamModel(fp32, "cpu", available_cores()),
              OnnxCamModel(candidate, "cpu", available_cores())]
    info = models[0].info
    positive = info.positive_class
    # Each model's own guard threshold: an int8 copy's guard may have been fitted anew.
    guard_thresholds = [scope_threshold(model.info) for model in models]
    probabilities, flagged = [[], []], [[], []]
    seconds = [0.0, 0.0]
    correlations, kept = [], []
    for batch, indices in preprocessed_batches(paths, info.preprocessing):
        cams = []
        for k, model in enumerate(models):
            t0 = time.perf_counter()
            predictions = model.predict(batch)
            seconds[k] += time.perf_counter() - t0
            probabilities[k].append(predictions.probabilities[:, positive])
            if guard_thresholds[k] is not None:
                flagged[k].append(predictions.scope_scores > guard_thresholds[k])
            cams.append(predictions.cams)
        decided = np.where(probabilities[0][-1] >= info.threshold, positive, 1 - positive)
        a, b = (normalised_cams(c, decided).reshape(len(batch), -1) for c in cams)
        correlations += [pearson(x, y) for x, y in zip(a, b)]
        kept += indices
    if not kept:
        raise QuantizeError("none of the validation images could be read")
    truth = labels[kept] == positive
    ref, new = (np.concatenate(p) for p in probabilities)
    metrics = [binary_metrics(truth, p, info.threshold) for p in (ref, new)]
    pick = [{"auc": m["auc"], "accuracy": m["accuracy"]} for m in metrics]
    return Comparison(images=len(kept), reference=pick[0], candidate=pick[1],
                      max_probability_difference=float(np.abs(ref - new).max()),
                      cam_correlation_mean=float(np.mean(correlations)),
                      cam_correlation_min=float(np.min(correlations)),
                      speedup=seconds[0] / seconds[1],
                      flagged=None if None in guard_thresholds else
                      tuple(float(np.concatenate(f).mean()) for f in flagged))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Correlation of two maps; 1 when both are flat (nothing to disagree on)."""
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else 1.0


def reduced_path(out: Path, kind: str) -> Path:
    """model.onnx -> model.int8.onnx / model.fp16.onnx"""
    return out.with_name(f"{out.stem}.{kind}{out.suffix}")


def export_reduced(checkpoint: Path, fp32: Path, kinds: list[str],
                   calibration_images: Path | None = None,
                   calibration_count: int | None = None, eval_images: Path | None = None,
                   max_auc_drop: float | None = None, log=print) -> dict[str, Comparison]:
    """The `kinds` copies of the float32 model exported from `checkpoint`, beside it.
    Calibration and validation images default to the checkpoint's own training and
    validation splits, `calibration_count` to CALIBRATION_IMAGES, `max_auc_drop` to
    MAX_AUC_DROP."""
    from pneumoscan.evaluation.datasets import list_samples
    from pneumoscan.modelling.checkpoint import read_checkpoint
    from pneumoscan.modelling.export import folder_images, split_images, spread

    payload = read_checkpoint(checkpoint)
    if eval_images is not None:
        try:
            samples = list_samples(eval_images)
        except (FileNotFoundError, ValueError) as exc:
            raise QuantizeError(f"--eval-images: {exc}") from exc
        paths, labels = [s.path for s in samples], np.array([s.label for s in samples])
    else:
        paths, labels = labelled_images(split_images(checkpoint, payload, "val"))
    calibration = spread(folder_images(calibration_images) if calibration_images is not None
                         else split_images(checkpoint, payload, "train"),
                         calibration_count or CALIBRATION_IMAGES)
    if "int8" in kinds and not calibration:
        raise QuantizeError("no training images to calibrate on: pass --calibration-images")
    limit = MAX_AUC_DROP if max_auc_drop is None else max_auc_drop
    guard_split = (split_images(checkpoint, payload, "train"),
                   split_images(checkpoint, payload, "val"))
    return {kind: write_reduced(kind, fp32, reduced_path(fp32, kind), paths, labels,
                                calibration, limit, log, guard_split) for kind in kinds}


def write_reduced(kind: str, fp32: Path, out: Path, paths: list[Path], labels: np.ndarray,
                  calibration: list[Path], max_auc_drop: float, log=print,
                  guard_split: tuple[list[Path], list[Path]] | None = None) -> Comparison:
    """Write the `kind` ("int8" or "fp16") copy of `fp32` to `out` if, on the labelled
    images, it keeps the AUC within `max_auc_drop`; raise QuantizeError (writing nothing)
    if not. `guard_split`: the images an int8 copy's own scope guard is fitted on."""
    from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

    if len(set(labels.tolist())) < 2:
        raise QuantizeError("the evaluation images need both classes (NORMAL/ and PNEUMONIA/ "
                            "folders): pass --eval-images")
    prep = OnnxCamModel(fp32, "cpu").info.preprocessing
    with atomic_path(out, mode=0o644) as partial:  # removed, not written, if refused
        if kind == "int8":
            quantize_int8(fp32, partial, calibration, prep, log, guard_split)
        else:
            convert_fp16(fp32, partial)
        comparison = compare(fp32, partial, paths, labels)
        log(comparison.summary(kind))
        if comparison.auc_drop > max_auc_drop:
            raise QuantizeError(f"{kind} model NOT written: its validation AUC is "
                                f"{comparison.auc_drop:.4f} below float32's, more than the "
                                f"{max_auc_drop} allowed")
        allowed = max(MAX_FLAG_RATE_CHANGE, FLAG_SLACK_IMAGES / comparison.images)
        if comparison.flagged is not None \
                and abs(comparison.flagged[1] - comparison.flagged[0]) > allowed + 1e-12:
            raise QuantizeError(f"{kind} model NOT written: its scope guard flags "
                                f"{comparison.flagged[1]:.1%} of the validation images against "
                                f"float32's {comparison.flagged[0]:.1%} (more than "
                                f"{allowed:.1%} apart): the guard reads activations the "
                                "reduction changed")
        set_metadata(partial, {"validation_vs_float32": comparison.to_json()})
    log(f"wrote {out}")
    return comparison
