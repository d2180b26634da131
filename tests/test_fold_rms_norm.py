"""fold-rms-norm: RMSNorms run inside the block-sparse linears around them.

The kernels' two new parts against a float64 reference (CPU: TRITON_INTERPRET=1; GPU:
SPARSEC_TEST_GPU=1): a consumer scales each token by rsqrt(mean square + eps) read from rms_sumsq,
a producer writes its output's sums of squares. Then the pass on LLaMA-style stacks against eager.
"""
import os

ON_GPU = os.environ.get("SPARSEC_TEST_GPU", "0") == "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

pytest.importorskip("triton")

import sparsec  # noqa: E402
from sparsec import ir, models  # noqa: E402
from sparsec.capture import capture_module  # noqa: E402
from sparsec.codegen.triton import bsr_small_m  # noqa: E402
from sparsec.codegen.triton import register as triton_kernels  # noqa: E402
from sparsec.codegen.triton.epilogue import ACT_CODES  # noqa: E402
from sparsec.pass_manager import PassContext, output_close, run_pipeline  # noqa: E402
from sparsec.runtime import ops, reference  # noqa: E402
from sparsec.runtime.formats import pack_bsr  # noqa: E402
from float64_reference import linear64  # noqa: E402
from test_fuse_linears import block_sparse_  # noqa: E402
from test_triton_kernels import DEV, check, sparse_weight  # noqa: E402

EPS = 0.25  # large enough that a kernel leaving it out fails
# token counts of the streaming kernel's paths: broadcast multiply-add, Tensor Core dots, two token tiles
TOKENS = [1, 5, 17, 70]


