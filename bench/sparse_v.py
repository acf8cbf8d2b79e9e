"""Sparse V: speed-up and output error of AttentionOptions::sparse_v_threshold on the decode
path of the C++ attention (one query position per head), in one run over two workloads:

* ``smollm2`` (d=64, 9 query / 3 KV heads, GQA 3): real post-RoPE queries, keys and values
  of SmolLM2-135M (all 30 layers) for one decode step after a ``--tokens``-token prefix of
  ``--text``: the peaked attention of a trained model. Computed by a NumPy forward pass of
  the model (mlx on a Linux CPU needs minutes for 512 tokens; ``--check-mlx`` compares the
  two on a short prefix), optionally kept in ``--capture FILE``.
* ``gauss`` (d=128, 8 query / 2 KV heads, GQA 4, ``--gauss-layers`` layers): N(0, 1) keys and
  values, queries N(0, s²) with s = ``--query-scale`` (s > 1 mimics peaked attention).

Keys and values are ``--bits``-bit turboquant_mse codes (pages of 256 tokens, no fp16
window). For each threshold: median time of one attend per layer, summed over layers
(``--repeats`` rounds, thresholds interleaved so load changes hit every setting alike) and
the speed-up against threshold 0 (dense); ``rows kept``: the fraction of value rows the sum
still decodes, counted exactly as the C++ does (a row is skipped when every query head of its
KV head weights it below threshold × that head's running maximum, page by page); ``pages
skipped``: pages with no kept row (only their key scores cost); ``q-tok <thr``: (query head,
token) weights below threshold × the final maximum; ``rel err``: ‖o_sparse - o_dense‖ /
‖o_dense‖ over all outputs, and ``max|err|``; ``dense vs fp32``: the same relative error of
dense attention on the codes against fp32 attention on the original rows (the quantization
error that sparse V adds to).

    PYTHONPATH=python python bench/sparse_v.py [--tokens 4096] [--repeats 20] [--threads 1]
        [--thresholds 0,0.001,0.01,0.05] [--query-scale 3] [--workloads smollm2,gauss]
        [--model DIR] [--text FILE] [--capture FILE.npz] [--check-mlx] [--what-if]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

import turboquant as tq
from turboquant import _core
from turboquant._atomic import atomic_write

TEXT = "/usr/share/common-licenses/GPL-3"
PAGE = 256  # block_tokens of the caches built here (the core's default)


def smollm2_forward(model_dir: str, ids: list[int]):
    """SmolLM2 (Llama) forward pass in NumPy (BLAS matmuls: much faster than mlx on a Linux
    CPU) over `ids`; returns the post-RoPE queries of the LAST position (L, Hq, 1, d) and the
    post-RoPE keys and values of every position (L, Hkv, n, d), float32."""
    import json
    from safetensors.numpy import load_file
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    w = load_file(str(Path(model_dir) / "model.safetensors"))
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta, g = cfg["rms_norm_eps"], cfg["rope_theta"], hq // hkv
    n = len(ids)
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rope(x):  # (H, n, d), rotate-half (rope_traditional = False)
        a, b = x[..., :d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def rms(x, weight):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps).astype(np.float32) * weight

    x = w["model.embed_tokens.weight"][ids]
    qs, ks, vs = [], [], []
    causal = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, hq, d).transpose(1, 0, 2))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, hkv, d).transpose(1, 0, 2))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, hkv, d).transpose(1, 0, 2)
        qs.append(q[:, -1:])
        ks.append(k)
        vs.append(v)
        o = np.empty((n, hq, d), np.float32)
        for head in range(hq):
            s = q[head] @ k[head // g].T / np.float32(np.sqrt(d)) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            o[:, head] = (s @ v[head // g]) / s.sum(-1, keepdims=True)
        x = x + o.reshape(n, hq * d) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return np.stack(qs), np.stack(ks), np.stack(vs)


def check_against_mlx(model_dir: str, ids: list[int]) -> float:
    """Largest relative difference of the NumPy forward's last-position queries and all
    keys/values against mlx-lm's own (post-RoPE, from its KV cache) on a short prefix."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models import cache as mlx_cache
    mx.set_default_device(mx.cpu)
    model, _ = load(model_dir)
    module = sys.modules[type(model.layers[0].self_attn).__module__]
    original, seen = module.scaled_dot_product_attention, []

    def recording(queries, keys, values, *a, **k):
        seen.append(np.array(queries[0, :, -1:].astype(mx.float32)))
        return original(queries, keys, values, *a, **k)

    cache = mlx_cache.make_prompt_cache(model)
    module.scaled_dot_product_attention = recording
    try:
        mx.eval(model(mx.array([ids]), cache=cache))
    finally:
        module.scaled_dot_product_attention = original
    q, k, v = smollm2_forward(model_dir, ids)
    worst = 0.0
    for l, c in enumerate(cache):
        ck, cv = (np.array(t[0, :, :len(ids)].astype(mx.float32)) for t in (c.keys, c.values))
        for a, b in ((seen[l], q[l]), (ck, k[l]), (cv, v[l])):
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def capture_smollm2(model_dir: str, text: str, tokens: int):
    """Queries of one decode step after a `tokens`-token prefix of `text` (L, Hq, 1, d) and
    the keys/values it attends to (L, Hkv, tokens + 1, d)."""
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(Path(text).read_text()).ids
    if len(ids) < tokens + 1:
        raise SystemExit(f"{text}: {len(ids)} tokens, need {tokens + 1}")
    return smollm2_forward(model_dir, ids[:tokens + 1])


