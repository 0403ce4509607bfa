"""Model families whose module is a plain linen class, instrumented automatically.

Two routes lead here: the registry's own such families (``model=cnn``: the class is
:class:`vgrad.models.cnn.CNN`) and the config route for a user's module,

    python -m vgrad.train model=custom model.target=my_package.my_module.MyNet \\
        +model.args.features=64

where ``model.target`` is the dotted path of a ``flax.linen.Module`` class, importable
from the working directory or an installed package (Hydra's ``get_class``, as its
``_target_`` instantiation resolves classes), and ``model.args`` its own keyword
arguments. vgrad fills the fields the class declares among :data:`INJECTED` from the
run's config, so that the sweep axes reach the module: ``act`` (the activation, a plain
function), ``kernel_init`` and ``bias_init`` (the initializers), ``out_dim`` or
``num_classes`` (outputs: one per class, or one), ``depth`` and ``width``,
``image_shape`` (an image dataset's (H, W, C); inputs arrive as flat rows), ``dtype``
and ``param_dtype``, ``bn_momentum`` and ``bn_eps``. A field given in ``model.args``
is passed as given. The module's ``__call__(x)`` or ``__call__(x, train)`` returns the
logits.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn

from vgrad import activations, data
from vgrad.errors import ConfigError, at_least, one_of
from vgrad.layers import Layout
from vgrad.models import cnn, transformer
from vgrad.models.auto import Found, Instrumented, act_function, discover
from vgrad.models.common import Parts

#: The fields vgrad fills from the run's config, when the module declares them.
INJECTED = ("act", "kernel_init", "bias_init", "out_dim", "num_classes", "depth", "width",
            "image_shape", "dtype", "param_dtype", "bn_momentum", "bn_eps")


@dataclass
class CustomModel:
    """``conf/model/custom.yaml``: a user's linen module."""

    name: str = "custom"
    target: str = ""  # the module's class: my_package.my_module.MyNet
    args: dict[str, Any] = field(default_factory=dict)  # its own keyword arguments


def load_class(target: str) -> type[nn.Module]:
    """The ``flax.linen.Module`` class at the dotted path ``target`` (the working
    directory is searched too, as ``python -m`` does, whatever launched the run)."""
    from hydra.utils import get_class

    if "." not in target:
        raise ConfigError("model.target", target or "''", "the dotted path of a "
                          "flax.linen.Module class, e.g. my_package.my_module.MyNet")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        cls = get_class(target)
    except Exception as err:  # (Hydra wraps the import's own error)
        cause = err.__cause__ or err
        raise ConfigError("model.target", target, "an importable flax.linen.Module class "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0]})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError("model.target", target, f"a flax.linen.Module class (it is "
                          f"{type(cls).__name__} {getattr(cls, '__name__', '')})".strip())
    call = next((k.__dict__["__call__"] for k in cls.__mro__
                 if "__call__" in k.__dict__ and k not in (nn.Module, object)), None)
    if call is None or not _takes_input(call):
        raise ConfigError("model.target", target, "a module with __call__(self, x) or "
                          "__call__(self, x, train) returning the logits")
    return cls


def _takes_input(call: Callable) -> bool:
    try:
        params = list(inspect.signature(call).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional[1:] if p.default is p.empty and p.name != "train"]
    return bool(positional) and not required


def fields(cls: type[nn.Module]) -> set[str]:
    """The module's own fields (its dataclass fields but Flax's ``parent`` and ``name``)."""
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


