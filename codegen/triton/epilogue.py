"""Fused epilogue shared by the sparse linear kernels (a @triton.jit helper, not a kernel).

acc [BLOCK_M, BLOCK_N] fp32 holds rows `m` (tokens) and packed output features `n`.
Writes out[m, orig(n)] = act(acc + bias[orig(n)]) + residual[m, orig(n)], where
orig(n) = row_perm[n] when the weight rows were permuted: the permutation costs a
scattered store instead of an extra pass over the output.
Gated (ACT_SWIGLU): `acc` holds the gate rows and `up` the matching up rows (weight rows n + N, N
the output features): out = silu(acc + bias[n]) * (up + bias[n + N]) + residual. Other
activations ignore `up` (callers pass acc).
"""
import triton
import triton.language as tl

# ACT: the activation codes of codegen/linear_args.py, tested below by number (constexpr)


@triton.jit
def fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                   ACT: tl.constexpr, up):
    n_ok = n < N
    if HAS_RPERM:
        oc = tl.load(rperm_ptr + n, mask=n_ok, other=0)
    else:
        oc = n
    mask = (m[:, None] < M) & n_ok[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 4:
            up = up + tl.load(bias_ptr + N + oc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact (erf) gelu
    elif ACT == 3:
        acc = acc / (1.0 + tl.exp(-acc))
    elif ACT == 4:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    m64 = m.to(tl.int64)
    if HAS_RES:
        r = tl.load(res_ptr + m64[:, None] * stride_rm + oc[None, :], mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    tl.store(out_ptr + m64[:, None] * stride_om + oc[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
