"""Every kernel against its float64 torch reference on fresh random inputs, odd M included.

On the CPU the kernels run in Triton's interpreter, which handles fp16, fp32 and int8 matrix products but not bf16
or FP8 (its float8 conversion is wrong, 126.8 -> 64, and its bf16 stores too): those cases run on a GPU. Relative error ||out - ref|| / ||ref|| bounds: fp16
outputs 3e-3, bf16 outputs 1e-2 (one rounding of the output and of the fused gate/up intermediate).
"""
import pytest
import torch

pytest.importorskip("triton")
# Triton's interpreter computes masked-off lanes too, on placeholder values: numpy warns, nothing is stored
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit.kernels import act_quant as aq
from lowbit.kernels import matmul_packed as mp
from lowbit.kernels import matmul_unpacked as mu
from lowbit.kernels import gemv_packed, moe, tuning

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float16
BOUND = 1e-2 if GPU else 3e-3
gpu_only = pytest.mark.skipif(not GPU, reason="FP8 matrix products need a GPU (Triton's interpreter lacks them)")


def rel(out, ref):
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_packed(E, N, K, bits, group, asym, seed):
    g = gen(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = torch.randint(lo, hi + 1, (E, N, K), generator=g, dtype=torch.int8)
    groups = 1 if group == 0 else -(-K // group)
    scale = torch.rand(E, N, groups, generator=g) * 0.02 + 0.002
    zp = torch.randint(lo, hi + 1, (E, N, groups), generator=g, dtype=torch.int8) if asym else None
    return values, scale, zp


def independent_dequant(values, scale, zp, group):
    """[N, K] float64 weight straight from the signed values (not through the kernel's layout)."""
    K = values.shape[-1]
    g = group or K
    z = zp.double() if zp is not None else torch.zeros_like(scale, dtype=torch.float64)
    return (values.double() - z.repeat_interleave(g, -1)[..., :K]) * scale.double().repeat_interleave(g, -1)[..., :K]


def to_dev(pw):
    pw.words, pw.scales = pw.words.to(DEV), pw.scales.to(DEV)
    pw.zeros = pw.zeros.to(DEV) if pw.zeros is not None else None
    return pw


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("M,K,one_pass_max", [(1, 64, None), (7, 300, None), (33, 1024, None), (2, 5000, None),
                                              (3, 2500, 512)])
def test_int8_per_token(M, K, one_pass_max, monkeypatch):
    """A row read once (up to ONE_PASS_MAX features) and a row read in 1024-wide steps give the reference's codes."""
    if one_pass_max:
        monkeypatch.setattr(aq, "ONE_PASS_MAX", one_pass_max)
    x = torch.randn(M, K, generator=gen(M)) * 3
    q, s = aq.int8_per_token(x.to(DEV))
    qr, sr = aq.int8_per_token_ref(x)
    torch.testing.assert_close(s.cpu(), sr)
    assert torch.equal(q.cpu(), qr)


def test_int8_per_token_rounds_half_to_even():
    """A scale that is a power of two (absmax 127 * 2^-5) puts values exactly on halves: torch.round's ties."""
    x = torch.tensor([[3.96875, 0.015625, 0.046875, -0.015625, -0.046875, 0.078125, 1.0]])  # 127, .5, 1.5, ... / 32
    q, _ = aq.int8_per_token(x.to(DEV))
    qr, _ = aq.int8_per_token_ref(x)
    assert qr.tolist() == [[127, 0, 2, 0, -2, 2, 32]]
    assert torch.equal(q.cpu(), qr)


@pytest.mark.parametrize("M,K", [(1, 64), (5, 300), (3, 2080), (2, 16)])
def test_int8_per_token_group(M, K):
    """w8a8 --act-group-size 32: a scale per token and 32 features, a partial last group (300, 16) included; an
    outlier costs only its group."""
    x = torch.randn(M, K, generator=gen(K)) * 3
    x[0, K // 2] = 400.0
    q, s = aq.int8_per_token_group(x.to(DEV), 32)
    qr, sr = aq.int8_per_token_group_ref(x, 32)
    assert s.shape == (M, -(-K // 32))
    torch.testing.assert_close(s.cpu(), sr)
    assert torch.equal(q.cpu(), qr)
    assert (sr[0] < 1).sum() >= sr.shape[1] - 1


@gpu_only
@pytest.mark.parametrize("M,K,group", [(1, 128, 128), (5, 300, 128), (9, 512, 64), (2, 5000, 5000)])
def test_fp8_per_token_group(M, K, group):
    x = torch.randn(M, K, generator=gen(K))
    q, s = aq.fp8_per_token_group(x.to(DEV), group)
    qr, sr = aq.fp8_per_token_group_ref(x, group)
    torch.testing.assert_close(s.cpu(), sr)
    step = s.cpu().repeat_interleave(group, 1)[:, :K]
    deq = q.cpu().float() * step
    # FP8 e4m3 keeps 3 mantissa bits: each value within half a step, and subnormals (below 2^-6 of the scale)
    # within 2^-10 of the scale
    assert ((deq - x).abs() <= x.abs() * 2 ** -4 + step * 2 ** -10).all()
    assert torch.equal(q.cpu().float(), qr.float())


# ---------------------------------------------------------------------------------------------- packed GEMMs
PACKED = [  # bits, group (0 = per channel), asymmetric, activations
    (4, 128, False, mp.ACT_NONE), (4, 64, True, mp.ACT_NONE), (8, 0, False, mp.ACT_NONE),
    (8, 128, True, mp.ACT_NONE), (4, 128, False, mp.ACT_INT8_TOKEN),
    pytest.param(4, 128, False, mp.ACT_FP8_STATIC, marks=gpu_only),
]


@pytest.mark.parametrize("bits,group,asym,act", PACKED)
@pytest.mark.parametrize("M,N,K", [(1, 96, 640), (5, 48, 384), (19, 160, 1152), (3, 64, 512), (80, 32, 256)])
def test_packed_matmul(bits, group, asym, act, M, N, K):
    values, scale, zp = random_packed(1, N, K, bits, group, asym, seed=M + N + K)
    pw = mp.repack(values, scale, zp, bits, group)
    # the kernel layout holds exactly the checkpoint's values
    assert torch.equal(mp.unpack(pw).double(), independent_dequant(values, scale, zp, group).float().double())
    x = torch.randn(M, K, generator=gen(K)).to(DTYPE)
    input_scale = (x.float().abs().max() / 448).reshape(1) if act == mp.ACT_FP8_STATIC else None
    ref = mp.packed_matmul_ref(x.float(), pw, act, input_scale)
    pw = to_dev(pw)
    xs = input_scale.to(DEV) if input_scale is not None else None
    splits = pw.words.shape[2] * (32 // bits) // pw.tile_k
    configs = [None, dict(BM=16, BN=32), dict(BM=32, BN=16, SPLIT_K=splits),
               dict(BM=16, BN=64, SWAP=True), dict(BM=32, BN=32, SWAP=True, SPLIT_K=splits)]
    if M == 1:  # one row takes the GEMV (config None too): whole K, K split in two-tile parts (the last short where the
        # count is odd), a tile a program
        configs += [dict(GEMV=True, BN=8, TILES=splits), dict(GEMV=True, BN=32, TILES=2),
                    dict(GEMV=True, BN=16, TILES=1)]
    for config in configs:
        out = mp.packed_matmul(x.to(DEV), pw, act, xs, config=config)
        assert out.shape == (M, N) and out.dtype == DTYPE
        assert rel(out, ref) < (3e-2 if act == mp.ACT_INT8_TOKEN and not GPU else BOUND), config


@pytest.mark.parametrize("asym,act", [(False, mp.ACT_NONE), (True, mp.ACT_NONE), (False, mp.ACT_INT8_TOKEN),
                                      pytest.param(False, mp.ACT_FP8_STATIC, marks=gpu_only)])
@pytest.mark.parametrize("M", [1, 6])
def test_paired_layout_products_equal_the_planar_ones(asym, act, M):
    """Every launch form on paired int4 weights gives the planar layout's result bit for bit (the dequantized weights
    are exact in both; on the GPU the symmetric bf16 / fp16 path is inline PTX), and the dequantization kernel the
    same weights."""
    N, K = 96, 640
    values, scale, zp = random_packed(1, N, K, 4, 128, asym, seed=M + 40)
    planar = to_dev(mp.repack(values, scale, zp, 4, 128))
    paired = to_dev(mp.repack(values, scale, zp, 4, 128, paired=True))
    x = torch.randn(M, K, generator=gen(M)).to(DTYPE).to(DEV)
    xs = (x.float().abs().max() / 448).reshape(1) if act == mp.ACT_FP8_STATIC else None
    ref = mp.packed_matmul_ref(x.float().cpu(), mp.repack(values, scale, zp, 4, 128), act,
                               None if xs is None else xs.cpu())
    splits = planar.words.shape[2] * 8 // planar.tile_k
    for config in (dict(BM=16, BN=32), dict(BM=16, BN=64, SWAP=True), dict(BM=32, BN=16, SPLIT_K=splits),
                   dict(BM=64, BN=64)):
        out = mp.packed_matmul(x, paired, act, xs, config=config)
        assert torch.equal(out, mp.packed_matmul(x, planar, act, xs, config=config)), config
        assert rel(out, ref) < (3e-2 if act == mp.ACT_INT8_TOKEN and not GPU else BOUND), config
    # a row without a config stays off the GEMV, which reads the planar layout only
    assert rel(mp.packed_matmul(x[:1], paired, act, xs), ref[:1]) < (3e-2 if act == mp.ACT_INT8_TOKEN and not GPU
                                                                     else BOUND)
    for dtype in (torch.float32, DTYPE):
        assert torch.equal(mp.dequantize(paired, dtype), mp.dequantize(planar, dtype))


@pytest.mark.parametrize("packed", [True, False])
def test_float32_rows_take_the_k_splits(packed):
    """float32 activations with K split over programs: the float32 output takes the splits' atomic adds, so it
    starts zeroed (it was left uninitialized once, and the products came out as garbage)."""
    M, N, K = 5, 96, 640
    x = torch.randn(M, K, generator=gen(9)).to(DEV)
    if packed:
        values, scale, _ = random_packed(1, N, K, 4, 128, False, seed=9)
        pw = mp.repack(values, scale, None, 4, 128)
        ref = mp.packed_matmul_ref(x.cpu(), pw)
        out = mp.packed_matmul(x, to_dev(pw), config=dict(BM=32, BN=16, SPLIT_K=3))
    else:
        w, ws = random_unpacked(mu.KIND_BF16, N, K, seed=9)
        w = w.float()
        ref = x.double().cpu() @ w.double().t()
        out = mu.unpacked_matmul(x, w.to(DEV), mu.KIND_BF16, config=dict(BM=16, BN=32, BK=128, SPLIT_K=5))
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-4


# ---------------------------------------------------------------------------------------------- unpacked GEMMs
UNPACKED = [mu.KIND_BF16, mu.KIND_INT8_CHANNEL, mu.KIND_INT8_W16, mu.KIND_INT8_G32,
            pytest.param(mu.KIND_FP8_BLOCK, marks=gpu_only)]


def random_unpacked(kind, N, K, seed):
    g = gen(seed)
    if kind == mu.KIND_BF16:
        return (torch.randn(N, K, generator=g) * 0.05).to(DTYPE), None
    if kind in mu.CHANNEL_SCALED:
        return torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, 1, generator=g) * 1e-3
    w = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w, torch.rand(-(-N // 128), -(-K // 128), generator=g) * 1e-3 + 1e-4


@pytest.mark.parametrize("kind", UNPACKED)
@pytest.mark.parametrize("M,N,K", [(1, 96, 640), (5, 200, 384), (19, 160, 1152)])
def test_unpacked_matmul(kind, M, N, K):
    w, ws = random_unpacked(kind, N, K, seed=M * N)
    x = torch.randn(M, K, generator=gen(M + K)).to(DTYPE)
    ref = mu.unpacked_matmul_ref(x.float(), w, kind, ws)
    configs = [None, dict(BM=16, BN=32, BK=128), dict(BM=16, BN=64, BK=128, SPLIT_K=-(-K // 128))]
    for config in configs:
        out = mu.unpacked_matmul(x.to(DEV), w.to(DEV), kind, None if ws is None else ws.to(DEV), config=config)
        assert out.shape == (M, N) and out.dtype == DTYPE
        assert rel(out, ref) < BOUND, config


@pytest.mark.parametrize("N,K", [(96, 640), (200, 1408)])
def test_one_int8_row_quantized_in_the_product_is_the_launch_bit_for_bit(N, K, monkeypatch):
    """w8a8 at one row (K <= QUANT_IN_MAX_K): the product quantizes its 16-bit row itself (QUANT_IN) and gives
    exactly what quantizing it in act_quant's launch first gives; a row the norm quantized comes as it is."""
    w, ws = random_unpacked(mu.KIND_INT8_CHANNEL, N, K, seed=N)
    x = (torch.randn(1, K, generator=gen(K)) * 3).to(DTYPE).to(DEV)
    w, ws = w.to(DEV), ws.to(DEV)
    launches = []
    monkeypatch.setattr(aq, "_quant_rows", lambda *a, f=aq._quant_rows, **kw: launches.append(1) or f(*a, **kw))
    for config in (None, dict(BM=16, BN=64, BK=128, SPLIT_K=-(-K // 128))):
        fused = mu.unpacked_matmul(x, w, mu.KIND_INT8_CHANNEL, ws, config=config)
        assert not launches
        monkeypatch.setattr(mu, "QUANT_IN_MAX_K", 0)
        assert torch.equal(fused, mu.unpacked_matmul(x, w, mu.KIND_INT8_CHANNEL, ws, config=config)) and launches
        monkeypatch.setattr(mu, "QUANT_IN_MAX_K", 4096)
        launches.clear()
    assert rel(fused, mu.unpacked_matmul_ref(x.cpu().float(), w.cpu(), mu.KIND_INT8_CHANNEL, ws.cpu())) < BOUND
    q, s = aq.int8_per_token(x)
    aq.attach_int8_rows(x, q, s)  # (as the norm does)
    assert mu.kernel_input(x, mu.KIND_INT8_CHANNEL, True) == (q, s, False)


@pytest.mark.parametrize("M,N,K", [(1, 96, 640), (5, 72, 5000)])
def test_int8_groups_run_w8a16_on_their_grid_rows(M, N, K, monkeypatch):
    """w8a8 with activation groups of 32 (KIND_INT8_G32): one launch puts the rows on their groups' int8 grids in 16
    bits, then w8a16's product (KIND_INT8_W16) on them, bit for bit; the float64 reference within the bound."""
    w, ws = random_unpacked(mu.KIND_INT8_G32, N, K, seed=N)
    x = (torch.randn(M, K, generator=gen(K)) * 3).to(DTYPE).to(DEV)
    x[0, 7] = 300.0
    w, ws = w.to(DEV), ws.to(DEV)
    launches = []
    monkeypatch.setattr(aq, "int8_per_token_group", lambda *a, f=aq.int8_per_token_group, **kw:
                        launches.append(1) or f(*a, **kw))
    out = mu.unpacked_matmul(x, w, mu.KIND_INT8_G32, ws)
    assert launches == [1]
    rows = mu.activations_16bit(x, mu.KIND_INT8_G32)
    assert tuning.unpacked_config(M, N, K, mu.KIND_INT8_G32) == tuning.unpacked_config(M, N, K, mu.KIND_INT8_W16)
    assert torch.equal(out, mu.unpacked_matmul(rows, w, mu.KIND_INT8_W16, ws))
    assert rel(out, mu.unpacked_matmul_ref(x.cpu().float(), w.cpu(), mu.KIND_INT8_G32, ws.cpu())) < BOUND


@pytest.mark.parametrize("kind", [mu.KIND_INT8_CHANNEL, pytest.param(mu.KIND_FP8_BLOCK, marks=gpu_only)])
@pytest.mark.parametrize("M,N,K", [(70, 200, 384), (300, 136, 400)])
def test_persistent_kernel_for_many_rows(kind, M, N, K):
    """The prefill kernel (one program per multiprocessor over the output tiles, descriptor loads): odd row and
    column tiles, a last K tile past the edge (zeros), more tiles than programs; the heuristic takes it for fp8-block
    above 256 rows."""
    w, ws = random_unpacked(kind, N, K, seed=M + N)
    x = torch.randn(M, K, generator=gen(M * K)).to(DTYPE)
    ref = mu.unpacked_matmul_ref(x.float(), w, kind, ws)
    default = tuning.unpacked_config(M, N, K, kind)
    assert bool(default.get("PERSISTENT")) == (M > 256 and kind == mu.KIND_FP8_BLOCK)  # int8 measured faster tiled
    for config in (dict(BM=32, BN=64, BK=128, PERSISTENT=True, GROUP_M=2, num_stages=2), default):
        out = mu.unpacked_matmul(x.to(DEV), w.to(DEV), kind, ws.to(DEV), config=config)
        assert out.shape == (M, N) and out.dtype == DTYPE
        assert rel(out, ref) < BOUND, config


def test_split_k_sums_in_a_fixed_order_and_leaves_its_counters_at_zero():
    """A dense product's K splits are added by the last split of each tile to finish, in split order: two runs give
    the same bits, in the output's dtype, and the tile counters are back at zero for the next launch (what a replayed
    CUDA graph relies on)."""
    from lowbit.kernels import rows
    values, scale, _ = random_packed(1, 96, 1024, 4, 128, False, seed=9)
    pw = to_dev(mp.repack(values, scale, None, 4, 128))
    x = torch.randn(3, 1024, generator=gen(9)).to(DTYPE)
    ref = mp.packed_matmul_ref(x.float(), mp.repack(values, scale, None, 4, 128))
    cfg = dict(BM=16, BN=32, SPLIT_K=4)
    a = mp.packed_matmul(x.to(DEV), pw, config=cfg)
    b = mp.packed_matmul(x.to(DEV), pw, config=cfg)
    assert a.dtype == DTYPE and torch.equal(a, b) and rel(a, ref) < BOUND
    assert not rows._COUNTERS[str(a.device)].any()


# ---------------------------------------------------------------------------------------------- fused MoE
def test_align_sorts_by_expert_and_pads():
    ids = torch.tensor([[2, 0], [2, 1], [-1, 2]])
    sorted_ids, block_expert, num_padded = moe.align(ids, num_experts=3, block_m=4)
    n = ids.numel()
    assert num_padded.item() == 12  # experts 0, 1, 2 each take one block of 4; the skipped slot none
    runs = sorted_ids[:12].view(3, 4)
    for e in range(3):
        got = sorted(i for i in runs[e].tolist() if i < n)
        assert got == sorted(i for i, v in enumerate(ids.flatten().tolist()) if v == e)
        assert block_expert[e].item() == e
    assert 4 not in sorted_ids[:12].tolist()  # slot 4 (token 2, expert -1) is never scheduled


@pytest.mark.parametrize("T,k,E,block_m", [(1, 8, 256, 16), (5, 6, 64, 16), (32, 8, 256, 16), (3, 2, 3, 4),
                                            (13, 4, 40, 32)])
def test_align_kernel_matches_torch(T, k, E, block_m):
    """The one-launch align gives what the torch ops give, slot for slot, skipped slots (-1) included."""
    g = gen(T * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < 0.2] = -1
    if E <= 4:  # crowd a few experts: runs longer than a block
        ids = torch.randint(-1, E, (T, k), generator=g)
    want = moe.align_torch(ids, E, block_m)
    got = moe.align_kernel(ids.to(DEV), E, block_m)
    for w, o in zip(want, got):
        assert torch.equal(w.to(torch.int32), o.cpu())


MOE_SCHEMES = {  # name -> (make experts from (E, N, K, seed), reference dequantized weights, activation fake-quant)
    "bf16": "unpacked", "w8a8": "unpacked", "fp8-block": "unpacked",
    "w4a16": "packed", "w8a16": "packed", "w4a8-int8": "packed", "w4a8": "packed",
    "w8a16-unpacked": "unpacked",  # w8a16's per-expert layers as the loader stacks them (KIND_INT8_W16)
    "w8a8-g32": "unpacked",  # w8a8 --act-group-size 32 (KIND_INT8_G32)
}


def make_experts(scheme, E, N, K, seed):
    """(kernel experts, float dequantized weights [E, N, K], activation fake-quantizer or None)."""
    g = gen(seed)
    if scheme == "w8a16-unpacked":
        from lowbit.kernels import linear
        from lowbit.quant.schemes import QuantArgs
        _, deq, _ = make_experts("w8a16", E, N, K, seed)
        values, scale, _ = random_packed(E, N, K, 8, 0, False, seed)  # (make_experts' w8a16 draws these)
        parts = [linear.packed_linear(values[e], scale[e], None, QuantArgs(8, "int", "channel"), None, None)
                 for e in range(E)]
        stacked = linear.stack_experts(parts)
        assert isinstance(stacked, moe.UnpackedExperts) and stacked.kind == mu.KIND_INT8_W16
        return moe.UnpackedExperts(stacked.weight.to(DEV), stacked.kind, stacked.scale.to(DEV)), deq, None
    if scheme in ("w4a16", "w8a16", "w4a8-int8", "w4a8"):
        bits = 8 if scheme == "w8a16" else 4
        values, scale, zp = random_packed(E, N, K, bits, 0 if bits == 8 else 128, False, seed)
        pw = mp.repack(values, scale, zp, bits, 0 if bits == 8 else 128)
        act = {"w4a8-int8": mp.ACT_INT8_TOKEN, "w4a8": mp.ACT_FP8_STATIC}.get(scheme, mp.ACT_NONE)
        deq = mp.unpack(pw)
        fq = None
        s = torch.tensor([0.02])
        if act == mp.ACT_INT8_TOKEN:
            fq = lambda t: (lambda q, s: (q.double() * s.double()[:, None]).to(t.dtype))(*aq.int8_per_token_ref(t))
        elif act == mp.ACT_FP8_STATIC:
            fq = lambda t: (aq.fp8_static_ref(t.float(), s).float() * s).to(t.dtype)
        return moe.PackedExperts(to_dev(pw), act, s.to(DEV)), deq, fq
    if scheme == "bf16":
        w = (torch.randn(E, N, K, generator=g) * 0.05).to(DTYPE)
        return moe.UnpackedExperts(w.to(DEV)), w.float(), None
    if scheme == "w8a8":
        w = torch.randint(-127, 128, (E, N, K), generator=g, dtype=torch.int8)
        s = torch.rand(E, N, generator=g) * 1e-3
        fq = lambda t: (lambda q, s: (q.double() * s.double()[:, None]).to(t.dtype))(*aq.int8_per_token_ref(t))
        return moe.UnpackedExperts(w.to(DEV), mu.KIND_INT8_CHANNEL, s.to(DEV)), w.float() * s[..., None], fq
    if scheme == "w8a8-g32":
        w = torch.randint(-127, 128, (E, N, K), generator=g, dtype=torch.int8)
        s = torch.rand(E, N, generator=g) * 1e-3

        def fq(t):
            q, sc = aq.int8_per_token_group_ref(t, mu.ACT_GROUP)
            return (q.double() * sc.double().repeat_interleave(mu.ACT_GROUP, 1)[:, :t.shape[1]]).to(t.dtype)
        return moe.UnpackedExperts(w.to(DEV), mu.KIND_INT8_G32, s.to(DEV)), w.float() * s[..., None], fq
    w = (torch.randn(E, N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(E, N // 128, K // 128, generator=g) * 1e-3 + 1e-4
    deq = w.float() * s.repeat_interleave(128, 1).repeat_interleave(128, 2)

    def fq(t):
        q, sc = aq.fp8_per_token_group_ref(t, 128)
        return (q.double() * sc.double().repeat_interleave(128, 1)).to(t.dtype)
    return moe.UnpackedExperts(w.to(DEV), mu.KIND_FP8_BLOCK, s.to(DEV)), deq, fq


@pytest.mark.parametrize("scheme", [s if s not in ("w4a8", "fp8-block") else pytest.param(s, marks=gpu_only)
                                    for s in MOE_SCHEMES])
@pytest.mark.parametrize("T", [1, 7])
def test_fused_moe(scheme, T):
    E, H, inter, k = 6, 256, 128, 3
    w13, d13, fq = make_experts(scheme, E, 2 * inter, H, seed=T)
    w2, d2, _ = make_experts(scheme, E, H, inter, seed=T + 100)
    x = torch.randn(T, H, generator=gen(T)).to(DTYPE)
    topk = torch.stack([torch.randperm(E, generator=gen(t))[:k] for t in range(T)])
    weights = torch.rand(T, k, generator=gen(T + 1))
    ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq, fq)
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV))
    assert out.shape == (T, H)
    bound = BOUND * (3 if fq is not None else 1)  # quantized intermediates round at different points
    assert rel(out, ref) < bound
    # expert parallel: slots of experts another rank owns (-1) are skipped
    skip = topk.clone()
    skip[:, 0] = -1
    ref = moe.fused_moe_ref(x, d13, d2, weights, skip, fq, fq)
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), skip.to(DEV), may_skip=True)
    assert rel(out, ref) < bound
    if isinstance(w13, moe.PackedExperts):  # weights as the first operand (the small-M and Hopper variant)
        # (one token's packed experts take the GEMV without a config: this is the tensor-core kernel on them)
        cfg = dict(BM=16, BN=32, SWAP=True)
        out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), skip.to(DEV), config=cfg, may_skip=True)
        assert rel(out, ref) < bound


@pytest.mark.parametrize("scheme", ["bf16", "w4a16", "w8a16", "w8a16-unpacked", "w4a8-int8", "w8a8", "w8a8-g32",
                                    pytest.param("w4a8", marks=gpu_only)])
@pytest.mark.parametrize("gemv_moe", [False, True])
def test_one_token_moe_sorts_nothing(scheme, gemv_moe, monkeypatch):
    """One token: no align launch (a program row per slot, its expert read from the router's ids) and no moe_sum
    launch (the down projection's last slot program sums the slots, rows.store_slot_sum; on the GEMV with
    LOWBIT_GEMV_MOE=1 for packed experts), the counters left at zero; another rank's experts (-1) add nothing, whatever
    their unwritten intermediate rows hold."""
    from lowbit.kernels import rows
    monkeypatch.setattr(gemv_packed, "MOE", gemv_moe)
    E, H, inter, k = 6, 256, 128, 4
    w13, d13, fq = make_experts(scheme, E, 2 * inter, H, seed=21)
    w2, d2, _ = make_experts(scheme, E, H, inter, seed=22)
    x = torch.randn(1, H, generator=gen(23)).to(DTYPE)
    topk = torch.randperm(E, generator=gen(24))[:k][None]
    topk[0, 2] = -1
    weights = torch.rand(1, k, generator=gen(25))
    calls = []
    monkeypatch.setattr(moe, "align", lambda *a, **kw: calls.append("align"))
    monkeypatch.setattr(moe, "moe_sum", lambda *a, f=moe.moe_sum, **kw: calls.append("moe_sum") or f(*a, **kw))
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV), may_skip=True)
    ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq, fq)
    assert out.shape == (1, H) and rel(out, ref) < BOUND * (3 if fq is not None else 1)
    assert calls == []
    if scheme == "w8a8":  # int8 experts quantize each slot's row in the product: no launch of their own
        monkeypatch.setattr(aq, "_quant_rows", lambda *a, **kw: calls.append("quant"))
        assert torch.equal(out, moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV), may_skip=True))
        assert calls == []
    assert all(int(c.abs().sum()) == 0 for c in rows._COUNTERS.values())


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8-int8", pytest.param("w4a8", marks=gpu_only)])
@pytest.mark.parametrize("T", [1, 7, 48])
def test_fused_moe_on_paired_experts(scheme, T, monkeypatch):
    """LOWBIT_INT4_PAIRED=1: stacking per-expert layers pairs symmetric int4 experts whose products run in 16 bits
    (w4a8-int8's stay planar); the fused MoE on them matches the reference, with the engine's configuration (one
    token: 64 rows a program, the weights the first operand) and bit for bit the planar layout's result at the
    planar one's configuration."""
    from lowbit.kernels import linear
    monkeypatch.setattr(mp, "PAIRED_EXPERTS", True)
    E, H, inter, k = 6, 256, 128, 3
    planar = {}
    for name, n, kk, seed in (("w13", 2 * inter, H, T), ("w2", H, inter, T + 100)):
        ex, deq, fq = make_experts(scheme, E, n, kk, seed)
        w = ex.weight
        parts = [linear.PackedLinear(mp.PackedWeight(w.words[e:e + 1], w.scales[e:e + 1], None, w.bits,
                                                     w.group_size, w.n, w.k, w.tile_k), ex.act,
                                     ex.input_scale.reshape(-1)[:1]) for e in range(E)]
        stacked = linear.stack_experts(parts)
        assert stacked.weight.paired == (scheme != "w4a8-int8")
        assert torch.equal(mp.values(stacked.weight)[0].cpu(), mp.values(w)[0].cpu())
        planar[name] = (ex, stacked, deq)
    x = torch.randn(T, H, generator=gen(T)).to(DTYPE)
    topk = torch.stack([torch.randperm(E, generator=gen(t))[:k] for t in range(T)])
    weights = torch.rand(T, k, generator=gen(T + 1))
    (w13, p13, d13), (w2, p2, d2) = planar["w13"], planar["w2"]
    ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq, fq)
    out = moe.fused_moe(x.to(DEV), p13, p2, weights.to(DEV), topk.to(DEV))
    assert rel(out, ref) < BOUND * (3 if fq is not None else 1)
    if T == 1 and p13.weight.paired:
        assert p13.config(1, inter, H).get("SWAP") and p2.config(1, H, inter)["BN"] == 64
    if T == 48 and p13.weight.paired:  # 24 rows an expert: 32-row blocks, swapped (tuning.packed_config)
        assert p2.config(24, H, inter)["BM"] == 32 and p2.config(24, H, inter)["SWAP"]
    cfg = dict(BM=16, BN=32)
    assert torch.equal(moe.fused_moe(x.to(DEV), p13, p2, weights.to(DEV), topk.to(DEV), config=cfg),
                       moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV), config=cfg))


@pytest.mark.parametrize("scheme", ["bf16", "w8a8", "w8a16-unpacked", "w4a16", "w4a16:paired", "w4a8-int8",
                                    pytest.param("fp8-block", marks=gpu_only), pytest.param("w4a8", marks=gpu_only),
                                    pytest.param("w4a8:paired", marks=gpu_only)])
@pytest.mark.parametrize("split", [2, 3])
def test_fused_moe_splits_the_down_projections_k_for_one_token(scheme, split, monkeypatch):
    """One token: the down projection's K tiles split over `split` programs per output tile, their partial sums
    added with the slots' by the last program of each column block. Unpacked experts: 3 does not divide the 5 tiles
    of 128 (the last split is short); packed ones split evenly, 3 tiles of 256 over 3, over 2 the divisor below, 1."""
    from lowbit.kernels import linear, tuning
    monkeypatch.setattr(tuning, "MOE_SPLIT_K", split)
    scheme, _, layout = scheme.partition(":")
    packed = MOE_SCHEMES[scheme] == "packed"
    E, H, inter, k = 6, 128, (3 * 256 if packed else 5 * 128), 3
    w13, d13, fq = make_experts(scheme, E, 2 * inter, H, seed=11)
    w2, d2, _ = make_experts(scheme, E, H, inter, seed=12)
    if layout == "paired":  # the engine's int4 experts (LOWBIT_INT4_PAIRED), stacked from per-expert layers
        monkeypatch.setattr(mp, "PAIRED_EXPERTS", True)
        w13, w2 = (linear.stack_experts([linear.PackedLinear(mp.PackedWeight(
            ex.weight.words[e:e + 1], ex.weight.scales[e:e + 1], None, ex.weight.bits, ex.weight.group_size,
            ex.weight.n, ex.weight.k, ex.weight.tile_k), ex.act, ex.input_scale.reshape(-1)[:1]) for e in range(E)])
            for ex in (w13, w2))
        assert w2.weight.paired
        monkeypatch.setattr(tuning, "MOE_STAGES", split)  # (and the pipeline two or three stages deep)
    x = torch.randn(1, H, generator=gen(13)).to(DTYPE)
    topk = torch.randperm(E, generator=gen(14))[:k][None]
    weights = torch.rand(1, k, generator=gen(15))
    ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq, fq)
    launches = []
    mod, cfg_arg = (moe.mp, 5) if packed else (moe.mu, 6)
    monkeypatch.setattr(mod, "launch", lambda *a, f=mod.launch, **kw: launches.append((a[cfg_arg], kw)) or f(*a, **kw))
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV))
    want = split if not packed or split == 3 else 1  # (2 does not divide the packed experts' 3 K tiles)
    assert [(c.get("SPLIT_K", 1), kw.get("sum_slots", False)) for c, kw in launches] == [(1, False), (want, True)]
    if layout == "paired":
        assert [c["num_stages"] for c, _ in launches] == [split, split]
    assert out.dtype == DTYPE and rel(out, ref) < BOUND * (3 if fq is not None else 1)


