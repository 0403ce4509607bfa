"""The model registry: the ``model`` axis (``conf/model/<name>.yaml``).

Each entry gives a model's config schema, its builder (from a validated config and a
member's :class:`~vgrad.models.common.Parts`), its :class:`~vgrad.layers.Layout` (the
declaration of its instrumented layers, which everything downstream iterates over), the
widths of its layers' outputs (the memory estimate of ``vgrad.group``) and the checks of
its keys, and its facts that the rest of vgrad reads instead of testing its name: whether
it reads its input as a sequence (``sequence``: its program depends on how the input is
cut into steps), whether its declared widths are per step (``recurrent``: it holds its
activations at every step), whether it reads out at every step, whether it applies the
``act`` axis, and whether run labels name it. Layouts and widths are asked for with the
input's features, which a module instrumented automatically needs (``cnn``, ``custom``:
``vgrad.models.auto`` finds their layers by tracing them). A new model family is its
module, one line here, its YAML and its tests; a plain linen module needs no layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vgrad import activations, data
from vgrad.layers import Layout
from vgrad.models import custom, mlp, resmlp, rnn
from vgrad.models.common import Parts, parts_from_config


@dataclass(frozen=True)
class Model:
    """A registry entry."""

    schema: type
    build: Callable[[Any, Parts, int], Any]  # a linen module, or one instrumented
    layout: Callable[[Any, int], Layout]  # (config, input features)
    widths: Callable[[Any, int], list[int]]  # of its layers' outputs, input side first
    validate: Callable[[Any], None]
    #: Reads its input as a sequence of steps (``vgrad.data.sequence_shape``).
    sequence: bool = False
    #: Its declared widths are those of one step, and it holds them at every step (a
    #: recurrent net); a module whose traced widths cover the whole sequence is not.
    recurrent: bool = False
    #: Applies the ``act`` axis (a gated cell computes its own sigmoids and tanh), or
    #: whether a config's module does (a user's module: when it has an ``act`` field).
    uses_act: bool | Callable[[Any], bool] = True
    #: Named in run labels and descriptions (the plain MLP goes without saying).
    named: bool = True
    #: Its parameter count (config, input features); None: from ``widths`` as Dense
    #: layers (the memory estimate).
    n_params: Callable[[Any, int], int] | None = None
    #: Float fields of its config node that are inputs of the program (traced knobs,
    #: ``vgrad.group``): a sweep over them compiles one program. ``build`` reads a
    #: member's values from ``Parts.model_knobs``.
    knobs: tuple[str, ...] = ()
    #: Reads out at every step of a sequence when the data has a label at every step
    #: (``vgrad.data.per_step``: the copy task); its logits are then [batch, T, classes].
    per_step: bool = False
    #: Its hidden layers are ``width`` wide, so that the NTK and muP parametrizations
    #: apply (``param``, ``vgrad.parametrization``): the MLP and the residual MLP.
    width_parametrized: bool = False

    def takes_act(self, cfg: Any) -> bool:
        """Whether a config's net applies the ``act`` axis."""
        return self.uses_act(cfg) if callable(self.uses_act) else self.uses_act

    def input_structure(self, data_cfg: Any) -> dict[str, Any]:
        """What the model's program depends on in the data config besides the data's
        shapes (part of a job's structure): a sequence model's ``sequence_shape``."""
        return {"sequence_shape": data.sequence_shape(data_cfg)} if self.sequence else {}

    def time_steps(self, data_cfg: Any) -> int:
        """The steps over which one example's activations are held: the sequence's
        length for a recurrent net, else 1."""
        return (data.sequence_length(data_cfg) or 1) if self.recurrent else 1


def _declared(fn: Callable[[Any], Any]) -> Callable[[Any, int], Any]:
    """A hand-declared family's layout or widths, which the input does not change."""
    return lambda cfg, n_features: fn(cfg)


def _linen(schema: type, family: custom.LinenFamily, validate: Callable[[Any], None],
           **facts: Any) -> Model:
    """A family whose module is a plain linen class (``vgrad.models.custom``)."""
    return Model(schema, family.build, family.layout, family.widths, validate,
                 uses_act=family.uses_act, n_params=family.n_params, **facts)


MODELS: dict[str, Model] = {
    "mlp": Model(mlp.MLPModel, mlp.build, _declared(mlp.layout),
                 _declared(mlp.hidden_widths), mlp.validate, named=False,
                 width_parametrized=True),
    "resmlp": Model(resmlp.ResMLPModel, resmlp.build, _declared(resmlp.layout),
                    _declared(resmlp.widths), resmlp.validate, width_parametrized=True),
    **{cell: Model(rnn.RecurrentModel, rnn.build, _declared(rnn.layout),
                   _declared(rnn.widths), rnn.validate,
                   sequence=True, recurrent=True,
                   uses_act=gates == 1,  # (the Elman cell applies act)
                   knobs=("recurrent_scale", "forget_bias"), per_step=True)
       for cell, gates in rnn.CELLS.items()},
    "cnn": _linen(custom.CNNModel, custom.CNN_FAMILY, custom.validate_cnn),
    "custom": _linen(custom.CustomModel, custom.CUSTOM, custom.validate),
    "transformer": _linen(custom.TransformerModel, custom.TRANSFORMER_FAMILY,
                          custom.validate_transformer, sequence=True, per_step=True),
}


def build(cfg: Any, out_dim: int, parts: Parts | None = None) -> Any:
    """The network a validated config describes (its own parts unless given)."""
    return MODELS[cfg.model.name].build(cfg, parts or parts_from_config(cfg), out_dim)


def activation_units(cfg: Any, n_features: int | None = None) -> int:
    """Layer outputs one example holds in a forward pass of a validated config's model
    on inputs of ``n_features``: every width (each maxout piece), at every time step of
    a recurrent net (what its evaluation and training memory grow with)."""
    model = MODELS[cfg.model.name]
    return (sum(model.widths(cfg, n_features)) * activations.pieces(cfg.act)
            * model.time_steps(cfg.data))


def layout(cfg: Any, n_features: int | None = None) -> Layout:
    """The layers of a validated config's model on inputs of ``n_features`` (which only a
    module instrumented automatically needs)."""
    return MODELS[cfg.model.name].layout(cfg, n_features)


__all__ = ["MODELS", "Model", "Parts", "activation_units", "build", "layout",
           "parts_from_config"]
