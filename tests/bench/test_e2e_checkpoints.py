"""benchmarks/e2e.py deletes each checkpoint after the last step of its call that reads it (a V2-Lite checkpoint is
9-32 GB; the device's 64 GB disk held three, and a fourth scheme's step failed writing)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import e2e  # noqa: E402


def test_a_checkpoint_goes_after_the_last_step_that_reads_it():
    steps = ["ceilings", "bf16", "w8a16", "hf", "w4a8", "serve"]
    done = [e2e.checkpoints_done(steps, i) for i in range(len(steps))]
    # bf16 stays for hf, w4a8 for serve; the others go after their own step
    assert done == [set(), set(), {"w8a16"}, {"bf16"}, set(), {"w4a8"}]
    assert e2e.checkpoints_done(["fp8-block"], 0) == {"fp8-block"}
