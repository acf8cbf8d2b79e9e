"""turboquant.models' fetch-and-convert cache: one conversion when processes (parallel test
workers) ask at once, and a killed conversion's leftovers redone. The converter is replaced by
a stub that writes the two files a converted folder is recognised by."""

import threading
import time
from pathlib import Path

import pytest

from turboquant import models


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []
    cg = pytest.importorskip("turboquant.convert_gguf")

    def convert(gguf_file, out, dtype):
        calls.append(dtype)
        out = Path(out)
        out.mkdir(parents=True)  # fails on a leftover folder: the caller must clear it
        time.sleep(0.2)  # long enough for the other askers to arrive
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(cg, "convert_gguf", convert)
    return calls


def test_askers_at_once_share_one_conversion(tmp_path, fake_convert):
    gguf = tmp_path / "gguf" / Path(models.SMOLLM2_GGUF).name
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    got, errors = [], []

    def ask():
        try:
            got.append(models.smollm2("float16", root=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert fake_convert == ["float16"]
    assert got == [tmp_path / "SmolLM2-135M-Instruct-float16"] * 4
    assert (got[0] / "model.safetensors").read_bytes() == b"weights"


def test_a_killed_conversions_leftovers_are_redone(tmp_path, fake_convert):
    gguf = tmp_path / "gguf" / Path(models.SMOLLM2_GGUF).name
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    stale = tmp_path / "SmolLM2-135M-Instruct-float32.part"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    out = models.smollm2("float32", root=tmp_path)
    assert fake_convert == ["float32"]
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert not stale.exists()
    assert models.smollm2("float32", root=tmp_path) == out  # cached: no second conversion
    assert fake_convert == ["float32"]
