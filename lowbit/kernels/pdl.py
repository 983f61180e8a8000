"""Programmatic dependent launch (Hopper and newer): a kernel's programs are placed while the kernel before it in the
stream still runs, and wait there until it has finished.

At batch-1 decode a layer is a chain of a dozen small launches (profile_decode.py: 61 kernels for four V2-Lite
layers, most of 2-7 us), and every boundary costs the next kernel's launch, the placement of its programs and its
first loads' latency after the previous kernel's last store. Launched with PDL (Triton's `launch_pdl`), a kernel's
programs may be placed once every program of the kernel before it has signalled (griddepcontrol.launch_dependents)
or exited; `enter` waits (griddepcontrol.wait) until that kernel has finished and its memory is visible. CUDA graphs
keep the dependency as a programmatic edge, so the decode graph gets the same overlap. Kernels that are not
launched with it (the matrix library's, torch's) keep the stream's plain order.

The rule every kernel here keeps: `enter(PDL)` before its first load of anything another kernel writes and before
its first store, on every path (an early return included). What no kernel writes (weights) may be read or
prefetched before it, and is where a kernel's weights are its main read and are not chosen by its inputs: the dense
one-row GEMV reads its first tile and asks L2 for the next, W_UV's and W_UK's tiles and the router's weights are
asked for or read, while the kernel before finishes. The wait orders a kernel after the whole kernel before it, and
that one after the one before it, so each launch sees everything launched earlier; a kernel that returned before
waiting could let the next one overtake it.

Where a kernel signals (MODE), measured in one run (H100, 2026-11-24, benchmarks/pdl_decode.py, V2-Lite widths, the
batch-1 decode graph of four layers, before the weight reads ahead; results/pdl-decode-v2-lite-h100-80gb-hbm3-
2026-11-24-before-prefetch.md, and with them pdl-decode-v2-lite-h100-80gb-hbm3-2026-11-24.md):
  1  never (it counts as signalled when its last program exits): bf16 567.9 -> 563.1 us, w4a16 456.4 -> 449.9,
     w4a8 488.4 -> 481.1;
  2  at its start, before its wait: bf16 547.8, but w4a16 468.8 and w4a8 502.0, slower than without PDL. A guess, not
     measured: kernels that signal before they wait let the next ones be placed in a cascade, and the waiting
     programs hold places the running kernel's would take;
  3  after its wait (at most one kernel waiting behind the one running): bf16 551.5, w4a16 448.7, w4a8 468.7. The
     default. With the weight reads ahead: bf16 568.3 -> 544.8, w4a16 457.1 -> 441.4, w4a8 485.7 -> 459.6 (-4%,
     -3%, -5%), the greedy tokens the same.

`launch(device)` gives a launch's keyword arguments: the kernel's PDL constexpr and Triton's `launch_pdl` option
together, so a kernel launched with PDL always has the wait compiled in (a kernel without a PDL parameter refuses
the keyword). LOWBIT_PDL=0 turns it off (LOWBIT_PDL=1, 2 the other modes); the interpreter and GPUs before compute
capability 9.0 never use it.
"""
from __future__ import annotations

import functools
import os

import torch

from lowbit.kernels import interpreting, triton_available

MODES = {"0": 0, "1": 1, "2": 2, "3": 3}  # off; wait, never signal; signal, then wait; wait, then signal (see above)


def mode_from(text: str) -> int:
    if text not in MODES:
        raise ValueError(f"LOWBIT_PDL={text!r}: 0 (off), 1, 2 or 3 (the default; see lowbit/kernels/pdl.py)")
    return MODES[text]


MODE = mode_from(os.environ.get("LOWBIT_PDL", "3"))

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def enter(PDL: tl.constexpr):
        """A kernel's first step: wait for the kernel before it to finish (PDL > 0), and signal that the next one's
        programs may be placed: before the wait (PDL 2) or after it (PDL 3, at most one kernel waiting)."""
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        if PDL > 0:
            tl.extra.cuda.gdc_wait()
        if PDL == 3:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def prefetch(ptrs, PDL: tl.constexpr):
        """Before `enter`, where PDL is on: ask L2 for the lines at ptrs (a tensor of pointers, one a 128-byte line,
        each a valid address), for a kernel's weights, which no kernel writes: their reads from memory then overlap
        the kernel before, whose programs run while these wait."""
        if PDL > 0:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def on(device: torch.device) -> bool:
    """Whether launches on this device use programmatic dependent launch."""
    device = torch.device(device)
    if not MODE or device.type != "cuda" or interpreting():
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch on device: its PDL constexpr, and Triton's launch_pdl where it is on."""
    return {"PDL": MODE, "launch_pdl": True} if on(device) else {"PDL": 0}
