/*
 * Tucker decomposition by higher-order orthogonal iteration (De Lathauwer,
 * De Moor, Vandewalle 2000), CPU, float64: entry points and the algorithm.
 *
 *   init: HOSVD, U_n = leading R_n left singular vectors of X_(n)
 *   sweep: for each n, Y = X ×_{m≠n} U_mᵀ, U_n = leading R_n left singular
 *          vectors of Y_(n); core = Y ×_{N-1} U_{N-1}ᵀ after the last mode
 *   error: ||X − X̂||² = ||X||² − ||core||² (orthonormal factors)
 *
 * The products X ×_m U_mᵀ are applied in the order that shrinks the tensor
 * fastest (largest I_m / R_m first), so a sweep costs about
 * 2·N·numel·R_first flops; the singular vectors come from the Gram matrix
 * of the smaller side of the (small) unfolding Y_(n) and a partial
 * symmetric eigensolver (tensor_ops_cpu.c). Mode 0's initial factor is
 * never read by the first sweep, so the HOSVD skips it.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "decompose.h"
#include "rng.h"
#include "tensor_ops_cpu.h"

#define TK_MAX_MODES FCT_MAX_DIMS

typedef struct tk_plan {
  const DLTensor* X;
  DLTensor* core;
  DLTensor* const* F;
  fct_dims d;
  int64_t R[TK_MAX_MODES];
  int order[TK_MAX_MODES]; /* modes by decreasing I_m / R_m */
  int64_t numel;
  fct_tucker_options o;
} tk_plan;

typedef struct tk_bufs {
  double* X; /* NULL: read the input in place */
  double* U[TK_MAX_MODES];
  double *bufA, *bufB, *sv, *tau, *owork;
  int64_t olwork;
} tk_bufs;

/* Y = X ×_{m≠skip} U_mᵀ (skip = -1: every mode), ping-ponging between a
 * and b; returns where the result is and its dims. With U == NULL only the
 * dims are followed and *peak receives the largest intermediate. */
static const double* contract(const tk_plan* p, const double* X, int skip, double* const* U,
                              double* a, double* b, fct_dims* out, int64_t* peak) {
  fct_dims d = p->d;
  const double* cur = X;
  double* dst = a;
  int64_t numel = p->numel;
  if (peak) *peak = 0;
  for (int j = 0; j < p->d.N; ++j) {
    int m = p->order[j];
    if (m == skip) continue;
    numel = numel / d.I[m] * p->R[m];
    if (U) fct_mode_product_t(cur, &d, m, U[m], p->R[m], dst);
    d.I[m] = p->R[m];
    if (peak && numel > *peak) *peak = numel;
    cur = dst;
    dst = dst == a ? b : a;
  }
  *out = d;
  return cur;
}

static void tk_layout(const tk_plan* p, fct_arena* ar, tk_bufs* b, bool in_place) {
  memset(b, 0, sizeof *b);
  if (!in_place) b->X = fct_arena_f64(ar, (size_t)p->numel);
  int64_t peak = 0, sv = 0, ow = 1;
  for (int n = 0; n < p->d.N; ++n) {
    b->U[n] = fct_arena_f64(ar, (size_t)(p->d.I[n] * p->R[n]));
    fct_dims dy;
    int64_t pk;
    contract(p, NULL, n, NULL, NULL, NULL, &dy, &pk);
    peak = pk > peak ? pk : peak;
    int64_t s = fct_top_left_sv_scratch(&dy, n, p->R[n]);
    sv = s > sv ? s : sv;
    if (p->o.init == FCT_INIT_SVD) {
      s = fct_top_left_sv_scratch(&p->d, n, p->R[n]);
      sv = s > sv ? s : sv;
    }
    s = fct_la_orth_lwork(p->d.I[n], p->R[n]);
    ow = s > ow ? s : ow;
  }
  fct_dims dc;
  int64_t pk;
  contract(p, NULL, -1, NULL, NULL, NULL, &dc, &pk);
  peak = pk > peak ? pk : peak;
  b->bufA = fct_arena_f64(ar, (size_t)peak);
  b->bufB = fct_arena_f64(ar, (size_t)peak);
  b->sv = fct_arena_f64(ar, (size_t)sv);
  int64_t maxR = 1;
  for (int n = 0; n < p->d.N; ++n) maxR = p->R[n] > maxR ? p->R[n] : maxR;
  b->tau = fct_arena_f64(ar, (size_t)maxR);
  b->owork = fct_arena_f64(ar, (size_t)ow);
  b->olwork = ow;
}

