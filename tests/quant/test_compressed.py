"""Reading and writing compressed-tensors quantization configs: compressed-tensors' own matching semantics."""
import pytest

from lowbit.config import ConfigError
from lowbit.quant.compressed import CompressedTensorsConfig, build_config, ct_target, target_matches
from lowbit.quant.config import matches
from lowbit.quant.methods import Fp8BlockLinearMethod, IntLinearMethod, PackedLinearMethod
from lowbit.quant.schemes import get_scheme


def test_targets_translate_to_compressed_tensors_semantics():
    names = ["model.layers.1.mlp.gate", "model.layers.1.mlp.gate_up_proj", "lm_head",
             "model.layers.3.mlp.experts.7.down_proj", "model.layers.0.self_attn.o_proj"]
    for pattern in ["lm_head", "re:.*mlp.gate$", "down_proj", "re:mlp\\.experts\\.\\d+\\.", "self_attn.o_proj"]:
        for n in names:
            assert target_matches(n, ct_target(pattern)) == matches(n, pattern), (pattern, n)


def test_config_validates_in_compressed_tensors_and_picks_methods():
    from compressed_tensors.quantization import QuantizationConfig
    d = build_config([(["re:.*mlp\\.experts\\..*"], get_scheme("w4a8")), (["o_proj"], get_scheme("bf16"))],
                     get_scheme("fp8-block"), ["lm_head", "re:.*mlp.gate$"], actorder=True)
    QuantizationConfig.model_validate(d)  # the library accepts it
    assert d["format"] == "mixed-precision" and d["config_groups"]["group_1"]["targets"] == ["Linear"]
    cfg = CompressedTensorsConfig.from_dict(d)
    assert isinstance(cfg.linear_method("model.layers.1.mlp.experts.3.gate_up_proj"), PackedLinearMethod)
    assert isinstance(cfg.linear_method("model.layers.1.self_attn.q_b_proj"), Fp8BlockLinearMethod)
    assert cfg.linear_method("model.layers.1.self_attn.o_proj") is None  # bf16 group: ignored
    assert cfg.linear_method("lm_head") is None


def test_merged_parts_must_agree():
    d = build_config([(["q_proj"], get_scheme("w8a8"))], get_scheme("w4a16"), [])
    cfg = CompressedTensorsConfig.from_dict(d)
    with pytest.raises(ConfigError, match="quantized differently"):
        cfg.linear_method("model.layers.0.self_attn.qkv_proj")
    assert isinstance(CompressedTensorsConfig.from_dict(build_config([], get_scheme("w8a8"), [])).linear_method(
        "model.layers.0.self_attn.qkv_proj"), IntLinearMethod)


def test_unsupported_groups_are_named():
    with pytest.raises(ConfigError, match="group_0.format"):
        CompressedTensorsConfig.from_dict({"config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4",
                                                                         "weights": {"num_bits": 4}}}})
    with pytest.raises(ConfigError, match="group_0"):
        CompressedTensorsConfig.from_dict({"config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}})
