"""Recurrent networks (``model=rnn``, ``lstm``, ``gru``): gradients through time.

A recurrent net unrolled over T steps is a deep net whose layers share one weight
matrix; whether dL/dh_t vanishes or explodes as t moves away from the loss is decided by
the state-to-state Jacobian dh_{t+1}/dh_t, and so by the recurrent kernel's spectrum
(Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013, who also introduced
global-norm clipping for it). The input is a sequence: the flat input of the dataset
read as [T, F] (F features per step, ``vgrad.data.step_features``).

Cells (PyTorch's equations and parameter layout, so a reference loop can share them;
``ih`` is the input Dense, ``hh`` the recurrent one, each with its bias):

- ``rnn``: h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), f the ``act`` axis (Elman).
  ``act=tanh`` is the classic tanh RNN; ``act=relu model.recurrent_init=identity`` is the
  IRNN of Le, Jaitly & Hinton 2015 ("A simple way to initialize recurrent networks of
  rectified linear units").
- ``lstm``: gates i, f, g, o (Hochreiter & Schmidhuber 1997, with the forget gate of Gers
  et al. 2000); the forget gate's input bias starts at ``model.forget_bias`` (1.0:
  Jozefowicz, Zaremba & Sutskever 2015).
- ``gru``: gates r, z and candidate n (Cho et al. 2014), n_t = tanh(W_in x_t + b_in +
  r_t * (W_hn h_{t-1} + b_hn)), h_t = (1 - z_t) n_t + z_t h_{t-1}.

Initializers: input kernels from the ``init`` axis, biases from ``bias_init``, recurrent
kernels per gate block [units, units] from ``model.recurrent_init``: ``orthogonal``
(scaled by ``model.recurrent_scale``: every eigenvalue has modulus = scale),
``identity`` (scale times I) or ``normal`` (N(0, scale^2 / units): spectral radius near
the scale, the circular law). The scale is the knob that decides vanishing against
exploding.

``depth`` recurrent layers of ``width`` units are stacked (layer l reads layer l-1's
states); a Dense readout (the output layer, ``out``) reads the last layer's last state,
or every state when the data has a label at every step (the copy task: logits
[batch, T, classes]).
Each layer's time loop is one ``nn.scan``: compile time does not grow with T. The input
projections W_ih x_t of all steps are one matrix product before the loop.

Instrumented layers (``layout``): ``rnn_0`` ... (kernel statistics pool ``ih`` and
``hh``), then ``out``. A recurrent layer's delta point is its state h_t at every step,
through ``Module.perturb`` inside the loop: the perturbation's gradient is the total
dL/dh_t (through every later step), [batch, T, units], from which ``time_delta_norm``
gives ||dL/dh_t|| per step. The captured activation (the ``hidden`` axis) is the Elman
cell's f over every step and example; for LSTM and GRU it is the sigmoid of the forget
gate (LSTM) or the update gate z (GRU), so that ``act_sat_frac`` is the fraction of
gates near 0 or 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgrad import data
from vgrad.errors import ConfigError, one_of
from vgrad.layers import Capture, Layout, Recurrent, Segment
from vgrad.models.common import Parts, activate, delta_point

Array = jax.Array

CELLS = {"rnn": 1, "lstm": 4, "gru": 3}  # gate blocks per cell
#: The gate block the state passes through linearly: Elman's kernel, LSTM's g, GRU's n.
CANDIDATE = {"rnn": 0, "lstm": 2, "gru": 2}
RECURRENT_INITS = ("orthogonal", "identity", "normal")


@dataclass
class RecurrentModel:
    """``conf/model/{rnn,lstm,gru}.yaml``; ``depth`` stacked layers of ``width`` units."""

    name: str = "rnn"
    recurrent_init: str = "orthogonal"  # orthogonal | identity | normal
    recurrent_scale: float = 1.0  # orthogonal/identity: the scale; normal: std * sqrt(width)
    forget_bias: float = 1.0  # lstm: the forget gate's initial input bias


def recurrent_kernel_init(kind: str, scale: float, gates: int):
    """An initializer of an [units, gates * units] recurrent kernel, one [units, units]
    block per gate drawn by ``kind`` (see the module docstring)."""
    def block(key: Array, n: int, dtype: Any) -> Array:
        if kind == "identity":
            return scale * jnp.eye(n, dtype=dtype)
        if kind == "orthogonal":
            return nn.initializers.orthogonal(scale)(key, (n, n), dtype)
        return scale / math.sqrt(n) * jax.random.normal(key, (n, n), dtype)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        n = shape[0]
        keys = jax.random.split(key, gates)
        return jnp.concatenate([block(keys[g], n, dtype) for g in range(gates)], axis=1)

    return init


class _Sigmoid(nn.Module):
    """The gates' sigmoid as an activation module (for ``activate``'s captures)."""

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        return jax.nn.sigmoid(z)


class _Step(nn.Module):
    """One time step, in ``nn.scan``'s (carry, x_t) -> (carry, y_t) form: x_t is the
    input projection W_ih x_t + b_ih [batch, gates * units]; y_t is (h_t, the
    pre-activation the layer's capture is taken on)."""

    cell: str
    parts: Parts
    model: RecurrentModel
    width: int
    train: bool = False

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], xw: Array
                 ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        h, c = carry
        p, m, u = self.parts, self.model, self.width
        hh = nn.Dense(CELLS[self.cell] * u, bias_init=p.bias_init, dtype=p.dtype,
                      param_dtype=p.dtype, name="hh",
                      kernel_init=recurrent_kernel_init(m.recurrent_init, m.recurrent_scale,
                                                        CELLS[self.cell]))(h)
        if self.cell == "rnn":
            z = xw + hh
            h = p.act(name="act")(z, self.train)
            captured = z
        elif self.cell == "lstm":
            i, f, g, o = jnp.split(xw + hh, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            captured = f
        else:  # gru
            xr, xz, xn = jnp.split(xw, 3, axis=-1)
            hr, hz, hn = jnp.split(hh, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            h = (1.0 - z) * n + z * h
            captured = xz + hz
        h = self.perturb("h", h)  # dL/dh_t: through every later step
        return (h, c), (h, captured)


class RecurrentLayer(nn.Module):
    """One recurrent layer over a whole sequence [batch, T, features] -> [batch, T, units]."""

    cell: str
    parts: Parts
    model: RecurrentModel
    width: int

    @nn.compact
    def __call__(self, x: Array, train: bool, capture: bool) -> Array:
        p, u, gates = self.parts, self.width, CELLS[self.cell]

        def input_bias(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            b = p.bias_init(key, shape, dtype)
            if self.cell == "lstm":  # gates i, f, g, o: f starts at forget_bias
                b = b.at[u:2 * u].add(self.model.forget_bias)
            return b

        xw = nn.Dense(gates * u, kernel_init=p.kernel_init, bias_init=input_bias,
                      dtype=p.dtype, param_dtype=p.dtype, name="ih")(x)
        steps = nn.scan(_Step, variable_broadcast="params", split_rngs={"params": False},
                        variable_axes={"perturbations": 1, "intermediates": 1}, in_axes=1,
                        out_axes=1)
        zeros = jnp.zeros(x.shape[:1] + (u,), p.dtype)
        _, (h, pre) = steps(self.cell, p, self.model, u, train, name="cell")((zeros, zeros), xw)
        if capture:
            # The forward signal (all steps of an example as one vector) and the capture
            # (every step of every example as an example), outside the loop.
            self.sow("intermediates", "signal", h.reshape(h.shape[0], -1))
            act = (p.act(name="act_capture") if self.cell == "rnn" else _Sigmoid())
            activate(self, act, pre.reshape(-1, u), False, True)
        return h


class RecurrentNet(nn.Module):
    """``depth`` stacked recurrent layers and a Dense readout of the last state."""

    cell: str
    parts: Parts
    model: RecurrentModel
    depth: int
    width: int
    step_features: int
    out_dim: int = 1
    per_step: bool = False  # a readout at every step (``vgrad.data.per_step``)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, capture: bool = False) -> Array:
        p = self.parts
        h = x.reshape(x.shape[0], -1, self.step_features)
        for layer in range(self.depth):
            h = RecurrentLayer(self.cell, p, self.model, self.width,
                               name=f"rnn_{layer}")(h, train, capture)
        out = nn.Dense(self.out_dim, kernel_init=p.kernel_init, bias_init=p.bias_init,
                       dtype=p.dtype, param_dtype=p.dtype,
                       name="out")(h if self.per_step else h[:, -1])
        return delta_point(self, "delta_out", out, capture)


def _node(cfg: Any) -> RecurrentModel:
    m = cfg.model
    return RecurrentModel(str(m.name), str(m.recurrent_init), float(m.recurrent_scale),
                          float(m.forget_bias))


def build(cfg: Any, parts: Parts, out_dim: int) -> RecurrentNet:
    """The recurrent net a validated config describes, from a member's ``parts`` (its
    ``recurrent_scale`` and ``forget_bias`` too, traced, when the parts carry them)."""
    node = _node(cfg)
    if parts.model_knobs:
        node = dataclasses.replace(node, **parts.model_knobs)
    return RecurrentNet(cfg.model.name, parts, node, cfg.depth, cfg.width,
                        data.step_features(cfg.data), out_dim, data.per_step(cfg.data))


def layer_names(depth: int) -> tuple[str, ...]:
    return tuple(f"rnn_{layer}" for layer in range(depth))


def layout(cfg: Any) -> Layout:
    """``rnn_0`` ... ``rnn_{depth-1}`` (each ``ih`` and ``hh``), then ``out``."""
    names = layer_names(cfg.depth)
    segments = tuple(
        Segment((n,), ((n, "ih"), (n, "cell", "hh")), (n, "cell", "h"), False, (((n,), (n,)),),
                signal=(n, "signal"))
        for n in names)
    out = Segment(("out",), (("out",),), ("delta_out",), False, ((("out",), ("out",)),))
    recurrent = Recurrent(names, data.sequence_length(cfg.data),
                          deltas=tuple(s.delta for s in segments),
                          kernels=tuple(s.dense[1] for s in segments),
                          inputs=tuple(s.dense[0] for s in segments),
                          candidate=CANDIDATE[cfg.model.name])
    return Layout(segments + (out,), tuple(Capture((n,), "", False) for n in names),
                  recurrent=recurrent)


def widths(cfg: Any) -> list[int]:
    """Widths of the Dense outputs before the logits (the gate pre-activations count)."""
    return [CELLS[cfg.model.name] * cfg.width] * (2 * cfg.depth)


def validate(cfg: Any) -> None:
    """A recurrent net's keys, and the MLP keys it does not take."""
    m = cfg.model
    if cfg.depth < 1:
        raise ConfigError("depth", cfg.depth, "a number >= 1 (stacked recurrent layers)")
    if cfg.widths is not None:
        raise ConfigError("widths", list(cfg.widths),
                          f"null with model={m.name} (its layers share one width: set width)")
    bn = getattr(cfg.bn, "value", cfg.bn)
    if bn != "none":
        raise ConfigError("bn", bn, f"none with model={m.name}")
    one_of("model.recurrent_init", m.recurrent_init, RECURRENT_INITS)
    for key in ("recurrent_scale", "forget_bias"):
        if not math.isfinite(m[key]):
            raise ConfigError(f"model.{key}", m[key], "a finite number")
    if m.name == "rnn" and not _plain_act(cfg.act):
        raise ConfigError("act", cfg.act.name, "an elementwise activation without "
                          "parameters or noise with model=rnn (the Elman cell's f)")
    if data.step_features(cfg.data) is None:
        raise ConfigError("data", cfg.data.name, f"a sequence dataset with model={m.name}: "
                          "data=adding, or data=digits|fashion_mnist|mnist with "
                          "data.sequence=rows|pixels")


def _plain_act(act: Any) -> bool:
    from vgrad import activations

    return activations.elementwise(act) is not None


#: Probe examples whose state-to-state Jacobians are measured (each costs T Jacobians of
#: the cell per layer and their SVDs).
STATE_JACOBIAN_EXAMPLES = 16


def state_jacobian_sv(net: RecurrentNet, params: Any, x: Array,
                      examples: int = STATE_JACOBIAN_EXAMPLES) -> Array:
    """The largest singular value of each step's state-to-state Jacobian
    J_t = d s_t / d s_{t-1} along the net's own trajectory on the first ``examples``
    inputs ``x``, per recurrent layer and step t = 1 ... T, [layers, examples, T]: s is
    the state the cell carries (h for the Elman cell and GRU; (h, c) for LSTM). The
    product of these Jacobians carries dL/dh_T back to h_t, so their norms decide
    vanishing (< 1) against exploding (> 1) through time (Pascanu, Mikolov & Bengio
    2013). Forward mode (``jax.jacfwd``) through the cell's own module and parameters;
    the input projection of step t is held fixed (it does not depend on the state)."""
    u, lstm = net.width, net.cell == "lstm"
    step = _Step(net.cell, net.parts, net.model, u, False)
    h = x[:examples]
    h = h.reshape(h.shape[0], -1, net.step_features)
    out = []
    for layer in range(net.depth):
        p = params[f"rnn_{layer}"]
        xw = h @ p["ih"]["kernel"] + p["ih"]["bias"]  # [B, T, gates * u]
        cell = {"params": p["cell"]}

        def advance(state: tuple[Array, Array], xw_t: Array, cell=cell):
            return step.apply(cell, state, xw_t)[0]

        def transition(state, xw_t):  # one step and its Jacobian's largest singular value
            nxt = advance(state, xw_t)
            if lstm:
                flat = jnp.concatenate(state, axis=-1)
                jac = jax.vmap(jax.jacfwd(lambda s, w: jnp.concatenate(
                    advance((s[:u][None], s[u:][None]), w[None]), axis=-1)[0]))(flat, xw_t)
            else:
                jac = jax.vmap(jax.jacfwd(lambda s, w, c: advance(
                    (s[None], c[None]), w[None])[0][0]))(state[0], xw_t, state[1])
            return nxt, (nxt[0], jnp.linalg.svd(jac, compute_uv=False)[:, 0])

        zeros = jnp.zeros((h.shape[0], u), h.dtype)
        _, (states, sv) = jax.lax.scan(transition, (zeros, zeros), jnp.swapaxes(xw, 0, 1))
        out.append(jnp.swapaxes(sv, 0, 1))  # [B, T]
        h = jnp.swapaxes(states, 0, 1)  # the next layer's input sequence
    return jnp.stack(out)
