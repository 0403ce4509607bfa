"""The sweep launcher's composition shortcut (``Composer``): a job's config equals Hydra's
own ``load_sweep_config`` for every override form the README shows, and the time it saves
is measured in ``benchmarks/sweep_bench.py``."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hydra_plugins.vgrad_launcher.vgrad_launcher import Composer

#: Jobs of sweeps, as the sweeper hands them to the launcher (sweeps expanded), in the
#: forms the README shows: config groups, values, + and ++, lists, quoted strings,
#: null, group choices after values, a preset's keys overridden, a user's module.
JOBS = [
    ["+experiment=visualize", "act=tanh", "optim.lr=0.003"],
    ["+experiment=visualize", "act=tanh", "optim.lr=0.004"],
    ["+experiment=visualize", "act=sigmoid", "optim.lr=0.003", "seeds=20"],
    ["act=relu", "init=he_normal", "depth=30", "width=64"],
    ["depth=30", "act=relu", "init=he_normal", "width=32"],
    ["+experiment=phase_diagram", "init.sigma_w2=1.5", "depth=10"],
    ["model=custom", "model.target=my_model.SmallResNet", "+model.args.blocks=3"],
    ["model=custom", "model.target='my_model.SmallResNet'", "+model.args.blocks=4"],
    ["record.step_probes=[global_norms,gradient_noise]", "data.n_samples=256"],
    ["++seed=7", "widths=[4,8]"],
    ["widths=null", "optim=adam", "optim.lr=1e-3", "clip=global_norm", "clip.max=0.5"],
    ["model=lstm", "data=adding", "loss=regression", "model.forget_bias=0.0"],
    ["act=leaky_relu", "act.alpha=0.2"],
]


def _resolved_task(cfg) -> str:
    """The job's own config with its interpolations resolved (as ``config.yaml``)."""
    task = OmegaConf.to_container(cfg, resolve=False)
    del task["hydra"]
    return OmegaConf.to_yaml(OmegaConf.create(task), resolve=True)


@pytest.fixture(scope="module")
def hydra_loader():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        master = compose("config", overrides=["hydra.sweep.dir=/tmp/unused"],
                         return_hydra_config=True)
        yield GlobalHydra.instance().config_loader(), master
    GlobalHydra.instance().clear()


def test_each_job_is_hydras_own_composition(hydra_loader):
    loader, master = hydra_loader
    composer = Composer(loader, master)
    assert composer.repo is not None
    for job in JOBS:  # (in order: later jobs reuse earlier jobs' compositions)
        ours, hydras = composer.compose(list(job)), loader.load_sweep_config(master, list(job))
        assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(hydras), job
        assert _resolved_task(ours) == _resolved_task(hydras), job
    assert len(composer.bases) < len(JOBS)  # (jobs of one set of group choices share one)


def test_a_bad_override_fails_as_hydra_fails(hydra_loader):
    from hydra.errors import ConfigCompositionException

    loader, master = hydra_loader
    composer = Composer(loader, master)
    for job in (["optim.no_such_key=1"], ["+depth=3"], ["~record.params"]):
        with pytest.raises(ConfigCompositionException) as ours:
            composer.compose(job)
        with pytest.raises(ConfigCompositionException) as hydras:
            loader.load_sweep_config(master, job)
        assert str(ours.value) == str(hydras.value)
