"""Random-weight checkpoints of real DeepSeek geometries, as safetensors with their config.json, in bf16 or already
quantized in any lowbit scheme (compressed-tensors layout, random integer values and scales: what the kernels read,
without spending minutes quantizing random numbers).

    python benchmarks/make_random_checkpoint.py --geometry v2-lite --out /tmp/v2lite [--scheme w4a16]
    python benchmarks/make_random_checkpoint.py --geometry r1 --layers 4 --out /tmp/r1slice
    python benchmarks/make_random_checkpoint.py --geometry tiny --out /tmp/tiny      (for tests)

v2-lite is DeepSeek-V2-Lite whole (15.7B parameters, 27 layers, 64 experts top-6, MLA without q LoRA); r1 is
DeepSeek-R1 at full width (7168 hidden, 128 heads, q LoRA 1536, 256 experts top-8) cut to --layers layers, the
first of them dense, as R1's first three are. The MTP layer is left out: decode does not use it. Tensors are drawn
on --device (a GPU draws 15.7B numbers in seconds) and written in shards of about 2 GB; config.json comes last, so
a folder without it is an interrupted write.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
GEOMETRIES = {
    "v2-lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400,
                    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                    num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                    num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
                    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, scoring_func="softmax",
                    rope_theta=10000, rope_scaling=YARN_V2, max_position_embeddings=163840, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001, attention_bias=False,
                    torch_dtype="bfloat16"),
    "r1": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280,
               hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=4,
               num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
               num_experts_per_tok=8, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=1536,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5,
               topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True, scoring_func="sigmoid",
               rope_theta=10000, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
               bos_token_id=0, eos_token_id=1, attention_bias=False, num_nextn_predict_layers=0,
               torch_dtype="bfloat16"),
    # the same structure at test size (q LoRA, grouped sigmoid routing)
    "tiny": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=256, hidden_size=256,
                 intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                 first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=128, qk_nope_head_dim=64,
                 qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=2.5, topk_method="noaux_tc", n_group=2,
                 topk_group=1, norm_topk_prob=True, scoring_func="sigmoid", rope_theta=10000,
                 max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2, attention_bias=False, num_nextn_predict_layers=0, torch_dtype="bfloat16"),
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of the geometry with its shape, in DeepSeek's own names."""
    D, V, H = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, v, kvr, qr = (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
                              cfg["kv_lora_rank"], cfg["q_lora_rank"])
    out = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (D,)
        out[f"{p}.post_attention_layernorm.weight"] = (D,)
        a = f"{p}.self_attn"
        if qr:
            out.update({f"{a}.q_a_proj.weight": (qr, D), f"{a}.q_a_layernorm.weight": (qr,),
                        f"{a}.q_b_proj.weight": (H * (nope + rope), qr)})
        else:
            out[f"{a}.q_proj.weight"] = (H * (nope + rope), D)
        out.update({f"{a}.kv_a_proj_with_mqa.weight": (kvr + rope, D), f"{a}.kv_a_layernorm.weight": (kvr,),
                    f"{a}.kv_b_proj.weight": (H * (nope + v), kvr), f"{a}.o_proj.weight": (D, H * v)})
        m = f"{p}.mlp"
        if i < cfg["first_k_dense_replace"]:
            mlps = {m: cfg["intermediate_size"]}
        else:
            E = cfg["n_routed_experts"]
            out[f"{m}.gate.weight"] = (E, D)
            if cfg["model_type"] == "deepseek_v3":
                out[f"{m}.gate.e_score_correction_bias"] = (E,)
            mlps = {f"{m}.experts.{e}": cfg["moe_intermediate_size"] for e in range(E)}
            if cfg["n_shared_experts"]:
                mlps[f"{m}.shared_experts"] = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
        for q, inter in mlps.items():
            out.update({f"{q}.gate_proj.weight": (inter, D), f"{q}.up_proj.weight": (inter, D),
                        f"{q}.down_proj.weight": (D, inter)})
    out["model.norm.weight"] = (D,)
    out["lm_head.weight"] = (V, D)
    return out