@dataclass(frozen=True)
class LinenFamily:
    """A registry family built from a linen class: the class and its own keyword
    arguments, both from the config."""

    cls: Callable[[Any], type[nn.Module]]
    args: Callable[[Any], dict[str, Any]]

    def module(self, cfg: Any, parts: Parts, out_dim: int) -> nn.Module:
        """The bare module a validated config describes, for one member's ``parts``."""
        cls, own = self.cls(cfg), self.args(cfg)
        values = {"act": act_function(parts.act), "kernel_init": parts.kernel_init,
                  "bias_init": parts.bias_init, "out_dim": out_dim, "num_classes": out_dim,
                  "depth": cfg.depth, "width": cfg.width,
                  "image_shape": data.image_shape(cfg.data), "dtype": parts.dtype,
                  "param_dtype": parts.dtype, "bn_momentum": parts.bn_momentum,
                  "bn_eps": parts.bn_eps}
        declared = fields(cls)
        kwargs = {k: v for k, v in values.items()
                  if k in declared and k not in own and not (k == "image_shape" and v is None)}
        try:
            return cls(**own, **kwargs)
        except TypeError as err:
            raise ConfigError("model.args", own, f"keyword arguments of {cls.__name__} "
                              f"(its fields: {', '.join(sorted(declared))}): {err}") from None

    def build(self, cfg: Any, parts: Parts, out_dim: int) -> Instrumented:
        return Instrumented(self.module(cfg, parts, out_dim))

    def found(self, cfg: Any, n_features: int | None) -> Found:
        """What one trace of the module on inputs of ``n_features`` tells (remembered per
        structure: sweeps ask once per job)."""
        from omegaconf import OmegaConf

        if n_features is None:
            raise ValueError(f"model={cfg.model.name}: its layout needs the input's features")
        key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True),
                          OmegaConf.to_container(cfg.act, resolve=True), cfg.depth,
                          cfg.width, cfg.dtype, n_features, getattr(cfg.data, "name", ""),
                          data.sequence_shape(cfg.data)],
                         sort_keys=True, default=str)
        if key not in _FOUND:
            from vgrad.models.common import parts_from_config

            image = data.image_shape(cfg.data)
            if image is not None and "image_shape" in fields(self.cls(cfg)) and \
                    image[0] * image[1] * image[2] != n_features:
                raise ConfigError("data", cfg.data.name, f"images of {'x'.join(map(str, image))} "
                                  f"features with model={cfg.model.name} (these rows hold "
                                  f"{n_features})")
            net = self.module(cfg, parts_from_config(cfg), 2)
            _FOUND[key] = discover(Instrumented(net), n_features, _label(cfg), cfg.dtype)
        return _FOUND[key]

    def layout(self, cfg: Any, n_features: int) -> Layout:
        return self.found(cfg, n_features).layout

    def widths(self, cfg: Any, n_features: int) -> list[int]:
        return self.found(cfg, n_features).widths

    def n_params(self, cfg: Any, n_features: int) -> int:
        return self.found(cfg, n_features).n_params

    def uses_act(self, cfg: Any) -> bool:
        return "act" in fields(self.cls(cfg)) and "act" not in self.args(cfg)


_FOUND: dict[str, Found] = {}


def _label(cfg: Any) -> str:
    return cfg.model.target if cfg.model.name == "custom" else cfg.model.name


def validate_linen(cfg: Any) -> None:
    """What every linen family refuses: activations with several outputs per unit (the
    module sizes its own layers), per-layer ``widths`` and the MLP's ``bn``."""
    if activations.pieces(cfg.act) != 1:
        raise ConfigError("act", cfg.act.name, f"an activation with one output per unit "
                          f"with model={cfg.model.name} (its layers have their own widths)")
    if cfg.widths is not None:
        raise ConfigError("widths", list(cfg.widths), f"null with model={cfg.model.name}")
    bn = getattr(cfg.bn, "value", cfg.bn)
    if bn != "none":
        raise ConfigError("bn", bn, f"none with model={cfg.model.name} (the module has "
                          "its own normalisation)")


def custom_class(cfg: Any) -> type[nn.Module]:
    return load_class(cfg.model.target)


