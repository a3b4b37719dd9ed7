/*
 * The decompositions' CUDA engine (ops/decompose/engine.h): what CP-ALS,
 * Tucker-HOOI and TT-SVD (ops/decompose/) run on for CUDA tensors. float64
 * cuBLAS (GEMMs, strided batched for the mode products), cuSOLVER (gesvd,
 * geqrf + orgqr) and the element kernels of decompose_kernels_cuda.cu.
 *
 * Differences from the CPU engine (its twin, ops/cpu/engine_cpu.c), same
 * results up to rounding and the signs of singular vectors (where an
 * unfolding is rank-deficient, e.g. a zero tensor, the completion beyond its
 * rank differs: both are orthonormal, as engine.h allows):
 *  - top_left_sv takes the singular vectors of the unfolding from gesvd of
 *    its tall orientation (a transposed copy of the tensor), where the CPU
 *    engine uses the eigenvectors of its Gram matrix; beyond the
 *    unfolding's rank, columns are completed by Householder QR of random
 *    normals.
 *  - svd runs gesvd (rows >= cols only in cuSOLVER): a wide matrix is
 *    transposed first and the factors transposed back.
 *
 * tests/c/test_decompose_cuda.c and tests/python/test_decompose.py compare
 * CP, Tucker and TT on CUDA with the CPU wherever a GPU is present (they
 * skip without one; README.md says which paths have run on a GPU).
 *
 * Each entry enters the run's device for the call and leaves it after; the
 * ones returning a host value synchronise ctx->stream.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "decompose_cuda.cuh"
#include "engine.h"

extern "C" {

typedef fct_status (*body_fn)(const fct_dec_run* r, const fct_cuda_env* env, void* arg);

/* Runs body on the run's device (with this thread's cuBLAS handle when
 * blas), restoring the caller's device after. */
static fct_status on_device(const fct_dec_run* r, bool blas, body_fn body, void* arg) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(r->ctx, r->device, NULL, blas, &env));
  return fct_cuda_leave(r->ctx, &env, body(r, &env, arg));
}

static fct_status stream_sync(const fct_dec_run* r, const fct_cuda_env* env) {
  return fct_cuda_check(r->ctx, cudaStreamSynchronize(env->stream), "cudaStreamSynchronize");
}

static fct_status d2h(const fct_dec_run* r, const fct_cuda_env* env, void* dst, const void* src,
                      size_t bytes) {
  FCT_TRY(fct_cuda_check(r->ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost,
                                                 env->stream), "cudaMemcpyAsync"));
  return stream_sync(r, env);
}

/* ------------------------------------------------------------------------- */
/* scan, load, store, copies, random numbers                                  */
/* ------------------------------------------------------------------------- */

/* scan scratch: FCT_SCAN_BLOCKS partial sums, as many counts, the result. */
#define SCAN_SCRATCH (2 * FCT_SCAN_BLOCKS + 4)

typedef struct scan_args {
  const char* name;
  const double* x;
  int64_t n;
  double* sumsq;
  double* scratch;
} scan_args;

static fct_status scan_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  scan_args* a = (scan_args*)arg;
  fct_mat m = {(char*)a->x, 1, a->n, a->n, 1};
  fct_scan_result* dres = (fct_scan_result*)(a->scratch + 2 * FCT_SCAN_BLOCKS);
  FCT_TRY(fct_cudec_scan(r->ctx, env, FCT_F64, &m, a->scratch,
                         (long long*)(a->scratch + FCT_SCAN_BLOCKS), dres));
  fct_scan_result h;
  FCT_TRY(d2h(r, env, &h, dres, sizeof h));
  if (h.bad)
    return fct_fail(r->ctx, FCT_ERR_NOT_FINITE,
                    "%s: holds %lld NaN/Inf values; a decomposition needs finite input", a->name,
                    h.bad);
  if (!isfinite(h.sumsq))
    return fct_fail(r->ctx, FCT_ERR_NOT_FINITE,
                    "%s: its squared Frobenius norm overflows float64; rescale it first",
                    a->name);
  *a->sumsq = h.sumsq;
  return FCT_OK;
}

