"""The Numba kernels under the CUDA simulator (CPU CI): v1 + combine against the reference.

The simulator must be switched on before numba.cuda is first imported, and other tests in this
pytest process may already have imported it, so the cases run in one subprocess with
NUMBA_ENABLE_CUDASIM=1; each test then checks its case's result.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
from _subprocess import simulator_results  # noqa: E402

CASES = {
    # name: make_decode_case kwargs (tiny dims: the simulator runs every thread in Python)
    "varlen_splits_f32": dict(b=3, s_q=1, h_q=1, h_kv=1, d=8, head_dim_v=8, page_block_size=16,
                              seqlens=[0, 70, 600]),
    "causal_sq2_hkv2_f16": dict(b=2, s_q=2, h_q=4, h_kv=2, d=8, head_dim_v=8, page_block_size=4,
                                seqlens=[9, 3], dtype="float16", causal=True),
    "causal_sq3_hkv3_f32": dict(b=2, s_q=3, h_q=3, h_kv=3, d=12, head_dim_v=4, page_block_size=8,
                                seqlens=[2, 11], causal=True),
    "all_zero_length": dict(b=2, s_q=1, h_q=2, h_kv=1, d=8, head_dim_v=8, page_block_size=4,
                            seqlens=[0, 0]),
    "page_not_dividing_64_f16": dict(b=1, s_q=1, h_q=2, h_kv=1, d=8, head_dim_v=6, page_block_size=24,
                                     seqlens=[100], dtype="float16"),
}

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mla
    from mla import reference, testing
    from mla.backends import numba_backend
    cases = json.loads(sys.argv[1])
    results = {}
    for name, kw in cases.items():
        try:
            rng = np.random.default_rng(abs(hash(name)) % 2**32)
            case = testing.make_decode_case(rng, **kw)
            h_kv = kw["h_kv"]
            sched, splits = mla.get_mla_metadata(case.cache_seqlens, kw["s_q"] * kw["h_q"] // h_kv, h_kv,
                                                 num_sms=8)  # 8 workers: the long sequence is split
            out, lse = mla.flash_mla_with_kvcache(*case.args(), sched, splits, causal=case.causal,
                                                  backend="numba")
            ref_out, ref_lse = reference.flash_mla_reference(*case.args(), causal=case.causal)
            testing.assert_close(out, lse, ref_out, ref_lse)
            assert out.dtype == case.q.dtype and isinstance(out, np.ndarray)
            results[name] = ["ok", int(splits[-1])]
        except Exception as exc:  # report, the test prints it
            import traceback
            results[name] = ["fail", traceback.format_exc()]
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(_SCRIPT, CASES, timeout=600, MLA_NUMBA_VERSION="1")


@pytest.mark.parametrize("name", sorted(CASES))
def test_numba_v1_simulator(sim_results, name):
    status = sim_results[name]
    assert status[0] == "ok", status[1]


def test_splits_exercised(sim_results):
    """The long varlen case really runs several splits per sequence (combine is tested)."""
    status = sim_results["varlen_splits_f32"]
    assert status[0] == "ok", status[1]
    assert status[1] > 3, f"expected more partials than sequences, got {status[1]}"
