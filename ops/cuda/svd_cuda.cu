/*
 * svd and randomized_svd for CUDA tensors, registered with libfactorch when
 * libfactorch_cuda is loaded. The same algorithms as the CPU code
 * (ops/decompose/svd.c, randomized_svd.c): float64 cuSOLVER (gesvd, geqrf +
 * orgqr) and cuBLAS, with the matrix read in its own dtype by the
 * randomized passes and the same Gaussian sketch. Where the CPU code
 * orthonormalises by CholeskyQR (to use every core) and takes the shift from
 * the Gram matrix of Aᵀ·Q, this one uses Householder QR of Aᵀ·Q and the
 * singular values of its R: the same bases and shift up to rounding.
 *
 * tests/c/test_decompose_cuda.c and tests/python/test_decompose.py compare
 * it with the CPU code wherever a GPU is present (they skip without one;
 * README.md says which paths have run on a GPU). Both scan the input for
 * NaN/Inf first (one stream sync before any work) and synchronise the
 * stream at the end to return the error on the host. Kernels:
 * decompose_kernels_cuda.cu.
 *
 * cuSOLVER's gesvd needs rows >= cols: the SVD runs on A or Aᵀ, whichever
 * is tall, and the results are read back through strided views.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decompose_cuda.cuh"

extern "C" {

fct_status fct_cudec_solver_check(fct_context* ctx, cusolverStatus_t st, const char* what) {
  if (st == CUSOLVER_STATUS_SUCCESS) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_BLAS, "%s failed: cusolver status %d", what, (int)st);
}

/* The scan's host copy: fails on NaN/Inf (one stream sync). */
static fct_status scan_input(fct_context* ctx, const fct_cuda_env* env, const fct_svd_plan* p,
                             double* part_sum, long long* part_bad, fct_scan_result* dscan) {
  FCT_TRY(fct_cudec_scan(ctx, env, p->dt, &p->a, part_sum, part_bad, dscan));
  fct_scan_result h;
  FCT_TRY(fct_cuda_check(ctx, cudaMemcpyAsync(&h, dscan, sizeof h, cudaMemcpyDeviceToHost,
                                              env->stream), "cudaMemcpyAsync"));
  FCT_TRY(fct_cuda_check(ctx, cudaStreamSynchronize(env->stream), "cudaStreamSynchronize"));
  if (h.bad)
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "A: holds %lld NaN/Inf values; a decomposition needs finite input", h.bad);
  if (!isfinite(h.sumsq))
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "A: its squared Frobenius norm overflows float64; rescale it first");
  return FCT_OK;
}

/* What every call ends with: the error and LAPACK-style info to the host. */
typedef struct tail_result {
  double err;
  int info;
} tail_result;