static fct_status cu_scan(const fct_dec_run* r, const char* name, const double* x, int64_t n,
                          double* sumsq, double* scratch) {
  scan_args a = {name, x, n, sumsq, scratch};
  return on_device(r, false, scan_body, &a);
}

typedef struct move_args {
  const DLTensor* t;
  DLTensor* out;
  double* dst;
  const double* src;
  const double* f;
  int64_t off, rows, cols, rs, cs;
} move_args;

static fct_status load_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  move_args* a = (move_args*)arg;
  fct_nd nd;
  nd.ndim = a->t->ndim;
  fct_strides(a->t, nd.strides);
  for (int d = 0; d < nd.ndim; ++d) nd.shape[d] = a->t->shape[d];
  return fct_cudec_load_nd(r->ctx, env, fct_dtype_of(a->t->dtype), fct_data(a->t), &nd, a->dst,
                           fct_numel(a->t));
}

static fct_status cu_load(const fct_dec_run* r, const DLTensor* X, double* dst) {
  move_args a = {X, NULL, dst, NULL, NULL, 0, 0, 0, 0, 0};
  return on_device(r, false, load_body, &a);
}

static fct_status load_t_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  move_args* a = (move_args*)arg;
  fct_mat m = {fct_data(a->t), a->rows, a->cols, a->cols, 1};
  return fct_cudec_load_f64(r->ctx, env, fct_dtype_of(a->t->dtype), &m, a->dst, 1, a->rows);
}

static fct_status cu_load_transposed(const fct_dec_run* r, const DLTensor* F, int64_t rows,
                                     int64_t cols, double* U) {
  move_args a = {F, NULL, U, NULL, NULL, 0, rows, cols, 0, 0};
  return on_device(r, false, load_t_body, &a);
}

static fct_status store_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  move_args* a = (move_args*)arg;
  fct_dtype dt = fct_dtype_of(a->out->dtype);
  char* base = fct_data(a->out) + (size_t)a->off * fct_dtype_bytes(dt);
  return fct_cudec_store(r->ctx, env, dt, base, a->rows, a->cols, a->src, a->rs, a->cs, NULL, 0);
}

static fct_status cu_store(const fct_dec_run* r, DLTensor* out, int64_t off, const double* src,
                           int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  move_args a = {NULL, out, NULL, src, NULL, off, rows, cols, rs, cs};
  return on_device(r, false, store_body, &a);
}

static fct_status copy_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  move_args* a = (move_args*)arg;
  return fct_cudec_store(r->ctx, env, FCT_F64, (char*)a->dst, a->rows, a->cols, a->src, a->rs,
                         a->cs, a->f, 1);
}

static fct_status cu_copy(const fct_dec_run* r, double* dst, const double* src, int64_t rows,
                          int64_t cols, int64_t rs, int64_t cs, const double* f) {
  move_args a = {NULL, NULL, dst, src, f, 0, rows, cols, rs, cs};
  return on_device(r, false, copy_body, &a);
}

typedef struct bytes_args {
  void* dst;
  const void* src;
  size_t bytes;
  bool to_host;
} bytes_args;

static fct_status bytes_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  bytes_args* a = (bytes_args*)arg;
  if (a->bytes == 0) return FCT_OK;
  if (a->to_host) return d2h(r, env, a->dst, a->src, a->bytes);
  FCT_TRY(fct_cuda_check(r->ctx, cudaMemcpyAsync(a->dst, a->src, a->bytes,
                                                 cudaMemcpyHostToDevice, env->stream),
                         "cudaMemcpyAsync"));
  return stream_sync(r, env); /* the host buffer is rewritten by the caller next */
}

static fct_status cu_to_host(const fct_dec_run* r, void* dst, const void* src, size_t bytes) {
  bytes_args a = {dst, src, bytes, true};
  return on_device(r, false, bytes_body, &a);
}

