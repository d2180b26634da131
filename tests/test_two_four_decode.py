"""The 2:4 few-token kernel (codegen/triton/two_four.py, a prototype not yet chosen by select-kernels)
against a float64 reference, and its packing. CPU: TRITON_INTERPRET=1; GPU: SPARSEC_TEST_GPU=1."""
import os

ON_GPU = os.environ.get("SPARSEC_TEST_GPU", "0") == "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sparsec.codegen.triton import two_four  # noqa: E402
from sparsec.codegen.triton.epilogue import ACT_CODES  # noqa: E402
from float64_reference import linear64  # noqa: E402
from test_triton_kernels import DEV, check  # noqa: E402


def two_four_weight(n, k, gen, fewer_kept=False):
    """Random 2:4 weight; `fewer_kept`: some groups keep one value or none (a pruned 2:4 checkpoint
    may have zeros among its kept values)."""
    w = torch.randn(n, k, generator=gen)
    groups = w.reshape(n, k // 4, 4)
    drop = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
    groups.scatter_(-1, drop, 0.0)
    if fewer_kept:
        groups[::3, ::2] = 0.0
        groups[1::3, 1::2, 0] = 0.0
    return w


@pytest.mark.parametrize("fewer_kept", [False, True])
def test_packing_round_trips(fewer_kept):
    gen = torch.Generator().manual_seed(3)
    w = two_four_weight(12, 64, gen, fewer_kept)
    values, codes = two_four.pack_two_four(w)
    assert values.shape == (12, 32) and codes.shape == (12, 8) and codes.dtype == torch.uint8
    code = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(12, 16).long()
    positions = torch.stack([code & 3, code >> 2], dim=-1)
    assert (positions[..., 0] < positions[..., 1]).all()  # two distinct positions, in column order
    rebuilt = torch.zeros(12, 16, 4).scatter(-1, positions, values.reshape(12, 16, 2)).reshape(12, 64)
    assert torch.equal(rebuilt, w)


def test_packing_rejects_a_weight_that_is_not_2_4():
    w = torch.ones(4, 16)
    with pytest.raises(ValueError, match="not 2:4"):
        two_four.pack_two_four(w)
    with pytest.raises(ValueError, match="divisible by 8"):
        two_four.pack_two_four(torch.zeros(4, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,config", [(1, None), (3, None), (3, dict(KC=64, ROWS=4)), (9, None), (16, None), (37, None)])
@pytest.mark.parametrize("shape", [(40, 256), (16, 200)])
def test_two_four_kernel_matches_float64(shape, M, config, dtype):
    """Ragged rows (40 is not a multiple of 16), ragged columns (200 is not a multiple of KC), groups
    keeping fewer than 2 values, several token tiles (37 tokens); NaN-poisoned output."""
    n, k = shape
    gen = torch.Generator().manual_seed(n + k + M)
    w = two_four_weight(n, k, gen, fewer_kept=True).to(dtype)
    x = torch.randn(M, k, generator=gen).to(dtype)
    values, codes = two_four.pack_two_four(w)
    out = torch.full((M, n), float("nan"), dtype=dtype, device=DEV)
    two_four.launch(x.to(DEV), values.to(DEV), codes.to(DEV), out, config=config)
    check(out, linear64(x, w, None, "none", None), dtype)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("M", [1, 16])
def test_two_four_epilogue(act, M):
    """Bias, activation and residual in the epilogue, at one token (multiply-adds) and 16 (dots)."""
    gen = torch.Generator().manual_seed(M)
    n, k = 24, 64
    w = two_four_weight(n, k, gen)
    x = torch.randn(M, k, generator=gen)
    b, r = torch.randn(n, generator=gen), torch.randn(M, n, generator=gen)
    values, codes = two_four.pack_two_four(w)
    out = torch.full((M, n), float("nan"), device=DEV)
    d = lambda t: t.to(DEV)  # noqa: E731
    two_four.launch(d(x), d(values), d(codes), out, bias=d(b), act_code=ACT_CODES[act], res2d=d(r))
    check(out, linear64(x, w, b, act, r), torch.float32)


def test_two_four_has_no_gated_epilogue_yet():
    with pytest.raises(NotImplementedError, match="gated"):
        two_four.launch(torch.zeros(1, 8), torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.uint8),
                        torch.zeros(1, 1), act_code=ACT_CODES["swiglu"])
