"""Pruning behind a small interface of our own: structured (Torch-Pruning) and unstructured.

Torch-Pruning builds a dependency graph of the model, so removing an output channel of a
convolution also removes the matching BatchNorm entries and input channels of the next layer:
the result is a physically smaller dense model that every runtime speeds up. Its
``BasePruner`` takes many arguments (and mutates dict defaults); this module is the only
place that talks to it, so callers see :func:`prune_structured` and nothing else.

Rules applied here on top of Torch-Pruning:

* the input model is never modified: a pruned deep copy is returned;
* the final classifier's outputs (the classes) are never pruned;
* channel counts are rounded down to multiples of ``round_to`` (8 by default: ONNX Runtime's
  x86 convolution kernels are blocked by 8, so odd widths can be *slower*), but a layer never
  drops below ``round_to`` channels (Torch-Pruning would otherwise skip such a layer or
  remove it entirely); layers with ``round_to`` channels or fewer are left alone;
* recurrent layers, ``nn.MultiheadAttention``, custom modules with parameters of their own
  and the model's own parameters are left whole, with every layer whose channels are tied
  to them (:func:`kept_whole` says which and why); a Torch-Pruning failure is a
  :class:`PruningError`, never a traceback;
* attention with q/k/v Linear layers and a ``num_heads`` attribute loses whole heads.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruningError
from .models import classifier_of

ImportanceName = Literal["magnitude", "random"]

_PRUNABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
PrunableLayer = nn.Conv2d | nn.Conv1d | nn.Linear


def make_importance(importance: ImportanceName | tp.importance.Importance) -> object:
    """Map a criterion name to a Torch-Pruning importance estimator."""
    if not isinstance(importance, str):
        return importance
    if importance == "magnitude":
        # Group L2 norm over all weights coupled to a channel (conv, BN, next layer's inputs).
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "random":
        return tp.importance.RandomImportance()
    raise PruningError(f"unknown importance {importance!r}; use 'magnitude' or 'random'")


def out_channels(module: PrunableLayer) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every convolution and linear layer, by module name."""
    return {
        name: out_channels(m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE)
    }


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups == m.out_channels > 1


def _layer_ratio(
    channels: int, ratio: float, round_to: int | None, groups: int = 1
) -> float | None:
    """The ratio to ask Torch-Pruning for so that the kept width is a multiple of
    ``round_to`` (and of ``groups``) and at least that multiple. ``None``: leave it alone.
    """
    step = math.lcm(round_to or 1, groups)
    if channels <= step:
        return None
    kept = int(channels * (1 - ratio) + 1e-9)
    kept = max(step, kept - kept % step)
    if kept >= channels:
        return None
    # Torch-Pruning keeps int(channels * (1 - r)) per group: the half channel guards
    # against float rounding.
    return 1 - (kept + 0.5) / channels


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and round_to < 1:
        raise PruningError(f"round_to must be a positive integer or None, got {round_to}")


def _output_shape(model: nn.Module, example_input: torch.Tensor) -> torch.Size:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape = model(example_input).shape
    model.train(was_training)
    return shape


def _ignored_names(model: nn.Module, ignored_layers: Iterable[nn.Module] | None) -> set[str]:
    names = {id(m): name for name, m in model.named_modules()}
    ignored = {names[id(classifier_of(model))]}
    for layer in ignored_layers or ():
        if id(layer) not in names:
            raise PruningError(f"ignored layer {type(layer).__name__} is not part of the model")
        ignored.add(names[id(layer)])
    return ignored


# --------------------------------------------------------------------------- left whole
# Torch-Pruning treats a module it has no pruner for as an element-wise operation: channels
# pass through unchanged. That is wrong for a recurrent layer (input_size -> hidden_size,
# gates stacked in its weights) and unknowable for a custom module with parameters of its
# own, and it ends in an IndexError deep in Torch-Pruning or in a model that no longer runs.
# Such layers are registered with a pruner that only reports their widths, kept out of every
# group, and every layer whose channels would change their inputs or outputs keeps its
# channels too.


@dataclass(frozen=True)
class KeptWhole:
    """A layer structured pruning leaves as it is, and why."""

    layer: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"layer": self.layer, "reason": self.reason}


_KNOWN_TYPES = tuple(
    cls for cls in (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
                    nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.PReLU, nn.Embedding)
)
_ATTENTION_NAMES = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


