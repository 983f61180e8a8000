"""The models on the kernel path (quant methods' kernel weights, the fused MoE) compute what the torch reference path
computes, for every scheme, on a tiny random DeepSeek-V3 quantized by `lowbit quantize`.

On the CPU the kernels run in Triton's interpreter in float16 (LOWBIT_KERNELS=1 forces the kernel path there); FP8
schemes and bfloat16 need a GPU, where the same test runs on CUDA.
"""
import pytest
import torch

pytest.importorskip("triton")
# Triton's interpreter computes masked-off lanes too, on placeholder values: numpy warns, nothing is stored
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit import LLM  # noqa: E402
from lowbit.quant.layerwise import QuantOptions  # noqa: E402
from lowbit.quant.pipeline import Job, quantize  # noqa: E402
from lowbit.quant.recipe import Recipe  # noqa: E402
from tests.quant.conftest import make_deepseek  # noqa: E402

GPU = torch.cuda.is_available()
DEV, DTYPE = ("cuda", "bfloat16") if GPU else ("cpu", "float16")
# w8a16:planes: w8a16 on the packed kernel's 8-bit planes (LOWBIT_W8A16_UNPACKED=0), not its unpacked int8;
# w8a8:g32: w8a8 with its int8 activations scaled per token and 32 features (--act-group-size 32)
CPU_SCHEMES = ["bf16", "w4a16", "w8a16", "w8a16:planes", "w4a8-int8", "w8a8", "w8a8:g32"]
SCHEMES = CPU_SCHEMES + ["w4a8", "fp8-block"]
# Where activations are quantized, the kernel and the reference quantize bf16 inputs that already differ in their
# last bits, so some values round to the neighbouring int8 / FP8 code: per-layer errors scale with the code's step
# (measured on an H100, 2026-11-23: int8 1.3%, FP8 e4m3 2.2% at most; weight-only layers stay under 1%)
LAYER_BOUND = {"w8a8": 2e-2, "w8a8:g32": 2e-2, "w4a8-int8": 2e-2, "w4a8": 4e-2, "fp8-block": 4e-2}
ACT_QUANT = set(LAYER_BOUND)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # two shared experts: the fused MoE runs them as two more experts, cut from the shared MLP's weights
    return make_deepseek(tmp_path_factory.mktemp("src"), mtp=False, n_shared_experts=2)


def quantized(source, tmp_path, scheme, monkeypatch=None):
    scheme, _, variant = scheme.partition(":")
    if variant == "planes":
        from lowbit.kernels import linear
        monkeypatch.setattr(linear, "W8A16_UNPACKED", False)
    if scheme == "bf16":
        return source
    out = tmp_path / scheme
    opts = {"act_group_size": 32} if variant == "g32" else {}
    quantize(Job(source, str(out), Recipe.from_scheme(scheme, **opts), QuantOptions(algo="rtn"), num_calib_tokens=256,
                 seq_len=64), progress=False)
    return str(out)


@pytest.mark.parametrize("scheme", [s if s in CPU_SCHEMES else pytest.param(s, marks=pytest.mark.skipif(
    not GPU, reason="FP8 kernels need a GPU")) for s in SCHEMES])
