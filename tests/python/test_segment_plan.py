"""The core's segment plans (``_core.SegmentPlan``, cpp/include/turboquant/cache/segment_plan.h)
against what the C++ KVCache does: random programs of appends, attention calls and trims
(tests/cpp/test_segment_plan.cpp adds truncations), each step's plan compared with the sizes
of every layer's segments after it (sinks, codes, window, rated tokens); and the mlx store
(turboquant.mlx_metal.MetalCodeStore, on the reference kernels), which applies the same plans,
against the core. Deliberately wrong rules are caught by the same checks."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from turboquant import _core

D = 16  # head_dim


@st.composite
def configs(draw) -> dict:
    """Cache configurations of every segment layout: unwindowed, window, sinks, fp16 layers,
    mixed precision."""
    bt = draw(st.sampled_from([2, 4, 8]))
    cfg = dict(n_layers=draw(st.integers(1, 2)), n_q_heads=2, n_kv_heads=1, key_bits=4,
               value_bits=4, seed=3, block_tokens=bt,
               fp16_window=draw(st.sampled_from([0, 1, 3, 5, 8])),
               fp16_sinks=draw(st.sampled_from([0, 1, 3])))
    if cfg["fp16_window"] and draw(st.booleans()):
        R = draw(st.integers(2, 3))
        cfg.update(mixed_group_blocks=R, mixed_keep_blocks=draw(st.integers(1, R - 1)),
                   decay_bits=2)
    elif cfg["n_layers"] == 2 and draw(st.booleans()):
        cfg["fp16_layers"] = [draw(st.integers(0, 1))]
    return cfg


def ops(n_layers: int):
    layer = st.integers(0, n_layers - 1)
    return st.lists(st.one_of(
        st.tuples(st.just("append"), layer, st.integers(1, 3)),
        st.tuples(st.just("append"), layer, st.integers(4, 40)),
        st.tuples(st.just("attend"), layer, st.just(1)),
        st.tuples(st.just("trim"), st.just(0), st.integers(0, 8)),
        st.tuples(st.just("trim"), st.just(0), st.integers(9, 60))), max_size=30)


def core_sizes(core, layer: int):
    """The core's segments of one layer, from its own counters."""
    return _core.SegmentSizes(sinks=core.sink_tokens(layer), codes=core.code_tokens(layer),
                              window=core.window_tokens(layer), rated=core.rated_tokens(layer))


def core_plan(core, layer: int):
    return core.segment_plan(layer)


def run_program(cfg: dict, program, plan_of=core_plan) -> None:
    """Applies the program to a core KVCache; before each step asks plan_of(core, layer) what
    it will do, and asserts the sizes after it are the plan's."""
    core = _core.KVCache(D, **cfg)
    rng = np.random.default_rng(0)
    L = cfg["n_layers"]
    mixed = bool(cfg.get("mixed_group_blocks"))
    for step, (op, layer, n) in enumerate(program):
        before = [core_sizes(core, x) for x in range(L)]
        expect = list(before)
        if op == "append":
            p = plan_of(core, layer).append(before[layer], n)
            assert p.sinks + p.window + p.direct == n
            expect[layer] = p.after
            k = rng.standard_normal((1, n, D)).astype(np.float32)
            core.append(k, k, layer)
        elif op == "attend":
            if core.size(layer) == 0:
                continue
            core.attend(rng.standard_normal((2, 1, D)).astype(np.float32), layer)
            if mixed:  # attention rates the layer's tokens
                s = before[layer]
                expect[layer] = _core.SegmentSizes(sinks=s.sinks, codes=s.codes, window=s.window,
                                                   rated=s.size)
        else:
            cuts = [plan_of(core, x).cut(before[x], before[x].size - min(n, before[x].size))
                    for x in range(L)]
            if any(c.splits_group for c in cuts):  # refused, nothing changed
                with pytest.raises(RuntimeError, match="mixed-precision flush group"):
                    core.trim(n)
            else:
                assert core.trim(n) == min(n, before[0].size)
                expect = [c.after for c in cuts]
        got = [core_sizes(core, x) for x in range(L)]
        assert got == expect, (step, op, layer, n, before, got, expect)


@settings(max_examples=300)
@given(st.data())
def test_the_plans_are_what_the_core_does(data):
    cfg = data.draw(configs())
    run_program(cfg, data.draw(ops(cfg["n_layers"])))


# A program that reaches every rule: sinks filling, flushes of a decode step and of a long
# append, a cut inside the window, one below it and one into the sinks.
PROGRAM = [("append", 0, 2), ("append", 0, 9), ("attend", 0, 1), ("append", 0, 1),
           ("append", 0, 30), ("attend", 0, 1), ("append", 0, 1), ("trim", 0, 2),
           ("trim", 0, 12), ("trim", 0, 13), ("trim", 0, 15)]
WINDOWED = dict(n_layers=1, n_q_heads=2, n_kv_heads=1, key_bits=4, value_bits=4, seed=3,
                block_tokens=4, fp16_window=5, fp16_sinks=3)


