"""Array kinds and dtypes: NumPy on the host, CuPy (or anything CUDA-array-like) on the device.

Rules (DESIGN.md §2): NumPy in -> NumPy out; CuPy in -> CuPy out; any object with
``__cuda_array_interface__`` or a CUDA ``__dlpack__`` (Numba device arrays, torch/JAX tensors) is
taken zero-copy as a CuPy array and results come back as CuPy arrays. Host objects that are not
``numpy.ndarray`` (lists, CPU DLPack tensors) are converted with ``numpy.asarray`` / ``from_dlpack``.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)
FLOAT_DTYPE_NAMES = "float32, float16 or bfloat16 (ml_dtypes.bfloat16)"

_DLPACK_CUDA_DEVICE_TYPES = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


@functools.lru_cache(maxsize=1)
def cupy_module():
    """The cupy module, or None when CuPy is not installed."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    cp = cupy_module()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_device_array(x) -> bool:
    """Does x live on a CUDA device (CuPy, CUDA array interface, or a CUDA DLPack tensor)?"""
    if isinstance(x, np.ndarray) or x is None:
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in _DLPACK_CUDA_DEVICE_TYPES
        except Exception:
            return False
    return False


def to_host(x, name: str) -> np.ndarray:
    """A host object as a NumPy array (no copy for ndarrays)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not is_device_array(x):
        try:
            return np.from_dlpack(x)
        except Exception:
            pass
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from exc


def to_cupy(x, name: str):
    """A device object as a CuPy array, zero-copy."""
    cp = cupy_module()
    if cp is None:
        raise TypeError(f"{name} is a device array ({type(x).__name__}) but CuPy is not installed; "
                        "install the cuda12 or cuda13 extra")
    if isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cp.asarray(x)
    return cp.from_dlpack(x)


def device_id(x) -> int:
    """The CUDA device ordinal of a CuPy array."""
    return int(x.device.id)


def asnumpy(x) -> np.ndarray:
    """Any array as NumPy (copies device arrays to the host)."""
    if isinstance(x, np.ndarray):
        return x
    cp = cupy_module()
    if cp is not None and isinstance(x, cp.ndarray):
        return cp.asnumpy(x)
    return np.asarray(x)


def dtype_name(dt) -> str:
    """A dtype's name for messages ('bfloat16' rather than ml_dtypes' 'V2'-like repr)."""
    dt = np.dtype(dt)
    return "bfloat16" if dt == BFLOAT16 else dt.name


def resolve_dtype(dtype) -> np.dtype:
    """A float dtype from a name ('bfloat16', 'bf16', 'float16', 'fp16', 'float32') or a dtype."""
    aliases = {"bf16": BFLOAT16, "bfloat16": BFLOAT16, "fp16": np.dtype(np.float16), "half": np.dtype(np.float16),
               "fp32": np.dtype(np.float32), "float": np.dtype(np.float32)}
    if isinstance(dtype, str) and dtype.lower() in aliases:
        return aliases[dtype.lower()]
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be {FLOAT_DTYPE_NAMES}, got {dtype_name(dt)}")
    return dt
