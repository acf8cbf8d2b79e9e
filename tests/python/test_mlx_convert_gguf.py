"""convert-gguf: tiny models of each family written as GGUF the way llama.cpp does it (Q/K
permutation for llama/mistral, +1 on Gemma norms, metadata keys) convert back exactly."""

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


# mlx-lm name -> GGUF name, per family (llama.cpp's tensor_mapping.py)
GEMMA3_NAMES = {
    **{k: v for k, v in GGUF_NAMES.items() if k != "post_attention_layernorm.weight"},
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
FAMILY_NAMES = {
    "llama": GGUF_NAMES, "mistral": GGUF_NAMES,
    "qwen2": {**GGUF_NAMES, "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"},
    "qwen3": {**GGUF_NAMES, "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight"},
    "gemma3": GEMMA3_NAMES,
}


def write_gguf(model, path, arch="llama", quant=None, tokenizer=None, extra=None):
    """Write an mlx-lm model as llama.cpp's convert_hf_to_gguf.py would for ``arch``."""
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
    head_dim = getattr(a, "head_dim", None)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(a.sliding_window)
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    (tokenizer or gpt2_vocab)(w, a.vocab_size)
    for name, p in tree_flatten(model.parameters()):
        x = np.array(p.astype(mx.float32))
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{FAMILY_NAMES[arch][rest]}"
            if arch in ("llama", "mistral") and rest == "self_attn.q_proj.weight":
                x = permute_rope_rows(x, a.num_attention_heads)
            elif arch in ("llama", "mistral") and rest == "self_attn.k_proj.weight":
                x = permute_rope_rows(x, a.num_key_value_heads)
        if arch == "gemma3" and g.endswith("norm.weight"):
            x = x + 1  # Gemma3RMSNorm's 1 + w, baked in by llama.cpp
        if quant is not None and x.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(x, quant), raw_dtype=quant)
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_vocab(w, n, pre="default", kind="gpt2"):
    tokens = ["<s>", "</s>"] + [chr(33 + i) for i in range(n - 2)]
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (n - 2))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def write_llama_gguf(model, path, arch="llama", quant=None):
    write_gguf(model, path, arch=arch, quant=quant)


def randomize_norms(model, seed=1):
    """Norm weights are ones at init; make them random so a wrong mapping or shift shows."""
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    new = [(k, mx.array(rng.uniform(-0.5, 0.5, v.shape).astype(np.float32)))
           for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


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


def _logits_match(tmp_path, model, arch, atol=1e-4, **kw):
    from mlx_lm import load

    write_gguf(model, tmp_path / "m.gguf", arch=arch, **kw)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    loaded, _ = load(str(out))
    ids = mx.array([[2, 5, 9, 30, 31, 70, 4, 8, 100, 3, 17, 64]])  # longer than a window of 8
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(model(ids)), atol=atol)
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llama_family_unpermutes_qk(tmp_path, arch):
    out = _logits_match(tmp_path, randomize_norms(tiny_model(arch)), arch)
    from safetensors.numpy import load_file

    assert json_of(out)["model_type"] == "llama"
    # the stored Q rows are HF's rotate-half layout, not GGML's interleaved pairs
    import gguf as g

    r = g.GGUFReader(str(tmp_path / "m.gguf"))
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    raw = np.asarray(q.data, dtype=np.float32).reshape(got.shape)
    np.testing.assert_array_equal(got, unpermute_rope_rows(raw, 8 if arch == "mistral" else 4))


def json_of(out):
    import json

    return json.loads((out / "config.json").read_text())


def test_qwen2_biases_no_permutation(tmp_path):
    model = randomize_norms(tiny_model("qwen2"))
    assert np.abs(np.array(model.model.layers[0].self_attn.q_proj.bias)).max() > 0
    out = _logits_match(tmp_path, model, "qwen2")
    cfg = json_of(out)
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True