static fct_status finish(fct_context* ctx, const fct_cuda_env* env, const double* derr,
                         const int* dinfo, const char* what, fct_decomp_info* info,
                         int32_t n_iter) {
  tail_result h = {0, 0};
  FCT_TRY(fct_cuda_check(ctx, cudaMemcpyAsync(&h.err, derr, sizeof h.err, cudaMemcpyDeviceToHost,
                                              env->stream), "cudaMemcpyAsync"));
  FCT_TRY(fct_cuda_check(ctx, cudaMemcpyAsync(&h.info, dinfo, sizeof h.info,
                                              cudaMemcpyDeviceToHost, env->stream),
                         "cudaMemcpyAsync"));
  FCT_TRY(fct_cuda_check(ctx, cudaStreamSynchronize(env->stream), "cudaStreamSynchronize"));
  if (h.info != 0)
    return fct_fail(ctx, FCT_ERR_BLAS, "A: cuSOLVER %s failed to converge (info %d)", what,
                    h.info);
  if (info) {
    info->rel_error = h.err;
    info->n_iter = n_iter;
    info->converged = 1;
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Truncated SVD                                                              */
/* ------------------------------------------------------------------------- */

typedef struct svd_bufs {
  double* part_sum;
  long long* part_bad;
  fct_scan_result* scan;
  double *W, *s, *U, *VT, *work, *rwork, *sign, *err;
  int* info;
  int64_t rows, cols, q;
  int lwork;
} svd_bufs;

static fct_status svd_layout(fct_context* ctx, cusolverDnHandle_t h, const fct_svd_plan* p,
                             fct_arena* a, svd_bufs* b) {
  b->rows = p->n >= p->m ? p->n : p->m; /* tall orientation for gesvd */
  b->cols = p->n >= p->m ? p->m : p->n;
  b->q = b->cols;
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgesvd_bufferSize(h, (int)b->rows, (int)b->cols, &b->lwork),
                       "cusolverDnDgesvd_bufferSize"));
  b->part_sum = fct_arena_f64(a, FCT_SCAN_BLOCKS);
  b->part_bad = (long long*)fct_arena_take(a, FCT_SCAN_BLOCKS, sizeof(long long));
  b->scan = (fct_scan_result*)fct_arena_take(a, 1, sizeof(fct_scan_result));
  b->W = fct_arena_f64(a, (size_t)(b->rows * b->cols));
  b->s = fct_arena_f64(a, (size_t)b->q);
  b->U = fct_arena_f64(a, (size_t)(b->rows * b->q));
  b->VT = fct_arena_f64(a, (size_t)(b->q * b->cols));
  b->work = fct_arena_f64(a, (size_t)(b->lwork > 0 ? b->lwork : 1));
  b->rwork = fct_arena_f64(a, (size_t)b->q);
  b->sign = fct_arena_f64(a, (size_t)b->q);
  b->err = fct_arena_f64(a, 1);
  b->info = (int*)fct_arena_take(a, 1, sizeof(int));
  return a->L.overflow ? fct_fail(ctx, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t")
                     : FCT_OK;
}

static fct_status svd_workspace_in(fct_context* ctx, const fct_cuda_env* env,
                                   const fct_svd_plan* p, size_t* bytes) {
  cusolverDnHandle_t h = NULL;
  FCT_TRY(fct_cudec_solver(ctx, env, &h));
  fct_arena a = {NULL, {0, false}};
  svd_bufs b;
  FCT_TRY(svd_layout(ctx, h, p, &a, &b));
  *bytes = a.L.cursor;
  return FCT_OK;
}

static fct_status svd_in(fct_context* ctx, const fct_cuda_env* env, const fct_svd_plan* p,
                         fct_decomp_info* info) {
  cusolverDnHandle_t h = NULL;
  FCT_TRY(fct_cudec_solver(ctx, env, &h));
  fct_arena a = {(char*)ctx->workspace, {0, false}};
  svd_bufs b;
  FCT_TRY(svd_layout(ctx, h, p, &a, &b));
  FCT_TRY(fct_arena_check(ctx, &a));
  FCT_TRY(scan_input(ctx, env, p, b.part_sum, b.part_bad, b.scan));
  /* Wide A (n >= m): W = Aᵀ [n, m] is A's row-major data; gesvd gives
   * Aᵀ = U'·S·V'ᵀ, so U_A(i, j) = VT[j + i·q], Vh(j, c) = U[c + j·n].
   * Tall A: W = A [m, n] column-major, U_A(i, j) = U[i + j·m],
   * Vh(j, c) = VT[j + c·q]. */
  bool wide = p->n >= p->m;
  int64_t q = b.q;
  FCT_TRY(fct_cudec_load_f64(ctx, env, p->dt, &p->a, b.W, wide ? p->n : 1, wide ? 1 : p->m));
  FCT_TRY(fct_cudec_solver_check(ctx,
                       cusolverDnDgesvd(h, 'S', 'S', (int)b.rows, (int)b.cols, b.W, (int)b.rows,
                                        b.s, b.U, (int)b.rows, b.VT, (int)q, b.work, b.lwork,
                                        b.rwork, b.info),
                       "cusolverDnDgesvd"));
  const double* Uv = wide ? b.VT : b.U;
  int64_t urs = wide ? q : 1, ucs = wide ? 1 : p->m;
  const double* Vv = wide ? b.U : b.VT;
  int64_t vrs = wide ? p->n : 1, vcs = wide ? 1 : q;
  FCT_TRY(fct_cudec_signs(ctx, env, Uv, p->m, urs, ucs, p->r, b.sign));
  FCT_TRY(fct_cudec_store(ctx, env, p->dt, fct_data(p->U), p->m, p->r, Uv, urs, ucs, b.sign, 0));
  FCT_TRY(fct_cudec_store(ctx, env, p->dt, fct_data(p->Vh), p->r, p->n, Vv, vrs, vcs, b.sign, 1));
  FCT_TRY(fct_cudec_store(ctx, env, p->dt, fct_data(p->S), 1, p->s, b.s, 0, 1, NULL, 0));
  FCT_TRY(fct_cudec_tail_error(ctx, env, b.s, q, p->r, b.err));
  return finish(ctx, env, b.err, b.info, "gesvd", info, 0);
}

/* ------------------------------------------------------------------------- */
/* Randomized SVD (shifted power iterations; see randomized_svd.c)           */
/* ------------------------------------------------------------------------- */

typedef struct rsvd_bufs {
  double* part_sum;
  long long* part_bad;
  fct_scan_result* scan;
  char *Apack, *Om, *Yd;        /* A's dtype */
  double *Q, *Z, *Qprev, *Rz, *sv, *tau, *work, *rwork, *Vb, *UbT, *s, *Uo, *sign, *err;
  int* info;
  int lwork;
} rsvd_bufs;

static fct_status rsvd_layout(fct_context* ctx, cusolverDnHandle_t h, const fct_svd_plan* p,
                              fct_arena* a, rsvd_bufs* b) {
  int64_t m = p->m, n = p->n, k = p->k;
  size_t es = fct_dtype_bytes(p->dt);
  memset(b, 0, sizeof *b);
  int l[6] = {0, 0, 0, 0, 0, 0};
  /* The size queries take matrix pointers they never dereference (device
   * memory, on the host): while sizing there is no workspace yet, so hand
   * them a dummy non-NULL address rather than risk a NULL check. */
  double* any = a->base ? (double*)a->base : (double*)(uintptr_t)FCT_WS_ALIGN;
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgeqrf_bufferSize(h, (int)m, (int)k, any, (int)m, &l[0]),
                       "cusolverDnDgeqrf_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgeqrf_bufferSize(h, (int)n, (int)k, any, (int)n, &l[1]),
                       "cusolverDnDgeqrf_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDorgqr_bufferSize(h, (int)m, (int)k, (int)k, any, (int)m,
                                                        any, &l[2]),
                       "cusolverDnDorgqr_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDorgqr_bufferSize(h, (int)n, (int)k, (int)k, any, (int)n,
                                                        any, &l[3]),
                       "cusolverDnDorgqr_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgesvd_bufferSize(h, (int)n, (int)k, &l[4]),
                       "cusolverDnDgesvd_bufferSize"));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgesvd_bufferSize(h, (int)k, (int)k, &l[5]),
                       "cusolverDnDgesvd_bufferSize"));
  b->lwork = 1;
  for (int i = 0; i < 6; ++i) b->lwork = l[i] > b->lwork ? l[i] : b->lwork;
  b->part_sum = fct_arena_f64(a, FCT_SCAN_BLOCKS);
  b->part_bad = (long long*)fct_arena_take(a, FCT_SCAN_BLOCKS, sizeof(long long));
  b->scan = (fct_scan_result*)fct_arena_take(a, 1, sizeof(fct_scan_result));
  if (!p->a_blas) b->Apack = (char*)fct_arena_take(a, (size_t)(m * n), es);
  b->Om = (char*)fct_arena_take(a, (size_t)(n * k), es);
  b->Yd = (char*)fct_arena_take(a, (size_t)(m * k), es);
  if (p->dt == FCT_F64) {
    b->Q = (double*)b->Yd;
    b->Z = (double*)b->Om;
  } else {
    b->Q = fct_arena_f64(a, (size_t)(m * k));
    b->Z = fct_arena_f64(a, (size_t)(n * k));
  }
  if (p->n_iter > 0) {
    b->Qprev = fct_arena_f64(a, (size_t)(m * k));
    b->Rz = fct_arena_f64(a, (size_t)(k * k));
    b->sv = fct_arena_f64(a, (size_t)(k * k)); /* gesvd destroys its input: a copy of Rz */
  }
  b->tau = fct_arena_f64(a, (size_t)k);
  b->work = fct_arena_f64(a, (size_t)b->lwork);
  b->rwork = fct_arena_f64(a, (size_t)k);
  b->Vb = fct_arena_f64(a, (size_t)(n * k));
  b->UbT = fct_arena_f64(a, (size_t)(k * k));
  b->s = fct_arena_f64(a, (size_t)k);
  b->Uo = fct_arena_f64(a, (size_t)(m * p->r));
  b->sign = fct_arena_f64(a, (size_t)p->r);
  b->err = fct_arena_f64(a, 1);
  b->info = (int*)fct_arena_take(a, 1, sizeof(int));
  return a->L.overflow ? fct_fail(ctx, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t")
                     : FCT_OK;
}

