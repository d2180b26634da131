// CSR linear for unstructured sparsity at 1-16 tokens, on CUDA cores: out[M, N] = epilogue(x @ W^T).
// A block takes MT = 1, 2, 4 or 8 tokens (blockIdx.y picks which); 16 tokens run as two 8-token tiles.
//
// Compiled at run time by NVRTC (codegen/cuda/nvrtc.py) after linear_prelude.cuh (types, conversions,
// activations). Storage types are raw 16-bit words; DT says how to read them (0: bfloat16, 1: float16).
//
// Why CUDA C++ rather than Triton: a Triton program cannot place x in shared memory nor reduce across
// a warp's lanes with shuffles, so the Triton CSR kernel reads x^T from L1/L2 behind a chain of dependent
// loads (benchmarks/RESULTS.md: 33-40 us at 16 tokens on a 90% 11008x4096 weight, cuBLAS 24 us). Here:
//   1. each block copies its MT tokens of x into shared memory once, transposed: xs[k][t], so the MT
//      inputs that meet one non-zero are one 2-16 byte vector load; pack_csr interleaves each row's
//      non-zeros by column mod 32, so a warp's 32 lanes load from every bank alike (few conflicts);
//   2. the grid is persistent (about one wave), so x is staged once per block, not once per row;
//   3. one warp owns one weight row at a time, or 2^LOG2_RPW rows side by side, LPR lanes each (where the
//      grid has fewer warps than rows: no warp then walks a second row while its block waits): the row's
//      lanes take consecutive non-zeros (coalesced value and column loads, NZ a lane: two as one 4-byte
//      word each where the tile waits on loads rather than on shared memory), UNROLL chunks in flight at
//      once, and accumulate MT fp32 partial sums each;
//   4. the row's partial sums meet in a transposing butterfly: log2(MT) exchanges halve the values a lane
//      holds, so after them its lane l holds token l >> (log2(LPR) - LOG2_MT); log2(LPR) - log2(MT) more
//      finish the sum (MT + 3 shuffles a row at 8 tokens and 32 lanes, against 5 * MT for reducing each
//      token on its own).
//   5. the epilogue (bias, activation, residual) runs on the lanes that hold a finished token;
//   6. launched with programmatic dependent launch (Hopper), the grid is scheduled while the kernel ahead
//      of it finishes, and waits for it only before staging x (linear_prelude.cuh);
//   7. with PDL, a warp loads its first row's bounds and first step of non-zeros before that wait, so the
//      first links of its chain of dependent loads overlap the kernel ahead.

#define FULL_MASK 0xffffffffu

// x and the weights as 32-bit pairs of 16-bit values, each half widened on its own (linear_prelude.cuh:
// to_f32 for one value)
template <int DT> __device__ __forceinline__ float lo_f32(u32 pair);
template <int DT> __device__ __forceinline__ float hi_f32(u32 pair);

// bfloat16 is the top half of a float32: a shift or a mask widens it exactly
template <> __device__ __forceinline__ float lo_f32<0>(u32 pair) { return __uint_as_float(pair << 16); }
template <> __device__ __forceinline__ float hi_f32<0>(u32 pair) { return __uint_as_float(pair & 0xffff0000u); }

// float16 needs a conversion; its halves are split out first
template <> __device__ __forceinline__ float lo_f32<1>(u32 pair) { return f16_to_f32((u16)(pair & 0xffffu)); }
template <> __device__ __forceinline__ float hi_f32<1>(u32 pair) { return f16_to_f32((u16)(pair >> 16)); }

// MT 16-bit inputs of one non-zero's column, loaded as one 2-16 byte vector
template <int MT> struct alignas(MT * 2) Tokens { u16 v[MT]; };

// XCOLS consecutive 16-bit values of one token's row of x, loaded as one 4-16 byte vector
template <int XCOLS> struct alignas(XCOLS * 2) Columns { u16 v[XCOLS]; };

// One step over a row covers UNROLL chunks of LPR * NZ non-zeros from j0 (LPR: the lanes that share the row).
// A lane's share: its NZ values and NZ columns (16 bits each) of each chunk, loaded as one word each where
// NZ == 2.
template <int UNROLL> struct Step { u32 w[UNROLL], c[UNROLL]; };

// Every load of a step, issued before any is used so they are in flight together. CHECKED: the step may
// reach past the row's end, and a lane loads nothing there. LPR: the lanes that share the row (a warp, or half
// of one); `lane`: this lane's place among them.
template <int UNROLL, int NZ, bool CHECKED, int LPR>
__device__ __forceinline__ Step<UNROLL> load_step(const u16* __restrict__ values, const u16* __restrict__ cols, int j0,
                                                  int end, int lane) {
    Step<UNROLL> s;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int j = j0 + (u * LPR + lane) * NZ;
        if (NZ == 2 && (!CHECKED || j + 1 < end)) {
            s.w[u] = *reinterpret_cast<const u32*>(values + j);
            s.c[u] = *reinterpret_cast<const u32*>(cols + j);
        } else {
            s.w[u] = !CHECKED || j < end ? values[j] : 0u;
            s.c[u] = !CHECKED || j < end ? cols[j] : 0u;
        }
    }
    return s;
}