static fct_status cu_to_device(const fct_dec_run* r, void* dst, const void* src, size_t bytes) {
  bytes_args a = {dst, src, bytes, false};
  return on_device(r, false, bytes_body, &a);
}

typedef struct rng_args {
  double* a;
  int64_t n;
  uint64_t seed, stream;
} rng_args;

static fct_status uniform_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  rng_args* a = (rng_args*)arg;
  return fct_cudec_rng(r->ctx, env, a->a, a->n, a->seed, a->stream, 0, false);
}

static fct_status cu_uniform(const fct_dec_run* r, double* a, int64_t n, uint64_t seed,
                             uint64_t stream) {
  rng_args args = {a, n, seed, stream};
  return on_device(r, false, uniform_body, &args);
}

/* ------------------------------------------------------------------------- */
/* GEMM and mode products                                                     */
/* ------------------------------------------------------------------------- */

typedef struct gemm_args {
  bool tA, tB;
  int64_t m, n, k, lda, ldb, ldc;
  const double *A, *B;
  double* C;
} gemm_args;

static fct_status gemm_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  gemm_args* g = (gemm_args*)arg;
  if (g->m == 0 || g->n == 0) return FCT_OK;
  const double one = 1.0, zero = 0.0;
  return fct_cublas_check(
      r->ctx,
      cublasDgemm(env->blas, g->tA ? CUBLAS_OP_T : CUBLAS_OP_N, g->tB ? CUBLAS_OP_T : CUBLAS_OP_N,
                  (int)g->m, (int)g->n, (int)g->k, &one, g->A, (int)g->lda, g->B, (int)g->ldb,
                  &zero, g->C, (int)g->ldc),
      "cublasDgemm (decomposition)");
}

static fct_status cu_gemm(const fct_dec_run* r, bool tA, bool tB, int64_t m, int64_t n,
                          int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb,
                          double* C, int64_t ldc) {
  gemm_args g = {tA, tB, m, n, k, lda, ldb, ldc, A, B, C};
  return on_device(r, true, gemm_body, &g);
}

typedef struct mode_args {
  const double* X;
  const fct_dims* d;
  int n;
  const double* U;
  int64_t Rn;
  double* Y;
} mode_args;

/* X row-major [L, I_n, Rt]. Rt == 1: Y [L, Rn] = X [L, I_n]·U, i.e.
 * column-major Yᵀ = Uᵀ·Xᵀ. Else, per slab l, Y_l [Rn, Rt] = Uᵀ·X_l, i.e.
 * column-major Y_lᵀ [Rt, Rn] = X_lᵀ [Rt, I_n]·U: one strided batched GEMM. */
static fct_status mode_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  mode_args* a = (mode_args*)arg;
  int64_t L, Rt, In = a->d->dim[a->n];
  fct_dims_split(a->d, a->n, &L, &Rt);
  if (L == 0 || Rt == 0 || a->Rn == 0) return FCT_OK;
  const double one = 1.0, zero = 0.0;
  cublasStatus_t st;
  if (Rt == 1)
    st = cublasDgemm(env->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)a->Rn, (int)L, (int)In, &one, a->U,
                     (int)In, a->X, (int)In, &zero, a->Y, (int)a->Rn);
  else
    st = cublasDgemmStridedBatched(env->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)Rt, (int)a->Rn,
                                   (int)In, &one, a->X, (int)Rt, (long long)(In * Rt), a->U,
                                   (int)In, 0, &zero, a->Y, (int)Rt, (long long)(a->Rn * Rt),
                                   (int)L);
  return fct_cublas_check(r->ctx, st, "cublas mode product (tucker)");
}

static fct_status cu_mode_product_t(const fct_dec_run* r, const double* X, const fct_dims* d,
                                    int n, const double* U, int64_t Rn, double* Y) {
  mode_args a = {X, d, n, U, Rn, Y};
  return on_device(r, true, mode_body, &a);
}

