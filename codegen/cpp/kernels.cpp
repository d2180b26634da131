// sparsec CPU kernels: block-sparse (BSR) and CSR sparse linear with a fused epilogue.
//
// This file is the template half of a generated translation unit: build.py appends the
// dispatch table (one specialization per block size / dtype it was asked for) and compiles
// the result with torch.utils.cpp_extension (OpenMP, -O3, -march=native when accepted).
// No torch headers: the entry points are extern "C" and take raw pointers, so a compile
// takes seconds, not the ~25 s that <torch/extension.h> costs.
//
// Semantics (same as sparsec::bsr_linear / sparsec::csr_linear):
//   xk = x[:, col_perm]               (prologue, while packing x to fp32)
//   yp = xk @ Wp^T                    (fp32 accumulation)
//   y[:, row_perm[r]] = yp[:, r]      (epilogue writes rows back in place)
//   y = act(y + bias) + residual      (bias, residual in original order; out dtype = x dtype)
//
// Two inner kernels per format:
//   "kvec" (M <= 4, decode): vectors run along K; each weight block is streamed once and
//          used for all M tokens; per-row accumulators are reduced once per block row.
//   "xt"   (M > 4): x is packed transposed in chunks of MC = MV*VL tokens ([Kp][MC]),
//          the micro-kernel broadcasts one weight and FMAs it into MV token vectors for
//          NR rows at once (a BLIS-style register tile), no horizontal reductions.
// Threads split block rows (balanced by non-zeros); for few block rows and many tokens
// they split token chunks instead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define SPARSEC_VL 16
#elif defined(__AVX__)
#define SPARSEC_VL 8
#else
#define SPARSEC_VL 4
#endif

namespace sparsec {

constexpr int VL = SPARSEC_VL;
typedef float vf __attribute__((vector_size(SPARSEC_VL * 4)));
typedef float vfu __attribute__((vector_size(SPARSEC_VL * 4), aligned(4), may_alias));
typedef uint16_t vh __attribute__((vector_size(SPARSEC_VL * 2)));
typedef uint16_t vhu __attribute__((vector_size(SPARSEC_VL * 2), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(SPARSEC_VL * 4)));

typedef uint16_t bf16;  // raw bfloat16 bits

static inline float to_f(float v) { return v; }
static inline float to_f(bf16 b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void from_f(float* d, float v) { *d = v; }
static inline void from_f(bf16* d, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    *d = (bf16)((u >> 16) | 0x40);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  *d = (bf16)(u >> 16);
}

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline vf vload(const bf16* p) {
  vh h = *reinterpret_cast<const vhu*>(p);
  vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;
}
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf vbcast(float s) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < VL; ++i) v[i] = s;
  return v;
#endif
}
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

static inline float* alloc_f(int64_t n) {
  size_t bytes = ((size_t)std::max<int64_t>(n, 1) * 4 + 63) / 64 * 64;
  return (float*)std::aligned_alloc(64, bytes);
}

// ------------------------------------------------------------------------------ epilogue
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_SILU = 3 };

struct Epi {
  int64_t N;
  int act;
  const float* bias;        // [N] fp32, original order, or null
  const void* residual;     // [M, N] contiguous, or null
  int residual_f32;         // residual is fp32 (else same dtype as out)
  const int64_t* row_perm;  // [N] packed row -> original row, or null
  void* out;                // [M, N] contiguous, dtype of x
};

static inline float act_apply(float v, int act) {
  switch (act) {
    case ACT_RELU: return v > 0.f ? v : 0.f;
    case ACT_GELU: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752440f));
    case ACT_SILU: return v / (1.f + std::exp(-v));
    default: return v;
  }
}

template <typename TX>
static inline void epi_store(const Epi& e, int64_t m, int64_t r, float v) {
  const int64_t n = e.row_perm ? e.row_perm[r] : r;
  if (e.bias) v += e.bias[n];
  v = act_apply(v, e.act);
  const int64_t o = m * e.N + n;
  if (e.residual) v += e.residual_f32 ? ((const float*)e.residual)[o] : to_f(((const TX*)e.residual)[o]);
  from_f(((TX*)e.out) + o, v);
}

// Rows [r0, r0+nr) x tokens [m0, m0+mc) of yp, tile[r][i] at tile + r*ld + i.
// One instantiation per epilogue shape so the per-element loop has no branches.
template <typename TX, bool PERM, bool BIAS, int ACT, int RES>
__attribute__((noinline)) static void epi_tile_impl(const Epi& e, const float* __restrict tile,
                                                    int64_t ld, int64_t r0, int nv, int64_t m0,
                                                    int64_t mc) {
  const int64_t N = e.N;
  const int64_t* __restrict rp = e.row_perm;
  const float* __restrict bias = e.bias;
  TX* __restrict out = (TX*)e.out;
  for (int64_t i = 0; i < mc; ++i) {
    const int64_t ob = (m0 + i) * N;
    for (int r = 0; r < nv; ++r) {
      const int64_t n = PERM ? rp[r0 + r] : r0 + r;
      float v = tile[r * ld + i];
      if constexpr (BIAS) v += bias[n];
      if constexpr (ACT != ACT_NONE) v = act_apply(v, ACT);
      if constexpr (RES == 1) v += to_f(((const TX*)e.residual)[ob + n]);
      if constexpr (RES == 2) v += ((const float*)e.residual)[ob + n];
      from_f(out + ob + n, v);
    }
  }
}

