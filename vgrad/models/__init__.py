"""The model registry: the ``model`` axis (``conf/model/<name>.yaml``).

Each entry gives a model's config schema, its builder (from a validated config and a
member's :class:`~vgrad.models.common.Parts`), its :class:`~vgrad.layers.Layout` (the
declaration of its instrumented layers, which everything downstream iterates over), the
widths of its Dense outputs (the memory estimate of ``vgrad.group``) and the checks of
its keys, and its facts that the rest of vgrad reads instead of testing its name: whether
it reads its input as a sequence (``recurrent``: its program depends on how the input is
cut into steps, and it holds its activations at every step), whether it applies the
``act`` axis, and whether run labels name it. A new model family is its module, one line
here, its YAML and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn

from vgrad import activations, data
from vgrad.layers import Layout
from vgrad.models import mlp, resmlp, rnn
from vgrad.models.common import Parts, parts_from_config


@dataclass(frozen=True)
class Model:
    """A registry entry."""

    schema: type
    build: Callable[[Any, Parts, int], nn.Module]
    layout: Callable[[Any], Layout]
    widths: Callable[[Any], list[int]]  # of its Dense outputs, input side first
    validate: Callable[[Any], None]
    #: Reads its input as a sequence of steps (``vgrad.data.sequence_shape``).
    recurrent: bool = False
    #: Applies the ``act`` axis (a gated cell computes its own sigmoids and tanh).
    uses_act: bool = True
    #: Named in run labels and descriptions (the plain MLP goes without saying).
    named: bool = True

    def input_structure(self, data_cfg: Any) -> dict[str, Any]:
        """What the model's program depends on in the data config besides the data's
        shapes (part of a job's structure): a recurrent net's ``sequence_shape``."""
        return {"sequence_shape": data.sequence_shape(data_cfg)} if self.recurrent else {}

    def time_steps(self, data_cfg: Any) -> int:
        """The steps over which one example's activations are held: the sequence's
        length for a recurrent net, else 1."""
        return (data.sequence_length(data_cfg) or 1) if self.recurrent else 1


MODELS: dict[str, Model] = {
    "mlp": Model(mlp.MLPModel, mlp.build, mlp.layout, mlp.hidden_widths, mlp.validate,
                 named=False),
    "resmlp": Model(resmlp.ResMLPModel, resmlp.build, resmlp.layout, resmlp.widths,
                    resmlp.validate),
    **{cell: Model(rnn.RecurrentModel, rnn.build, rnn.layout, rnn.widths, rnn.validate,
                   recurrent=True, uses_act=gates == 1)  # (the Elman cell applies act)
       for cell, gates in rnn.CELLS.items()},
}


def build(cfg: Any, out_dim: int, parts: Parts | None = None) -> nn.Module:
    """The network a validated config describes (its own parts unless given)."""
    return MODELS[cfg.model.name].build(cfg, parts or parts_from_config(cfg), out_dim)


def activation_units(cfg: Any) -> int:
    """Dense outputs one example holds in a forward pass of a validated config's model:
    every width (each maxout piece), at every time step of a recurrent net (what its
    evaluation and training memory grow with)."""
    model = MODELS[cfg.model.name]
    return sum(model.widths(cfg)) * activations.pieces(cfg.act) * model.time_steps(cfg.data)


def layout(cfg: Any) -> Layout:
    """The declared layers of a validated config's model."""
    return MODELS[cfg.model.name].layout(cfg)


__all__ = ["MODELS", "Model", "Parts", "activation_units", "build", "layout",
           "parts_from_config"]
