"""Small reference CNNs to prepare variants from.

They are plain ``nn.Sequential`` stacks of Conv-BN-ReLU blocks and a final ``classifier``
Linear, which Torch-Pruning's dependency graph handles without custom pruners and both ONNX
exporters turn into Conv (BatchNorm folded), Relu, pooling and Gemm nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU blocks, a 2x2 max-pool after the second, global average pooling.

    For 8x8 digits: ``(N, 1, 8, 8) -> 8x8 -> 8x8 -> 4x4 -> 4x4 -> (N, num_classes)``.
    Channel widths should be multiples of 8 (ONNX Runtime's convolution kernels are blocked
    by 8 on x86, and pruning keeps widths at multiples of its ``round_to``).
    """

    def __init__(
        self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError("SmallCNN takes exactly three widths")
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_block(in_channels, c1),
            *_block(c1, c2),
            nn.MaxPool2d(2),
            *_block(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_cnn(widths: Sequence[int] = (32, 64, 128), num_classes: int = 10) -> SmallCNN:
    """The reference model for :func:`prunefleet.server.prepare.prepare_digits`."""
    return SmallCNN(1, widths, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"digits_cnn": digits_cnn}


def build_model(name: str, **kwargs) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return factory(**kwargs)


def classifier_of(model: nn.Module) -> nn.Module:
    """The layer that produces the class logits: ``model.classifier``, else the last Linear."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no classifier and no Linear layer")
    return linears[-1]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- larger nets


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, a residual add (1x1 projection when shapes differ)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 layout for 32x32 inputs: 3x3 stem without max-pool, four stages of basic
    blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global average pool, Linear."""

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, c) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18_cifar(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual add
    when the stride is 1 and the widths match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expansion, channels, repeats, stride) of MobileNetV2, with CIFAR strides (32x32 input).
MOBILENETV2_CIFAR = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: depthwise convolutions, inverted residuals."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
        last_channels: int = 1280,
    ) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(8, round(c * width_mult / 8) * 8)

        c_in = w(32)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c_in, 3, 1, 1, bias=False), nn.BatchNorm2d(c_in),
            nn.ReLU6(inplace=True),
        ]
        for t, c, n, s in MOBILENETV2_CIFAR:
            for i in range(n):
                layers.append(InvertedResidual(c_in, w(c), s if i == 0 else 1, t))
                c_in = w(c)
        layers += [nn.Conv2d(c_in, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_cifar(num_classes: int = 10) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes)


class BranchyNet(nn.Module):
    """A small net with every structure pruning must keep consistent, for tests: a residual
    add, a concatenation of two branches, a depthwise and a grouped convolution."""

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        half = width // 2
        self.stem = nn.Sequential(*_block(in_channels, width))
        self.res = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.branch_a = nn.Sequential(*_block(width, half))
        self.branch_b = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),  # depthwise
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(*_block(width, width))
        self.mix = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, groups=4, bias=False),  # grouped
            nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.mix(self.fuse(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def branchy_net(in_channels: int = 1, width: int = 32, num_classes: int = 10) -> BranchyNet:
    return BranchyNet(in_channels, width, num_classes)


MODELS.update({
    "resnet18_cifar": resnet18_cifar,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "branchy_net": branchy_net,
})