template <typename TX, bool PERM, bool BIAS, int ACT>
static inline void epi_tile_r(const Epi& e, const float* tile, int64_t ld, int64_t r0, int nv,
                              int64_t m0, int64_t mc) {
  if (!e.residual) epi_tile_impl<TX, PERM, BIAS, ACT, 0>(e, tile, ld, r0, nv, m0, mc);
  else if (e.residual_f32) epi_tile_impl<TX, PERM, BIAS, ACT, 2>(e, tile, ld, r0, nv, m0, mc);
  else epi_tile_impl<TX, PERM, BIAS, ACT, 1>(e, tile, ld, r0, nv, m0, mc);
}

template <typename TX, bool PERM, bool BIAS>
static inline void epi_tile_a(const Epi& e, const float* tile, int64_t ld, int64_t r0, int nv,
                              int64_t m0, int64_t mc) {
  switch (e.act) {
    case ACT_RELU: epi_tile_r<TX, PERM, BIAS, ACT_RELU>(e, tile, ld, r0, nv, m0, mc); break;
    case ACT_GELU: epi_tile_r<TX, PERM, BIAS, ACT_GELU>(e, tile, ld, r0, nv, m0, mc); break;
    case ACT_SILU: epi_tile_r<TX, PERM, BIAS, ACT_SILU>(e, tile, ld, r0, nv, m0, mc); break;
    default: epi_tile_r<TX, PERM, BIAS, ACT_NONE>(e, tile, ld, r0, nv, m0, mc); break;
  }
}

template <typename TX>
static inline void epi_tile(const Epi& e, const float* tile, int64_t ld, int64_t r0, int nr,
                            int64_t m0, int64_t mc) {
  const int nv = (int)std::min<int64_t>(nr, e.N - r0);
  if (nv <= 0) return;
  if (e.row_perm) {
    if (e.bias) epi_tile_a<TX, true, true>(e, tile, ld, r0, nv, m0, mc);
    else epi_tile_a<TX, true, false>(e, tile, ld, r0, nv, m0, mc);
  } else {
    if (e.bias) epi_tile_a<TX, false, true>(e, tile, ld, r0, nv, m0, mc);
    else epi_tile_a<TX, false, false>(e, tile, ld, r0, nv, m0, mc);
  }
}

// ------------------------------------------------------------------------------ x packing
// Row layout: xk[m][k], k < Kp (zero padded), fp32, col_perm applied.
template <typename TX>
static void pack_rows(const TX* x, int64_t M, int64_t K, int64_t Kp, const int64_t* cp, float* xk) {
  for (int64_t m = 0; m < M; ++m) {
    const TX* src = x + m * K;
    float* dst = xk + m * Kp;
    if (cp)
      for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[cp[k]]);
    else
      for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[k]);
    for (int64_t k = K; k < Kp; ++k) dst[k] = 0.f;
  }
}

// Transposed chunk layout: xp[c][k][i] = x[c*MC + i, cp[k]], zero padded (tokens and k).
template <typename TX>
static void pack_xt(const TX* x, int64_t M, int64_t K, int64_t Kp, const int64_t* cp, int MC,
                    int64_t nch, float* xp, int nthreads) {
  constexpr int KT = 64;
  const int64_t nkt = (Kp + KT - 1) / KT;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4) collapse(2) if (nthreads > 1)
  for (int64_t c = 0; c < nch; ++c) {
    for (int64_t kt = 0; kt < nkt; ++kt) {
      float* dst = xp + c * Kp * MC;
      const int64_t k0 = kt * KT, k1 = std::min<int64_t>(Kp, k0 + KT);
      const int64_t kv = std::min<int64_t>(k1, K);
      for (int i = 0; i < MC; ++i) {
        const int64_t m = c * MC + i;
        if (m < M) {
          const TX* src = x + m * K;
          if (cp)
            for (int64_t k = k0; k < kv; ++k) dst[k * MC + i] = to_f(src[cp[k]]);
          else
            for (int64_t k = k0; k < kv; ++k) dst[k * MC + i] = to_f(src[k]);
          for (int64_t k = std::max(k0, kv); k < k1; ++k) dst[k * MC + i] = 0.f;
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k * MC + i] = 0.f;
        }
      }
    }
  }
}