def test_the_program_passes_with_the_core_plans():
    run_program(WINDOWED, PROGRAM)
    run_program(dict(WINDOWED, mixed_group_blocks=2, mixed_keep_blocks=1, decay_bits=2),
                [("append", 0, 2), ("append", 0, 9), ("attend", 0, 1), ("append", 0, 1),
                 ("append", 0, 30), ("attend", 0, 1), ("append", 0, 1), ("trim", 0, 2),
                 ("trim", 0, 17), ("trim", 0, 10)])


def test_a_wrong_flush_rule_is_caught():
    # The window flushing one token early (a plan with fp16_window - 1).
    def early(core, layer):
        return _core.SegmentPlan(fp16_sinks=core.fp16_sinks, fp16_window=core.fp16_window - 1,
                                 block_tokens=core.block_tokens)

    with pytest.raises(AssertionError):
        run_program(WINDOWED, PROGRAM, early)


def test_a_wrong_cut_rule_is_caught():
    # A cut below the window that keeps every sink (codes cut instead).
    class KeepsSinks:
        def __init__(self, plan):
            self.plan = plan

        def append(self, sizes, n):
            return self.plan.append(sizes, n)

        def cut(self, sizes, new):
            c = self.plan.cut(sizes, new)
            if new >= sizes.coded:
                return c
            codes = max(0, new - sizes.sinks)
            return types.SimpleNamespace(splits_group=False, after=_core.SegmentSizes(
                sinks=sizes.sinks, codes=codes, window=0, rated=c.after.rated))

    with pytest.raises(AssertionError):
        run_program(WINDOWED, PROGRAM, lambda core, layer: KeepsSinks(core.segment_plan(layer)))


def test_plan_from_config_and_from_cache_agree():
    core = _core.KVCache(D, **dict(WINDOWED, n_layers=2, fp16_layers=[1]))
    plan = _core.SegmentPlan(fp16_sinks=3, fp16_window=5, block_tokens=4)
    assert plan.window_rows == core.segment_plan(0).window_rows == 9
    assert plan.sink_base == 3 and core.segment_plan(1).sink_base == 0  # an fp16 layer
    assert core.segment_plan(1).append(_core.SegmentSizes(), 100).flushes == 0
    p = plan.append(_core.SegmentSizes(), 20)  # 3 sinks, 17 window tokens: 2 blocks flush
    assert (p.sinks, p.window, p.flushes, p.flushed) == (3, 17, 2, 8)
    assert p.after == _core.SegmentSizes(sinks=3, codes=8, window=9)
    assert core.segment_sizes(0) == _core.SegmentSizes()
    with pytest.raises(ValueError):
        _core.SegmentPlan(block_tokens=0)
    mixed = _core.SegmentPlan(fp16_sinks=2, fp16_window=4, block_tokens=4, mixed_group_blocks=2,
                              mixed_keep_blocks=1)
    assert mixed.flush_tokens == 8 and mixed.low_codes(16) == 8
    with pytest.raises(RuntimeError, match="splits a mixed-precision flush group of 8"):
        mixed.check_cut(_core.SegmentSizes(sinks=2, codes=16, window=3), 5)
    assert _core.SegmentPlan.unrated_tokens == 4096
    assert copy.deepcopy(plan).window_rows == 9 and copy.copy(p.after) == p.after


# --- the mlx store follows the same plans ---------------------------------------------------

mx = pytest.importorskip("mlx.core")
from turboquant.mlx_metal import MetalCodeStore, ReferenceKernels  # noqa: E402

REF = ReferenceKernels()


def store_sizes(store):
    return _core.SegmentSizes(sinks=store.sink_tokens(), codes=store.code_tokens(),
                              window=store.window_tokens(), rated=store.rated_tokens())


def run_store(cfg: dict, program, wrong_plan=None) -> None:
    """The program on a MetalCodeStore and a core KVCache side by side (one layer): equal
    segment sizes after every step (refusals alike)."""
    cfg = dict(cfg, n_layers=1)
    store, core = MetalCodeStore(D, kernels=REF, **cfg), _core.KVCache(D, **cfg)
    if wrong_plan is not None:
        store._plan = wrong_plan
    rng = np.random.default_rng(1)
    for step, (op, _, n) in enumerate(program):
        if op == "append":
            k = rng.standard_normal((1, n, D)).astype(np.float32)
            store.append(mx.array(k), mx.array(k))
            core.append(k, k)
        elif op == "attend":
            if core.size(0) == 0:
                continue
            q = rng.standard_normal((2, 1, D)).astype(np.float32)
            store.attend(mx.array(q))
            core.attend(q)
        else:
            outcomes = []
            for target in (store, core):
                try:
                    outcomes.append(target.trim(n))
                except RuntimeError as e:
                    outcomes.append(str(e))
            assert outcomes[0] == outcomes[1], (step, outcomes)
        assert store_sizes(store) == core_sizes(core, 0), (step, op, n)


@settings(max_examples=100)
@given(st.data())
def test_the_store_follows_the_core(data):
    cfg = data.draw(configs())
    cfg.pop("fp16_layers", None)  # the store holds no fp16 layers
    run_store(cfg, data.draw(ops(1)))


def test_the_store_asks_the_plan():
    # A store given a wrong plan (the window flushing one token early) leaves the core.
    wrong = _core.SegmentPlan(fp16_sinks=3, fp16_window=4, block_tokens=4)
    with pytest.raises(AssertionError):
        run_store(WINDOWED, PROGRAM, wrong)
