"""Where a model's instrumented layers live in its variables: the model's declaration.

Every model in the registry (``vgrad.models``) declares its layers, input side first, as
a :class:`Layout`; probes, the divergence guard and the writers read layers only through
it, never through ``range(depth)``. A *layer* is what one entry of a per-layer array
means: a Dense layer of the MLP, the input projection, a residual block or the output
layer of a residual net. Each layer has

- its **Dense parameters** (one Dense, or several: a residual block of two Dense
  layers), whose kernels and biases the per-layer statistics reduce together;
- its **delta point**: where ``Module.perturb`` takes delta = dL/dz in the
  ``perturbations`` collection (the MLP's pre-activation z_l; a residual block's output
  on the residual stream), where the forward signal (q^l, c^l) is sown too, in
  ``intermediates`` under the same path;
- for every layer but the last, the **activation applied to its output** (its captures
  f(z), f'(z), max |f'|: the ``hidden`` axis), declared separately in ``captures``.

Layers are stored in *segments*: a single layer (the MLP's ``dense_0``, its kernel at
``params["dense_0"]["kernel"]``), or identical layers run as one scan (``nn.scan``: the
kernels of layers 1 ... n at ``params["hidden"]["dense"]["kernel"]``, one leading axis
over the layers). A :class:`Layout` hands every segment over with a leading layer axis,
so that a per-layer statistic is one reduction per segment whatever the depth, and every
per-layer array keeps its meaning (index l = layer l, input side first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Path = tuple[str, ...]


@dataclass(frozen=True)
class Segment:
    """Consecutive layers stored together.

    ``params`` names the parameter nodes of these layers for the flat ``<layer>.<leaf>``
    keys of ``grads.npz`` and ``params.npz``: pairs (one name per layer, path), e.g.
    ``(("dense_3",), ("dense_3",))`` or, stacked, ``(("dense_1", ..., "dense_9"),
    ("hidden", "dense"))``; every leaf under the path is keyed ``<name>.<its path>``.
    """

    names: tuple[str, ...]  # the layers' names, input side first ("dense_3", ...)
    dense: tuple[Path, ...]  # where each layer's Dense parameters are (one or more)
    delta: Path  # where delta is taken in "perturbations" (the signal in "intermediates")
    stacked: bool  # parameters, deltas and captures carry a leading layer axis
    params: tuple[tuple[tuple[str, ...], Path], ...] = ()
    signal: Path | None = None  # where the forward signal is sown, if not at ``delta``
    kernel: str = "kernel"  # the kernel's leaf name (an Embed's is "embedding")

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Capture:
    """Where the activations applied to some layers' outputs sow their captures: the
    ``intermediates`` node at ``path``, keys ``<capture><suffix>`` ("activation_3"), one
    activation or (``stacked``) a leading axis of them."""

    path: Path
    suffix: str
    stacked: bool


@dataclass(frozen=True)
class Blocks:
    """A residual net's blocks, for the branch/skip probe: the ``intermediates`` node
    where each block sows ``branch`` (alpha F(h)) and ``skip`` (h), stacked over blocks."""

    path: Path
    count: int


@dataclass(frozen=True)
class Recurrent:
    """A recurrent net's layers (``vgrad.models.rnn``), for the probes through time: their
    names, the sequence length T, where each layer's dL/dh_t is ([batch, T, units], its
    segment's delta point), its recurrent Dense [units, gates * units] and its input
    Dense, and which [units, units] gate block of the recurrent kernel the state passes
    through linearly (the Elman kernel, LSTM's g, GRU's n)."""

    names: tuple[str, ...]
    steps: int
    deltas: tuple[Path, ...]
    kernels: tuple[Path, ...]
    inputs: tuple[Path, ...]
    candidate: int


@dataclass(frozen=True)
class Attention:
    """A model's attention layers, for the attention-entropy probe: the ``intermediates``
    nodes where each sows its ``attention_weights`` [batch, heads, queries, keys] (Flax's
    ``MultiHeadDotProductAttention`` called with ``sow_weights=True``), and the heads."""

    paths: tuple[Path, ...]
    heads: int


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _leaf(node: Any, name: str, stacked: int) -> Array:
    """``node[name]``, or no entries where it is absent: [0], or [n, 0] for ``stacked``
    layers (n > 0)."""
    if name in node:
        return node[name]
    return jnp.zeros((stacked, 0) if stacked else (0,), jax.tree.leaves(node)[0].dtype)


def _lead(x: Array, stacked: bool) -> Array:
    return x if stacked else x[None]


@dataclass(frozen=True)
class Layout:
    """A model's layers, in segments, input side first; the activations applied to every
    layer's output but the last's, in order (a recurrent layer's: the nonlinearity inside
    its cell); the residual blocks, if any; the recurrent layers, if any."""

    segments: tuple[Segment, ...]
    captures: tuple[Capture, ...]
    blocks: Blocks | None = None
    recurrent: Recurrent | None = None
    attention: Attention | None = None
    #: What the model's layout leaves unmeasured, and why (said in the run's log).
    notes: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [n for s in self.segments for n in s.names]

    @property
    def hidden_names(self) -> list[str]:
        """The layers whose output goes through an activation: all but the last."""
        return self.names[:-1]

    def axis_sizes(self) -> dict[str, int]:
        """The lengths of the axes of the per-layer arrays the model's declarations give:
        ``layer`` and ``hidden``, and those its parts add: ``block`` (residual blocks),
        ``recurrent`` and ``time`` (recurrent layers and time steps), ``attention`` and
        ``head`` (attention layers and their heads); 0 where it has none."""
        blocks, rec, att = self.blocks, self.recurrent, self.attention
        return {"layer": len(self.names), "hidden": len(self.hidden_names),
                "block": blocks.count if blocks else 0,
                "recurrent": len(rec.names) if rec else 0, "time": rec.steps if rec else 0,
                "attention": len(att.paths) if att else 0, "head": att.heads if att else 0}

    def attention_weights(self, intermediates: Any) -> list[Array]:
        """Each attention layer's sown weights, [batch, heads, queries, keys]."""
        return [_get(intermediates, p)["attention_weights"][0] for p in self.attention.paths]

    def leaves(self, tree: Any, leaf: str) -> list[Array]:
        """Parameter ``leaf`` ("kernel", "bias") of every segment, [n, ...] each; a layer
        of several Dense layers has their leaves flattened side by side, [n, K]. A layer
        without that leaf (a Dense with ``use_bias=False``, an Embed's bias) gives [n, 0]:
        no entries, norm 0."""
        out = []
        for s in self.segments:
            name = s.kernel if leaf == "kernel" else leaf
            parts = [_lead(_leaf(_get(tree, p), name, len(s) if s.stacked else 0), s.stacked)
                     for p in s.dense]
            out.append(parts[0] if len(parts) == 1 else jnp.concatenate(
                [x.reshape(x.shape[0], -1) for x in parts], axis=1))
        return out

    def deltas(self, perturbation_grads: Any) -> list[Array]:
        """The gradient at each segment's perturbation, [n, batch, units] each."""
        return [_lead(_get(perturbation_grads, s.delta), s.stacked) for s in self.segments]

    def signals(self, intermediates: Any) -> list[Array]:
        """The forward signal at each segment's delta point (sown under the same path),
        [n, batch, units] each."""
        return [_lead(_get(intermediates, s.signal or s.delta)[0], s.stacked)
                for s in self.segments]

    def time_deltas(self, perturbation_grads: Any) -> list[Array]:
        """A recurrent net's dL/dh_t per recurrent layer, [batch, T, units] each."""
        return [_get(perturbation_grads, p) for p in self.recurrent.deltas]

    def recurrent_kernels(self, params: Any) -> list[Array]:
        """A recurrent net's recurrent kernels, [units, gates * units] each."""
        return [_get(params, p)["kernel"] for p in self.recurrent.kernels]

    def input_kernels(self, params: Any) -> list[Array]:
        """A recurrent net's input kernels, [features, gates * units] each."""
        return [_get(params, p)["kernel"] for p in self.recurrent.inputs]

    def captured(self, intermediates: Any, name: str) -> list[Array]:
        """A value sown by the activations under ``name`` ("activation", "slope",
        "slope_max"), [n, ...] per capture."""
        return [_lead(_get(intermediates, c.path)[f"{name}{c.suffix}"][0], c.stacked)
                for c in self.captures]

    def block_values(self, intermediates: Any) -> tuple[Array, Array]:
        """Each block's branch output and skip path, [blocks, batch, units] each."""
        node = _get(intermediates, self.blocks.path)
        return node["branch"][0], node["skip"][0]