def launch(x, p, n_out, k, act="none", bias=None, res=None, rms_sumsq=None, group=0, cfg=None):
    """bsr_small_m on DEV with NaN-poisoned outputs: (out, sums of squares in groups of `group` or None)."""
    d = lambda t: None if t is None else t.to(DEV)
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device=DEV)
    sums = torch.full((x.shape[0], n_out // group), float("nan"), device=DEV) if group else None
    bsr_small_m.launch(d(x), d(p.values), d(p.col_indices), d(p.row_offsets), n_out, k, d(bias), ACT_CODES[act],
                       d(res), d(p.row_perm), d(p.col_perm), out, config=cfg, rms_sumsq=d(rms_sumsq), rms_eps=EPS,
                       sumsq_out=sums, sumsq_group=group)
    return out, sums


@pytest.mark.parametrize("M", TOKENS)
@pytest.mark.parametrize("columns", [1, 8, 32])
@pytest.mark.parametrize("act", ["none", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consumer_scales_each_token_before_the_bias(M, columns, act, dtype):
    """act(r * (x @ W^T) + b) + res with r = rsqrt(row sum of rms_sumsq + eps), any number of columns."""
    gen = torch.Generator().manual_seed(M + columns)
    n, k, block = 128, 96, (32, 32)
    w = sparse_weight(n, k, block, 0.5, gen, empty_rows=(1,)).to(dtype)
    p = pack_bsr(w, block)
    x = torch.randn(M, k, generator=gen).to(dtype)
    n_out = n // 2 if act == "swiglu" else n
    bias = torch.randn(n, generator=gen).to(dtype)
    res = torch.randn(M, n_out, generator=gen).to(dtype)
    rms_sumsq = torch.rand(M, columns, generator=gen) * 4 / columns
    r = torch.rsqrt(rms_sumsq.double().sum(-1, keepdim=True) + EPS)
    out, _ = launch(x, p, n_out, k, act, bias, res, rms_sumsq)
    check(out, linear64(x.double() * r, w, bias, act, res), dtype)


@pytest.mark.parametrize("M", TOKENS)
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("group", [8, 16])
def test_producer_writes_the_sums_of_squares_of_its_output(M, permuted, group):
    """Every [token, group of features] slot written (NaN-poisoned), equal to the sums of squares of
    the output as stored, over `group` packed rows (a permutation of rows keeps the row sums); the
    slabs are widened to whole groups (an 8-row slab config asked for)."""
    gen = torch.Generator().manual_seed(7 + M)
    n, k, block = 96, 64, (16, 32)
    w = sparse_weight(n, k, block, 0.4, gen, empty_rows=(2,)).to(torch.bfloat16)
    rp = torch.randperm(n, generator=gen) if permuted else None
    p = pack_bsr(w, block, row_perm=rp)
    x = torch.randn(M, k, generator=gen).to(torch.bfloat16)
    res = torch.randn(M, n, generator=gen).to(torch.bfloat16)
    out, sums = launch(x, p, n, k, res=res, group=group, cfg=dict(ROWS=8))
    check(out, linear64(x, w, None, "none", res), torch.bfloat16)
    assert torch.isfinite(sums).all(), "unwritten sums"
    stored = out.double().cpu()
    packed_order = stored if rp is None else stored[:, rp]
    expected = packed_order.square().reshape(M, n // group, group).sum(-1) / n
    torch.testing.assert_close(sums.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    # what the next norm reads: the row sums are the mean squares
    torch.testing.assert_close(sums.double().cpu().sum(-1), stored.square().mean(-1), rtol=1e-5, atol=1e-7)


def test_ops_take_the_folded_norm_on_any_kernel():
    """The public ops: a kernel without the folded norm (the C++ one on the CPU) declines and the
    reference runs; the Triton kernels (registered for the test's device) take it, and leave it to the
    reference beyond the few-token kernel (300 tokens); all agree with normalizing x first, and the
    sums op returns its output's sums."""
    gen = torch.Generator().manual_seed(5)
    w = sparse_weight(64, 64, (16, 16), 0.5, gen)
    p = pack_bsr(w, (16, 16))
    x = torch.randn(2, 150, 64, generator=gen)
    g = torch.rand(64, generator=gen) + 0.5
    mean_square = x.square().mean(-1, keepdim=True)
    normed = x * torch.rsqrt(mean_square + EPS) * g
    folded = pack_bsr(w * g, (16, 16))
    expected = normed @ w.t()
    y = ops.bsr_linear(x, folded, rms_sumsq=mean_square, rms_eps=EPS)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    added = [(op, fn) for op, fn in (("bsr_linear", triton_kernels.bsr_linear_triton),
                                     ("bsr_linear_sumsq", triton_kernels.bsr_linear_sumsq_triton))
             if fn not in ops.get_kernels(op, DEV)]  # on CUDA they are the built-in kernels
    for op, fn in added:
        ops.register_kernel(op, DEV, fn, rms=True)
    try:
        y2 = ops.bsr_linear(x.to(DEV), folded.to(DEV), rms_sumsq=mean_square.to(DEV), rms_eps=EPS)
        few = ops.bsr_linear(x[:, :3].to(DEV), folded.to(DEV), rms_sumsq=mean_square[:, :3].to(DEV), rms_eps=EPS)
        h, sums = ops.bsr_linear(x[:, :3].to(DEV), p.to(DEV), sumsq_group=16)
    finally:
        for op, fn in added:
            ops.unregister_kernel(op, DEV, fn)
    torch.testing.assert_close(y2.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few.cpu(), expected[:, :3], rtol=1e-5, atol=1e-5)
    assert sums.shape == (2, 3, 4)
    torch.testing.assert_close(sums.sum(-1).cpu(), (x[:, :3] @ w.t()).square().mean(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="rms_sumsq"):
        ops.bsr_linear(x, folded, rms_sumsq=mean_square[0], rms_eps=EPS)


# ------------------------------------------------------------------ the pass
@pytest.fixture
def rms_kernels_on_cpu():
    """The references as the CPU's kernels that take a folded norm (the pass runs where one does)."""
    ops.register_kernel("bsr_linear", "cpu", reference.bsr_linear_ref, gated=True, rms=True)
    ops.register_kernel("bsr_linear_sumsq", "cpu", reference.bsr_linear_sumsq_ref, rms=True)
    yield
    ops.unregister_kernel("bsr_linear", "cpu", reference.bsr_linear_ref)
    ops.unregister_kernel("bsr_linear_sumsq", "cpu", reference.bsr_linear_sumsq_ref)


def pruned_llama(dtype=torch.float32, layers=2, prune_o=True):
    """LLaMA-style stack, every linear 90% sparse in 64x64 blocks (o_proj dense unless prune_o), norm
    weights away from one."""
    torch.manual_seed(0)
    model = models.LlamaStack(hidden=256, heads=4, intermediate=512, layers=layers).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
            elif prune_o or "o_proj" not in name:
                block_sparse_(param, 0.1, 64)
    return model.to(dtype)


def run_passes(model, x, passes="fuse-linears,select-kernels,fold-rms-norm"):
    """The pipeline up to fold-rms-norm, choosing kernels as for CUDA (its cost model picks blocks at this
    size); the graph runs on the CPU, through the references registered by rms_kernels_on_cpu."""
    captured = capture_module(model, (x,))
    ctx = PassContext(options=sparsec.Options(passes=passes), example_inputs=captured.example_inputs,
                      device=torch.device("cuda"))
    records = run_pipeline(captured.gm, ctx)
    return captured.gm, {r.name: r.stats for r in records}, ctx


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_norms_fold_into_the_linears_around_them(rms_kernels_on_cpu, dtype):
    """Of a 2-layer stack's 5 RMSNorms, the 4 before q/k/v and gate/up fold; 3 of them take their sums
    from the o_proj / down_proj before them, the first reads the graph input (its mean stays), the
    final norm feeds the output and stays. The IR before and after, and eager on fresh inputs."""
    model = pruned_llama(dtype)
    x = torch.randn(2, 5, 256, dtype=dtype)
    before, _, _ = run_passes(model, x, passes="fuse-linears,select-kernels")
    gm, stats, ctx = run_passes(model, x)
    aten, sparsec_ops = torch.ops.aten, torch.ops.sparsec
    assert stats["fold-rms-norm"] == {"norms_folded": 4, "sums_from_producer": 3, "norms_left": 1}
    assert count(before, aten.rsqrt.default) == 5 and count(gm, aten.rsqrt.default) == 1
    assert count(before, aten.mean.dim) == 5 and count(gm, aten.mean.dim) == 2  # the input's and the final norm's
    producers = [n for n in gm.graph.nodes if n.target is sparsec_ops.bsr_linear_sumsq.default]
    # 10 tokens: the streaming kernel's Tensor Core slabs, 32 rows wide, each write one sum a token
    assert len(producers) == 3 and all(n.args[13] == 32 for n in producers)
    readers = [n for n in gm.graph.nodes if n.target is sparsec_ops.bsr_linear.default and len(n.args) > 11
               and n.args[11] is not None]
    assert len(readers) == 4 and all(n.args[12] == 1e-6 for n in readers)
    assert "rms_norm" in ctx.layer_notes["layers.1.mlp.{gate_proj,up_proj}.weight"]
    for seed in range(3):
        fresh = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.no_grad():
            ok, why = output_close(gm(fresh), model(fresh))
        assert ok, why


def test_a_norm_with_a_dense_reader_stays(rms_kernels_on_cpu):
    """o_proj dense: the norm before gate/up still folds (its sums come from the graph), but nothing
    asks the dense o_proj for sums; a norm that a dense linear also reads is left whole."""
    model = pruned_llama(layers=1, prune_o=False)
    x = torch.randn(2, 5, 256)
    gm, stats, _ = run_passes(model, x)
    assert stats["fold-rms-norm"] == {"norms_folded": 2, "sums_from_producer": 0, "norms_left": 1}
    with torch.no_grad():
        assert output_close(gm(x), model(x))[0]

    class NormReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = models.RMSNorm(256)
            self.sparse, self.dense = nn.Linear(256, 512, bias=False), nn.Linear(256, 512, bias=False)
            with torch.no_grad():
                block_sparse_(self.sparse.weight, 0.1, 64)

        def forward(self, h):
            n = self.norm(h)
            return self.sparse(n) + self.dense(n)

    model = NormReadTwice().eval()
    gm, stats, _ = run_passes(model, x, passes="select-kernels,fold-rms-norm")  # not stacked: two readers
    assert stats["fold-rms-norm"] == {"norms_folded": 0, "sums_from_producer": 0, "norms_left": 1}
    with torch.no_grad():
        assert output_close(gm(x), model(x))[0]


def test_many_tokens_are_left_alone(rms_kernels_on_cpu):
    """Past the streaming kernel's tokens (here 2 x 80) no norm folds: a folded stack ran slower there."""
    model = pruned_llama(layers=1)
    gm, stats, _ = run_passes(model, torch.randn(2, 80, 256))
    assert stats["fold-rms-norm"] == {"norms_folded": 0, "sums_from_producer": 0, "norms_left_many_tokens": 3}
    assert count(gm, torch.ops.aten.rsqrt.default) == 3


def test_without_a_kernel_for_it_the_pass_leaves_the_graph():
    """On a device whose kernels cannot take a folded norm the pass says so and changes nothing."""
    captured = capture_module(pruned_llama(layers=1), (torch.randn(1, 3, 256),))
    ctx = PassContext(options=sparsec.Options(passes="fold-rms-norm"), example_inputs=captured.example_inputs,
                      device=torch.device("meta"))
    records = run_pipeline(captured.gm, ctx)
    assert not records[0].changed and "no block-sparse kernel" in records[0].stats["skipped"]


def test_a_folded_graph_exports_and_loads(rms_kernels_on_cpu, tmp_path):
    """sparsec.export keeps the folded norms (the sums op and its getitems are stored like any op) and
    the loaded package equals eager."""
    model = pruned_llama(layers=2)
    x = torch.randn(2, 5, 256)
    report = sparsec.export(model, (x,), tmp_path / "folded.sparsec", passes="select-kernels,fold-rms-norm")
    stats = {p["name"]: p["stats"] for p in report.passes}
    assert stats["fold-rms-norm"] == {"norms_folded": 4, "sums_from_producer": 3, "norms_left": 1}
    loaded = sparsec.load(tmp_path / "folded.sparsec")
    fresh = torch.randn(2, 5, 256)
    with torch.no_grad():
        assert output_close(loaded(fresh), model(fresh))[0]
