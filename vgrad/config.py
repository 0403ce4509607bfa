"""Typed config schemas (Hydra ConfigStore) and the checks Hydra cannot express.

The YAML files under ``conf/`` are the user-facing configs; each one extends a schema
stored here, so an unknown key or a value of the wrong type fails when Hydra composes
the config, before any run folder is made. The schemas of the swept axes (``act``,
``init``, ``bias_init``, ``clip``, ``optim``, ``data``) live beside their registries and
are stored as ``schema/<group>/<name>``; ``conf/<group>/<name>.yaml`` starts with

    defaults:
      - /schema/<group>/<name>@_here_

``validate`` then checks ranges and combinations and raises :class:`ConfigError`
with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vgrad import activations, data, initializers, models, optim, parametrization, probes
from vgrad.errors import ConfigError, at_least, one_of


class Norm(Enum):
    """Where batch norm goes in each hidden layer (Ioffe & Szegedy 2015)."""

    none = "none"
    pre = "pre"  # Dense -> BatchNorm -> activation
    post = "post"  # Dense -> activation -> BatchNorm


class Loss(Enum):
    bce = "bce"  # binary cross-entropy on one logit (labels 0/1), Keras from_logits
    ce = "ce"  # softmax cross-entropy over n_classes logits
    mse = "mse"  # mean squared error between softmax probabilities and one-hot labels
    bce_onehot = "bce_onehot"  # per-class sigmoid BCE summed over classes (Nielsen)
    regression = "regression"  # squared error against a real target (data=adding)


@dataclass
class Record:
    """What is measured, and how often. See the README's "Recorded statistics"."""

    # Per-step statistics are recorded at global steps 0, every, 2*every, ...
    # Memory: S seeds x (steps / every) x L layers x ~10 float32 arrays.
    every: int = 1
    # The fixed probe batch (the first probe_size training examples) on which
    # activation statistics and histograms are measured at every epoch boundary.
    probe_size: int = 512
    # A unit-example pair is saturated when |f'(z)| < sat_threshold * max |f'|.
    sat_threshold: float = 0.1
    # Save the whole gradient pytree every K steps to grads.npz (0 = off).
    full_grads_every: int = 0
    # Epochs per compiled chunk (0 = automatic: about a second of work per chunk).
    chunk_epochs: int = 0
    # Seconds between writes of the run folder while a run goes (it is always written
    # after the first chunk and at the end). Each write holds everything so far, so
    # writing after every chunk would cost time quadratic in the run's length.
    save_every_s: float = 30.0
    # Parameters saved to params.npz for every seed: at initialisation and at the end
    # (the last finite state of a diverged seed); [] saves none (large nets).
    params: list[str] = field(default_factory=lambda: ["initial", "final"])
    # Which probes run (vgrad/probes.py registries); fewer probes, faster steps and
    # compilation. The evaluation probe (losses and accuracies) always runs.
    step_probes: list[str] = field(default_factory=lambda: [
        n for n, p in probes.STEP_PROBES.items() if not p.opt_in])
    epoch_probes: list[str] = field(default_factory=lambda: [
        n for n, p in probes.EPOCH_PROBES.items() if not p.opt_in])


@dataclass
class Config:
    model: Any = MISSING  # mlp | resmlp (vgrad/models)
    act: Any = MISSING
    init: Any = MISSING  # kernel initializer
    bias_init: Any = MISSING
    clip: Any = MISSING
    optim: Any = MISSING
    data: Any = MISSING
    param: Any = MISSING  # sp | ntk | mup: how layers scale with width (vgrad/parametrization.py)
    depth: int = 4  # hidden layers (the output layer comes on top); resmlp: blocks
    width: int = 5  # units per hidden layer; resmlp: of every block
    widths: list[int] | None = None  # MLP: per-layer widths instead (len must equal depth)
    bn: Norm = Norm.none
    bn_momentum: float = 0.99  # Keras BatchNormalization defaults
    bn_eps: float = 0.001
    loss: Loss = Loss.bce
    epochs: int = 100
    batch_size: int = 32
    seed: int = 0  # first seed; seeds = N trains seed, seed + 1, ..., seed + N - 1
    seeds: int = 1  # seeds trained together in one vmapped program
    record: Record = field(default_factory=Record)
    tensorboard: bool = False  # also write TensorBoard events (the tensorboard extra)
    # Persistent JAX compilation cache (null: off). A repeated or resumed sweep, and any
    # run whose programs were compiled before, loads them instead of compiling.
    compile_cache: str | None = "~/.cache/vgrad/jax"
    # A job whose folder already holds an ended run of the same config is skipped
    # (re-running a sweep into its folder resumes it); false: always train again.
    resume: bool = True
    # Floating-point type of the whole computation and of the records: float64 rules out
    # rounding as the cause of a vanishing gradient (slower; CPUs and most GPUs).
    dtype: str = "float32"
    # Float32 matrix products: highest = true float32 everywhere; default lets GPUs use
    # TF32 (10-bit mantissa), faster but coarse for the small gradients measured here.
    matmul_precision: str = "highest"
    progress: bool = True  # tqdm bar over epochs (off automatically when not a terminal)


