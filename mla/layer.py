"""``MultiHeadLatentAttention``: DeepSeek-V2/V3's attention layer, end to end, on NumPy or CuPy.

Weights keep Hugging Face's / DeepSeek's names and ``[out, in]`` layout (``y = x @ W.T``)::

    q_a_proj.weight            [q_lora_rank, hidden]            (q-LoRA; or q_proj.weight
    q_a_layernorm.weight       [q_lora_rank]                     [h * d_qk, hidden] without it)
    q_b_proj.weight            [h * d_qk, q_lora_rank]          d_qk = nope + rope (192)
    kv_a_proj_with_mqa.weight  [kv_lora_rank + rope, hidden]    -> [c_kv_raw | k_pe_raw]
    kv_a_layernorm.weight      [kv_lora_rank]
    kv_b_proj.weight           [h * (nope + v), kv_lora_rank]   per head [W_UK (nope rows); W_UV (v rows)]
    o_proj.weight              [hidden, h * v]

Forward of one token at position t (x [hidden])::

    q      = W_qb · RMSNorm(W_qa · x)                 per head [q_nope (128) | q_pe (64)]
    c_kv   = RMSNorm(first kv_lora_rank of W_kva · x)  the latent (512), cached
    k_pe   = RoPE(last rope of W_kva · x, t)           one per token, shared by all heads, cached
    q_pe   = RoPE(q_pe, t)
    MHA (prefill):  k_h = [W_UK,h c_kv | k_pe],  v_h = W_UV,h c_kv,   d_qk 192, d_v 128
    MQA (decode):   q~_h = [W_UK,h^T q_nope,h | q_pe,h]  (576 wide);  attend over the cache
                    [c_kv | k_pe] with V = c_kv (512);  o_h = W_UV,h · (attention output)
    out    = W_o · concat_h(o_h)

The two forms are equal because q_nope·(W_UK c) = (W_UK^T q_nope)·c ("weight absorption").
The softmax scale is ``config.softmax_scale`` = d_qk**-0.5 * mscale**2 (DeepSeek's HF code:
``softmax_scale = q_head_dim**-0.5 * mscale * mscale`` with ``mscale = yarn_get_mscale(factor,
mscale_all_dim)`` when ``rope_scaling`` is set).

RoPE. DeepSeek's interleaved convention (``config.rope_interleave=True``, the default) rotates the
pairs ``(x[2i], x[2i+1])`` by ``t * inv_freq[i]``; the half-split option rotates
``(x[i], x[i + d/2])``. Hugging Face's DeepSeek code de-interleaves q_pe / k_pe and then rotates
halves; we rotate in place and keep the interleaved layout. Both give the same q·k (the same
permutation is applied to q and k), so checkpoints behave identically, but the *cached* k_pe is
in the interleaved layout (as in DeepSeek's own inference code). With ``rope_scaling`` (YaRN),
``inv_freq`` blends interpolated and extrapolated frequencies over DeepSeek's correction range and
cos/sin are multiplied by ``yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor,
mscale_all_dim)``, exactly as ``DeepseekV3YarnRotaryEmbedding``.

Cache semantics: ``prefill`` and ``decode`` first append the new tokens' ``[c_kv | k_pe]`` (576 per
token) to a :class:`mla.PagedKVCache`, then attend over the cache (positions continue from the
sequence's cached length). Attention always reads keys back from the cache, so a prefill followed
by decode steps gives the same numbers as one long prefill.

Training (``forward`` / ``backward``) is autograd-free: ``forward`` returns ``(out, ctx)``;
``backward(dout, ctx)`` returns ``(dx, grads)`` with grads keyed by the weight names.
``checkpoint=True`` keeps only the layer input in ``ctx`` and recomputes the rest in backward.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _arrays
from .config import MLAConfig, yarn_get_mscale
from .prefill import flash_attn_varlen_backward, flash_attn_varlen_forward

__all__ = ["MultiHeadLatentAttention", "rms_norm", "rope_inv_freq", "apply_rope", "generate", "LayerContext"]


def _xp_of(x):
    return _arrays.cupy_module() if _arrays.is_device_array(x) else np


# ----------------------------------------------------------------------------------------------
# RMSNorm and RoPE (with backward)


def rms_norm(x, weight, eps: float):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last axis (computed in x's dtype)."""
    xp = _xp_of(x)
    r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return x * r * weight