def flat_params(layout: Layout, tree: Any, lead: int = 0) -> dict[str, Array]:
    """Every parameter of ``tree`` keyed ``<layer>.<name>`` (``dense_3.kernel``,
    ``bn_3.scale``, ``act_3.alpha``), stacked segments split into their layers: the
    layout of ``grads.npz`` and of saved parameters, the same at any depth. Leaves of
    ``tree`` may carry ``lead`` leading axes (seeds, snapshots) before the layer axis."""
    out: dict[str, Array] = {}
    for seg in layout.segments:
        for names, path in seg.params:
            try:
                node = _get(tree, path)
            except (KeyError, TypeError):
                continue
            for keypath, value in jax.tree_util.tree_flatten_with_path(node)[0]:
                leaf = ".".join(str(getattr(k, "key", k)) for k in keypath)
                if seg.stacked:
                    for i, name in enumerate(names):
                        out[f"{name}.{leaf}"] = value[(slice(None),) * lead + (i,)]
                else:
                    out[f"{names[0]}.{leaf}"] = value
    return out


# --- packing layers into few arrays (few operations, whatever the number of layers) -------

#: Rows are stacked into one zero-padded block while the padding adds at most this
#: fraction of the real entries, or the block stays below ``SMALL_BLOCK`` entries.
MAX_PADDING = 1.0
SMALL_BLOCK = 1 << 16


