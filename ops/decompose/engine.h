/*
 * engine.h (internal): where the dense float64 work of CP-ALS, Tucker-HOOI
 * and TT-SVD runs. The algorithms (cp_als.c, tucker_hooi.c,
 * tensor_train.c) are written once, over this table; ops/cpu/engine_cpu.c
 * runs it on the host (OpenBLAS + LAPACK), ops/cuda/engine_cuda.cu on a GPU
 * (cuBLAS + cuSOLVER + a few kernels), registered with libfactorch when
 * libfactorch_cuda is loaded.
 *
 * A second table beside the layers' backend (ops/backend.h) because it
 * serves a second purpose: a decomposition is a one-off factorisation in
 * float64 whatever the tensor's dtype, over column-major LAPACK-style
 * buffers, and needs SVDs, QR and mode products; the layers' primitives run
 * every step of training in the tensors' own dtype over row-major strided
 * views (fct_mat), batched, with no factorisation. Neither table's entries
 * would fit the other's callers without a conversion at every call.
 *
 * Every double* handed to an engine is in the engine's memory (laid out in
 * ctx->workspace), except where marked host. Matrices are column-major with
 * their leading dimension equal to their row count, as in linalg_cpu.h; a
 * dense row-major [a, b] buffer is the column-major [b, a] matrix.
 * Calls are ordered: on CUDA they run on ctx->stream, and the ones that
 * return a host value (scan, sumsq, to_host, top_left_sv's and svd's
 * failure codes) synchronise it.
 */
#ifndef FCT_DEC_ENGINE_H
#define FCT_DEC_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "fct_tensor.h"
#include "fct_try.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The dims of a dense row-major tensor (at most FCT_MAX_DIMS modes). */
typedef struct fct_dims {
  int N;
  int64_t dim[8];
} fct_dims;

typedef struct fct_dec_engine fct_dec_engine;

/* One decomposition call: its context, engine and device (CUDA ordinal; 0
 * on the CPU). */
typedef struct fct_dec_run {
  fct_context* ctx;
  const fct_dec_engine* e;
  int device;
} fct_dec_run;

struct fct_dec_engine {
  bool host; /* the engine's memory is the host's: to_host/to_device are copies within it */

  /* Doubles of workspace that scan needs. */
  int64_t scan_scratch;
  /* *sumsq (host) = Σ x[i]², i < n; FCT_ERR_NOT_FINITE naming `name` when
   * x holds NaN/Inf (how many) or the sum overflows. */
  fct_status (*scan)(const fct_dec_run* r, const char* name, const double* x, int64_t n,
                     double* sumsq, double* scratch);
  /* dst (numel, dense row-major) = X (any strides, float32/float64) as
   * float64. */
  fct_status (*load)(const fct_dec_run* r, const DLTensor* X, double* dst);
  /* U [rows, cols] column-major = F, a dense row-major [rows, cols] tensor
   * of either float dtype (a factor handed in by FCT_INIT_GIVEN). */
  fct_status (*load_transposed)(const fct_dec_run* r, const DLTensor* F, int64_t rows,
                                int64_t cols, double* U);
  /* out (dense row-major, out's dtype) elements off + i·cols + j, for
   * i < rows, j < cols, = src[i·rs + j·cs]. */
  fct_status (*store)(const fct_dec_run* r, DLTensor* out, int64_t off, const double* src,
                      int64_t rows, int64_t cols, int64_t rs, int64_t cs);
  /* dst[i·cols + j] = f[i]·src[i·rs + j·cs] (f NULL: 1); dst must not
   * overlap src. */
  fct_status (*copy)(const fct_dec_run* r, double* dst, const double* src, int64_t rows,
                     int64_t cols, int64_t rs, int64_t cs, const double* f);
  /* Byte copies between the engine's memory and the host's. */
  fct_status (*to_host)(const fct_dec_run* r, void* host_dst, const void* src, size_t bytes);
  fct_status (*to_device)(const fct_dec_run* r, void* dst, const void* host_src, size_t bytes);
  /* a[i] = fct_rng_uniform(seed, stream, i), i < n. */
  fct_status (*uniform)(const fct_dec_run* r, double* a, int64_t n, uint64_t seed,
                        uint64_t stream);
  /* C [m, n] = op(A)·op(B) (beta 0); op(X) = Xᵀ when tX. */
  fct_status (*gemm)(const fct_dec_run* r, bool tA, bool tB, int64_t m, int64_t n, int64_t k,
                     const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                     int64_t ldc);
  /* Y = X ×_n Uᵀ: dim n of size I_n becomes Rn (U [I_n, Rn]). */
  fct_status (*mode_product_t)(const fct_dec_run* r, const double* X, const fct_dims* d, int n,
                               const double* U, int64_t Rn, double* Y);
  /* U [I_n, k] (k <= I_n) = orthonormal leading left singular vectors of
   * the unfolding Y_(n) (any orthonormal completion beyond its rank, drawn
   * from (seed, stream) where it needs random numbers). */
  fct_status (*top_left_sv_scratch)(const fct_dec_run* r, const fct_dims* d, int n, int64_t k,
                                    int64_t* doubles);
  fct_status (*top_left_sv)(const fct_dec_run* r, const double* Y, const fct_dims* d, int n,
                            int64_t k, double* U, uint64_t seed, uint64_t stream,
                            double* scratch);
  /* A [m, k] (m >= k) = an orthonormal basis of its columns, in place. */
  fct_status (*orth_scratch)(const fct_dec_run* r, int64_t m, int64_t k, int64_t* doubles);
  fct_status (*orth)(const fct_dec_run* r, int64_t m, int64_t k, double* A, double* scratch);
  /* Thin SVD A [m, n] (destroyed) = U [m, q]·diag(s [q])·VT [q, n],
   * q = min(m, n), s descending. `what` names the step in a failure. */
  fct_status (*svd_scratch)(const fct_dec_run* r, int64_t m, int64_t n, int64_t* doubles);
  fct_status (*svd)(const fct_dec_run* r, int64_t m, int64_t n, double* A, double* s, double* U,
                    double* VT, double* scratch, const char* what);
};

/* The CPU engine (ops/cpu/engine_cpu.c), and the same with host = false (a test
 * hook: FACTORCH_TEST_DEVICE_PATH=1 makes CPU tensors use it). */
extern const fct_dec_engine fct_dec_cpu_engine;
extern const fct_dec_engine fct_dec_cpu_engine_split;

/* Fills r for X's device: the CPU engine (fct_dec_cpu_engine_split when
 * the environment has FACTORCH_TEST_DEVICE_PATH=1), or the CUDA one when X
 * is a cuda tensor (FCT_ERR_UNSUPPORTED naming `name` when
 * libfactorch_cuda is not loaded). */
fct_status fct_dec_run_for(fct_context* ctx, const char* name, const DLTensor* X,
                           fct_dec_run* r);

static inline int64_t fct_dims_numel(const fct_dims* d) {
  int64_t n = 1;
  for (int i = 0; i < d->N; ++i) n *= d->dim[i];
  return n;
}

/* L = Π_{m<n} I_m and Rt = Π_{m>n} I_m. */
static inline void fct_dims_split(const fct_dims* d, int n, int64_t* L, int64_t* Rt) {
  *L = 1;
  *Rt = 1;
  for (int m = 0; m < n; ++m) *L *= d->dim[m];
  for (int m = n + 1; m < d->N; ++m) *Rt *= d->dim[m];
}

#ifdef __cplusplus
}
#endif

#endif /* FCT_DEC_ENGINE_H */