def _rms_norm_backward(dy, x, weight, eps: float):
    """(dx, dweight) of rms_norm: with u = dy * w, dx = r u - x r^3 mean(u x)."""
    xp = _xp_of(x)
    r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    u = dy * weight
    dx = r * u - x * (r ** 3) * (u * x).mean(axis=-1, keepdims=True)
    dw = (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dw


def rope_inv_freq(config: MLAConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float64 [rope/2], cos/sin magnitude) for plain RoPE or DeepSeek's YaRN."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exps = np.arange(0, dim, 2, dtype=np.float64) / dim
    freq_extra = 1.0 / base ** exps
    rs = config.rope_scaling
    if rs is None:
        return freq_extra, 1.0
    factor = float(rs["factor"])
    original = int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))
    freq_inter = 1.0 / (factor * base ** exps)

    def correction_dim(num_rotations):
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra_mask = 1.0 - ramp  # 1: keep the original (extrapolated) frequency
    inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    magnitude = yarn_get_mscale(factor, float(rs.get("mscale", 1))) / yarn_get_mscale(
        factor, float(rs.get("mscale_all_dim", 0)))
    return inv_freq, magnitude


def apply_rope(x, positions, inv_freq, magnitude: float = 1.0, interleave: bool = True, inverse: bool = False):
    """Rotate x [n, ..., rope] by ``positions [n]``; ``inverse=True`` applies the transpose (backward).

    interleave: pairs (x[2i], x[2i+1]) (DeepSeek) or (x[i], x[i + rope/2]) (half-split).
    """
    xp = _xp_of(x)
    pos = xp.asarray(positions, dtype=xp.float64)
    ang = pos[:, None] * xp.asarray(inv_freq)[None, :]                      # [n, rope/2]
    cos = (xp.cos(ang) * magnitude).astype(x.dtype)
    sin = (xp.sin(ang) * magnitude).astype(x.dtype)
    if inverse:
        sin = -sin
    extra = x.ndim - 2
    cos = cos.reshape(cos.shape[:1] + (1,) * extra + cos.shape[1:])
    sin = sin.reshape(cos.shape)
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    if interleave:
        return xp.stack([y1, y2], axis=-1).reshape(x.shape)
    return xp.concatenate([y1, y2], axis=-1)


# ----------------------------------------------------------------------------------------------
# the layer


_WEIGHT_NAMES_QLORA = ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight")
_WEIGHT_NAMES_KV = ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")


@dataclass
class LayerContext:
    """What ``forward`` keeps for ``backward``. ``saved_bytes``: the activation memory held."""

    x: Any
    positions: Any
    cu_seqlens: np.ndarray
    causal: bool
    dropout_p: float
    seed: int
    backend: str
    checkpoint: bool
    shape: tuple
    saved: dict = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        arrays = [self.x] + [v for v in self.saved.values() if hasattr(v, "nbytes")]
        return int(sum(a.nbytes for a in arrays))


