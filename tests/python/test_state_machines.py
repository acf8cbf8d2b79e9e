"""Stateful property tests: random configurations of ``turboquant.KVCache`` (the C++ core) and
of the mlx-lm cache (``turboquant.mlx_lm.TurboQuantKVCache``), driven through random
interleavings of append, attention, trim, save/load and conversion, and checked after every
step against a plain reference model (state_reference.py): sizes and segment counts, byte
formulas, decoded rows, attention as the softmax over the cache's own decoded rows, byte
identical round trips, and refusals that leave the cache unchanged.

Profiles (registered in conftest.py, chosen by the environment variable
``TQ_HYPOTHESIS_PROFILE``):

- ``default``: deterministic (derandomized, no example database), bounded: 350 programs
  of the core machine and 300 of the mlx-lm one, up to 25 steps each (about 1.5 minutes on
  a 2-core machine).
- ``long``: randomized, many more and longer programs, for a run on demand::

      TQ_HYPOTHESIS_PROFILE=long PYTHONPATH=python python -m pytest \\
          tests/python/test_state_machines.py -q
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from state_reference import (
    ROLES,
    CoreConfig,
    blocks,
    fp16,
    row_cosines,
    softmax_attention,
    sparse_v_bound,
)
from turboquant import _core

PROFILE = os.environ.get("TQ_HYPOTHESIS_PROFILE", "default")
# Programs per machine and steps per program, per profile.
CORE_PROGRAMS = {"default": 350, "long": 5000}.get(PROFILE, 350)
MLX_PROGRAMS = {"default": 300, "long": 3000}.get(PROFILE, 300)
STEPS = {"default": 25, "long": 60}.get(PROFILE, 25)
ATOL = 3e-4

# --- configurations ------------------------------------------------------------------------


@st.composite
def core_configs(draw) -> CoreConfig:
    """Valid configurations of every feature the core combines (invalid combinations are
    the unit tests' business); sizes are small so that blocks fill and flush quickly."""
    d = draw(st.sampled_from([16, 16, 24, 33, 64, 256]))
    kw: dict = {}
    n_layers = draw(st.integers(1, 2))
    n_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    kw.update(n_layers=n_layers, n_kv_heads=n_kv, n_q_heads=n_kv * group,
              seed=draw(st.integers(0, 2**64 - 1)))
    bt = draw(st.sampled_from([1, 2, 3, 4, 8]))
    kw["block_tokens"] = bt
    rotations = ["auto", "dense"] + (["hadamard"] if d & (d - 1) == 0 else [])
    kw["rotation"] = draw(st.sampled_from(rotations))
    special = draw(st.sampled_from(["plain", "plain", "decay", "mixed", "evict"]))
    mse_only = special in ("decay", "mixed")
    for role in ROLES:
        m = "turboquant_mse" if mse_only else draw(st.sampled_from(
            ["turboquant_mse", "turboquant_mse", "turboquant_prod", "polar", "qjl"]))
        kw[f"{role}_method"] = m
        kw[f"{role}_bits"] = draw(st.integers(2 if mse_only else 1, 8))
    jl = [m for m in (kw["key_method"], kw["value_method"]) if m in ("turboquant_prod", "qjl")]
    if jl and draw(st.booleans()):
        kw["jl_dim"] = draw(st.integers(8, 2 * d))
        for role in ROLES:
            if kw[f"{role}_method"] == "qjl":
                kw[f"{role}_bits"] = 1  # qjl takes bits (m = bits * d) or jl_dim with 1 bit
    if draw(st.integers(0, 3)) == 0:  # outlier split
        n_o = draw(st.integers(1, min(d - 1, 12)))
        if draw(st.booleans()):
            kw["n_outlier_channels"] = n_o
        else:
            kw["outlier_channels"] = draw(st.permutations(range(d)))[:n_o]
        # a qjl sketch of jl_dim rows takes 1 bit, in either part of the split
        sketch = "qjl" in (kw["key_method"], kw["value_method"]) and kw.get("jl_dim")
        kw["outlier_bits"] = 1 if sketch else draw(st.sampled_from([0, 1, 2, 3, 4, 5, 8]))
        kw["outlier_roles"] = draw(st.sampled_from(["both", "keys", "values"]))
        kw["split_angle_bits"] = draw(st.sampled_from([8, 16]))
    if draw(st.integers(0, 3)) == 0:  # per-head (or per-layer, per-head) widths
        entries = n_kv * draw(st.sampled_from([1, n_layers]))
        lo = 2 if mse_only else 1
        for role in ROLES:
            sketch = kw[f"{role}_method"] == "qjl" and kw.get("jl_dim")  # 1 bit, m = jl_dim
            if draw(st.booleans()) and not sketch:
                kw[f"{role}_head_bits"] = draw(st.lists(st.integers(lo, 8), min_size=entries,
                                                        max_size=entries))
        if kw.get("outlier_bits", 1) != 1 and draw(st.booleans()):
            kw["outlier_head_bits"] = draw(st.lists(st.integers(0, 8), min_size=entries,
                                                    max_size=entries))
    if kw["key_method"] == kw["value_method"] == "turboquant_mse" and draw(st.booleans()):
        kw["norm_correction"] = True
    if draw(st.booleans()):
        kw["fp16_window"] = draw(st.integers(1, 12))
    if draw(st.integers(0, 2)) == 0:
        kw["fp16_sinks"] = draw(st.integers(1, 5))
    if n_layers > 1 and draw(st.integers(0, 3)) == 0:
        kw["fp16_layers"] = [draw(st.integers(0, n_layers - 1))]
    cfg = CoreConfig(d, kw)
    lows = [cfg.reference_bits(layer, h, role) for layer in range(n_layers)
            for h in range(n_kv) for role in ROLES]
    if special == "decay" and min(lows) >= 2:
        kw["decay_after"] = draw(st.integers(1, 3 * bt + 4))
        kw["decay_bits"] = draw(st.integers(1, min(lows) - 1))
    elif special == "mixed" and min(lows) >= 2:
        g = draw(st.integers(2, 3))
        kw["mixed_group_blocks"], kw["mixed_keep_blocks"] = g, draw(st.integers(1, g - 1))
        kw["decay_bits"] = draw(st.integers(1, min(lows) - 1))
        kw.setdefault("fp16_window", draw(st.integers(1, 8)))
    elif special == "evict":
        kw["max_coded_tokens"] = draw(st.integers(bt, 4 * bt))
    if draw(st.integers(0, 4)) == 0:
        kw["max_tokens"] = draw(st.integers(max(kw.get("fp16_sinks", 0), 1), 80))
    return cfg


def gaussian(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# --- the core cache ------------------------------------------------------------------------


class CoreCacheMachine(RuleBasedStateMachine):
    """``_core.KVCache`` against a reference that keeps every appended fp32 row."""

    def __init__(self):
        super().__init__()
        self.kv = None

    @initialize(cfg=core_configs(), seed=st.integers(0, 2**32 - 1))
    def build(self, cfg, seed):
        note(repr(cfg))
        self.kv = cfg.build()  # the generator draws valid configurations only
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.empty_bytes = cfg.build().memory_bytes()
        d, H = cfg.head_dim, cfg.n_kv
        # Per layer: the stored tokens' fp32 keys / values (H_kv, n, d).
        self.keys = [np.zeros((H, 0, d), np.float32) for _ in range(cfg.n_layers)]
        self.values = [np.zeros((H, 0, d), np.float32) for _ in range(cfg.n_layers)]
        self.trimmed = [False] * cfg.n_layers  # a trim since the layer was last empty
        # whether the layer's fp16 window capacity is allocated: from an append past the
        # sinks until the layer is cut back to them (a loaded layer: when it holds window rows)
        self.window_reserved = [False] * cfg.n_layers
        self.evicted = [0] * cfg.n_layers

    # --- helpers ------------------------------------------------------------------------
    def size(self, layer: int) -> int:
        return self.keys[layer].shape[1]

    def fp16_layer(self, layer: int) -> bool:
        return layer in self.cfg.fp16_layers

    def sink_base(self, layer: int) -> int:
        return 0 if self.fp16_layer(layer) else self.cfg.sinks

    def snapshot(self):
        kv = self.kv
        return (kv.to_bytes(), [kv.size(layer) for layer in range(self.cfg.n_layers)],
                kv.memory_bytes())

    def expect_unchanged(self, before, what: str):
        after = self.snapshot()
        assert after[1] == before[1], f"refused {what} changed the sizes {before[1]} -> {after[1]}"
        assert after[2] == before[2], f"refused {what} changed memory_bytes {before[2]} -> {after[2]}"
        assert after[0] == before[0], f"refused {what} changed the cache's bytes"

    def reconcile_eviction(self, layer: int):
        """Eviction drops whole code blocks right after the sinks; the count tells how many."""
        e = self.kv.evicted_tokens(layer)
        new = e - self.evicted[layer]
        assert new >= 0, f"layer {layer}: evicted_tokens went down from {self.evicted[layer]} to {e}"
        if new:
            bt, s = self.cfg.bt, self.sink_base(layer)
            assert self.cfg.evicts, f"layer {layer}: {new} tokens evicted without max_coded_tokens"
            assert new % bt == 0, f"layer {layer}: evicted {new} tokens, not whole blocks of {bt}"
            keep = np.r_[0:s, s + new:self.size(layer)]
            self.keys[layer] = self.keys[layer][:, keep]
            self.values[layer] = self.values[layer][:, keep]
        self.evicted[layer] = e

    def queries(self, T_q: int, scale: float) -> np.ndarray:
        return gaussian(self.rng, (self.cfg.n_q, T_q, self.cfg.head_dim), scale)

    def decoded(self, layer: int):
        H = self.cfg.n_kv
        K = np.stack([self.kv.decode(layer, h, "key") for h in range(H)])
        V = np.stack([self.kv.decode(layer, h, "value") for h in range(H)])
        return K, V

    # --- rules --------------------------------------------------------------------------
    @rule(data=st.data())
    def append(self, data):
        cfg = self.cfg
        layer = data.draw(st.integers(0, cfg.n_layers - 1), label="layer")
        T = data.draw(st.integers(1, 3 * cfg.bt + cfg.window + 2), label="T")
        scale = data.draw(st.sampled_from([1.0, 1.0, 0.01, 30.0]), label="scale")
        k = gaussian(self.rng, (cfg.n_kv, T, cfg.head_dim), scale)
        v = gaussian(self.rng, (cfg.n_kv, T, cfg.head_dim), scale)
        limit = cfg.get("max_tokens")
        if limit and self.size(layer) + T > limit:
            before = self.snapshot()
            with pytest.raises(ValueError, match="max_tokens"):
                self.kv.append(k, v, layer)
            self.expect_unchanged(before, "append beyond max_tokens")
            return
        rated = self.kv.rated_tokens(layer) if cfg.mixed else 0
        self.kv.append(k, v, layer)
        self.keys[layer] = np.concatenate([self.keys[layer], k], axis=1)
        self.values[layer] = np.concatenate([self.values[layer], v], axis=1)
        self.reconcile_eviction(layer)
        self.window_reserved[layer] |= self.size(layer) > self.sink_base(layer)
        if cfg.mixed and not self.fp16_layer(layer):
            # only tokens that attention calls rated flush, whole groups at a time
            w, cap = self.kv.window_tokens(layer), cfg.window + cfg.group_tokens
            assert w <= cap + self.size(layer) - rated, (
                f"layer {layer}: window of {w} > {cap} + {self.size(layer) - rated} unrated")

    @rule(data=st.data())
    def append_invalid(self, data):
        """NaN or a value no fp16 norm / row can hold: refused, nothing appended."""
        cfg = self.cfg
        layer = data.draw(st.integers(0, cfg.n_layers - 1), label="layer")
        T = data.draw(st.integers(1, 2 * cfg.bt + 1), label="T")
        k = gaussian(self.rng, (cfg.n_kv, T, cfg.head_dim))
        v = gaussian(self.rng, (cfg.n_kv, T, cfg.head_dim))
        bad = data.draw(st.sampled_from(["nan", "inf", "huge"]), label="bad")
        (k if data.draw(st.booleans(), label="in keys") else v)[
            self.rng.integers(cfg.n_kv), self.rng.integers(T), self.rng.integers(cfg.head_dim)
        ] = {"nan": np.nan, "inf": np.inf, "huge": 1e6}[bad]
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.kv.append(k, v, layer)
        self.expect_unchanged(before, f"append with {bad}")

    @rule(data=st.data())
    def attend(self, data):
        cfg = self.cfg
        layer = data.draw(st.integers(0, cfg.n_layers - 1), label="layer")
        n = self.size(layer)
        if n == 0 or data.draw(st.integers(0, 9), label="too many queries") == 0:
            before = self.snapshot()
            with pytest.raises(ValueError, match="empty" if n == 0 else "queries per head"):
                self.kv.attend(self.queries(n + 1, 1.0), layer)
            self.expect_unchanged(before, "attend of more queries than tokens")
            return
        # decode (a few rows per KV head) or prefill (GEMM path from 16 rows per KV head)
        T_q = data.draw(st.sampled_from([1, 1, 2, 3, min(n, 7), min(n, 20)]), label="T_q")
        T_q = min(T_q, n)
        causal = data.draw(st.booleans(), label="causal")
        window = data.draw(st.sampled_from([None, None, 1, 3, 9]), label="window")
        sparse = data.draw(st.sampled_from([0.0, 0.0, 0.05]), label="sparse_v")
        qscale = data.draw(st.sampled_from([1.0, 3.0]), label="query scale")
        q = self.queries(T_q, qscale)
        c = self.kv.coded_tokens(layer)
        refused = None
        if cfg.mixed and window is not None and window < n:
            refused = "sliding window"
        elif cfg.mixed and causal and c > self.sink_base(layer) and n - T_q + 1 < c:
            refused = "causal queries"
        if refused:
            before = self.snapshot()
            with pytest.raises(RuntimeError, match=refused):
                self.kv.attend(q, layer, causal=causal, window=window, sparse_v=sparse)
            self.expect_unchanged(before, "attend")
            return
        out = self.kv.attend(q, layer, causal=causal, window=window, sparse_v=sparse)
        assert out.shape == q.shape and out.dtype == np.float32, f"attend gave {out.shape} {out.dtype}"
        K, V = self.decoded(layer)
        scale = cfg.head_dim ** -0.5
        want = softmax_attention(q, K, V, causal, window, scale, cfg.n_q // cfg.n_kv)
        err = np.abs(out - want).max(axis=-1)
        tol = ATOL * max(1.0, float(np.abs(V).max()))
        if sparse:
            tol = tol + sparse_v_bound(q, K, V, causal, window, scale, cfg.n_q // cfg.n_kv, sparse)
        assert np.all(err <= tol), (
            f"layer {layer}: attention of {T_q} queries (causal={causal}, window={window}, "
            f"sparse_v={sparse}) is {err.max():.3g} from the softmax over the decoded rows")

    @rule(n=st.integers(0, 30))
    def trim(self, n):
        cfg = self.cfg
        refused = False
        for layer in range(cfg.n_layers):
            new = self.size(layer) - min(n, self.size(layer))
            c = self.kv.coded_tokens(layer)
            if cfg.mixed and new < c and new > self.sink_base(layer):
                refused |= (new - self.sink_base(layer)) % cfg.group_tokens != 0
        if refused:
            before = self.snapshot()
            with pytest.raises(RuntimeError, match="mixed-precision flush group"):
                self.kv.trim(n)
            self.expect_unchanged(before, "trim")
            return
        assert self.kv.trim(n) == min(n, self.size(0)), "trim returns what layer 0 lost"
        for layer in range(cfg.n_layers):
            m = self.size(layer) - min(n, self.size(layer))
            if m < self.size(layer):
                self.trimmed[layer] = True
            self.keys[layer] = self.keys[layer][:, :m]
            self.values[layer] = self.values[layer][:, :m]
            if m <= self.sink_base(layer):
                self.window_reserved[layer] = False
            if m == 0:
                self.trimmed[layer] = False
                self.evicted[layer] = 0

    @rule(via_file=st.booleans())
    def save_load(self, via_file):
        before = self.kv.to_bytes()
        if via_file:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "c.tqkv")
                self.kv.save(path)
                back = _core.KVCache.load(path)
        else:
            back = _core.KVCache.from_bytes(before)
        assert back.to_bytes() == before, "a loaded cache writes different bytes"
        for layer in range(self.cfg.n_layers):
            for name in ("size", "coded_tokens", "sink_tokens", "evicted_tokens", "token_bytes"):
                a, b = getattr(self.kv, name)(layer), getattr(back, name)(layer)
                assert a == b, f"layer {layer}: {name} {a} before saving, {b} after loading"
            if self.size(layer) and not self.cfg.mixed:  # mixed: attend rates tokens
                q = self.queries(min(2, self.size(layer)), 1.0)
                np.testing.assert_array_equal(back.attend(q, layer), self.kv.attend(q, layer),
                                              err_msg=f"layer {layer}: attention after load")
        assert back.memory_bytes() <= self.kv.memory_bytes(), "a loaded cache holds more memory"
        self.kv = back  # go on with the loaded cache
        self.window_reserved = [back.window_tokens(layer) > 0 for layer in range(self.cfg.n_layers)]
        self.empty_bytes = self.cfg.build().memory_bytes()

    @precondition(lambda self: self.kv is not None and not (
        self.cfg.windowed or self.cfg.decays or self.cfg.mixed or self.cfg.evicts
        or self.cfg.get("key_head_bits") or self.cfg.get("value_head_bits")
        or self.cfg.get("outlier_head_bits")))
    @rule()
    def copy_codes(self):
        """Conversion by codes: encoded() rows appended to a fresh cache of the same
        configuration give the same cache, byte for byte."""
        copy = self.cfg.build()
        for layer in range(self.cfg.n_layers):
            if self.size(layer) == 0:
                continue
            rows = {role: [self.kv.encoded(layer, h, role) for h in range(self.cfg.n_kv)]
                    for role in ROLES}
            copy.append_encoded(*(np.stack([r[i] for r in rows[role]])
                                  for role in ROLES for i in (0, 1)), layer=layer)
        assert copy.to_bytes() == self.kv.to_bytes(), "a copy by codes differs from its source"
        self.kv = copy

    @rule()
    def corrupt_file(self):
        """A flipped byte is refused by name (CRC32C or a bad field), never read blindly."""
        raw = bytearray(self.kv.to_bytes())
        raw[int(self.rng.integers(8, len(raw)))] ^= 0x20
        with pytest.raises(ValueError):
            _core.KVCache.from_bytes(bytes(raw))

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def sizes_and_segments(self):
        if self.kv is None:
            return
        cfg, kv = self.cfg, self.kv
        assert len(kv) == self.size(0), f"len {len(kv)}, reference {self.size(0)}"
        for layer in range(cfg.n_layers):
            n = self.size(layer)
            assert kv.size(layer) == n, f"layer {layer}: size {kv.size(layer)}, reference {n}"
            c, s, w = kv.coded_tokens(layer), kv.sink_tokens(layer), kv.window_tokens(layer)
            assert s + kv.code_tokens(layer) == c and c + w == n, (s, c, w, n)
            if not cfg.windowed:
                assert c == n and w == 0, f"layer {layer}: {w} window tokens without a window"
            elif self.fp16_layer(layer):
                assert c == 0 and s == 0, f"fp16 layer {layer} holds {c} coded tokens"
            else:
                assert s == min(n, cfg.sinks), f"layer {layer}: {s} sinks, want min({n}, {cfg.sinks})"
                # mixed precision: checked after appends (flushes wait for rated tokens)
                assert cfg.mixed or w <= cfg.window + cfg.bt, (
                    f"layer {layer}: window of {w} > {cfg.window} + {cfg.bt}")
            if cfg.evicts:
                assert kv.code_tokens(layer) <= cfg.get("max_coded_tokens"), "eviction overdue"
            else:
                assert kv.evicted_tokens(layer) == 0, "evicted tokens without eviction"
            if n == 0:
                assert kv.evicted_tokens(layer) == 0, "an empty layer has no evicted tokens"
            if cfg.mixed:
                assert kv.code_tokens(layer) % cfg.group_tokens == 0, "mixed codes in whole groups"

    @invariant()
    def decay_rule(self):
        if self.kv is None or not self.cfg.decays:
            return
        cfg, kv = self.cfg, self.kv
        for layer in range(cfg.n_layers):
            n, s, ct = self.size(layer), kv.sink_tokens(layer), kv.code_tokens(layer)
            # block b holds tokens [s + b·bt, s + (b+1)·bt); it decays once decay_after tokens follow
            want = sum(1 for b in range(ct // cfg.bt)
                       if n - 1 - (s + cfg.bt * b + cfg.bt - 1) >= cfg.get("decay_after"))
            for h in range(cfg.n_kv):
                for role in ROLES:
                    got = kv.decayed_blocks(layer, h, role)
                    assert got <= blocks(ct, cfg.bt), f"{got} decayed blocks of {ct} code tokens"
                    if self.trimmed[layer]:  # trimmed blocks stay decayed
                        assert got >= want, f"layer {layer}: {got} decayed blocks, want >= {want}"
                    else:
                        assert got == want, f"layer {layer} {role} {h}: {got} decayed blocks, want {want}"

    @invariant()
    def byte_formulas(self):
        if self.kv is None:
            return
        cfg, kv, d = self.cfg, self.kv, self.cfg.head_dim
        pages = 0  # bytes of code and norm pages, all layers
        exact_memory = not cfg.mixed and not cfg.fp16_layers
        windows = 0
        for layer in range(cfg.n_layers):
            ct, bt = kv.code_tokens(layer), cfg.bt
            fp16_rows = kv.sink_tokens(layer) + kv.window_tokens(layer)
            tokens = fp16_rows * 2 * d * 2 * cfg.n_kv
            if cfg.mixed:  # each group's kept-token mask, 64-bit words, per KV head
                F = cfg.group_tokens
                tokens += ct // F * -(-F // 64) * 8 * cfg.n_kv
            for h in range(cfg.n_kv):
                for role in ROLES:
                    hi, lo = cfg.row_bytes(layer, h, role), None
                    low = kv.decayed_blocks(layer, h, role) if cfg.decays or cfg.mixed else 0
                    if low:
                        lo = cfg.row_bytes(layer, h, role, low=True)
                    low_tokens = min(low * bt, ct)  # decayed blocks lead (mixed: whole groups)
                    tokens += low_tokens * (lo or 0) + (ct - low_tokens) * hi
                    nb = blocks(ct, bt)
                    pages += low * bt * (lo or 0) + (nb - low) * bt * hi
            assert kv.token_bytes(layer) == tokens, (
                f"layer {layer}: token_bytes {kv.token_bytes(layer)}, formula {tokens}")
            if cfg.windowed and not self.fp16_layer(layer):
                sink_cap = cfg.sinks * d * 2 if kv.sink_tokens(layer) else 0
                win_cap = (cfg.window + bt) * d * 2 if self.window_reserved[layer] else 0
                windows += (sink_cap + win_cap) * 2 * cfg.n_kv
        mem = kv.memory_bytes()
        if exact_memory:
            want = self.empty_bytes + pages + windows
            assert mem == want, f"memory_bytes {mem}, formula {want} (pages {pages}, fp16 {windows})"
        else:
            want = self.empty_bytes + sum(kv.token_bytes(layer) for layer in range(cfg.n_layers))
            assert mem >= want, f"memory_bytes {mem} < empty + token bytes {want}"
        fp16_want = sum(self.size(layer) for layer in range(cfg.n_layers)) * cfg.n_kv * 4 * d
        assert kv.fp16_bytes() == fp16_want, f"fp16_bytes {kv.fp16_bytes()}, formula {fp16_want}"

    @invariant()
    def decoded_rows(self):
        if self.kv is None:
            return
        cfg, kv = self.cfg, self.kv
        for layer in range(cfg.n_layers):
            n = self.size(layer)
            if n == 0:
                continue
            c, s = kv.coded_tokens(layer), kv.sink_tokens(layer)
            for h in range(cfg.n_kv):
                if cfg.mixed:  # codes stored by importance; decode() gives position order
                    pos = sorted(np.asarray(kv.mixed_positions(layer, h)).tolist())
                    assert pos == list(range(s, c)), "code positions are not a permutation"
                for role, ref in (("key", self.keys[layer][h]), ("value", self.values[layer][h])):
                    got = kv.decode(layer, h, role)
                    assert got.shape == (n, cfg.head_dim)
                    exact = np.r_[0:s, c:n]
                    np.testing.assert_array_equal(
                        got[exact], fp16(ref[exact]) if cfg.windowed else ref[exact],
                        err_msg=f"layer {layer} head {h} {role}: fp16 sink/window rows")
                    if c > s:
                        src = fp16(ref[s:c]) if cfg.windowed else ref[s:c]
                        cosv = row_cosines(got[s:c], src)
                        low = (cfg.decays or cfg.mixed) and kv.decayed_blocks(layer, h, role) > 0
                        floor = cfg.cos_floor(role, low)
                        assert cosv.mean() >= floor - 0.3 / np.sqrt(len(cosv)), (
                            f"layer {layer} head {h} {role}: decoded code rows have mean cosine "
                            f"{cosv.mean():.3f} with their inputs (floor {floor})")


CoreCacheMachine.TestCase.settings = settings(
    settings.get_profile(PROFILE), max_examples=CORE_PROGRAMS, stateful_step_count=STEPS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_core_cache_state_machine():
    run_state_machine_as_test(CoreCacheMachine, settings=CoreCacheMachine.TestCase.settings)




# --- the mlx-lm cache ----------------------------------------------------------------------


@st.composite
def mlx_options(draw) -> dict:
    """Options of turboquant.mlx_lm.TurboQuantKVCache (valid ones; the constructor's own
    refusals are unit-tested in test_mlx_lm.py / test_mlx_mixed.py)."""
    special = draw(st.sampled_from(["plain", "plain", "decay", "mixed"]))
    mse_only = special != "plain"
    opts: dict = {
        "key_bits": draw(st.integers(2 if mse_only else 1, 8)),
        "value_bits": draw(st.integers(2 if mse_only else 1, 8)),
        "seed": draw(st.integers(0, 2**32 - 1)), "layer": draw(st.integers(0, 3)),
        "center": draw(st.booleans()), "debias": draw(st.booleans()),
        "key_split": draw(st.booleans()),
        "rope_pairs": draw(st.sampled_from(["half", "adjacent", None])),
        "block_tokens": draw(st.sampled_from([1, 2, 4, 8]))}
    if not mse_only:
        opts["key_method"] = draw(st.sampled_from(
            ["turboquant_mse", "turboquant_mse", "turboquant_prod", "polar", "qjl"]))
        opts["value_method"] = draw(st.sampled_from(["turboquant_mse", "polar", "turboquant_prod"]))
    if draw(st.booleans()):
        opts["fp16_window"] = draw(st.integers(1, 10))
    if draw(st.integers(0, 2)) == 0:
        opts["fp16_sinks"] = draw(st.integers(1, 4))
    shape = draw(st.sampled_from([(1, 1, 16), (2, 2, 16), (2, 1, 32), (1, 3, 24), (2, 2, 64)]))
    if draw(st.integers(0, 3)) == 0:  # per-KV-head widths (a calibrated profile)
        for role in ("key", "value"):
            if draw(st.booleans()):
                opts[f"{role}_head_bits"] = draw(st.lists(
                    st.integers(2 if mse_only else 1, 8), min_size=shape[0], max_size=shape[0]))
    lo = min(min(opts.get("key_head_bits", [opts["key_bits"]])),
             min(opts.get("value_head_bits", [opts["value_bits"]])))
    if special == "decay":
        opts["decay_after"] = draw(st.integers(1, 20))
        opts["decay_bits"] = draw(st.integers(1, lo - 1))
    elif special == "mixed":
        opts["mixed_bits"] = draw(st.integers(1, lo - 1))
        opts["mixed_keep"] = draw(st.sampled_from([0.5, 0.25, 0.75, 1 / 3]))
        opts.setdefault("fp16_window", draw(st.integers(1, 8)))
    if draw(st.integers(0, 4)) == 0:
        opts["sparse_v"] = draw(st.sampled_from([0.01, 0.1]))
    return opts, shape


class MlxCacheMachine(RuleBasedStateMachine):
    """The mlx-lm cache protocol (update_and_fetch, attention through the installed
    scaled_dot_product_attention route, trim, state / from_state, prompt-cache files,
    conversion from mlx-lm's KVCache) against the fp32 rows it was given."""

    def __init__(self):
        super().__init__()
        self.cache = None

    @initialize(options=mlx_options(), convert=st.sampled_from([0, 0, 1, 2]),
                seed=st.integers(0, 2**32 - 1), prefill=st.integers(1, 12))
    def build(self, options, convert, seed, prefill):
        from mlx_lm.models import cache as mlx_cache
        from turboquant import mlx_lm as tq_mlx

        opts, shape = options
        note(f"TurboQuantKVCache(**{opts!r}), (H_kv, group, d) = {shape}, convert={convert}")
        self.mx, self.tq_mlx = mlx_cache.mx, tq_mlx
        self.H, self.group, self.d = shape
        self.opts = opts
        self.rng = np.random.default_rng(seed)
        self.keys = np.zeros((self.H, 0, self.d), np.float32)
        self.values = np.zeros((self.H, 0, self.d), np.float32)
        if convert:  # mlx-lm's fp16 cache holding a prompt, converted
            base = mlx_cache.KVCache()
            k, v = self.tokens(prefill)
            base.update_and_fetch(self.mx.array(k[None]), self.mx.array(v[None]))
            self.keys, self.values = k, v
            n_q = self.H * self.group if convert == 2 else None
            self.cache = tq_mlx.to_turbo_quantized(base, n_q_heads=n_q, **opts)
            if n_q is None:
                assert self.cache._core is None and not self.cache.empty(), "tokens wait for n_q"
        else:
            self.cache = tq_mlx.TurboQuantKVCache(**opts)
            assert self.cache.empty() and self.cache.nbytes == 0, "a new cache holds nothing"

    def tokens(self, T: int):
        return (gaussian(self.rng, (self.H, T, self.d)),
                gaussian(self.rng, (self.H, T, self.d)))

    @property
    def n(self) -> int:
        return self.keys.shape[1]

    def fingerprint(self):
        c = self.cache
        core = c._core.to_bytes() if c._core is not None else None
        pending = [(k.tobytes(), v.tobytes()) for k, v in c._pending]
        return c.offset, c.nbytes, core, pending

    # --- rules --------------------------------------------------------------------------
    @rule(data=st.data())
    def step(self, data):
        """One forward step of a layer: update_and_fetch, then attention of the step's
        queries through mlx-lm's scaled_dot_product_attention (routed to the codes)."""
        from mlx_lm.models import base

        mx = self.mx
        T = data.draw(st.sampled_from([1, 1, 1, 2, 5, 17]), label="T")
        window = data.draw(st.sampled_from([None, None, None, 2, 6]), label="window")
        k, v = self.tokens(T)
        kp, vp = self.cache.update_and_fetch(mx.array(k[None]), mx.array(v[None]))
        self.keys = np.concatenate([self.keys, k], axis=1)
        self.values = np.concatenate([self.values, v], axis=1)
        assert kp.shape == (1, self.H, self.n, self.d), f"placeholder shape {kp.shape}"
        q = gaussian(self.rng, (self.H * self.group, T, self.d), 2.0)
        if window is not None:
            mask = mlx_cache_mask(T, self.n - T, window)
        else:
            mask = "causal" if T > 1 else None
        scale = self.d ** -0.5
        if self.opts.get("mixed_bits") and window is not None and window < self.n:
            before = self.fingerprint()
            with pytest.raises(RuntimeError, match="sliding window"):
                base.scaled_dot_product_attention(mx.array(q[None]), kp, vp, cache=self.cache,
                                                  scale=scale, mask=mask)
            if self.cache._core is not None and before[2] is not None:
                assert self.fingerprint() == before, "a refused attention changed the cache"
            return
        # A short block that makes the window flush is attended in two parts (see
        # TurboQuantKVCache._append_new): its first j queries see the rows held before the
        # flush (the core holds only those until the attention call), the others after it.
        j = self.cache._held[2] if self.cache._held is not None else 0
        parts = [(0, j, self.decoded())] if j else []
        # A mixed layer flushes the groups its queries rated right after the attention call:
        # the rows the call saw are the ones held just before that flush.
        seen = []
        flush = self.cache._flush_rated
        self.cache._flush_rated = lambda: (seen.append(self.decoded()), flush())
        try:
            out = base.scaled_dot_product_attention(mx.array(q[None]), kp, vp, cache=self.cache,
                                                    scale=scale, mask=mask)
        finally:
            del self.cache._flush_rated
        out = np.array(out[0].astype(mx.float32))
        assert self.cache._held is None, "the held tokens were appended at the attention call"
        K, V = seen[0] if seen else self.decoded()
        parts.append((j, T, (K, V)))
        w = window if window is not None and window < self.n else None
        want = np.concatenate([softmax_attention(q[:, a:b], Ka, Va, True, w, scale, self.group)
                               for a, b, (Ka, Va) in parts], axis=1)
        err = np.abs(out - want).max(axis=-1)
        tol = ATOL * max(1.0, float(np.abs(V).max()))
        if self.opts.get("sparse_v"):  # decode steps and the fp16 window skip small weights
            # of the values the core holds (centred: the mean is added back after the sum)
            vm = 0 if self.cache._v_mean is None else self.cache._v_mean
            tol = tol + np.concatenate([
                sparse_v_bound(q[:, a:b], Ka, Va - vm, True, w, scale, self.group,
                               self.opts["sparse_v"]) for a, b, (Ka, Va) in parts], axis=1)
        assert np.all(err <= tol), (f"attention of {T} queries (window {window}) is "
                                    f"{err.max():.3g} from the softmax over the decoded rows")

    @rule(n=st.integers(0, 12))
    def trim(self, n):
        c = self.cache
        assert c.is_trimmable(), "the cache is trimmable"
        before = self.fingerprint()
        if c._core is not None and self.opts.get("mixed_bits"):
            core = c._core
            new = self.n - min(n, self.n)
            cut = core.coded_tokens(0)
            sinks = core.fp16_sinks
            F = core.mixed_group_blocks * core.block_tokens
            if sinks < new < cut and (new - sinks) % F:
                with pytest.raises(RuntimeError, match="mixed-precision flush group"):
                    c.trim(n)
                assert self.fingerprint() == before, "a refused trim changed the cache"
                return
        assert c.trim(n) == min(n, self.n)
        m = self.n - min(n, self.n)
        self.keys, self.values = self.keys[:, :m], self.values[:, :m]

    @rule(via_file=st.booleans())
    def state_round_trip(self, via_file):
        from mlx_lm.models import cache as mlx_cache

        c = self.cache
        if c._core is None and c._pending:
            before = self.fingerprint()
            with pytest.raises(ValueError, match="query head count"):
                c.state  # noqa: B018 - the property refuses
            assert self.fingerprint() == before, "a refused state changed the cache"
            return
        if via_file:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "p.safetensors")
                mlx_cache.save_prompt_cache(path, [c])
                back = mlx_cache.load_prompt_cache(path)[0]
        else:
            back = type(c).from_state(c.state)
        assert type(back) is type(c) and back.offset == c.offset == self.n, (
            f"restored {type(back).__name__} at offset {back.offset}, want {self.n}")
        # a loaded core holds no unused page or window capacity
        assert back.nbytes <= c.nbytes, f"nbytes {c.nbytes} before, {back.nbytes} after"
        if c._core is not None:
            assert back._core.to_bytes() == c._core.to_bytes(), "the core's bytes changed"
        self.cache = back

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def sizes_and_bytes(self):
        c = self.cache
        if c is None:
            return
        assert c.size() == c.offset == self.n, f"size {c.size()}, offset {c.offset}, ref {self.n}"
        pending = sum(k.nbytes + v.nbytes for k, v in c._pending)
        # the centring means and the key split's channel order are held too
        side = sum(int(np.asarray(a).nbytes) for a in (c._k_mean, c._v_mean, c._perm)
                   if a is not None)
        # and the fp16 rows of the last flushed block, kept to undo the flush on a trim
        if c._unflush is not None:
            side += c._unflush[1].nbytes + c._unflush[2].nbytes
        want = (c._core.memory_bytes() if c._core is not None else 0) + pending + side
        assert c.nbytes == want, f"nbytes {c.nbytes}, core + pending + means/order {want}"
        if c._core is not None:
            assert c._core.size(0) == self.n, f"core holds {c._core.size(0)} of {self.n}"
            assert c.fp16_nbytes == self.n * self.H * 2 * self.d * 2, f"fp16_nbytes {c.fp16_nbytes}"
        else:
            assert sum(k.shape[1] for k, _ in c._pending) == self.n

    def decoded(self):
        """The cache's decoded rows in the caller's space (channel order and means undone)."""
        c = self.cache
        K = np.stack([c._core.decode(0, h, "key") for h in range(self.H)])
        V = np.stack([c._core.decode(0, h, "value") for h in range(self.H)])
        if c._perm is not None:
            K = np.stack([K[h][:, np.argsort(c._perm[h])] for h in range(self.H)])
        if c._k_mean is not None:
            K, V = K + c._k_mean, V + c._v_mean
        return K, V

    @invariant()
    def decoded_rows(self):
        c = self.cache
        if c is None or c._core is None or self.n == 0:
            return
        K, V = self.decoded()
        core = c._core
        s, cd = core.sink_tokens(0), core.coded_tokens(0)
        for name, got, ref in (("key", K, self.keys), ("value", V, self.values)):
            exact = np.r_[0:s, cd:self.n]
            np.testing.assert_allclose(got[:, exact], ref[:, exact], atol=3e-3, rtol=2e-3,
                                       err_msg=f"fp16 sink/window {name} rows")
            if cd > s:
                cosv = row_cosines(got[:, s:cd], ref[:, s:cd])
                assert cosv.mean() >= 0.3, (
                    f"decoded {name} code rows have mean cosine {cosv.mean():.3f} with their inputs")


def mlx_cache_mask(T: int, offset: int, window: int):
    from mlx_lm.models import cache as mlx_cache

    return mlx_cache.create_attention_mask(T, offset, True, window)


MlxCacheMachine.TestCase.settings = settings(
    settings.get_profile(PROFILE), max_examples=MLX_PROGRAMS, stateful_step_count=STEPS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_mlx_lm_cache_state_machine():
    pytest.importorskip("mlx_lm")
    run_state_machine_as_test(MlxCacheMachine, settings=MlxCacheMachine.TestCase.settings)



# --- failing examples found by the machines, kept as plain regression tests ----------------


@pytest.mark.parametrize("sinks", [0, 3])
def test_trim_back_to_the_sinks_releases_the_window(sinks):
    """A layer without codes cut back to its sinks (or emptied) gives its fp16 window's
    capacity back, as a layer holding codes does: memory_bytes follows the stored tokens."""
    cfg = CoreConfig(16, {"block_tokens": 1, "fp16_window": 1, "fp16_sinks": sinks})
    kv, empty = cfg.build(), cfg.build().memory_bytes()
    rng = np.random.default_rng(0)
    kv.append(gaussian(rng, (1, sinks + 2, 16)), gaussian(rng, (1, sinks + 2, 16)))
    assert (kv.code_tokens(0), kv.window_tokens(0)) == (0, 2)
    kv.trim(2)
    sink_rows = 2 * sinks * 16 * 2  # keys and values, fp16
    assert kv.memory_bytes() == empty + sink_rows, "the window's capacity outlived its rows"


def test_trimmed_pending_tokens_are_encoded_at_the_first_attention():
    """A converted cache trimmed before its first attention call (its tokens still pending)
    keeps them C-contiguous, so building the core accepts them."""
    from mlx_lm.models import base
    from mlx_lm.models import cache as mlx_cache
    from turboquant import mlx_lm as tq_mlx

    mx = mlx_cache.mx
    rng = np.random.default_rng(0)
    fp = mlx_cache.KVCache()
    k, v = gaussian(rng, (1, 2, 5, 16)), gaussian(rng, (1, 2, 5, 16))
    fp.update_and_fetch(mx.array(k), mx.array(v))
    cache = tq_mlx.to_turbo_quantized(fp, key_bits=4, value_bits=4, center=False)
    assert cache.trim(2) == 2 and cache.size() == 3
    kp, vp = cache.update_and_fetch(mx.array(k[:, :, :1]), mx.array(v[:, :, :1]))
    q = mx.array(gaussian(rng, (1, 4, 1, 16)))
    out = base.scaled_dot_product_attention(q, kp, vp, cache=cache, scale=0.25, mask=None)
    assert out.shape == (1, 4, 1, 16) and cache._core.size(0) == 4


@pytest.mark.parametrize("outliers", [0, 1])
def test_per_layer_head_widths_decay_with_their_own_layers_widths(outliers):
    """Temporal decay of a per-layer, per-head width list: a head whose width differs from
    layer 0's decays as in a cache holding that layer's list (its codes stay its tokens)."""
    common = {"n_layers": 2, "n_kv_heads": 2, "n_q_heads": 2, "key_bits": 2, "block_tokens": 1,
              "decay_after": 1, "decay_bits": 1, "n_outlier_channels": outliers}
    per_layer = _core.KVCache(64, value_head_bits=[2, 2, 2, 3], **common)
    layer_one = _core.KVCache(64, value_head_bits=[2, 3], **common)
    rng = np.random.default_rng(0)
    k, v = gaussian(rng, (2, 30, 64)), gaussian(rng, (2, 30, 64))
    for kv in (per_layer, layer_one):
        kv.append(k, v, 1)
    got = per_layer.decode(1, 1, "value")
    assert per_layer.decayed_blocks(1, 1, "value") > 0
    np.testing.assert_array_equal(got, layer_one.decode(1, 1, "value"))
    assert row_cosines(got[:-2], v[1, :-2]).mean() > 0.7, "decayed rows are not their tokens"


def test_key_split_with_per_head_widths_ignores_an_unsplittable_key_bits():
    """key_bits=1 beside per-head key widths of 2 bits: the key split uses the heads' widths
    (the core's base widths must still be valid ones)."""
    from mlx_lm.models import cache as mlx_cache
    from turboquant import mlx_lm as tq_mlx

    mx = mlx_cache.mx
    rng = np.random.default_rng(0)
    fp = mlx_cache.KVCache()
    k, v = gaussian(rng, (1, 1, 6, 16)), gaussian(rng, (1, 1, 6, 16))
    fp.update_and_fetch(mx.array(k), mx.array(v))
    cache = tq_mlx.to_turbo_quantized(fp, key_bits=1, value_bits=1, key_head_bits=[2],
                                      n_q_heads=1)
    core = cache._core
    assert (core.key_head_bits, core.outlier_head_bits) == ([1], [3]) and core.size(0) == 6


def test_a_flush_inside_a_step_longer_than_the_window_can_be_undone():
    """A step whose tokens flush a block that ends inside the step (window 1 token, blocks
    of 8: 5 tokens held, 5 more come) keeps that block's rows from the new tokens, and a
    trim back before the flush point gives what one-token steps give."""
    import mlx.core as mx
    from turboquant import mlx_lm as tq_mlx
    rng = np.random.default_rng(0)
    kw = dict(key_bits=2, value_bits=2, fp16_window=1, block_tokens=8, center=False,
              debias=False)
    a, b = tq_mlx.TurboQuantKVCache(**kw), tq_mlx.TurboQuantKVCache(**kw)
    k, v = gaussian(rng, (1, 1, 10, 16)), gaussian(rng, (1, 1, 10, 16))
    q = mx.array(gaussian(rng, (1, 2, 1, 16)))
    for c in (a, b):
        c.update_and_fetch(mx.array(k[:, :, :5]), mx.array(v[:, :, :5]))
        c.attend(q, scale=0.25)
    a.update_and_fetch(mx.array(k[:, :, 5:]), mx.array(v[:, :, 5:]))  # flushes at token 10
    a.attend(mx.array(gaussian(rng, (1, 2, 5, 16))), scale=0.25)
    assert a._unflush is not None, "the flush of a block ending inside the step was not kept"
    a.trim(3)
    b.update_and_fetch(mx.array(k[:, :, 5:7]), mx.array(v[:, :, 5:7]))  # no flush: 7 tokens
    b.attend(q, scale=0.25)
    assert a.offset == b.offset == 7
    assert (a._core.coded_tokens(0), a._core.window_tokens(0)) == \
        (b._core.coded_tokens(0), b._core.window_tokens(0))
    assert np.array_equal(np.asarray(a.attend(q, scale=0.25)), np.asarray(b.attend(q, scale=0.25)))


def test_a_restored_mixed_layer_keeps_its_widths():
    """A layer restored from its state (mixed_trial given at construction) has no trial
    left to run: the widths it was saved with stay."""
    import mlx.core as mx
    from turboquant import mlx_lm as tq_mlx
    rng = np.random.default_rng(1)
    c = tq_mlx.TurboQuantKVCache(key_bits=1, value_bits=1, block_tokens=1, center=False,
                                 debias=False)
    c.update_and_fetch(mx.array(gaussian(rng, (1, 1, 3, 16))),
                       mx.array(gaussian(rng, (1, 1, 3, 16))))
    c.attend(mx.array(gaussian(rng, (1, 1, 1, 16))), scale=0.25)
    r = tq_mlx.TurboQuantKVCache(key_bits=4, value_bits=4, mixed_bits=2, mixed_keep=0.5,
                                 fp16_window=4, mixed_trial=True)
    r.state, r.meta_state = c.state, c.meta_state
    assert r.mixed_trial is False and (r.key_bits, r.value_bits) == (1, 1)
    r.update_and_fetch(mx.array(gaussian(rng, (1, 1, 1, 16))),
                       mx.array(gaussian(rng, (1, 1, 1, 16))))
    r.attend(mx.array(gaussian(rng, (1, 1, 1, 16))), scale=0.25)
    assert r.offset == 4
