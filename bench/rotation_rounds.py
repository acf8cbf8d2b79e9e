"""One randomized Hadamard round (H·D) vs our two (H·D₂·H·D₁) vs dense, on real K/V.

For each model: one prefill of SETTINGS["tokens"] tokens of a fixed English text, every
attention layer's post-RoPE keys, values and queries captured per KV head (full-attention
and sliding-window layers alike). Each vector is quantized as ``turboquant_mse`` does it:
u = x/‖x‖, y = Πu, nearest Lloyd-Max centroid of ``turboquant.codebook(d, b)`` per
coordinate, x̂ = ‖x‖·Πᵀc[idx] (norm kept exact, as it is the same for every rotation).
Reported per rotation and bit width, mean ± s.e. over SETTINGS["seeds"] (each seed draws a
new rotation per (layer, KV head), as the cache's per-head streams do):

* ``nmse``: mean over vectors of ‖x − x̂‖²/‖x‖², keys and values, both as the cache
  quantizes them (``centred``: minus the per-head mean of the first SETTINGS["centre"]
  tokens, TurboQuantKVCache's default) and ``raw``;
* ``score_err``: ‖Q(K − K̂)ᵀ‖²/‖QKᵀ‖² for the layer's real queries (GQA group of the head,
  SETTINGS["queries"] query tokens evenly spaced), centred keys;
* ``structured``: nmse of synthetic inputs where a single round is known to be weak
  (one-hot vectors, a constant vector, a few huge channels over noise) and an i.i.d.
  Gaussian control, at the model's head_dim.

Rotations: ``two`` is the C++ core's "hadamard" (its Π from ``Quantizer.rotation_matrix``,
checked equal to the NumPy H·D₂·H·D₁ built from its signs, and its codes checked equal to
``Quantizer.encode``); ``one`` is H·D₁/√d with the same seed's D₁ (so one and two rounds are
paired per seed); ``dense`` is the core's Haar-random QR rotation.

    python bench/rotation_rounds.py --model smollm2
    python bench/rotation_rounds.py --model gemma3 --model-dir DIR   # an mlx-lm folder

Results: bench/results/rotation_rounds_<model>.json (settings, machine, every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import turboquant as tq
from mlx_lm import load
from mlx_lm.models import cache as mlx_cache
from turboquant import mlx_lm as tq_mlx
from turboquant import models

SETTINGS = {
    "text": "/usr/share/common-licenses/GPL-3",
    "start": 2000,      # first token of the window
    "tokens": 1024,     # prefill length
    "centre": 64,       # tokens whose mean is subtracted ("centred", as the cache does)
    "queries": 128,     # query tokens per layer for the score error (evenly spaced)
    "bits": [2, 3, 4],
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7],
    "rotations": ["one", "two", "dense"],
    "structured_n": 256,  # vectors per structured family and seed
    "nll_tokens": 64,     # sanity check: next-token NLL of the last positions
}


def fwht_matrix(d: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard matrix (Sylvester order, as the core's fwht)."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def rotations(d: int, seed: int, stream: int) -> dict[str, np.ndarray]:
    """{kind: Π (d×d, float64)} for one (seed, stream)."""
    q2 = tq.Quantizer("turboquant_mse", d, 2, seed=seed, stream=stream, rotation="hadamard")
    signs = np.asarray(q2.rotation_parameters(), dtype=np.float64)
    d1, d2 = signs[:d], signs[d:]
    h = fwht_matrix(d)
    two = h @ np.diag(d2) @ h @ np.diag(d1)
    core = np.asarray(q2.rotation_matrix(), dtype=np.float64)
    if np.abs(two - core).max() > 1e-5:
        raise AssertionError("NumPy H·D2·H·D1 differs from the core's hadamard rotation")
    qd = tq.Quantizer("turboquant_mse", d, 2, seed=seed, stream=stream, rotation="dense")
    return {"one": h @ np.diag(d1), "two": two,
            "dense": np.asarray(qd.rotation_matrix(), dtype=np.float64)}


def rotate(x: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y = Π x/‖x‖ per row, ‖x‖) for the rows of x with a non-zero norm."""
    norm = np.linalg.norm(x, axis=1)
    keep = norm > 0
    return (x[keep] / norm[keep, None]) @ rot.T, norm[keep]


def residual(y: np.ndarray, cb) -> tuple[np.ndarray, np.ndarray]:
    """(y − c[idx], idx): the nearest-centroid error in the rotated domain. Π being
    orthogonal, ‖x − x̂‖/‖x‖ = ‖y − c[idx]‖ for turboquant_mse with an exact norm."""
    idx = np.searchsorted(np.asarray(cb.boundaries, dtype=np.float64), y)
    return y - np.asarray(cb.centroids, dtype=np.float64)[idx], idx


def nmse(y: np.ndarray, cb) -> float:
    """Mean over vectors of ‖x − x̂‖²/‖x‖² from their rotated unit vectors y."""
    return float((residual(y, cb)[0] ** 2).sum(1).mean())


