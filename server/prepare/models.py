"""Small reference models to prepare variants from.

The CNNs are stacks of Conv-BN-ReLU blocks and a final ``classifier`` Linear, which
Torch-Pruning's dependency graph handles without custom pruners and both ONNX exporters turn
into Conv (BatchNorm folded), Relu, pooling and Gemm nodes. ``row_gru``, ``gated_cnn`` and
``row_transformer`` hold what structured pruning cannot simply narrow (a GRU, a custom layer
with its own parameters, multi-head attention), for the rules in :mod:`.prune`.
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


# --------------------------------------------------------------------------- beyond convolutions
# Small models with layers structured pruning cannot simply narrow: a recurrent layer, a
# custom module with its own parameters, multi-head attention. For tests and as examples.


class RowGRU(nn.Module):
    """Two Conv-BN-ReLU blocks, then each image row (averaged over its width) is one step of
    a GRU; the last hidden state is classified. ``(N, C, H, W) -> (N, num_classes)``."""

    def __init__(
        self, in_channels: int = 1, width: int = 16, hidden: int = 32, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(in_channels, width), *_block(width, width))
        self.rnn = nn.GRU(width, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.features(x).mean(3).transpose(1, 2)  # (N, H, C): one step per row
        out, _ = self.rnn(rows)
        return self.classifier(out[:, -1])


def row_gru(in_channels: int = 1, width: int = 16, hidden: int = 32, num_classes: int = 10
            ) -> RowGRU:
    return RowGRU(in_channels, width, hidden, num_classes)


class ChannelGate(nn.Module):
    """A custom layer: a learned per-channel gate, ``x * sigmoid(logit)``. Its parameter is
    its own (no Conv/Linear/BatchNorm inside), so a pruning library cannot know which of its
    entries belong to which channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.full((channels,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.logit).view(1, -1, 1, 1)


class GatedCNN(nn.Module):
    """Conv-BN-ReLU, a :class:`ChannelGate`, two more blocks (a max-pool between), global
    average pooling and a classifier."""

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_block(in_channels, width))
        self.gate = ChannelGate(width)
        self.body = nn.Sequential(*_block(width, 2 * width), nn.MaxPool2d(2),
                                  *_block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.gate(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def gated_cnn(in_channels: int = 1, width: int = 16, num_classes: int = 10) -> GatedCNN:
    return GatedCNN(in_channels, width, num_classes)


class HeadAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` projections and a
    ``num_heads`` attribute the forward reads, the layout whose heads can be pruned."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)
        return self.proj(out)


class PositionalEmbedding(nn.Module):
    """A learned embedding added per position (a custom layer with its own parameter)."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class RowTransformer(nn.Module):
    """Each image row is a token: a Linear embedding, a learned position embedding, one
    pre-norm transformer block (multi-head attention and an MLP, both residual), a final
    LayerNorm, mean pooling over tokens and a classifier."""

    def __init__(
        self, in_channels: int = 1, size: int = 8, dim: int = 32, num_heads: int = 4,
        mlp: int = 64, num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels * size, dim)
        self.pos = PositionalEmbedding(size, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 1, 3).flatten(2)  # (N, H, C*W): one token per row
        h = self.pos(self.embed(tokens))
        h = h + self.attn(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.classifier(self.norm(h).mean(1))


def row_transformer(
    in_channels: int = 1, size: int = 8, dim: int = 32, num_heads: int = 4, mlp: int = 64,
    num_classes: int = 10,
) -> RowTransformer:
    return RowTransformer(in_channels, size, dim, num_heads, mlp, num_classes)


MODELS.update({
    "row_gru": row_gru,
    "gated_cnn": gated_cnn,
    "row_transformer": row_transformer,
})