/* ------------------------------------------------------------------------- */
/* SVD and orthonormalisation (cuSOLVER)                                      */
/* ------------------------------------------------------------------------- */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* gesvd's work size for an [rows, cols] matrix, rows >= cols. */
static fct_status gesvd_lwork(const fct_dec_run* r, cusolverDnHandle_t h, int64_t rows,
                              int64_t cols, int64_t* out) {
  int lw = 0;
  if (rows == 0 || cols == 0) { /* nothing to factor (an empty mode); no query */
    *out = 1;
    return FCT_OK;
  }
  FCT_TRY(fct_cudec_solver_check(r->ctx, cusolverDnDgesvd_bufferSize(h, (int)rows, (int)cols, &lw),
                                 "cusolverDnDgesvd_bufferSize"));
  *out = lw > 1 ? lw : 1;
  return FCT_OK;
}

/* Scratch of gesvd_tall: work, rwork [cols], info. */
static fct_status gesvd_tall_need(const fct_dec_run* r, cusolverDnHandle_t h, int64_t rows,
                                  int64_t cols, int64_t* doubles) {
  int64_t lw;
  FCT_TRY(gesvd_lwork(r, h, rows, cols, &lw));
  *doubles = lw + cols + 1;
  return FCT_OK;
}

/* gesvd of the tall A [rows, cols] (rows >= cols, destroyed): s [cols],
 * U [rows, cols] and VT [cols, cols], each formed only when not NULL; fails
 * when gesvd does not converge (one sync, to read its info). */
static fct_status gesvd_tall(const fct_dec_run* r, const fct_cuda_env* env, cusolverDnHandle_t h,
                             int64_t rows, int64_t cols, double* A, double* s, double* U,
                             double* VT, double* scratch, const char* what) {
  int64_t lw;
  FCT_TRY(gesvd_lwork(r, h, rows, cols, &lw));
  if (cols == 0) return FCT_OK;
  double* rwork = scratch + lw;
  int* info = (int*)(rwork + cols);
  /* A factor not asked for ('N') is not referenced: A stands in for it. */
  FCT_TRY(fct_cudec_solver_check(
      r->ctx, cusolverDnDgesvd(h, U ? 'S' : 'N', VT ? 'S' : 'N', (int)rows, (int)cols, A,
                               (int)rows, s, U ? U : A, (int)rows, VT ? VT : A, (int)cols,
                               scratch, (int)lw, rwork, info),
      "cusolverDnDgesvd"));
  int hinfo = 0;
  FCT_TRY(d2h(r, env, &hinfo, info, sizeof hinfo));
  if (hinfo != 0)
    return fct_fail(r->ctx, FCT_ERR_BLAS,
                    "tensor: cuSOLVER gesvd failed to converge (info %d) at %s", hinfo, what);
  return FCT_OK;
}

/* Scratch of svd_in: [T, U2, VT2 when m < n], then gesvd_tall's. */
static fct_status svd_need(const fct_dec_run* r, cusolverDnHandle_t h, int64_t m, int64_t n,
                           int64_t* doubles) {
  int64_t g;
  FCT_TRY(gesvd_tall_need(r, h, m >= n ? m : n, min64(m, n), &g));
  *doubles = (m < n ? 2 * n * m + m * m : 0) + g;
  return FCT_OK;
}

/* Thin SVD A [m, n] (destroyed) = U [m, q]·diag(s)·VT [q, n]. cuSOLVER's
 * gesvd wants rows >= cols: a wide A is transposed first (geam) and the
 * factors transposed back. */
