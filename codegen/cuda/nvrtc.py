"""Run-time compilation of the `.cu` kernels with NVRTC (torch.cuda._compile_kernel).

NVRTC ships with PyTorch's CUDA builds, so no CUDA toolkit is needed on the user's machine. A kernel is
compiled once per process for each (source, template instance, GPU architecture), in under a second.
Compiling must never break a user's run: where NVRTC is missing or a compile fails, `kernel` logs a
warning once and returns None, and the caller falls back to the Triton kernels.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

log = logging.getLogger("sparsec.codegen.cuda")

# What every kernel source is compiled after (types, conversions, activations)
PRELUDE = Path(__file__).with_name("linear_epilogue.cuh")

# (source file, template instance, device index) -> the kernel, or None where it failed. Per device, not
# per architecture: a loaded module belongs to one device's context.
_KERNELS: Dict[Tuple[str, str, int], Optional[object]] = {}
# the dynamic shared memory each kernel was allowed so far (bytes); raised when a launch needs more
_SHARED_MEM: Dict[Tuple[str, str, int], int] = {}
# process-wide counters (tests read them)
stats: Dict[str, int] = {"compiles": 0, "failures": 0}


def available() -> bool:
    """A CUDA build of torch with its NVRTC entry point."""
    return torch.version.cuda is not None and hasattr(torch.cuda, "_compile_kernel") and torch.cuda.is_available()


def kernel(source: Path, instance: str, device: torch.device, shared_mem: int):
    """The kernel `instance` (e.g. "csr_small_m<0, 3, 4, 1, 1>") of `source`, compiled for `device`, with
    its dynamic shared memory raised to at least `shared_mem` bytes; None if it cannot be had here.
    Launch it with `device` current (torch.cuda.device), on that device's stream."""
    if not available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    key = (str(source), instance, index)
    if key not in _KERNELS:
        _KERNELS[key] = _compile(source, instance, index, torch.cuda.get_device_capability(index))
    compiled = _KERNELS[key]
    if compiled is not None and shared_mem > _SHARED_MEM.get(key, 0):
        with torch.cuda.device(device):
            compiled.set_shared_memory_config(shared_mem)
        _SHARED_MEM[key] = shared_mem
    return compiled


def program_text(source: Path) -> str:
    """The one string NVRTC compiles for `source`: the shared prelude, then the kernel file."""
    return PRELUDE.read_text() + source.read_text()


def _compile(source: Path, instance: str, device: int, capability: Tuple[int, int]):
    try:
        with torch.cuda.device(device):
            compiled = torch.cuda._compile_kernel(program_text(source), instance,
                                                  compute_capability=f"{capability[0]}{capability[1]}",
                                                  nvcc_options=["-std=c++17"])
    except Exception as err:  # noqa: BLE001 (NVRTC missing or a compile error: fall back, say why)
        stats["failures"] += 1
        log.warning("sparsec: could not compile %s from %s with NVRTC (%s); the Triton kernels run instead",
                    instance, source.name, err)
        return None
    stats["compiles"] += 1
    return compiled