/* C [rows, k] (column-major, A's dtype) = op(A)·B; see randomized_svd.c. */
static fct_status a_mul(fct_context* ctx, const fct_cuda_env* env, const fct_svd_plan* p,
                        const fct_mat* A, bool transA, const char* B, char* C) {
  bool row_major = A->cs == 1 && A->rs >= (A->cols > 1 ? A->cols : 1);
  int64_t ld = row_major ? A->rs : A->cs;
  if (ld < 1) ld = 1;
  bool t = row_major ? !transA : transA;
  int rows = (int)(transA ? p->n : p->m), inner = (int)(transA ? p->m : p->n);
  cublasOperation_t op = t ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasStatus_t st;
  if (p->dt == FCT_F32) {
    const float one = 1.0f, zero = 0.0f;
    st = cublasSgemm(env->blas, op, CUBLAS_OP_N, rows, (int)p->k, inner, &one,
                     (const float*)A->data, (int)ld, (const float*)B, inner, &zero, (float*)C, rows);
  } else {
    const double one = 1.0, zero = 0.0;
    st = cublasDgemm(env->blas, op, CUBLAS_OP_N, rows, (int)p->k, inner, &one,
                     (const double*)A->data, (int)ld, (const double*)B, inner, &zero, (double*)C,
                     rows);
  }
  return fct_cublas_check(ctx, st, "cublas gemm (randomized_svd)");
}

