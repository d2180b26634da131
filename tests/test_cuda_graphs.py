"""sparsec's CUDA-graph runtime (runtime/cuda_graphs.py): what `mode="reduce-overhead"` replays.

The GPU tests run where CUDA is; on the CPU the runtime's refusals and the compiler's choice of it."""

import pytest
import torch
import torch.nn as nn

from sparsec import models
from sparsec.backend import compiled_graphs
from sparsec.compiler import inductor_compile, replays_own_cuda_graphs
from sparsec.pass_manager import output_close
from sparsec.runtime import cuda_graphs
from sparsec.runtime.cuda_graphs import CudaGraphReplay

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


def block_pruned_llama(hidden=256, heads=4, inner=512, layers=2, density=0.2, block=32):
    """A LLaMA-style stack with every linear's weight block-sparse (keeps `density` of its blocks)."""
    torch.manual_seed(0)
    model = models.LlamaStack(hidden, heads, inner, layers).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                n, k = module.weight.shape
                keep = torch.rand(n // block, k // block) < density
                module.weight.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
    return model


class Counted:
    """A function that counts its calls (the Python a replay should no longer run)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_cpu_inputs_run_without_a_graph():
    notes = []
    fn = Counted(lambda x: [x * 2])
    replay = CudaGraphReplay(fn, notes.append)
    x = torch.randn(3, 4)
    for _ in range(2):
        assert torch.equal(replay(x)[0], x * 2)
    assert fn.calls == 2 and replay.recorded == {((x.shape, x.stride()),): None}
    assert notes == ["runs without a CUDA graph for inputs (3, 4) cpu: its inputs are not all on one CUDA device"]


def test_reduce_overhead_on_cpu_keeps_inductors_function(fresh_dynamo):
    """The runtime is for CUDA graphs only: a CPU graph in reduce-overhead mode is Inductor's own."""
    gm = torch.fx.symbolic_trace(nn.Linear(8, 8))
    compiled = inductor_compile(gm, [torch.randn(2, 8)], "reduce-overhead", graph_note=print)
    assert not isinstance(compiled, CudaGraphReplay)


def test_which_graphs_replay_through_the_runtime():
    """A mode with CUDA graphs and every input on the GPU (Dynamo's fake tensors, no GPU needed). A 0-d
    CPU input (a module's float under dynamic=True) keeps Inductor's cudagraph trees."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, eps = torch.empty(2, 8, device="cuda"), torch.empty((), device="cpu")
    assert replays_own_cuda_graphs("reduce-overhead", [x, 2])
    assert replays_own_cuda_graphs("max-autotune", [x])
    assert not replays_own_cuda_graphs("reduce-overhead", [x, eps])
    assert not replays_own_cuda_graphs(None, [x])
    assert not replays_own_cuda_graphs("max-autotune-no-cudagraphs", [x])
    assert not replays_own_cuda_graphs("reduce-overhead", [torch.randn(2)])


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 256), (16, 1, 256), (2, 8, 256)])
def test_reduce_overhead_replays_sparsecs_graph(fresh_dynamo, shape):
    """A block-sparse LLaMA-style stack under mode="reduce-overhead": after the recording call, calls
    replay the graph without running the compiled function's Python, equal eager on fresh inputs, and
    an output kept from an earlier call is not overwritten by later ones."""
    model = block_pruned_llama().to("cuda", torch.bfloat16)
    compiled = torch.compile(model, backend="sparsec", mode="reduce-overhead")
    with torch.no_grad():
        first = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        kept = compiled(first)
        ((runner, _inputs),) = compiled_graphs()[-1].variants.values()
        assert isinstance(runner, CudaGraphReplay) and list(runner.recorded.values())[0] is not None
        runner.fn = Counted(runner.fn)
        for _ in range(3):
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            ok, why = output_close(compiled(x), model(x))
            assert ok, why
        assert runner.fn.calls == 0
        ok, why = output_close(kept, model(first))
        assert ok, why


@needs_cuda
def test_one_graph_per_input_shape():
    notes = []
    fn = Counted(lambda x: [torch.relu(x) + 1])
    replay = CudaGraphReplay(fn, notes.append)
    shapes = [(4, 8), (2, 8), (4, 8), (2, 8)]
    for shape in shapes:
        x = torch.randn(shape, device="cuda")
        assert torch.equal(replay(x)[0], torch.relu(x) + 1)
    assert len(replay.recorded) == 2 and all(r is not None for r in replay.recorded.values())
    assert fn.calls == 6 and notes == []  # two warm-ups and the capture per shape; the repeats replayed


@needs_cuda
def test_graph_limit(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 1)
    notes = []
    replay = CudaGraphReplay(lambda x: [x + 1], notes.append)
    for rows in (1, 2, 2):
        x = torch.randn(rows, 4, device="cuda")
        assert torch.equal(replay(x)[0], x + 1)
    assert replay.recorded[(((2, 4), (4, 1)),)] is None
    assert notes == ["runs without a CUDA graph for inputs (2, 4) cuda:0: more than 1 input shapes"]


@needs_cuda
def test_function_writing_its_input_runs_without_a_graph():
    """The write must reach the caller's tensor, as in eager: a graph would write its own copy."""
    notes = []

    def add_one_in_place(x):
        x.add_(1)
        return [x * 2]

    replay = CudaGraphReplay(add_one_in_place, notes.append)
    x = torch.zeros(4, device="cuda")
    for step in (1, 2):
        out = replay(x)[0]
        assert torch.equal(x, torch.full_like(x, step)) and torch.equal(out, 2 * x)
    assert notes == ["runs without a CUDA graph for inputs (4,) cuda:0: the graph writes to its inputs"]


@needs_cuda
def test_host_sync_runs_without_a_graph():
    """A host sync inside the function (`.item()`) cannot be captured: found before capturing, and
    the call still answers."""
    notes = []
    replay = CudaGraphReplay(lambda x: [x * x.sum().item()], notes.append)
    for _ in range(2):
        x = torch.randn(5, device="cuda")
        assert torch.allclose(replay(x)[0], x * x.sum().item())
    assert len(notes) == 1 and "it waits for the GPU" in notes[0], notes


@needs_cuda
def test_failed_capture_leaves_random_numbers_working(monkeypatch):
    """A capture that fails anyway (here: the sync check switched off) is closed again: the call
    answers, and random ops on the device work after it."""
    monkeypatch.setattr(cuda_graphs, "_host_sync", lambda fn, args: None)
    notes = []
    replay = CudaGraphReplay(lambda x: [x * x.sum().item()], notes.append)
    x = torch.randn(5, device="cuda")
    assert torch.allclose(replay(x)[0], x * x.sum().item())
    assert len(notes) == 1 and "capture failed" in notes[0], notes
    torch.randn(5, device="cuda") + torch.rand(5, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * CUDA)
def test_expanded_input_runs_without_a_graph(device):
    """A graph's input buffer cannot be the destination of a copy whose elements overlap."""
    notes = []
    replay = CudaGraphReplay(lambda x: [x + 1], notes.append)
    x = torch.randn(1, 4, device=device).expand(3, 4)
    assert torch.equal(replay(x)[0], x + 1)
    assert notes == [f"runs without a CUDA graph for inputs (3, 4) {x.device}: an input's elements may overlap "
                     "(an expanded tensor)"]