def test_one_token_down_split_default(monkeypatch):
    """LOWBIT_MOE_SPLIT_K unset: packed experts split their down projection's K in two where the token's programs
    (slots x column blocks) fill under two waves of the chip, and only into a divisor of their K tiles; large unpacked
    experts as tuning.LARGE_UNPACKED_DOWN_SPLITS says by kind; other unpacked ones and wide projections stay whole; a
    forced split is capped by the K tiles."""
    from lowbit.kernels import tuning
    monkeypatch.setattr(tuning, "MOE_SPLIT_K", 0)
    monkeypatch.setattr(tuning, "num_sms", lambda: 132)
    cfg = dict(BN=64, BK=128)
    packed = lambda n, k: make_experts("w4a16", 2, n, k, seed=1)[0]  # noqa: E731
    assert moe.one_token_down_split(packed(2048, 1408), 1408, cfg, 8) == 2  # V2-Lite: 8 x 32 programs, 6 tiles
    assert moe.one_token_down_split(packed(2048, 1280), 1280, cfg, 8) == 1  # 5 K tiles of 256: no even split
    assert moe.one_token_down_split(packed(7168, 256 * 8), 2048, cfg, 9) == 1  # R1: 9 x 112 programs
    assert moe.one_token_down_split(make_experts("bf16", 2, 2048, 1408, seed=1)[0], 1408, cfg, 8) == 1
    # large unpacked experts (R1's 7168 x 2048) by kind: w8a16 2, fp8-block 3, bf16 and w8a8 whole; V2-Lite's whole
    monkeypatch.setattr(tuning, "LARGE_EXPERT", 7168 * 512)
    for scheme, want in (("w8a16-unpacked", 2), ("fp8-block", 3), ("bf16", 1), ("w8a8", 1)):
        assert moe.one_token_down_split(make_experts(scheme, 1, 7168, 512, seed=1)[0], 512, cfg, 9) == want, scheme
        assert moe.one_token_down_split(make_experts(scheme, 1, 7168, 384, seed=1)[0], 384, cfg, 9) == 1, scheme
    monkeypatch.setattr(tuning, "MOE_SPLIT_K", 8)
    assert moe.one_token_down_split(packed(2048, 1408), 1408, cfg, 8) == 6


