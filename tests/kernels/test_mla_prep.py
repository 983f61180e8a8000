"""The kernels around the paged MLA decode against float64 references and the launches they replace, and the
engine's decode step through them against the torch path.

On the CPU they run in Triton's interpreter in float32 and float16; on a GPU also in bfloat16."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import mla_prep as mp  # noqa: E402
from lowbit.kernels.norm_rope import rms_norm, rope  # noqa: E402
from lowbit.layers.attention import store_kv  # noqa: E402
from lowbit.layers.rotary import RotaryEmbedding  # noqa: E402
from lowbit.models.deepseek import MLA  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# one rounding of the output: half an ulp of the dtype, relative to each value
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# (R, DR, nope, V, H): the tiny test models', one with no power of two, V2-Lite's with two heads
SHAPES = [(32, 8, 16, 16, 4), (48, 12, 24, 40, 3), (512, 64, 128, 128, 2)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cos_sin(T, dr, dtype):
    return RotaryEmbedding(dr, 10000.0).cos_sin(torch.arange(100, 100 + T), dtype)  # [T, dr/2] each


def assert_rounded_once(out, ref, mag, terms, dtype):
    """|out - ref| within an ulp of the dtype relative to the value (the kernels round once, the norm twice), plus
    float32's error over a sum of `terms` products whose magnitudes add up to `mag` (float64, on the CPU)."""
    err = (out.cpu().double() - ref).abs()
    bound = ULP[dtype] * ref.abs() + terms * 2 ** -24 * mag + 1e-7
    assert (err <= bound).all(), (err - bound).max().item()


def rope_magnitude(x, cos, sin, interleaved):
    """|x1| |cos| + |x2| |sin| per output feature: what float32's error in the rotation scales with."""
    return mp._rope_ref(x.abs(), cos.abs(), sin.abs(), interleaved).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R,DR,T", [(32, 8, 1), (48, 12, 3), (512, 64, 5)])
