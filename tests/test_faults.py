"""Faults end in one line and lose nothing: bad files and paths, full disks, orphans."""

from __future__ import annotations

import errno
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LIGHT, TINY, one_error_line, run_dirs

from vgrad import store

REPO = Path(__file__).resolve().parent.parent



def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def idx_folder(root: Path, n_train: int = 12, n_labels: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": rng.integers(0, 255, (n_train, 4, 4)),
             "train-labels-idx1-ubyte": rng.integers(0, 3, n_labels or n_train),
             "t10k-images-idx3-ubyte": rng.integers(0, 255, (6, 4, 4)),
             "t10k-labels-idx1-ubyte": rng.integers(0, 3, 6)}
    for name, array in files.items():
        (root / name).write_bytes(idx_bytes(array))
    return root


def corrupt(kind: str, folder: Path) -> None:
    path = folder / "train-images-idx3-ubyte"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-50])
    elif kind == "magic":
        path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    elif kind == "fake_gz":
        path.rename(folder / "train-images-idx3-ubyte.gz")
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")


@pytest.mark.parametrize("kind", ["empty", "truncated", "magic", "fake_gz", "labels"])
def test_bad_idx_files_are_named_in_one_line(cli, tmp_path, kind):
    folder = idx_folder(tmp_path / "idx", n_labels=10 if kind == "labels" else None)
    if kind != "labels":
        corrupt(kind, folder)
    code, _, err = cli("data=mnist", f"data.path={folder}", "loss=ce", "batch_size=4",
                       "epochs=1", "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    line = one_error_line(err, "data.path")
    assert ("train-images" in line) or ("labels" in line)
    assert not run_dirs(tmp_path / "run")


def test_a_good_idx_folder_trains(cli, tmp_path):
    folder = idx_folder(tmp_path / "idx")
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # gzipped works too
        f.write((folder / "t10k-labels-idx1-ubyte").read_bytes())
    (folder / "t10k-labels-idx1-ubyte").unlink()
    code, _, err = cli("data=mnist", f"data.path={folder}", "loss=ce", "batch_size=4",
                       "epochs=1", "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_an_unusable_compile_cache_is_one_line(cli, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path = blocker if where == "file" else blocker / "cache"
    code, _, err = cli(*TINY, f"compile_cache={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    one_error_line(err, "compile_cache")


def test_a_run_folder_below_a_file_is_one_line(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = cli(*TINY, f"hydra.run.dir={blocker / 'run'}")
    assert code == 2
    one_error_line(err, "a_file")


def test_a_full_disk_fails_its_job_and_the_sweep_goes_on(cli, tmp_path, monkeypatch):
    real = store.atomic_write

    def full_for_one_job(path: Path, payload: bytes) -> None:
        if Path(path).parent.name == "1" and Path(path).name != "runs.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, payload)

    monkeypatch.setattr(store, "atomic_write", full_for_one_job)
    # two structures (depth), so that job 1's group fails alone
    code, out, err = cli("-m", "depth=1,2,3", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert code == 1
    assert (tmp_path / "runs.csv").is_file()
    statuses = {d.name: store.read_summary(d)["status"] for d in run_dirs(tmp_path)}
    assert statuses == {"0": "completed", "2": "completed"}
    lines = [line for line in err.splitlines() if line.startswith("vgrad: error:")]
    assert len(lines) == 1 and "No space left" in lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
def test_joblib_workers_exit_when_the_sweep_is_killed(tmp_path, subprocess_env):
    env = dict(subprocess_env, VGRAD_HOST_DEVICES="1")
    cmd = [sys.executable, "-m", "vgrad.train", "-m", "hydra/launcher=parallel",
           "epochs=100000", "data.n_samples=64", "act=tanh,relu", "progress=false",
           *LIGHT, f"hydra.sweep.dir={tmp_path}"]
    parent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)

    def children() -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent.pid:
                out.append(int(stat.parent.name))
        return out

    deadline = time.time() + 240
    while not any((tmp_path / d / store.SUMMARY).is_file() for d in ("0", "1")):
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.2)
    workers = children()
    assert workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1][:3]]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, "joblib workers outlived their sweep"