// Split [0, nrows) into nt contiguous ranges of about equal cost, cost(r) = off[r] + r*w.
static void balance(const int32_t* off, int64_t nrows, int nt, double w, int64_t* bounds) {
  if (nt <= 1) { bounds[0] = 0; bounds[1] = nrows; return; }
  const double total = (double)off[nrows] + (double)nrows * w;
  bounds[0] = 0;
  int64_t lo = 0;
  for (int t = 1; t < nt; ++t) {
    const double target = total * t / nt;
    int64_t a = lo, b = nrows;  // first r with cost(r) >= target
    while (a < b) {
      int64_t mid = (a + b) / 2;
      if ((double)off[mid] + mid * w < target) a = mid + 1; else b = mid;
    }
    bounds[t] = lo = a;
  }
  bounds[nt] = nrows;
}

// Work items run dynamically (an atomic counter inside OpenMP's dynamic schedule): when one
// thread is slowed down (another process on its core), the others take its share instead of
// waiting at the barrier. Row ranges come from balance() with ~8 ranges per thread.
template <class F>
static void run_items(int nt, int64_t nitems, F&& f) {
  if (nt <= 1 || nitems <= 1) {
    for (int64_t i = 0; i < nitems; ++i) f(i);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t i = 0; i < nitems; ++i) f(i);
}

struct Ranges {
  int64_t n = 0;
  int64_t b[8 * 64 + 1];
};

static void make_ranges(const int32_t* off, int64_t nrows, int nt, double w, int64_t align,
                        Ranges& r) {
  int64_t want = nt <= 1 ? 1 : 8 * (int64_t)nt;
  want = std::max<int64_t>(1, std::min<int64_t>(want, (nrows + align - 1) / std::max<int64_t>(align, 1)));
  want = std::min<int64_t>(want, 8 * 64);
  balance(off, nrows, (int)want, w, r.b);
  if (align > 1)
    for (int64_t t = 1; t < want; ++t) r.b[t] = std::min<int64_t>(nrows, (r.b[t] + align - 1) / align * align);
  for (int64_t t = 1; t <= want; ++t) r.b[t] = std::max(r.b[t], r.b[t - 1]);
  r.n = want;
}

// Threads worth waking for `work` multiply-adds: small layers run on the calling thread
// (a parallel region costs microseconds, and much more when the cores are shared).
static inline int threads_for(int64_t work, int nthreads) {
  if (work < ((int64_t)1 << 18)) return 1;
  return (int)std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(nthreads, 64),
                                                      work >> 17));
}

// Choose tokens per chunk: MV vectors (1..3) and the chunk count, minimizing padding.
static void choose_chunks(int64_t M, int* MV, int64_t* nch) {
  const int64_t maxmc = 3 * VL;
  int64_t n = (M + maxmc - 1) / maxmc;
  int64_t per = (M + n - 1) / n;
  int mv = (int)((per + VL - 1) / VL);
  *MV = std::max(1, std::min(3, mv));
  *nch = (M + (int64_t)(*MV) * VL - 1) / ((int64_t)(*MV) * VL);
}

// The two drivers every format uses over its row ranges `rg` (returns 0, or 2 when out of memory).
// Few tokens: x as rows (padded to Kp, columns permuted), one work item per row range;
// body(xk, b0, b1).
template <typename TX, typename Body>
static int over_rows(const void* x, int64_t M, int64_t K, int64_t Kp, const int64_t* col_perm,
                     const Ranges& rg, int nt, Body&& body) {
  float* xk = alloc_f(M * Kp);
  if (!xk) return 2;
  pack_rows<TX>((const TX*)x, M, K, Kp, col_perm, xk);
  run_items(nt, rg.n, [&](int64_t g) { body(xk, rg.b[g], rg.b[g + 1]); });
  std::free(xk);
  return 0;
}

// Many tokens: x transposed into panels of MV vectors of tokens (choose_chunks); items (panel, row
// range), panel-major so the threads share one x panel at a time; body(mv, panel, m0, mc, b0, b1)
// with mv a std::integral_constant<int, MV> for the kernels' template argument.
template <typename TX, typename Body>
static int over_token_panels(const void* x, int64_t M, int64_t K, int64_t Kp, const int64_t* col_perm,
                             const Ranges& rg, int nt, Body&& body) {
  int MV;
  int64_t nch;
  choose_chunks(M, &MV, &nch);
  const int MC = MV * VL;
  float* xp = alloc_f(nch * Kp * MC);
  if (!xp) return 2;
  pack_xt<TX>((const TX*)x, M, K, Kp, col_perm, MC, nch, xp, nt);
  run_items(nt, nch * rg.n, [&](int64_t it) {
    const int64_t c = it / rg.n, g = it % rg.n;
    const float* panel = xp + c * Kp * MC;
    const int64_t m0 = c * MC, mc = std::min<int64_t>(MC, M - m0);
    switch (MV) {
      case 1: body(std::integral_constant<int, 1>{}, panel, m0, mc, rg.b[g], rg.b[g + 1]); break;
      case 2: body(std::integral_constant<int, 2>{}, panel, m0, mc, rg.b[g], rg.b[g + 1]); break;
      default: body(std::integral_constant<int, 3>{}, panel, m0, mc, rg.b[g], rg.b[g + 1]); break;
    }
  });
  std::free(xp);
  return 0;
}

