"""TensorBoard export of a run (``tensorboard=true``; needs ``pip install "vgrad[tensorboard]"``).

Writes, under ``<run folder>/tensorboard/<label>/seed_<s>/``, one TensorBoard run per
seed, so that ``tensorboard --logdir outputs/`` lists every seed of every run of a sweep
under a name that says what it trained, e.g. ``3/tensorboard/relu-he_normal-d8-w5-sgd-
lr0.01-bce/seed_0``. The label (:func:`label`) is built from the run's config alone (a
job does not know which axes its sweep varies): the activation, the initializer, depth
and width, the optimizer and its learning rate and the loss, with the model, batch
norm, clipping and float64 added when they differ from the defaults.

Each seed's run holds

- its **hyperparameters** for TensorBoard's HParams dashboard: the run's resolved config
  flattened to dotted keys (``act.name``, ``init.std``, ``depth``, ``width``,
  ``optim.lr``, ``seed`` = that seed, ...; lists as JSON text; ``progress``, ``resume``,
  ``compile_cache``, ``tensorboard`` and ``seeds`` left out), written as the hparams
  plugin's session-start summary. No experiment summary is written: TensorBoard then
  builds the experiment from every run it reads and marks the hyperparameters whose
  values differ between them (a sweep's axes) to list them first. The metrics are the
  run's scalars below (the dashboard shows each one's last value: ``train/acc``,
  ``test/loss``, ... at the end of training). A session-end summary is written when the
  run ends: status success, or failure for a seed that diverged;
- scalars at recorded steps (those the chosen probes record): ``loss``,
  ``grad_global_norm`` and, per Dense layer, ``grad_norm/<layer>``,
  ``delta_norm/<layer>``, ``grad_std/<layer>``, ``update_ratio/<layer>``;
- scalars at epoch ends (x axis: the global step): ``train/loss``, ``train/acc``,
  ``test/loss``, ``test/acc``;
- histograms at epoch boundaries: ``grad_hist/<layer>`` and ``weight_hist/<layer>``, the
  fixed-bin histograms of **log10|value|** that vgrad computed (so TensorBoard shows the
  same bins for every run, unlike histograms rebinned per step). Their min, max and
  moments are computed from the bin centres.

**Size: at most** ``MAX_SCALARS`` (2,000) **points per scalar tag and**
``MAX_HISTOGRAMS`` (100) **per histogram tag**, however long the run (a 4,000-epoch run
wrote 52 MB of events before this bound; ``metrics.npz`` keeps every recorded value).
The rule, for a series of N points (N recorded steps, or E + 1 epoch boundaries, known
from the config before training): when N exceeds the cap, the points whose index
(recorded step number, or epoch) is a multiple of ``ceil((N - 1) / (cap - 2))`` are
written, and the last point when the run ends. The stride depends on the config only,
so a resumed run writes the same points; TensorBoard's own default display keeps 1,000
scalars and 500 histograms per tag anyway.

"How ReLU avoids vanishing gradients" (the ``relu_fix`` preset) shows its gradient
histograms this way. Non-finite values (a diverged seed) are skipped. Events are
appended at chunk boundaries as the run goes, from the first one at which the run's
config is known (passed in; else read from the ``.hydra/config.yaml`` of a single run of
the command line, or from the run's ``summary.json`` once it is written after the first
chunk); the time spent writing them is ``timing.export_s`` in ``summary.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vgrad import store
from vgrad.errors import ConfigError

if TYPE_CHECKING:
    from vgrad.records import Records

GLOBAL_STEP_SCALARS = ("loss", "grad_global_norm")
STEP_SCALARS = ("grad_norm", "delta_norm", "grad_std", "update_ratio")  # per layer
EPOCH_SCALARS = {"train_loss": "train/loss", "train_acc": "train/acc",
                 "test_loss": "test/loss", "test_acc": "test/acc"}

#: Most points written per scalar tag, and per histogram tag (see the module's docstring).
MAX_SCALARS = 2000
MAX_HISTOGRAMS = 100

#: What the export imports (tensorboardX checksums in Python without crc32c: slower,
#: but it works), and how to install it.
REQUIRES = ("tensorboardX",)
INSTALL = 'pip install "vgrad[tensorboard]"'

#: Config keys that are not hyperparameters (how a run is run, not what it trains).
NOT_HPARAMS = ("progress", "resume", "compile_cache", "tensorboard", "seeds")

_HPARAMS_PLUGIN = "hparams"
_SESSION_START = "_hparams_/session_start_info"
_SESSION_END = "_hparams_/session_end_info"


def missing() -> list[str]:
    """The modules of the tensorboard extra that are not installed."""
    out = []
    for name in REQUIRES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def _writer_class() -> Any:
    try:
        from tensorboardX.event_file_writer import EventsWriter
    except ImportError:
        raise ConfigError("tensorboard", "true", f"the tensorboard extra: {INSTALL}") from None
    return EventsWriter


def stride(n: int, cap: int) -> int:
    """Every how many points of a series of ``n`` a tag capped at ``cap`` keeps (the
    last point comes on top): at most ``cap`` points in all."""
    if n <= cap:
        return 1
    return max(1, math.ceil((n - 1) / max(cap - 2, 1)))


def hparams(config: Mapping[str, Any], seed: int) -> dict[str, bool | int | float | str]:
    """The hyperparameters of one seed of a run: its config flattened (None values and
    :data:`NOT_HPARAMS` left out), ``seed`` set to that seed."""
    flat = {k: v for k, v in store.flat_config(config).items()
            if k.split(".")[0] not in NOT_HPARAMS and v is not None}
    flat["seed"] = int(seed)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def _short(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def label(config: Mapping[str, Any]) -> str:
    """A compact, folder-safe name of a run's main knobs, e.g.
    ``relu-he_normal-d8-w5-sgd-lr0.01-bce`` (the model, batch norm, clipping and float64
    are added when they are not the defaults: ``resmlp-...-bn_pre-clip_value1-f64``)."""
    def name(key: str) -> str:
        node = config.get(key)
        return str(node.get("name", "")) if isinstance(node, Mapping) else str(node or "")

    from vgrad.models import MODELS

    parts = []
    model = MODELS.get(name("model"))
    if name("model") and (model is None or model.named):
        parts.append(name("model"))
    parts += [name("act"), name("init"), f"d{config.get('depth')}"]
    widths = config.get("widths")
    parts.append("w" + ("x".join(map(str, widths)) if widths else str(config.get("width"))))
    if config.get("bn") not in (None, "none"):
        parts.append(f"bn_{config['bn']}")
    optim = config.get("optim") if isinstance(config.get("optim"), Mapping) else {}
    parts += [name("optim"), f"lr{_short(optim.get('lr'))}"]
    clip = config.get("clip") if isinstance(config.get("clip"), Mapping) else {}
    if clip.get("name") not in (None, "none"):
        parts.append(f"clip_{clip['name']}" + (_short(clip["max"]) if "max" in clip else ""))
    parts.append(str(config.get("loss")))
    if config.get("dtype") == "float64":
        parts.append("f64")
    return _safe("-".join(p for p in parts if p))


def _safe(text: str) -> str:
    """``text`` as one folder name (at most 120 characters of ``A-Za-z0-9._+=,-``)."""
    return re.sub(r"[^A-Za-z0-9._+=,-]", "_", text)[:120].strip(".") or "run"


def seed_dirs(run_dir: str | Path) -> dict[int, Path]:
    """The event folders of a run, by seed (``tensorboard/<label>/seed_<s>``)."""
    out = {}
    for folder in sorted(Path(run_dir, "tensorboard").glob("*/seed_*")):
        seed = folder.name.removeprefix("seed_")
        if folder.is_dir() and seed.isdigit():
            out[int(seed)] = folder
    return out


def _config_of(run_dir: Path) -> dict[str, Any] | None:
    """The config of the run being written in ``run_dir``, if a file says it already:
    its ``summary.json`` (any status but ``failed``: a folder vgrad trains into holds no
    other config's run, while a failed run's folder can be taken by another job), or,
    for a single run of the command line, the ``.hydra/config.yaml`` Hydra has just
    written there."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and summary.get("status") not in (None, "failed"):
        config = summary.get("config")
        if isinstance(config, dict):
            return config
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        hydra = HydraConfig.get()
        if (hydra.mode != RunMode.RUN
                or Path(hydra.runtime.output_dir).absolute() != run_dir.absolute()):
            return None
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        try:
            return OmegaConf.to_container(config, resolve=True)
        except Exception:  # noqa: BLE001 (an interpolation only Hydra resolves)
            return OmegaConf.to_container(config, resolve=False)
    except Exception:  # noqa: BLE001 (no Hydra run, or no readable config: wait)
        return None


