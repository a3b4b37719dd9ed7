/*
 * The CUDA backend table, registered with libfactorch when libfactorch_cuda
 * is loaded; the device guard and the mapping of CUDA/cuBLAS errors to
 * fct_status. The cuBLAS handles: handles_cuda.cu.
 */
#include "cuda_common.cuh"
#include "embedding_cuda.cuh" /* factorized embeddings */

/* C linkage throughout, static helpers included: no C++ symbols. */
extern "C" {

fct_status fct_cuda_check(fct_context* ctx, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_CUDA, "%s failed: %s: %s", what, cudaGetErrorName(err),
                  cudaGetErrorString(err));
}

fct_status fct_cublas_check(fct_context* ctx, cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_BLAS, "%s failed: %s", what, cublasGetStatusName(st));
}

fct_status fct_cuda_check_launch(fct_context* ctx, const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_CUDA, "launch of %s failed: %s: %s", kernel,
                  cudaGetErrorName(err), cudaGetErrorString(err));
}

unsigned fct_cuda_blocks(int64_t n) {
  int64_t b = (n + FCT_CUDA_THREADS - 1) / FCT_CUDA_THREADS;
  return (unsigned)(b < FCT_CUDA_MAX_BLOCKS ? b : FCT_CUDA_MAX_BLOCKS);
}

fct_status fct_cuda_enter(fct_context* ctx, int device, const void* ptr, bool with_blas,
                          fct_cuda_env* env) {
  env->stream = (cudaStream_t)ctx->stream;
  env->blas = NULL;
  FCT_TRY(fct_cuda_check(ctx, cudaGetDevice(&env->prev_device), "cudaGetDevice"));
  env->device = device >= 0 ? device : env->prev_device;
  if (device < 0 && ptr) {
    /* The plan carries pointers, not device ids: ask the driver which device
     * owns the memory, so a caller whose current device differs still gets
     * the work run where the tensors live. */
    cudaPointerAttributes a;
    FCT_TRY(fct_cuda_check(ctx, cudaPointerGetAttributes(&a, ptr), "cudaPointerGetAttributes"));
    if (a.type == cudaMemoryTypeDevice && a.device >= 0) env->device = a.device;
  }
  if (env->device != env->prev_device)
    FCT_TRY(fct_cuda_check(ctx, cudaSetDevice(env->device), "cudaSetDevice"));
  if (with_blas) {
    fct_status s = fct_cuda_blas_handle(ctx, env->device, env->stream, &env->blas);
    if (s != FCT_OK) return fct_cuda_leave(ctx, env, s);
  }
  return FCT_OK;
}

fct_status fct_cuda_leave(fct_context* ctx, const fct_cuda_env* env, fct_status status) {
  if (env->device == env->prev_device) return status;
  cudaError_t err = cudaSetDevice(env->prev_device);
  if (status == FCT_OK) return fct_cuda_check(ctx, err, "cudaSetDevice (restoring the device)");
  return status;
}

/* Static storage: libfactorch keeps the pointer for the life of the process.
 * Filled by name in the constructor (designated initializers are C++20, and
 * positional ones break silently when fct_backend gains a field). */
static fct_backend kCudaBackend;

/* Runs when libfactorch_cuda is loaded. Must not touch CUDA: initialising
 * the driver from a constructor would cost every process that merely loads
 * the library, and fails in forked children. */
__attribute__((constructor)) static void register_cuda_backend(void) {
  fct_backend* b = &kCudaBackend;
  b->pack = fct_cuda_pack;
  b->count_nonfinite = fct_cuda_count_nonfinite;
  b->gemm = fct_cuda_gemm_entry;
  b->gemm_reduce = fct_cuda_gemm_reduce_entry;
  b->fill_rows = fct_cuda_fill_rows_entry;
  b->column_sums = fct_cuda_column_sums_entry;
  b->zero = fct_cuda_zero_entry;
  b->khatri_rao = fct_cuda_khatri_rao;
  b->khatri_rao_grad = fct_cuda_khatri_rao_grad;
  b->im2col = fct_cuda_im2col;
  b->col2im = fct_cuda_col2im;
  b->depthwise_forward = fct_cuda_depthwise_forward;
  b->depthwise_backward_input = fct_cuda_depthwise_backward_input;
  b->depthwise_backward_weight = fct_cuda_depthwise_backward_weight;
  b->channel_bias = fct_cuda_channel_bias;
  b->channel_sums = fct_cuda_channel_sums;
  /* Factorized embeddings (ops/cuda/embedding_cuda.cu). */
  b->embedding_indices = fct_cuda_embedding_indices;
  b->embedding_gather = fct_cuda_embedding_gather;
  b->embedding_scatter_add = fct_cuda_embedding_scatter_add;
  b->tt_embedding_rows = fct_cuda_tt_embedding_rows;
  b->tt_embedding_grad = fct_cuda_tt_embedding_grad;
  /* LoRA linear (ops/cuda/lora_cuda.cu). */
  b->gemm_scaled = fct_cuda_gemm_scaled_entry;
  b->dropout = fct_cuda_dropout;
  fct_register_cuda_backend(b);
}

} /* extern "C" */
