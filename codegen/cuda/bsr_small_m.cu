// Block-sparse linear at 1-16 tokens on Tensor Cores: out[M, N] = epilogue(x @ W^T), W in BSR blocks of
// BH x BW (BH a multiple of 16; BW 16, 32 or 64).
//
// Compiled at run time by NVRTC (codegen/cuda/nvrtc.py) after linear_prelude.cuh (types, conversions,
// activations; swiglu is the GATED instances).
//
// The weight's blocks are dense, so this is a stream of small dense products; what matters is to keep
// DRAM busy. The mma computes out^T = W x^T: A = 16 rows x 16 columns of a block, B = x^T (16 columns x 8
// tokens), C = 16 rows x 8 tokens. Why this shape:
//   1. no shared memory: lane 4g + q loads its A values straight into registers as rows g and g + 8 of the
//      block's 16-row slice, columns [q * BW / 4, (q + 1) * BW / 4): BW / 2 contiguous bytes a row (16-byte
//      loads, each 128-byte block row read whole by 4 lanes). The mma's column order inside the block is
//      ours to choose as long as x uses the same: step s takes each lane's columns 4s .. 4s + 3 of its run,
//      as the operand's columns (2q, 2q + 1) and (2q + 8, 2q + 9); lane 4g + q loads token g's x over the
//      same run, so each B word is the x pair of the A word beside it;
//   2. one thread block owns one 16-row slice of a block row; its WARPS warps take the block row's
//      non-zero blocks in turn (block start + warp, + WARPS, ...) and UNROLL blocks at a time, every load
//      issued before the first mma, so UNROLL blocks of each warp are in flight at once;
//   3. the warps' fp32 tiles meet in shared memory and the first warp runs the epilogue (bias,
//      activation, residual) and writes the 16 x M outputs;
//   4. GATED (a SwiGLU FFN's stacked [gate; up] weight): the thread block takes the same 16 rows of the
//      gate's block row and of the up's (N / BH block rows further) and writes silu(gate) * up;
//   5. launched with programmatic dependent launch (codegen/cuda/nvrtc.py launch, Hopper), a thread block
//      may start while the kernel ahead of it still runs: it loads its weights (constants) first and waits
//      for that kernel (griddepcontrol.wait) before its first read of x, the residual or the output
//      buffer; it lets the next kernel start once its loads are done. Without PDL both are no-ops.

#define SLICE_ROWS 16   // rows of a thread block: the mma's M
#define MMA_K 16        // columns of one mma step

// d += a (16 x 16, row-major) x b (16 x 8, column-major), fp32 accumulators
template <int DT> __device__ __forceinline__ void mma_16x8x16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (DT == 0)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A lane's run of BW / 4 columns of one row: BW / 8 words (two 16-bit values each)
template <int BW> struct Run { u32 w[BW / 8]; };

template <int BW> __device__ __forceinline__ Run<BW> load_run(const u16* p) {
    Run<BW> r;
    if (BW >= 32) {
#pragma unroll
        for (int i = 0; i < BW / 32; ++i) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
            r.w[4 * i] = v.x, r.w[4 * i + 1] = v.y, r.w[4 * i + 2] = v.z, r.w[4 * i + 3] = v.w;
        }
    } else {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        r.w[0] = v.x, r.w[1] = v.y;
    }
    return r;
}

template <int BW> __device__ __forceinline__ Run<BW> zero_run() {
    Run<BW> r;
#pragma unroll
    for (int i = 0; i < BW / 8; ++i) r.w[i] = 0u;
    return r;
}

// x's rows of this lane's tokens (g and g + 8) at its first column; nullptr past M
template <int NT> struct TokenRows { const u16* row[NT]; };

