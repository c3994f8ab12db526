"""The MLA layer (NumPy): absorbed decode == naive MHA decode, cache round trips, RoPE, loading,
gradients against finite differences, gradient checkpointing, the toy decode loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mla.config import MLAConfig, yarn_get_mscale
from mla.layer import MultiHeadLatentAttention, apply_rope, generate, rms_norm, rope_inv_freq

HIDDEN = 64


def small_config(**overrides) -> MLAConfig:
    fields = dict(hidden_size=HIDDEN, num_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                  v_head_dim=16, q_lora_rank=24, page_block_size=16, max_seq_len=512, dtype="float32")
    fields.update(overrides)
    return MLAConfig(**fields)


YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "qlora": small_config(),
    "no_qlora_halfsplit": small_config(q_lora_rank=None, rope_interleave=False),
    "yarn": small_config(rope_scaling=YARN),
}


def _x(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absorbed_decode_equals_naive_float64(name):
    cfg = CONFIGS[name]
    layer = MultiHeadLatentAttention.random(cfg, seed=1, dtype=np.float64)
    ca, cn = layer.new_cache(16), layer.new_cache(16)
    prompt = _x((3, 21, HIDDEN))
    np.testing.assert_array_equal(layer.prefill(prompt, ca, [0, 1, 2]), layer.prefill(prompt, cn, [0, 1, 2]))
    for step in range(3):
        x = _x((3, 2 if step == 1 else 1, HIDDEN), seed=10 + step)   # s_q = 2 (MTP-style) once
        a = layer.decode(x, ca, [0, 1, 2], absorbed=True)
        b = layer.decode(x, cn, [0, 1, 2], absorbed=False)
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_absorbed_decode_through_flash_mla_api_float32(monkeypatch):
    """float32 layers send the 576-style latent query (here d = 32 + 16) to mla.flash_mla_with_kvcache."""
    from mla import api
    calls = []
    real = api.flash_mla_with_kvcache

    def spy(q, k_cache, *args, **kwargs):
        calls.append((q.shape, k_cache.shape, args[2] if len(args) > 2 else kwargs.get("head_dim_v")))
        return real(q, k_cache, *args, **kwargs)

    monkeypatch.setattr(api, "flash_mla_with_kvcache", spy)
    cfg = small_config()
    layer = MultiHeadLatentAttention.random(cfg, seed=2)
    ca, cn = layer.new_cache(12), layer.new_cache(12)
    prompt = _x((2, 30, HIDDEN), dtype=np.float32)
    layer.prefill(prompt, ca, ["a", "b"])
    layer.prefill(prompt, cn, ["a", "b"])
    x = _x((2, HIDDEN), seed=3, dtype=np.float32)
    a = layer.decode(x, ca, ["a", "b"])
    b = layer.decode(x, cn, ["a", "b"], absorbed=False)
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert calls and calls[0][0] == (2, 1, 4, cfg.head_dim) and calls[0][1][-1] == 48 and calls[0][2] == 32


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_long_prefill(name):
    cfg = CONFIGS[name]
    layer = MultiHeadLatentAttention.random(cfg, seed=4, dtype=np.float64)
    total = 40                                          # crosses pages of 16 at 16 and 32
    x = _x((2, total, HIDDEN), seed=5)
    long_cache = layer.new_cache(16)
    want = layer.prefill(x, long_cache, [0, 1])
    cache = layer.new_cache(16)
    got = [layer.prefill(x[:, :13], cache, [0, 1])]
    got.append(layer.prefill(x[:, 13:20], cache, [0, 1]))    # chunked prefill continues positions
    for t in range(20, total):
        got.append(layer.decode(x[:, t], cache, [0, 1])[:, None])
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-10, atol=1e-11)
    # the cache holds the same latents
    np.testing.assert_allclose(cache.gather(0), long_cache.gather(0), rtol=1e-6, atol=1e-7)


def test_prefill_varlen_packed_equals_separate():
    cfg = small_config()
    layer = MultiHeadLatentAttention.random(cfg, seed=6, dtype=np.float64)
    lens = [5, 0, 19]
    x = _x((sum(lens), HIDDEN), seed=7)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    packed = layer.prefill(x, layer.new_cache(8), ["p", "q", "r"], cu_seqlens=cu)
    for i in range(len(lens)):
        alone = layer.prefill(x[cu[i]:cu[i + 1]], layer.new_cache(8), ["s"])
        np.testing.assert_allclose(packed[cu[i]:cu[i + 1]], alone, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_is_relative_and_crosses_pages(interleave):
    """q(t)·k(u) depends on t - u only, at positions on either side of page boundaries."""
    cfg = small_config(rope_interleave=interleave)
    inv, mag = rope_inv_freq(cfg)
    q, k = _x((1, 16), 1), _x((1, 16), 2)

    def dot(t, u):
        return float(apply_rope(q, [t], inv, mag, interleave)[0] @ apply_rope(k, [u], inv, mag, interleave)[0])

    for t, u in [(15, 3), (16, 4), (63, 51), (64, 52), (300, 288)]:
        assert dot(t, u) == pytest.approx(dot(12, 0), rel=1e-9, abs=1e-12)
    # the inverse rotation undoes the rotation
    y = apply_rope(q, [77], inv, mag, interleave)
    np.testing.assert_allclose(apply_rope(y, [77], inv, mag, interleave, inverse=True), q, atol=1e-12)


def test_rope_interleaved_is_halfsplit_on_permuted_channels():
    """HF's DeepSeek RoPE de-interleaves then rotates halves: same rotation, permuted layout."""
    cfg = small_config()
    inv, mag = rope_inv_freq(cfg)
    x = _x((5, 3, 16), 3)
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
    pos = np.arange(5) * 7
    inter = apply_rope(x, pos, inv, mag, interleave=True)
    half = apply_rope(x[..., perm], pos, inv, mag, interleave=False)
    np.testing.assert_allclose(inter[..., perm], half, atol=1e-12)


