"""Training checkpoints (torch): rebuild the network and describe it as a ModelInfo."""

from __future__ import annotations

from pathlib import Path

from pneumoscan.inference.model import ModelError, ModelInfo, file_sha256
from pneumoscan.inference.preprocess import Preprocessing


def read_checkpoint(path: Path) -> dict:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pneumoscan-checkpoint-1":
        raise ModelError(f"{path} is not a pneumoscan training checkpoint")
    return payload


def load_network(path: Path):
    """(network in eval mode, checkpoint payload)."""
    from pneumoscan.modelling.architectures import build_network

    payload = read_checkpoint(path)
    net = build_network(payload["arch"], num_classes=len(payload["class_names"]),
                        dropout=payload.get("dropout", 0.0), pretrained=False)
    net.load_state_dict(payload["state_dict"])
    return net.eval(), payload


def checkpoint_model_info(path: Path, payload: dict, version: str | None = None) -> ModelInfo:
    prep = payload["preprocessing"]
    return ModelInfo(
        path=Path(path), sha256=file_sha256(path),
        name=f"pneumoscan-{payload['arch']}", version=version or f"epoch{payload['epoch']}",
        arch=payload["arch"], class_names=tuple(payload["class_names"]),
        positive_class=list(payload["class_names"]).index("PNEUMONIA"),
        threshold=float(payload["threshold"]),
        preprocessing=Preprocessing(**{**prep, "mean": tuple(prep["mean"]),
                                       "std": tuple(prep["std"])}),
    )
