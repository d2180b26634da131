"""CUDA C++ kernels (codegen/cuda) against a float64 reference.

GPU tests: SPARSEC_TEST_GPU=1 on a CUDA machine (through the device tool); the kernels are compiled by
NVRTC there. On the CPU: the launcher's choices, the registry rule that lets a declined call reach the
traceable kernels, and, where a CUDA toolkit is installed, every template instance the launcher can pick
compiled for sm_90 by nvcc with no register spills.
"""
import contextlib
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsec.codegen.cuda import csr, nvrtc
from sparsec.codegen.cuda.register import csr_accepts
from sparsec.codegen.linear_args import ACT_CODES
from sparsec.runtime import ops
from sparsec.runtime.formats import pack_csr
from float64_reference import linear64

ON_GPU = os.environ.get("SPARSEC_TEST_GPU", "0") == "1" and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs SPARSEC_TEST_GPU=1 and a CUDA GPU")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
H100_SHARED_MEM = 227 * 1024


# ------------------------------------------------------------------ CPU: the launcher's choices
@pytest.mark.parametrize("M, K, expected", [
    (1, 4096, 1), (2, 4096, 2), (3, 4096, 4), (5, 4096, 8), (16, 4096, 8),  # 16 tokens: two tiles of 8
    (16, 11008, 8), (16, 16384, 4), (16, 65535, 1), (1, 200000, 0),
])
def test_token_tile_fits_shared_memory(M, K, expected):
    mt = csr.token_tile(M, K, H100_SHARED_MEM)
    assert mt == expected
    if mt:
        assert K * mt * nvrtc.ELEMENT_BYTES <= H100_SHARED_MEM


def test_serves_few_tokens_in_half_precision_only():
    values = torch.zeros(10, dtype=torch.bfloat16)
    cols16, cols32 = torch.zeros(10, dtype=torch.int16), torch.zeros(10, dtype=torch.int32)
    assert csr.serves(16, torch.bfloat16, values, cols16)
    assert not csr.serves(17, torch.bfloat16, values, cols16)
    assert not csr.serves(0, torch.bfloat16, values, cols16)
    assert not csr.serves(4, torch.bfloat16, values, cols32)  # K > 65536: 32-bit columns
    assert not csr.serves(4, torch.float32, values.float(), cols16)
    assert not csr.serves(4, torch.float16, values, cols16)   # values of another dtype


def test_cuda_kernel_declines_cpu_tensors_and_epilogue_operands_of_another_dtype(monkeypatch):
    w = pack_csr(torch.eye(8, dtype=torch.bfloat16))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert not csr_accepts(x, w.values, w.col_indices, w.row_offsets, 8, 8, None, "none", None)
    monkeypatch.setattr(nvrtc, "available", lambda: True)
    with FakeTensorMode():  # CUDA tensors without a GPU, as torch.compile traces them
        x, bias16, res16 = (torch.empty(*s, dtype=torch.bfloat16, device="cuda") for s in ((2, 8), (8,), (2, 8)))
        bias32, res32 = torch.empty(8, device="cuda"), torch.empty(2, 8, device="cuda")
    args = (w.values, w.col_indices, w.row_offsets, 8, 8)
    assert csr_accepts(x, *args, bias16, "none", res16)
    # a float32 residual stream or bias: the kernel reads x's 16-bit type, so the Triton kernel takes it
    assert not csr_accepts(x, *args, None, "none", res32)
    assert not csr_accepts(x, *args, bias32, "none", None)


def test_declined_opaque_kernel_lets_the_traceable_one_run():
    """_run_traceable: an opaque kernel ahead of a traceable one sends the call to the host op only
    when it would take the call (its `accepts`), and not while traced launches are preferred."""
    calls = []
    traced = lambda *args: calls.append("traced") or args[0]  # noqa: E731
    opaque = lambda *args: calls.append("opaque") or args[0]  # noqa: E731
    x = torch.empty(3, 4, device="meta")
    args = (x, None, None, None, 4, 4, None, "none", None)
    ops.register_kernel("csr_linear", "meta", traced, traceable=True)
    try:
        ops.register_kernel("csr_linear", "meta", opaque, accepts=lambda x, *rest: x.shape[0] < 2)
        assert ops._run_traceable("csr_linear", args) is x and calls == ["traced"]
        ops.register_kernel("csr_linear", "meta", opaque, accepts=lambda x, *rest: x.shape[0] < 8)
        assert ops._run_traceable("csr_linear", args) is NotImplemented and calls == ["traced"]
        with ops.traced_launches_preferred():  # code without CUDA graphs: the opaque kernel steps aside
            assert ops._run_traceable("csr_linear", args) is x and calls == ["traced", "traced"]
        assert ops._run_traceable("csr_linear", args) is NotImplemented
    finally:
        ops.unregister_kernel("csr_linear", "meta")
        ops._ACCEPTS.pop(opaque, None)