#: Top-level keys that do not change what a run computes: a resumed job ignores them
#: when it compares configs, and compiled programs are shared across them.
VOLATILE = ("progress", "resume", "compile_cache", "tensorboard")

#: Keys added to the config after runs were written without them, with the value that
#: means what those runs computed: a sweep started before resumes into its folder.
ADDED_KEYS: dict[str, Any] = {"param": {"name": "sp"}}


def with_added_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the keys added since (``ADDED_KEYS``) at the value its
    run computed with, where it lacks them."""
    return {**{k: v for k, v in ADDED_KEYS.items() if stored and k not in stored}, **stored}


GROUPS: dict[str, dict[str, Any]] = {
    "model": models.MODELS,
    "act": activations.ACTIVATIONS,
    "init": initializers.KERNEL_INITIALIZERS,
    "bias_init": initializers.BIAS_INITIALIZERS,
    "clip": optim.CLIPS,
    "optim": optim.OPTIMIZERS,
    "data": data.DATASETS,
    "param": parametrization.PARAMS,
}


def register() -> None:
    """Store the root schema and every choice's schema in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="vgrad_schema", node=Config)
    for group, registry in GROUPS.items():
        for name, entry in registry.items():
            cs.store(group=f"schema/{group}", name=name, node=entry.schema(name=name))


# --- validation ----------------------------------------------------------------------------


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(key, value, "a finite number > 0")


def validate(cfg: Any) -> None:
    """Check what the schemas cannot: ranges and consistent combinations.

    Dataset-dependent checks (batch size vs training-set size, loss vs number of
    classes) are in :func:`validate_data`.
    """
    known = [f.name for f in dataclasses.fields(Config)]
    for key in cfg:
        if key not in known:  # added with +key=...: nothing would read it
            raise ConfigError(f"+{key}", cfg[key], "a known key (nothing reads this one); "
                              "top-level keys are " + ", ".join(known))
    at_least("width", cfg.width, 1)
    models.MODELS[cfg.model.name].validate(cfg)
    at_least("epochs", cfg.epochs, 1)
    at_least("batch_size", cfg.batch_size, 1)
    at_least("seeds", cfg.seeds, 1)
    at_least("seed", cfg.seed, 0)
    _positive("optim.lr", cfg.optim.lr)
    at_least("optim.l2", cfg.optim.l2, 0)
    one_of("optim.schedule", cfg.optim.schedule, optim.SCHEDULES)
    at_least("optim.warmup", cfg.optim.warmup, 0)
    if "max" in cfg.clip:
        _positive("clip.max", cfg.clip.max)
    if "clipping" in cfg.clip:  # (agc)
        _positive("clip.clipping", cfg.clip.clipping)
    if "momentum" in cfg.optim:  # (sgd, rmsprop)
        at_least("optim.momentum", cfg.optim.momentum, 0)
    _positive("bn_eps", cfg.bn_eps)
    if not 0 <= cfg.bn_momentum < 1:
        raise ConfigError("bn_momentum", cfg.bn_momentum, "a number in [0, 1)")
    _validate_init(cfg.init, "init")
    _validate_init(cfg.bias_init, "bias_init")
    if cfg.param.name != "sp":
        _validate_param(cfg)
    if "pieces" in cfg.act:  # (maxout)
        at_least("act.pieces", cfg.act.pieces, 1)
    if "lower" in cfg.act and not cfg.act.lower <= cfg.act.upper:  # (rrelu)
        raise ConfigError("act.lower", cfg.act.lower, f"<= act.upper ({cfg.act.upper})")
    one_of("matmul_precision", cfg.matmul_precision, ("default", "high", "highest"))
    one_of("dtype", cfg.dtype, DTYPES)
    validate_data_config(cfg.data)
    if data.per_step(cfg.data):
        _validate_per_step(cfg)
    r = cfg.record
    at_least("record.every", r.every, 1)
    at_least("record.probe_size", r.probe_size, 1)
    at_least("record.full_grads_every", r.full_grads_every, 0)
    at_least("record.chunk_epochs", r.chunk_epochs, 0)
    at_least("record.save_every_s", r.save_every_s, 0)
    if not 0 < r.sat_threshold < 1:
        raise ConfigError("record.sat_threshold", r.sat_threshold, "a fraction in (0, 1)")
    for name in r.params:
        one_of("record.params", name, ("initial", "final"))
    for key, registry in (("record.step_probes", probes.STEP_PROBES),
                          ("record.epoch_probes", probes.EPOCH_PROBES)):
        for name in r[key.split(".")[1]]:
            one_of(key, name, registry)
    if cfg.get("tensorboard"):
        validate_extras(cfg)


