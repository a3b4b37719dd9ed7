/*
 * cuda_common.cuh (internal to ops/cuda): what the CUDA backend's files share:
 * error mapping, the per-call device/stream/cuBLAS state, launch sizes.
 * Everything here has C linkage and hidden visibility (CMake's visibility
 * preset), so libfactorch_cuda exports no C++ symbols.
 */
#ifndef FCT_CUDA_COMMON_CUH
#define FCT_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend.h"

/* Threads per block of the element-wise kernels, and a cap on blocks: the
 * kernels loop grid-stride, so more blocks than this only add scheduling. */
#define FCT_CUDA_THREADS 256
#define FCT_CUDA_MAX_BLOCKS 65536

/* Where one backend call runs: the tensors' device (made current for the
 * call, the caller's device restored after), the caller's stream, and this
 * thread's cuBLAS handle for that device (NULL unless asked for). */
typedef struct fct_cuda_env {
  int device, prev_device;
  cudaStream_t stream;
  cublasHandle_t blas;
} fct_cuda_env;

extern "C" {

/* FCT_OK, or FCT_ERR_CUDA with "<what> failed: <error name>: <text>". */
fct_status fct_cuda_check(fct_context* ctx, cudaError_t err, const char* what);
/* FCT_OK, or FCT_ERR_BLAS with "<what> failed: CUBLAS_STATUS_...". */
fct_status fct_cublas_check(fct_context* ctx, cublasStatus_t st, const char* what);
/* After kernel launches: a launch error (bad configuration, no device...). */
fct_status fct_cuda_check_launch(fct_context* ctx, const char* kernel);

/* Enters device `device` (-1: the device that owns `ptr`, or the current one
 * when ptr is NULL or host memory). with_blas: also fetch this thread's cuBLAS
 * handle for the device, bound to ctx->stream. On success the caller must end
 * with fct_cuda_leave. */
fct_status fct_cuda_enter(fct_context* ctx, int device, const void* ptr, bool with_blas,
                          fct_cuda_env* env);
/* Restores the caller's device; returns status (or a failure to restore). */
fct_status fct_cuda_leave(fct_context* ctx, const fct_cuda_env* env, fct_status status);

/* This thread's cuBLAS handle for device dev, bound to stream
 * (handles_cuda.cu, which also keeps the cuSOLVER ones). */
fct_status fct_cuda_blas_handle(fct_context* ctx, int dev, cudaStream_t stream,
                                cublasHandle_t* out);

/* Blocks for n elements (n > 0), capped at FCT_CUDA_MAX_BLOCKS. */
unsigned fct_cuda_blocks(int64_t n);

/* The backend's entry points (fct_backend in backend.h). */
fct_status fct_cuda_pack(fct_context* ctx, const DLTensor* src, char* dst);
fct_status fct_cuda_count_nonfinite(fct_context* ctx, const DLTensor* t, char* scratch,
                                    int64_t* count);

/* GEMMs on row-major views (gemm_cuda.cu) and row kernels (rows_cuda.cu),
 * run inside an entered env (env->blas set for the GEMMs). Semantics as the
 * fct_backend entries gemm / gemm_reduce / fill_rows / zero / column_sums. */
fct_status fct_cuda_gemm(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                         const fct_mat* A, const fct_mat* B, const fct_mat* C, double beta);
/* C = alpha·A·B + beta·C, otherwise as fct_cuda_gemm. */
fct_status fct_cuda_gemm_scaled(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                double alpha, const fct_mat* A, const fct_mat* B,
                                const fct_mat* C, double beta);
fct_status fct_cuda_gemm_batched(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                 const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                 double beta, int64_t batch, int64_t sa, int64_t sb, int64_t sc);
fct_status fct_cuda_gemm_reduce(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                double beta, int64_t batch, int64_t sa, int64_t sb, char* scratch,
                                size_t scratch_bytes);
fct_status fct_cuda_fill_rows(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* y, const char* bias, int64_t bs);
fct_status fct_cuda_zero_rows(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* c);
fct_status fct_cuda_column_sums(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                const fct_mat* g, char* gb);

/* The tensorized linear ops' primitives (tensor_kernels_cuda.cu). */
fct_status fct_cuda_gemm_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                               const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                               int64_t sa, int64_t sb, int64_t sc);
fct_status fct_cuda_gemm_reduce_entry(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                      double beta, int64_t batch, int64_t sa, int64_t sb,
                                      char* scratch, size_t scratch_bytes);
fct_status fct_cuda_fill_rows_entry(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* y, const char* bias, int64_t bs);
fct_status fct_cuda_column_sums_entry(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_mat* g, char* out);
fct_status fct_cuda_zero_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C);
fct_status fct_cuda_khatri_rao(fct_context* ctx, int device, fct_dtype dt, int nf,
                               const fct_mat* F, const fct_mat* out);
fct_status fct_cuda_khatri_rao_grad(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* gK, int64_t npre, int64_t nk, int64_t nsuf,
                                    const fct_mat* pre, const fct_mat* suf, const fct_mat* gF);

/* The LoRA op's primitives (lora_cuda.cu). */
fct_status fct_cuda_gemm_scaled_entry(fct_context* ctx, int device, fct_dtype dt, double alpha,
                                      const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                      double beta);
fct_status fct_cuda_dropout(fct_context* ctx, int device, fct_dtype dt, const fct_mat* in,
                            const fct_mat* out, uint64_t seed, uint64_t threshold, double scale);

/* The factorized convolutions' primitives (conv_kernels_cuda.cu). */
fct_status fct_cuda_im2col(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                           int64_t n, const char* in, char* col);
fct_status fct_cuda_col2im(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                           int64_t n, const char* col, char* in);
fct_status fct_cuda_depthwise_forward(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_conv_geom* g, int64_t n, const char* in,
                                      const char* w, char* out);
fct_status fct_cuda_depthwise_backward_input(fct_context* ctx, int device, fct_dtype dt,
                                             const fct_conv_geom* g, int64_t n, const char* gout,
                                             const char* w, char* gin);
fct_status fct_cuda_depthwise_backward_weight(fct_context* ctx, int device, fct_dtype dt,
                                              const fct_conv_geom* g, int64_t n, const char* in,
                                              const char* gout, char* gw, double beta);
fct_status fct_cuda_channel_bias(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                 int64_t C, int64_t P, char* out, const char* bias, int64_t bs);
fct_status fct_cuda_channel_sums(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                                 int64_t P, const char* g, char* sums);

} /* extern "C" */

#endif /* FCT_CUDA_COMMON_CUH */
