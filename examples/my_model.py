"""A model of your own, for vgrad: a small residual CNN written as plain Flax linen.

Nothing here imports vgrad. vgrad finds the layers (every ``nn.Conv`` and ``nn.Dense``)
by itself and records the backpropagated gradient delta at each one's output; the fields
``act``, ``kernel_init``, ``num_classes`` and ``image_shape`` are filled from the run's
config, so the activation and initializer axes sweep this module like a built-in one.
From this folder:

    python -m vgrad.train -m model=custom model.target=my_model.SmallResNet \\
        data=digits loss=ce epochs=5 act=relu,tanh +model.args.blocks=3
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax


class ResidualBlock(nn.Module):
    """x -> act(x + conv(act(conv(x))))."""

    channels: int
    act: Callable[[jax.Array], jax.Array]
    kernel_init: Callable[..., jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(nn.Conv(self.channels, (3, 3), kernel_init=self.kernel_init)(x))
        y = nn.Conv(self.channels, (3, 3), kernel_init=self.kernel_init)(y)
        return self.act(x + y)


class SmallResNet(nn.Module):
    """A stem convolution, ``blocks`` residual blocks of ``channels`` channels, global
    average pooling and a Dense head."""

    num_classes: int = 10
    channels: int = 16
    blocks: int = 2
    image_shape: Sequence[int] = (8, 8, 1)
    act: Callable[[jax.Array], jax.Array] = nn.relu
    kernel_init: Callable[..., jax.Array] = nn.initializers.he_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], *self.image_shape)
        x = self.act(nn.Conv(self.channels, (3, 3), kernel_init=self.kernel_init,
                             name="stem")(x))
        for i in range(self.blocks):
            x = ResidualBlock(self.channels, self.act, self.kernel_init, name=f"block_{i}")(x)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))