def _validate_param(cfg: Any) -> None:
    """``param=ntk|mup``: a model whose layers scale with ``width``, a kernel initializer
    of variance proportional to 1/fan_in, and (muP with an adaptive optimizer) no
    coupled L2 term, whose muP rescaling is not implemented."""
    name = cfg.param.name
    if not models.MODELS[cfg.model.name].width_parametrized:
        raise ConfigError("model", cfg.model.name, f"a model whose layers scale with width "
                          f"with param={name} (" + ", ".join(
                              n for n, m in models.MODELS.items() if m.width_parametrized)
                          + ")")
    if cfg.init.name == "variance_scaling" and cfg.init.mode != "fan_in":
        raise ConfigError("init.mode", cfg.init.mode, f"fan_in with param={name}")
    if not initializers.KERNEL_INITIALIZERS[cfg.init.name].scales_with_fan_in(cfg.init):
        raise ConfigError("init", cfg.init.name, f"an initializer of variance proportional "
                          f"to 1/fan_in with param={name} (" + ", ".join(
                              n for n, i in initializers.KERNEL_INITIALIZERS.items()
                              if i.fan_in) + ")")
    if "base_width" in cfg.param:
        at_least("param.base_width", cfg.param.base_width, 1)
        if cfg.widths is not None:  # (its base net: every hidden width at base_width)
            raise ConfigError("widths", list(cfg.widths), f"null with param={name} (set "
                              "width: muP scales every hidden layer from one base width)")
    if (parametrization.PARAMS[name].scales_lr and optim.OPTIMIZERS[cfg.optim.name].adaptive
            and cfg.optim.l2 != 0):
        raise ConfigError("optim.l2", cfg.optim.l2, f"0 with param={name} and "
                          f"optim={cfg.optim.name} (muP's rescaling of a coupled L2 term "
                          "under an adaptive optimizer is not implemented; adamw's "
                          "weight_decay is)")


def _validate_per_step(cfg: Any) -> None:
    """A dataset with a label at every step needs a model that reads out at every step
    and a loss over classes."""
    if not models.MODELS[cfg.model.name].per_step:
        raise ConfigError("model", cfg.model.name, f"a model with a readout at every step "
                          f"with data={cfg.data.name} (" + ", ".join(
                              n for n, m in models.MODELS.items() if m.per_step) + ")")
    if cfg.loss not in (Loss.ce, Loss.mse):
        raise ConfigError("loss", getattr(cfg.loss, "value", cfg.loss),
                          f"ce or mse with data={cfg.data.name} (a class at every step)")


def validate_extras(cfg: Any) -> None:
    """Refuse what needs an optional extra that is not installed (looked up with
    ``importlib.util.find_spec``, nothing imported): ``tensorboard=true`` needs
    tensorboardX. Part of :func:`validate`, so a single run is refused before Hydra
    makes its folder."""
    from vgrad import tensorboard

    if cfg.get("tensorboard") and (absent := tensorboard.missing()):
        raise ConfigError("tensorboard", "true", f"the tensorboard extra installed (no "
                          f"module {', '.join(absent)}): {tensorboard.INSTALL}")


#: The config groups whose choice is the ``name`` key of the chosen file.
CHOICE_GROUPS = ("model", "act", "init", "bias_init", "clip", "optim", "data", "param")


