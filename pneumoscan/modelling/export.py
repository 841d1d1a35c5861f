"""`pneumoscan export-onnx`: a training checkpoint -> the ONNX model that `run` uses.

The graph has three outputs for a dynamic batch: `logits` (N, K), `features` (N, C, h, w),
the last convolutional maps, and `cams` (N, K, h, w) = the classifier weights applied to
those maps as a 1x1 convolution, so CAMs come from the same ONNX Runtime call.
Exporter: pinned to torch.onnx's TorchScript exporter (dynamo=False). With the pinned torch
it exports these CNNs exactly (parity ~1e-6) and about 5x faster than the dynamo exporter,
which keeps export inside tests and CI affordable on a 2-core CPU.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumoscan.inference.model import metadata_props
from pneumoscan.modelling.onnx_files import save_checked

if TYPE_CHECKING:  # imported where used: this module loads before torch is needed
    import torch

OPSET = 18
OUTPUTS = ("logits", "features", "cams")
# What `run` consumes must match PyTorch: the class scores to 1e-4, and the CAMs as they
# are shown (min-max normalised) to 1e-3. The raw feature maps (ReLU6 activations up to 6)
# are reported too; their absolute error grows with their scale, so they are not gated.
PARITY_LIMITS = {"logits": 1e-4, "probabilities": 1e-4, "normalised_cams": 1e-3}
# An export whose validation AUC is more than this below the default model's is refused
# unless forced: a model that bad is a failed training run, not an alternative.
FAR_BELOW_AUC = 0.05


class ExportError(RuntimeError):
    pass


def export_module(network):
    """A torch module whose forward returns (logits, features, cams)."""
    import torch

    from pneumoscan.modelling.torch_cam import class_maps

    class CamExport(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            maps = self.net.features(x)
            logits = self.net.classifier(maps.mean(dim=(2, 3)))
            return logits, maps, class_maps(maps, self.net.classifier)

    return CamExport(network).eval()


def export_name(checkpoint: Path, payload: dict) -> str:
    """An export's default name: after its architecture and its training run (the
    checkpoint's folder), so that it never takes the shipped model's name unasked."""
    return f"pneumoscan-{payload['arch']}-{Path(checkpoint).resolve().parent.name}"


def shortfall(metrics: dict, reference: dict) -> str | None:
    """Why validation `metrics` (a checkpoint's) make a model not worth exporting next to
    `reference` (the default model's ModelInfo.validation_metrics), or None."""
    auc = (metrics.get("at_threshold") or {}).get("auc")
    if auc is None or math.isnan(auc):  # NaN: a validation split of one class
        return "the checkpoint records no validation AUC"
    best = (reference.get("at_threshold") or {}).get("auc")
    if best is not None and auc < best - FAR_BELOW_AUC:
        return (f"its validation AUC {auc:.3f} is far below the default model's {best:.3f} "
                f"(more than {FAR_BELOW_AUC} lower)")
    return None


def write_onnx(module, example: torch.Tensor, out: Path, metadata: dict) -> None:
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo; pinned on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            # 'SAME' padding is computed from the spatial size, which the model's metadata
            # fixes: tracing it as a constant is intended (only the batch axis is dynamic).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch cannot fold the reversed Slice in F.pad's pads; ORT does (fold_constants).
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
            torch.onnx.export(module, (example,), str(raw), dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=list(OUTPUTS),
                              dynamic_axes={name: {0: "batch"} for name in ("input", *OUTPUTS)})
        folded = Path(tmp) / "folded.onnx"
        fold_constants(raw, folded)
        model = fold_padding_into_convs(onnx.load(str(folded)))
    for key, value in metadata_props(metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    save_checked(model, out)


def fold_constants(source: Path, out: Path) -> None:
    """ONNX Runtime's basic graph optimisations (constant folding, redundant nodes), which
    are provider-independent and write plain ONNX: the exporter leaves the 'SAME' pads as
    small chains of ops, which become constants here."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def fold_padding_into_convs(model):
    """Each zero Pad feeding only a Conv becomes that Conv's own (asymmetric) pads. A
    separate Pad copies the activations, and on CPU also forces a layout change before
    and after it; ORT's PadFusion does not take the opset-18 Pad that torch writes."""
    from collections import Counter

    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(output.name for output in graph.output)
    pads_by_output = {node.output[0]: node for node in graph.node if node.op_type == "Pad"}
    folded = []
    for conv in (node for node in graph.node if node.op_type == "Conv"):
        pad = pads_by_output.get(conv.input[0])
        if pad is None or uses[pad.output[0]] != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        pad_attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        value, *axes = list(pad.input[2:]) or [""]  # constant value, axes
        nonzero_value = value and (value not in constants or constants[value].any())
        if pad_attrs.get("mode", b"constant") != b"constant" \
                or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" \
                or pad.input[1] not in constants or any(axes) or nonzero_value:
            continue
        amounts = constants[pad.input[1]].tolist()
        rank = len(amounts) // 2
        begins, ends = amounts[2:rank], amounts[rank + 2:]
        if any(amounts[:2]) or any(amounts[rank:rank + 2]) or min(amounts) < 0:
            continue  # pads batch or channels, or crops
        own = attrs.get("pads", [0] * (2 * (rank - 2)))
        merged = [a + b for a, b in zip(own, begins + ends)]
        for attribute in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for unused in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(unused)
    return model


def check_parity(module, onnx_path: Path, batch: np.ndarray) -> dict[str, float]:
    """Max abs difference between PyTorch and ONNX Runtime (CPU, the run path's session
    options) for each output, and for what `run` derives from them."""
    import torch

    from pneumoscan.inference.cam import normalised_cams
    from pneumoscan.inference.cam.onnx_cam import softmax
    from pneumoscan.inference.model import open_session

    session, _ = open_session(onnx_path, "cpu", cache=False)
    with torch.no_grad():
        reference = dict(zip(OUTPUTS, (t.numpy() for t in module(torch.from_numpy(batch)))))
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"input": batch})))
    for outputs in (reference, got):
        outputs["probabilities"] = softmax(outputs["logits"])
        n_images, n_classes = outputs["cams"].shape[:2]
        outputs["normalised_cams"] = np.stack(
            [normalised_cams(outputs["cams"], np.full(n_images, k)) for k in range(n_classes)])
    return {name: float(np.abs(reference[name] - got[name]).max()) for name in reference}


