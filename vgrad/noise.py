"""Per-example gradient statistics of every Dense layer, without per-example gradients.

A batch's mean gradient hides how much its examples disagree. Example n's gradient of a
Dense layer y = a W + b is g_n = a_n^T d_n (and d_n for the bias), where a_n is the
layer's input and d_n = dl_n/dy_n the gradient of n's own loss at the layer's output
(Goodfellow 2015, "Efficient per-example gradient computations"). The training step
already backpropagates d_n; with taps (:class:`Tapped`) every ``nn.Dense`` call (an
``nn.DenseGeneral``'s as the Dense of its flattened axes: the attention projections; an
``nn.Conv``'s on its input's patches) also sows its input and takes d at its output, so
every statistic below costs about one matrix product per layer, never the batch x
parameters array of per-example gradients:

- ``||g_n||^2 = ||a_n||^2 ||d_n||^2 (+ ||d_n||^2 for the bias)``;
- ``g_n . G = a_n^T G_W d_n (+ d_n . G_b)`` for the batch's mean gradient G;
- per parameter, ``sum_n g_nij^2 = (a^2)^T (d^2)``.

A layer applied at several positions of one example (a recurrent layer at every time
step, a Dense over tokens, a convolution at every output position of its input's patches)
has g_n = sum_t a_nt^T d_nt: its per-example gradient is formed layer by layer
([batch, in, out], one batched product) and reduced at once.

From these, per layer (its Dense kernels and biases together: a residual block's two,
a recurrent layer's input and recurrent ones) and for the whole net (every layer's),
with B the batch size, G the batch gradient, trS = 1/(B-1) sum_n ||g_n - G||^2:

- ``pe_norm_mean``, ``pe_norm_q``: the batch mean of ||g_n||, and its quantiles
  ``QUANTILES`` (min, 10%, median, 90%, max; numpy's linear interpolation);
- ``gsnr``: the mean over parameters of G_j^2 / s_j^2, s_j^2 = 1/B sum_n g_nj^2 - G_j^2
  (Cockpit's MeanGSNR, Schneider et al. 2021; after Liu et al. 2020, "Understanding why
  neural networks generalize well through GSNR of parameters"). Cockpit adds 1e-5 to
  s_j^2, which would read 0 wherever gradients vanish (s_j^2 far below 1e-5); vgrad
  leaves parameters whose gradient is zero to rounding (``zero_to_rounding``: every
  g_nj 0, or an attention key's bias) out of the mean and floors s_j^2 at 16 eps
  of 1/B sum_n g_nj^2 (where the examples agree to rounding, GSNR reads ~1/(16 eps));
- ``noise_trace`` = trS and ``noise_grad_sq`` = ||G||^2 - trS / B, the unbiased
  estimates of tr(Sigma) and |G_true|^2 from one batch, and their ratio
  ``noise_scale`` = B_simple, the gradient noise scale (McCandlish et al. 2018, "An
  empirical model of large-batch training", eq. 2.8 and appendix A.1 with B_small = 1):
  the batch size above which larger batches stop helping. The paper smooths the two
  estimates over steps before dividing; their per-step values are kept for that;
- ``norm_test``, ``inner_test``, ``ortho_test``: the smallest theta (nu) with which the
  batch passes the norm test (Byrd et al. 2012, eq. 3.9), the inner-product test and
  the orthogonality test (Bollapragada et al. 2018, eqs. 2.6, 3.3), as Cockpit computes
  them: sqrt(trS / (B ||G||^2)), sqrt(Var(g_n . G) / (B ||G||^4)) and
  sqrt(Var_perp / (B ||G||^2)), the variances with 1/(B-1). Below 1: the batch
  gradient is a descent direction with high probability.

Whole-net arrays end in ``_net``. Parameters outside Dense layers (a normalisation's
scale, a learned residual multiplier) are not counted. Under batch norm in training
mode an example's loss depends on the others' inputs, so per-example gradients are not
defined: the probe is left out (the run's log and ``summary.json`` say so), as it is for
a model with other layers (embeddings; grouped or masked convolutions).

Numbers stay finite while the gradients are: each layer is computed in units of its
largest |a| x largest |d|. B = 1 gives NaN (no variance from one example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgrad.layers import Layout

Array = jax.Array

#: The names a tapped Dense sows its input under (``intermediates``; a convolution: its
#: patches) and perturbs its output under (``perturbations``).
TAP_IN, TAP_PATCHES, TAP_DELTA = "tap_in", "tap_patches", "tap_delta"
#: Quantile levels of ``pe_norm_q``.
QUANTILES = np.array([0.0, 0.1, 0.5, 0.9, 1.0], np.float32)
#: Floor of a parameter's variance, in float eps of its mean square (see the docstring).
VARIANCE_FLOOR = 16.0


def _tap(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    module = context.module
    kind = type(module)
    if context.method_name != "__call__" or kind not in (nn.Dense, nn.DenseGeneral, nn.Conv):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if kind is nn.Conv:
        x = conv_patches(module, x)
        if x is None:  # (a convolution this does not unfold: left untapped)
            return next_fun(*args, **kwargs)
        module.sow("intermediates", TAP_PATCHES, x)
        return module.perturb(TAP_DELTA, next_fun(*args, **kwargs))
    contracted = _contracted(module, x)
    if contracted is None:  # (a DenseGeneral with batch_dims or inner axes: untapped)
        return next_fun(*args, **kwargs)
    module.sow("intermediates", TAP_IN, x.reshape(x.shape[:x.ndim - contracted] + (-1,)))
    y = next_fun(*args, **kwargs)
    features = y.ndim - (x.ndim - contracted)  # (a DenseGeneral's several feature axes)
    flat = module.perturb(TAP_DELTA, y.reshape(y.shape[:y.ndim - features] + (-1,)))
    return flat.reshape(y.shape)


def _contracted(module: nn.Module, x: Array) -> int | None:
    """How many trailing axes of ``x`` a Dense (1) or a DenseGeneral contracts: a
    DenseGeneral is a Dense of its flattened trailing input axes and flattened feature
    axes (the attention projections: [.., width] -> [.., heads, head_dim] and back);
    None for one that contracts other axes or has batch_dims."""
    if type(module) is nn.Dense:
        return 1
    axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    axes = sorted(a % x.ndim for a in axes)
    if module.batch_dims or axes != list(range(x.ndim - len(axes), x.ndim)):
        return None
    return len(axes)


#: Layouts of the convolutions ``conv_patches`` unfolds, by spatial rank.
_CONV_DIMENSIONS = {1: ("NWC", "OIW", "NWC"), 2: ("NHWC", "OIHW", "NHWC")}


def conv_patches(module: nn.Conv, x: Array) -> Array | None:
    """The patches an ``nn.Conv`` multiplies by its kernel, [batch, positions..., c_in *
    kernel area] (channel-major, as ``lax.conv_general_dilated_patches`` orders them):
    with them a convolution is a Dense layer applied at every output position, and each
    example's kernel gradient is sum_p patch_p^T d_p. None for what this does not
    unfold (grouped or masked convolutions, 3-D, no batch axis). Circular, reflecting
    and causal padding pad the input first, as Flax does."""
    rank = len(module.kernel_size)
    if (module.feature_group_count != 1 or module.mask is not None
            or rank not in _CONV_DIMENSIONS or x.ndim != rank + 2):
        return None
    from flax.linen.linear import canonicalize_padding

    def per_axis(value: Any) -> tuple[int, ...]:
        if value is None:
            return (1,) * rank
        return (value,) * rank if isinstance(value, int) else tuple(value)

    padding = canonicalize_padding(module.padding, rank)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):  # (the input padded as Flax pads it)
        dilated = [(k - 1) * d + 1 for k, d in zip(module.kernel_size,
                                                   per_axis(module.kernel_dilation),
                                                   strict=True)]
        if padding == "CAUSAL":
            widths = [(dilated[0] - 1, 0)] if rank == 1 else None
        else:
            widths = [((k - 1) // 2, k // 2) for k in dilated]
        if widths is None:
            return None
        x = jnp.pad(x, [(0, 0), *widths, (0, 0)],
                    mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}.get(padding, "constant"))
        padding = "VALID"
    elif isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return None

    return jax.lax.conv_general_dilated_patches(
        x, tuple(module.kernel_size), per_axis(module.strides), padding,
        lhs_dilation=per_axis(module.input_dilation),
        rhs_dilation=per_axis(module.kernel_dilation),
        dimension_numbers=_CONV_DIMENSIONS[rank])


@dataclass(frozen=True, eq=False)
class Tapped:
    """A network (a built-in family's module, or :class:`~vgrad.models.auto.Instrumented`)
    whose every ``nn.Dense`` and ``nn.DenseGeneral`` call sows its input (an ``nn.Conv``,
    its patches: :func:`conv_patches`) and perturbs its output: the step's
    ``intermediates`` and perturbation gradients then hold each layer's a and d."""

    net: Any

    def init(self, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_tap):
            return self.net.init(*args, **kwargs)

    def lazy_init(self, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_tap):
            return self.net.lazy_init(*args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_tap):
            return self.net.apply(*args, **kwargs)


def _node(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def untapped(layout: Layout, perturbations: Any) -> list[str]:
    """The layers with a parameter node that no tapped call reached (a
    convolution, an embedding): ``perturbations`` is a tapped net's zero perturbations."""
    return [seg.names[0] for seg in layout.segments for path in seg.dense
            if TAP_DELTA not in (_node(perturbations, path) or {})]


class Taps(NamedTuple):
    """Per Dense call site: its inputs (``intermediates``) and B x dL/dy (the
    perturbation gradients), trees under the layers' module paths."""

    inputs: Any
    deltas: Any


class _Sums(NamedTuple):
    """One Dense's (or one layer's) per-example sums, in units of ``scale``^2."""

    sq: Array  # [B] ||g_n||^2
    dot: Array  # [B] g_n . G
    g2: Array  # ||G||^2
    gsnr_sum: Array  # sum over counted parameters of G_j^2 / s_j^2 (unitless)
    gsnr_count: Array  # parameters counted
    scale: Array  # the unit: largest |a| x largest |d|


def _unit(x: Array) -> Array:
    m = jnp.max(jnp.abs(x))
    return jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)


def zero_to_rounding(mean_sq: Array, peak: Array) -> Array:
    """Where a parameter's mean square gradient is zero to rounding: at most (16 eps)^2 of
    the largest one of its Dense call (``peak``). Such a parameter's gradient is zero in
    exact arithmetic (an attention key's bias: softmax ignores a shift shared by all keys)
    or lost in the rounding of the others', and its G^2 / s^2 would be a ratio of
    rounding errors."""
    return mean_sq <= (VARIANCE_FLOOR * jnp.finfo(mean_sq.dtype).eps) ** 2 * peak


def _gsnr_terms(mean: Array, mean_sq: Array, peak: Array) -> tuple[Array, Array]:
    """sum of G_j^2 / s_j^2 over the parameters with a gradient not zero to rounding,
    and their count."""
    counted = ~zero_to_rounding(mean_sq, peak)
    floor = VARIANCE_FLOOR * jnp.finfo(mean.dtype).eps * mean_sq
    var = jnp.maximum(mean_sq - mean * mean, floor)
    ratio = jnp.where(counted, mean * mean / jnp.where(counted, var, 1.0), 0.0)
    return jnp.sum(ratio), jnp.sum(counted).astype(mean.dtype)


def dense_sums(a: Array, d: Array, kernel: Array, bias: Array, has_bias: Array) -> _Sums:
    """The per-example sums of one Dense layer: inputs ``a`` [B, S, in] and output
    gradients ``d`` [B, S, out] of the examples' own losses at S positions per example,
    its batch gradient ``kernel`` [in, out] and ``bias`` [out] (zeros with ``has_bias``
    0). Zero-padded inputs, outputs and kernel entries add nothing (a padded parameter
    has no gradient, so it is not counted in the GSNR either)."""
    batch = a.shape[0]
    unit_a = _unit(a)
    scale = unit_a * _unit(d)
    a, d = a / unit_a, d / _unit(d)
    gk, gb = kernel / scale, bias / scale
    if a.shape[1] == 1:  # one position per example: the factorised forms
        a, d = a[:, 0], d[:, 0]
        sq = jnp.sum(a * a, axis=1) * jnp.sum(d * d, axis=1)
        dot = jnp.sum((a @ gk) * d, axis=1)
        mean_sq = (a * a).T @ (d * d) / batch
        bias_g = d / unit_a  # (the bias's gradient d, in units of scale)
    else:  # several positions: each example's gradient, one layer at a time
        g = jnp.einsum("nsi,nso->nio", a, d)
        sq = jnp.sum(g * g, axis=(1, 2))
        dot = jnp.einsum("nio,io->n", g, gk)
        mean_sq = jnp.mean(g * g, axis=0)
        bias_g = jnp.sum(d, axis=1) / unit_a
    bias_g = bias_g * has_bias
    bias_sq = jnp.mean(bias_g * bias_g, axis=0)
    peak = jnp.maximum(jnp.max(mean_sq), jnp.max(bias_sq))
    gsnr_sum, count = _gsnr_terms(gk, mean_sq, peak)
    b_sum, b_count = _gsnr_terms(gb, bias_sq, peak)
    return _Sums(sq + jnp.sum(bias_g * bias_g, axis=1), dot + bias_g @ gb,
                 jnp.sum(gk * gk) + jnp.sum(gb * gb), gsnr_sum + b_sum, count + b_count,
                 scale)


def _combine(sums: _Sums, group: np.ndarray, n: int) -> _Sums:
    """Rows of sums [R, ...] added up within each of ``n`` groups (``group``: each row's;
    a layer's Dense calls, or every layer for the whole net), each group in the largest
    unit among its rows, [n, ...]."""
    scale = jax.ops.segment_max(sums.scale, group, num_segments=n)
    w = (sums.scale / scale[group]) ** 2

    def total(x: Array, weights: Array | None = None) -> Array:
        x = x if weights is None else x * weights.reshape(w.shape + (1,) * (x.ndim - 1))
        return jax.ops.segment_sum(x, group, num_segments=n)

    return _Sums(total(sums.sq, w), total(sums.dot, w), total(sums.g2, w),
                 total(sums.gsnr_sum), total(sums.gsnr_count), scale)


class _Rows(NamedTuple):
    """Dense calls as rows: a [n, B, S, in], d [n, B, S, out], kernel [n, in, out],
    bias [n, out], has_bias [n], and the layer each row belongs to."""

    a: Array
    d: Array
    kernel: Array
    bias: Array
    has_bias: Array
    layer: np.ndarray


def _rows(layout: Layout, taps: Taps, tree: Any) -> list[_Rows]:
    """Every tapped call of every layer as rows, a stacked segment's calls with one row
    per layer; kernel and bias from ``tree`` (like the parameters: the batch gradient,
    or a direction to project on)."""
    out, first = [], 0
    for seg in layout.segments:
        n = len(seg)
        for path in seg.dense:
            node = _node(tree, path)
            sown = _node(taps.inputs, path)
            a = sown[TAP_IN if TAP_IN in sown else TAP_PATCHES][0]
            d = _node(taps.deltas, path)[TAP_DELTA]
            kernel = node["kernel"]
            if not seg.stacked:
                a, d, kernel = a[None], d[None], kernel[None]
            if TAP_PATCHES in sown:  # a convolution's [n, *window, c_in, c_out]: as its patches
                kernel = jnp.moveaxis(kernel, -2, 1)
            kernel = kernel.reshape(n, a.shape[-1], d.shape[-1])  # (a DenseGeneral's, flat)
            bias = node.get("bias")
            has = bias is not None
            bias = (bias if seg.stacked else bias[None]).reshape(n, -1) if has else jnp.zeros(
                (n, kernel.shape[-1]), kernel.dtype)
            batch = a.shape[1]
            out.append(_Rows(a.reshape(n, batch, -1, a.shape[-1]),
                             d.reshape(n, batch, -1, d.shape[-1]), kernel, bias,
                             jnp.full((n,), float(has), kernel.dtype),
                             first + np.arange(n)))
        first += n
    return out


def _pad(x: Array, size: int, axis: int) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _packed(rows: list[_Rows]) -> list[_Rows]:
    """Rows of the same positions per example and similar sizes joined into one block,
    zero-padded to its widest (while the padding at most doubles it, or it stays
    small, as ``vgrad.layers.pack`` does): the statistics cost a few operations per
    block instead of per layer."""
    blocks: list[list[_Rows]] = []
    for r in rows:
        for block in blocks:
            if block[0].a.shape[2] != r.a.shape[2]:
                continue
            group = block + [r]
            i = max(g.kernel.shape[1] for g in group)
            o = max(g.kernel.shape[2] for g in group)
            real = sum(g.kernel.size for g in group)
            padded = sum(g.kernel.shape[0] for g in group) * i * o
            if padded <= SMALL_BLOCK or padded <= 2 * real:
                block.append(r)
                break
        else:
            blocks.append([r])
    out = []
    for block in blocks:
        i = max(g.kernel.shape[1] for g in block)
        o = max(g.kernel.shape[2] for g in block)
        out.append(_Rows(
            jnp.concatenate([_pad(g.a, i, 3) for g in block]),
            jnp.concatenate([_pad(g.d, o, 3) for g in block]),
            jnp.concatenate([_pad(_pad(g.kernel, i, 1), o, 2) for g in block]),
            jnp.concatenate([_pad(g.bias, o, 1) for g in block]),
            jnp.concatenate([g.has_bias for g in block]),
            np.concatenate([g.layer for g in block])))
    return out


#: A block of rows stays this small (kernel entries) whatever its padding.
SMALL_BLOCK = 1 << 12


def layer_sums(layout: Layout, taps: Taps, grads: Any) -> _Sums:
    """Every layer's sums, [L, ...] (its Dense calls' together, in its largest unit)."""
    blocks = _packed(_rows(layout, taps, grads))
    sums = [jax.vmap(dense_sums)(b.a, b.d, b.kernel, b.bias, b.has_bias) for b in blocks]
    rows = jax.tree.map(lambda *x: jnp.concatenate(x), *sums)
    layer = np.concatenate([b.layer for b in blocks])
    n = len(layout.names)
    if np.array_equal(layer, np.arange(n)):  # (one Dense per layer, in order)
        return rows
    return _combine(rows, layer, n)


def quantiles(x: Array, levels: np.ndarray = QUANTILES) -> Array:
    """numpy's (linear) quantiles of ``x`` [B] at ``levels``, by ranks instead of a sort:
    rank_i = #{j: x_j < x_i} + #{j < i: x_j = x_i} (B^2 comparisons, elementwise), and
    the k-th smallest value is the one of rank k. XLA's CPU sort calls a comparator per
    comparison; for a batch of 32 it cost more than the rest of the probe together."""
    batch = x.shape[0]
    index = jnp.arange(batch)
    less = (x[None, :] < x[:, None]) | ((x[None, :] == x[:, None])
                                       & (index[None, :] < index[:, None]))
    rank = jnp.sum(less, axis=1)  # [B]: a permutation of 0 ... B-1
    position = np.asarray(levels, np.float64) * (batch - 1)
    low = np.floor(position).astype(np.int32)
    high = np.minimum(low + 1, batch - 1)
    ordered = jnp.sum(jnp.where(rank[None, :] == index[:, None], x[None, :], 0), axis=1)
    frac = jnp.asarray(position - low, x.dtype)
    out = ordered[low] + frac * (ordered[high] - ordered[low])
    return jnp.where(jnp.isnan(x).any(), jnp.nan, out)  # (as numpy: NaN in, NaN out)


def statistics(sums: _Sums) -> dict[str, Array]:
    """The statistics of one layer's (or the whole net's) sums (module docstring)."""
    batch = sums.sq.shape[0]
    s = sums.scale
    norms = jnp.sqrt(sums.sq)
    trace = (jnp.sum(sums.sq) - batch * sums.g2) / (batch - 1)
    g2 = sums.g2
    var_dot = (jnp.sum(sums.dot ** 2) - batch * g2 ** 2) / (batch - 1)
    var_perp = (jnp.sum(sums.sq) - jnp.sum(sums.dot ** 2) / g2) / (batch - 1)
    return {
        "pe_norm_mean": jnp.mean(norms) * s,
        "pe_norm_q": quantiles(norms) * s,
        "gsnr": sums.gsnr_sum / sums.gsnr_count,
        "noise_trace": trace * s * s,
        "noise_grad_sq": (g2 - trace / batch) * s * s,
        "noise_scale": trace / (g2 - trace / batch),
        "norm_test": jnp.sqrt(trace / (batch * g2)),
        "inner_test": jnp.sqrt(var_dot / (batch * g2 * g2)),
        "ortho_test": jnp.sqrt(var_perp / (batch * g2)),
    }


#: The arrays of the ``gradient_noise`` probe and their axes (per layer; whole net).
PER_LAYER = ("pe_norm_mean", "gsnr", "noise_trace", "noise_grad_sq", "noise_scale",
             "norm_test", "inner_test", "ortho_test")


def outputs() -> dict[str, tuple[str, ...]]:
    axes: dict[str, tuple[str, ...]] = {}
    for name in PER_LAYER:
        axes[name] = ("layer",)
        axes[f"{name}_net"] = ()
    axes["pe_norm_q"] = ("layer", "quantile")
    axes["pe_norm_q_net"] = ("quantile",)
    return axes


def gradient_noise(layout: Layout, taps: Taps, grads: Any) -> dict[str, Array]:
    """Every array of the probe: per layer [L] (or [L, quantile]) and for the whole net."""
    layers = layer_sums(layout, taps, grads)
    out = jax.vmap(statistics)(layers)  # (every layer at once: few, larger operations)
    net = jax.tree.map(lambda x: x[0], _combine(layers, np.zeros(len(layout.names), int), 1))
    out.update({f"{k}_net": v for k, v in statistics(net).items()})
    return out


# --- the local step size alpha (Cockpit's Alpha) --------------------------------------------


def projections(layout: Layout, taps: Taps, direction: Any) -> Array:
    """g_n . D for every example n, [B]: each example's gradient of the layers' kernels
    and biases projected on ``direction`` (a tree like the parameters), one matrix
    product per layer."""
    return sum(jnp.einsum("lnsi,lio,lnso->n", r.a, r.kernel, r.d)
               + jnp.einsum("lnso,lo->n", r.d, r.bias)  # (zeros where there is none)
               for r in _rows(layout, taps, direction))


def layers_norm(layout: Layout, tree: Any) -> Array:
    """The L2 norm of the layers' kernels and biases in ``tree`` together."""
    leaves = [x for leaf in ("kernel", "bias") for x in layout.leaves(tree, leaf)]
    return jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))


