"""Programmatic dependent launch (lowbit/kernels/pdl.py): every launch passes the PDL constexpr with Triton's option,
every kernel waits before it reads what another kernel wrote, and on a Hopper GPU a CUDA graph of dependent kernels
gives the same bits with PDL on as off."""
import ast
import pathlib

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import pdl

KERNELS = pathlib.Path(pdl.__file__).parent


def _kernel_defs():
    """(file, function) of every kernel in lowbit/kernels that takes PDL."""
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") \
                    and any(a.arg == "PDL" for a in node.args.args):
                yield path.name, node


def _launches():
    """(file, call) of every kernel launch `name[grid](...)` in lowbit/kernels."""
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel"):
                yield path.name, node


def test_every_launch_passes_pdl():
    launches = list(_launches())
    assert len(launches) >= 20
    for name, call in launches:
        spread = [k.value for k in call.keywords if k.arg is None]
        assert any(isinstance(v, ast.Call) and ast.unparse(v.func) == "pdl.launch" for v in spread), \
            f"{name}: {call.func.value.id} is launched without **pdl.launch(device)"


def test_every_pdl_kernel_enters_before_it_stores():
    """enter(PDL) runs at the kernel's top level (every program reaches it, none returns before it), ahead of any
    store or atomic; the loads before it read weights (checked by reading: only the GPU test below can tell)."""
    defs = list(_kernel_defs())
    assert {f.name for _, f in defs} >= {"_gemv_kernel", "_rms_norm_kernel", "_out_kernel", "_logits_kernel"}
    for name, fn in defs:
        top = [ast.unparse(s) for s in fn.body]
        enters = [i for i, s in enumerate(top) if s.startswith("enter(PDL)")]
        if fn.name == "_gemv_kernel":  # its MoE branch and its dense branch each enter (the dense one after its
            # first weight tile)
            assert "enter(PDL)" in ast.unparse(fn) and ast.unparse(fn).count("enter(PDL)") == 2
            continue
        assert enters, f"{name}: {fn.name} does not call enter(PDL) at its top level"
        before = "\n".join(top[:enters[0]])
        assert not any(w in before for w in ("tl.store", "atomic", "return")), \
            f"{name}: {fn.name} stores or returns before enter(PDL)"


def test_a_mode_other_than_0_to_3_is_refused():
    assert [pdl.mode_from(m) for m in "0123"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="LOWBIT_PDL='on': 0 \\(off\\), 1, 2 or 3"):
        pdl.mode_from("on")


def test_launch_keywords_off_the_gpu(monkeypatch):
    assert pdl.launch(torch.device("cpu")) == {"PDL": 0}
    monkeypatch.setattr(pdl, "MODE", 0)
    if torch.cuda.is_available():
        assert pdl.launch(torch.device("cuda")) == {"PDL": 0}


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs a GPU of compute capability 9.0 or newer")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_graph_of_dependent_kernels_matches_without_pdl(mode, monkeypatch):
    """A chain in which each kernel reads the one before: RMSNorm (residual add), the dense one-row GEMV (its first
    weight tile read before the wait), the router's logits (its weights a chunk ahead) and W_UV (prefetched), forty
    times over, captured in a CUDA graph: the same bits with PDL as without."""
    from lowbit.kernels import matmul_packed as mp
    from lowbit.kernels import mla_prep, norm_rope, router
    from lowbit.kernels.linear import PackedLinear
    g = torch.Generator().manual_seed(0)
    dev, H, D = torch.device("cuda"), 8, 512
    values = torch.randint(-8, 8, (1, H * D, 2048), generator=g, dtype=torch.int8)
    scale = torch.rand(1, H * D, 16, generator=g) * 0.02 + 0.01
    pw = mp.repack(values, scale, None, 4, 128)
    pw.words, pw.scales = pw.words.to(dev), pw.scales.to(dev)
    proj = PackedLinear(pw, mp.ACT_NONE, None)
    w_router = torch.randn(64, 2048, generator=g).to(dev)
    w_uv = (torch.randn(H, 2048 // H, D, generator=g) * 0.05).to(dev, torch.bfloat16)
    norm_w = (torch.rand(2048, generator=g) + 0.5).to(dev, torch.bfloat16)
    x0 = torch.randn(1, 2048, generator=g).to(dev, torch.bfloat16)

    def chain(x):
        res = x
        for _ in range(40):
            h, res = norm_rope.rms_norm(x, norm_w, 1e-6, residual=res)
            o = proj(h).view(1, H, D)
            logits = router.router_logits(h, w_router)
            x = mla_prep.mla_out(o, w_uv) + logits[:, :1].to(torch.bfloat16)
        return x, res

    def graphed():
        chain(x0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x0)
        graph.replay()
        torch.cuda.synchronize()
        return [t.clone() for t in out]

    monkeypatch.setattr(pdl, "MODE", 0)
    off = graphed()
    monkeypatch.setattr(pdl, "MODE", mode)
    on = graphed()
    assert all(torch.isfinite(t.float()).all() for t in off)
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True))

