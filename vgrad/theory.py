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

Gaussian expectations: the *reference* rule is a midpoint rule on 240,000 points over
[-12, 12] standard deviations (``gaussian_mean``, ``gaussian_mean_2d``), chosen over
Gauss-Hermite quadrature, which is exact for polynomials but off by several percent on the
steps and kinks of ReLU-like derivatives (ReLU's chi at sigma_w^2 = 2 came out 0.91 with 201
Hermite nodes, 1.0000 with this rule) and, measured again, off by up to 100% on tanh's
phi'^2 = sech^4 from q = 100 on (256 nodes), whose narrow peak falls between its nodes.
The predictions integrate one input by a *panel* rule for every activation of ``FAST``:
Gauss-Legendre (20 nodes) on panels of z whose edges are 0, +-1, +-2, +-4, ... and every
standard deviation, over the same 12 standard deviations: each panel holds a piece of
phi that is analytic (every kink of the zoo is at 0 or +-1, a panel edge) and no wider
than its distance from 0, so ~500 nodes (~1,000 at q = 10^4) give the reference's
numbers to ~1e-8 for every activation (tests/test_report_pace.py), and better where the
reference errs: hardtanh's phi' steps at +-1 between its midpoints (up to 7e-4 off the
closed form at large q, the panel rule 1e-15), softsign's from q ~ 10^3 on. Two inputs:
a 160 x 160 midpoint grid over [-8, 8] for smooth activations (the midpoint rule converges
geometrically for analytic integrands; ~1e-9 from the 800 x 800 reference), the reference
otherwise. Activations outside ``FAST`` keep the reference rules.

Everything a figure asks for repeatedly is computed once: ``activation`` returns the
same object for the same ``act`` config (name and parameters), and the layer-by-layer
iterates behind ``variances``, ``delta_profile`` and ``mean_delta_profile`` are kept per
(activation, sigma_w^2, sigma_b^2, input lengths) and grown only when a deeper net asks
(a sweep over depth computes its deepest net's layers once); ``q_star``, ``c_star``,
``chi_c`` and ``correlation_depth_scale`` are memoised. ``clear_caches()`` empties them.

Beyond the wide limit (the section at the end): at a finite width each ReLU layer
multiplies ||delta||^2 by a random factor, and ``relu_log_ratio`` (exact cumulants),
``relu_log_ratio_leading`` (5 sum 1/n), ``relu_log_ratio_median``, ``_cdf``, ``_density``,
``relu_ratio_moments`` and ``relu_dead_probability`` describe the seed-to-seed spread of
ln(||delta_first||^2 / ||delta_output||^2) at initialisation (Hanin 2018; Hanin & Nica
2019).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]

_EDGES = np.linspace(-12.0, 12.0, 240_001)
_NODES = (_EDGES[:-1] + _EDGES[1:]) / 2  # midpoints: none at 0, where ReLU' steps
_WEIGHTS = np.exp(-_NODES ** 2 / 2)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()  # E[f(u)] = sum w_i f(u_i), u ~ N(0, 1)


def gaussian_mean(f: Fn, q: float) -> float:
    """E[f(sqrt(q) u)] for u ~ N(0, 1), by the reference rule (240,000 midpoints)."""
    return float(np.sum(_WEIGHTS * f(np.sqrt(q) * _NODES)))


#: Activations (``act.name``) with a faster rule, and which: "smooth" (analytic) or
#: "kinked" (piecewise analytic, kinks only at z = 0 or +-1: relu and its leaky kin, elu,
#: selu, softsign, hardtanh). One input: both use the panel rule (``_panel_rule``). Two
#: inputs: "smooth" a 160 x 160 midpoint grid, "kinked" the reference (no grid follows
#: the slanted kink line of u2). Any other activation uses the reference rules. (A fact
#: about each activation: its home would be the registry entry in ``vgrad.activations``.)
FAST: dict[str, str] = {
    **dict.fromkeys(("linear", "sigmoid", "tanh", "arctan", "bent_identity", "gelu",
                     "softplus", "swish"), "smooth"),
    **dict.fromkeys(("relu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "softsign",
                     "hardtanh"), "kinked"),
}

#: Gauss-Legendre nodes per panel of the one-input rule.
PANEL_NODES = 20
_LEGENDRE = np.polynomial.legendre.leggauss(PANEL_NODES)
#: Cells of the two-input grid over [-8, 8] for smooth activations; doubled while the
#: spacing h sqrt(q) exceeds MAX_SPACING, up to the reference's 800.
FAST_CELLS_2D, MAX_SPACING = 160, 0.25
_REFERENCE_CELLS_2D = 800
#: Points per call of the activation (bounds the memory of vectorised evaluations).
_CHUNK = 1 << 21


