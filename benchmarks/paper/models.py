"""Source-model architectures and loaders for the paper harness (``python -m benchmarks.paper``).

* ``resnet26``  - CIFAR ResNet of depth 6n+2 with n = 4 (the paper's ResNet-26): ``conv1``/``bn1`` stem,
  stages ``layer1``..``layer3`` of 4 basic blocks (16k, 32k, 64k channels, ``width`` k), ``fc``.
  Inputs in [0, 1]; ``conv1`` normalises them with the CIFAR-10 mean/std (buffers, no parameters).
* ``wrn28_10``  - WideResNet-28-10 with the module names of RobustBench's ``WideResNet`` (``conv1``,
  ``block1..3.layer.i.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so RobustBench's "Standard"
  CIFAR-10 checkpoint loads into it (``load_checkpoint``); inputs in [0, 1], no normalisation (as RobustBench).
* ``resnet50``  - torchvision's ResNet-50; ImageNet weights are read from the local torch hub cache only
  (``<torch hub dir>/checkpoints/resnet50-0676ba61.pth``, the IMAGENET1K_V1 weights); nothing is downloaded.
* ``tiny_cnn``  - a three-block CNN for tests and smoke runs.

``paper_block_matcher(arch)`` gives the paper's block split as a ``surgical_optim`` matcher (a callable
parameter name -> block name), so ``param_groups_by_block(model, matcher)`` yields exactly:

* CIFAR (resnet26, wrn28_10): ``block1`` (conv1 + first stage) | ``block2`` | ``block3`` (with a final norm)
  | ``fc``;
* ImageNet (resnet50): ``layer1`` (conv1 + bn1 + layer1) | ``layer2`` | ``layer3`` | ``layer4`` | ``fc``;
* tiny_cnn: ``layer1`` (conv1 + bn1 + layer1) | ``layer2`` | ``fc``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "build_model",
    "ARCHS",
    "ResNetCifar",
    "WideResNet",
    "TinyCNN",
    "load_checkpoint",
    "CheckpointMismatch",
    "imagenet_resnet50_weights_path",
    "Normalize",
    "paper_block_matcher",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):  # kept for users who wrap other models
    """Channel-wise (x - mean) / std as buffers (no parameters: invisible to the block split)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class NormalizedConv2d(nn.Conv2d):
    """A Conv2d that first normalises its input with the CIFAR-10 mean/std (non-persistent buffers)."""

    def __init__(self, *args, mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return super().forward((x - self.mean) / self.std)


# ---------------------------------------------------------------------------------------------- ResNet-26
class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 26, width: int = 1, num_classes: int = 10, normalize: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        # the input normalisation lives inside conv1 so that the model keeps torchvision's ResNet layout
        # (conv1, bn1, layer1.., fc), which lets benchmarks.protocol precompute frozen prefixes
        self.conv1 = NormalizedConv2d(3, 16, 3, 1, 1, bias=False) if normalize else nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (c, s) in enumerate(zip(w, (1, 2, 2)), 1):
            layers = []
            for j in range(n):
                layers.append(_Basic(cin, c, s if j == 0 else 1))
                cin = c
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------- WRN-28-10
class _WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        skip = x if self.equal_in_out else self.convShortcut(pre)
        return skip + out


class _WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("depth must be 6n+4")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _WideStage(n, ch[0], ch[1], 1)
        self.block2 = _WideStage(n, ch[1], ch[2], 2)
        self.block3 = _WideStage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------- tiny
class TinyCNN(nn.Module):
    """torchvision-ResNet layout in miniature: conv1, bn1, relu, layer1, layer2, avgpool, fc."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------- builders
def imagenet_resnet50_weights_path() -> Path:
    """Where torchvision caches the IMAGENET1K_V1 ResNet-50 weights (the torch hub checkpoints folder)."""
    from torchvision.models import ResNet50_Weights

    fname = os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / fname


def _resnet50(num_classes: int, imagenet_init: bool) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    if imagenet_init:
        p = imagenet_resnet50_weights_path()
        if not p.is_file():
            raise FileNotFoundError(
                f"ImageNet ResNet-50 weights not found in the local torch cache: {p}. This harness does not "
                "download; on a machine with internet run `python -c \"import torchvision; "
                "torchvision.models.resnet50(weights='IMAGENET1K_V1')\"` (or copy the file there; "
                "TORCH_HOME moves the cache)."
            )
        model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    if num_classes != 1000:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


ARCHS = ("resnet26", "wrn28_10", "resnet50", "tiny_cnn")


def build_model(arch: str, num_classes: int, *, imagenet_init: bool = False, width: int = 1) -> nn.Module:
    if arch == "resnet26":
        return ResNetCifar(26, width=width, num_classes=num_classes)
    if arch == "wrn28_10":
        return WideResNet(28, 10, num_classes)
    if arch == "resnet50":
        return _resnet50(num_classes, imagenet_init)
    if arch == "tiny_cnn":
        return TinyCNN(num_classes)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


class CheckpointMismatch(ValueError):
    """A checkpoint's keys or shapes do not match the model (a different architecture or class count)."""


def _mismatch(model: nn.Module, state: dict) -> str | None:
    """One line on how ``state`` differs from ``model.state_dict()``, or None when it fits."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(want[k].shape)]
    parts = [f"{label} {len(items)} (e.g. {', '.join(items[:2])})"
             for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("shape mismatches", shapes)) if items]
    return "; ".join(parts) or None


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict saved as-is, or under 'state_dict' / 'model_state_dict' / 'model' (RobustBench and
    most training scripts), stripping a DataParallel/DDP 'module.' prefix; strict key matching
    (:class:`CheckpointMismatch` names the differences)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict):
        raise CheckpointMismatch(f"the file holds a {type(ckpt).__name__}, not a state dict")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}
    problem = _mismatch(model, state)
    if problem is not None:
        raise CheckpointMismatch(problem)
    model.load_state_dict(state, strict=True)
    return model


def _first(name: str) -> str:
    return name.split(".", 1)[0]


def _cifar_resnet_blocks(name: str) -> str:
    top = _first(name)
    if top in ("conv1", "bn1", "layer1"):
        return "block1"
    return {"layer2": "block2", "layer3": "block3"}.get(top, top)


def _wrn_blocks(name: str) -> str:
    top = _first(name)
    if top == "conv1":
        return "block1"
    if top == "bn1":
        return "block3"
    return top


def _resnet50_blocks(name: str) -> str:
    top = _first(name)
    return "layer1" if top in ("conv1", "bn1") else top


def _tiny_blocks(name: str) -> str:
    return _resnet50_blocks(name)


def paper_block_matcher(arch: str):
    """The paper's block split for ``arch`` as a callable matcher for ``surgical_optim``."""
    return {
        "resnet26": _cifar_resnet_blocks,
        "wrn28_10": _wrn_blocks,
        "resnet50": _resnet50_blocks,
        "tiny_cnn": _tiny_blocks,
    }[arch]
