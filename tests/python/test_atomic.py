"""turboquant._atomic and the crash safety of every writer: a writer killed (SIGKILL) at
random moments leaves the file absent or exactly one complete version, never a prefix."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import turboquant
from turboquant import _atomic
from turboquant._atomic import atomic_path, atomic_write

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "profile.json"
    with atomic_write(target, "w") as f:
        f.write("one")
    with atomic_write(target) as f:
        f.write(b"two")
    assert target.read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["profile.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "cache.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_write(target) as f:
        f.write(b"new, partial")
        raise RuntimeError("mid-write")
    assert target.read_bytes() == b"old"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("failed")
    assert sorted(os.listdir(tmp_path)) == ["cache.bin"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"), \
            atomic_write(tmp_path / "no_such_folder" / "x"):
        pass
    with pytest.raises(IsADirectoryError, match="is a folder"), atomic_write(tmp_path):
        pass
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"), \
            atomic_write(tmp_path / "x", "a"):
        pass
    with pytest.raises(FileNotFoundError, match="produced no file"), \
            atomic_path(tmp_path / "y.npy"):
        pass


def test_atomic_path_keeps_the_extension(tmp_path):
    with atomic_path(tmp_path / "w.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), np.arange(3))


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "cache.tqkv"
    dead = tmp_path / f".cache.tqkv.{dead_pid()}.0.tmp"
    dead_ext = tmp_path / f".cache.tqkv.{dead_pid()}.3.tmp.safetensors"
    live = tmp_path / f".cache.tqkv.{os.getppid()}.0.tmp"
    other = tmp_path / ".other.tqkv.1.0.tmp"
    for p in (dead, dead_ext, live, other):
        p.write_bytes(b"partial")
    with atomic_write(target) as f:
        f.write(b"x")
    assert not dead.exists() and not dead_ext.exists()
    assert live.exists() and other.exists()


def test_project_writers_go_through_atomic_files(tmp_path, monkeypatch):
    """The profile, artifact and prompt-cache writers publish by rename (the helper)."""
    calls = []
    real = _atomic._publish

    def spy(tmp, path):
        calls.append(Path(path).name)
        real(tmp, path)

    monkeypatch.setattr(_atomic, "_publish", spy)
    from turboquant import calibrate
    from turboquant.artifacts import NpyArtifactStore

    calibrate.save({"format": "turboquant-profile", "layers": []}, tmp_path / "p.json")
    assert calls == ["p.json"]
    from turboquant.artifacts import ArtifactKey

    store = NpyArtifactStore(tmp_path / "store")
    arrays = {"rotation": np.eye(2, dtype=np.float32)}
    key = ArtifactKey(method="turboquant_mse", head_dim=2, bits=3, seed=0)
    store.put(key, arrays)
    assert calls[1:] == ["rotation.npy", "MANIFEST.json"]
    np.testing.assert_array_equal(store.get(key)["rotation"], arrays["rotation"])


def kill_rounds(kind: str, rounds: int, tmp_path: Path, max_delay: float) -> int:
    """Start a writer, kill it at a random moment, check what it left; ``rounds`` times.
    Returns the number of rounds whose file was a complete version."""
    sys.path.insert(0, str(HERE))
    import atomic_writer_child as child

    name = "cache.tqkv" if kind == "core" else "prompt.safetensors"
    target = tmp_path / name
    if kind == "core":
        expected = [child.core_version(v).to_bytes() for v in range(child.VERSIONS)]
    else:
        from turboquant.prompt_cache import save_prompt_cache

        expected = []
        for v in range(child.VERSIONS):
            ref = tmp_path / f"ref{v}.safetensors"
            save_prompt_cache(ref, child.prompt_version(v))
            expected.append(ref.read_bytes())
    assert len(set(expected)) == child.VERSIONS
    work = tmp_path / "work"
    work.mkdir()
    target = work / name
    # The child imports the turboquant this test imported (installed, or a source tree).
    package_root = str(Path(turboquant.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(0)
    complete = 0
    for r in range(rounds):
        proc = subprocess.Popen([sys.executable, str(HERE / "atomic_writer_child.py"), kind,
                                 str(target), str(r)], stdout=subprocess.PIPE, env=env)
        if r % 4 == 0:  # sometimes before the first save is complete
            time.sleep(rng.uniform(0, 0.5))
        else:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        left = sorted(os.listdir(work))
        temps = [n for n in left if n.startswith(f".{name}.")]
        assert set(left) <= {name, *temps}, left
        assert len(temps) <= 1, f"round {r}: temporaries accumulate: {temps}"
        if target.exists():
            data = target.read_bytes()
            assert data in expected, f"round {r}: the file is not a complete version"
            if kind == "core":
                from turboquant import _core

                assert _core.KVCache.load(str(target)).to_bytes() == data
            else:
                from turboquant.prompt_cache import load_prompt_cache

                assert len(load_prompt_cache(target)) == 2
            complete += 1
    return complete


def test_core_save_replaces_the_file_by_rename(tmp_path):
    """KVCache.save (C++) publishes a new file (a new inode) instead of truncating the old."""
    from turboquant import _core

    kv = _core.KVCache(16, n_layers=1, key_bits=3, value_bits=3)
    target = tmp_path / "c.tqkv"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    kv.save(str(target))
    assert target.stat().st_ino != inode, (
        "KVCache.save rewrote the file in place: this turboquant._core was built without "
        "the crash-safe save (cpp/src/atomic_file.cpp); rebuild the extension")
    assert sorted(os.listdir(tmp_path)) == ["c.tqkv"]


def test_killed_core_saves_leave_a_complete_version_or_nothing(tmp_path):
    t0 = time.monotonic()
    complete = kill_rounds("core", 14, tmp_path, max_delay=0.2)
    assert complete >= 7
    assert time.monotonic() - t0 < 60


def test_killed_prompt_cache_saves_leave_a_complete_version_or_nothing(tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    t0 = time.monotonic()
    complete = kill_rounds("prompt", 6, tmp_path, max_delay=0.2)
    assert complete >= 3
    assert time.monotonic() - t0 < 60
