"""The scanned, vmapped engine: equivalence, determinism, compilation, records, divergence."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DIVERGENT_CLI, LIGHT, TINY, compose_cfg, run_to_end

from vgrad import store


def assert_same_records(a, b, exact: bool = True, rtol: float = 0.0) -> None:
    np.testing.assert_array_equal(a.step, b.step)
    for group in ("step_stats", "epoch_stats"):
        da, db = getattr(a, group), getattr(b, group)
        assert da.keys() == db.keys()
        for k in da:
            if exact:
                np.testing.assert_array_equal(da[k], db[k], err_msg=k)
            else:
                np.testing.assert_allclose(da[k], db[k], rtol=rtol, atol=1e-7, err_msg=k)


def test_scan_engine_equals_per_step_python_loop():
    cfg = compose_cfg(*TINY, "act=tanh", "seeds=2", "record.chunk_epochs=1")
    # The same computation in two XLA programs: the training is bitwise identical, a
    # statistic may be fused (reassociated) differently by one unit in the last place.
    assert_same_records(run_to_end(cfg, "scan"), run_to_end(cfg, "python"), exact=False,
                        rtol=1e-6)


def test_same_config_gives_bitwise_identical_metrics_file(tmp_path):
    cfg = compose_cfg(*TINY, "act=relu", "seeds=2")
    first, second = run_to_end(cfg), run_to_end(cfg)
    assert_same_records(first, second)
    store.write_npz(tmp_path / "a.npz", store.metrics_arrays(first))
    store.write_npz(tmp_path / "b.npz", store.metrics_arrays(second))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


@pytest.mark.parametrize("precision,marks", [("highest", True), ("default", False)])
def test_matmul_precision_reaches_both_engines_programs(precision, marks):
    from pathlib import Path

    import jax.numpy as jnp

    from vgrad import compiled as engine
    from vgrad import group, runner

    cfg = compose_cfg(*TINY, *LIGHT, f"matmul_precision={precision}")
    g = group.make_group([runner.prepare(cfg, Path("unused"))])
    mesh = engine.member_mesh(1)
    device_data = engine.device_data(g.datasets, cfg.record.probe_size, mesh)
    members = engine.shard_members(g.members(), mesh)
    compiled, _ = engine.compile_program(g, members, device_data, mesh)
    state = compiled.start(members, device_data)
    perms = compiled.permutations(members, jnp.int32(0))
    # The debugging engine's step is traced on first use, long after compile_program.
    step = compiled.step.lower(state, members, perms, jnp.int32(0), jnp.int32(0),
                               device_data).as_text()
    chunk = compiled._chunk_jit.lower(state, members, jnp.int32(0), device_data, 1).as_text()
    for program in (step, chunk):
        assert "dot_general" in program
        assert ("precision = [HIGHEST, HIGHEST]" in program) == marks


def test_chunks_reuse_one_compiled_program(compile_counter):
    cfg = compose_cfg("epochs=4", "data.n_samples=64", "record.chunk_epochs=1", "depth=3",
                      "progress=false")
    rec = run_to_end(cfg)
    assert rec.plan.n_chunks == 4
    assert compile_counter.compiles("start") == 1
    assert compile_counter.compiles("chunk") == 1  # four chunks, one compilation
    compile_counter.events.clear()
    run_to_end(compose_cfg("epochs=4", "data.n_samples=64", "record.chunk_epochs=1", "depth=3",
                           "progress=false", "seed=7", "data.random_state=3"))
    # Another seed and other data of the same shapes reuse both programs.
    assert compile_counter.compiles("start", "chunk") == 0


def test_seed_inside_a_vmapped_batch_matches_a_single_run():
    together = run_to_end(compose_cfg(*TINY, "seed=3", "seeds=4"))
    for s in (3, 5):
        alone = run_to_end(compose_cfg(*TINY, f"seed={s}"))
        for k, v in alone.step_stats.items():
            np.testing.assert_allclose(together.step_stats[k][s - 3], v[0], rtol=2e-5, atol=1e-8,
                                       err_msg=k)
        for k, v in alone.epoch_stats.items():
            np.testing.assert_allclose(together.epoch_stats[k][s - 3], v[0], rtol=2e-5,
                                       atol=1e-7, err_msg=k)
    # Different seeds: different initialisations and different shuffles.
    assert not np.allclose(together.step_stats["loss"][0], together.step_stats["loss"][1])


@pytest.mark.parametrize(("every", "extra"), [
    (3, []), (7, ["optim=adam", "clip=global_norm", "act=relu"]),
    (4, ["record.step_probes=[global_norms,delta_norm,gradient_noise,alpha]"])])
def test_recording_every_k_steps_keeps_exactly_those_rows(every, extra):
    """Unrecorded steps run a plain step (no delta points, taps or probes): the recorded
    rows and the epoch statistics are those of recording every step (measured: equal
    bit for bit); with the alpha probe every step keeps its bookkeeping."""
    base = ["epochs=3", "data.n_samples=160", "batch_size=16", "progress=false", *extra]
    dense = run_to_end(compose_cfg(*base))
    sparse = run_to_end(compose_cfg(*base, f"record.every={every}", "record.chunk_epochs=1"))
    total = 3 * (160 // 16)
    np.testing.assert_array_equal(sparse.step, np.arange(0, total, every))
    for k, v in dense.step_stats.items():
        np.testing.assert_allclose(sparse.step_stats[k], v[:, ::every], rtol=1e-6, atol=1e-12,
                                   err_msg=k)
        assert not np.isnan(sparse.step_stats[k][:, 1:]).any(), k
    for k, v in dense.epoch_stats.items():
        np.testing.assert_allclose(sparse.epoch_stats[k], v, rtol=1e-6, atol=1e-12,
                                   err_msg=k)


@pytest.mark.parametrize("seeds", [1, 3])
def test_arrays_have_the_contract_shapes(seeds):
    cfg = compose_cfg(*TINY, f"seeds={seeds}", "depth=3")
    rec = run_to_end(cfg)
    arrays = store.metrics_arrays(rec)
    S, T, L, E = seeds, 2 * (128 // 32), 4, 2
    assert arrays["step"].shape == (T,)
    assert arrays["epoch"].tolist() == list(range(E + 1))
    assert arrays["layer_names"].tolist() == ["dense_0", "dense_1", "dense_2", "dense_3"]
    H, B = L - 1, len(arrays["hist_edges"]) - 1
    for k in ("grad_mean", "grad_std", "grad_norm", "grad_absmean", "grad_maxabs",
              "bias_grad_norm", "delta_norm", "update_norm", "update_ratio"):
        assert arrays[k].shape == (S, T, L), k
    for k in ("loss", "grad_global_norm", "grad_global_norm_clipped", "clip_fired"):
        assert arrays[k].shape == (S, T), k
    for k in ("weight_mean", "weight_std"):
        assert arrays[k].shape == (S, E + 1, L), k
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "clip_frac"):
        assert arrays[k].shape == (S, E + 1), k
    for k in ("act_mean", "act_std", "act_dead_frac", "act_sat_frac"):
        assert arrays[k].shape == (S, E + 1, H), k
    for k in ("grad_hist", "weight_hist"):
        assert arrays[k].shape == (S, E + 1, L, B), k
    assert arrays["nonfinite_grads"].shape == (S, L)
    assert arrays["diverged_at_step"].shape == (S,)
    assert np.isnan(arrays["test_acc"]).all()  # circles trains on all points: no test set
    assert np.isfinite(arrays["train_acc"]).all()


def test_divergence_freezes_the_seed_and_records_its_step():
    rec = run_to_end(compose_cfg(*DIVERGENT_CLI))
    step = int(rec.diverged_at[0])
    assert step == 2
    loss = rec.step_stats["loss"][0]
    assert np.isfinite(loss[:step]).all()  # finite up to the divergence
    assert not np.isfinite(loss[step])  # the bad step itself is recorded as it was
    assert np.isnan(loss[step + 1:]).all()  # nothing is measured after it
    assert np.isnan(rec.epoch_stats["train_loss"][0, 1:]).all()
    assert np.isfinite(rec.epoch_stats["train_loss"][0, 0])
    assert rec.nonfinite_at_divergence[0].sum() > 0
    assert store.status_of(rec.diverged_at) == "diverged"


def test_status_distinguishes_all_some_and_no_seeds_diverged():
    assert store.status_of(np.array([-1, -1])) == "completed"
    assert store.status_of(np.array([-1, 40])) == "partial"
    assert store.status_of(np.array([3, 40])) == "diverged"


def test_choosing_probes_records_only_those_and_the_same_values():
    full = run_to_end(compose_cfg(*TINY))
    core = run_to_end(compose_cfg(*TINY, "record.step_probes=[kernel_grad_stats]",
                                  "record.epoch_probes=[weight_stats]"))
    assert set(core.step_stats) == {"grad_mean", "grad_std", "grad_norm", "grad_absmean",
                                    "grad_maxabs"}
    assert set(core.epoch_stats) == {"train_loss", "train_acc", "test_loss", "test_acc",
                                     "weight_mean", "weight_std", "clip_frac"}
    for k, v in core.step_stats.items():
        np.testing.assert_allclose(v, full.step_stats[k], rtol=1e-5, atol=1e-9)


def test_a_process_keeps_at_most_max_programs_and_evicts_the_oldest(monkeypatch):
    """Each loaded CPU program maps ~700 memory regions; keeping every one crashed XLA
    once a process had compiled about 90 (vm.max_map_count)."""
    from vgrad import compiled

    monkeypatch.setattr(compiled, "MAX_PROGRAMS", 1)
    compiled._CACHE.clear()
    run_to_end(compose_cfg(*TINY, *LIGHT, "depth=1"))
    first = next(iter(compiled._CACHE))
    run_to_end(compose_cfg(*TINY, *LIGHT, "depth=2"))  # another structure: another program
    assert len(compiled._CACHE) == 1 and first not in compiled._CACHE


def test_evaluation_blocks_shrink_to_the_memory_budget_without_changing_the_numbers(
        monkeypatch):
    """A recurrent net holds every time step of every example it evaluates: 1,000 seeds
    of a T=100 RNN asked a GPU for 36 GiB at once. Blocks shrink to ``EVAL_BYTES``."""
    from vgrad import compiled, views

    assert views.eval_block(10, 1, 4) == views.EVAL_BLOCK
    monkeypatch.setattr(views, "EVAL_BYTES", 4 * 1024)
    assert views.eval_block(10, 2, 4) == 32  # 32 examples x 10 floats x 2 members x 4 B
    assert views.eval_block(10**6, 1, 4) == 1
    monkeypatch.undo()
    cfg = compose_cfg("model=rnn", "act=tanh", "data=adding", "data.length=10",
                      "data.n_train=200", "data.n_test=50", "loss=regression", "depth=1", "width=8",
                      "epochs=1", "seeds=2", "progress=false",
                      "record.step_probes=[global_norms]", "record.epoch_probes=[evaluation]")

    def evaluate(eval_bytes: int):
        monkeypatch.setattr(views, "EVAL_BYTES", eval_bytes)
        compiled._CACHE.clear()
        records = run_to_end(cfg)
        program = next(iter(compiled._CACHE.values()))
        return (records.epoch_stats, program.chunk(1).memory_analysis().temp_size_in_bytes,
                program.program.eval_block)

    whole, whole_bytes, whole_block = evaluate(views.EVAL_BYTES)
    # 2 x 10 steps x (8 + 8) Dense outputs x 2 members x 4 B per example: blocks of 16.
    blocked, blocked_bytes, block = evaluate(16 * 2 * 10 * 16 * 2 * 4)
    assert (whole_block, block) == (views.EVAL_BLOCK, 16)
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        np.testing.assert_allclose(blocked[key], whole[key], rtol=1e-5, err_msg=key)
    assert blocked_bytes < whole_bytes / 2


def test_a_step_is_admissible_only_when_its_add_cannot_overflow():
    """step_admissible: a non-finite gradient entry anywhere (inf, -inf, NaN), or an
    update or parameter entry at half float32's largest value or beyond, refuses the
    step; finite values just below it, zeros and empty leaves do not."""
    import jax
    import jax.numpy as jnp

    from vgrad.step import step_admissible

    below = np.nextafter(np.float32(np.finfo(np.float32).max / 2), np.float32(0))
    zeros = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,)), "c": jnp.zeros((0,))}
    big = dict(zeros, a=jnp.full((3, 4), below), b=jnp.full((5,), -below))
    assert bool(step_admissible(big, big, big))  # |p + u| < max: the add is finite
    assert float(np.float32(below) + np.float32(below)) < np.inf
    for bad in (np.inf, -np.inf, np.nan):
        tree = dict(zeros, b=zeros["b"].at[2].set(bad))
        assert not bool(step_admissible(tree, zeros, zeros)), bad  # gradient
        assert not bool(step_admissible(zeros, tree, zeros)), bad  # update
    half = dict(zeros, b=zeros["b"].at[4].set(np.finfo(np.float32).max / 2))
    assert not bool(step_admissible(zeros, half, zeros))
    assert not bool(step_admissible(zeros, zeros, half))
    with jax.enable_x64(True):  # the bound is the dtype's: float64's half max
        top = np.finfo(np.float64).max / 2
        p64 = {"w": jnp.asarray([np.nextafter(top, 0.0), 1e300])}
        assert p64["w"].dtype == jnp.float64
        assert bool(step_admissible(p64, p64, p64))
        assert not bool(step_admissible(p64, {"w": jnp.asarray([top, 0.0])}, p64))


def test_a_refused_step_freezes_the_parameters_and_records_its_step():
    """The freeze of a diverged seed is decided before the add: an update that would
    overflow its parameter leaves the parameter at its last finite value; the step is
    recorded, and later steps change nothing."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from vgrad import optim
    from vgrad.models.mlp import layout_of
    from vgrad.step import init_state, make_train_step

    class Line(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.Dense(1, name="dense_0")(x)

    model = Line()
    tx = optim.Transforms(optax.identity(), optax.sgd(1.0))
    x = jnp.full((2, 1), 1e19)
    state = init_state(model, tx, jax.random.key(0), x, n_layers=1)
    state = state.replace(params={"dense_0": {"kernel": jnp.ones((1, 1)),
                                              "bias": jnp.zeros((1,))}})
    step = jax.jit(make_train_step(model, tx, "regression", layout_of([]), with_deltas=False))
    # loss (w x + b)^2 = 1e38 at y = 0 (finite), gradient 2e38 on w: an update of -2e38,
    # finite, whose add is finite too (1 - 2e38), but |u| > max / 2: refused.
    new, out = step(state, x, jnp.zeros((2,)), jax.random.key(1))
    u = np.asarray(out.updates["dense_0"]["kernel"])
    assert np.isfinite(float(out.loss)) and np.isfinite(u).all() and np.isfinite(1 + u).all()
    assert int(new.diverged_at) == 0 and int(new.step) == 1
    np.testing.assert_array_equal(new.params["dense_0"]["kernel"], 1.0)
    again, _ = step(new, jnp.ones((2, 1)), jnp.zeros((2,)), jax.random.key(2))
    assert int(again.diverged_at) == 0  # a dead seed stays put
    np.testing.assert_array_equal(again.params["dense_0"]["kernel"], 1.0)


def test_the_divergence_guard_compiles_in_size_linear_in_the_leaves():
    """The guard's predicate (every leaf admissible) feeds the update of every leaf of
    the parameters; XLA copies a cheap predicate into each consumer, so a predicate built as a
    chain of per-leaf adds made the compiled program quadratic in the leaves (a 12-block
    Transformer's step: 62 s to compile). Doubling the leaves at most doubles it here."""
    import jax
    import jax.numpy as jnp

    from vgrad.step import step_admissible

    def guarded_size(n: int) -> int:
        tree = {f"w{i}": jnp.ones((3, 5 + i % 7)) for i in range(n)}

        def guard(grads, params):
            updates = jax.tree.map(lambda g: -0.1 * g, grads)
            keep = step_admissible(grads, updates, params)
            return jax.tree.map(lambda p, u: jnp.where(keep, p + u, p), params, updates)

        return len(jax.jit(guard).lower(tree, tree).compile().as_text())

    small, large = guarded_size(60), guarded_size(120)
    assert large < 2.3 * small, (small, large)