class MultiHeadLatentAttention:
    """DeepSeek-V2/V3 Multi-head Latent Attention (see the module docstring for the math).

    Build with :meth:`from_state_dict` (real checkpoints, HF names) or :meth:`random` (tests, demos).
    Weights are plain arrays (NumPy or CuPy) in the compute dtype: float64 when the given weights
    are float64, else float32 (bfloat16 / float16 checkpoints are upcast).

    Methods:
        prefill(x, cache, seq_ids)          MHA mode over the cache; appends the latents.
        decode(x, cache, seq_ids, absorbed) MQA (absorbed, via ``mla.flash_mla_with_kvcache``) or
                                            the naive MHA form; appends the latents.
        forward(x, cu_seqlens) / backward   training, with dropout and gradient checkpointing.
    """

    def __init__(self, config: MLAConfig, weights: Mapping[str, Any], xp=None):
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config: expected an mla.MLAConfig, got {type(config).__name__}")
        self.config = config
        c = config
        h, dqk, r, rope = c.num_heads, c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
        expected = {
            "kv_a_proj_with_mqa.weight": (r + rope, c.hidden_size),
            "kv_a_layernorm.weight": (r,),
            "kv_b_proj.weight": (h * (c.qk_nope_head_dim + c.v_head_dim), r),
            "o_proj.weight": (c.hidden_size, h * c.v_head_dim),
        }
        if c.q_lora_rank is None:
            expected["q_proj.weight"] = (h * dqk, c.hidden_size)
        else:
            expected.update({
                "q_a_proj.weight": (c.q_lora_rank, c.hidden_size),
                "q_a_layernorm.weight": (c.q_lora_rank,),
                "q_b_proj.weight": (h * dqk, c.q_lora_rank),
            })
        missing = [n for n in expected if n not in weights]
        if missing:
            raise ValueError(f"weights: missing {missing} for this config (q_lora_rank={c.q_lora_rank}); "
                             f"got {sorted(weights)}")
        first = weights[next(iter(expected))]
        if xp is None:
            xp = _xp_of(first)
        elif isinstance(xp, str):
            xp = np if xp == "numpy" else _arrays.cupy_module()
        self.xp = xp
        dt = np.dtype(getattr(first, "dtype", np.float32))
        self.dtype = np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)
        self.weights: dict[str, Any] = {}
        for name, shape in expected.items():
            w = weights[name]
            if tuple(int(n) for n in w.shape) != shape:
                raise ValueError(f"weights[{name!r}]: expected shape {list(shape)} ([out, in]), got "
                                 f"{list(w.shape)}")
            w = _arrays.asnumpy(w) if xp is np else xp.asarray(w)
            self.weights[name] = xp.ascontiguousarray(w.astype(self.dtype))
        self.inv_freq, self.rope_magnitude = rope_inv_freq(config)
        self.softmax_scale = config.softmax_scale

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_state_dict(cls, weights: Mapping[str, Any], config: MLAConfig, prefix: str | None = None,
                        xp=None) -> MultiHeadLatentAttention:
        """Load from a DeepSeek / Hugging Face state dict (``[out, in]`` weights, HF names).

        ``prefix`` (e.g. ``"model.layers.0.self_attn."``) is stripped; when None, keys are matched
        exactly or by their unique ``*.self_attn.<name>`` suffix. Values may be NumPy, CuPy or any
        array with ``__array__`` / DLPack (e.g. safetensors' numpy output). ``xp``: "numpy" /
        "cupy" / a module to place the weights (default: where they are).
        """
        names = (_WEIGHT_NAMES_KV + (("q_proj.weight",) if config.q_lora_rank is None else _WEIGHT_NAMES_QLORA))
        found = {}
        for name in names:
            if prefix is not None:
                key = prefix + name
                if key in weights:
                    found[name] = weights[key]
                continue
            if name in weights:
                found[name] = weights[name]
                continue
            hits = [k for k in weights if k.endswith("." + name)]
            if len(hits) > 1:
                raise ValueError(f"weights: {len(hits)} keys end with {name!r} ({hits[:3]}...); pass prefix= "
                                 f"to pick one layer")
            if hits:
                found[name] = weights[hits[0]]
        return cls(config, found, xp=xp)

    @classmethod
    def random(cls, config: MLAConfig, seed: int = 0, dtype=np.float32, xp=None) -> MultiHeadLatentAttention:
        """Random weights (N(0, 1/in) projections, norms near 1) for tests and demos."""
        rng = np.random.default_rng(seed)
        c = config
        h, dqk = c.num_heads, c.qk_head_dim

        def lin(out, inp):
            return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(dtype)

        w = {
            "kv_a_proj_with_mqa.weight": lin(c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
            "kv_a_layernorm.weight": (1 + 0.1 * rng.standard_normal(c.kv_lora_rank)).astype(dtype),
            "kv_b_proj.weight": lin(h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "o_proj.weight": lin(c.hidden_size, h * c.v_head_dim),
        }
        if c.q_lora_rank is None:
            w["q_proj.weight"] = lin(h * dqk, c.hidden_size)
        else:
            w["q_a_proj.weight"] = lin(c.q_lora_rank, c.hidden_size)
            w["q_a_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(c.q_lora_rank)).astype(dtype)
            w["q_b_proj.weight"] = lin(h * dqk, c.q_lora_rank)
        return cls(c, w, xp=xp)

    def state_dict(self) -> dict[str, Any]:
        """The weights under their HF names (the layer's own arrays, not copies)."""
        return dict(self.weights)

    def to(self, xp) -> MultiHeadLatentAttention:
        """A copy of the layer with its weights on ``xp`` ("numpy", "cupy" or the module)."""
        return MultiHeadLatentAttention(self.config, self.weights, xp=xp)

    def new_cache(self, num_blocks: int):
        """An empty :class:`mla.PagedKVCache` for this layer's config, on the layer's xp."""
        from .cache import PagedKVCache
        return PagedKVCache.from_config(self.config, num_blocks, xp=self.xp)

    # ------------------------------------------------------------------ pieces

    @property
    def w_uk(self):
        """W_UK [h, nope, kv_lora_rank] (the nope rows of kv_b_proj, per head)."""
        c = self.config
        kvb = self.weights["kv_b_proj.weight"].reshape(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
        return kvb[:, :c.qk_nope_head_dim]

    @property
    def w_uv(self):
        """W_UV [h, v, kv_lora_rank] (the value rows of kv_b_proj, per head)."""
        c = self.config
        kvb = self.weights["kv_b_proj.weight"].reshape(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
        return kvb[:, c.qk_nope_head_dim:]

    def _as_input(self, x, name="x"):
        xp = self.xp
        if (xp is not np) != _arrays.is_device_array(x):
            where = "device (CuPy)" if xp is not np else "host (NumPy)"
            raise ValueError(f"{name}: the layer's weights are on the {where}; move {name} there")
        x = xp.asarray(x)
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"{name}: expected last dim hidden_size = {self.config.hidden_size}, got "
                             f"shape {tuple(x.shape)}")
        return x.astype(self.dtype, copy=False)

    def _project(self, x, positions, keep: dict | None = None):
        """x [n, hidden] -> q [n, h, d_qk] (q_pe roped), c_kv [n, r], k_pe [n, rope] (roped)."""
        c, w = self.config, self.weights
        n = x.shape[0]
        if c.q_lora_rank is None:
            q = x @ w["q_proj.weight"].T
        else:
            cq_raw = x @ w["q_a_proj.weight"].T
            cq = rms_norm(cq_raw, w["q_a_layernorm.weight"], c.rms_norm_eps)
            q = cq @ w["q_b_proj.weight"].T
            if keep is not None:
                keep["cq_raw"], keep["cq"] = cq_raw, cq
        q = q.reshape(n, c.num_heads, c.qk_head_dim)
        nope = c.qk_nope_head_dim
        q_pe = self._rope(q[..., nope:], positions)
        q = self.xp.concatenate([q[..., :nope], q_pe], axis=-1)
        kv_a = x @ w["kv_a_proj_with_mqa.weight"].T
        ckv_raw = kv_a[:, :c.kv_lora_rank]
        c_kv = rms_norm(ckv_raw, w["kv_a_layernorm.weight"], c.rms_norm_eps)
        k_pe = self._rope(kv_a[:, c.kv_lora_rank:], positions)
        if keep is not None:
            keep["ckv_raw"], keep["c_kv"] = ckv_raw, c_kv
        return q, c_kv, k_pe

    def _rope(self, x, positions, inverse=False):
        return apply_rope(x, positions, self.inv_freq, self.rope_magnitude, self.config.rope_interleave,
                          inverse)

    def _decompress(self, c_kv, k_pe):
        """MHA-mode keys / values from the latent: K [n, h, d_qk], V [n, h, v]."""
        c = self.config
        xp = self.xp
        n = c_kv.shape[0]
        kv = (c_kv @ self.weights["kv_b_proj.weight"].T).reshape(n, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        k = xp.concatenate([k_nope, xp.broadcast_to(k_pe[:, None, :], (n, c.num_heads, c.qk_rope_head_dim))],
                           axis=-1)
        return xp.ascontiguousarray(k), xp.ascontiguousarray(v)

    def _out_proj(self, o):
        n = o.shape[0]
        return o.reshape(n, self.config.num_heads * self.config.v_head_dim) @ self.weights["o_proj.weight"].T

    # ------------------------------------------------------------------ inference over a paged cache

    def _pack(self, x, seq_ids, cu_seqlens):
        """x [b, s, hidden] or [total, hidden] (+ cu_seqlens) -> (x2d, cu int64 [b + 1], shape back)."""
        x = self._as_input(x)
        b = len(seq_ids)
        if x.ndim == 3:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens: only with packed x [total, hidden]")
            if x.shape[0] != b:
                raise ValueError(f"x: expected {b} sequences (len(seq_ids)) on axis 0, got shape {tuple(x.shape)}")
            cu = np.arange(b + 1, dtype=np.int64) * x.shape[1]
            return x.reshape(-1, x.shape[-1]), cu
        if x.ndim == 2:
            if cu_seqlens is None:
                if b != 1:
                    raise ValueError("cu_seqlens: required with packed x [total, hidden] and several sequences")
                cu = np.asarray([0, x.shape[0]], dtype=np.int64)
            else:
                cu = _arrays.asnumpy(cu_seqlens).astype(np.int64)
                if cu.shape != (b + 1,) or cu[0] != 0 or cu[-1] != x.shape[0] or (np.diff(cu) < 0).any():
                    raise ValueError(f"cu_seqlens: expected [0, ..., {x.shape[0]}] non-decreasing with {b + 1} "
                                     f"entries, got {cu.tolist()}")
            return x, cu
        raise ValueError(f"x: expected [b, s, hidden] or [total, hidden], got shape {tuple(x.shape)}")

    def _append_latents(self, cache, seq_ids, cu, c_kv, k_pe):
        latent = self.xp.concatenate([c_kv, k_pe], axis=-1)
        lengths = []
        for i, sid in enumerate(seq_ids):
            length = cache.seqlen(sid) if sid in cache else 0
            lengths.append(length)
            chunk = latent[int(cu[i]):int(cu[i + 1])]
            if chunk.shape[0] or sid not in cache:
                cache.append(sid, chunk[:, None, :])
        return lengths

    def _positions(self, cache, seq_ids, cu):
        pos = []
        for i, sid in enumerate(seq_ids):
            start = cache.seqlen(sid) if sid in cache else 0
            pos.append(np.arange(start, start + int(cu[i + 1] - cu[i])))
        return np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)

    def _check_cache(self, cache):
        c = self.config
        if cache.head_dim != c.head_dim or cache.num_kv_heads != 1:
            raise ValueError(f"cache: expected head_dim {c.head_dim} (kv_lora_rank + rope) and 1 KV head, got "
                             f"head_dim {cache.head_dim}, {cache.num_kv_heads} heads")
        if (cache.xp is np) != (self.xp is np):
            raise ValueError("cache: must live on the same side (NumPy / CuPy) as the layer's weights")

    def _mha_over_cache(self, q, cache, seq_ids, cu, backend):
        """Naive (MHA) attention of packed queries q [total, h, d_qk] over each sequence's cache."""
        xp = self.xp
        c = self.config
        latents = [cache.gather(sid, dtype=self.dtype)[:, 0] for sid in seq_ids]
        lengths = np.asarray([lat.shape[0] for lat in latents], dtype=np.int64)
        cu_k = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        lat = xp.concatenate(latents, axis=0)
        k, v = self._decompress(lat[:, :c.kv_lora_rank], lat[:, c.kv_lora_rank:])
        o, _ = flash_attn_varlen_forward(q, k, v, xp.asarray(cu.astype(np.int32)), xp.asarray(cu_k),
                                         softmax_scale=self.softmax_scale, causal=True, backend=backend)
        return o

    def prefill(self, x, cache, seq_ids: Sequence[Hashable], cu_seqlens=None, backend: str = "auto"):
        """MHA-mode prefill (causal) of new tokens, appending their ``[c_kv | k_pe]`` to ``cache``.

        x: [b, s, hidden] (one row per id of ``seq_ids``) or packed [total, hidden] with
        ``cu_seqlens`` [b + 1]. Positions continue from each sequence's cached length (chunked
        prefill works). Returns the layer output shaped like x.
        """
        self._check_cache(cache)
        shape = tuple(x.shape)
        x2, cu = self._pack(x, seq_ids, cu_seqlens)
        pos = self._positions(cache, seq_ids, cu)
        q, c_kv, k_pe = self._project(x2, pos)
        self._append_latents(cache, seq_ids, cu, c_kv, k_pe)
        o = self._mha_over_cache(q, cache, seq_ids, cu, backend)
        return self._out_proj(o).reshape(shape)

    def decode(self, x, cache, seq_ids: Sequence[Hashable], absorbed: bool = True, backend: str = "auto"):
        """One decode step (s_q >= 1 new tokens per sequence), appending their latents to ``cache``.

        x: [b, hidden] or [b, s_q, hidden]. absorbed=True: W_UK folded into q, attention over the
        576-wide latent cache through ``mla.flash_mla_with_kvcache`` (causal), W_UV after.
        absorbed=False: the naive MHA form (decompress K, V from the cache). Returns x's shape.
        """
        self._check_cache(cache)
        shape = tuple(x.shape)
        x3 = self._as_input(x)
        if x3.ndim == 2:
            x3 = x3[:, None, :]
        if x3.ndim != 3 or x3.shape[0] != len(seq_ids):
            raise ValueError(f"x: expected [b, hidden] or [b, s_q, hidden] with b = {len(seq_ids)}, got {shape}")
        if not absorbed:
            return self.prefill(x3, cache, seq_ids, backend=backend).reshape(shape)
        b, s_q, _ = x3.shape
        c, xp = self.config, self.xp
        x2, cu = self._pack(x3, seq_ids, None)
        pos = self._positions(cache, seq_ids, cu)
        q, c_kv, k_pe = self._project(x2, pos)
        self._append_latents(cache, seq_ids, cu, c_kv, k_pe)
        nope = c.qk_nope_head_dim
        # absorb W_UK: q~_h = W_UK,h^T q_nope,h  ([n, h, nope] x [h, nope, r] -> [n, h, r])
        q_lat = xp.einsum("nhd,hdc->nhc", q[..., :nope], self.w_uk)
        q_full = xp.concatenate([q_lat, q[..., nope:]], axis=-1).reshape(b, s_q, c.num_heads, c.head_dim)
        out_lat = self._latent_attention(q_full, cache, seq_ids, backend)
        o = xp.einsum("nhc,hvc->nhv", out_lat.reshape(b * s_q, c.num_heads, c.kv_lora_rank).astype(self.dtype),
                      self.w_uv)
        return self._out_proj(o).reshape(shape)

    def _latent_attention(self, q_full, cache, seq_ids, backend):
        from . import api, reference
        c = self.config
        table = cache.block_table(seq_ids)
        seqlens = cache.cache_seqlens(seq_ids)
        if self.dtype == np.float64:
            if self.xp is not np:
                raise ValueError("float64 layers decode on NumPy only")
            out, _ = reference.flash_mla_reference(q_full, cache.k_cache, table, seqlens, c.kv_lora_rank,
                                                   softmax_scale=self.softmax_scale, causal=True,
                                                   is_fp8_kvcache=cache.fp8, compute_dtype=np.float64)
            return out
        q_dtype = np.float32 if cache.fp8 else cache.dtype
        out, _ = api.flash_mla_with_kvcache(q_full.astype(q_dtype), cache.k_cache, table, seqlens, c.kv_lora_rank,
                                            softmax_scale=self.softmax_scale, causal=True,
                                            is_fp8_kvcache=cache.fp8, backend=backend)
        return out

    # ------------------------------------------------------------------ training

    def forward(self, x, cu_seqlens=None, positions=None, *, causal: bool = True, dropout_p: float | None = None,
                seed: int = 0, checkpoint: bool = False, backend: str = "auto"):
        """Training forward over packed sequences. Returns ``(out, ctx)`` for :meth:`backward`.

        x: [b, s, hidden] or packed [total, hidden] with cu_seqlens [b + 1] (default: one sequence).
        positions: int [total] (default: 0.. within each sequence). dropout_p defaults to
        ``config.dropout_p``; ``seed`` drives the counter-based dropout RNG (backward reuses it).
        checkpoint: keep only x and recompute everything else in backward.
        """
        shape = tuple(x.shape)
        x = self._as_input(x)
        if x.ndim == 3:
            b, s = x.shape[:2]
            cu = np.arange(b + 1, dtype=np.int64) * s
            x = x.reshape(b * s, -1)
        else:
            cu = (np.asarray([0, x.shape[0]], dtype=np.int64) if cu_seqlens is None
                  else _arrays.asnumpy(cu_seqlens).astype(np.int64))
        if positions is None:
            positions = np.concatenate([np.arange(int(cu[i + 1] - cu[i])) for i in range(len(cu) - 1)])
        p = self.config.dropout_p if dropout_p is None else float(dropout_p)
        ctx = LayerContext(x=x, positions=positions, cu_seqlens=cu, causal=bool(causal), dropout_p=p,
                           seed=int(seed), backend=backend, checkpoint=bool(checkpoint), shape=shape)
        saved: dict = {}
        out = self._forward_saving(ctx, saved)
        if not checkpoint:
            ctx.saved = saved
        return out.reshape(shape), ctx

    def _forward_saving(self, ctx: LayerContext, saved: dict):
        q, c_kv, k_pe = self._project(ctx.x, ctx.positions, keep=saved)
        k, v = self._decompress(c_kv, k_pe)
        cu = self.xp.asarray(ctx.cu_seqlens.astype(np.int32))
        o, lse = flash_attn_varlen_forward(q, k, v, cu, cu, dropout_p=ctx.dropout_p,
                                           softmax_scale=self.softmax_scale, causal=ctx.causal, seed=ctx.seed,
                                           backend=ctx.backend)
        saved.update(q=q, k=k, v=v, o=o, lse=lse)
        return self._out_proj(o)

    def backward(self, dout, ctx: LayerContext):
        """Gradients of ``forward``: returns ``(dx shaped like x, {weight name: grad})``."""
        c, w, xp = self.config, self.weights, self.xp
        saved = ctx.saved
        if ctx.checkpoint or not saved:
            saved = {}
            self._forward_saving(ctx, saved)  # recompute (same seed: same dropout mask)
        x = ctx.x
        n = x.shape[0]
        dout = xp.asarray(dout).astype(self.dtype).reshape(n, c.hidden_size)
        grads: dict[str, Any] = {}
        o = saved["o"]
        grads["o_proj.weight"] = dout.T @ o.reshape(n, -1)
        do = (dout @ w["o_proj.weight"]).reshape(o.shape)
        cu = xp.asarray(ctx.cu_seqlens.astype(np.int32))
        dq, dk, dv = flash_attn_varlen_backward(do, saved["q"], saved["k"], saved["v"], o, saved["lse"], cu, cu,
                                                dropout_p=ctx.dropout_p, softmax_scale=self.softmax_scale,
                                                causal=ctx.causal, seed=ctx.seed, backend=ctx.backend)
        nope = c.qk_nope_head_dim
        # K = [k_nope | broadcast k_pe]: the shared k_pe collects the gradient of every head
        dk_pe = dk[..., nope:].sum(axis=1)
        dkv = xp.concatenate([dk[..., :nope], dv], axis=-1).reshape(n, -1)
        grads["kv_b_proj.weight"] = dkv.T @ saved["c_kv"]
        dc_kv = dkv @ w["kv_b_proj.weight"]
        dckv_raw, grads["kv_a_layernorm.weight"] = _rms_norm_backward(dc_kv, saved["ckv_raw"],
                                                                      w["kv_a_layernorm.weight"], c.rms_norm_eps)
        dkv_a = xp.concatenate([dckv_raw, self._rope(dk_pe, ctx.positions, inverse=True)], axis=-1)
        grads["kv_a_proj_with_mqa.weight"] = dkv_a.T @ x
        dx = dkv_a @ w["kv_a_proj_with_mqa.weight"]
        dq = xp.concatenate([dq[..., :nope], self._rope(dq[..., nope:], ctx.positions, inverse=True)],
                            axis=-1).reshape(n, -1)
        if c.q_lora_rank is None:
            grads["q_proj.weight"] = dq.T @ x
            dx = dx + dq @ w["q_proj.weight"]
        else:
            grads["q_b_proj.weight"] = dq.T @ saved["cq"]
            dcq = dq @ w["q_b_proj.weight"]
            dcq_raw, grads["q_a_layernorm.weight"] = _rms_norm_backward(dcq, saved["cq_raw"],
                                                                        w["q_a_layernorm.weight"], c.rms_norm_eps)
            grads["q_a_proj.weight"] = dcq_raw.T @ x
            dx = dx + dcq_raw @ w["q_a_proj.weight"]
        return dx.reshape(ctx.shape), grads


# ----------------------------------------------------------------------------------------------
# a toy decode loop


def _feedback(h):
    """Next input from a hidden state: RMS-normalised (keeps a toy loop's values bounded)."""
    xp = _xp_of(h)
    return h / xp.sqrt((h * h).mean(axis=-1, keepdims=True) + 1e-6)


def generate(layers: Sequence[MultiHeadLatentAttention], prompt, steps: int, *, caches=None,
             num_blocks: int | None = None, absorbed: bool = True, backend: str = "auto"):
    """Toy decode loop: a stack of MLA layers (residual: ``h <- h + layer(h)``) over paged caches.

    prompt: [b, s0, hidden] (NumPy or CuPy, like the layers). The prompt is prefilled through every
    layer, then ``steps`` decode steps run; each step's input is the RMS-normalised last hidden
    state, appended (as its latent) to every layer's cache. Returns ``(inputs [b, s0 + steps,
    hidden], hidden [b, s0 + steps, hidden], caches)``: ``hidden`` of the whole sequence through the
    stack, so a single long prefill of ``inputs`` must reproduce it (the test does).
    """
    if not layers:
        raise ValueError("layers: expected at least one layer")
    xp = layers[0].xp
    prompt = xp.asarray(prompt)
    b, s0, _ = prompt.shape
    c = layers[0].config
    if caches is None:
        blocks = num_blocks or b * (-(-(s0 + steps) // c.page_block_size)) + b
        caches = [layer.new_cache(blocks) for layer in layers]
    ids = list(range(b))
    h = prompt.astype(layers[0].dtype)
    for layer, cache in zip(layers, caches):
        h = h + layer.prefill(h, cache, ids, backend=backend)
    inputs, hidden = [prompt.astype(layers[0].dtype)], [h]
    last = h[:, -1]
    for _ in range(steps):
        x = _feedback(last)
        h = x
        for layer, cache in zip(layers, caches):
            h = h + layer.decode(h, cache, ids, absorbed=absorbed, backend=backend)
        inputs.append(x[:, None])
        hidden.append(h[:, None])
        last = h
    return xp.concatenate(inputs, axis=1), xp.concatenate(hidden, axis=1), caches
