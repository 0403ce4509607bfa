"""Datasets by name: the ``data`` axis. Everything here works offline.

``load(cfg)`` returns a :class:`Dataset` of float32 inputs and int32 labels, split
into train and test with a fixed seed. Sources:

- ``circles``, ``moons``: scikit-learn's generators (the visualize and relu_fix presets use
  ``make_circles``); the keys are sklearn's own (``n_samples``, ``noise``, ``factor``,
  ``random_state``).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes).
- ``fashion_mnist``: IDX files, by default Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``); the offline stand-in for MNIST.
- ``mnist``: any folder holding the four standard IDX files (``data.path``).
- ``adding``: the adding problem (Hochreiter & Schmidhuber 1997), generated from
  ``random_state``: a regression target (float32 labels, ``loss=regression``).
- ``copy``: the copy (memory) task (Hochreiter & Schmidhuber 1997; Arjovsky, Shah &
  Bengio 2016), generated from ``random_state``: a label at every step ([n, T + 20]
  int32 labels, ``loss=ce``), for models with a readout at every step.

Sequences, for the recurrent models (``vgrad.models.rnn``): the adding problem is T steps
of 2 features; the copy task T + 20 steps of 10 (one-hot symbols); images are read row
by row (``data.sequence=rows``: digits 8 steps of 8, Fashion-MNIST 28 of 28) or pixel by
pixel (``pixels``: 64 or 784 steps of 1). The flat input is the same either way
(row-major); ``step_features`` says how a recurrent net splits it.

The IDX reader accepts plain or gzipped files with the usual names
(``train-images-idx3-ubyte[.gz]`` ...; ``train-images.idx3-ubyte`` also works).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vgrad.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # [n_train, features] float32
    y_train: np.ndarray  # [n_train] int32, or [n_train, T]: a label per step (copy)
    x_test: np.ndarray  # [n_test, features] float32 (n_test may be 0)
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


# --- schemas -----------------------------------------------------------------------------


@dataclass
class CirclesData:
    name: str = "circles"
    n_samples: int = 1000
    noise: float = 0.1
    factor: float = 0.5  # visualize preset: 0.5; sklearn's default (relu_fix preset) is 0.8
    random_state: int = 42  # the visualize tutorial seeds numpy with 42 before make_circles
    test_size: float = 0.0  # fraction held out; the visualize preset scores on all 1000
    split_seed: int = 0
    scale: str = "none"  # none | standard | max
    input_q: float | None = None  # per-example mean square after scaling (see rescale)
    n_train: int | None = None  # keep only the first n_train training examples


@dataclass
class MoonsData:
    name: str = "moons"
    n_samples: int = 1000
    noise: float = 0.1
    random_state: int = 0
    test_size: float = 0.5
    split_seed: int = 0
    scale: str = "none"
    input_q: float | None = None
    n_train: int | None = None


@dataclass
class DigitsData:
    name: str = "digits"
    test_size: float = 0.25
    split_seed: int = 0
    scale: str = "max"  # pixel values 0..16 -> 0..1
    input_q: float | None = None
    n_train: int | None = None
    sequence: str = "rows"  # recurrent models: rows (8 steps of 8) | pixels (64 of 1)


@dataclass
class IdxData:
    """A folder of the four standard IDX files; the given train/test split is kept."""

    name: str = "fashion_mnist"
    path: str | None = "/usr/share/datasets/fashion-mnist"
    scale: str = "max"  # pixel values 0..255 -> 0..1, as the mnist_losses and nielsen presets do
    input_q: float | None = None
    n_train: int | None = None  # e.g. Nielsen's 1000-image runs
    n_test: int | None = None
    sequence: str = "rows"  # recurrent models: rows (28 steps of 28) | pixels (784 of 1)


@dataclass
class AddingData:
    """The adding problem: T steps of (value ~ U(0, 1), marker); two steps are marked,
    one in each half, and the target is the sum of their values. Predicting the mean,
    1, scores MSE = Var = 2/12 = 1/6; solving it needs memory across T/2 steps or more."""

    name: str = "adding"
    length: int = 50  # T
    n_train: int = 10000
    n_test: int = 1000
    random_state: int = 0
    scale: str = "none"


@dataclass
class CopyData:
    """The copy task: ``symbols`` symbols drawn from an alphabet of ``alphabet``, then
    T - 1 blanks, a delimiter, and ``symbols`` blanks during which the net must
    reproduce the symbols in order; every other step's target is the blank. A net
    without memory outputs blanks and guesses the recalled symbols uniformly: its
    cross-entropy per step is symbols * ln(alphabet) / (T + 2 * symbols), the baseline
    plateau of Arjovsky, Shah & Bengio 2016 (10 ln 8 / (T + 20))."""

    name: str = "copy"
    length: int = 100  # T: the blanks between the last symbol and the delimiter, plus 1
    symbols: int = 10
    alphabet: int = 8
    n_train: int = 10000
    n_test: int = 1000
    random_state: int = 0
    scale: str = "none"


# --- helpers ---------------------------------------------------------------------------------


def split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    """Shuffle with ``seed`` and hold out ``round(test_size * n)`` examples for testing."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_size * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def scale(x_train: np.ndarray, x_test: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale inputs: ``none``; ``max`` divides by the training maximum (pixels -> [0, 1]);
    ``standard`` subtracts the training mean and divides by the training std per feature."""
    if how == "none":
        return x_train, x_test
    if how == "max":
        top = float(np.abs(x_train).max()) or 1.0
        return x_train / top, x_test / top
    if how == "standard":
        mean, std = x_train.mean(0), x_train.std(0)
        std = np.where(std > 0, std, 1.0)
        return (x_train - mean) / std, (x_test - mean) / std
    raise ConfigError("data.scale", how, "none, max, standard")


def rescale(x: np.ndarray, input_q: float) -> np.ndarray:
    """Each example times the factor that makes its mean squared feature ``input_q``.

    Mean-field theory follows each input's squared length: under fan-in-scaled kernels
    the first layer's pre-activations have q_1 = sigma_w^2 * input_q + sigma_b^2. Setting
    ``input_q`` so that q_1 is the fixed point q* starts every layer there, as Pennington,
    Schoenholz & Ganguli (2017) do for dynamical isometry (``theory.input_q_for`` gives
    the value). An all-zero example stays zero."""
    if not input_q > 0:
        raise ConfigError("data.input_q", input_q, "a positive number or null")
    mean_square = np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True)
    factor = np.sqrt(input_q / np.where(mean_square > 0, mean_square, 1.0))
    return (x * factor).astype(np.float32)


def _finish(x_tr, y_tr, x_te, y_te, cfg: Any) -> Dataset:
    x_tr, x_te = scale(x_tr.astype(np.float32), x_te.astype(np.float32), cfg.scale)
    if getattr(cfg, "input_q", None) is not None:
        x_tr, x_te = rescale(x_tr, cfg.input_q), rescale(x_te, cfg.input_q)
    if cfg.n_train is not None:
        x_tr, y_tr = x_tr[: cfg.n_train], y_tr[: cfg.n_train]
    if getattr(cfg, "n_test", None) is not None:
        x_te, y_te = x_te[: cfg.n_test], y_te[: cfg.n_test]
    n_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    arrays = [np.ascontiguousarray(x_tr, np.float32), y_tr.astype(np.int32),
              np.ascontiguousarray(x_te, np.float32), y_te.astype(np.int32)]
    for a in arrays:  # shared by every job of a sweep (see ``load``): never modified
        a.flags.writeable = False
    return Dataset(*arrays, n_classes)


# --- loaders -----------------------------------------------------------------------------------


def circles(cfg: Any) -> Dataset:
    from sklearn.datasets import make_circles

    x, y = make_circles(cfg.n_samples, noise=cfg.noise, factor=cfg.factor,
                        random_state=cfg.random_state)
    return _finish(*split(x, y, cfg.test_size, cfg.split_seed), cfg)


def moons(cfg: Any) -> Dataset:
    from sklearn.datasets import make_moons

    x, y = make_moons(cfg.n_samples, noise=cfg.noise, random_state=cfg.random_state)
    return _finish(*split(x, y, cfg.test_size, cfg.split_seed), cfg)


def digits(cfg: Any) -> Dataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _finish(*split(x, y, cfg.test_size, cfg.split_seed), cfg)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped or not.

    Raises :class:`ConfigError` naming the file when it cannot be read or is not a whole
    IDX file (empty, truncated, bad magic number, a ``.gz`` that is not gzip)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open

    def bad(why: str) -> ConfigError:
        return ConfigError("data.path", str(path.parent), f"readable IDX files ({path.name}: "
                           f"{why})")

    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise bad(f"cannot be read: {exc}") from None
    if len(raw) < 4:
        raise bad(f"{len(raw)} bytes, not an IDX file")
    zero, dtype_code, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise bad("bad magic number, not an IDX file")
    if len(raw) < 4 + 4 * ndim:
        raise bad("truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise bad(f"{len(raw)} bytes where its header promises {expected} "
                  f"(shape {'x'.join(map(str, shape))}): truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


_IDX_STEMS = {
    "x_train": "train-images", "y_train": "train-labels",
    "x_test": "t10k-images", "y_test": "t10k-labels",
}


def find_idx_files(folder: Path) -> dict[str, Path]:
    """Locate the four standard IDX files in ``folder`` (gz or plain, '-' or '.' before idx)."""
    found = {}
    for key, stem in _IDX_STEMS.items():
        kind = "idx3" if key.startswith("x") else "idx1"
        names = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
        hits = [folder / (n + gz) for n in names for gz in (".gz", "")
                if (folder / (n + gz)).is_file()]
        if hits:
            found[key] = hits[0]
    return found


_HOW_TO_GET = {
    "fashion_mnist": "install Debian's package: apt-get install dataset-fashion-mnist",
    "mnist": "download MNIST's four IDX files (train-images-idx3-ubyte.gz, ...) into a folder "
             "and pass data.path=FOLDER",
}


def idx(cfg: Any) -> Dataset:
    folder = Path(cfg.path) if cfg.path else None
    files = find_idx_files(folder) if folder is not None and folder.is_dir() else {}
    if len(files) < 4:
        missing = sorted(set(_IDX_STEMS) - set(files))
        what = "not a folder" if folder is None or not folder.is_dir() else (
            "missing " + ", ".join(_IDX_STEMS[m] for m in missing))
        raise ConfigError("data.path", cfg.path, f"a folder with the four IDX files ({what}); "
                          + _HOW_TO_GET.get(cfg.name, _HOW_TO_GET["mnist"]))
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split_ in ("train", "test"):
        x, y = arrays[f"x_{split_}"], arrays[f"y_{split_}"]
        if len(x) != len(y) or y.ndim != 1:
            raise ConfigError("data.path", cfg.path, f"IDX files that agree: {len(x)} images "
                              f"in {files[f'x_{split_}'].name} but labels of shape "
                              f"{'x'.join(map(str, y.shape))} in {files[f'y_{split_}'].name}")
    flat = {k: v.reshape(len(v), -1) if k.startswith("x") else v for k, v in arrays.items()}
    return _finish(flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"], cfg)


def adding(cfg: Any) -> Dataset:
    """The adding problem (see ``AddingData``), flat [n, 2T]: step t is columns 2t, 2t+1."""
    rng = np.random.default_rng(cfg.random_state)
    n, t = cfg.n_train + cfg.n_test, cfg.length
    values = rng.random((n, t))
    half = t // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, t, n)
    markers = np.zeros((n, t))
    markers[np.arange(n), first] = markers[np.arange(n), second] = 1.0
    x = np.stack([values, markers], axis=-1).reshape(n, 2 * t).astype(np.float32)
    y = (values[np.arange(n), first] + values[np.arange(n), second]).astype(np.float32)
    arrays = [x[:cfg.n_train], y[:cfg.n_train], x[cfg.n_train:], y[cfg.n_train:]]
    for a in arrays:
        a.flags.writeable = False
    return Dataset(*arrays, n_classes=1)


def copy_task(cfg: Any) -> Dataset:
    """The copy task (see ``CopyData``) as one-hot steps, flat [n, (T + 2 S) (A + 2)]
    (S symbols, alphabet A): input category 0 is the blank, 1 ... A the symbols, A + 1
    the delimiter; labels [n, T + 2 S] in 0 ... A (0: blank, i: symbol i)."""
    rng = np.random.default_rng(cfg.random_state)
    n, t, s, a = cfg.n_train + cfg.n_test, cfg.length, cfg.symbols, cfg.alphabet
    steps = t + 2 * s
    symbols = rng.integers(1, a + 1, (n, s))
    inputs = np.zeros((n, steps), np.int64)
    inputs[:, :s] = symbols
    inputs[:, s + t - 1] = a + 1  # the delimiter, after T - 1 blanks
    labels = np.zeros((n, steps), np.int32)
    labels[:, -s:] = symbols
    x = np.eye(a + 2, dtype=np.float32)[inputs].reshape(n, steps * (a + 2))
    arrays = [x[:cfg.n_train], labels[:cfg.n_train], x[cfg.n_train:], labels[cfg.n_train:]]
    for arr in arrays:
        arr.flags.writeable = False
    return Dataset(*arrays, n_classes=a + 1)


def _copy_sequence(cfg: Any) -> tuple[int, int]:
    return int(cfg.length) + 2 * int(cfg.symbols), int(cfg.alphabet) + 2


def copy_baseline(cfg: Any) -> float:
    """The memoryless cross-entropy per step of the copy task, S ln A / (T + 2 S)."""
    return cfg.symbols * float(np.log(cfg.alphabet)) / (cfg.length + 2 * cfg.symbols)


def sequence_shape(cfg: Any) -> tuple[int, int] | None:
    """(T, features per step) of a dataset read as a sequence, from its config alone
    (None: the source is not a sequence; its registry entry says)."""
    source = DATASETS.get(cfg.name)
    return None if source is None or source.sequence is None else source.sequence(cfg)


def _image_sequence(side: int) -> Callable[[Any], tuple[int, int]]:
    """A ``side`` x ``side`` image read row by row (``data.sequence=rows``) or pixel by
    pixel (``pixels``)."""
    return lambda cfg: (side, side) if cfg.sequence == "rows" else (side * side, 1)


def _adding_sequence(cfg: Any) -> tuple[int, int]:
    return int(cfg.length), 2  # (value, marker) at each of T steps


def image_shape(cfg: Any) -> tuple[int, int, int] | None:
    """(height, width, channels) of a dataset's images, from its config alone (None: not
    images; convolutional models refuse it)."""
    source = DATASETS.get(cfg.name)
    return None if source is None else source.image


def per_step(cfg: Any) -> bool:
    """Whether a dataset has a label at every step (the copy task): its models read out
    at every step, and the loss is the mean over steps."""
    source = DATASETS.get(cfg.name)
    return source is not None and source.per_step


def step_features(cfg: Any) -> int | None:
    shape = sequence_shape(cfg)
    return None if shape is None else shape[1]


def sequence_length(cfg: Any) -> int | None:
    shape = sequence_shape(cfg)
    return None if shape is None else shape[0]


@dataclass(frozen=True)
class Source:
    """A registry entry: the config schema, the loader, and the source's facts."""

    schema: type
    load: Callable[[Any], Dataset]
    #: Generated by scikit-learn: kept in the on-disk cache (see ``cache_dir``).
    generated: bool = False
    #: The floats a generated dataset holds, from its config alone (None: fixed by the
    #: files or small): what the memory check weighs before anything is generated.
    floats: Callable[[Any], int] | None = None
    #: (T, features per step) of the input read as a sequence, from the config alone
    #: (None: not a sequence; the recurrent models refuse it).
    sequence: Callable[[Any], tuple[int, int]] | None = None
    #: Its labels are real-valued targets (``loss=regression``), not classes.
    regression: bool = False
    #: (height, width, channels) of its images (flat rows of H * W * C features); None:
    #: not images.
    image: tuple[int, int, int] | None = None
    #: A label at every step ([n, T] labels): the model reads out at every step.
    per_step: bool = False
    #: The loss per example of a model that has learnt nothing it must remember (the
    #: copy task's memoryless baseline), from the config alone; None: the task's
    #: generic baseline (a regression target's variance).
    baseline_loss: Callable[[Any], float] | None = None


