"""CLI subcommands of the cache: precompute, benchmark, info (run in-process via main())."""

import numpy as np
import pytest

import turboquant as tq
from turboquant.__main__ import main


def test_precompute_writes_then_finds_artifacts(tmp_path, capsys):
    out = tmp_path / "arts"
    assert main(["precompute", "--head-dim", "64", "--bits", "2", "3", "--method", "turboquant_mse",
                 "--layers", "2", "--kv-heads", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("written") == 2 and "2 entries" in text
    assert (out / "turboquant_mse-d64-b3-s0" / "rotation__L1H1v.npy").exists()
    assert main(["precompute", "--head-dim", "64", "--bits", "3", "--layers", "2", "--kv-heads", "2",
                 "--out", str(out)]) == 0
    assert "already present" in capsys.readouterr().out
    # A build with that store loads the rotations.
    store = tq.NpyArtifactStore(out)
    c = tq.KVCacheBuilder().with_head_dim(64).with_layers(2).with_heads(2, 2).with_artifact_store(store).build()
    assert c.description["artifacts_loaded"] == {"key": 4, "value": 4} and store.puts == 0


def test_bench_sweep_table(capsys):
    assert main(["bench", "sweep", "--head-dim", "64", "--context-lengths", "64,300",
                 "--bits", "2,4", "--repeats", "2", "--no-progress"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("turboquant_mse")]
    assert len(lines) == 4
    # 4 bits at 300 tokens (2 pages of 256): ratio = 300*2*128 / (2*512*(32+2) + 2*64*4), the
    # default hadamard1 rotations holding 64 signs per stream
    assert any(" 4 " in ln and " 300 " in ln and f"{300 * 256 / (2 * 512 * 34 + 512):.2f}x" in ln for ln in lines)


def test_benchmark_is_an_alias_of_bench_sweep_with_a_notice(capsys):
    assert main(["benchmark", "--head-dim", "64", "--context-lengths", "64", "--bits", "2",
                 "--repeats", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "note: `python -m turboquant benchmark` is now `python -m turboquant bench sweep` "
        "(same options)"]
    assert "bench sweep:" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("turboquant_mse")]) == 1
    # one command per job: the former name runs but is not listed
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    names = [ln.split()[0] for ln in listed.splitlines() if ln.startswith("    ") and ln.split()]
    assert "bench" in names and "demo" in names and "benchmark" not in names
    capsys.readouterr()
    assert main(["bench", "sweep", "--head-dim", "64", "--context-lengths", "64", "--bits", "2",
                 "--repeats", "1", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_info_describes_and_rejects(tmp_path, capsys):
    c = tq.KVCacheBuilder().with_head_dim(32).with_heads(4, 2).with_key_bits(4).with_value_bits(2).build()
    x = np.ones((2, 7, 32), np.float32)
    c.append(x, x)
    p = tmp_path / "c.tqkv"
    c.save(p)
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "4 query / 2 kv" in out and "turboquant_mse, 4 bits" in out and "turboquant_mse, 2 bits" in out
    assert "tokens/layer:    7" in out and f"{c.memory_bytes()} bytes in memory" in out
    p.write_bytes(p.read_bytes()[:-3])
    assert main(["info", str(p)]) == 1
    assert "error: truncated or corrupted" in capsys.readouterr().out
