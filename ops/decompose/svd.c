/*
 * Truncated SVD entry points (fct_svd*), the argument checks shared with
 * randomized_svd, and the CPU computation: A is copied into float64 and
 * handed to LAPACK's dgesdd (divide and conquer), whose thin factors are
 * truncated to rank r.
 *
 * Cost: O(m·n·min(m, n)) flops (about 4·m·n·q + 22·q³ for q = min(m, n)
 * with vectors); workspace m·n + (m + n)·q + q doubles plus dgesdd's.
 * The rank is not used until the end: LAPACK has no cheaper truncated
 * driver, which is why randomized_svd exists.
 */
#include <math.h>
#include <string.h>

#include "decompose.h"
#include "linalg_cpu.h"

fct_status fct_dec_svd_plan(fct_context* ctx, const DLTensor* A, const DLTensor* U,
                            const DLTensor* S, const DLTensor* Vh, bool randomized,
                            fct_svd_plan* p) {
  FCT_TRY(fct_dec_check_input(ctx, "A", A, 2, 2));
  memset(p, 0, sizeof *p);
  p->dt = fct_dtype_of(A->dtype);
  p->m = A->shape[0];
  p->n = A->shape[1];
  int64_t q = p->m < p->n ? p->m : p->n;
  FCT_TRY(fct_check_tensor(ctx, "U", U, 2));
  if (U->ndim != 2 || U->shape[0] != p->m)
    return fct_fail(ctx, FCT_ERR_SHAPE, "U: expected shape [m, rank] with m = %lld (A's rows)",
                    (long long)p->m);
  p->r = U->shape[1];
  if (p->r < 1 || p->r > q)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "rank: expected 1 <= rank <= min(m, n) = %lld for A of shape [%lld, %lld], "
                    "got %lld (U's columns)",
                    (long long)q, (long long)p->m, (long long)p->n, (long long)p->r);
  int64_t ushape[2] = {p->m, p->r}, vshape[2] = {p->r, p->n};
  FCT_TRY(fct_dec_check_output(ctx, "U", U, A, 2, ushape));
  FCT_TRY(fct_dec_check_output(ctx, "Vh", Vh, A, 2, vshape));
  FCT_TRY(fct_check_tensor(ctx, "S", S, 1));
  p->s = S->ndim == 1 ? S->shape[0] : -1;
  if (randomized && p->s != p->r)
    return fct_fail(ctx, FCT_ERR_SHAPE, "S: expected shape [%lld] (the rank)", (long long)p->r);
  if (p->s < p->r || p->s > q)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "S: expected shape [s] with rank = %lld <= s <= min(m, n) = %lld",
                    (long long)p->r, (long long)q);
  int64_t sshape[1] = {p->s};
  FCT_TRY(fct_dec_check_output(ctx, "S", S, A, 1, sshape));
  FCT_TRY(fct_check_disjoint(ctx, "U", U, "S", S));
  FCT_TRY(fct_check_disjoint(ctx, "U", U, "Vh", Vh));
  FCT_TRY(fct_check_disjoint(ctx, "S", S, "Vh", Vh));
  p->A = A;
  p->U = (DLTensor*)U;
  p->S = (DLTensor*)S;
  p->Vh = (DLTensor*)Vh;
  fct_fold(A, &p->a);
  p->a_blas = fct_mat_blas_ok(&p->a) && p->a.rs <= INT32_MAX && p->a.cs <= INT32_MAX;
  return FCT_OK;
}

/* Relative error of keeping the r largest of the q singular values s. */
double fct_dec_tail_error(const double* s, int64_t q, int64_t r) {
  double tail = 0, total = 0;
  for (int64_t j = q - 1; j >= 0; --j) { /* smallest first: less rounding */
    total += s[j] * s[j];
    if (j >= r) tail += s[j] * s[j];
  }
  return total > 0 ? sqrt(tail / total) : 0.0;
}