def test_qwen3_qk_norm_no_permutation(tmp_path):
    out = _logits_match(tmp_path, randomize_norms(tiny_model("qwen3")), "qwen3")
    cfg = json_of(out)
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 16


def test_qwen2_untied_head_and_q8(tmp_path):
    import mlx_tiny
    from mlx_lm.models import qwen2

    mx.random.seed(3)
    cfg = dict(mlx_tiny._COMMON, model_type="qwen2", tie_word_embeddings=False)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    out = _logits_match(tmp_path, model, "qwen2", atol=0.05, quant=gguf.GGMLQuantizationType.Q8_0)
    assert json_of(out)["tie_word_embeddings"] is False


def tiny_gemma3(**over):
    from mlx_lm.models import gemma3_text

    import mlx_tiny

    # six layers: five local (window 8) then one global, llama.cpp's fixed Gemma 3 layout
    cfg = dict(mlx_tiny._COMMON, model_type="gemma3_text", head_dim=16, num_hidden_layers=6,
               sliding_window=8, sliding_window_pattern=6, query_pre_attn_scalar=16,
               rope_local_base_freq=10000.0, rope_theta=1e6, rms_norm_eps=1e-6, **over)
    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(cfg))
    model.sanitize({})  # tied embeddings, as mlx-lm's loader does without lm_head
    mx.eval(model.parameters())
    return randomize_norms(model)


def test_gemma3_norm_offset_and_sliding_config(tmp_path):
    from safetensors.numpy import load_file

    model = tiny_gemma3()
    out = _logits_match(tmp_path, model, "gemma3")
    cfg = json_of(out)
    assert cfg["model_type"] == "gemma3_text" and cfg["tie_word_embeddings"] is True
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"]) == (8, 6)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 1e4)
    assert cfg["query_pre_attn_scalar"] == 16 and cfg["head_dim"] == 16
    # GGUF holds 1 + w for every norm (q/k norms included); the directory holds w again
    w = load_file(str(out / "model.safetensors"))
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        layer = model.model.layers[5]
        ref = layer
        for part in name.split("."):
            ref = getattr(ref, part)
        np.testing.assert_allclose(w[f"model.layers.5.{name}.weight"], np.array(ref.weight),
                                   atol=1e-6, err_msg=name)
    assert "lm_head.weight" not in w


