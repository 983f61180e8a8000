"""`lowbit quantize` on bad input: one clear line, a non-zero exit, the source untouched, no output written; and
the embedded default model quantizes with no --model."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from lowbit.cli import main


def files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def fails(args, capsys, src, out, match):
    before = files(src)
    assert main(["quantize", "--model", str(src), "--output", str(out), "-q", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert files(src) == before
    return err


def test_unknown_scheme(tiny_llama, tmp_path, capsys):
    fails(["--scheme", "w3a7"], capsys, tiny_llama, tmp_path / "out", "unknown scheme 'w3a7'")
    assert not (tmp_path / "out").exists()


def test_recipe_pattern_matching_nothing(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "w8a16", "groups": [{"targets": ["re:.*experts.*"], "scheme": "w4a16"}]}))
    fails(["--recipe", str(recipe)], capsys, tiny_llama, tmp_path / "out", "'re:.*experts.*' matches no linear layer")
    assert not (tmp_path / "out").exists()


def test_recipe_splitting_a_merged_layer(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: w4a16\ngroups:\n  - targets: [k_proj]\n    scheme: w8a8\n")
    fails(["--recipe", str(recipe), "--algo", "rtn"], capsys, tiny_llama, tmp_path / "out", "need the same scheme")


def test_source_missing_a_tensor(tiny_llama, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    fails(["--scheme", "w8a16"], capsys, src, tmp_path / "out", "missing tensor model.layers.2.mlp.up_proj.weight")
    assert not (tmp_path / "out").exists()


def test_output_holding_another_model(tiny_llama, tiny_deepseek, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_deepseek, other)
    before = files(other)
    fails(["--scheme", "w8a16", "--algo", "rtn"], capsys, tiny_llama, other, "already holds another model")
    assert files(other) == before


def test_output_inside_the_source(tiny_llama, capsys):
    fails(["--scheme", "w8a16"], capsys, tiny_llama, os.path.join(tiny_llama, "q"), "outside the source")


@pytest.mark.parametrize("args,match", [(["--scheme", "w8a8", "--asym"], "asymmetric"),
                                        (["--scheme", "w4a16", "--group-size", "48"], "e.g. 128"),
                                        (["--scheme", "w4a16", "--smoothquant", "0.5"], "quantize activations"),
                                        (["--scheme", "w8a8", "--act-group-size", "64"], "groups of 32"),
                                        (["--scheme", "w4a8", "--act-group-size", "32"], "only to w8a8"),
                                        (["--scheme", "w4a16", "--parts", "2", "--rank", "2"], "--rank")])
def test_bad_options(tiny_llama, tmp_path, capsys, args, match):
    fails(args, capsys, tiny_llama, tmp_path / "out", match)
    assert not (tmp_path / "out").exists()


def test_rotate_refuses_deepseek(tiny_deepseek, tmp_path, capsys):
    fails(["--scheme", "w8a8", "--rotate"], capsys, tiny_deepseek, tmp_path / "out", "llama, qwen2 and qwen3")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_model_quantizes_without_model_argument(tmp_path, default_llm):
    from lowbit import LLM
    out = tmp_path / "smollm2-w8a16"
    assert main(["quantize", "--scheme", "w8a16", "--algo", "rtn", "--output", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    q = LLM(str(out), device="cpu")
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin"
    ids = default_llm.tokenizer.encode(text)
    assert q.tokenizer.encode(text) == ids  # the tokenizer came along
    ref, ours = default_llm.logits(ids), q.logits(ids)
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - ours.log_softmax(-1))).sum(-1).mean().item()
    assert kl < 0.02 and (ref.argmax(-1) == ours.argmax(-1)).float().mean() > 0.85


def test_source_missing_a_shard(tiny_deepseek, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_deepseek, src)
    (src / "model-mtp.safetensors").unlink()
    fails(["--scheme", "w8a16"], capsys, src, tmp_path / "out", "model-mtp.safetensors: shard listed")
    assert not (tmp_path / "out").exists()
