"""convert-gguf: a tiny Llama written as GGUF the way llama.cpp does it converts back exactly."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
gguf = pytest.importorskip("gguf")

from mlx_tiny import tiny_model  # noqa: E402

from turboquant.convert_gguf import (  # noqa: E402
    GGUFConversionError,
    convert_gguf,
    permute_rope_rows,
    unpermute_rope_rows,
)

GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight":
    "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight":
    "ffn_down.weight",
}


def write_llama_gguf(model, path, arch="llama", quant=None):
    from mlx.utils import tree_flatten

    a = model.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.num_hidden_layers)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_attention_heads)
    w.add_head_count_kv(a.num_key_value_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_vocab_size(a.vocab_size)
    tokens = ["<s>", "</s>"] + [chr(33 + i) for i in range(a.vocab_size - 2)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (a.vocab_size - 2))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, p in tree_flatten(model.parameters()):
        x = np.array(p.astype(mx.float32))
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{GGUF_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                x = permute_rope_rows(x, a.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                x = permute_rope_rows(x, a.num_key_value_heads)
        if quant is not None and x.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(x, quant), raw_dtype=quant)
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_inverse():
    x = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(x, 3), 3), x)
    assert not np.array_equal(permute_rope_rows(x, 3), x)


@pytest.mark.parametrize("quant", [None, "Q8_0"])
def test_roundtrip_logits(tmp_path, quant):
    from mlx_lm import load

    model = tiny_model("llama")
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    write_llama_gguf(model, tmp_path / "m.gguf", quant=qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    loaded, tok = load(str(out))
    ids = mx.array([[2, 5, 9, 30, 31, 70, 4]])
    ref, got = np.array(model(ids)), np.array(loaded(ids))
    if quant is None:
        np.testing.assert_allclose(got, ref, atol=1e-4)  # exact weights, Q/K un-permuted
    else:
        cos = np.sum(ref * got, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
        assert cos.min() > 0.999
    assert tok.encode("!\"#", add_special_tokens=False) == [2, 3, 4]


def test_refuses_other_architectures_and_bad_files(tmp_path):
    model = tiny_model("llama")
    write_llama_gguf(model, tmp_path / "m.gguf", arch="qwen2")
    with pytest.raises(GGUFConversionError, match="qwen2"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFConversionError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out2")
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out3")


def test_cli_convert_generate_eval(tmp_path):
    """The three mlx commands end to end on a tiny Llama (head_dim 32) written as GGUF."""
    import json
    import os
    import subprocess
    import sys

    import mlx_tiny

    import mlx_lm.models.llama as llama

    mx.random.seed(0)
    cfg = dict(mlx_tiny._COMMON, model_type="llama", hidden_size=128)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    write_llama_gguf(model, tmp_path / "m.gguf")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "turboquant", *args], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    cli("convert-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "model"), "--dtype", "float32")
    out = cli("generate", "--model", str(tmp_path / "model"), "--prompt", "!#$%", "--kv-bits",
              "3", "--key-bits", "4", "--fp16-layers", "-1", "--max-tokens", "5")
    assert "[turboquant] KV cache:" in out
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(33 + (i * 7) % 90) for i in range(400)))
    prof = tmp_path / "prof.json"
    out = cli("calibrate", "--model", str(tmp_path / "model"), "--text", str(text), "--budget",
              "2.5", "--tokens", "64", "--out", str(prof))
    assert "average 2.500 bits" in out
    layers = json.loads(prof.read_text())["layers"]
    assert len(layers) == 2 and all(2 <= e["key_bits"] <= 6 for e in layers)
    out = cli("generate", "--model", str(tmp_path / "model"), "--prompt", "!#$%",
              "--profile", str(prof), "--fp16-window", "8", "--max-tokens", "5")
    assert "[turboquant] KV cache:" in out
    res = json.loads(cli("eval", "--model", str(tmp_path / "model"), "--text", str(text),
                         "--bits", f"3,4,k4v3,mlx4,3+w16,p+profile:{prof}", "--prefix", "64",
                         "--max-tokens", "64", "--chunk", "8", "--context", "128",
                         "--decode-tokens", "2", "--json"))
    names = [r["name"] for r in res["results"]]
    assert names == ["fp16", "tq-3bit", "tq-4bit", "tq-k4v3", "mlx-q4", "tq-3bit+w16",
                     "tq-profile[prof.json]"]
    for r in res["results"]:
        assert r["ppl"] > 1 and 0 < r["logit_cosine"] <= 1.0001 and r["decode_tok_s"] > 0
        assert set(r["speed_vs_mlx"]) == {"mlx-q4", "mlx-q8"}
    tq3, tq4 = res["results"][1], res["results"][2]
    assert tq3["kv_bytes"] < tq4["kv_bytes"] < res["results"][0]["kv_bytes"]
    assert tq3["logit_cosine"] < tq4["logit_cosine"]
