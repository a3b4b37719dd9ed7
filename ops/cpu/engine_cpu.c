/*
 * The decompositions' CPU engine (ops/decompose/engine.h): OpenBLAS + LAPACK
 * through ops/decompose/linalg_cpu.h and tensor_ops_cpu.h, host memory
 * throughout. Its CUDA twin is ops/cuda/engine_cuda.cu.
 */
#include <string.h>

#include "decompose.h"
#include "engine.h"
#include "rng.h"
#include "tensor_ops_cpu.h"

static fct_status cpu_scan(const fct_dec_run* r, const char* name, const double* x, int64_t n,
                           double* sumsq, double* scratch) {
  (void)scratch;
  int64_t shape[1] = {n};
  DLTensor v = {(void*)x, {kDLCPU, 0}, 1, {kDLFloat, 64, 1}, shape, NULL, 0};
  return fct_dec_scan_cpu(r->ctx, name, &v, sumsq);
}

static fct_status cpu_load(const fct_dec_run* r, const DLTensor* X, double* dst) {
  (void)r;
  fct_dec_load_f64(X, dst);
  return FCT_OK;
}

static fct_status cpu_load_transposed(const fct_dec_run* r, const DLTensor* F, int64_t rows,
                                      int64_t cols, double* U) {
  (void)r;
  bool f32 = fct_dtype_of(F->dtype) == FCT_F32;
  const char* src = fct_data(F);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      U[i + j * rows] =
          f32 ? ((const float*)src)[i * cols + j] : ((const double*)src)[i * cols + j];
  return FCT_OK;
}

static fct_status cpu_store(const fct_dec_run* r, DLTensor* out, int64_t off, const double* src,
                            int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  (void)r;
  bool f32 = fct_dtype_of(out->dtype) == FCT_F32;
  char* base = fct_data(out);
  for (int64_t i = 0; i < rows; ++i) {
    const double* s = src + i * rs;
    if (f32) {
      float* d = (float*)base + off + i * cols;
      for (int64_t j = 0; j < cols; ++j) d[j] = (float)s[j * cs];
    } else {
      double* d = (double*)base + off + i * cols;
      for (int64_t j = 0; j < cols; ++j) d[j] = s[j * cs];
    }
  }
  return FCT_OK;
}

static fct_status cpu_copy(const fct_dec_run* r, double* dst, const double* src, int64_t rows,
                           int64_t cols, int64_t rs, int64_t cs, const double* f) {
  (void)r;
  for (int64_t i = 0; i < rows; ++i) {
    double s = f ? f[i] : 1.0;
    for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = s * src[i * rs + j * cs];
  }
  return FCT_OK;
}

static fct_status cpu_move(const fct_dec_run* r, void* dst, const void* src, size_t bytes) {
  (void)r;
  if (dst != src && bytes) memmove(dst, src, bytes);
  return FCT_OK;
}

static fct_status cpu_uniform(const fct_dec_run* r, double* a, int64_t n, uint64_t seed,
                              uint64_t stream) {
  (void)r;
  for (int64_t i = 0; i < n; ++i) a[i] = fct_rng_uniform(seed, stream, (uint64_t)i);
  return FCT_OK;
}

static fct_status cpu_gemm(const fct_dec_run* r, bool tA, bool tB, int64_t m, int64_t n,
                           int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb,
                           double* C, int64_t ldc) {
  (void)r;
  fct_la_gemm(tA, tB, m, n, k, 1.0, A, lda, B, ldb, 0.0, C, ldc);
  return FCT_OK;
}

static fct_status cpu_mode_product_t(const fct_dec_run* r, const double* X, const fct_dims* d,
                                     int n, const double* U, int64_t Rn, double* Y) {
  (void)r;
  fct_mode_product_t(X, d, n, U, Rn, Y);
  return FCT_OK;
}

static fct_status cpu_top_left_sv_scratch(const fct_dec_run* r, const fct_dims* d, int n,
                                          int64_t k, int64_t* doubles) {
  (void)r;
  *doubles = fct_top_left_sv_scratch(d, n, k);
  return FCT_OK;
}

static fct_status cpu_top_left_sv(const fct_dec_run* r, const double* Y, const fct_dims* d,
                                  int n, int64_t k, double* U, uint64_t seed, uint64_t stream,
                                  double* scratch) {
  int info = fct_top_left_sv(Y, d, n, k, U, NULL, seed, stream, scratch);
  if (info)
    return fct_fail(r->ctx, FCT_ERR_BLAS, "tensor: LAPACK dsyevr failed (info %d) for mode %d",
                    info, n);
  return FCT_OK;
}

/* orth scratch: tau [k], then LAPACK's work. */
static fct_status cpu_orth_scratch(const fct_dec_run* r, int64_t m, int64_t k,
                                   int64_t* doubles) {
  (void)r;
  *doubles = k + fct_la_orth_lwork(m, k);
  return FCT_OK;
}

static fct_status cpu_orth(const fct_dec_run* r, int64_t m, int64_t k, double* A,
                           double* scratch) {
  (void)r;
  fct_la_orth(m, k, A, m, scratch, scratch + k, fct_la_orth_lwork(m, k));
  return FCT_OK;
}

/* svd scratch: LAPACK's work, then 8·q ints of iwork (as doubles). */
static fct_status cpu_svd_scratch(const fct_dec_run* r, int64_t m, int64_t n, int64_t* doubles) {
  (void)r;
  int64_t q = m < n ? m : n;
  *doubles = fct_la_gesdd_lwork(m, n) + 4 * q + 1;
  return FCT_OK;
}

static fct_status cpu_svd(const fct_dec_run* r, int64_t m, int64_t n, double* A, double* s,
                          double* U, double* VT, double* scratch, const char* what) {
  int64_t q = m < n ? m : n, lwork = fct_la_gesdd_lwork(m, n);
  int info = fct_la_gesdd(m, n, A, m, s, U, m, VT, q, scratch, lwork, (int*)(scratch + lwork));
  if (info)
    return fct_fail(r->ctx, FCT_ERR_BLAS,
                    "tensor: LAPACK dgesdd failed to converge (info %d) at %s", info, what);
  return FCT_OK;
}

#define CPU_ENGINE_ENTRIES                   \
  .scan_scratch = 0, .scan = cpu_scan, .load = cpu_load, \
  .load_transposed = cpu_load_transposed, .store = cpu_store, .copy = cpu_copy, \
  .to_host = cpu_move, .to_device = cpu_move, .uniform = cpu_uniform, .gemm = cpu_gemm, \
  .mode_product_t = cpu_mode_product_t, .top_left_sv_scratch = cpu_top_left_sv_scratch, \
  .top_left_sv = cpu_top_left_sv, .orth_scratch = cpu_orth_scratch, .orth = cpu_orth, \
  .svd_scratch = cpu_svd_scratch, .svd = cpu_svd

const fct_dec_engine fct_dec_cpu_engine = {.host = true, CPU_ENGINE_ENTRIES};

/* The same engine claiming its memory is not the host's: the algorithms
 * then keep host buffers apart and move data through to_host/to_device as
 * they do on a GPU. Selected by FACTORCH_TEST_DEVICE_PATH=1 (see
 * fct_dec_run_for), so that the GPU path of the algorithms is tested on
 * machines without a GPU. */
const fct_dec_engine fct_dec_cpu_engine_split = {.host = false, CPU_ENGINE_ENTRIES};