class Rows(NamedTuple):
    """Layers as rows of one array: ``x`` [n, K] zero-padded, ``count`` [n] real lengths."""

    x: Array
    count: np.ndarray

    @property
    def mask(self) -> Array:
        """[n, K]: True on the real entries of each row (K: the last axis of ``x``)."""
        return jnp.arange(self.x.shape[-1])[None, :] < self.count[:, None]


def pack(arrays: Sequence[Array], axis: int = 1) -> list[Rows]:
    """Arrays [n_i, ...] as few blocks of rows, in order.

    Each array is flattened from ``axis`` on (``axis=1``: one row per layer; ``axis=2``
    keeps a second axis, e.g. the examples of a batch, as [n_i, B, k_i]), and consecutive
    arrays are stacked into one zero-padded block while the padding stays small, so that
    a per-layer statistic of a small net is one reduction for all its layers, and a large
    net with layers of very different sizes does not pay for much padding.
    """
    flat = [a.reshape(a.shape[:axis] + (-1,)) for a in arrays]
    blocks: list[list[Array]] = []
    for f in flat:
        if blocks:
            group = blocks[-1] + [f]
            width = max(g.shape[-1] for g in group)
            real = sum(g.size for g in group)
            padded = sum(g.size // g.shape[-1] for g in group) * width
            if padded <= SMALL_BLOCK or padded - real <= MAX_PADDING * real:
                blocks[-1] = group
                continue
        blocks.append([f])
    out = []
    for group in blocks:
        width = max(g.shape[-1] for g in group)
        padded = [jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, width - g.shape[-1])])
                  for g in group]
        counts = np.concatenate([np.full(g.shape[0], g.shape[-1]) for g in group])
        out.append(Rows(padded[0] if len(padded) == 1 else jnp.concatenate(padded), counts))
    return out
