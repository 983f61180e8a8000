"""lowbit/eval/gguf_baseline.py on a small GGUF file written here: the requantized weights are exactly what the
`gguf` package's quantizer makes of the dequantized source, and everything else is copied."""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from lowbit.eval.gguf_baseline import requantize_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (rng.standard_normal((40, 64)).astype(np.float32), Q.Q8_0),
               "blk.0.attn_q.weight": (rng.standard_normal((96, 64)).astype(np.float32), Q.Q4_1),
               "blk.0.ffn_down.weight": (rng.standard_normal((64, 128)).astype(np.float32), Q.F32),
               "blk.0.attn_norm.weight": (1 + 0.1 * rng.standard_normal(64).astype(np.float32), Q.F32)}
    path = str(tmp_path_factory.mktemp("gguf") / "src.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(1)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_token_list(["<s>", "a", "b"])
    w.add_chat_template("{{ messages }}")
    w.add_float32("llama.rope.freq_base", 100000.0)
    for name, (x, qtype) in tensors.items():
        w.add_tensor(name, x if qtype == Q.F32 else quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_requantize_gguf(source, tmp_path, qtype):
    dst = str(tmp_path / f"{qtype}.gguf")
    written = requantize_gguf(source, dst, qtype)
    assert written == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": qtype, "blk.0.ffn_down.weight": qtype,
                       "blk.0.attn_norm.weight": "F32"}
    src, out = gguf.GGUFReader(source), gguf.GGUFReader(dst)
    assert out.get_field("general.file_type").contents() == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for key in ("general.architecture", "llama.block_count", "tokenizer.ggml.tokens", "tokenizer.chat_template",
                "llama.rope.freq_base"):
        assert out.get_field(key).contents() == src.get_field(key).contents(), key
    s, o = {t.name: t for t in src.tensors}, {t.name: t for t in out.tensors}
    assert list(o) == list(s)
    for name in ("token_embd.weight", "blk.0.attn_norm.weight"):  # copied byte for byte
        assert o[name].tensor_type == s[name].tensor_type and np.array_equal(o[name].data, s[name].data)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        assert o[name].tensor_type == Q[qtype] and list(o[name].shape) == list(s[name].shape)
        source_f32 = dequantize(s[name].data, s[name].tensor_type)
        expected = dequantize(quantize(source_f32, Q[qtype]), Q[qtype])
        got = dequantize(o[name].data, o[name].tensor_type)
        np.testing.assert_array_equal(got, expected)
        step = {"Q8_0": 1 / 127, "Q4_0": 1 / 8}[qtype]  # block scale / block absmax
        assert 0 < np.abs(got - source_f32).max() <= step * np.abs(source_f32).max()


def test_requantize_gguf_rejects_other_types(source, tmp_path):
    with pytest.raises(ValueError, match="unsupported baseline type 'Q2_K'"):
        requantize_gguf(source, str(tmp_path / "x.gguf"), "Q2_K")
    assert not (tmp_path / "x.gguf").exists()
