"""Multi-GPU decode (issue #8) on the CPU: sharding, partial merge, simulated ranks; NCCL on >= 2 GPUs.

The CPU tests hold the context-parallel path (pages spread over G shards, partials merged by lse)
and the head-parallel path to the unsharded NumPy reference. The rank code that the NCCL processes
run (``_rank_main`` -> ``run_context_parallel`` / ``run_head_parallel``) is run here too, with
threads standing in for GPUs and a NumPy all-gather standing in for NCCL's.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mla
from mla import _arrays, distributed, reference, testing
from mla.distributed import RunConfig

SETTINGS = settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
TIGHT = 1e-5  # float32: sharded and unsharded differ only in summation order


def check_equal(out, lse, ref_out, ref_lse, tol=TIGHT):
    assert out.dtype == ref_out.dtype and lse.dtype == np.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse), err_msg="empty rows differ")
    assert not np.isneginf(lse).any()
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=tol, rtol=tol)
    np.testing.assert_allclose(out.astype(np.float64), ref_out.astype(np.float64), atol=tol, rtol=tol)


case_params = st.fixed_dictionaries({
    "b": st.integers(1, 4),
    "s_q": st.integers(1, 4),
    "h_kv": st.sampled_from([1, 2, 3]),
    "group": st.sampled_from([1, 2, 3]),
    "page": st.sampled_from([1, 4, 16]),
    "max_seqlen": st.sampled_from([0, 3, 40, 150]),
    "zero_len": st.booleans(),
    "causal": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def build(p, d=24, d_v=12, dtype=np.float32):
    rng = np.random.default_rng(p["seed"])
    lengths = rng.integers(0, p["max_seqlen"] + 1, size=p["b"])
    if p["zero_len"]:
        lengths[rng.integers(p["b"])] = 0
    return testing.make_decode_case(rng, b=p["b"], s_q=p["s_q"], h_q=p["h_kv"] * p["group"], h_kv=p["h_kv"], d=d,
                                    head_dim_v=d_v, page_block_size=p["page"], seqlens=lengths, causal=p["causal"],
                                    dtype=dtype)


# ----------------------------------------------------------------------------------------------
# context parallel == unsharded


@SETTINGS
@given(case_params, st.integers(1, 4), st.sampled_from(distributed.HOW))
def test_context_parallel_matches_unsharded(p, G, how):
    """The path every GPU rank takes: the API on each shard's local arrays, causal on the tail shard."""
    case = build(p)
    ref = reference.flash_mla_reference(*case.args(), causal=case.causal)
    got = distributed.context_parallel_decode_simulated(*case.args(), G, how=how, causal=case.causal)
    check_equal(*got, *ref)


@FEW
@given(case_params, st.integers(1, 4), st.sampled_from(distributed.HOW))
def test_context_parallel_global_positions_matches_unsharded(p, G, how):
    """Partials computed with global key positions (reference.split_partials over a per-shard plan)."""
    case = build(p)
    ref = reference.flash_mla_reference(*case.args(), causal=case.causal)
    got = distributed.context_parallel_decode_simulated(*case.args(), G, how=how, causal=case.causal,
                                                        method="global")
    check_equal(*got, *ref)


@FEW
@given(case_params, st.integers(1, 4), st.sampled_from(distributed.HOW))
def test_each_local_partial_equals_its_global_partial(p, G, how):
    """The tail rule: local causal masking on each shard gives the global-position partial."""
    case = build(p)
    s_q = case.q.shape[1]
    for shard in distributed.shard_context(case.k_cache, case.block_table, case.cache_seqlens, G, how, s_q=s_q):
        o_l, lse_l = distributed.shard_partial(case.q, shard, case.head_dim_v, causal=case.causal, backend="numpy")
        o_g, lse_g = distributed.shard_partial_reference(case.q, shard, case.head_dim_v, causal=case.causal)
        np.testing.assert_array_equal(np.isneginf(lse_l), np.isneginf(lse_g))
        fin = np.isfinite(lse_g)
        np.testing.assert_allclose(lse_l[fin], lse_g[fin], atol=TIGHT, rtol=TIGHT)
        np.testing.assert_allclose(o_l, o_g, atol=TIGHT, rtol=TIGHT)