def test_tuning_switches_take_whole_numbers_only(monkeypatch):
    """LOWBIT_MOE_SPLIT_K / LOWBIT_MOE_STAGES: unset or empty is 0 (the heuristics), a whole number is itself, anything
    else one line naming the variable."""
    from lowbit.kernels import tuning
    monkeypatch.delenv("LOWBIT_MOE_STAGES", raising=False)
    assert tuning.env_count("LOWBIT_MOE_STAGES") == 0
    monkeypatch.setenv("LOWBIT_MOE_STAGES", " 2 ")
    assert tuning.env_count("LOWBIT_MOE_STAGES") == 2
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("LOWBIT_MOE_STAGES", bad)
        with pytest.raises(ValueError, match="LOWBIT_MOE_STAGES"):
            tuning.env_count("LOWBIT_MOE_STAGES")


def test_one_token_moe_stages(monkeypatch):
    """LOWBIT_MOE_STAGES unset: the one-token MoE's paired int4 experts pipeline two stages where large
    (tuning.LARGE_EXPERT: R1's), three below (V2-Lite's), and more tokens or planar experts keep three."""
    from lowbit.kernels import tuning
    monkeypatch.setattr(tuning, "MOE_STAGES", 0)
    stages = lambda m, n, k, paired=True: tuning.packed_config(m, n, k, 4, mp.ACT_NONE, moe=True,  # noqa: E731
                                                               paired=paired)["num_stages"]
    assert stages(1, 2048, 7168) == 2 and stages(1, 7168, 2048) == 2  # R1's gate_up (N = I) and down
    assert stages(1, 1408, 2048) == 3 and stages(1, 2048, 1408) == 3  # V2-Lite's
    assert stages(4, 2048, 7168) == 3 and stages(1, 2048, 7168, paired=False) == 3
    monkeypatch.setattr(tuning, "MOE_STAGES", 4)
    assert stages(1, 1408, 2048) == 4


