"""lowbit plan: parameter counts against Hugging Face's own models, bytes and fits against published deployments."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main as lowbit_main
from lowbit.config import ModelConfig
from lowbit.plan.catalog import GIB, GPU, load_model_config, resolve_gpu
from lowbit.plan.inventory import EXPERT, model_tensors, param_counts
from lowbit.plan.memory import Budget, Layout, evaluate, footprint, kv_bytes_per_token_per_layer
from lowbit.plan.planner import make_plan
from lowbit.quant.recipe import Recipe
from lowbit.quant.schemes import get_scheme

GB = 1e9

TINY_DS = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16)
FAMILIES = {
    "deepseek_v3": ("DeepseekV3", dict(TINY_DS, q_lora_rank=48, n_group=4, topk_group=2)),
    "deepseek_v3_noqlora": ("DeepseekV3", dict(TINY_DS, q_lora_rank=None, n_group=1, topk_group=1)),
    "deepseek_v2": ("DeepseekV2", dict(TINY_DS, q_lora_rank=None, topk_method="greedy")),
    "llama": ("Llama", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": ("Llama", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


def _hf_model(family: str, kw: dict):
    import transformers
    config = getattr(transformers, f"{family}Config")(**kw)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    return config, model


def _checkpoint_numel(model) -> dict[str, int]:
    """name -> numel of every tensor the model saves (parameters once, plus persistent buffers)."""
    state = model.state_dict()
    seen, out = set(), {}
    for name, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in state]:
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p.numel()
    return out


@pytest.mark.parametrize("variant", FAMILIES)
def test_param_count_equals_hugging_face(variant):
    family, kw = FAMILIES[variant]
    config, hf = _hf_model(family, kw)
    cfg = ModelConfig.from_dict(config.to_dict())
    ours = model_tensors(cfg, include_mtp=False)
    oracle = _checkpoint_numel(hf)
    assert sum(t.numel for t in ours) == sum(oracle.values())
    assert sum(t.numel for t in ours if not t.name.endswith("e_score_correction_bias")) == \
        sum(p.numel() for p in hf.parameters())
    # tensor by tensor where the layouts agree (Hugging Face fuses the routed experts into one tensor per layer)
    ours_by_name = {t.name: t.numel for t in ours if t.shard != EXPERT}
    oracle_unfused = {n: v for n, v in oracle.items() if ".mlp.experts." not in n}
    assert ours_by_name == oracle_unfused


def test_mtp_layer_is_a_block_plus_embedding_head_and_projection():
    kw = dict(FAMILIES["deepseek_v3"][1], num_nextn_predict_layers=1)
    config, hf = _hf_model("DeepseekV3", kw)
    cfg = ModelConfig.from_dict({**config.to_dict(), "num_nextn_predict_layers": 1})
    counts = param_counts(model_tensors(cfg))
    main, mtp = sum(counts["main"].values()), sum(counts["mtp"].values())
    assert main == sum(_checkpoint_numel(hf).values())  # Hugging Face builds no MTP layer
    last_block = sum(v for n, v in _checkpoint_numel(hf).items() if n.startswith("model.layers.3."))
    D, V = cfg.hidden_size, cfg.vocab_size
    assert mtp == last_block + 2 * V * D + 2 * D * D + 3 * D  # embedding, head, eh_proj, enorm/hnorm/head norm


def test_deepseek_r1_parameters_671b_main_and_14b_mtp():
    _, cfg = load_model_config("deepseek-r1")
    counts = param_counts(model_tensors(cfg))
    main, mtp = sum(counts["main"].values()), sum(counts["mtp"].values())
    assert 670.5e9 < main < 671.5e9
    assert 13e9 < mtp < 14.5e9
    assert 684e9 < main + mtp < 686e9  # the "685B" on the model card


def _r1_plan(scheme: str, gpu: str, gpus: int | None = None, **budget):
    name, cfg = load_model_config("deepseek-r1")
    budget = Budget(resolve_gpu(gpu, None), max_model_len=budget.pop("max_model_len", 32768), **budget)
    return make_plan(name, cfg, Recipe.from_scheme(scheme), scheme, budget, gpus)


@pytest.mark.parametrize("scheme,low,high", [
    ("bf16", 1360, 1380),       # 685B x 2 bytes: about 1.37 TB
    ("fp8-block", 680, 700),    # "close to 700 GB"
    ("w8a8", 680, 700),         # one byte per weight, not 335 GB
    ("w4a8", 350, 370),         # "about half" of FP8
])
def test_deepseek_r1_weight_bytes_match_published_sizes(scheme, low, high):
    plan = _r1_plan(scheme, "H200-141G")
    assert low * GB < plan.fp.total_bytes < high * GB


def test_deepseek_r1_fits_as_published():
    assert _r1_plan("fp8-block", "H200-141G", 8).fits
    assert not _r1_plan("fp8-block", "H100-80G", 8).fits
    assert _r1_plan("fp8-block", "H100-80G").min_gpus == 16  # served on 16 x 80-96 GB (two nodes)
    assert _r1_plan("fp8-block", "H20-96G", 16).fits
    assert _r1_plan("w4a8", "H20-96G", 8).fits  # one 8 x 96 GB node
    assert _r1_plan("w4a8", "H20-96G").min_gpus == 8
    assert not _r1_plan("bf16", "H200-141G", 8).fits
    ascend = _r1_plan("w8a8", "Ascend-910B-64G", 16, max_model_len=16384)
    assert ascend.fits and ascend.min_gpus == 16  # one node of 16 x 64 GB NPUs, --max-model-len 16384


def test_int8_note_refutes_335_gb():
    plan = _r1_plan("w8a8", "H200-141G")
    note = " ".join(plan.notes)
    assert "671 GB" in note and "not the 335 GB" in note
    assert not any("335" in n for n in _r1_plan("fp8-block", "H200-141G").notes)


def test_fp8_scheme_on_a100_warns_with_int8_alternative():
    warn = " ".join(_r1_plan("w4a8", "A100-80G").warnings)
    assert "no FP8" in warn and "w4a8-int8" in warn
    assert not any("FP8" in w for w in _r1_plan("w4a8", "H20-96G").warnings)
    assert not any("FP8" in w for w in _r1_plan("w4a8-int8", "A100-80G").warnings)
    assert "w8a8" in " ".join(_r1_plan("fp8-block", "Ascend-910B-64G").warnings)


def test_kv_bytes_per_token_mla_and_gqa():
    _, r1 = load_model_config("deepseek-r1")
    assert 61 * kv_bytes_per_token_per_layer(r1, "bf16") == 61 * (512 + 64) * 2 == 70272
    assert kv_bytes_per_token_per_layer(r1, "fp8", tp=8) == 576  # MLA's latent is not split by tp
    _, smol = load_model_config("default")
    assert kv_bytes_per_token_per_layer(smol, "bf16") == 2 * 3 * 64 * 2
    assert kv_bytes_per_token_per_layer(smol, "bf16", tp=3) == 2 * 1 * 64 * 2
    plan = _r1_plan("w4a8", "H20-96G", 8)
    assert plan.kv_bytes_per_token == 62 * 576 * 2  # 61 layers + the MTP layer


def test_recipe_mixes_schemes_per_module(tmp_path):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"default": "fp8-block",
                                       "groups": [{"targets": ["re:.*mlp\\.experts\\.\\d+\\..*"], "scheme": "w4a8"}]}))
    config, _ = _hf_model(*FAMILIES["deepseek_v3"])
    cfg = ModelConfig.from_dict(config.to_dict())
    tensors = model_tensors(cfg, include_mtp=False)
    fp = footprint(cfg, tensors, Recipe.load(str(recipe_file)))
    w4a8, fp8 = get_scheme("w4a8"), get_scheme("fp8-block")
    expected = {
        "routed_experts": sum(w4a8.weight_bytes(*t.shape) for t in tensors if t.kind == "routed_experts"),
        "attention": sum(fp8.weight_bytes(*t.shape) if t.linear else 2 * t.numel
                         for t in tensors if t.kind == "attention"),
        "lm_head": 2 * cfg.vocab_size * cfg.hidden_size,  # ignored by default
        "router": sum(t.numel * t.dtype_bytes for t in tensors if t.kind == "router"),
    }
    for kind, b in expected.items():
        assert fp.bytes_by_kind["main"][kind] == b, kind
    assert fp.kind_schemes["routed_experts"] == ["w4a8"] and fp.kind_schemes["attention"] == ["fp8-block"]
    assert fp.kind_schemes["lm_head"] == ["bf16"]


def test_layout_memory_known_answers():
    _, cfg = load_model_config("deepseek-v2-lite")
    fp = footprint(cfg, model_tensors(cfg), Recipe.from_scheme("bf16"))
    mem = 80 * GIB
    budget = Budget(GPU("test", mem, True), gpu_memory_utilization=1.0, max_model_len=4096, workspace_override=0)
    one = evaluate(fp, Layout(), budget)
    assert one.weight_bytes_per_gpu == fp.total_bytes
    kv = 27 * 576 * 2
    assert one.kv_bytes_per_token_per_gpu == kv
    assert one.max_concurrent_tokens == (mem - fp.total_bytes) // kv
    # copies: dp2 holds the whole model twice and twice the tokens
    dp2 = evaluate(fp, Layout(dp=2), budget)
    assert dp2.weight_bytes_per_gpu == fp.total_bytes and dp2.max_concurrent_tokens == 2 * one.max_concurrent_tokens
    # 64 experts over 8 ranks: expert parallel and tensor parallel hold the same expert bytes
    tp8, tp8ep = evaluate(fp, Layout(tp=8), budget), evaluate(fp, Layout(tp=8, ep=True), budget)
    assert abs(tp8.weight_bytes_per_gpu - tp8ep.weight_bytes_per_gpu) <= 64
    experts = fp.bytes_by_kind["main"]["routed_experts"]
    dp8ep = evaluate(fp, Layout(dp=8, ep=True), budget)
    assert dp8ep.weight_bytes_per_gpu == fp.total_bytes - experts + experts // 8
    # pipeline stages split the layers (and their KV)
    pp3 = evaluate(fp, Layout(pp=3), budget)
    assert pp3.kv_bytes_per_token_per_gpu == 9 * 576 * 2
    assert fp.total_bytes / 3 < pp3.weight_bytes_per_gpu < fp.total_bytes / 2


def test_builtin_default_config_matches_gguf_metadata():
    from lowbit.default_model import default_model_path
    _, builtin = load_model_config("default")
    _, from_gguf = load_model_config(default_model_path())
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(builtin, f) == getattr(from_gguf, f), f


@pytest.mark.parametrize("name,low,high", [("kimi-k2", 1.02e12, 1.04e12), ("moonlight", 15.5e9, 16.5e9),
                                           ("deepseek-v2-lite", 15.6e9, 15.8e9), ("default", 134e6, 136e6)])
def test_builtin_models_have_their_published_sizes(name, low, high):
    _, cfg = load_model_config(name)
    assert low < sum(t.numel for t in model_tensors(cfg)) < high


def test_cli_json(capsys, tmp_path):
    rc = lowbit_main(["plan", "--model", "deepseek-r1", "--scheme", "w4a8", "--gpu", "H20-96G", "--gpus", "8",
                      "--max-model-len", "32768", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("weight_bytes", "kv_bytes_per_token", "per_gpu_bytes", "min_gpus", "fits", "max_concurrent_tokens",
                "layout"):
        assert key in d, key
    assert d["fits"] is True and d["min_gpus"] == 8 and d["layout"]["tp"] * d["layout"]["dp"] == 8
    assert d["per_gpu_bytes"] == d["per_gpu"]["weights"] + d["per_gpu"]["workspace"]
    assert d["per_gpu"]["weights"] + d["per_gpu"]["workspace"] + d["per_gpu"]["kv_cache"] == d["per_gpu"]["usable"]
    cfg = tmp_path / "config.json"  # a local config.json works like a built-in name
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert lowbit_main(["plan", "--model", str(cfg), "--gpu-memory", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["min_gpus"] == 1


def test_cli_text_and_errors(capsys):
    assert lowbit_main(["plan", "--model", "r1", "--scheme", "fp8-block", "--gpu", "H100-80G", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "fewest GPUs     16 x H100-80G" in out
    assert lowbit_main(["plan", "--model", "r1", "--gpu", "H900-1T"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GPU type" in err
    assert lowbit_main(["plan", "--model", "no-such-model", "--gpu", "H100-80G"]) == 1
    assert lowbit_main(["plan", "--gpu", "H100-80G", "--gpu-memory-utilization", "1.5"]) == 1


def test_objective_and_nodes(capsys):
    name, cfg = load_model_config("deepseek-r1")
    budget = Budget(resolve_gpu("H20-96G", None), max_model_len=32768)
    recipe = Recipe.from_scheme("w4a8")
    throughput = make_plan(name, cfg, recipe, "w4a8", budget, 8)
    latency = make_plan(name, cfg, recipe, "w4a8", budget, 8, objective="latency")
    assert latency.chosen.layout == Layout(tp=8, ep=True)  # TensorRT-LLM's tp 8 / ep 8
    assert throughput.chosen.max_concurrent_tokens >= latency.chosen.max_concurrent_tokens
    # --nodes 2 without --gpus: two nodes of the GPU type's 8
    assert lowbit_main(["plan", "--model", "r1", "--scheme", "fp8-block", "--gpu", "H20-96G", "--nodes", "2",
                        "--max-model-len", "16384", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 16 and d["gpus_per_node"] == 8 and d["fits"] and d["layout"]["tp"] <= 8
