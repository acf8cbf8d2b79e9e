"""Quality of cache settings on chosen windows of the tuning texts (GPL-3, GFDL-1.3), with
settings per layer kind: how the presets' recipes were chosen (docs/presets.md).

The protocol is ``python -m turboquant eval``'s (``turboquant.mlx_eval.evaluate``: 512
tokens prefilled, 512 scored 16 at a time, against mlx-lm's fp16 cache); the windows are
picked by index from the texts' consecutive 1,024-token windows (``--pick 0,2,4,6,8,10``:
four of GPL-3 and two of GFDL-1.3 for both models), so that a short run covers both texts.
A setting is any ``eval --bits`` setting, or ``G=SETTING;S=SETTING``: the first on
full-attention layers, the second on sliding-window layers (``fp16`` keeps mlx-lm's cache).

  PYTHONPATH=python python bench/preset_tuning.py --model .models/gemma-3-270m-float32 \\
      --pick 0,2,4,6,8,10 --bits 'tq3,tq3-mixed,G=tq3;S=fp16'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_lm import load
from mlx_lm.models import cache as mlx_cache

from turboquant import mlx_eval as ev

TUNING = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3"]
WINDOW = 1024  # prefix + scored tokens

_make_cache = ev.make_cache


def make_cache(model, s: ev.Setting, seed: int = 0):
    """eval's caches, plus the per-layer-kind settings (kind "split")."""
    if s.kind != "split":
        return _make_cache(model, s, seed)
    full, slide = (ev.Setting.parse(x[2:]) for x in s.method.split(";"))
    base = mlx_cache.make_prompt_cache(model)
    a, b = _make_cache(model, full, seed), _make_cache(model, slide, seed)
    return [y if type(c) is mlx_cache.RotatingKVCache else x for c, x, y in zip(base, a, b)]


def parse(spec: str) -> ev.Setting:
    if spec.startswith("G="):
        if ";S=" not in spec:
            raise ValueError(f"bad setting {spec!r}: expected G=SETTING;S=SETTING")
        return ev.Setting(spec, "split", method=spec)
    return ev.Setting.parse(spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="mlx-lm model directory")
    ap.add_argument("--texts", default=",".join(TUNING))
    ap.add_argument("--pick", default="0,2,4,6,8,10", help="window indices, comma-separated")
    ap.add_argument("--bits", required=True, help="settings, comma-separated")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ev.make_cache = make_cache
    model, tok = load(args.model)
    texts = [tok.encode(Path(p).read_text()) for p in args.texts.split(",")]
    pool = [t[i:i + WINDOW] for t in texts for i in range(0, len(t) - WINDOW + 1, WINDOW)]
    wins = [pool[int(i)] for i in args.pick.split(",")]
    settings = [parse(s) for s in args.bits.split(",")]
    res = ev.evaluate(model, wins, settings, prefix=512, score=WINDOW - 512, chunk=16,
                      context=0, decode_tokens=0, windows=len(wins),
                      log=lambda *a: print(*a, file=sys.stderr, flush=True))
    for r in res:
        print(f"{r.setting.name:<44} ratio {r.ppl_ratio:.4f} (1 s.e. x{r.ppl_ratio_se:.4f}) "
              f"KL {r.kl:.4f} top-1 {r.top1:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "texts": args.texts.split(","), "pick": args.pick,
             "results": [r.as_dict() for r in res]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