@pytest.mark.parametrize("how", distributed.HOW)
@pytest.mark.parametrize("dtype", [pytest.param(_arrays.BFLOAT16, id="bf16"), pytest.param(np.float16, id="fp16")])
def test_context_parallel_16bit_within_gpu_tolerances(how, dtype):
    """Partials travel in q's dtype (as the API returns them): the merge stays within DESIGN §6."""
    rng = np.random.default_rng(7)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=8, h_kv=1, d=64, head_dim_v=48, page_block_size=16,
                                    seqlens=[1000, 37, 0], causal=True, dtype=dtype)
    ref = reference.flash_mla_reference(*case.args(), causal=True)
    out, lse = distributed.context_parallel_decode_simulated(*case.args(), 4, how=how, causal=True)
    assert out.dtype == np.dtype(dtype)
    testing.assert_close(out, lse, ref[0], ref[1])


@pytest.mark.parametrize("how", distributed.HOW)
def test_context_parallel_fp8_cache(how):
    """FP8 byte rows are sharded like any other cache."""
    rng = np.random.default_rng(3)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=2, h_kv=1, d=576, head_dim_v=512, page_block_size=16,
                                    seqlens=[70, 0, 33], causal=True, fp8=True)
    ref = reference.flash_mla_reference(*case.args(), **case.kwargs())
    got = distributed.context_parallel_decode_simulated(*case.args(), 3, how=how, **case.kwargs())
    check_equal(*got, *ref)


def test_context_parallel_paged_kv_cache_with_shared_prefix():
    """PagedKVCache input, two sequences sharing blocks (fork): each shard copies a shared block once."""
    rng = np.random.default_rng(1)
    cache = mla.PagedKVCache(num_blocks=40, page_block_size=4, num_kv_heads=1, head_dim=16)
    cache.append("a", rng.standard_normal((23, 16)))
    cache.fork("a", "b")
    cache.append("b", rng.standard_normal((9, 16)))
    cache.append("c", rng.standard_normal((2, 16)))
    q = rng.standard_normal((3, 2, 4, 16)).astype(np.float32)
    table, seqlens = cache.block_table(), cache.cache_seqlens()
    ref = reference.flash_mla_reference(q, cache.k_cache, table, seqlens, 8, causal=True)
    for how in distributed.HOW:
        shards = distributed.shard_paged_cache(cache, 2, how, s_q=2)
        for shard in shards:
            used = shard.block_table[shard.block_table >= 0]
            assert len(np.unique(used)) == shard.k_cache.shape[0]  # no block copied twice
        partials = [distributed.shard_partial(q, s, 8, causal=True, backend="numpy") for s in shards]
        check_equal(*distributed.merge_partials(partials), *ref)


# ----------------------------------------------------------------------------------------------
# the layout and the shard arrays


@FEW
@given(st.lists(st.integers(0, 200), min_size=1, max_size=5), st.sampled_from([1, 3, 16]), st.integers(1, 5),
       st.sampled_from(distributed.HOW), st.integers(1, 5))
