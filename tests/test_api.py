"""The public API: validation (one test per rule), plans, lazy metadata, array kinds, backends."""

from __future__ import annotations

import numpy as np
import pytest

import mla
from mla import scheduler
from mla.testing import make_decode_case, make_sparse_indices


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    return make_decode_case(rng, b=3, s_q=2, h_q=4, h_kv=2, d=32, head_dim_v=16, page_block_size=8,
                            seqlens=[0, 17, 40])


def call(case, **overrides):
    args = dict(q=case.q, k_cache=case.k_cache, block_table=case.block_table, cache_seqlens=case.cache_seqlens,
                head_dim_v=case.head_dim_v)
    args.update(overrides)
    return mla.flash_mla_with_kvcache(**args)


def raises(exc, match, case, **overrides):
    with pytest.raises(exc, match=match):
        call(case, **overrides)


# ---- validation: one test per rule --------------------------------------------------------------

def test_q_rank(case):
    raises(ValueError, r"q must be 4-D \[b, s_q, h_q, d\], got shape \(3, 2, 128\)", case, q=case.q.reshape(3, 2, -1))


def test_q_dtype(case):
    raises(TypeError, "q must be float32, float16 or bfloat16.*got float64", case, q=case.q.astype(np.float64))


def test_q_integer_dtype(case):
    raises(TypeError, "q must be .*got int32", case, q=case.q.astype(np.int32))


def test_k_cache_rank(case):
    raises(ValueError, "k_cache must be 4-D", case, k_cache=case.k_cache[0])


def test_k_cache_dtype_must_match_q(case):
    raises(TypeError, r"k_cache dtype must equal q's \(float32\), got float16", case,
           k_cache=case.k_cache.astype(np.float16))


def test_k_cache_last_dim_must_match_q(case):
    raises(ValueError, r"k_cache.shape\[-1\] must equal q.shape\[-1\] = 32, got 16", case,
           k_cache=np.ascontiguousarray(case.k_cache[..., :16]))


def test_heads_must_divide(case):
    raises(ValueError, r"h_q \(3, q.shape\[2\]\) must be a multiple of h_kv \(2", case,
           q=np.ascontiguousarray(case.q[:, :, :3]))


def test_head_dim_v_range_zero(case):
    raises(ValueError, r"head_dim_v must be in \(0, 32\].*got 0", case, head_dim_v=0)


def test_head_dim_v_range_too_big(case):
    raises(ValueError, r"head_dim_v must be in \(0, 32\].*got 33", case, head_dim_v=33)


def test_head_dim_v_type(case):
    raises(TypeError, "head_dim_v must be an int", case, head_dim_v=16.0)


def test_block_table_rank(case):
    raises(ValueError, "block_table must be 2-D", case, block_table=case.block_table[0])


def test_block_table_dtype(case):
    raises(TypeError, r"block_table must be int32, got int64 \(use .astype\(np.int32\)\)", case,
           block_table=case.block_table.astype(np.int64))


def test_block_table_batch(case):
    raises(ValueError, r"block_table.shape\[0\] must be b = 3", case, block_table=case.block_table[:2])


def test_cache_seqlens_shape(case):
    raises(ValueError, r"cache_seqlens must have shape \[b\] = \[3\]", case, cache_seqlens=case.cache_seqlens[:2])


def test_cache_seqlens_rank(case):
    raises(ValueError, "cache_seqlens must be 1-D", case, cache_seqlens=case.cache_seqlens[None])


def test_cache_seqlens_dtype(case):
    raises(TypeError, "cache_seqlens must be int32, got int64", case,
           cache_seqlens=case.cache_seqlens.astype(np.int64))


def test_negative_length(case):
    raises(ValueError, r"cache_seqlens must be >= 0, got cache_seqlens\[1\] = -1", case,
           cache_seqlens=np.array([0, -1, 4], dtype=np.int32))


def test_length_beyond_table(case):
    limit = case.block_table.shape[1] * 8
    raises(ValueError, rf"cache_seqlens\[2\] = {limit + 1} exceeds max_blocks_per_seq \* page_block_size", case,
           cache_seqlens=np.array([0, 1, limit + 1], dtype=np.int32))


def test_used_block_out_of_range(case):
    table = case.block_table.copy()
    table[2, 1] = case.k_cache.shape[0]
    raises(ValueError, r"block_table\[2, 1\] = \d+ is outside \[0, num_blocks\)", case, block_table=table)


def test_used_block_negative(case):
    table = case.block_table.copy()
    table[1, 0] = -1
    raises(ValueError, r"block_table\[1, 0\] = -1 is outside", case, block_table=table)


