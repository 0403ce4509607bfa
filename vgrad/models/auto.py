"""Any Flax linen module, instrumented without a change to its code.

The built-in families place their delta points by hand (``Module.perturb``) and declare
their layers in a :class:`~vgrad.layers.Layout`. A module a user brings gets both from
:class:`Instrumented`, which runs the module's ``init`` and ``apply`` inside
``flax.linen.intercept_methods``: every call of a layer of :data:`LAYER_KINDS` (Dense,
DenseGeneral, Conv, ConvTranspose, Embed; a multi-head attention block through its
DenseGeneral projections) has its output passed through ``perturb("delta", y)`` on that
layer, so that the step returns delta = dL/dy per layer exactly as for the built-in
models, and, when the probes capture, sown as the layer's forward signal. The module
tree is not changed: parameters, their paths and their random initialisation are those
of the module run on its own.

:func:`discover` traces the module once (shapes only) and derives its ``Layout``: the
layers in the order they are first called (input side first), named by module path
(``conv_0``, ``blocks/Dense_0[3]``), their kernels and biases, which outputs carry delta,
and which run inside ``nn.scan`` (stacked: one leading axis over the scanned layers).

**The activation axis.** A module with a field ``act`` receives the run's activation as
a plain function ``act(z)``; each call creates a small submodule (:class:`Act`) that the
interceptor sees, so that the dead- and saturated-unit probes get f(z) and f'(z) at
every activation, as the built-in models sow them. They are recorded when the module
applies its activation once after every layer but the last (the ``hidden`` axis);
otherwise that probe is left out and the run says so.

**Supported**: layers called once each (shared layers, called twice, are refused);
``nn.remat``; ``nn.scan`` whose ``variable_axes`` include ``perturbations`` and
``intermediates`` besides ``params`` (a scanned layer whose delta would be dropped is
refused with a one-line error saying what to add); one level of scan. Per-layer
statistics cover the instrumented layers; other parameters (a normalisation layer's
scale, a user's own ``self.param``) are trained, count in the global norms and are
saved with the nearest layer's in ``grads.npz`` and ``params.npz``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgrad.errors import ConfigError
from vgrad.layers import Attention, Capture, Layout, Segment
from vgrad.models import conv
from vgrad.models.common import slopes_and_max

Array = jax.Array
Path = tuple[str, ...]

#: The layer kinds whose outputs carry delta, and the leaf name of each one's kernel.
LAYER_KINDS: dict[type, str] = {
    nn.Dense: "kernel", nn.DenseGeneral: "kernel", nn.Conv: "kernel",
    nn.ConvTranspose: "kernel", nn.Embed: "embedding",
}


class Act(nn.Module):
    """One application of the run's activation inside a user's module: ``make`` is the
    activation's module factory (``vgrad.activations``). ``train`` and ``capture`` are
    set by :class:`Instrumented`'s interceptor; with ``capture`` it sows f(z), f'(z) and
    the activation's largest slope over z in [-10, 10] (per unit, broadcast over a
    feature map's positions), as the built-in models' activations do."""

    make: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, z: Array, train: bool = False, capture: bool = False) -> Array:
        act = self.make(name="fn")
        if not capture:
            return act(z, train)
        a, slope, slope_max = slopes_and_max(act, z, train)
        self.sow("intermediates", "activation", a)
        self.sow("intermediates", "slope", slope)
        self.sow("intermediates", "slope_max", jnp.broadcast_to(slope_max, z.shape[1:]))
        return a


def act_function(make: Callable[..., nn.Module]) -> Callable[[Array], Array]:
    """The run's activation as the plain function ``act(z)`` a user's module calls (from
    a compact method: each call is a submodule)."""
    def act(z: Array) -> Array:
        return Act(make)(z)

    return act


@dataclass
class _Seen:
    path: Path
    shape: tuple[int, ...]  # a layer's output, an activation's input
    kind: str  # "layer" | "act"


def _interceptor(train: bool, capture: bool, seen: list[_Seen] | None = None) -> Callable:
    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, Act):
            if seen is not None:
                seen.append(_Seen(module.path, tuple(args[0].shape), "act"))
            return next_fun(args[0], train=train, capture=capture)
        y = _call(next_fun, args, kwargs, module, fast_conv=train)
        if type(module) in LAYER_KINDS:
            if not isinstance(y, jax.Array | jax.ShapeDtypeStruct):
                return y
            if seen is not None:
                seen.append(_Seen(module.path, tuple(y.shape), "layer"))
            if capture:
                module.sow("intermediates", "delta", y)
            y = module.perturb("delta", y)
        return y

    return intercept


def _call(next_fun: Callable, args: tuple, kwargs: dict, module: nn.Module,
          fast_conv: bool) -> Any:
    """The layer's call. In training (``fast_conv``: reverse-mode gradients only) a plain
    ``nn.Conv`` on CPU computes with ``vgrad.models.conv``'s convolution, whose gradient
    stays fast inside the training loop (through the field Flax offers for it, set for
    this call only: the module's own code and parameters are untouched); evaluation and
    the forward-mode Jacobian probe keep ``lax``'s."""
    if not (fast_conv and type(module) is nn.Conv and module.conv_general_dilated is None
            and module.conv_general_dilated_cls is None and jax.default_backend() == "cpu"):
        return next_fun(*args, **kwargs)
    object.__setattr__(module, "conv_general_dilated", conv.conv_general_dilated)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


def takes_train(module: nn.Module) -> bool:
    """Whether the module's ``__call__`` has a ``train`` argument."""
    return "train" in inspect.signature(type(module).__call__).parameters


@dataclass(frozen=True, eq=False)
class Instrumented:
    """A user's module with vgrad's delta points and captures, behind the three methods
    the engine calls (``init``, ``lazy_init``, ``apply``, each taking ``train`` and
    ``capture``). The module is called as ``net(x, train=train)`` when its ``__call__``
    takes ``train``, else ``net(x)``."""

    net: nn.Module

    def _args(self, train: bool) -> dict[str, bool]:
        return {"train": train} if takes_train(self.net) else {}

    def init(self, rngs: Any, x: Array, train: bool = False, capture: bool = False,
             **kwargs: Any) -> Any:
        with nn.intercept_methods(_interceptor(train, capture)):
            return self.net.init(rngs, x, **self._args(train), **kwargs)

    def lazy_init(self, rngs: Any, x: Any, train: bool = False, capture: bool = False,
                  **kwargs: Any) -> Any:
        with nn.intercept_methods(_interceptor(train, capture)):
            return self.net.lazy_init(rngs, x, **self._args(train), **kwargs)

    def apply(self, variables: Any, x: Array, train: bool = False, capture: bool = False,
              **kwargs: Any) -> Any:
        with nn.intercept_methods(_interceptor(train, capture)):
            return self.net.apply(variables, x, **self._args(train), **kwargs)


# --- the layout, from one trace ---------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """What one trace of a module tells: its layout, the widths of its layers' outputs
    (per example, input side first, the output layer left out; then the attention
    weights, [heads, queries, keys], of each attention layer: the memory estimate),
    its parameter count, and why its activations are not recorded (None: they are)."""

    layout: Layout
    widths: list[int]
    n_params: int
    no_captures: str | None


def _name(path: Path) -> str:
    return "/".join(path)


def _value(tree: Any, path: Path, leaf: str) -> Any:
    node = tree
    for key in path:
        node = node[key]
    value = node[leaf]
    return value[0] if isinstance(value, tuple) else value


def _scanned(tree: Any, seen: _Seen, leaf: str, model: str) -> int:
    """How many layers a call stands for: 0 outside a scan, the scan's length inside."""
    try:
        extra = len(_value(tree, seen.path, leaf).shape) - len(seen.shape)
    except (KeyError, TypeError):
        raise ConfigError("model", model, (
            f"a module whose layers keep their delta: {_name(seen.path)} runs inside an "
            "nn.scan whose variable_axes lack 'perturbations' and 'intermediates' (add "
            "them beside 'params', e.g. variable_axes={'params': 0, 'perturbations': 0, "
            "'intermediates': 0})")) from None
    if extra not in (0, 1):
        raise ConfigError("model", model, f"at most one level of nn.scan around a layer "
                          f"({_name(seen.path)} is inside {extra})")
    return 0 if extra == 0 else int(_value(tree, seen.path, leaf).shape[0])


def _distinct(seen: list[_Seen], tree: Any, leaf: str, model: str
              ) -> list[tuple[_Seen, int]]:
    """Each call once with the layers it stands for; a scan's body may be traced more
    than once (its repeats are dropped), a layer called twice outside one is refused."""
    out: list[tuple[_Seen, int]] = []
    first: dict[Path, int] = {}
    for s in seen:
        count = _scanned(tree, s, leaf, model)
        if s.path in first:
            if count:
                continue
            raise ConfigError("model", model, f"layers called once each: {_name(s.path)} is "
                              "called twice (shared weights are not instrumented)")
        first[s.path] = len(out)
        out.append((s, count))
    return out


def _short(paths: list[Path]) -> dict[Path, Path]:
    """Each layer's path cut to the shortest prefix that no other layer's path shares:
    a layer is named by the outermost module that holds it alone (a ``ConvLayer`` named
    ``conv_0`` holding one Conv is ``conv_0``; a block of two Dense layers keeps
    ``block/Dense_0`` and ``block/Dense_1``)."""
    out = {}
    for p in paths:
        k = next((k for k in range(1, len(p) + 1)
                  if not any(q != p and q[:k] == p[:k] for q in paths)), len(p))
        out[p] = p[:k]
    return out


def _prefix(paths: list[Path]) -> Path:
    out: list[str] = []
    for keys in zip(*paths, strict=False):
        if len(set(keys)) != 1:
            break
        out.append(keys[0])
    return tuple(out)


def _segments(layers: list[tuple[_Seen, int]], kinds: dict[Path, str]) -> list[Segment]:
    """One segment per layer outside a scan; the layers of one scanned body (consecutive
    calls with the same count) are one stacked segment whose layer i is the body's i-th
    iteration: its kernels pooled, its delta at the body's last layer."""
    out: list[Segment] = []
    short = _short([s.path for s, _ in layers])
    i = 0
    while i < len(layers):
        seen, count = layers[i]
        if not count:
            name = _name(short[seen.path])
            out.append(Segment((name,), (seen.path,), (*seen.path, "delta"), False,
                               (((name,), seen.path),), kernel=kinds[seen.path]))
            i += 1
            continue
        j = i
        while j < len(layers) and layers[j][1] == count:
            j += 1
        body = [s.path for s, _ in layers[i:j]]
        if len({kinds[p] for p in body}) > 1:
            raise ConfigError("model", _name(body[0]), "one kind of kernel per scanned body")
        root = _prefix([short[p] for p in body]) if len(body) > 1 else short[body[0]]
        names = tuple(f"{_name(root) or 'scan'}[{k}]" for k in range(count))
        params = (((names, body[0]),) if len(body) == 1 else
                  tuple((tuple(f"{n}/{_name(p[len(root):])}" for n in names), p)
                        for p in body))
        out.append(Segment(names, tuple(body), (*body[-1], "delta"), True, params,
                           kernel=kinds[body[0]]))
        i = j
    return out


def _captures(acts: list[tuple[_Seen, int]], hidden: int) -> tuple[tuple[Capture, ...],
                                                                      str | None]:
    found = sum(count or 1 for _, count in acts)
    if not acts:
        return (), "the module applies no activation through its act field"
    if found != hidden:
        times = "once" if found == 1 else f"{found} times"
        return (), (f"the module applies its activation {times}, not once after each of "
                    f"its {hidden} layers before the last")
    return tuple(Capture(s.path, "", bool(count)) for s, count in acts), None


def _extra_params(params: Any, layers: list[Segment]) -> tuple[tuple[str, ...], ...]:
    """Parameter nodes outside every layer (normalisation layers, activation parameters,
    a module's own ``self.param``): (name, path) pairs keyed by their own paths."""
    inside = {p for s in layers for p in s.dense}
    pairs = []
    for keypath, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in keypath)[:-1]
        if any(path[:len(p)] == p for p in inside) or not path:
            continue
        pair = ((_name(path),), path)
        if pair not in pairs:
            pairs.append(pair)
    return tuple(pairs)