def test_gemma3_pattern_field_and_27b_query_scale(tmp_path):
    from turboquant.convert_gguf import read_config

    def config(n_layers=6, **extra):
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.gguf"
        w = gguf.GGUFWriter(str(path), "gemma3")
        w.add_block_count(n_layers)
        w.add_embedding_length(5376)
        w.add_feed_forward_length(64)
        w.add_head_count(32)
        w.add_key_length(128)
        w.add_sliding_window(1024)
        for key, value in extra.items():
            w.add_key_value(key, *value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return read_config(gguf.GGUFReader(str(path)))

    assert config()["query_pre_attn_scalar"] == 128
    assert config(62)["query_pre_attn_scalar"] == 5376 // 32  # Gemma 3 27B
    flags = [True, True, False] * 2  # newer llama.cpp: one flag per layer
    key = "gemma3.attention.sliding_window_pattern"
    arr = gguf.GGUFValueType.ARRAY
    assert config(**{key: (flags, arr)})["sliding_window_pattern"] == 3
    with pytest.raises(GGUFConversionError, match="one global layer"):
        config(**{key: ([True, False, True, True, True, False], arr)})
    scaling = config(**{"gemma3.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
                        "gemma3.rope.scaling.factor": (8.0, gguf.GGUFValueType.FLOAT32)})
    assert scaling["rope_scaling"] == {"type": "linear", "factor": 8.0}
    with pytest.raises(GGUFConversionError, match="'yarn'"):
        config(**{"gemma3.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    with pytest.raises(GGUFConversionError, match="final_logit_softcapping"):
        config(**{"gemma3.final_logit_softcapping": (30.0, gguf.GGUFValueType.FLOAT32)})


@pytest.mark.parametrize("arch", ["mamba", "deepseek2", "gemma2", "phi3"])
def test_refuses_unsupported_architecture_by_name(tmp_path, arch):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(GGUFConversionError, match=f"architecture '{arch}' is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def spm_vocab(pieces, add_space_prefix=True):
    """A SentencePiece-style ('llama') vocabulary: control, byte and scored normal pieces."""

    def write(w, n):
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
        tokens += [f"<unused{i}>" for i in range(n - len(tokens))]
        types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3] * (n - 259 - len(pieces))
        scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * (
            n - 259 - len(pieces))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_space_prefix(add_space_prefix)
    return write


# "bc" outranks "ab" and "lo" ranks last: the merge order, not the pieces alone, decides
SPM_PIECES = ["\u2581", "e", "h", "l", "o", "w", "r", "d", "a", "b", "c", "bc", "ab", "\u2581w",
              "ll", "he", "llo", "\u2581h", "or", "\u2581wor", "hello", "\u2581hello", "ld",
              "\u2581world", "lo"]


def reference_spm(text, pieces, prefix=True):
    """SentencePiece BPE by the book: join the adjacent pair whose union scores highest."""
    score = {p: -i for i, p in enumerate(pieces)}
    s = ("\u2581" if prefix else "") + text.replace(" ", "\u2581")
    syms = list(s)
    while True:
        best = max(((score[a + b], -i) for i, (a, b) in enumerate(zip(syms, syms[1:]))
                    if a + b in score), default=None)
        if best is None:
            break
        i = -best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for sym in syms:
        out += [sym] if sym in score else [f"<0x{b:02X}>" for b in sym.encode()]
    return out


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocabulary(tmp_path, prefix):
    """A 'llama' tokenizer model becomes BPE with score-ranked merges and byte fallback."""
    from mlx_lm import load

    model = tiny_model("llama")
    model.args.vocab_size = 128
    write_gguf(model, tmp_path / "m.gguf", tokenizer=spm_vocab(SPM_PIECES, prefix))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    _, tok = load(str(out))
    for text in ("hello world", "hello  hello", "wor hell", "héllo wörld", "lo ol he", "abc",
                 "aabcc abab"):
        ids = tok.encode(text)
        assert ids[0] == 1, ids  # BOS: llama.cpp's default for SentencePiece vocabularies
        assert tok.convert_ids_to_tokens(ids[1:]) == reference_spm(text, SPM_PIECES, prefix)
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_bpe_pre_tokenizers(tmp_path, pre):
    from mlx_lm import load

    def vocab(w, n):
        gpt2_vocab(w, n, pre=pre)

    model = tiny_model("qwen2")
    write_gguf(model, tmp_path / "m.gguf", arch="qwen2", tokenizer=vocab)
    _, tok = load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "out")))
    assert tok.encode("!\"#", add_special_tokens=False) == [2, 3, 4]
    # Qwen2 splits numbers into digits, Llama 3 into groups of up to three
    from turboquant.convert_gguf import build_tokenizer

    words = build_tokenizer(gguf.GGUFReader(str(tmp_path / "m.gguf")))[0].pre_tokenizer
    words = [w for w, _ in words.pre_tokenize_str("I'm 12345 ok")]
    digits = ["1", "2", "3", "4", "5"] if pre == "qwen2" else ["123", "45"]
    assert words == ["I", "'m", "\u0120", *digits, "\u0120ok"], words


def test_refuses_unknown_tokenizers(tmp_path):
    def tekken(w, n):
        gpt2_vocab(w, n, pre="tekken")

    def t5(w, n):
        gpt2_vocab(w, n, kind="t5")

    model = tiny_model("llama")
    for name, vocab in (("tekken", tekken), ("t5", t5)):
        path = tmp_path / f"{name}.gguf"
        write_gguf(model, path, tokenizer=vocab)
        with pytest.raises(GGUFConversionError, match=f"'{name}'"):
            convert_gguf(path, tmp_path / f"out-{name}")
