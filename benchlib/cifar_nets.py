"""The CIFAR-10 networks that structured-pruning papers report on.

* ``resnet20``, ``resnet32``, ``resnet56``, ``resnet110``: the CIFAR ResNets of He et al.,
  "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2: a 3x3 conv with 16
  filters, then three stages of ``n`` basic blocks (``n`` = 3, 5, 9, 18; depth ``6n + 2``) with
  16, 32 and 64 filters, global average pooling and a 10-way linear layer.
* ``vgg16_cifar``: the VGG-16 with batch normalization of Li et al., "Pruning Filters for
  Efficient ConvNets", ICLR 2017 (the PyTorch version in Liu et al.'s
  "rethinking-network-pruning" code): thirteen conv3x3-BN-ReLU layers, ``AvgPool2d(2)`` and the
  classifier Linear(512, 512) -> BatchNorm1d -> ReLU -> Linear(512, 10); 14,987,722 params.

The residual shortcut is **option A** of the paper: parameter-free. Where a stage halves the
resolution and doubles the width, the shortcut subsamples with stride 2 and zero-pads the new
channels (:class:`PadShortcut`). Option A is what the paper's CIFAR numbers use and what the
reference code of FPGM (He et al., CVPR 2019) and HRank (Lin et al., CVPR 2020) builds, so the
parameter and FLOP counts match those every CIFAR pruning paper compares to (ResNet-56:
853,018 params, 125.5 M MACs). Option B (1x1 projection convs) would add parameters that the
papers' baselines do not have.

Weights are randomly initialised (Kaiming-normal convs, fan-out, as in the reference code).
The networks take any input size; ``vgg16_cifar`` needs 32 to 63 pixels because its classifier
takes exactly 512 features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "VGGCifar",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_cifar",
]

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample with ``stride``, then zero-pad the new channels.

    Output channel ``pad_before + i`` is input channel ``i``; the ``pad_before`` channels in
    front and the ``pad_after`` channels behind are zeros (split as in the FPGM/HRank code).
    A named module rather than a lambda so that it pickles and traces (torch.fx, torch.jit).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels or stride < 1:
            raise ValueError(f"PadShortcut({in_channels}, {out_channels}, {stride}): bad shape")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (He et al. 2016, Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = PadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu2(out + self.shortcut(x))
        return out


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: three stages of ``blocks_per_stage`` blocks, widths 16/32/64."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Sequential] = []
        in_channels = 16
        for index, width in enumerate((16, 32, 64)):
            blocks: list[nn.Module] = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        logits: torch.Tensor = self.fc(self.flatten(self.avgpool(x)))
        return logits


class VGGCifar(nn.Module):
    """VGG with BatchNorm for CIFAR after Li et al. 2017; ``cfg`` lists widths and "M" pools."""

    def __init__(self, cfg: tuple[int | str, ...] = VGG16_CFG, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        # The reference code's initialisation: normal(0, sqrt(2 / (k * k * out))) convs,
        # BN scale 0.5, linear normal(0, 0.01).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 0.5)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        logits: torch.Tensor = self.classifier(x)
        return logits


def resnet20() -> CifarResNet:
    """ResNet-20 for CIFAR-10 (n = 3), 269,722 params."""
    return CifarResNet(3)


def resnet32() -> CifarResNet:
    """ResNet-32 for CIFAR-10 (n = 5), 464,154 params."""
    return CifarResNet(5)


def resnet56() -> CifarResNet:
    """ResNet-56 for CIFAR-10 (n = 9), 853,018 params."""
    return CifarResNet(9)


def resnet110() -> CifarResNet:
    """ResNet-110 for CIFAR-10 (n = 18), 1,727,962 params."""
    return CifarResNet(18)


def vgg16_cifar() -> VGGCifar:
    """VGG-16 with BatchNorm for CIFAR-10 (Li et al. 2017), 14,987,722 params."""
    return VGGCifar(VGG16_CFG)
