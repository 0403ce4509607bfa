"""Datasets: the IDX reader, the sklearn generators, splits and scaling."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg

from vgrad import data
from vgrad.errors import ConfigError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_reads_as_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28))
    labels = rng.integers(0, 10, size=20)
    for stem, arr in [("train-images-idx3-ubyte", images[:15]),
                      ("train-labels-idx1-ubyte", labels[:15]),
                      ("t10k-images-idx3-ubyte", images[15:]),
                      ("t10k-labels-idx1-ubyte", labels[15:])]:
        write_idx(tmp_path / stem, arr, gz)
    ds = data.load(compose_cfg("data=mnist", f"data.path={tmp_path}").data)
    assert ds.x_train.shape == (15, 784) and ds.x_test.shape == (5, 784)
    np.testing.assert_allclose(ds.x_train * images.max(), images[:15].reshape(15, -1),
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, labels[15:])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32


def test_bad_idx_magic_is_refused(tmp_path):
    (tmp_path / "f").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "f")


def test_missing_idx_folder_names_the_key_and_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="data.path") as err:
        data.load(compose_cfg("data=fashion_mnist", f"data.path={tmp_path}").data)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "train-images" in str(err.value)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package():
    ds = data.load(compose_cfg("data=fashion_mnist").data)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.n_classes == 10
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_circles_are_sklearns_make_circles():
    from sklearn.datasets import make_circles

    ds = data.load(compose_cfg().data)
    x, y = make_circles(1000, noise=0.1, factor=0.5, random_state=42)
    assert ds.x_test.shape == (0, 2)  # the visualize preset trains and scores on all 1000 points
    order = np.lexsort(ds.x_train.T)
    np.testing.assert_allclose(ds.x_train[order], x[np.lexsort(x.T)].astype(np.float32))
    assert ds.y_train.sum() == y.sum() == 500


def test_split_is_fixed_by_its_seed_and_disjoint():
    cfg = compose_cfg("data.test_size=0.5").data
    a, b = data.load(cfg), data.load(cfg)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert len(a.x_train) == len(a.x_test) == 500
    rows = {tuple(r) for r in a.x_train} & {tuple(r) for r in a.x_test}
    assert not rows


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_every_dataset_is_offline_and_labelled_from_zero(name, tmp_path):
    if name in ("mnist", "fashion_mnist") and not FASHION.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    overrides = [f"data={name}"]
    if name == "mnist":
        overrides.append(f"data.path={FASHION}")  # any folder of IDX files
    if "mnist" in name:
        overrides.append("data.n_train=100")
    ds = data.load(compose_cfg(*overrides).data)
    if name in data.REGRESSION:  # real-valued targets
        assert ds.n_classes == 1 and np.isfinite(ds.y_train).all()
    else:
        assert ds.y_train.min() == 0 and ds.n_classes >= 2
    assert np.isfinite(ds.x_train).all()


def test_standard_scaling_uses_training_statistics():
    ds = data.load(compose_cfg("data=digits", "data.scale=standard").data)
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    nonconstant = ds.x_train.std(0) > 0
    np.testing.assert_allclose(ds.x_train.std(0)[nonconstant], 1, rtol=1e-4)


@pytest.mark.parametrize("name", ["circles", "moons", "digits"])
def test_generated_datasets_come_back_from_the_disk_cache_bit_identical(
        monkeypatch, tmp_path, name):
    monkeypatch.setenv("VGRAD_DATA_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_LOADED", {})
    cfg = compose_cfg(f"data={name}").data
    fresh = data.load(cfg)
    assert len(list(tmp_path.glob(f"{name}-*.npz"))) == 1

    def not_again(_cfg):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setitem(data.DATASETS, name, data.Source(data.DATASETS[name].schema,
                                                         not_again, generated=True))
    monkeypatch.setattr(data, "_LOADED", {})
    cached = data.load(cfg)
    assert cached.n_classes == fresh.n_classes
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(fresh, field), getattr(cached, field)
        assert a.dtype == b.dtype and not b.flags.writeable
        np.testing.assert_array_equal(a, b)


def test_the_data_cache_keys_on_the_config_survives_corruption_and_can_be_off(
        monkeypatch, tmp_path):
    monkeypatch.setenv("VGRAD_DATA_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_LOADED", {})
    base = data.load(compose_cfg().data)
    noisier = data.load(compose_cfg("data.noise=0.2").data)
    files = sorted(tmp_path.glob("circles-*.npz"))
    assert len(files) == 2 and not np.array_equal(base.x_train, noisier.x_train)
    for f in files:
        f.write_bytes(b"not a zip")  # corrupt: made again, not an error
    monkeypatch.setattr(data, "_LOADED", {})
    again = data.load(compose_cfg().data)
    np.testing.assert_array_equal(again.x_train, base.x_train)
    monkeypatch.setenv("VGRAD_DATA_CACHE", "")  # off: nothing written
    monkeypatch.setattr(data, "_LOADED", {})
    data.load(compose_cfg("data.noise=0.3").data)
    assert len(list(tmp_path.glob("circles-*.npz"))) == 2


def test_input_q_gives_every_example_that_mean_square_and_keeps_directions():
    plain = data.load(compose_cfg("data=digits", "data.scale=standard").data)
    ds = data.load(compose_cfg("data=digits", "data.scale=standard", "data.input_q=0.03").data)
    for x, x0 in ((ds.x_train, plain.x_train), (ds.x_test, plain.x_test)):
        np.testing.assert_allclose(np.mean(x.astype(np.float64) ** 2, axis=1), 0.03, rtol=1e-5)
        cosine = np.sum(x * x0, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x0, axis=1)
        np.testing.assert_allclose(cosine, 1, rtol=1e-5)
    np.testing.assert_array_equal(data.rescale(np.zeros((2, 3), np.float32), 0.5), 0)
    with pytest.raises(ConfigError, match="data.input_q.*-1"):
        data.load(compose_cfg("data=circles", "data.input_q=-1").data)