// ================================================================================= BSR
template <int BH, int BW, int T, typename TW, typename TX>
static void bsr_kvec(const float* xk, int64_t Kp, const TW* vals, const int32_t* cols,
                     const int32_t* ro, int64_t br0, int64_t br1, const Epi& e) {
  constexpr int R0 = (T == 1) ? 16 : (T <= 3 ? 8 : 4);
  constexpr int R = R0 < BH ? R0 : BH;
  constexpr int KV = BW / VL;
  static_assert(BH % R == 0 && BW % VL == 0, "bad specialization");
  float res[T][R];
  for (int64_t br = br0; br < br1; ++br) {
    const int32_t j0 = ro[br], j1 = ro[br + 1];
    for (int r0 = 0; r0 < BH; r0 += R) {
      vf acc[R][T];
#pragma GCC unroll 64
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc[r][t] = vf{};
      for (int32_t j = j0; j < j1; ++j) {
        const TW* w = vals + (int64_t)j * (BH * BW) + r0 * BW;
        const float* xs = xk + (int64_t)cols[j] * BW;
        {  // the rows this pass reads of a block 4 ahead (4 KB pages defeat the L2 streamer)
          const char* pf = (const char*)(w + 4 * (BH * BW));
#pragma GCC unroll 64
          for (int o = 0; o < R * BW * (int)sizeof(TW); o += 64) __builtin_prefetch(pf + o);
        }
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) {
          vf xv[T];
#pragma GCC unroll 4
          for (int t = 0; t < T; ++t) xv[t] = vload(xs + t * Kp + kv * VL);
#pragma GCC unroll 64
          for (int r = 0; r < R; ++r) {
            vf wv = vload(w + r * BW + kv * VL);
#pragma GCC unroll 4
            for (int t = 0; t < T; ++t) acc[r][t] += wv * xv[t];
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) res[t][r] = hsum(acc[r][t]);
      const int64_t row0 = br * BH + r0;
      const int nv = (int)std::min<int64_t>(R, e.N - row0);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < nv; ++r) epi_store<TX>(e, t, row0 + r, res[t][r]);
    }
  }
}

template <int BH, int BW, int MV, typename TW, typename TX>
static void bsr_xt(const float* xpc, int64_t m0, int64_t mc, const TW* vals, const int32_t* cols,
                   const int32_t* ro, int64_t br0, int64_t br1, const Epi& e) {
  // Block-outer order: each weight block is read once, front to back, and its x panel
  // ([BW][MC], <= 12 KB) stays in L1 while all BH rows use it; the C tile of the block row
  // ([BH][MC]) lives in L1 and is loaded / stored once per block and row group.
  constexpr int NR = BH < 8 ? BH : 8;
  constexpr int MC = MV * VL;
  static_assert(BH % NR == 0, "bad specialization");
  alignas(64) float ctile[BH * MC];
  for (int64_t br = br0; br < br1; ++br) {
    const int32_t j0 = ro[br], j1 = ro[br + 1];
    for (int i = 0; i < BH * MC; ++i) ctile[i] = 0.f;
    for (int32_t j = j0; j < j1; ++j) {
      const TW* wblk = vals + (int64_t)j * (BH * BW);
      const float* xb = xpc + (int64_t)cols[j] * (BW * MC);
      if (j + 1 < j1) {  // next block's x panel: start pulling it from L2
        const char* nx = (const char*)(xpc + (int64_t)cols[j + 1] * (BW * MC));
        for (int o = 0; o < BW * MC * 4; o += 256) __builtin_prefetch(nx + o);
      }
      for (int r0 = 0; r0 < BH; r0 += NR) {
        const TW* w = wblk + r0 * BW;
        float* ct = ctile + r0 * MC;
        vf acc[NR][MV];
#pragma GCC unroll 64
        for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < MV; ++v) acc[r][v] = vload(ct + r * MC + v * VL);
#pragma GCC unroll 2
        for (int k = 0; k < BW; ++k) {
          vf xv[MV];
#pragma GCC unroll 4
          for (int v = 0; v < MV; ++v) xv[v] = vload(xb + k * MC + v * VL);
#pragma GCC unroll 64
          for (int r = 0; r < NR; ++r) {
            const vf wb = vbcast(to_f(w[r * BW + k]));
#pragma GCC unroll 4
            for (int v = 0; v < MV; ++v) acc[r][v] += wb * xv[v];
          }
        }
#pragma GCC unroll 64
        for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < MV; ++v) vstore(ct + r * MC + v * VL, acc[r][v]);
      }
    }
    epi_tile<TX>(e, ctile, MC, br * BH, BH, m0, mc);
  }
}

