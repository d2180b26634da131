"""select-kernels: the cost model's choices, the rewrite with fused epilogues, the decision cache."""

import json
import re

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import backend, models
from sparsec.codegen import cost_model
from sparsec.pass_manager import output_close
from sparsec.passes import select_kernels
from sparsec.runtime import ops, reference


@pytest.fixture
def cpu_kernels():
    """Use the exact reference implementations as the CPU kernels, so rewrites can be checked here."""
    ops.register_kernel("bsr_linear", "cpu", reference.bsr_linear_ref)
    ops.register_kernel("bitmap_linear", "cpu", reference.bitmap_linear_ref)
    yield
    ops.unregister_kernel("bsr_linear", "cpu", reference.bsr_linear_ref)
    ops.unregister_kernel("bitmap_linear", "cpu", reference.bitmap_linear_ref)


@pytest.fixture
def every_kernel_exists(monkeypatch):
    """Block-sparse and bitmap kernels exist and are ready (tests that need CSR too say so)."""
    monkeypatch.setattr(select_kernels, "has_real_kernel", lambda op, device: op in ("bsr_linear", "bitmap_linear"))
    monkeypatch.setattr(select_kernels, "kernels_ready", lambda op, device: True)


def block_sparse(n, k, density, block=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // block, k // block, generator=g) < density
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.randn(n, k, generator=g) * mask


def unstructured(n, k, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)


def choice(weight, m, traced=False):
    best, _found, _measured = select_kernels.choose(weight.to(torch.bfloat16), None, m, torch.device("cpu"), autotune=False,
                                                    traced=traced)
    return best.kernel


def test_cost_model_choices_on_nominal_h100(every_kernel_exists, monkeypatch):
    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    monkeypatch.setitem(cost_model.KERNEL_MODELS, ("dense", "cpu"), cost_model.KERNEL_MODELS[("dense", "cuda")])
    monkeypatch.setitem(cost_model.KERNEL_MODELS, ("bsr_linear", "cpu"), cost_model.KERNEL_MODELS[("bsr_linear", "cuda")])
    monkeypatch.setitem(cost_model.KERNEL_MODELS, ("bitmap_linear", "cpu"), cost_model.KERNEL_MODELS[("bitmap_linear", "cuda")])
    # Layers the size of a LLaMA-7B projection. Nearly dense: no sparse format can win.
    assert choice(unstructured(4096, 4096, 0.95), m=1) == "dense"
    # 90% of 64x64 blocks empty: block-sparse, at decode and at prefill sizes.
    assert choice(block_sparse(4096, 4096, 0.1), m=1) == "bsr_linear"
    assert choice(block_sparse(4096, 4096, 0.1), m=4096) == "bsr_linear"
    # 50% of the blocks: sparse only while memory-bound.
    assert choice(block_sparse(4096, 4096, 0.5), m=1) == "bsr_linear"
    assert choice(block_sparse(4096, 4096, 0.5), m=4096) == "dense"
    # 90% unstructured: the measured bitmap kernel is slower than cuBLAS at every M: dense.
    assert choice(unstructured(4096, 4096, 0.1), m=1) == "dense"
    # A bitmap kernel streaming at 80% of the bandwidth would win where memory-bound (decode), and
    # still lose where compute-bound (it computes densely over tiles that are all occupied).
    monkeypatch.setitem(cost_model.KERNEL_MODELS, ("bitmap_linear", "cpu"), cost_model.KernelModel(0.8, 0.3))
    assert choice(unstructured(4096, 4096, 0.1), m=1) == "bitmap_linear"
    assert choice(unstructured(4096, 4096, 0.1), m=4096) == "dense"


def test_cuda_csr_wins_at_a_few_tokens_only(every_kernel_exists, monkeypatch):
    """The fitted H200 CSR model: 90% unstructured streams at ~2.4x dense for one token and ~2x at four;
    its per-token multiply-adds cost cuBLAS's time at 16, and more beyond (benchmarks/RESULTS.md, kernels)."""
    monkeypatch.setattr(select_kernels, "has_real_kernel", lambda op, device: True)
    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    for kernel in ("dense", "bsr_linear", "bitmap_linear", "csr_linear", "semi_structured_linear"):
        monkeypatch.setitem(cost_model.KERNEL_MODELS, (kernel, "cpu"), cost_model.KERNEL_MODELS[(kernel, "cuda")])
    monkeypatch.setitem(cost_model.TRACED_KERNEL_MODELS, ("csr_linear", "cpu"),
                        cost_model.TRACED_KERNEL_MODELS[("csr_linear", "cuda")])
    weight = unstructured(11008, 4096, 0.1)
    assert choice(weight, m=1) == "csr_linear"
    assert choice(weight, m=4) == "csr_linear"
    assert choice(weight, m=32) == "dense"  # (at 16 the two tie)
    # traced into Inductor's code (no CUDA graphs) the CSR op runs its Triton kernel: one token only
    assert choice(weight, m=1, traced=True) == "csr_linear"
    assert choice(weight, m=4, traced=True) == "dense"
    assert choice(weight, m=4096) == "dense"
    assert choice(unstructured(11008, 4096, 0.5), m=1) == "dense"  # measured 0.48x: dense
    assert choice(block_sparse(11008, 4096, 0.1), m=1) == "bsr_linear"  # blocks beat CSR


def test_dynamic_graph_keeps_only_kernels_no_slower_at_any_size(every_kernel_exists, monkeypatch):
    """One compile serves every batch size: CSR, the winner at one token, loses at 16, so a dynamic
    graph keeps the layer dense; block-sparse wins at every size and stays."""
    monkeypatch.setattr(select_kernels, "has_real_kernel", lambda op, device: True)
    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    for kernel in ("dense", "bsr_linear", "bitmap_linear", "csr_linear", "semi_structured_linear"):
        monkeypatch.setitem(cost_model.KERNEL_MODELS, (kernel, "cpu"), cost_model.KERNEL_MODELS[(kernel, "cuda")])
    probes = select_kernels.DYNAMIC_TOKEN_PROBES

    def dynamic_choice(weight):
        best, _, _ = select_kernels.choose(weight.to(torch.bfloat16), None, 1, torch.device("cpu"), autotune=False,
                                           token_probes=probes)
        return best.kernel

    assert choice(unstructured(11008, 4096, 0.1), m=1) == "csr_linear"
    assert dynamic_choice(unstructured(11008, 4096, 0.1)) == "dense"
    assert dynamic_choice(block_sparse(11008, 4096, 0.1)) == "bsr_linear"


def test_host_launched_kernels_must_cover_their_host_time(every_kernel_exists, monkeypatch):
    """A sparse layer launched from Python on every call (a dynamic graph on CUDA without CUDA graphs)
    takes at least its host time: at decode, where the 90%-block kernel's few microseconds cannot
    hide it, the layer stays dense; at prefill the kernel's time covers it and it stays sparse. The
    same graph under CUDA graphs (no host work per call) or static (traced launches) keeps it sparse."""
    from types import SimpleNamespace

    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    for kernel in ("dense", "bsr_linear", "bitmap_linear"):
        monkeypatch.setitem(cost_model.KERNEL_MODELS, (kernel, "cpu"), cost_model.KERNEL_MODELS[(kernel, "cuda")])
    weight = block_sparse(11008, 4096, 0.1).to(torch.bfloat16)
    cuda = torch.device("cuda")

    def dynamic_choice(m, cuda_graphs=False, token_range=(2, None)):
        ctx = SimpleNamespace(token_range=token_range, cuda_graphs=cuda_graphs)
        host_s = select_kernels.opaque_host_seconds(ctx, cuda)
        return select_kernels.choose(weight, None, m, torch.device("cpu"), autotune=False, host_s=host_s)[0].kernel

    assert dynamic_choice(16) == "dense"
    assert dynamic_choice(4096) == "bsr_linear"
    assert dynamic_choice(16, cuda_graphs=True) == "bsr_linear"
    assert dynamic_choice(16, token_range=None) == "bsr_linear"
    assert select_kernels.opaque_host_seconds(SimpleNamespace(token_range=(2, None), cuda_graphs=False),
                                              torch.device("cpu")) == 0.0


def test_dynamic_batch_reaches_select_kernels(cpu_kernels, every_kernel_exists, monkeypatch):
    """torch.compile with dynamic=True: the report says the choice was checked over token counts, and
    what host time per call a sparse kernel was charged (as on CUDA without CUDA graphs)."""
    monkeypatch.setattr(select_kernels, "opaque_host_seconds", lambda ctx, device: 75e-6)
    model = pruned_ffn()
    torch._dynamo.reset()
    fn = torch.compile(model, backend="sparsec", dynamic=True, options={"passes": "analyze,select-kernels"})
    with torch.no_grad():
        for m in (3, 5, 9):
            x = torch.randn(m, 256)
            assert output_close(fn(x), model(x))[0]
    rows = {r["name"]: r for r in backend.last_report().layers}
    # the last graph's range: from 2 tokens, or from where the host time splits the range
    assert re.search(r"M=\[(2, 16|17), 256, 1024, 4096\]", rows["up.weight"]["dynamic_tokens"])
    assert rows["up.weight"]["host_ms_per_call"].startswith("0.075 ")


def test_permuted_layout_only_when_it_saves_enough_tiles(every_kernel_exists, monkeypatch):
    """block-reorder's permutations make every tile dearer (input gather, output scatter): a layout
    that packs scrambled blocks back into 10% of the tiles is worth it, one that saves 15% is not."""
    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    for kernel in ("dense", "bsr_linear", "bitmap_linear"):
        monkeypatch.setitem(cost_model.KERNEL_MODELS, (kernel, "cpu"), cost_model.KERNEL_MODELS[(kernel, "cuda")])
    g = torch.Generator().manual_seed(3)
    planted = block_sparse(4096, 4096, 0.1)
    rows, cols = torch.randperm(4096, generator=g), torch.randperm(4096, generator=g)
    scrambled = planted[rows][:, cols]
    # undo the scramble: packing scrambled[row_perm][:, col_perm] gives the planted blocks back
    row_perm, col_perm = torch.argsort(rows), torch.argsort(cols)
    best, _, _ = select_kernels.choose(scrambled.bfloat16(), None, 1, torch.device("cpu"), autotune=False,
                                       row_perm=row_perm, col_perm=col_perm)
    assert best.kernel == "bsr_linear" and best.permuted and best.label.endswith("+perm")
    # as stored, the blocks are 90% sparse already; a permutation saving few of them loses to no permutation
    shuffle = torch.arange(4096)
    shuffle[:64] = shuffle[:64].flip(0)  # reorders rows inside one block row: the same tiles
    best, _, _ = select_kernels.choose(planted.bfloat16(), None, 1, torch.device("cpu"), autotune=False,
                                       row_perm=shuffle, col_perm=None)
    assert best.kernel == "bsr_linear" and not best.permuted


def test_dynamic_graph_is_built_per_token_range_and_dispatched(cpu_kernels, every_kernel_exists, monkeypatch):
    """With the H100 models, 50% blocks win while memory-bound and lose to dense once compute-bound:
    a dynamic graph gets one compiled graph per range of token counts, chosen per call, with no new
    Dynamo compile; every range computes the model's function."""
    monkeypatch.setitem(cost_model.NOMINAL_CEILINGS, "cpu", cost_model.NOMINAL_CEILINGS["cuda"])
    for kernel in ("dense", "bsr_linear", "bitmap_linear"):
        monkeypatch.setitem(cost_model.KERNEL_MODELS, (kernel, "cpu"), cost_model.KERNEL_MODELS[(kernel, "cuda")])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.ReLU()).eval()  # big enough to pay for a launch
    with torch.no_grad():
        model[0].weight.copy_(block_sparse(4096, 4096, 0.5, seed=1))
    torch._dynamo.reset()
    before = len(backend.compiled_graphs())
    fn = torch.compile(model, backend="sparsec", dynamic=True, options={"passes": "analyze,select-kernels"})
    sizes = (3, 20, 300, 3000, 5)
    with torch.no_grad():
        for m in sizes:
            x = torch.randn(m, 4096)
            assert output_close(fn(x), model(x))[0]
    graphs = backend.compiled_graphs()[before:]
    assert len(graphs) == 1  # one Dynamo graph for every size
    graph = graphs[0]
    bounds = [hi for hi, _variant in graph.range_variants]
    assert len(bounds) >= 2 and bounds[-1] is None
    kernels = [{r["kernel"] for r in graph.reports[key].layers} for key in graph.reports if key[0] == "tokens"]
    assert any(k.startswith("bsr_linear") for k in kernels[0]) and kernels[-1] == {"dense"}
    assert any("one graph per range of tokens (2-" in n for n in graph.report.notes)