class _Whole(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's view of a layer kept whole: its widths, and no way to change them."""

    def __init__(self, widths: dict[int, tuple[int | None, int | None]]) -> None:
        super().__init__()
        self.widths = widths  # id(module) -> (in, out)

    # Two distinct methods: Torch-Pruning tells input from output pruning by identity.
    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise PruningError(f"internal: the outputs of {type(layer).__name__} are kept whole")

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise PruningError(f"internal: the inputs of {type(layer).__name__} are kept whole")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.widths.get(id(layer), (None, None))[1]

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self.widths.get(id(layer), (None, None))[0]


class _Opaque(torch.autograd.Function):
    """Runs a kept layer as one autograd node: Torch-Pruning traces modules through the
    autograd graph and would otherwise walk into the layer's own operations (a GRU's gate
    chunks end in an IndexError in its index mapping)."""

    @staticmethod
    def forward(ctx, run, *args):
        return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(None for _ in range(len(ctx.needs_input_grad) - 1)))


@contextlib.contextmanager
def _opaque(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While tracing, each of ``modules`` is one node from its inputs to its outputs."""
    patched: list[tuple[nn.Module, Any]] = []
    for m in modules:
        original = m.forward

        def forward(*args, _original=original, **kwargs):
            return _Opaque.apply(lambda *a: _original(*a, **kwargs), *args)

        patched.append((m, m.__dict__.get("forward")))
        m.forward = forward
    try:
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward  # the class's forward again
            else:
                m.forward = own


def _owns_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or \
        any(True for _ in m.buffers(recurse=False))


def whole_layers(model: nn.Module) -> dict[str, str]:
    """Layers structured pruning must leave whole, by name, with the reason.

    Recurrent layers (GRU, LSTM, RNN and their cells): no pruner removes their hidden units
    here. Multi-head attention as ``nn.MultiheadAttention``: Torch-Pruning narrows its width
    but cannot drop whole heads. Any other module with parameters or buffers of its own that
    Torch-Pruning does not know (a custom layer): how its entries map to channels is unknown.
    The model itself may own parameters (a class token, a position table); those are handled
    as parameters, see :func:`_whole_parameters`.
    """
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(k + ".") for k in out):
            continue
        kind = type(m).__name__
        if isinstance(m, nn.RNNBase | nn.RNNCellBase):
            out[name] = (f"recurrent layer ({kind}): its hidden units and gates are not "
                         "pruned; left whole")
        elif isinstance(m, nn.MultiheadAttention):
            out[name] = (f"attention ({kind}): Torch-Pruning 1.6 narrows it but cannot remove "
                         "whole heads; left whole (write attention with q/k/v Linear layers "
                         "and a num_heads attribute to prune it by heads)")
        elif _owns_state(m) and not isinstance(m, _KNOWN_TYPES):
            what = ("custom module" if not type(m).__module__.startswith("torch.")
                    else "layer Torch-Pruning has no pruner for")
            out[name] = (f"{what} ({kind}) with parameters of its own: which of its "
                         "entries belong to which channel is unknown; left whole")
    return out


def _whole_parameters(model: nn.Module, whole: Mapping[str, str]) -> dict[str, nn.Parameter]:
    """Parameters owned directly by a module with prunable children (usually the model): a
    position table or class token Torch-Pruning would cut along its last dimension."""
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if name in whole or any(name.startswith(k + ".") for k in whole):
            continue
        if isinstance(m, _KNOWN_TYPES):
            continue
        for pname, p in m.named_parameters(recurse=False):
            out[f"{name}.{pname}" if name else pname] = p
    return out


def _widths(model: nn.Module, modules: Iterable[nn.Module], example_input: torch.Tensor
            ) -> dict[int, tuple[int | None, int | None]]:
    """(input, output) width of each module, as Torch-Pruning counts them."""
    widths: dict[int, tuple[int | None, int | None]] = {}
    hooks = []

    def first(t: object) -> torch.Tensor | None:
        if isinstance(t, torch.Tensor):
            return t
        if isinstance(t, tuple | list):
            for item in t:
                found = first(item)
                if found is not None:
                    return found
        return None

    def width(t: torch.Tensor | None, recurrent: bool) -> int | None:
        if t is None or t.dim() < 2:
            return None
        return int(t.shape[-1] if recurrent or t.dim() == 3 else t.shape[1])

    def hook(m: nn.Module, args: tuple, out: object) -> None:
        rec = isinstance(m, nn.RNNBase | nn.RNNCellBase)
        widths[id(m)] = (width(first(args), rec), width(first(out), rec))

    for m in modules:
        hooks.append(m.register_forward_hook(hook))
    try:
        _output_shape(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return widths


def _attention(model: nn.Module) -> list[tuple[str, nn.Module, tuple[nn.Linear, ...]]]:
    """Attention modules whose heads can be pruned: a ``num_heads`` (or
    ``num_attention_heads``) attribute and separate q/k/v Linear layers of equal width."""
    found: list[tuple[str, nn.Module, tuple[nn.Linear, ...]]] = []
    for name, m in model.named_modules():
        heads = getattr(m, "num_heads", getattr(m, "num_attention_heads", None))
        if not isinstance(heads, int) or heads < 2 or isinstance(m, nn.MultiheadAttention):
            continue
        for names in _ATTENTION_NAMES:
            qkv = tuple(x for n in names if isinstance(x := getattr(m, n, None), nn.Linear))
            if len(qkv) == 3:
                if len({x.out_features for x in qkv}) == 1 and qkv[0].out_features % heads == 0:
                    found.append((name, m, qkv))
                break
    return found


def attention_heads(model: nn.Module) -> dict[str, int]:
    """Heads of each attention module whose heads pruning can remove, by name."""
    return {name: int(getattr(m, "num_heads", getattr(m, "num_attention_heads", 0)))
            for name, m, _ in _attention(model)}


def _set_heads(m: nn.Module, heads: int, q: nn.Linear) -> None:
    """Tell an attention module how many heads it has left (its forward reads these)."""
    values = {"num_heads": heads, "num_attention_heads": heads,
              "head_dim": q.out_features // heads,
              "attention_head_size": q.out_features // heads, "all_head_size": q.out_features}
    for attr, value in values.items():
        if hasattr(m, attr):
            setattr(m, attr, value)


def _last_non_singleton(p: torch.Tensor) -> int | None:
    dims = [i for i, s in enumerate(p.shape) if s > 1]
    return dims[-1] if dims else None


_ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass
class _GraphSetup:
    """What a Torch-Pruning graph of one model needs to leave the right layers whole."""

    whole: dict[str, str]  # layer name -> reason
    params: dict[str, nn.Parameter]  # the model's own parameters, kept whole
    kept_modules: list[nn.Module]
    customized: dict[Any, Any]
    unwrapped: list[tuple[nn.Parameter, int]]
    names: dict[int, str]  # id of a kept module or parameter -> name

    @classmethod
    def of(cls, model: nn.Module, example_input: torch.Tensor) -> _GraphSetup:
        whole = whole_layers(model)
        params = _whole_parameters(model, whole)
        modules = dict(model.named_modules())
        kept = [modules[n] for n in whole]
        pruner = _Whole(_widths(model, kept, example_input) if kept else {})
        customized: dict[Any, Any] = {type(m): pruner for m in kept}
        unwrapped = [(p, d) for p in params.values()
                     if (d := _last_non_singleton(p)) is not None]
        names = {id(modules[n]): n for n in whole} | {id(p): n for n, p in params.items()}
        return cls(whole, params, kept, customized, unwrapped, names)

    def inside_whole(self, name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in self.whole)

    def graph(self, model: nn.Module, example_input: torch.Tensor) -> Any:
        with _opaque(self.kept_modules):
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input,
                customized_pruners=self.customized or None,
                unwrapped_parameters=self.unwrapped or None)

    def coupled_roots(self, graph: Any, ignored: list[nn.Module]) -> dict[nn.Module, str]:
        """Group roots whose pruning would change a kept layer or parameter: they keep
        their channels too."""
        kept = {id(m) for m in self.kept_modules} | {id(p) for p in self.params.values()}
        if not kept:
            return {}
        roots: dict[nn.Module, str] = {}
        skip = {id(m) for m in ignored}
        for root in list(graph.module2node):
            # Every layer's group, also those Torch-Pruning would skip (a kept layer's
            # outputs in them): the report names all the layers that keep their channels.
            if not isinstance(root, _ROOT_TYPES) or id(root) in skip or root in roots:
                continue
            fn = graph.get_pruner_of_module(root)
            if fn is None or not fn.get_out_channels(root):
                continue
            group = graph.get_pruning_group(root, fn.prune_out_channels,
                                            list(range(fn.get_out_channels(root))))
            for dep, _ in group:
                target = dep.target.module
                if id(target) not in kept:
                    continue
                feeds = graph.is_in_channel_pruning_fn(dep.handler)
                name = self.names[id(target)]
                # Every layer whose output channels this group would remove keeps them.
                for d, _ in group:
                    m = d.target.module
                    if (isinstance(m, _PRUNABLE) and id(m) not in kept
                            and graph.is_out_channel_pruning_fn(d.handler)):
                        how = "its outputs feed" if feeds and m is root else \
                            "its channels are tied to"
                        roots.setdefault(m, f"{how} {name}, which is left whole")
                break
        return roots


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float | Mapping[str, float],
    round_to: int | None = 8,
    ignored_layers: Iterable[nn.Module] | None = None,
    *,
    importance: ImportanceName | tp.importance.Importance = "magnitude",
) -> nn.Module:
    """Return a copy of ``model`` with whole channels removed (physically smaller).

    ``ratio`` is the share of output channels removed from every prunable layer (0.5 keeps
    half; layers are pruned independently, not ranked globally), or a mapping from layer
    name (as in ``named_modules``; the root of a coupled group, see :func:`channel_groups`)
    to that layer's ratio, other layers kept whole. Coupled layers (residual adds,
    concatenations, depthwise convolutions) lose the same channels. ``ignored_layers`` are
    modules *of the given model* that keep their outputs; the classifier is always among
    them. ``importance`` ranks the channels: ``"magnitude"`` (group L2 norm) or ``"random"``
    (a baseline), or any Torch-Pruning importance object.

    Layers this cannot narrow (recurrent layers, custom modules with parameters of their
    own, ``nn.MultiheadAttention``; :func:`whole_layers`) are left whole, and so is every
    layer whose channels are tied to theirs (:func:`kept_whole` lists them with the reason).
    Attention written with q/k/v Linear layers and a ``num_heads`` attribute loses whole
    heads (the same share), never the width of a head.

    The returned model is in eval mode and computes the same output shape as ``model``.
    """
    per_layer: dict[str, float] | None
    if isinstance(ratio, Mapping):
        per_layer, uniform = dict(ratio), 0.0
    else:
        per_layer, uniform = None, float(ratio)
    ratios = list(per_layer.values()) if per_layer is not None else [uniform]
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise PruningError(f"pruning ratio must be in [0, 1), got {r}")
    _check_round_to(round_to)
    example_input = example_input.detach()
    expected_shape = _output_shape(model, example_input)
    ignored_names = _ignored_names(model, ignored_layers)
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    if per_layer is not None:
        unknown = sorted(set(per_layer) - set(modules))
        if unknown:
            raise PruningError(f"no layer named {unknown[0]!r} in the model")
    ignored = [modules[n] for n in sorted(ignored_names)]
    if all(r == 0.0 for r in ratios):
        return pruned
    setup = _GraphSetup.of(pruned, example_input)

    def wanted(name: str) -> float:
        return per_layer.get(name, 0.0) if per_layer is not None else uniform

    # Torch-Pruning's own round_to miscounts grouped convolutions; the exact per-layer ratios
    # computed here give widths that are multiples of round_to (and of the groups) instead.
    ratio_dict: dict[nn.Module, float] = {}
    for name, m in pruned.named_modules():
        if (not isinstance(m, _PRUNABLE) or name in ignored_names or _is_depthwise(m)
                or setup.inside_whole(name)):
            continue
        if wanted(name) <= 0:
            continue
        layer_ratio = _layer_ratio(out_channels(m), wanted(name), round_to,
                                   getattr(m, "groups", 1))
        if layer_ratio is None:
            ignored.append(m)
        else:
            ratio_dict[m] = layer_ratio

    # Attention: whole heads go (the share asked of its q/k/v layers), at least one stays.
    num_heads: dict[nn.Module, int] = {}
    head_ratios: dict[nn.Module, float] = {}
    attention = [a for a in _attention(pruned) if not setup.inside_whole(a[0])]
    for name, m, qkv in attention:
        heads = int(getattr(m, "num_heads", getattr(m, "num_attention_heads", 0)))
        share = max(wanted(f"{name}.{n}" if name else n)
                    for n in (k for k, v in m.named_children() if v in qkv))
        keep = max(1, int(heads * (1 - share) + 1e-9))
        for layer in qkv:
            # Torch-Pruning prunes heads only in a group with a width target; with
            # prune_head_dims=False that target removes no width of its own.
            ratio_dict.pop(layer, None)
            num_heads[layer] = heads
            if keep < heads:
                head_ratios[layer] = ratio_dict[layer] = (heads - keep - 0.5) / heads

    try:
        with _opaque(setup.kept_modules):
            pruner = tp.pruner.BasePruner(
                pruned,
                example_input,
                importance=make_importance(importance),
                pruning_ratio=0.0,
                pruning_ratio_dict=ratio_dict,
                ignored_layers=ignored + setup.kept_modules,
                round_to=None,
                global_pruning=False,
                in_channel_groups={},
                out_channel_groups={},
                num_heads=num_heads,
                prune_num_heads=bool(head_ratios),
                prune_head_dims=False,
                head_pruning_ratio=0.0,
                head_pruning_ratio_dict=head_ratios or None,
                channel_groups={},
                customized_pruners=setup.customized,
                unwrapped_parameters=setup.unwrapped,
                root_module_types=list(_ROOT_TYPES),
            )
        coupled = setup.coupled_roots(pruner.DG, pruner.ignored_layers)
        pruner.ignored_layers.extend(coupled)
        pruner.step()
    except PruningError:
        raise
    except Exception as e:  # a Torch-Pruning traceback is not an answer for the operator
        raise PruningError(f"Torch-Pruning could not prune {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e
    for _, m, qkv in attention:
        _set_heads(m, pruner.num_heads[qkv[0]], qkv[0])
    pruned.eval()
    for name, m in pruned.named_modules():
        if isinstance(m, _PRUNABLE) and out_channels(m) == 0:
            raise PruningError(f"pruning removed every channel of {name}")
    try:
        shape = _output_shape(pruned, example_input)
    except Exception as e:
        raise PruningError(f"the pruned {type(model).__name__} no longer runs "
                           f"({type(e).__name__}: {e}); a layer the dependency graph does "
                           "not see may need to be kept whole (ignored_layers)") from e
    if shape != expected_shape:
        raise PruningError(f"pruning changed the output shape {tuple(expected_shape)} to "
                           f"{tuple(shape)}")
    return pruned


def kept_whole(
    model: nn.Module, example_input: torch.Tensor,
    ignored_layers: Iterable[nn.Module] | None = None,
) -> list[KeptWhole]:
    """The layers (and parameters) :func:`prune_structured` leaves whole because it cannot
    narrow them, or because their channels are tied to such a layer, with the reason."""
    model = model.eval()
    setup = _GraphSetup.of(model, example_input.detach())
    if not setup.whole and not setup.params:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules()
               if n in _ignored_names(model, ignored_layers)] + setup.kept_modules
    try:
        graph = setup.graph(model, example_input.detach())
        coupled = setup.coupled_roots(graph, ignored)
    except Exception as e:
        raise PruningError(f"Torch-Pruning could not trace {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e
    out = [KeptWhole(n, r) for n, r in setup.whole.items()]
    out += [KeptWhole(n, "a parameter of the model itself, used outside any layer pruning "
                         "knows (a position table, a token); left whole")
            for n in setup.params]
    out += [KeptWhole(names[id(m)], r) for m, r in coupled.items()]
    return out


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels must be removed together; named by their root layer."""

    root: str
    channels: int
    layers: tuple[str, ...]


