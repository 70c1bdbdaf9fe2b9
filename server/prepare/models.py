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