def test_nvrtc_compiles_once_a_device_and_falls_back_on_failure(monkeypatch, caplog):
    """nvrtc.kernel on a faked CUDA torch: one compile per (instance, device), since a loaded module
    belongs to one device; shared memory raised only when a launch needs more; a failed compile is said
    once in the log and gives None (the caller then runs Triton), and is not retried."""
    compiles, raised = [], []

    class Kernel:
        def set_shared_memory_config(self, nbytes):
            raised.append(nbytes)

    def compile_kernel(source, instance, compute_capability, nvcc_options):
        compiles.append((instance, compute_capability))
        if instance == "broken":
            raise RuntimeError("Kernel compilation failed")
        return Kernel()

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", compile_kernel, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(nvrtc, "_KERNELS", {})
    monkeypatch.setattr(nvrtc, "_SHARED_MEM", {})
    monkeypatch.setitem(nvrtc.stats, "failures", 0)
    first = nvrtc.kernel(csr.SOURCE, "good", torch.device("cuda"), 64 * 1024)
    assert nvrtc.kernel(csr.SOURCE, "good", torch.device("cuda:0"), 1024) is first  # the current device: 0
    assert nvrtc.kernel(csr.SOURCE, "good", torch.device("cuda:0"), 100 * 1024) is first
    assert nvrtc.kernel(csr.SOURCE, "good", torch.device("cuda:1"), 1024) is not first
    assert compiles == [("good", "90"), ("good", "90")] and raised == [64 * 1024, 100 * 1024, 1024]
    with caplog.at_level("WARNING", logger="sparsec.codegen.cuda"):
        assert nvrtc.kernel(csr.SOURCE, "broken", torch.device("cuda"), 0) is None
        assert nvrtc.kernel(csr.SOURCE, "broken", torch.device("cuda"), 0) is None
    assert compiles.count(("broken", "90")) == 1 and nvrtc.stats["failures"] == 1
    assert [r.getMessage() for r in caplog.records if "broken" in r.getMessage()][0].endswith("the Triton kernels run instead")


# ptxas may keep a word or two on the stack outside the inner loops (e.g. the CSR kernel's 4-token tile with two
# non-zeros a lane at 32 registers: a row's bounds around the row loop, 8-12 bytes; the gated 64x32 BSR instances
# with one block in flight at 48); more than this would be register pressure in the loops
SPILL_ALLOWANCE_BYTES = 16


