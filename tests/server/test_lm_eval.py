"""lm-eval's own clients (`--model local-completions` and `local-chat-completions`) run the lowbit_tiny tasks from
tests/server/lm_eval_tasks against the server; what they score is recomputed offline from the same model."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import SamplingParams

pytestmark = pytest.mark.slow  # ~100 s on a busy 2-core box, most of it lm-eval importing and 64 scored prompts

TASKS_DIR = os.path.join(os.path.dirname(__file__), "lm_eval_tasks")
RUN_TIMEOUT_S = 600


def lm_eval(server, model_name, out_dir, kind, tasks, *extra):
    endpoint = {"local-completions": "completions", "local-chat-completions": "chat/completions"}[kind]
    model_args = f"model={model_name},base_url={server.url}/v1/{endpoint},max_retries=1"
    if kind == "local-completions":
        model_args += ",tokenizer_backend=remote"  # the server's /tokenize: no tokenizer download
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", kind, "--model_args", model_args, "--tasks", tasks,
           "--include_path", TASKS_DIR, "--output_path", str(out_dir), "--log_samples", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(os.path.join(str(out_dir), "lm_eval.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)


@pytest.fixture(scope="module")
def runs(server, model_name, tmp_path_factory):
    """Both lm-eval runs, started together (each spends most of its time importing)."""
    dirs = {k: tmp_path_factory.mktemp(k) for k in ("completions", "chat")}
    procs = {"completions": lm_eval(server, model_name, dirs["completions"], "local-completions",
                                    "lowbit_tiny_mc,lowbit_tiny_qa"),
             "chat": lm_eval(server, model_name, dirs["chat"], "local-chat-completions", "lowbit_tiny_qa",
                             "--apply_chat_template")}
    yield {k: (procs[k], dirs[k]) for k in procs}
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def finished(run):
    proc, out_dir = run
    rc = proc.wait(RUN_TIMEOUT_S)
    log = open(os.path.join(str(out_dir), "lm_eval.log")).read()
    assert rc == 0, log[-3000:]
    results = json.load(open(glob.glob(f"{out_dir}/*/results_*.json")[0]))["results"]
    samples = {t: [json.loads(line) for line in open(glob.glob(f"{out_dir}/*/samples_{t}_*.jsonl")[0])]
               for t in results}
    return results, samples


def loglikelihood(llm, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as lm-eval splits them."""
    whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(llm.tokenizer.encode(context, add_special_tokens=False))
    logprobs = torch.log_softmax(llm.logits(whole)[:-1], -1)  # [L-1, V]
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_local_completions_scores_multiple_choice_and_generation(runs, default_llm):
    results, samples = finished(runs["completions"])
    acc = results["lowbit_tiny_mc"]["acc,none"]
    correct = []
    for s in samples["lowbit_tiny_mc"]:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        served = [float(r[0][0]) for r in s["resps"]]
        offline = [loglikelihood(default_llm, context, " " + c) for c in s["doc"]["choices"]]
        assert served == pytest.approx(offline, abs=1e-3)
        correct.append(max(range(len(offline)), key=offline.__getitem__) == s["doc"]["answer"])
    assert len(correct) == 16 and acc == pytest.approx(sum(correct) / len(correct))
    assert acc > 0.25  # better than chance on four choices

    qa = samples["lowbit_tiny_qa"]
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in qa]
    offline = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, stop=["\n"]))
    assert [s["resps"][0][0] for s in qa] == [o.text for o in offline]
    assert results["lowbit_tiny_qa"]["contains,none"] == pytest.approx(sum(s["contains"] for s in qa) / len(qa))
    print(f"lm-eval local-completions: lowbit_tiny_mc acc={acc:.4f}, "
          f"lowbit_tiny_qa contains={results['lowbit_tiny_qa']['contains,none']:.4f}")


def test_local_chat_completions_scores_generation(runs, default_llm):
    results, samples = finished(runs["chat"])
    qa = samples["lowbit_tiny_qa"]
    conversations = [json.loads(s["arguments"]["gen_args_0"]["arg_0"][0]) for s in qa]
    assert conversations[0][-1]["role"] == "user"
    offline = default_llm.chat(conversations, SamplingParams(temperature=0, max_tokens=16, stop=["\n"]))
    assert [s["resps"][0][0] for s in qa] == [o.text for o in offline]
    score = results["lowbit_tiny_qa"]["contains,none"]
    assert score == pytest.approx(sum(s["contains"] for s in qa) / len(qa)) and score > 0.25
    print(f"lm-eval local-chat-completions: lowbit_tiny_qa contains={score:.4f}")
