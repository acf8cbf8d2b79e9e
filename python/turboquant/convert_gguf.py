"""GGUF file -> mlx-lm model directory (config.json, model.safetensors, tokenizer.json).

llama.cpp stores Llama-family weights with two twists that must be undone: quantized
tensor types (Q4_0, Q4_1, Q8_0, K-quants...) and, for the query/key projections, a row
permutation that turns HF's "rotate half" RoPE layout into GGML's interleaved-pairs layout
(``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py). Everything is dequantized
with the ``gguf`` package's reference NumPy dequantizers and written in one float dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from turboquant._atomic import atomic_path, atomic_write

# GGUF architectures this converter knows, with the mlx-lm model_type they become.
# Each is a Llama-style decoder whose Q/K rows llama.cpp permutes for RoPE.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}

# GGUF per-layer tensor names -> HF/mlx-lm names (``{i}`` is the layer index).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that mlx-lm recomputes (RoPE frequency tables).
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

_DTYPES = {"float16": np.float16, "float32": np.float32}


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture, tensor type, layout)."""


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: HF rotate-half rows -> GGML interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rope_rows`: GGML interleaved pairs -> HF rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    kind = tensor.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(tensor.data)
    elif kind == GGMLQuantizationType.BF16:
        raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        arr = raw.view(np.float32)
    else:
        try:
            arr = quants.dequantize(np.asarray(tensor.data), kind)
        except NotImplementedError as e:
            raise GGUFConversionError(
                f"tensor {tensor.name!r} has GGML type {kind.name}, which the installed gguf "
                f"package cannot dequantize ({e})") from None
    # GGUF lists dims fastest-first; NumPy wants them slowest-first.
    shape = tuple(int(s) for s in reversed(tensor.shape))
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported by convert-gguf "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFConversionError(f"GGUF file lacks the required field {arch}.{key}")
        return v

    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else 0))
    config = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "mlp_bias": False,
    }
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFConversionError(
            f"partial rotary embedding (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
            "is not supported")
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFConversionError("RoPE scaling in GGUF metadata is not supported by convert-gguf")
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                      ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        v = _field(reader, key)
        if v is not None:
            config[name] = int(v)
    return config


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # These vocabularies split every digit on its own before byte-level BPE.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFConversionError(f"BPE pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: they must never be split by BPE.
    specials = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
                for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_tokens(specials)
    return tok, tokens


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """Convert ``gguf_path`` into an mlx-lm model directory ``out_dir`` and return it."""
    import gguf
    from safetensors.numpy import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises bare ValueError/struct.error
        raise GGUFConversionError(f"{gguf_path} is not a readable GGUF file: {e}") from None
    config = read_config(reader)
    tok, tokens = build_tokenizer(reader)

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name in _IGNORED_TENSORS:
            continue
        if name in _GLOBAL_TENSORS:
            out = _GLOBAL_TENSORS[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                raise GGUFConversionError(f"unexpected tensor {name!r} in a Llama GGUF file")
            out = f"model.layers.{int(idx)}.{_LAYER_TENSORS[rest]}"
        else:
            raise GGUFConversionError(f"unexpected tensor {name!r} in a Llama GGUF file")
        w = _dequantize(t)
        if rest_is(name, "attn_q.weight"):
            w = unpermute_rope_rows(w, n_head)
        elif rest_is(name, "attn_k.weight"):
            w = unpermute_rope_rows(w, n_kv)
        weights[out] = np.ascontiguousarray(w.astype(_DTYPES[dtype]))
    expected = 2 + 9 * config["num_hidden_layers"]
    if len([k for k in weights if k != "lm_head.weight"]) != expected:
        raise GGUFConversionError(
            f"expected {expected} tensors for {config['num_hidden_layers']} layers, "
            f"found {len(weights)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "mlx"})
    with atomic_write(out_dir / "config.json", "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
                  config["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        if field in config:
            tok_config[key] = tokens[config[field]]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        tok_config["pad_token"] = tokens[int(pad)]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    with atomic_write(out_dir / "tokenizer_config.json", "w") as f:
        f.write(json.dumps(tok_config, indent=2) + "\n")
    return out_dir


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)