@pytest.mark.parametrize("bits,group,asym", [(4, 128, False), (4, 64, True), (8, 0, False), (8, 128, True)])
def test_dequantize_kernel_matches_unpack(bits, group, asym):
    """The packed words back to 16-bit weights (what large-M weight-only layers hand to the matrix library)."""
    N, K = 80, 640
    values, scale, zp = random_packed(1, N, K, bits, group, asym, seed=bits + group)
    pw = mp.repack(values, scale, zp, bits, group)
    ref = mp.unpack(pw)[0].double()
    out = mp.dequantize(to_dev(pw), DTYPE)
    assert out.shape == (N, K) and out.dtype == DTYPE
    assert rel(out, ref) < BOUND


LARGE_M_ACTS = [mp.ACT_NONE, mp.ACT_INT8_TOKEN, pytest.param(mp.ACT_FP8_STATIC, marks=gpu_only),
                pytest.param(mp.ACT_FP8_TOKEN, marks=gpu_only)]


@pytest.mark.parametrize("act", LARGE_M_ACTS)
def test_large_m_packed_layer_takes_the_dequantized_path(act, monkeypatch):
    """Above DEQUANT_ABOVE_ROWS rows a packed layer of any scheme runs the matrix library on its dequantized
    weights (w4a8's input scale folded in) and its activations as the scheme quantizes them."""
    from lowbit.kernels import linear
    values, scale, zp = random_packed(1, 48, 256, 4, 128, False, seed=3)
    in_scale = torch.tensor([0.02])
    layer = linear.PackedLinear(to_dev(mp.repack(values, scale, zp, 4, 128)), act, in_scale.to(DEV))
    monkeypatch.setattr(linear, "DEQUANT_ABOVE_ROWS", 8)
    x = torch.randn(20, 256, generator=gen(20)).to(DTYPE)
    ref = mp.packed_matmul_ref(x.float(), mp.repack(values, scale, zp, 4, 128), act, in_scale)
    calls = []
    monkeypatch.setattr(mp, "dequantize", lambda *a, f=mp.dequantize, **kw: calls.append(1) or f(*a, **kw))
    assert rel(layer(x.to(DEV)), ref) < BOUND and calls


