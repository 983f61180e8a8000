"""Tensor and expert parallel on the CPU with gloo, launched by torchrun: the same logits and greedy tokens as one
process, for bf16-style (unquantized) and quantized checkpoints."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from lowbit import LLM, SamplingParams

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_parallel(model: str, nproc: int, tp: int, ep: bool, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), WORKER, model, out, "--tp", str(tp)]
    if ep:
        cmd.append("--ep")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def single(model: str) -> dict:
    llm = LLM(model, device="cpu")
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = llm.generate([ids[:7], ids[:13]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return {"logits": llm.logits(ids), "greedy": [o.token_ids for o in greedy]}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "w4a16")
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--model", tiny_checkpoints["deepseek_v3"][0],
                        "--scheme", "w4a16", "--group-size", "8", "--algo", "rtn", "--output", out, "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("nproc,tp,ep", [(2, 2, False), (2, 1, True), (2, 2, True), (4, 4, False), (4, 4, True)])
@pytest.mark.parametrize("which", ["bf16", "w4a16"])
def test_parallel_equals_single_process(tiny_checkpoints, quantized, tmp_path, nproc, tp, ep, which):
    model = tiny_checkpoints["deepseek_v3"][0] if which == "bf16" else quantized
    ref = single(model)
    got = run_parallel(model, nproc, tp, ep, str(tmp_path / "out.pt"))
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    assert got["greedy"] == ref["greedy"]


def test_tensor_parallel_llama(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"][0]
    got = run_parallel(model, 2, 2, False, str(tmp_path / "out.pt"))
    assert (got["logits"] - single(model)["logits"]).abs().max().item() <= 1e-4


def _broadcast_rank(rank: int, world: int, init: str, lengths: list[int]) -> None:
    import torch.distributed as dist

    from lowbit.engine import parallel
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for n in lengths:
            msg = [7 * i - 3 for i in range(n)]
            assert parallel.broadcast_message(msg if rank == 0 else None) == msg, n
    finally:
        dist.destroy_process_group()


def test_broadcast_message_of_any_length(tmp_path):
    """A batch message fits the first broadcast or spills into a second one; every rank gets rank 0's ints."""
    torch.multiprocessing.spawn(_broadcast_rank, args=(2, f"file://{tmp_path}/rdzv", [1, 1023, 1024, 5000, 3]),
                                nprocs=2)


def test_tensor_parallel_groups_with_experts_over_the_world(tiny_checkpoints, tmp_path):
    """--tensor-parallel-size 2 on 4 ranks with --expert-parallel (as 8 per node on two nodes): two groups of 2 ranks
    each split attention, dense layers and vocabulary; the routed experts are spread over all 4."""
    model = tiny_checkpoints["deepseek_v3"][0]
    ref = single(model)
    got = run_parallel(model, 4, 2, True, str(tmp_path / "out.pt"))
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    assert got["greedy"] == ref["greedy"]


def _groups_rank(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from lowbit.engine import parallel
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    errors = []
    for tp, ep in ((3, True), (2, False)):
        try:
            parallel.init_parallel(tp, ep, backend="gloo")
        except ValueError as e:
            errors.append(str(e))
    parallel.init_parallel(2, True, backend="gloo")
    out[rank] = (errors, parallel.tp_rank(), parallel.tp_size(), parallel.ep_rank(), parallel.ep_size())
    dist.destroy_process_group()


def test_tensor_parallel_size_must_divide_the_world_and_a_smaller_one_needs_expert_parallel():
    with torch.multiprocessing.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.spawn(_groups_rank, args=(4, free_port(), out), nprocs=4)
        out = dict(out)
    for rank, (errors, tp_rank, tp_size, ep_rank, ep_size) in out.items():
        assert "does not divide the torchrun world of 4" in errors[0] and "needs --expert-parallel" in errors[1]
        assert (tp_rank, tp_size, ep_rank, ep_size) == (rank % 2, 2, rank, 4)
