"""Figures of Transformers (``model=transformer``, or a module of blocks named
``block_<i>`` whose attention sows its weights).

  ``attention`` (a run)  the entropy of each head's attention weights (the
                  ``attention_entropy`` epoch probe) as an attention layer x head heatmap
                  at the first and the last epoch, and each layer's mean over its heads
                  across epochs against the entropy of uniform attention: a head whose
                  entropy falls towards 0 attends to one position (entropy collapse)
  ``block_profile`` (a sweep)  per block, the gradient norm of its MLP's second kernel
                  (``block_<i>/mlp_out``) at initialisation: Xiong et al. 2020's Figure 3,
                  where post-LN's grows towards the output and pre-LN's does not; one line
                  per value of a swept axis (the norm position), a panel per depth, the
                  ratio last block / first block in the legend

A line is the median over seeds (pooled over the runs it stands for), its band the
interquartile range (min-max for fewer than 5 seeds).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vgrad.analysis.naming import axis_name, constants_label, label
from vgrad.analysis.recorded import recorded
from vgrad.analysis.style import (
    MANY_SEEDS,
    MAX_LEGEND_LAYERS,
    caption,
    diverged_note,
    figure,
    layer_colors,
    layer_ticks,
    legend_below,
    log_scale,
    note,
    palette,
    suptitle,
)
from vgrad.analysis.sweep_lines import ordered, pooled_note
from vgrad.analysis.tables import Run, Sweep, axis_column

#: A block's layer the profile reads, and the pattern of block layer names.
PROFILE_LAYER = "mlp_out"
_BLOCK = re.compile(r"^block_(\d+)/(.+)$")


def uniform_entropy(length: int) -> float:
    """The attention entropy of a causal layer attending uniformly, averaged over the
    queries: query t (0-based) sees t + 1 keys, mean_t ln(t + 1)."""
    return float(np.mean(np.log(np.arange(1, length + 1))))


def _sequence_length(run: Run) -> int | None:
    from omegaconf import OmegaConf

    from vgrad import data

    try:
        shape = data.sequence_shape(OmegaConf.create(run.config.get("data") or {}))
    except Exception:  # (a run whose data config this vgrad cannot read)
        return None
    return None if shape is None else int(shape[0])


def attention(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Attention entropy per layer and head (see the module docstring)."""
    from vgrad.analysis.run_figures import _run_title

    m = run.metrics
    if "attn_entropy" not in m:
        return None
    h = np.asarray(m["attn_entropy"], np.float64)  # [S, epoch, attention, head]
    S, _, L, H = h.shape
    epoch = np.asarray(m["epoch"]) if "epoch" in m else np.arange(h.shape[1])
    length = _sequence_length(run)
    top = uniform_entropy(length) if length else None
    fig, ax = figure(2, 2, width=7.6, height=2.8, sharex=False)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first, last = np.nanmedian(h[:, 0], axis=0), np.nanmedian(h[:, -1], axis=0)
    high = top if top else float(np.nanmax(h)) if np.isfinite(h).any() else 1.0
    for a, image, when in ((ax[0, 0], first, "at initialisation"),
                           (ax[0, 1], last, f"at epoch {epoch[-1]}")):
        drawn = a.imshow(image, aspect="auto", origin="lower", cmap="magma", vmin=0,
                         vmax=high, interpolation="nearest")
        a.set(title=f"Entropy per head {when}", xlabel="head", ylabel="attention layer")
        a.set_xticks(range(H))
        a.set_yticks(range(L))
        a.grid(False)
    fig.colorbar(drawn, ax=ax[0, :], label="entropy (nats)", shrink=0.9)
    grid = ax[1, 0].get_gridspec()
    for one in ax[1, :]:
        one.remove()
    a = fig.add_subplot(grid[1, :])
    colors = layer_colors(L)
    names = [f"attention {i}" for i in range(L)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(h, axis=3)  # [S, epoch, L]
        for i in range(L):
            center = np.nanmedian(mean[:, :, i], axis=0)
            a.plot(epoch, center, color=colors[i], label=names[i], marker="o", markersize=2.5)
            lowest = np.nanmin(h[:, :, i, :], axis=(0, 2))
            a.plot(epoch, lowest, color=colors[i], linestyle=":", linewidth=0.9)
    if top:
        a.axhline(top, color="0.35", linestyle="--", linewidth=1,
                  label=f"uniform over the keys seen: {top:.2f}")
    a.set(title="Mean over heads (solid) and the lowest head (dotted)", xlabel="epoch",
          ylabel="entropy (nats)", ylim=(0, None))
    layer_ticks(a, len(epoch))
    if L <= MAX_LEGEND_LAYERS:
        legend_below(fig, a, ncols=6)
    else:  # (many layers: a colour bar beside this panel; the uniform line is labelled)
        cmap = LinearSegmentedColormap.from_list("layers", colors)
        bar = fig.colorbar(ScalarMappable(Normalize(0, L - 1), cmap), ax=a,
                           label="attention layer (0: input side)")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if top:
            a.legend(handles=a.lines[-1:], fontsize=7, loc="lower left")
    _run_title(fig, "Attention entropy", run, varying)
    caption(fig, "entropy of each head's attention weights on the probe batch, averaged "
            "over examples and query positions; 0: every query attends to one key "
            "(collapse)", "heatmaps and lines: median over seeds" if S > 1 else "one seed",
            diverged_note([run]))
    return fig


# --- across a sweep ----------------------------------------------------------------------


def block_layers(run: Run, layer: str = PROFILE_LAYER) -> list[int]:
    """The indices (in ``layer_names``) of each block's ``layer``, block 0 first; [] for
    a run without blocks."""
    names = [str(n) for n in run.metrics.get("layer_names", [])]
    found = {}
    for i, name in enumerate(names):
        match = _BLOCK.match(name)
        if match and match.group(2) == layer:
            found[int(match.group(1))] = i
    return [found[b] for b in sorted(found)] if found and sorted(found) == list(
        range(len(found))) else []


def initial_profile(run: Run, layer: str = PROFILE_LAYER) -> np.ndarray:
    """||dL/dW|| of each block's ``layer`` kernel at the first recorded step, [S, blocks]
    (NaN where not finite; no blocks: [S, 0])."""
    v = np.asarray(run.metrics["grad_norm"], np.float64)[:, 0, block_layers(run, layer)]
    return np.where(np.isfinite(v), v, np.nan)


def applies(sweep: Sweep) -> bool:
    """Whether an ended run of ``sweep`` has blocks and recorded their gradient norms."""
    return any(recorded(r, "grad_norm") and block_layers(r) for r in sweep.runs_list
               if r.status != "failed")


def block_profile(sweep: Sweep, hue: str) -> Figure | None:
    """The per-block gradient norm of ``block_<i>/mlp_out``'s kernel at initialisation,
    one line per value of ``hue``, one panel per depth (see the module docstring)."""
    runs = sweep.runs
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    profiles = {r.name: initial_profile(r) for r in (sweep.run(n) for n in ordered(ended["run"]))
                if recorded(r, "grad_norm")}  # [S, blocks] each
    profiles = {name: v for name, v in profiles.items() if v.shape[1]}
    if not profiles:
        return None
    every = [sweep.run(name) for name in profiles]
    chosen = ended[ended["run"].isin(list(profiles))]
    ch = axis_column(runs, hue)
    hues = ordered(chosen[ch])
    depths = sorted({v.shape[1] for v in profiles.values()})
    colors = palette(len(hues))
    fig, ax = figure(1, len(depths), width=min(16.0, 3.6 * len(depths) + 1.0), height=3.3,
                     sharex=False)
    seeds = []
    for col, depth in enumerate(depths):
        a = ax[0, col]
        drawn = positive = False
        for j, value in enumerate(hues):
            names = set(chosen.loc[chosen[ch].astype(str) == value, "run"])
            pooled = [v for name, v in profiles.items()
                      if name in names and v.shape[1] == depth]
            if not pooled:
                continue
            v = np.concatenate(pooled)  # [seeds, blocks]
            seeds.append(len(v))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                low, mid, high = (np.nanpercentile(v, [25, 50, 75], axis=0)
                                  if len(v) >= MANY_SEEDS
                                  else (np.nanmin(v, 0), np.nanmedian(v, 0), np.nanmax(v, 0)))
                ratio = np.nanmedian(v[:, -1] / v[:, 0])
                positive = positive or bool(np.nanmax(mid) > 0)
            x = np.arange(1, depth + 1)
            a.plot(x, mid, color=colors[j], marker="o", markersize=2.5,
                   label=f"{label(hue, value)}: last / first = {ratio:.3g}")
            if len(v) > 1:
                a.fill_between(x, low, high, color=colors[j], alpha=0.18, linewidth=0)
            drawn = drawn or bool(np.isfinite(mid).any())
        if not drawn:
            note(a, "no finite gradient norm at initialisation")
            continue
        log_scale(a, positive, "gradient norm")
        layer_ticks(a, depth)
        a.set(title=f"{depth} blocks", xlabel="block (1: input side)",
              ylabel=f"‖∂L/∂W‖ of {PROFILE_LAYER}" if col == 0 else None)
        a.legend(fontsize=7, loc="best")
    suptitle(fig, f"Gradient of each block's {PROFILE_LAYER} kernel at initialisation by "
             f"{axis_name(hue)}", constants_label(every, [hue, "depth"]))
    most = max(seeds, default=1)
    spread = ("" if most < 2 else ", band: interquartile range" if most >= MANY_SEEDS
              else ", band: min–max")
    caption(fig, f"first recorded step (before any update); a line: the median over "
            f"seeds{spread}",
            "last / first: the median over seeds of the ratio of the last block's norm to "
            "the first's (Xiong et al. 2020, Figure 3: post-LN's grows towards the output)",
            pooled_note(runs, [hue, "depth"]), diverged_note(every))
    return fig
