"""The sources' figures, and more, from run and sweep folders (matplotlib): the public
entry. It holds no code of its own; it gathers the figure functions and registries of
the modules below, so that ``from vgrad.analysis import figures`` gives them all:

    sweep = load_sweep("outputs/sweeps/DATE/TIME")
    figures.profile(sweep, hue="act")                       # a sweep figure
    figures.gradients(sweep.runs_list[0], figures.varying_axes(sweep.runs))  # a run's
    for name, caption, fig in figures.sweep_figures(sweep):  # those that apply
        figures.save(fig, name)

Per run (``run_figures``; each takes ``varying``, the sweep's varying axes, to title the
run by them): ``gradients``, ``weights``, ``learning_speed``, ``histograms``,
``saturation``, ``signal``, ``through_time``, ``curvature``; ``gradient_noise``
(``noise_figures``). Per sweep (``sweep_figures``): ``profile``, ``time_profile``,
``heatmap``, ``bars``, ``curves``; with theory (``theory_figures``): ``phase_diagram``,
``signal_theory``, ``isometry``; ``noise_and_sharpness`` (``noise_figures``);
``block_profile`` (``transformer_figures``); ``finite_width`` (``width_figures``);
``coord_check`` (``coord_figures``). The registries
(``registry``): ``RUN_FIGURES`` and ``SWEEP_FIGURES``, which the report and the plot
commands read, with ``sweep_figures(sweep)`` (draw those that apply) and
``command_figures`` (what ``vgrad-plot-sweep`` draws). Each figure function returns a
Figure, or None when the runs did not record what it needs; a missing panel within a
figure is replaced by a note.

The modules, each importing only those above it:

  ``naming``         how axes, values, runs and metrics are named (text, no matplotlib)
  ``recorded``       what a run recorded, and its kind of net and task
  ``predictions``    the numbers drawn beside measurements: chance and mean-predictor
                     baselines, mean-field theory (data and quadrature; no matplotlib)
  ``style``          the look and the shared drawing helpers: colours, bands over seeds,
                     titles, captions and legends that fit, ``save``
  ``run_figures``    the figures of one run
  ``sweep_lines``    which runs make which line, bar or cell, and what is pooled
  ``sweep_figures``  the figures of a sweep
  ``theory_figures`` the sweep figures that put theory beside the measurements
  ``noise_figures``  gradient noise in a run, noise and sharpness across a sweep
  ``transformer_figures``  attention in a run, the per-block profile across a sweep
  ``width_figures``  finite-width fluctuations across widths and depths
  ``coord_figures``  the coordinate check across widths
  ``registry``       which figures there are, when each applies, what the commands draw

**Names** (``naming``): a figure names runs by what varies, with math names where there
is one (σ_w², σ_b², α, T, lr), and says the settings its runs share once, in its
suptitle. **Titles fit, notes go below** (``style``): what a reader needs to read a
figure right is a caption inside the figure. **Nothing is pooled silently**
(``sweep_lines``): a line per value of an axis and of a second one; further axes pooled
and named. **Nothing breaks on exploded runs**: what is finite is drawn, and a note
says which seeds diverged.
"""

from __future__ import annotations

from vgrad.analysis.coord_figures import coord_check
from vgrad.analysis.naming import (
    AXIS_NAMES,
    METRIC_NAMES,
    QUIET,
    SETTINGS,
    STATE_GRAD,
    TIME_AXIS,
    VALUE_NAMES,
    axis_name,
    axis_value,
    constants_label,
    label,
    metric_text,
    run_label,
    settings,
    value_text,
    varying_axes,
)
from vgrad.analysis.noise_figures import gradient_noise, noise_and_sharpness
from vgrad.analysis.predictions import (
    THEORY_KEYS,
    Prediction,
    baseline,
    theory_inputs,
    theory_prediction,
)
from vgrad.analysis.recorded import EVAL_KEYS, recorded, recurrent, regression
from vgrad.analysis.registry import (
    MAX_BARS,
    RUN_FIGURE_PROBES,
    RUN_FIGURES,
    SWEEP_FIGURES,
    Command,
    SweepFigure,
    command_figures,
    sweep_figures,
    unrecorded,
)
from vgrad.analysis.run_figures import (
    RECORDED_GATE,
    SPEED_LABEL,
    curvature,
    gradients,
    histograms,
    learning_speed,
    saturation,
    signal,
    through_time,
    weights,
)
from vgrad.analysis.style import (
    CAPTION_SIZE,
    GLYPH_EM,
    MANY_SEEDS,
    MAX_BANDS,
    MAX_LEGEND_LAYERS,
    MAX_POINTS,
    OKABE_ITO,
    STYLE,
    STYLES,
    TITLE_SIZE,
    ZERO_MARK,
    layer_colors,
    palette,
    save,
)
from vgrad.analysis.sweep_figures import (
    MAX_HUES,
    MAX_PROFILE_LINES,
    PROFILE_LABELS,
    THEORY_HANDLE,
    THEORY_NOTE,
    bars,
    curves,
    default_metric,
    heatmap,
    profile,
    time_profile,
)
from vgrad.analysis.sweep_lines import MAX_NAMED, SHAPE_AXES, Line, Split, split
from vgrad.analysis.theory_figures import isometry, phase_diagram, signal_theory
from vgrad.analysis.transformer_figures import attention, block_profile
from vgrad.analysis.width_figures import finite_width, finite_width_table

__all__ = [
    # figures of a run, of a sweep, with theory
    "gradients", "weights", "learning_speed", "histograms", "saturation", "signal",
    "through_time", "curvature", "profile", "time_profile", "heatmap", "bars", "curves",
    "phase_diagram", "signal_theory", "isometry", "gradient_noise", "noise_and_sharpness",
    "attention", "block_profile", "finite_width", "finite_width_table", "coord_check",
    # registries
    "RUN_FIGURES", "RUN_FIGURE_PROBES", "unrecorded", "SWEEP_FIGURES", "SweepFigure",
    "Command", "sweep_figures", "command_figures", "MAX_BARS",
    # names
    "AXIS_NAMES", "VALUE_NAMES", "SETTINGS", "QUIET", "METRIC_NAMES", "TIME_AXIS",
    "STATE_GRAD", "axis_name", "value_text", "label", "settings", "axis_value", "run_label",
    "constants_label", "metric_text", "varying_axes",
    # runs and predictions
    "EVAL_KEYS", "recorded", "recurrent", "regression", "baseline", "THEORY_KEYS",
    "Prediction", "theory_prediction", "theory_inputs",
    # lines of a sweep figure
    "Line", "Split", "split", "SHAPE_AXES", "MAX_NAMED", "MAX_HUES", "MAX_PROFILE_LINES",
    "PROFILE_LABELS", "THEORY_HANDLE", "THEORY_NOTE", "default_metric",
    # style, output
    "OKABE_ITO", "STYLES", "STYLE", "MAX_LEGEND_LAYERS", "TITLE_SIZE", "CAPTION_SIZE",
    "GLYPH_EM", "MANY_SEEDS", "MAX_POINTS", "MAX_BANDS", "ZERO_MARK", "layer_colors",
    "palette", "save", "SPEED_LABEL", "RECORDED_GATE",
]
