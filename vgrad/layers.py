"""Where a model's instrumented layers live in its variables: the model's declaration.

A model's layers are stored in *segments*: a single layer (``dense_0``: its kernel at
``params["dense_0"]["kernel"]``), or a stack of identical layers run as one scan
(``nn.scan``: the kernels of layers 1 ... n at ``params["hidden"]["dense"]["kernel"]``,
one leading axis over the layers). Probes, the divergence guard and the writers read
layers only through a :class:`Layout`, which hands every segment over with a leading
layer axis, so that a per-layer statistic is one reduction per segment whatever the
depth, and every per-layer array keeps its meaning (index l = layer l, input side first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclass(frozen=True)
class Segment:
    """Consecutive layers stored together."""

    names: tuple[str, ...]  # the layers' names, input side first ("dense_3", ...)
    path: tuple[str, ...]  # where the Dense parameters are: ("dense_3",) or ("hidden", "dense")
    stacked: bool  # parameters, deltas and captures carry a leading layer axis
    delta: tuple[str, ...]  # where delta is taken in "perturbations": ("delta_3",) ...
    norm: tuple[str, ...] | None = None  # where its batch norm's parameters are, if any
    act: tuple[str, ...] | None = None  # where its activation's parameters are, if any
    hidden: bool = True  # a hidden layer (activation captured), not the output layer

    def __len__(self) -> int:
        return len(self.names)


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@dataclass(frozen=True)
class Layout:
    """A model's layers, in segments, input side first."""

    segments: tuple[Segment, ...]

    @property
    def names(self) -> list[str]:
        return [n for s in self.segments for n in s.names]

    @property
    def hidden_names(self) -> list[str]:
        return [n for s in self.segments if s.hidden for n in s.names]

    def _stack(self, seg: Segment, x: Array) -> Array:
        return x if seg.stacked else x[None]

    def leaves(self, tree: Any, leaf: str) -> list[Array]:
        """Parameter ``leaf`` ("kernel", "bias") of every segment, [n, ...] each."""
        return [self._stack(s, _get(tree, s.path)[leaf]) for s in self.segments]

    def deltas(self, perturbation_grads: Any) -> list[Array]:
        """The gradient at each segment's perturbation, [n, batch, units] each."""
        return [self._stack(s, _get(perturbation_grads, s.delta)) for s in self.segments]

    def captured(self, intermediates: Any, name: str) -> list[Array]:
        """A value sown by the hidden layers under ``name`` ("activation", "slope",
        "slope_max"), [n, ...] per hidden segment."""
        out = []
        for s in self.segments:
            if not s.hidden:
                continue
            if s.stacked:
                out.append(_get(intermediates, s.path[:-1])[name][0])
            else:
                out.append(intermediates[f"{name}_{s.names[0].split('_')[-1]}"][0][None])
        return out


def _named(seg: Segment, kind: str) -> list[str]:
    index = [n.split("_")[-1] for n in seg.names]
    return [f"{kind}_{i}" for i in index]


def flat_params(layout: Layout, tree: Any, lead: int = 0) -> dict[str, Array]:
    """Every parameter of ``tree`` keyed ``<layer>.<name>`` (``dense_3.kernel``,
    ``bn_3.scale``, ``act_3.alpha``), stacked segments split into their layers: the
    layout of ``grads.npz`` and of saved parameters, the same at any depth. Leaves of
    ``tree`` may carry ``lead`` leading axes (seeds, snapshots) before the layer axis."""
    out: dict[str, Array] = {}
    for seg in layout.segments:
        parts = [("dense", seg.path), ("bn", seg.norm), ("act", seg.act)]
        for kind, path in parts:
            if path is None:
                continue
            try:
                node = _get(tree, path)
            except (KeyError, TypeError):
                continue
            leaves = jax.tree_util.tree_flatten_with_path(node)[0]
            for keypath, value in leaves:
                leaf = ".".join(str(getattr(k, "key", k)) for k in keypath)
                if seg.stacked:
                    for i, name in enumerate(_named(seg, kind)):
                        out[f"{name}.{leaf}"] = value[(slice(None),) * lead + (i,)]
                else:
                    out[f"{_named(seg, kind)[0]}.{leaf}"] = value
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
