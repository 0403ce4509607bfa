"""Convolutions whose gradients stay fast inside a compiled loop on CPU.

XLA's CPU backend runs a convolution through its fast (Eigen) kernels only in the
canonical form: batch, spatial, features x spatial, in, out (NHWC x HWIO). Outside a
loop it rewrites the two convolutions of a gradient (dL/dx and dL/dkernel, whose
natural forms put the features or the examples first) into that form with transposes;
inside a ``while`` loop, which is where vgrad's training steps run (one ``lax.scan``), it
does not, and they fall back to a generic kernel ~15-20x slower (jax-ml/jax issue
#12868, open; measured here: a 16-channel 3x3 convolution's gradient on a 32 x 8 x 8
batch, 17 ms a step in a loop against 0.9 ms outside).

:func:`conv_general_dilated` is ``lax.conv_general_dilated`` with its vector-Jacobian
product written in the canonical form by hand (transposes, then NHWC x HWIO
convolutions), for the common case of stride 1, no dilation and one feature group; any
other convolution is ``lax``'s own. The gradients are the same computation in another
order of operands: bit-identical in the tests. vgrad hands it to the ``nn.Conv`` layers it
instruments, on CPU only (``vgrad.models.auto``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

#: The canonical form: NHWC inputs and outputs, HWIO kernels.
CANONICAL = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, k: Array, pads: tuple[tuple[int, int], ...], precision: Any) -> Array:
    return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=CANONICAL,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: Array, k: Array, pads: tuple[tuple[int, int], ...],
                   precision: Any = None) -> Array:
    """A stride-1 NHWC x HWIO convolution with explicit padding ``pads`` (height, width),
    whose gradient is computed in the canonical form too."""
    return _conv(x, k, pads, precision)


def _forward(x: Array, k: Array, pads: tuple[tuple[int, int], ...], precision: Any
             ) -> tuple[Array, tuple[Array, Array]]:
    return _conv(x, k, pads, precision), (x, k)


def _backward(pads: tuple[tuple[int, int], ...], precision: Any,
              residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, k = residuals
    kh, kw = k.shape[:2]
    # dL/dx: g convolved with the kernel flipped in space, its in and out swapped.
    flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    back = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
            (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    dx = _conv(g, flipped, back, precision)
    # dL/dk[a, b, i, o] = sum over n, h, w of xpad[n, h + a, w + b, i] g[n, h, w, o]: a
    # convolution with the input channels as its batch and the examples as its features.
    dk = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), pads, precision)
    return dx, dk.transpose(1, 2, 0, 3)


canonical_conv.defvjp(_forward, _backward)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> Array:
    """``lax.conv_general_dilated``, through :func:`canonical_conv` where it applies (2-D,
    NHWC x HWIO, stride 1, no dilation, one group, real padding)."""
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and tuple(window_strides) == (1, 1)
             and all(d in (None, (1, 1)) for d in (
                 lhs_dilation and tuple(lhs_dilation), rhs_dilation and tuple(rhs_dilation)))
             and feature_group_count == 1 and not kwargs
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs)
    pads = (tuple(tuple(p) for p in lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                                         (1, 1), padding))
            if isinstance(padding, str) else tuple(tuple(p) for p in padding))
    return canonical_conv(lhs, rhs, pads, precision)
