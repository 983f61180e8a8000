"""Tiny Llama checkpoints that share a byte-level tokenizer, and a perturbed copy standing in for a quantized one."""
import pytest
import torch

from tests.conftest import VARIANTS, hf_classes

TEXT = ("The licenses for most software and other practical works are designed to take away your freedom to share "
        "and change the works. By contrast, the GNU General Public License is intended to guarantee your freedom "
        "to share and change all versions of a program--to make sure it remains free software for all its users.")


def save_byte_tokenizer(path):
    """A byte-level tokenizer of 256 tokens (no merges, no BOS): tokenizes any text, fits a 320-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


def make_llama(path, seed=0, noise=0.0, **overrides):
    """A tiny random Llama saved with save_pretrained plus the byte tokenizer; `noise` perturbs every weight
    relative to its own scale (a stand-in for quantization error). Returns the Hugging Face model."""
    family, kw = VARIANTS["llama"]
    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kw, **overrides})).eval()
    if noise:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path))
    save_byte_tokenizer(path)
    return model


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """{"reference", "perturbed", "other_vocab": (path, HF model)} and "text": a file of TEXT."""
    root = tmp_path_factory.mktemp("eval")
    out = {"reference": (str(root / "ref"), make_llama(root / "ref")),
           "perturbed": (str(root / "q"), make_llama(root / "q", noise=0.05)),
           "other_vocab": (str(root / "v"), make_llama(root / "v", vocab_size=300))}
    (root / "text.txt").write_text(TEXT)
    out["text"] = str(root / "text.txt")
    return out