// Generic block size (runtime BH, BW): correct, modestly vectorized.
template <typename TW, typename TX>
static void bsr_generic_rows(const float* xk, int64_t Kp, int64_t M, const TW* vals,
                             const int32_t* cols, const int32_t* ro, int64_t BH, int64_t BW,
                             int64_t br0, int64_t br1, const Epi& e) {
  for (int64_t br = br0; br < br1; ++br) {
    const int32_t j0 = ro[br], j1 = ro[br + 1];
    for (int64_t r = 0; r < BH; ++r) {
      const int64_t row = br * BH + r;
      if (row >= e.N) break;
      for (int64_t m = 0; m < M; ++m) {
        float s = 0.f;
        const float* xm = xk + m * Kp;
        for (int32_t j = j0; j < j1; ++j) {
          const TW* w = vals + (int64_t)j * BH * BW + r * BW;
          const float* xs = xm + (int64_t)cols[j] * BW;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < BW; ++k) s += to_f(w[k]) * xs[k];
        }
        epi_store<TX>(e, m, row, s);
      }
    }
  }
}

struct BsrArgs {
  const void* x;
  int64_t M, K, N;
  const void* vals;
  int64_t BH, BW;
  const int32_t* cols;
  const int32_t* ro;
  int64_t nbr;
  const int64_t* col_perm;
  int nthreads;
};

template <typename TW, typename TX>
static int bsr_generic(const BsrArgs& a, const Epi& e) {
  const int64_t nbc = (a.K + a.BW - 1) / a.BW;
  const int64_t Kp = nbc * a.BW;
  float* xk = alloc_f(a.M * Kp);
  if (!xk) return 2;
  pack_rows<TX>((const TX*)a.x, a.M, a.K, Kp, a.col_perm, xk);
  const int nt = std::max(1, a.nthreads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t br = 0; br < a.nbr; ++br)
    bsr_generic_rows<TW, TX>(xk, Kp, a.M, (const TW*)a.vals, a.cols, a.ro, a.BH, a.BW, br, br + 1, e);
  std::free(xk);
  return 0;
}

template <int BH, int BW, typename TW, typename TX>
static int bsr_run(const BsrArgs& a, const Epi& e) {
  if constexpr (BW % VL != 0 || BH % 8 != 0) {
    return bsr_generic<TW, TX>(a, e);
  } else {
  const int64_t nbc = (a.K + BW - 1) / BW;
  const int64_t Kp = nbc * BW;
  const TW* vals = (const TW*)a.vals;
  const int nt = threads_for((int64_t)a.ro[a.nbr] * BH * BW * a.M, a.nthreads);
  Ranges rg;
  // a block row's fixed cost (epilogue) ~ 1/4 block
  make_ranges(a.ro, a.nbr, nt, 0.25, 1, rg);
  if (a.M <= 4) {
    return over_rows<TX>(a.x, a.M, a.K, Kp, a.col_perm, rg, nt, [&](const float* xk, int64_t b0, int64_t b1) {
      switch (a.M) {
        case 1: bsr_kvec<BH, BW, 1, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 2: bsr_kvec<BH, BW, 2, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 3: bsr_kvec<BH, BW, 3, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 4: bsr_kvec<BH, BW, 4, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        default: break;
      }
    });
  }
  return over_token_panels<TX>(a.x, a.M, a.K, Kp, a.col_perm, rg, nt,
      [&](auto mv, const float* panel, int64_t m0, int64_t mc, int64_t b0, int64_t b1) {
        bsr_xt<BH, BW, decltype(mv)::value, TW, TX>(panel, m0, mc, vals, a.cols, a.ro, b0, b1, e);
      });
  }
}

// ================================================================================= CSR
// Column indices are int32 or uint16 (K <= 65536: 2 bytes per non-zero instead of 4).
template <typename TI, typename TW, typename TX>
static void csr_kvec(const float* xk, int64_t K, int64_t M, const TW* vals, const TI* cols,
                     const int32_t* ro, int64_t n0, int64_t n1, const Epi& e) {
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t j0 = ro[n], j1 = ro[n + 1];
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xk + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int32_t j = j0; j < j1; ++j) s += to_f(vals[j]) * xm[(int64_t)cols[j]];
      epi_store<TX>(e, m, n, s);
    }
  }
}