def refuse_name_overrides(overrides: list[str]) -> None:
    """Refuse ``act.name=relu``-style overrides: a choice's ``name`` says which entry of
    its registry runs, while Hydra's record (and every other key of the group) comes
    from the chosen file, so overriding the name alone would train one choice under
    another's record. The way to choose is the group itself: ``act=relu``."""
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group, _, leaf = key.lstrip("+~").partition(".")
        if leaf == "name" and group in CHOICE_GROUPS:
            raise ConfigError(key, value, f"no override of a choice's name: choose it with "
                              f"{group}={value} (the choices: python -m vgrad.train --help)")


#: The floating-point types a run can compute in (the ``dtype`` key).
DTYPES = ("float32", "float64")


def validate_data_config(node: Any) -> None:
    """Ranges of the data parameters, checked before anything is generated or read."""
    one_of("data.scale", node.scale, ("none", "max", "standard"))
    if "n_samples" in node:
        at_least("data.n_samples", node.n_samples, 2)
    if "noise" in node:
        _finite_at_least("data.noise", node.noise, 0)
    if "factor" in node and not 0 < node.factor < 1:
        raise ConfigError("data.factor", node.factor, "a number in (0, 1): the inner "
                          "circle's radius relative to the outer one")
    for key in ("random_state", "split_seed"):
        if key in node:
            at_least(f"data.{key}", node[key], 0)
    if "test_size" in node and not 0 <= node.test_size < 1:
        raise ConfigError("data.test_size", node.test_size, "a fraction in [0, 1)")
    for key, low in (("n_train", 1), ("n_test", 0)):
        if node.get(key) is not None:
            at_least(f"data.{key}", node[key], low)
    if "sequence" in node:
        one_of("data.sequence", node.sequence, ("rows", "pixels"))
    if "length" in node:
        at_least("data.length", node.length, 2)
    if "symbols" in node:  # (copy)
        at_least("data.symbols", node.symbols, 1)
        at_least("data.alphabet", node.alphabet, 2)
    if node.get("input_q") is not None:  # inf would send every seed to NaN at step 0
        _positive("data.input_q", node.input_q)
    if "path" in node and node.path is not None and not str(node.path).strip():
        raise ConfigError("data.path", node.path, "a folder holding the four IDX files")


def _finite_at_least(key: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(key, value, f"a finite number >= {low:g}")


def _validate_init(node: Any, key: str) -> None:
    for field_ in ("mean", "min", "max", "value", "gain"):
        if field_ in node and not math.isfinite(node[field_]):
            raise ConfigError(f"{key}.{field_}", node[field_], "a finite number")
    if "std" in node:
        _finite_at_least(f"{key}.std", node.std, 0)
    if "min" in node and not node.min < node.max:  # (uniform)
        raise ConfigError(f"{key}.min", node.min, f"< {key}.max ({node.max})")
    if "sigma_w2" in node:
        _positive(f"{key}.sigma_w2", node.sigma_w2)
        one_of(f"{key}.distribution", node.distribution, ("normal", "orthogonal"))
    if "sigma_b2" in node:
        _finite_at_least(f"{key}.sigma_b2", node.sigma_b2, 0)
    if "mode" in node:  # (variance_scaling)
        _positive(f"{key}.scale", node.scale)
        one_of(f"{key}.mode", node.mode, ("fan_in", "fan_out", "fan_avg"))
        one_of(f"{key}.distribution", node.distribution,
                ("normal", "truncated_normal", "uniform"))


def validate_data(cfg: Any, n_train: int, n_classes: int) -> None:
    """Checks that need the loaded dataset."""
    if n_train < 1:
        raise ConfigError("data", cfg.data.name, "a dataset with at least one training example")
    if cfg.batch_size > n_train:
        raise ConfigError("batch_size", cfg.batch_size,
                          f"at most the training-set size ({n_train})")
    regression = data.DATASETS[cfg.data.name].regression
    if (cfg.loss == Loss.regression) != regression:
        raise ConfigError("loss", cfg.loss.value if hasattr(cfg.loss, "value") else cfg.loss,
                          f"regression with data={cfg.data.name}" if regression else
                          f"bce, ce, mse or bce_onehot with data={cfg.data.name} (regression "
                          "needs real-valued targets: data=" + "|".join(data.REGRESSION) + ")")
    if cfg.loss == Loss.bce and n_classes != 2:
        raise ConfigError("loss", "bce", f"ce or mse: data={cfg.data.name} has {n_classes} "
                          "classes and bce needs 2")
