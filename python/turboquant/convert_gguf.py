"""GGUF file -> mlx-lm model directory (config.json, model.safetensors, tokenizer.json).

Supported GGUF architectures: ``llama``/``mistral`` (mlx-lm ``llama``), ``qwen2``, ``qwen3``
and ``gemma3`` (mlx-lm ``gemma3_text``); any other is refused by name. llama.cpp's
convert_hf_to_gguf.py changes some tensors on the way into GGUF, and each change is undone
here per family:

- llama/mistral: the query/key rows are permuted from HF's "rotate half" RoPE layout into
  GGML's interleaved pairs (``LlamaModel.permute``); qwen2, qwen3 and gemma3 are stored
  unpermuted (their GGML graphs use NEOX-style RoPE, which is HF's layout).
- gemma3: every ``*norm.weight`` has +1 baked in (Gemma3RMSNorm scales by 1 + w and GGML's
  rms_norm by w); mlx-lm's gemma3_text RMSNorm adds the 1 itself, so 1 is subtracted.
- Quantized tensor types (Q4_0, Q8_0, K-quants...) are dequantized with the ``gguf``
  package's reference NumPy dequantizers and written in one float dtype.

Hyper-parameters GGUF does not store are those llama.cpp itself assumes (gemma3: a global
layer every 6th, local RoPE base 10000, query scale 1/sqrt(head_dim) except for the 62-layer
27B model).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from turboquant._atomic import atomic_path, atomic_write

# GGUF per-layer tensor names -> HF/mlx-lm names shared by the Llama-style families.
_LLAMA_LAYER = {
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
_QK_NORM = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_QKV_BIAS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
# Gemma 3 norms around both sub-blocks: GGUF's ffn_norm is the *pre*-feed-forward norm.
_GEMMA3_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if k != "ffn_norm.weight"},
    **_QK_NORM,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# RoPE frequency tables llama.cpp may add; mlx-lm recomputes them from the config.
_ROPE_TABLES = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto an mlx-lm model."""

    model_type: str
    hf_class: str
    layer_tensors: dict[str, str]
    permute_qk: bool = False  # llama.cpp's LlamaModel.permute was applied to Q/K rows
    norm_shift: float = 0.0  # added by llama.cpp to every *norm.weight; subtracted here
    own_head_dim: bool = True  # the mlx-lm model reads head_dim from its config
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_LAYER, permute_qk=True,
                    extra={"attention_bias": False, "mlp_bias": False}),
    "mistral": Family("llama", "MistralForCausalLM", _LLAMA_LAYER, permute_qk=True,
                      extra={"attention_bias": False, "mlp_bias": False}),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", {**_LLAMA_LAYER, **_QKV_BIAS},
                    own_head_dim=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", {**_LLAMA_LAYER, **_QK_NORM}),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_LAYER, norm_shift=1.0,
                     extra={"hidden_activation": "gelu_pytorch_tanh"}),
}
# GGUF architectures this converter knows, with the mlx-lm model_type they become.
SUPPORTED_ARCHITECTURES = {arch: f.model_type for arch, f in FAMILIES.items()}

# What llama.cpp assumes for Gemma 3 (llama-model.cpp, LLM_ARCH_GEMMA3) when GGUF is silent.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


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
    return f.contents()


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


def architecture(reader) -> str:
    """The file's ``general.architecture``, refused by name unless it is supported."""
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported by convert-gguf "
            f"(supported: {', '.join(sorted(FAMILIES))})")
    return arch


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise GGUFConversionError(
            f"RoPE scaling type {kind!r} ({arch}.rope.scaling.type) is not supported by "
            "convert-gguf (supported: linear)")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor is None:
        raise GGUFConversionError(f"linear RoPE scaling without {arch}.rope.scaling.factor")
    return {"type": "linear", "factor": float(factor)}


def _swa_period(pattern, n_layers: int) -> int:
    """mlx-lm's sliding_window_pattern N (every N-th layer global) from GGUF's field.

    The field is either that period or, as newer llama.cpp writes it, one flag per layer
    (true = sliding window); the flags must then repeat with a single global layer last.
    """
    if isinstance(pattern, int):
        if pattern < 1:
            raise GGUFConversionError(f"sliding_window_pattern must be >= 1, got {pattern}")
        return pattern
    flags = [bool(f) for f in pattern]
    period = flags.index(False) + 1 if False in flags else 0
    expected = [(i + 1) % period != 0 for i in range(n_layers)] if period else None
    if flags != expected:
        raise GGUFConversionError(
            f"sliding_window_pattern {[int(f) for f in flags]} is not one global layer after "
            "every N-1 sliding-window layers, the only layout mlx-lm's gemma3_text has")
    return period