static fct_status to_f64(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, const char* s,
                         double* d, int64_t n) {
  return dt == FCT_F64 ? FCT_OK : fct_cudec_f32_to_f64(ctx, env, (const float*)s, d, n);
}

static fct_status from_f64(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                           const double* s, char* d, int64_t n) {
  return dt == FCT_F64 ? FCT_OK : fct_cudec_f64_to_f32(ctx, env, s, (float*)d, n);
}

/* Q [rows, k] = orth(Q) in place; R (nullable) receives the triangle. */
static fct_status orth(fct_context* ctx, const fct_cuda_env* env, cusolverDnHandle_t h,
                       rsvd_bufs* b, int64_t rows, int64_t k, double* Q, double* R) {
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgeqrf(h, (int)rows, (int)k, Q, (int)rows, b->tau, b->work,
                                             b->lwork, b->info),
                       "cusolverDnDgeqrf"));
  if (R) FCT_TRY(fct_cudec_copy_upper(ctx, env, Q, rows, k, R));
  return fct_cudec_solver_check(ctx, cusolverDnDorgqr(h, (int)rows, (int)k, (int)k, Q, (int)rows, b->tau,
                                            b->work, b->lwork, b->info),
                      "cusolverDnDorgqr");
}

static fct_status rsvd_workspace_in(fct_context* ctx, const fct_cuda_env* env,
                                    const fct_svd_plan* p, size_t* bytes) {
  cusolverDnHandle_t h = NULL;
  FCT_TRY(fct_cudec_solver(ctx, env, &h));
  fct_arena a = {NULL, {0, false}};
  rsvd_bufs b;
  FCT_TRY(rsvd_layout(ctx, h, p, &a, &b));
  *bytes = a.L.cursor;
  return FCT_OK;
}