def test_store_kv_equals_the_launches_it_replaces(dtype, interleaved, R, DR, T):
    """The cache after mla_store_kv is the cache after rms_norm + rope + store_kv, bit for bit (untouched rows
    included; on a GPU the rotation to float32's last bit), and within a rounding of the float64 norm and rotation."""
    full = (torch.randn(T, R + DR + 24, generator=gen(R + T)) * 3).to(dtype)
    kv_a = full[:, :R + DR]  # a view with a wider row, as kv_a_proj_with_mqa's output may be
    w = (torch.rand(R, generator=gen(R + 1)) + 0.5).to(dtype)
    cos, sin = cos_sin(T, DR, dtype)
    cache = torch.randn(6, 4, 1, R + DR, generator=gen(2)).to(dtype)
    slots = torch.randperm(24, generator=gen(T))[:T]
    eps = 1e-6
    fused, composed = cache.to(DEV).clone(), cache.to(DEV).clone()
    args = [t.to(DEV) for t in (kv_a, w, cos, sin)]
    mp.mla_store_kv(args[0], args[1], eps, args[2], args[3], interleaved, fused, slots.to(DEV))
    lat, k_pe = args[0].split([R, DR], dim=-1)
    rows = torch.cat([rms_norm(lat, args[1], eps), rope(k_pe[:, None], args[2], args[3], interleaved)[:, 0]], -1)
    store_kv(composed, rows[:, None], slots.to(DEV))
    if not GPU:
        assert torch.equal(fused, composed)
    else:
        # the norm bit for bit; ptxas fuses the rotation's products into FMAs in an order that depends on the kernel
        # around them (H100, Triton 3.6: x2 cos + x1 sin as fma(x1, sin, x2 cos) in the rope kernel, fma(x2, cos,
        # x1 sin) here), so the rotation may differ in float32's last bit before its rounding to the dtype
        assert torch.equal(fused[..., :R], composed[..., :R])
        mag = torch.zeros(24, DR, dtype=torch.float64)  # [cache rows, DR]: zero where nothing was written
        mag[slots] = rope_magnitude(kv_a[:, None, R:], cos, sin, interleaved)[:, 0]
        rot = composed.view(-1, R + DR)[:, R:].cpu().double()
        assert_rounded_once(fused.view(-1, R + DR)[:, R:], rot, mag, 2, dtype)
    assert not torch.equal(fused.cpu(), cache)
    out = fused.view(-1, R + DR)[slots.to(DEV)]  # [T, R + DR]
    ref = mp.mla_store_kv_ref(kv_a, w, eps, cos, sin, interleaved)
    # the norm rounds twice (x / rms to the dtype, then times the weight), its float32 rms a few times over
    assert_rounded_once(out[:, :R], ref[:, :R], ref[:, :R].abs(), 8, dtype)
    assert_rounded_once(out[:, R:], ref[:, R:], rope_magnitude(kv_a[:, None, R:], cos, sin, interleaved)[:, 0], 4,
                        dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("R,DR,nope,V,H", SHAPES[:2])
def test_q_prep(dtype, interleaved, T, R, DR, nope, V, H):
    full = torch.randn(T, H, nope + DR + 8, generator=gen(T * H)).to(dtype)
    q = full[..., :nope + DR]  # a view: q_b_proj's output with wider heads
    w_uk = (torch.randn(H, nope, R, generator=gen(nope)) * 0.3).to(dtype)
    cos, sin = cos_sin(T, DR, dtype)
    out = mp.mla_q_prep(q.to(DEV), w_uk.to(DEV), cos.to(DEV), sin.to(DEV), interleaved)
    assert out.shape == (T, H, R + DR) and out.dtype == dtype and out.is_contiguous()
    ref = mp.mla_q_prep_ref(q, w_uk, cos, sin, interleaved)
    mag = torch.einsum("thd,hdr->thr", q[..., :nope].double().abs(), w_uk.double().abs())  # [T, H, R]
    assert_rounded_once(out[..., :R], ref[..., :R], mag, nope, dtype)
    assert_rounded_once(out[..., R:], ref[..., R:], rope_magnitude(q[..., nope:], cos, sin, interleaved), 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("R,DR,nope,V,H", SHAPES)
def test_out(dtype, T, R, DR, nope, V, H):
    if R == 512 and T != 3:
        pytest.skip("the interpreter is slow: one token count at V2-Lite's rank")
    o = torch.randn(T, H, R, generator=gen(T + R)).to(dtype)
    w_uv = (torch.randn(H, V, R, generator=gen(V)) * 0.1).to(dtype)
    out = mp.mla_out(o.to(DEV), w_uv.to(DEV))
    assert out.shape == (T, H * V) and out.dtype == dtype
    mag = torch.einsum("thr,hvr->thv", o.double().abs(), w_uv.double().abs()).flatten(1)  # [T, H * V]
    assert_rounded_once(out, mp.mla_out_ref(o, w_uv), mag, R, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("R,DR,nope,V,H", SHAPES)
def test_prep_in_one_launch_is_store_kv_and_q_prep(dtype, T, R, DR, nope, V, H):
    """mla_prep: the cache mla_store_kv leaves and the query mla_q_prep returns, bit for bit in the interpreter; on
    a GPU within a rounding (the launch has the store's warps, and ptxas contracts products per kernel)."""
    if R == 512 and (T != 1 or dtype != torch.float32) and not GPU:
        pytest.skip("the interpreter is slow: one case at V2-Lite's rank")
    kv_a = (torch.randn(T, R + DR, generator=gen(R + T)) * 3).to(dtype).to(DEV)
    w = (torch.rand(R, generator=gen(R + 1)) + 0.5).to(dtype).to(DEV)
    q = torch.randn(T, H, nope + DR, generator=gen(T * H)).to(dtype).to(DEV)
    w_uk = (torch.randn(H, nope, R, generator=gen(nope)) * 0.3).to(dtype).to(DEV)
    cos, sin = (t.to(DEV) for t in cos_sin(T, DR, dtype))
    cache = torch.randn(6, 4, 1, R + DR, generator=gen(2)).to(dtype).to(DEV)
    slots = torch.randperm(24, generator=gen(T))[:T].to(DEV)
    fused, apart = cache.clone(), cache.clone()
    got = mp.mla_prep(kv_a, w, 1e-6, cos, sin, True, fused, slots, q, w_uk)
    mp.mla_store_kv(kv_a, w, 1e-6, cos, sin, True, apart, slots)
    want = mp.mla_q_prep(q, w_uk, cos, sin, True)
    assert not torch.equal(fused, cache)
    if GPU:  # ptxas may contract the products into FMAs otherwise in another kernel: float32's last bit, rounded
        torch.testing.assert_close(fused, apart, rtol=2 * ULP[dtype], atol=0)
        torch.testing.assert_close(got, want, rtol=2 * ULP[dtype], atol=1e-6)
    else:
        assert torch.equal(fused, apart) and torch.equal(got, want)


def test_q_prep_at_v2_lite_rank():
    """R = 512 (eight column blocks of 64), nope 128, interleaved rope 64, odd tokens."""
    R, DR, nope, _, H = SHAPES[2]
    q = torch.randn(3, H, nope + DR, generator=gen(7))
    w_uk = torch.randn(H, nope, R, generator=gen(8)) * 0.1
    cos, sin = cos_sin(3, DR, torch.float32)
    out = mp.mla_q_prep(q.to(DEV), w_uk.to(DEV), cos.to(DEV), sin.to(DEV), True)
    mag = torch.einsum("thd,hdr->thr", q[..., :nope].double().abs(), w_uk.double().abs())
    ref = mp.mla_q_prep_ref(q, w_uk, cos, sin, True)
    assert_rounded_once(out[..., :R], ref[..., :R], mag, nope, torch.float32)
    assert_rounded_once(out[..., R:], ref[..., R:], rope_magnitude(q[..., nope:], cos, sin, True), 4, torch.float32)


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v2"])
def test_engine_decode_step_matches_the_torch_path(tiny_checkpoints, monkeypatch, variant):
    """Every MLA layer of every decode step on the kernel path (mla_store_kv, mla_q_prep, mla_decode, mla_out)
    against the same layer's torch path on the same inputs and cache: the output and the cache row it stores."""
    path, _ = tiny_checkpoints[variant]
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    llm = LLM(path, device=DEV, dtype="float32", enforce_eager=True)  # the hooks run the torch path eagerly
    errors = []

    def check(module, args, out):
        if not module.attn.decodes_fused():
            return
        from lowbit.layers.attention import get_context
        slots = get_context().slot_mapping
        cache = module.attn.kv_cache
        fused_rows = cache.view(-1, cache.shape[-1])[slots].clone()  # [B, r + dr]
        module.attn.decode_kernel = False  # the torch path: stores its own rows, then attends over the same cache
        ref = module(*args)
        module.attn.decode_kernel = True
        ref_rows = cache.view(-1, cache.shape[-1])[slots]
        cache.view(-1, cache.shape[-1])[slots] = fused_rows  # the next steps read the kernel's rows
        errors.append((((out - ref).norm() / ref.norm()).item(),
                       ((fused_rows - ref_rows).norm() / ref_rows.norm()).item()))
    for m in llm.engine.runner.model.modules():
        if isinstance(m, MLA):
            m.register_forward_hook(check)
    prompts = [torch.randint(0, 320, (n,), generator=gen(n)).tolist() for n in (3, 21)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    # two decode steps (the first token comes from the prefill) in each of the three layers
    assert len(errors) == 2 * 3
    assert max(e for pair in errors for e in pair) < 2e-6, errors
