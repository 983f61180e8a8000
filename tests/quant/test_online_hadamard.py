"""`--online-hadamard`: down_proj's input turned at run time by a block-diagonal Sylvester Hadamard matrix, its weight
by the inverse in the checkpoint (compressed-tensors' transform_config, SpinQuant's R4). compressed-tensors is the
oracle for the format (its TransformConfig parses the config, its deterministic_hadamard_matrix is the matrix); a
float model with the transform folded in computes what the original does; a quantized one, what its dequantized
weights compute with the activation quantization applied to the turned inputs."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import LLM
from lowbit.cli import main
from lowbit.config import ConfigError
from lowbit.engine import parallel
from lowbit.layers.linear import InputTransform, LinearBase, UnquantizedLinearMethod
from lowbit.models.loader import CheckpointError
from lowbit.quant import rotation
from lowbit.quant.compressed import CompressedTensorsConfig, online_hadamard_config, target_matches
from lowbit.quant.layerwise import QuantOptions
from lowbit.quant.pipeline import Job, quantize
from lowbit.quant.recipe import Recipe
from tests.quant.test_cli import fails
from tests.quant.test_pipeline import quantize_reference_inputs, source_tensors, write_dequantized

TARGET = r"re:.*mlp\.(?:shared_experts\.)?down_proj$"


def sylvester(block: int) -> torch.Tensor:
    """compressed-tensors' Sylvester matrix (+-1, what checkpoints store), float32."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix
    return deterministic_hadamard_matrix(block, torch.float32)


def oracle_h(block: int) -> torch.Tensor:
    """The same, normalized (orthogonal), float64."""
    return sylvester(block).double() / block ** 0.5


def turn(t: torch.Tensor, block: int) -> torch.Tensor:
    """t [..., n] times blockdiag(H, ..., H) of the oracle's matrix, in float64."""
    return (t.double().unflatten(-1, (-1, block)) @ oracle_h(block)).flatten(-2).to(t.dtype)