def test_unused_block_entries_are_ignored(case):
    table = case.block_table.copy()
    table[0, :] = -99  # sequence 0 has length 0: nothing of its row is used
    table[1, 3:] = 2**31 - 1  # sequence 1 uses 3 pages of 8
    out, lse = call(case, block_table=table, backend="numpy")
    ref_out, ref_lse = call(case, backend="numpy")
    np.testing.assert_array_equal(out, ref_out)


def test_validate_false_skips_value_checks(case):
    table = case.block_table.copy()
    table[2, 1] = 10**6
    with pytest.raises(ValueError):
        call(case, block_table=table)
    # with validate=False the caller promises the values; shapes are still checked
    with pytest.raises(ValueError, match="head_dim_v"):
        call(case, block_table=table, head_dim_v=0, validate=False)


def test_non_finite_softmax_scale(case):
    raises(ValueError, "softmax_scale must be finite, got nan", case, softmax_scale=float("nan"))
    raises(ValueError, "softmax_scale must be finite, got inf", case, softmax_scale=float("inf"))


def test_softmax_scale_type(case):
    raises(TypeError, "softmax_scale must be a float", case, softmax_scale="0.1")


def test_causal_type(case):
    raises(TypeError, "causal must be a bool", case, causal="yes")


def test_unknown_backend(case):
    raises(ValueError, r"backend must be one of \('auto', 'numpy', 'numba', 'cupy'\), got 'torch'", case,
           backend="torch")


def test_fp8_needs_uint8(case):
    raises(TypeError, "k_cache must be uint8 bytes with is_fp8_kvcache=True, got float32", case, is_fp8_kvcache=True)


def test_fp8_needs_656_bytes(case):
    cache = np.zeros((*case.k_cache.shape[:3], 576), dtype=np.uint8)
    raises(ValueError, r"k_cache.shape\[-1\] must be 656 \(FP8 layout\)", case, k_cache=cache, is_fp8_kvcache=True)


def test_fp8_needs_deepseek_dims(case):
    cache = np.zeros((*case.k_cache.shape[:3], 656), dtype=np.uint8)
    raises(ValueError, "the FP8 layout needs q.shape\\[-1\\] == 576 and head_dim_v == 512", case, k_cache=cache,
           is_fp8_kvcache=True)


def test_host_device_mixing_is_rejected(case):
    class FakeDevice:  # looks like a CUDA array to the API
        __cuda_array_interface__ = {"shape": (3,), "typestr": "<i4", "data": (0, False), "version": 3}

    raises(ValueError, "cache_seqlens must be on the host \\(NumPy\\) like q", case, cache_seqlens=FakeDevice())


def test_missing_dense_arguments(case):
    raises(TypeError, "block_table is required in dense mode", case, block_table=None)


def test_sparse_causal_rejected(case):
    idx = make_sparse_indices(np.random.default_rng(0), case, 4)
    raises(ValueError, "causal=True is not supported with indices", case, indices=idx, causal=True)


def test_sparse_indices_range(case):
    idx = make_sparse_indices(np.random.default_rng(0), case, 4)
    idx[1, 0, 0] = case.k_cache.shape[0] * case.k_cache.shape[1]
    raises(ValueError, r"indices must be in \[-1, num_blocks \* page_block_size\)", case, indices=idx)
    idx[1, 0, 0] = -2
    raises(ValueError, r"indices must be in \[-1", case, indices=idx)


def test_sparse_indices_shape_and_dtype(case):
    idx = make_sparse_indices(np.random.default_rng(0), case, 4)
    raises(ValueError, r"indices must have shape \[b, s_q, topk\]", case, indices=idx[:, :1])
    raises(TypeError, "indices must be int32", case, indices=idx.astype(np.int64))


def test_topk_length_checks(case):
    idx = make_sparse_indices(np.random.default_rng(0), case, 4)
    raises(ValueError, r"topk_length must be in \[0, topk\] = \[0, 4\]", case, indices=idx,
           topk_length=np.array([0, 5, 1], dtype=np.int32))
    raises(ValueError, "topk_length is only meaningful with indices", case,
           topk_length=np.array([0, 1, 1], dtype=np.int32))


def test_attn_sink_checks(case):
    idx = make_sparse_indices(np.random.default_rng(0), case, 4)
    raises(ValueError, r"attn_sink must have shape \[h_q\] = \[4\]", case, indices=idx,
           attn_sink=np.zeros(3, np.float32))
    raises(TypeError, "attn_sink must be float32", case, indices=idx, attn_sink=np.zeros(4))