static fct_status rsvd_in(fct_context* ctx, const fct_cuda_env* env, const fct_svd_plan* p,
                          fct_decomp_info* info) {
  cusolverDnHandle_t h = NULL;
  FCT_TRY(fct_cudec_solver(ctx, env, &h));
  fct_arena ar = {(char*)ctx->workspace, {0, false}};
  rsvd_bufs b;
  FCT_TRY(rsvd_layout(ctx, h, p, &ar, &b));
  FCT_TRY(fct_arena_check(ctx, &ar));
  FCT_TRY(scan_input(ctx, env, p, b.part_sum, b.part_bad, b.scan));
  int64_t m = p->m, n = p->n, k = p->k;
  fct_dtype dt = p->dt;
  fct_mat A = p->a;
  if (!p->a_blas) {
    FCT_TRY(fct_cudec_pack(ctx, env, dt, &p->a, b.Apack));
    A = (fct_mat){b.Apack, m, n, n, 1};
  }
  FCT_TRY(fct_cudec_sketch(ctx, env, dt, b.Om, n * k, p->seed));
  FCT_TRY(a_mul(ctx, env, p, &A, false, b.Om, b.Yd)); /* A·Ω */
  FCT_TRY(to_f64(ctx, env, dt, b.Yd, b.Q, m * k));
  FCT_TRY(orth(ctx, env, h, &b, m, k, b.Q, NULL));
  for (int32_t it = 0; it < p->n_iter; ++it) {
    FCT_TRY(fct_cuda_check(ctx, cudaMemcpyAsync(b.Qprev, b.Q, (size_t)(m * k) * sizeof(double),
                                                cudaMemcpyDeviceToDevice, env->stream),
                           "cudaMemcpyAsync"));
    FCT_TRY(from_f64(ctx, env, dt, b.Q, b.Yd, m * k));
    FCT_TRY(a_mul(ctx, env, p, &A, true, b.Yd, b.Om)); /* Aᵀ·Q = Z·Rz */
    FCT_TRY(to_f64(ctx, env, dt, b.Om, b.Z, n * k));
    FCT_TRY(orth(ctx, env, h, &b, n, k, b.Z, b.Rz));
    FCT_TRY(fct_cuda_check(ctx, cudaMemcpyAsync(b.sv, b.Rz, (size_t)(k * k) * sizeof(double),
                                                cudaMemcpyDeviceToDevice, env->stream),
                           "cudaMemcpyAsync"));
    /* singular values of Rz only, into s (α = s[k-1]²/2, read on device) */
    /* (U and VT are not referenced with 'N'; valid buffers and leading
     * dimensions all the same.) */
    FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgesvd(h, 'N', 'N', (int)k, (int)k, b.sv, (int)k, b.s,
                                               b.UbT, (int)k, b.Vb, (int)k, b.work, b.lwork,
                                               b.rwork, b.info),
                         "cusolverDnDgesvd"));
    FCT_TRY(from_f64(ctx, env, dt, b.Z, b.Om, n * k));
    FCT_TRY(a_mul(ctx, env, p, &A, false, b.Om, b.Yd)); /* A·Z */
    FCT_TRY(to_f64(ctx, env, dt, b.Yd, b.Q, m * k));
    const double one = 1.0;
    FCT_TRY(fct_cublas_check(ctx, cublasDtrmm(env->blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER,
                                              CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, (int)m, (int)k,
                                              &one, b.Rz, (int)k, b.Q, (int)m, b.Q, (int)m),
                             "cublasDtrmm"));
    FCT_TRY(fct_cudec_shift(ctx, env, b.Q, b.Qprev, m * k, b.s, k));
    FCT_TRY(orth(ctx, env, h, &b, m, k, b.Q, NULL));
  }
  FCT_TRY(from_f64(ctx, env, dt, b.Q, b.Yd, m * k));
  FCT_TRY(a_mul(ctx, env, p, &A, true, b.Yd, b.Om)); /* Bᵀ = Aᵀ·Q [n, k] */
  FCT_TRY(to_f64(ctx, env, dt, b.Om, b.Z, n * k));
  FCT_TRY(fct_cudec_solver_check(ctx, cusolverDnDgesvd(h, 'S', 'S', (int)n, (int)k, b.Z, (int)n, b.s, b.Vb,
                                             (int)n, b.UbT, (int)k, b.work, b.lwork, b.rwork,
                                             b.info),
                       "cusolverDnDgesvd"));
  const double one = 1.0, zero = 0.0;
  FCT_TRY(fct_cublas_check(ctx, cublasDgemm(env->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)m,
                                            (int)p->r, (int)k, &one, b.Q, (int)m, b.UbT, (int)k,
                                            &zero, b.Uo, (int)m),
                           "cublasDgemm"));
  FCT_TRY(fct_cudec_signs(ctx, env, b.Uo, m, 1, m, p->r, b.sign));
  FCT_TRY(fct_cudec_store(ctx, env, dt, fct_data(p->U), m, p->r, b.Uo, 1, m, b.sign, 0));
  FCT_TRY(fct_cudec_store(ctx, env, dt, fct_data(p->Vh), p->r, n, b.Vb, n, 1, b.sign, 1));
  FCT_TRY(fct_cudec_store(ctx, env, dt, fct_data(p->S), 1, p->r, b.s, 0, 1, NULL, 0));
  FCT_TRY(fct_cudec_kept_error(ctx, env, b.s, p->r, b.scan, b.err));
  return finish(ctx, env, b.err, b.info, "gesvd", info, p->n_iter);
}

