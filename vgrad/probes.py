"""Pure reductions of a step's measurements into small per-layer arrays.

Two registries, both ``name -> function``; each function returns a dict of arrays and
its keys become arrays of ``metrics.npz`` (DESIGN.md section 4). A new statistic is one
function plus one registry entry.

- ``STEP_PROBES`` reduce a :class:`~vgrad.step.StepOut` at every recorded step. Per-layer
  arrays have one entry per Dense layer (``dense_0`` ... output layer), shape [L].

Each registry entry declares the arrays its function returns and their axes
(``("layer",)``, ``("hidden",)``, ``("layer", "bin")``, ``()`` for a scalar), after the
leading seed and step (or epoch) axes: ``summary.json``'s ``arrays`` is written from
these declarations, and the compiled loop takes the shapes of the statistics it skips
from them rather than tracing the probes again.
- ``EPOCH_PROBES`` reduce an :class:`EpochView` (the state at an epoch boundary, plus
  measurements on the fixed probe batch and full-set evaluations) at initialisation
  and after every epoch.

Each entry also declares what it needs beyond the step's outputs and the parameters
(``needs``, from :data:`NEEDS`: the network's captures on the probe batch, the deep
Jacobian, the probe-batch gradient, each example's own deltas), as Cockpit's quantities
declare their backward-pass extensions: the engine computes the union of what the chosen
probes need (:func:`needs`) and nothing else. Whether it is opt-in (``opt_in``: left
out of the default ``record.*_probes``), the fixed bin edges its histograms use
(``edges``, written beside its arrays) and which models it runs on (``requires``) are
its entry's facts too.

Layers are read through the model's :class:`~vgrad.layers.Layout`, one segment at a time
with a leading layer axis, so that a statistic costs one reduction per segment (not per
layer) and a scanned stack of 1,000 layers is measured as cheaply as one.

Statistics use the kernel (weight matrix) of each Dense layer unless the name says bias.
**Norms, means and standard deviations never overflow** while the values are finite:
each is computed on the values divided by their largest magnitude and scaled back, so a
gradient with entries near 1e30, whose sum of squares exceeds float32's 3.4e38, still
has its true (finite) norm: the last steps before an explosion are what users study.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vgrad import noise
from vgrad.curvature import DENSITY_EDGES
from vgrad.layers import Layout, Rows, pack
from vgrad.step import StepOut

Array = jax.Array

#: Fixed bin edges of log10|value| histograms: identical for every run and layer, so a
#: sweep compares bin for bin. 0.25 decade bins from 1e-12 to 1e4; smaller values
#: (exact zeros included) count in the first bin, larger (inf included) in the last.
HIST_EDGES = np.linspace(-12.0, 4.0, 65, dtype=np.float32)

# --- overflow-safe reductions of packed layers (one row per layer) ---------------------


#: Scales above this are divided by 8 (exact): see :func:`_divisor`.
_BIG = 2.0 ** 100


def _divisor(m: Array) -> Array:
    """A scale ``m`` (a largest |entry|) made safe to divide by: 1 where it is zero or
    not finite, and m / 8 above 2^100, so that 1/m stays a normal number: XLA's CPU code
    divides by multiplying with the reciprocal and flushes a subnormal one to zero,
    which made every statistic of a layer with an entry above 2^126 read 0."""
    m = jnp.where(m > _BIG, m * 0.125, m)
    return jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)


def _scale(x: Array, axis: int = -1) -> Array:
    """The largest |x| along ``axis`` (:func:`_divisor`: safe to divide by; kept dims)."""
    return _divisor(jnp.max(jnp.abs(x), axis=axis, keepdims=True))


def _norms(x: Array) -> Array:
    """L2 norm along the last axis, without overflow (zero padding changes nothing)."""
    s = _scale(x)
    return jnp.sqrt(jnp.sum((x / s) ** 2, axis=-1)) * s[..., 0]


def row_moments(rows: Rows) -> Array:
    """Mean, std, L2 norm, mean |x| and max |x| of each row's real entries: [5, n]
    (one scaling shared by the five, so they cost little more than one reduction)."""
    x, count = rows
    s = _scale(x)
    y = x / s
    s = s[:, 0]
    mean = jnp.sum(y, axis=1) / count
    centred = jnp.where(rows.mask, y - mean[:, None], 0.0)
    std = jnp.sqrt(jnp.sum(centred * centred, axis=1) / count)
    return jnp.stack([mean * s, std * s, jnp.sqrt(jnp.sum(y * y, axis=1)) * s,
                      jnp.sum(jnp.abs(y), axis=1) / count * s, jnp.max(jnp.abs(x), axis=1)])


def _per_layer(stat: Any, blocks: list[Rows]) -> Array:
    """``stat`` of every packed block, joined along its last axis (the layers)."""
    return jnp.concatenate([stat(b) for b in blocks], axis=-1)


def _moments(segments: list[Array]) -> Array:
    return _per_layer(row_moments, pack(segments))


def row_norm(rows: Rows) -> Array:
    return _norms(rows.x)


def _layer_norms(segments: list[Array]) -> Array:
    """The L2 norm of each layer of ``segments`` ([n, ...] each), [L]."""
    return _per_layer(row_norm, pack(segments))


def _joined(a: list[Array], b: list[Array]) -> list[Array]:
    """Per segment, the rows of ``a`` and ``b`` side by side (a kernel and its bias)."""
    return [jnp.concatenate([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)], axis=1)
            for x, y in zip(a, b, strict=True)]


def global_norm(tree: Any) -> Array:
    """L2 norm of all leaves of ``tree`` together, without overflow (cf. optax.tree.norm):
    every entry divided by the largest |entry| of all, then one sum of squares. A leaf
    far smaller than the largest adds nothing to the norm, so one scale serves all (a
    per-layer statistic needs its layer's own: there the small layers are the subject);
    no leaf is padded or packed, so the sums fuse with their leaves (6 kernels fewer
    than per-leaf norms packed into rows, on the ``visualize`` net)."""
    leaves = jax.tree.leaves(tree)
    s = _divisor(jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in leaves])))
    return jnp.sqrt(jnp.sum(jnp.stack([jnp.sum(jnp.square(x / s)) for x in leaves]))) * s


# --- step probes ----------------------------------------------------------------------


def kernel_grad_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Mean, std, L2 norm, mean |g| and max |g| of each kernel gradient dL/dW_l."""
    mean, std, norm, absmean, maxabs = _moments(layout.leaves(out.grads, "kernel"))
    return {"grad_mean": mean, "grad_std": std, "grad_norm": norm, "grad_absmean": absmean,
            "grad_maxabs": maxabs}


def bias_grad_norm(out: StepOut, layout: Layout) -> dict[str, Array]:
    """||dL/db_l||: Nielsen's "speed of learning" of layer l (``nielsen`` preset)."""
    return {"bias_grad_norm": _layer_norms(layout.leaves(out.grads, "bias"))}


def global_norms(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Loss and global gradient norm over all parameters (before clipping)."""
    return {"loss": out.loss, "grad_global_norm": global_norm(out.grads)}


def _batch_mean_norm(rows: Rows) -> Array:
    """Per layer, the batch mean of the per-example norms of ``rows.x`` [n, batch, units]."""
    per_example = _norms(rows.x)  # [n, batch]
    s = _scale(per_example)
    return jnp.mean(per_example / s, axis=-1) * s[:, 0]


def delta_norm(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Batch mean of ||delta_l^(n)||, where delta_l^(n) = B dL/dz_l^(n) = sum_m
    dl_m/dz_l^(n) is the backpropagated signal at example n's pre-activation
    z_l = W_l a_{l-1} + b_l, the one that reaches the weights (dL/dW_l is the batch mean
    of a_{l-1}^(n) delta_l^(n)T). Without batch norm the examples do not interact and
    delta_l^(n) = dl_n/dz_l^(n), the quantity signal-propagation theory predicts
    (Schoenholz et al. 2017): its ratio between consecutive layers is the depth-wise
    gradient gain, which the weight gradient can hide when the activations a_{l-1}
    shrink or grow instead. Under batch norm, see ``delta_norm_own``.
    """
    return {"delta_norm": _per_layer(_batch_mean_norm,
                                     pack(layout.deltas(out.deltas), axis=2))}


def delta_norm_own(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Batch mean of ||dl_n/dz_l^(n)||: example n's own loss gradient at its own
    pre-activation, through batch norm's batch statistics too. It equals ``delta_norm``
    without batch norm; with it, ``delta_norm`` adds the other examples' losses coupled
    through the batch statistics. Costs one backward pass per example: not run by
    default (``record.step_probes`` adds it)."""
    return {"delta_norm_own": _per_layer(_batch_mean_norm,
                                         pack(layout.deltas(out.own_deltas), axis=2))}


def gradient_noise(out: StepOut, layout: Layout) -> dict[str, Array]:
    """How the batch's examples disagree about each layer's gradient (``vgrad.noise``):
    per-example gradient norms (mean, quantiles), the gradient signal-to-noise ratio,
    the gradient noise scale B_simple with its two estimates, and the norm,
    inner-product and orthogonality tests; per layer and for the whole net (``_net``).
    Opt-in: ``record.step_probes=[...,gradient_noise]``. Not run under batch norm in
    training mode (per-example gradients are not defined there) nor on models with
    layers other than ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv``; the run's log
    and ``summary.json`` say so."""
    return noise.gradient_noise(layout, out.taps, out.grads)


def alpha(out: StepOut, layout: Layout) -> dict[str, Array]:
    """``alpha``: the local step size of the step before this one (Cockpit's Alpha,
    ``vgrad.noise.alpha``): a quadratic fitted along that step's update to the losses and
    slopes at its start (on its batch) and its end (on this step's batch), with their
    examples' variances; 0: the step reached the fitted minimum, 1: the far side at the
    start's height, -1: the fit is concave. NaN at step 0. The slopes are projections of
    the per-example gradients of the layers' kernels and biases (not normalisation
    parameters). Opt-in: ``record.step_probes=[...,alpha]``; as ``gradient_noise``, not
    under batch norm nor on other layers than Dense and Conv."""
    return {"alpha": out.alpha}


def update_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """||Delta theta_l|| and ||Delta theta_l|| / ||theta_l|| over layer l's kernel and bias.

    Delta theta is the change the optimizer applied at this step (after clipping, weight
    decay and the learning rate); the ratio is the relative speed of each layer.
    """
    update = _layer_norms(_joined(layout.leaves(out.updates, "kernel"),
                                  layout.leaves(out.updates, "bias")))
    weight = _layer_norms(_joined(layout.leaves(out.params, "kernel"),
                                  layout.leaves(out.params, "bias")))
    return {"update_norm": update, "update_ratio": update / weight}


def update_cosine(out: StepOut, layout: Layout) -> dict[str, Array]:
    """cos(g_l, Delta theta_l): the cosine between layer l's gradient (kernel and bias,
    before clipping) and the change the optimizer applied to them.

    Plain SGD steps straight down the gradient: -1 at every layer, whatever the learning
    rate or a global-norm clip. Momentum, Adam's per-entry scaling, clipping by value and
    weight decay turn the step away from the gradient; near 0, a layer moves in a
    direction its own gradient does not ask for (Adam's sign-like steps on a vanishing
    gradient move the first layers as fast as the last). NaN where either is zero.
    """
    grads = pack(_joined(layout.leaves(out.grads, "kernel"), layout.leaves(out.grads, "bias")))
    steps = pack(_joined(layout.leaves(out.updates, "kernel"),
                         layout.leaves(out.updates, "bias")))

    def cosine(g: Rows, u: Rows) -> Array:  # unit rows first: no overflow
        return jnp.sum(g.x / _norms(g.x)[:, None] * (u.x / _norms(u.x)[:, None]), axis=-1)

    return {"update_cosine": jnp.concatenate([cosine(g, u)
                                              for g, u in zip(grads, steps, strict=True)])}


def clip_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Global gradient norm after clipping, and 1.0 where clipping changed the gradient.

    Only finite entries are compared: at a divergence step the non-finite gradient is
    not "clipped" (NaN differs from itself), and without clipping nothing ever fires.
    """
    changed = [jnp.any((c != g) & jnp.isfinite(c) & jnp.isfinite(g)) for c, g in zip(
        jax.tree.leaves(out.clipped), jax.tree.leaves(out.grads), strict=True)]
    return {"grad_global_norm_clipped": global_norm(out.clipped),
            "clip_fired": jnp.stack(changed).any().astype(out.loss.dtype)}


def time_delta_norm(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Recurrent nets: batch mean of ||delta_t^(n)|| = ||dl_n/dh_t^(n)|| for every time
    step t of every recurrent layer, [recurrent, time]: the gradient that reaches the
    state at step t through every later step (backpropagation through time). Its fall
    from t = T back to t = 1 is the vanishing gradient of Bengio, Simard & Frasconi 1994;
    the ratio of consecutive steps is the per-step gain of the state-to-state Jacobian."""
    deltas = jnp.stack(layout.time_deltas(out.deltas))  # [R, B, T, U]
    per_example = _norms(deltas)  # [R, B, T]
    s = _scale(per_example, axis=1)
    return {"time_delta_norm": jnp.mean(per_example / s, axis=1) * s[:, 0]}


def recurrent_grad_norms(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Recurrent nets, per recurrent layer: ||dL/dW_ih|| and ||dL/dW_hh||, the input and
    recurrent kernels' gradients apart (``grad_norm`` pools them). The recurrent kernel's
    gradient sums a contribution from every time step: it explodes first."""
    def norms(kernels: list[Array]) -> Array:
        return _layer_norms([k[None] for k in kernels])

    return {"grad_norm_ih": norms(layout.input_kernels(out.grads)),
            "grad_norm_hh": norms(layout.recurrent_kernels(out.grads))}


def spectral_radius(w: Array) -> Array:
    """rho(W) = max |lambda_i(W)|, the largest eigenvalue modulus of a square kernel.

    Computed directly by JAX's nonsymmetric eigensolver (``jnp.linalg.eigvals``: LAPACK's
    geev on CPUs; on NVIDIA and AMD GPUs cuSOLVER's geev, or LAPACK on the host where
    cuSOLVER has none: JAX >= 0.4.36 lowers it there). Its error is that of the
    eigenvalue's conditioning, ~1e-6 relative in float32 for the kernels vgrad
    initialises (orthogonal, identity, Gaussian), non-normal ones included.

    Platforms without an eigensolver (TPUs) use :func:`gelfand_radius` instead, whose
    error is stated there. (vgrad used Gelfand's formula at k = 1,024 everywhere before:
    for non-normal kernels it read 2.5e-4 to 1e-3 relative too high.)
    """
    return jax.lax.platform_dependent(w, cpu=_eig_radius, cuda=_eig_radius,
                                      rocm=_eig_radius, default=gelfand_radius)


def _eig_radius(w: Array) -> Array:
    return jnp.max(jnp.abs(jnp.linalg.eigvals(w))).astype(w.dtype)


#: Squarings of :func:`gelfand_radius`: k = 2^20.
GELFAND_SQUARINGS = 20


def gelfand_radius(w: Array, squarings: int = GELFAND_SQUARINGS) -> Array:
    """rho(W) = lim ||W^k||^(1/k) (Gelfand's formula) at k = 2^squarings, by repeated
    squaring with the scale kept in logs, and the spectral norm of W^k at the end (no
    eigensolver needed). Exact for normal matrices (orthogonal, identity, symmetric);
    otherwise ||W^k|| ~ C rho^k reads rho too high by a factor C^(1/k) = 1 + ln(C)/k
    (C grows with the eigenvectors' condition number, and like k^(m-1) for a Jordan
    block of size m): at k = 2^20 that is ~1e-6 relative for C up to ~3, ~2e-5 for
    C = 1e9, the float32 resolution of rho itself. (At k = 1,024 it was 2.5e-4 to 1e-3
    for non-normal Gaussian kernels.) A strongly defective kernel can defeat it: for
    0.9 I + 0.5 N (N the 48 x 48 shift) the normalised powers underflow float32 and it
    reads 0, where the eigensolver gives 0.9."""
    def square(carry, _):
        m, log_s = carry
        m = m @ m
        n = jnp.sqrt(jnp.sum(m * m))
        n = jnp.where(n > 0, n, 1.0)
        return (m / n, 2.0 * log_s + jnp.log(n)), None

    n0 = jnp.sqrt(jnp.sum(w * w))
    n0 = jnp.where(n0 > 0, n0, 1.0)
    (m, log_s), _ = jax.lax.scan(square, (w / n0, jnp.log(n0)), None, length=squarings)
    top = jnp.linalg.svd(m, compute_uv=False)[0]
    return jnp.exp((log_s + jnp.log(top)) / 2 ** squarings)


def recurrent_spectrum(view: Any, layout: Layout) -> dict[str, Array]:
    """Per recurrent layer: the largest singular value of the recurrent kernel (all gate
    blocks, [units, gates * units]) and the spectral radius of the block the state passes
    through linearly (the Elman kernel; LSTM's cell candidate g, GRU's candidate n). With
    a tanh RNN, radius < 1 forces vanishing gradients over long spans, and > 1 is
    necessary for exploding ones (Pascanu, Mikolov & Bengio 2013)."""
    kernels = layout.recurrent_kernels(view.params)
    block = layout.recurrent.candidate
    sv = jnp.stack([jnp.linalg.svd(k, compute_uv=False)[0] for k in kernels])
    radius = jnp.stack([spectral_radius(k[:, block * k.shape[0]:(block + 1) * k.shape[0]])
                        for k in kernels])
    return {"rec_sv_max": sv, "rec_radius": radius}


#: What a probe can need beyond the step's outputs and the parameters (``Probe.needs``);
#: the engine computes each only when a chosen probe needs it.
NEEDS = {
    # the values the network sows on the probe batch (``capture=True``): activations and
    # slopes, the forward signal at every delta point, residual branches and skips
    "captures": "epoch",
    # the singular values of the deep part's Jacobian on the first probe inputs
    "jacobian": "epoch",
    # the gradient of the loss on the whole probe batch (training mode)
    "probe_grads": "epoch",
    # a recurrent net's state-to-state Jacobians along its trajectory on the probe batch
    "state_jacobian": "epoch",
    # the attention layers' weights on the first ATTENTION_EXAMPLES probe examples
    "attention": "epoch",
    # the signals at the delta points on the probe batch through the initial parameters
    # (a copy of them carried in the training state)
    "initial_signals": "epoch",
    # the Hessian of that loss through Hessian-vector products (``vgrad.curvature``):
    # the whole Hessian's, and each layer's diagonal block's
    "curvature": "epoch",
    "curvature_blocks": "epoch",
    # and its spectral density by stochastic Lanczos quadrature
    "curvature_density": "epoch",
    # each example's own deltas (one backward pass per example; ``step.make_train_step``)
    "own_deltas": "step",
    # every Dense call's input and output gradient (``vgrad.noise``): per-example
    # gradient statistics at one matrix product per layer
    "taps": "step",
    # Cockpit's local step size: the taps, and the previous step's update and observation
    # carried in the training state
    "alpha": "step",
}
#: Needs whose programs hang when the member axis is split across several CPU devices
#: (seen with the Jacobian spectrum's forward-mode Jacobian and SVD: the program stops
#: on every device at once, idle; one CPU device runs it): a run that asks for one of
#: them trains on one device.
#: (The curvature probes run an eigensolver too.)
ONE_CPU_DEVICE = frozenset({"jacobian", "curvature", "curvature_blocks", "curvature_density",
                            "state_jacobian"})


@dataclass(frozen=True)
class Probe:
    """A registry entry: the reduction and the arrays it returns, with their axes; what
    the model must declare for it to run (``requires``): ``blocks`` (residual nets),
    ``activations`` (the activation after every layer but the last: every built-in
    model; a module instrumented automatically when it applies the run's ``act`` so),
    ``recurrent`` (recurrent nets), ``attention`` (attention layers that sow their
    weights) or ``feedforward`` (every other model); what it needs
    computed for it (``needs``, keys of :data:`NEEDS`); whether it is left out of the
    default probes (``opt_in``: its cost is not small); and the fixed bin edges of its
    histograms (``edges``: array name -> (axis name, edges), written beside its arrays)."""

    fn: Callable[[Any, Layout], dict[str, Array]]
    outputs: Mapping[str, tuple[str, ...]]
    requires: str = ""
    needs: tuple[str, ...] = ()
    opt_in: bool = False
    edges: Mapping[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}: expected some of {list(NEEDS)}")

    def applies(self, layout: Layout) -> bool:
        if self.requires == "attention":
            return layout.attention is not None
        if self.requires == "blocks":
            return layout.blocks is not None
        if self.requires == "recurrent":
            return layout.recurrent is not None
        if self.requires == "feedforward":
            return layout.recurrent is None
        if self.requires == "activations":
            return bool(layout.captures)
        return True

    def __call__(self, view: Any, layout: Layout) -> dict[str, Array]:
        return self.fn(view, layout)


_LAYER = ("layer",)

STEP_PROBES: dict[str, Probe] = {
    "global_norms": Probe(global_norms, {"loss": (), "grad_global_norm": ()}),
    "kernel_grad_stats": Probe(kernel_grad_stats, dict.fromkeys(
        ("grad_mean", "grad_std", "grad_norm", "grad_absmean", "grad_maxabs"), _LAYER)),
    "bias_grad_norm": Probe(bias_grad_norm, {"bias_grad_norm": _LAYER}),
    "delta_norm": Probe(delta_norm, {"delta_norm": _LAYER}),
    "delta_norm_own": Probe(delta_norm_own, {"delta_norm_own": _LAYER}, needs=("own_deltas",),
                            opt_in=True),
    "gradient_noise": Probe(gradient_noise, noise.outputs(), needs=("taps",), opt_in=True,
                            edges={"quantile_levels": ("quantile", noise.QUANTILES)}),
    "alpha": Probe(alpha, {"alpha": ()}, needs=("alpha",), opt_in=True),
    "update_stats": Probe(update_stats, {"update_norm": _LAYER, "update_ratio": _LAYER}),
    "update_cosine": Probe(update_cosine, {"update_cosine": _LAYER}, opt_in=True),
    "clip_stats": Probe(clip_stats, {"grad_global_norm_clipped": (), "clip_fired": ()}),
    "time_delta_norm": Probe(time_delta_norm, {"time_delta_norm": ("recurrent", "time")},
                             requires="recurrent"),
    "recurrent_grad_norms": Probe(recurrent_grad_norms, dict.fromkeys(
        ("grad_norm_ih", "grad_norm_hh"), ("recurrent",)), requires="recurrent"),
}


def _collect(registry: Mapping[str, Probe], view: Any, layout: Layout,
             which: Sequence[str] | None) -> dict[str, Array]:
    stats: dict[str, Array] = {}
    for name, probe in registry.items():
        if (which is None or name in which) and probe.applies(layout):
            stats.update(probe(view, layout))
    return stats


def applicable(registry: Mapping[str, Probe], which: Sequence[str], layout: Layout
               ) -> tuple[str, ...]:
    """The probes of ``which`` that run on a model of this ``layout``."""
    return tuple(n for n in which if registry[n].applies(layout))


def needs(registry: Mapping[str, Probe], which: Sequence[str]) -> frozenset[str]:
    """What the chosen probes of ``registry`` need computed for them: the union of their
    declared ``needs``."""
    return frozenset(need for name in which for need in registry[name].needs)


def outputs(registry: Mapping[str, Probe], which: Sequence[str] | None
            ) -> dict[str, tuple[str, ...]]:
    """The arrays the chosen probes of ``registry`` return, with their declared axes."""
    out: dict[str, tuple[str, ...]] = {}
    for name, probe in registry.items():
        if which is None or name in which:
            out.update(probe.outputs)
    return out


def template(axes: Mapping[str, tuple[str, ...]], sizes: Mapping[str, int],
             lead: tuple[int, ...], dtype: Any = jnp.float32
             ) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of arrays with declared ``axes``: ``lead`` + their sizes."""
    return {k: jax.ShapeDtypeStruct(lead + tuple(sizes[a] for a in dims), dtype)
            for k, dims in axes.items()}


def step_stats(out: StepOut, layout: Layout, which: Sequence[str] | None = None
               ) -> dict[str, Array]:
    """The per-step statistics of one step: every registered probe, or those in ``which``."""
    return _collect(STEP_PROBES, out, layout, which)


# --- epoch-boundary probes ---------------------------------------------------------------


class EpochView(NamedTuple):
    """What the epoch probes see at an epoch boundary."""

    params: Any
    train_loss: Array  # mean loss on the whole training set
    train_acc: Array
    test_loss: Array  # NaN when there is no test set
    test_acc: Array
    acts: list[Array]  # per hidden segment: a = f(z) on the probe batch, [n, probe, units]
    slopes: list[Array]  # per hidden segment: f'(z) on the probe batch, [n, probe, units]
    slope_max: list[Array]  # per hidden segment: max |f'| over z in [-10, 10], [n, units]
    probe_grads: Any  # gradient of the loss on the probe batch (training mode)
    sat_threshold: Array | float
    # per segment: the signal at each layer's delta point on the probe batch (the MLP's
    # pre-activation z_l, a residual block's output h_k), [n, probe, units]
    signals: list[Array] | None = None
    branches: Array | None = None  # residual nets: alpha F(h) per block, [D, probe, units]
    skips: Array | None = None  # and the skip path h, [D, probe, units]
    # singular values of the deep part's Jacobian d h_last / d h_0 for the first
    # JACOBIAN_EXAMPLES probe inputs, [examples, k] (``vgrad.jacobian``)
    jacobian_sv: Array | None = None
    # recurrent nets: the largest singular value of each step's state-to-state Jacobian
    # on the first probe examples, [recurrent, examples, T] (``rnn.state_jacobian_sv``)
    state_jacobian_sv: Array | None = None
    # the probe-batch loss's Hessian: extreme eigenvalues, trace, top eigenvector's mass
    # per layer, per-layer block eigenvalues (``vgrad.curvature.curvature``)
    curvature: dict[str, Array] | None = None
    # attention layers: their weights on the first ATTENTION_EXAMPLES probe examples,
    # [examples, heads, queries, keys] each
    attention: list[Array] | None = None
    # per segment: the signal at each delta point on the probe batch through the
    # initial parameters (``TrainState.initial``), [n, probe, units]
    initial_signals: list[Array] | None = None


def weight_stats(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Mean and std of each kernel (the figure of "Visualizing the vanishing gradient
    problem", its WeightCapture callback)."""
    mean, std, *_ = _moments(layout.leaves(view.params, "kernel"))
    return {"weight_mean": mean, "weight_std": std}


def evaluation(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Loss and accuracy on the full training and test sets."""
    return {"train_loss": view.train_loss, "train_acc": view.train_acc,
            "test_loss": view.test_loss, "test_acc": view.test_acc}


def activation_stats(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Per hidden layer, on the fixed probe batch (examples n, units j):

    - ``act_mean``, ``act_std``: mean and std of a_nj = f(z_nj) over n and j;
    - ``act_dead_frac``: fraction of units with f'(z_nj) = 0 for every example n
      (dead ReLUs: no gradient reaches their inputs whatever the example);
    - ``act_sat_frac``: fraction of pairs (n, j) in the saturated regime,
      |f'(z_nj)| < sat_threshold * max_z |f'(z)| (sigmoid and tanh tails; for ReLU the
      whole negative side, so dead units count as saturated too).
    """
    mean, std, *_ = _moments(view.acts)
    # Each layer's slopes [n, probe, units] with its max slope as one more row, packed
    # along the units.
    packed = pack([jnp.concatenate([d, m[:, None, :]], axis=1)
                   for d, m in zip(view.slopes, view.slope_max, strict=True)], axis=2)

    def fractions(rows: Rows) -> Array:
        slopes, top = rows.x[:, :-1], rows.x[:, -1]  # [n, probe, U], [n, U]
        units = rows.mask  # [n, U]: the real units of each layer
        dead = jnp.all(slopes == 0, axis=1) & units
        sat = (jnp.abs(slopes) < view.sat_threshold * top[:, None, :]) & units[:, None, :]
        return jnp.stack([dead.sum(axis=1) / rows.count,
                          sat.sum(axis=(1, 2)) / (rows.count * slopes.shape[1])])

    dead, sat = _per_layer(fractions, packed)
    return {"act_mean": mean, "act_std": std, "act_dead_frac": dead, "act_sat_frac": sat}


#: Probe examples whose pairwise correlations give c^l (the first ones of the probe batch):
#: 64 examples are 2,016 pairs, and the cost stays small at any depth.
CORR_EXAMPLES = 64


def forward_signal(view: EpochView, layout: Layout) -> dict[str, Array]:
    """The forward signal at every layer's delta point on the probe batch (examples n,
    units j; the MLP's pre-activation z_l, a residual block's output h_k):

    - ``signal_q``: q^l = mean over n and j of z_nj^2, the squared length per unit that
      mean-field theory's length map predicts (Poole et al. 2016; ``vgrad.theory``);
    - ``signal_c``: c^l = mean over pairs n != m of z_n . z_m / (|z_n| |z_m|), among
      the first ``CORR_EXAMPLES`` probe examples: the correlation of the
      representations of different inputs, which the C-map predicts (Schoenholz et al.
      2017). c^l -> 1: every input looks alike to the deep layers (the ordered phase).
    """
    blocks = pack(view.signals, axis=2)

    def length(rows: Rows) -> Array:  # [n]
        s = _scale(rows.x.reshape(rows.x.shape[0], -1))[:, 0]
        y = rows.x / s[:, None, None]
        return jnp.sum(y * y, axis=(1, 2)) / (rows.count * rows.x.shape[1]) * s * s

    def correlation(rows: Rows) -> Array:  # [n]
        z = rows.x[:, :CORR_EXAMPLES]
        norms = _norms(z)  # [n, E]
        u = z / jnp.where(norms > 0, norms, jnp.nan)[..., None]
        gram = jnp.einsum("nak,nbk->nab", u, u)
        e = z.shape[1]
        return (jnp.sum(gram, axis=(1, 2)) - jnp.trace(gram, axis1=1, axis2=2)) / (e * (e - 1))

    return {"signal_q": _per_layer(length, blocks),
            "signal_c": _per_layer(correlation, blocks)}


def _abs_mean(rows: Rows) -> Array:
    """Per layer, the mean |x| over the examples and real units of ``rows.x`` [n, B, K]
    (on the values divided by their largest magnitude: no overflow)."""
    s = _scale(rows.x.reshape(rows.x.shape[0], -1))[:, 0]
    return (jnp.sum(jnp.abs(rows.x / s[:, None, None]), axis=(1, 2))
            / (rows.count * rows.x.shape[1]) * s)


def coord_check(view: EpochView, layout: Layout) -> dict[str, Array]:
    """The coordinate check of the maximal-update parametrization (Yang et al. 2022,
    "Tensor Programs V", their Figure 5; microsoft/mup's ``get_coord_data``): per layer,
    on the probe batch, the typical size of a coordinate of the signal at its delta
    point (the MLP's pre-activation z_l; the last layer's: the logits),

    - ``coord_l1``: mean |x| over examples and units (mup's "l1");
    - ``coord_change_l1``: mean |x - x_0|, x_0 the same layer's signal on the same
      inputs through the initial parameters: how far training has moved it.

    Both in inference mode (batch norm through its running averages, the initial ones
    for x_0: the change includes theirs; mup measures in training mode). Recorded at
    initialisation and after every epoch; against width, a layer whose
    change grows (falls) with width blows up (stops learning) in the limit, and under
    muP every line is flat (``param=mup``, the ``coord_check`` preset).
    """
    change = [x - x0 for x, x0 in zip(view.signals, view.initial_signals, strict=True)]
    return {"coord_l1": _per_layer(_abs_mean, pack(view.signals, axis=2)),
            "coord_change_l1": _per_layer(_abs_mean, pack(change, axis=2))}


def residual_signal(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Per residual block k, on the probe batch: the variance of the branch output
    alpha F(h_{k-1}) and of the skip path h_{k-1} (over examples, averaged over units),
    the signal-propagation plots of Brock, De & Smith 2021 ("Characterizing signal
    propagation to close the performance gap in unnormalized ResNets"). The stream's
    variance after the block is their sum plus twice their covariance."""
    def variance(x: Array) -> Array:
        return jnp.mean(jnp.var(x, axis=1), axis=-1)

    return {"branch_var": variance(view.branches), "skip_var": variance(view.skips)}


#: Probe inputs whose Jacobian spectrum is measured (each costs width forward passes).
JACOBIAN_EXAMPLES = 4
#: Fixed bins of log10 singular values: 0.125 decades from 1e-4 to 1e4.
SV_EDGES = np.linspace(-4.0, 4.0, 65, dtype=np.float32)


#: A singular value s_i of J below ``SV_FLOOR`` x eps x s_max (eps of the run's dtype:
#: 1.2e-6 s_max in float32, 2.2e-15 s_max in float64) is not resolved: J is computed in
#: the run's dtype through every layer, and its SVD then resolves only the singular values
#: above its rounding error. Measured on the isometry preset's nets (tanh and ReLU,
#: Gaussian kernels, depth 16 to 128, float32 against the same nets in float64): above
#: the floor every singular value agreed with float64 within 1.1% (mostly < 0.5%); at
#: 1 x eps x s_max, they were off by up to 13x. The true smallest singular value of a
#: deep Gaussian net lies tens of decades lower (of order 1e-80 at depth 64, estimated by
#: a product of QR factors in float64, in logs), below float64's floor too: computing the
#: probe in float64 would move the noise (to ~1e-18), not remove it.
SV_FLOOR = 10.0


def jacobian_spectrum(view: EpochView, layout: Layout) -> dict[str, Array]:
    """The singular values s of J = d h_last / d h_0 (``vgrad.jacobian``) on the first
    ``JACOBIAN_EXAMPLES`` probe inputs:

    - ``jac_sv_max``: the largest (mean over inputs);
    - ``jac_sv_min``: the smallest (mean over inputs), **NaN when it is below the
      resolvable floor** ``SV_FLOOR`` x eps x s_max for any input: the computed value
      is then rounding noise (float32 returns ~1e-9 for a value whose truth may be
      1e-85), and all that is known is that it lies below the floor;
    - ``jac_sv_unresolved``: the fraction of all singular values below that floor (0: the
      whole spectrum is measured; a deep Gaussian tanh net leaves most of it below);
    - ``jac_sv_ms``: the mean of s^2 (chi_1^depth in mean-field theory: 1 at
      criticality; the values below the floor add nothing to it);
    - ``jac_sv_hist``: a fixed-bin histogram of log10 s over all inputs (``SV_EDGES``;
      below and above count in the first and last bins). Values below the floor count
      where their noise falls: in the first bin ("below 1e-4") while s_max < 80.

    Dynamical isometry (Pennington et al. 2017) is every s near 1.
    Opt-in: ``record.epoch_probes=[...,jacobian_spectrum]``."""
    s = view.jacobian_sv  # [inputs, k], largest first
    floor = SV_FLOOR * jnp.finfo(s.dtype).eps * s[:, :1]
    smallest = s[:, -1]
    resolved = jnp.all(smallest >= floor[:, 0])
    counts = log10_hists([s.reshape(1, -1)], SV_EDGES)[0]
    return {"jac_sv_max": jnp.mean(s[:, 0]),
            "jac_sv_min": jnp.where(resolved, jnp.mean(smallest), jnp.nan),
            "jac_sv_unresolved": jnp.mean((s < floor).astype(s.dtype)),
            "jac_sv_ms": jnp.mean(s * s), "jac_sv_hist": counts}


def state_jacobian(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Recurrent nets: the state-to-state Jacobian J_t = d s_t / d s_{t-1} of each layer
    along its own trajectory on the first 16 probe examples (s = h; for LSTM (h, c)):

    - ``state_jac_sv``: the mean over examples of its largest singular value at every
      step t = 1 ... T, [recurrent, time]: where in the sequence the state's gradient
      shrinks (< 1) or grows (> 1);
    - ``state_jac_sv_mean``: its mean over t too, [recurrent]; the gradient over k steps
      is bounded by the product of k of them (Pascanu, Mikolov & Bengio 2013).

    The recurrent kernel's spectrum (``recurrent_spectrum``) bounds the linear part;
    this includes the gates and the nonlinearity at the states the net visits. Opt-in:
    ``record.epoch_probes=[...,state_jacobian]``."""
    sv = view.state_jacobian_sv  # [R, E, T]
    return {"state_jac_sv": jnp.mean(sv, axis=1), "state_jac_sv_mean": jnp.mean(sv, axis=(1, 2))}


#: Probe examples whose attention weights the entropy is taken over.
ATTENTION_EXAMPLES = 64


def attention_entropy(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Attention layers: the entropy -sum_k p_k ln p_k of each head's attention weights,
    in nats, averaged over the first ``ATTENTION_EXAMPLES`` probe examples (each holds
    heads x T^2 weights per layer) and the query positions, [attention, head].
    A head whose entropy falls to 0 attends to one position only: attention entropy
    collapse, the Transformer's own failure mode, which comes with training instability
    (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
    Collapse"). Under a causal mask query t sees t + 1 keys, so uniform attention scores
    the mean of ln(t + 1) over t, not ln T."""
    out = []
    for p in view.attention:  # [B, H, Q, K]
        plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
        out.append(jnp.mean(-jnp.sum(plogp, axis=-1), axis=(0, 2)))
    return {"attn_entropy": jnp.stack(out)}


def hessian(view: EpochView, layout: Layout) -> dict[str, Array]:
    """The Hessian H of the loss on the probe batch (training mode), from Hessian-vector
    products (``vgrad.curvature``: ``LANCZOS_STEPS`` = 40 Lanczos iterations with full
    reorthogonalisation, ``TRACE_PROBES`` = 32 Rademacher vectors):

    - ``hess_max``, ``hess_min``: its largest and smallest eigenvalue (the sharpness of
      Cohen et al. 2021; negative curvature);
    - ``hess_evec_mass``: the top eigenvector's squared mass on each layer's kernel and
      bias (init2winit's ``max_evec_decomp``; the rest sits outside the layers);
    - ``hess_trace``, ``hess_trace_se``: Hutchinson's trace estimate and its standard
      error.

    Cost per member and epoch: 40 + 32 HVPs of the probe batch's loss (an HVP costs
    about two gradients). Opt-in: ``record.epoch_probes=[...,hessian]``."""
    return {k: v for k, v in view.curvature.items() if k != "hess_max_layer"}


def hessian_blocks(view: EpochView, layout: Layout) -> dict[str, Array]:
    """``hess_max_layer``: the largest eigenvalue of each layer's diagonal block of the
    probe batch's Hessian (its kernel and bias; 40 Lanczos steps each): which layer is
    sharp. Cost per member and epoch: layers x 40 HVPs. Opt-in:
    ``record.epoch_probes=[...,hessian_blocks]``."""
    return {"hess_max_layer": view.curvature["hess_max_layer"]}


def hessian_density(view: EpochView, layout: Layout) -> dict[str, Array]:
    """The spectral density of the probe batch's Hessian by stochastic Lanczos quadrature
    (``vgrad.curvature.density``: ``SLQ_DRAWS`` = 2 start vectors x ``SLQ_STEPS`` = 60
    Lanczos steps, Gaussian smoothing of variance 1e-5 rho^2): ``hess_density``, the mass
    in each fixed bin of lambda / rho (``density_edges``), and ``hess_density_scale``,
    rho (the largest |Ritz value|). Where the bulk sits near 0 and which outliers leave
    it (Ghorbani, Krishnan & Xiao 2019; Papyan 2019). Cost per member and epoch: 120
    HVPs. Opt-in: ``record.epoch_probes=[...,hessian_density]``."""
    return {k: view.curvature[k] for k in ("hess_density", "hess_density_scale")}


def log10_hists(xs: list[Array], edges: np.ndarray = HIST_EDGES) -> Array:
    """Counts of log10|x| in the fixed bins ``edges``, one row per row of each array
    (arrays [n, ...]: n layers), [sum of n, B].

    The bins are uniform, so an entry's bin is arithmetic, and one ``bincount`` over all
    rows (offset by row) replaces a search per row. Values below the first edge (exact
    zeros included) count in the first bin, above the last (inf included) in the last;
    NaN entries are not counted.
    """
    bins = edges.size - 1
    low, width = edges[0], edges[1] - edges[0]
    rows = [x.reshape(x.shape[0], -1) for x in xs]
    logs = jnp.concatenate([jnp.log10(jnp.abs(r)).ravel() for r in rows])
    first = np.cumsum([0] + [r.shape[0] for r in rows])
    row = jnp.concatenate([
        jnp.repeat(jnp.arange(r.shape[0], dtype=jnp.int32) + f, r.shape[1])
        for r, f in zip(rows, first, strict=False)])
    col = jnp.clip(jnp.floor((logs - low) / width), 0, bins - 1)
    idx = row * bins + jnp.where(jnp.isnan(col), 0, col).astype(jnp.int32)
    counts = jnp.bincount(idx, weights=(~jnp.isnan(logs)).astype(logs.dtype),
                          length=int(first[-1]) * bins)
    return counts.reshape(int(first[-1]), bins)


def probe_bias_grad_norm(view: EpochView, layout: Layout) -> dict[str, Array]:
    """||dC/db_l|| of the loss averaged over the whole probe batch, [L].

    Nielsen's measurement (``nielsen`` preset): with ``record.probe_size=1000`` it is the
    norm of the bias gradient averaged over 1,000 training images, at initialisation
    (epoch 0) and after every epoch, free of the noise of a 10-example mini-batch.
    """
    return {"probe_bias_grad_norm": _layer_norms(layout.leaves(view.probe_grads, "bias"))}


def histograms(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Fixed-bin histograms of log10|dL/dW_l| (probe batch) and of log10|W_l|, [L, B]."""
    return {"grad_hist": log10_hists(layout.leaves(view.probe_grads, "kernel")),
            "weight_hist": log10_hists(layout.leaves(view.params, "kernel"))}


_EVALUATION = ("train_loss", "train_acc", "test_loss", "test_acc")

EPOCH_PROBES: dict[str, Probe] = {
    "evaluation": Probe(evaluation, dict.fromkeys(_EVALUATION, ())),
    "weight_stats": Probe(weight_stats, {"weight_mean": _LAYER, "weight_std": _LAYER}),
    "activation_stats": Probe(activation_stats, dict.fromkeys(
        ("act_mean", "act_std", "act_dead_frac", "act_sat_frac"), ("hidden",)),
        requires="activations", needs=("captures",)),
    "probe_bias_grad_norm": Probe(probe_bias_grad_norm, {"probe_bias_grad_norm": _LAYER},
                                  needs=("probe_grads",)),
    "histograms": Probe(histograms, {"grad_hist": ("layer", "bin"),
                                     "weight_hist": ("layer", "bin")}, needs=("probe_grads",)),
    "forward_signal": Probe(forward_signal, {"signal_q": _LAYER, "signal_c": _LAYER},
                            needs=("captures",), opt_in=True),
    "coord_check": Probe(coord_check, {"coord_l1": _LAYER, "coord_change_l1": _LAYER},
                         needs=("captures", "initial_signals"), opt_in=True),
    "residual_signal": Probe(residual_signal, {"branch_var": ("block",),
                                               "skip_var": ("block",)}, requires="blocks",
                             needs=("captures",), opt_in=True),
    "jacobian_spectrum": Probe(jacobian_spectrum, {
        **dict.fromkeys(("jac_sv_max", "jac_sv_min", "jac_sv_unresolved", "jac_sv_ms"), ()),
        "jac_sv_hist": ("sv_bin",)}, requires="feedforward", needs=("jacobian",), opt_in=True,
        edges={"sv_edges": ("sv_edge", SV_EDGES)}),
    "recurrent_spectrum": Probe(recurrent_spectrum, dict.fromkeys(
        ("rec_sv_max", "rec_radius"), ("recurrent",)), requires="recurrent"),
    "state_jacobian": Probe(state_jacobian, {"state_jac_sv": ("recurrent", "time"),
                                             "state_jac_sv_mean": ("recurrent",)},
                            requires="recurrent", needs=("state_jacobian",), opt_in=True),
    "attention_entropy": Probe(attention_entropy, {"attn_entropy": ("attention", "head")},
                               requires="attention", needs=("attention",)),
    "hessian": Probe(hessian, {**dict.fromkeys(("hess_max", "hess_min", "hess_trace",
                                                "hess_trace_se"), ()),
                               "hess_evec_mass": _LAYER}, needs=("curvature",), opt_in=True),
    "hessian_blocks": Probe(hessian_blocks, {"hess_max_layer": _LAYER},
                            needs=("curvature_blocks",), opt_in=True),
    "hessian_density": Probe(hessian_density, {"hess_density": ("density_bin",),
                                               "hess_density_scale": ()},
                             needs=("curvature_density",), opt_in=True,
                             edges={"density_edges": ("density_edge", DENSITY_EDGES)}),
}
#: What the loop adds to the epoch statistics: the fraction of the epoch's steps whose
#: gradient clipping changed the gradient (NaN at initialisation).
LOOP_EPOCH_OUTPUTS = {"clip_frac": ()}
#: Probes left out of the default ``record.step_probes`` and ``record.epoch_probes``
#: (their cost is not small), from their entries.
OPT_IN = tuple(n for r in (STEP_PROBES, EPOCH_PROBES) for n, p in r.items() if p.opt_in)
#: The lengths of the bin axes the probes declare (the model's axes: ``Layout.axis_sizes``).
BIN_AXES = {"bin": HIST_EDGES.size - 1, "sv_bin": SV_EDGES.size - 1,
            "quantile": noise.QUANTILES.size, "density_bin": DENSITY_EDGES.size - 1}


def edges(arrays: Iterable[str]) -> dict[str, tuple[str, np.ndarray]]:
    """The fixed bin edges to write beside ``arrays`` (name -> (axis name, edges)): those
    of every probe that returns one of them."""
    present = set(arrays)
    return {name: edge for r in (STEP_PROBES, EPOCH_PROBES) for p in r.values()
            if present & set(p.outputs) for name, edge in p.edges.items()}


def layer_histograms() -> tuple[str, ...]:
    """The arrays that are per-layer histograms of log10|value| in ``HIST_EDGES``
    (declared with axes (layer, bin))."""
    return tuple(k for r in (STEP_PROBES, EPOCH_PROBES) for p in r.values()
                 for k, axes in p.outputs.items() if axes == ("layer", "bin"))


def epoch_outputs(which: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    """The per-epoch arrays of the chosen epoch probes (evaluation always) and the loop."""
    which = None if which is None else {"evaluation", *which}
    return {**outputs(EPOCH_PROBES, which), **LOOP_EPOCH_OUTPUTS}


def epoch_stats(view: EpochView, layout: Layout, which: Sequence[str] | None = None
                ) -> dict[str, Array]:
    """The per-epoch statistics at one epoch boundary: every registered probe, or those in
    ``which`` (the evaluation always runs: the run's summary needs it)."""
    which = None if which is None else {"evaluation", *which}
    return _collect(EPOCH_PROBES, view, layout, which)
