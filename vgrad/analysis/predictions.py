"""What the figures draw beside the measurements, as numbers (no matplotlib): the score
of not learning, and mean-field theory at initialisation. Data is loaded and Gaussian
integrals are computed here, memoised per distinct config, so that a figure of many runs
computes each prediction once.

- ``baseline``: chance, 1 / the number of classes, for a classification task's accuracy;
  the loss of predicting the target's mean, its variance, for a regression task's loss;
  the memoryless cross-entropy of the copy task (10 ln 8 / (T + 20)); from the data the
  runs trained on;
- ``theory_prediction`` (memoised by ``mean_field``): the mean-field δ profile, χ₁ and
  depth scale of a run's net (Poole et al. 2016; Schoenholz et al. 2017:
  ``vgrad.theory``), or why the theory does not describe it (``theory_inputs``), for
  the profile figure's overlay;
- ``run_theory_inputs``, ``phase_boundary``, ``signal_prediction``: the same theory for
  ``theory_figures``: the 6 ξ_c curve and the order-to-chaos boundary of the phase
  diagram, the c^l and δ profiles of the signal figure.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from vgrad.analysis.recorded import regression
from vgrad.analysis.tables import Run

if TYPE_CHECKING:  # vgrad.theory loads when a prediction is first asked for
    from vgrad.theory import Activation


@functools.lru_cache(maxsize=64)
def _task_baseline(data_json: str, task: str) -> float | None:
    """The training targets' variance (``task`` "regression"), the memoryless loss of a
    task with a label per step ("per_step": from its config alone) or 1 / the number of
    classes ("classes"); None when the data cannot be loaded here."""
    from omegaconf import OmegaConf

    from vgrad import data
    from vgrad.errors import ConfigError

    cfg = OmegaConf.create(json.loads(data_json))
    try:
        if task == "per_step":
            return float(data.DATASETS[cfg.name].baseline_loss(cfg))
        ds = data.load(cfg)
    except (ConfigError, OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    if task == "regression":
        return float(np.var(np.asarray(ds.y_train, np.float64)))
    return 1.0 / ds.n_classes if ds.n_classes > 1 else None


def _task(run: Run) -> str:
    """A run's kind of task: "regression", "per_step" (a label at every step, whose
    memoryless baseline its dataset gives, with the cross-entropy) or "classes"."""
    from vgrad import data

    if regression(run):
        return "regression"
    name = (run.config.get("data") or {}).get("name")
    source = data.DATASETS.get(name)
    if source is not None and source.per_step:
        return "per_step" if source.baseline_loss and run.config.get("loss") == "ce" else "other"
    return "classes"


#: The metric each kind of task has a baseline for, and the words of its legend.
_BASELINES = {
    "regression": ("loss", "predicting the mean: MSE {about} Var(target) {about} {v:.3g}"),
    "per_step": ("loss", "no memory: S ln A / (T + 2S) {about} {v:.3g}"),
    "classes": ("acc", "chance: 1/{k} {about} {v:.3g}")}


def baseline(runs: Sequence[Run], metric: str) -> tuple[float, str] | None:
    """What ``metric`` scores without learning, where the runs' task has such a value:
    chance, 1 / the number of classes, for the accuracy of a classification task; the
    loss of predicting the target's mean, its variance (1/6 for the adding problem), for
    the loss of a regression task; the cross-entropy per step of a net without memory
    for the copy task (Arjovsky, Shah & Bengio 2016). (value, legend text), or None:
    other metrics, runs of different kinds of task or of tasks whose baselines differ by
    more than 10%, data that cannot be loaded here."""
    base = metric.removeprefix("final_").removeprefix("initial_")
    kind = ("acc" if base.endswith("_acc") else
            "loss" if base in ("loss", "train_loss", "test_loss") else None)
    if kind is None or not runs:
        return None
    tasks = {_task(r) for r in runs}
    task = tasks.pop()
    if tasks or task not in _BASELINES or _BASELINES[task][0] != kind:
        return None
    values = [_task_baseline(json.dumps(r.config.get("data"), sort_keys=True, default=str),
                             task) for r in runs]
    if any(v is None for v in values) or max(values) > 1.1 * min(values):
        return None
    value = float(np.mean(values))
    about = "=" if max(values) - min(values) < 1e-3 * value else "≈"
    k = round(1 / value) if task == "classes" else None
    return value, _BASELINES[task][1].format(about=about, v=value, k=k)


#: The config keys the mean-field prediction of a run depends on.
THEORY_KEYS = ("model", "act", "init", "bias_init", "depth", "width", "bn", "data", "param")


@dataclass
class Prediction:
    """Mean-field theory of a net at initialisation: ||delta_l|| / ||delta_output|| for
    the Dense layers (output last), the gradient factor chi_1 per layer at the fixed
    point, and the gradient depth scale -1 / ln chi_1."""

    delta_ratio: np.ndarray
    chi: float
    depth_scale: float


def theory_prediction(run: Run) -> Prediction | str:
    """The mean-field prediction for a run's config (Poole et al. 2016; Schoenholz et al.
    2017: ``vgrad.theory``), or why there is none: the theory is for wide MLPs without
    batch norm, with an elementwise activation, a zero-mean fan-in-scaled kernel
    initializer and a zero-mean bias initializer, and is averaged over the run's own
    training inputs."""
    return mean_field(theory_config(run))


def theory_config(run: Run) -> str:
    """The part of a run's config the prediction depends on, as canonical JSON."""
    return json.dumps({k: run.config.get(k) for k in THEORY_KEYS}, sort_keys=True,
                      default=str)


