"""Jobs that share a program's structure, trained as one compiled program.

A sweep's jobs mostly differ in numbers: learning rates, clip thresholds, init scales,
activation parameters, seeds. None of these changes a shape or the program's control
flow, so they are fed to the compiled program as **inputs** (traced values) instead of
being baked into it as constants, and every job of a group is one slice of the batch
axis the program is ``vmap``-ed over, the *members* (job x seed).

This module decides, from a job's composed config:

- its **knobs**: every float of the ``act``, ``init``, ``bias_init``, ``clip`` and
  ``optim`` nodes, ``bn_momentum``, ``bn_eps`` and ``record.sat_threshold``, and the
  model's own (``Model.knobs``: a recurrent net's ``model.recurrent_scale`` and
  ``model.forget_bias``), traced;
- its **families**: which activation and initializers it uses. Every kernel and bias
  initializer, and every elementwise activation (no parameters, no noise, one output per
  input: sigmoid ... swish), is a *family* chosen per member by an index, so that jobs
  differing in them share one program (the program evaluates the group's families and
  selects; see ``vgrad.models``). PReLU, RReLU, learnable Swish and maxout change the
  parameters or the noise and stay part of the structure;
- its **structure**: everything else (depth, widths, batch norm, optimizer and clipping
  kind, loss, epochs, batch size, probes, data shapes, ...). Jobs with equal structure
  form a group. Two facts of value are structure too: whether ``optim.momentum`` and
  ``optim.l2`` are zero (zero omits the term from the update, as optax does).

Data values (circles' noise and factor, a dataset's scaling) are not knobs of the
program either: they are its data arguments. Jobs whose datasets have the same shapes
share a program, each member reading its own dataset by index.

A group also builds what each member trains from its values (traced or not): its
network's parts and network (:meth:`Group.parts`, :meth:`Group.network`) and its
clipping and optimizer (:meth:`Group.transforms`); the program (``vgrad.program``) only
calls them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from vgrad import (
    activations,
    config,
    initializers,
    losses,
    models,
    optim,
    parametrization,
    views,
)
from vgrad.data import Dataset

#: Config nodes whose float fields are traced knobs (each has a registry of choices).
KNOB_GROUPS = ("act", "init", "bias_init", "clip", "optim")
#: Top-level and record floats that are traced knobs too.
KNOB_KEYS = ("bn_momentum", "bn_eps", "record.sat_threshold")
#: Knobs whose zero value omits a term from the update: zero or not is structure.
ZERO_IS_STRUCTURE = ("optim.momentum", "optim.l2")
#: Groups whose choice is a per-member index (a family) rather than structure.
FAMILY_GROUPS = ("act", "init", "bias_init")


def resolved(cfg: Any) -> dict[str, Any]:
    """A config as plain Python values (enums as strings)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _float_fields(group: str, name: str) -> set[str]:
    schema = config.GROUPS[group][name].schema
    hints = typing.get_type_hints(schema)
    return {f.name for f in dataclasses.fields(schema) if hints[f.name] is float}


def knobs(cfg: Any) -> dict[str, float]:
    """The traced knobs of a job and their values, keyed by dotted config path."""
    c = resolved(cfg)
    out: dict[str, float] = {}
    for group in KNOB_GROUPS:
        node = c[group]
        for key in sorted(_float_fields(group, node["name"])):
            out[f"{group}.{key}"] = float(node[key])
    for path in KNOB_KEYS:
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        out[path] = float(node[leaf])
    for key in models.MODELS[c["model"]["name"]].knobs:  # (the model's own: Model.knobs)
        out[f"model.{key}"] = float(c["model"][key])
    for path in ZERO_IS_STRUCTURE:  # a zero stays a constant: the term is left out
        if out.get(path) == 0.0:
            del out[path]
    return out


def is_elementwise(act: Mapping[str, Any]) -> bool:
    """Whether an activation node is an elementwise function that a program can select
    per member (no parameters, no noise, as many outputs as inputs)."""
    return activations.elementwise(SimpleNamespace(**act)) is not None