def test_layout_invariants(lengths, page, G, how, s_q):
    layout = distributed.context_layout(np.asarray(lengths, dtype=np.int32), page, G, how, s_q)
    assert len(layout) == G
    for i, L in enumerate(lengths):
        P = -(-L // page)
        held = [layout[g][i] for g in range(G)]
        np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(P))  # a disjoint cover
        for g in range(G - 1):  # non-tail shards: only keys every causal row sees
            assert all((p + 1) * page <= L - s_q + 1 for p in held[g]), (g, held[g])
        if P:
            tail = held[G - 1]
            assert tail[-1] == P - 1
            k = len(tail) - 1
            while k > 0 and tail[k - 1] == tail[k] - 1:  # the run of consecutive pages ending at P - 1
                k -= 1
            run_start = int(tail[k])
            assert L - run_start * page >= min(L, s_q - 1)  # the tail run holds the causally masked keys
        if how == "range":
            for pg in held:
                assert len(pg) == 0 or (np.diff(pg) == 1).all()
            assert all(len(held[g]) == 0 or len(held[g + 1]) == 0 or held[g][-1] < held[g + 1][0] for g in range(G - 1))
        elif P and G > 1:
            counts = [len(pg) for pg in held[:-1]]
            assert max(counts) - min(counts) <= 1  # dealt cyclically


@FEW
@given(case_params, st.integers(1, 4), st.sampled_from(distributed.HOW))
def test_shard_arrays_hold_the_right_keys(p, G, how):
    case = build(p)
    page = case.k_cache.shape[1]
    shards = distributed.shard_context(case.k_cache, case.block_table, case.cache_seqlens, G, how,
                                       s_q=case.q.shape[1])
    for i, L in enumerate(case.cache_seqlens):
        seen = []
        for shard in shards:
            pos = shard.positions(i)
            n = int(shard.cache_seqlens[i])
            local = np.arange(n)
            got = shard.k_cache[shard.block_table[i, local // page], local % page]
            want = case.k_cache[case.block_table[i, pos // page], pos % page]
            np.testing.assert_array_equal(got, want)
            assert not np.isnan(got).any()
            assert shard.block_table.dtype == np.int32 and shard.cache_seqlens.dtype == np.int32
            seen.append(pos)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(L))
    assert [s.holds_tails for s in shards] == [False] * (G - 1) + [True]


def test_shard_argument_errors():
    case = testing.make_decode_case(np.random.default_rng(0), b=2, seqlens=[10, 5], page_block_size=4)
    args = (case.k_cache, case.block_table, case.cache_seqlens)
    with pytest.raises(ValueError, match="how"):
        distributed.shard_context(*args, 2, "diagonal")
    with pytest.raises(ValueError, match="num_shards"):
        distributed.shard_context(*args, 0)
    with pytest.raises(ValueError, match="rank"):
        distributed.context_shard(*args, 2, 2)
    bad = case.block_table.copy()
    bad[0, 1] = 10**6
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        distributed.shard_context(case.k_cache, bad, case.cache_seqlens, 2)
    shards = distributed.shard_context(*args, 2, s_q=1)
    q = np.zeros((2, 3, 4, 64), np.float32)
    with pytest.raises(ValueError, match="s_q"):
        distributed.shard_partial(q, shards[1], 48, causal=True, backend="numpy")


def test_empty_shard_gets_one_poisoned_block():
    case = testing.make_decode_case(np.random.default_rng(0), b=2, seqlens=[3, 0], page_block_size=4)
    shards = distributed.shard_context(case.k_cache, case.block_table, case.cache_seqlens, 3)
    assert [int(s.cache_seqlens.sum()) for s in shards] == [0, 0, 3]
    assert shards[0].k_cache.shape[0] == 1 and np.isnan(shards[0].k_cache).all()


# ----------------------------------------------------------------------------------------------
# head parallel


@SETTINGS
@given(case_params, st.integers(1, 7))
def test_head_parallel_matches_unsharded(p, G):
    case = build(p)
    ref = reference.flash_mla_reference(*case.args(), causal=case.causal)
    got = distributed.head_parallel_decode_simulated(*case.args(), G, causal=case.causal)
    check_equal(*got, *ref, tol=1e-6)


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 9))
@FEW
def test_shard_heads_cover_and_respect_groups(h_kv, group, G):
    h_q = h_kv * group
    shards = distributed.shard_heads(h_q, h_kv, G)
    assert len(shards) == G
    assert shards[0].q_lo == 0 and shards[-1].q_hi == h_q
    for a, b in zip(shards, shards[1:]):
        assert a.q_hi == b.q_lo
    for s in shards:
        if s.num_heads:  # the KV heads are exactly those its query heads read
            assert (s.kv_lo, s.kv_hi) == (s.q_lo // group, (s.q_hi - 1) // group + 1)
            whole = s.q_lo % group == 0 and s.q_hi % group == 0
            assert whole or s.kv_hi - s.kv_lo == 1


def test_even_head_shards_for_nccl():
    assert [s.num_heads for s in distributed._even_head_shards(128, 1, 4)] == [32] * 4
    with pytest.raises(ValueError, match="same number of query heads"):
        distributed._even_head_shards(6, 1, 4)


# ----------------------------------------------------------------------------------------------
# merge_partials and the +inf -> -inf conversion


def random_partials(rng, G, b=2, s_q=2, h_q=3, d_v=5, empty_frac=0.3):
    parts = []
    for _ in range(G):
        o = rng.standard_normal((b, s_q, h_q, d_v)).astype(np.float32)
        lse = (rng.standard_normal((b, s_q, h_q)) * 3).astype(np.float32)
        empty = rng.random((b, s_q, h_q)) < empty_frac
        parts.append((np.where(empty[..., None], 0, o), np.where(empty, -np.inf, lse).astype(np.float32)))
    return parts


@FEW
@given(st.integers(1, 5), st.integers(0, 2**31 - 1), st.randoms(use_true_random=False))
def test_merge_order_independent_and_equals_combine_splits(G, seed, rnd):
    parts = random_partials(np.random.default_rng(seed), G)
    out, lse = distributed.merge_partials(parts)
    shuffled = list(parts)
    rnd.shuffle(shuffled)
    out2, lse2 = distributed.merge_partials(shuffled)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse2))
    np.testing.assert_allclose(out, out2, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse[np.isfinite(lse)], lse2[np.isfinite(lse)], atol=1e-6, rtol=1e-6)
    # the reference's split combine on the same partials (sequence-major, G splits each)
    b = parts[0][0].shape[0]
    o_p = np.stack([o for o, _ in parts], axis=1).reshape(b * G, *parts[0][0].shape[1:])
    l_p = np.stack([lse for _, lse in parts], axis=1).reshape(b * G, *parts[0][1].shape[1:])
    ref_out, ref_lse = reference.combine_splits(o_p, l_p, np.arange(b + 1) * G, np.float32)
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse))
    np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse[np.isfinite(lse)], ref_lse[np.isfinite(lse)], atol=1e-6, rtol=1e-6)