class TensorBoardExport:
    """Appends a run's new records to one TensorBoard event file per seed.

    Events are written in bulk: one event per kept recorded step holding all of that
    step's scalars, and one per kept epoch boundary holding its scalars and histograms
    (built from the fixed bins vgrad already computed), rather than one event per value,
    straight to the event file (tensorboardX's ``EventsWriter``, without the queue and
    thread of its ``SummaryWriter``, whose bounded queue made every event wait).

    ``name`` replaces :func:`label` as the folder of the run's seeds (a launcher that
    knows its sweep's axes can pass, e.g., ``act=relu,depth=8``).

    ``config`` is the run's resolved config (``Job.config``); without it, it is read from
    the run folder (:func:`_config_of`), and until a file there holds it the export
    waits, then writes everything so far (at the latest when it is closed).
    """

    def __init__(self, run_dir: Path, seeds: list[int],
                 config: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        self.writer_class = _writer_class()
        self.run_dir = Path(run_dir)
        self.seeds = [int(s) for s in seeds]
        self.config = dict(config) if config is not None else None
        self.name = _safe(name) if name else None
        self.writers: list[Any] = []
        self.chunks_written = 0  # chunks of the records already exported
        self.epochs_written = 0  # epoch boundaries already exported
        self.ended = False
        self._last: Any = None  # the latest records, for close()

    def _open(self) -> bool:
        """Open the event files once the config is known; whether they are open."""
        if self.writers:
            return True
        if self.config is None:
            self.config = _config_of(self.run_dir)
            if self.config is None:
                return False
        folder = self.run_dir / "tensorboard" / (self.name or label(self.config))
        for s in self.seeds:
            (folder / f"seed_{s}").mkdir(parents=True, exist_ok=True)
            events = self.writer_class(str(folder / f"seed_{s}" / "events"))
            _write(events, _session_start(hparams(self.config, s)), 0)
            self.writers.append(events)
        return True

    def update(self, rec: Records) -> None:
        """Export the chunks of ``rec`` not exported yet (once the config is known)."""
        self._last = rec
        if self.ended or not self._open():
            return
        from tensorboardX.proto.summary_pb2 import Summary

        from vgrad.probes import HIST_EDGES, layer_histograms

        edges = np.asarray(HIST_EDGES, np.float64)
        histogram_keys = layer_histograms()  # (grad_hist, weight_hist)
        names = list(rec.layer_names)
        plan = rec.plan
        every = plan.record_every
        n_steps = len(plan.recorded_steps())
        step_stride = stride(n_steps, MAX_SCALARS)
        epoch_stride = stride(plan.epochs + 1, MAX_SCALARS)
        hist_stride = stride(plan.epochs + 1, MAX_HISTOGRAMS)
        new = range(self.chunks_written, len(rec.step_parts))
        last_chunk = len(rec.step_parts) - 1
        for s, events in enumerate(self.writers):
            for c in new:
                steps, stats = rec.step_parts[c], rec.step_stat_parts[c]
                tags, columns = _step_columns(stats, s, names)
                step_list = steps.tolist() if tags else []
                for t, step in enumerate(step_list):
                    last = rec.done and c == last_chunk and t == len(step_list) - 1
                    if (step // every) % step_stride and not last:
                        continue
                    values = [Summary.Value(tag=tag, simple_value=v)
                              for tag, v in zip(tags, columns[:, t].tolist(), strict=True)
                              if math.isfinite(v)]
                    if values:
                        _write(events, Summary(value=values), step)
            epoch = self.epochs_written
            for c in new:
                stats = rec.epoch_parts[c]
                n = next(iter(stats.values())).shape[1]
                for i in range(n):
                    last = rec.done and c == last_chunk and i == n - 1
                    scalars = (epoch + i) % epoch_stride == 0 or last
                    hists = (epoch + i) % hist_stride == 0 or last
                    if not (scalars or hists):
                        continue
                    step = (epoch + i) * plan.steps_per_epoch
                    values = [Summary.Value(tag=tag, simple_value=float(stats[key][s, i]))
                              for key, tag in EPOCH_SCALARS.items()
                              if scalars and key in stats
                              and math.isfinite(float(stats[key][s, i]))]
                    for key in (k for k in histogram_keys if hists and k in stats):
                        for layer, name in enumerate(names):
                            value = _histogram(f"{key}/{name}", stats[key][s, i, layer], edges)
                            if value is not None:
                                values.append(value)
                    if values:
                        _write(events, Summary(value=values), step)
                epoch += n
            if rec.done:
                diverged = int(np.asarray(rec.diverged_at)[s]) >= 0
                _write(events, _session_end(diverged), int(plan.total_steps))
            events.flush()
        self.chunks_written, self.epochs_written = len(rec.step_parts), rec.epochs_done + 1
        self.ended = bool(rec.done)

    def close(self) -> None:
        if self._last is not None and not self.writers:
            self.update(self._last)  # the config is known now (the run folder is written)
        for w in self.writers:
            w.close()


def _write(events: Any, summary: Any, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event

    events.write_event(Event(wall_time=time.time(), step=step, summary=summary))


def _plugin_summary(tag: str, data: Any) -> Any:
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    content = HParamsPluginData(version=0, **data).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=_HPARAMS_PLUGIN, content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _session_start(values: Mapping[str, Any]) -> Any:
    """The hparams plugin's session-start summary holding ``values``."""
    from tensorboardX.proto.plugin_hparams_pb2 import SessionStartInfo

    info = SessionStartInfo(start_time_secs=time.time())
    for key, value in values.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = float(value)
        else:
            info.hparams[key].string_value = str(value)
    return _plugin_summary(_SESSION_START, {"session_start_info": info})


def _session_end(diverged: bool) -> Any:
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import SessionEndInfo

    status = Status.Value("STATUS_FAILURE" if diverged else "STATUS_SUCCESS")
    info = SessionEndInfo(status=status, end_time_secs=time.time())
    return _plugin_summary(_SESSION_END, {"session_end_info": info})


def _step_columns(stats: dict[str, np.ndarray], seed: int, names: list[str]
                  ) -> tuple[list[str], np.ndarray]:
    """The scalar tags of a chunk's steps and their values, [tags, steps] (what the
    chosen probes recorded)."""
    tags, rows = [], []
    for key in (k for k in GLOBAL_STEP_SCALARS if k in stats):
        tags.append(key)
        rows.append(stats[key][seed])
    for key in (k for k in STEP_SCALARS if k in stats):
        for layer, name in enumerate(names):
            tags.append(f"{key}/{name}")
            rows.append(stats[key][seed, :, layer])
    return tags, (np.asarray(rows, np.float64) if rows else np.zeros((0, 0)))


def _histogram(tag: str, counts: np.ndarray, edges: np.ndarray) -> Any:
    """One histogram value of fixed-bin counts (None when empty or not finite); its
    moments are computed from the bin centres."""
    from tensorboardX.proto.summary_pb2 import HistogramProto, Summary

    counts = np.asarray(counts, np.float64)
    if not np.isfinite(counts).all() or counts.sum() == 0:
        return None
    centres = (edges[:-1] + edges[1:]) / 2
    filled = np.flatnonzero(counts)
    histo = HistogramProto(min=float(edges[filled[0]]), max=float(edges[filled[-1] + 1]),
                           num=float(counts.sum()), sum=float((counts * centres).sum()),
                           sum_squares=float((counts * centres ** 2).sum()),
                           bucket_limit=edges[1:].tolist(), bucket=counts.tolist())
    return Summary.Value(tag=tag, histo=histo)
