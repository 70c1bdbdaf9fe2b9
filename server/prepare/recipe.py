"""Recipes: what to prepare, read from TOML and checked before any long work starts.

A recipe names a model (a factory, an optional checkpoint, the input shape), optional data,
optional training of the model before preparation, fine-tuning settings, preparation settings
and a list of ``[[variant]]`` entries. Every table forbids unknown keys. :func:`load_recipe`
parses and validates the text; :func:`resolve` imports the factory, loads the checkpoint and
runs the model once on the input shape. Both raise :class:`RecipeError` with one line that
says what is wrong and where.

Example::

    [model]
    factory = "prunefleet.server.prepare.models:digits_cnn"
    input_shape = [1, 1, 8, 8]

    [data]
    source = "digits"

    [[variant]]
    name = "struct50"
    technique = "structured"
    ratio = 0.5
    finetune_epochs = 5
    distill = true
    quantize = "int8"
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from .errors import RecipeError

Technique = Literal["none", "magnitude", "structured", "sensitivity", "random"]
STRUCTURAL = ("structured", "sensitivity", "random")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    factory: str
    input_shape: list[int] = Field(min_length=2, max_length=6)
    checkpoint: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str) -> str:
        if not _FACTORY.match(v):
            raise ValueError(f"{v!r} is not of the form 'package.module:callable'")
        return v

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every dimension must be positive, got {v}")
        if v[0] != 1:
            raise ValueError(f"the batch dimension must be 1 (latency is batch 1), got {v}")
        return v


class DataSpec(_Strict):
    """``source``: ``"digits"``, a path to an ``.npz`` file, or ``"package.module:callable"``."""

    source: str
    max_eval: int = Field(default=2048, ge=16)  # inputs used for accuracy / parity at most


class TrainSpec(_Strict):
    """Train the model from the factory before preparing it (when there is no checkpoint)."""

    epochs: int = Field(ge=1)
    lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    noise_prob: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0)
    shift_prob: float = Field(default=0.0, ge=0, le=1)


class FinetuneSpec(_Strict):
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=64, ge=1)
    kd_alpha: float = Field(default=0.7, ge=0, le=1)
    kd_temperature: float = Field(default=4.0, gt=0)
    noise_prob: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0)
    shift_prob: float = Field(default=0.0, ge=0, le=1)


class Settings(_Strict):
    """``[prepare]``: how variants are made and measured."""

    seed: int = 0
    # PyTorch threads for training and pruning. One is the safe default: on a busy 2-core
    # machine two threads spin against each other and ran digits training 4-10x slower.
    torch_threads: int = Field(default=1, ge=1, le=256)
    # Channel widths stay multiples of this; "auto": from the target's instruction set,
    # timed on the host when the host is the target (server/prepare/target.py).
    round_to: int | Literal["auto"] = Field(default=8)
    sensitivity_ratios: list[float] = Field(default=[0.25, 0.5, 0.75], min_length=1)
    # INT8 calibration inputs: a seeded random sample of the training split (all of it when
    # smaller), or generated inputs without data.
    calibration_samples: int = Field(default=256, ge=1)
    # 7-bit INT8 weights: x86 CPUs without VNNI add u8 x s8 products in saturating 16-bit
    # integers, which full 8-bit weights overflow (see quantize.py). Only a fleet known
    # to have VNNI (or ARM dot-product) gains from false.
    int8_reduce_range: bool = True
    parity_atol: float = Field(default=1e-3, gt=0)
    # INT8 is checked against the FP32 ONNX model: top-1 agreement, and the largest logit
    # difference relative to the largest FP32 logit (a bound against broken models; one
    # outlier input of a small model can reach 40%, so top-1 agreement is the real check).
    int8_rel_tol: float = Field(default=0.5, gt=0)
    int8_min_top1: float = Field(default=0.9, ge=0, le=1)
    latency_warmup: int = Field(default=20, ge=0)
    latency_runs: int = Field(default=300, ge=10)
    latency_rounds: int = Field(default=10, ge=1)

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, v: int | str) -> int | str:
        return _check_round_to(v)

    @field_validator("sensitivity_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v) or sorted(set(v)) != v:
            raise ValueError("must be increasing, distinct and in (0, 1)")
        return v


def _check_round_to(v: object) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f'must be a positive integer or "auto", got {v!r}')


class TargetSpec(_Strict):
    """``[target]``: what the variants are prepared for.

    Budgets are checked per variant and every miss is marked in the report (the variant is
    still produced: a miss on the host may be a hit on the device). ``goal = "size"``
    keeps INT8 variants that run slower than their FP32 twin (smaller artifact); with
    ``"latency"`` (the default) they are dropped, with the reason in the report.
    """

    latency_budget_ms: float | None = Field(default=None, gt=0)  # p95, batch 1
    memory_budget_mb: float | None = Field(default=None, gt=0)  # what the session adds
    max_accuracy_drop_pp: float | None = Field(default=None, ge=0, le=100)  # vs dense
    goal: Literal["latency", "size"] = "latency"


class VariantSpec(_Strict):
    name: str
    technique: Technique
    ratio: float | None = Field(default=None, gt=0, lt=1)
    macs_ratio: float | None = Field(default=None, gt=0, lt=1)
    finetune_epochs: int = Field(default=0, ge=0)
    distill: bool = False
    quantize: Literal["int8"] | None = None
    iterative_steps: int = Field(default=1, ge=1, le=50)
    scope: Literal["global", "layer"] | None = None  # magnitude only
    # structural only; default [prepare]; "auto" as there
    round_to: int | Literal["auto"] | None = None

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, v: int | str | None) -> int | str | None:
        return None if v is None else _check_round_to(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-', '.' (64 at most)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VariantSpec:
        t = self.technique
        if t == "none":
            if self.ratio is not None or self.macs_ratio is not None:
                raise ValueError("technique 'none' takes no ratio or macs_ratio")
            if self.iterative_steps != 1:
                raise ValueError("technique 'none' has no iterative steps")
        else:
            if (self.ratio is None) == (self.macs_ratio is None):
                raise ValueError(f"technique {t!r} needs exactly one of ratio, macs_ratio")
            if t == "magnitude" and self.macs_ratio is not None:
                raise ValueError("unstructured magnitude pruning keeps every MAC: use ratio")
        if self.scope is not None and t != "magnitude":
            raise ValueError("scope applies to technique 'magnitude' only")
        if self.round_to is not None and t not in STRUCTURAL:
            raise ValueError(f"round_to applies to {', '.join(STRUCTURAL)} only")
        if self.distill and self.finetune_epochs == 0:
            raise ValueError("distill needs finetune_epochs > 0")
        return self

    @property
    def needs_data(self) -> bool:
        return self.finetune_epochs > 0 or self.technique == "sensitivity"


class Recipe(_Strict):
    model: ModelSpec
    data: DataSpec | None = None
    train: TrainSpec | None = None
    finetune: FinetuneSpec = FinetuneSpec()
    prepare: Settings = Settings()
    target: TargetSpec | None = None
    variant: list[VariantSpec] = Field(min_length=1)
    # Where relative paths (checkpoint, .npz) are resolved; not a TOML key.
    base_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="after")
    def _whole(self) -> Recipe:
        names = [v.name for v in self.variant]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        if self.data is None:
            for v in self.variant:
                if v.needs_data:
                    why = "sensitivity" if v.technique == "sensitivity" else "fine-tuning"
                    raise ValueError(f"variant {v.name!r}: {why} needs a [data] table")
            if self.train is not None:
                raise ValueError("[train] needs a [data] table")
        return self

    def dense_name(self) -> str:
        """The variant every speedup is measured against (added when the recipe has none)."""
        for v in self.variant:
            if v.technique == "none" and v.quantize is None:
                return v.name
        return "dense"

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _pydantic_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(
        ".[", "["
    )
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{source}: {loc or 'recipe'}: {msg}{more}"


def parse_recipe(data: dict[str, Any], *, source: str = "recipe", base_dir: Path = Path(".")
                 ) -> Recipe:
    try:
        return Recipe.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as e:
        raise RecipeError(_pydantic_line(e, source)) from e


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a TOML recipe (no import, no model built yet)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {_one_line(e)}") from e
    if "base_dir" in data:
        raise RecipeError(f"{path}: base_dir: unknown key")
    return parse_recipe(data, source=str(path), base_dir=path.resolve().parent)


# --------------------------------------------------------------------------- resolving


def import_callable(spec: str, base_dir: Path | None = None, what: str = "factory") -> Callable:
    """Import ``"package.module:callable"``; the recipe's directory is importable too."""
    module_name, _, attr = spec.partition(":")
    added = False
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
        added = True
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RecipeError(f"{what} {spec!r} does not import: {_one_line(e)}") from e
    finally:
        if added:
            sys.path.remove(str(base_dir))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError(f"{what} {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_model(recipe: Recipe) -> nn.Module:
    """Instantiate the model, load its checkpoint, and run it once on ``input_shape``."""
    spec = recipe.model
    factory = import_callable(spec.factory, Path(recipe.base_dir))
    try:
        model = factory(**spec.kwargs)
    except Exception as e:
        raise RecipeError(f"factory {spec.factory!r} failed: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise RecipeError(f"factory {spec.factory!r} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    if spec.checkpoint:
        path = recipe.resolve_path(spec.checkpoint)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise RecipeError(f"checkpoint {str(path)!r} does not exist") from e
        except Exception as e:
            raise RecipeError(f"checkpoint {str(path)!r} does not load: {_one_line(e)}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise RecipeError(f"checkpoint {str(path)!r} does not fit the model: "
                              f"{_one_line(e)}") from e
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(spec.input_shape))
    except Exception as e:
        raise RecipeError(f"the model rejects input_shape {spec.input_shape}: "
                          f"{_one_line(e)}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(f"the model must return logits of shape (1, classes) for "
                          f"input_shape {spec.input_shape}, got {shape}")
    return model