// acc += the step's non-zeros times x. CHECKED: non-zeros outside [start, end) are skipped (an inf in x's
// column 0 must not become 0 * inf).
template <int DT, int MT, int UNROLL, int NZ, bool CHECKED, int LPR>
__device__ __forceinline__ void accumulate_step(float (&acc)[MT], const Step<UNROLL>& s, const u16* xs, int j0,
                                                int start, int end, int lane) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int e = 0; e < NZ; ++e) {
            const int j = j0 + (u * LPR + lane) * NZ + e;
            if (CHECKED && (j < start || j >= end)) continue;
            const float weight = e ? hi_f32<DT>(s.w[u]) : lo_f32<DT>(s.w[u]);
            const int col = (s.c[u] >> (16 * e)) & 0xffff;
            if (MT == 1) {
                acc[0] += weight * to_f32<DT>(xs[col]);
            } else {  // the tokens as 32-bit pairs, each widened by a shift or a mask (bfloat16)
                const Tokens<MT> in = *reinterpret_cast<const Tokens<MT>*>(xs + col * MT);
                const u32* pairs = reinterpret_cast<const u32*>(in.v);
#pragma unroll
                for (int p = 0; p < MT / 2; ++p) {
                    acc[2 * p] += weight * lo_f32<DT>(pairs[p]);
                    acc[2 * p + 1] += weight * hi_f32<DT>(pairs[p]);
                }
            }
        }
    }
}

// One row: acc over its non-zeros (its first step already loaded: `first`), the sums of the LPR lanes that
// share it (`lane`: this lane's place among them), the epilogue. A row at or past rows_end is no row: its
// range is empty and nothing is written (its lanes still take part in the shuffles of the row beside it).
// NZ == 2: steps start on an even non-zero, so a lane loads two values and two columns as one word each. A
// row's first step and its last may reach past the row's ends and check each non-zero; the steps between run
// without a check.
template <int DT, int LOG2_MT, int UNROLL, int NZ, int LOG2_LPR>
__device__ __forceinline__ void row_dot(int row, int rows_end, int start, int end, const Step<UNROLL>& first,
                                        const u16* xs, const u16* __restrict__ values, const u16* __restrict__ cols,
                                        const u16* __restrict__ bias, const u16* __restrict__ res, int ldr,
                                        u16* __restrict__ out, int ldo, int m0, int M, int act, int flags, int lane) {
    constexpr int MT = 1 << LOG2_MT, LPR = 1 << LOG2_LPR;
    constexpr int STEP = UNROLL * LPR * NZ;
    float acc[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] = 0.0f;
    int j0 = start & ~(NZ - 1);
    accumulate_step<DT, MT, UNROLL, NZ, true, LPR>(acc, first, xs, j0, start, end, lane);
    for (j0 += STEP; j0 + STEP <= end; j0 += STEP)
        accumulate_step<DT, MT, UNROLL, NZ, false, LPR>(
            acc, load_step<UNROLL, NZ, false, LPR>(values, cols, j0, end, lane), xs, j0, start, end, lane);
    if (j0 < end)
        accumulate_step<DT, MT, UNROLL, NZ, true, LPR>(
            acc, load_step<UNROLL, NZ, true, LPR>(values, cols, j0, end, lane), xs, j0, start, end, lane);
    // 4. transposing butterfly: each exchange halves the tokens a lane holds
#pragma unroll
    for (int step = 0; step < LOG2_MT; ++step) {
        const int half = MT >> (step + 1), offset = (LPR / 2) >> step;
        const bool upper = lane & offset;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? acc[i] : acc[i + half];
            const float keep = upper ? acc[i + half] : acc[i];
            acc[i] = keep + __shfl_xor_sync(FULL_MASK, send, offset);
        }
    }
#pragma unroll
    for (int offset = LPR >> (LOG2_MT + 1); offset >= 1; offset /= 2)
        acc[0] += __shfl_xor_sync(FULL_MASK, acc[0], offset);
    // 5. one lane per token writes it
    const int m = m0 + (lane >> (LOG2_LPR - LOG2_MT));
    if ((lane & ((LPR >> LOG2_MT) - 1)) == 0 && m < M && row < rows_end) {
        float v = acc[0];
        if (flags & HAS_BIAS) v += to_f32<DT>(bias[row]);
        store_output<DT>(out, ldo, res, ldr, flags, m, row, activate(v, act));
    }
}