static fct_status sv_failed(fct_context* ctx, int info, int n) {
  return fct_fail(ctx, FCT_ERR_BLAS, "tensor: LAPACK dsyevr failed (info %d) for mode %d", info,
                  n);
}

static fct_status tk_init(fct_context* ctx, const tk_plan* p, tk_bufs* b, const double* X) {
  for (int n = 0; n < p->d.N; ++n) {
    int64_t In = p->d.I[n], Rn = p->R[n];
    double* U = b->U[n];
    if (p->o.init == FCT_INIT_SVD) {
      if (n == 0 && p->o.n_iter_max > 0) continue; /* never read */
      int info = fct_top_left_sv(X, &p->d, n, Rn, U, NULL, p->o.seed, FCT_RNG_FACTOR(n), b->sv);
      if (info) return sv_failed(ctx, info, n);
      continue;
    }
    if (p->o.init == FCT_INIT_GIVEN) {
      const DLTensor* F = p->F[n];
      bool f32 = fct_dtype_of(F->dtype) == FCT_F32;
      const char* src = fct_data(F);
      for (int64_t i = 0; i < In; ++i)
        for (int64_t r = 0; r < Rn; ++r)
          U[i + r * In] = f32 ? ((const float*)src)[i * Rn + r] : ((const double*)src)[i * Rn + r];
    } else {
      for (int64_t e = 0; e < In * Rn; ++e)
        U[e] = fct_rng_uniform(p->o.seed, FCT_RNG_FACTOR(n), (uint64_t)e);
    }
    fct_la_orth(In, Rn, U, In, b->tau, b->owork, b->olwork); /* HOOI wants orthonormal */
  }
  return FCT_OK;
}

static double sum_squares(const double* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i] * v[i];
  return s;
}

static double tk_error(double sumsq, const double* core, int64_t n) {
  double e2 = sumsq - sum_squares(core, n);
  return e2 > 0 ? sqrt(e2 / sumsq) : 0.0;
}

