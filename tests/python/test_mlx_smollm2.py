"""Real model: SmolLM2-135M-Instruct (head_dim 64), fetched and converted by the repo's helper."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

TEXT = "/usr/share/common-licenses/GPL-3"


@pytest.mark.slow
def test_smollm2_fp16_sanity_and_turboquant_quality():
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_eval import Setting, evaluate

    model_dir = models.smollm2("float32")
    model, tokenizer = load(str(model_dir))
    assert len(model.layers) == 30 and model.layers[0].self_attn.head_dim == 64
    tokens = tokenizer.encode(open(TEXT).read())
    results = evaluate(model, tokens, [Setting.parse("4"), Setting.parse("3")], prefix=64,
                       score=96, chunk=32, context=0, decode_tokens=0, log=lambda *a: None)
    fp16, tq4, tq3 = results
    assert 5 < fp16.ppl < 60, fp16.ppl  # a 135M model on English prose: tens, not thousands
    # bounds with margin over the measured values (README table): 4 bits close to fp16 KV,
    # 3 bits measurably worse but far from broken
    assert tq4.ppl_ratio < 1.06 and tq4.logit_cosine > 0.96, tq4
    assert tq3.ppl_ratio < 1.35 and tq3.logit_cosine > 0.90, tq3
    assert tq3.logit_cosine < tq4.logit_cosine
    assert tq3.kv_ratio_fp16 > 4.0
    # generation through mlx-lm with the compressed cache answers sensibly
    from mlx_lm import generate

    from turboquant.mlx_lm import make_prompt_cache

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    text = generate(model, tokenizer, prompt, max_tokens=12,
                    prompt_cache=make_prompt_cache(model, key_bits=4, value_bits=4))
    assert "Paris" in text, text