def test_plan_shape_checks(case):
    md, ns = mla.get_mla_metadata(case.cache_seqlens, 4, 2)
    raises(ValueError, r"num_splits must have shape \[b \+ 1\] = \[4\]", case, tile_scheduler_metadata=md,
           num_splits=ns[:3])
    raises(ValueError, "num_splits is required", case, tile_scheduler_metadata=md)
    raises(ValueError, r"tile_scheduler_metadata must have shape", case, tile_scheduler_metadata=md[:, :5].copy(),
           num_splits=ns)


def test_numba_and_cupy_backends_say_why_they_cannot_run(case):
    from mla.backends import BackendUnavailable, status

    for name in ("numba", "cupy"):
        if status()[name] == "available":
            continue
        with pytest.raises(BackendUnavailable, match=f"backend='{name}'"):
            call(case, backend=name)


# ---- behaviour -------------------------------------------------------------------------------

def test_empty_batch_returns_empty_outputs():
    q = np.zeros((0, 1, 4, 32), np.float32)
    out, lse = mla.flash_mla_with_kvcache(q, np.zeros((2, 8, 1, 32), np.float32), np.zeros((0, 3), np.int32),
                                          np.zeros(0, np.int32), 16)
    assert out.shape == (0, 1, 4, 16) and out.dtype == np.float32
    assert lse.shape == (0, 4, 1) and lse.dtype == np.float32


def test_plan_from_get_mla_metadata_is_used(case):
    md, ns = mla.get_mla_metadata(case.cache_seqlens, 2 * 4 // 2, 2, num_sms=7)
    assert md.dtype == np.int32 and ns.dtype == np.int32 and md.shape == (3, 8) and ns.shape == (4,)
    out1, lse1 = call(case, tile_scheduler_metadata=md, num_splits=ns)
    out2, lse2 = call(case)
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse1, lse2, rtol=1e-6)


def test_lazy_metadata_is_filled_once_and_reused(case):
    sched, none = mla.get_mla_metadata()
    assert none is None and isinstance(sched, mla.MLASchedMeta) and not sched.is_filled
    out1, _ = call(case, tile_scheduler_metadata=sched)
    assert sched.is_filled
    first = sched.tile_scheduler_metadata
    out2, _ = call(case, tile_scheduler_metadata=sched)
    assert sched.tile_scheduler_metadata is first
    np.testing.assert_array_equal(out1, out2)


def test_lazy_metadata_shape_mismatch_raises(case):
    sched, _ = mla.get_mla_metadata()
    call(case, tile_scheduler_metadata=sched)
    with pytest.raises(ValueError, match="tile_scheduler_metadata was planned for"):
        call(case, q=np.ascontiguousarray(case.q[:, :1]), tile_scheduler_metadata=sched)
    with pytest.raises(ValueError, match="planned for"):
        call(case, tile_scheduler_metadata=sched, causal=True)
    sched.reset()
    call(case, tile_scheduler_metadata=sched, causal=True)


def test_get_mla_metadata_validation():
    with pytest.raises(TypeError, match="num_q_tokens_per_head_k and num_heads_k are required"):
        mla.get_mla_metadata(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="num_heads_k must be >= 1, got 0"):
        mla.get_mla_metadata(np.zeros(2, np.int32), 1, 0)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        mla.get_mla_metadata(np.array([-3], np.int32), 1, 1)


def test_get_mla_metadata_worker_count_follows_flashmla():
    seqlens = np.full(4, 1000, np.int32)
    assert mla.get_mla_metadata(seqlens, 16, 1, num_sms=132)[0].shape[0] == 132
    assert mla.get_mla_metadata(seqlens, 128, 1, num_sms=132)[0].shape[0] == 66
    assert mla.get_mla_metadata(seqlens, 16, 2, num_sms=132)[0].shape[0] == 66


def test_lists_are_accepted_for_host_arrays(case):
    out, _ = call(case, cache_seqlens=case.cache_seqlens.tolist() and case.cache_seqlens)
    assert isinstance(out, np.ndarray)


# ---- scheduler ---------------------------------------------------------------------------------

def _pieces(md, ns, lengths):
    return [p for row in md for p in scheduler.worker_pieces(row, ns, lengths)]


@pytest.mark.parametrize("tight", [False, True], ids=["loose", "tight"])
@pytest.mark.parametrize("lengths,workers", [([0], 1), ([0, 0, 0], 5), ([64 * 100], 132), ([1, 1, 1, 1], 2),
                                             ([5000, 10, 0, 300], 16), ([128] * 64, 132), ([8192] * 8, 132)])
