"""Rebuild a torch checkpoint from an exported EfficientNet-Lite0 ONNX model (its "twin"),
for the torch-only CAM methods (gradients) of the faithfulness benchmark when the training
checkpoint is gone (the default models have none in the repository).

The export folded every BatchNorm into its convolution (a conv bias) and the calibration
into the linear head; the twin keeps that: each BatchNorm becomes the identity carrying the
conv's bias (running_var = 1 - eps, so (x - 0) / sqrt(var + eps) = x), and the checkpoint
records no calibration, so `load_network` leaves the folded head as it is. Every conv is
found by its ONNX node name (`/features/<module path>/Conv`), which the TorchScript exporter
writes from the torch module path. An input low-pass (architectures.GaussianLowPass) is
rebuilt from its sigma, read off the kernel's taps. The twin is checked against ONNX Runtime
on real images (logits to 1e-4) before it is written.

    PYTHONPATH=$PWD python benchmarks/onnx_twin.py pneumoscan/models/default.onnx \
        --check-images ../shared/data/kermany-val-original --out /tmp/default-twin.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LOGIT_LIMIT = 1e-4
LOW_PASS_KERNEL = "net.features.low_pass.kernel"  # the exported name of its buffer


def twin_payload(onnx_path: Path) -> dict:
    import onnx
    import torch
    from onnx import numpy_helper

    from pneumoscan.modelling.architectures import build_network

    model = onnx.load(str(onnx_path))
    meta = {p.key.removeprefix("pneumoscan."): p.value for p in model.metadata_props}
    if meta.get("arch") != "efficientnet_lite0":
        raise SystemExit(f"{onnx_path}: arch {meta.get('arch')!r}, only efficientnet_lite0")
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    class_names = json.loads(meta["class_names"])
    sigma = low_pass_sigma(constants.get(LOW_PASS_KERNEL))
    net = build_network("efficientnet_lite0", num_classes=len(class_names), pretrained=False,
                        low_pass_sigma=sigma)
    modules = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    convs = [n for n in model.graph.node if n.op_type == "Conv"
             and n.name.startswith("/features/") and not n.name.startswith("/features/low_pass/")]
    for node in convs:
        path = "features." + node.name.removeprefix("/features/").removesuffix("/Conv")
        path = path.replace("/", ".")
        weight, bias = constants[node.input[1]], constants[node.input[2]]
        state[f"{path}.weight"] = torch.from_numpy(weight.copy())
        norm = batchnorm_after(path)
        eps = modules[norm].eps
        state[f"{norm}.weight"] = torch.ones(len(bias))
        state[f"{norm}.bias"] = torch.from_numpy(bias.copy())
        state[f"{norm}.running_mean"] = torch.zeros(len(bias))
        state[f"{norm}.running_var"] = torch.full((len(bias),), 1.0 - eps)
    n_trunk_convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.features.modules())
    if len(convs) != n_trunk_convs:
        raise SystemExit(f"{onnx_path}: {len(convs)} trunk convs, the torch trunk has "
                         f"{n_trunk_convs}")
    state["classifier.weight"] = torch.from_numpy(constants["net.classifier.weight"].copy())
    state["classifier.bias"] = torch.from_numpy(constants["net.classifier.bias"].copy())
    net.load_state_dict(state)
    return {
        "format": "pneumoscan-checkpoint-1",
        "arch": "efficientnet_lite0",
        "class_names": class_names,
        "state_dict": net.state_dict(),
        "low_pass_sigma": sigma,
        "threshold": float(meta["threshold"]),
        "preprocessing": json.loads(meta["preprocessing"]),
        "config": {"min_sensitivity": None, "out": str(Path(onnx_path).parent)},
        "epoch": int(meta.get("trained_epochs", 0)),
        "metrics": json.loads(meta.get("validation_metrics", "{}")),
        "data_description": f"twin of {Path(onnx_path).name} {meta.get('version', '')}",
        # no "calibration": the ONNX head already holds it
    }


def low_pass_sigma(kernel: np.ndarray | None) -> float:
    """The sigma of a Gaussian kernel (C, 1, 1, taps) from its two central taps:
    k(1) / k(0) = exp(-1 / (2 sigma^2)); 0 without a kernel."""
    if kernel is None:
        return 0.0
    taps = kernel[0].ravel()
    centre = len(taps) // 2
    # Rounded: the kernel's radius is ceil(3 sigma), which a float error could push up a tap.
    return round(float(np.sqrt(-0.5 / np.log(taps[centre + 1] / taps[centre]))), 4)


def batchnorm_after(conv_path: str) -> str:
    """The BatchNorm that follows a conv in EfficientNetLite0Trunk / MBConv."""
    parent, _, name = conv_path.rpartition(".")
    norm = {"_conv_stem": "_bn0", "_expand_conv": "_bn0", "_depthwise_conv": "_bn1",
            "_project_conv": "_bn2", "_conv_head": "_bn1"}[name]
    return f"{parent}.{norm}"


def check_twin(checkpoint: Path, onnx_path: Path, images: list[Path]) -> float:
    """Max |logit difference| between the twin (torch) and ONNX Runtime on real images."""
    import torch

    from pneumoscan.inference.model import open_session
    from pneumoscan.inference.pipeline import read_model_input
    from pneumoscan.modelling.checkpoint import checkpoint_model_info, load_network, read_checkpoint

    net, payload = load_network(checkpoint)
    prep = checkpoint_model_info(checkpoint, read_checkpoint(checkpoint)).preprocessing
    batch = np.stack([read_model_input(p, prep) for p in images])
    session, _ = open_session(onnx_path, "cpu", cache=False)
    (onnx_logits,) = session.run(["logits"], {"input": batch})
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(batch)).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())


def main() -> None:
    import torch

    from pneumoscan.modelling.export import folder_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--check-images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.save(twin_payload(args.onnx), args.out)
    images = folder_images(args.check_images)
    diff = check_twin(args.out, args.onnx, images)
    print(f"twin of {args.onnx}: max |logit difference| {diff:.2e} on {len(images)} images")
    if diff >= LOGIT_LIMIT:
        args.out.unlink()
        raise SystemExit(f"twin differs from ONNX Runtime by {diff:.2e} (limit {LOGIT_LIMIT})")


if __name__ == "__main__":
    main()