static fct_status tk_run(fct_context* ctx, const tk_plan* p, double* errors,
                         fct_decomp_info* info) {
  bool in_place = fct_dec_dense_f64(p->X);
  fct_arena ar = {(char*)ctx->workspace, 0, false};
  tk_bufs b;
  tk_layout(p, &ar, &b, in_place);
  FCT_TRY_(fct_arena_check(ctx, &ar));
  double sumsq;
  FCT_TRY_(fct_dec_scan_cpu(ctx, "tensor", p->X, &sumsq));
  const double* X = in_place ? (const double*)fct_data(p->X) : b.X;
  if (!in_place) fct_dec_load_f64(p->X, b.X);
  fct_decomp_info res = {0.0, 0, 0};
  /* A zero tensor goes through the same steps: its factors are orthonormal
   * (syevr on a zero Gram matrix), its core zero. */
  double* const* U = b.U;
  FCT_TRY_(tk_init(ctx, p, &b, X));
  fct_dims dc;
  int64_t ncore = 1;
  for (int n = 0; n < p->d.N; ++n) ncore *= p->R[n];
  const double* core = NULL;
  double err = 0.0, prev = 0.0;
  if (p->o.n_iter_max == 0) {
    core = contract(p, X, -1, U, b.bufA, b.bufB, &dc, NULL);
    err = sumsq > 0 ? tk_error(sumsq, core, ncore) : 0.0;
  }
  for (int32_t it = 0; it < p->o.n_iter_max; ++it) {
    for (int n = 0; n < p->d.N; ++n) {
      fct_dims dy;
      const double* Y = contract(p, X, n, U, b.bufA, b.bufB, &dy, NULL);
      int info_sv = fct_top_left_sv(Y, &dy, n, p->R[n], U[n], NULL, p->o.seed,
                                    FCT_RNG_FACTOR(n), b.sv);
      if (info_sv) return sv_failed(ctx, info_sv, n);
      if (n == p->d.N - 1) { /* core = Y ×_n U_nᵀ, into the other buffer */
        double* dst = Y == b.bufA ? b.bufB : b.bufA;
        fct_mode_product_t(Y, &dy, n, U[n], p->R[n], dst);
        core = dst;
      }
    }
    err = sumsq > 0 ? tk_error(sumsq, core, ncore) : 0.0;
    if (errors) errors[it] = err;
    res.n_iter = it + 1;
    if (it >= 1 && fabs(prev - err) < p->o.tol) {
      res.converged = 1;
      break;
    }
    prev = err;
  }
  res.rel_error = err;
  for (int n = 0; n < p->d.N; ++n) fct_dec_store(p->F[n], U[n], p->d.I[n], p->R[n], 1, p->d.I[n]);
  fct_dec_store(p->core, core, 1, ncore, 0, 1);
  if (info) *info = res;
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

static fct_status tk_check(fct_context* ctx, const DLTensor* X, const DLTensor* core, int nf,
                           DLTensor* const* F, const fct_tucker_options* o, tk_plan* p) {
  if (!o) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "opts: expected options, got NULL");
  FCT_TRY_(fct_dec_check_input(ctx, "tensor", X, 2, TK_MAX_MODES));
  FCT_TRY_(fct_dec_cpu_only(ctx, "tucker", "tensor", X));
  memset(p, 0, sizeof *p);
  p->X = X;
  p->core = (DLTensor*)core;
  p->F = F;
  p->o = *o;
  p->d.N = X->ndim;
  for (int n = 0; n < X->ndim; ++n) p->d.I[n] = X->shape[n];
  p->numel = fct_numel(X);
  if (p->numel > INT_MAX)
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "tensor: %lld elements; LAPACK's 32-bit indices allow at most 2^31 - 1",
                    (long long)p->numel);
  if (p->numel == 0)
    return fct_fail(ctx, FCT_ERR_SHAPE, "tensor: expected no empty dims for tucker");
  if (nf != X->ndim || !F)
    return fct_fail(ctx, FCT_ERR_SHAPE, "factors: expected %d factors (one per dim of tensor), got %d",
                    X->ndim, F ? nf : 0);
  if (o->n_iter_max < 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "n_iter_max: expected >= 0, got %d", o->n_iter_max);
  if (!(o->tol >= 0) || !isfinite(o->tol))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "tol: expected a finite value >= 0, got %g", o->tol);
  if (o->init < FCT_INIT_SVD || o->init > FCT_INIT_GIVEN)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "init: expected FCT_INIT_SVD, FCT_INIT_RANDOM or FCT_INIT_GIVEN, got %d",
                    o->init);
  for (int n = 0; n < nf; ++n) {
    char name[32];
    snprintf(name, sizeof name, "factors[%d]", n);
    FCT_TRY_(fct_check_tensor(ctx, name, F[n], 2));
    int64_t Rn = F[n]->ndim == 2 ? F[n]->shape[1] : 0;
    if (Rn < 1 || Rn > X->shape[n])
      return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                      "rank[%d]: expected 1 <= rank <= %lld (dim %d of tensor), got %lld "
                      "(the columns of %s)",
                      n, (long long)X->shape[n], n, (long long)Rn, name);
    p->R[n] = Rn;
    int64_t shape[2] = {X->shape[n], Rn};
    FCT_TRY_(fct_dec_check_output(ctx, name, F[n], X, 2, shape));
    for (int m = 0; m < n; ++m) FCT_TRY_(fct_check_disjoint(ctx, name, F[n], "another factor", F[m]));
  }
  FCT_TRY_(fct_dec_check_output(ctx, "core", core, X, X->ndim, p->R));
  for (int n = 0; n < nf; ++n) FCT_TRY_(fct_check_disjoint(ctx, "core", core, "a factor", F[n]));
  /* Contraction order: largest reduction I_m / R_m first (stable). */
  for (int n = 0; n < p->d.N; ++n) p->order[n] = n;
  for (int i = 1; i < p->d.N; ++i)
    for (int j = i; j > 0; --j) {
      int a = p->order[j - 1], c = p->order[j];
      if ((double)p->d.I[c] / (double)p->R[c] > (double)p->d.I[a] / (double)p->R[a]) {
        p->order[j - 1] = c;
        p->order[j] = a;
      }
    }
  return FCT_OK;
}

fct_status fct_tucker_hooi_workspace(const fct_context* ctx, const DLTensor* X,
                                     const DLTensor* core, int n_factors,
                                     const DLTensor* const* factors,
                                     const fct_tucker_options* opts, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tk_plan p;
  FCT_TRY_(tk_check(&c, X, core, n_factors, (DLTensor* const*)factors, opts, &p));
  fct_arena a = {NULL, 0, false};
  tk_bufs b;
  tk_layout(&p, &a, &b, fct_dec_dense_f64(X));
  if (a.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.used;
  return FCT_OK;
}

fct_status fct_tucker_hooi(fct_context* ctx, const DLTensor* X, DLTensor* core, int n_factors,
                           DLTensor* const* factors, const fct_tucker_options* opts,
                           double* errors, fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  tk_plan p;
  FCT_TRY_(tk_check(ctx, X, core, n_factors, factors, opts, &p));
  return tk_run(ctx, &p, errors, info);
}