def ct_transform_config(block: int) -> dict:
    """The R4 transform as compressed-tensors itself serializes it (llm-compressor writes this)."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
    return TransformConfig(config_groups={"R4": TransformScheme(type="hadamard", head_dim=block, apply=[
        TransformArgs(targets=[TARGET], location="input"),
        TransformArgs(targets=[TARGET], location="weight_input", inverse=True)])}).model_dump()


def turned_checkpoint(src: str, dst, block: int, transform_config: dict | None = None) -> dict:
    """A float checkpoint with every dense / shared-expert down_proj folded to W H and the R4 transform asked for."""
    tensors = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    out = {}
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and target_matches(module, TARGET):
            out[name] = turn(t, block)
            out[f"{module}.R4_input.weight"] = sylvester(block)
        else:
            out[name] = t
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {},
                                     "transform_config": transform_config or ct_transform_config(block)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return out


def test_block_hadamard_is_compressed_tensors_matrix():
    for block in (2, 32, 128):
        assert torch.equal(rotation.hadamard(block), sylvester(block).double())
    x = torch.randn(5, 96, dtype=torch.float64)
    assert torch.allclose(rotation.hadamard_blocks(x, 32), turn(x, 32), atol=1e-12)
    assert torch.allclose(rotation.hadamard_blocks(rotation.hadamard_blocks(x, 32), 32), x, atol=1e-12)  # H H = I
    with pytest.raises(ValueError, match="power of two dividing 96"):
        rotation.hadamard_blocks(x, 64)


def test_written_config_is_compressed_tensors_own():
    from compressed_tensors.transform import TransformConfig
    ours = online_hadamard_config(128)
    assert TransformConfig.model_validate(ours).model_dump() == ct_transform_config(128)
    groups = CompressedTensorsConfig.from_dict({"config_groups": {}, "transform_config": ours}).transforms
    assert [(g.name, g.block) for g in groups] == [("R4", 128)]  # the weight_input half is folded: nothing to run


@pytest.mark.parametrize("variant,block", [("llama", 64), ("deepseek_v3", 32)])
def test_float_model_with_the_transform_computes_the_same(tiny_checkpoints, tmp_path, variant, block):
    """llama's down_proj, DeepSeek's dense-layer and shared-expert down_proj (its routed experts are not targeted):
    W H in the checkpoint, x H at run time, the same logits."""
    src = tiny_checkpoints[variant][0]
    dst = tmp_path / "turned"
    written = turned_checkpoint(src, dst, block)
    turned = sorted(n for n in written if n.endswith("R4_input.weight"))
    if variant == "deepseek_v3":
        assert "model.layers.0.mlp.down_proj.R4_input.weight" in turned
        assert "model.layers.1.mlp.shared_experts.down_proj.R4_input.weight" in turned
        assert not any(".experts." in n for n in turned)
    ids = list(range(3, 60))
    ref = LLM(src, device="cpu", num_kv_blocks=16).logits(ids)
    llm = LLM(str(dst), device="cpu", num_kv_blocks=16)
    layer = llm.engine.runner.model.get_submodule(turned[0][:-len(".R4_input.weight")])
    assert layer.input_transform is not None and layer.input_transform.block == block
    ours = llm.logits(ids)
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    # the folded weights without the online transform are another model: the check above can fail
    folded = tmp_path / "folded"
    folded.mkdir()
    save_file({n: t for n, t in written.items() if not n.endswith("R4_input.weight")},
              str(folded / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), folded / "config.json")
    other = LLM(str(folded), device="cpu", num_kv_blocks=16).logits(ids)
    assert (other - ref).abs().max().item() > 1e-2 * ref.abs().max().item()


def _patch_rank(monkeypatch, tp, rank):
    monkeypatch.setattr(parallel, "tp_size", lambda: tp)
    monkeypatch.setattr(parallel, "tp_rank", lambda: rank)
    monkeypatch.setattr(parallel, "all_reduce", lambda y, **kw: y)


def _down_proj(in_features, block, prefix="model.layers.0.mlp.down_proj"):
    method = UnquantizedLinearMethod()
    method.input_transform = InputTransform("R4", block)
    return LinearBase(in_features, [24], tp_dim=1, quant_method=method, params_dtype=torch.float32, prefix=prefix)


@pytest.mark.parametrize("tp", [2, 4])
def test_blocks_survive_tensor_parallel_sharding(monkeypatch, tp):
    """Row-parallel ranks each turn their slice of the input by their own blocks: the partial outputs add up to
    x W^T, the float original."""
    torch.manual_seed(0)
    block, n = 16, 128
    w, x = torch.randn(24, n), torch.randn(5, n)
    ref = x.double() @ w.double().t()
    out = torch.zeros(5, 24, dtype=torch.float64)
    for rank in range(tp):
        with monkeypatch.context() as m:
            _patch_rank(m, tp, rank)
            layer = _down_proj(n, block)
            layer.weight.weight_loader(layer.weight, turn(w, block))
            layer.R4_input.weight.weight_loader(layer.R4_input.weight, sylvester(block))
            size = n // tp
            out += layer(x[:, rank * size:(rank + 1) * size]).double()
    assert (out - ref).abs().max().item() < 1e-4


def test_bad_transforms_are_refused(tiny_checkpoints, tmp_path, monkeypatch):
    # a block that does not divide a rank's input partition
    with monkeypatch.context() as m:
        _patch_rank(m, 4, 0)
        with pytest.raises(ConfigError, match="block 64 .* dividing its 32 input features"):
            _down_proj(128, 64)
        with pytest.raises(ConfigError, match="block 128 .* dividing its 32 input features"):
            _down_proj(128, None)  # no head_dim: one matrix over the whole input, which sharding cuts
    # a stored matrix other than Sylvester's (a random-sign Hadamard matrix, as `random-hadamard` uses)
    src = tiny_checkpoints["llama"][0]
    dst = tmp_path / "signs"
    turned_checkpoint(src, dst, 64)
    t = load_file(str(dst / "model.safetensors"))
    t["model.layers.1.mlp.down_proj.R4_input.weight"][3] *= -1
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.R4_input.weight: is not Sylvester's"):
        LLM(str(dst), device="cpu", num_kv_blocks=16)
    # what lowbit does not run: another transform type, an online output transform, routed experts' inputs
    bad = ct_transform_config(64)
    bad["config_groups"]["R4"]["type"] = "random-hadamard"
    with pytest.raises(ConfigError, match="R4.type: 'random-hadamard' is not supported"):
        CompressedTensorsConfig.from_dict({"config_groups": {}, "transform_config": bad})
    bad = ct_transform_config(64)
    bad["config_groups"]["R4"]["apply"][0]["location"] = "output"
    with pytest.raises(ConfigError, match=r"apply\[0\].location: 'output'"):
        CompressedTensorsConfig.from_dict({"config_groups": {}, "transform_config": bad})
    bad = ct_transform_config(32)
    bad["config_groups"]["R4"]["apply"][0]["targets"] = ["re:.*down_proj$"]
    cfg = CompressedTensorsConfig.from_dict({"config_groups": {}, "transform_config": bad})
    assert cfg.input_transform("model.layers.0.mlp.down_proj") == InputTransform("R4", 32)
    with pytest.raises(ConfigError, match="model.layers.1.mlp.experts.3.down_proj is not supported"):
        cfg.linear_method("model.layers.1.mlp.experts.3.down_proj")


def _reference(qdir: str, out: str, block: int, turned: bool = True) -> None:
    """The quantized checkpoint's weights dequantized into a plain float checkpoint, each down_proj unfolded back to
    the original basis (W_q H: x (W_q H)^T = (x H) W_q^T) and its R4 matrix dropped."""
    write_dequantized(qdir, out)
    t = load_file(os.path.join(out, "model.safetensors"))
    plain = {n: turn(v, block) if turned and n.endswith("mlp.down_proj.weight") else v
             for n, v in t.items() if not n.endswith("R4_input.weight")}
    save_file(plain, os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("how", ["cli", "smoothquant auto, block 64"])
def test_w8a8_round_trip(tiny_llama, tmp_path, capsys, how):
    """compressed-tensors parses the config; every down_proj carries Sylvester's matrix; lowbit's runtime computes
    what the dequantized weights compute with int8 per-token activations of x H at each down_proj."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig
    out = tmp_path / "q"
    if how == "cli":  # the bare flag: block 128
        block = 128
        assert main(["quantize", "--model", tiny_llama, "--scheme", "w8a8", "--online-hadamard", "--output", str(out),
                     "--num-calib-tokens", "512", "--seq-len", "128", "-q"]) == 0
    else:
        block = 64
        quantize(Job(tiny_llama, str(out), Recipe.from_scheme("w8a8"),
                     QuantOptions(smoothquant="auto", online_hadamard=block), num_calib_tokens=512, seq_len=128),
                 progress=False)
    capsys.readouterr()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    assert TransformConfig.model_validate(qc["transform_config"]).config_groups["R4"].head_dim == block
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["job"]["online_hadamard"] == block
    written = source_tensors(str(out))
    mats = {n: t for n, t in written.items() if n.endswith("R4_input.weight")}
    assert sorted(mats) == [f"model.layers.{i}.mlp.down_proj.R4_input.weight" for i in range(4)]
    for t in mats.values():
        assert torch.equal(t, sylvester(block))
    ref_dir, unturned_dir = tmp_path / "ref", tmp_path / "unturned"
    _reference(str(out), str(ref_dir), block)
    _reference(str(out), str(unturned_dir), block, turned=False)
    ids = list(b"Online Hadamard: the int8 inputs of down_proj are turned.")
    llm = LLM(str(out), device="cpu", num_kv_blocks=16)
    ref = LLM(str(ref_dir), device="cpu", num_kv_blocks=16)
    quantize_reference_inputs(ref.engine.runner.model, llm.engine.runner.model)
    inputs = {}  # each down_proj's input in the runtime's forward
    for name, m in ref.engine.runner.model.named_modules():
        if name.endswith("down_proj"):  # its int8 quantization acts on x H, turned back for the unfolded weight
            m._forward_pre_hooks.clear()
            q = llm.engine.runner.model.get_submodule(name)
            m.register_forward_pre_hook(lambda mod, args, _q=q: (
                turn(_q.quant_method.act_quant(_q, turn(args[0], block)), block),))
            q.register_forward_pre_hook(lambda mod, args, _n=name: inputs.setdefault(_n, args[0].detach().clone()))
    q, r = llm.logits(ids), ref.logits(ids)
    # the whole model: the two agree to float rounding until an int8 code rounds the other way (a value within a few
    # float32 steps of a rounding boundary, x H summed in another order: a few in a run, on some CPUs), and after
    # it, through attention, only as closely as the quantization error; so the whole model is checked loosely here
    # and each down_proj tightly below
    assert ((q - r).norm() / r.norm()).item() < 0.05  # measured 0.003-0.004 with a flip or two; untransformed: 1.0
    for name, x in inputs.items():  # each down_proj on the runtime's own input: per token, as the reference computes
        y_q = llm.engine.runner.model.get_submodule(name)(x)
        y_r = ref.engine.runner.model.get_submodule(name)(x)
        err = (y_q - y_r).abs().amax(1) / y_r.abs().amax(1)  # [tokens]
        assert (err < 1e-4).float().mean().item() >= 0.9, (name, err)  # a flipped code moves its token's row only
        assert err.max().item() < 0.05, (name, err)
    # the weights as stored, read without the transform, are another model: the check above can fail
    other = LLM(str(unturned_dir), device="cpu", num_kv_blocks=16).logits(ids)
    assert (q - other).abs().max().item() > 1e-2
    original = LLM(tiny_llama, device="cpu", num_kv_blocks=16).logits(ids)
    assert ((q - original).norm() / original.norm()).item() < 0.05


