"""How precisely 512 scored tokens pin down a perplexity ratio: for each setting, the ratio
of the eval (python -m turboquant eval's protocol and functions), the mean KL, and the
standard error of log(ratio) = mean over tokens of (nll_setting - nll_fp16), paired per
token; and each setting's ratio to the first one's with its paired standard error.

    python bench/ppl_ratio_noise.py --model DIR --config bench/mlx_eval_smollm2.json \
        --bits k4v2+s4+w64,p+s4+w64+profile:PATH
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from mlx_lm import load

from turboquant import mlx_eval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--bits", required=True)
    ap.add_argument("--offset", type=int, default=0, help="start of the text window (tokens)")
    a = ap.parse_args()
    cfg = json.load(open(a.config, encoding="utf-8"))
    model, tok = load(a.model)
    text = open(cfg["text"], encoding="utf-8", errors="replace").read()
    n = cfg["prefix"] + cfg["max_tokens"]
    toks = tok.encode(text)[a.offset: a.offset + n]
    targets = np.array(toks[cfg["prefix"]:])
    rows = []
    for spec in ["fp16"] + a.bits.split(","):
        s = mlx_eval.Setting.parse(spec)
        logits = mlx_eval.score_logits(model, mlx_eval.make_cache(model, s, cfg["seed"]), toks,
                                       cfg["prefix"], cfg["chunk"])
        lp = mlx_eval._log_softmax(logits.astype(np.float64))
        rows.append((s.name, lp))
    ref = rows[0][1]
    nll_ref = -ref[np.arange(len(targets)), targets]
    print(f"offset {a.offset}: {len(targets)} scored tokens")
    first = None
    for name, lp in rows[1:]:
        d = -lp[np.arange(len(targets)), targets] - nll_ref
        if first is None:
            first = d
        kl = np.sum(np.exp(ref) * (ref - lp), -1)
        se = d.std(ddof=1) / np.sqrt(len(d))
        print(f"{name:40s} ratio {np.exp(d.mean()):.4f}  (1 s.e. x{np.exp(se):.4f})  "
              f"KL {kl.mean():.4f} (s.e. {kl.std(ddof=1) / np.sqrt(len(kl)):.4f})")
        if d is not first:  # paired with the first setting: the same tokens, so less noise
            dd = d - first
            print(f"{'':40s} vs the first: ratio x{np.exp(dd.mean()):.4f} "
                  f"(1 s.e. x{np.exp(dd.std(ddof=1) / np.sqrt(len(dd))):.4f})")


if __name__ == "__main__":
    main()
