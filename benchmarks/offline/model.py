"""The source network: a small ResNet laid out like torchvision's (conv1/bn1/layer1..4/fc).

So ``surgical_optim.param_groups_by_block`` names its blocks ``stem, layer1, layer2, layer3, layer4, fc``
and the protocol can split it into stages to precompute frozen-prefix activations. One BasicBlock per
stage. The offline source model uses widths 8-16-32-64 with a stride-2 stem and a stride-1 ``layer4``
(32x32 input -> 16x16 -> 8x8 -> 4x4 -> 2x2 -> 2x2): ~80 k parameters, ~0.6 M multiply-adds per image. The
class defaults (stride-1 stem, every block stride 2, widths 16-32-64-128) are the 0.2 network: ~0.3 M
parameters, ~4 M multiply-adds.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """stem (3x3 conv, stride ``stem_stride``) -> layer1 .. layer4 (one BasicBlock each, strides ``strides``)
    -> global average pool -> fc. The defaults map 32x32 to 32, 16, 8, 4, 2 pixels."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128), stem: int = 16,
                 stem_stride: int = 1, strides: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        if len(strides) != len(widths):
            raise ValueError(f"one stride per block: {len(widths)} widths but {len(strides)} strides")
        self.conv1 = nn.Conv2d(3, stem, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        cin = stem
        for i, (w, stride) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, stride)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
