"""The roofline model of MLA decode: bytes, FLOPs, arithmetic intensity, the bound that applies.

Counting (DESIGN.md §5), for b sequences of mean length L, s_q query tokens, h_q query heads,
h_kv KV heads, d = 576 and d_v = 512::

    bytes = b * (s_q*h_q*d*2  +  L*h_kv*d_cache_bytes  +  s_q*h_q*d_v*2)      q read, cache read, out written
    FLOPs = 2 * b * h_q * s_q * L * (d + d_v)                                  q.k and p.v

The cache term dominates: decode reads each cached token once per KV head, whatever h_q is, so
MLA (h_kv = 1) turns more query heads into free arithmetic until it meets the tensor-core roof.
Time is bounded below by max(bytes / bandwidth, FLOPs / peak); the crossover intensity is
peak / bandwidth (about 260 FLOP/byte on an H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from .fp8 import FP8_TOKEN_BYTES

__all__ = ["Platform", "PLATFORMS", "DecodeShape", "decode_bytes", "decode_flops", "roofline"]


@dataclass(frozen=True)
class Platform:
    """A device's ceilings: bandwidth in GB/s (bytes read + written), dense bf16 rate in TFLOP/s."""

    name: str
    bandwidth_gbs: float
    bf16_tflops: float
    note: str = ""

    @property
    def ridge_intensity(self) -> float:
        """FLOP/byte at which compute time equals memory time."""
        return self.bf16_tflops * 1e12 / (self.bandwidth_gbs * 1e9)


PLATFORMS = {
    # measured on the project's H100 (DESIGN.md §5, 2026-11): copy 3.0 TB/s, bf16 matmul 756-793 TFLOP/s
    "h100": Platform("H100 SXM (measured)", 3000.0, 775.0, "device copy 3.0 TB/s; bf16 GEMM 756-793 TFLOP/s"),
    "h100-datasheet": Platform("H100 SXM (datasheet)", 3350.0, 989.0, "vendor peak, dense bf16"),
    "h200": Platform("H200 (measured here)", 4300.0, 790.0, "device copy ~4.3 TB/s"),
    "a100": Platform("A100 SXM 80GB (datasheet)", 2039.0, 312.0),
    "cpu": Platform("a laptop CPU (rough)", 50.0, 1.0, "order of magnitude only"),
}


@dataclass(frozen=True)
class DecodeShape:
    """A decode problem's sizes: q [b, s_q, h_q, d], cache rows of d (or the 656-byte FP8 layout)
    for h_kv heads over a mean length ``seqlen``, out [b, s_q, h_q, d_v]."""

    b: int
    s_q: int
    h_q: int
    seqlen: float  # mean cached length L
    h_kv: int = 1
    d: int = 576
    d_v: int = 512
    dtype_bytes: int = 2
    fp8: bool = False

    @property
    def cache_bytes_per_token(self) -> int:
        return FP8_TOKEN_BYTES if self.fp8 else self.d * self.dtype_bytes


def decode_bytes(shape: DecodeShape) -> float:
    """Fewest bytes a decode step must move: q and the cache read once, out written once."""
    s = shape
    return s.b * (s.s_q * s.h_q * s.d * s.dtype_bytes + s.seqlen * s.h_kv * s.cache_bytes_per_token
                  + s.s_q * s.h_q * s.d_v * s.dtype_bytes)


def decode_flops(shape: DecodeShape) -> float:
    """FLOPs of a decode step: 2 * b * h_q * s_q * L * (d + d_v) (q.k and p.v)."""
    s = shape
    return 2.0 * s.b * s.h_q * s.s_q * s.seqlen * (s.d + s.d_v)


@dataclass(frozen=True)
class Roofline:
    """Bytes, FLOPs and the time bounds of one decode step on one platform."""

    bytes: float
    flops: float
    intensity: float
    memory_time_s: float
    compute_time_s: float
    bound: str  # "memory" or "compute"

    @property
    def time_s(self) -> float:
        return max(self.memory_time_s, self.compute_time_s)

    def achieved(self, seconds: float) -> dict:
        """GB/s, TFLOP/s and the fraction of the roofline time for a measured duration."""
        return {"gbs": self.bytes / seconds / 1e9, "tflops": self.flops / seconds / 1e12,
                "roofline_fraction": self.time_s / seconds}


def roofline(shape: DecodeShape, platform: Platform | str = "h100") -> Roofline:
    """Where ``shape`` sits on ``platform``'s roofline."""
    if isinstance(platform, str):
        platform = PLATFORMS[platform]
    nbytes, flops = decode_bytes(shape), decode_flops(shape)
    mem_t = nbytes / (platform.bandwidth_gbs * 1e9)
    cmp_t = flops / (platform.bf16_tflops * 1e12)
    return Roofline(nbytes, flops, flops / nbytes, mem_t, cmp_t, "memory" if mem_t >= cmp_t else "compute")


def kv_cache_bytes_per_token(n_layers: int, n_heads: int, head_dim: int = 128, kind: str = "mla",
                             kv_lora_rank: int = 512, rope_dim: int = 64, n_kv_heads: int | None = None,
                             dtype_bytes: int = 2) -> int:
    """Cache bytes per token for MHA, GQA and MLA (the comparison that motivates MLA)."""
    if kind == "mha":
        return n_layers * 2 * n_heads * head_dim * dtype_bytes
    if kind == "gqa":
        return n_layers * 2 * (n_kv_heads or 8) * head_dim * dtype_bytes
    if kind == "mla":
        return n_layers * (kv_lora_rank + rope_dim) * dtype_bytes
    raise ValueError(f"kind must be 'mha', 'gqa' or 'mla', got {kind!r}")
