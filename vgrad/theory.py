"""Mean-field predictions for deep fully connected networks at initialisation.

For kernels W_ij ~ N(0, sigma_w^2 / fan_in) and biases ~ N(0, sigma_b^2), in the limit
of wide layers (Poole et al. 2016, "Exponential expressivity in deep neural networks
through transient chaos"; Schoenholz et al. 2017, "Deep information propagation"):

- the pre-activations z_l of an input are Gaussian with variance q_l, where
  q_0 = sigma_w^2 * mean(x^2) + sigma_b^2 and the *length map* is
  q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) u)^2] + sigma_b^2 (u ~ N(0, 1));
  it converges to a fixed point q*;
- the backpropagated gradient delta_l = dL/dz_l obeys, for any widths,
  E||delta_l||^2 = chi_l E||delta_{l+1}||^2 with chi_l = sigma_w^2 E[phi'(sqrt(q_l) u)^2];
  at q* this is chi_1, and gradients vanish (chi_1 < 1) or explode (chi_1 > 1) over
  the depth scale xi_grad = -1 / ln chi_1 (e.g. ReLU: chi = sigma_w^2 / 2, so He's
  sigma_w^2 = 2 keeps gradients flat).

- two inputs whose pre-activations have correlation c_l: the *correlation map*
  c_{l+1} = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q* has a fixed point c*
  (1 in the ordered phase, below 1 in the chaotic one) approached over the depth scale
  xi_c = -1 / ln chi_c, chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at c*; xi_c diverges at
  the order-to-chaos boundary chi_1 = 1, and nets train only while their depth is below
  about 6 xi_c (Schoenholz et al. 2017).

So ``delta_profile`` gives the predicted ||delta_l|| of every layer relative to the
output layer's, the quantity vgrad records as ``delta_norm`` (batch mean of per-example
norms; for wide layers the norms concentrate, so mean and root-mean-square agree).

Gaussian expectations use a midpoint rule on 240,000 points over [-12, 12] standard
deviations rather than Gauss-Hermite quadrature, which is exact for polynomials but off
by several percent on the steps and kinks of ReLU-like derivatives (ReLU's chi at
sigma_w^2 = 2 came out 0.91 with 201 Hermite nodes, 1.0000 with this rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]

_EDGES = np.linspace(-12.0, 12.0, 240_001)
_NODES = (_EDGES[:-1] + _EDGES[1:]) / 2  # midpoints: none at 0, where ReLU' steps
_WEIGHTS = np.exp(-_NODES ** 2 / 2)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()  # E[f(u)] = sum w_i f(u_i), u ~ N(0, 1)


def gaussian_mean(f: Fn, q: float) -> float:
    """E[f(sqrt(q) u)] for u ~ N(0, 1)."""
    return float(np.sum(_WEIGHTS * f(np.sqrt(q) * _NODES)))


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity and its derivative as numpy functions."""

    phi: Fn
    dphi: Fn


def activation(cfg: Any) -> Activation:
    """The ``act`` config node as numpy functions (its learnable parameters at their
    initial values; RReLU at its evaluation slope). Maxout is not elementwise: no theory."""
    from vgrad import activations

    factory, pieces = activations.build(cfg)
    if pieces != 1:
        raise ValueError(f"act={cfg.name}: mean-field theory needs an elementwise activation")
    module = factory()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 1)))

    def f(u):
        return module.apply(variables, u[:, None])[:, 0]

    f = jax.jit(f)
    slope = jax.jit(jax.vmap(jax.grad(lambda u: f(u[None])[0])))
    return Activation(lambda z: np.asarray(f(jnp.asarray(z, jnp.float32)), np.float64),
                      lambda z: np.asarray(slope(jnp.asarray(z, jnp.float32)), np.float64))


