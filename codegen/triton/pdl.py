"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts before the one ahead of it
in the stream has finished.

Why: at decode a block-sparse kernel takes 4-12 us, of which its launch and its first dependent
loads (row offsets, then column indices, then x) are a large part. Launched with PDL, its programs
start while the previous kernel's last programs still run, load what does not depend on that
kernel (row offsets) and wait (`gdc_wait`) only before reading x. The previous kernel lets them
start once its main loop is done (`gdc_launch_dependents`).

Correctness: `gdc_wait` returns only after the previous kernel has completed and its writes are
visible, so a kernel that waits before its first read of a producer's output reads the same values as
without PDL; a kernel launched without PDL runs after its predecessor as usual, and both calls are
no-ops there. The launch option is set only where sparsec launches a kernel itself (the opaque host
op): torch.compile's trace of a user Triton kernel takes no launch options.
"""
import functools

import torch
import triton
import triton.language as tl

from .mma import interpreting


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the kernel ahead in the stream has finished (PDL only)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream start its programs (PDL only)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Hopper or later, compiled (the interpreter has no grid dependency control)."""
    return (not interpreting() and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_launch(enabled: bool) -> dict:
    """Launch keyword arguments: the kernel's PDL constexpr and Triton's launch option."""
    return dict(PDL=True, launch_pdl=True) if enabled else dict(PDL=False)