template <int MV, typename TI, typename TW, typename TX>
static void csr_xt(const float* xpc, int64_t m0, int64_t mc, const TW* vals, const TI* cols,
                   const int32_t* ro, int64_t n0, int64_t n1, const Epi& e) {
  constexpr int MC = MV * VL;
  constexpr int NR = 8;
  alignas(64) float tile[NR * MC];
  for (int64_t nb = n0; nb < n1; nb += NR) {
    const int nr = (int)std::min<int64_t>(NR, n1 - nb);
    for (int r = 0; r < nr; ++r) {
      const int64_t n = nb + r;
      int32_t j = ro[n];
      const int32_t j1 = ro[n + 1];
      vf a0[MV], a1[MV], a2[MV], a3[MV];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) a0[v] = a1[v] = a2[v] = a3[v] = vf{};
      for (; j + 4 <= j1; j += 4) {
        if (j + 20 <= j1) {  // x rows of later non-zeros: hide the L2 latency
#pragma GCC unroll 4
          for (int q = 16; q < 20; ++q)
#pragma GCC unroll 4
            for (int v = 0; v < MV; ++v) __builtin_prefetch(xpc + (int64_t)cols[j + q] * MC + v * VL);
        }
        const float* p0 = xpc + (int64_t)cols[j] * MC;
        const float* p1 = xpc + (int64_t)cols[j + 1] * MC;
        const float* p2 = xpc + (int64_t)cols[j + 2] * MC;
        const float* p3 = xpc + (int64_t)cols[j + 3] * MC;
        const vf w0 = vbcast(to_f(vals[j])), w1 = vbcast(to_f(vals[j + 1]));
        const vf w2 = vbcast(to_f(vals[j + 2])), w3 = vbcast(to_f(vals[j + 3]));
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) {
          a0[v] += w0 * vload(p0 + v * VL);
          a1[v] += w1 * vload(p1 + v * VL);
          a2[v] += w2 * vload(p2 + v * VL);
          a3[v] += w3 * vload(p3 + v * VL);
        }
      }
      for (; j < j1; ++j) {
        const float* p0 = xpc + (int64_t)cols[j] * MC;
        const vf w0 = vbcast(to_f(vals[j]));
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) a0[v] += w0 * vload(p0 + v * VL);
      }
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) vstore(tile + r * MC + v * VL, (a0[v] + a1[v]) + (a2[v] + a3[v]));
    }
    epi_tile<TX>(e, tile, MC, nb, nr, m0, mc);
  }
}

struct CsrArgs {
  const void* x;
  int64_t M, K, N;
  const void* vals;
  const void* cols;
  int idx16;
  const int32_t* ro;
  int nthreads;
};

template <typename TI, typename TW, typename TX>
static int csr_run(const CsrArgs& a, const Epi& e) {
  const TW* vals = (const TW*)a.vals;
  const TI* cols = (const TI*)a.cols;
  const int nt = threads_for((int64_t)a.ro[a.N] * a.M * 2, a.nthreads);
  Ranges rg;
  // balance rows by non-zeros; fixed cost per row ~ 8 non-zeros; ranges aligned to 8 rows
  make_ranges(a.ro, a.N, nt, 8.0, 8, rg);
  if (a.M <= 4) {
    return over_rows<TX>(a.x, a.M, a.K, a.K, nullptr, rg, nt, [&](const float* xk, int64_t b0, int64_t b1) {
      csr_kvec<TI, TW, TX>(xk, a.K, a.M, vals, cols, a.ro, b0, b1, e);
    });
  }
  return over_token_panels<TX>(a.x, a.M, a.K, a.K, nullptr, rg, nt,
      [&](auto mv, const float* panel, int64_t m0, int64_t mc, int64_t b0, int64_t b1) {
        csr_xt<decltype(mv)::value, TI, TW, TX>(panel, m0, mc, vals, cols, a.ro, b0, b1, e);
      });
}

// ============================================================================== bitmap
// runtime/formats.BitmapWeight: tiles of TR rows x 64 columns; bitmap [N_pad][K_pad/32] int32
// (bit b of word (n, w): Wp[n, 32w+b] != 0); values tile by tile, row-major inside a tile;
// tile_offsets [tiles+1]. "Load as sparse, compute as dense": for decode (M <= 4) each
// 16-column group of a row is expanded from the packed values with its 16 mask bits
// (AVX-512 vexpandps) and FMA'd with x; for M > 4 the set bits are walked (tzcnt) and each
// non-zero is broadcast against a token vector of the transposed x panel (kept in L1).
static inline uint64_t bm_bits(const int32_t* bitmap, int64_t words_per_row, int64_t n, int64_t tc) {
  const uint32_t* w = (const uint32_t*)bitmap + n * words_per_row + 2 * tc;
  return (uint64_t)w[0] | ((uint64_t)w[1] << 32);
}

#if defined(__AVX512F__)
// One tile row (TRC rows) x one token, fp32: accumulators stay in registers; the packed
// offsets of the rows and 16-column groups come from independent popcounts (no serial
// pointer chase).
template <typename TX, int TRC = 16>
static void bitmap_row16_avx512(const float* xm, const float* vals, const int32_t* bitmap,
                                const int32_t* toff, int64_t ntc, int64_t tr, int64_t m,
                                const Epi& e) {
  const int64_t wpr = ntc * 2;
  __m512 acc[TRC];
  for (int r = 0; r < TRC; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t tc = 0; tc < ntc; ++tc) {
    const float* p = vals + toff[tr * ntc + tc];
    if (toff[tr * ntc + tc + 1] == toff[tr * ntc + tc]) continue;
    const float* xs = xm + tc * 64;
    const __m512 x0 = _mm512_loadu_ps(xs), x1 = _mm512_loadu_ps(xs + 16);
    const __m512 x2 = _mm512_loadu_ps(xs + 32), x3 = _mm512_loadu_ps(xs + 48);
    uint64_t bb[TRC];
    int off[TRC];
    int run = 0;
#pragma GCC unroll 16
    for (int r = 0; r < TRC; ++r) {
      bb[r] = bm_bits(bitmap, wpr, tr * TRC + r, tc);
      off[r] = run;
      run += __builtin_popcountll(bb[r]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < TRC; ++r) {
      const uint64_t b = bb[r];
      const float* q = p + off[r];
      const int c0 = __builtin_popcountll(b & 0xffffull);
      const int c1 = __builtin_popcountll(b & 0xffffffffull);
      const int c2 = __builtin_popcountll(b & 0xffffffffffffull);
      __m512 a = acc[r];
      a = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)b, q), x0, a);
      a = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b >> 16), q + c0), x1, a);
      a = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b >> 32), q + c1), x2, a);
      a = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b >> 48), q + c2), x3, a);
      acc[r] = a;
    }
  }
  for (int r = 0; r < TRC; ++r) {
    const int64_t n = tr * TRC + r;
    if (n < e.N) epi_store<TX>(e, m, n, _mm512_reduce_add_ps(acc[r]));
  }
}
#endif