def split_images(checkpoint: Path, payload: dict, part: str) -> list[Path]:
    """The checkpoint's own `part` ("train" or "val") images, those still there: from the
    split.json that training wrote beside it (or in its configured output folder)."""
    from pneumoscan.modelling.scope_guard import read_split

    for folder in (Path(checkpoint).parent, Path(payload["config"]["out"])):
        split = folder / "split.json"
        if split.exists():
            return read_split(split)[part == "val"]
    return []


def folder_images(folder: Path) -> list[Path]:
    from pneumoscan.inputs.discover import discover

    return [f.path for f in discover(folder) if f.kind is not None]


def spread(paths: list[Path], count: int) -> list[Path]:
    """`count` of `paths`, evenly spaced (sorted lists: every class is represented)."""
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def parity_images(checkpoint: Path, payload: dict, check_images: Path | None,
                  count: int = 8) -> list[Path]:
    """Real images for the parity check: the given folder, else the checkpoint's own
    validation split when its files are still there."""
    found = folder_images(check_images) if check_images is not None \
        else split_images(checkpoint, payload, "val")
    if not found:
        raise ExportError("no real images for the parity check: pass --check-images FOLDER")
    return spread(found, count)


def export_checkpoint(checkpoint: Path, out: Path, check_images: Path | None = None,
                      version: str | None = None, name: str | None = None,
                      log=print, scope_split: Path | None = None,
                      scope_guard: bool = True,
                      scope_train_images: int | None = None,
                      scope_view: str = "stored") -> dict[str, float]:
    """Export, then verify on real images; raises ExportError past PARITY_LIMITS. Then
    fit the scope guard on the checkpoint's training images and set its threshold on its
    validation images (the split.json beside it, or `scope_split`)."""
    import torch

    from pneumoscan.inference.pipeline import read_model_input
    from pneumoscan.modelling.checkpoint import checkpoint_model_info, load_network, model_metadata
    from pneumoscan.records import FileResult

    network, payload = load_network(checkpoint)
    info = checkpoint_model_info(checkpoint, payload)
    module = export_module(network)
    prep = info.preprocessing
    tensors = [read_model_input(path, prep)
               for path in parity_images(checkpoint, payload, check_images)]
    images = [tensor for tensor in tensors if not isinstance(tensor, FileResult)]
    if not images:
        raise ExportError("none of the parity-check images could be read")
    batch = np.stack(images)
    version = version or datetime.now(timezone.utc).strftime("%Y.%m.%d")
    name = name or export_name(checkpoint, payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**model_metadata(payload, version, name),
                "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_onnx(module, torch.from_numpy(batch[:2]), out, metadata)
    diffs = check_parity(module, out, batch)
    log(f"parity on {len(batch)} real images, max abs difference: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    # A calibration temperature T < 1 multiplies the logits, and their float error, by 1/T;
    # the logits gate is on the network's own scale (probabilities stay gated as they are).
    temperature = payload.get("calibration", {}).get("temperature", 1.0)
    limits = {**PARITY_LIMITS, "logits": PARITY_LIMITS["logits"] / min(1.0, temperature)}
    failed = [f"{name} {diffs[name]:.2e} (limit {limit:g})"
              for name, limit in limits.items() if diffs[name] >= limit]
    if failed:
        out.unlink()
        raise ExportError(f"ONNX Runtime differs from PyTorch: {', '.join(failed)}; "
                          "model not written")
    if scope_guard:
        fit_checkpoint_scope_guard(checkpoint, payload, out, scope_split, scope_train_images,
                                   log, scope_view)
    return diffs


def fit_checkpoint_scope_guard(checkpoint: Path, payload: dict, out: Path,
                               scope_split: Path | None, max_train: int | None,
                               log, view: str = "stored") -> None:
    from pneumoscan.modelling.scope_guard import ScopeFitError, fit_scope_guard, read_split

    try:
        if scope_split is not None:
            train, val = read_split(scope_split)
        else:
            train, val = (split_images(checkpoint, payload, part) for part in ("train", "val"))
        if not train or not val:
            raise ScopeFitError("the checkpoint's training and validation images are not "
                                "there (split.json): pass --scope-split FILE, or "
                                "--no-scope-guard")
        fit_scope_guard(out, train, val, log=log, max_train=max_train, view=view)
    except ScopeFitError as exc:
        out.unlink()
        raise ExportError(f"scope guard: {exc}; model not written") from exc