@pytest.mark.parametrize("M", [1, 20])
def test_w8a16_dense_layer_unpacked(M, monkeypatch):
    """An int8-per-channel weight-only layer (w8a16; LOWBIT_W8A16_UNPACKED unset) is an UnpackedLinear of
    KIND_INT8_W16: the unpacked kernel at decode rows, the matrix library on its 16-bit weights above DEQUANT_ABOVE_ROWS; dequantized
    gives the checkpoint's weights back."""
    from lowbit.kernels import linear
    from lowbit.quant.schemes import QuantArgs
    values, scale, _ = random_packed(1, 96, 640, 8, 0, False, seed=M)
    monkeypatch.setattr(linear, "DEQUANT_ABOVE_ROWS", 8)
    layer = linear.packed_linear(values[0].to(DEV), scale[0].to(DEV), None, QuantArgs(8, "int", "channel"), None,
                                 None)
    assert isinstance(layer, linear.UnpackedLinear) and layer.kind == mu.KIND_INT8_W16
    want = values[0].double() * scale[0].double()
    assert torch.allclose(layer.dequantized().double().cpu(), want, rtol=1e-6, atol=0)
    x = torch.randn(M, 640, generator=gen(M)).to(DTYPE)
    calls = []
    monkeypatch.setattr(mu, "unpacked_matmul", lambda *a, f=mu.unpacked_matmul, **kw: calls.append(1) or f(*a, **kw))
    assert rel(layer(x.to(DEV)), x.double() @ want.t()) < BOUND
    assert bool(calls) == (M <= 8)