def discover(inst: Instrumented, n_features: int, model: str, dtype: Any = jnp.float32
             ) -> Found:
    """The layout of ``inst``'s module on inputs of ``n_features`` (one abstract trace
    with the probes' captures on: nothing is computed). ``model`` names the module in
    errors."""
    seen: list[_Seen] = []
    key = jax.random.key(0)

    def init() -> Any:
        with nn.intercept_methods(_interceptor(False, True, seen)):
            return inst.net.init({"params": key, "noise": key}, jnp.zeros((2, n_features), dtype),
                                 **inst._args(False), mutable=True)

    variables = jax.eval_shape(init)
    layers_seen = [s for s in seen if s.kind == "layer"]
    if not layers_seen:
        raise ConfigError("model", model, "a module with at least one layer vgrad "
                          "instruments (" + ", ".join(k.__name__ for k in LAYER_KINDS) + ")")
    perturbations = variables.get("perturbations", {})
    layers = _distinct(layers_seen, perturbations, "delta", model)
    params = variables["params"]
    kinds = {s.path: _kernel_leaf(params, s.path, model) for s, _ in layers}
    segments = _segments(layers, kinds)
    inter = variables.get("intermediates", {})
    acts = _distinct([s for s in seen if s.kind == "act"], inter, "activation", model)
    hidden = sum(len(s) for s in segments) - 1
    captures, why = _captures(acts, hidden)
    extra = _extra_params(params, segments)
    first = segments[0]
    segments[0] = Segment(first.names, first.dense, first.delta, first.stacked,
                          first.params + extra, first.signal, first.kernel)
    widths = [math.prod(s.shape[1:]) * max(count, 1) for s, count in layers][:-1]
    attention, why_not = _attention(inter)
    if attention is not None:  # (their weights, [heads, queries, keys] per example, count)
        widths += [math.prod(_value(inter, p, "attention_weights").shape[1:])
                   for p in attention.paths]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    notes = () if why is None else (f"activation statistics are not recorded: {why}",)
    notes += () if why_not is None else (f"attention entropy is not recorded: {why_not}",)
    return Found(Layout(tuple(segments), captures, attention=attention, notes=notes), widths,
                 n_params, why)


