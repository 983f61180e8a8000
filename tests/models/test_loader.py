"""Loading: sharded safetensors, DeepSeek's FP8 block-scaled weights, the MTP layer, and clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import LLM
from lowbit.config import ConfigError
from lowbit.models.loader import CheckpointError
from lowbit.quant.methods import fp8_block_dequant


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _state(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _write(path, tensors):
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_sharded_checkpoint_with_index_loads_the_same(tiny_checkpoints, tmp_path):
    src, _ = tiny_checkpoints["deepseek_v3"]
    dst = _copy(src, tmp_path / "sharded")
    tensors = _state(dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(dst, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    ids = list(range(1, 30))
    assert torch.equal(LLM(dst, device="cpu").logits(ids), LLM(src, device="cpu").logits(ids))


def _fp8_quantize(w, block=16):
    """DeepSeek's layout: fp8 e4m3 weight and a float32 scale_inv per (block x block) tile."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // block), -(-in_f // block)
    scale = torch.zeros(nb_o, nb_i)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for i in range(nb_o):
        for j in range(nb_i):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def test_deepseek_native_fp8_checkpoint_runs_as_its_dequantized_weights(tiny_checkpoints, tmp_path):
    src, _ = tiny_checkpoints["deepseek_v3"]
    fp8_dir = _copy(src, tmp_path / "fp8")
    deq_dir = _copy(src, tmp_path / "deq")
    tensors = _state(src)
    fp8, deq = {}, {}
    for name, t in tensors.items():
        linear = t.dim() == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate."))
        if linear:  # every linear layer but the router, as DeepSeek ships them
            q, s = _fp8_quantize(t)
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            deq[name] = fp8_block_dequant(q, s, (16, 16))
        else:
            fp8[name] = deq[name] = t
    _write(fp8_dir, fp8)
    _write(deq_dir, deq)
    cfg_path = os.path.join(fp8_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    json.dump(cfg, open(cfg_path, "w"))
    llm = LLM(fp8_dir, device="cpu")
    layer = llm.engine.runner.model.model.layers[1].mlp.experts[0].gate_up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and hasattr(layer, "weight_scale_inv")
    ids = list(range(1, 25))
    assert (llm.logits(ids) - LLM(deq_dir, device="cpu").logits(ids)).abs().max() < 1e-4


def test_mtp_layer_is_loaded_into_its_own_module(tiny_checkpoints, tmp_path):
    src, _ = tiny_checkpoints["deepseek_v3"]
    dst = _copy(src, tmp_path / "mtp")
    tensors = _state(src)
    n = 3  # num_hidden_layers of the tiny config; DeepSeek stores the MTP layer as model.layers.{n}
    g = torch.Generator().manual_seed(0)
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):  # an MoE block's tensors as the MTP layer's block
            tensors[name.replace("model.layers.2.", f"model.layers.{n}.")] = t.clone()
    extra = {"embed_tokens.weight": (320, 64), "enorm.weight": (64,), "hnorm.weight": (64,),
             "eh_proj.weight": (64, 128), "shared_head.norm.weight": (64,), "shared_head.head.weight": (320, 64)}
    for suffix, shape in extra.items():
        tensors[f"model.layers.{n}.{suffix}"] = torch.randn(shape, generator=g)
    _write(dst, tensors)
    llm = LLM(dst, device="cpu")
    model = llm.engine.runner.model
    assert len(model.model.mtp) == 1
    mtp = model.model.mtp[0]
    assert torch.equal(mtp.eh_proj.weight, tensors[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(mtp.shared_head.head.weight, tensors[f"model.layers.{n}.shared_head.head.weight"])
    # the main model is unchanged by the extra layer
    ids = list(range(1, 20))
    assert torch.equal(llm.logits(ids), LLM(src, device="cpu").logits(ids))


def test_missing_path_is_one_clear_error():
    with pytest.raises(ConfigError, match="/no/such/model: no such file or directory"):
        LLM("/no/such/model", device="cpu")


def test_unsupported_architecture_names_the_field(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["llama"][0], tmp_path / "gpt2")
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"config.json: model_type: 'gpt2' is not supported"):
        LLM(dst, device="cpu")


def test_missing_tensor_names_the_tensor(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["llama"][0], tmp_path / "missing")
    tensors = _state(dst)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _write(dst, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(dst, device="cpu")


def test_wrong_shape_names_the_file_and_tensor(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["llama"][0], tmp_path / "shape")
    tensors = _state(dst)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    _write(dst, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight: "
                                              r"checkpoint tensor of shape \(64, 100\)"):
        LLM(dst, device="cpu")


def test_pickle_only_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["llama"][0], tmp_path / "pickle")
    os.rename(os.path.join(dst, "model.safetensors"), os.path.join(dst, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="safetensors only"):
        LLM(dst, device="cpu")