@pytest.mark.parametrize("N,K", [(96, 640), (33, 300)])
def test_dequantize_int8_is_each_value_times_its_scale_in_float32(N, K):
    values, scale, _ = random_packed(3, N, K, 8, 0, False, seed=N)
    out = mu.dequantize_int8(values.to(DEV), scale.to(DEV), DTYPE)
    want = (values.float() * scale.float()).to(DTYPE)  # the product in float32, as the kernel makes it
    assert out.shape == (3, N, K) and torch.equal(out.cpu(), want)


@pytest.mark.parametrize("M,K", [(3, 300), (70, 640)])
def test_int8_groups_in_16_bits(M, K):
    """w8a8 groups at prefill: the codes times their group's scale, rounded once to x's dtype."""
    x = (torch.randn(M, K, generator=gen(M)) * 3).to(DTYPE).to(DEV)
    out = mu.activations_16bit(x, mu.KIND_INT8_G32)
    q, s = aq.int8_per_token_group(x, 32)  # (the same launch's codes and scales, checked against the reference above)
    want = (q.float() * s.repeat_interleave(32, 1)[:, :K]).to(DTYPE)
    assert out.dtype == DTYPE and torch.equal(out, want)


@pytest.mark.parametrize("M", [1, 20])
def test_w8a8_groups_dense_layer(M, monkeypatch):
    """w8a8 --act-group-size 32: an UnpackedLinear of KIND_INT8_G32, the int8 kernel at decode rows, above
    DEQUANT_ABOVE_ROWS the matrix library on its 16-bit weights and activations on their groups' grids."""
    from lowbit.kernels import linear
    from lowbit.quant.schemes import get_scheme
    a = get_scheme("w8a8", act_group_size=32)
    w, ws = random_unpacked(mu.KIND_INT8_G32, 96, 640, seed=M)
    monkeypatch.setattr(linear, "DEQUANT_ABOVE_ROWS", 8)
    layer = linear.int8_linear(w.to(DEV), ws.to(DEV), a.weights, a.input_activations)
    assert isinstance(layer, linear.UnpackedLinear) and layer.kind == mu.KIND_INT8_G32
    x = torch.randn(M, 640, generator=gen(M)).to(DTYPE)
    calls = []
    monkeypatch.setattr(mu, "unpacked_matmul", lambda *a, f=mu.unpacked_matmul, **kw: calls.append(1) or f(*a, **kw))
    assert rel(layer(x.to(DEV)), mu.unpacked_matmul_ref(x.float(), w, mu.KIND_INT8_G32, ws)) < BOUND
    assert bool(calls) == (M <= 8)


