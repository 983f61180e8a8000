"""Peak memory of `lowbit quantize` does not grow with the number of layers.

Writes two random DeepSeek-V3-geometry checkpoints of the same width, 4 and 16 layers (MLA, 16 routed experts and
a shared one, one dense layer first; bf16, generated one layer at a time), quantizes each with
`lowbit quantize --scheme w4a16 --algo gptq` in its own process, and reads that process's peak RSS from the kernel
(wait4). The claim holds when the two peaks are within 20% while the checkpoints differ 4x in size.

    python benchmarks/quantize_memory.py [--layers 4 16] [--workdir DIR] [--out benchmarks/results/quantize_memory.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

CONFIG = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=4096, hidden_size=1024,
              intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=16, n_shared_experts=1,
              num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, num_attention_heads=8,
              num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
              v_head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=4096, routed_scaling_factor=2.5,
              norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rope_theta=10000.0,
              tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def write_checkpoint(path: str, num_layers: int) -> int:
    """A random checkpoint written one layer (one shard) at a time; returns its size in bytes."""
    from lowbit.config import ModelConfig
    from lowbit.quant import layerwise
    cfg_d = dict(CONFIG, num_hidden_layers=num_layers)
    cfg = ModelConfig.from_dict(cfg_d)
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    h, v = cfg.hidden_size, cfg.vocab_size
    shard("embed.safetensors", {"model.embed_tokens.weight": rand(v, h, scale=1.0)})
    for i in range(num_layers):
        layer = layerwise.build_layer(cfg, i, torch.bfloat16, device="meta")
        prefix = f"model.layers.{i}"
        tensors = {}
        for pname, p in layer.named_parameters():
            module, _, leaf = pname.rpartition(".")
            sub = layer.get_submodule(module) if module else layer
            parts = layerwise.split_merged(f"{prefix}.{module}")
            sizes = getattr(sub, "output_sizes", [p.shape[0]]) if len(parts) > 1 else [p.shape[0]]
            for part, rows in zip(parts, sizes):
                shape = (rows, *p.shape[1:])
                if "norm" in pname:
                    tensors[f"{part}.{leaf}"] = torch.ones(shape, dtype=torch.bfloat16)
                elif leaf == "e_score_correction_bias":
                    tensors[f"{part}.{leaf}"] = torch.zeros(shape, dtype=torch.float32)
                else:
                    tensors[f"{part}.{leaf}"] = rand(*shape)
        shard(f"layer-{i:03d}.safetensors", tensors)
    shard("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg_d), f)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.quant.conftest import save_byte_tokenizer  # bytes as tokens: calibration text needs a tokenizer
    save_byte_tokenizer(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def quantize_peak_rss(src: str, out: str, extra: list[str]) -> tuple[int, float]:
    """Run `lowbit quantize` in a child process (its progress bar on this terminal); its peak RSS in bytes."""
    cmd = [sys.executable, "-m", "lowbit", "quantize", "--model", src, "--output", out, "--scheme", "w4a16",
           *extra]
    start = time.time()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"lowbit quantize failed ({proc.returncode}): {' '.join(cmd)}")
    return usage.ru_maxrss * 1024, time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--num-calib-tokens", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "quantize_memory.json"))
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="lowbit-qmem-")
    runs = []
    for n in args.layers:
        src, out = os.path.join(work, f"src-{n}"), os.path.join(work, f"out-{n}")
        shutil.rmtree(out, ignore_errors=True)
        size = write_checkpoint(src, n) if not os.path.exists(os.path.join(src, "config.json")) else sum(
            os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        print(f"{n} layers: checkpoint {size / 2**20:.0f} MiB, quantizing ...", file=sys.stderr)
        rss, secs = quantize_peak_rss(src, out, ["--num-calib-tokens", str(args.num_calib_tokens)])
        runs.append({"layers": n, "checkpoint_mib": round(size / 2**20), "peak_rss_mib": round(rss / 2**20),
                     "seconds": round(secs)})
        print(f"{n} layers: peak RSS {rss / 2**20:.0f} MiB in {secs:.0f} s", file=sys.stderr)
    lo, hi = min(r["peak_rss_mib"] for r in runs), max(r["peak_rss_mib"] for r in runs)
    result = {"benchmark": "lowbit quantize peak RSS vs number of layers", "date": datetime.date.today().isoformat(),
              "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "threads": os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()),
              "scheme": "w4a16", "algo": "gptq", "num_calib_tokens": args.num_calib_tokens,
              "geometry": {k: CONFIG[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                                                  "kv_lora_rank", "q_lora_rank")},
              "runs": runs, "max_over_min": round(hi / lo, 3), "within_20_percent": hi <= 1.2 * lo}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["within_20_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
