"""Training and fine-tuning loops, with optional knowledge distillation from a teacher.

Small data sets live in memory as tensors, so there is no DataLoader: each epoch draws a
permutation from a seeded ``torch.Generator``. Augmentation is light Gaussian noise on the
normalised input (with a random strength per sample) so that noisy inputs on a device are
still classified reasonably. Progress is a tqdm bar over epochs on stderr.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Split


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    # Noise augmentation: with probability ``noise_prob`` a sample gets N(0, s^2) noise with
    # s drawn uniformly from [0, noise_std] (in normalised units; one std of the pixels).
    noise_prob: float = 0.5
    noise_std: float = 0.5
    # Translation augmentation: with probability ``shift_prob`` move the image by up to
    # ``max_shift`` pixels in each direction, filling with the background value.
    shift_prob: float = 0.0
    max_shift: int = 1
    # Distillation (used only when a teacher is given): loss = alpha * KD + (1 - alpha) * CE.
    kd_alpha: float = 0.7
    kd_temperature: float = 4.0
    # Keep the weights of the epoch with the best validation accuracy (ties: the later one)
    # instead of the last epoch's. Off by default: on a small validation split the pick is
    # noisy, and the end of the one-cycle schedule is usually the better model.
    keep_best: bool = False


# Fine-tuning after pruning: short, with a high peak learning rate (the one-cycle schedule
# warms up to it and anneals to zero); measured on digits, 1e-3 recovers far less.
FINETUNE = TrainConfig(epochs=5, lr=1e-2)


@dataclass
class TrainResult:
    val_accuracy: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def random_shift(
    x: torch.Tensor, max_shift: int, prob: float, background: float, gen: torch.Generator
) -> torch.Tensor:
    """Translate each (N, C, H, W) image by up to ``max_shift`` pixels, with probability."""
    if prob <= 0 or max_shift <= 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=background)
    dy = torch.randint(-s, s + 1, (n,), generator=gen)
    dx = torch.randint(-s, s + 1, (n,), generator=gen)
    keep = torch.rand(n, generator=gen) >= prob
    dy[keep] = 0
    dx[keep] = 0
    out = torch.empty_like(x)
    for oy in range(-s, s + 1):
        for ox in range(-s, s + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, s + oy : s + oy + h, s + ox : s + ox + w]
    return out


def augment(
    x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, background: float = 0.0
) -> torch.Tensor:
    x = random_shift(x, cfg.max_shift, cfg.shift_prob, background, gen)
    if cfg.noise_prob <= 0 or cfg.noise_std <= 0:
        return x
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    on = torch.rand(shape, generator=gen) < cfg.noise_prob
    strength = torch.rand(shape, generator=gen) * cfg.noise_std * on
    return x + torch.randn(x.shape, generator=gen) * strength


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton et al.: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``."""
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)
    ce = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    return alpha * kd + (1 - alpha) * ce


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch: int = 512) -> np.ndarray:
    was_training = model.training
    model.eval()
    xt = torch.as_tensor(x)
    out = [model(xt[i : i + batch]) for i in range(0, len(xt), batch)]
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: np.ndarray, batch: int = 256) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``x`` (after pruning changed them).

    Pruned channels change what every following BatchNorm sees; fresh statistics alone
    recover much of the accuracy before any fine-tuning.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    xt = torch.as_tensor(x)
    for i in range(0, len(xt), batch):
        model(xt[i : i + batch])
    model.eval()
    for m, (momentum, _) in zip(bns, saved, strict=True):
        m.momentum = momentum
    return model


def accuracy(model: nn.Module, split: Split) -> float:
    return float((predict_logits(model, split.x).argmax(1) == split.y).mean())


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place (AdamW, one-cycle schedule); returns validation results.

    With a ``teacher``, the loss is :func:`distillation_loss` against the teacher's logits
    on the same (augmented) batch.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(train.x), torch.as_tensor(train.y)
    background = float(xt.min())  # the value of a blank pixel after normalisation
    n = len(yt)
    steps_per_epoch = -(-n // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    sched: torch.optim.lr_scheduler.LRScheduler
    if total_steps * 0.25 > 1:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25
        )
    else:  # OneCycleLR divides by zero when its warm-up is shorter than one step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if teacher is not None:
        teacher.eval()
    # (validation accuracy, epoch, weights) of the best epoch so far
    best: tuple[float, int, dict[str, Any] | None] = (-1.0, -1, None)
    history: list[dict] = []
    bar = tqdm(
        range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, file=sys.stderr,
        leave=False, dynamic_ncols=True,
    )
    with bar:
        for epoch in bar:
            model.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                xb = augment(xt[idx], cfg, gen, background)
                yb = yt[idx]
                logits = model(xb)
                if teacher is None:
                    loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    loss = distillation_loss(
                        logits, t_logits, yb, alpha=cfg.kd_alpha,
                        temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing,
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            val_acc = accuracy(model, val)
            history.append({"epoch": epoch + 1, "loss": total / n, "val_accuracy": val_acc})
            bar.set_postfix(loss=f"{total / n:.3f}", val=f"{val_acc:.3f}")
            if cfg.keep_best and val_acc >= best[0]:
                best = (val_acc, epoch + 1, copy.deepcopy(model.state_dict()))
    if cfg.keep_best and best[2] is not None:
        model.load_state_dict(best[2])
        val_acc, best_epoch = best[0], best[1]
    else:
        val_acc, best_epoch = (history[-1]["val_accuracy"], cfg.epochs) if history else (
            accuracy(model, val), 0
        )
    model.eval()
    return TrainResult(val_accuracy=val_acc, best_epoch=best_epoch, history=history)


def finetune(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig = FINETUNE,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> TrainResult:
    """Recover accuracy after pruning: BatchNorm recalibration, then a short :func:`fit`."""
    recalibrate_batchnorm(model, train.x)
    return fit(model, train, val, cfg, seed=seed, teacher=teacher, progress=progress, desc=desc)

