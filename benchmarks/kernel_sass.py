"""Compile the Triton kernels for Hopper (sm_90a) on any machine and report what costs no device time to read:
registers, spills, shared memory and the instruction mix of the SASS (matrix instructions HMMA / HGMMA / QGMMA /
IMMA-IGMMA, global-load widths, int-to-float conversions, local-memory traffic).

Triton's wheel carries ptxas and cuobjdump, so no GPU is needed. Arguments get the divisibility-by-16 hints that
Triton's JIT gives real launches (aligned pointers, strides and sizes that are multiples of 16).

    python benchmarks/kernel_sass.py [--filter packed] [--out benchmarks/results/kernel-sass.md]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit.kernels import matmul_packed as mp  # noqa: E402
from lowbit.kernels import moe, pdl, tuning  # noqa: E402
from lowbit.kernels import matmul_unpacked as mu  # noqa: E402
from lowbit.kernels.linear import DEQUANT_ABOVE_ROWS  # noqa: E402
from lowbit.kernels import gqa_decode as gd  # noqa: E402
from lowbit.kernels import mla_decode as md  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# M (tokens) and counts derived from K are not multiples of 16; N and K of real layers are (V2-Lite 1408, R1 7168)
NOT_DIVISIBLE = {"M", "T", "num_groups", "k_tiles", "k_groups", "x_row_div", "H", "G", "max_blocks", "scale"}


def compile_variant(fn, ptr_types: dict, const: dict, num_warps: int, num_stages: int, floats=("scale",)):
    # constexpr parameters left out take their defaults, as a launch does
    if "PDL" in fn.arg_names and "PDL" not in const:  # as the engine launches it on a Hopper GPU (programmatic
        # dependent launch), also where the kernel's own default is off
        const = dict(const, PDL=pdl.MODE or 1)
    const = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **const)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            if not ptr_types[name].startswith("tensordesc"):  # (a descriptor carries its own alignment)
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in NOT_DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                          "num_stages": num_stages})


def inspect(k) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        # Triton 3.9 writes PTX newer than its sm_90 ptxas reads and assembles it with ptxas-blackwell
        for ptxas in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([os.path.join(BIN, ptxas), "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                  os.path.join(d, "o.cubin")], capture_output=True, text=True)
            if run.returncode == 0 or not os.path.exists(os.path.join(BIN, "ptxas-blackwell")):
                break
        info = run.stderr
        if run.returncode:
            raise RuntimeError(f"ptxas failed: {info}")
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", info))
    ops = collections.Counter(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?P\d\s+)?([A-Z0-9_.]+)",
                                                               sass))
    # the main loop: the longest span closed by a backward branch (instructions per K tile in the GEMMs)
    addrs = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loop = 0
    for addr, text in addrs:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loop = max(loop, sum(1 for a, _ in addrs if int(target.group(1), 16) <= a <= addr))

    def count(prefix):
        return sum(v for k, v in ops.items() if k.startswith(prefix))
    loads = collections.Counter()
    for name, v in ops.items():
        if name.startswith(("LDG", "LDGSTS")):
            width = re.search(r"\.(128|64|U16|U8|S8|S16)\b", name)
            loads[width.group(1) if width else "32"] += v
    return {"regs": regs, "spill_bytes": spills, "smem": k.metadata.shared, "instructions": sum(ops.values()),
            "loop instructions": loop,
            "HMMA": count("HMMA"), "HGMMA": count("HGMMA"), "QGMMA": count("QGMMA"),
            "IMMA": count("IMMA") + count("IGMMA"),
            "I2F": count("I2F"), "F2F": count("F2F") + count("F2FP"), "LDL/STL": count("LDL") + count("STL"),
            "global loads by width": dict(loads)}


PACKED_PTRS = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i32", "out_ptr": "*bf16",
               "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "xs_ptr": "*fp32", "sorted_ptr": "*i32", "expert_ptr": "*i32", "npad_ptr": "*i32", "rw_ptr": "*fp32"}


def variants():
    base = dict(GROUP=128, HAS_ZP=False, MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, SPLIT_K=1, SWAP=False, EVEN_K=True,
                FIXUP=False)
    for name, bits, act, x_t in (("w4a16", 4, mp.ACT_NONE, "*bf16"), ("w8a16", 8, mp.ACT_NONE, "*bf16"),
                                 ("w4a8", 4, mp.ACT_FP8_STATIC, "*bf16"), ("w4a8-int8", 4, mp.ACT_INT8_TOKEN, "*i8")):
        for bm, bn, warps, stages, swap in ((16, 64, 4, 3, False), (64, 128, 8, 3, False), (128, 64, 8, 3, False),
                                            (16, 64, 4, 3, True), (64, 128, 8, 3, True)):
            const = dict(base, BITS=bits, ACT=act, BM=bm, BN=bn, TK=mp.default_tile_k(bits), SWAP=swap)
            yield (f"packed {name} BM={bm} BN={bn}{' swapped' if swap else ''}", mp._packed_matmul_kernel,
                   dict(PACKED_PTRS, x_ptr=x_t), const, warps, stages)
    const = dict(base, BITS=4, ACT=mp.ACT_NONE, BM=16, BN=64, TK=256, MOE=True, FUSE_SILU=True)
    yield "packed w4a16 fused-MoE gate_up BM=16 BN=64", mp._packed_matmul_kernel, PACKED_PTRS, const, 4, 3
    ubase = dict(MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, SPLIT_K=1, FIXUP=False)
    for name, kind, t in (("bf16", mu.KIND_BF16, "*bf16"), ("w8a8", mu.KIND_INT8_CHANNEL, "*i8"),
                          ("fp8-block", mu.KIND_FP8_BLOCK, "*fp8e4nv")):
        for bm, bn, bk, warps, stages in ((16, 64, 128, 4, 4), (128, 128, 128, 8, 4)):
            yield (f"unpacked {name} BM={bm} BN={bn}", mu._unpacked_matmul_kernel, unpacked_ptrs(t),
                   dict(ubase, KIND=kind, BM=bm, BN=bn, BK=bk), warps, stages)
    yield ("mla_decode bf16 R=512 DR=64", md._mla_decode_kernel,
           {"q_ptr": "*bf16", "cache_ptr": "*bf16", "bt_ptr": "*i64", "lens_ptr": "*i64", "out_ptr": "*fp32",
            "lse_ptr": "*fp32"},
           dict(R=512, DR=64, R_P=512, DR_P=64, PAGE=16, BH=16, BN=32, SPLITS=1), 4, 2)
    yield ("gqa_decode bf16 D=128", gd._gqa_decode_kernel,
           {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i64", "lens_ptr": "*i64",
            "out_ptr": "*fp32", "lse_ptr": "*fp32"},
           dict(D=128, DV=128, D_P=128, DV_P=128, PAGE=16, BH=16, BN=32, SPLITS=1), 4, 2)


SMEM_LIMIT = 227 * 1024  # shared memory one Hopper block may have
# (kind, weight type, activation type)
UNPACKED_KINDS = ((mu.KIND_BF16, "*bf16", "*bf16"), (mu.KIND_INT8_CHANNEL, "*i8", "*i8"),
                  (mu.KIND_FP8_BLOCK, "*fp8e4nv", "*fp8e4nv"), (mu.KIND_INT8_W16, "*i8", "*bf16"))


NORM_PTRS = {"x_ptr": "*bf16", "res_ptr": "*bf16", "sum_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}


def unpacked_ptrs(t: str, expert: str = "*i32", x: str | None = None) -> dict:
    """_unpacked_matmul_kernel's pointer types for x (x, t by default) and the weights of type t (expert: the router's
    int64 ids at one token)."""
    return {"x_ptr": x or t, "xs_ptr": "*fp32", "w_ptr": t, "ws_ptr": "*fp32", "out_ptr": "*bf16", "sorted_ptr": "*i32",
            "expert_ptr": expert, "npad_ptr": "*i32", "rw_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32"}


def fits(problems: list[str], name: str, r: dict) -> None:
    """Note a compiled variant over Hopper's shared memory or spilling registers; print its figures."""
    if r["smem"] > SMEM_LIMIT or r["spill_bytes"]:
        problems.append(f"{name}: {r['smem']} bytes of shared memory, {r['spill_bytes']} spilled")
    print(f"{name}: {r}", flush=True)


