/*
 * cuda_math.cuh (internal to ops/cuda): per-dtype arithmetic of the element
 * kernels: the accumulation type of each storage type, and conversions.
 * Everything is static (internal linkage): no symbols leave the library.
 */
#ifndef FCT_CUDA_MATH_CUH
#define FCT_CUDA_MATH_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

/* Accumulator of each dtype: float for the 16-bit types and float32, double
 * for float64. */
template <typename T> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

static __device__ __forceinline__ float widen(float v) { return v; }
static __device__ __forceinline__ double widen(double v) { return v; }
static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

static __device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
static __device__ __forceinline__ void narrow(double* p, double v) { *p = v; }
static __device__ __forceinline__ void narrow(__half* p, float v) { *p = __float2half_rn(v); }
static __device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

#endif /* FCT_CUDA_MATH_CUH */