class Observation(NamedTuple):
    """One end of a step, as Cockpit's Alpha observes it along the step's direction d:
    the batch loss f and its examples' variance, the slope f' = G . d / ||d|| and its
    examples' variance (sample variances, 1/(B - 1))."""

    f: Array
    var_f: Array
    df: Array
    var_df: Array


def observe(losses: Array, dots: Array, size: Array) -> Observation:
    """An ``Observation`` from the examples' losses [B] and g_n . d [B], ||d|| = ``size``."""
    slopes = dots / jnp.where(size > 0, size, 1.0)
    return Observation(jnp.mean(losses), jnp.var(losses, ddof=1), jnp.mean(slopes),
                       jnp.var(slopes, ddof=1))


#: Cockpit's stand-in for a zero variance in the fit.
ALPHA_EPS = 1e-10


def alpha(start: Observation, end: Observation, size: Array) -> Array:
    """The local step size alpha of a step of length ``size`` (Schneider, Dangel & Hennig
    2021, "Cockpit: a practical debugging tool for the training of deep neural networks",
    their Alpha): a quadratic f(s) = w0 + w1 s + w2 s^2 along the step is fitted by
    weighted least squares to the noisy losses and slopes at both ends (weights: 1 /
    their variances), and alpha = 2 size / s_bar - 1, s_bar = -w1 / w2 the distance to
    the far side of the fitted parabola: 0 steps to its minimum, 1 to the other side at
    the start's height, below 0 undershoots, above 1 overshoots. As Cockpit: -1 where
    the fit is concave (still going downhill) or the step has length 0."""
    t = size
    phi = jnp.stack([jnp.stack([jnp.ones_like(t), 0 * t, 0 * t]),
                     jnp.stack([jnp.ones_like(t), t, t * t]),
                     jnp.stack([0 * t, jnp.ones_like(t), 0 * t]),
                     jnp.stack([0 * t, jnp.ones_like(t), 2 * t])])  # [4, 3]
    var = jnp.stack([start.var_f, end.var_f, start.var_df, end.var_df])
    weights = 1.0 / jnp.where(var == 0, ALPHA_EPS, var)
    y = jnp.stack([start.f, end.f, start.df, end.df])
    normal = phi.T @ (weights[:, None] * phi)
    mu = jnp.linalg.solve(normal, phi.T @ (weights * y))
    value = 2 * t * mu[2] / -mu[1] - 1  # (2 t / s_bar - 1, s_bar = -w1 / w2)
    return jnp.where((t > 0) & (mu[2] >= 0), value, -1.0)