def test_plan_covers_every_key_once(lengths, workers, tight):
    lengths = np.array(lengths)
    md, ns = scheduler.plan(lengths, workers, tight=tight)
    pieces = _pieces(md, ns, lengths)
    for i, L in enumerate(lengths):
        mine = sorted((s, e, p) for j, s, e, p in pieces if j == i)
        assert mine[0][0] == 0 and mine[-1][1] == L
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
        assert [p for *_, p in mine] == list(range(ns[i], ns[i + 1]))
        assert all(s % scheduler.BLOCK_N == 0 for s, _, _ in mine)
    assert ns[-1] <= len(lengths) + workers


def test_plan_balances_work():
    # one long sequence over 100 workers: (1000 tiles + 5 overhead) / 100 -> FlashMLA's (loose) payload of 11 + 5,
    # so every worker but the last takes exactly 11 tiles and 91 workers cover it; the tight payload (15, the
    # smallest that covers it) gives every one of the 100 workers 10 tiles
    lengths = np.array([64 * 1000])
    md, ns = scheduler.plan(lengths, 100, tight=False)
    sizes = [e - s for _, s, e, _ in _pieces(md, ns, lengths)]
    assert ns[-1] == 91 and sizes[:-1] == [64 * 11] * 90 and 0 < sizes[-1] <= 64 * 11
    md, ns = scheduler.plan(lengths, 100, tight=True)
    assert ns[-1] == 100 and [e - s for _, s, e, _ in _pieces(md, ns, lengths)] == [64 * 10] * 100
    # many equal sequences: no worker gets more than the loose payload
    lengths = np.full(64, 64 * 30)
    md, ns = scheduler.plan(lengths, 132)
    per_worker = [sum(-(-(e - s) // 64) + scheduler.FIXED_OVERHEAD_TILES
                      for _, s, e, _ in scheduler.worker_pieces(row, ns, lengths)) for row in md]
    payload = -(-(64 * 30 + 64 * 5) // 132) + 5
    assert max(per_worker) <= payload


def _worker_costs(md, ns, lengths):
    """Tiles + FIXED_OVERHEAD_TILES a piece, for every worker of a plan."""
    return [sum(-(-(e - s) // 64) + scheduler.FIXED_OVERHEAD_TILES
                for _, s, e, _ in scheduler.worker_pieces(row, ns, lengths)) for row in md]


def test_tight_plan_fills_idle_workers():
    """8 sequences of 128 tiles on 132 workers (issue #4's b=8 shape): the loose payload (ceil(1064 / 132) + 5 = 14)
    gives 9 tiles a piece and leaves 16 workers idle; the tight one (13) 8 tiles a piece on 128 workers."""
    lengths = np.full(8, 8192)
    for tight, most, busy in ((False, 9, 116), (True, 8, 128)):
        md, ns = scheduler.plan(lengths, 132, tight=tight)
        tiles = [sum(-(-(e - s) // 64) for _, s, e, _ in scheduler.worker_pieces(row, ns, lengths)) for row in md]
        assert (max(tiles), sum(t > 0 for t in tiles)) == (most, busy)


@pytest.mark.parametrize("seed", range(40))
def test_tight_plan_is_never_worse(seed):
    """Random batches: the tight plan covers every key (test above) with a largest worker cost (tiles + overheads)
    no larger than the loose plan's, and never below what the workers must hold on average."""
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 200))
    lengths = rng.integers(0, int(rng.choice([100, 3000, 40000])), size=b)
    workers = int(rng.integers(1, 140))
    loose = max(_worker_costs(*scheduler.plan(lengths, workers, tight=False), lengths))
    md, ns = scheduler.plan(lengths, workers, tight=True)
    pieces = _pieces(md, ns, lengths)
    assert sum(e - s for _, s, e, _ in pieces) == int(lengths.sum())
    tight = max(_worker_costs(md, ns, lengths))
    total = int((-(-lengths // 64)).sum()) + b * scheduler.FIXED_OVERHEAD_TILES
    assert -(-total // workers) <= tight + scheduler.FIXED_OVERHEAD_TILES and tight <= loose


def test_plan_tight_env(monkeypatch):
    monkeypatch.setenv("MLA_PLAN_TIGHT", "1")
    assert scheduler.tight_payload()
    monkeypatch.setenv("MLA_PLAN_TIGHT", "0")
    assert not scheduler.tight_payload()
    monkeypatch.setenv("MLA_PLAN_TIGHT", "yes")
    with pytest.raises(ValueError, match="MLA_PLAN_TIGHT"):
        scheduler.tight_payload()


@pytest.mark.parametrize("tight", [0, 1])
@pytest.mark.parametrize("lengths,workers", [([8192] * 8, 132), ([0], 1), ([5000, 10, 0, 300], 16),
                                             (list(range(0, 9000, 70)), 132), ([64 * 1000], 100)])
def test_device_plan_kernel_emulated(lengths, workers, tight):
    """kernels/mla_metadata.cu (the plan computed on the GPU) on the CPU emulator: the same plan as
    ``scheduler.plan``, bit for bit, loose and tight."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _cuda_emu

    if _cuda_emu.compiler() is None:
        pytest.skip("the CPU emulator needs g++")
    seqlens = np.array(lengths, np.int32)
    b = len(lengths)
    metadata = np.full((workers, scheduler.METADATA_WIDTH), -7, np.int32)
    num_splits = np.full(b + 1, -7, np.int32)
    fn = _cuda_emu.EmuModule("mla_metadata.cu").get_function("mla_plan")
    fn((1,), (256,), (seqlens, np.int32(b), np.int32(workers), np.int32(scheduler.BLOCK_N),
                      np.int32(scheduler.FIXED_OVERHEAD_TILES), np.int32(tight), metadata, num_splits))
    md, ns = scheduler.plan(seqlens, workers, tight=bool(tight))
    np.testing.assert_array_equal(metadata, md)
    np.testing.assert_array_equal(num_splits, ns)


def test_worker_counts_match_sm_parts():
    assert scheduler.num_sm_parts(132, 16, 1) == 132
    assert scheduler.num_sm_parts(132, 256, 1) == 33
    assert scheduler.num_sm_parts(132, 16, 8) == 16
    assert scheduler.num_sm_parts(4, 1000, 8) == 1


# ---- out_dtype --------------------------------------------------------------------------------------

def test_out_dtype_float32_is_the_unrounded_output():
    """out_dtype=float32 on the NumPy backend: the combine's float32 values; rounded, the default out."""
    import ml_dtypes

    c = make_decode_case(np.random.default_rng(1), b=3, s_q=2, h_q=4, h_kv=1, d=32, head_dim_v=16,
                         page_block_size=8, seqlens=[0, 17, 40], dtype=ml_dtypes.bfloat16, causal=True)
    sched, splits = mla.get_mla_metadata(c.cache_seqlens, 8, 1, num_sms=8)
    out16, lse16 = mla.flash_mla_with_kvcache(*c.args(), sched, splits, causal=True, backend="numpy")
    out32, lse32 = mla.flash_mla_with_kvcache(*c.args(), sched, splits, causal=True, backend="numpy",
                                              out_dtype=np.float32)
    assert out32.dtype == np.float32 and out16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out32.astype(ml_dtypes.bfloat16).view(np.uint16), out16.view(np.uint16))
    np.testing.assert_array_equal(lse32, lse16)
    assert np.abs(out32 - out16.astype(np.float32)).max() > 0
    same, _ = mla.flash_mla_with_kvcache(*c.args(), sched, splits, causal=True, out_dtype=c.q.dtype)
    assert same.dtype == ml_dtypes.bfloat16


def test_out_dtype_rejects_other_types(case):
    raises(TypeError, r"out_dtype: expected None, q's dtype \(float32\) or float32, got float16", case,
           out_dtype=np.float16)
    raises(TypeError, "out_dtype: expected None", case, out_dtype="not a dtype")


def test_out_dtype_float32_is_dense_only(case):
    import ml_dtypes

    c = make_decode_case(np.random.default_rng(2), b=2, s_q=1, h_q=4, d=32, head_dim_v=16, page_block_size=8,
                         seqlens=[5, 9], dtype=ml_dtypes.bfloat16)
    idx = make_sparse_indices(np.random.default_rng(3), c, topk=8)
    with pytest.raises(ValueError, match="out_dtype=float32 is for dense decode"):
        mla.flash_mla_with_kvcache(*c.args(), indices=idx, out_dtype=np.float32)


def test_out_dtype_float32_not_on_numba():
    import ml_dtypes

    from mla.backends import numba_backend

    c = make_decode_case(np.random.default_rng(4), b=1, s_q=1, h_q=4, d=32, head_dim_v=16, page_block_size=8,
                         seqlens=[5], dtype=ml_dtypes.bfloat16)
    from mla import api

    problem = api._validate(*c.args(), None, False, False, None, None, None, True)
    problem.out_dtype = np.dtype(np.float32)
    ok, reason = numba_backend.supports(problem)
    assert not ok and "out_dtype=float32" in reason
