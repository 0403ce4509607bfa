"""The figures of one run (a :class:`~vgrad.analysis.tables.Run`). Each takes
``varying``, a sweep's varying axes (``naming.varying_axes``), to title the run by its
values of them, then the settings it does not vary and its folder; without, by its key
settings (``naming.run_label``). Each returns a Figure, or None when the run did not
record what it draws (``registry.unrecorded`` names the probe that records it).

  ``gradients``   mean and std of each layer's kernel gradient over steps, and the loss
                  (the figure of "Visualizing the vanishing gradient problem"; std on a
                  log axis)
  ``weights``     mean and std of each layer's kernel over epochs (visualize preset)
  ``learning_speed``  ||dC/db_l|| per layer over training (Nielsen's chapter 5)
  ``histograms``  fixed-bin log10|gradient| histograms per layer over epochs, pooled
                  over seeds ("How ReLU avoids vanishing gradients", its TensorBoard view);
                  the x range is the fixed bins' range, the same for every run
  ``saturation``  saturated and dead fractions per hidden layer over epochs (for LSTM and
                  GRU: of the gate the cell records, named in the panel titles)
  ``signal``      the forward signal q^l, c^l across layers (opt-in probes)
  ``through_time``  recurrent nets: ||dL/dh_t|| against T - t, and the recurrent spectrum

Layers are coloured on viridis; seeds are drawn as ``style.band`` draws them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vgrad import data
from vgrad.analysis.naming import STATE_GRAD, TIME_AXIS, constants_label, run_label
from vgrad.analysis.predictions import baseline
from vgrad.analysis.recorded import regression, time_rows
from vgrad.analysis.style import (
    MAX_BANDS,
    OKABE_ITO,
    band,
    caption,
    diverged_note,
    draw_baseline,
    figure,
    layer_colors,
    layer_legend,
    layer_ticks,
    legend_below,
    log_scale,
    note,
    seed_note,
    suptitle,
    zero_note,
)
from vgrad.analysis.tables import Run


def _run_title(fig: Figure, what: str, run: Run, varying: Sequence[str] | None,
               *lines: str) -> None:
    """A run figure's suptitle: what it shows and the run's name (by ``varying``), then
    the settings the name leaves out and the run's folder."""
    status = "" if run.status == "completed" else f" [{run.status}]"
    shared = constants_label([run], varying or ()) if varying else ""
    suptitle(fig, f"{what} — {run_label(run, varying)}{status}",
             ", ".join(p for p in (shared, f"run {run.name}") if p), *lines)


def _layer_lines(ax, x, values: np.ndarray, names: list[str], log: bool = False) -> tuple:
    """One line per layer of values [S, T, L]; returns (block, anything drawn)."""
    colors = layer_colors(len(names))
    bands = len(names) <= MAX_BANDS
    block, drawn = 1, False
    for layer, name in enumerate(names):
        b, d = band(ax, x, values[:, :, layer], colors[layer], name, log=log, band=bands)
        block, drawn = max(block, b), drawn or d
    return block, drawn


