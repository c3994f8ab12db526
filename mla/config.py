"""``MLAConfig``: the shapes and options of one Multi-head Latent Attention layer and its cache.

MLA (DeepSeek-V2/V3) compresses keys and values into a latent ``c_kv`` of ``kv_lora_rank``
channels plus a decoupled RoPE key ``k_pe`` of ``qk_rope_head_dim`` channels, shared by all query
heads. Decoding caches only ``[c_kv | k_pe]`` per token, so the derived sizes are::

    head_dim    = kv_lora_rank + qk_rope_head_dim   576: cache width d (the `d` of q and k_cache)
    head_dim_v  = kv_lora_rank                      512: decode output width d_v (V = first 512)
    qk_head_dim = qk_nope_head_dim + qk_rope_head_dim  192: per-head q/k width in prefill (MHA mode)
    cache_bytes_per_token = 656 * num_kv_heads (fp8) or head_dim * itemsize * num_kv_heads
    max_blocks_per_seq    = ceil(max_seq_len / page_block_size)

``num_kv_heads`` counts *latent cache* heads (1 for DeepSeek: every query head reads the same
latent), not Hugging Face's ``num_key_value_heads`` (which describes the decompressed MHA form).

The config is a frozen dataclass built by keyword; ``__post_init__`` validates every field and
raises ``ValueError`` (``TypeError`` for a wrong type) naming the field, the expected and the
actual value. ``dtype`` may be given as a name or a NumPy/ml_dtypes dtype and is stored as its
name ("float32", "float16" or "bfloat16"). ``rope_scaling`` is stored as a copy (a plain dict, or
None); mutate it and you are on your own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["MLAConfig"]

_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_FP8_TOKEN_BYTES = 656  # mla.fp8.FP8_TOKEN_BYTES; kept literal so the config imports nothing heavy
_ROPE_SCALING_TYPES = ("yarn",)
_POSITIVE_INT_FIELDS = (
    "max_seq_len", "page_block_size", "num_heads", "num_kv_heads", "kv_lora_rank",
    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "hidden_size",
)

# Hugging Face DeepSeek config key -> MLAConfig field (keys not listed are ignored).
_HF_KEYS = {
    "num_attention_heads": "num_heads",
    "hidden_size": "hidden_size",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "v_head_dim": "v_head_dim",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_seq_len",
    "rope_interleave": "rope_interleave",
}

_DEEPSEEK_V3_ROPE_SCALING = {
    "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}
_DEEPSEEK_V2_ROPE_SCALING = {
    "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    return is_number and not isinstance(value, (bool, np.bool_))


def _dtype_name(dtype: Any) -> str:
    """'float32' | 'float16' | 'bfloat16' from a name or a dtype; ValueError otherwise."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    for name, candidate in _DTYPES.items():
        if dt == candidate:
            return name
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN attention-magnitude factor: ``0.1 * mscale * ln(scale) + 1`` (1 if scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _validate_rope_scaling(rope_scaling: Any) -> dict | None:
    """Check a YaRN ``rope_scaling`` dict (DeepSeek / Hugging Face keys) and return a copy."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    scaling = dict(rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in _ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling: expected 'type' (or 'rope_type') in {list(_ROPE_SCALING_TYPES)}, "
                         f"got {kind!r}")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ValueError(f"rope_scaling: expected key {key!r} for YaRN, got keys {sorted(scaling)}")
    factor = scaling["factor"]
    if not _is_real(factor) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"rope_scaling['factor']: expected a finite number >= 1, got {factor!r}")
    original = scaling["original_max_position_embeddings"]
    if not _is_int(original) or original < 1:
        raise ValueError(f"rope_scaling['original_max_position_embeddings']: expected a positive int, "
                         f"got {original!r}")
    for key in ("beta_fast", "beta_slow"):
        if key in scaling:
            value = scaling[key]
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rope_scaling[{key!r}]: expected a finite number > 0, got {value!r}")
    if scaling.get("beta_fast", 32) < scaling.get("beta_slow", 1):
        raise ValueError(f"rope_scaling: expected beta_fast >= beta_slow, got beta_fast="
                         f"{scaling.get('beta_fast', 32)!r}, beta_slow={scaling.get('beta_slow', 1)!r}")
    for key in ("mscale", "mscale_all_dim"):
        if key in scaling:
            value = scaling[key]
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"rope_scaling[{key!r}]: expected a finite number >= 0, got {value!r}")
    return scaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Shapes and options of an MLA layer and its paged latent cache (DeepSeek-V3 defaults).

    Fields:
        max_seq_len: longest sequence (cache positions) a sequence may reach.
        page_block_size: tokens per cache block (page); FlashMLA uses 64.
        num_heads: query heads ``h_q``.
        num_kv_heads: latent cache heads ``h_kv`` (1 for DeepSeek); ``num_heads % num_kv_heads == 0``.
        kv_lora_rank: latent width ``d_c`` of ``c_kv`` (512).
        qk_rope_head_dim: decoupled RoPE width ``d_r`` (64), even.
        qk_nope_head_dim: per-head non-RoPE q/k width (128).
        v_head_dim: per-head value width after ``W_UV`` (128).
        q_lora_rank: query compression rank ``d_c'`` (1536), or None for a direct ``q_proj``.
        hidden_size: model width (7168).
        dtype: activations and cache dtype name: "float32", "float16" or "bfloat16".
        fp8_kvcache: store the cache in FlashMLA's 656-byte FP8 layout (needs 512 + 64 channels).
        dropout_p: attention dropout probability, training only, in ``[0, 1)``.
        rope_theta: RoPE base.
        rope_interleave: DeepSeek's interleaved-pair RoPE (True) or the half-split form (False).
        rope_scaling: YaRN dict as in DeepSeek's Hugging Face configs, or None.
        rms_norm_eps: epsilon of the RMSNorms on ``c_q`` and ``c_kv``.
    """

    max_seq_len: int = 4096
    page_block_size: int = 64
    num_heads: int = 128
    num_kv_heads: int = 1
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    q_lora_rank: int | None = 1536
    hidden_size: int = 7168
    dtype: str = "bfloat16"
    fp8_kvcache: bool = False
    dropout_p: float = 0.0
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int (>= 1), got {value}")
            object.__setattr__(self, name, int(value))
        if self.q_lora_rank is not None:
            if not _is_int(self.q_lora_rank):
                raise TypeError(f"q_lora_rank: expected a positive int or None, got {self.q_lora_rank!r}")
            if self.q_lora_rank < 1:
                raise ValueError(f"q_lora_rank: expected a positive int or None, got {self.q_lora_rank}")
            object.__setattr__(self, "q_lora_rank", int(self.q_lora_rank))
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads: expected a multiple of num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.num_heads}")
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim: expected an even number (RoPE rotates pairs), "
                             f"got {self.qk_rope_head_dim}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        for name in ("fp8_kvcache", "rope_interleave"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, bool(value))
        if self.fp8_kvcache and (self.kv_lora_rank, self.qk_rope_head_dim) != (512, 64):
            raise ValueError(f"fp8_kvcache: the FP8 layout needs kv_lora_rank=512 and qk_rope_head_dim=64, "
                             f"got kv_lora_rank={self.kv_lora_rank}, "
                             f"qk_rope_head_dim={self.qk_rope_head_dim}")
        if not _is_real(self.dropout_p) or not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p: expected a number in [0, 1), got {self.dropout_p!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "dropout_p", float(self.dropout_p))
        object.__setattr__(self, "rope_scaling", _validate_rope_scaling(self.rope_scaling))

    def __hash__(self) -> int:  # rope_scaling is a dict, so hash its sorted items instead
        values = tuple(
            tuple(sorted(self.rope_scaling.items())) if f.name == "rope_scaling" and self.rope_scaling
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        )
        return hash(values)

    # ------------------------------------------------------------------ derived sizes

    @property
    def head_dim(self) -> int:
        """Cache width ``d = kv_lora_rank + qk_rope_head_dim`` (576): ``[c_kv | k_pe]``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def head_dim_v(self) -> int:
        """Decode output width ``d_v = kv_lora_rank`` (512): V is the cache's first d_v channels."""
        return self.kv_lora_rank

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width in prefill: ``qk_nope_head_dim + qk_rope_head_dim`` (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def numpy_dtype(self) -> np.dtype:
        """``dtype`` as a NumPy dtype (bfloat16 is ``ml_dtypes.bfloat16``)."""
        return _DTYPES[self.dtype]

    @property
    def cache_bytes_per_token(self) -> int:
        """Cache bytes one token takes over all KV heads: 656 each in FP8, else d * itemsize each."""
        if self.fp8_kvcache:
            return _FP8_TOKEN_BYTES * self.num_kv_heads
        return self.head_dim * self.numpy_dtype.itemsize * self.num_kv_heads

    @property
    def max_blocks_per_seq(self) -> int:
        """Block-table width for a full-length sequence: ``ceil(max_seq_len / page_block_size)``."""
        return -(-self.max_seq_len // self.page_block_size)

    @property
    def yarn_mscale(self) -> float:
        """YaRN's softmax-scale correction ``m**2`` (1 without rope_scaling), as DeepSeek applies it.

        ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` when ``factor > 1`` and ``mscale_all_dim`` is
        set (DeepSeek's ``yarn_get_mscale``), else 1.
        """
        if self.rope_scaling is None:
            return 1.0
        mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
        if not mscale_all_dim:
            return 1.0
        m = yarn_get_mscale(float(self.rope_scaling["factor"]), float(mscale_all_dim))
        return m * m

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5 * yarn_mscale``: the attention scale of DeepSeek's MLA (prefill and decode)."""
        return self.qk_head_dim ** -0.5 * self.yarn_mscale

    # ------------------------------------------------------------------ presets and loading

    def replace(self, **changes: Any) -> MLAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def deepseek_v3(cls, **overrides: Any) -> MLAConfig:
        """DeepSeek-V3 / R1 attention: 128 heads, hidden 7168, q-LoRA 1536, latent 512 + RoPE 64,
        YaRN (factor 40 over 4096 positions, 163840 in all). ``overrides`` change any field."""
        fields: dict[str, Any] = dict(
            max_seq_len=163840, num_heads=128, hidden_size=7168, q_lora_rank=1536, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, rope_theta=10000.0,
            rope_scaling=dict(_DEEPSEEK_V3_ROPE_SCALING), rms_norm_eps=1e-6,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def deepseek_v2_lite(cls, **overrides: Any) -> MLAConfig:
        """DeepSeek-V2-Lite attention: 16 heads, hidden 2048, no q-LoRA, latent 512 + RoPE 64,
        YaRN (factor 40, mscale 0.707). ``overrides`` change any field."""
        fields: dict[str, Any] = dict(
            max_seq_len=163840, num_heads=16, hidden_size=2048, q_lora_rank=None, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, rope_theta=10000.0,
            rope_scaling=dict(_DEEPSEEK_V2_ROPE_SCALING), rms_norm_eps=1e-6,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> MLAConfig:
        """Build from a Hugging Face DeepSeek-V2/V3 ``config.json`` dict (or a ``PretrainedConfig``).

        Mapped keys: num_attention_heads -> num_heads, max_position_embeddings -> max_seq_len, and
        hidden_size, q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim,
        rope_theta, rope_scaling, rms_norm_eps, rope_interleave under their own names; torch_dtype
        (or dtype) when it is float32, float16 or bfloat16. Absent keys keep the field defaults;
        other keys (``num_key_value_heads`` included: the latent cache has one head) are ignored.
        ``overrides`` (e.g. ``page_block_size=64, fp8_kvcache=True``) win over the mapped values.
        """
        if hasattr(hf_config, "to_dict") and not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        if not isinstance(hf_config, Mapping):
            raise TypeError(f"hf_config: expected a dict (config.json) or a PretrainedConfig, "
                            f"got {type(hf_config).__name__}")
        fields: dict[str, Any] = {
            field: hf_config[key] for key, field in _HF_KEYS.items() if key in hf_config
        }
        for key in ("torch_dtype", "dtype"):
            name = hf_config.get(key)
            if isinstance(name, str) and name in _DTYPES:
                fields["dtype"] = name
                break
        fields.update(overrides)
        return cls(**fields)