def test_merge_empty_partials_change_nothing():
    rng = np.random.default_rng(0)
    parts = random_partials(rng, 3)
    out, lse = distributed.merge_partials(parts)
    o, l = parts[0]
    garbage = np.full_like(o, np.nan)  # an empty partial's o is ignored whatever it holds
    empty = (garbage, np.full_like(l, -np.inf))
    out2, lse2 = distributed.merge_partials([empty, *parts, empty])
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
    # all empty: out 0, lse +inf (the API's empty rows)
    out3, lse3 = distributed.merge_partials([(np.zeros_like(o), np.full_like(l, -np.inf))] * 2)
    assert (out3 == 0).all() and np.isposinf(lse3).all() and lse3.shape == (2, 3, 2)


def test_merge_single_partial_is_the_identity():
    o, l = random_partials(np.random.default_rng(1), 1)[0]
    out, lse = distributed.merge_partials([(o, l)])
    np.testing.assert_array_equal(out, o)
    np.testing.assert_array_equal(lse, np.where(np.isneginf(l), np.inf, l).transpose(0, 2, 1))


def test_merge_dtype_and_shape_errors():
    o, l = random_partials(np.random.default_rng(2), 1)[0]
    out, _ = distributed.merge_partials([(o.astype(np.float16), l)] * 2)
    assert out.dtype == np.float16
    out, _ = distributed.merge_partials([(o, l)] * 2, out_dtype=_arrays.BFLOAT16)
    assert out.dtype == _arrays.BFLOAT16
    with pytest.raises(ValueError, match="at least one"):
        distributed.merge_partials([])
    with pytest.raises(ValueError, match="partial 1"):
        distributed.merge_partials([(o, l), (o[:1], l[:1])])
    with pytest.raises(ValueError, match="partial 0"):
        distributed.merge_partials([(o, l.transpose(0, 2, 1))])


