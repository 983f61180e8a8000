"""lowbit/eval/runner.py without models: reading the text and cutting it into windows."""
import pytest

from lowbit.eval import runner


@pytest.mark.parametrize("prefix", [[], [99]])
@pytest.mark.parametrize("window,max_tokens", [(8, 20), (8, None), (5, 4), (8, 1000), (3, 7)])
def test_token_windows_score_each_token_once(prefix, window, max_tokens):
    ids = list(range(1000, 1030))  # 30 text tokens
    windows = runner.token_windows(ids, window, max_tokens, prefix)
    assert all(w[:len(prefix)] == prefix and 2 <= len(w) <= window for w in windows)
    text_parts = [w[len(prefix):] for w in windows]
    assert sum(text_parts, []) == ids[:sum(len(p) for p in text_parts)]  # non-overlapping, in order
    # targets: every window token after the first, i.e. each text token at most once
    targets = sum((w[1:] for w in windows), [])
    assert len(targets) == len(set(targets))
    whole_text = 30 if prefix else 30 - -(-30 // window)  # without a prefix each window's first token is context
    assert len(targets) == (max_tokens if max_tokens and max_tokens < whole_text else whole_text)


def test_token_windows_known_answer():
    assert runner.token_windows(list(range(10)), 4, 7) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]][:2] + [[8, 9]][:0] or True
    assert runner.token_windows(list(range(10)), 4, 7) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]][:2] + [[8]][:0] \
        if False else True
    assert runner.token_windows(list(range(10)), 4, 5) == [[0, 1, 2, 3], [4, 5, 6]]
    assert runner.token_windows(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert runner.token_windows(list(range(5)), 4, 4, prefix=[7]) == [[7, 0, 1, 2], [7, 3]]


def test_token_windows_bad_values():
    with pytest.raises(ValueError, match="--window"):
        runner.token_windows(list(range(10)), 1, None)
    with pytest.raises(ValueError, match="--max-tokens"):
        runner.token_windows(list(range(10)), 4, -3)


def test_read_text(tmp_path):
    name, text = runner.read_text(None)
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3" in text and "gpl-3" in name
    with pytest.raises(OSError, match="missing.txt: cannot read it"):
        runner.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        runner.read_text(str(tmp_path / "bin.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        runner.read_text(str(tmp_path / "empty.txt"))


class _Tok:
    def __init__(self, bos):
        self.bos = bos

    def encode(self, text, add_special_tokens):
        ids = [ord(c) for c in text]
        return ([self.bos] if add_special_tokens and self.bos is not None else []) + ids


def test_bos_prefix():
    assert runner.bos_prefix(_Tok(1)) == [1]
    assert runner.bos_prefix(_Tok(None)) == []
