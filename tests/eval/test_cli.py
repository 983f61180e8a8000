"""`lowbit eval` end to end on tiny checkpoints, against Hugging Face transformers in float64 as the oracle."""
import json

import pytest
import torch
import torch.nn.functional as F

from lowbit.cli import main
from lowbit.eval.runner import token_windows

from .conftest import TEXT

WINDOW, MAX_TOKENS = 64, 150


def _eval_json(capsys, *args):
    assert main(["eval", "--json", "--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _oracle(ref_model, model, windows):
    """Perplexities, per-position KL(ref || model) and top-1 agreement from HF models run in float64."""
    nll_ref, nll, kl, agree = [], [], [], []
    for w in windows:
        ids = torch.tensor([w])
        with torch.no_grad():
            lr = F.log_softmax(ref_model.double()(ids).logits[0, :-1], -1)
            lq = F.log_softmax(model.double()(ids).logits[0, :-1], -1)
        target = ids[0, 1:, None]
        nll_ref.append(-lr.gather(-1, target)[:, 0])
        nll.append(-lq.gather(-1, target)[:, 0])
        kl.append((lr.exp() * (lr - lq)).sum(-1))
        agree.append(lr.argmax(-1) == lq.argmax(-1))
    cat = torch.cat
    return (cat(nll_ref).mean().exp().item(), cat(nll).mean().exp().item(), cat(kl), cat(agree).double().mean())


def test_eval_matches_hf_oracle(eval_models, capsys):
    (ref_path, ref_hf), (q_path, q_hf) = eval_models["reference"], eval_models["perturbed"]
    report = _eval_json(capsys, "--model", q_path, "--reference", ref_path, "--text", eval_models["text"],
                        "--max-tokens", str(MAX_TOKENS), "--window", str(WINDOW))
    from lowbit.tokenizer import load_tokenizer
    windows = token_windows(load_tokenizer(ref_path).encode(TEXT, add_special_tokens=False), WINDOW, MAX_TOKENS)
    ppl_ref, ppl, kl, agree = _oracle(ref_hf, q_hf, windows)
    assert report["tokens"] == MAX_TOKENS and report["windows"] == 3 and report["window"] == WINDOW
    assert report["reference"]["perplexity"] == pytest.approx(ppl_ref, rel=1e-4)
    [r] = report["results"]
    assert r["model"] == q_path
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert r["kld_mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
    assert r["kld_p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-3)
    assert r["top1_agreement"] == pytest.approx(agree.item(), abs=1.5 / MAX_TOKENS)  # a near-tie may flip
    assert 0.001 < r["kld_mean"] < r["kld_p99"] and 0 < r["top1_agreement"] < 1  # the noise did something


def test_eval_of_the_reference_itself_costs_nothing(eval_models, capsys):
    ref_path = eval_models["reference"][0]
    report = _eval_json(capsys, "--model", ref_path, "--model", eval_models["perturbed"][0], "--reference", ref_path,
                        "--text", eval_models["text"], "--max-tokens", "40", "--window", "32")
    same, other = report["results"]
    assert same["perplexity"] == report["reference"]["perplexity"]
    assert same["kld_mean"] == 0 and same["kld_max"] == 0 and same["top1_agreement"] == 1
    assert other["kld_mean"] > 0


def test_eval_without_reference_reports_perplexity_only(eval_models, capsys):
    report = _eval_json(capsys, "--model", eval_models["reference"][0], "--text", eval_models["text"],
                        "--max-tokens", "0", "--window", "100")
    assert report["reference"] is None
    [r] = report["results"]
    assert set(r) == {"model", "perplexity", "seconds"}
    assert report["tokens"] == len(TEXT.encode()) - report["windows"]  # the whole text; bytes are tokens here


def test_eval_table(eval_models, capsys):
    ref_path, q_path = eval_models["reference"][0], eval_models["perturbed"][0]
    assert main(["eval", "--model", q_path, "--reference", ref_path, "--text", eval_models["text"],
                 "--max-tokens", "30", "--window", "31"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("30 tokens of ") and "1 window of <= 31 tokens" in out[0]
    assert out[1].split() == ["model", "perplexity", "KLD", "mean", "KLD", "p99", "top-1"]
    assert out[3].startswith(f"{ref_path} (reference)") and out[4].startswith(q_path) and out[4].endswith("%")


@pytest.mark.parametrize("case,message", [
    ("missing_model", "nope: no such file or directory"),
    ("missing_reference", "nope: no such file or directory"),
    ("missing_text", "cannot read it"),
    ("other_vocab", "must share a tokenizer"),
    ("bad_window", "--window must be at least 2"),
])
def test_eval_bad_input_is_one_line_and_nonzero(eval_models, capsys, case, message):
    ref, q, text = eval_models["reference"][0], eval_models["perturbed"][0], eval_models["text"]
    args = {"missing_model": ["--model", "nope", "--reference", ref, "--text", text],
            "missing_reference": ["--model", q, "--reference", "nope", "--text", text],
            "missing_text": ["--model", q, "--text", text + ".missing"],
            "other_vocab": ["--model", eval_models["other_vocab"][0], "--reference", ref, "--text", text,
                            "--max-tokens", "10"],
            "bad_window": ["--model", q, "--text", text, "--window", "1"]}[case]
    assert main(["eval", "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lowbit eval: error:") and message in err
