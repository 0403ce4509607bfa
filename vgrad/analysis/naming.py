"""How figures and pages name things (text only, no matplotlib): sweep axes and their
values, runs, the settings runs share, recorded metrics, and which axes a sweep varies.

- ``axis_name``, ``value_text``, ``label``: a sweep axis by its math name where there is
  one (σ_w², σ_b², α, T, lr: ``AXIS_NAMES``; math text for figures, plain Unicode for
  pages) and its values as they read (ReZero for ``rezero``: ``VALUE_NAMES``);
- ``run_label``: a run by its values of a sweep's varying axes (``varying_axes``) or,
  without, by its key settings (``SETTINGS`` less the values that go unsaid, ``QUIET``),
  so that runs that differ are never named alike; ``constants_label``: the settings a
  figure's runs share, said once in its suptitle;
- ``metric_text``: a recorded array or final metric in words (``METRIC_NAMES``);
  ``TIME_AXIS`` and ``STATE_GRAD``: the axis and the gradient of every recurrent figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from vgrad import store
from vgrad.analysis.tables import Run

#: How titles and legends name a config key: (math text for figures, plain text for
#: pages). Keys not listed are named by themselves (``act``, ``depth``, ``data.test_size``).
AXIS_NAMES: dict[str, tuple[str, str]] = {
    "init.sigma_w2": (r"$\sigma_w^2$", "σ_w²"),
    "bias_init.sigma_b2": (r"$\sigma_b^2$", "σ_b²"),
    "init.std": (r"std$(W)$", "std(W)"),
    "init.gain": ("gain", "gain"),
    "bias_init.std": (r"std$(b)$", "std(b)"),
    "bias_init.value": (r"$b$", "b"),
    "model.alpha": (r"$\alpha$", "α"),
    "model.skip": ("skip", "skip"),
    "model.norm": ("norm", "norm"),
    "model.alpha_init": (r"$\alpha_0$", "α₀"),
    "model.recurrent_init": (r"$W_{hh}$ init", "W_hh init"),
    "model.recurrent_scale": (r"$W_{hh}$ scale", "W_hh scale"),
    "model.forget_bias": (r"$b_f$", "b_f"),
    "optim.lr": ("lr", "lr"),
    "optim.momentum": ("momentum", "momentum"),
    "data.length": (r"$T$", "T"),
    "clip.max": ("clip max", "clip max"),
    "batch_size": ("batch", "batch"),
    "param": ("param", "parametrization"),
    "param.base_width": (r"$n_{base}$", "base width"),
}
#: How values of some keys read (by their text): ReZero rather than "rezero".
VALUE_NAMES: dict[str, dict[str, str]] = {
    "model.alpha": {"one": "1", "rezero": "ReZero", "skipinit": "SkipInit",
                    "fixup": "Fixup", "inv_sqrt_depth": "1/√depth"},
    "model.skip": {"True": "on", "False": "off"},
    "param": {"sp": "SP", "ntk": "NTK", "mup": "μP"},
}


def _key(axis: str) -> str:
    """A sweep axis as a config key: ``act.name`` is the group ``act``."""
    return axis[: -len(".name")] if axis.endswith(".name") else axis


def axis_name(axis: str, math: bool = True) -> str:
    """How figures (``math``) or pages name a sweep axis: σ_w² for ``init.sigma_w2``."""
    key = _key(axis)
    names = AXIS_NAMES.get(key)
    return key if names is None else names[0 if math else 1]


def value_text(axis: str, value: object) -> str:
    """A value of a sweep axis as figures show it (``ReZero`` for ``rezero``)."""
    text = str(value)
    return VALUE_NAMES.get(_key(axis), {}).get(text, text)


def label(axis: str, value: object, math: bool = True) -> str:
    """``axis=value`` with the axis's math name: ``$\\sigma_w^2$=1.5``, ``act=tanh``."""
    return f"{axis_name(axis, math)}={value_text(axis, value)}"


#: The settings a run is named by when no sweep says what varies, in this order
#: ("group.*": the parameters of the group's choice), and values that go unsaid.
SETTINGS = ("model", "model.*", "act", "act.*", "init", "init.*", "bias_init", "bias_init.*",
            "depth", "width", "widths", "bn", "param", "param.*", "clip", "clip.*", "optim",
            "optim.lr", "loss", "data", "data.length")
QUIET = {"model": "mlp", "param": "sp", "bias_init": "zeros", "clip": "none", "bn": "none",
         "widths": None,
         "init.mean": 0.0, "bias_init.mean": 0.0, "init.distribution": "normal",
         "init.mode": "fan_in", "model.norm": "none", "model.block_dense": 1,
         "model.recurrent_scale": 1.0, "model.forget_bias": 1.0, "model.alpha_init": 0.0,
         "model.heads": 4, "model.mlp_ratio": 4, "model.deepnorm": False,
         "model.positions": "learned", "model.zero_residual": False, "optim.warmup": 0}


