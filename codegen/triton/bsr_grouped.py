"""Block-sparse linear for many tokens, GROUP block rows per program sharing each x tile.

Why: bsr_large_m gives each program one 64-row block row, so every x tile it gathers feeds only
64 output features. At 50% block density that re-reads x from L2 half as often per flop as a
dense 128x256 cuBLAS tile and the kernel is bound by L2 traffic, not Tensor Cores. Here a program
owns GROUP block rows: it walks the union of their non-zero column blocks, loads each x tile
once, and multiplies it into the accumulator of every member that has that block (the others skip
the dot). At 50% density with GROUP 4 the union is ~94% of the columns, so x is read ~2.1x less.

Layout (`block_row_groups`, built on the device from the BSR arrays, fixed shapes, no host sync):
per group, the union's column blocks in order (`union_cols`, padded to K/BW), their count, and per
union entry and member the index of that member's block in `values` or -1 (`union_slots`).
Gated (SwiGLU): a group is GROUP/2 gate block rows and their up rows, so the epilogue pairs them.
"""
import torch
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import ACT_SWIGLU, fused_epilogue
from .bsr_large_m import m_bucket
from .mma import interpreting, mma, traceable

GROUP = 4   # block rows per program (2 or 4)
# (BLOCK_M, num_warps, num_stages): GROUP fp32 accumulators of BLOCK_M x BH live in registers
GROUPED_CONFIGS = [
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=4),
]


def group_rows(n_block_rows, gated_rows, group):
    """[groups, group] block rows of each program's members. Not gated: consecutive block rows.
    Gated (`gated_rows` gate block rows, up rows below them): group/2 gate rows, then their up rows.
    Members past the weight are n_block_rows (an empty row)."""
    if gated_rows:
        half = group // 2
        gate = torch.arange(triton.cdiv(gated_rows, half) * half).view(-1, half)
        rows = torch.cat([gate, gate + gated_rows], 1)
        rows[gate.repeat(1, 2) >= gated_rows] = n_block_rows
        return rows
    rows = torch.arange(triton.cdiv(n_block_rows, group) * group).view(-1, group)
    return rows.clamp(max=n_block_rows)


def block_row_groups(col_indices, row_offsets, nnz_blocks, k_blocks, rows):
    """(union_cols [groups, k_blocks], union_count [groups], union_slots [groups, k_blocks, group]),
    int32, on the device of the BSR arrays; `rows` from group_rows."""
    dev = col_indices.device
    n_block_rows = row_offsets.numel() - 1
    slot = torch.arange(nnz_blocks, device=dev, dtype=torch.int32)
    block_row = torch.searchsorted(row_offsets.long(), slot.long(), right=True) - 1
    table = torch.full((n_block_rows + 1, k_blocks), -1, device=dev, dtype=torch.int32)  # + an empty row
    table[block_row, col_indices.long()] = slot
    members = table[rows.to(dev)]                      # [groups, group, k_blocks]
    present = (members >= 0).any(1)                    # [groups, k_blocks]
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)  # present first, in column order
    slots = members.gather(2, order[:, None, :].expand_as(members)).transpose(1, 2).contiguous()
    return order.to(torch.int32).contiguous(), present.sum(1).to(torch.int32), slots


