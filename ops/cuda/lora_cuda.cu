/*
 * CUDA primitives of the LoRA linear op (float32, float64, bfloat16,
 * float16): the scaled GEMM and the dropout mask, which draws exactly the
 * CPU's bits (ops/lora_dropout.h, compiled here for the device). Entry point
 * and checks: ops/lora_linear.c; CPU counterpart: ops/cpu/lora_cpu.c.
 */
#include "cuda_common.cuh"
#include "cuda_math.cuh"
#include "lora_dropout.h"

/* out [rows, cols] (row stride ors, unit column stride) = in (strides irs,
 * ics) ⊙ mask · scale. The product is taken in the accumulation type and
 * rounded once, as the CPU does for float32/float64. In place when out is
 * in. */
template <typename T>
static __global__ void dropout_kernel(const T* in, int64_t irs, int64_t ics, T* out, int64_t ors,
                                      int64_t rows, int64_t cols, uint64_t seed,
                                      uint64_t threshold, typename acc_of<T>::type scale) {
  typedef typename acc_of<T>::type Acc;
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t r = i / cols, c = i - r * cols;
    bool keep = fct_dropout_bits(seed, (uint64_t)i) >= threshold;
    Acc v = keep ? (Acc)widen(in[r * irs + c * ics]) * scale : (Acc)0;
    narrow(out + r * ors + c, v);
  }
}

template <typename T>
static void launch_dropout(const fct_cuda_env* env, const fct_mat* in, const fct_mat* out,
                           uint64_t seed, uint64_t threshold, double scale) {
  int64_t n = in->rows * in->cols;
  dropout_kernel<T><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      (const T*)in->data, in->rs, in->cs, (T*)out->data, out->rs, in->rows, in->cols, seed,
      threshold, (typename acc_of<T>::type)scale);
}

extern "C" {

fct_status fct_cuda_gemm_scaled_entry(fct_context* ctx, int device, fct_dtype dt, double alpha,
                                      const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                      double beta) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, true, &env));
  return fct_cuda_leave(ctx, &env, fct_cuda_gemm_scaled(ctx, &env, dt, alpha, A, B, C, beta));
}

static fct_status dropout_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                             const fct_mat* in, const fct_mat* out, uint64_t seed,
                             uint64_t threshold, double scale) {
  if (in->rows == 0 || in->cols == 0) return FCT_OK;
  if (out->cs != 1)
    return fct_fail(ctx, FCT_ERR_LAYOUT, "dropout (cuda): the output must be dense rows");
  switch (dt) {
    case FCT_F32: launch_dropout<float>(env, in, out, seed, threshold, scale); break;
    case FCT_F64: launch_dropout<double>(env, in, out, seed, threshold, scale); break;
    case FCT_BF16: launch_dropout<__nv_bfloat16>(env, in, out, seed, threshold, scale); break;
    case FCT_F16: launch_dropout<__half>(env, in, out, seed, threshold, scale); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "dropout (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "dropout_kernel");
}

fct_status fct_cuda_dropout(fct_context* ctx, int device, fct_dtype dt, const fct_mat* in,
                            const fct_mat* out, uint64_t seed, uint64_t threshold, double scale) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, dropout_on(ctx, &env, dt, in, out, seed, threshold, scale));
}

} /* extern "C" */
