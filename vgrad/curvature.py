"""The loss's curvature from Hessian-vector products: extreme eigenvalues, where the top
eigenvector lives, the trace.

Every quantity here uses the Hessian H of a scalar loss L(theta) only through products
Hv = d/de grad L(theta + e v) at e = 0 (``jax.jvp`` of ``jax.grad``: forward over
reverse, one HVP costs about two gradients), so nothing of size P x P is formed:

- :func:`lanczos`: ``steps`` iterations of the Lanczos method with full
  reorthogonalisation from a random start; the eigenvalues of the tridiagonal matrix it
  builds (Ritz values) approximate H's extreme eigenvalues first (Golub & Van Loan,
  "Matrix Computations", ch. 10; as in Ghorbani, Krishnan & Xiao 2019, "An investigation
  into neural net optimization via Hessian eigenvalue density", and Yao et al. 2020,
  "PyHessian"). The largest Ritz value is the sharpness that Cohen et al. 2021 track
  ("Gradient descent on neural networks typically occurs at the edge of stability").
  When the space is exhausted (a layer of fewer parameters than steps), the iteration
  stops adding directions and the remaining steps repeat the first Rayleigh quotient,
  which lies inside the spectrum and so never moves an extreme Ritz value.
- :func:`hutchinson`: tr H ~ mean of z^T H z over Rademacher vectors z (Hutchinson 1990),
  with the standard error of that mean.
- Per-layer blocks: the same Lanczos on H restricted to one layer's parameters (v zero
  elsewhere, Hv read on the layer only), i.e. the eigenvalues of the diagonal block of H.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vgrad.layers import Layout, _get

Array = jax.Array

#: Lanczos iterations per eigenvalue estimate (full reorthogonalisation): the extreme
#: eigenvalues of a net of 200 parameters agree with a dense eigensolver to 1e-5 here.
LANCZOS_STEPS = 40
#: Rademacher vectors of the Hutchinson trace estimate.
TRACE_PROBES = 32
#: Stochastic Lanczos quadrature: Lanczos steps per draw, random start vectors, and the
#: Gaussian smoothing's variance in units of the squared spectral radius (the values of
#: Ghorbani et al. 2019 and google/spectral-density: about 60 steps, sigma^2 = 1e-5).
SLQ_STEPS = 60
SLQ_DRAWS = 2
SLQ_VARIANCE = 1e-5
#: The density's fixed bins, on the eigenvalue in units of the spectral radius rho
#: (lambda / rho in [-1, 1]): identical for every run, so spectra compare bin for bin.
DENSITY_EDGES = np.linspace(-1.05, 1.05, 211, dtype=np.float32)


def hvp_flat(loss: Callable[[Any], Array], params: Any
             ) -> tuple[Callable[[Array], Array], Array]:
    """H v on flat vectors (the parameters raveled): the product and the flat point."""
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda p: loss(unravel(p)))

    def product(v: Array) -> Array:
        return jax.jvp(grad, (flat,), (v,))[1]

    return product, flat


def lanczos(matvec: Callable[[Array], Array], start: Array, steps: int
            ) -> tuple[Array, Array]:
    """Ritz values (ascending) and Ritz vectors [P, steps] of ``matvec`` after ``steps``
    Lanczos iterations with full reorthogonalisation from ``start``."""
    theta, y, basis = _lanczos(matvec, start, steps)
    return theta, basis.T @ y


def _lanczos(matvec: Callable[[Array], Array], start: Array, steps: int
             ) -> tuple[Array, Array, Array]:
    """Ritz values (ascending), the tridiagonal matrix's eigenvectors [steps, steps] and
    the Lanczos basis [steps, P]."""
    dtype = start.dtype
    tiny = 10 * jnp.finfo(dtype).eps

    def body(carry: tuple, i: Array) -> tuple[tuple, tuple[Array, Array]]:
        basis, v, v_prev, beta_prev, alive, first = carry
        basis = basis.at[i].set(v)
        w = matvec(v) - beta_prev * v_prev
        alpha = jnp.vdot(v, w)
        w = w - alpha * v
        w = w - basis.T @ (basis @ w)  # (twice: one pass loses orthogonality in float32)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        first = jnp.where(i == 0, alpha, first)
        alpha = jnp.where(alive, alpha, first)  # (an exhausted space repeats a value
        going = alive & (beta > tiny * jnp.maximum(jnp.abs(alpha), 1.0))  # inside it)
        v_next = jnp.where(going, w / jnp.where(going, beta, 1.0), 0.0)
        return (basis, v_next, v, jnp.where(going, beta, 0.0), going, first), (
            alpha, jnp.where(going, beta, 0.0))

    v0 = start / jnp.linalg.norm(start)
    init = (jnp.zeros((steps, start.size), dtype), v0, jnp.zeros_like(v0),
            jnp.zeros((), dtype), jnp.ones((), bool), jnp.zeros((), dtype))
    (basis, *_), (alphas, betas) = jax.lax.scan(body, init, jnp.arange(steps))
    tridiagonal = (jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1))
    theta, y = jnp.linalg.eigh(tridiagonal)
    return theta, y, basis


def hutchinson(matvec: Callable[[Array], Array], like: Array, key: Array,
               probes: int = TRACE_PROBES) -> tuple[Array, Array]:
    """Hutchinson's estimate of the trace of ``matvec`` on vectors shaped like ``like``
    and its standard error (``probes`` Rademacher vectors, one HVP each)."""
    z = jax.random.rademacher(key, (probes, like.size)).astype(like.dtype)
    quad = jax.lax.map(lambda v: jnp.vdot(v, matvec(v)), z)
    return quad.mean(), quad.std(ddof=1) / jnp.sqrt(probes)


def layer_ids(layout: Layout, params: Any) -> Any:
    """A tree like ``params`` holding each entry's layer index (input side first), -1 on
    parameters outside every layer (normalisation layers, a module's own)."""
    ids = jax.tree.map(lambda x: jnp.full(x.shape, -1, jnp.int32), params)
    first = 0
    for seg in layout.segments:
        for path in seg.dense:
            node = _get(ids, path)
            index = (first + jnp.arange(len(seg), dtype=jnp.int32)) if seg.stacked else \
                jnp.full((1,), first, jnp.int32)
            filled = jax.tree.map(lambda x, i=index: jnp.broadcast_to(
                i.reshape((-1,) + (1,) * (x.ndim - 1)) if x.ndim else i[0], x.shape), node)
            ids = _set(ids, path, filled)
        first += len(seg)
    return ids


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def curvature(loss: Callable[[Any], Array], params: Any, layout: Layout, key: Array,
              steps: int = LANCZOS_STEPS, probes: int = TRACE_PROBES) -> dict[str, Array]:
    """The Hessian of ``loss`` at ``params``: its largest and smallest eigenvalue, the
    top eigenvector's squared mass on each layer, its trace and that estimate's standard
    error (``steps`` + ``probes`` HVPs)."""
    product, flat = hvp_flat(loss, params)
    k_start, k_trace = jax.random.split(key)
    theta, vectors = lanczos(product, jax.random.normal(k_start, flat.shape, flat.dtype),
                             min(steps, flat.size))
    top = vectors[:, -1]
    ids, _ = ravel_pytree(layer_ids(layout, params))
    n_layers = len(layout.names)
    mass = jax.ops.segment_sum(top * top, jnp.where(ids >= 0, ids, n_layers),
                               num_segments=n_layers + 1)[:n_layers]
    trace, trace_se = hutchinson(product, flat, k_trace, probes)
    return {"hess_max": theta[-1], "hess_min": theta[0], "hess_evec_mass": mass,
            "hess_trace": trace, "hess_trace_se": trace_se}


def block_maxima(loss: Callable[[Any], Array], params: Any, layout: Layout, key: Array,
                 steps: int = LANCZOS_STEPS) -> Array:
    """The largest eigenvalue of each layer's diagonal block of the Hessian of ``loss``
    (its kernel and bias), [L] (layers x ``steps`` HVPs)."""
    product, flat = hvp_flat(loss, params)
    ids, _ = ravel_pytree(layer_ids(layout, params))
    start = jax.random.normal(key, flat.shape, flat.dtype)

    def block_max(layer: Array) -> Array:
        mask = (ids == layer).astype(flat.dtype)
        values, _ = lanczos(lambda v: mask * product(mask * v), mask * start,
                            min(steps, flat.size))
        return values[-1]

    return jax.lax.map(block_max, jnp.arange(len(layout.names)))


def density(loss: Callable[[Any], Array], params: Any, key: Array, steps: int = SLQ_STEPS,
            draws: int = SLQ_DRAWS) -> dict[str, Array]:
    """The Hessian's spectral density by stochastic Lanczos quadrature (Golub & Meurant
    1994; Ghorbani, Krishnan & Xiao 2019): for each of ``draws`` Gaussian start vectors
    v, ``steps`` Lanczos steps give nodes theta_k (Ritz values) and weights
    w_k = (e_1^T y_k)^2, and sum_k w_k delta(lambda - theta_k) is a quadrature of v's
    spectral measure, whose mean over v is the density of H's eigenvalues. Each node is
    smoothed by a Gaussian of variance ``SLQ_VARIANCE`` rho^2 and integrated over the
    fixed bins ``DENSITY_EDGES`` of lambda / rho, rho the largest |theta_k| of the
    evaluation:

    - ``hess_density``: the mass in each bin (it sums to 1; divide by the bin width
      times rho for a density in lambda);
    - ``hess_density_scale``: rho.

    Cost: ``steps`` x ``draws`` HVPs."""
    product, flat = hvp_flat(loss, params)
    starts = jax.random.normal(key, (draws, flat.size), flat.dtype)
    theta, y, _ = jax.lax.map(lambda v: _lanczos(product, v, min(steps, flat.size)), starts)
    weights = y[:, 0, :] ** 2  # [draws, steps]; 0 on steps past an exhausted space
    rho = jnp.max(jnp.abs(theta))
    rho = jnp.where(rho > 0, rho, 1.0)
    edges = jnp.asarray(DENSITY_EDGES, flat.dtype)
    sigma = jnp.sqrt(jnp.asarray(SLQ_VARIANCE, flat.dtype))
    cdf = jax.scipy.stats.norm.cdf((edges[:, None, None] - theta / rho) / sigma)
    mass = jnp.sum((cdf[1:] - cdf[:-1]) * weights, axis=(1, 2)) / draws
    return {"hess_density": mass, "hess_density_scale": rho}