def test_kernel_path_matches_reference(source, tmp_path, monkeypatch, scheme):
    path = quantized(source, tmp_path, scheme, monkeypatch)
    ids = list(range(5, 30))
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    ref_llm = LLM(path, device=DEV, dtype=DTYPE, num_kv_blocks=16)
    ref = ref_llm.logits(ids)
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    llm = LLM(path, device=DEV, dtype=DTYPE, num_kv_blocks=16)
    model = llm.engine.runner.model
    kernels = [n for n, m in model.named_modules() if getattr(m, "_kernel", None) is not None]
    fused = [n.rsplit(".experts", 1)[0] for n, m in model.named_modules() if getattr(m, "_fused", None) is not None]
    assert fused, "the routed experts run in the fused MoE"
    assert all(model.get_submodule(n).experts.num_shared == 2 for n in fused), "and the shared experts with them"
    assert scheme == "bf16" or kernels, "quantized linears run in the GPU kernels"
    if scheme.startswith("w8a16"):  # int8 unpacked (the default: dense layers and experts) or in planes
        from lowbit.kernels import linear, matmul_unpacked as mu, moe
        planes = scheme.endswith("planes")
        experts = [model.get_submodule(n).experts._fused[0] for n in fused]
        assert all(isinstance(e, moe.PackedExperts) if planes else e.kind == mu.KIND_INT8_W16 for e in experts)
        dense = {type(m._kernel) for m in model.modules() if getattr(m, "_kernel", None) is not None}
        assert dense == {linear.PackedLinear if planes else linear.UnpackedLinear}
    if scheme == "w8a8:g32":  # every int8 layer and expert on the kernel of groups of 32
        from lowbit.kernels import matmul_unpacked as mu
        kinds = {m._kernel.kind for m in model.modules() if getattr(m, "_kernel", None) is not None}
        kinds |= {model.get_submodule(n).experts._fused[i].kind for n in fused for i in (0, 1)}
        assert kinds == {mu.KIND_INT8_G32}, kinds
    # the norms quantize their output for int8 per-token layers (on CUDA: the CPU runs the torch norm)
    from lowbit.layers.norm import RMSNorm
    assert {m.int8_rows for m in model.modules() if isinstance(m, RMSNorm)} == {scheme in ("w8a8", "w4a8-int8")}
    attention = [m for m in model.modules() if hasattr(m, "_q_kv_a")]
    # q_a_proj and kv_a_proj_with_mqa in one product (w4a8 only where their calibrated input scales agree)
    assert attention and (scheme == "w4a8" or all(m._q_kv_a is not None for m in attention))
    # every kernel layer against the reference layer of the same name, on the same inputs
    ref_modules = dict(ref_llm.engine.runner.model.named_modules())
    errors = {}

    def check(name):
        def hook(module, args, out):
            ref_out = ref_modules[name](*args)
            errors[name] = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        return hook
    for name in kernels + fused:
        dict(model.named_modules())[name].register_forward_hook(check(name))
    out = llm.logits(ids)
    # every fused MoE and every kernel linear ran (kv_b_proj only lends its weight to the absorbed MLA)
    assert set(errors) == {n for n in kernels + fused if not n.endswith('kv_b_proj')}
    worst = max(errors, key=errors.get)
    assert errors[worst] < LAYER_BOUND.get(scheme, 1e-2), (worst, errors[worst])
    # and the whole model: activation quantization rounds differently once float16 rounding upstream differs, and
    # the tiny random model amplifies that, so the end-to-end bound is looser where activations are quantized.
    # Where the 16-bit reference itself is far from float32 (a token routed to another expert: bf16 on an H100,
    # 2026-11-23, kernels vs reference 0.108 with every layer within 1%), the kernels may be as far on the other
    # side: d(kernels, ref) <= d(kernels, fp32) + d(ref, fp32), allowing the kernels 1.5x the reference's distance.
    err = ((out - ref).norm() / ref.norm()).item()
    monkeypatch.setenv("LOWBIT_KERNELS", "0")  # (on a GPU machine the CPU has no Triton interpreter)
    exact = LLM(path, device="cpu", dtype="float32", num_kv_blocks=16).logits(ids)
    floor = ((ref.cpu().float() - exact).norm() / exact.norm()).item()
    assert err < max(2e-1 if scheme in ACT_QUANT else 2e-2, 2.5 * floor), (err, floor)
    # top-1 the same way: P(kernels != ref) <= P(kernels != fp32) + P(ref != fp32) (fp8-block on an H100: 0.72)
    missed = 1 - (ref.argmax(-1).cpu() == exact.argmax(-1)).float().mean().item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= min(0.8, 1 - 2.5 * missed), (top1, missed)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefill", ["absorbed", "expanded"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_path_matches_cpu_reference(source, tmp_path, monkeypatch, scheme, prefill):
    """Issue #6: the GPU path (kernels, bf16) against the CPU reference path (float32) on the same checkpoint, within
    bf16 tolerance: no further from it than the reference path itself is when it runs in bf16 on the GPU. Where
    activations are quantized, bf16 rounding moves some values to the neighbouring int8 / FP8 code and the tiny
    random model amplifies that (H100, 2026-11-23: w4a8 kernels 0.75 top-1 agreement), so a fixed bound would
    measure the model rather than the kernels. Both MLA prefill forms (LOWBIT_MLA_PREFILL)."""
    path = quantized(source, tmp_path, scheme, monkeypatch)
    ids = list(range(5, 60))
    ref = LLM(path, device="cpu", dtype="float32", num_kv_blocks=16).logits(ids)

    def against_ref(kernels):
        monkeypatch.setenv("LOWBIT_KERNELS", kernels)
        out = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=16).logits(ids).cpu()
        return ((out - ref).norm() / ref.norm()).item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    from lowbit.layers import attention
    floor_err, floor_top1 = against_ref("0")
    monkeypatch.setattr(attention, "EXPANDED_PREFILL", prefill == "expanded")
    err, top1 = against_ref("1")
    # a bound of its own, or no worse than twice the reference path's bf16 error where that is larger (a routing
    # flip on one token moves the error norm by more than the kernels do: bf16 on an H100 measured 0.034 vs 0.014).
    # The expanded prefill (the GPU's default) attends in bf16, SDPA's fused kernels, where the reference path's
    # absorbed 576-wide heads run SDPA's float32 math: on this tiny random model that moved the kernels' logits by up
    # to 0.04 more (H100, 2026-11-25: w4a16 0.0146 absorbed, 0.0546 expanded; bf16 0.068, 0.105; other schemes
    # within +-0.05 either way), so it has that much more room; its math is checked against the absorbed form's in
    # float64 on the CPU (tests/layers)
    allow = 5e-2 if prefill == "expanded" else 0.0
    assert err < max(2 * floor_err, 2e-1 if scheme in ACT_QUANT else 5e-2) + allow, (err, floor_err)
    assert top1 >= min(floor_top1 - 0.1, 0.8 if scheme in ACT_QUANT else 0.9), (top1, floor_top1)


def test_autotune_at_load_records_configs_the_layers_then_use(source, tmp_path, monkeypatch):
    """LOWBIT_AUTOTUNE=1: the start-up warm-up measures candidate configurations for each kernel layer shape and
    M bucket (here on the CPU through the interpreter, two buckets), and the layers' launches read them back."""
    from lowbit.engine.cuda_graphs import warm_up_prefill
    from lowbit.kernels import tuning
    path = quantized(source, tmp_path, "w4a16")
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    llm = LLM(path, device=DEV, dtype=DTYPE, num_kv_blocks=16)
    runner = llm.engine.runner
    monkeypatch.setattr(tuning, "M_BUCKETS", (1, 4))
    monkeypatch.setattr(tuning, "TUNED", {})
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    warm_up_prefill(runner.model, 4, runner.num_blocks, runner.block_size, runner.device)
    keys = set(tuning.TUNED)
    shapes = {(m._kernel.weight.n, m._kernel.weight.k) for m in runner.model.modules()
              if getattr(m, "_kernel", None) is not None}
    assert {(k[2], k[3]) for k in keys} == shapes and {k[1] for k in keys} == {1, 4}
    for key, cfg in tuning.TUNED.items():
        assert tuning.packed_config(key[1], key[2], key[3], key[4], key[5]) is cfg