def _attention(inter: Any) -> tuple[Attention | None, str | None]:
    """The attention layers that sow their weights (Flax's ``MultiHeadDotProductAttention``
    with ``sow_weights=True``: [batch, heads, queries, keys] under ``attention_weights``),
    in the order of their paths; why they are not recorded, where some are found that the
    probe cannot read (inside an ``nn.scan``; unequal head counts)."""
    found = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        if "attention_weights" in keys:
            found.append((keys[:keys.index("attention_weights")], tuple(leaf.shape)))
    if not found:
        return None, None
    if any(len(shape) != 4 for _, shape in found):
        return None, "an attention layer runs inside an nn.scan"
    heads = {shape[1] for _, shape in found}
    if len(heads) > 1:
        return None, f"its attention layers have different numbers of heads {sorted(heads)}"
    return Attention(tuple(p for p, _ in found), heads.pop()), None


def _kernel_leaf(params: Any, path: Path, model: str) -> str:
    """The kernel leaf's name of the layer whose parameters are at ``path``."""
    node = params
    for key in path:
        node = node[key]
    for leaf in dict.fromkeys(LAYER_KINDS.values()):
        if leaf in node:
            return leaf
    raise ConfigError("model", model, f"a kernel at every instrumented layer "
                      f"({_name(path)} holds {sorted(node)})")