static fct_status svd_in(const fct_dec_run* r, const fct_cuda_env* env, cusolverDnHandle_t h,
                         int64_t m, int64_t n, double* A, double* s, double* U, double* VT,
                         double* scratch, const char* what) {
  if (m >= n) return gesvd_tall(r, env, h, m, n, A, s, U, VT, scratch, what);
  if (m == 0) return FCT_OK;
  const double one = 1.0, zero = 0.0;
  double* T = scratch;
  double* U2 = T + n * m;
  double* VT2 = U2 + n * m;
  /* Aᵀ [n, m] = U2·S·VT2, so A = VT2ᵀ·S·U2ᵀ */
  FCT_TRY(fct_cublas_check(r->ctx,
                           cublasDgeam(env->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)m, &one,
                                       A, (int)m, &zero, T, (int)n, T, (int)n),
                           "cublasDgeam"));
  FCT_TRY(gesvd_tall(r, env, h, n, m, T, s, U2, VT2, VT2 + m * m, what));
  FCT_TRY(fct_cublas_check(r->ctx,
                           cublasDgeam(env->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)m, &one,
                                       VT2, (int)m, &zero, U, (int)m, U, (int)m),
                           "cublasDgeam"));
  return fct_cublas_check(r->ctx,
                          cublasDgeam(env->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, &one,
                                      U2, (int)n, &zero, VT, (int)m, VT, (int)m),
                          "cublasDgeam");
}

/* Scratch of orth_in: tau [k], work, info. */
static fct_status orth_need(const fct_dec_run* r, cusolverDnHandle_t h, int64_t m, int64_t k,
                            int64_t* doubles) {
  if (m == 0 || k == 0) { /* nothing to orthonormalise; no query */
    *doubles = k + 2;
    return FCT_OK;
  }
  /* The size queries take pointers they never dereference. */
  double* any = (double*)(uintptr_t)FCT_WS_ALIGN;
  int l1 = 0, l2 = 0;
  FCT_TRY(fct_cudec_solver_check(
      r->ctx, cusolverDnDgeqrf_bufferSize(h, (int)m, (int)k, any, (int)m, &l1),
      "cusolverDnDgeqrf_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(
      r->ctx, cusolverDnDorgqr_bufferSize(h, (int)m, (int)k, (int)k, any, (int)m, any, &l2),
      "cusolverDnDorgqr_bufferSize"));
  int64_t lw = l1 > l2 ? l1 : l2;
  *doubles = k + (lw > 1 ? lw : 1) + 1;
  return FCT_OK;
}

static fct_status orth_in(const fct_dec_run* r, cusolverDnHandle_t h, int64_t m, int64_t k,
                          double* A, double* scratch) {
  int64_t need;
  FCT_TRY(orth_need(r, h, m, k, &need));
  if (k == 0) return FCT_OK;
  int lw = (int)(need - k - 1);
  double* tau = scratch;
  double* work = tau + k;
  int* info = (int*)(work + lw);
  FCT_TRY(fct_cudec_solver_check(
      r->ctx, cusolverDnDgeqrf(h, (int)m, (int)k, A, (int)m, tau, work, lw, info),
      "cusolverDnDgeqrf"));
  return fct_cudec_solver_check(
      r->ctx, cusolverDnDorgqr(h, (int)m, (int)k, (int)k, A, (int)m, tau, work, lw, info),
      "cusolverDnDorgqr");
}

/* The cuSOLVER entries, run through one body (la_body, after the
 * top_left_sv code below): which one, and its arguments. */
typedef enum la_op { LA_SVD_NEED, LA_SVD, LA_ORTH_NEED, LA_ORTH, LA_TLSV_NEED, LA_TLSV } la_op;

typedef struct la_args {
  la_op op;
  int64_t m, n, k;
  double *A, *s, *U, *VT, *scratch;
  const char* what;
  int64_t* doubles;
  /* top_left_sv */
  const double* Y;
  const fct_dims* d;
  int mode;
  uint64_t seed, stream;
} la_args;

static fct_status run_la(const fct_dec_run* r, la_args* a);

static fct_status cu_svd_scratch(const fct_dec_run* r, int64_t m, int64_t n, int64_t* doubles) {
  la_args a = {};
  a.op = LA_SVD_NEED;
  a.m = m;
  a.n = n;
  a.doubles = doubles;
  return run_la(r, &a);
}