def theory_inputs(config: DictConfig) -> tuple | str:
    """(activation, sigma_w^2, sigma_b^2) of a run config the mean-field theory describes,
    or why it does not: plain MLPs without batch norm, an elementwise activation, a
    fan-in-scaled zero-mean kernel initializer and a zero-mean Gaussian or zero bias."""
    from vgrad import theory

    model = config.get("model")
    if model is not None and model.name != "mlp":
        return f"model={model.name} (the theory drawn is for plain MLPs)"
    if config.get("bn") not in (None, "none"):
        return "batch norm"
    param = config.get("param")
    if param is not None and param.name == "mup" and config.get("width") != param.base_width:
        return ("param=mup away from its base width (its readout's variance is scaled by "
                "base_width / width; the theory drawn is for sp)")
    try:
        return (theory.activation(config.act), theory.sigma_w2_of(config.init),
                theory.sigma_b2_of(config.bias_init))
    except (ValueError, KeyError, AttributeError) as exc:
        return str(exc).split(";")[0]


@functools.lru_cache(maxsize=256)
def mean_field(config_json: str) -> Prediction | str:
    """``theory_prediction`` of the config ``theory_config`` gives, memoised: runs that
    differ only in what the theory does not read (seed, learning rate) share it."""
    from omegaconf import OmegaConf

    from vgrad import data, theory
    from vgrad.errors import ConfigError

    cfg = OmegaConf.create(json.loads(config_json))
    inputs = theory_inputs(cfg)
    if isinstance(inputs, str):
        return inputs
    act, sigma_w2, sigma_b2 = inputs
    try:
        x = data.load(cfg.data).x_train
    except (ConfigError, OSError) as exc:
        return str(exc).split(";")[0]
    q = theory.q_star(act, sigma_w2, sigma_b2)
    return Prediction(theory.mean_delta_profile(act, int(cfg.depth), sigma_w2, sigma_b2, x),
                      theory.chi(act, q, sigma_w2),
                      theory.gradient_depth_scale(act, sigma_w2, sigma_b2))


#: The config keys ``theory_inputs`` reads.
_DESCRIBING = ("model", "bn", "act", "init", "bias_init")


def run_theory_inputs(run: Run) -> tuple | str:
    """(activation, sigma_w^2, sigma_b^2) of a run the theory describes, or why not
    (``theory_inputs``: the rules of the profile figure's overlay); worked out once per
    distinct (model, bn, act, init, bias_init) of a sweep."""
    return _described(json.dumps({k: run.config.get(k) for k in _DESCRIBING},
                                 sort_keys=True, default=str))


@functools.lru_cache(maxsize=1024)
def _described(key: str) -> tuple | str:
    from omegaconf import OmegaConf

    return theory_inputs(OmegaConf.create(json.loads(key)))


@functools.lru_cache(maxsize=32)
def phase_boundary(act_json: str, sigma_b2: float, low: float, high: float, points: int
                   ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The 6 xi_c curve over sigma_w^2 in [low, high] at ``points`` values (xi_c: the
    correlation depth scale; each point in the chaotic phase costs a root-finding over
    2-D Gaussian integrals) and the critical sigma_w^2 of the order-to-chaos boundary
    chi_1 = 1 (None where the bracket holds none), for the activation ``act_json`` (its
    config as JSON)."""
    from omegaconf import OmegaConf

    from vgrad import theory

    act = theory.activation(OmegaConf.create(json.loads(act_json)))
    grid = np.linspace(low, high, points)
    xi = np.array([theory.correlation_depth_scale(act, float(s), sigma_b2) for s in grid])
    try:
        critical = theory.critical_sigma_w2(act, sigma_b2)
    except ValueError:  # no boundary in the bracket (e.g. a linear activation)
        critical = None
    return grid, 6.0 * xi, critical


def signal_prediction(act: Activation, depth: int, sigma_w2: float, sigma_b2: float, x: np.ndarray,
                      probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-field c^l (the correlation between the inputs of ``probe``, the length and
    correlation maps iterated for every input and pair) and delta_l / delta_output
    (averaged over the training inputs ``x``) across the ``depth + 1`` layers of a net
    at initialisation, for the activation ``act`` (``vgrad.theory.activation``)."""
    from vgrad import theory

    _, c_pred = theory.signal_profiles(act, depth, sigma_w2, sigma_b2, probe)
    return c_pred, theory.mean_delta_profile(act, depth, sigma_w2, sigma_b2, x)


def training_inputs(config: DictConfig) -> np.ndarray:
    """The training inputs of a run's config (``config.data``), as the theory averages
    over them."""
    from vgrad import data

    return data.load(config.data).x_train
