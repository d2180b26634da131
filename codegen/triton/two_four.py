"""2:4 linear for few tokens: the kept half of the weight streamed with 4 bits of positions per group.

A prototype, not yet measured on a GPU (`benchmarks/kernels.py --sweep-2-4-decode` times it against
cuBLAS); select-kernels does not pick it. Today a 2:4 layer runs dense at few tokens, since cuSPARSELt's 2:4 product streams
its weight at ~0.25 of the bandwidth there (codegen/cost_model.py).

Format (`pack_two_four`): per weight row, the two kept values of each group of 4 columns in column
order ([N, K/2]), and each group's two positions as one 4-bit code `p0 | p1 << 2`, two groups a byte
(the even group in the low nibble: [N, K/8] uint8). 1.125 bytes per weight element in bf16 against 2
for dense: a 1.78x floor where the weight stream is the whole cost (decode).

Each program owns ROWS output rows and streams them KC columns a step. It rebuilds the step's dense
[ROWS, KC] weight tile in registers (each group's 4 weights are its two values put at their two
positions, zeros elsewhere), so x loads stay contiguous vectors and no index chain precedes a load:
the row's values and codes sit at addresses known from the program id alone (what CSR's row offsets
cannot give). Then the tile meets x as a Tensor Core dot (USE_DOT, 16+ tokens) or as multiply-adds,
and the shared epilogue adds bias, activation and residual.
"""
import torch
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import ACT_SWIGLU, fused_epilogue
from .mma import interpreting, mma, traceable

GROUP = 4          # columns a group
KEPT = 2           # values kept a group
GROUPS_A_BYTE = 2  # 4-bit codes a metadata byte


def pack_two_four(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2], codes [N, K/8] uint8) of a 2:4 weight (at most 2 non-zeros in every group of
    4 columns); a group with fewer keeps zeros at its first free positions."""
    n, k = weight.shape
    if k % (GROUP * GROUPS_A_BYTE):
        raise ValueError(f"2:4 packing needs in_features divisible by {GROUP * GROUPS_A_BYTE}, got {k}")
    groups = weight.reshape(n, k // GROUP, GROUP)
    nonzero = groups != 0
    if (nonzero.sum(-1) > KEPT).any():
        raise ValueError("weight is not 2:4: a group of 4 columns holds more than 2 non-zeros")
    # non-zeros first, then the lowest free positions; the two kept positions in column order
    order = torch.arange(GROUP, 0, -1, device=weight.device)
    positions = (nonzero * GROUP * 2 + order).topk(KEPT, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, positions).reshape(n, k // 2)
    code = (positions[..., 0] | positions[..., 1] << 2).to(torch.uint8)
    codes = code[:, 0::2] | code[:, 1::2] << 4
    return values.contiguous(), codes.contiguous()


@triton.jit
def dense_tile(v_ptr, codes_ptr, rows, row_ok, k0, K, ROWS: tl.constexpr, KC: tl.constexpr):
    """[ROWS, KC] dense weights of columns k0..k0+KC rebuilt from their kept values and codes (the
    layout of pack_two_four: GROUP = 4 columns and KEPT = 2 values a group, 8 columns a code byte)."""
    G: tl.constexpr = KC // 4
    vi = k0 // 2 + tl.arange(0, KC // 2)
    v = tl.load(v_ptr + rows[:, None] * (K // 2) + vi[None, :], mask=row_ok[:, None] & (vi < K // 2)[None, :],
                other=0.0)
    bi = k0 // 8 + tl.arange(0, KC // 8)
    packed = tl.load(codes_ptr + rows[:, None] * (K // 8) + bi[None, :], mask=row_ok[:, None] & (bi < K // 8)[None, :],
                     other=0).to(tl.int32)
    code = tl.reshape((packed[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15, (ROWS, G))
    first, second = tl.split(tl.reshape(v, (ROWS, G, 2)))
    j = tl.arange(0, 4)[None, None, :]
    w = (tl.where((code & 3)[:, :, None] == j, first[:, :, None], 0.0)
         + tl.where((code >> 2)[:, :, None] == j, second[:, :, None], 0.0))
    return tl.reshape(w, (ROWS, KC))


@triton.jit
def two_four_kernel(x_ptr, v_ptr, codes_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_rm,
                    ROWS: tl.constexpr, KC: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
    for k0 in range(0, K, KC):
        w = dense_tile(v_ptr, codes_ptr, rows, row_ok, k0, K, ROWS, KC)
        kk = k0 + tl.arange(0, KC)
        xt = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        if USE_DOT:
            acc = mma(xt, tl.trans(w.to(xt.dtype)), acc, IEEE, UPCAST)
        else:
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    fused_epilogue(acc, m, rows, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, out_ptr,
                   HAS_BIAS, HAS_RES, False, ACT, acc)


DOT_MIN_M = 16  # Tensor Core dots need 16 rows of tokens


def launch(x2d, values, codes, out, bias=None, act_code=0, res2d=None, config=None):
    """out[M, N] = act(x2d [M, K] @ W^T + bias) + res2d for W packed by pack_two_four (the gated
    SwiGLU epilogue is not supported yet)."""
    if act_code == ACT_SWIGLU:
        raise NotImplementedError("the 2:4 kernel has no gated (SwiGLU) epilogue yet")
    M, K = x2d.shape
    N = values.shape[0]
    use_dot = M >= DOT_MIN_M
    block_m = 16 if use_dot else triton.next_power_of_2(M)
    # multiply-adds hold a [BLOCK_M, ROWS, KC] product tile: KC shrinks as the tokens grow, so it stays
    # at 2048 values (16 registers a thread at 4 warps)
    cfg = dict(ROWS=16 if use_dot else 8, KC=256 if use_dot else max(32, 256 // block_m), BLOCK_M=block_m,
               num_warps=4, num_stages=3)
    cfg.update(config or {})
    grid = (triton.cdiv(N, cfg["ROWS"]), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(two_four_kernel)[grid](x2d, values, codes, out if bias is None else bias, out if res2d is None else res2d,
                                     out, M, N, K, x2d.stride(0), out.stride(0), 0 if res2d is None else res2d.stride(0),
                                     ROWS=cfg["ROWS"], KC=cfg["KC"], BLOCK_M=cfg["BLOCK_M"], USE_DOT=use_dot,
                                     HAS_BIAS=bias is not None, HAS_RES=res2d is not None, ACT=act_code,
                                     IEEE=x2d.dtype == torch.float32, UPCAST=interpreting(),
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
