"""CUDA-graph replay of a compiled graph: sparsec's `mode="reduce-overhead"` runtime.

Inductor's CUDA graphs (cudagraph trees) run their checks in Python on every call: most of a call's
host time (200-240 us of cumulative time under cProfile, on the GPU machine's host, for calls of
0.13-0.18 ms without the profiler: `benchmarks/profile_decode.py --host`). A 4-layer decoder whose
pruned weights stream in 0.18 ms of GPU time then waits on a slow host. Here a
call costs one dictionary lookup, one copy of each input into the graph's own buffers, the replay,
and one copy of each output:

    call -> key (shapes, strides) -> inputs copied into the graph's buffers -> replay -> outputs cloned

Outputs are fresh tensors on every call, so a caller may keep them across calls (cudagraph trees
hand out the graph's own buffers instead and fail when an overwritten one is read); they are never
views of the inputs. Each compiled function keeps its own memory pool for its graphs' intermediates
(cudagraph trees share one across a process's graphs).

sparsec.compiler.replays_own_cuda_graphs decides which compiled graphs come here: those whose inputs
are all on the GPU (a graph with host scalars keeps Inductor's cudagraph trees).

Left to the graphless compiled function, with a note, per input signature:
- inputs not all on one CUDA device, or an input whose elements overlap (an expanded tensor: it
  cannot be the destination of a copy);
- a function that writes to its inputs (the write would land in the graph's copy, not in the
  caller's tensor; seen by the version counters of a warm-up run);
- a function that waits for the GPU (`.item()`, a copy to the host: torch's sync debug mode in a
  warm-up run), or a capture that fails for another reason;
- past `MAX_GRAPHS` signatures (each graph keeps its own input and output buffers).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("sparsec.cuda_graphs")

# Input signatures recorded per compiled function; further ones run without a graph.
MAX_GRAPHS = 16


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the graph's own input buffers, one per tensor argument
    positions: list[int]        # the arguments those buffers stand for
    outputs: list | tuple       # the graph's outputs, overwritten by every replay


def signature(args) -> tuple:
    """What a recorded graph is specific to: each tensor's shape and strides, each other value."""
    return tuple((a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)


def _unrecordable(args) -> str | None:
    """Why a graph cannot stand for a call with these arguments, or None."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        return "the graph has no tensor inputs"
    # 0: no overlap; 1: overlap; 2: a layout torch does not decide (then neither do we)
    if any(torch._debug_has_internal_overlap(t) != 0 for t in tensors):
        return "an input's elements may overlap (an expanded tensor)"
    if any(t.device.type != "cuda" for t in tensors) or len({t.device for t in tensors}) > 1:
        return "its inputs are not all on one CUDA device"
    return None


class CudaGraphReplay:
    """`fn` (compiled without CUDA graphs) replayed from one CUDA graph per input signature.

    `note(text)` receives what was left without a graph and why."""

    def __init__(self, fn: Callable, note: Callable[[str], None]):
        self.fn = fn
        self.note = note
        self.recorded: dict[tuple, _Recorded | None] = {}  # None: this signature runs without a graph
        self.pool = None  # one memory pool for all of this function's graphs (replayed one at a time)

    def __call__(self, *args):
        key = signature(args)
        recorded = self.recorded.get(key, _NOT_YET)
        if recorded is _NOT_YET:
            return self._record(key, args)
        if recorded is None:
            return self.fn(*args)
        _copy_in(recorded.inputs, recorded.positions, args)
        recorded.graph.replay()
        return _fresh(recorded.outputs)

    def _record(self, key: tuple, args):
        """Record the graph for this signature (warm-up, check, capture) and answer the call with it."""
        why = _unrecordable(args)
        if why is None and len(self.recorded) >= MAX_GRAPHS:
            why = f"more than {MAX_GRAPHS} input shapes"
        if why is not None:
            return self._without_graph(key, args, why)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        device = args[positions[0]].device
        with torch.inference_mode(False):  # buffers a later call outside inference mode may write to
            buffers = [torch.empty_strided(args[i].shape, args[i].stride(), dtype=args[i].dtype, device=device)
                       for i in positions]
        _copy_in(buffers, positions, args)
        graph_args = list(args)
        for i, buffer in zip(positions, buffers):
            graph_args[i] = buffer
        versions = [b._version for b in buffers]
        # Warm up on a side stream, as torch.cuda.graph asks: Inductor's first call autotunes and
        # allocates its workspaces, none of which may happen inside a capture. The second run, with
        # host syncs made errors, finds what a capture cannot hold (`.item()`, a copy to the host)
        # before capturing: a capture that fails leaves state behind (see _close_failed_capture).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.fn(*graph_args)
            sync = _host_sync(self.fn, graph_args)
        torch.cuda.current_stream(device).wait_stream(side)
        if sync is not None:
            return self._without_graph(key, args, f"it waits for the GPU ({sync})")
        if [b._version for b in buffers] != versions:
            return self._without_graph(key, args, "the graph writes to its inputs")
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*graph_args)
        except Exception as exc:  # what the sync check cannot see: the graphless function still runs it
            log.debug("CUDA graph capture failure", exc_info=True)
            _close_failed_capture()
            return self._without_graph(key, args, f"capture failed ({type(exc).__name__}: {exc})")
        recorded = self.recorded[key] = _Recorded(graph, buffers, positions, outputs)
        graph.replay()
        return _fresh(recorded.outputs)

    def _without_graph(self, key: tuple, args, why: str):
        self.recorded[key] = None
        self.note(f"runs without a CUDA graph for inputs {_describe(args)}: {why}")
        return self.fn(*args)


_NOT_YET = object()


def _copy_in(buffers: list[torch.Tensor], positions: list[int], args) -> None:
    """The call's tensors into the graph's input buffers. One copy per input, not torch._foreach_copy_
    (cudagraph trees' choice): that runs each 64K-element chunk of a tensor in one thread block, 14 us
    for a [16, 1, 4096] decode input on the H200, where copy_ of a contiguous input is a device-to-device
    memcpy of ~1.3 us."""
    for buffer, i in zip(buffers, positions):
        buffer.copy_(args[i])


def _host_sync(fn: Callable, args: list) -> str | None:
    """Run `fn(*args)` with torch's synchronizing operations made errors: the error, or None."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the mode is a prototype, on every switch
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn(*args)
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode(previous)
    return None


def _close_failed_capture() -> None:
    """A capture that fails never runs the epilogue of the CUDA random-number generator's capture
    bookkeeping, and every random op after it fails ("Offset increment outside graph capture"). An
    empty capture opens and closes that bookkeeping again."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the graph is empty
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
    except Exception:  # the call is answered without a graph either way
        log.debug("closing a failed CUDA graph capture failed", exc_info=True)


def _fresh(outputs):
    """The graph's outputs as tensors the caller owns (the next replay overwrites the graph's own)."""
    fresh = [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]
    return fresh if isinstance(outputs, list) else tuple(fresh)


def _describe(args) -> str:
    return ", ".join(f"{tuple(a.shape)} {a.device}" if isinstance(a, torch.Tensor) else repr(a) for a in args)