@pytest.mark.parametrize("args,match", [(["--online-hadamard", "512"], "e.g. 256"),
                                        (["--online-hadamard", "96"], "must be a power of two")])
def test_bad_block(tiny_llama, tmp_path, capsys, args, match):
    """tiny_llama's down_proj reads 256 features."""
    fails(["--scheme", "w8a8", "--algo", "rtn", *args], capsys, tiny_llama, tmp_path / "out", match)
    assert not (tmp_path / "out").exists()


def test_calibration_sees_the_turned_inputs(tiny_llama, tmp_path, monkeypatch):
    """GPTQ's Hessian and the static FP8 input scale of each down_proj come from x H, the inputs the runtime
    quantizes: the same calibration run without the flag gives x, turned here by the oracle."""
    from lowbit.quant import layerwise
    from lowbit.quant.calibrate import static_input_scale
    real = layerwise.hessian
    seen = {}

    def recording(x):
        seen.setdefault(run, []).append(x.clone())
        return real(x)

    monkeypatch.setattr(layerwise, "hessian", recording)
    for run, block in (("plain", None), ("turned", 64)):
        quantize(Job(tiny_llama, str(tmp_path / run), Recipe.from_scheme("w4a8"),
                     QuantOptions(online_hadamard=block), num_calib_tokens=256, seq_len=128), progress=False)
    downs = [(p, t) for p, t in zip(seen["plain"], seen["turned"], strict=True) if p.shape[1] == 256]
    assert len(downs) == 4  # one down_proj per layer (the other linears read 128 features)
    written = source_tensors(str(tmp_path / "turned"))
    for i, (x, xh) in enumerate(downs):
        assert torch.allclose(xh, turn(x, 64), atol=1e-5 * x.abs().max().item())
        scale = written[f"model.layers.{i}.mlp.down_proj.input_scale"]
        assert torch.allclose(scale, static_input_scale(turn(x, 64).abs().max().item()))
        assert not torch.allclose(scale, static_input_scale(x.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_path_turns_the_input(tiny_llama, tmp_path, monkeypatch):
    """On the GPU the w8a8 kernels read the turned input too: the kernel path (bf16) is as close to the CPU float32
    reference as the torch reference path run in bf16 on the GPU, or within a bound of its own."""
    out = tmp_path / "q"
    assert main(["quantize", "--model", tiny_llama, "--scheme", "w8a8", "--online-hadamard", "--output", str(out),
                 "--num-calib-tokens", "512", "--seq-len", "128", "-q"]) == 0
    ids = list(b"Online Hadamard on the GPU: the kernel path turns down_proj's input.")
    ref = LLM(str(out), device="cpu", dtype="float32", num_kv_blocks=16).logits(ids)

    def against_ref(kernels):
        monkeypatch.setenv("LOWBIT_KERNELS", kernels)
        llm = LLM(str(out), device="cuda", dtype="bfloat16", num_kv_blocks=16)
        assert sum(isinstance(m, LinearBase) and m.input_transform is not None
                   for m in llm.engine.runner.model.modules()) == 4
        got = llm.logits(ids).cpu()
        return ((got - ref).norm() / ref.norm()).item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    floor_err, floor_top1 = against_ref("0")
    err, top1 = against_ref("1")
    assert err < max(2 * floor_err, 0.2), (err, floor_err)
    assert top1 >= min(floor_top1 - 0.1, 0.8), (top1, floor_top1)