static fct_status cu_svd(const fct_dec_run* r, int64_t m, int64_t n, double* A, double* s,
                         double* U, double* VT, double* scratch, const char* what) {
  la_args a = {};
  a.op = LA_SVD;
  a.m = m;
  a.n = n;
  a.A = A;
  a.s = s;
  a.U = U;
  a.VT = VT;
  a.scratch = scratch;
  a.what = what;
  return run_la(r, &a);
}

static fct_status cu_orth_scratch(const fct_dec_run* r, int64_t m, int64_t k, int64_t* doubles) {
  la_args a = {};
  a.op = LA_ORTH_NEED;
  a.m = m;
  a.k = k;
  a.doubles = doubles;
  return run_la(r, &a);
}

static fct_status cu_orth(const fct_dec_run* r, int64_t m, int64_t k, double* A,
                          double* scratch) {
  la_args a = {};
  a.op = LA_ORTH;
  a.m = m;
  a.k = k;
  a.A = A;
  a.scratch = scratch;
  return run_la(r, &a);
}

/* ------------------------------------------------------------------------- */
/* Leading left singular vectors of an unfolding                             */
/* ------------------------------------------------------------------------- */

/* For mode n of Y [L, I_n, Rt], P = L·Rt:
 *  I_n <= P: Z = Y permuted to [I_n, L, Rt], i.e. Y_(n)ᵀ column-major
 *    [P, I_n]; the rows of its VT are Y_(n)'s left singular vectors.
 *  I_n > P: Z = Y permuted to [L, Rt, I_n], i.e. Y_(n) column-major
 *    [I_n, P]; its U's columns are; beyond P, random normals made
 *    orthogonal by QR.
 * gesvd forms only the factor used. Scratch: Z, that factor (VT [I_n, I_n]
 * or U [I_n, P]), s, then gesvd's scratch or orth's. */
typedef struct tlsv_dims {
  int64_t In, L, Rt, P, rows, cols, q;
  bool tall_y; /* I_n > P */
} tlsv_dims;

static tlsv_dims tlsv_dims_of(const fct_dims* d, int n) {
  tlsv_dims t;
  t.In = d->dim[n];
  fct_dims_split(d, n, &t.L, &t.Rt);
  t.P = t.L * t.Rt;
  t.tall_y = t.In > t.P;
  t.rows = t.tall_y ? t.In : t.P;
  t.cols = t.tall_y ? t.P : t.In;
  t.q = t.cols;
  return t;
}

static fct_status tlsv_need(const fct_dec_run* r, cusolverDnHandle_t h, const fct_dims* d, int n,
                           int64_t k, int64_t* doubles) {
  tlsv_dims t = tlsv_dims_of(d, n);
  int64_t sv, ow = 0;
  FCT_TRY(gesvd_tall_need(r, h, t.rows, t.cols, &sv));
  if (t.tall_y && k > t.P) FCT_TRY(orth_need(r, h, t.In, k, &ow));
  int64_t factor = t.tall_y ? t.rows * t.cols : t.cols * t.cols;
  *doubles = t.rows * t.cols + factor + t.q + (sv > ow ? sv : ow);
  return FCT_OK;
}

static fct_status cu_top_left_sv_scratch(const fct_dec_run* r, const fct_dims* d, int n,
                                         int64_t k, int64_t* doubles) {
  la_args a = {};
  a.op = LA_TLSV_NEED;
  a.d = d;
  a.mode = n;
  a.k = k;
  a.doubles = doubles;
  return run_la(r, &a);
}

