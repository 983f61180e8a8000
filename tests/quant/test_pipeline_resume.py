"""A killed quantization resumes to the same bytes; parts made apart merge to the same bytes; a half-written output
is never taken for a checkpoint. Runs that compute are subprocesses with one thread each, so that their floating
point is the same."""
import os
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.config import ConfigError
from lowbit.models.loader import INCOMPLETE_MARKER, Checkpoint, CheckpointError

ARGS = ["--scheme", "w4a8", "--num-calib-tokens", "512", "--seq-len", "128", "-q"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the same job as `lowbit quantize ARGS`, killed (SIGKILL) right after its third unit (embedding, layers 0 and 1)
KILLED = """
import os, signal, sys
from lowbit.quant.layerwise import QuantOptions
from lowbit.quant.pipeline import Job, quantize
from lowbit.quant.recipe import Recipe
finished = []
def on_unit(unit):
    finished.append(unit)
    if len(finished) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
job = Job(sys.argv[1], sys.argv[2], Recipe.from_scheme("w4a8"), QuantOptions(), num_calib_tokens=512, seq_len=128)
quantize(job, progress=False, on_unit=on_unit)
"""

# several CLI runs in one process: a whole run, and the three parts (rank 2 first, into its own folder, so that it
# has to recompute its calibration inputs from the start)
RUNS = """
import sys
from lowbit.cli import main
src, whole, shared, apart = sys.argv[1:5]
args = sys.argv[5:]
assert main(["quantize", "--model", src, "--output", whole] + args) == 0
assert main(["quantize", "--model", src, "--output", apart, "--parts", "3", "--rank", "2"] + args) == 0
for rank in (0, 1):
    assert main(["quantize", "--model", src, "--output", shared, "--parts", "3", "--rank", str(rank)] + args) == 0
"""


def python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def runs(tiny_deepseek, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    r = python(RUNS, tiny_deepseek, d / "whole", d / "shared", d / "apart", *ARGS)
    assert r.returncode == 0, r.stderr
    return tiny_deepseek, d


def test_killed_run_resumes_to_identical_bytes(runs):
    src, d = runs
    out = d / "killed"
    r = python(KILLED, src, out)
    assert r.returncode == -9, r.stderr
    assert (out / INCOMPLETE_MARKER).exists() and not (out / "config.json").exists()
    with pytest.raises(CheckpointError, match="incomplete"):
        Checkpoint(str(out))
    assert len(os.listdir(out / ".lowbit-work" / "done")) == 3
    r = python("import sys; from lowbit.cli import main; sys.exit(main(sys.argv[1:]))",
               "quantize", "--model", src, "--output", out, *ARGS)
    assert r.returncode == 0, r.stderr
    whole = files(d / "whole")
    assert files(out) == whole and "config.json" in whole and INCOMPLETE_MARKER not in whole


def test_parts_merge_to_identical_bytes(runs, capsys):
    src, d = runs
    shared = d / "shared"
    assert (shared / INCOMPLETE_MARKER).exists()  # two parts of three: not a checkpoint yet
    with pytest.raises(CheckpointError):
        Checkpoint(str(shared))
    assert main(["quantize", "--model", src, "--output", str(shared), "--merge", *ARGS]) == 1
    assert "not finished" in capsys.readouterr().err
    assert main(["quantize", "--model", src, "--output", str(shared), "--merge", str(d / "apart"), *ARGS]) == 0
    assert files(shared) == files(d / "whole")


def test_rerun_of_a_complete_output_does_nothing(runs, capsys):
    src, d = runs
    before = files(d / "whole")
    assert main(["quantize", "--model", src, "--output", str(d / "whole"), *ARGS]) == 0
    assert "already complete" in capsys.readouterr().err
    assert files(d / "whole") == before


def test_rerun_with_other_arguments_is_refused(runs, tmp_path, capsys):
    src, d = runs
    out = tmp_path / "x"
    r = python(KILLED, src, out)
    assert r.returncode == -9
    before = files(out)
    assert main(["quantize", "--model", src, "--output", str(out), "--scheme", "w8a8", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "different arguments" in err and len(err.splitlines()) == 1
    assert files(out) == before


def test_incomplete_output_refused_by_the_runtime(runs, tmp_path):
    from lowbit import LLM
    out = tmp_path / "half"
    out.mkdir()
    (out / INCOMPLETE_MARKER).write_text("")
    (out / "config.json").write_text("{}")
    with pytest.raises((CheckpointError, ConfigError), match="incomplete"):
        LLM(str(out), device="cpu")
