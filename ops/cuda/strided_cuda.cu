/*
 * CUDA element-wise passes over tensors of any strides (negative, zero,
 * gaps): packing into a dense row-major buffer, and counting NaN/Inf.
 * CPU counterpart: ops/cpu/strided_cpu.c.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_common.cuh"

/* A tensor's index space with size-1 dims dropped and each dim merged into
 * its outer neighbour where the two are contiguous: fewer divisions per
 * element. Passed to kernels by value (136 bytes of parameters). */
typedef struct strided_desc {
  int ndim;
  int64_t shape[FCT_MAX_DIMS];
  int64_t stride[FCT_MAX_DIMS]; /* elements */
} strided_desc;

/* Element offset of the i-th element in row-major order. */
static __device__ __forceinline__ int64_t offset_of(const strided_desc& d, int64_t i) {
  int64_t off = 0;
#pragma unroll
  for (int k = FCT_MAX_DIMS - 1; k >= 0; --k) {
    if (k >= d.ndim) continue;
    int64_t n = d.shape[k];
    off += (i % n) * d.stride[k];
    i /= n;
  }
  return off;
}

/* dst [n] (dense, row-major order of src) = src (strides d). E: an unsigned
 * integer of the element's size, since packing only moves bits. */
template <typename E>
static __global__ void pack_kernel(strided_desc d, const E* src, E* dst, int64_t n) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
    dst[i] = src[offset_of(d, i)];
}

template <typename E>
static void launch_pack(const fct_cuda_env* env, const strided_desc& d, const char* src,
                        char* dst, int64_t n) {
  pack_kernel<E><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      d, (const E*)src, (E*)dst, n);
}

static __device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }
static __device__ __forceinline__ bool is_finite(double v) { return isfinite(v); }
static __device__ __forceinline__ bool is_finite(__half v) { return isfinite(__half2float(v)); }
static __device__ __forceinline__ bool is_finite(__nv_bfloat16 v) {
  return isfinite(__bfloat162float(v));
}

/* *count += number of NaN/Inf among src's n elements (strides d). */
template <typename T>
static __global__ void count_nonfinite_kernel(strided_desc d, const T* src, int64_t n,
                                              unsigned long long* count) {
  unsigned long long c = 0;
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
    c += !is_finite(src[offset_of(d, i)]);
  /* One atomic per warp: blockDim is a multiple of 32, every lane gets here. */
  for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
  if ((threadIdx.x & 31) == 0 && c) atomicAdd(count, c);
}

template <typename T>
static void launch_count(const fct_cuda_env* env, const strided_desc& d, const char* src,
                         int64_t n, unsigned long long* count) {
  count_nonfinite_kernel<T><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      d, (const T*)src, n, count);
}

/* C linkage from here on, static helpers included: no C++ symbols. */
extern "C" {

static strided_desc describe(const DLTensor* t) {
  int64_t st[FCT_MAX_DIMS];
  fct_strides(t, st);
  strided_desc d;
  d.ndim = 0;
  for (int i = 0; i < t->ndim; ++i) {
    int64_t n = t->shape[i];
    if (n == 1) continue;
    if (d.ndim > 0 && d.stride[d.ndim - 1] == st[i] * n) {
      d.shape[d.ndim - 1] *= n; /* the outer dim steps over exactly this one */
      d.stride[d.ndim - 1] = st[i];
    } else {
      d.shape[d.ndim] = n;
      d.stride[d.ndim] = st[i];
      ++d.ndim;
    }
  }
  return d;
}

static fct_status pack_on(fct_context* ctx, const fct_cuda_env* env, const DLTensor* src,
                          char* dst, int64_t n) {
  strided_desc d = describe(src);
  size_t es = (size_t)src->dtype.bits / 8;
  if (d.ndim == 0 || (d.ndim == 1 && d.stride[0] == 1)) /* already dense */
    return fct_cuda_check(ctx,
                          cudaMemcpyAsync(dst, fct_data(src), (size_t)n * es,
                                          cudaMemcpyDeviceToDevice, env->stream),
                          "cudaMemcpyAsync (pack)");
  if (es == 8) launch_pack<unsigned long long>(env, d, fct_data(src), dst, n);
  else if (es == 4) launch_pack<unsigned int>(env, d, fct_data(src), dst, n);
  else launch_pack<unsigned short>(env, d, fct_data(src), dst, n);
  return fct_cuda_check_launch(ctx, "pack_kernel");
}

static fct_status count_on(fct_context* ctx, const fct_cuda_env* env, const DLTensor* t,
                           int64_t n, char* scratch, int64_t* count) {
  unsigned long long* dcount = (unsigned long long*)scratch;
  unsigned long long host = 0;
  strided_desc d = describe(t);
  FCT_TRY(fct_cuda_check(ctx, cudaMemsetAsync(dcount, 0, sizeof *dcount, env->stream),
                         "cudaMemsetAsync (count_nonfinite)"));
  switch (fct_dtype_of(t->dtype)) {
    case FCT_F32: launch_count<float>(env, d, fct_data(t), n, dcount); break;
    case FCT_F64: launch_count<double>(env, d, fct_data(t), n, dcount); break;
    case FCT_BF16: launch_count<__nv_bfloat16>(env, d, fct_data(t), n, dcount); break;
    case FCT_F16: launch_count<__half>(env, d, fct_data(t), n, dcount); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "count_nonfinite: unsupported dtype");
  }
  FCT_TRY(fct_cuda_check_launch(ctx, "count_nonfinite_kernel"));
  FCT_TRY(fct_cuda_check(ctx,
                         cudaMemcpyAsync(&host, dcount, sizeof host, cudaMemcpyDeviceToHost,
                                         env->stream),
                         "cudaMemcpyAsync (count_nonfinite)"));
  /* The one host sync of FCT_FLAG_CHECK_FINITE (see factorch.h). */
  FCT_TRY(fct_cuda_check(ctx, cudaStreamSynchronize(env->stream),
                         "cudaStreamSynchronize (count_nonfinite)"));
  *count = (int64_t)host;
  return FCT_OK;
}

fct_status fct_cuda_pack(fct_context* ctx, const DLTensor* src, char* dst) {
  int64_t n = fct_numel(src);
  if (n <= 0) return FCT_OK;
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, src->device.device_id, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, pack_on(ctx, &env, src, dst, n));
}

fct_status fct_cuda_count_nonfinite(fct_context* ctx, const DLTensor* t, char* scratch,
                                    int64_t* count) {
  *count = 0;
  int64_t n = fct_numel(t);
  if (n <= 0) return FCT_OK;
  if (!scratch)
    return fct_fail(ctx, FCT_ERR_WORKSPACE, "workspace: the finite check needs scratch space");
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, t->device.device_id, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, count_on(ctx, &env, t, n, scratch, count));
}

} /* extern "C" */