def test_api_result_needs_plus_inf_to_minus_inf():
    """An API result marks empty rows lse = +inf; as a partial that is -inf, else the merge breaks."""
    rng = np.random.default_rng(5)
    case = testing.make_decode_case(rng, b=3, s_q=3, h_q=4, h_kv=2, d=16, head_dim_v=8, page_block_size=4,
                                    seqlens=[9, 0, 1], causal=True)
    out, lse = mla.flash_mla_with_kvcache(*case.args(), causal=True, backend="numpy")
    assert np.isposinf(lse).any()  # zero-length sequence and causally empty rows
    o_p, lse_p = distributed.partial_from_result(out, lse)
    assert lse_p.shape == (3, 3, 4) and lse_p.dtype == np.float32
    assert not np.isposinf(lse_p).any()
    np.testing.assert_array_equal(np.isneginf(lse_p), np.isposinf(lse).transpose(0, 2, 1))
    np.testing.assert_array_equal(lse_p[np.isfinite(lse_p)], lse.transpose(0, 2, 1)[np.isfinite(lse_p)])
    assert o_p is out
    # round trip, and an empty shard merged in changes nothing
    back_out, back_lse = distributed.merge_partials([(o_p, lse_p)])
    np.testing.assert_array_equal(back_out, out)
    np.testing.assert_array_equal(back_lse, lse)
    nothing = distributed.partial_from_result(np.zeros_like(out), np.full_like(lse, np.inf))
    np.testing.assert_array_equal(distributed.merge_partials([nothing, (o_p, lse_p)])[0], out)
    # unconverted: rejected, not silently NaN
    with pytest.raises(ValueError, match="partial_from_result"):
        distributed.merge_partials([(out, lse.transpose(0, 2, 1))])


# ----------------------------------------------------------------------------------------------
# the rank code of the NCCL path, with threads for GPUs and a NumPy all-gather for NCCL's


class ThreadGroup:
    """G ranks in one process: all_gather through shared slots and a barrier."""

    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def member(self, rank):
        group = self

        class Member:
            def all_gather(self, x):
                group.slots[rank] = np.array(x, copy=True)
                group.barrier.wait()
                stacked = np.stack(group.slots)
                group.barrier.wait()
                return stacked

        return Member()


