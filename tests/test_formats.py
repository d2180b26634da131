"""Pack/unpack round trips and the pure-torch reference ops (no triton needed)."""

import pytest
import torch

from sparsec.runtime import ops, reference
from sparsec.runtime.formats import BitmapWeight, BSRWeight, pack_bitmap, pack_bsr, pack_csr
from float64_reference import linear64


def sparse_weight(n, k, block, density, gen, dtype=torch.float32, empty_rows=()):
    bh, bw = block
    w = torch.randn(n, k, generator=gen)
    nb, kb = -(-n // bh), -(-k // bw)
    keep = torch.rand(nb, kb, generator=gen) < density
    for r in empty_rows:
        keep[r] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return (w * mask).to(dtype)


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (16, 64), (32, 16)])
@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (5, 3), (130, 257)])
def test_bsr_roundtrip(block, shape):
    gen = torch.Generator().manual_seed(1)
    w = sparse_weight(*shape, block, 0.4, gen)
    p = pack_bsr(w, block)
    assert torch.equal(p.to_dense(), w)
    assert p.col_indices.dtype == torch.int32 and p.row_offsets.dtype == torch.int32
    assert p.row_offsets.numel() == -(-shape[0] // block[0]) + 1
    assert p.values.shape[1:] == block and p.nnz_blocks == p.values.shape[0]
    # ascending column indices inside each block row
    ro = p.row_offsets.tolist()
    for r in range(len(ro) - 1):
        c = p.col_indices[ro[r]:ro[r + 1]]
        assert torch.all(c[1:] > c[:-1])
    assert p.nbytes == p.values.numel() * 4 + p.col_indices.numel() * 4 + p.row_offsets.numel() * 4


def test_bsr_perm_roundtrip_and_packed_matrix():
    gen = torch.Generator().manual_seed(2)
    w = sparse_weight(50, 70, (16, 16), 0.5, gen)
    rp, cp = torch.randperm(50, generator=gen), torch.randperm(70, generator=gen)
    p = pack_bsr(w, (16, 16), row_perm=rp, col_perm=cp)
    assert torch.equal(p.to_dense(), w)
    wp = reference.bsr_dense_padded(p.values, p.col_indices, p.row_offsets, 50, 70)
    assert torch.equal(wp, w[rp][:, cp])


def test_bsr_all_zero_and_dtypes():
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        w = torch.zeros(33, 40, dtype=dt)
        p = pack_bsr(w, (16, 16))
        assert p.nnz_blocks == 0 and torch.equal(p.to_dense(), w)
        assert p.row_offsets.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("tile_rows", [1, 16, 32])
@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (3, 5), (33, 200)])
def test_bitmap_roundtrip(tile_rows, shape):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=gen)
    w[torch.rand(*shape, generator=gen) < 0.8] = 0
    w[0, -1] = 1.5  # a set top bit somewhere
    p = pack_bitmap(w, tile_rows=tile_rows)
    assert torch.equal(p.to_dense(), w)
    assert p.values.numel() == int((w != 0).sum())
    assert p.bitmap.dtype == torch.int32 and p.tile_offsets.dtype == torch.int32


def test_bitmap_perm_roundtrip():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 90, generator=gen)
    w[torch.rand(40, 90, generator=gen) < 0.7] = 0
    rp, cp = torch.randperm(40, generator=gen), torch.randperm(90, generator=gen)
    p = pack_bitmap(w, row_perm=rp, col_perm=cp)
    assert torch.equal(p.to_dense(), w)


def test_bitmap_bytes_per_element_bf16_90pct():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(512, 1024, generator=gen)
    w[torch.rand(512, 1024, generator=gen) < 0.9] = 0
    p = pack_bitmap(w.bfloat16())
    bpe = p.nbytes / w.numel()
    assert 0.30 < bpe < 0.34, bpe


def test_pack_round_trip_at_llama_shape():
    """The full-size FFN weight (vectorized packing, no per-element loop) unpacks to itself."""
    w = torch.randn(11008, 4096)
    w[torch.rand(11008, 4096) < 0.9] = 0
    w = w.bfloat16()
    assert torch.equal(pack_bsr(w, (64, 64)).to_dense(), w)
    assert torch.equal(pack_bitmap(w).to_dense(), w)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("fmt", ["bsr", "bitmap"])
def test_reference_ops(act, fmt):
    gen = torch.Generator().manual_seed(6)
    n, k = 45, 70
    w = sparse_weight(n, k, (16, 16), 0.5, gen)
    x = torch.randn(2, 3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    res = torch.randn(2, 3, n, generator=gen)
    rp, cp = torch.randperm(n, generator=gen), torch.randperm(k, generator=gen)
    p = pack_bsr(w, (16, 16), rp, cp) if fmt == "bsr" else pack_bitmap(w, 16, rp, cp)
    f = ops.bsr_linear if fmt == "bsr" else ops.bitmap_linear
    y = f(x, p, bias=bias, activation=act, residual=res)
    assert y.shape == (2, 3, n) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), linear64(x, w, bias, act, res), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bsr", "bitmap", "csr"])
