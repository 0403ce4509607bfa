"""A small causal (decoder-style) Transformer: a plain Flax linen module.

Like :class:`vgrad.models.cnn.CNN`, nothing here is written for vgrad: the automatic route
(``vgrad.models.auto``) instruments every ``nn.Dense`` and ``nn.DenseGeneral`` call (the
attention's query, key, value and out projections included) and hands the module the run's
activation through its ``act`` field. vgrad fills ``out_dim``, ``depth``, ``width``,
``act``, ``kernel_init``, ``bias_init``, ``dtype`` and ``param_dtype`` from the run's config.
Why a Transformer: residual streams with LayerNorm are where the placement of the norm
decides whether gradients vanish or explode with depth, and the literature measures
exactly the per-block gradient profile vgrad records.

**The equations.** The input arrives flat, [B, T * step_features], and is read as T steps
of ``step_features``. With h_t the stream at step t:

    h^0_t = W_e u_t + b_e + p_t                      (``embed``; p: ``positions``)
    Attn(h)_t = sum_heads W_o,h sum_{s<=t} softmax_s(q_t . k_s / sqrt(d_h)) v_s  (+ b_o)
    MLP(h)_t = W_2 act(W_1 h_t + b_1) + b_2          (``mlp_in``, ``mlp_out``)

and per block (``block_0`` ... ``block_{depth-1}``), by ``norm_position``:

- ``pre`` (GPT-2; Xiong et al. 2020): h <- h + Attn(LN(h)); h <- h + MLP(LN(h)); a final
  LN (``ln_final``) before the readout. The stream is an identity path from every block to
  the output, so the gradient reaching block l is O(1) whatever l.
- ``post`` (Vaswani et al. 2017, "Attention is all you need"): h <- LN(h + Attn(h));
  h <- LN(h + MLP(h)); no final LN. Every LN sits on the gradient's path from the output
  to a block, and Xiong et al. 2020 ("On Layer Normalization in the Transformer
  Architecture") show that at initialisation post-LN's gradient is largest near the output
  and shrinks towards the input, which is why post-LN needs learning-rate warmup and
  pre-LN does not. Liu et al. 2020 ("Understanding the Difficulty of Training
  Transformers") trace the instability further to post-LN's heavy dependence on its
  residual branches (amplified output changes), which pre-LN avoids at a cost in quality.
- ``none``: h <- h + Attn(h); h <- h + MLP(h): the bare residual stream, whose variance
  grows with depth.

``deepnorm`` (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers"): post-LN
with h <- LN(alpha h + F(h)), alpha = (2N)^(1/4), and the initial kernels of the value and
out projections and of both MLP layers multiplied by beta = (8N)^(-1/4), N = ``depth`` (the
paper's encoder-only constants; query and key keep the plain initialiser). It bounds the
model update by a constant independent of depth, keeping post-LN's quality at depth.

``zero_residual``: the last projection of each residual branch (the attention's out
projection and ``mlp_out``, kernel and bias) starts at zero, so that with ``pre`` or
``none`` every block is the identity on the stream at initialisation (ReZero/Fixup/
SkipInit's idea, Bachlechner et al. 2020; Zhang et al. 2019; De & Smith 2020).

Positions: ``learned`` (a parameter ``pos`` [T, width], N(0, 0.02^2), as GPT-2) or
``sinusoidal`` (Vaswani et al. 2017: p_{t,2i} = sin(t / 10000^(2i/width)),
p_{t,2i+1} = cos(t / 10000^(2i/width)); fixed, no parameters). The readout ``out`` gives
logits at every step (``per_step``, [B, T, out_dim]) or from the last step ([B, out_dim]).
Attention is causal (``nn.make_causal_mask``) and sows its weights (``sow_weights``) into
``intermediates`` when that collection is mutable.

**The residual-stream profile.** The delta vgrad measures at a layer is dL/dy for its
output y. A block's attention out projection (``block_l/attn/out``) and its ``mlp_out``
are added straight onto the stream, h' = h + y (``pre``, ``none``) or s = h + y, h' = LN(s)
(``post``; alpha h + y with ``deepnorm``), so their delta equals dL/dh' (for ``post``:
dL/ds, the gradient just before the LayerNorm). The delta norms of those two layers, block
by block, are the per-block residual-stream gradient profile of Xiong et al.'s Figure 3.

vgrad sees six layers per block (the attention's query, key, value, out; ``mlp_in``,
``mlp_out``) plus ``embed`` and ``out``. ``act`` is applied once per block, not after
every layer, so vgrad records no activation statistics for this module (it says so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

NORM_POSITIONS = ("pre", "post", "none")
POSITIONS = ("learned", "sinusoidal")


def deepnorm_constants(depth: int) -> tuple[float, float]:
    """DeepNet's (alpha, beta) for an encoder of ``depth`` blocks (Wang et al. 2022,
    Table 1): alpha = (2N)^(1/4) scales the skip path, beta = (8N)^(-1/4) the initial value,
    out and MLP kernels."""
    return (2.0 * depth) ** 0.25, (8.0 * depth) ** -0.25


def scaled(init: Initializer, factor: float) -> Initializer:
    """``init`` with its draws multiplied by ``factor``."""
    def scaled_init(key: Array, shape: Any, dtype: Any = jnp.float32) -> Array:
        return factor * init(key, shape, dtype)

    return scaled_init


def value_scaled(init: Initializer, factor: float) -> Initializer:
    """``init`` for an attention's query, key and value projections, with the draws of the
    value projection alone multiplied by ``factor`` (DeepNet's beta). Flax's
    ``MultiHeadDotProductAttention`` takes one ``kernel_init`` for all three (each sees the
    same flat [width, width] shape), so the projection is told by the name of the module
    creating the parameter (``value``), read from Flax's module context as Flax's own
    ``linen.partitioning`` does."""
    def init_fn(key: Array, shape: Any, dtype: Any = jnp.float32) -> Array:
        stack = nn.module._context.module_stack
        creating = stack[-1] if stack else None
        w = init(key, shape, dtype)
        return factor * w if creating is not None and creating.name == "value" else w

    return init_fn


def sinusoidal(length: int, width: int) -> np.ndarray:
    """Vaswani et al. 2017's fixed positions [length, width]: sin on even features, cos on
    odd ones, frequencies 1 / 10000^(2i/width)."""
    t = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(0, width, 2, dtype=np.float64)[None, :]
    angle = t / 10000.0 ** (i / width)
    out = np.zeros((length, width))
    out[:, 0::2] = np.sin(angle)
    out[:, 1::2] = np.cos(angle)[:, : width // 2]
    return out


class Block(nn.Module):
    """One Transformer block: causal self-attention then a two-layer MLP, each a residual
    branch, with the LayerNorms where ``norm_position`` puts them."""

    width: int
    heads: int
    mlp_ratio: int
    norm_position: str
    alpha: float  # the skip path's scale (DeepNet's alpha; 1 otherwise)
    beta: float  # the value/out/MLP kernels' initial scale (DeepNet's beta; 1 otherwise)
    zero_residual: bool
    act: Callable[[Array], Array]
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Any
    param_dtype: Any

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _add(self, h: Array, y: Array, name: str) -> Array:
        """The residual add after a branch's output ``y`` (and the LN after it, post)."""
        if self.norm_position == "post":
            return self._norm(name)(self.alpha * h + y)
        return h + y

    @nn.compact
    def __call__(self, h: Array) -> Array:
        pre = self.norm_position == "pre"
        last_init = nn.initializers.zeros if self.zero_residual else scaled(
            self.kernel_init, self.beta)
        last_bias = nn.initializers.zeros if self.zero_residual else self.bias_init
        qkv_init = (self.kernel_init if self.beta == 1.0
                    else value_scaled(self.kernel_init, self.beta))

        x = self._norm("ln_attn")(h) if pre else h
        mask = nn.make_causal_mask(jnp.ones(h.shape[:-1], dtype=bool))
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.width, out_features=self.width,
            kernel_init=qkv_init, bias_init=self.bias_init, out_kernel_init=last_init,
            out_bias_init=last_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            name="attn")(x, mask=mask, sow_weights=True)
        h = self._add(h, y, "ln_attn")

        x = self._norm("ln_mlp")(h) if pre else h
        z = nn.Dense(self.mlp_ratio * self.width, kernel_init=scaled(self.kernel_init, self.beta),
                     bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="mlp_in")(x)
        y = nn.Dense(self.width, kernel_init=last_init, bias_init=last_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp_out")(self.act(z))
        return self._add(h, y, "ln_mlp")


class Transformer(nn.Module):
    """A causal Transformer of ``depth`` blocks of width ``width`` (``heads`` heads, MLP
    hidden width ``mlp_ratio * width``) on inputs [B, T * step_features]; logits
    [B, T, out_dim] (``per_step``) or [B, out_dim] from the last step. The module
    docstring gives the equations and references."""

    out_dim: int
    depth: int
    width: int
    step_features: int
    act: Callable[[Array], Array] = nn.gelu
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros
    heads: int = 4
    mlp_ratio: int = 4
    norm_position: str = "pre"  # pre | post | none
    deepnorm: bool = False  # DeepNet's alpha and beta; norm_position="post" only
    positions: str = "learned"  # learned | sinusoidal
    per_step: bool = False  # logits at every step, else from the last step
    zero_residual: bool = False  # each branch's last projection starts at zero
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise ValueError(f"Transformer: depth must be >= 1 (blocks), got {self.depth}")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"Transformer: heads ({self.heads}) must divide width "
                             f"({self.width}), the model dimension split across heads")
        if self.mlp_ratio < 1:
            raise ValueError(f"Transformer: mlp_ratio must be >= 1, got {self.mlp_ratio}")
        if self.step_features < 1:
            raise ValueError(f"Transformer: step_features must be >= 1, got "
                             f"{self.step_features}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"Transformer: norm_position must be one of "
                             f"{', '.join(NORM_POSITIONS)}, got {self.norm_position!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"Transformer: positions must be one of {', '.join(POSITIONS)}, "
                             f"got {self.positions!r}")
        if self.deepnorm and self.norm_position != "post":
            raise ValueError(f"Transformer: deepnorm=True needs norm_position='post' "
                             f"(DeepNet is a post-LN residual), got {self.norm_position!r}")

    def _steps(self, x: Array) -> Array:
        """[B, T * step_features] -> [B, T, step_features] (a 3-d input is kept)."""
        if x.ndim == 3:
            return x
        if x.ndim != 2 or x.shape[-1] % self.step_features:
            raise ValueError(f"Transformer: inputs [batch, T * step_features] with "
                             f"step_features={self.step_features}, got shape {x.shape}")
        return x.reshape(x.shape[0], x.shape[1] // self.step_features, self.step_features)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self._steps(x)
        length = x.shape[1]
        h = nn.Dense(self.width, kernel_init=self.kernel_init, bias_init=self.bias_init,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(x)
        if self.positions == "learned":
            pos = self.param("pos", nn.initializers.normal(0.02), (length, self.width),
                             self.param_dtype)
        else:
            pos = jnp.asarray(sinusoidal(length, self.width), self.param_dtype)
        h = h + pos.astype(h.dtype)

        alpha, beta = deepnorm_constants(self.depth) if self.deepnorm else (1.0, 1.0)
        for i in range(self.depth):
            h = Block(width=self.width, heads=self.heads, mlp_ratio=self.mlp_ratio,
                      norm_position=self.norm_position, alpha=alpha, beta=beta,
                      zero_residual=self.zero_residual, act=self.act,
                      kernel_init=self.kernel_init, bias_init=self.bias_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"block_{i}")(h)

        if self.norm_position == "pre":
            h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                             name="ln_final")(h)
        if not self.per_step:
            h = h[:, -1]
        return nn.Dense(self.out_dim, kernel_init=self.kernel_init, bias_init=self.bias_init,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="out")(h)
