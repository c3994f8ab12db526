"""mla: Multi-head Latent Attention decoding with a paged KV cache, from Python, without torch.

    import mla
    sched, num_splits = mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                          sched, num_splits, causal=True)

Backends: "numpy" (the reference), "numba" (Numba CUDA kernels), "cupy" (CuPy RawKernels);
"auto" picks CuPy for device arrays and NumPy for host arrays. See README.md and docs/.
"""

from __future__ import annotations


def _attach_kernels() -> None:
    """Make ``mla.kernels`` importable from a source checkout that was not pip-installed.

    Installed (``pip install .`` or ``-e .``), setuptools maps the top-level ``kernels/`` folder
    to ``mla.kernels``. Run from the repository without installing, this does the same mapping.
    """
    import importlib.util
    import pathlib
    import sys

    if "mla.kernels" in sys.modules:
        return
    try:
        if importlib.util.find_spec("mla.kernels") is not None:
            return
    except ImportError:
        pass
    src = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if (src / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location("mla.kernels", src / "__init__.py",
                                                      submodule_search_locations=[str(src)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mla.kernels"] = module
        spec.loader.exec_module(module)
        globals()["kernels"] = module


_attach_kernels()

from . import layer, prefill, reference, scheduler  # noqa: E402
from ._arrays import BFLOAT16 as bfloat16  # noqa: E402
from .api import BACKENDS, MLASchedMeta, flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from .cache import CacheExhaustedError, PagedKVCache  # noqa: E402
from .config import MLAConfig  # noqa: E402
from .fp8 import FP8_TOKEN_BYTES, dequantize_kv_fp8, quantize_kv_fp8  # noqa: E402
from .layer import MultiHeadLatentAttention, generate  # noqa: E402
from .prefill import (  # noqa: E402
    dropout_keep_mask,
    flash_attn_varlen_backward,
    flash_attn_varlen_forward,
    flash_attn_varlen_func,
)
from .sparse import flash_mla_sparse_fwd  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CacheExhaustedError",
    "FP8_TOKEN_BYTES",
    "MLAConfig",
    "MLASchedMeta",
    "MultiHeadLatentAttention",
    "PagedKVCache",
    "bfloat16",
    "dequantize_kv_fp8",
    "dropout_keep_mask",
    "flash_attn_varlen_backward",
    "flash_attn_varlen_forward",
    "flash_attn_varlen_func",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "generate",
    "get_mla_metadata",
    "layer",
    "prefill",
    "quantize_kv_fp8",
    "reference",
    "scheduler",
]