template <int DT, int LOG2_MT, int UNROLL, int MIN_BLOCKS, int NZ, int XCOLS, int LOG2_RPW>
__global__ void __launch_bounds__(1024, MIN_BLOCKS)
csr_small_m(const u16* __restrict__ x, int ldx,                 // x [M, K], rows ldx apart
            const u16* __restrict__ values, const u16* __restrict__ cols,  // non-zeros, 16-bit columns
            const int* __restrict__ row_offsets,                 // [N + 1]
            const u16* __restrict__ bias, const u16* __restrict__ res, int ldr,
            u16* __restrict__ out, int ldo, int M, int N, int K, int act, int flags) {
    constexpr int MT = 1 << LOG2_MT;
    extern __shared__ __align__(16) u16 xs[];  // [K][MT]: x^T of this block's tokens

    // 3. a warp takes 2^LOG2_RPW rows at once, LPR lanes each
    constexpr int LOG2_LPR = 5 - LOG2_RPW, LPR = 1 << LOG2_LPR;
    const int m0 = blockIdx.y * MT;
    const int lane = threadIdx.x % LPR;  // among the lanes of its row
    const int rows_at_once = blockDim.x / LPR;
    // 2./3. each block takes an equal run of consecutive rows (so no SM gets more than its share however
    // the blocks are placed, e.g. those of a PDL launch that start as the kernel ahead's blocks end), its warps
    // consecutive rows of it (so the block's output stores share sectors)
    const int rows_per_block = (N + gridDim.x - 1) / gridDim.x;
    const int rows_end = min(N, (blockIdx.x + 1) * rows_per_block);
    int row = blockIdx.x * rows_per_block + threadIdx.x / LPR;
    // the warp's first row: every lane of a warp walks as many rounds, for the shuffles of its rows' sums
    int lead = row - (threadIdx.x % WARP) / LPR;
    // 7. the first row's bounds and first step are constants: in flight while the kernel ahead finishes
    int start = 0, end = 0;
    Step<UNROLL> first = {};
    if (row < rows_end) {
        start = row_offsets[row], end = row_offsets[row + 1];
        first = load_step<UNROLL, NZ, true, LPR>(values, cols, start & ~(NZ - 1), end, lane);
    }
    wait_for_producer();  // 6. x is the output of the kernel ahead
    // 1. stage x^T; tokens past M are zeros. XCOLS columns a thread as one vector load of each token's row
    // where x's rows allow it, so a block's loads are all in flight at once; else one at a time.
    if (K % XCOLS == 0 && ldx % XCOLS == 0 && reinterpret_cast<unsigned long long>(x) % (2 * XCOLS) == 0) {
#pragma unroll 2
        for (int k = XCOLS * threadIdx.x; k < K; k += XCOLS * blockDim.x) {
            Columns<XCOLS> rows[MT];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                rows[t] = m0 + t < M ? *reinterpret_cast<const Columns<XCOLS>*>(x + (long long)(m0 + t) * ldx + k)
                                     : Columns<XCOLS>{};
#pragma unroll
            for (int c = 0; c < XCOLS; ++c) {
                Tokens<MT> column;
#pragma unroll
                for (int t = 0; t < MT; ++t) column.v[t] = rows[t].v[c];
                *reinterpret_cast<Tokens<MT>*>(xs + (k + c) * MT) = column;
            }
        }
    } else {
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            Tokens<MT> col;
#pragma unroll
            for (int t = 0; t < MT; ++t)
                col.v[t] = m0 + t < M ? x[(long long)(m0 + t) * ldx + k] : (u16)0;
            *reinterpret_cast<Tokens<MT>*>(xs + k * MT) = col;
        }
    }
    __syncthreads();
    release_dependents();  // 6. the next kernel's blocks may now take the room of this grid's blocks as they end

    if (lead < rows_end)
        row_dot<DT, LOG2_MT, UNROLL, NZ, LOG2_LPR>(row, rows_end, start, end, first, xs, values, cols, bias, res, ldr,
                                                   out, ldo, m0, M, act, flags, lane);
    for (lead += rows_at_once, row += rows_at_once; lead < rows_end; lead += rows_at_once, row += rows_at_once) {
        start = end = 0;
        if (row < rows_end) start = row_offsets[row], end = row_offsets[row + 1];
        const Step<UNROLL> step = load_step<UNROLL, NZ, true, LPR>(values, cols, start & ~(NZ - 1), end, lane);
        row_dot<DT, LOG2_MT, UNROLL, NZ, LOG2_LPR>(row, rows_end, start, end, step, xs, values, cols, bias, res, ldr,
                                                   out, ldo, m0, M, act, flags, lane);
    }
}