@pytest.mark.parametrize("scheme", ["w8a16-unpacked", "w8a8-g32"])
def test_fused_moe_with_many_rows_runs_int8_experts_dequantized(scheme, monkeypatch):
    """From DEQUANT_ROWS_PER_EXPERT slots per expert on, int8 experts whose products run in 16 bits (w8a16's; w8a8's
    with activation groups, their inputs on their groups' grids) run in the 16-bit kernel on weights dequantized for
    the call."""
    E, H, inter, k, T = 4, 256, 128, 2, 12
    w13, d13, fq = make_experts(scheme, E, 2 * inter, H, seed=5)
    w2, d2, _ = make_experts(scheme, E, H, inter, seed=6)
    x = torch.randn(T, H, generator=gen(7)).to(DTYPE)
    topk = torch.stack([torch.randperm(E, generator=gen(t))[:k] for t in range(T)])
    weights = torch.rand(T, k, generator=gen(8))
    ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq, fq)
    calls = []
    monkeypatch.setattr(moe, "DEQUANT_ROWS_PER_EXPERT", 2)
    monkeypatch.setattr(mu, "dequantize_int8", lambda *a, f=mu.dequantize_int8: calls.append(1) or f(*a))
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV))
    assert len(calls) == 2 and rel(out, ref) < BOUND * (3 if fq is not None else 1)


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8-int8", pytest.param("w4a8", marks=gpu_only)])
@pytest.mark.parametrize("expert_scales", [False, True])
def test_fused_moe_with_many_rows_runs_packed_experts_dequantized(scheme, expert_scales, monkeypatch):
    """From DEQUANT_ROWS_PER_EXPERT slots per expert on, packed experts run in the 16-bit kernel on weights
    dequantized for the call: the same result as the packed kernel's (w4a8: each expert's static input scale in its
    weights, each slot's row on its expert's grid)."""
    E, H, inter, k, T = 4, 256, 128, 2, 12
    w13, d13, fq = make_experts(scheme, E, 2 * inter, H, seed=5)
    w2, d2, _ = make_experts(scheme, E, H, inter, seed=6)
    fq1 = fq2 = fq
    if expert_scales:
        if scheme != "w4a8":
            pytest.skip("only w4a8 has static input scales")
        s13, s2 = torch.tensor([0.01, 0.02, 0.03, 0.015]), torch.tensor([0.004, 0.002, 0.003, 0.001])
        w13.input_scale, w2.input_scale = s13.to(DEV), s2.to(DEV)
        fq1, fq2 = None, None  # each slot's row through its expert's scale: the reference below does it per slot
    x = torch.randn(T, H, generator=gen(7)).to(DTYPE)
    topk = torch.stack([torch.randperm(E, generator=gen(t))[:k] for t in range(T)])
    weights = torch.rand(T, k, generator=gen(8))
    if expert_scales:
        ref = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for slot, e in enumerate(topk[t].tolist()):
                xin = (aq.fp8_static_ref(x[t:t + 1].float(), s13[e]).double() * s13[e].double())
                gu = xin[0] @ d13[e].double().t()
                h = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]).to(DTYPE)
                hin = aq.fp8_static_ref(h[None].float(), s2[e]).double() * s2[e].double()
                ref[t] += weights[t, slot].double() * (hin[0] @ d2[e].double().t())
    else:
        ref = moe.fused_moe_ref(x, d13, d2, weights, topk, fq1, fq2)
    calls = []
    monkeypatch.setattr(moe, "DEQUANT_ROWS_PER_EXPERT", 2)
    monkeypatch.setattr(mp, "dequantize", lambda *a, f=mp.dequantize, **kw: calls.append(1) or f(*a, **kw))
    out = moe.fused_moe(x.to(DEV), w13, w2, weights.to(DEV), topk.to(DEV))
    assert len(calls) == 2 and rel(out, ref) < BOUND * (3 if fq is not None else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k,H", [(1, 8, 64), (5, 3, 1000)])
def test_moe_sum_adds_each_tokens_slots(dtype, T, k, H):
    parts = (torch.randn(T, k, H, generator=gen(T * k)) * 4).to(dtype)
    out = moe.moe_sum(parts.to(DEV)).cpu()
    ref = parts.double().sum(1)
    assert out.shape == (T, H) and out.dtype == dtype
    # float32 accumulation rounded once: half an ulp of the output plus the float32 sums' own error
    ulp = {torch.float32: 2 ** -23, torch.float16: 2 ** -10}[dtype]
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + k * 2 ** -22 * parts.double().abs().sum(1)).all()