def check_codes_against_core(x: np.ndarray, rot: np.ndarray, d: int, bits: int, seed: int,
                             stream: int) -> float:
    """Fraction of coordinates whose NumPy code equals Quantizer.encode's (hadamard)."""
    q = tq.Quantizer("turboquant_mse", d, bits, seed=seed, stream=stream, rotation="hadamard")
    codes, _ = q.encode(np.ascontiguousarray(x, dtype=np.float32))
    core = np.asarray(tq.unpack_indices(np.ascontiguousarray(codes).ravel(), x.size, bits))
    y, _ = rotate(x.astype(np.float32).astype(np.float64), rot)
    _, idx = residual(y, tq.codebook(d, bits))
    return float((core.reshape(idx.shape) == idx).mean())


def structured(d: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Synthetic inputs; names say what they are."""
    g = rng.standard_normal((n, d))
    onehot = np.eye(d)[rng.integers(0, d, n)] * rng.choice([-1.0, 1.0], (n, 1))
    two_hot = np.zeros((n, d))
    for r in range(n):
        i, j = rng.choice(d, 2, replace=False)
        two_hot[r, i], two_hot[r, j] = rng.choice([-1.0, 1.0], 2)
    const = np.ones((n, d)) * rng.choice([-1.0, 1.0], (n, 1))
    few_huge = g.copy()
    ch = rng.choice(d, 2, replace=False)  # the same two outlier channels for every vector
    few_huge[:, ch] += 20.0 * rng.choice([-1.0, 1.0], (n, 2))
    one_huge = g.copy()
    one_huge[:, ch[0]] += 20.0 * rng.choice([-1.0, 1.0], n)
    return {"gaussian": g, "one-hot": onehot, "two-hot": two_hot, "constant": const,
            "one huge channel + noise": one_huge, "two huge channels + noise": few_huge}


def capture_all(model, ids: list[int]) -> tuple[dict[int, tuple], float]:
    """({layer: (queries, keys, values)} as float64 NumPy (H, T, d), mean next-token NLL)
    of one prefill, every attention layer (plain and sliding-window caches alike). The NLL
    (of the last SETTINGS["nll_tokens"] positions: the full vocabulary projection of every
    position would cost more than the model) checks that the model folder works."""
    tq_mlx.install_attention_route()
    sink: dict[int, tuple] = {}
    cache = mlx_cache.make_prompt_cache(model)
    for i, c in enumerate(cache):
        c.tq_capture = (lambda q, k, v, s, i=i: sink.__setitem__(i, (q, k, v)))
    n = SETTINGS["nll_tokens"]
    h = model.model(mx.array(ids)[None], cache=cache)[:, -n - 1:-1]
    tied = getattr(model, "tie_word_embeddings", not hasattr(model, "lm_head"))
    head = model.model.embed_tokens.as_linear if tied else model.lm_head
    logits = head(h)[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, mx.array(ids[-n:])[:, None], axis=-1).mean()
    mx.eval(nll)
    if not sink:
        raise RuntimeError("no attention call was captured")
    return ({i: tuple(np.array(a.astype(mx.float32))[0].astype(np.float64) for a in t)
             for i, t in sorted(sink.items())}, float(nll))


def mean_se(vals: list[float]) -> dict[str, float]:
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()),
            "se": float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0}


def run(model_name: str, model_dir: Path, out: Path) -> dict:
    t0 = time.time()
    model, tok = load(str(model_dir))
    with open(SETTINGS["text"]) as f:
        ids = tok.encode(f.read())
    ids = ids[SETTINGS["start"]:SETTINGS["start"] + SETTINGS["tokens"]]
    cap, nll = capture_all(model, ids)
    layers = sorted(cap)
    _, k0, _ = cap[layers[0]]
    n_kv, d = k0.shape[0], k0.shape[-1]
    print(f"{model_name}: {len(layers)} layers x {n_kv} KV heads, head_dim {d}, "
          f"{len(ids)} tokens captured in {time.time() - t0:.0f}s, next-token NLL {nll:.3f} "
          f"(last {SETTINGS['nll_tokens']})",
          flush=True)
    sel = np.linspace(0, len(ids) - 1, SETTINGS["queries"]).astype(int)
    # per (rotation, bits, metric): one value per seed
    acc: dict[str, list[float]] = {}
    code_agree = []
    for seed in SETTINGS["seeds"]:
        sums: dict[str, list[float]] = {}
        for li in layers:
            q, k, v = cap[li]
            g = q.shape[0] // k.shape[0]
            for h in range(k.shape[0]):
                rots = rotations(d, seed, li * 1024 + h)
                kc = k[h] - k[h][:SETTINGS["centre"]].mean(0)
                vc = v[h] - v[h][:SETTINGS["centre"]].mean(0)
                qh = q[h * g:(h + 1) * g][:, sel].reshape(-1, d)
                ref = ((qh @ kc.T) ** 2).sum()
                if seed == SETTINGS["seeds"][0] and h == 0:
                    code_agree.append(check_codes_against_core(kc, rots["two"], d, 3, seed,
                                                               li * 1024 + h))
                for name, rot in rots.items():
                    ys = {"keys centred": rotate(kc, rot), "values centred": rotate(vc, rot),
                          "keys raw": rotate(k[h], rot), "values raw": rotate(v[h], rot)}
                    qr = qh @ rot.T  # scores in the rotated domain: q·(k − k̂) = Πq·(y − c)‖k‖
                    for b in SETTINGS["bits"]:
                        cb = tq.codebook(d, b)
                        for metric, (y, _) in ys.items():
                            sums.setdefault(f"{metric}|{name}|{b}", []).append(nmse(y, cb))
                        y, norm = ys["keys centred"]
                        e = residual(y, cb)[0] * norm[:, None]
                        sums.setdefault(f"score_err|{name}|{b}", []).append(
                            float(((qr @ e.T) ** 2).sum() / ref))
        for key, vals in sums.items():
            acc.setdefault(key, []).append(float(np.mean(vals)))
        # structured inputs at this head_dim, new rotations and inputs per seed
        rng = np.random.default_rng(10_000 + seed)
        rots = rotations(d, seed, 999_999)
        for fam, x in structured(d, SETTINGS["structured_n"], rng).items():
            for b in SETTINGS["bits"]:
                cb = tq.codebook(d, b)
                for name, rot in rots.items():
                    acc.setdefault(f"structured {fam}|{name}|{b}", []).append(
                        nmse(rotate(x, rot)[0], cb))
        print(f"  seed {seed} done ({time.time() - t0:.0f}s)", flush=True)
    results: dict[str, dict] = {}
    for key, vals in acc.items():
        metric, name, b = key.split("|")
        results.setdefault(metric, {}).setdefault(b, {})[name] = mean_se(vals)
    # one round relative to two, paired per seed (same D1)
    for key, vals in acc.items():
        metric, name, b = key.split("|")
        if name == "one":
            ratio = [a / c for a, c in zip(vals, acc[f"{metric}|two|{b}"])]
            results[metric][b]["one/two"] = mean_se(ratio)
    doc = {
        "model": model_name, "model_dir": str(model_dir), "head_dim": d,
        "layers": layers, "kv_heads": n_kv, "next_token_nll": nll, "settings": SETTINGS,
        "codebook_vector_distortion": {b: tq.codebook(d, b).vector_distortion
                                       for b in SETTINGS["bits"]},
        "two_round_codes_equal_core_fraction": float(np.min(code_agree)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "mlx": mx.__version__},
        "seconds": round(time.time() - t0, 1),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def print_table(doc: dict) -> None:
    print(f"\n{doc['model']} (head_dim {doc['head_dim']}), nmse mean ± s.e. over "
          f"{len(doc['settings']['seeds'])} seeds; one/two = paired ratio")
    for metric, by_bits in doc["results"].items():
        for b, row in by_bits.items():
            cells = "  ".join(f"{n}={r['mean']:.5f}±{r['se']:.5f}" for n, r in row.items()
                              if n != "one/two")
            ratio = row.get("one/two")
            print(f"  {metric:<36} {b}b  {cells}  one/two={ratio['mean']:.3f}±{ratio['se']:.3f}")


def markdown(doc: dict, metrics: tuple[str, ...]) -> str:
    """The doc's table: one row per (metric, bits), nmse ×1000 mean ± s.e., one/two ratio."""
    rows = ["| input | bits | one round H·D | two rounds (ours) | dense | one/two |",
            "|---|---|---|---|---|---|"]
    for metric in metrics:
        for b, row in doc["results"][metric].items():
            cells = " | ".join(f"{1000 * row[n]['mean']:.3f} ± {1000 * row[n]['se']:.3f}"
                               for n in ("one", "two", "dense"))
            r = row["one/two"]
            rows.append(f"| {metric} | {b} | {cells} | {r['mean']:.3f} ± {r['se']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="name used in the results file")
    ap.add_argument("--model-dir", help="mlx-lm model folder (default: turboquant.models)")
    ap.add_argument("--out", help="results JSON (default bench/results/rotation_rounds_<model>)")
    ap.add_argument("--markdown", metavar="JSON", help="print a results file as docs tables")
    args = ap.parse_args()
    if args.markdown:
        doc = json.loads(Path(args.markdown).read_text())
        real = tuple(m for m in doc["results"] if not m.startswith("structured"))
        print(markdown(doc, real) + "\n\n" + markdown(doc, tuple(
            m for m in doc["results"] if m.startswith("structured"))))
        return
    if args.model_dir:
        model_dir = Path(args.model_dir)
    elif args.model == "smollm2":
        model_dir = models.smollm2("float32")
    elif hasattr(models, args.model):
        model_dir = getattr(models, args.model)("float32")
    else:
        raise SystemExit(f"no turboquant.models.{args.model}(); pass --model-dir")
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"rotation_rounds_{args.model}.json")
    print_table(run(args.model, model_dir, out))


if __name__ == "__main__":
    main()
