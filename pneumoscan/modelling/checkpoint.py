"""Training checkpoints (torch): rebuild the network and describe it as a ModelInfo."""

from __future__ import annotations

import json
from pathlib import Path

from pneumoscan.inference.model import (
    ModelError,
    ModelInfo,
    metadata_strings,
    model_info,
)
from pneumoscan.text import one_line


def checkpoint_globals() -> list:
    """The only classes and functions a checkpoint may name besides torch's tensors and plain
    Python values: those that pickle the NumPy random state training stores to resume
    (`np.random.get_state()`: an ndarray of uint32)."""
    import numpy as np

    try:  # NumPy 2 (numpy.core stays only as a deprecated alias)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint's payload. Unpickled with `weights_only`: a file from
    elsewhere that names any other class or function (code to run) is refused, not run."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a foreign global, or not a pickle at all
        named = [line for line in str(exc).splitlines() if "GLOBAL" in line]
        if not named:
            raise ModelError(f"cannot read checkpoint {path}: {one_line(exc)}") from exc
        raise ModelError(f"refused checkpoint {path}: it holds more than weights and plain "
                         f"values: {named[0]}") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:  # missing, not a torch file
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pneumoscan-checkpoint-1":
        raise ModelError(f"{path} is not a pneumoscan training checkpoint")
    return payload


def load_network(path: Path):
    """(network in eval mode, checkpoint payload); its logits include the calibration
    (temperature and bias) that training fitted, when it did."""
    import torch

    from pneumoscan.modelling.architectures import build_network

    payload = read_checkpoint(path)
    net = build_network(payload["arch"], num_classes=len(payload["class_names"]),
                        dropout=payload.get("dropout", 0.0), pretrained=False,
                        low_pass_sigma=payload.get("low_pass_sigma", 0.0))
    net.load_state_dict(payload["state_dict"])
    calibration = payload.get("calibration", {})
    temperature, bias = calibration.get("temperature", 1.0), calibration.get("bias", 0.0)
    # Calibration folded into the linear head: the logits become logits / T, plus bias / 2
    # for PNEUMONIA and minus bias / 2 for NORMAL, so the margin is margin / T + bias.
    shift = torch.tensor([bias / 2 if name == "PNEUMONIA" else -bias / 2
                          for name in payload["class_names"]])
    with torch.no_grad():
        net.classifier.weight /= temperature
        net.classifier.bias.copy_(net.classifier.bias / temperature + shift)
    return net.eval(), payload


def model_metadata(payload: dict, version: str, name: str | None = None) -> dict:
    """What the model exported from a checkpoint's `payload` says about itself (its ONNX
    metadata, `inference.model.model_info` reads it)."""
    from pneumoscan.modelling.torch_cam import CAM_METHOD

    metrics = payload.get("metrics") or {}
    return {
        "name": name or f"pneumoscan-{payload['arch']}",
        "version": version,
        "arch": payload["arch"],
        "class_names": list(payload["class_names"]),
        "positive_class": "PNEUMONIA",
        "threshold": repr(float(payload["threshold"])),
        "threshold_rule": f"highest threshold with validation sensitivity >= "
                          f"{payload['config'].get('min_sensitivity')}",
        "preprocessing": json.dumps(payload["preprocessing"]),
        "training_data": payload.get("data_description", ""),
        "validation_metrics": metrics,
        "trained_epochs": payload["epoch"],
        "calibration": payload.get("calibration", {"method": "none", "temperature": 1.0}),
        "outputs": {"logits": "(N, K) class logits", "features": "(N, C, h, w) last conv maps",
                    "cams": "(N, K, h, w) class activation maps"},
        "cam_method": CAM_METHOD,
    }


def checkpoint_model_info(path: Path, payload: dict, version: str | None = None) -> ModelInfo:
    """The ModelInfo of the checkpoint at `path`: that of the model exported from it."""
    metadata = model_metadata(payload, version or f"epoch{payload['epoch']}")
    return model_info(Path(path), metadata_strings(metadata))