@triton.jit
def member_dot(acc, xt, v_ptr, slot, w_offsets, BLOCK_SIZE: tl.constexpr, HOISTED: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt @ block `slot` of values (w_offsets: a block transposed, [BW, BH]); none when slot < 0.
    HOISTED: the weight load sits outside the branch (masked: no traffic when absent), so the
    pipeliner can issue it ahead; else the load and the dot are both inside."""
    if HOISTED:
        wt = tl.load(v_ptr + tl.maximum(slot, 0) * BLOCK_SIZE + w_offsets, mask=w_offsets * 0 + slot >= 0, other=0.0)
        if slot >= 0:
            acc = mma(xt, wt, acc, IEEE, UPCAST)
    else:
        if slot >= 0:
            wt = tl.load(v_ptr + slot * BLOCK_SIZE + w_offsets)
            acc = mma(xt, wt, acc, IEEE, UPCAST)
    return acc


@triton.jit
def bsr_grouped_kernel(x_ptr, v_ptr, ucols_ptr, ucount_ptr, uslots_ptr, bias_ptr, res_ptr, rperm_ptr,
                       cperm_ptr, out_ptr, M, N, K, K_BLOCKS, M_BUCKET, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, GROUP_: tl.constexpr, HOISTED: tl.constexpr,
                       BLOCK_M: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share the same weight blocks
    g = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    cc = tl.arange(0, BW)
    w_offsets = tl.arange(0, BH)[None, :] * BW + cc[:, None]  # a block transposed: [BW, BH]
    acc0 = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    count = tl.load(ucount_ptr + g)
    for u in range(0, count):
        entry = g * K_BLOCKS + u
        kcol = tl.load(ucols_ptr + entry) * BW + cc
        k_ok = kcol < K
        if HAS_CPERM:  # prologue gather of permuted input columns
            kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
        xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        slots = uslots_ptr + entry * GROUP_
        acc0 = member_dot(acc0, xt, v_ptr, tl.load(slots), w_offsets, BH * BW, HOISTED, IEEE, UPCAST)
        acc1 = member_dot(acc1, xt, v_ptr, tl.load(slots + 1), w_offsets, BH * BW, HOISTED, IEEE, UPCAST)
        if GROUP_ == 4:
            acc2 = member_dot(acc2, xt, v_ptr, tl.load(slots + 2), w_offsets, BH * BW, HOISTED, IEEE, UPCAST)
            acc3 = member_dot(acc3, xt, v_ptr, tl.load(slots + 3), w_offsets, BH * BW, HOISTED, IEEE, UPCAST)
    rows = tl.arange(0, BH)
    if ACT == 4:  # ACT_SWIGLU: members are GROUP_/2 gate block rows, then their up rows
        if GROUP_ == 4:
            fused_epilogue(acc0, m, 2 * g * BH + rows, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                           rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc2)
            fused_epilogue(acc1, m, (2 * g + 1) * BH + rows, M, N, out_ptr, stride_om, bias_ptr, res_ptr,
                           stride_rm, rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc3)
        else:
            fused_epilogue(acc0, m, g * BH + rows, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                           rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc1)
    else:
        first = g * GROUP_ * BH + rows
        fused_epilogue(acc0, m, first, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                       HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc0)
        fused_epilogue(acc1, m, first + BH, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                       HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc1)
        if GROUP_ == 4:
            fused_epilogue(acc2, m, first + 2 * BH, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                           rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc2)
            fused_epilogue(acc3, m, first + 3 * BH, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                           rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc3)


_autotuned = None


def launch(x2d, values, col_indices, row_offsets, N, K, bias, act_code, res2d, row_perm,
           col_perm, out, config=None, groups=None):
    """As bsr_large_m.launch; `groups` (block_row_groups' tensors for this weight and config's GROUP)
    is built here when not given. No host syncs."""
    global _autotuned
    M = x2d.shape[0]
    nnz_blocks, BH, BW = values.shape
    group = (config or {}).get("GROUP", GROUP)
    gated = act_code == ACT_SWIGLU
    n_block_rows = row_offsets.shape[0] - 1
    k_blocks = triton.cdiv(K, BW)
    if groups is None:
        rows = group_rows(n_block_rows, N // BH if gated else 0, group)
        groups = block_row_groups(col_indices, row_offsets, nnz_blocks, k_blocks, rows)
    union_cols, union_count, union_slots = groups
    dummy = out
    args = (x2d, values, union_cols, union_count, union_slots,
            dummy if bias is None else bias, dummy if res2d is None else res2d,
            dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
            out, M, N, K, k_blocks, m_bucket(M), x2d.stride(0), out.stride(0),
            0 if res2d is None else res2d.stride(0))
    kw = dict(BH=BH, BW=BW, GROUP_=group, HOISTED=(config or {}).get("HOISTED", False), HAS_BIAS=bias is not None, HAS_RES=res2d is not None,
              HAS_RPERM=row_perm is not None, HAS_CPERM=col_perm is not None, ACT=act_code,
              IEEE=x2d.dtype == values.dtype and x2d.dtype.itemsize == 4, UPCAST=interpreting())
    n_groups = union_count.shape[0]
    if config is None and interpreting():  # no autotuning without a GPU
        config = dict(BLOCK_M=64, num_warps=4, num_stages=2)
    if config is not None and "BLOCK_M" in config:  # explicit config (tests / benchmarks)
        grid = (triton.cdiv(M, config["BLOCK_M"]), n_groups)
        traceable(bsr_grouped_kernel)[grid](*args, **kw, BLOCK_M=config["BLOCK_M"],
                                            num_warps=config.get("num_warps", 4),
                                            num_stages=config.get("num_stages", 3))
        return out
    if _autotuned is None:
        _autotuned = triton.autotune(GROUPED_CONFIGS, key=["M_BUCKET", "N", "K", "BH", "BW", "GROUP_", "ACT"])(
            bsr_grouped_kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_groups)
    traceable(_autotuned)[grid](*args, **kw)
    return out

