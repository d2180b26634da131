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
#ifdef _OPENMP
#include <omp.h>
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
static inline vf vbcast(float s) { return vf{} + s; }
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
template <typename TX>
static inline void epi_tile(const Epi& e, const float* tile, int64_t ld, int64_t r0, int nr,
                            int64_t m0, int64_t mc) {
  int nv = (int)std::min<int64_t>(nr, e.N - r0);
  for (int64_t i = 0; i < mc; ++i)
    for (int r = 0; r < nv; ++r) epi_store<TX>(e, m0 + i, r0 + r, tile[r * ld + i]);
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
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
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

// Choose tokens per chunk: MV vectors (1..3) and the chunk count, minimizing padding.
static void choose_chunks(int64_t M, int* MV, int64_t* nch) {
  const int64_t maxmc = 3 * VL;
  int64_t n = (M + maxmc - 1) / maxmc;
  int64_t per = (M + n - 1) / n;
  int mv = (int)((per + VL - 1) / VL);
  *MV = std::max(1, std::min(3, mv));
  *nch = (M + (int64_t)(*MV) * VL - 1) / ((int64_t)(*MV) * VL);
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
  constexpr int NR = BH < 8 ? BH : 8;
  constexpr int MC = MV * VL;
  static_assert(BH % NR == 0, "bad specialization");
  alignas(64) float tile[NR * MC];
  for (int64_t br = br0; br < br1; ++br) {
    const int32_t j0 = ro[br], j1 = ro[br + 1];
    for (int r0 = 0; r0 < BH; r0 += NR) {
      vf acc[NR][MV];
#pragma GCC unroll 64
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) acc[r][v] = vf{};
      for (int32_t j = j0; j < j1; ++j) {
        const TW* w = vals + (int64_t)j * (BH * BW) + r0 * BW;
        const float* xb = xpc + (int64_t)cols[j] * (BW * MC);
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
      }
      for (int r = 0; r < NR; ++r)
        for (int v = 0; v < MV; ++v) vstore(tile + r * MC + v * VL, acc[r][v]);
      epi_tile<TX>(e, tile, MC, br * BH + r0, NR, m0, mc);
    }
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
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(a.nthreads, 64));
  int64_t bounds[65];
  // a block row's fixed cost (epilogue) ~ 1/4 block
  balance(a.ro, a.nbr, nt, 0.25, bounds);
  if (a.M <= 4) {
    float* xk = alloc_f(a.M * Kp);
    if (!xk) return 2;
    pack_rows<TX>((const TX*)a.x, a.M, a.K, Kp, a.col_perm, xk);
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num();
#else
      const int t = 0;
#endif
      const int64_t b0 = bounds[t], b1 = bounds[t + 1];
      switch (a.M) {
        case 1: bsr_kvec<BH, BW, 1, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 2: bsr_kvec<BH, BW, 2, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 3: bsr_kvec<BH, BW, 3, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        case 4: bsr_kvec<BH, BW, 4, TW, TX>(xk, Kp, vals, a.cols, a.ro, b0, b1, e); break;
        default: break;
      }
    }
    std::free(xk);
    return 0;
  }
  int MV;
  int64_t nch;
  choose_chunks(a.M, &MV, &nch);
  const int MC = MV * VL;
  float* xp = alloc_f(nch * Kp * MC);
  if (!xp) return 2;
  pack_xt<TX>((const TX*)a.x, a.M, a.K, Kp, a.col_perm, MC, nch, xp, nt);
  // few block rows but many chunks: split chunks over threads instead of rows
  const bool by_chunk = a.nbr < 4 * nt && nch >= nt;
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    int64_t b0 = bounds[t], b1 = bounds[t + 1], c0 = 0, c1 = nch;
    if (by_chunk) {
      b0 = 0; b1 = a.nbr;
      c0 = nch * t / nt; c1 = nch * (t + 1) / nt;
    }
    for (int64_t c = c0; c < c1; ++c) {
      const float* xpc = xp + c * Kp * MC;
      const int64_t m0 = c * MC, mc = std::min<int64_t>(MC, a.M - m0);
      switch (MV) {
        case 1: bsr_xt<BH, BW, 1, TW, TX>(xpc, m0, mc, vals, a.cols, a.ro, b0, b1, e); break;
        case 2: bsr_xt<BH, BW, 2, TW, TX>(xpc, m0, mc, vals, a.cols, a.ro, b0, b1, e); break;
        default: bsr_xt<BH, BW, 3, TW, TX>(xpc, m0, mc, vals, a.cols, a.ro, b0, b1, e); break;
      }
    }
  }
  std::free(xp);
  return 0;
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
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(a.nthreads, 64));
  int64_t bounds[65];
  // balance rows by non-zeros; fixed cost per row ~ 8 non-zeros; align to 8 rows
  balance(a.ro, a.N, nt, 8.0, bounds);
  for (int t = 1; t < nt; ++t) bounds[t] = std::min<int64_t>(a.N, (bounds[t] + 7) / 8 * 8);
  for (int t = 1; t < nt; ++t) bounds[t] = std::max(bounds[t], bounds[t - 1]);
  if (a.M <= 4) {
    float* xk = alloc_f(a.M * a.K);
    if (!xk) return 2;
    pack_rows<TX>((const TX*)a.x, a.M, a.K, a.K, nullptr, xk);
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num();
#else
      const int t = 0;
#endif
      csr_kvec<TI, TW, TX>(xk, a.K, a.M, vals, cols, a.ro, bounds[t], bounds[t + 1], e);
    }
    std::free(xk);
    return 0;
  }
  int MV;
  int64_t nch;
  choose_chunks(a.M, &MV, &nch);
  const int MC = MV * VL;
  float* xp = alloc_f(nch * a.K * MC);
  if (!xp) return 2;
  pack_xt<TX>((const TX*)a.x, a.M, a.K, a.K, nullptr, MC, nch, xp, nt);
  const bool by_chunk = a.N < 32 * nt && nch >= nt;
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    int64_t n0 = bounds[t], n1 = bounds[t + 1], c0 = 0, c1 = nch;
    if (by_chunk) {
      n0 = 0; n1 = a.N;
      c0 = nch * t / nt; c1 = nch * (t + 1) / nt;
    }
    for (int64_t c = c0; c < c1; ++c) {
      const float* xpc = xp + c * a.K * MC;
      const int64_t m0 = c * MC, mc = std::min<int64_t>(MC, a.M - m0);
      switch (MV) {
        case 1: csr_xt<1, TI, TW, TX>(xpc, m0, mc, vals, cols, a.ro, n0, n1, e); break;
        case 2: csr_xt<2, TI, TW, TX>(xpc, m0, mc, vals, cols, a.ro, n0, n1, e); break;
        default: csr_xt<3, TI, TW, TX>(xpc, m0, mc, vals, cols, a.ro, n0, n1, e); break;
      }
    }
  }
  std::free(xp);
  return 0;
}

}  // namespace sparsec

// ============================================================================ entry points
// dtype codes: 0 = float32, 1 = bfloat16 (x and values share one dtype).
// Return: 0 ok, 1 unsupported arguments, 2 out of memory.
extern "C" int sparsec_vector_width() { return sparsec::VL; }

static int sparsec_bsr_dispatch(int dtype, const sparsec::BsrArgs& a, const sparsec::Epi& e);

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

// ----------------------------------------------------------- generated dispatch follows
