"""The launch configurations the engine picks compile for Hopper (sm_90a) on any machine, through the ptxas and
cuobjdump that Triton's wheel carries (benchmarks/kernel_sass.py --check): shared memory within the 227 KB a block
may have, no register spills, matrix instructions where they should be, 16-byte loads, and no int-to-float
conversion per int4 weight in the bf16 path."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernel_sass.py")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="Triton's wheel carries no ptxas here")
def test_engine_configurations_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    r = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