def test_yarn_frequencies_and_scale():
    cfg = small_config(rope_scaling=YARN)
    inv, mag = rope_inv_freq(cfg)
    plain, one = rope_inv_freq(small_config())
    assert one == 1.0 and mag == pytest.approx(yarn_get_mscale(40, 0.707) / yarn_get_mscale(40, 0.707))
    assert inv[0] == pytest.approx(plain[0])                      # fast dims extrapolate
    assert inv[-1] == pytest.approx(plain[-1] / 40)              # slow dims interpolate
    m = 0.1 * 0.707 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m)
    layer = MultiHeadLatentAttention.random(cfg)
    assert layer.softmax_scale == cfg.softmax_scale


def test_rms_norm():
    x = _x((3, 8))
    w = _x((8,), 1)
    y = rms_norm(x, w, 1e-6)
    np.testing.assert_allclose(y, w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6))


# ------------------------------------------------------------------------------------------ loading


def test_from_state_dict_hf_names_and_prefix():
    cfg = small_config()
    ref = MultiHeadLatentAttention.random(cfg, seed=8)
    sd = {f"model.layers.3.self_attn.{k}": v.copy() for k, v in ref.state_dict().items()}
    sd["model.layers.3.mlp.gate_proj.weight"] = np.zeros((2, 2), np.float32)
    layer = MultiHeadLatentAttention.from_state_dict(sd, cfg)
    layer2 = MultiHeadLatentAttention.from_state_dict(sd, cfg, prefix="model.layers.3.self_attn.")
    x = _x((1, 9, HIDDEN), dtype=np.float32)
    want = ref.prefill(x, ref.new_cache(4), [0])
    np.testing.assert_array_equal(layer.prefill(x, layer.new_cache(4), [0]), want)
    np.testing.assert_array_equal(layer2.prefill(x, layer2.new_cache(4), [0]), want)
    bf16 = {k: v.astype("bfloat16") for k, v in ref.state_dict().items()}
    assert MultiHeadLatentAttention.from_state_dict(bf16, cfg).dtype == np.float32
    assert ref.weights["kv_b_proj.weight"].shape == (4 * 32, 32)         # [out, in]
    assert ref.weights["kv_a_proj_with_mqa.weight"].shape == (48, HIDDEN)


def test_from_state_dict_errors():
    cfg = small_config()
    sd = MultiHeadLatentAttention.random(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "q_b_proj.weight"}
    with pytest.raises(ValueError, match="q_b_proj.weight"):
        MultiHeadLatentAttention.from_state_dict(missing, cfg)
    bad = dict(sd, **{"kv_b_proj.weight": sd["kv_b_proj.weight"].T})
    with pytest.raises(ValueError, match=r"kv_b_proj.weight.*\[out, in\]"):
        MultiHeadLatentAttention.from_state_dict(bad, cfg)
    with pytest.raises(ValueError, match="q_proj.weight"):
        MultiHeadLatentAttention.from_state_dict(sd, cfg.replace(q_lora_rank=None))