def gradients(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """The figure of "Visualizing the vanishing gradient problem": mean and std of each
    layer's kernel gradient, and the loss (on a log axis with the loss of predicting the
    mean for a regression task)."""
    m = run.metrics
    if "grad_std" not in m:
        return None
    names, step, S = [str(n) for n in m["layer_names"]], m["step"], m["grad_std"].shape[0]
    fig, ax = figure(3)
    _, drawn = _layer_lines(ax[0, 0], step, m["grad_mean"], names)
    if not drawn:
        note(ax[0, 0], "no finite gradient mean was recorded", clear=False)
    block, drawn = _layer_lines(ax[1, 0], step, m["grad_std"], names, log=True)
    log_scale(ax[1, 0], drawn, "gradient std")
    if "loss" in m:
        log = regression(run) or baseline([run], "loss") is not None  # (copy: a plateau)
        _, drawn = band(ax[2, 0], step, m["loss"], OKABE_ITO[0], "batch loss", log=log)
        if draw_baseline(ax[2, 0], [run], "loss") is not None:
            ax[2, 0].legend(fontsize=7, loc="upper right")
        if log:
            log_scale(ax[2, 0], drawn, "batch loss")
        elif not drawn:
            note(ax[2, 0], "no finite batch loss was recorded", clear=False)
    else:
        note(ax[2, 0], "the batch loss was not recorded in this run (probe global_norms)")
    ax[0, 0].set(title="Mean of the kernel gradient ∂L/∂W", ylabel="mean ∂L/∂W")
    ax[1, 0].set(title="Standard deviation of the kernel gradient", ylabel="std ∂L/∂W")
    ax[2, 0].set(title="Training loss on each step's batch", ylabel="loss", xlabel="step")
    layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _run_title(fig, "Kernel gradients", run, varying)
    caption(fig, seed_note(S, block, len(names) <= MAX_BANDS), diverged_note([run]),
            zero_note(fig))
    return fig


def weights(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """The WeightCapture figure of "Visualizing the vanishing gradient problem": mean and
    std of each kernel over epochs."""
    m = run.metrics
    if "weight_std" not in m:
        return None
    names, epoch, S = [str(n) for n in m["layer_names"]], m["epoch"], m["weight_std"].shape[0]
    fig, ax = figure(2)
    _layer_lines(ax[0, 0], epoch, m["weight_mean"], names)
    _layer_lines(ax[1, 0], epoch, m["weight_std"], names)
    ax[0, 0].set(title="Mean of the kernel weights", ylabel="mean W")
    ax[1, 0].set(title="Standard deviation of the kernel weights", ylabel="std W",
                 xlabel="epoch (0 = initialisation)")
    layer_ticks(ax[1, 0], len(epoch))
    layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _run_title(fig, "Kernel weights", run, varying)
    caption(fig, seed_note(S, bands=len(names) <= MAX_BANDS), diverged_note([run]))
    return fig


#: Nielsen's speed of learning of layer l, the norm of its bias gradient.
SPEED_LABEL = r"$\Vert\partial C/\partial b_l\Vert$"


def learning_speed(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Nielsen's figure (chapter 5): the speed of learning ||dC/db_l|| of each layer over
    training."""
    m = run.metrics
    if "bias_grad_norm" not in m and "probe_bias_grad_norm" not in m:
        return None
    names = [str(n) for n in m["layer_names"]]
    fig, ax = figure(2, sharex=False)
    S, block = 1, 1
    if "probe_bias_grad_norm" in m:
        S = m["probe_bias_grad_norm"].shape[0]
        _, drawn = _layer_lines(ax[0, 0], m["epoch"], m["probe_bias_grad_norm"], names, True)
        log_scale(ax[0, 0], drawn, SPEED_LABEL)
        ax[0, 0].set(title="Averaged over the probe batch, at epoch boundaries",
                     ylabel=SPEED_LABEL, xlabel="epoch (0 = initialisation)")
        layer_ticks(ax[0, 0], len(m["epoch"]))
    else:
        note(ax[0, 0], "probe-batch bias gradients were not recorded in this run")
    if "bias_grad_norm" in m:
        S = m["bias_grad_norm"].shape[0]
        block, drawn = _layer_lines(ax[1, 0], m["step"], m["bias_grad_norm"], names, True)
        log_scale(ax[1, 0], drawn, SPEED_LABEL)
        ax[1, 0].set(title="On each step's mini-batch", ylabel=SPEED_LABEL,
                     xlabel="step")
    else:
        note(ax[1, 0], "per-step bias gradients were not recorded in this run")
    layer_legend(fig, ax[1, 0] if "bias_grad_norm" in m else ax[0, 0],
                 layer_colors(len(names)), names)
    _run_title(fig, f"Speed of learning {SPEED_LABEL}", run, varying)
    caption(fig, seed_note(S, block, len(names) <= MAX_BANDS), diverged_note([run]),
            zero_note(fig))
    return fig


def _pooled_counts(counts: np.ndarray, seed: int | None) -> tuple[np.ndarray, str]:
    """Histogram counts [E, L, B] of one seed, or summed over the seeds ([S, E, L, B])
    wherever a seed's counts are finite; and a note on what was pooled."""
    S = counts.shape[0]
    if seed is not None:
        return np.nan_to_num(counts[seed]), f"seed index {seed}"
    finite = np.isfinite(counts).all(axis=(2, 3))  # [S, E]: not yet diverged
    total = np.where(finite[:, :, None, None], counts, 0).sum(axis=0)
    first_bin = counts[..., 0] / np.maximum(counts.sum(axis=-1), 1)  # [S, E, L]
    vanished = [s for s in range(S) if finite[s, -1] and (first_bin[s, -1] > 0.999).all()]
    parts = [f"pooled over {S} seed(s)" if S > 1 else "one seed"]
    if (~finite).any():
        parts.append(f"{int((~finite[:, -1]).sum())} diverged seed(s) counted until their "
                     "divergence")
    if vanished:
        parts.append(f"{len(vanished)} seed(s) whose gradients ended all below 1e-12 "
                     "(dead or vanished)")
    return total, "; ".join(parts)


def histograms(run: Run, key: str = "grad_hist", seed: int | None = None,
               varying: Sequence[str] | None = None) -> Figure | None:
    """Fixed-bin histograms of log10|gradient| (or weight) per layer over epochs: one
    panel per layer (x: log10 of the magnitude over the bins' whole fixed range, the
    same in every run; y: epoch; colour: fraction of entries), pooled over the seeds
    (``seed``: one seed index instead)."""
    m = run.metrics
    if key not in m or "hist_edges" not in m:
        return None
    names, edges = [str(n) for n in m["layer_names"]], m["hist_edges"]
    counts, pooled = _pooled_counts(np.asarray(m[key], np.float64), seed)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, ax = figure(rows, cols, width=max(2.1 * cols + 1.2, 5.0), height=2.3, sharex=True)
    what = "∂L/∂W" if key == "grad_hist" else "W"
    epoch_edges = np.append(m["epoch"], m["epoch"][-1] + 1) - 0.5
    image = None
    for layer, name in enumerate(names):
        a = ax[layer // cols, layer % cols]
        frac = counts[:, layer] / np.maximum(counts[:, layer].sum(-1, keepdims=True), 1)
        image = a.pcolormesh(edges, epoch_edges, frac, cmap="viridis", shading="flat",
                             norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1))
        a.set(title=name, xlim=(edges[0], edges[-1]))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(False)
    for a in ax[-1]:
        a.set_xlabel(f"log10 |{what}|")
    for a in ax[:, 0]:
        a.set_ylabel("epoch")
    for layer in range(len(names), rows * cols):
        ax[layer // cols, layer % cols].set_visible(False)
    fig.colorbar(image, ax=ax, label="fraction of entries (√ scale)",
                 shrink=0.8 if rows > 1 else 1.0)
    _run_title(fig, f"log10 |{what}| per layer over training", run, varying)
    caption(fig, f"fixed bins, {edges[0]:g} to {edges[-1]:g}, the same for every run "
                 "(the first bin also counts zeros and smaller values, the last larger "
                 f"ones); {pooled}")
    return fig


#: The gate a recurrent cell's ``act_*`` statistics describe (``vgrad.models.rnn``
#: captures the Elman cell's f, LSTM's forget gate, GRU's update gate).
RECORDED_GATE = {"lstm": "forget gate f = σ(·)", "gru": "update gate z = σ(·)"}


def saturation(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Saturated and dead fractions of each hidden layer over epochs (for LSTM and GRU,
    of the gate the cell records: the titles name it)."""
    m = run.metrics
    if "act_sat_frac" not in m:
        return None
    hidden = [str(n) for n in m["layer_names"]][: m["act_sat_frac"].shape[2]]
    S = m["act_sat_frac"].shape[0]
    fig, ax = figure(2)
    _layer_lines(ax[0, 0], m["epoch"], m["act_sat_frac"], hidden)
    _layer_lines(ax[1, 0], m["epoch"], m["act_dead_frac"], hidden)
    threshold = run.config.get("record", {}).get("sat_threshold", 0.1)
    gate = RECORDED_GATE.get((run.config.get("model") or {}).get("name"))
    if gate:
        ax[0, 0].set(title=f"Saturated {gate}: σ′ < {threshold:g} × max σ′ (gate near 0 or 1)",
                     ylabel="fraction", ylim=(-0.02, 1.02))
        ax[1, 0].set(title=f"Stuck {gate.split(' =')[0]}: σ′ = 0 on every probe example",
                     ylabel="fraction", ylim=(-0.02, 1.02),
                     xlabel="epoch (0 = initialisation)")
    else:
        ax[0, 0].set(title=f"Saturated: |f′(z)| < {threshold:g} × max |f′| (example-unit pairs)",
                     ylabel="fraction", ylim=(-0.02, 1.02))
        ax[1, 0].set(title="Dead: units with f′(z) = 0 on every probe example",
                     ylabel="fraction", ylim=(-0.02, 1.02), xlabel="epoch (0 = initialisation)")
    layer_ticks(ax[1, 0], len(m["epoch"]))
    layer_legend(fig, ax[0, 0], layer_colors(len(hidden)), hidden)
    _run_title(fig, f"Saturation of the {gate.split(' =')[0]}" if gate else "Saturation",
               run, varying)
    caption(fig, seed_note(S, bands=len(hidden) <= MAX_BANDS), diverged_note([run]))
    return fig


def _at_init_and_end(ax, values: np.ndarray, label: str, colors: Sequence, log: bool,
                     style: str = "-") -> bool:
    """A profile across layers (values [S, E, L]) at initialisation and at the last
    epoch, one line each; whether anything was drawn."""
    x = np.arange(values.shape[2])
    drawn = False
    for e, when, color in ((0, "initialisation", colors[0]), (-1, "end", colors[1])):
        _, d = band(ax, x, values[:, e, :], color, f"{label} at {when}", log=log, style=style)
        drawn = drawn or d
    return drawn


def signal(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """The forward signal across layers, at initialisation and at the end: its length
    q^l (mean squared pre-activation) and the correlation c^l between different inputs
    (mean-field theory's length and correlation maps: Poole et al. 2016, Schoenholz et
    al. 2017); for residual nets also each block's branch and skip-path variance (Brock,
    De & Smith 2021)."""
    m = run.metrics
    if "signal_q" not in m:
        return None
    names, S = [str(n) for n in m["layer_names"]], m["signal_q"].shape[0]
    residual = "branch_var" in m
    fig, ax = figure(3 if residual else 2, sharex=False)
    drawn = _at_init_and_end(ax[0, 0], m["signal_q"], "signal", OKABE_ITO, log=True)
    log_scale(ax[0, 0], drawn, "$q^l$")
    _at_init_and_end(ax[1, 0], m["signal_c"], "signal", OKABE_ITO, log=False)
    ax[0, 0].set(title="Length of the signal: $q^l$ = mean of z² per unit (probe batch)",
                 ylabel="$q^l$")
    ax[1, 0].set(title="Correlation between different inputs: $c^l$ (mean over pairs)",
                 ylabel="$c^l$", ylim=(-1.05, 1.05))
    for a in ax[:2, 0]:
        layer_ticks(a, len(names))
        a.set_xlabel("layer (0 = next to the input; " + f"{names[0]} … {names[-1]})")
    if residual:
        blocks = np.arange(1, m["branch_var"].shape[2] + 1)
        drawn = False
        for key, what, style in (("skip_var", "skip path h", "-"),
                                 ("branch_var", "branch α·F(h)", "--")):
            for e, when, color in ((0, "initialisation", OKABE_ITO[0]),
                                   (-1, "end", OKABE_ITO[1])):
                _, d = band(ax[2, 0], blocks, m[key][:, e, :], color,
                            f"{what} at {when}", log=True, style=style)
                drawn = drawn or d
        log_scale(ax[2, 0], drawn, "variance")
        ax[2, 0].set(title="Per residual block: variance of the skip path and of the branch",
                     ylabel="variance", xlabel="block")
        layer_ticks(ax[2, 0], len(blocks))
        legend_below(fig, ax[2, 0], ncols=2)
    else:
        legend_below(fig, ax[0, 0], ncols=2)
    _run_title(fig, "Forward signal", run, varying)
    caption(fig, seed_note(S), diverged_note([run]), zero_note(fig))
    return fig


def through_time(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Recurrent nets: the gradient through time. ||dL/dh_t|| against T - t (the steps
    back from the loss, as in ``time_profile``) for every recurrent layer at the first
    step and late in training (the recurrent analogue of the layer profile); the top
    layer's ||dL/dh_t|| over T - t and training steps as a heatmap; and the recurrent
    kernel's spectral radius and largest singular value per epoch (Pascanu, Mikolov &
    Bengio 2013)."""
    m = run.metrics
    if "time_delta_norm" not in m:
        return None
    S, _, R, T = m["time_delta_norm"].shape
    spectrum = "rec_radius" in m
    fig, ax = figure(3 if spectrum else 2, sharex=False, height=2.5)
    back = np.arange(T)[::-1]  # T - t for t = 1 ... T
    colors, drawn = layer_colors(max(R, 2)), False
    for r in range(R):
        for at, style, when in (("init", "-", "step 0"), ("end", "--", "last 10% of steps")):
            label = f"rnn_{r}, {when}" if R > 1 else when
            drawn |= band(ax[0, 0], back, time_rows(m, at, r), colors[r], label, log=True,
                          style=style)[1]
    log_scale(ax[0, 0], drawn, STATE_GRAD)
    ax[0, 0].set(title=f"Gradient reaching the state $h_t$: mean {STATE_GRAD}",
                 xlabel=TIME_AXIS, ylabel=STATE_GRAD)
    layer_ticks(ax[0, 0], T)
    if drawn:
        ax[0, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.log10(np.nanmedian(np.asarray(m["time_delta_norm"][:, :, -1], np.float64),
                                    axis=0))  # [steps, T]
    top = np.where(np.isfinite(top), top, np.nan)[:, ::-1]  # columns: T - t = 0 ... T - 1
    if np.isfinite(top).any():
        image = ax[1, 0].imshow(top.T, aspect="auto", origin="lower", cmap="viridis",
                                extent=(m["step"][0], m["step"][-1] + 1, -0.5, T - 0.5),
                                interpolation="nearest")
        fig.colorbar(image, ax=ax[1, 0], label=f"log10 {STATE_GRAD}")
        ax[1, 0].yaxis.set_major_locator(MaxNLocator(integer=True))
        ax[1, 0].grid(False)
    else:
        note(ax[1, 0], f"{STATE_GRAD}: no finite value to draw")
    over = "median over seeds" if S > 1 else "one seed"
    ax[1, 0].set(title=f"Top recurrent layer, over training ({over})",
                 xlabel="training step", ylabel="T − t")
    if spectrum:
        epochs = np.arange(m["rec_radius"].shape[1])
        drawn = False
        for r in range(R):
            for key, what, style in (("rec_radius", "spectral radius", "-"),
                                     ("rec_sv_max", "largest singular value", "--"),
                                     ("state_jac_sv_mean",
                                      "state Jacobian ‖∂s_t/∂s_(t−1)‖, mean over t", ":")):
                if key not in m:  # (the state_jacobian probe is opt-in)
                    continue
                label = f"rnn_{r}: {what}" if R > 1 else what
                drawn |= band(ax[2, 0], epochs, m[key][:, :, r], colors[r], label,
                              log=True, style=style)[1]
        ax[2, 0].axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        log_scale(ax[2, 0], drawn, "spectrum")
        ax[2, 0].set(title=("Recurrent kernel's spectrum and the state Jacobian"
                            if "state_jac_sv_mean" in m else
                            "Recurrent kernel (the candidate block for LSTM and GRU)"),
                     xlabel="epoch (0 = initialisation)", ylabel="value")
        layer_ticks(ax[2, 0], len(epochs))
        if drawn:
            ax[2, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    _run_title(fig, "Gradients through time", run, varying)
    per_step = (run.config.get("data") or {}).get("name") in data.PER_STEP
    read = ("a loss is read at every step, so ‖∂L/∂h_t‖ holds step t's own readout's "
            "gradient besides what flows back from later steps" if per_step else
            "the loss is read after the last one (T − t = 0)")
    caption(fig, f"T = {T} input steps; {read}", seed_note(S), diverged_note([run]),
            zero_note(fig))
    return fig


def stability_limit(run: Run) -> float | None:
    """The step size's stability limit on the loss's sharpness for plain or heavy-ball
    gradient descent, 2 (1 + beta) / eta (Cohen et al. 2021; beta: the momentum), or None
    for another optimizer, a learning-rate schedule, warmup, or muP's per-parameter rates
    (``param=mup`` away from its base width)."""
    optim, param = run.config.get("optim", {}), run.config.get("param") or {}
    if (optim.get("name") != "sgd" or optim.get("schedule", "constant") != "constant"
            or optim.get("warmup", 0)):
        return None
    if param.get("name") == "mup" and run.config.get("width") != param.get("base_width"):
        return None
    return 2.0 * (1.0 + float(optim.get("momentum", 0.0))) / float(optim["lr"])


def curvature(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """The probe batch's Hessian over epochs (the ``hessian`` probe): its largest and
    smallest eigenvalue beside gradient descent's stability limit 2/eta (the edge of
    stability of Cohen et al. 2021), and where the top eigenvector lives (its squared
    mass per layer); with the ``hessian_blocks`` probe, each layer's block's largest
    eigenvalue too."""
    m = run.metrics
    if "hess_max" not in m:
        return None
    names, epoch, S = [str(n) for n in m["layer_names"]], m["epoch"], m["hess_max"].shape[0]
    blocks = "hess_max_layer" in m
    fig, ax = figure(3 if blocks else 2)
    for key, label, color in (("hess_max", "largest eigenvalue λ_max", OKABE_ITO[0]),
                              ("hess_min", "smallest eigenvalue λ_min", OKABE_ITO[1])):
        band(ax[0, 0], epoch, m[key], color, label)
    limit = stability_limit(run)
    if limit is not None:
        ax[0, 0].axhline(limit, color="0.3", linestyle="--", linewidth=1,
                         label=f"2(1+β)/η = {limit:.3g} (gradient descent's stability limit)")
    ax[0, 0].legend(fontsize=7, loc="best")
    mass = ax[-1, 0]
    _layer_lines(mass, epoch, m["hess_evec_mass"], names)
    ax[0, 0].set(title="Sharpness: extreme eigenvalues of the Hessian (probe batch)",
                 ylabel="eigenvalue")
    if blocks:  # (the hessian_blocks probe)
        _layer_lines(ax[1, 0], epoch, m["hess_max_layer"], names)
        ax[1, 0].set(title="Largest eigenvalue of each layer's block of the Hessian",
                     ylabel="λ_max of the block")
    mass.set(title="Where the top eigenvector lives: its squared mass per layer",
             ylabel="mass", ylim=(-0.02, 1.02), xlabel="epoch (0 = initialisation)")
    layer_legend(fig, mass, layer_colors(len(names)), names)
    _run_title(fig, "Curvature", run, varying)
    caption(fig, seed_note(S, bands=len(names) <= MAX_BANDS), diverged_note([run]))
    return fig
