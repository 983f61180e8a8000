"""The README's first command, and the CLI's one-line errors."""
import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_answers_the_capital_of_france():
    r = run("generate", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_streams_replies_to_piped_input():
    r = subprocess.run([sys.executable, "-m", "lowbit", "chat", "--max-tokens", "20"],
                       input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_missing_model_is_one_line_and_nonzero():
    r = run("generate", "--model", "/no/such/dir", "hi")
    assert r.returncode != 0
    assert r.stderr.strip() == "lowbit generate: error: /no/such/dir: no such file or directory"