def length_map(act: Activation, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) u)^2] + sigma_b^2."""
    return sigma_w2 * gaussian_mean(lambda z: act.phi(z) ** 2, q) + sigma_b2


def q_star(act: Activation, sigma_w2: float, sigma_b2: float, q0: float = 1.0,
           iterations: int = 500, tol: float = 1e-10) -> float:
    """The fixed point of the length map (by iteration; it is attracting)."""
    q = q0
    for _ in range(iterations):
        q_next = length_map(act, q, sigma_w2, sigma_b2)
        if abs(q_next - q) <= tol * max(1.0, q):
            return q_next
        q = q_next
    return q


def input_q_for(q: float, sigma_w2: float, sigma_b2: float) -> float:
    """The inputs' mean squared feature (``data.input_q``) that starts the first layer's
    pre-activations at length ``q``: q = sigma_w^2 * input_q + sigma_b^2, inverted.

    With ``q = q_star(...)`` every layer starts at the fixed point, the setting in which
    Pennington, Schoenholz & Ganguli (2017) state dynamical isometry."""
    if not q > sigma_b2:
        raise ValueError(f"q = {q} is not above sigma_b^2 = {sigma_b2}: no input reaches it")
    return (q - sigma_b2) / sigma_w2


def chi(act: Activation, q: float, sigma_w2: float) -> float:
    """chi = sigma_w^2 E[phi'(sqrt(q) u)^2]: the factor of E||delta||^2 per layer."""
    return sigma_w2 * gaussian_mean(lambda z: act.dphi(z) ** 2, q)


def gradient_depth_scale(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """xi_grad = -1 / ln chi_1 at the fixed point (infinite at criticality)."""
    c = chi(act, q_star(act, sigma_w2, sigma_b2), sigma_w2)
    return float("inf") if c == 1.0 else -1.0 / np.log(c)


def variances(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
              q_input: float) -> list[float]:
    """q_l of the hidden layers' pre-activations, l = 0 .. depth - 1, for inputs with
    mean squared feature ``q_input`` (all layers drawn with the same sigma_w^2)."""
    q = [sigma_w2 * q_input + sigma_b2]
    for _ in range(depth - 1):
        q.append(length_map(act, q[-1], sigma_w2, sigma_b2))
    return q


def delta_profile(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
                  q_input: float) -> np.ndarray:
    """Predicted ||delta_l|| / ||delta_output|| for the Dense layers l = 0 .. depth
    (the output layer last, where the ratio is 1)."""
    q = variances(act, depth, sigma_w2, sigma_b2, q_input)
    log_ratio = [0.0]
    for layer in reversed(range(depth)):  # delta_l = phi'(z_l) * W_{l+1}^T delta_{l+1}
        log_ratio.append(log_ratio[-1] + 0.5 * np.log(chi(act, q[layer], sigma_w2)))
    return np.exp(np.array(log_ratio[::-1]))


def mean_delta_profile(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
                       x: np.ndarray, quantiles: int = 32) -> np.ndarray:
    """``delta_profile`` averaged over a batch of inputs ``x`` [N, features].

    The theory is per input: an input's squared length sets q_0 and so the whole
    profile. vgrad's ``delta_norm`` is a batch mean, and on real data the squared
    lengths spread (digits, standardised: 5%-95% from 0.47 to 1.8), which moves the
    profile by ~10% against the one of the mean input. The output layer's delta
    hardly depends on the input at initialisation, so the batch mean of per-input
    profiles is the prediction. Averaged over ``quantiles`` evenly spaced quantiles of
    the squared lengths, for speed."""
    q_inputs = np.mean(np.asarray(x, np.float64) ** 2, axis=1)
    q_grid = np.quantile(q_inputs, (np.arange(quantiles) + 0.5) / quantiles)
    return np.mean([delta_profile(act, depth, sigma_w2, sigma_b2, float(q)) for q in q_grid],
                   axis=0)


# --- two inputs: the correlation map (Poole et al. 2016; Schoenholz et al. 2017) ----------

# A coarser midpoint rule in two dimensions (the 1-D one squared would be 5.8e10 points).
_EDGES_2D = np.linspace(-8.0, 8.0, 801)
_NODES_2D = (_EDGES_2D[:-1] + _EDGES_2D[1:]) / 2
_WEIGHTS_2D = np.exp(-_NODES_2D ** 2 / 2)
_WEIGHTS_2D = _WEIGHTS_2D / _WEIGHTS_2D.sum()


def gaussian_mean_2d(f: Callable[[np.ndarray, np.ndarray], np.ndarray], q: float,
                     c: float) -> float:
    """E[f(u1, u2)] for (u1, u2) Gaussian with variances q and correlation c:
    u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), z1, z2 ~ N(0, 1). ``f``
    takes two flat arrays."""
    z1, z2 = np.meshgrid(_NODES_2D, _NODES_2D, indexing="ij")
    u1 = np.sqrt(q) * z1
    u2 = np.sqrt(q) * (c * z1 + np.sqrt(max(1.0 - c * c, 0.0)) * z2)
    weights = _WEIGHTS_2D[:, None] * _WEIGHTS_2D[None, :]
    return float(np.sum(weights.ravel() * f(u1.ravel(), u2.ravel())))


def correlation_map(act: Activation, c: float, q: float, sigma_w2: float,
                    sigma_b2: float) -> float:
    """c_{l+1} = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q for two inputs whose
    pre-activations have length q (at the fixed point q*) and correlation c_l."""
    return (sigma_w2 * gaussian_mean_2d(lambda a, b: act.phi(a) * act.phi(b), q, c)
            + sigma_b2) / q


def c_star(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """The stable fixed point of the correlation map at q*: 1 in the ordered phase
    (chi_1 <= 1); in the chaotic phase c = 1 is unstable and c* < 1 is the root of
    c_map(c) - c below it (Brent's method: iterating the map crawls near the boundary)."""
    from scipy.optimize import brentq

    q = q_star(act, sigma_w2, sigma_b2)
    if chi(act, q, sigma_w2) <= 1.0:
        return 1.0

    def gap(c: float) -> float:
        return correlation_map(act, c, q, sigma_w2, sigma_b2) - c

    # Just below 1 the map falls below the diagonal (slope chi_1 > 1 at c = 1); the
    # closer to the boundary, the closer to 1 that is.
    top = 1.0 - 1e-2
    while gap(top) >= 0.0 and top < 1.0 - 1e-9:
        top = 1.0 - (1.0 - top) / 10.0
    if gap(top) >= 0.0:
        return 1.0
    return float(brentq(gap, 0.0, top, xtol=1e-12)) if gap(0.0) > 0.0 else 0.0


def critical_sigma_b2(act: Activation, sigma_w2: float, high: float = 1.0) -> float:
    """The sigma_b^2 that puts sigma_w^2 on the order-to-chaos boundary (chi_1 = 1):
    for tanh, sigma_w^2 slightly above 1 with a tiny sigma_b^2 gives a small q*, the
    near-linear regime where orthogonal kernels achieve dynamical isometry (Pennington
    et al. 2017)."""
    from scipy.optimize import brentq

    return float(brentq(lambda b: chi(act, q_star(act, sigma_w2, b), sigma_w2) - 1.0,
                        0.0, high, xtol=1e-12))


def critical_sigma_w2(act: Activation, sigma_b2: float, low: float = 0.5,
                      high: float = 8.0) -> float:
    """The order-to-chaos boundary: the sigma_w^2 at which chi_1 = 1 at q* (tanh,
    sigma_b^2 = 0.05: 1.76, Schoenholz et al. 2017)."""
    from scipy.optimize import brentq

    return float(brentq(lambda s: chi(act, q_star(act, s, sigma_b2), s) - 1.0, low, high,
                        xtol=1e-6))


def chi_c(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at (q*, c*): the slope of the correlation
    map at its fixed point. Equal to chi_1 where c* = 1 (the ordered phase)."""
    q, c = q_star(act, sigma_w2, sigma_b2), c_star(act, sigma_w2, sigma_b2)
    if c >= 1.0 - 1e-9:
        return chi(act, q, sigma_w2)
    return sigma_w2 * gaussian_mean_2d(lambda a, b: act.dphi(a) * act.dphi(b), q, c)


def correlation_depth_scale(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """xi_c = -1 / ln chi_c: the depth over which two inputs' correlation reaches c*
    (infinite at the order-to-chaos boundary); Schoenholz et al. 2017 find that nets
    train only while their depth is below about 6 xi_c."""
    c = chi_c(act, sigma_w2, sigma_b2)
    return float("inf") if c >= 1.0 else -1.0 / np.log(c)


def sigma_b2_of(bias_init: Any) -> float:
    """sigma_b^2 of a zero-mean bias initializer (zeros: 0)."""
    if bias_init.name == "zeros":
        return 0.0
    if bias_init.name == "normal" and bias_init.mean == 0:
        return float(bias_init.std) ** 2
    if bias_init.name == "mean_field":
        return float(bias_init.sigma_b2)
    raise ValueError(f"bias_init={bias_init.name}: use zeros, mean_field or a zero-mean "
                     "normal")


def sigma_w2_of(init: Any) -> float:
    """sigma_w^2 (= fan_in x Var(W)) of a fan-in-scaled, zero-mean kernel initializer."""
    fan_in_scales = {"he_normal": 2.0, "he_uniform": 2.0, "lecun_normal": 1.0,
                     "lecun_uniform": 1.0, "nielsen": 1.0}
    if init.name in fan_in_scales:
        return fan_in_scales[init.name]
    if init.name == "variance_scaling" and init.mode == "fan_in":
        return float(init.scale)
    if init.name == "mean_field":
        return float(init.sigma_w2)
    raise ValueError(f"init={init.name}: sigma_w^2 is not a constant of the fan-in; use "
                     "mean_field, variance_scaling (mode=fan_in) or he_*/lecun_*/nielsen")


# --- per-input iterates on real data (what the probes measure on the probe batch) ---------

#: Gauss-Hermite rule for the per-pair iterates: smooth activations need few nodes, and
#: thousands of input pairs are iterated at once.
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(48)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def signal_profiles(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
                    x: np.ndarray, examples: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Predicted q^l and c^l at the pre-activations of the Dense layers l = 0 .. depth (the
    output layer last) of a wide MLP fed the first ``examples`` rows of ``x``: the
    quantities of the ``forward_signal`` probe (``signal_q``, ``signal_c``).

    Each input a starts at q_a^0 = sigma_w^2 |x_a|^2 / n + sigma_b^2 and each pair at
    q_ab^0 = sigma_w^2 x_a.x_b / n + sigma_b^2; then, layer by layer,
    q_a <- sigma_w^2 E[phi(u_a)^2] + sigma_b^2 and q_ab <- sigma_w^2 E[phi(u_a) phi(u_b)]
    + sigma_b^2 with (u_a, u_b) Gaussian of covariance [[q_a, q_ab], [q_ab, q_b]]: the
    length and correlation maps applied to every pair (Poole et al. 2016), without
    assuming the inputs already sit at q*. Returns (mean_a q_a^l, mean over pairs a != b
    of c_ab^l = q_ab / sqrt(q_a q_b)). Gauss-Hermite quadrature (48 x 48 nodes): for
    smooth activations (tanh, sigmoid, erf-like); kinked ones need ``gaussian_mean_2d``."""
    x = np.asarray(x, np.float64)
    n = x.shape[1]
    q_all = sigma_w2 * np.sum(x ** 2, axis=1) / n + sigma_b2
    xe = x[:examples]
    rows, cols = np.triu_indices(len(xe), k=1)
    q = sigma_w2 * np.sum(xe ** 2, axis=1) / n + sigma_b2
    qab = sigma_w2 * np.sum(xe[rows] * xe[cols], axis=1) / n + sigma_b2
    z1, z2 = np.meshgrid(_GH_NODES, _GH_NODES, indexing="ij")
    w2 = (_GH_WEIGHTS[:, None] * _GH_WEIGHTS[None, :]).ravel()
    z1, z2 = z1.ravel(), z2.ravel()
    lengths, correlations = [], []
    for layer in range(depth + 1):
        lengths.append(float(np.mean(q_all)))
        c = np.clip(qab / np.sqrt(q[rows] * q[cols]), -1.0, 1.0)
        correlations.append(float(np.mean(c)))
        if layer == depth:
            break
        q_all = sigma_w2 * np.array([np.sum(_GH_WEIGHTS * act.phi(np.sqrt(v) * _GH_NODES) ** 2)
                                     for v in q_all]) + sigma_b2
        ua = np.sqrt(q[rows])[:, None] * z1[None, :]
        ub = np.sqrt(q[cols])[:, None] * (c[:, None] * z1[None, :]
                                          + np.sqrt(1.0 - c ** 2)[:, None] * z2[None, :])
        qab = sigma_w2 * (act.phi(ua) * act.phi(ub)) @ w2 + sigma_b2
        q = sigma_w2 * (act.phi(np.sqrt(q)[:, None] * _GH_NODES[None, :]) ** 2) @ _GH_WEIGHTS \
            + sigma_b2
    return np.array(lengths), np.array(correlations)
