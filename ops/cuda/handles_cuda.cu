/*
 * The library handles of libfactorch_cuda, cuBLAS and cuSOLVER, in one
 * cache. A handle belongs to the device current when it was created and must
 * not be used by two threads at once: each thread keeps one of each per
 * device, created on first use and bound to the caller's stream on every
 * call (torch's current stream changes from call to call).
 */
#include <pthread.h>

#include "decompose_cuda.cuh"

#define FCT_CUDA_MAX_DEVICES 64

typedef struct fct_cuda_handles {
  cublasHandle_t blas[FCT_CUDA_MAX_DEVICES];
  cusolverDnHandle_t solver[FCT_CUDA_MAX_DEVICES];
} fct_cuda_handles;

static __thread fct_cuda_handles t_handles;

/* C linkage throughout, static helpers included: no C++ symbols. */
extern "C" {

/* A thread-specific key whose destructor releases a thread's handles when
 * the thread exits (pthread_exit or return; not at process exit, when the
 * driver may already be gone). */
static pthread_key_t g_handles_key;
static pthread_once_t g_handles_once = PTHREAD_ONCE_INIT;
static bool g_handles_key_ok;

static void destroy_handles(void* arg) {
  fct_cuda_handles* hs = (fct_cuda_handles*)arg;
  for (int d = 0; d < FCT_CUDA_MAX_DEVICES; ++d) {
    if (!hs->blas[d] && !hs->solver[d]) continue;
    /* A handle is destroyed on its own device; if CUDA is shutting down we
     * cannot, and the process is ending anyway. */
    if (cudaSetDevice(d) == cudaSuccess) {
      if (hs->blas[d]) cublasDestroy(hs->blas[d]);
      if (hs->solver[d]) cusolverDnDestroy(hs->solver[d]);
    }
    hs->blas[d] = NULL;
    hs->solver[d] = NULL;
  }
}

static void make_handles_key(void) {
  g_handles_key_ok = pthread_key_create(&g_handles_key, destroy_handles) == 0;
}

/* Registers this thread's handles for release at its exit. */
static void remember_handles(void) {
  pthread_once(&g_handles_once, make_handles_key);
  if (g_handles_key_ok) pthread_setspecific(g_handles_key, &t_handles);
}

static fct_status check_device(fct_context* ctx, int dev) {
  if (dev < 0 || dev >= FCT_CUDA_MAX_DEVICES)
    return fct_fail(ctx, FCT_ERR_UNSUPPORTED, "cuda device %d: at most %d devices are supported",
                    dev, FCT_CUDA_MAX_DEVICES);
  return FCT_OK;
}

fct_status fct_cuda_blas_handle(fct_context* ctx, int dev, cudaStream_t stream,
                                cublasHandle_t* out) {
  FCT_TRY(check_device(ctx, dev));
  if (!t_handles.blas[dev]) {
    cublasHandle_t h;
    FCT_TRY(fct_cublas_check(ctx, cublasCreate(&h), "cublasCreate"));
    t_handles.blas[dev] = h;
    remember_handles();
  }
  FCT_TRY(fct_cublas_check(ctx, cublasSetStream(t_handles.blas[dev], stream), "cublasSetStream"));
  *out = t_handles.blas[dev];
  return FCT_OK;
}

fct_status fct_cudec_solver(fct_context* ctx, const fct_cuda_env* env, cusolverDnHandle_t* out) {
  int dev = env->device;
  FCT_TRY(check_device(ctx, dev));
  if (!t_handles.solver[dev]) {
    cusolverDnHandle_t h = NULL;
    FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnCreate(&h), "cusolverDnCreate"));
    t_handles.solver[dev] = h;
    remember_handles();
  }
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnSetStream(t_handles.solver[dev], env->stream),
                                 "cusolverDnSetStream"));
  *out = t_handles.solver[dev];
  return FCT_OK;
}

} /* extern "C" */
