"""Run-time compilation of the `.cu` kernels with NVRTC (torch.cuda._compile_kernel).

NVRTC ships with PyTorch's CUDA builds, so no CUDA toolkit is needed on the user's machine. A kernel is
compiled once per process for each (source, template instance, GPU architecture), in under a second.
Compiling must never break a user's run: where NVRTC is missing or a compile fails, `kernel` logs a
warning once and returns None, and the caller falls back to the Triton kernels.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

log = logging.getLogger("sparsec.codegen.cuda")

# What every kernel source is compiled after (types, conversions, activations)
PRELUDE = Path(__file__).with_name("linear_prelude.cuh")
# The storage types' codes (the kernels' DT), their size, and the epilogue flags, as the prelude reads them
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
ELEMENT_BYTES = 2
HAS_BIAS, HAS_RES = 1, 2

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
    """The kernel `instance` (e.g. "csr_small_m<0, 3, 4, 1, 1, 2, 0>") of `source`, compiled for `device`, with
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


def epilogue_args(bias, res2d, out) -> Tuple[list, int]:
    """The kernels' epilogue arguments (bias, res, ldr, out, ldo; a missing bias or residual passed as `out`,
    never read) and their flags."""
    flags = (HAS_BIAS if bias is not None else 0) | (HAS_RES if res2d is not None else 0)
    return ([out if bias is None else bias, out if res2d is None else res2d, 0 if res2d is None else res2d.stride(0),
             out, out.stride(0)], flags)


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


# ------------------------------------------------------------------ launches with programmatic dependent launch
# torch's compiled kernel launches through cuLaunchKernel, which takes no launch attributes; a kernel that
# may start before the one ahead of it in the stream has finished (PDL, Hopper and later: see
# codegen/triton/pdl.py for why and for the rule each kernel keeps) is launched here through
# cuLaunchKernelEx with the programmatic-stream-serialization attribute.
PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, then a 64-byte value union (here its first int)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def kernel_params(args) -> Tuple[ctypes.Array, list]:
    """The kernel's parameter array (a pointer to each argument: tensors as their data pointers, ints as
    C ints, the types torch's own launcher passes) and the C values it points at, to keep alive."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
    return params, values


def launch(compiled, grid, block, args, shared_mem: int = 0, pdl: bool = False) -> None:
    """Launch `compiled` (from `kernel`) on the current stream; with `pdl`, as a programmatic dependent
    launch, for kernels that wait for their producer (griddepcontrol.wait) before reading its output."""
    launch_ex = _launch_kernel_ex(compiled) if pdl else None
    if launch_ex is None:
        compiled(grid=grid, block=block, args=args, shared_mem=shared_mem)
        return
    from torch.cuda._utils import _check_cuda

    attribute = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = LaunchConfig(*grid, *block, shared_mem, torch.cuda.current_stream()._as_parameter_,
                          ctypes.pointer(attribute), 1)
    params, _values = kernel_params(args)
    _check_cuda(launch_ex(ctypes.byref(config), compiled.func, params, None))


def _launch_kernel_ex(compiled):
    """The driver's cuLaunchKernelEx, or None where this torch (its private driver handle, its compiled
    kernel's function handle) or the driver (before CUDA 12) lacks it: the kernel then launches without PDL,
    which its griddepcontrol instructions allow."""
    if not hasattr(compiled, "func"):  # torch's handle to the CUfunction
        return None
    return _driver_launch_kernel_ex()


@functools.cache
def _driver_launch_kernel_ex():
    """cuLaunchKernelEx looked up once a process: torch's driver handle opens the library anew at each call
    (~15 us of host time, on every eager launch)."""
    try:
        from torch.cuda._utils import _get_gpu_runtime_library

        return _get_gpu_runtime_library().cuLaunchKernelEx
    except (ImportError, AttributeError, OSError):
        return None