def channel_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    round_to: int | None = 8,
    ignored_layers: Iterable[nn.Module] | None = None,
) -> list[ChannelGroup]:
    """The prunable coupled groups of ``model`` (what sensitivity analysis scans)."""
    ignored_names = _ignored_names(model, ignored_layers)
    names = {m: n for n, m in model.named_modules()}
    model = model.eval()
    setup = _GraphSetup.of(model, example_input.detach())
    ignored = [m for m, n in names.items() if n in ignored_names] + setup.kept_modules
    try:
        graph = setup.graph(model, example_input.detach())
        ignored += list(setup.coupled_roots(graph, ignored))
        all_groups = list(graph.get_all_groups(ignored_layers=ignored,
                                               root_module_types=list(_ROOT_TYPES)))
    except Exception as e:
        raise PruningError(f"Torch-Pruning could not trace {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e
    groups = []
    for group in all_groups:
        layers: list[PrunableLayer] = []
        for dep, _ in group:
            for m in (dep.source.module, dep.target.module):
                if isinstance(m, _PRUNABLE) and m in names and m not in layers:
                    layers.append(m)
        # Name the group by a layer whose outputs it prunes (a depthwise conv follows them).
        producers = [m for m in layers if not _is_depthwise(m) and m not in ignored
                     and out_channels(m) == out_channels(group[0].dep.target.module)]
        if not producers:
            continue
        root = producers[0]
        if out_channels(root) <= (round_to or 1):
            continue
        groups.append(ChannelGroup(names[root], out_channels(root),
                                   tuple(names[m] for m in layers)))
    return groups


def ratio_for_macs(
    count: Callable[[float], int], dense_macs: int, macs_ratio: float, *, tol: float = 0.005,
    max_iter: int = 14,
) -> float:
    """The smallest uniform channel ratio whose model keeps at most ``macs_ratio`` of the MACs.

    ``count(ratio)`` prunes at ``ratio`` and returns the MACs (a bisection; rounding to
    multiples of ``round_to`` makes the curve a staircase, so the result is the first step
    at or below the target).
    """
    if not 0.0 < macs_ratio < 1.0:
        raise PruningError(f"macs_ratio must be in (0, 1), got {macs_ratio}")
    lo, hi = 0.0, 0.99
    if count(hi) > macs_ratio * dense_macs:
        raise PruningError(f"cannot keep only {macs_ratio:.0%} of the MACs by removing channels "
                           "(layers keep at least round_to channels)")
    for _ in range(max_iter):
        if hi - lo < tol:
            break
        mid = (lo + hi) / 2
        if count(mid) <= macs_ratio * dense_macs:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- unstructured


def prunable_weights(model: nn.Module) -> list[tuple[str, PrunableLayer]]:
    """Convolution and linear layers whose ``weight`` unstructured pruning may zero."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def prune_magnitude(
    model: nn.Module, ratio: float, scope: Literal["global", "layer"] = "global"
) -> nn.Module:
    """Return a copy of ``model`` with ``ratio`` of its conv/linear weights set to zero.

    The weights of smallest magnitude go, ranked over the whole model (``"global"``) or
    within each layer (``"layer"``); biases and normalisation parameters are never touched.
    The zeros are kept by a mask (``torch.nn.utils.prune``), so fine-tuning cannot revive
    them; call :func:`finalize_masks` before export. The tensors keep their shapes: no
    runtime runs the result faster, its gain is compressed size.
    """
    from torch.nn.utils import prune as tprune

    if not 0.0 < ratio < 1.0:
        raise PruningError(f"pruning ratio must be in (0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    layers = prunable_weights(pruned)
    if not layers:
        raise PruningError("the model has no convolution or linear weights to prune")
    if scope == "global":
        scores = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        k = round(ratio * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.min() - 1
        for _, m in layers:
            mask = m.weight.detach().abs() > threshold
            tprune.custom_from_mask(m, "weight", mask)
    elif scope == "layer":
        for _, m in layers:
            w = m.weight.detach().abs().flatten()
            k = round(ratio * w.numel())
            mask = torch.ones_like(m.weight, dtype=torch.bool)
            if k > 0:
                idx = torch.argsort(w)[:k]
                mask.view(-1)[idx] = False
            tprune.custom_from_mask(m, "weight", mask)
    else:
        raise PruningError(f"unknown scope {scope!r}; use 'global' or 'layer'")
    return pruned


def finalize_masks(model: nn.Module) -> nn.Module:
    """Make masked weights plain parameters again (zeros stay zeros)."""
    from torch.nn.utils import prune as tprune

    for _, m in prunable_weights(model):
        if tprune.is_pruned(m) and hasattr(m, "weight_mask"):
            tprune.remove(m, "weight")
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Share of conv/linear weights that are exactly zero."""
    total = zeros = 0
    for _, m in prunable_weights(model):
        w = m.weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0