def random_module(name: str, shape: tuple[int, ...], scheme, gen: torch.Generator, device: str
                  ) -> dict[str, torch.Tensor]:
    """One tensor (non-linear, or a linear in bf16) or one quantized linear's compressed tensors, random."""
    from lowbit.quant.formats import FP8_MAX, QuantizedWeight, compress, int_range
    if len(shape) == 1:
        if name.endswith("e_score_correction_bias"):
            return {name: torch.zeros(shape, dtype=torch.float32)}
        return {name: torch.ones(shape, dtype=torch.bfloat16)}
    if scheme is None or scheme.format == "dense":
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        return {name: w.cpu()}
    out_f, in_f = shape
    args = scheme.weights
    module = name[:-len(".weight")]
    if args.type == "float":  # fp8-block
        bo, bi = args.block_structure
        values = (torch.randn(shape, generator=gen, device=device) * 100).clamp(-FP8_MAX, FP8_MAX)
        values = values.to(torch.float8_e4m3fn)
        scale = torch.full((-(-out_f // bo), -(-in_f // bi)), 0.02 / 100, dtype=torch.float32, device=device)
    else:
        lo, hi = int_range(args.num_bits)
        values = torch.randint(lo, hi + 1, shape, generator=gen, device=device, dtype=torch.int8)
        groups = 1 if args.strategy == "channel" else -(-in_f // args.group_size)
        # uniform integers have std ~ hi / sqrt(3): scale them to the 0.02 of the bf16 weights
        scale = torch.full((out_f, groups), 0.02 * 1.73 / hi, dtype=torch.bfloat16, device=device)
    qw = QuantizedWeight(values, scale, None, args)
    tensors = {f"{module}.{k}": t.cpu() for k, t in compress(qw, scheme.format).items()}
    a = scheme.input_activations
    if a is not None and not a.dynamic:
        tensors[f"{module}.input_scale"] = torch.tensor([0.05], dtype=torch.float32)
    return tensors


# benchmark names of a scheme with options: (scheme, its options)
VARIANTS = {"w8a8-g32": ("w8a8", {"act_group_size": 32})}  # w8a8 --act-group-size 32


def recipe_for(cfg: dict, scheme_name: str):
    """The recipe `lowbit quantize --scheme` would take for this geometry: the scheme's group size where every linear
    layer's input features divide by it, else the largest of 64 and 32 that does (V2-Lite's dense MLP has 10944
    inputs, not a multiple of 128). scheme_name may name one of VARIANTS."""
    from lowbit.quant.recipe import Recipe
    from lowbit.quant.schemes import get_scheme
    if scheme_name == "bf16":
        return None
    if scheme_name in VARIANTS:
        name, options = VARIANTS[scheme_name]
        return Recipe.from_scheme(name, **options)
    w = get_scheme(scheme_name).weights
    if w.strategy != "group":
        return Recipe.from_scheme(scheme_name)
    ins = {shape[-1] for name, shape in tensor_shapes(cfg).items()
           if len(shape) == 2 and name.rsplit(".", 2)[-2].endswith(("_proj", "_proj_with_mqa"))}
    for g in (w.group_size, 64, 32):
        if all(k % g == 0 for k in ins):
            return Recipe.from_scheme(scheme_name) if g == w.group_size else Recipe.from_scheme(scheme_name,
                                                                                                  group_size=g)
    raise ValueError(f"{scheme_name}: no group size fits input features {sorted(ins)}")


def save_word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary: <s>, </s>, the 52 ASCII letters, then t3 ... t<V-1>, decoded
    joined by spaces. Every id the random model emits is text (a byte tokenizer left ids >= 256 without any, so a
    server streamed nothing), and prompts of letters encode to exactly as many tokens (lowbit bench's fallback)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words = ["<s>", "</s>"] + letters
    words += [f"t{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def write(cfg: dict, out: str, scheme_name: str = "bf16", seed: int = 0, device: str = "cpu",
          shard_bytes: int = 2 << 30, progress: bool = True) -> str:
    from lowbit.quant.compressed import build_config
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "config.json")):
        os.remove(os.path.join(out, "config.json"))  # incomplete until written again, last
    recipe = recipe_for(cfg, scheme_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = tensor_shapes(cfg)
    weight_map, shard, size, n_shard = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            n_shard += 1
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            if progress:
                print(f"  {fname}: {len(shard)} tensors, {size / 1e9:.2f} GB", flush=True)
            shard, size = {}, 0
    for name, shape in shapes.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        linear = module.rsplit(".", 1)[-1].endswith(("_proj", "_proj_with_mqa")) or module == "lm_head"
        scheme = recipe.scheme_for(module) if recipe is not None and linear else None
        for k, t in random_module(name, shape, scheme, gen, device).items():
            shard[k] = t
            size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    save_word_tokenizer(out, cfg["vocab_size"])
    config = dict(cfg)
    if recipe is not None:
        config["quantization_config"] = build_config([(g.targets, g.scheme) for g in recipe.groups],
                                                     recipe.default, recipe.ignore)
    tmp = os.path.join(out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    os.replace(tmp, os.path.join(out, "config.json"))
    return out


def num_parameters(cfg: dict) -> int:
    total = 0
    for shape in tensor_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), required=True)
    ap.add_argument("--layers", type=int, help="number of layers (r1: a slice of R1's 61; default 4)")
    ap.add_argument("--scheme", default="bf16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = dict(GEOMETRIES[args.geometry])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    print(f"{args.geometry}: {num_parameters(cfg) / 1e9:.2f}B parameters, {cfg['num_hidden_layers']} layers, "
          f"scheme {args.scheme} -> {args.out}", flush=True)
    write(cfg, args.out, args.scheme, args.seed, args.device)


if __name__ == "__main__":
    main()
