// What every sparsec CUDA C++ linear kernel shares: storage types, the epilogue's codes, the 16-bit
// conversions, the activations and the programmatic-dependent-launch waits. nvrtc.program_text puts this
// file ahead of each kernel's source, so a kernel file reads as if it began here (NVRTC compiles one
// string, with no headers of its own).

typedef unsigned short u16;
typedef unsigned int u32;

#define WARP 32

// activation codes: the same numbers as codegen/linear_args.py's ACT_CODES
#define ACT_RELU 1
#define ACT_GELU 2
#define ACT_SILU 3
// epilogue flags
#define HAS_BIAS 1
#define HAS_RES 2

// float16 to float32
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// the storage type (DT 0: bfloat16, 1: float16) to float32; bfloat16 is the top half of a float32
template <int DT> __device__ __forceinline__ float to_f32(u16 v) {
    return DT == 0 ? __uint_as_float((u32)v << 16) : f16_to_f32(v);
}

// float32 to the storage type, rounded to nearest even
template <int DT> __device__ __forceinline__ u16 from_f32(float f) {
    u16 v;
    if (DT == 0) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

__device__ __forceinline__ float activate(float v, int act) {
    if (act == ACT_RELU) return fmaxf(v, 0.0f);
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));  // exact (erf) gelu
    if (act == ACT_SILU) return v / (1.0f + expf(-v));
    return v;
}

// the epilogue's last step, the same in every kernel: y (bias and activation applied) plus the residual where
// there is one, stored at out[m, n]
template <int DT>
__device__ __forceinline__ void store_output(u16* __restrict__ out, int ldo, const u16* __restrict__ res, int ldr,
                                             int flags, int m, int n, float y) {
    if (flags & HAS_RES) y += to_f32<DT>(res[(long long)m * ldr + n]);
    out[(long long)m * ldo + n] = from_f32<DT>(y);
}

// Programmatic dependent launch (sm_90 and later; nvrtc.launch with pdl=True): a thread block may start while
// the kernel ahead of it in the stream still runs. It may read constants (the weights) at once, and waits
// (wait_for_producer) before its first read of that kernel's output (x, the residual) or its first write.
// release_dependents lets the next kernel's blocks be scheduled; that kernel still waits for this one to
// finish before reading anything. Both are no-ops in a launch without PDL.
__device__ __forceinline__ void wait_for_producer() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void release_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