/* ------------------------------------------------------------------------- */
/* Backend table                                                              */
/* ------------------------------------------------------------------------- */

typedef fct_status (*svd_fn)(fct_context*, const fct_cuda_env*, const fct_svd_plan*, void*);

/* Runs fn on A's device with this thread's cuBLAS handle. */
static fct_status on_device(fct_context* ctx, const fct_svd_plan* p, svd_fn fn, void* arg) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, -1, p->a.data, true, &env));
  return fct_cuda_leave(ctx, &env, fn(ctx, &env, p, arg));
}

static fct_status svd_ws_fn(fct_context* c, const fct_cuda_env* e, const fct_svd_plan* p, void* a) {
  return svd_workspace_in(c, e, p, (size_t*)a);
}
static fct_status svd_fn_(fct_context* c, const fct_cuda_env* e, const fct_svd_plan* p, void* a) {
  return svd_in(c, e, p, (fct_decomp_info*)a);
}
static fct_status rsvd_ws_fn(fct_context* c, const fct_cuda_env* e, const fct_svd_plan* p,
                             void* a) {
  return rsvd_workspace_in(c, e, p, (size_t*)a);
}
static fct_status rsvd_fn_(fct_context* c, const fct_cuda_env* e, const fct_svd_plan* p, void* a) {
  return rsvd_in(c, e, p, (fct_decomp_info*)a);
}

static fct_status cuda_svd_workspace(fct_context* ctx, const fct_svd_plan* p, size_t* bytes) {
  return on_device(ctx, p, svd_ws_fn, bytes);
}
static fct_status cuda_svd(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info) {
  return on_device(ctx, p, svd_fn_, info);
}
static fct_status cuda_rsvd_workspace(fct_context* ctx, const fct_svd_plan* p, size_t* bytes) {
  return on_device(ctx, p, rsvd_ws_fn, bytes);
}
static fct_status cuda_rsvd(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info) {
  return on_device(ctx, p, rsvd_fn_, info);
}

static const fct_decompose_backend kCudaDecompose = {
    cuda_svd_workspace, /* svd_workspace */
    cuda_svd,           /* svd */
    cuda_rsvd_workspace, /* rsvd_workspace */
    cuda_rsvd,          /* rsvd */
    &fct_cudec_engine,  /* engine: CP, Tucker, TT (engine_cuda.cu) */
};

/* Like the lowrank backend: registration only, no CUDA call at load. */
__attribute__((constructor)) static void register_cuda_decompose(void) {
  fct_register_cuda_decompose(&kCudaDecompose);
}

} /* extern "C" */