// acc += this lane's part of a 16-row slice (rows row_lo / BW and + 8 of each block) times x^T over the
// non-zero blocks [start, end) that fall to this warp: start + warp, + WARPS, ..., UNROLL at a time
template <int DT, int BW, int WARPS, int NT, int UNROLL>
__device__ __forceinline__ void accumulate_slice(float (&acc)[NT][4], const u16* __restrict__ values,
                                                 const int* __restrict__ col_indices, int start, int end, int BH,
                                                 long long row_lo, TokenRows<NT> x_token, int warp) {
    const long long row_hi = row_lo + 8 * BW;
    for (int b0 = start + warp; b0 < end; b0 += UNROLL * WARPS) {
        Run<BW> lo[UNROLL], hi[UNROLL], xs[UNROLL][NT];
        int col[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {  // the weights: constants, loaded before any wait
            const int b = b0 + u * WARPS;
            const u16* block = values + (long long)b * BH * BW;
            lo[u] = b < end ? load_run<BW>(block + row_lo) : zero_run<BW>();
            hi[u] = b < end ? load_run<BW>(block + row_hi) : zero_run<BW>();
            col[u] = b < end ? col_indices[b] * BW : -1;
        }
        wait_for_producer();  // x is the output of a kernel ahead (a no-op once it has finished)
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                xs[u][nt] = x_token.row[nt] && col[u] >= 0 ? load_run<BW>(x_token.row[nt] + col[u]) : zero_run<BW>();
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int s = 0; s < BW / MMA_K; ++s)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma_16x8x16<DT>(acc[nt], lo[u].w[2 * s], hi[u].w[2 * s], lo[u].w[2 * s + 1], hi[u].w[2 * s + 1],
                                    xs[u][nt].w[2 * s], xs[u][nt].w[2 * s + 1]);
    }
}

// NT: token tiles of 8 (1 for 1-8 tokens, 2 for 9-16). N: output features (half the weight's rows when
// GATED).
template <int DT, int BW, int WARPS, int NT, int UNROLL, bool GATED>
__global__ void __launch_bounds__(WARPS * WARP)
bsr_small_m(const u16* __restrict__ x, int ldx,                                   // x [M, K], rows ldx apart
            const u16* __restrict__ values, const int* __restrict__ col_indices,  // BSR: [nnz_blocks, BH, BW]
            const int* __restrict__ row_offsets, int BH,
            const u16* __restrict__ bias, const u16* __restrict__ res, int ldr,
            u16* __restrict__ out, int ldo, int M, int N, int act, int flags) {
    constexpr int HALVES = GATED ? 2 : 1;  // gate and up
    __shared__ float partial[WARPS][HALVES * NT * 4][WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int g = lane / 4, q = lane % 4;
    const int slice = blockIdx.x, slices_per_block_row = BH / SLICE_ROWS;
    const int block_row = slice / slices_per_block_row;
    // this lane's A row g inside a block, and its x rows (tokens g and g + 8) at column 0
    const int lane_col = q * (BW / 4);
    const long long row_lo = (long long)(slice % slices_per_block_row * SLICE_ROWS + g) * BW + lane_col;
    TokenRows<NT> x_token;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        x_token.row[nt] = 8 * nt + g < M ? x + (long long)(8 * nt + g) * ldx + lane_col : nullptr;

    float acc[HALVES][NT][4] = {};
    int bounds[HALVES][2];  // each half's non-zero blocks, read before either is walked
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
        const int br = block_row + h * (N / BH);
        bounds[h][0] = row_offsets[br], bounds[h][1] = row_offsets[br + 1];
    }
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
        accumulate_slice<DT, BW, WARPS, NT, UNROLL>(acc[h], values, col_indices, bounds[h][0], bounds[h][1], BH, row_lo,
                                                    x_token, warp);
    release_dependents();
    wait_for_producer();  // a warp without blocks has not waited yet; the epilogue reads the residual and writes out
    // the warps' tiles meet. acc[h][nt][0..1]: row g, tokens 8nt + 2q, + 1; acc[h][nt][2..3]: row g + 8
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) partial[warp][(h * NT + nt) * 4 + i][lane] = acc[h][nt][i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) {
        float v[HALVES] = {};
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int w = 0; w < WARPS; ++w) v[h] += partial[w][h * NT * 4 + i][lane];
        const int m = 8 * (i / 4) + 2 * q + (i % 2), n = slice * SLICE_ROWS + g + 8 * ((i % 4) / 2);
        if (m >= M || n >= N) continue;
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
            if (flags & HAS_BIAS) v[h] += to_f32<DT>(bias[h * N + n]);
        const float y = GATED ? activate(v[0], ACT_SILU) * v[HALVES - 1] : activate(v[0], act);
        store_output<DT>(out, ldo, res, ldr, flags, m, n, y);
    }
}
