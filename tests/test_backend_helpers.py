"""CPU checks of small helpers the GPU paths share (layout check, launch timing, sanitizer runner)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mla import testing
from mla.backends import cupy_backend


def _fake_device_array(contiguous=True, ptr=256, shape=(2, 3)):
    return SimpleNamespace(flags=SimpleNamespace(c_contiguous=contiguous), data=SimpleNamespace(ptr=ptr),
                           strides=(24, 8), shape=shape)


def test_layout_reason_names_the_argument():
    ok = SimpleNamespace(on_device=True, q=_fake_device_array(), k_cache=_fake_device_array())
    assert cupy_backend._layout_reason(ok) is None
    strided = SimpleNamespace(on_device=True, q=_fake_device_array(), k_cache=_fake_device_array(contiguous=False))
    assert "C-contiguous k_cache" in cupy_backend._layout_reason(strided)
    misaligned = SimpleNamespace(on_device=True, q=_fake_device_array(ptr=258), k_cache=_fake_device_array())
    assert "q 16-byte aligned" in cupy_backend._layout_reason(misaligned)
    host = SimpleNamespace(on_device=False, q=None, k_cache=None)
    assert cupy_backend._layout_reason(host) is None


def test_time_launches_median_drops_warmup():
    calls, fills = [], []
    elapsed = iter([1.0, 3.0, 2.0])  # ms, read only for the timed reps (the 3 warm-ups are not read)

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    cp = SimpleNamespace(cuda=SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: next(elapsed)))
    flush = SimpleNamespace(fill=fills.append)
    launches = [(lambda grid, block, args, shared_mem: calls.append((grid, block, args, shared_mem)),
                 (1,), (32,), ("x",), 0)]
    t = cupy_backend.time_launches(cp, launches, flush, reps=3)
    assert np.isclose(t, 2e-3) and len(calls) == 6 and fills == [0, 1, 2, 3, 4, 5]


def test_run_compute_sanitizer_without_the_tool(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert testing.run_compute_sanitizer("memcheck", "print('SANITIZE-DONE')") is None


def test_sanitizer_forgives_only_the_driver_symbol_probes():
    """numba-cuda's start-up cuGetProcAddress refusals (memcheck API errors) are forgiven; nothing else is."""
    probe = ('========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call '
             'to cuGetProcAddress_v2.\n=========     Saved host backtrace up to driver entry point at error\n')
    kernel = "========= Invalid __global__ read of size 16 bytes\n=========     at mla_decode+0x1a0\n"
    only_probes = probe * 34 + "========= ERROR SUMMARY: 34 errors\n"
    assert testing._only_driver_probe_errors(only_probes)
    assert not testing._only_driver_probe_errors(probe * 34 + kernel + "========= ERROR SUMMARY: 35 errors\n")
    assert not testing._only_driver_probe_errors(probe + "========= ERROR SUMMARY: 2 errors\n")
    assert not testing._only_driver_probe_errors("========= ERROR SUMMARY: 0 errors\n")
    assert not testing._only_driver_probe_errors(probe * 2)  # no summary: the run did not finish