def test_gated_swiglu_ops(fmt):
    """activation "swiglu": silu(gate) * up over the weight's two row halves, then the residual; the
    CPU kernels have no gated epilogue, so the op runs them plain and finishes in torch."""
    gen = torch.Generator().manual_seed(9)
    half, k = 23, 70
    w = sparse_weight(2 * half, k, (16, 16), 0.5, gen)
    x = torch.randn(2, 3, k, generator=gen)
    bias = torch.randn(2 * half, generator=gen)
    res = torch.randn(2, 3, half, generator=gen)
    packed = {"bsr": lambda: pack_bsr(w, (16, 16)), "bitmap": lambda: pack_bitmap(w, 16), "csr": lambda: pack_csr(w)}[fmt]()
    f = {"bsr": ops.bsr_linear, "bitmap": ops.bitmap_linear, "csr": ops.csr_linear}[fmt]
    y = f(x, packed, bias=bias, activation="swiglu", residual=res)
    assert y.shape == (2, 3, half)
    torch.testing.assert_close(y.double(), linear64(x, w, bias, "swiglu", res), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda t: f(t, packed, bias=bias, activation="swiglu", residual=res),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), y)


@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_bsr_linear_module(activation):
    """ops.BsrLinear: the op over a packed weight with row and column permutations, its packed tensors
    buffers (state_dict, .to() casts values only) and exportable with them as constants."""
    gen = torch.Generator().manual_seed(10)
    w = sparse_weight(32, 48, (16, 16), 0.5, gen)
    perms = {} if activation == "swiglu" else dict(row_perm=torch.randperm(32, generator=gen),
                                                   col_perm=torch.randperm(48, generator=gen))
    layer = ops.BsrLinear(pack_bsr(w, (16, 16), **perms), activation)
    x = torch.randn(2, 5, 48, generator=gen)
    torch.testing.assert_close(layer(x).double(), linear64(x, w, None, activation, None), rtol=1e-5, atol=1e-5)
    assert {"values", "col_indices", "row_offsets"} <= set(layer.state_dict())
    wide = layer.to(torch.float64)
    assert wide.values.dtype == torch.float64 and wide.col_indices.dtype == torch.int32
    ep = torch.export.export(layer, (x.double(),), strict=False)
    torch.testing.assert_close(ep.module()(x.double()), layer(x.double()))


def test_gated_op_fake_shape_and_odd_weight():
    p = pack_bsr(torch.randn(32, 16), (16, 16))
    torch.library.opcheck(torch.ops.sparsec.bsr_linear.default,
                          (torch.randn(3, 16), p.values, p.col_indices, p.row_offsets, 32, 16, None,
                           "swiglu", None, None, None))
    odd = pack_bsr(torch.randn(15, 16), (16, 16))
    with pytest.raises(ValueError, match="even number of weight rows"):
        ops.bsr_linear(torch.randn(1, 16), odd, activation="swiglu")


def test_op_fake_and_compile():
    gen = torch.Generator().manual_seed(7)
    w = sparse_weight(32, 48, (16, 16), 0.5, gen)
    p = pack_bsr(w, (16, 16))
    x = torch.randn(3, 48, generator=gen)

    def f(x):
        return ops.bsr_linear(x, p, activation="relu")

    y = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, torch.relu(x @ w.t()))
    torch.library.opcheck(torch.ops.sparsec.bsr_linear.default,
                          (x, p.values, p.col_indices, p.row_offsets, 32, 48, None, "none", None,
                           None, None))


def test_registry_dispatch_and_fallback():
    calls = []

    def k1(*args):
        calls.append("k1")
        return NotImplemented

    ops.register_kernel("bsr_linear", "cpu", k1)
    try:
        gen = torch.Generator().manual_seed(8)
        w = sparse_weight(16, 16, (16, 16), 1.0, gen)
        x = torch.randn(2, 16, generator=gen)
        y = ops.bsr_linear(x, pack_bsr(w, (16, 16)))
        assert calls == ["k1"]
        torch.testing.assert_close(y, x @ w.t())
    finally:
        ops.unregister_kernel("bsr_linear", "cpu", k1)


def test_unknown_activation():
    p = pack_bsr(torch.eye(16), (16, 16))
    with pytest.raises(ValueError):
        ops.bsr_linear(torch.randn(1, 16), p, activation="tanh")


@pytest.mark.parametrize("fmt", ["bsr", "bitmap", "csr"])
def test_to_casts_values_and_keeps_index_types(fmt):
    gen = torch.Generator().manual_seed(10)
    w = sparse_weight(48, 64, (16, 16), 0.5, gen)
    rp = torch.randperm(48, generator=gen)
    packed = {"bsr": lambda: pack_bsr(w, (16, 16), rp), "bitmap": lambda: pack_bitmap(w, 16, rp), "csr": lambda: pack_csr(w)}[fmt]()
    cast = packed.to(torch.bfloat16)
    assert type(cast) is type(packed) and cast.dtype == torch.bfloat16 and cast.shape == packed.shape
    before, after = packed._index_tensors(), cast._index_tensors()
    assert before.keys() == after.keys() and all(before[k].dtype == after[k].dtype for k in before)
    assert cast.nbytes == packed.nbytes - packed.values.numel() * 2  # fp32 -> bf16 values only
    torch.testing.assert_close(cast.to_dense().float(), w.to(torch.bfloat16).float())
