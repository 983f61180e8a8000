"""Source reading (GGUF filtered, FP8 dequantized) and the output folder's states."""
import json

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.models.loader import INCOMPLETE_MARKER
from lowbit.quant.checkpoint import OutputDir, _read_gguf


def test_gguf_reads_only_the_wanted_tensors_as_the_runtime_does():
    from lowbit.default_model import default_model_path
    from lowbit.quant import gguf
    path = default_model_path()
    reader = gguf._reader(path)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.mlp.down_proj.weight"]
    cfg = gguf.read_config(path)
    ours = _read_gguf(reader, cfg, set(names))
    assert sorted(ours) == sorted(names)
    left = set(names)
    for n, t in gguf.iter_tensors(path, cfg):
        if n in left:
            assert torch.equal(ours[n], t), n
            left.discard(n)
        if not left:
            break


def test_output_states(tmp_path):
    job = {"algo": "gptq"}
    out = OutputDir(str(tmp_path / "o"), job)
    assert out.status() == "new"
    out.start()
    assert (tmp_path / "o" / INCOMPLETE_MARKER).exists() and out.status() == "resume"
    with pytest.raises(ConfigError, match="different arguments \\(algo\\)"):
        OutputDir(str(tmp_path / "o"), {"algo": "rtn"}).status()
    out.write_unit(0, 2, {"a": torch.zeros(2)}, {})
    out.write_unit(1, 2, {"b": torch.ones(2)}, {"uncovered": ["x"]})
    out.save_state(0, torch.ones(3, 4), [[1, 2], [3]])
    hidden, seqs = out.load_state(0)
    assert seqs == [[1, 2], [3]] and hidden.shape == (3, 4)
    out.finish(2, {"model_type": "llama"}, {"n": 1})
    assert out.status() == "complete" and not (tmp_path / "o" / INCOMPLETE_MARKER).exists()
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="another model"):
        OutputDir(str(tmp_path / "other"), job).status()
