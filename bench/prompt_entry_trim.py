"""What a prompt-cache entry would hold if the fp16 window were dropped while it is idle
(its tokens computed again on reuse): for prompts of the given lengths (the opening tokens of
a license text in /usr/share/common-licenses), the default cache's bytes as stored today, the
tokens left once the window is trimmed, and the bytes of that trimmed cache once compacted (a
copy: a trim alone keeps the window's allocation), each against fp16 K/V of the tokens held.

    python bench/prompt_entry_trim.py [--model DIR] [--lengths 257,1025] [--out FILE]

(``--model`` defaults to ``turboquant.models.smollm2("float32")``.)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import mlx.core as mx

from gpu_common import write_result

TEXT = Path("/usr/share/common-licenses/GPL-3")


def fp16_bytes(cache, tokens: int) -> int:
    """Bytes of fp16 keys and values of ``tokens`` tokens in every layer of ``cache``."""
    return sum(2 * 2 * tokens * int(c._core_kv_heads) * int(c._head_dim) for c in cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--lengths", default="257,1025")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from mlx_lm import load

    from turboquant import models
    from turboquant.mlx_lm import make_prompt_cache

    model, tokenizer = load(a.model or str(models.smollm2("float32")))
    ids = tokenizer.encode(TEXT.read_text())
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        cache = make_prompt_cache(model, key_bits=3, value_bits=3)
        mx.eval(model(mx.array([ids[:n]]), cache=cache))
        stored = sum(c.nbytes for c in cache)
        window = cache[0]._core.window_tokens(0)
        for c in cache:
            c.trim(window)
        trimmed = sum(c.nbytes for c in cache)
        compact = sum(c.nbytes for c in copy.deepcopy(cache))
        held = n - window
        row = dict(tokens=n, stored_bytes=stored, stored_vs_fp16=fp16_bytes(cache, n) / stored,
                   window_tokens=window, held_tokens=held, trimmed_bytes=trimmed,
                   compact_bytes=compact, compact_vs_fp16=fp16_bytes(cache, held) / compact)
        rows.append(row)
        print(f"{n} tokens: stored {stored} bytes ({row['stored_vs_fp16']:.2f}x smaller than "
              f"fp16); window {window} dropped: {held} tokens held, {trimmed} bytes after the "
              f"trim, {compact} compacted ({row['compact_vs_fp16']:.2f}x smaller than fp16 of "
              f"the tokens held)", flush=True)
    if a.out:
        write_result(a.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
