"""The finite-width theory of the gradient at initialisation (vgrad.theory's ReLU
log-ratio functions) against an independent numpy Monte Carlo of random ReLU nets, and
the finite_width figure and table on a tiny real sweep: what they measure agrees with
the theory within sampling error, and they decline sweeps the theory does not describe."""

from __future__ import annotations

import math
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import cli_main, texts_of
from scipy.special import polygamma
from test_figure_names import assert_inside

from vgrad import theory
from vgrad.analysis import load_sweep, write_report
from vgrad.analysis import width_figures as wf

#: Standard errors a seeded Monte Carlo estimate may stray from the exact value.
Z = 4.0


def monte_carlo(width: int, depth: int, samples: int, seed: int = 0,
                chunk: int = 2048) -> np.ndarray:
    """r = ln(||delta_first||^2 / ||delta_output||^2) of ``samples`` independent ReLU
    nets of ``depth`` hidden layers of ``width`` units, Gaussian kernels N(0, 2 / fan_in),
    zero biases and one output unit, at a random 3-feature input: the masks come from a
    real forward pass, the output's delta (a scalar: 1) is backpropagated through the
    same kernels. -inf where a layer is dead."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        a, fan, masks, kernels = rng.standard_normal((m, 3)), 3, [], []
        for _ in range(depth):
            w = rng.standard_normal((m, width, fan)) * math.sqrt(2.0 / fan)
            z = np.einsum("sij,sj->si", w, a)
            masks.append(z > 0)
            kernels.append(w)
            a, fan = np.maximum(z, 0.0), width
        delta = rng.standard_normal((m, width)) * math.sqrt(2.0 / width) * masks[-1]
        for layer in range(depth - 1, 0, -1):
            delta = np.einsum("sij,si->sj", kernels[layer], delta) * masks[layer - 1]
        with np.errstate(divide="ignore"):
            out.append(np.log(np.sum(delta ** 2, axis=1)))
    return np.concatenate(out)


def variance_and_se(r: np.ndarray) -> tuple[float, float]:
    centred = r - r.mean()
    n, s2 = len(r), float(np.var(r, ddof=1))
    m4 = float(np.mean(centred ** 4))
    return s2, math.sqrt((m4 - (n - 3) / (n - 1) * s2 * s2) / n)


# --- the theory against products of random matrices ---------------------------------------

#: (width, depth, samples): narrow nets (whose exact moments are far from the leading
#: order and which die often) and a wider, deeper one.
CASES = [(4, 3, 30000), (8, 4, 30000), (16, 8, 12000)]


@pytest.mark.parametrize(("width", "depth", "samples"), CASES)
def test_log_ratio_moments_match_random_relu_nets(width, depth, samples):
    r = monte_carlo(width, depth, samples, seed=width)
    alive = r[np.isfinite(r)]
    exact = theory.relu_log_ratio([width] * depth)
    var, se = variance_and_se(alive)
    assert abs(var - exact.variance) < Z * se, (var, exact.variance, se)
    sd_mean = math.sqrt(var / len(alive))
    assert abs(alive.mean() - exact.mean) < Z * sd_mean
    # The median sits above the mean (the left skew of ln chi^2), as the inverted
    # characteristic function says: the sample median's error is ~1.25 sd / sqrt(N).
    median = theory.relu_log_ratio_median([width] * depth)
    assert abs(np.median(alive) - median) < Z * 1.2533 * sd_mean
    assert median - exact.mean > Z * 1.2533 * sd_mean  # (not the mean: a real shift)
    # At these widths the leading order is off by far more than the sampling error.
    leading = theory.relu_log_ratio_leading([width] * depth)
    assert abs(var - leading.variance) > 3 * Z * se
    # The distribution: the exact CDF at the sample's quartiles.
    quartiles = np.quantile(alive, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(theory.relu_log_ratio_cdf(quartiles, [width] * depth),
                               [0.25, 0.5, 0.75], atol=Z * 0.5 / math.sqrt(len(alive)))
    # Dead layers: found as often as 1 - prod(1 - 2^-n) says.
    p = theory.relu_dead_probability([width] * depth)
    assert abs(np.mean(~np.isfinite(r)) - p) < Z * math.sqrt(p * (1 - p) / samples) + 1e-12
    # The ratio itself, dead nets as 0: mean 1 (He), second moment prod(1 + 5/n).
    ratio = np.where(np.isfinite(r), np.exp(r), 0.0)
    mean, second = theory.relu_ratio_moments([width] * depth)
    assert abs(ratio.mean() - mean) < Z * ratio.std() / math.sqrt(samples)
    assert abs(np.mean(ratio ** 2) - second) < Z * np.std(ratio ** 2) / math.sqrt(samples)


def test_third_cumulant_matches_random_relu_nets():
    r = monte_carlo(8, 4, 30000, seed=1)
    alive = r[np.isfinite(r)]
    third = theory.relu_log_ratio([8] * 4).third
    centred = alive - alive.mean()
    # standard error of the third central moment: sqrt((m6 - m3^2 - 6 m4 m2 + 9 m2^3) / N)
    m2, m3, m4, m6 = (float(np.mean(centred ** k)) for k in (2, 3, 4, 6))
    se = math.sqrt((m6 - m3 ** 2 - 6 * m4 * m2 + 9 * m2 ** 3) / len(alive))
    assert abs(m3 - third) < Z * se, (m3, third, se)


def test_one_unit_has_the_closed_forms_and_wide_layers_the_leading_order():
    # Width 1, given alive: X = 2 chi^2_1, so ln X has mean ln 4 + digamma(1/2) = -gamma,
    # variance trigamma(1/2) = pi^2 / 2, third cumulant polygamma(2, 1/2) = -14 zeta(3).
    one = theory.relu_log_factor(1)
    assert one.mean == pytest.approx(-np.euler_gamma, abs=1e-12)
    assert one.variance == pytest.approx(math.pi ** 2 / 2, rel=1e-12)
    assert one.third == pytest.approx(float(polygamma(2, 0.5)), rel=1e-12)
    assert theory.relu_dead_probability(1) == 0.5
    for n in (1024, 4096):
        layer = theory.relu_log_factor(n)
        assert layer.variance * n == pytest.approx(5.0, rel=2e-2 * 1024 / n)
        assert layer.mean * n == pytest.approx(-2.5, rel=2e-2 * 1024 / n)
        assert layer.third * n * n == pytest.approx(-31.0, rel=0.1 * 1024 / n)
        assert theory.relu_log_ratio_leading([n]) == pytest.approx(
            (-2.5 / n, 5.0 / n, -31.0 / n ** 2))
    # sigma_w^2 shifts the mean by ln(sigma_w^2 / 2) per layer and nothing else.
    shifted = theory.relu_log_ratio([16, 32], sigma_w2=1.0)
    he = theory.relu_log_ratio([16, 32])
    assert shifted.mean == pytest.approx(he.mean + 2 * math.log(0.5), rel=1e-12)
    assert shifted.variance == pytest.approx(he.variance, rel=1e-12)
    assert theory.relu_ratio_moments([16, 32], sigma_w2=1.0)[0] == pytest.approx(0.25)
    # The density is a density, and its mean the exact mean.
    x = np.linspace(-25, 10, 7001)
    density = theory.relu_log_ratio_density(x, [8] * 4)
    assert np.trapezoid(density, x) == pytest.approx(1.0, abs=1e-4)
    assert np.trapezoid(x * density, x) == pytest.approx(theory.relu_log_ratio([8] * 4).mean,
                                                         abs=1e-3)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: theory.relu_log_ratio([16, 0]), "width 0: expected a positive integer"),
    (lambda: theory.relu_log_factor(2.5), "width 2.5: expected a positive integer"),
    (lambda: theory.relu_log_ratio([16], sigma_w2=-1.0), "sigma_w2 -1.0: expected a finite"),
    (lambda: theory.relu_dead_probability([True]), "width True: expected a positive"),
    (lambda: theory.relu_log_ratio_median([]), r"widths \[\]: expected at least one"),
])
def test_bad_widths_and_scales_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


# --- a tiny real sweep -------------------------------------------------------------------

#: Width 4 dies often (a dead layer in 1 - (15/16)^depth of the seeds), width 16 rarely.
SWEEP = ["-m", "+experiment=finite_width", "width=4,16", "depth=2,4", "seeds=256",
         "progress=false"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("finite_width")
    assert cli_main(*SWEEP, f"hydra.sweep.dir={out}") == 0
    return out


COLUMNS = ["width", "depth", "seeds", "sum_inv_width", "var_r", "var_r_se", "var_r_exact",
           "var_r_leading", "mean_r", "mean_r_exact", "mean_r_leading", "median_r",
           "median_r_exact", "median_ratio", "mean_ratio", "mean_ratio_exact",
           "mean_ratio_se", "dead_seeds", "dead_expected"]


def test_the_table_measures_what_the_theory_predicts(sweep_dir):
    sweep = load_sweep(sweep_dir)
    assert wf.applies(sweep)
    table = wf.finite_width_table(sweep)
    assert list(table.columns) == COLUMNS
    assert list(zip(table["width"], table["depth"], strict=True)) == [
        (4, 2), (4, 4), (16, 2), (16, 4)]
    assert (table["seeds"] == 256).all()
    assert table["sum_inv_width"].tolist() == pytest.approx([0.5, 1.0, 0.125, 0.25])
    for row in table.itertuples():
        assert abs(row.var_r - row.var_r_exact) < Z * row.var_r_se, row
        widths = [row.width] * row.depth
        assert row.var_r_exact == pytest.approx(theory.relu_log_ratio(widths).variance)
        assert row.var_r_leading == pytest.approx(5 * row.sum_inv_width)
        p = theory.relu_dead_probability(widths)
        assert row.dead_expected == pytest.approx(256 * p)
        assert abs(row.dead_seeds - row.dead_expected) < Z * math.sqrt(256 * p * (1 - p)) + 1
    assert table["dead_seeds"].iloc[1] > 20  # width 4, depth 4: ~58 of 256 die
    # The same numbers again from the runs' files, by hand: step 0's delta_norm.
    run = next(r for r in sweep.runs_list if r.config["width"] == 4 and r.config["depth"] == 4)
    norms = np.load(run.path / "metrics.npz")["delta_norm"][:, 0, :].astype(np.float64)
    dead = norms[:, 0] == 0
    r = 2 * np.log(norms[~dead, 0] / norms[~dead, -1])
    assert table["var_r"].iloc[1] == pytest.approx(np.var(r, ddof=1))
    assert table["dead_seeds"].iloc[1] == dead.sum()
    ratio = np.where(dead, 0.0, (norms[:, 0] / norms[:, -1]) ** 2)
    assert table["mean_ratio"].iloc[1] == pytest.approx(ratio.mean())


def test_the_figure_draws_every_cell_beside_the_theory(sweep_dir):
    sweep = load_sweep(sweep_dir)
    fig = wf.finite_width(sweep)
    spread, collapse, typical, shape = fig.axes
    assert len(spread.containers) == len(collapse.containers) == 2  # a line per width
    for bars in collapse.containers:
        x, y = bars.lines[0].get_data()
        assert len(x) == 2
    exact = [ln for ln in spread.get_lines() if ln.get_linestyle() == "-"]
    table = wf.finite_width_table(sweep)
    np.testing.assert_allclose(sorted(np.concatenate([ln.get_ydata() for ln in exact])),
                               sorted(table["var_r_exact"]))
    assert spread.get_yscale() == collapse.get_yscale() == typical.get_yscale() == "log"
    assert shape.get_title() == "Distribution of r at depth 4"
    text = texts_of(fig)
    assert "seeds with a dead layer" in text and "at width 4 depth 4" in text
    assert "act=relu" in text and "batch 1 (one fixed input)" in text
    assert "256 seeds" in text
    assert_inside(fig, "finite_width")
    plt.close(fig)


def test_the_report_shows_the_table_and_writes_it(sweep_dir, tmp_path):
    index = write_report(sweep_dir, tmp_path / "report", jobs=1, runs=["0"])
    page = index.read_text()
    assert "Finite-width fluctuations" in page and 'href="finite_width.csv"' in page
    written = (tmp_path / "report" / "finite_width.csv").read_text().splitlines()
    assert written[0].split(",") == COLUMNS and len(written) == 5


def test_sweeps_the_theory_does_not_describe_are_declined(sweep_dir, tmp_path):
    tanh, unrecorded = tmp_path / "tanh", tmp_path / "unrecorded"
    assert cli_main("+experiment=finite_width", "act=tanh", "seeds=4", "progress=false",
                    f"hydra.run.dir={tanh}") == 0
    assert cli_main("+experiment=finite_width", "record.step_probes=[global_norms]",
                    "seeds=4", "progress=false", f"hydra.run.dir={unrecorded}") == 0
    for folder, why in ((tanh, "act=tanh"), (unrecorded, "delta_norm not recorded")):
        sweep = load_sweep(folder)
        assert not wf.applies(sweep)
        assert why in wf.why_not(sweep.runs_list[0])
        assert wf.finite_width(sweep) is None and wf.finite_width_table(sweep).empty
    # Beside described runs, the others are left out and named.
    mixed = tmp_path / "mixed"
    shutil.copytree(sweep_dir, mixed / "sweep")
    shutil.copytree(tanh, mixed / "tanh")
    fig = wf.finite_width(load_sweep(mixed))
    assert "left out, not described by the theory: tanh (act=tanh" in texts_of(fig)
    plt.close(fig)