@gpu_only
@pytest.mark.parametrize("row_div,K", [(1, 300), (3, 300), (1, 2500)])
def test_fp8_grid_rows_quantize_each_row_with_its_experts_scale(row_div, K):
    """w4a8 at small M: each slot's row on its own expert's static FP8 grid, kept in 16 bits; a slot of no local
    expert (-1) takes expert 0's scale. 2500 features: three programs a row."""
    T = 4
    x = (torch.randn(T, K, generator=gen(row_div)) * 3).to(DTYPE)
    scales = torch.tensor([0.01, 0.02, 0.005, 0.04])
    experts = torch.randint(-1, 4, (T * row_div,), generator=gen(9))
    out = aq.fp8_grid_rows(x.to(DEV), scales.to(DEV), experts.to(DEV), row_div).cpu()
    ref = aq.fp8_grid_rows_ref(x, scales, experts, row_div)
    assert out.dtype == DTYPE and torch.equal(out, ref)
    assert torch.equal(out[:, :3], torch.stack([aq.fp8_static_ref(x[i // row_div:i // row_div + 1, :3],
                                                                  scales[max(int(e), 0)])[0].to(DTYPE)
                                                for i, e in enumerate(experts)]))


@gpu_only
@pytest.mark.parametrize("M", [1, 7])
def test_w4a8_dense_grid_path_equals_quantizing_in_the_gemm(M, monkeypatch):
    """Large dense w4a8 layers at small M quantize x onto the FP8 grid once (ACT_FP8_GRID); small ones in each N tile
    of the GEMM: the same products, but for the odd code the GEMM's x * (1 / scale) rounds to differently from the
    grid's x / scale."""
    N, K = 160, 1152
    values, scale, zp = random_packed(1, N, K, 4, 128, False, seed=M)
    pw = to_dev(mp.repack(values, scale, zp, 4, 128))
    x = torch.randn(M, K, generator=gen(M)).to(DTYPE).to(DEV)
    xs = (x.float().abs().max() / 448).reshape(1)
    monkeypatch.setattr(gemv_packed, "ENABLED", False)  # (one row would take the GEMV, which quantizes in-kernel)
    in_gemm = mp.packed_matmul(x, pw, mp.ACT_FP8_STATIC, xs)
    monkeypatch.setattr(mp, "FP8_GRID_MIN_WEIGHTS", 0)
    calls = []
    monkeypatch.setattr(aq, "fp8_grid_rows", lambda *a, f=aq.fp8_grid_rows: calls.append(1) or f(*a))
    grid = mp.packed_matmul(x, pw, mp.ACT_FP8_STATIC, xs)
    assert calls and rel(grid, in_gemm.double().cpu()) < BOUND


@gpu_only
@pytest.mark.parametrize("T", [1, 9])
def test_w4a8_moe_small_m_path_equals_the_fp8_tensor_core_path(T):
    """The slots' rows quantized once on their experts' grids and the 16-bit product (BM < 64) against the FP8
    tensor-core product that quantizes inside the GEMM (BM = 64), with a different input scale for every expert."""
    E, H, inter, k = 6, 256, 128, 3
    w13, _, _ = make_experts("w4a8", E, 2 * inter, H, seed=T)
    w2, _, _ = make_experts("w4a8", E, H, inter, seed=T + 100)
    w13.input_scale = (torch.rand(E, generator=gen(1)) * 0.03 + 0.005).to(DEV)
    w2.input_scale = (torch.rand(E, generator=gen(2)) * 0.03 + 0.005).to(DEV)
    x = torch.randn(T, H, generator=gen(T)).to(DTYPE).to(DEV)
    topk = torch.stack([torch.randperm(E, generator=gen(t))[:k] for t in range(T)]).to(DEV)
    weights = torch.rand(T, k, generator=gen(T + 1)).to(DEV)
    small = moe.fused_moe(x, w13, w2, weights, topk, config=dict(BM=16, BN=32, num_warps=4, num_stages=3))
    large = moe.fused_moe(x, w13, w2, weights, topk, config=dict(BM=64, BN=64, num_warps=4, num_stages=3))
    assert rel(small, large.double().cpu()) < BOUND


@gpu_only
@pytest.mark.parametrize("paired", [True, False])
def test_w4a8_one_token_moe_quantizes_inside_its_launches_to_the_same_values(paired, monkeypatch):
    """tuning.W4A8_FUSED: one token's w4a8 down experts take their static FP8 inputs from the gate_up launch's
    epilogue instead of an act_quant.fp8_grid_rows launch: the same output bit for bit (the same division and
    rounding), with an input scale of its own for every expert."""
    from lowbit.kernels import tuning
    E, H, inter, k = 6, 512, 256, 3
    w13, _, _ = make_experts("w4a8", E, 2 * inter, H, seed=11)
    w2, _, _ = make_experts("w4a8", E, H, inter, seed=12)
    if paired:
        w13.weight, w2.weight = mp.experts_layout(w13.weight, w13.act), mp.experts_layout(w2.weight, w2.act)
    w13.input_scale = (torch.rand(E, generator=gen(1)) * 0.03 + 0.005).to(DEV)
    w2.input_scale = (torch.rand(E, generator=gen(2)) * 0.03 + 0.005).to(DEV)
    x = torch.randn(1, H, generator=gen(3)).to(DTYPE).to(DEV)
    topk = torch.randperm(E, generator=gen(4))[:k][None].to(DEV)
    weights = torch.rand(1, k, generator=gen(5)).to(DEV)
    outs = {}
    for fused in (0, 1):
        monkeypatch.setattr(tuning, "W4A8_FUSED", fused)
        outs[fused] = moe.fused_moe(x, w13, w2, weights, topk)
    assert torch.equal(outs[1], outs[0])
    large = moe.fused_moe(x, w13, w2, weights, topk, config=dict(BM=64, BN=64, num_warps=4, num_stages=3))
    assert rel(outs[1], large.double().cpu()) < BOUND


def test_unpacked_pipeline_stages_fit_shared_memory():
    """The engine's 16-bit and 8-bit configurations keep their stages; float32 tiles of the same take fewer."""
    for m, moe_ in ((1, False), (1, True), (48, True), (64, False), (4096, False)):
        for kind, x_bytes, w_bytes in ((mu.KIND_BF16, 2, 2), (mu.KIND_INT8_CHANNEL, 1, 1), (mu.KIND_INT8_W16, 2, 1)):
            cfg = tuning.unpacked_config(m, 2048, 7168, kind, moe=moe_)
            for fuse in (False, True) if moe_ else (False,):
                if fuse:
                    cfg = moe.gate_up_config(cfg, packed=False)
                assert mu.pipeline_stages(cfg["num_stages"], cfg["BM"], cfg["BN"], cfg["BK"], x_bytes, w_bytes,
                                          fuse) == cfg["num_stages"], (m, kind, cfg)
    assert mu.pipeline_stages(4, 32, 64, 128, 4, 4, True) == 2


# ---------------------------------------------------------------------------------------------- fused products
@pytest.mark.parametrize("kind", ["bf16", "w4a16", "w4a8-int8", "int8", pytest.param("w4a8", marks=gpu_only),
                                  pytest.param("fp8-block", marks=gpu_only)])
@pytest.mark.parametrize("M", [1, 5])
def test_layers_of_one_input_in_one_product(kind, M):
    """cat_products stacks layers that read one input (DeepSeek's q and kv_a projections, 3072 + 576 rows in
    V2-Lite, here 256 + 72): each output is what its layer alone computes, and parts of another configuration are
    refused (a different static input scale, an fp8 scale block across the seam)."""
    from lowbit.kernels import linear
    K, sizes = 256, (256, 72)

    def part(n, seed, in_scale=0.02):
        if kind in ("w4a16", "w4a8-int8", "w4a8"):
            values, scale, _ = random_packed(1, n, K, 4, 128, False, seed)
            act = {"w4a16": mp.ACT_NONE, "w4a8-int8": mp.ACT_INT8_TOKEN, "w4a8": mp.ACT_FP8_STATIC}[kind]
            return linear.PackedLinear(to_dev(mp.repack(values, scale, None, 4, 128)), act,
                                       torch.tensor([in_scale], device=DEV) if kind == "w4a8" else None)
        if kind == "bf16":
            return random_unpacked(mu.KIND_BF16, n, K, seed)[0].to(DEV)
        kernel_kind = mu.KIND_INT8_CHANNEL if kind == "int8" else mu.KIND_FP8_BLOCK
        w, ws = random_unpacked(kernel_kind, n, K, seed)
        return linear.UnpackedLinear(w.to(DEV), kernel_kind, ws.to(DEV))
    parts = [part(n, seed=n) for n in sizes]
    x = torch.randn(M, K, generator=gen(M)).to(DTYPE).to(DEV)
    fused = linear.cat_products(parts)
    assert fused is not None and fused.sizes == list(sizes)
    outs = fused(x)
    for out, p, n in zip(outs, parts, sizes, strict=True):
        alone = torch.nn.functional.linear(x, p) if kind == "bf16" else p(x)
        assert out.shape == (M, n)
        assert rel(out, alone.double().cpu()) < BOUND
    if kind == "w4a8":
        assert linear.cat_products([parts[0], part(72, seed=72, in_scale=0.03)]) is None
    if kind == "fp8-block":
        assert linear.cat_products(parts[::-1]) is None  # 72 rows first: its scale block would take 56 of the next


@pytest.mark.parametrize("asym", [False, True])
def test_dense_int4_layer_off_the_gemv_takes_the_paired_layout(asym, monkeypatch):
    """A dense int4 layer too large for the one-row GEMV (gemv_packed.MAX_WEIGHTS) keeps the paired layout where the
    experts would (symmetric; zero points stay planar), one the GEMV takes stays planar; either way its products at
    one row, at decode rows and dequantized (many rows) are the planar weights' ones, and the merged product of two
    small layers that together pass the limit is paired too."""
    from lowbit.kernels import linear
    from lowbit.quant.schemes import QuantArgs
    N, K = 96, 512
    values, scale, zp = random_packed(1, N, K, 4, 128, asym, seed=11)
    args = QuantArgs(4, "int", "group", group_size=128, symmetric=not asym)

    def layer(rows=slice(None)):
        return linear.packed_linear(values[0][rows].to(DEV), scale[0][rows].to(DEV),
                                    None if zp is None else zp[0][rows].to(DEV), args, None, None)
    small = layer()
    assert not small.weight.paired  # 96 x 512 is the GEMV's
    monkeypatch.setattr(gemv_packed, "MAX_WEIGHTS", N * K - 1)
    big = layer()
    assert big.weight.paired == (not asym)
    merged = linear.cat_products([layer(slice(0, 48)), layer(slice(48, N))])
    assert merged.part.weight.paired == (not asym)
    monkeypatch.setattr(linear, "DEQUANT_ABOVE_ROWS", 8)
    ref_w = mp.repack(values, scale, zp, 4, 128)
    for M in (1, 5, 12):
        x = torch.randn(M, K, generator=gen(M)).to(DTYPE)
        ref = mp.packed_matmul_ref(x.float(), ref_w)
        out = big(x.to(DEV))
        assert rel(out, ref) < BOUND, M
        assert torch.equal(torch.cat(merged(x.to(DEV)), dim=1), out), M
        assert rel(small(x.to(DEV)), ref) < BOUND, M
    assert torch.equal(big.dequantized(), small.dequantized())
