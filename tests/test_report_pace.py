"""Reports that keep pace with the sweep: the fast quadrature agrees with the reference
rule, the theory of a line is computed once, the page leads with its figures and folds
a long runs table, run figures are drawn for representative runs, and every command
that swept into a folder is listed. (Speed itself is measured by
``benchmarks/report_bench.py``, never asserted here.)"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LIGHT, cli_main, compose_cfg

from vgrad import activations, store, theory
from vgrad.analysis import figures, load_sweep, predictions, report, write_report
from vgrad.analysis.tables import COMMANDS, record_command, sweep_command, sweep_commands

REFERENCE = Path(__file__).parent / "data" / "theory_reference.json"
ELEMENTWISE = [name for name in activations.ACTIVATIONS if name != "maxout"]

#: 2 depths x 2 learning rates of a tanh net in the theory's units: the learning rate
#: is not something the theory sees, so each depth's two runs share a prediction.
SWEEP = ["-m", "act=tanh", "init=mean_field", "init.sigma_w2=1.5", "bias_init=mean_field",
         "depth=2,3", "optim.lr=0.01,0.02", "width=8", "epochs=1", "data.n_samples=64",
         "progress=false", "record.step_probes=[global_norms,delta_norm]",
         "record.epoch_probes=[evaluation]"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pace")
    assert cli_main(*SWEEP, f"hydra.sweep.dir={out}") == 0
    return out


def act(name: str) -> theory.Activation:
    return theory.activation(compose_cfg(f"act={name}").act)


# --- the quadrature ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if n != "hardtanh"])
def test_fast_moments_agree_with_the_reference_midpoint_rule(name):
    phi = act(name)
    assert phi.rule != "reference"  # every elementwise activation of the zoo has a fast rule
    qs = np.array([1e-3, 0.05, 1.0, 4.0, 30.0, 100.0])
    fast_phi2, fast_dphi2 = theory._moments(phi, qs)
    for q, got_phi2, got_dphi2 in zip(qs, fast_phi2, fast_dphi2, strict=True):
        want_phi2 = theory.gaussian_mean(lambda z: phi.phi(z) ** 2, q)
        want_dphi2 = theory.gaussian_mean(lambda z: phi.dphi(z) ** 2, q)
        assert got_phi2 == pytest.approx(want_phi2, rel=1e-6, abs=1e-300), (name, q)
        assert got_dphi2 == pytest.approx(want_dphi2, rel=1e-6, abs=1e-300), (name, q)


def test_hardtanh_moments_match_their_closed_forms_where_the_midpoints_miss_the_steps():
    """hardtanh' steps at +-1, between the reference's midpoints (off by up to 7e-4 at
    q = 1000); the panel rule has an edge there. For z ~ N(0, q), b = 1 / sqrt(q):
    E[phi'^2] = P(|z| < 1) = erf(b / sqrt 2) and E[phi^2] = q (erf(b / sqrt 2) - 2 b pdf(b))
    + 1 - erf(b / sqrt 2)."""
    from scipy.special import erf
    from scipy.stats import norm

    qs = np.array([1e-3, 0.3, 1.0, 3.0, 10.0, 1e3])
    phi2, dphi2 = theory._moments(act("hardtanh"), qs)
    b = 1 / np.sqrt(qs)
    inside = erf(b / np.sqrt(2))
    np.testing.assert_allclose(dphi2, inside, rtol=1e-12)
    np.testing.assert_allclose(phi2, qs * (inside - 2 * b * norm.pdf(b)) + 1 - inside,
                               rtol=1e-7)


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if theory.FAST.get(n) == "smooth"])
def test_the_coarse_two_input_rule_agrees_with_the_reference(name):
    phi = act(name)
    for q, c in ((0.3, 0.2), (1.2, 0.9), (3.0, -0.4)):
        for slope, g in ((False, phi.phi), (True, phi.dphi)):
            want = theory.gaussian_mean_2d(lambda a, b, g=g: g(a) * g(b), q, c)
            got = theory._product_mean(phi, q, c, slope)
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (name, q, c, slope)


@pytest.fixture(scope="module")
def stored():
    return json.loads(REFERENCE.read_text())


def test_the_stored_reference_covers_every_elementwise_activation(stored):
    assert {row["act"] for row in stored["values"]} == set(ELEMENTWISE)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_predictions_agree_with_those_of_the_reference_rule(name, stored):
    """q*, chi_1, c* and the delta profile at three (sigma_w^2, sigma_b^2), against the
    numbers main's ``vgrad.theory`` (the 240,000-point midpoint rule everywhere) gave,
    stored in tests/data/theory_reference.json. hardtanh's chi, and so its profile,
    were off there by up to 4e-5 (its steps between midpoints): checked against the
    closed form instead."""
    phi = act(name)
    for row in [r for r in stored["values"] if r["act"] == name]:
        sw, sb = row["sigma_w2"], row["sigma_b2"]
        profile = theory.delta_profile(phi, stored["depth"], sw, sb, stored["q_input"])
        np.testing.assert_allclose(profile, row["delta_profile"],
                                   rtol=1e-4 if name == "hardtanh" else 1e-6,
                                   err_msg=f"{name} {sw} {sb}")
        if not (math.isfinite(row["q_star"]) and row["q_star"] < 1e6):
            continue  # no fixed point: q grows without bound (iterating says nothing)
        q = theory.q_star(phi, sw, sb)
        assert q == pytest.approx(row["q_star"], rel=1e-6), (sw, sb)
        if name == "hardtanh":
            from scipy.special import erf

            assert theory.chi(phi, q, sw) == pytest.approx(sw * erf(1 / np.sqrt(2 * q)),
                                                           rel=1e-12)
        else:
            assert theory.chi(phi, q, sw) == pytest.approx(row["chi_1"], rel=1e-6), (sw, sb)
        assert theory.c_star(phi, sw, sb) == pytest.approx(row["c_star"], rel=1e-6), (sw, sb)


def test_the_same_act_config_gives_the_same_activation_object():
    first = theory.activation(compose_cfg("act=leaky_relu", "act.alpha=0.2").act)
    assert theory.activation(compose_cfg("act=leaky_relu", "act.alpha=0.2").act) is first
    assert theory.activation(compose_cfg("act=leaky_relu", "act.alpha=0.3").act) is not first
    assert first.rule == "kinked" and act("tanh").rule == "smooth"
    assert act("elu").rule == "kinked" and act("hardtanh").rule == "kinked"
    assert theory.Activation(np.tanh, lambda z: 1 - np.tanh(z) ** 2).rule == "reference"


# --- the theory of a line is computed once ----------------------------------------------------


@pytest.fixture
def layer_steps(monkeypatch):
    """Counts the layers the theory iterates (each one call of ``_chain_step``, for all
    input lengths at once), from empty caches."""
    theory.clear_caches()
    _clear_figure_caches()
    calls = []
    step = theory._chain_step

    def counted(*args, **kwargs):
        calls.append(args[1].size)
        return step(*args, **kwargs)

    monkeypatch.setattr(theory, "_chain_step", counted)
    yield calls
    theory.clear_caches()
    _clear_figure_caches()


def _clear_figure_caches() -> None:
    """Forget the profile figure's own memo of predictions, if it keeps one."""
    memo = getattr(predictions, "mean_field", None)
    if hasattr(memo, "cache_clear"):
        memo.cache_clear()


def test_a_deeper_net_reuses_the_layers_of_a_shallower_one(layer_steps):
    x = np.random.default_rng(0).normal(size=(200, 10))
    tanh = act("tanh")
    profile = theory.mean_delta_profile(tanh, 6, 1.5, 0.05, x)
    assert len(layer_steps) == 6 and set(layer_steps) == {32}  # all quantiles at once
    again = theory.mean_delta_profile(act("tanh"), 6, 1.5, 0.05, x)
    np.testing.assert_array_equal(again, profile)
    shallow = theory.mean_delta_profile(tanh, 3, 1.5, 0.05, x)
    assert len(layer_steps) == 6
    deep = theory.mean_delta_profile(tanh, 8, 1.5, 0.05, x)
    assert len(layer_steps) == 8
    # Each depth's profile is its own: the layers below the output of the deeper net.
    assert len(shallow) == 4 and len(deep) == 9 and shallow[-1] == deep[-1] == 1.0
    theory.mean_delta_profile(tanh, 8, 1.6, 0.05, x)
    assert len(layer_steps) == 16  # another sigma_w^2: its own layers


def test_the_profile_figure_computes_each_line_s_theory_once(sweep_dir, layer_steps):
    sweep = load_sweep(sweep_dir)
    figures.profile(sweep, "depth")  # two lines, each pooling two learning rates
    # depth 3 extends depth 2's layers: 3 layer steps in all, not 2 + 3 (or 2 x that)
    assert len(layer_steps) == 3
    figures.profile(sweep, "optim.lr")  # the same nets, grouped the other way
    assert len(layer_steps) == 3
    import matplotlib.pyplot as plt

    plt.close("all")


# --- the page ------------------------------------------------------------------------------


def test_the_page_leads_with_figures_then_a_sortable_runs_table(sweep_dir, tmp_path):
    page = write_report(sweep_dir, tmp_path / "report", jobs=1).read_text()
    assert page.index("<img") < page.index("<table")  # the sweep's figures first
    assert page.index("Command:") < page.index("<img")  # the short header above them
    table = page[page.index("<table"):page.index("</table>")]
    assert 'class="sortable"' in table and table.count("<tr>") == 1 + 4  # header + runs
    assert "<script>" in page and ".sort(" in page
    # Nothing from outside: the page opens from disk, offline.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    assert "<details>" not in page  # 4 runs: the table is open
    assert "Every run that trained has its figures here." in page
    assert page.count('<section id="run-') == 4


def test_a_long_sweep_folds_its_table_and_draws_representative_runs(sweep_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(report, "FOLD_TABLE", 3)
    monkeypatch.setattr(report, "MAX_RUN_FIGURES", 2)
    page = write_report(sweep_dir, tmp_path / "report", jobs=1).read_text()
    assert page.index("<details><summary>4 runs") < page.index("<table")
    # depth 2, 3 x lr 0.01, 0.02: two runs show every value of both axes
    drawn = re.findall(r'<section id="run-(\d+)"><h3>Run (\S+) ', page)
    assert len(drawn) == 2 and drawn[0][0] == "0"
    runs = load_sweep(sweep_dir).runs.drop_duplicates("run").set_index("run")
    shown = runs.loc[[name for _, name in drawn]]
    assert set(shown["depth"]) == {2, 3} and set(shown["optim.lr"]) == {0.01, 0.02}
    assert "Figures of 2 of the 4 runs" in page and "--runs all" in page
    for number, _ in drawn:  # the table links each drawn run to its figures
        assert f'href="#run-{number}"' in page

    everything = write_report(sweep_dir, tmp_path / "all", jobs=1, runs="all").read_text()
    assert everything.count('<section id="run-') == 4
    one = sorted(runs.index)[-1]
    chosen = write_report(sweep_dir, tmp_path / "one", jobs=1, runs=[one]).read_text()
    assert re.findall(r'<section id="run-\d+"><h3>Run (\S+) ', chosen) == [one]
    with pytest.raises(ValueError, match="no run named 'nope'"):
        write_report(sweep_dir, tmp_path / "bad", jobs=1, runs=["nope"])

    # The same from the command line: --runs all, --runs NAME,NAME, one line for a bad name.
    from vgrad import cli

    assert cli.report_main([str(sweep_dir), "--out", str(tmp_path / "cli"), "--jobs", "1",
                            "--runs", f"{one},{one}"]) == 0
    page = (tmp_path / "cli" / "index.html").read_text()
    assert re.findall(r'<section id="run-\d+"><h3>Run (\S+) ', page) == [one]
    with pytest.raises(SystemExit) as exit_:
        cli.report_main([str(sweep_dir), "--out", str(tmp_path / "nope"), "--runs", "nope"])
    assert exit_.value.code == 2 and not (tmp_path / "nope" / "index.html").exists()


def test_representative_runs_show_every_value_of_every_axis_with_few_runs():
    grid = pd.DataFrame([{"run": f"{i}", "init.sigma_w2": 1 + 0.25 * (i // 10),
                          "depth": 10 * (1 + i % 10)} for i in range(130)])
    chosen = report.representative_runs(grid, ["init.sigma_w2", "depth"],
                                        list(grid["run"]))
    picked = grid.set_index("run").loc[chosen]
    assert set(picked["init.sigma_w2"]) == set(grid["init.sigma_w2"])
    assert set(picked["depth"]) == set(grid["depth"])
    assert len(chosen) == 13 and chosen[0] == "0"  # max(13, 10), the first run among them
    assert chosen == sorted(chosen, key=int)  # in the sweep's order


# --- the command history ----------------------------------------------------------------


def test_record_command_appends_quoted_unresolved_lines(tmp_path):
    path = record_command(tmp_path, ["act=tanh,relu", "x=${oc.env:HOME}", "name=it's"],
                          ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/tmp/a b"])
    record_command(tmp_path, ["depth=3"], [])
    assert path == tmp_path / COMMANDS
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["command"] for e in lines] == [
        "python -m vgrad.train -m act=tanh,relu 'x=${oc.env:HOME}' 'name=it'\"'\"'s' "
        "'hydra.sweep.dir=/tmp/a b'",
        "python -m vgrad.train -m depth=3"]
    assert lines[0]["task"][1] == "x=${oc.env:HOME}" and "time" in lines[0]
    assert sweep_commands(tmp_path) == [e["command"] for e in lines]


def test_record_command_refuses_links_and_never_writes_through_them(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    linked_file = tmp_path / "a"
    (linked_file / COMMANDS.parent).mkdir(parents=True)
    (linked_file / COMMANDS).symlink_to(victim)
    linked_folder = tmp_path / "b"
    linked_folder.mkdir()
    (linked_folder / COMMANDS.parent).symlink_to(tmp_path / "elsewhere")
    for sweep in (linked_file, linked_folder):
        with pytest.raises(store.LinkRefused):
            record_command(sweep, ["act=tanh"], [])
    assert victim.read_text() == "keep\n" and not (tmp_path / "elsewhere").exists()
    assert sweep_commands(linked_file) == []  # a linked history is not read either


#: Appends 200 long lines to the history of the folder argv[1], tagged argv[2].
_APPEND = """
import sys
from vgrad.analysis.tables import record_command
for i in range(200):
    record_command(sys.argv[1], [f"tag={sys.argv[2]}", f"i={i}", "pad=" + "x" * 3000], [])
"""


def test_concurrent_sweeps_append_whole_lines(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND, str(tmp_path), tag])
             for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = (tmp_path / COMMANDS).read_text().splitlines()
    assert len(lines) == 400
    entries = [json.loads(line) for line in lines]
    assert all(e["task"][2] == "pad=" + "x" * 3000 for e in entries)
    assert sorted(e["task"][0] for e in entries) == ["tag=a"] * 200 + ["tag=b"] * 200


def test_sweep_commands_falls_back_to_multirun_yaml_and_skips_damaged_lines(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: [hydra.mode=MULTIRUN]\n    task: [depth=4]\n")
    assert sweep_commands(tmp_path) == ["python -m vgrad.train -m depth=4"]
    record_command(tmp_path, ["depth=2"], [])
    with (tmp_path / COMMANDS).open("a") as f:
        f.write('{"command": "cut sho')  # a torn last line
    # The history, then multirun.yaml's sweep, which the history does not end with (a
    # sweep by a vgrad that kept none).
    assert sweep_commands(tmp_path) == ["python -m vgrad.train -m depth=2",
                                        "python -m vgrad.train -m depth=4"]
    assert sweep_commands(tmp_path / "nothing") == []


def _sweep_into(folder: Path, *overrides: str) -> None:
    """A sweep into ``folder``, its command recorded as vgrad's sweeper records it (once:
    if the sweeper already did, not again)."""
    history = folder / COMMANDS
    before = len(history.read_text().splitlines()) if history.exists() else 0
    assert cli_main("-m", *overrides, f"hydra.sweep.dir={folder}") == 0
    after = len(history.read_text().splitlines()) if history.exists() else 0
    if after == before:
        from omegaconf import OmegaConf

        recorded = OmegaConf.to_container(
            OmegaConf.load(folder / "multirun.yaml").hydra.overrides, resolve=False)
        record_command(folder, recorded["task"], recorded["hydra"])


def test_two_sweeps_into_one_folder_are_both_listed(tmp_path):
    folder = tmp_path / "sweep"
    common = ["epochs=1", "data.n_samples=64", "width=4", "progress=false", *LIGHT]
    _sweep_into(folder, "act=tanh,relu", *common)
    _sweep_into(folder, "act=sigmoid", "hydra.sweep.subdir=second_${hydra.job.num}",
                *common)
    commands = sweep_commands(folder)
    assert len(commands) == 2
    assert "act=tanh,relu" in commands[0] and "act=sigmoid" in commands[1]
    assert "'hydra.sweep.subdir=second_${hydra.job.num}'" in commands[1]  # as written
    assert commands[1] == sweep_command(folder)  # multirun.yaml holds only the last
    page = write_report(folder, tmp_path / "report", jobs=1).read_text()
    assert "2 commands wrote into this folder" in page
    assert page.index("act=tanh,relu") < page.index("act=sigmoid") < page.index("<img")