def inspect_unpacked(t: str, const: dict, cfg: dict, expert: str = "*i32", x: str | None = None) -> dict:
    """_unpacked_matmul_kernel compiled with constants const in launch configuration cfg, weights of type t."""
    return inspect(compile_variant(mu._unpacked_matmul_kernel, unpacked_ptrs(t, expert, x), const,
                                   cfg.get("num_warps", 4), cfg.get("num_stages", 3)))


def inspect_packed(bits: int, act: int, cfg: dict, has_zp: bool = False, moe: bool = False,
                   paired: bool = False) -> dict:
    """The dense packed GEMM compiled with an engine / tuning configuration (K filling its tiles, as R1's do); moe:
    the fused MoE's gate_up projection instead (grouped rows, SiLU fused); paired: int4 weights in the paired layout
    (kernels/linear.py dense_layout), their inline PTX."""
    const = dict(BITS=bits, GROUP=128, HAS_ZP=has_zp, ACT=act, MOE=moe, FUSE_SILU=moe, ROUTED_WEIGHT=False,
                 BM=cfg["BM"], BN=cfg["BN"], TK=mp.default_tile_k(bits), SPLIT_K=cfg.get("SPLIT_K", 1),
                 SWAP=cfg.get("SWAP", False), EVEN_K=True, FIXUP=not moe and cfg.get("SPLIT_K", 1) > 1,
                 **({"PAIRED": True, "ASM": True} if paired else {}))
    x_t = "*i8" if act == mp.ACT_INT8_TOKEN else "*bf16"
    return inspect(compile_variant(mp._packed_matmul_kernel, dict(PACKED_PTRS, x_ptr=x_t), const,
                                   cfg.get("num_warps", 4), cfg.get("num_stages", 3)))


