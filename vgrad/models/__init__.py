"""The model registry: the ``model`` axis (``conf/model/<name>.yaml``).

Each entry gives a model's config schema, its builder (from a validated config and a
member's :class:`~vgrad.models.common.Parts`), its :class:`~vgrad.layers.Layout` (the
declaration of its instrumented layers, which everything downstream iterates over), the
widths of its Dense outputs (the memory estimate of ``vgrad.group``) and the checks of
its keys. A new model family is its module, one line here, its YAML and its tests.
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


MODELS: dict[str, Model] = {
    "mlp": Model(mlp.MLPModel, mlp.build, mlp.layout, mlp.hidden_widths, mlp.validate),
    "resmlp": Model(resmlp.ResMLPModel, resmlp.build, resmlp.layout, resmlp.widths,
                    resmlp.validate),
    **{cell: Model(rnn.RecurrentModel, rnn.build, rnn.layout, rnn.widths, rnn.validate)
       for cell in rnn.CELLS},
}


def build(cfg: Any, out_dim: int, parts: Parts | None = None) -> nn.Module:
    """The network a validated config describes (its own parts unless given)."""
    return MODELS[cfg.model.name].build(cfg, parts or parts_from_config(cfg), out_dim)


def activation_units(cfg: Any) -> int:
    """Dense outputs one example holds in a forward pass of a validated config's model:
    every width (each maxout piece), at every time step of a recurrent net (what its
    evaluation and training memory grow with)."""
    time_steps = (data.sequence_length(cfg.data) or 1) if cfg.model.name in rnn.CELLS else 1
    return sum(MODELS[cfg.model.name].widths(cfg)) * activations.pieces(cfg.act) * time_steps


def layout(cfg: Any) -> Layout:
    """The declared layers of a validated config's model."""
    return MODELS[cfg.model.name].layout(cfg)


__all__ = ["MODELS", "Model", "Parts", "activation_units", "build", "layout",
           "parts_from_config"]