def custom_args(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    args = cfg.model.args
    return dict(args) if isinstance(args, dict) else OmegaConf.to_container(args, resolve=True)


CUSTOM = LinenFamily(custom_class, custom_args)


def validate(cfg: Any) -> None:
    """``model=custom``: the target imports, is a linen module with a usable
    ``__call__``, and takes ``model.args``."""
    validate_linen(cfg)
    cls = load_class(cfg.model.target)
    unknown = set(custom_args(cfg)) - fields(cls)
    if unknown:
        raise ConfigError(f"model.args.{sorted(unknown)[0]}", custom_args(cfg)[sorted(unknown)[0]],
                          f"a field of {cls.__name__}: " + ", ".join(sorted(fields(cls))))


# --- model=cnn: the registry's convolutional net, a plain linen module -----------------


@dataclass
class CNNModel:
    """``conf/model/cnn.yaml``: ``depth`` convolutions of ``width`` channels
    (``vgrad.models.cnn``) on an image dataset."""

    name: str = "cnn"
    kernel_size: int = 3
    stride: int = 1  # of the first convolution
    padding: str = "SAME"  # SAME | CIRCULAR | VALID
    pool: str = "none"  # none | max | avg: 2x2 pooling after every convolution
    norm: str = "none"  # none | batch | layer, before each activation


def cnn_args(cfg: Any) -> dict[str, Any]:
    m = cfg.model
    return {"kernel_size": int(m.kernel_size), "stride": int(m.stride),
            "padding": str(m.padding), "pool": str(m.pool), "norm": str(m.norm)}


CNN_FAMILY = LinenFamily(lambda cfg: cnn.CNN, cnn_args)


def validate_cnn(cfg: Any) -> None:
    """``model=cnn``: an image dataset and the CNN's own keys."""
    validate_linen(cfg)
    m = cfg.model
    if cfg.depth < 1:
        raise ConfigError("depth", cfg.depth, "a number >= 1 (convolutions)")
    if data.image_shape(cfg.data) is None:
        images = [n for n, s in data.DATASETS.items() if s.image is not None]
        raise ConfigError("data", cfg.data.name, "an image dataset with model=cnn: "
                          + ", ".join(images))
    for key in ("kernel_size", "stride"):
        at_least(f"model.{key}", m[key], 1)
    for key, allowed in (("padding", cnn.PADDINGS), ("pool", cnn.POOLS),
                         ("norm", cnn.NORMS)):
        one_of(f"model.{key}", m[key], allowed)


# --- model=transformer: the registry's causal Transformer, a plain linen module --------


@dataclass
class TransformerModel:
    """``conf/model/transformer.yaml``: ``depth`` blocks of width ``width``
    (``vgrad.models.transformer``) on a sequence dataset."""

    name: str = "transformer"
    heads: int = 4
    mlp_ratio: int = 4
    norm_position: str = "pre"  # pre | post | none
    deepnorm: bool = False  # DeepNet's residual scaling (post only)
    positions: str = "learned"  # learned | sinusoidal
    zero_residual: bool = False  # each residual branch's last projection starts at zero


def transformer_args(cfg: Any) -> dict[str, Any]:
    m = cfg.model
    return {"heads": int(m.heads), "mlp_ratio": int(m.mlp_ratio),
            "norm_position": str(m.norm_position), "deepnorm": bool(m.deepnorm),
            "positions": str(m.positions), "zero_residual": bool(m.zero_residual),
            "step_features": data.step_features(cfg.data), "per_step": data.per_step(cfg.data)}


TRANSFORMER_FAMILY = LinenFamily(lambda cfg: transformer.Transformer, transformer_args)


def validate_transformer(cfg: Any) -> None:
    """``model=transformer``: a sequence dataset and the Transformer's own keys."""
    validate_linen(cfg)
    m = cfg.model
    if cfg.depth < 1:
        raise ConfigError("depth", cfg.depth, "a number >= 1 (blocks)")
    if data.step_features(cfg.data) is None:
        raise ConfigError("data", cfg.data.name, "a sequence dataset with model=transformer: "
                          "data=adding|copy, or data=digits|fashion_mnist|mnist with "
                          "data.sequence=rows|pixels")
    for key, allowed in (("norm_position", transformer.NORM_POSITIONS),
                         ("positions", transformer.POSITIONS)):
        one_of(f"model.{key}", m[key], allowed)
    for key in ("heads", "mlp_ratio"):
        at_least(f"model.{key}", m[key], 1)
    if cfg.width % m.heads:
        raise ConfigError("model.heads", m.heads, f"a divisor of width ({cfg.width}): the "
                          "model dimension is split across the heads")
    if m.deepnorm and m.norm_position != "post":
        raise ConfigError("model.deepnorm", m.deepnorm, "false unless model.norm_position="
                          f"post (DeepNet scales a post-LN residual; it is {m.norm_position})")