/* ------------------------------------------------------------------------- */
/* CPU                                                                        */
/* ------------------------------------------------------------------------- */

typedef struct svd_bufs {
  double *W, *s, *Ut, *VTt, *work;
  int* iwork;
  int64_t q, lwork;
} svd_bufs;

/* Row-major A [m, n] is the column-major [n, m] matrix Aᵀ: dgesdd factors
 * that, Aᵀ = Ut·diag(s)·VTt, so A = VTtᵀ·diag(s)·Utᵀ. */
static void svd_layout(const fct_svd_plan* p, fct_arena* a, svd_bufs* b) {
  b->q = p->m < p->n ? p->m : p->n;
  b->lwork = fct_la_gesdd_lwork(p->n, p->m);
  b->W = fct_arena_f64(a, (size_t)(p->m * p->n));
  b->s = fct_arena_f64(a, (size_t)b->q);
  b->Ut = fct_arena_f64(a, (size_t)(p->n * b->q));
  b->VTt = fct_arena_f64(a, (size_t)(b->q * p->m));
  b->work = fct_arena_f64(a, (size_t)b->lwork);
  b->iwork = (int*)fct_arena_take(a, (size_t)(8 * b->q), sizeof(int));
}

static fct_status svd_cpu(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info) {
  fct_arena a = {(char*)ctx->workspace, {0, false}};
  svd_bufs b;
  svd_layout(p, &a, &b);
  FCT_TRY(fct_arena_check(ctx, &a));
  double sumsq;
  FCT_TRY(fct_dec_scan_cpu(ctx, "A", p->A, &sumsq));
  fct_dec_load_f64(p->A, b.W);
  int rc = fct_la_gesdd(p->n, p->m, b.W, p->n, b.s, b.Ut, p->n, b.VTt, b.q, b.work, b.lwork,
                        b.iwork);
  if (rc != 0)
    return fct_fail(ctx, FCT_ERR_BLAS, "A: LAPACK dgesdd failed to converge (info %d)", rc);
  /* U(i, j) = VTt[j + i·q]; Vh(j, c) = Ut[c + j·n]. */
  fct_dec_fix_signs(b.VTt, p->m, b.q, 1, b.Ut, p->n, p->n, 1, p->r);
  fct_dec_store(p->U, b.VTt, p->m, p->r, b.q, 1);
  fct_dec_store(p->Vh, b.Ut, p->r, p->n, p->n, 1);
  fct_dec_store(p->S, b.s, 1, p->s, 0, 1);
  if (info) {
    info->rel_error = fct_dec_tail_error(b.s, b.q, p->r);
    info->n_iter = 0;
    info->converged = 1;
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

fct_status fct_svd_workspace(const fct_context* ctx, const DLTensor* A, const DLTensor* U,
                             const DLTensor* S, const DLTensor* Vh, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  fct_svd_plan p;
  FCT_TRY(fct_dec_svd_plan(&c, A, U, S, Vh, false, &p));
  if (A->device.device_type == kDLCUDA) {
    const fct_decompose_backend* be;
    FCT_TRY(fct_cuda_decompose_for(&c, "A", &be));
    return be->svd_workspace(&c, &p, bytes);
  }
  fct_arena a = {NULL, {0, false}};
  svd_bufs b;
  svd_layout(&p, &a, &b);
  if (a.L.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.L.cursor;
  return FCT_OK;
}

fct_status fct_svd(fct_context* ctx, const DLTensor* A, DLTensor* U, DLTensor* S, DLTensor* Vh,
                   fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  fct_svd_plan p;
  FCT_TRY(fct_dec_svd_plan(ctx, A, U, S, Vh, false, &p));
  if (A->device.device_type == kDLCUDA) {
    const fct_decompose_backend* be;
    FCT_TRY(fct_cuda_decompose_for(ctx, "A", &be));
    return be->svd(ctx, &p, info);
  }
  return svd_cpu(ctx, &p, info);
}