def engine_moe_config(act: int, proj: str, paired: bool, r1: bool = False) -> dict:
    """The launch configuration of the fused MoE's projection at one token on V2-Lite-sized experts (r1: R1's,
    2048 x 7168)."""
    gate_up = proj == "gate_up"
    # (the engine picks w4a8's by its scheme's static FP8 activations, then runs them on the FP8 grid at one token)
    scheme_act = mp.ACT_FP8_STATIC if act == mp.ACT_FP8_GRID else act
    hidden, inter = (7168, 2048) if r1 else (2048, 1408)
    cfg = tuning.packed_config(1, inter if gate_up else hidden, hidden if gate_up else inter, 4, scheme_act, moe=True,
                               paired=paired)
    return moe.gate_up_config(cfg, packed=True) if gate_up else cfg


def one_token_moe(act: int, proj: str, paired: bool, cfg: dict, has_zp: bool = False, split_k: int = 1,
                  r1: bool = False, out_grid: bool = False) -> dict:
    """The fused MoE's projection at one token (a program row per slot) on V2-Lite-sized experts (K = 2048 for
    gate_up, 1408 for down; r1: R1's, 7168 and 2048) in launch configuration cfg, planar or paired int4 weights."""
    gate_up = proj == "gate_up"
    # (down sums the token's slots, as fused_moe launches it at one token)
    const = dict(BITS=4, GROUP=128, HAS_ZP=has_zp, ACT=act, MOE=2, FUSE_SILU=gate_up, ROUTED_WEIGHT=not gate_up,
                 BM=16, BN=cfg["BN"], TK=256, SPLIT_K=split_k, SWAP=cfg.get("SWAP", False), EVEN_K=gate_up or r1,
                 FIXUP=False, PAIRED=paired, ASM=True, SUM_SLOTS=not gate_up,
                 **({"OUT_GRID": True} if out_grid else {}))
    x_t = "*i8" if act == mp.ACT_INT8_TOKEN else "*bf16"
    ptrs = dict(PACKED_PTRS, x_ptr=x_t, **({"og_ptr": "*fp32"} if out_grid else {}))
    r = inspect(compile_variant(mp._packed_matmul_kernel, ptrs, const, cfg["num_warps"], cfg["num_stages"]))
    r["weight rows"] = 2 * cfg["BN"] if gate_up else cfg["BN"]
    r["per weight"] = r["loop instructions"] / (r["weight rows"] * 256 / (32 * cfg["num_warps"]))
    return r


