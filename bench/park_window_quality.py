"""Quality cost of parking prompts with their fp16 window in codes (``turboquant serve
--park-window codes``, ``TurboQuantKVCache.compact_window``).

A prompt-cache store that compacts the entries it parks hands a reused prefix back with
its last window tokens (up to fp16_window + block_tokens of them) as codes instead of fp16
rows. This measures what that costs the tokens that follow: for each text, a prefix of
``prefix`` tokens is prefilled into a fresh cache, then the next ``tokens`` tokens are fed
one at a time (teacher forcing, as decode steps), and the log-probability of each next
token is read. Three caches per text:

- ``reference``: mlx-lm's own ``KVCache`` (the model's dtype, float32 here);
- ``tq``: TurboQuant caches of ``turboquant serve``'s default options (the tq3 recipe);
- ``tq_parked``: the same, with ``compact_window()`` on every layer after the prefix (what
  a reused entry of the store holds).

Per cache: perplexity of the continuation, its ratio to the reference's, and the mean KL
divergence KL(reference || cache) of the next-token distributions. Texts are the license
texts in /usr/share/common-licenses named in ``SETTINGS`` (tokenized by the model's
tokenizer, deterministic); the result JSON holds the settings, the machine and the command.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        PYTHONPATH=python python bench/park_window_quality.py \\
        --model .models/SmolLM2-135M-Instruct-float32 \\
        --out bench/results/park_window_quality_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import LICENSES, machine  # noqa: E402

SETTINGS = dict(texts=["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1"], prefix=384, tokens=256)


def log_probs(logits: mx.array) -> np.ndarray:
    x = logits.astype(mx.float32)
    return np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))


def continuation(model, cache, ids: list[int], prefix: int, n: int, park: bool):
    """Log-probs (n, vocab) of tokens ids[prefix + 1 .. prefix + n] given what precedes each,
    the prefix prefilled in one call, the rest fed one token at a time; and the tokens the
    compaction moved (park)."""
    mx.eval(model(mx.array(ids[:prefix])[None], cache=cache))
    moved = sum(c.compact_window() for c in cache) if park else 0
    out = []
    for t in ids[prefix:prefix + n]:
        logits = model(mx.array([[t]]), cache=cache)
        out.append(log_probs(logits[0, -1]))
    return np.stack(out), moved


def scores(lp: np.ndarray, targets: np.ndarray, ref: np.ndarray | None) -> dict:
    nll = -lp[np.arange(len(targets)), targets]
    res = {"ppl": float(np.exp(nll.mean())), "nll": float(nll.mean())}
    if ref is not None:
        p = np.exp(ref)
        res["kl"] = float((p * (ref - lp)).sum(-1).mean())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="mlx-lm model folder")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--prefix", type=int, help="prefix tokens (default: the settings')")
    p.add_argument("--tokens", type=int, help="continuation tokens scored")
    args = p.parse_args(argv)
    settings = dict(SETTINGS)
    for key in ("prefix", "tokens"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache as mlx_prompt_cache

    from turboquant import mlx_lm as tq_mlx_lm
    from turboquant.serve import cache_options

    model, tokenizer = load(args.model)
    options = cache_options()  # turboquant serve's defaults
    P, N = settings["prefix"], settings["tokens"]
    texts, totals = [], {}
    t0 = time.time()
    for name in settings["texts"]:
        ids = tokenizer.encode((LICENSES / name).read_text())
        if len(ids) < P + N + 1:
            raise SystemExit(f"{name}: {len(ids)} tokens, fewer than {P + N + 1}")
        targets = np.array(ids[P + 1:P + N + 1])
        ref, _ = continuation(model, mlx_prompt_cache(model), ids, P, N, False)
        row = {"text": name, "reference": scores(ref, targets, None)}
        for key, park in (("tq", False), ("tq_parked", True)):
            lp, moved = continuation(model, tq_mlx_lm.make_prompt_cache(model, **options),
                                     ids, P, N, park)
            row[key] = scores(lp, targets, ref)
            row[key]["ppl_ratio"] = row[key]["ppl"] / row["reference"]["ppl"]
            if park:
                row[key]["tokens_moved_per_layer"] = moved / len(model.layers)
        texts.append(row)
        print(json.dumps(row), flush=True)
    for key in ("tq", "tq_parked"):
        nll = np.mean([r[key]["nll"] for r in texts])
        ref_nll = np.mean([r["reference"]["nll"] for r in texts])
        totals[key] = {"ppl_ratio": float(np.exp(nll - ref_nll)),
                       "kl": float(np.mean([r[key]["kl"] for r in texts]))}
    totals["parked_vs_tq_ppl"] = totals["tq_parked"]["ppl_ratio"] / totals["tq"]["ppl_ratio"]
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "model": args.model, "kv_options": options,
           "settings": settings, "seconds": round(time.time() - t0, 1), "texts": texts,
           "overall": totals}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(totals, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