def family(node: Mapping[str, Any], group: str) -> str:
    """A family's identity: the node without its traced floats (JSON, sorted keys)."""
    floats = _float_fields(group, node["name"])
    return json.dumps({k: v for k, v in node.items() if k not in floats}, sort_keys=True)


def structure(cfg: Any) -> dict[str, Any]:
    """What decides a job's program, besides the data shapes: the config without its
    knobs, families, seed, data values and the keys that change nothing computed."""
    original = resolved(cfg)
    c = json.loads(json.dumps(original))
    knob = knobs(c)
    for path in list(knob) + list(KNOB_KEYS):
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    for group in FAMILY_GROUPS:
        if group == "act" and not is_elementwise(original["act"]):
            continue  # its module is part of the structure
        c[group] = "family"
    for path in ZERO_IS_STRUCTURE:
        group, key = path.split(".")
        c[group][f"{key}_is_zero"] = path not in knob
    # (a recurrent model's: how the input is read as a sequence)
    c.update(models.MODELS[original["model"]["name"]].input_structure(
        SimpleNamespace(**original["data"])))
    for key in ("seed", "seeds", "data", *config.VOLATILE):
        c.pop(key, None)
    return c


# --- jobs, groups and members -----------------------------------------------------------


@dataclass
class Job:
    """One job of a sweep (or a single run): its validated config, data and folder."""

    cfg: Any
    run_dir: Path
    data: Dataset
    #: Training state and records to continue from (an interrupted run), or None.
    resume: Any = None
    #: The config as plain values, resolved once (grouping reads it many times).
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.config = resolved(self.cfg)

    @property
    def seeds(self) -> np.ndarray:
        return np.arange(self.cfg.seed, self.cfg.seed + self.cfg.seeds, dtype=np.int32)

    @property
    def epochs_done(self) -> int:
        return 0 if self.resume is None else self.resume.epochs_done


def group_key(job: Job) -> str:
    """Jobs with the same key share one compiled program and train together."""
    ds = job.data
    shapes = [ds.x_train.shape, ds.x_test.shape, ds.n_classes]
    return json.dumps([structure(job.config), shapes, job.epochs_done], sort_keys=True,
                      default=str)


class Members(NamedTuple):
    """Per-member inputs of a group's program, [M] each (members = jobs x seeds)."""

    seed: np.ndarray  # int32: the random seed
    knobs: dict[str, np.ndarray]  # in the run's dtype: "optim.lr" -> values
    act: np.ndarray  # int32: index into Group.act_families
    init: np.ndarray  # int32: index into Group.init_families
    bias_init: np.ndarray  # int32: index into Group.bias_families
    data: np.ndarray  # int32: index into Group.datasets


