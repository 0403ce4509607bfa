"""Every knob is wired: changing it changes what is trained and measured."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_cfg, run_to_end

#: The probes these tests read (loss and train loss; grad_norm; weight_std), and no more:
#: compiling each knob's program is the cost, and the default probes double it.
PROBES = ["record.step_probes=[global_norms,kernel_grad_stats]",
          "record.epoch_probes=[evaluation,weight_stats]"]
BASE = ["act=tanh", "depth=2", "width=4", "epochs=1", "data.n_samples=128", "progress=false",
        *PROBES]

KNOBS = [
    "act=relu",
    "init=glorot_uniform",
    "init.std=0.5",
    "bias_init=normal",
    "bn=pre",
    "bn=post",
    "optim=sgd",
    "optim=adam",
    "optim.lr=0.01",
    "depth=3",
    "width=6",
    "batch_size=16",
    "data.noise=0.2",
    "seed=1",
]


@pytest.fixture(scope="module")
def base():
    return run_to_end(compose_cfg(*BASE))


@pytest.mark.parametrize("knob", KNOBS)
def test_changing_a_knob_changes_the_run(base, knob):
    changed = run_to_end(compose_cfg(*BASE, knob))
    a, b = base.step_stats, changed.step_stats
    n = min(a["loss"].shape[1], b["loss"].shape[1])
    same_loss = np.allclose(a["loss"][:, :n], b["loss"][:, :n])
    same_final = np.allclose(base.epoch_stats["train_loss"], changed.epoch_stats["train_loss"])
    assert not (same_loss and same_final), f"{knob} left the run unchanged"


def test_bn_pre_and_post_give_different_networks():
    pre = run_to_end(compose_cfg(*BASE, "bn=pre"))
    post = run_to_end(compose_cfg(*BASE, "bn=post"))
    assert not np.allclose(pre.step_stats["grad_norm"], post.step_stats["grad_norm"])


@pytest.mark.parametrize("clip", ["clip=value clip.max=0.01", "clip=global_norm clip.max=0.01"])
def test_clipping_changes_plain_sgd(clip):
    # RMSprop divides by the gradient's own scale, so clipping shows best under SGD.
    plain = run_to_end(compose_cfg(*BASE, "optim=sgd", "optim.lr=0.5"))
    clipped = run_to_end(compose_cfg(*BASE, "optim=sgd", "optim.lr=0.5", *clip.split()))
    assert not np.allclose(plain.step_stats["loss"][:, 1:], clipped.step_stats["loss"][:, 1:])
    # The recorded gradient is the one before clipping: identical at the first step.
    np.testing.assert_allclose(plain.step_stats["grad_norm"][:, 0],
                               clipped.step_stats["grad_norm"][:, 0], rtol=1e-6)


def test_mean_field_sigmas_are_traced_knobs_of_one_program():
    """A phase-diagram axis (init.sigma_w2) groups into one program, and each job's
    kernels and biases have its own variances (weight_std at initialisation)."""
    from conftest import run_group

    cfgs = [compose_cfg(*BASE, "width=64", "init=mean_field", f"init.sigma_w2={s}",
                        "bias_init=mean_field", f"bias_init.sigma_b2={b}")
            for s, b in ((1.0, 0.05), (4.0, 0.5))]
    low, high = run_group(cfgs)  # asserts that they share one structure
    ratio = high.epoch_stats["weight_std"][0, 0, 1] / low.epoch_stats["weight_std"][0, 0, 1]
    np.testing.assert_allclose(ratio, 2.0, rtol=0.1)  # sqrt(4 / 1), 64 x 64 kernels
