"""The convolutional net (``model=cnn``): a plain Flax linen module.

Nothing in :class:`CNN` is written for vgrad: it is the kind of module a user brings,
instrumented by the automatic route (``vgrad.models.auto``) with no delta point or
layer declaration of its own, which is the proof that the route is enough. vgrad fills
its fields ``depth``, ``width``, ``out_dim``, ``image_shape``, ``act``, ``kernel_init``,
``bias_init``, ``bn_momentum``, ``bn_eps`` and ``dtype`` from the run's config.

The net: ``depth`` convolutions of ``width`` channels (``kernel_size`` square, ``padding``
SAME, CIRCULAR or VALID), each followed by [norm] -> act -> [2x2 ``pool``ing], a global
average pool over positions and a Dense readout. The first convolution takes stride
``stride``. Without pooling and with stride 1, convolutions 1 ... depth-1 are one
``nn.scan`` over stacked parameters, so that a deep net compiles in constant time (its
``variable_axes`` carry Flax's ``perturbations`` and ``intermediates`` collections with
the parameters, so that anything sown or perturbed inside stays per layer).

Initializers see a kernel [k, k, c_in, c_out]: the variance-scaling family reads the fan
in as k * k * c_in (the receptive field times the input channels), and
``init=delta_orthogonal`` (Xiao et al. 2018, "Dynamical isometry and a mean field theory
of CNNs") puts an orthogonal matrix at the kernel's centre and zeros elsewhere, so that
with CIRCULAR padding every convolution is an isometry of the feature map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

PADDINGS = ("SAME", "CIRCULAR", "VALID")
POOLS = ("none", "max", "avg")
NORMS = ("none", "batch", "layer")


class ConvLayer(nn.Module):
    """Conv -> [norm] -> act -> [pool]; in ``nn.scan``'s (carry, x) -> (carry, y) form
    when ``scanned``."""

    width: int
    kernel_size: int
    stride: int
    padding: str
    norm: str
    pool: str
    act: Callable[[Array], Array]
    kernel_init: Callable[..., Array]
    bias_init: Callable[..., Array]
    bn_momentum: Any
    bn_eps: Any
    dtype: Any
    train: bool = False

    @nn.compact
    def __call__(self, x: Array, _: Any = None) -> tuple[Array, None]:
        k = self.kernel_size
        x = nn.Conv(self.width, (k, k), strides=self.stride, padding=self.padding,
                    kernel_init=self.kernel_init, bias_init=self.bias_init, dtype=self.dtype,
                    param_dtype=self.dtype, name="conv")(x)
        if self.norm == "batch":
            x = nn.BatchNorm(use_running_average=not self.train, momentum=self.bn_momentum,
                             epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.dtype)(x)
        elif self.norm == "layer":
            x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
        x = self.act(x)
        if self.pool == "max":
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        elif self.pool == "avg":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return x, None


class CNN(nn.Module):
    """``depth`` convolutional layers of ``width`` channels on ``image_shape`` images
    (flat inputs are reshaped), global average pooling, ``out_dim`` logits."""

    depth: int = 4
    width: int = 16
    out_dim: int = 10
    image_shape: Sequence[int] = (8, 8, 1)
    kernel_size: int = 3
    stride: int = 1
    padding: str = "SAME"
    pool: str = "none"
    norm: str = "none"
    act: Callable[[Array], Array] = nn.relu
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros
    bn_momentum: Any = 0.99
    bn_eps: Any = 1e-3
    dtype: Any = jnp.float32

    def _layer(self, stride: int, train: bool) -> dict[str, Any]:
        return dict(width=self.width, kernel_size=self.kernel_size, stride=stride,
                    padding=self.padding, norm=self.norm, pool=self.pool, act=self.act,
                    kernel_init=self.kernel_init, bias_init=self.bias_init,
                    bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                    train=train)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.reshape(x.shape[0], *self.image_shape)
        x, _ = ConvLayer(**self._layer(self.stride, train), name="conv_0")(x)
        if self.depth > 1 and self.pool == "none":
            layers = nn.scan(ConvLayer, variable_axes={c: 0 for c in (
                "params", "batch_stats", "perturbations", "intermediates")},
                split_rngs={"params": True}, length=self.depth - 1)
            x, _ = layers(**self._layer(1, train), name="convs")(x, None)
        else:
            for i in range(1, self.depth):
                x, _ = ConvLayer(**self._layer(1, train), name=f"conv_{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.out_dim, kernel_init=self.kernel_init, bias_init=self.bias_init,
                        dtype=self.dtype, param_dtype=self.dtype, name="readout")(x)