def gaussian_workload(layers: int, tokens: int, query_scale: float, seed: int = 0):
    d, hq, hkv = 128, 8, 2
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((layers, hkv, tokens, d), dtype=np.float32)
    v = rng.standard_normal((layers, hkv, tokens, d), dtype=np.float32)
    q = query_scale * rng.standard_normal((layers, hq, 1, d), dtype=np.float32)
    return q, k, v


def softmax_weights(q: np.ndarray, K: np.ndarray) -> np.ndarray:
    """exp(s - max) of each query row (rows × tokens), s = q·k / sqrt(d), in float64."""
    s = q.astype(np.float64) @ K.astype(np.float64).T / np.sqrt(K.shape[1])
    return np.exp(s - s.max(axis=1, keepdims=True)), s


def kept_rows(s: np.ndarray, thr: float) -> tuple[int, int, int]:
    """(kept value rows, pages with none kept, pages) as the C++ decides: per page, weights
    exp(s - running max) of each row (the max over the pages so far), a token kept when some
    row's weight is >= thr. s: G × n raw scaled scores of one KV head's rows."""
    n = s.shape[1]
    run = np.full(s.shape[0], -np.inf)
    kept = empty = pages = 0
    for p0 in range(0, n, PAGE):
        page = s[:, p0:p0 + PAGE]
        run = np.maximum(run, page.max(axis=1))
        keep = (np.exp(page - run[:, None]) >= thr).any(axis=0)
        kept += int(keep.sum())
        empty += int(not keep.any())
        pages += 1
    return kept, empty, pages


