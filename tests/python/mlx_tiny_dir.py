"""A tiny random mlx-lm model saved as a loadable folder (weights, config, a character-level
tokenizer with a chat template), for tests that go through ``mlx_lm.load`` (the server)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_tiny import _COMMON

CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII, one token each
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}"
                 "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: "
                 "{% endif %}")


def save_tiny_model_dir(out: Path, seed: int = 0, weight_scale: float = 3.0,
                        **overrides) -> Path:
    """``weight_scale`` 3 makes greedy text vary (the default init repeats one character).
    ``overrides`` may set ``model_type`` (an mlx-lm model module, llama by default). The
    folder has ``model.safetensors.index.json`` too (pipeline loading reads it)."""
    import importlib

    from tokenizers import Tokenizer, decoders, models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "model_max_length": 512}))
    cfg = dict(_COMMON, model_type="llama", vocab_size=len(CHARS) + len(SPECIALS))
    cfg.update(overrides)
    (out / "config.json").write_text(json.dumps(cfg))
    mx.random.seed(seed)
    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model.update(tree_map(lambda w: w * weight_scale, model.parameters()))
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in weights}}))
    return out