@dataclass
class Group:
    """Jobs that train as one program: the structure of the first job, the families and
    datasets the jobs use, and the member axis (job-major: job 0's seeds first)."""

    jobs: list[Job]
    families: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    datasets: list[Dataset] = field(default_factory=list)

    @property
    def cfg(self) -> Any:
        """The first job's config: the structure every job of the group shares."""
        return self.jobs[0].cfg

    @property
    def n_members(self) -> int:
        return sum(job.cfg.seeds for job in self.jobs)

    def slices(self) -> list[slice]:
        """Each job's members along the member axis."""
        out, start = [], 0
        for job in self.jobs:
            out.append(slice(start, start + job.cfg.seeds))
            start += job.cfg.seeds
        return out

    @property
    def knob_keys(self) -> list[str]:
        return sorted({k for job in self.jobs for k in knobs(job.config)})

    def members(self) -> Members:
        """The member inputs, built on the host."""
        keys = self.knob_keys
        defaults: dict[str, float] = {}
        for job in self.jobs:  # a knob a job's family lacks takes another job's value
            for k, v in knobs(job.config).items():
                defaults.setdefault(k, v)
        seed, act, init, bias, data = [], [], [], [], []
        values: dict[str, list[float]] = {k: [] for k in keys}
        for job in self.jobs:
            own = knobs(job.config)
            c = job.config
            index = {g: self._family_index(g, c[g]) for g in FAMILY_GROUPS}
            d = self._dataset_index(job.data)
            for s in job.seeds:
                seed.append(s)
                act.append(index["act"])
                init.append(index["init"])
                bias.append(index["bias_init"])
                data.append(d)
                for k in keys:
                    values[k].append(own.get(k, defaults[k]))
        floats = {k: np.asarray(v, self.cfg.dtype) for k, v in values.items()}
        return Members(np.asarray(seed, np.int32), floats, *(
            np.asarray(x, np.int32) for x in (act, init, bias, data)))

    # -- a member's network and optimizer, from its values --

    def parts(self, m: Members) -> models.Parts:
        """Member ``m``'s activation, initializers and batch-norm constants (``m``: one
        member's values, traced or not): the group's only activation, or the one its
        index selects among the group's elementwise ones; likewise its initializers."""
        fam = self.families
        if len(fam["act"]) == 1:
            act, pieces = activations.build(node_view(fam["act"][0], m.knobs, "act"))
        else:
            fns = [activations.elementwise(node_view(a, m.knobs, "act")) for a in fam["act"]]
            act, pieces = activations.select(fns, m.act), 1
        kernel_init = initializers.drawn_in_float32(initializers.select(
            [initializers.kernel_init(node_view(f, m.knobs, "init")) for f in fam["init"]],
            m.init))
        bias_init = initializers.drawn_in_float32(initializers.select(
            [initializers.bias_init(node_view(f, m.knobs, "bias_init"))
             for f in fam["bias_init"]], m.bias_init))
        model_knobs = {k.split(".", 1)[1]: v for k, v in m.knobs.items()
                       if k.startswith("model.")}
        return models.Parts(act, kernel_init, bias_init, pieces, m.knobs["bn_momentum"],
                            m.knobs["bn_eps"], jnp.dtype(self.cfg.dtype), model_knobs or None)

    @property
    def out_dim(self) -> int:
        """Outputs of the networks: one per class, or one logit or real target."""
        return losses.out_dim(self.cfg.loss.value, self.datasets[0].n_classes)

    def network(self, m: Members) -> nn.Module:
        """Member ``m``'s network (the group's model, built from its parts)."""
        cfg = self.cfg
        return models.MODELS[cfg.model.name].build(cfg, self.parts(m), self.out_dim)

    def transforms(self, m: Members, total_steps: int) -> optim.Transforms:
        """Member ``m``'s clipping and optimizer, for a run of ``total_steps`` steps."""
        c = self.jobs[0].config
        return optim.make(node_view(c["clip"], m.knobs, "clip"),
                          node_view(c["optim"], m.knobs, "optim"),
                          len(self.datasets[0].x_train), total_steps, self.lr_factors)

    @functools.cached_property
    def lr_factors(self) -> Any:
        """The learning-rate factor of each parameter under muP (a tree of floats, the
        same for every member: widths are structure), or None (``vgrad.parametrization``)."""
        cfg = self.cfg
        if not parametrization.PARAMS[cfg.param.name].scales_lr:
            return None
        x = self.datasets[0].x_train[:1].astype(cfg.dtype)
        shapes = [parametrization.param_shapes(models.build(c, self.out_dim), x)
                  for c in (cfg, parametrization.at_base_width(cfg))]
        return parametrization.lr_multipliers(
            *shapes, adaptive=optim.OPTIMIZERS[cfg.optim.name].adaptive)

    def _family_index(self, group: str, node: dict[str, Any]) -> int:
        ids = [family(f, group) for f in self.families[group]]
        return ids.index(family(node, group))

    def _dataset_index(self, ds: Dataset) -> int:
        return next(i for i, d in enumerate(self.datasets) if d is ds)