template <typename TW, typename TX>
static void bitmap_kvec(const float* xk, int64_t Kp, int64_t M, const TW* vals, const int32_t* bitmap,
                        const int32_t* toff, int TR, int64_t ntc, int64_t tr0, int64_t tr1,
                        const Epi& e) {
  const int64_t wpr = ntc * 2;
  float res[64];
  for (int64_t tr = tr0; tr < tr1; ++tr) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xk + m * Kp;
#if defined(__AVX512F__)
      if constexpr (sizeof(TW) == 4) {
        if (TR == 16) { bitmap_row16_avx512<TX>(xm, (const float*)vals, bitmap, toff, ntc, tr, m, e); continue; }
        if (TR == 8) { bitmap_row16_avx512<TX, 8>(xm, (const float*)vals, bitmap, toff, ntc, tr, m, e); continue; }
      }
#endif
      for (int r = 0; r < TR; ++r) res[r] = 0.f;
      for (int64_t tc = 0; tc < ntc; ++tc) {
        const TW* p = vals + toff[tr * ntc + tc];
        const float* xs = xm + tc * 64;
        for (int r = 0; r < TR; ++r) {
          uint64_t b = bm_bits(bitmap, wpr, tr * TR + r, tc);
          float s = 0.f;
          while (b) {
            const int c = __builtin_ctzll(b);
            s += to_f(*p++) * xs[c];
            b &= b - 1;
          }
          res[r] += s;
        }
      }
      for (int r = 0; r < TR; ++r)
        if (tr * TR + r < e.N) epi_store<TX>(e, m, tr * TR + r, res[r]);
    }
  }
}

template <int MV, typename TW, typename TX>
static void bitmap_xt(const float* xpc, int64_t m0, int64_t mc, const TW* vals, const int32_t* bitmap,
                      const int32_t* toff, int TR, int64_t ntc, int64_t tr0, int64_t tr1,
                      const Epi& e) {
  constexpr int MC = MV * VL;
  const int64_t wpr = ntc * 2;
  alignas(64) float ctile[64 * MC];
  for (int64_t tr = tr0; tr < tr1; ++tr) {
    for (int i = 0; i < TR * MC; ++i) ctile[i] = 0.f;
    for (int64_t tc = 0; tc < ntc; ++tc) {
      const TW* p = vals + toff[tr * ntc + tc];
      if (toff[tr * ntc + tc + 1] == toff[tr * ntc + tc]) continue;
      const float* xb = xpc + tc * 64 * MC;
      for (int r = 0; r < TR; ++r) {
        uint64_t b = bm_bits(bitmap, wpr, tr * TR + r, tc);
        if (!b) continue;
        float* ct = ctile + r * MC;
        vf a0[MV], a1[MV];
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) { a0[v] = vload(ct + v * VL); a1[v] = vf{}; }
        while (b) {
          const int c0 = __builtin_ctzll(b);
          b &= b - 1;
          const vf w0 = vbcast(to_f(*p++));
          const float* x0 = xb + c0 * MC;
          if (b) {
            const int c1 = __builtin_ctzll(b);
            b &= b - 1;
            const vf w1 = vbcast(to_f(*p++));
            const float* x1 = xb + c1 * MC;
#pragma GCC unroll 4
            for (int v = 0; v < MV; ++v) {
              a0[v] += w0 * vload(x0 + v * VL);
              a1[v] += w1 * vload(x1 + v * VL);
            }
          } else {
#pragma GCC unroll 4
            for (int v = 0; v < MV; ++v) a0[v] += w0 * vload(x0 + v * VL);
          }
        }
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) vstore(ct + v * VL, a0[v] + a1[v]);
      }
    }
    epi_tile<TX>(e, ctile, MC, tr * TR, TR, m0, mc);
  }
}

struct BitmapArgs {
  const void* x;
  int64_t M, K, N;
  const void* vals;
  const int32_t* bitmap;
  const int32_t* toff;
  int TR;
  const int64_t* col_perm;
  int nthreads;
};