def settings(config: dict) -> list[tuple[str, object]]:
    """A run's key settings as (config key, value), in the order of ``SETTINGS``."""
    flat = store.flat_config(config)
    out: list[tuple[str, object]] = []
    for entry in SETTINGS:
        if entry.endswith(".*"):
            group = entry[:-2]
            if QUIET.get(group, "") == flat.get(f"{group}.name"):
                continue  # a choice that goes unsaid says nothing of its parameters
            keys = [k for k in flat if k.startswith(f"{group}.") and k != f"{group}.name"]
        else:
            keys = [f"{entry}.name" if f"{entry}.name" in flat else entry]
        for k in keys:
            if k in flat and not (_key(k) in QUIET and QUIET[_key(k)] == flat[k]) \
                    and flat[k] is not None:
                out.append((_key(k), flat[k]))
    return out


def _excluded(key: str, axes: Sequence[str]) -> bool:
    return any(key == _key(a) or key.startswith(_key(a) + ".") for a in axes)


def axis_value(run: Run, axis: str) -> object:
    """A run's value of a sweep axis (its config: ``act`` is ``act.name``)."""
    flat = store.flat_config(run.config)
    for candidate in (axis, f"{axis}.name"):
        if candidate in flat:
            return flat[candidate]
    return "—"


def run_label(run: Run, varying: Sequence[str] | None = None, math: bool = True) -> str:
    """What a run is called: its values of ``varying`` (a sweep's varying axes, as
    ``varying_axes`` gives them) with math names ("σ_w²=2.0, depth=30"); without, or
    when none varies, its key settings (``settings``) — model and branch scale,
    activation, initializers with σ_w²/σ_b², depth, width, clipping, optimizer, data.
    ``math``: matplotlib math text (figures) or plain Unicode (pages)."""
    if varying:
        return ", ".join(label(a, axis_value(run, a), math) for a in varying)
    return ", ".join(label(k, v, math) for k, v in settings(run.config))


def constants_label(runs: Sequence[Run], exclude: Sequence[str] = (), math: bool = True) -> str:
    """The key settings every one of ``runs`` shares, less the keys under ``exclude``:
    what a figure says once instead of in every label."""
    if not runs:
        return ""
    common = [kv for kv in settings(runs[0].config) if not _excluded(kv[0], exclude)]
    for run in runs[1:]:
        theirs = {k: str(v) for k, v in settings(run.config)}
        common = [(k, v) for k, v in common if theirs.get(k) == str(v)]
    return ", ".join(label(k, v, math) for k, v in common)


def varying_axes(runs: pd.DataFrame) -> list[str]:
    """The swept axes: config columns whose value differs between runs. A group whose
    choice varies counts once (``act``, not also ``act.alpha`` of one of its choices)."""
    runs = runs.drop_duplicates("run")
    skip = {"run", "run_dir", "seed", "status", "diverged", "diverged_at_step", "error",
            "compile_s", "run_s", "steps_per_s"}
    varying = [c for c in runs.columns if c not in skip
               and not c.startswith(("initial_", "final_"))
               and runs[c].astype(str).nunique() > 1]
    groups = {c[: -len(".name")] for c in varying if c.endswith(".name")}
    return [c[: -len(".name")] if c.endswith(".name") else c for c in varying
            if c.endswith(".name") or c.split(".")[0] not in groups]


#: How a figure names a recorded array (others: the key, with
#: spaces for underscores).
METRIC_NAMES = {"train_acc": "train accuracy", "test_acc": "test accuracy",
                "grad_global_norm": "global gradient norm ‖∇L‖",
                "loss": "loss on each step's batch",
                "update_ratio": "update ratio ‖ΔW‖ / ‖W‖",
                "grad_norm": "‖∂L/∂W‖", "delta_norm": "mean ‖δ‖"}


def metric_text(metric: str) -> str:
    """How a figure names a recorded array or a final metric (``final_test_acc``)."""
    metric = metric.removeprefix("final_")
    return METRIC_NAMES.get(metric, metric.replace("_", " ").replace(" acc", " accuracy"))


#: The time axis of every recurrent figure: steps back from the loss (read after the last
#: input step T), so that sequences of different lengths line up at the loss.
TIME_AXIS = "steps back from the loss, T − t"
#: The gradient reaching the recurrent state h_t.
STATE_GRAD = r"$\Vert\partial L/\partial h_t\Vert$"