DATASETS: dict[str, Source] = {
    "circles": Source(CirclesData, circles, generated=True,
                      floats=lambda c: 3 * c.n_samples),
    "moons": Source(MoonsData, moons, generated=True, floats=lambda c: 3 * c.n_samples),
    "digits": Source(DigitsData, digits, generated=True, sequence=_image_sequence(8),
                     image=(8, 8, 1)),
    "fashion_mnist": Source(IdxData, idx, sequence=_image_sequence(28), image=(28, 28, 1)),
    "mnist": Source(IdxData, idx, sequence=_image_sequence(28), image=(28, 28, 1)),
    "adding": Source(AddingData, adding,
                     floats=lambda c: (2 * c.length + 1) * (c.n_train + c.n_test),
                     sequence=_adding_sequence, regression=True),
    "copy": Source(CopyData, copy_task,
                   floats=lambda c: (c.length + 2 * c.symbols) * (c.alphabet + 3)
                   * (c.n_train + c.n_test),
                   sequence=_copy_sequence, per_step=True, baseline_loss=copy_baseline),
}
#: Datasets whose labels are real-valued targets (``loss=regression``), from their entries.
REGRESSION = tuple(name for name, source in DATASETS.items() if source.regression)
#: Datasets with a label at every step, from their entries.
PER_STEP = tuple(name for name, source in DATASETS.items() if source.per_step)