def _same_data(a: Dataset, b: Dataset) -> bool:
    return a is b or all(np.array_equal(getattr(a, k), getattr(b, k))
                         for k in ("x_train", "y_train", "x_test", "y_test"))


def make_group(jobs: Sequence[Job]) -> Group:
    """A group of jobs of one structure: their families and distinct datasets, in the
    order the jobs first use them."""
    group = Group(list(jobs), {g: [] for g in FAMILY_GROUPS}, [])
    for job in jobs:
        c = job.config
        for g in FAMILY_GROUPS:
            if all(family(f, g) != family(c[g], g) for f in group.families[g]):
                group.families[g].append(c[g])
        same = next((d for d in group.datasets if _same_data(d, job.data)), None)
        if same is None:
            group.datasets.append(job.data)
        else:
            job.data = same
    return group


def group_jobs(jobs: Sequence[Job], max_members: int | None = None,
               max_jobs: int | None = None) -> list[Group]:
    """Jobs grouped by structure, in the order of their first job; a group with more
    than ``max_members`` members (jobs x seeds) or ``max_jobs`` jobs is split into
    consecutive batches (a job is never split: its seeds stay together)."""
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(group_key(job), []).append(job)
    groups = []
    for same in by_key.values():
        batch: list[Job] = []
        # The batch's members, a running sum: summing the batch at every job was
        # quadratic (reading a config's value is slow: 6 s at 1,000 jobs).
        size = 0
        for job in same:
            seeds = job.cfg.seeds
            full = ((max_members is not None and size + seeds > max_members)
                    or (max_jobs is not None and len(batch) >= max_jobs))
            if batch and full:
                groups.append(make_group(batch))
                batch, size = [], 0
            batch.append(job)
            size += seeds
        groups.append(make_group(batch))
    return groups


def member_bytes(job: Job, evaluation: bool = True) -> int:
    """An estimate of what one member (one seed) of ``job`` takes in memory, in bytes:
    its state (parameters, gradients, optimizer moments), its activations on a batch
    and (``evaluation``) on an evaluation block (every time step's, for a recurrent
    net), and the records of the whole run kept on the host."""
    cfg, ds = job.cfg, job.data
    pieces = activations.pieces(cfg.act)
    model = models.MODELS[cfg.model.name]
    sizes = [ds.n_features, *model.widths(cfg, ds.n_features)]
    if model.n_params is None:  # (Dense layers)
        params = sum((a + 1) * b * pieces for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        params += (sizes[-1] + 1) * max(ds.n_classes, 1)
    else:
        params = model.n_params(cfg, ds.n_features)
    units = models.activation_units(cfg, ds.n_features)  # (at every time step of an RNN)
    steps = (len(ds.x_train) // cfg.batch_size) * cfg.epochs
    layers = len(sizes)
    recorded = -(-steps // cfg.record.every) * (9 * layers + 4)
    per_epoch = (cfg.epochs + 1) * (2 * layers * 64 + 8 * layers + 8)
    snapshots = (steps // cfg.record.full_grads_every * params
                 if cfg.record.full_grads_every else 0)
    # (An evaluation block holds at most views.EVAL_BLOCK examples.)
    eval_examples = (min(views.EVAL_BLOCK, max(len(ds.x_train), len(ds.x_test)))
                     if evaluation else 0)
    activations_ = (cfg.batch_size * 4 + eval_examples) * units
    # (the coordinate check carries a copy of the initial parameters)
    copies = 7 if "coord_check" in cfg.record.epoch_probes else 6
    return 4 * (copies * params + activations_ + recorded + per_epoch + snapshots)


def node_view(node: Mapping[str, Any], values: Mapping[str, Any], prefix: str
              ) -> SimpleNamespace:
    """A config node with its knobs replaced by ``values`` (traced, inside a program),
    for the registries' factories, which read fields as attributes."""
    return SimpleNamespace(**{k: values.get(f"{prefix}.{k}", v) for k, v in node.items()})