def paired_rows() -> list[str]:
    """The one-token MoE's main loop in the planar and the paired int4 layout (packed_layout.pair), per scheme, at
    32 and 64 weight rows a program with the weights as either operand: instructions per weight, the number the
    paired layout is there to lower. '*' marks what the engine takes (LOWBIT_INT4_PAIRED=1 for the paired rows; the
    engine keeps weights with zero points and w4a8-int8's planar)."""
    lines = ["| scheme | projection | zero points | layout | weight rows | weights as | main-loop instructions | "
             "per weight | regs | smem |", "| --- " * 10 + "|"]
    for name, act in (("w4a16", mp.ACT_NONE), ("w4a8 (rows on the FP8 grid)", mp.ACT_FP8_GRID),
                      ("w4a8-int8", mp.ACT_INT8_TOKEN)):
        for proj in ("gate_up", "down"):
            for has_zp in ((False, True) if act == mp.ACT_NONE and proj == "gate_up" else (False,)):
                for paired in (False, True):
                    engine = engine_moe_config(act, proj, paired)
                    for rows in (32, 64):
                        for swap in (False, True):
                            cfg = dict(engine, BN=rows // 2 if proj == "gate_up" else rows, SWAP=swap)
                            r = one_token_moe(act, proj, paired, cfg, has_zp)
                            takes = not paired or (not has_zp and act != mp.ACT_INT8_TOKEN)  # (experts_layout)
                            mark = " *" if takes and cfg == dict(engine, SWAP=engine.get("SWAP", False)) else ""
                            lines.append(f"| {name} | {proj} | {'yes' if has_zp else 'no'} | "
                                         f"{'paired' if paired else 'planar'}{mark} | {rows} | "
                                         f"{'first operand' if swap else 'second operand'} | "
                                         f"{r['loop instructions']} | {r['per weight']:.2f} | {r['regs']} | "
                                         f"{r['smem']} |")
                            print(lines[-1], flush=True)
    return lines


def check_engine_configs() -> list[str]:
    """Compile the configuration the engine picks for each kernel family and M bucket (R1 dense-down shape) and
    return what is wrong: shared memory over the limit, register spills, no
    matrix instruction, int-to-float conversions per int4 weight in the bf16 path, loads narrower than 16 bytes in
    the unpacked kernels."""
    problems = []
    N, K = 7168, 18432
    for m in (1, 16, 256, 4096):
        for bits, act in ((4, mp.ACT_NONE), (8, mp.ACT_NONE), (4, mp.ACT_FP8_STATIC), (4, mp.ACT_INT8_TOKEN)):
            cfg = tuning.packed_config(m, N, K, bits, act)
            r = inspect_packed(bits, act, cfg)
            name = f"packed bits={bits} act={act} M={m} {cfg}"
            if r["smem"] > SMEM_LIMIT:
                problems.append(f"{name}: {r['smem']} bytes of shared memory")
            if r["HMMA"] + r["HGMMA"] + r["QGMMA"] + r["IMMA"] == 0:
                problems.append(f"{name}: no matrix instruction")
            if r["spill_bytes"]:
                problems.append(f"{name}: {r['spill_bytes']} bytes spilled")
            if m <= 16 and bits == 4 and act == mp.ACT_NONE and r["I2F"]:
                problems.append(f"{name}: {r['I2F']} I2F")
            print(f"{name}: {r}", flush=True)
        # dense symmetric int4 off the GEMV in the paired layout (kernels/linear.py dense_layout)
        for act in (mp.ACT_NONE, mp.ACT_FP8_STATIC) if m <= 16 else ():
            cfg = tuning.packed_config(m, N, K, 4, act, paired=True)
            r = inspect_packed(4, act, cfg, paired=True)
            fits(problems, f"packed paired act={act} M={m} {cfg}", r)
            if act == mp.ACT_NONE and r["I2F"]:
                problems.append(f"packed paired M={m} {cfg}: {r['I2F']} I2F")
        # asymmetric w4a16 (zero points): its own int4 -> 16-bit branch (a compile error there once reached a GPU)
        cfg = tuning.packed_config(m, N, K, 4, mp.ACT_NONE)
        r = inspect_packed(4, mp.ACT_NONE, cfg, has_zp=True)
        if r["spill_bytes"] or r["HGMMA"] + r["HMMA"] == 0:
            problems.append(f"packed asymmetric M={m} {cfg}: {r['spill_bytes']} spilled, no MMA?")
        print(f"packed asymmetric bits=4 M={m} {cfg}: {r}", flush=True)
        # the swapped candidates autotuning may pick (tuning.candidates)
        for cfg in [c for c in tuning.candidates(True, m, K, 4) if c.get("SWAP")] if m in (1, 256) else []:
            for bits, act in ((4, mp.ACT_NONE), (4, mp.ACT_FP8_STATIC)):
                fits(problems, f"packed swapped bits={bits} act={act} M={m} {cfg}", inspect_packed(bits, act, cfg))
        for kind, t, x_t in UNPACKED_KINDS:
            if kind == mu.KIND_INT8_W16 and m > DEQUANT_ABOVE_ROWS:  # (w8a16 prefill: dequantized, cuBLAS)
                continue
            cfg = tuning.unpacked_config(m, N, K, kind)
            ptrs = unpacked_ptrs(t, x=x_t)
            if cfg.get("PERSISTENT"):  # many rows, int8 / fp8-block: the persistent kernel with descriptor loads
                e = t[1:]
                ptrs = {"a_desc": f"tensordesc<{e}[{cfg['BM']}, {cfg['BK']}]>",
                        "b_desc": f"tensordesc<{e}[{cfg['BN']}, {cfg['BK']}]>", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                        "out_ptr": "*bf16"}
                const = dict(KIND=kind, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=mu.GROUP_M,
                             PROGRAMS=132)  # (an H100's multiprocessors)
                kernel = mu._persistent_matmul_kernel
            else:
                const = dict(KIND=kind, MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, BM=cfg["BM"], BN=cfg["BN"],
                             BK=cfg["BK"], SPLIT_K=cfg.get("SPLIT_K", 1), FIXUP=cfg.get("SPLIT_K", 1) > 1)
                kernel = mu._unpacked_matmul_kernel
            r = inspect(compile_variant(kernel, ptrs, const, cfg.get("num_warps", 4), cfg.get("num_stages", 3)))
            name = f"unpacked kind={kind} M={m} {cfg}"
            if r["smem"] > SMEM_LIMIT or r["spill_bytes"]:
                problems.append(f"{name}: {r['smem']} bytes of shared memory, {r['spill_bytes']} spilled")
            if not r["global loads by width"].get("128") and not cfg.get("PERSISTENT"):
                problems.append(f"{name}: no 16-byte loads")
            if m >= 4096 and r["HGMMA"] + r["QGMMA"] + r["IMMA"] == 0:
                problems.append(f"{name}: no warpgroup MMA at large M")
            print(f"{name}: {r}", flush=True)
    # the fused MoE's gate_up projection (gate and up rows interleaved in one tile, SiLU fused) at R1's shape
    for m in (1, 4, 64, 4096):
        for bits, act in ((4, mp.ACT_NONE), (8, mp.ACT_NONE), (4, mp.ACT_FP8_STATIC), (4, mp.ACT_FP8_GRID),
                          (4, mp.ACT_INT8_TOKEN)):
            cfg = moe.gate_up_config(tuning.packed_config(m, 2048, 7168, bits, act, moe=True), packed=True)
            fits(problems, f"MoE gate_up packed bits={bits} act={act} M={m} {cfg}",
                 inspect_packed(bits, act, cfg, moe=True))
        # paired experts (matmul_packed.experts_layout) from two rows an expert: swapped, 32-row blocks from 17 rows
        for act in (mp.ACT_NONE, mp.ACT_FP8_GRID) if m in (4, 64) else ():
            cfg = moe.gate_up_config(tuning.packed_config(m, 2048, 7168, 4, act, moe=True, paired=True), packed=True)
            fits(problems, f"MoE gate_up paired act={act} M={m} {cfg}", inspect_packed(4, act, cfg, moe=True,
                                                                                       paired=True))
        for kind, t, x_t in UNPACKED_KINDS:
            cfg = moe.gate_up_config(tuning.unpacked_config(m, 2048, 7168, kind, moe=True), packed=False)
            const = dict(KIND=kind, MOE=True, FUSE_SILU=True, ROUTED_WEIGHT=False, BM=cfg["BM"], BN=cfg["BN"],
                         BK=cfg["BK"], SPLIT_K=1, FIXUP=False)
            fits(problems, f"MoE gate_up unpacked kind={kind} M={m} {cfg}",
                 inspect_unpacked(t, const, cfg, x=x_t))
        if m == 1:  # one token's down projection, the slots summed by its last program (rows.store_slot_sum)
            for kind, t, x_t in UNPACKED_KINDS:
                cfg = tuning.unpacked_config(1, 2048, 1408, kind, moe=True)
                const = dict(KIND=kind, MOE=2, FUSE_SILU=False, ROUTED_WEIGHT=True, BM=cfg["BM"], BN=cfg["BN"],
                             BK=cfg["BK"], SPLIT_K=1, FIXUP=False, SUM_SLOTS=True)
                fits(problems, f"one-token MoE down + slot sum, unpacked kind={kind} {cfg}",
                     inspect_unpacked(t, const, cfg, expert="*i64", x=x_t))
                fits(problems, f"one-token MoE down + slot sum, K in two, unpacked kind={kind} {cfg}",
                     inspect_unpacked(t, dict(const, SPLIT_K=2), cfg, expert="*i64", x=x_t))
                if kind == mu.KIND_INT8_CHANNEL:  # w8a8: each slot's 16-bit row quantized in the product
                    const = dict(const, QUANT_IN=True, KP=2048)
                    fits(problems, f"one-token MoE down + slot sum, int8 quantizing its rows {cfg}",
                         inspect_unpacked(t, const, cfg, expert="*i64", x="*bf16"))
    # w8a8 at one row, the 16-bit row quantized in the product: the widest K it takes, in four K splits
    cfg = dict(tuning.unpacked_config(1, 4096, mu.QUANT_IN_MAX_K, mu.KIND_INT8_CHANNEL), SPLIT_K=4)
    const = dict(KIND=mu.KIND_INT8_CHANNEL, MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, BM=cfg["BM"],
                 BN=cfg["BN"], BK=cfg["BK"], SPLIT_K=4, FIXUP=True, QUANT_IN=True, KP=mu.QUANT_IN_MAX_K)
    fits(problems, f"unpacked int8 M=1 quantizing its row, K={mu.QUANT_IN_MAX_K} {cfg}",
         inspect_unpacked("*i8", const, cfg, x="*bf16"))
    # int8 weights on the 16-bit tensor cores at 17-64 rows (w8a16, w8a8's activation groups): a rule of their own
    cfg = tuning.unpacked_config(64, 7168, 16384, mu.KIND_INT8_W16)
    const = dict(KIND=mu.KIND_INT8_W16, MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, BM=cfg["BM"], BN=cfg["BN"],
                 BK=cfg["BK"], SPLIT_K=cfg["SPLIT_K"], FIXUP=cfg["SPLIT_K"] > 1)
    fits(problems, f"unpacked int8 weights, 16-bit products, M=64 {cfg}",
         inspect_unpacked("*i8", const, cfg, x="*bf16"))
    # the decode kernels around the GEMMs: each compiles (the interpreter does not check what only the compiler does)
    from lowbit.kernels import mla_prep, norm_rope, router, split_kv
    small = [
        ("rms_norm bf16 7168", norm_rope._rms_norm_kernel, dict(NORM_PTRS, q_ptr="*bf16", s_ptr="*bf16"),
         dict(BLOCK=8192, HAS_RES=False, INT8_ROWS=False), 16, ("eps",)),
        ("residual add + rms_norm bf16 7168", norm_rope._rms_norm_kernel, dict(NORM_PTRS, q_ptr="*bf16", s_ptr="*bf16"),
         dict(BLOCK=8192, HAS_RES=True, INT8_ROWS=False), 16, ("eps",)),
        ("residual add + rms_norm bf16 7168 + int8 rows", norm_rope._rms_norm_kernel,
         dict(NORM_PTRS, q_ptr="*i8", s_ptr="*fp32"), dict(BLOCK=8192, HAS_RES=True, INT8_ROWS=True), 16, ("eps",)),
        ("split-KV combine, 16 splits x 512", split_kv._combine_kernel,
         {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}, dict(S=16, S_P=16, BR=1, D_P=512), 4, ()),
        ("rope bf16 interleaved 64, 128 heads", norm_rope._rope_kernel,
         {"x_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(HALF=32, BLOCK=32, BH=128, INTERLEAVED=True), 4, ()),
        ("moe align 256 slots", moe._align_kernel,
         {"ids_ptr": "*i64", "sorted_ptr": "*i32", "expert_ptr": "*i32", "npad_ptr": "*i32"},
         dict(BLOCK_M=16, BN=256, CHUNK=32, FILL=256), 4, ()),
        ("packed dequantize w4 g128", mp._dequant_kernel,
         {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*bf16"},
         dict(BITS=4, GROUP=128, HAS_ZP=False, BN=64, TK=256), 4, ()),
        ("w8a16 dequantize int8 per channel", mu._dequant_int8_kernel,
         {"w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*bf16"}, dict(BN=32, BK=256), 4, ()),
        ("packed dequantize w4 g128, paired layout", mp._dequant_kernel,
         {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*bf16"},
         dict(BITS=4, GROUP=128, HAS_ZP=False, BN=64, TK=256, PAIRED=True), 4, ()),
        ("router R1", router._route_kernel,
         {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i64"},
         dict(E_P=256, K=8, K_P=8, G=8, G_P=8, TOPK_GROUP=4, SIGMOID=True, HAS_BIAS=True, NORM=True, SHARED=1), 4,
         ("scaling",)),
        ("router logits R1 T=1 (bf16 x, fp32 w)", router._logits_kernel,
         {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32"}, dict(BT=1, BE=2, BD=2048, DOT=False), 4, ()),
        ("router logits R1 T=16 block (bf16 x, fp32 w)", router._logits_kernel,
         {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32"}, dict(BT=16, BE=2, BD=512, DOT=False), 4, ()),
        ("router logits R1 T=8 (bf16 x, bf16 w)", router._logits_kernel,
         {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32"}, dict(BT=8, BE=2, BD=1024, DOT=False), 4, ()),
        ("router logits R1 16 x 32 tiles (bf16 x, bf16 w)", router._logits_kernel,
         {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32"}, dict(BT=16, BE=32, BD=256, DOT=True), 4, ()),
        ("mla_store_kv bf16 R=512 DR=64", mla_prep._store_kv_kernel,
         {"kv_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "slots_ptr": "*i64",
          "cache_ptr": "*bf16"}, dict(HALF=32, BLOCK=512, BLOCK_HALF=32, INTERLEAVED=True), 1, ("eps",)),
        ("mla_q_prep bf16 R=512 DR=64 nope=128, 128 heads", mla_prep._q_prep_kernel,
         {"q_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(NOPE=128, R=512, HALF=32, NOPE_P=128, BLOCK_HALF=32, BT=16, BR=64, INTERLEAVED=True), 4, ()),
        ("mla_prep (store_kv + q_prep) bf16 R=512 DR=64 nope=128, one warp", mla_prep._prep_kernel,
         {"kv_ptr": "*bf16", "kw_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "slots_ptr": "*i64",
          "cache_ptr": "*bf16", "q_ptr": "*bf16", "uk_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(HALF=32, BLOCK=512, BLOCK_HALF=32, INTERLEAVED=True, NOPE=128, R=512, NOPE_P=128, BT=16, BR=64), 1,
         ("eps",)),
        ("mla_out bf16 R=512 V=128, 128 heads", mla_prep._out_kernel,
         {"o_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(R=512, V=128, BT=16, BV=64, BK=64, LINES=8, STEP=64), 4, ()),
    ]
    from lowbit.kernels import act_quant, greedy
    small += [
        ("argmax chunks, 102400 bf16 logits", greedy._chunk_max_kernel, {"x_ptr": "*bf16", "max_ptr": "*fp32",
                                                                         "idx_ptr": "*i32"},
         dict(CHUNK=greedy.CHUNK), 4, ()),
        ("argmax pick", greedy._pick_kernel, {"max_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64"},
         dict(C_P=64), 1, ()),
        ("moe_sum bf16 7168", moe._moe_sum_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=1024), 4, ()),
        ("w4a8 rows on their experts' FP8 grid, bf16", act_quant._fp8_grid_kernel,
         {"x_ptr": "*bf16", "out_ptr": "*bf16", "s_ptr": "*fp32", "e_ptr": "*i64"}, dict(HAS_E=True, BLOCK=2048), 4,
         ()),
    ]
    # the one-row packed GEMV (gemv_packed.py) as the engine launches it: dense with its K split, and the MoE's two
    # projections (LOWBIT_GEMV_MOE=1), every packed activation mode
    from lowbit.kernels import gemv_packed
    gemv_ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i32", "out_ptr": "*bf16",
                 "xs_ptr": "*fp32", "slot_expert_ptr": "*i64", "rw_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    for bits, act, x_t in ((4, mp.ACT_NONE, "*bf16"), (8, mp.ACT_NONE, "*bf16"), (4, mp.ACT_FP8_STATIC, "*bf16"),
                           (4, mp.ACT_INT8_TOKEN, "*i8")):
        group = 128 if bits == 4 else 0
        base = dict(BITS=bits, GROUP=group, HAS_ZP=False, ACT=act, TK=mp.default_tile_k(bits), EVEN_K=True)
        dense = tuning.gemv_config(7168, 2048, bits)
        small.append((f"gemv dense bits={bits} act={act} {dense}", gemv_packed._gemv_kernel, dict(gemv_ptrs, x_ptr=x_t),
                      dict(base, MOE=False, FUSE_SILU=False, ROUTED_WEIGHT=False, SUM_SLOTS=False, BN=dense["BN"],
                           TILES=dense["TILES"], SPLIT_K=4), dense["num_warps"], ()))
        for silu in (True, False):
            cfg = tuning.gemv_config(4096 if silu else 7168, 7168 if silu else 2048, bits, 9, silu)
            small.append((f"gemv MoE {'gate_up' if silu else 'down + slot sum'} bits={bits} act={act} {cfg}",
                          gemv_packed._gemv_kernel, dict(gemv_ptrs, x_ptr=x_t),
                          dict(base, MOE=True, FUSE_SILU=silu, ROUTED_WEIGHT=not silu, SUM_SLOTS=not silu,
                               BN=cfg["BN"], TILES=1 << 20, SPLIT_K=1), cfg["num_warps"], ()))
    # the one-token MoE on paired int4 experts (LOWBIT_INT4_PAIRED=1; its inline PTX compiles only here)
    for act in (mp.ACT_NONE, mp.ACT_FP8_GRID):
        # (down: V2-Lite's K split in two, the default; R1's experts: two pipeline stages, tuning.LARGE_EXPERT)
        for proj, split, r1 in (("gate_up", 1, False), ("down", 1, False), ("down", 2, False), ("gate_up", 1, True),
                                ("down", 1, True)):
            cfg = engine_moe_config(act, proj, paired=True, r1=r1)
            # (w4a8's gate_up also writes the down projection's input on its FP8 grids: tuning.W4A8_FUSED)
            for out_grid in (False, True) if act == mp.ACT_FP8_GRID and proj == "gate_up" else (False,):
                r = one_token_moe(act, proj, True, cfg, split_k=split, r1=r1, out_grid=out_grid)
                name = (f"one-token MoE {'R1 ' if r1 else ''}{proj} act={act} paired"
                        f"{' swapped' if cfg.get('SWAP') else ''} split {split} stages {cfg['num_stages']}"
                        f"{' out on the FP8 grid' if out_grid else ''}")
                # swapped, the weights are the warpgroup MMA's first operand; unswapped (w4a8's gate_up) 16 token
                # rows take the warp-level MMA
                if r["spill_bytes"] or r["smem"] > SMEM_LIMIT or r["HGMMA" if cfg.get("SWAP") else "HMMA"] == 0:
                    problems.append(f"{name}: {r['smem']} bytes of shared memory, {r['spill_bytes']} spilled, "
                                    f"{r['HGMMA']} HGMMA, {r['HMMA']} HMMA")
                print(f"{name}: {r}", flush=True)
    for name, fn, ptrs, const, warps, floats in small:
        fits(problems, name, inspect(compile_variant(fn, ptrs, const, warps, 1, floats=floats)))
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--filter", default="")
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true", help="check the engine's configurations; exit 1 on a problem")
    ap.add_argument("--paired", action="store_true",
                    help="the one-token MoE's main loop, planar against paired int4 layout (a table; --out writes it)")
    args = ap.parse_args()
    if args.paired:
        lines = ["# The one-token MoE's main loop, planar against paired int4 weights: sm_90a, no GPU", "",
                 f"triton {triton.__version__}; `python benchmarks/kernel_sass.py --paired`; V2-Lite experts (gate_up "
                 "2 x 1408 x 2048 with SiLU, down 2048 x 1408), the engine's one-token configuration. Instruction "
                 "counts, not times: the paired layout has not run on a GPU yet.", ""] + paired_rows()
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.check:
        problems = check_engine_configs()
        print("\n".join(["PROBLEMS:"] + problems) if problems else "all configurations fit")
        sys.exit(1 if problems else 0)
    rows = []
    for name, fn, ptrs, const, warps, stages in variants():
        if args.filter not in name:
            continue
        r = inspect(compile_variant(fn, ptrs, const, warps, stages))
        rows.append((name, warps, stages, r))
        print(f"{name} (warps {warps}, stages {stages}): {r}", flush=True)
    if args.out:
        lines = ["# Triton kernels compiled for sm_90a (no GPU): resources and instruction mix", "",
                 f"triton {triton.__version__}; produced by `python benchmarks/kernel_sass.py`.", "",
                 "| kernel | warps/stages | regs | spills | smem | main-loop instructions | HMMA | HGMMA | QGMMA | "
                 "IMMA | I2F | F2F | LDL/STL | global loads by width |", "| --- " * 14 + "|"]
        for name, warps, stages, r in rows:
            lines.append(f"| {name} | {warps}/{stages} | {r['regs']} | {r['spill_bytes']} | {r['smem']} | "
                         f"{r['loop instructions']} | "
                         f"{r['HMMA']} | {r['HGMMA']} | {r['QGMMA']} | {r['IMMA']} | {r['I2F']} | {r['F2F']} | "
                         f"{r['LDL/STL']} | {r['global loads by width']} |")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
