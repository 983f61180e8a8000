"""`lowbit plan`'s serve command: lowbit serve's own parser reads its flags back, and they describe the layout the
plan names for the GPUs and nodes asked for."""
import shlex

from lowbit.cli import build_parser
from lowbit.cli import main as lowbit_main
from lowbit.plan.catalog import GIB, load_model_config, resolve_gpu
from lowbit.plan.memory import Budget
from lowbit.plan.planner import make_plan, served_tokens
from lowbit.quant.recipe import Recipe


def plan_for(model: str, scheme: str, gpu: str, per_node: int, nodes: int = 1, objective: str = "throughput"):
    name, cfg = load_model_config(model)
    budget = Budget(resolve_gpu(gpu, None, None), 0.9, "bf16", cfg.max_position_embeddings, 8192, None, per_node)
    return make_plan(name, cfg, Recipe.from_scheme(scheme), scheme, budget, per_node * nodes, objective=objective)


def parse(command: str):
    """(torchrun's --nnodes and --nproc-per-node, lowbit serve's parsed arguments)."""
    words = shlex.split(command)
    if words[0] == "lowbit":
        return (1, 1), build_parser().parse_args(words[1:])
    assert words[0] == "torchrun" and words[words.index("-m") + 1] == "lowbit"
    launcher, rest = words[1:words.index("-m")], words[words.index("-m") + 2:]
    opts = dict(zip(launcher[::2], launcher[1::2]))
    return (int(opts.get("--nnodes", 1)), int(opts["--nproc-per-node"])), build_parser().parse_args(rest)


def test_two_nodes_of_r1_serve_tensor_parallel_within_a_node_and_experts_across_both():
    plan = plan_for("deepseek-r1", "fp8-block", "H100-80G", per_node=8, nodes=2)
    serve = plan.serve_command("/models/r1-fp8")
    (nodes, per_node), args = parse(serve.command)
    assert (nodes, per_node) == (2, 8)
    assert "--rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500" in serve.command
    assert (args.verb, args.model, args.tensor_parallel_size, args.expert_parallel) == (
        "serve", "/models/r1-fp8", 8, True)
    laid = next(p for p in plan.layouts if str(p.layout) == serve.layout)
    assert (laid.layout.tp, laid.layout.pp, laid.layout.tp * laid.layout.dp, laid.layout.ep) == (8, 1, 16, True)
    assert serve.fits and args.max_model_len == 163840
    assert abs(args.kv_cache_memory_gb - laid.kv_cache_bytes_per_gpu / GIB) <= 0.05
    # its dp groups repeat one batch: lowbit serve holds one group's tokens, and says so
    assert serve.max_concurrent_tokens == served_tokens(laid) == laid.tokens_per_replica
    assert "repeat one batch" in serve.note


def test_the_served_layout_is_the_best_lowbit_serve_runs():
    plan = plan_for("deepseek-r1", "w4a8", "H200-141G", per_node=8, nodes=1)
    serve = plan.serve_command()
    runnable = [p for p in plan.layouts if p.layout.pp == 1 and p.fits]
    assert serve.max_concurrent_tokens == max(served_tokens(p) for p in runnable)
    _, args = parse(serve.command)
    assert args.model == "CHECKPOINT" and 8 % args.tensor_parallel_size == 0


def test_one_gpu_is_plain_lowbit_serve_and_dense_replicas_are_separate_servers():
    one = plan_for("smollm2-135m-instruct", "bf16", "H100-80G", per_node=1).serve_command()
    (nodes, per_node), args = parse(one.command)
    assert (nodes, per_node, args.tensor_parallel_size, args.expert_parallel) == (1, 1, 1, False)
    two = plan_for("smollm2-135m-instruct", "bf16", "H100-80G", per_node=2).serve_command()
    assert two.layout == "dp2" and two.command == one.command and "2 replicas" in two.note


def test_cli_prints_the_serve_command(capsys):
    assert lowbit_main(["plan", "--model", "deepseek-r1", "--scheme", "fp8-block", "--gpu", "H100-80G",
                        "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "-m lowbit serve --model CHECKPOINT --tensor-parallel-size 8 --expert-parallel" in out