@functools.lru_cache(maxsize=4096)
def _panel_rule(q: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w with E[f(z)] = sum w f(z) for z ~ N(0, q), over the same
    [-12, 12] standard deviations as the reference: Gauss-Legendre on panels whose edges
    are 0, +-1, +-2, +-4, ... (so that a kink at 0 or +-1 is an edge, and each panel is
    no wider than its distance from 0: the features of phi near the origin are
    resolved at any q) and every standard deviation (the Gaussian's)."""
    sigma = math.sqrt(q)
    top = 12.0 * sigma
    edges = {0.0, top, *(sigma * np.arange(1, 12))}
    power = 1.0
    while power < top:
        edges.add(power)
        power *= 2.0
    edges = np.array(sorted(e for e in edges if e <= top))
    left, right = edges[:-1], edges[1:]
    x, w = _LEGENDRE
    half = (right - left) / 2
    z = (half[:, None] * x[None, :] + ((left + right) / 2)[:, None]).ravel()
    weights = (half[:, None] * w[None, :]).ravel() * np.exp(-z ** 2 / (2.0 * q))
    z, weights = np.concatenate([-z[::-1], z]), np.concatenate([weights[::-1], weights])
    return z, weights / weights.sum()


@functools.lru_cache(maxsize=16)
def _grid(cells: int, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints and normalised Gaussian weights of ``cells`` equal cells over
    [-half_width, half_width] (an even number of cells: 0 is a cell edge)."""
    edges = np.linspace(-half_width, half_width, cells + 1)
    nodes = (edges[:-1] + edges[1:]) / 2
    weights = np.exp(-nodes ** 2 / 2)
    return nodes, weights / weights.sum()


def _cells_2d(rule: str, q: float) -> int:
    """Cells of the two-input grid for variance ``q`` under ``rule``."""
    if rule != "smooth" or not math.isfinite(q):
        return _REFERENCE_CELLS_2D
    cells = FAST_CELLS_2D
    while cells < _REFERENCE_CELLS_2D and 16.0 / cells * math.sqrt(max(q, 0.0)) > MAX_SPACING:
        cells *= 2
    return min(cells, _REFERENCE_CELLS_2D)


@dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise nonlinearity and its derivative as numpy functions.

    ``rule`` picks the quadrature (see ``FAST``: "smooth", "kinked" or "reference",
    the default for an Activation made by hand); ``both`` evaluates phi and phi' in one
    call where it is given. Objects compare by identity: ``activation`` hands out one
    per ``act`` config, which is what the caches of this module key on."""

    phi: Fn
    dphi: Fn
    both: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = field(
        default=None, repr=False)
    #: phi of a float32 array, as float32 (the per-pair iterates' bulk evaluations).
    phi32: Fn | None = field(default=None, repr=False)
    rule: str = "reference"
    name: str | None = None


def _config_key(cfg: Any) -> str | None:
    """The ``act`` config node (name and parameters) as canonical JSON, or None when it
    cannot be read as a mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            value = OmegaConf.to_container(cfg, resolve=True)
        elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            value = dataclasses.asdict(cfg)
        elif isinstance(cfg, Mapping):
            value = dict(cfg)
        else:
            return None
        return json.dumps(value, sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 (an unresolvable node: built afresh, not cached)
        return None


def activation(cfg: Any) -> Activation:
    """The ``act`` config node as numpy functions (its learnable parameters at their
    initial values; RReLU at its evaluation slope). Maxout is not elementwise: no theory.
    The same config (name and parameters) gives the same object, compiled once."""
    key = _config_key(cfg)
    if key is None:
        return _build_activation(cfg)
    return _cached_activation(key)


@functools.lru_cache(maxsize=64)
def _cached_activation(key: str) -> Activation:
    from omegaconf import OmegaConf

    return _build_activation(OmegaConf.create(json.loads(key)))


def _build_activation(cfg: Any) -> Activation:
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
    both = jax.jit(lambda u: jax.jvp(f, (u,), (jnp.ones_like(u),)))

    def float32(z: np.ndarray) -> jax.Array:  # rounded by numpy: XLA's convert is slow
        return jnp.asarray(np.asarray(z, np.float32))

    return Activation(lambda z: np.asarray(f(float32(z)), np.float64),
                      lambda z: np.asarray(slope(float32(z)), np.float64),
                      both=lambda z: both(float32(z)),
                      phi32=lambda z: np.asarray(f(float32(z))),
                      rule=FAST.get(str(cfg.name), "reference"), name=str(cfg.name))


def _values(act: Activation, z: np.ndarray, phi: bool = True, dphi: bool = True
            ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """phi(z) and phi'(z) (float64; each only if asked) of a flat float64 array, in
    float32 like the nets, in chunks padded to a power of two: few shapes, and (with
    ``act.both``) one program for both, so few compilations."""
    out = [np.empty(z.size) if phi else None, np.empty(z.size) if dphi else None]
    for start in range(0, z.size, _CHUNK):
        part = z[start:start + _CHUNK]
        padded = np.zeros(max(4096, 1 << (part.size - 1).bit_length()),
                          np.float32 if act.both is not None else np.float64)
        padded[:part.size] = part
        if act.both is not None:  # both at once: one compiled program per shape
            values = [np.asarray(v) for v in act.both(padded)]
        else:
            values = [act.phi(padded) if phi else None, act.dphi(padded) if dphi else None]
        for target, value in zip(out, values, strict=True):
            if target is not None:
                target[start:start + part.size] = value[:part.size]
    return out[0], out[1]


def _moments(act: Activation, qs: np.ndarray, phi: bool = True, dphi: bool = True
             ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """E[phi(sqrt(q) u)^2] and E[phi'(sqrt(q) u)^2] (each only if asked) for every q of
    ``qs``, with one call of the activation for all of them (in chunks)."""
    qs = np.asarray(qs, np.float64).reshape(-1)
    out = [np.empty(qs.size) if phi else None, np.empty(qs.size) if dphi else None]
    fast = act.rule != "reference"
    panel = np.array([fast and math.isfinite(q) and q > 0.0 for q in qs], bool)
    reference = np.flatnonzero(~panel)
    rows = max(1, _CHUNK // _NODES.size)
    for start in range(0, reference.size, rows):  # the reference rule
        at = reference[start:start + rows]
        z = np.sqrt(qs[at])[:, None] * _NODES[None, :]
        values = _values(act, z.reshape(-1), phi, dphi)
        for target, value in zip(out, values, strict=True):
            if target is not None:
                target[at] = (value.reshape(z.shape) ** 2) @ _WEIGHTS
    if panel.any():  # the panel rule: every q's nodes in one array
        at = np.flatnonzero(panel)
        rules = [_panel_rule(float(q)) for q in qs[at]]
        z = np.concatenate([r[0] for r in rules])
        w = np.concatenate([r[1] for r in rules])
        starts = np.cumsum([0] + [r[0].size for r in rules[:-1]])
        values = _values(act, z, phi, dphi)
        for target, value in zip(out, values, strict=True):
            if target is not None:
                target[at] = np.add.reduceat(w * value ** 2, starts)
    return out[0], out[1]


def clear_caches() -> None:
    """Forget every memoised result (activations, fixed points, layer iterates)."""
    _cached_activation.cache_clear()
    _CHAINS.clear()
    for memo in (_q_star, c_star, chi_c, correlation_depth_scale, _relu_log_factor,
                 _log_factor_cf, _log_ratio_cf, _relu_log_ratio_median):
        memo.cache_clear()


def length_map(act: Activation, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) u)^2] + sigma_b^2."""
    return float(sigma_w2 * _moments(act, [q], dphi=False)[0][0] + sigma_b2)


def q_star(act: Activation, sigma_w2: float, sigma_b2: float, q0: float = 1.0,
           iterations: int = 500, tol: float = 1e-10) -> float:
    """The fixed point of the length map (by iteration; it is attracting)."""
    return _q_star(act, float(sigma_w2), float(sigma_b2), float(q0), int(iterations),
                   float(tol))


@functools.lru_cache(maxsize=4096)
def _q_star(act: Activation, sigma_w2: float, sigma_b2: float, q0: float, iterations: int,
            tol: float) -> float:
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
        raise ValueError(f"q = {q} is not above σ_b² = {sigma_b2}: no input reaches it")
    return (q - sigma_b2) / sigma_w2


def chi(act: Activation, q: float, sigma_w2: float) -> float:
    """chi = sigma_w^2 E[phi'(sqrt(q) u)^2]: the factor of E||delta||^2 per layer."""
    return float(sigma_w2 * _moments(act, [q], phi=False)[1][0])


def gradient_depth_scale(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """xi_grad = -1 / ln chi_1 at the fixed point (infinite at criticality)."""
    c = chi(act, q_star(act, sigma_w2, sigma_b2), sigma_w2)
    return float("inf") if c == 1.0 else -1.0 / np.log(c)


@dataclass
class _Chain:
    """The iterates of nets fed inputs of given lengths: q_l [K] of each layer computed so
    far, and chi_l [K] of each layer below the last q."""

    q: list[np.ndarray]
    chi: list[np.ndarray] = field(default_factory=list)


#: (activation, sigma_w^2, sigma_b^2, input lengths) -> its chain; least recently used
#: first.
_CHAINS: collections.OrderedDict[tuple, _Chain] = collections.OrderedDict()
_MAX_CHAINS = 1024


def _chain_step(act: Activation, q: np.ndarray, sigma_w2: float, sigma_b2: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """One layer for every input length at once: (q_{l+1}, chi_l) from q_l."""
    phi2, dphi2 = _moments(act, q)
    return sigma_w2 * phi2 + sigma_b2, sigma_w2 * dphi2


def _iterates(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
              q_inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q_l and chi_l [depth, K] of layers l = 0 .. depth - 1 for inputs of mean squared
    feature ``q_inputs`` [K]: computed once, and grown when a deeper net asks."""
    sigma_w2, sigma_b2 = float(sigma_w2), float(sigma_b2)
    q_inputs = np.asarray(q_inputs, np.float64).reshape(-1)
    key = (act, sigma_w2, sigma_b2, q_inputs.tobytes())
    chain = _CHAINS.get(key)
    if chain is None:
        chain = _CHAINS[key] = _Chain([sigma_w2 * q_inputs + sigma_b2])
        while len(_CHAINS) > _MAX_CHAINS:
            _CHAINS.popitem(last=False)
    else:
        _CHAINS.move_to_end(key)
    while len(chain.chi) < depth:  # len(chain.q) == len(chain.chi) + 1
        q_next, chi_l = _chain_step(act, chain.q[-1], sigma_w2, sigma_b2)
        chain.chi.append(chi_l)
        chain.q.append(q_next)
    shape = (depth, q_inputs.size)
    return (np.array(chain.q[:depth]).reshape(shape),
            np.array(chain.chi[:depth]).reshape(shape))


def variances(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
              q_input: float) -> list[float]:
    """q_l of the hidden layers' pre-activations, l = 0 .. depth - 1, for inputs with
    mean squared feature ``q_input`` (all layers drawn with the same sigma_w^2)."""
    q, _ = _iterates(act, max(depth, 1), sigma_w2, sigma_b2, np.array([q_input]))
    return [float(v) for v in q[:max(depth, 1), 0]]


def _profiles(chi_layers: np.ndarray) -> np.ndarray:
    """||delta_l|| / ||delta_output|| [K, depth + 1] from chi_l [depth, K]:
    delta_l = phi'(z_l) * W_{l+1}^T delta_{l+1}, so the log ratio adds 0.5 ln chi_l from
    the output layer down."""
    half_logs = 0.5 * np.log(chi_layers[::-1])  # the last hidden layer first
    log_ratio = np.concatenate([np.zeros((1, chi_layers.shape[1])),
                                np.cumsum(half_logs, axis=0)])
    return np.exp(log_ratio[::-1].T)


def delta_profile(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
                  q_input: float) -> np.ndarray:
    """Predicted ||delta_l|| / ||delta_output|| for the Dense layers l = 0 .. depth
    (the output layer last, where the ratio is 1)."""
    _, chi_layers = _iterates(act, depth, sigma_w2, sigma_b2, np.array([q_input]))
    return _profiles(chi_layers)[0]


def mean_delta_profile(act: Activation, depth: int, sigma_w2: float, sigma_b2: float,
                       x: np.ndarray, quantiles: int = 32) -> np.ndarray:
    """``delta_profile`` averaged over a batch of inputs ``x`` [N, features].

    The theory is per input: an input's squared length sets q_0 and so the whole
    profile. vgrad's ``delta_norm`` is a batch mean, and on real data the squared
    lengths spread (digits, standardised: 5%-95% from 0.47 to 1.8), which moves the
    profile by ~10% against the one of the mean input. The output layer's delta
    hardly depends on the input at initialisation, so the batch mean of per-input
    profiles is the prediction. Averaged over ``quantiles`` evenly spaced quantiles of
    the squared lengths, for speed (all of them iterated at once, and kept: another
    depth of the same sweep reuses the layers)."""
    q_inputs = np.mean(np.asarray(x, np.float64) ** 2, axis=1)
    q_grid = np.quantile(q_inputs, (np.arange(quantiles) + 0.5) / quantiles)
    _, chi_layers = _iterates(act, depth, sigma_w2, sigma_b2, q_grid)
    return np.mean(_profiles(chi_layers), axis=0)


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
    takes two flat arrays. The reference rule (800 x 800 midpoints over [-8, 8])."""
    z1, z2 = np.meshgrid(_NODES_2D, _NODES_2D, indexing="ij")
    u1 = np.sqrt(q) * z1
    u2 = np.sqrt(q) * (c * z1 + np.sqrt(max(1.0 - c * c, 0.0)) * z2)
    weights = _WEIGHTS_2D[:, None] * _WEIGHTS_2D[None, :]
    return float(np.sum(weights.ravel() * f(u1.ravel(), u2.ravel())))


def _product_mean(act: Activation, q: float, c: float, slope: bool) -> float:
    """E[g(u1) g(u2)] with g = phi (or phi' with ``slope``) for (u1, u2) as in
    ``gaussian_mean_2d``: the reference grid, or a coarser one for smooth activations;
    g(u1) depends on z1 only, so it is evaluated once per row of the grid."""
    nodes, weights = _grid(_cells_2d(act.rule, float(q)), 8.0)
    s = np.sqrt(max(1.0 - c * c, 0.0))
    u1 = np.sqrt(q) * nodes
    u2 = np.sqrt(q) * (c * nodes[:, None] + s * nodes[None, :])
    g1 = _values(act, u1, phi=not slope, dphi=slope)[1 if slope else 0]
    g2 = _values(act, u2.reshape(-1), phi=not slope, dphi=slope)[1 if slope else 0]
    g2 = g2.reshape(u2.shape)
    return float(weights @ (g1 * (g2 @ weights)))


def correlation_map(act: Activation, c: float, q: float, sigma_w2: float,
                    sigma_b2: float) -> float:
    """c_{l+1} = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q for two inputs whose
    pre-activations have length q (at the fixed point q*) and correlation c_l."""
    return (sigma_w2 * _product_mean(act, q, c, slope=False) + sigma_b2) / q


@functools.lru_cache(maxsize=4096)
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


@functools.lru_cache(maxsize=4096)
def chi_c(act: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at (q*, c*): the slope of the correlation
    map at its fixed point. Equal to chi_1 where c* = 1 (the ordered phase)."""
    q, c = q_star(act, sigma_w2, sigma_b2), c_star(act, sigma_w2, sigma_b2)
    if c >= 1.0 - 1e-9:
        return chi(act, q, sigma_w2)
    return sigma_w2 * _product_mean(act, q, c, slope=True)


@functools.lru_cache(maxsize=4096)
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
    raise ValueError(f"init={init.name}: σ_w² is not a constant of the fan-in; use "
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

    def phi(z: np.ndarray) -> np.ndarray:  # one call of the activation for a whole array
        return act.phi(z.reshape(-1)).reshape(z.shape)

    def length(v: np.ndarray) -> np.ndarray:  # the length map of every input at once
        return sigma_w2 * (phi(np.sqrt(v)[:, None] * _GH_NODES[None, :]) ** 2) @ _GH_WEIGHTS \
            + sigma_b2

    bulk = act.phi32 or (lambda z: act.phi(z).astype(np.float32))
    z1_32, z2_32 = z1.astype(np.float32), z2.astype(np.float32)
    pairs_per_call = max(1, _CHUNK // z1.size)

    def pair_means(c: np.ndarray) -> np.ndarray:
        """E[phi(u_a) phi(u_b)] of every pair (rows, cols) at correlation c: phi(u_a)
        depends on the pair only through a (once per example, then gathered); u_b is
        built and evaluated in float32, as the nets compute, a chunk of pairs at a time,
        and summed in float64."""
        phi_a = bulk((np.sqrt(q)[:, None] * z1[None, :]).astype(np.float32))
        root_b = np.sqrt(q[cols])
        out = np.empty(rows.size)
        for start in range(0, rows.size, pairs_per_call):
            at = slice(start, start + pairs_per_call)
            ub = ((root_b[at] * c[at]).astype(np.float32)[:, None] * z1_32[None, :]
                  + (root_b[at] * np.sqrt(1.0 - c[at] ** 2)).astype(np.float32)[:, None]
                  * z2_32[None, :])
            out[at] = (phi_a[rows[at]] * bulk(ub.reshape(-1)).reshape(ub.shape)) @ w2
        return out

    lengths, correlations = [], []
    for layer in range(depth + 1):
        lengths.append(float(np.mean(q_all)))
        c = np.clip(qab / np.sqrt(q[rows] * q[cols]), -1.0, 1.0)
        correlations.append(float(np.mean(c)))
        if layer == depth:
            break
        q_all = length(q_all)
        qab = sigma_w2 * pair_means(c) + sigma_b2
        q = length(q)
    return np.array(lengths), np.array(correlations)


# --- finite width: the fluctuations of the gradient (Hanin 2018; Hanin & Nica 2019) -------

# Mean-field theory keeps E||delta_l||^2 constant across a ReLU net with He kernels; at a
# finite width each layer multiplies ||delta||^2 by a random factor. For a ReLU MLP with
# zero biases and Gaussian kernels W_{l+1} ~ N(0, sigma_w^2 / n_l) fed a fixed input,
#
#   delta_l = D_l W_{l+1}^T delta_{l+1},   D_l = diag(1[z_l > 0]),
#
# and given delta_{l+1} the n_l entries of W_{l+1}^T delta_{l+1} are independent
# N(0, sigma_w^2 ||delta_{l+1}||^2 / n_l); D_l keeps K_l of them, and K_l ~ Binomial(n_l,
# 1/2) (each z_l,i is symmetric). Hence
#
#   X_l = ||delta_l||^2 / ||delta_{l+1}||^2 = (sigma_w^2 / n_l) chi^2_{K_l},
#
# one factor per hidden layer, each using that layer's width n_l (the fan-in of the
# kernel above it). That the masks may be taken independent of the weights, and the
# factors of one another, for ReLU nets with symmetric weights at a fixed input, is
# Hanin & Nica 2019 ("Products of many large random matrices and gradients in deep
# neural networks", Comm. Math. Phys. 2020, arXiv:1812.05994); a numpy Monte Carlo that
# takes the masks from real forward passes agrees (tests/test_width_figures.py). The
# output's delta must not depend on the output kernel: exact for one output unit (delta
# is a scalar that factors out), not for a softmax over several.
#
# Per factor, given K = k >= 1: ln chi^2_k has mean digamma(k/2) + ln 2, variance
# trigamma(k/2) and third cumulant polygamma(2, k/2) (the log of a Gamma(k/2, 2)
# variable), so E ln X = ln(sigma_w^2 / n) + ln 2 + E digamma(K/2), and by the law of
# total variance Var ln X = E trigamma(K/2) + Var digamma(K/2). With K ~ n/2 and
# digamma(x) ~ ln x - 1/(2x), trigamma(x) ~ 1/x: Var ln X = 4/n + 1/n = 5/n and, at He's
# sigma_w^2 = 2, E ln X = -2/n - 1/(2n) = -5/(2n) to leading order. Over the net,
# r = ln(||delta_first||^2 / ||delta_output||^2) = sum_l ln X_l has
#
#   Var r ~ 5 sum_l 1/n_l,   E r ~ -(5/2) sum_l 1/n_l   (He),
#
# so the spread is set by depth / width, not depth alone (Hanin 2018, "Which neural net
# architectures give rise to exploding and vanishing gradients?", NeurIPS; Hanin & Nica
# 2019 show r is asymptotically Gaussian). Yet E X_l = sigma_w^2 / 2 exactly (K = 0
# included): at He the *mean* ratio is 1 at any width while its *median* falls like
# exp(-(5/2) sum 1/n); E X_l^2 = (sigma_w^2 / 2)^2 (1 + 5/n_l), so the ratio's second
# moment grows like exp(5 sum 1/n) (Hanin 2018's criterion).
#
# A dead layer: K_l = 0 with probability 2^-n_l kills every delta below it (the ratio is
# exactly 0, ln = -inf). The log moments here are conditional on every layer being alive
# (K >= 1: the binomial renormalised over 1..n), the probability of a dead layer given
# apart (``relu_dead_probability``); the analysis leaves dead seeds out of r's statistics
# and counts them, and keeps them (as 0) in the mean ratio, whose E = (sigma_w^2/2)^depth
# includes them.
#
# The distribution of r itself (its median, density, quantiles) follows from its
# characteristic function, a product of closed forms: E[(chi^2_k)^{it}] = 2^{it}
# Gamma(k/2 + it) / Gamma(k/2), so E[X^{it}] = sum_k p_k (2 sigma_w^2 / n)^{it}
# Gamma(k/2 + it) / Gamma(k/2), inverted numerically (Gil-Pelaez). The median is not the
# mean: ln chi^2 is skewed to the left (third cumulant ~ -31 sum 1/n^2), which puts the
# median ~1/n above the mean for a net of width n at any depth.


class LogMoments(NamedTuple):
    """The first three cumulants of a log quantity (r, or one layer's ln X)."""

    mean: float
    variance: float
    third: float  # third cumulant (the third central moment): < 0, a tail to the left


def _widths(widths: Sequence[int] | int) -> list[int]:
    """Hidden widths as a list of positive integers (a ValueError naming the bad one)."""
    values = (list(widths) if isinstance(widths, (Sequence, np.ndarray))
              and not isinstance(widths, str) else [widths])
    for n in values:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"width {n!r}: expected a positive integer")
    return [int(n) for n in values]


def _sigma_w2(sigma_w2: float) -> float:
    if not (isinstance(sigma_w2, (int, float, np.floating)) and math.isfinite(sigma_w2)
            and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 {sigma_w2!r}: expected a finite number > 0")
    return float(sigma_w2)


def relu_dead_probability(widths: Sequence[int] | int) -> float:
    """The probability that at least one hidden layer of a zero-bias ReLU net has no
    active unit at a given input: 1 - prod_l (1 - 2^-n_l) (each unit is active with
    probability 1/2, independently; one width: 2^-n). Its delta, and every delta
    below it, is then exactly 0."""
    alive = sum(math.log1p(-(2.0 ** -n)) for n in _widths(widths))
    return -math.expm1(alive)


@functools.lru_cache(maxsize=1024)
def _relu_log_factor(width: int, sigma_w2: float) -> LogMoments:
    from scipy.special import digamma, polygamma
    from scipy.stats import binom

    k = np.arange(1, width + 1)
    p = binom.pmf(k, width, 0.5)
    p = p / p.sum()  # conditioned on K >= 1
    m_k = math.log(2.0 * sigma_w2 / width) + digamma(k / 2)  # E[ln X | K = k]
    v_k, t_k = polygamma(1, k / 2), polygamma(2, k / 2)  # its variance, third cumulant
    mean = float(p @ m_k)
    centred = m_k - mean
    variance = float(p @ (v_k + centred ** 2))
    third = float(p @ (t_k + 3.0 * v_k * centred + centred ** 3))  # law of total cumulance
    return LogMoments(mean, variance, third)


def relu_log_factor(width: int, sigma_w2: float = 2.0) -> LogMoments:
    """Exact cumulants of ln X, X = (sigma_w^2 / n) chi^2_K, K ~ Binomial(n, 1/2) given
    K >= 1: the log of the factor by which one hidden ReLU layer of width n multiplies
    ||delta||^2 on its way to the input (see the section above; Hanin 2018; Hanin &
    Nica 2019). Given K = k: mean ln(2 sigma_w^2 / n) + digamma(k/2), variance
    trigamma(k/2), third cumulant polygamma(2, k/2); mixed over K by the laws of total
    variance and cumulance. Var -> 5/n and (He) mean -> -5/(2n) for wide layers."""
    return _relu_log_factor(_widths(width)[0], _sigma_w2(sigma_w2))


def relu_log_ratio(widths: Sequence[int], sigma_w2: float = 2.0) -> LogMoments:
    """Exact cumulants of r = ln(||delta_first||^2 / ||delta_output||^2) at
    initialisation for a ReLU MLP of hidden widths ``widths`` (input side first),
    Gaussian kernels of variance sigma_w^2 / fan_in, zero biases and one output unit,
    given that no layer is dead: the sum of ``relu_log_factor`` over the hidden layers
    (independent factors: cumulants add)."""
    factors = [relu_log_factor(n, sigma_w2) for n in _widths(widths)]
    return LogMoments(*(float(sum(f[i] for f in factors)) for i in range(3)))


def relu_log_ratio_leading(widths: Sequence[int], sigma_w2: float = 2.0) -> LogMoments:
    """The leading order in 1/n of ``relu_log_ratio``: mean depth ln(sigma_w^2 / 2) -
    (5/2) sum 1/n_l, variance 5 sum 1/n_l (Hanin 2018; Hanin & Nica 2019: r is then
    Gaussian, its median equal to its mean); the third cumulant, of the next order,
    -31 sum 1/n_l^2 (-16 from polygamma(2, K/2), -12 from 3 Cov(trigamma(K/2),
    digamma(K/2)), -3 from the third cumulant of ln K)."""
    values = _widths(widths)
    inverse = sum(1.0 / n for n in values)
    return LogMoments(len(values) * math.log(_sigma_w2(sigma_w2) / 2.0) - 2.5 * inverse,
                      5.0 * inverse, -31.0 * sum(1.0 / n ** 2 for n in values))


def relu_ratio_moments(widths: Sequence[int], sigma_w2: float = 2.0) -> tuple[float, float]:
    """E and E[.^2] of the ratio ||delta_first||^2 / ||delta_output||^2 itself, dead
    layers included (as 0): prod_l sigma_w^2 / 2 and prod_l (sigma_w^2 / 2)^2 (1 + 5/n_l),
    from E chi^2_K = K and E (chi^2_K)^2 = K^2 + 2K with E K = n/2, E K^2 = n/4 + n^2/4.
    At He's sigma_w^2 = 2 the mean is 1 at every width and depth, while the second moment
    grows like exp(5 sum 1/n) (Hanin 2018): the sample mean of N seeds is carried by
    seeds rarer than 1/N once that is large."""
    values, s = _widths(widths), _sigma_w2(sigma_w2) / 2.0
    return s ** len(values), float(np.prod([s * s * (1.0 + 5.0 / n) for n in values]))


#: Points of the characteristic function's grid (midpoint rule on [0, T]).
CF_POINTS = 4000
#: Binomial probabilities below this (relative to the largest) are left out of the sums.
_BINOMIAL_FLOOR = 1e-20


@functools.lru_cache(maxsize=256)
def _log_factor_cf(width: int, sigma_w2: float, t: tuple[float, ...]) -> np.ndarray:
    """E[X^{it}] of one layer at the points ``t``, given K >= 1."""
    from scipy.special import gammaln, loggamma
    from scipy.stats import binom

    k = np.arange(1, width + 1)
    p = binom.pmf(k, width, 0.5)
    keep = p > _BINOMIAL_FLOOR * p.max()
    k, p = k[keep], p[keep] / p[keep].sum()
    tt = np.asarray(t)[None, :]
    logs = (1j * tt * math.log(2.0 * sigma_w2 / width)
            + loggamma(k[:, None] / 2 + 1j * tt) - gammaln(k / 2)[:, None])
    return p @ np.exp(logs)


def _layers(widths: Sequence[int]) -> tuple[int, ...]:
    """``_widths`` of a net with at least one hidden layer (r has a distribution)."""
    values = tuple(_widths(widths))
    if not values:
        raise ValueError("widths []: expected at least one hidden layer")
    return values


@functools.lru_cache(maxsize=256)
def _log_ratio_cf(widths: tuple[int, ...], sigma_w2: float
                  ) -> tuple[np.ndarray, float, np.ndarray]:
    """The characteristic function of r (``relu_log_ratio``) on a midpoint grid over
    [0, T]: (t, the spacing h, phi(t)). T leaves both the Gaussian core (exp(-sigma^2
    t^2 / 2) at 12 sigma) and the slowest tail (|Gamma(1/2 + it)| ~ exp(-pi t / 2) per
    layer) below 1e-25."""
    sigma = math.sqrt(relu_log_ratio(widths, sigma_w2).variance)
    top = max(12.0 / sigma, 40.0 / len(widths))
    h = top / CF_POINTS
    t = (np.arange(CF_POINTS) + 0.5) * h
    phi = np.ones(CF_POINTS, complex)
    for n, count in collections.Counter(widths).items():
        phi = phi * _log_factor_cf(n, sigma_w2, tuple(t)) ** count
    return t, h, phi


def relu_log_ratio_cdf(x: float | np.ndarray, widths: Sequence[int],
                       sigma_w2: float = 2.0) -> np.ndarray:
    """P(r <= x), r as in ``relu_log_ratio`` (given no dead layer), by Gil-Pelaez's
    inversion of its characteristic function phi (see the section above):
    F(x) = 1/2 - (1/pi) int_0^inf Im[exp(-itx) phi(t)] / t dt."""
    t, h, phi = _log_ratio_cf(_layers(widths), _sigma_w2(sigma_w2))
    x = np.atleast_1d(np.asarray(x, np.float64))
    waves = np.exp(-1j * np.outer(x, t)) * phi[None, :]
    return np.clip(0.5 - (waves.imag / t[None, :]).sum(axis=1) * h / math.pi, 0.0, 1.0)


def relu_log_ratio_density(x: float | np.ndarray, widths: Sequence[int],
                           sigma_w2: float = 2.0) -> np.ndarray:
    """The density of r at ``x`` (given no dead layer): (1/pi) int_0^inf
    Re[exp(-itx) phi(t)] dt."""
    t, h, phi = _log_ratio_cf(_layers(widths), _sigma_w2(sigma_w2))
    x = np.atleast_1d(np.asarray(x, np.float64))
    waves = np.exp(-1j * np.outer(x, t)) * phi[None, :]
    return np.maximum(waves.real.sum(axis=1) * h / math.pi, 0.0)


@functools.lru_cache(maxsize=1024)
def _relu_log_ratio_median(widths: tuple[int, ...], sigma_w2: float) -> float:
    from scipy.optimize import brentq

    moments = relu_log_ratio(widths, sigma_w2)
    sigma = math.sqrt(moments.variance)
    return float(brentq(lambda x: relu_log_ratio_cdf(x, widths, sigma_w2)[0] - 0.5,
                        moments.mean - 4 * sigma, moments.mean + 4 * sigma, xtol=1e-10))


def relu_log_ratio_median(widths: Sequence[int], sigma_w2: float = 2.0) -> float:
    """The median of r (given no dead layer), from ``relu_log_ratio_cdf``: above the mean
    by ~1/n at width n (the left skew of ln chi^2); -(5/2) sum 1/n to leading order."""
    return _relu_log_ratio_median(_layers(widths), _sigma_w2(sigma_w2))