def read_config(reader) -> dict:
    """The mlx-lm config.json of the GGUF file's model."""
    arch = architecture(reader)
    family = FAMILIES[arch]

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise GGUFConversionError(f"GGUF file lacks the required field {arch}.{key}")
        return v

    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    n_layers = int(need("block_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", hidden // n_head))
    value_dim = int(get("attention.value_length", head_dim))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens else 0))
    if value_dim != head_dim:
        raise GGUFConversionError(
            f"{arch}.attention.value_length={value_dim} differs from key_length={head_dim}")
    if not family.own_head_dim and head_dim * n_head != hidden:
        raise GGUFConversionError(
            f"{arch} with head_dim {head_dim} x {n_head} heads != embedding_length {hidden}: "
            f"mlx-lm's {family.model_type} derives head_dim from the hidden size")
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFConversionError(
            f"partial rotary embedding (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
            "is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if get(key):
            raise GGUFConversionError(
                f"{arch}.{key}={get(key)} is not supported by mlx-lm's {family.model_type}")
    config = {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        **family.extra,
    }
    scaling = _rope_scaling(reader, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if arch == "gemma3":
        window = get("attention.sliding_window")
        pattern = get("attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
        if window is None:
            raise GGUFConversionError(f"GGUF file lacks the required field {arch}."
                                      "attention.sliding_window")
        config.update(
            sliding_window=int(window), sliding_window_pattern=_swa_period(pattern, n_layers),
            rope_local_base_freq=float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
            # Gemma 3 27B scales queries by hidden/heads, every other size by head_dim.
            query_pre_attn_scalar=(hidden // n_head if n_layers == 62 else head_dim))
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                      ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        v = _field(reader, key)
        if v is not None:
            config[name] = int(v)
    return config


# Pre-tokenizer regexes of llama.cpp's byte-level BPE vocabularies (llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def _bpe_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # These vocabularies split every digit on its own before byte-level BPE.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    regex = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if regex is None:
        raise GGUFConversionError(
            f"BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported (supported: "
            "default, gpt2, smollm, starcoder, refact, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary with scores.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is the normal piece of highest score; a BPE merge list ranked by that
    score, with every split of every piece into two normal pieces, does the same.
    """
    normal = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-float(scores[i]), normal[left], normal[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary.

    ``gpt2`` (byte-level BPE with merges) and ``llama`` (SentencePiece BPE with scores and
    byte fallback, as in Llama 2, Mistral and Gemma) tokenizer models are supported.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFConversionError("GGUF file has no tokenizer.ggml.tokens")
    tokens = list(tokens)
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
        tok.pre_tokenizer = _bpe_pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise GGUFConversionError("SentencePiece ('llama') vocabulary without scores")
        unk = _field(reader, "tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types),
                                   unk_token=None if unk is None else tokens[int(unk)],
                                   fuse_unk=True, byte_fallback=True))
        # llama.cpp escapes spaces as U+2581 and, unless told otherwise, prefixes one.
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        add_bos_default = True
    else:
        raise GGUFConversionError(
            f"tokenizer model {kind!r} (tokenizer.ggml.model) is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
    # token_type 3 = control, 4 = user-defined: matched on the raw text before the model,
    # as llama.cpp does (user-defined pieces are stored with their spaces un-escaped).
    specials = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
                for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_tokens(specials)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", add_bos_default):
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1",
            special_tokens=[(b, int(bos))])
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
    except (ValueError, struct.error, IndexError, KeyError) as e:  # what gguf raises on junk
        raise GGUFConversionError(f"{gguf_path} is not a readable GGUF file: {e}") from None
    config = read_config(reader)
    arch = architecture(reader)
    family = FAMILIES[arch]
    tok, tokens = build_tokenizer(reader)

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name in _ROPE_TABLES:
            w = _dequantize(t)
            if not np.all(w == 1.0):
                raise GGUFConversionError(
                    f"{name} holds per-frequency RoPE factors (Llama 3.1-style long-context "
                    "scaling), which convert-gguf does not support")
            continue
        rest = None
        if name in _GLOBAL_TENSORS:
            out = _GLOBAL_TENSORS[name]
        elif name.startswith("blk.") and name.count(".") >= 2:
            _, idx, rest = name.split(".", 2)
            if rest not in family.layer_tensors or not idx.isdigit():
                raise GGUFConversionError(f"unexpected tensor {name!r} in a {arch} GGUF file")
            out = f"model.layers.{int(idx)}.{family.layer_tensors[rest]}"
        else:
            raise GGUFConversionError(f"unexpected tensor {name!r} in a {arch} GGUF file")
        w = _dequantize(t)
        if family.permute_qk and rest == "attn_q.weight":
            w = unpermute_rope_rows(w, n_head)
        elif family.permute_qk and rest == "attn_k.weight":
            w = unpermute_rope_rows(w, n_kv)
        if family.norm_shift and name.endswith("norm.weight"):
            w = w - family.norm_shift
        weights[out] = np.ascontiguousarray(w.astype(_DTYPES[dtype]))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"])
        for v in family.layer_tensors.values()}
    missing = sorted(expected - set(weights))
    if missing:
        raise GGUFConversionError(
            f"{arch} GGUF file with {config['num_hidden_layers']} layers lacks {len(missing)} "
            f"tensors, e.g. the one that becomes {missing[0]!r}")
    extra = sorted(set(weights) - expected - {"lm_head.weight"})
    if extra:
        raise GGUFConversionError(f"tensor {extra[0]!r} beyond block_count in a {arch} file")

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "mlx"})
    with atomic_write(out_dir / "config.json", "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
                  config["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    for key, field_name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        if field_name in config:
            tok_config[key] = tokens[config[field_name]]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        tok_config["pad_token"] = tokens[int(pad)]
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    if unk is not None and _field(reader, "tokenizer.ggml.model") == "llama":
        tok_config["unk_token"] = tokens[int(unk)]  # SentencePiece's byte-fallback model
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    with atomic_write(out_dir / "tokenizer_config.json", "w") as f:
        f.write(json.dumps(tok_config, indent=2) + "\n")
    return out_dir