template <typename TW, typename TX>
static int bitmap_run(const BitmapArgs& a, const Epi& e) {
  if (a.TR <= 0 || a.TR > 64) return 1;
  const int64_t ntc = (a.K + 63) / 64, Kp = ntc * 64;
  const int64_t ntr = (a.N + a.TR - 1) / a.TR;
  const TW* vals = (const TW*)a.vals;
  const int nt = threads_for((int64_t)a.toff[ntr * ntc] * a.M * 2 + a.N * Kp / 16, a.nthreads);
  // balance tile rows by non-zeros: cumulative counts at tile-row starts
  int32_t* rowoff = (int32_t*)std::malloc(sizeof(int32_t) * (ntr + 1));
  if (!rowoff) return 2;
  for (int64_t t = 0; t <= ntr; ++t) rowoff[t] = a.toff[t * ntc];
  Ranges rg;
  make_ranges(rowoff, ntr, nt, 4.0 * a.TR, 1, rg);
  std::free(rowoff);
  if (a.M <= 4) {
    return over_rows<TX>(a.x, a.M, a.K, Kp, a.col_perm, rg, nt, [&](const float* xk, int64_t b0, int64_t b1) {
      bitmap_kvec<TW, TX>(xk, Kp, a.M, vals, a.bitmap, a.toff, a.TR, ntc, b0, b1, e);
    });
  }
  return over_token_panels<TX>(a.x, a.M, a.K, Kp, a.col_perm, rg, nt,
      [&](auto mv, const float* panel, int64_t m0, int64_t mc, int64_t b0, int64_t b1) {
        bitmap_xt<decltype(mv)::value, TW, TX>(panel, m0, mc, vals, a.bitmap, a.toff, a.TR, ntc, b0, b1, e);
      });
}

}  // namespace sparsec

// ============================================================================ entry points
// dtype codes: 0 = float32, 1 = bfloat16 (x and values share one dtype).
// Return: 0 ok, 1 unsupported arguments, 2 out of memory.
extern "C" int sparsec_vector_width() { return sparsec::VL; }

static int sparsec_bsr_dispatch(int dtype, const sparsec::BsrArgs& a, const sparsec::Epi& e);

#ifndef SPARSEC_BAKED  // a baked (per-layer) library has only its own entry point

extern "C" int sparsec_bsr_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N,
                                  const void* vals, int64_t BH, int64_t BW, const int32_t* cols,
                                  const int32_t* ro, int64_t nbr, const float* bias, int act,
                                  const void* residual, int residual_f32, const int64_t* row_perm,
                                  const int64_t* col_perm, void* out, int nthreads) {
  if (BH <= 0 || BW <= 0 || M < 0 || K < 0 || N < 0) return 1;
  if (nbr != (N + BH - 1) / BH) return 1;
  sparsec::BsrArgs a{x, M, K, N, vals, BH, BW, cols, ro, nbr, col_perm, nthreads};
  sparsec::Epi e{N, act, bias, residual, residual_f32, row_perm, out};
  if (M == 0 || N == 0) return 0;
  return sparsec_bsr_dispatch(dtype, a, e);
}

extern "C" int sparsec_csr_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N,
                                  const void* vals, const void* cols, int idx16, const int32_t* ro,
                                  const float* bias, int act, const void* residual,
                                  int residual_f32, void* out, int nthreads) {
  if (M < 0 || K < 0 || N < 0) return 1;
  sparsec::CsrArgs a{x, M, K, N, vals, cols, idx16, ro, nthreads};
  sparsec::Epi e{N, act, bias, residual, residual_f32, nullptr, out};
  if (M == 0 || N == 0) return 0;
  using sparsec::bf16;
  if (dtype == 0) {
    if (idx16) return sparsec::csr_run<uint16_t, float, float>(a, e);
    return sparsec::csr_run<int32_t, float, float>(a, e);
  }
  if (dtype == 1) {
    if (idx16) return sparsec::csr_run<uint16_t, bf16, bf16>(a, e);
    return sparsec::csr_run<int32_t, bf16, bf16>(a, e);
  }
  return 1;
}

extern "C" int sparsec_bitmap_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N,
                                     const void* vals, const int32_t* bitmap, const int32_t* toff,
                                     int tile_rows, const float* bias, int act,
                                     const void* residual, int residual_f32,
                                     const int64_t* row_perm, const int64_t* col_perm, void* out,
                                     int nthreads) {
  if (M < 0 || K < 0 || N < 0 || tile_rows <= 0 || tile_rows > 64) return 1;
  sparsec::BitmapArgs a{x, M, K, N, vals, bitmap, toff, tile_rows, col_perm, nthreads};
  sparsec::Epi e{N, act, bias, residual, residual_f32, row_perm, out};
  if (M == 0 || N == 0) return 0;
  if (dtype == 0) return sparsec::bitmap_run<float, float>(a, e);
  if (dtype == 1) return sparsec::bitmap_run<sparsec::bf16, sparsec::bf16>(a, e);
  return 1;
}

#endif  // SPARSEC_BAKED

// ----------------------------------------------------------- generated dispatch follows
