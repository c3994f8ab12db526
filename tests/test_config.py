"""mla.config.MLAConfig: defaults, derived sizes, presets, Hugging Face loading, one test per rule."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

from mla.config import MLAConfig

V3_HF_CONFIG = {  # the attention-relevant part of deepseek-ai/DeepSeek-V3's config.json
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
    "n_routed_experts": 256,
}

V2_LITE_HF_CONFIG = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
}


def test_defaults_and_derived_sizes():
    cfg = MLAConfig()
    assert (cfg.max_seq_len, cfg.page_block_size, cfg.num_heads, cfg.num_kv_heads) == (4096, 64, 128, 1)
    dims = (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim)
    assert dims == (512, 64, 128, 128)
    assert (cfg.q_lora_rank, cfg.hidden_size, cfg.dtype, cfg.fp8_kvcache) == (1536, 7168, "bfloat16", False)
    assert (cfg.dropout_p, cfg.rope_theta, cfg.rope_interleave, cfg.rope_scaling, cfg.rms_norm_eps) == (
        0.0, 10000.0, True, None, 1e-6)
    assert cfg.head_dim == 576
    assert cfg.head_dim_v == 512
    assert cfg.qk_head_dim == 192
    assert cfg.numpy_dtype == np.dtype(ml_dtypes.bfloat16)
    assert cfg.cache_bytes_per_token == 576 * 2
    assert cfg.max_blocks_per_seq == 64
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5)


def test_cache_bytes_per_token_and_blocks():
    assert MLAConfig(fp8_kvcache=True).cache_bytes_per_token == 656
    assert MLAConfig(fp8_kvcache=True, num_kv_heads=2).cache_bytes_per_token == 2 * 656
    assert MLAConfig(dtype="float32").cache_bytes_per_token == 576 * 4
    assert MLAConfig(dtype="float16", num_kv_heads=4).cache_bytes_per_token == 576 * 2 * 4
    assert MLAConfig(kv_lora_rank=256, qk_rope_head_dim=32, dtype="float32").cache_bytes_per_token == 288 * 4
    assert MLAConfig(max_seq_len=4097).max_blocks_per_seq == 65
    assert MLAConfig(max_seq_len=100, page_block_size=1).max_blocks_per_seq == 100
    assert MLAConfig(max_seq_len=3, page_block_size=64).max_blocks_per_seq == 1


def test_dtype_accepts_numpy_dtypes():
    assert MLAConfig(dtype=np.float16).dtype == "float16"
    assert MLAConfig(dtype=ml_dtypes.bfloat16).dtype == "bfloat16"
    assert MLAConfig(dtype=np.dtype("float32")).numpy_dtype == np.float32


def test_frozen_keyword_only_hashable():
    cfg = MLAConfig.deepseek_v3()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_heads = 3
    with pytest.raises(TypeError):
        MLAConfig(4096)  # keyword construction only
    assert cfg == MLAConfig.deepseek_v3() and hash(cfg) == hash(MLAConfig.deepseek_v3())
    assert len({cfg, MLAConfig.deepseek_v3(), MLAConfig()}) == 2
    assert cfg.replace(num_heads=16).num_heads == 16
    with pytest.raises(ValueError, match="num_heads"):
        cfg.replace(num_heads=0)


def test_rope_scaling_is_copied():
    scaling = dict(V3_HF_CONFIG["rope_scaling"])
    cfg = MLAConfig(rope_scaling=scaling)
    scaling["factor"] = 1000
    assert cfg.rope_scaling["factor"] == 40


def test_deepseek_v3_preset():
    cfg = MLAConfig.deepseek_v3()
    assert (cfg.num_heads, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank) == (128, 7168, 1536, 512)
    dims = (cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.max_seq_len)
    assert dims == (64, 128, 128, 163840)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_scaling["mscale_all_dim"] == 1.0
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale**2)
    assert MLAConfig.deepseek_v3(fp8_kvcache=True, max_seq_len=8192).fp8_kvcache


def test_deepseek_v2_lite_preset():
    cfg = MLAConfig.deepseek_v2_lite()
    assert (cfg.num_heads, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank) == (16, 2048, None, 512)
    assert (cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim) == (64, 128, 128)
    assert (cfg.head_dim, cfg.head_dim_v, cfg.qk_head_dim) == (576, 512, 192)
    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale**2)


def test_from_hf_config_matches_presets():
    assert MLAConfig.from_hf_config(V3_HF_CONFIG) == MLAConfig.deepseek_v3()
    assert MLAConfig.from_hf_config(V2_LITE_HF_CONFIG) == MLAConfig.deepseek_v2_lite()


def test_from_hf_config_details():
    cfg = MLAConfig.from_hf_config(V3_HF_CONFIG, page_block_size=32, fp8_kvcache=True, max_seq_len=1024)
    assert (cfg.page_block_size, cfg.fp8_kvcache, cfg.max_seq_len) == (32, True, 1024)
    assert cfg.num_kv_heads == 1  # num_key_value_heads (128) describes the MHA form, not the latent cache
    assert isinstance(cfg.rope_theta, float)
    small = MLAConfig.from_hf_config({"num_attention_heads": 4, "hidden_size": 64, "torch_dtype": "float32",
                                      "rope_interleave": False})
    mapped = (small.num_heads, small.hidden_size, small.dtype, small.rope_interleave)
    assert mapped == (4, 64, "float32", False)
    assert small.kv_lora_rank == 512  # absent keys keep the defaults
    assert MLAConfig.from_hf_config({"torch_dtype": "float8_e4m3fn"}).dtype == "bfloat16"  # not ours: ignored

    class PretrainedLike:
        def to_dict(self):
            return dict(V2_LITE_HF_CONFIG)

    assert MLAConfig.from_hf_config(PretrainedLike()) == MLAConfig.deepseek_v2_lite()
    with pytest.raises(TypeError, match="hf_config"):
        MLAConfig.from_hf_config(["not", "a", "dict"])
    with pytest.raises(ValueError, match="num_heads"):
        MLAConfig.from_hf_config({"num_attention_heads": 0})


# ----------------------------------------------------------------------------- one test per rule

POSITIVE_INT_FIELDS = ["max_seq_len", "page_block_size", "num_heads", "num_kv_heads", "kv_lora_rank",
                       "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "hidden_size"]


@pytest.mark.parametrize("field", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [0, -2])
def test_positive_int_fields_reject_nonpositive(field, value):
    with pytest.raises(ValueError, match=rf"{field}: expected a positive int \(>= 1\), got {value}"):
        MLAConfig(**{field: value})


@pytest.mark.parametrize("field", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [2.0, True, "8", None])
def test_positive_int_fields_reject_other_types(field, value):
    with pytest.raises(TypeError, match=f"{field}: expected a positive int"):
        MLAConfig(**{field: value})


def test_numpy_ints_are_accepted():
    cfg = MLAConfig(num_heads=np.int64(16), page_block_size=np.int32(32))
    assert (cfg.num_heads, cfg.page_block_size) == (16, 32) and type(cfg.num_heads) is int


def test_page_block_size_one_is_allowed():
    assert MLAConfig(page_block_size=1).page_block_size == 1


def test_num_heads_multiple_of_num_kv_heads():
    assert MLAConfig(num_heads=8, num_kv_heads=4).num_kv_heads == 4
    with pytest.raises(ValueError, match=r"num_heads: expected a multiple of num_kv_heads \(3\), got 8"):
        MLAConfig(num_heads=8, num_kv_heads=3)


def test_q_lora_rank():
    assert MLAConfig(q_lora_rank=None).q_lora_rank is None
    with pytest.raises(ValueError, match="q_lora_rank: expected a positive int or None, got 0"):
        MLAConfig(q_lora_rank=0)
    with pytest.raises(TypeError, match="q_lora_rank"):
        MLAConfig(q_lora_rank=1.5)


def test_rope_head_dim_even():
    with pytest.raises(ValueError, match="qk_rope_head_dim: expected an even number .* got 63"):
        MLAConfig(qk_rope_head_dim=63)


def test_fp8_requires_512_latent():
    with pytest.raises(ValueError, match="fp8_kvcache: .*kv_lora_rank=512.* got kv_lora_rank=256"):
        MLAConfig(fp8_kvcache=True, kv_lora_rank=256)


def test_fp8_requires_64_rope():
    with pytest.raises(ValueError, match="fp8_kvcache: .* got kv_lora_rank=512, qk_rope_head_dim=32"):
        MLAConfig(fp8_kvcache=True, qk_rope_head_dim=32)


@pytest.mark.parametrize("dtype", ["float64", "bf16", "int8", np.float64, "nonsense"])
def test_dtype_names(dtype):
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bfloat16', 'float16', 'float32'\]"):
        MLAConfig(dtype=dtype)


@pytest.mark.parametrize("field", ["fp8_kvcache", "rope_interleave"])
def test_bool_fields(field):
    with pytest.raises(TypeError, match=f"{field}: expected a bool, got 1"):
        MLAConfig(**{field: 1})


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0, float("nan"), "0.1"])
def test_dropout_range(value):
    with pytest.raises(ValueError, match=r"dropout_p: expected a number in \[0, 1\)"):
        MLAConfig(dropout_p=value)
    assert MLAConfig(dropout_p=0.999).dropout_p == 0.999


@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_positive_finite_floats(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected a finite number > 0"):
        MLAConfig(**{field: value})


def test_rope_scaling_validation():
    good = dict(V3_HF_CONFIG["rope_scaling"])
    assert MLAConfig(rope_scaling={**good, "rope_type": "yarn"}).rope_scaling["rope_type"] == "yarn"
    minimal = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 2048}
    assert MLAConfig(rope_scaling=minimal).yarn_mscale == 1.0  # no mscale_all_dim: no correction
    with pytest.raises(TypeError, match="rope_scaling: expected a dict or None"):
        MLAConfig(rope_scaling=[("type", "yarn")])
    with pytest.raises(ValueError, match=r"rope_scaling: expected 'type' .* got 'linear'"):
        MLAConfig(rope_scaling={**good, "type": "linear"})
    without_factor = {k: v for k, v in good.items() if k != "factor"}
    with pytest.raises(ValueError, match="rope_scaling: expected key 'factor'"):
        MLAConfig(rope_scaling=without_factor)
    with pytest.raises(ValueError, match=r"rope_scaling\['factor'\]: expected a finite number >= 1, got 0.5"):
        MLAConfig(rope_scaling={**good, "factor": 0.5})
    with pytest.raises(ValueError, match=r"rope_scaling\['original_max_position_embeddings'\]"):
        MLAConfig(rope_scaling={**good, "original_max_position_embeddings": 0})
    with pytest.raises(ValueError, match=r"rope_scaling\['beta_slow'\]"):
        MLAConfig(rope_scaling={**good, "beta_slow": -1})
    with pytest.raises(ValueError, match="beta_fast >= beta_slow"):
        MLAConfig(rope_scaling={**good, "beta_fast": 1, "beta_slow": 32})
    with pytest.raises(ValueError, match=r"rope_scaling\['mscale'\]"):
        MLAConfig(rope_scaling={**good, "mscale": float("nan")})