def load(cfg: Any) -> Dataset:
    """Load the dataset named by the ``data`` config node. Loaded once per process and
    config: a sweep's jobs share one dataset object (and one copy in memory).
    scikit-learn's datasets are also kept on disk (see ``cache_dir``)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    key = json.dumps(node, sort_keys=True, default=str)
    if key not in _LOADED:
        source = DATASETS[cfg.name]
        _LOADED[key] = (_through_cache(source, cfg, key) if source.generated
                        else source.load(cfg))
    return _LOADED[key]


def cache_dir() -> Path | None:
    """Where generated datasets are kept: ``$VGRAD_DATA_CACHE``, default
    ``~/.cache/vgrad/data``; an empty value turns the cache off.

    Importing scikit-learn takes about 2 s, longer than generating the data and often
    longer than training a small sweep; every process of a sweep (joblib workers, SLURM
    jobs, reruns) would pay it. A file per data config (and scikit-learn version) holds
    exactly the arrays that generating and splitting gave, so a cached load is
    bit-identical to a fresh one.
    """
    folder = os.environ.get("VGRAD_DATA_CACHE", "~/.cache/vgrad/data")
    return Path(folder).expanduser() if folder else None


def _cache_file(folder: Path, name: str, key: str) -> Path:
    from importlib.metadata import version

    digest = hashlib.sha256(f"{key}|scikit-learn {version('scikit-learn')}".encode())
    return folder / f"{name}-{digest.hexdigest()[:20]}.npz"


def _through_cache(source: Source, cfg: Any, key: str) -> Dataset:
    folder = cache_dir()
    if folder is None:
        return source.load(cfg)
    path = _cache_file(folder, cfg.name, key)
    try:
        with np.load(path) as f:
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            n_classes = int(f["n_classes"])
    except (OSError, ValueError, KeyError, EOFError):  # absent or unreadable: make it
        ds = source.load(cfg)
        _save(path, ds)
        return ds
    for a in arrays:
        a.flags.writeable = False
    return Dataset(*arrays, n_classes)


def _save(path: Path, ds: Dataset) -> None:
    """Write atomically (concurrent processes may make the same file); a cache that
    cannot be written is skipped."""
    from vgrad import store

    with contextlib.suppress(OSError):
        store.write_npz(path, {"x_train": ds.x_train, "y_train": ds.y_train,
                               "x_test": ds.x_test, "y_test": ds.y_test,
                               "n_classes": np.int64(ds.n_classes)})


#: Datasets loaded in this process, by their config (see ``load``).
_LOADED: dict[str, Dataset] = {}