def run_workload(name: str, q, k, v, bits: int, thresholds, repeats: int) -> None:
    L, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    kv = _core.KVCache(d, n_layers=L, n_q_heads=hq, n_kv_heads=hkv, key_bits=bits, value_bits=bits, seed=1,
                       block_tokens=PAGE)
    for l in range(L):
        kv.append(np.ascontiguousarray(k[l]), np.ascontiguousarray(v[l]), layer=l)
    dense = [kv.attend(np.ascontiguousarray(q[l]), layer=l) for l in range(L)]
    # fp32 attention on the original rows, and the weights/scores on the codes' keys.
    exact, scores = [], []
    for l in range(L):
        o = np.empty((hq, 1, d))
        for h in range(hkv):
            K = kv.decode(l, h, "key")
            qs = q[l, h * g:(h + 1) * g, 0]
            scores.append(softmax_weights(qs, K)[1])
            p, _ = softmax_weights(qs, k[l, h])
            o[h * g:(h + 1) * g, 0] = (p / p.sum(axis=1, keepdims=True)) @ v[l, h].astype(np.float64)
        exact.append(o)
    dn = np.concatenate([x.ravel() for x in dense]).astype(np.float64)
    ex = np.concatenate([x.ravel() for x in exact])
    print(f"\n[{name}] layers={L} tokens={n} head_dim={d} heads={hq}/{hkv} (GQA {g}) bits={bits}/{bits} "
          f"pages of {PAGE}; dense vs fp32 rel err {np.linalg.norm(dn - ex) / np.linalg.norm(ex):.2e}")
    times = {t: [] for t in thresholds}
    qs = [np.ascontiguousarray(q[l]) for l in range(L)]
    for _ in range(repeats):
        for t in thresholds:
            total = 0.0
            for l in range(L):
                t0 = time.perf_counter()
                kv.attend(qs[l], layer=l, sparse_v=t)
                total += time.perf_counter() - t0
            times[t].append(total)
    base = float(np.median(times[thresholds[0]]))
    print(f"{'thresh':>7} {'ms/step':>8} {'speed-up':>8} {'rows kept':>9} {'pages skipped':>13} "
          f"{'q-tok <thr':>10} {'rel err':>8} {'max|err|':>9}")
    for t in thresholds:
        out = np.concatenate([kv.attend(qs[l], layer=l, sparse_v=t).ravel() for l in range(L)]).astype(np.float64)
        ms = float(np.median(times[t]))
        kept = empty = pages = below = 0
        for s in scores:
            if t > 0:
                a, b, c = kept_rows(s, t)
            else:
                a, b, c = s.shape[1], 0, -(-s.shape[1] // PAGE)
            kept, empty, pages = kept + a, empty + b, pages + c
            below += int((np.exp(s - s.max(axis=1, keepdims=True)) < t).sum())
        rows = sum(s.shape[1] for s in scores)
        qtok = sum(s.size for s in scores)
        rel = np.linalg.norm(out - dn) / np.linalg.norm(dn)
        print(f"{t:>7g} {1e3 * ms:>8.3f} {base / ms:>7.2f}x {kept / rows:>9.1%} {empty / pages:>13.1%} "
              f"{below / qtok:>10.1%} {rel:>8.2e} {np.abs(out - dn).max():>9.2e}")


def skipped_mass_study(q, k, v, thresholds) -> None:
    """What-if on the fp32 rows (no codes): relative error of three ways to treat the rows a
    threshold drops (per query head, weight < thr × its max): drop them (what the core does:
    the mass stays in the normalisation), renormalise over the kept mass, or add each page's
    dropped mass times the page's mean value row (needs a per-page value sum in the cache)."""
    L, hq, _, d = q.shape
    g = hq // k.shape[1]
    print(f"\n[what-if, fp32 rows] relative error of the dropped-row treatments")
    print(f"{'thresh':>7} {'drop':>9} {'renorm':>9} {'page mean':>9}")
    for thr in thresholds:
        if thr <= 0:
            continue
        num, den = np.zeros(3), 0.0
        for l in range(L):
            for h in range(hq):
                K, V = k[l, h // g].astype(np.float64), v[l, h // g].astype(np.float64)
                s = K @ q[l, h, 0].astype(np.float64) / np.sqrt(d)
                p = np.exp(s - s.max())
                z = p.sum()
                o = p @ V / z
                pk = p * (p >= thr)
                drop = pk @ V / z
                comp = drop.copy()
                for p0 in range(0, len(p), PAGE):
                    comp += (p[p0:p0 + PAGE] - pk[p0:p0 + PAGE]).sum() / z * V[p0:p0 + PAGE].mean(axis=0)
                for i, x in enumerate((drop, pk @ V / pk.sum(), comp)):
                    num[i] += ((x - o) ** 2).sum()
                den += (o ** 2).sum()
        e = np.sqrt(num / den)
        print(f"{thr:>7g} {e[0]:>9.2e} {e[1]:>9.2e} {e[2]:>9.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="cached tokens (the prefix length)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--thresholds", default="0,0.001,0.01,0.05")
    ap.add_argument("--bits", type=int, default=3, help="key and value bits (turboquant_mse)")
    ap.add_argument("--threads", type=int, default=1, help="core thread pool size while timing")
    ap.add_argument("--workloads", default="smollm2,gauss")
    ap.add_argument("--model", default=None,
                    help="mlx-lm SmolLM2 directory (default: turboquant.models.smollm2('float32'), "
                         "fetched and converted on first use)")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--query-scale", type=float, default=3.0,
                    help="gauss: queries N(0, s^2); s > 1 gives the peaked attention of trained models")
    ap.add_argument("--gauss-layers", type=int, default=8)
    ap.add_argument("--check-mlx", action="store_true",
                    help="first compare the NumPy SmolLM2 forward with mlx-lm on a 12-token prefix")
    ap.add_argument("--what-if", action="store_true",
                    help="smollm2: also the error of renormalising / page-mean compensation (fp32 rows)")
    ap.add_argument("--capture", help="smollm2: .npz of the captured q/k/v; written if absent, read if present "
                                      "(the capture takes minutes on a busy CPU)")
    args = ap.parse_args()
    if args.model is None and ("smollm2" in args.workloads or args.check_mlx):
        from turboquant import models
        args.model = str(models.smollm2("float32"))
    thresholds = [float(x) for x in args.thresholds.split(",")]
    if thresholds[0] != 0.0:
        thresholds.insert(0, 0.0)
    tq.set_num_threads(args.threads)
    info = tq.build_info()
    print(f"simd={info['simd_targets_available']} threads={args.threads} repeats={args.repeats} "
          f"thresholds={thresholds}")
    if args.check_mlx:
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json")).encode(Path(args.text).read_text()).ids
        print(f"NumPy forward vs mlx-lm, 12 tokens: max relative difference of q/k/v "
              f"{check_against_mlx(args.model, ids[:12]):.1e}")
    for w in args.workloads.split(","):
        if w == "smollm2":
            if args.capture and Path(args.capture).exists():
                z = np.load(args.capture)
                q, k, v = z["q"], z["k"], z["v"]
                if k.shape[2] != args.tokens + 1:
                    raise SystemExit(f"{args.capture} holds {k.shape[2] - 1} tokens, not --tokens {args.tokens}")
                print(f"SmolLM2 decode step after {args.tokens} tokens, read from {args.capture}")
            else:
                t0 = time.perf_counter()
                q, k, v = capture_smollm2(args.model, args.text, args.tokens)
                print(f"captured SmolLM2 decode step after {args.tokens} tokens of {args.text} "
                      f"in {time.perf_counter() - t0:.0f} s")
                if args.capture:
                    out = args.capture if args.capture.endswith(".npz") else args.capture + ".npz"
                    with atomic_write(out) as f:  # np.savez's own name rule, crash-safe
                        np.savez(f, q=q, k=k, v=v)
            run_workload("smollm2 real", q, k, v, args.bits, thresholds, args.repeats)
            if args.what_if:
                skipped_mass_study(q, k, v, thresholds)
        elif w == "gauss":
            q, k, v = gaussian_workload(args.gauss_layers, args.tokens + 1, args.query_scale)
            run_workload(f"gauss query_scale={args.query_scale:g}", q, k, v, args.bits, thresholds, args.repeats)
        else:
            raise SystemExit(f"unknown workload {w!r} (smollm2, gauss)")


if __name__ == "__main__":
    main()
