"""``PagedKVCache``: a preallocated pool of fixed-size blocks holding MLA's latent cache.

Storage (one array, NumPy on the host or CuPy on the device)::

    k_cache [num_blocks, page_block_size, num_kv_heads, head_dim]   float32 / float16 / bfloat16
    k_cache [num_blocks, page_block_size, num_kv_heads, 656]        uint8, FP8 layout (mla.fp8)

Token ``t`` of sequence ``s`` lives at ``k_cache[table_s[t // page_block_size], t % page_block_size]``,
where ``table_s`` is the sequence's list of physical block ids; ``block_table()`` pads those lists
to an int32 ``[b, max_blocks]`` array (with -1) and ``cache_seqlens()`` gives the int32 lengths, so::

    out, lse = mla.flash_mla_with_kvcache(q, cache.k_cache, cache.block_table(ids),
                                          cache.cache_seqlens(ids), head_dim_v,
                                          is_fp8_kvcache=cache.fp8)

Bookkeeping (free list, per-block reference counts, block tables, lengths) is plain Python on the
host; only the token data lives in the ``xp`` array, and the GPU is touched only to copy data.

* **Poison.** Every slot that holds no token is filled with 0xFF bytes: NaN in float32, float16 and
  bfloat16, and NaN codes, NaN scales and NaN RoPE values in the FP8 layout. A kernel that reads a
  slot it should not shows NaN. Freed blocks are poisoned again.
* **Prefix sharing.** ``fork(src, dst)`` gives ``dst`` the same blocks (reference counts + 1). Full
  blocks stay shared; a shared, partially filled last block is copied to a fresh block by the next
  ``append`` to whichever sequence writes first (copy-on-write), so the others never change.
* **All or nothing.** ``append`` computes the blocks it needs (new pages + one copy-on-write page)
  and converts/quantizes its input before touching any state; if the pool is short it raises
  :class:`CacheExhaustedError` (a ``MemoryError``) and the cache is exactly as before.
* Sequences are keyed by any hashable id the caller picks; ``sequences`` keeps insertion order,
  which is the default row order of ``block_table()`` and ``cache_seqlens()``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from .fp8 import FP8_HEAD_DIM, FP8_TOKEN_BYTES, dequantize_kv_fp8, quantize_kv_fp8

__all__ = ["PagedKVCache", "CacheExhaustedError"]

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_STORAGE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": _BFLOAT16,
}
_FP8_INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BFLOAT16, np.dtype(np.float64))
_POISON_BYTE = 0xFF


class CacheExhaustedError(MemoryError):
    """The block pool cannot supply the blocks an ``append`` needs; the cache was left unchanged.

    Attributes: ``needed`` (blocks the call needed), ``free`` (blocks free), ``seq_id``.
    """

    def __init__(self, needed: int, free: int, seq_id: Hashable = None, num_blocks: int | None = None):
        self.needed, self.free, self.seq_id = needed, free, seq_id
        pool = f" of {num_blocks}" if num_blocks is not None else ""
        super().__init__(f"paged KV cache exhausted: appending to sequence {seq_id!r} needs {needed} "
                         f"free block(s), only {free}{pool} free; free or shorten other sequences, "
                         f"or build a larger cache")


def _resolve_xp(xp: Any):
    """None / 'numpy' / numpy -> numpy; 'cupy' / cupy -> cupy (ValueError if it cannot be imported)."""
    if xp is None or xp is np or (isinstance(xp, str) and xp == "numpy"):
        return np
    if (isinstance(xp, str) and xp == "cupy") or getattr(xp, "__name__", None) == "cupy":
        try:
            import cupy
        except Exception as exc:
            raise ValueError(f"xp: 'cupy' requested but CuPy cannot be imported ({exc})") from exc
        return cupy
    raise ValueError(f"xp: expected None, 'numpy', 'cupy' or the numpy/cupy module, got {xp!r}")


def _is_device_array(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy" or hasattr(array, "__cuda_array_interface__")


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == _BFLOAT16


def _storage_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in _STORAGE_DTYPES.values():
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    return dt


def _check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int (>= 1), got {value}")
    return int(value)


class PagedKVCache:
    """A pool of ``num_blocks`` pages of ``page_block_size`` tokens, shared by many sequences.

    Args:
        num_blocks: pages in the pool.
        page_block_size: tokens per page (64 in FlashMLA).
        num_kv_heads: latent cache heads ``h_kv`` (1 for DeepSeek).
        head_dim: channels per token and head, ``d`` (576 = 512 latent + 64 RoPE); must be 576 with fp8.
        dtype: storage dtype, "float32" (default when None), "float16" or "bfloat16" (names or dtypes).
            With ``fp8=True`` the storage is uint8 bytes and ``dtype`` must be None.
        fp8: store tokens in FlashMLA's 656-byte FP8 layout (see :mod:`mla.fp8`).
        xp: array namespace of the storage: None or "numpy" (host), "cupy" or the cupy module (device).

    Attributes:
        k_cache: the storage, ``[num_blocks, page_block_size, num_kv_heads, head_dim]`` (or ``[..., 656]``
            uint8 with fp8), in ``xp``. Pass it to ``mla.flash_mla_with_kvcache`` as is.
    """

    def __init__(
        self,
        num_blocks: int,
        page_block_size: int = 64,
        num_kv_heads: int = 1,
        head_dim: int = 576,
        dtype: Any = None,
        fp8: bool = False,
        xp: Any = None,
    ) -> None:
        self.num_blocks = _check_positive_int("num_blocks", num_blocks)
        self.page_block_size = _check_positive_int("page_block_size", page_block_size)
        self.num_kv_heads = _check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _check_positive_int("head_dim", head_dim)
        if not isinstance(fp8, (bool, np.bool_)):
            raise TypeError(f"fp8: expected a bool, got {fp8!r}")
        self.fp8 = bool(fp8)
        self.xp = _resolve_xp(xp)
        if self.fp8:
            if dtype is not None:
                raise ValueError(f"dtype: with fp8=True the storage is uint8 [..., {FP8_TOKEN_BYTES}] bytes, "
                                 f"so dtype must be None, got {dtype!r}")
            if self.head_dim != FP8_HEAD_DIM:
                raise ValueError(f"head_dim: the FP8 layout holds {FP8_HEAD_DIM} channels (512 + 64), "
                                 f"got {self.head_dim}")
            self.dtype = np.dtype(np.uint8)
            self.token_width = FP8_TOKEN_BYTES
        else:
            self.dtype = _storage_dtype("float32" if dtype is None else dtype)
            self.token_width = self.head_dim

        shape_bytes = (self.num_blocks, self.page_block_size, self.num_kv_heads,
                       self.token_width * self.dtype.itemsize)
        # Poisoned from the start: 0xFF bytes are NaN in every storage dtype and in the FP8 layout.
        self._k_bytes = self.xp.full(shape_bytes, _POISON_BYTE, dtype=self.xp.uint8)
        self.k_cache = self._k_bytes.view(self.dtype)

        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack; pops 0, 1, 2, ...
        self._refcounts: list[int] = [0] * self.num_blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._seqlens: dict[Hashable, int] = {}

    @classmethod
    def from_config(cls, config: Any, num_blocks: int, xp: Any = None) -> PagedKVCache:
        """A cache shaped by an :class:`mla.MLAConfig` (page size, KV heads, head_dim, dtype, fp8)."""
        return cls(
            num_blocks,
            page_block_size=config.page_block_size,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=None if config.fp8_kvcache else config.numpy_dtype,
            fp8=config.fp8_kvcache,
            xp=xp,
        )

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    @property
    def sequences(self) -> list[Hashable]:
        """Sequence ids, in the order they were added."""
        return list(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def __repr__(self) -> str:
        kind = "fp8" if self.fp8 else self.dtype.name
        return (f"PagedKVCache(num_blocks={self.num_blocks}, page_block_size={self.page_block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, {kind}, xp={self.xp.__name__}, "
                f"sequences={len(self)}, free_blocks={self.num_free_blocks})")

    def _table(self, seq_id: Hashable) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"seq_id: no sequence {seq_id!r} in the cache") from None

    def seqlen(self, seq_id: Hashable) -> int:
        """Tokens stored for ``seq_id``."""
        self._table(seq_id)
        return self._seqlens[seq_id]

    def blocks(self, seq_id: Hashable) -> list[int]:
        """Physical block ids of ``seq_id``, in token order (a copy)."""
        return list(self._table(seq_id))

    # ------------------------------------------------------------------ sequence lifecycle

    def add_sequence(self, seq_id: Hashable) -> None:
        """Register an empty sequence (``append`` also does this on first use)."""
        hash(seq_id)
        if seq_id in self._tables:
            raise ValueError(f"seq_id: sequence {seq_id!r} already exists")
        self._tables[seq_id] = []
        self._seqlens[seq_id] = 0

    def append(self, seq_id: Hashable, kv: Any) -> int:
        """Append ``n`` tokens to ``seq_id`` (created if new) and return its new length.

        Args:
            kv: ``[n, num_kv_heads, head_dim]`` (or ``[n, head_dim]`` when ``num_kv_heads == 1``),
                any float dtype; cast to the storage dtype, or quantized with
                :func:`mla.quantize_kv_fp8` for an fp8 cache (finite values only). NumPy arrays
                are copied to a CuPy cache; a device array for a NumPy cache is a TypeError.

        Raises:
            CacheExhaustedError: not enough free blocks (nothing changed).
        """
        hash(seq_id)
        data = self._prepare_kv(kv)
        n = int(data.shape[0])
        length = self._seqlens.get(seq_id, 0)
        table = self._tables.get(seq_id, [])
        fill = length % self.page_block_size
        copy_on_write = n > 0 and fill != 0 and self._refcounts[table[-1]] > 1
        new_pages = -(-(length + n) // self.page_block_size) - len(table)
        needed = new_pages + int(copy_on_write)
        if needed > len(self._free):
            raise CacheExhaustedError(needed, len(self._free), seq_id, self.num_blocks)

        # Nothing can fail from here on: commit.
        if seq_id not in self._tables:
            self.add_sequence(seq_id)
            table = self._tables[seq_id]
        if copy_on_write:
            shared = table[-1]
            private = self._free.pop()
            self.k_cache[private] = self.k_cache[shared]
            self._refcounts[shared] -= 1
            self._refcounts[private] = 1
            table[-1] = private
        for _ in range(new_pages):
            block = self._free.pop()
            self._refcounts[block] = 1
            table.append(block)

        written = 0
        while written < n:  # one slice copy per page touched
            position = length + written
            block, offset = table[position // self.page_block_size], position % self.page_block_size
            count = min(self.page_block_size - offset, n - written)
            self.k_cache[block, offset:offset + count] = data[written:written + count]
            written += count
        self._seqlens[seq_id] = length + n
        return length + n

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """Make ``dst_id`` a copy of ``src_id`` that shares its blocks (copy-on-write).

        No data moves now; the shared partial last block (if any) is copied by the next ``append``
        to either sequence. Raises KeyError for an unknown ``src_id``, ValueError if ``dst_id`` exists.
        """
        table = self._table(src_id)
        hash(dst_id)
        if dst_id in self._tables:
            raise ValueError(f"dst_id: sequence {dst_id!r} already exists")
        for block in table:
            self._refcounts[block] += 1
        self._tables[dst_id] = list(table)
        self._seqlens[dst_id] = self._seqlens[src_id]

    def free(self, seq_id: Hashable) -> None:
        """Drop ``seq_id``; blocks no other sequence holds return to the pool, poisoned again."""
        table = self._table(seq_id)
        released = []
        for block in table:
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                released.append(block)
        if released:
            self._k_bytes[self.xp.asarray(np.asarray(released, dtype=np.intp))] = _POISON_BYTE
        self._free.extend(reversed(released))  # the freed sequence's first block is reused first
        del self._tables[seq_id]
        del self._seqlens[seq_id]

    # ------------------------------------------------------------------ kernel inputs

    def _ids(self, seq_ids: Iterable[Hashable] | None) -> list[Hashable]:
        if seq_ids is None:
            return list(self._tables)
        ids = list(seq_ids)
        for seq_id in ids:
            self._table(seq_id)
        return ids

    def block_table(self, seq_ids: Iterable[Hashable] | None = None, pad_to: int | None = None):
        """int32 ``[b, max_blocks]`` block ids of ``seq_ids`` (default: all, in order), -1 padded.

        ``max_blocks`` is ``pad_to`` if given (ValueError if a table is longer), else the longest
        table, at least 1 (so empty sequences still give a valid 2-D table). In ``xp``.
        """
        ids = self._ids(seq_ids)
        longest = max((len(self._tables[i]) for i in ids), default=0)
        if pad_to is None:
            width = max(longest, 1)
        else:
            if not isinstance(pad_to, (int, np.integer)) or isinstance(pad_to, bool) or pad_to < longest:
                raise ValueError(f"pad_to: expected an int >= {longest} (the longest block table), "
                                 f"got {pad_to!r}")
            width = int(pad_to)
        table = np.full((len(ids), width), -1, dtype=np.int32)
        for row, seq_id in enumerate(ids):
            blocks = self._tables[seq_id]
            table[row, :len(blocks)] = blocks
        return self.xp.asarray(table)

    def cache_seqlens(self, seq_ids: Iterable[Hashable] | None = None):
        """int32 ``[b]`` lengths of ``seq_ids`` (default: all, in order), in ``xp``."""
        ids = self._ids(seq_ids)
        return self.xp.asarray(np.asarray([self._seqlens[i] for i in ids], dtype=np.int32))

    def gather(self, seq_id: Hashable, dtype: Any = None):
        """The tokens of ``seq_id`` as a contiguous ``[L, num_kv_heads, head_dim]`` array in ``xp``.

        ``dtype`` defaults to the storage dtype (float32 for fp8, dequantized); any float dtype may
        be asked for (float32, float16 or bfloat16 for fp8).
        """
        table = self._table(seq_id)
        length = self._seqlens[seq_id]
        out_dtype = None if dtype is None else np.dtype(dtype)
        if out_dtype is not None and not _is_float_dtype(out_dtype):
            raise TypeError(f"dtype: expected a float dtype, got {out_dtype}")
        if self.fp8 and out_dtype is None:
            out_dtype = np.dtype(np.float32)
        xp = self.xp
        if length == 0:
            return xp.empty((0, self.num_kv_heads, self.head_dim), dtype=out_dtype or self.dtype)
        pages = self.k_cache[xp.asarray(np.asarray(table, dtype=np.intp))]
        tokens = pages.reshape(-1, self.num_kv_heads, self.token_width)[:length]
        if self.fp8:
            return dequantize_kv_fp8(tokens, dtype=out_dtype)
        if out_dtype is not None and out_dtype != self.dtype:
            tokens = tokens.astype(out_dtype)
        return xp.ascontiguousarray(tokens)

    # ------------------------------------------------------------------ helpers

    def _prepare_kv(self, kv: Any):
        """Validate ``kv`` and return it as ``[n, num_kv_heads, token_width]`` in the storage dtype/xp."""
        xp = self.xp
        if xp is np:
            if _is_device_array(kv):
                raise TypeError(f"kv: a device array ({type(kv).__name__}) cannot go into a NumPy cache; "
                                f"copy it to the host first (e.g. cupy.asnumpy) or build the cache "
                                f"with xp='cupy'")
            kv = np.asarray(kv)
        else:
            kv = xp.asarray(kv)
        if not _is_float_dtype(np.dtype(kv.dtype)):
            raise TypeError(f"kv: expected a float dtype (float32, float16, bfloat16, ...), got {kv.dtype}")
        h, d = self.num_kv_heads, self.head_dim
        if kv.ndim == 2 and h == 1 and kv.shape[1] == d:
            kv = kv.reshape(kv.shape[0], 1, d)
        if kv.ndim != 3 or tuple(kv.shape[1:]) != (h, d):
            expected = f"[n, {h}, {d}]" + (f" or [n, {d}]" if h == 1 else "")
            raise ValueError(f"kv: expected shape {expected}, got {tuple(kv.shape)}")
        if self.fp8:
            if np.dtype(kv.dtype) not in _FP8_INPUT_DTYPES:
                kv = kv.astype(xp.float32)
            return quantize_kv_fp8(kv)
        return kv.astype(self.dtype, copy=False)

    def check_invariants(self, check_poison: bool = False) -> None:
        """Raise AssertionError unless the bookkeeping is consistent (for tests and debugging).

        Checks: the free list has no duplicates and only valid ids; every block is free xor owned
        (refcount 0 exactly for free blocks); each refcount equals the number of sequences whose
        table holds the block; no table holds a block twice; each table has
        ``ceil(seqlen / page_block_size)`` blocks; free + owned blocks = ``num_blocks``. With
        ``check_poison``, also that every slot without a token (free blocks, tails of partially
        filled blocks) still holds 0xFF bytes (this copies the storage to the host).
        """
        def fail(message: str) -> None:
            raise AssertionError(f"PagedKVCache invariant broken: {message}")

        free_set = set(self._free)
        if len(free_set) != len(self._free):
            fail(f"duplicate ids in the free list {self._free}")
        if any(not 0 <= b < self.num_blocks for b in free_set):
            fail(f"free list holds ids outside [0, {self.num_blocks}): {sorted(free_set)}")
        if self._tables.keys() != self._seqlens.keys():
            fail("tables and seqlens have different sequence ids")
        holders = [0] * self.num_blocks
        filled = [0] * self.num_blocks  # tokens held in each block (max over its holders)
        for seq_id, table in self._tables.items():
            length = self._seqlens[seq_id]
            if length < 0 or len(table) != -(-length // self.page_block_size):
                fail(f"sequence {seq_id!r} has {len(table)} blocks for {length} tokens")
            if len(set(table)) != len(table):
                fail(f"sequence {seq_id!r} holds a block twice: {table}")
            for index, block in enumerate(table):
                if not 0 <= block < self.num_blocks:
                    fail(f"sequence {seq_id!r} holds invalid block id {block}")
                holders[block] += 1
                tokens = min(self.page_block_size, length - index * self.page_block_size)
                filled[block] = max(filled[block], tokens)
        for block in range(self.num_blocks):
            if self._refcounts[block] != holders[block]:
                fail(f"block {block} has refcount {self._refcounts[block]} but {holders[block]} holders")
            if (block in free_set) == (holders[block] > 0):
                state = "both free and owned" if block in free_set else "neither free nor owned"
                fail(f"block {block} is {state}")
        owned = sum(1 for count in holders if count > 0)
        if len(self._free) + owned != self.num_blocks:
            fail(f"{len(self._free)} free + {owned} owned != {self.num_blocks} blocks")
        if check_poison:
            data = self._k_bytes if self.xp is np else self.xp.asnumpy(self._k_bytes)
            for block in range(self.num_blocks):
                if not (data[block, filled[block]:] == _POISON_BYTE).all():
                    fail(f"block {block} has non-poison bytes past its {filled[block]} tokens")