static fct_status tlsv_in(const fct_dec_run* r, const fct_cuda_env* env, cusolverDnHandle_t h,
                         const la_args* a) {
  tlsv_dims t = tlsv_dims_of(a->d, a->mode);
  int64_t k = a->k;
  double* Z = a->scratch;
  double* F = Z + t.rows * t.cols; /* VT (I_n <= P) or Zu */
  double* s = F + (t.tall_y ? t.rows * t.cols : t.cols * t.cols);
  double* rest = s + t.q;
  double *Zu = t.tall_y ? F : NULL, *VT = t.tall_y ? NULL : F;
  char what[48];
  snprintf(what, sizeof what, "the unfolding of mode %d", a->mode);
  FCT_TRY(fct_cudec_permute3(r->ctx, env, a->Y, t.L, t.In, t.Rt, Z, t.tall_y));
  FCT_TRY(gesvd_tall(r, env, h, t.rows, t.cols, Z, s, Zu, VT, rest, what));
  if (!t.tall_y) /* U[:, j] = VT[j, :]: U [I_n, k] column-major is row-major [k, I_n] */
    return fct_cudec_store(r->ctx, env, FCT_F64, (char*)a->U, k, t.In, VT, 1, t.In, NULL, 0);
  int64_t kk = min64(k, t.P);
  FCT_TRY(fct_cuda_check(r->ctx, cudaMemcpyAsync(a->U, Zu, (size_t)(t.In * kk) * sizeof(double),
                                                 cudaMemcpyDeviceToDevice, env->stream),
                         "cudaMemcpyAsync"));
  if (k == kk) return FCT_OK;
  FCT_TRY(fct_cudec_rng(r->ctx, env, a->U + t.In * kk, t.In * (k - kk), a->seed, a->stream,
                        (uint64_t)(t.In * kk), true));
  return orth_in(r, h, t.In, k, a->U, rest);
}

static fct_status cu_top_left_sv(const fct_dec_run* r, const double* Y, const fct_dims* d, int n,
                                 int64_t k, double* U, uint64_t seed, uint64_t stream,
                                 double* scratch) {
  la_args a = {};
  a.op = LA_TLSV;
  a.Y = Y;
  a.d = d;
  a.mode = n;
  a.k = k;
  a.U = U;
  a.seed = seed;
  a.stream = stream;
  a.scratch = scratch;
  return run_la(r, &a);
}

static fct_status la_body(const fct_dec_run* r, const fct_cuda_env* env, void* arg) {
  la_args* a = (la_args*)arg;
  cusolverDnHandle_t h;
  FCT_TRY(fct_cudec_solver(r->ctx, env, &h));
  switch (a->op) {
    case LA_SVD_NEED: return svd_need(r, h, a->m, a->n, a->doubles);
    case LA_SVD: return svd_in(r, env, h, a->m, a->n, a->A, a->s, a->U, a->VT, a->scratch, a->what);
    case LA_ORTH_NEED: return orth_need(r, h, a->m, a->k, a->doubles);
    case LA_ORTH: return orth_in(r, h, a->m, a->k, a->A, a->scratch);
    case LA_TLSV_NEED: return tlsv_need(r, h, a->d, a->mode, a->k, a->doubles);
    case LA_TLSV: return tlsv_in(r, env, h, a);
  }
  return fct_fail(r->ctx, FCT_ERR_INVALID_VALUE, "engine: unknown solver operation %d", (int)a->op);
}

/* The SVDs use cuBLAS too (geam transposes). */
static fct_status run_la(const fct_dec_run* r, la_args* a) {
  return on_device(r, a->op == LA_SVD || a->op == LA_TLSV, la_body, a);
}

const fct_dec_engine fct_cudec_engine = {
    /* host */ false,
    /* scan_scratch */ SCAN_SCRATCH,
    /* scan */ cu_scan,
    /* load */ cu_load,
    /* load_transposed */ cu_load_transposed,
    /* store */ cu_store,
    /* copy */ cu_copy,
    /* to_host */ cu_to_host,
    /* to_device */ cu_to_device,
    /* uniform */ cu_uniform,
    /* gemm */ cu_gemm,
    /* mode_product_t */ cu_mode_product_t,
    /* top_left_sv_scratch */ cu_top_left_sv_scratch,
    /* top_left_sv */ cu_top_left_sv,
    /* orth_scratch */ cu_orth_scratch,
    /* orth */ cu_orth,
    /* svd_scratch */ cu_svd_scratch,
    /* svd */ cu_svd,
};

} /* extern "C" */