def test_no_sparse_kernel_without_a_real_kernel_for_the_device(monkeypatch):
    monkeypatch.setattr(select_kernels, "has_real_kernel", lambda op, device: False)
    assert choice(block_sparse(4096, 4096, 0.05), m=1) == "dense"


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def pruned_ffn():
    torch.manual_seed(0)
    model = FFN().eval()
    with torch.no_grad():
        model.up.weight.copy_(block_sparse(512, 256, 0.2, seed=1))
        model.down.weight.copy_(block_sparse(256, 512, 0.2, seed=2))
    return model


def test_rewrite_fuses_activation_and_residual_and_stays_exact(cpu_kernels, every_kernel_exists):
    model = pruned_ffn()
    x = torch.randn(2, 3, 256)
    report = sparsec.explain(model, x, passes="analyze,select-kernels", verify_each=True)
    rows = {r["name"]: r for r in report.layers}
    assert rows["up.weight"]["kernel"].startswith("bsr_linear") and rows["up.weight"]["epilogue"] == "act=relu residual=False"
    assert rows["down.weight"]["epilogue"] == "act=none residual=True"
    blocks = (model.up.weight.reshape(512 // 64, 64, 256 // 64, 64) != 0).any(3).any(1).sum(1)
    assert rows["up.weight"]["block_rows"].startswith(f"{int(blocks.min())}-{int(blocks.max())} non-zero blocks a block row")
    compiled = sparsec.compile(model, x, passes="analyze,select-kernels", inductor=False)
    for shape in [(1, 1, 256), (7, 256), (4, 75, 256)]:  # decode, 2-D and ragged M
        fresh = torch.randn(shape)
        with torch.no_grad():
            assert output_close(compiled(fresh), model(fresh))[0]


@pytest.fixture
def gated_cpu_kernel():
    """The reference as a CPU block-sparse kernel with the gated epilogue (as the CUDA one has)."""
    ops.register_kernel("bsr_linear", "cpu", reference.bsr_linear_ref, gated=True)
    yield
    ops.unregister_kernel("bsr_linear", "cpu", reference.bsr_linear_ref)


def test_swiglu_product_goes_into_the_stacked_gate_up_kernel(gated_cpu_kernel, every_kernel_exists):
    """LLaMA-style block, gate/up 90% block-sparse: fuse-linears stacks them, select-kernels runs the
    stacked weight as one block-sparse op whose gated epilogue computes silu(gate) * up, exact
    against eager, for one token too (decode); with no gated kernel for the device the product stays
    outside the kernel."""
    torch.manual_seed(0)
    model = models.LlamaStack(hidden=128, heads=4, intermediate=256, layers=1).eval()
    mlp = model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(block_sparse(256, 128, 0.1, seed=3))
        mlp.up_proj.weight.copy_(block_sparse(256, 128, 0.1, seed=4))
    x = torch.randn(2, 5, 128)
    passes = "analyze,fuse-linears,select-kernels"
    report = sparsec.explain(model, x, passes=passes, verify_each=True)
    rows = {r["name"]: r for r in report.layers}
    for member in ("gate_proj", "up_proj"):  # the stacked layer's decision shows on both members
        row = rows[f"layers.0.mlp.{member}.weight"]
        assert row["fused_into"] == "layers.0.mlp.{gate_proj,up_proj}.weight"
        assert row["kernel"].startswith("bsr_linear") and row["epilogue"] == "act=swiglu residual=False"
        assert "bsr_linear[64x64]" in row["predicted_ms"]
    compiled = sparsec.compile(model, x, passes=passes, inductor=False)
    for shape in [(1, 1, 128), (3, 7, 128)]:
        fresh = torch.randn(shape)
        with torch.no_grad():
            assert output_close(compiled(fresh), model(fresh))[0]
    decode = torch.randn(1, 1, 128)
    rows = {r["name"]: r for r in sparsec.explain(model, decode, passes=passes).layers}
    assert rows["layers.0.mlp.gate_proj.weight"]["epilogue"] == "act=swiglu residual=False"
    with torch.no_grad():
        assert output_close(sparsec.compile(model, decode, passes=passes, inductor=False)(decode), model(decode))[0]
    ops.unregister_kernel("bsr_linear", "cpu", reference.bsr_linear_ref)  # the C++ kernel: not gated
    rows = {r["name"]: r for r in sparsec.explain(model, x, passes=passes).layers}
    assert rows["layers.0.mlp.gate_proj.weight"]["epilogue"] == "act=none residual=False"


@pytest.mark.filterwarnings("error:sparsec could not compile")
def test_torch_compile_backend_with_sparse_kernels_under_inductor(cpu_kernels, every_kernel_exists):
    model = pruned_ffn()
    torch._dynamo.reset()
    fn = torch.compile(model, backend="sparsec", options={"passes": "analyze,select-kernels"})
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 256)
        with torch.no_grad():
            assert output_close(fn(x), model(x))[0]


def test_autotune_decision_is_cached_on_disk(cpu_kernels, every_kernel_exists, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    model = pruned_ffn()
    x = torch.randn(4, 256)
    sparsec.explain(model, x, passes="analyze,select-kernels", autotune=True)
    cache = json.loads((tmp_path / "select.json").read_text())
    assert len(cache) == 2 and all("dense" in timings for timings in cache.values())

    def must_not_measure(*args, **kwargs):
        raise AssertionError("the cached decision should have been used")

    monkeypatch.setattr(select_kernels, "_measure", must_not_measure)
    report = sparsec.explain(model, x, passes="analyze,select-kernels", autotune=True)
    assert all("measured_ms" in row for row in report.layers)


needs_cxx = pytest.mark.skipif(not __import__("sparsec.codegen.cpp.build", fromlist=["x"]).compiler_available(),
                               reason="no C++ compiler (c++ / $CXX) on PATH: the CPU kernels cannot be built")


@needs_cxx
def test_cpu_choices_with_the_cpp_kernels():
    """On the CPU the C++ kernels are real candidates (nominal 2-core ceilings, fp32)."""
    def cpu_choice(weight, m):
        best, _found, _measured = select_kernels.choose(weight, None, m, torch.device("cpu"), autotune=False)
        return best.kernel

    assert cpu_choice(block_sparse(2048, 2048, 0.1, block=32), m=1) == "bsr_linear"
    assert cpu_choice(block_sparse(2048, 2048, 0.1, block=32), m=512) == "bsr_linear"
    assert cpu_choice(unstructured(2048, 2048, 0.1), m=1) == "csr_linear"
    assert cpu_choice(unstructured(2048, 2048, 0.1), m=32) == "csr_linear"
    # Half the weights zero, few tokens: the bitmap format (4 bytes + 1 bit per non-zero) streams less.
    assert cpu_choice(unstructured(2048, 2048, 0.5), m=1) == "bitmap_linear"
    # 50% unstructured with many tokens is compute-bound: CSR and bitmap both lose to dense GEMM.
    assert cpu_choice(unstructured(2048, 2048, 0.5), m=512) == "dense"
    assert cpu_choice(torch.randn(2048, 2048), m=1) == "dense"


def unstructured_mlp() -> nn.Module:
    """512 -> 1024 -> 512 with 90% of each weight zero at random: CSR territory on the CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    return model


@needs_cxx
def test_cpp_csr_kernel_chosen_end_to_end_through_inductor(fresh_dynamo):
    """A 90%-unstructured MLP on the CPU runs sparsec::csr_linear with its fused epilogue, under
    Inductor, and equals eager on fresh inputs."""
    model = unstructured_mlp()
    compiled = torch.compile(model, backend="sparsec")
    with torch.no_grad():
        for batch in (4, 4, 9):
            x = torch.randn(batch, 512)
            assert output_close(compiled(x), model(x))[0]
    report = sparsec.backend.last_report()
    kernels = {row["name"]: row["kernel"] for row in report.layers}
    assert kernels == {"0.weight": "csr_linear", "2.weight": "csr_linear"}, kernels


class Bottleneck(nn.Module):
    """ResNet-style: 1x1 reduce, 3x3, 1x1 expand with BN and ReLU, and a strided 1x1 downsample."""

    def __init__(self):
        super().__init__()
        self.reduce, self.bn1 = nn.Conv2d(256, 256, 1, bias=False), nn.BatchNorm2d(256)
        self.spatial = nn.Conv2d(256, 256, 3, padding=1)
        self.expand = nn.Conv2d(256, 512, 1)
        self.down = nn.Conv2d(256, 512, 1, stride=2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.reduce(x)))
        y = self.expand(torch.relu(self.spatial(y)))
        return torch.relu(y[:, :, ::2, ::2] + self.down(x))


@needs_cxx
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pointwise_convs_run_as_sparse_linears_over_pixels(memory_format, fresh_dynamo):
    """1x1 convolutions (stride 1 and 2) with 90%-unstructured weights become sparse linears over
    pixels; the 3x3 conv has no sparse kernel and stays dense, saying why. Equal to eager on fresh
    inputs in both memory formats."""
    torch.manual_seed(0)
    model = models.randomize_batchnorm(Bottleneck()).eval().to(memory_format=memory_format)
    with torch.no_grad():
        for conv in (model.reduce, model.spatial, model.expand, model.down):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    x = torch.randn(2, 256, 8, 8).contiguous(memory_format=memory_format)
    with torch.no_grad():
        compiled = sparsec.compile(model, x)
        for seed in range(2):
            torch.manual_seed(seed)
            fresh = torch.randn_like(x)
            assert output_close(compiled(fresh), model(fresh))[0]
    rows = {row["name"]: row for row in compiled.report.layers}
    for name in ("reduce.weight", "expand.weight", "down.weight"):
        assert rows[name]["kernel"] == "csr_linear" and rows[name]["op"] == "conv2d", rows[name]
    assert rows["spatial.weight"]["kernel"] == "dense"
    assert "1x1 convolutions" in rows["spatial.weight"]["kernel_reason"]


@needs_cxx
def test_token_counts_1_7_64_300_are_correct_without_recompiling(fresh_dynamo):
    """Dynamo compiles the first size static and the second one dynamic; after that no size
    compiles again, and the sparse kernels stay in place for every size."""
    model = unstructured_mlp()
    compiled = torch.compile(model, backend="sparsec")
    before = len(sparsec.backend.compiled_graphs())
    with torch.no_grad():
        for tokens in (1, 7, 64, 300, 5):
            x = torch.randn(tokens, 512)
            assert output_close(compiled(x), model(x))[0], tokens
    graphs = sparsec.backend.compiled_graphs()[before:]
    assert len(graphs) == 2 and all(g.compiles == 1 for g in graphs)
    assert all({r["kernel"] for r in g.report.layers} == {"csr_linear"} for g in graphs)


# From one token (Dynamo's static graph) through the decode kernel's sizes to the Tensor Core kernel's.
DYNAMIC_BATCH_TOKENS = (1, 7, 64, 300, 5, 20, 130, 1000, 3)


def block_sparse_mlp(width: int) -> nn.Module:
    """width -> 2 width -> width with 90% of each weight's 64x64 blocks zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)).eval()
    with torch.no_grad():
        model[0].weight.copy_(block_sparse(2 * width, width, 0.1, seed=1))
        model[2].weight.copy_(block_sparse(width, 2 * width, 0.1, seed=2))
    return model


def test_dynamic_batch_runs_traceable_kernels_with_real_token_counts(fresh_dynamo):
    """A graph compiled for a dynamic batch calls the traceable (Triton) kernels through the opaque op,
    with the real token count: a launcher's tile choice by token count never becomes a guard, so no
    batch size recompiles. CPU stand-in for the CUDA launchers: a traceable kernel that picks a tile
    with int(tokens), which would pin a symbolic count to one value (one graph per batch size until
    Dynamo's recompile limit, then eager)."""
    seen = []

    def launcher(x, values, col_indices, row_offsets, out_features, in_features, *epilogue):
        tokens = x.reshape(-1, in_features).shape[0]
        seen.append(tokens)
        seen.append(1 << (int(tokens) - 1).bit_length())  # the tile, as a launcher picks it
        return reference.bsr_linear_ref(x, values, col_indices, row_offsets, out_features, in_features, *epilogue)

    ops.register_kernel("bsr_linear", "cpu", launcher, traceable=True)
    try:
        model = block_sparse_mlp(512)
        compiled = torch.compile(model, backend="sparsec")
        before = len(sparsec.backend.compiled_graphs())
        with torch.no_grad():
            for tokens in DYNAMIC_BATCH_TOKENS:
                x = torch.randn(tokens, 512)
                assert output_close(compiled(x), model(x))[0], tokens
        graphs = sparsec.backend.compiled_graphs()[before:]
        assert len(graphs) == 2 and all(g.compiles == 1 for g in graphs)  # size 1 static, then one dynamic graph
        assert all({r["kernel"] for r in g.report.layers} == {"bsr_linear[64x64]"} for g in graphs)
        assert seen and all(type(v) is int for v in seen), "a kernel saw a symbolic token count"
        assert {1000, 300, 3} <= set(seen[::2])  # the dynamic graph's calls, at their real counts
    finally:
        ops.unregister_kernel("bsr_linear", "cpu", launcher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the Triton kernels")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_dynamic_batch_on_cuda_compiles_two_graphs(fresh_dynamo, mode):
    """The same on CUDA with the real Triton kernels (run through the device tool): a 90%-block
    MLP under torch.compile at nine batch sizes, from the decode kernel's sizes to the Tensor Core
    kernel's, compiles two graphs and equals eager. The static one-token graph runs the block-sparse
    kernel; so does the dynamic one under CUDA graphs, while in the default mode its layers are too
    small to pay for the opaque op's host time per call (select_kernels.OPAQUE_HOST_S)."""
    model = block_sparse_mlp(2048).to("cuda", torch.bfloat16)
    compiled = torch.compile(model, backend="sparsec", mode=mode)
    before = len(sparsec.backend.compiled_graphs())
    with torch.no_grad():
        for tokens in DYNAMIC_BATCH_TOKENS:
            x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
            assert output_close(compiled(x), model(x))[0], tokens
    graphs = sparsec.backend.compiled_graphs()[before:]
    assert len(graphs) == 2 and all(g.compiles == 1 for g in graphs)
    sparse = ["bsr_linear[64x64]" in {r["kernel"] for r in g.report.layers} for g in graphs]
    assert sparse == ([True, True] if mode else [True, False])


def test_pdl_launch_only_for_the_streaming_kernel_under_cuda_graphs(monkeypatch):
    """A block-sparse layer goes through its opaque op (to launch with PDL) only under CUDA graphs, on
    CUDA, at token counts the streaming kernel serves: the many-token kernel stays a traced launch."""
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from sparsec.codegen.triton import pdl

    monkeypatch.setattr(pdl, "pdl_supported", lambda device: True)
    bsr = SimpleNamespace(kernel="bsr_linear", block=(64, 64))
    graphs, cuda = SimpleNamespace(cuda_graphs=True), torch.device("cuda")
    assert select_kernels._launch_with_pdl(graphs, cuda, 16, bsr)
    assert select_kernels._launch_with_pdl(graphs, cuda, 128, bsr)
    assert not select_kernels._launch_with_pdl(graphs, cuda, 256, bsr)
    assert not select_kernels._launch_with_pdl(graphs, cuda, 2048, bsr)
    assert not select_kernels._launch_with_pdl(SimpleNamespace(cuda_graphs=False), cuda, 16, bsr)
    assert not select_kernels._launch_with_pdl(graphs, torch.device("cpu"), 16, bsr)
    assert not select_kernels._launch_with_pdl(graphs, cuda, 1, SimpleNamespace(kernel="csr_linear", block=None))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch: Hopper or later")
def test_cuda_graphs_launch_decode_kernels_with_pdl(fresh_dynamo, monkeypatch):
    """Under mode="reduce-overhead" the block-sparse layers run through their opaque op, which launches
    the Triton decode kernel with programmatic dependent launch (a traced launch cannot) where the CUDA C++
    kernel does not take the call (here: no NVRTC); the replayed graph equals eager on fresh inputs."""
    from sparsec.codegen.cuda import nvrtc
    from sparsec.codegen.triton import bsr_small_m

    monkeypatch.setattr(nvrtc, "available", lambda: False)
    launches = []
    launch = bsr_small_m.launch
    monkeypatch.setattr(bsr_small_m, "launch", lambda *a, pdl=False, **k: launches.append(pdl) or launch(*a, pdl=pdl, **k))
    model = block_sparse_mlp(2048).to("cuda", torch.bfloat16)
    compiled = torch.compile(model, backend="sparsec", mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
            assert output_close(compiled(x), model(x))[0]
    assert launches and all(launches)


class GatedFFN(nn.Module):
    """gate/up linears (stacked by fuse-linears) combined in one of several ways."""

    def __init__(self, form: str, hidden=128, inner=256):
        super().__init__()
        self.form = form
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(block_sparse(inner, hidden, 0.2, seed=5))
            self.up.weight.copy_(block_sparse(inner, hidden, 0.2, seed=6))

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        if self.form == "up_times_silu_gate":
            h = u * torch.nn.functional.silu(g)
        elif self.form == "silu_of_up":  # the second half activated: not SwiGLU's layout
            h = torch.nn.functional.silu(u) * g
        elif self.form == "gate_used_again":
            h = torch.nn.functional.silu(g) * u + g
        else:  # plain
            h = torch.nn.functional.silu(g) * u
        return self.down(h) + x


@pytest.mark.parametrize("form,gated", [("plain", True), ("up_times_silu_gate", True),
                                        ("silu_of_up", False), ("gate_used_again", False)])
def test_swiglu_is_fused_only_in_its_exact_form(form, gated, gated_cpu_kernel, every_kernel_exists):
    torch.manual_seed(0)
    model = GatedFFN(form).eval()
    x = torch.randn(2, 6, 128)
    passes = "analyze,fuse-linears,select-kernels"
    rows = {r["name"]: r for r in sparsec.explain(model, x, passes=passes, verify_each=True).layers}
    assert rows["gate.weight"]["kernel"].startswith("bsr_linear")
    assert (rows["gate.weight"]["epilogue"] == "act=swiglu residual=False") == gated
    compiled = sparsec.compile(model, x, passes=passes, inductor=False)
    fresh = torch.randn(3, 5, 128)
    with torch.no_grad():
        assert output_close(compiled(fresh), model(fresh))[0]