def assert_compiles_for_sm90(tmp_path, source, instances):
    """nvcc compiles `instances` of `source` for sm_90 from the very text NVRTC gets (nvrtc.program_text: the
    shared prelude, then the kernel file), and ptxas spills at most SPILL_ALLOWANCE_BYTES in each."""
    unit = tmp_path / "instances.cu"
    unit.write_text(nvrtc.program_text(source) + "\nvoid* kernels[] = {" + ", ".join(f"(void*)&{i}" for i in instances)
                    + "};\n")
    result = subprocess.run(["nvcc", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-cubin", "-Xptxas", "-v",
                             str(unit), "-o", str(tmp_path / "instances.cubin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    assert len(entries) == len(instances), result.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == len(instances), result.stderr
    assert all(int(a) <= SPILL_ALLOWANCE_BYTES and int(b) <= SPILL_ALLOWANCE_BYTES for a, b in spills), result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs a CUDA toolkit (nvcc)")
def test_every_instance_compiles_for_sm90_without_register_pressure(tmp_path):
    instances = sorted({csr.instance(code, mt, csr.UNROLL, csr.blocks_per_sm_wanted(mt, blocks, 132),
                                     csr.nonzeros_per_lane(mt, row_length, rows), rows, csr.x_columns_per_load(mt))
                        for code in nvrtc.DTYPE_CODES.values() for mt in (1, 2, 4, 8)
                        for blocks in (100, 400) for row_length in (0, csr.LONG_ROW)
                        for rows in (1, 2)})  # every one the rules pick
    assert_compiles_for_sm90(tmp_path, csr.SOURCE, instances)


@pytest.mark.parametrize("mt, blocks_needed, rows, warps_in_grid, row_length, blocks_per_sm, rows_a_warp, nonzeros", [
    (1, 344, 11008, 8448, 410, 2, 2, 2),   # 90% 11008x4096 at one token: 264 blocks of 32 warps, 11008 rows
    (1, 128, 4096, 4096, 1100, 1, 1, 2),   # 90% 4096x11008: 128 blocks fit 132 SMs uncapped, a warp a row
    (1, 188, 6000, 6016, 410, 2, 1, 1),    # a warp a row, short rows: one non-zero a lane
    (4, 344, 11008, 8448, 410, 2, 2, 2),   # 90% 11008x4096 at 4 tokens
    (8, 688, 11008, 2112, 1100, 1, 2, 1),  # 8-token tiles (16 tokens: 66 blocks a tile): one a lane
])
def test_csr_small_m_launch_rules(mt, blocks_needed, rows, warps_in_grid, row_length, blocks_per_sm, rows_a_warp,
                                  nonzeros):
    """The H200 sweep's picks (benchmarks/RESULTS.md, twenty-third session) on 132 SMs."""
    assert csr.blocks_per_sm_wanted(mt, blocks_needed, 132) == blocks_per_sm
    assert csr.rows_per_warp(rows, warps_in_grid) == rows_a_warp
    assert csr.nonzeros_per_lane(mt, row_length, rows_a_warp) == nonzeros


# ------------------------------------------------------------------ GPU: against float64
def unstructured(N, K, density, gen, dtype):
    w = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < density)
    if N > 2:
        w[N // 2] = 0                     # an empty row
        w[1] = torch.where(w[1] == 0, 1.0, w[1])  # a full row: the longest
        w[2] = 0
        w[2, K - 1] = 1.0                 # one non-zero, in the last column
    return w.to(dtype)


def launch_poisoned(kernel, x, format_args, n_out, bias=None, act="none", res=None, x_row_stride=None, config=None):
    """kernel.launch on the GPU into a NaN-poisoned output (every element must be written); x_row_stride: x as
    a view with rows further apart than K (a slice of a wider tensor)."""
    M, K = x.shape
    xd = x.cuda()
    if x_row_stride:
        xd = torch.zeros(M, x_row_stride, dtype=x.dtype, device="cuda")[:, :K].copy_(xd)
    out = torch.full((M, n_out), float("nan"), dtype=x.dtype, device="cuda")
    d = lambda t: None if t is None else t.cuda()  # noqa: E731
    got = kernel.launch(xd, *format_args, n_out, d(bias), ACT_CODES[act], d(res), out, config=config)
    assert got is out, "the kernel declined the call"
    return out


def run(x, w, bias=None, act="none", res=None, x_row_stride=None, nonzeros=0, rows_per_warp=0):
    """The CSR kernel over w; `nonzeros` a lane and `rows_per_warp` rows a warp takes at once instead of the
    launcher's rules (0: the rule)."""
    p = pack_csr(w)
    config = dict(NZ=nonzeros, RPW=rows_per_warp)
    return launch_poisoned(csr, x, (p.values.cuda(), p.col_indices.cuda(), p.row_offsets.cuda()), w.shape[0], bias, act,
                           res, x_row_stride, config=config)


def check(out, ref, dtype):
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err < TOL[dtype], err


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("N, K, density", [(70, 100, 0.3), (300, 4096, 0.1), (33, 11008, 0.5), (5, 64, 1.0),
                                           (40, 1000, 0.0)])
def test_csr_small_m_shapes(dtype, M, N, K, density):
    gen = torch.Generator().manual_seed(N * 31 + K + M)
    w = unstructured(N, K, density, gen, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    check(run(x, w), linear64(x, w), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("M, nonzeros", [(1, 1), (1, 2), (4, 2), (16, 0)])
def test_csr_small_m_epilogue(dtype, act, M, nonzeros):
    gen = torch.Generator().manual_seed(7 + M)
    N, K = 130, 512
    w = unstructured(N, K, 0.2, gen, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    res = torch.randn(M, N, generator=gen).to(dtype)
    check(run(x, w, bias, act, res, nonzeros=nonzeros), linear64(x, w, bias, act, res), dtype)
    check(run(x, w, None, act, None, x_row_stride=K + 40, nonzeros=nonzeros), linear64(x, w, None, act, None), dtype)
    # rows 4 but not 16 bytes apart: x is staged one column at a time, or two
    check(run(x, w, None, act, None, x_row_stride=K + 2, nonzeros=nonzeros), linear64(x, w, None, act, None), dtype)


@gpu
def test_csr_small_m_many_rows_a_warp_and_wide_columns():
    """More rows than warps in the one-wave grid (each warp walks several), and 16-bit columns whose
    top bit is set (K > 32767)."""
    gen = torch.Generator().manual_seed(3)
    w = unstructured(20000, 40000, 0.002, gen, torch.bfloat16)
    for M, nonzeros, rows_per_warp in ((1, 1, 1), (1, 2, 1), (1, 0, 0), (16, 0, 1), (16, 0, 0)):
        x = torch.randn(M, 40000, generator=gen).to(torch.bfloat16)
        check(run(x, w, nonzeros=nonzeros, rows_per_warp=rows_per_warp), linear64(x, w), torch.bfloat16)


@gpu
@pytest.mark.parametrize("M, nonzeros", [(1, 1), (1, 2), (4, 2), (16, 0)])
@pytest.mark.parametrize("N, K, density", [(70, 100, 0.3), (33, 11008, 0.5), (5, 64, 1.0), (20001, 512, 0.05)])
def test_csr_small_m_two_rows_a_warp(M, nonzeros, N, K, density):
    """Half a warp a row: the two rows of a warp run side by side, one of them past the block's last row where
    the count is odd; epilogue included."""
    gen = torch.Generator().manual_seed(N + K + M)
    w = unstructured(N, K, density, gen, torch.bfloat16)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    res = torch.randn(M, N, generator=gen).to(torch.bfloat16)
    check(run(x, w, bias, "silu", res, nonzeros=nonzeros, rows_per_warp=2), linear64(x, w, bias, "silu", res),
          torch.bfloat16)


@gpu
@pytest.mark.parametrize("M", [1, 4])
def test_csr_small_m_values_not_word_aligned(M):
    """Values and columns as views that start mid-word: the two-a-lane word loads cannot be used, and
    the launcher falls back to one non-zero a lane."""
    gen = torch.Generator().manual_seed(5)
    w = unstructured(90, 300, 0.3, gen, torch.bfloat16)
    p = pack_csr(w)
    shifted = [torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].copy_(t) for t in (p.values, p.col_indices)]
    assert shifted[0].data_ptr() % 4 == 2
    x = torch.randn(M, 300, generator=gen).to(torch.bfloat16)
    out = torch.full((M, 90), float("nan"), dtype=torch.bfloat16, device="cuda")
    csr.launch(x.cuda(), *shifted, p.row_offsets.cuda(), 90, None, 0, None, out)
    check(out, linear64(x, w), torch.bfloat16)


@gpu
def test_csr_small_m_ignores_x_past_row_ends():
    """inf in x where no non-zero reads it, column 0 included (where a lane past the row's end points)."""
    w = torch.zeros(40, 64, dtype=torch.bfloat16)
    w[:, 1:9] = 1.0
    x = torch.randn(3, 64).to(torch.bfloat16)
    x[:, 0] = x[:, 9:] = float("inf")
    for nonzeros in (1, 2):
        check(run(x, w, nonzeros=nonzeros), linear64(x[:, 1:9], w[:, 1:9]), torch.bfloat16)


@gpu
def test_op_runs_the_cuda_kernel_and_compiles(monkeypatch):
    """sparsec::csr_linear at 1-16 tokens runs the NVRTC kernel, eagerly, under torch.compile and in a
    CUDA graph; at 17 tokens the Triton kernel."""
    gen = torch.Generator().manual_seed(11)
    w = unstructured(256, 1024, 0.1, gen, torch.bfloat16)
    p = pack_csr(w)
    vals, cols, offs = (t.cuda() for t in (p.values, p.col_indices, p.row_offsets))
    bias = torch.randn(256, generator=gen).to(torch.bfloat16)
    bias_gpu = bias.cuda()
    launches = []
    launch = csr.launch
    monkeypatch.setattr(csr, "launch", lambda *a, **kw: launches.append(a[0].shape[0]) or launch(*a, **kw))

    def f(x):
        return torch.ops.sparsec.csr_linear(x, vals, cols, offs, 256, 1024, bias_gpu, "gelu", None)

    for M in (4, 17):
        x = torch.randn(2, M, 1024, generator=gen).to(torch.bfloat16)
        ref = linear64(x.reshape(-1, 1024), w, bias, "gelu")
        check(f(x.cuda()).reshape(-1, 256), ref, torch.bfloat16)
        torch._dynamo.reset()
        check(torch.compile(f, fullgraph=True)(x.cuda()).reshape(-1, 256), ref, torch.bfloat16)
    assert launches == [8, 8], launches  # 2 x 4 tokens, eager and compiled; never the 34 tokens
    assert nvrtc.stats["failures"] == 0

    static_x = torch.zeros(8, 1024, dtype=torch.bfloat16, device="cuda")
    f(static_x)  # compiled and warm before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = f(static_x)
    for _ in range(2):
        fresh = torch.randn(8, 1024, generator=gen).to(torch.bfloat16)
        static_x.copy_(fresh.cuda())
        graph.replay()
        check(static_out, linear64(fresh, w, bias, "gelu"), torch.bfloat16)


def compiled_mlp_kernels(model, kernel_module, mode, tokens):
    """model (2048 -> hidden -> 2048, SiLU) compiled by sparsec: checked against float64 on three fresh inputs;
    the kernels its report names, and the token counts `kernel_module.launch` was called with."""
    import sparsec

    launches = []
    launch = kernel_module.launch
    patched = lambda *a, **kw: launches.append(a[0].shape[0]) or launch(*a, **kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_module, "launch", patched)
        compiled = torch.compile(model, backend="sparsec", mode=mode)
        before = len(sparsec.backend.compiled_graphs())
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
                hidden = linear64(x.cpu(), model[0].weight.cpu(), model[0].bias.cpu()).to(torch.bfloat16)
                ref = linear64(torch.nn.functional.silu(hidden), model[2].weight.cpu(), model[2].bias.cpu())
                check(compiled(x), ref, torch.bfloat16)
    graphs = sparsec.backend.compiled_graphs()[before:]
    return [r["kernel"] for r in graphs[0].report.layers], launches


def mlp(hidden=5632):
    return torch.nn.Sequential(torch.nn.Linear(2048, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 2048)).to(
        "cuda", torch.bfloat16).eval()


@gpu
@pytest.mark.parametrize("mode, tokens, cuda_kernel", [("reduce-overhead", 4, True), (None, 1, False)])
def test_unstructured_mlp_under_torch_compile(fresh_dynamo, mode, tokens, cuda_kernel):
    """A 90%-unstructured MLP compiled by sparsec picks CSR for both linears and equals eager on fresh
    inputs. Under CUDA graphs the CUDA C++ kernel runs (replayed); in the default mode the Triton one,
    traced into Inductor's code (the opaque kernel steps aside: its host time a call would cost more)."""
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    kernels, launches = compiled_mlp_kernels(model, csr, mode, tokens)
    assert kernels == ["csr_linear", "csr_linear"], kernels
    assert bool(launches) == cuda_kernel, launches


# ------------------------------------------------------------------ the Tensor Core block-sparse kernel (bsr_small_m.cu)
def block_sparse(N, K, block, density, gen, dtype):
    """Blocks kept with probability `density`; block row 1 empty, block row 0 full (where they exist)."""
    bh, bw = block
    keep = torch.rand(-(-N // bh), -(-K // bw), generator=gen) < density
    keep[0] = True
    if keep.shape[0] > 1:
        keep[1] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:N, :K]
    return (torch.randn(N, K, generator=gen) * mask).to(dtype)


def run_bsr_cuda(x, w, block, bias=None, act="none", res=None, config=None, x_row_stride=None, n_out=None):
    """The block-sparse kernel over w packed in `block`s; n_out: output features (half w's rows when gated)."""
    from sparsec.codegen.cuda import bsr
    from sparsec.runtime.formats import pack_bsr

    p = pack_bsr(w.cuda(), block)
    return launch_poisoned(bsr, x, (p.values, p.col_indices, p.row_offsets), n_out or w.shape[0], bias, act, res,
                           x_row_stride, config)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("block", [(64, 64), (16, 64), (32, 32), (16, 16)])
@pytest.mark.parametrize("N, K, density", [(200, 512, 0.3), (4096, 1024, 0.1), (70, 11008, 0.5), (64, 64, 1.0)])
def test_bsr_small_m_shapes(dtype, M, block, N, K, density):
    gen = torch.Generator().manual_seed(N + K + M + block[0])
    w = block_sparse(N, K, block, density, gen, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    check(run_bsr_cuda(x, w, block), linear64(x, w), dtype)
    check(run_bsr_cuda(x, w, block, config=dict(WARPS=2, UNROLL=4)), linear64(x, w), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("M", [3, 16])
def test_bsr_small_m_epilogue(dtype, act, M):
    gen = torch.Generator().manual_seed(11 + M)
    N, K = 192, 256
    w = block_sparse(N, K, (64, 64), 0.5, gen, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    res = torch.randn(M, N, generator=gen).to(dtype)
    check(run_bsr_cuda(x, w, (64, 64), bias, act, res), linear64(x, w, bias, act, res), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("block", [(64, 64), (32, 64), (16, 32)])
def test_bsr_small_m_gated_swiglu(dtype, M, block):
    """[gate; up] stacked: silu(x @ gate^T + b_gate) * (x @ up^T + b_up) + residual."""
    gen = torch.Generator().manual_seed(13 + M + block[0])
    n, K = 192, 512
    w = block_sparse(2 * n, K, block, 0.4, gen, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(2 * n, generator=gen).to(dtype)
    res = torch.randn(M, n, generator=gen).to(dtype)
    check(run_bsr_cuda(x, w, block, bias, "swiglu", res, n_out=n), linear64(x, w, bias, "swiglu", res), dtype)


@gpu
def test_bsr_small_m_strided_x_and_declines_misaligned():
    from sparsec.codegen.cuda import bsr
    from sparsec.runtime.formats import pack_bsr

    gen = torch.Generator().manual_seed(12)
    w = block_sparse(128, 256, (64, 64), 0.5, gen, torch.bfloat16)
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    check(run_bsr_cuda(x, w, (64, 64), x_row_stride=320), linear64(x, w), torch.bfloat16)
    p = pack_bsr(w.cuda(), (64, 64))
    shifted = torch.randn(4, 264, dtype=torch.bfloat16, device="cuda")[:, 1:257]   # rows 2 bytes off 16
    out = torch.empty(4, 128, dtype=torch.bfloat16, device="cuda")
    assert bsr.launch(shifted, p.values, p.col_indices, p.row_offsets, 128, None, 0, None, out) is NotImplemented


def test_bsr_small_m_serves_few_tokens_and_its_block_shapes():
    from sparsec.codegen.cuda import bsr

    values = torch.zeros(3, 64, 64, dtype=torch.bfloat16)
    assert bsr.serves(16, torch.bfloat16, values, 256, 4096, False)
    assert bsr.serves(16, torch.bfloat16, values, 256, 4096, True)
    assert not bsr.serves(17, torch.bfloat16, values, 256, 4096, False)
    assert not bsr.serves(4, torch.bfloat16, values, 256, 4000, False)              # K not a multiple of BW
    assert not bsr.serves(4, torch.float16, values, 256, 4096, False)               # values of another dtype
    assert not bsr.serves(4, torch.bfloat16, values, 160, 4096, True)               # the gate not whole block rows
    assert not bsr.serves(4, torch.bfloat16, torch.zeros(3, 8, 64, dtype=torch.bfloat16), 256, 4096, False)   # BH 8
    assert not bsr.serves(4, torch.bfloat16, torch.zeros(3, 64, 128, dtype=torch.bfloat16), 256, 4096, False)  # BW 128


@pytest.mark.parametrize("slices, blocks_per_row, token_tiles, warps, unroll", [
    (688, 6.4, 1, 4, 1), (256, 17.2, 1, 8, 1), (688, 32.0, 1, 4, 2), (688, 32.0, 2, 4, 1), (256, 86.0, 1, 8, 2),
    (64, 3.0, 1, 8, 1), (5000, 50.0, 1, 2, 2)])
def test_bsr_small_m_launch_rules(slices, blocks_per_row, token_tiles, warps, unroll):
    """The H200 sweep's best configs: 4 warps for 11008 rows, 8 for 4096; two blocks in flight from 4 a
    warp at up to 8 tokens, one at 9-16."""
    from sparsec.codegen.cuda import bsr

    assert bsr.warps_for(slices) == warps
    assert bsr.unroll_for(blocks_per_row, warps, token_tiles) == unroll


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs a CUDA toolkit (nvcc)")
def test_bsr_small_m_compiles_for_sm90_without_register_pressure(tmp_path):
    from sparsec.codegen.cuda import bsr

    instances = [bsr.instance(code, bw, warps, tiles, unroll, gated) for code in nvrtc.DTYPE_CODES.values()
                 for bw in bsr.BLOCK_WIDTHS for warps in (2, 8) for tiles in (1, 2) for unroll in (1, 2)
                 for gated in (False, True)]
    assert_compiles_for_sm90(tmp_path, bsr.SOURCE, instances)


def test_bsr_cuda_kernel_accepts_unpermuted_few_token_calls(monkeypatch):
    from sparsec.codegen.cuda.register import bsr_accepts
    from sparsec.runtime.formats import pack_bsr

    p = pack_bsr(torch.ones(256, 128, dtype=torch.bfloat16), (64, 64))
    args = (p.values, p.col_indices, p.row_offsets, 256, 128)
    monkeypatch.setattr(nvrtc, "available", lambda: True)
    with FakeTensorMode():  # CUDA tensors without a GPU, as torch.compile traces them
        x4, x17 = (torch.empty(m, 128, dtype=torch.bfloat16, device="cuda") for m in (4, 17))
        res16, res32 = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda"), torch.empty(4, 256, device="cuda")
        perm = torch.arange(256, device="cuda")
    assert bsr_accepts(x4, *args, None, "gelu", res16, None, None)
    assert bsr_accepts(x4, *args, None, "swiglu", None, None, None)       # gate = block rows 0-1 of 4
    assert not bsr_accepts(x17, *args, None, "none", None, None, None)    # 17 tokens: the Triton kernels
    assert not bsr_accepts(x4, *args, None, "none", res32, None, None)    # a float32 residual stream
    assert not bsr_accepts(x4, *args, None, "none", None, perm, None)     # block-reorder's permuted pack


@gpu
def test_bsr_op_runs_the_cuda_kernel_and_compiles(monkeypatch):
    """sparsec::bsr_linear at 1-16 tokens runs the NVRTC kernel (plain and gated), eagerly, under
    torch.compile and in a CUDA graph; at 17 tokens the Triton kernel."""
    from sparsec.codegen.cuda import bsr
    from sparsec.runtime.formats import pack_bsr

    gen = torch.Generator().manual_seed(14)
    w = block_sparse(512, 1024, (64, 64), 0.2, gen, torch.bfloat16)
    p = pack_bsr(w.cuda(), (64, 64))
    bias = torch.randn(512, generator=gen).to(torch.bfloat16)
    bias_gpu = bias.cuda()
    launches = []
    launch = bsr.launch
    monkeypatch.setattr(bsr, "launch", lambda *a, **kw: launches.append((a[0].shape[0], a[6])) or launch(*a, **kw))

    def f(x, act):
        return torch.ops.sparsec.bsr_linear(x, p.values, p.col_indices, p.row_offsets, 512, 1024, bias_gpu, act,
                                            None, None, None)

    for act in ("silu", "swiglu"):
        for M in (4, 17):
            x = torch.randn(2, M, 1024, generator=gen).to(torch.bfloat16)
            ref = linear64(x.reshape(-1, 1024), w, bias, act)
            width = ref.shape[-1]
            check(f(x.cuda(), act).reshape(-1, width), ref, torch.bfloat16)
            torch._dynamo.reset()
            check(torch.compile(f, fullgraph=True)(x.cuda(), act).reshape(-1, width), ref, torch.bfloat16)
    assert launches == [(8, 3), (8, 3), (8, 4), (8, 4)], launches  # eager and compiled, never 34 tokens
    assert nvrtc.stats["failures"] == 0

    static_x = torch.zeros(8, 1024, dtype=torch.bfloat16, device="cuda")
    f(static_x, "swiglu")  # compiled and warm before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = f(static_x, "swiglu")
    for _ in range(2):
        fresh = torch.randn(8, 1024, generator=gen).to(torch.bfloat16)
        static_x.copy_(fresh.cuda())
        graph.replay()
        check(static_out, linear64(fresh, w, bias, "swiglu"), torch.bfloat16)


@gpu
@pytest.mark.parametrize("mode, tokens, cuda_kernel", [("reduce-overhead", 4, True), (None, 1, False)])
def test_block_sparse_mlp_under_torch_compile(fresh_dynamo, mode, tokens, cuda_kernel):
    """A 64x64-block-pruned (90%) MLP compiled by sparsec picks BSR for both linears (channel-slice first
    drops the hidden channels whose blocks were all pruned) and equals eager on fresh inputs. Under CUDA
    graphs the CUDA C++ kernel runs; in the default mode the traced Triton one."""
    from sparsec.codegen.cuda import bsr

    torch.manual_seed(0)
    model = mlp()
    gen = torch.Generator().manual_seed(15)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            n, k = layer.weight.shape
            keep = (torch.rand(n // 64, k // 64, generator=gen) < 0.1).repeat_interleave(64, 0).repeat_interleave(64, 1)
            layer.weight.mul_(keep.to("cuda"))
    kernels, launches = compiled_mlp_kernels(model, bsr, mode, tokens)
    assert len(kernels) == 2 and all(k.startswith("bsr_linear") for k in kernels), kernels
    assert bool(launches) == cuda_kernel, launches


def test_epilogue_args_pass_out_for_a_missing_bias_or_residual():
    """Both kernels' argument tail: bias, residual, its row stride, out, its row stride; and the flags."""
    out, bias, res = torch.empty(4, 6), torch.empty(6), torch.empty(4, 10)[:, :6]
    args, flags = nvrtc.epilogue_args(None, None, out)
    assert [a is out for a in args[:2]] == [True, True] and args[2:] == [0, out, 6] and flags == 0
    args, flags = nvrtc.epilogue_args(bias, res, out)
    assert args[0] is bias and args[1] is res and args[2:] == [10, out, 6]
    assert flags == nvrtc.HAS_BIAS | nvrtc.HAS_RES == 3


# ------------------------------------------------------------------ programmatic dependent launch of the NVRTC kernels
def test_launch_passes_through_without_pdl():
    calls = []
    nvrtc.launch(lambda **kw: calls.append(kw), (3, 1, 1), (64, 1, 1), [7], shared_mem=128)
    assert calls == [dict(grid=(3, 1, 1), block=(64, 1, 1), args=[7], shared_mem=128)]


@pytest.fixture
def driver_looked_up_anew():
    """nvrtc keeps the driver's launch call once found; these tests give it a driver of their own."""
    nvrtc._driver_launch_kernel_ex.cache_clear()
    yield
    nvrtc._driver_launch_kernel_ex.cache_clear()


def test_pdl_launch_builds_the_driver_call(monkeypatch, driver_looked_up_anew):
    """cuLaunchKernelEx gets CUDA's CUlaunchConfig layout, one programmatic-stream-serialization attribute
    and a pointer to each argument (tensors as data pointers, ints as C ints), on the current stream."""
    import ctypes

    seen = {}

    class FakeDriver:
        @staticmethod
        def cuLaunchKernelEx(config_ref, func, params, extra):
            config = ctypes.cast(config_ref, ctypes.POINTER(nvrtc.LaunchConfig)).contents
            seen.update(grid=(config.gridDimX, config.gridDimY, config.gridDimZ),
                        block=(config.blockDimX, config.blockDimY, config.blockDimZ), shared=config.sharedMemBytes,
                        stream=config.hStream, attrs=[(config.attrs[i].id, config.attrs[i].value)
                                                      for i in range(config.numAttrs)], func=func, extra=extra,
                        pointer=ctypes.cast(params[0], ctypes.POINTER(ctypes.c_void_p)).contents.value,
                        number=ctypes.cast(params[1], ctypes.POINTER(ctypes.c_int)).contents.value)
            return 0

    class FakeStream:
        _as_parameter_ = ctypes.c_void_p(4242)

    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_runtime_library", lambda: FakeDriver)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    compiled = type("Compiled", (), {"func": 99})()
    x = torch.zeros(4)
    nvrtc.launch(compiled, (5, 2, 1), (128, 1, 1), [x, -3], shared_mem=1024, pdl=True)
    assert seen == dict(grid=(5, 2, 1), block=(128, 1, 1), shared=1024, stream=4242,
                        attrs=[(nvrtc.PROGRAMMATIC_STREAM_SERIALIZATION, 1)], func=99, extra=None,
                        pointer=x.data_ptr(), number=-3)
    assert ctypes.sizeof(nvrtc.LaunchAttribute) == 72 and ctypes.sizeof(nvrtc.LaunchConfig) == 56


def test_pdl_launch_falls_back_where_the_driver_call_is_missing(monkeypatch, driver_looked_up_anew):
    """A torch or a driver without cuLaunchKernelEx: the kernel launches without PDL (its waits are no-ops)."""
    calls = []
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_runtime_library", lambda: object())
    compiled = type("Compiled", (), {"func": 99, "__call__": lambda self, **kw: calls.append(kw)})()
    nvrtc.launch(compiled, (3, 1, 1), (64, 1, 1), [7], shared_mem=128, pdl=True)
    assert calls == [dict(grid=(3, 1, 1), block=(64, 1, 1), args=[7], shared_mem=128)]


@gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] < 9, reason="PDL: Hopper or later")
@pytest.mark.parametrize("kind", ["bsr", "csr"])
def test_cuda_kernel_with_pdl_in_a_chain_of_dependent_launches(monkeypatch, kind):
    """Each layer reads the output of the kernel just ahead of it, launched with PDL: in a CUDA graph
    replayed many times, every layer's output equals the float64 chain (a kernel that read x before its
    producer finished would show here)."""
    from sparsec.codegen.cuda import bsr
    from sparsec.runtime.formats import pack_bsr

    kernel, pack, linear = {"bsr": (bsr, lambda w: pack_bsr(w, (64, 64)), ops.bsr_linear),
                            "csr": (csr, pack_csr, ops.csr_linear)}[kind]
    pdl_flags = []
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda *a, **kw: pdl_flags.append(kw.get("pdl")) or launch(*a, **kw))
    gen = torch.Generator().manual_seed(16)
    weights = [block_sparse(1024, 1024, (64, 64), 0.3, gen, torch.bfloat16) / 8 for _ in range(6)]
    packs = [pack(w).to("cuda") for w in weights]

    def chain(x):
        for p in packs:
            x = linear(x, p, None, "relu", x)
        return x

    static_x = torch.zeros(4, 1024, dtype=torch.bfloat16, device="cuda")
    chain(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    assert pdl_flags and all(pdl_flags), pdl_flags
    for _ in range(20):
        fresh = torch.randn(4, 1024, generator=gen).to(torch.bfloat16)
        static_x.copy_(fresh.cuda())
        graph.replay()
        ref = fresh
        for w in weights:
            ref = linear64(ref, w, None, "relu", ref).to(torch.bfloat16)
        check(static_out, ref.double(), torch.bfloat16)
