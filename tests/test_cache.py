"""mla.cache.PagedKVCache: paging, block tables, copy-on-write forks, exhaustion, fp8/bf16/fp16 storage."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mla.cache import CacheExhaustedError, PagedKVCache
from mla.config import MLAConfig
from mla.fp8 import dequantize_kv_fp8, quantize_kv_fp8

BF16 = np.dtype(ml_dtypes.bfloat16)


def tokens(n, h=1, d=5, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((n, h, d)) * scale).astype(np.float32)


def rebuild_from_block_table(cache: PagedKVCache, row: int, seq_id) -> np.ndarray:
    """Read a sequence the way a kernel does: through k_cache[block_table] and cache_seqlens."""
    table = cache.block_table()
    seqlens = cache.cache_seqlens()
    assert cache.sequences[row] == seq_id
    length = int(seqlens[row])
    used = -(-length // cache.page_block_size)
    assert (table[row, used:] == -1).all(), "padding past the used blocks must be -1"
    pages = cache.k_cache[table[row, :used]]
    return pages.reshape(-1, cache.num_kv_heads, cache.k_cache.shape[-1])[:length]


def snapshot(cache: PagedKVCache):
    return (copy.deepcopy(cache._tables), dict(cache._seqlens), list(cache._free), list(cache._refcounts),
            cache._k_bytes.copy())


def assert_same_snapshot(a, b):
    assert a[0] == b[0] and list(a[0]) == list(b[0])  # tables (and their order)
    assert a[1] == b[1]  # lengths
    assert a[2] == b[2]  # free list, in order
    assert a[3] == b[3]  # refcounts
    np.testing.assert_array_equal(a[4], b[4])  # every storage byte


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16", np.float16, BF16])
def test_storage_shape_dtype_and_poison(dtype):
    cache = PagedKVCache(3, page_block_size=4, num_kv_heads=2, head_dim=6, dtype=dtype)
    expected = np.dtype("float32" if dtype is None else dtype)
    assert cache.k_cache.shape == (3, 4, 2, 6) and cache.k_cache.dtype == expected
    assert np.isnan(cache.k_cache.astype(np.float32)).all()
    assert cache.num_free_blocks == 3 and len(cache) == 0 and cache.sequences == []
    cache.check_invariants(check_poison=True)


def test_fp8_storage_is_poisoned_bytes():
    cache = PagedKVCache(2, page_block_size=3, num_kv_heads=2, fp8=True)
    assert cache.k_cache.shape == (2, 3, 2, 656) and cache.k_cache.dtype == np.uint8
    assert (cache.k_cache == 0xFF).all()
    assert np.isnan(dequantize_kv_fp8(cache.k_cache)).all()


def test_from_config():
    cache = PagedKVCache.from_config(MLAConfig(page_block_size=16, dtype="float16"), num_blocks=5)
    assert cache.k_cache.shape == (5, 16, 1, 576) and cache.k_cache.dtype == np.float16
    fp8_cache = PagedKVCache.from_config(MLAConfig.deepseek_v3(fp8_kvcache=True), num_blocks=2)
    assert fp8_cache.fp8 and fp8_cache.k_cache.shape == (2, 64, 1, 656)
    assert fp8_cache.head_dim == 576


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks: expected a positive int"):
        PagedKVCache(0)
    with pytest.raises(TypeError, match="page_block_size: expected a positive int"):
        PagedKVCache(2, page_block_size=2.0)
    with pytest.raises(ValueError, match="head_dim: the FP8 layout holds 576 channels .* got 512"):
        PagedKVCache(2, head_dim=512, fp8=True)
    with pytest.raises(ValueError, match="dtype: with fp8=True .* got 'bfloat16'"):
        PagedKVCache(2, dtype="bfloat16", fp8=True)
    with pytest.raises(TypeError, match="dtype: expected float32, float16 or bfloat16, got 'int8'"):
        PagedKVCache(2, dtype="int8")
    with pytest.raises(ValueError, match="xp: expected None, 'numpy', 'cupy'"):
        PagedKVCache(2, xp="torch")
    assert PagedKVCache(1, xp="numpy", head_dim=4).xp is np


# ----------------------------------------------------------------------------- append / gather


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_append_gather_round_trip(dtype):
    cache = PagedKVCache(8, page_block_size=4, num_kv_heads=2, head_dim=5, dtype=dtype)
    a1, a2, b1 = tokens(3, 2, seed=1), tokens(7, 2, seed=2), tokens(9, 2, seed=3)
    assert cache.append("a", a1) == 3
    cache.append("b", b1.astype(np.float64))  # any float dtype goes in, cast to the storage dtype
    assert cache.append("a", a2) == 10
    expected_a = np.concatenate([a1, a2]).astype(dtype)
    got = cache.gather("a")
    assert got.dtype == np.dtype(dtype) and got.shape == (10, 2, 5) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected_a)
    np.testing.assert_array_equal(cache.gather("b"), b1.astype(dtype))
    np.testing.assert_array_equal(cache.gather("a", dtype=np.float32), expected_a.astype(np.float32))
    assert cache.seqlen("a") == 10 and len(cache.blocks("a")) == 3 and len(cache.blocks("b")) == 3
    assert cache.num_free_blocks == 2
    cache.check_invariants(check_poison=True)


def test_two_dimensional_kv_when_one_head():
    cache = PagedKVCache(2, page_block_size=4, head_dim=3)
    kv = np.arange(15, dtype=np.float32).reshape(5, 3)
    cache.append(7, kv)
    np.testing.assert_array_equal(cache.gather(7), kv[:, None, :])


def test_empty_sequences_and_empty_appends():
    cache = PagedKVCache(2, page_block_size=4, head_dim=3)
    cache.add_sequence("x")
    cache.append("y", np.zeros((0, 3), np.float32))
    assert cache.seqlen("x") == cache.seqlen("y") == 0 and cache.num_free_blocks == 2
    assert cache.gather("x").shape == (0, 1, 3)
    np.testing.assert_array_equal(cache.block_table(), [[-1], [-1]])
    np.testing.assert_array_equal(cache.cache_seqlens(), [0, 0])
    with pytest.raises(ValueError, match="seq_id: sequence 'x' already exists"):
        cache.add_sequence("x")
    cache.check_invariants(check_poison=True)


def test_block_table_view_matches_gather():
    cache = PagedKVCache(16, page_block_size=4, num_kv_heads=2, head_dim=5)
    lengths = {"s0": 1, "s1": 4, "s2": 9, "s3": 0, "s4": 13}
    for i, (seq_id, n) in enumerate(lengths.items()):
        cache.add_sequence(seq_id)
        for chunk in np.array_split(tokens(n, 2, seed=i), 3):  # several appends per sequence
            cache.append(seq_id, chunk)
    table, seqlens = cache.block_table(), cache.cache_seqlens()
    assert table.dtype == np.int32 and seqlens.dtype == np.int32
    assert table.shape == (5, 4)
    np.testing.assert_array_equal(seqlens, list(lengths.values()))
    for row, seq_id in enumerate(cache.sequences):
        np.testing.assert_array_equal(rebuild_from_block_table(cache, row, seq_id), cache.gather(seq_id))
        np.testing.assert_array_equal(cache.gather(seq_id), tokens(lengths[seq_id], 2, seed=row))
    sub = cache.block_table(["s4", "s0"], pad_to=6)
    assert sub.shape == (2, 6)
    np.testing.assert_array_equal(sub[0, :4], cache.blocks("s4"))
    np.testing.assert_array_equal(sub[1], [cache.blocks("s0")[0], -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(cache.cache_seqlens(["s4", "s0"]), [13, 1])
    with pytest.raises(ValueError, match=r"pad_to: expected an int >= 4 \(the longest block table\), got 3"):
        cache.block_table(pad_to=3)
    with pytest.raises(KeyError, match="nope"):
        cache.block_table(["nope"])


def test_append_validation():
    cache = PagedKVCache(4, page_block_size=4, num_kv_heads=2, head_dim=5)
    with pytest.raises(ValueError, match=r"kv: expected shape \[n, 2, 5\], got \(3, 5\)"):
        cache.append("a", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"kv: expected shape \[n, 2, 5\], got \(3, 2, 4\)"):
        cache.append("a", np.zeros((3, 2, 4), np.float32))
    with pytest.raises(TypeError, match="kv: expected a float dtype .* got int64"):
        cache.append("a", np.zeros((3, 2, 5), np.int64))
    with pytest.raises(TypeError):
        cache.append(["unhashable"], np.zeros((3, 2, 5), np.float32))
    assert "a" not in cache and len(cache) == 0
    one_head = PagedKVCache(4, page_block_size=4, head_dim=5)
    with pytest.raises(ValueError, match=r"kv: expected shape \[n, 1, 5\] or \[n, 5\], got \(5,\)"):
        one_head.append("a", np.zeros(5, np.float32))
    for method in (cache.seqlen, cache.blocks, cache.free, cache.gather):
        with pytest.raises(KeyError, match="missing"):
            method("missing")
    cache.check_invariants(check_poison=True)


# ----------------------------------------------------------------------------- fork / copy-on-write / free


def test_fork_shares_blocks_and_copy_on_write_protects_the_source():
    cache = PagedKVCache(8, page_block_size=4, head_dim=3)
    prefix = tokens(6, d=3, seed=1)  # one full block + a partial block of 2
    cache.append("a", prefix)
    cache.fork("a", "b")
    assert cache.blocks("a") == cache.blocks("b")
    assert [cache._refcounts[b] for b in cache.blocks("a")] == [2, 2]
    assert cache.num_free_blocks == 6
    cache.check_invariants(check_poison=True)

    extra_b = tokens(1, d=3, seed=2)
    cache.append("b", extra_b)  # copies the shared partial block first
    assert cache.blocks("b")[0] == cache.blocks("a")[0]  # the full block stays shared
    assert cache.blocks("b")[1] != cache.blocks("a")[1]
    assert cache.num_free_blocks == 5
    np.testing.assert_array_equal(cache.gather("a"), prefix)
    np.testing.assert_array_equal(cache.gather("b"), np.concatenate([prefix, extra_b]))
    cache.check_invariants(check_poison=True)

    extra_a = tokens(3, d=3, seed=3)
    cache.append("a", extra_a)  # a's partial block is now private: written in place, plus one new block
    assert cache.num_free_blocks == 4
    np.testing.assert_array_equal(cache.gather("a"), np.concatenate([prefix, extra_a]))
    np.testing.assert_array_equal(cache.gather("b"), np.concatenate([prefix, extra_b]))
    for row, seq_id in enumerate(cache.sequences):
        np.testing.assert_array_equal(rebuild_from_block_table(cache, row, seq_id), cache.gather(seq_id))
    cache.check_invariants(check_poison=True)


def test_fork_with_full_last_block_never_copies():
    cache = PagedKVCache(6, page_block_size=4, head_dim=3)
    cache.append("a", tokens(8, d=3))
    cache.fork("a", "b")
    cache.append("b", tokens(1, d=3, seed=5))
    assert cache.blocks("b")[:2] == cache.blocks("a") and cache.num_free_blocks == 3
    np.testing.assert_array_equal(cache.gather("a"), tokens(8, d=3))
    cache.check_invariants(check_poison=True)


def test_fork_errors():
    cache = PagedKVCache(2, page_block_size=4, head_dim=3)
    cache.append("a", tokens(1, d=3))
    with pytest.raises(KeyError, match="'zz'"):
        cache.fork("zz", "b")
    with pytest.raises(ValueError, match="dst_id: sequence 'a' already exists"):
        cache.fork("a", "a")
    cache.check_invariants()


def test_free_returns_blocks_and_repoisons_them():
    cache = PagedKVCache(6, page_block_size=4, head_dim=3)
    cache.append("a", tokens(6, d=3))
    cache.fork("a", "b")
    cache.append("b", tokens(5, d=3, seed=1))  # b: shared full block, private copy, one new block
    assert cache.num_free_blocks == 2
    shared = cache.blocks("a")[0]
    cache.free("a")  # a's partial block goes back; the shared block stays for b
    assert "a" not in cache and cache.num_free_blocks == 3 and cache._refcounts[shared] == 1
    cache.check_invariants(check_poison=True)
    np.testing.assert_array_equal(cache.gather("b"), np.concatenate([tokens(6, d=3), tokens(5, d=3, seed=1)]))
    cache.free("b")
    assert cache.num_free_blocks == 6 and len(cache) == 0
    assert np.isnan(cache.k_cache).all()
    cache.check_invariants(check_poison=True)
    cache.append("c", tokens(24, d=3))  # the whole pool is usable again
    assert cache.num_free_blocks == 0


# ----------------------------------------------------------------------------- exhaustion


def test_exhaustion_leaves_everything_unchanged():
    cache = PagedKVCache(4, page_block_size=4, head_dim=3)
    cache.append("a", tokens(6, d=3))
    cache.fork("a", "b")
    cache.append("c", tokens(3, d=3, seed=1))
    before = snapshot(cache)
    with pytest.raises(CacheExhaustedError, match="needs 3 free block.*only 1 of 4 free") as info:
        cache.append("a", tokens(8, d=3, seed=2))  # copy-on-write page + 2 new pages > 1 free
    assert isinstance(info.value, MemoryError)
    assert (info.value.needed, info.value.free, info.value.seq_id) == (3, 1, "a")
    assert_same_snapshot(before, snapshot(cache))
    with pytest.raises(CacheExhaustedError):
        cache.append("new", tokens(5, d=3, seed=3))
    assert "new" not in cache
    assert_same_snapshot(before, snapshot(cache))
    cache.check_invariants(check_poison=True)
    cache.append("c", tokens(5, d=3, seed=4))  # exactly fills the pool: fine
    assert cache.num_free_blocks == 0


def test_exhaustion_from_the_copy_on_write_page_alone():
    cache = PagedKVCache(2, page_block_size=4, head_dim=3)
    cache.append("a", tokens(6, d=3))
    cache.fork("a", "b")
    before = snapshot(cache)
    with pytest.raises(CacheExhaustedError, match="needs 1 free block.*only 0"):
        cache.append("b", tokens(1, d=3))  # fits in the partial page, but that page is shared
    assert_same_snapshot(before, snapshot(cache))
    cache.free("a")
    cache.append("b", tokens(1, d=3, seed=9))  # no longer shared: written in place
    np.testing.assert_array_equal(cache.gather("b")[-1], tokens(1, d=3, seed=9)[0])


# ----------------------------------------------------------------------------- fp8


def test_fp8_append_gather_within_bounds():
    cache = PagedKVCache(4, page_block_size=8, num_kv_heads=2, fp8=True)
    rng = np.random.default_rng(0)
    kv = (rng.standard_normal((13, 2, 576)) * np.exp(rng.uniform(-10, 10, (13, 2, 1)))).astype(np.float32)
    cache.append("a", kv[:5])
    cache.append("a", kv[5:].astype(BF16))
    expected_bytes = np.concatenate([quantize_kv_fp8(kv[:5]), quantize_kv_fp8(kv[5:].astype(BF16))])
    np.testing.assert_array_equal(rebuild_from_block_table(cache, 0, "a"), expected_bytes)
    got = cache.gather("a")
    assert got.dtype == np.float32 and got.shape == (13, 2, 576)
    np.testing.assert_array_equal(got, dequantize_kv_fp8(expected_bytes))
    reference = np.concatenate([kv[:5], kv[5:].astype(BF16).astype(np.float32)])
    err = np.abs(got[..., :512] - reference[..., :512])
    scale = np.ascontiguousarray(expected_bytes[..., 512:528]).view("<f4")
    bound = np.maximum(2.0**-4 * np.abs(reference[..., :512]), 2.0**-10 * np.repeat(scale, 128, axis=-1))
    assert (err <= bound).all()
    np.testing.assert_array_equal(got[..., 512:], reference[..., 512:].astype(BF16).astype(np.float32))
    assert cache.gather("a", dtype=BF16).dtype == BF16
    cache.check_invariants(check_poison=True)


def test_fp8_rejects_non_finite_without_changing_state():
    cache = PagedKVCache(2, page_block_size=4, fp8=True)
    cache.append("a", np.ones((2, 576), np.float32))
    before = snapshot(cache)
    bad = np.ones((3, 576), np.float32)
    bad[1, 7] = np.inf
    with pytest.raises(ValueError, match="kv: expected finite"):
        cache.append("a", bad)
    assert_same_snapshot(before, snapshot(cache))


def test_fp8_fork_copy_on_write():
    cache = PagedKVCache(4, page_block_size=4, fp8=True)
    base = np.linspace(-3, 3, 3 * 576, dtype=np.float32).reshape(3, 576)
    cache.append("a", base)
    cache.fork("a", "b")
    cache.append("b", np.full((2, 576), 7.0, np.float32))
    np.testing.assert_array_equal(cache.gather("a"), dequantize_kv_fp8(quantize_kv_fp8(base))[:, None])
    assert cache.seqlen("b") == 5 and np.all(cache.gather("b")[3:] == 7.0)
    cache.check_invariants(check_poison=True)


# ----------------------------------------------------------------------------- model-based (stateful)

PAGE, HEADS, DIM, BLOCKS = 3, 2, 2, 7


class PagedCacheMachine(RuleBasedStateMachine):
    """Random append / fork / free sequences against a plain dict of arrays."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(BLOCKS, page_block_size=PAGE, num_kv_heads=HEADS, head_dim=DIM)
        self.model: dict[int, np.ndarray] = {}
        self.next_id = 0
        self.counter = 0.0

    def _fresh_tokens(self, n: int) -> np.ndarray:
        values = self.counter + np.arange(n * HEADS * DIM, dtype=np.float32)  # distinct, exact in float32
        self.counter += n * HEADS * DIM
        return values.reshape(n, HEADS, DIM)

    def _pick(self, selector: int) -> int:
        ids = sorted(self.model)
        return ids[selector % len(ids)]

    @rule(n=st.integers(0, 7))
    def append_new(self, n):
        kv = self._fresh_tokens(n)
        self._append(self.next_id, kv)
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(selector=st.integers(0, 100), n=st.integers(0, 5))
    def append_existing(self, selector, n):
        self._append(self._pick(selector), self._fresh_tokens(n))

    def _append(self, seq_id, kv):
        length = len(self.model.get(seq_id, ()))
        free_before = self.cache.num_free_blocks
        new_pages = -(-(length + len(kv)) // PAGE) - (-(-length // PAGE))
        before = snapshot(self.cache)
        try:
            self.cache.append(seq_id, kv)
        except CacheExhaustedError as error:
            assert new_pages + 1 >= error.needed > free_before >= 0
            assert error.needed >= new_pages
            assert_same_snapshot(before, snapshot(self.cache))
            return
        assert free_before - self.cache.num_free_blocks in (new_pages, new_pages + 1)
        stored = self.model.get(seq_id, np.zeros((0, HEADS, DIM), np.float32))
        self.model[seq_id] = np.concatenate([stored, kv])

    @precondition(lambda self: self.model)
    @rule(selector=st.integers(0, 100))
    def fork(self, selector):
        src = self._pick(selector)
        free_before = self.cache.num_free_blocks
        self.cache.fork(src, self.next_id)
        assert self.cache.num_free_blocks == free_before  # forking allocates nothing
        self.model[self.next_id] = self.model[src].copy()
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(selector=st.integers(0, 100))
    def free(self, selector):
        seq_id = self._pick(selector)
        self.cache.free(seq_id)
        del self.model[seq_id]

    @invariant()
    def matches_model(self):
        cache = self.cache
        cache.check_invariants(check_poison=True)
        assert sorted(cache.sequences) == sorted(self.model) and len(cache) == len(self.model)
        for row, seq_id in enumerate(cache.sequences):
            expected = self.model[seq_id]
            assert cache.seqlen(seq_id) == len(expected)
            np.testing.assert_array_equal(cache.gather(seq_id), expected)
            np.testing.assert_array_equal(rebuild_from_block_table(cache, row, seq_id), expected)
        # sharing only ever saves blocks
        used = BLOCKS - cache.num_free_blocks
        assert used <= sum(-(-len(v) // PAGE) for v in self.model.values())


TestPagedCacheMachine = PagedCacheMachine.TestCase
TestPagedCacheMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


@settings(deadline=None, max_examples=30)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6), page=st.integers(1, 8),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_random_lengths_block_table_round_trip(lengths, page, dtype):
    needed = sum(-(-n // page) for n in lengths)
    cache = PagedKVCache(max(needed, 1), page_block_size=page, num_kv_heads=1, head_dim=4, dtype=dtype)
    data = [tokens(n, 1, 4, seed=i) for i, n in enumerate(lengths)]
    for i, kv in enumerate(data):
        cache.append(i, kv)
    assert cache.num_free_blocks == max(needed, 1) - needed
    for row, kv in enumerate(data):
        np.testing.assert_array_equal(rebuild_from_block_table(cache, row, row), kv.astype(dtype))
        np.testing.assert_array_equal(cache.gather(row), kv.astype(dtype))
    cache.check_invariants(check_poison=True)


# ----------------------------------------------------------------------------- with the decode API


@pytest.mark.parametrize("fp8", [False, True])
def test_feeds_flash_mla_with_kvcache(fp8):
    """block_table / cache_seqlens / k_cache go straight into the decode call (NumPy reference)."""
    mla = pytest.importorskip("mla")
    if not hasattr(mla, "flash_mla_with_kvcache"):
        pytest.skip("mla.flash_mla_with_kvcache not available")
    d, d_v, h_q = (576, 512, 2) if fp8 else (8, 6, 2)
    cache = PagedKVCache(12, page_block_size=4, head_dim=d, fp8=fp8)
    rng = np.random.default_rng(0)
    for seq_id, n in enumerate([5, 0, 11]):
        cache.append(seq_id, rng.standard_normal((n, d)).astype(np.float32))
    cache.fork(2, 3)
    cache.append(3, rng.standard_normal((2, d)).astype(np.float32))
    q = rng.standard_normal((4, 1, h_q, d)).astype(np.float32)
    out, lse = mla.flash_mla_with_kvcache(q, cache.k_cache, cache.block_table(), cache.cache_seqlens(), d_v,
                                          is_fp8_kvcache=fp8, backend="numpy")
    for i, seq_id in enumerate(cache.sequences):
        keys = cache.gather(seq_id)[:, 0].astype(np.float64)
        if len(keys) == 0:
            np.testing.assert_array_equal(out[i], 0.0)
            assert np.isposinf(lse[i]).all()
            continue
        scores = q[i, 0].astype(np.float64) @ keys.T / np.sqrt(d)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out[i, 0], p @ keys[:, :d_v], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- device


@pytest.mark.gpu
def test_cupy_storage():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    for fp8 in (False, True):
        cache = PagedKVCache(4, page_block_size=4, dtype=None if fp8 else "bfloat16", fp8=fp8, xp="cupy")
        kv = np.random.default_rng(0).standard_normal((6, 576)).astype(np.float32)
        cache.append("a", kv)
        cache.append("a", cp.asarray(kv[:2]))
        assert isinstance(cache.k_cache, cp.ndarray)
        assert isinstance(cache.block_table(), cp.ndarray) and cache.block_table().dtype == cp.int32
        assert isinstance(cache.cache_seqlens(), cp.ndarray)
        got = cp.asnumpy(cache.gather("a", dtype=np.float32))
        reference = np.concatenate([kv, kv[:2]])
        expected = (dequantize_kv_fp8(quantize_kv_fp8(reference)) if fp8
                    else reference.astype(BF16).astype(np.float32))
        np.testing.assert_array_equal(got[:, 0], expected)
        cache.fork("a", "b")
        cache.free("a")
        cache.check_invariants(check_poison=True)