def run_ranks(G, fn):
    """fn(rank, member) on G threads; returns the results in rank order (re-raises the first error)."""
    group, results, errors = ThreadGroup(G), [None] * G, []

    def body(rank):
        try:
            results[rank] = fn(rank, group.member(rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(G)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("how", distributed.HOW)
@pytest.mark.parametrize("G", [1, 2, 3])
def test_run_context_parallel_on_simulated_ranks(G, how):
    rng = np.random.default_rng(G)
    case = testing.make_decode_case(rng, b=4, s_q=2, h_q=4, h_kv=2, d=16, head_dim_v=8, page_block_size=4,
                                    seqlens=[50, 0, 7, 1], causal=True)
    ref = reference.flash_mla_reference(*case.args(), causal=True)

    def rank_fn(rank, group):
        shard = distributed.context_shard(case.k_cache, case.block_table, case.cache_seqlens, G, rank, how, s_q=2)
        return distributed.run_context_parallel(group, shard, case.q, case.head_dim_v, causal=True, backend="numpy")

    for out, lse in run_ranks(G, rank_fn):  # every rank holds the merged result
        check_equal(out, lse, *ref)


@pytest.mark.parametrize("h_kv,G", [(1, 2), (2, 2), (2, 4), (4, 2)])
def test_run_head_parallel_on_simulated_ranks(h_kv, G):
    rng = np.random.default_rng(h_kv)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=8, h_kv=h_kv, d=16, head_dim_v=8, page_block_size=4,
                                    seqlens=[30, 0, 5], causal=True)
    ref = reference.flash_mla_reference(*case.args(), causal=True)
    shards = distributed._even_head_shards(8, h_kv, G)

    def rank_fn(rank, group):
        s = shards[rank]
        q_local, k_local = case.q[:, :, s.q_lo : s.q_hi], case.k_cache[:, :, s.kv_lo : s.kv_hi]
        return distributed.run_head_parallel(group, q_local, k_local, case.block_table, case.cache_seqlens,
                                             case.head_dim_v, causal=True, backend="numpy")

    for out, lse in run_ranks(G, rank_fn):
        check_equal(out, lse, *ref, tol=1e-6)


@pytest.mark.parametrize("mode,how", [("context", "range"), ("context", "round_robin"), ("head", "range")])
def test_rank_main_on_simulated_ranks(mode, how):
    """What each NCCL process runs (problem, shard, step, rank 0's check and timings), on threads."""
    cfg = RunConfig(mode=mode, how=how, b=4, s_k=40, s_q=2, h_q=4, h_kv=1, d=16, d_v=8, page=4, dtype="float32",
                    causal=True, varlen=True, reps=2, warmup=1)
    results = run_ranks(2, lambda rank, group: distributed._rank_main(rank, 2, cfg, group, np))
    r0 = results[0]
    assert r0["ok"], r0.get("mismatch")
    assert r0["max_abs_out"] < 1e-5 and r0["single_ms"] > 0
    assert all(r["parallel_ms"] > 0 for r in results)


def test_make_case_is_seeded_varlen_and_poisoned():
    cfg = RunConfig(b=5, s_k=30, page=8, d=8, d_v=4, h_q=2, dtype="float32", varlen=True, seed=3)
    a, b = distributed.make_case(cfg), distributed.make_case(cfg)
    np.testing.assert_array_equal(a.cache_seqlens, b.cache_seqlens)
    np.testing.assert_array_equal(a.q, b.q)
    assert (a.cache_seqlens == 0).any() and a.cache_seqlens.max() <= 30
    assert np.isnan(a.k_cache).any()  # tails and the spare block
    out, lse = mla.flash_mla_with_kvcache(*a.args(), backend="numpy")
    assert not np.isnan(out).any()
    bf = distributed.make_case(RunConfig(b=2, s_k=8, page=4, d=8, d_v=4, h_q=2, dtype="bfloat16"))
    assert bf.q.dtype == _arrays.BFLOAT16 and bf.k_cache.dtype == _arrays.BFLOAT16


def test_rank0_check_uses_the_reference_and_the_triangle_bound():
    """_compare: parallel and single-GPU each within DESIGN §6 of the reference (the abs tolerance scaled to the
    case's unit-normal values, testing.out_atol), and within 2x of each other."""
    cfg = RunConfig(b=3, s_k=40, s_q=2, h_q=4, d=16, d_v=8, page=4, dtype="float32", causal=True, varlen=True)
    case = distributed.make_case(cfg)
    ref_out, ref_lse = reference.flash_mla_reference(*case.args(), causal=True)
    assert distributed._compare(ref_out, ref_lse, ref_out, ref_lse, case)["ok"]
    row = int(np.argmax(case.cache_seqlens))  # a sequence with keys, so its output is not 0
    # 1.5x the abs tolerance on one element: each result still fails the reference check alone
    off = ref_out.copy()
    off[row, 0, 0, 0] += 1.5 * testing.out_atol(case) + abs(ref_out[row, 0, 0, 0]) * testing.OUT_RTOL
    bad = distributed._compare(off, ref_lse, ref_out, ref_lse, case)
    assert not bad["ok"] and bad["mismatch"].startswith("parallel vs reference")
    bad = distributed._compare(ref_out, ref_lse, off, ref_lse, case)
    assert not bad["ok"] and bad["mismatch"].startswith("single-GPU vs reference")
    # within tolerance of the reference on opposite sides: 1.8 tolerances apart, inside the 2x bound
    up, down = ref_out.copy(), ref_out.copy()
    step = 0.9 * (testing.out_atol(case) + abs(ref_out[row, 0, 0, 0]) * testing.OUT_RTOL)
    up[row, 0, 0, 0] += step
    down[row, 0, 0, 0] -= step
    res = distributed._compare(up, ref_lse, down, ref_lse, case)
    assert res["ok"], res.get("mismatch")
    assert res["max_abs_out"] == pytest.approx(2 * step, rel=1e-3)
    assert res["max_abs_out_ref"] == pytest.approx(step, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# CLI and import safety


def test_docs_python_snippets_run():
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert snippets
    for i, code in enumerate(snippets):
        exec(compile(code, f"docs/distributed.md snippet {i}", "exec"), {})


def test_cli_parses_and_refuses_without_gpus(capsys):
    args, cfg = distributed._parse_args(["--mode", "head", "--gpus", "1", "2", "--b", "128", "--s-k", "32768",
                                         "--causal", "--no-check"])
    assert args.gpus == [1, 2] and cfg.mode == "head" and cfg.b == 128 and cfg.s_k == 32768
    assert cfg.causal and not cfg.check and cfg.h_q == 128 and cfg.d == 576
    if distributed._gpu_count() < 2:
        assert distributed.main(["--gpus", "2"]) == 2
        assert "cannot run" in capsys.readouterr().err


def test_module_help_runs_and_import_does_not_load_nccl():
    code = ("import sys, mla.distributed; "
            "assert 'cupy.cuda.nccl' not in sys.modules and 'cupy_backends.cuda.libs.nccl' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    without_cupy = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None  # import cupy now raises ImportError
        import numpy as np
        from mla import distributed, testing
        c = testing.make_decode_case(np.random.default_rng(0), b=2, seqlens=[9, 0], page_block_size=4)
        out, lse = distributed.context_parallel_decode_simulated(*c.args(), 2)
        assert out.shape == (2, 1, 4, 48)
        assert distributed.main(["--gpus", "2"]) == 2
    """)
    subprocess.run([sys.executable, "-c", without_cupy], check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "mla.distributed", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--gpus" in res.stdout


# ----------------------------------------------------------------------------------------------
# the NCCL path itself (>= 2 GPUs)


def _nccl_skip_reason():
    ok, why = distributed._nccl_status()
    if not ok:
        return why
    n = distributed._gpu_count()
    return None if n >= 2 else f"needs >= 2 GPUs for NCCL, found {n}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode,how,causal,s_q", [("context", "range", True, 2), ("context", "round_robin", True, 2),
                                                  ("context", "range", False, 1), ("head", "range", True, 2)])
def test_nccl_two_gpus_match_single_gpu(mode, how, causal, s_q):
    reason = _nccl_skip_reason()
    if reason:
        pytest.skip(reason)
    cfg = RunConfig(mode=mode, how=how, b=6, s_k=3000, s_q=s_q, h_q=16, h_kv=1, causal=causal, varlen=True,
                    reps=3, warmup=1)
    results = distributed.launch(cfg, 2, timeout=300)
    r0 = results[0]
    assert r0["ok"], r0.get("mismatch")
    assert [r["rank"] for r in results] == [0, 1]