def test_wrong_cache_is_rejected():
    layer = MultiHeadLatentAttention.random(small_config())
    from mla.cache import PagedKVCache
    with pytest.raises(ValueError, match="head_dim"):
        layer.prefill(_x((1, 3, HIDDEN), dtype=np.float32), PagedKVCache(4, head_dim=40), [0])


# ------------------------------------------------------------------------------------------ training


def _directional_check(layer, x, cu, dropout_p, checkpoint, seed=3):
    """Gradients vs central differences along random directions (float64)."""
    rng = np.random.default_rng(11)
    out, ctx = layer.forward(x, cu_seqlens=cu, dropout_p=dropout_p, seed=seed, checkpoint=checkpoint)
    r = rng.standard_normal(out.shape)

    def loss(xx):
        return float((layer.forward(xx, cu_seqlens=cu, dropout_p=dropout_p, seed=seed)[0] * r).sum())

    dx, grads = layer.backward(r, ctx)
    eps = 1e-6
    direction = rng.standard_normal(x.shape)
    fd = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    assert float((dx * direction).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-8)
    for name, w in layer.weights.items():
        direction = rng.standard_normal(w.shape)
        w0 = w.copy()
        w += eps * direction
        up = loss(x)
        w[...] = w0 - eps * direction
        down = loss(x)
        w[...] = w0
        fd = (up - down) / (2 * eps)
        assert float((grads[name] * direction).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-8), name
    return dx, grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_gradients_finite_differences(name):
    layer = MultiHeadLatentAttention.random(CONFIGS[name], seed=9, dtype=np.float64)
    lens = [7, 18]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    _directional_check(layer, _x((sum(lens), HIDDEN), 12), cu, dropout_p=0.0, checkpoint=False)


def test_layer_gradients_with_dropout_and_checkpointing():
    layer = MultiHeadLatentAttention.random(small_config(), seed=10, dtype=np.float64)
    cu = np.array([0, 11, 24], np.int32)
    x = _x((24, HIDDEN), 13)
    dx, grads = _directional_check(layer, x, cu, dropout_p=0.25, checkpoint=False)
    dx_c, grads_c = _directional_check(layer, x, cu, dropout_p=0.25, checkpoint=True)
    np.testing.assert_array_equal(dx, dx_c)
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_c[k])


def test_checkpointing_saves_memory():
    layer = MultiHeadLatentAttention.random(small_config(), seed=11)
    x = _x((2, 64, HIDDEN), dtype=np.float32)
    _, full = layer.forward(x)
    _, ckpt = layer.forward(x, checkpoint=True)
    assert ckpt.saved_bytes == x.nbytes
    assert full.saved_bytes > 5 * ckpt.saved_bytes


def test_forward_matches_prefill():
    """Training forward (no cache) == cache prefill for fresh sequences (the cache is float32, so
    prefill's keys are rounded: float32 tolerance)."""
    layer = MultiHeadLatentAttention.random(small_config(), seed=12, dtype=np.float64)
    x = _x((2, 33, HIDDEN), 14)
    out, _ = layer.forward(x)
    np.testing.assert_allclose(out, layer.prefill(x, layer.new_cache(8), [0, 1]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ decode loop


@pytest.mark.parametrize("absorbed", [True, False])
def test_generate_equals_one_long_prefill(absorbed):
    cfg = small_config()
    layers = [MultiHeadLatentAttention.random(cfg, seed=s, dtype=np.float64) for s in range(3)]
    prompt = _x((2, 10, HIDDEN), 15)
    inputs, hidden, caches = generate(layers, prompt, steps=12, absorbed=absorbed)
    assert inputs.shape == hidden.shape == (2, 22, HIDDEN)
    assert all(c.seqlen(0) == 22 for c in caches)
    h = inputs
    for layer in layers:
        h = h + layer.prefill(h, layer.new_cache(8), [0, 1])
    np.testing.assert_allclose(hidden, h, rtol=1e-9, atol=1e-10)
