/*
 * Tucker decomposition by higher-order orthogonal iteration (De Lathauwer,
 * De Moor, Vandewalle 2000), float64, on the CPU or a GPU (engine.h): entry
 * points and the algorithm.
 *
 *   init: HOSVD, U_n = leading R_n left singular vectors of X_(n)
 *   sweep: for each n, Y = X ×_{m≠n} U_mᵀ, U_n = leading R_n left singular
 *          vectors of Y_(n); core = Y ×_{N-1} U_{N-1}ᵀ after the last mode
 *   error: ||X − X̂||² = ||X||² − ||core||² (orthonormal factors)
 *
 * The products X ×_m U_mᵀ are applied in the order that shrinks the tensor
 * fastest (largest I_m / R_m first), so a sweep costs about
 * 2·N·numel·R_first flops; the singular vectors of the (small) unfolding
 * Y_(n) come from the engine's top_left_sv (CPU: Gram matrix of its
 * smaller side and a partial symmetric eigensolver; GPU: gesvd). Mode 0's
 * initial factor is never read by the first sweep, so the HOSVD skips it.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "decompose.h"
#include "engine.h"
#include "rng.h"

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
  double *bufA, *bufB, *sv, *orth, *scan;
} tk_bufs;

/* The dims of X ×_{m≠skip} U_mᵀ (skip = -1: every mode), and *peak the
 * largest intermediate on the way (contract's order). */
static fct_dims contracted_dims(const tk_plan* p, int skip, int64_t* peak) {
  fct_dims d = p->d;
  int64_t numel = p->numel;
  *peak = 0;
  for (int j = 0; j < p->d.N; ++j) {
    int m = p->order[j];
    if (m == skip) continue;
    numel = numel / d.dim[m] * p->R[m];
    d.dim[m] = p->R[m];
    if (numel > *peak) *peak = numel;
  }
  return d;
}

/* *Y = X ×_{m≠skip} U_mᵀ, ping-ponging between a and b; *out its dims. */
static fct_status contract(const fct_dec_run* r, const tk_plan* p, const double* X, int skip,
                           double* const* U, double* a, double* b, fct_dims* out,
                           const double** Y) {
  fct_dims d = p->d;
  const double* cur = X;
  double* dst = a;
  for (int j = 0; j < p->d.N; ++j) {
    int m = p->order[j];
    if (m == skip) continue;
    FCT_TRY(r->e->mode_product_t(r, cur, &d, m, U[m], p->R[m], dst));
    d.dim[m] = p->R[m];
    cur = dst;
    dst = dst == a ? b : a;
  }
  *out = d;
  *Y = cur;
  return FCT_OK;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static fct_status tk_layout(const fct_dec_run* r, const tk_plan* p, fct_arena* ar, tk_bufs* b,
                            bool in_place) {
  const fct_dec_engine* e = r->e;
  memset(b, 0, sizeof *b);
  if (!in_place) b->X = fct_arena_f64(ar, (size_t)p->numel);
  int64_t peak = 0, sv = 0, ow = 0, s;
  for (int n = 0; n < p->d.N; ++n) {
    b->U[n] = fct_arena_f64(ar, (size_t)(p->d.dim[n] * p->R[n]));
    int64_t pk;
    fct_dims dy = contracted_dims(p, n, &pk);
    peak = max64(peak, pk);
    FCT_TRY(e->top_left_sv_scratch(r, &dy, n, p->R[n], &s));
    sv = max64(sv, s);
    if (p->o.init == FCT_INIT_SVD) {
      FCT_TRY(e->top_left_sv_scratch(r, &p->d, n, p->R[n], &s));
      sv = max64(sv, s);
    } else {
      FCT_TRY(e->orth_scratch(r, p->d.dim[n], p->R[n], &s));
      ow = max64(ow, s);
    }
  }
  int64_t pk;
  contracted_dims(p, -1, &pk);
  peak = max64(peak, pk);
  b->bufA = fct_arena_f64(ar, (size_t)peak);
  b->bufB = fct_arena_f64(ar, (size_t)peak);
  b->sv = fct_arena_f64(ar, (size_t)sv);
  b->orth = fct_arena_f64(ar, (size_t)ow);
  b->scan = fct_arena_f64(ar, (size_t)e->scan_scratch);
  return FCT_OK;
}

static fct_status tk_init(const fct_dec_run* r, const tk_plan* p, tk_bufs* b, const double* X) {
  const fct_dec_engine* e = r->e;
  for (int n = 0; n < p->d.N; ++n) {
    int64_t In = p->d.dim[n], Rn = p->R[n];
    double* U = b->U[n];
    if (p->o.init == FCT_INIT_SVD) {
      if (n == 0 && p->o.n_iter_max > 0) continue; /* never read */
      FCT_TRY(e->top_left_sv(r, X, &p->d, n, Rn, U, p->o.seed, FCT_RNG_FACTOR(n), b->sv));
      continue;
    }
    if (p->o.init == FCT_INIT_GIVEN)
      FCT_TRY(e->load_transposed(r, p->F[n], In, Rn, U));
    else
      FCT_TRY(e->uniform(r, U, In * Rn, p->o.seed, FCT_RNG_FACTOR(n)));
    FCT_TRY(e->orth(r, In, Rn, U, b->orth)); /* HOOI wants orthonormal */
  }
  return FCT_OK;
}

/* sqrt((||X||² − ||core||²) / ||X||²): the factors are orthonormal. */
static fct_status tk_error(const fct_dec_run* r, double sumsq, const double* core, int64_t n,
                           double* scratch, double* err) {
  double c2;
  FCT_TRY(r->e->scan(r, "core", core, n, &c2, scratch));
  double e2 = sumsq - c2;
  *err = sumsq > 0 && e2 > 0 ? sqrt(e2 / sumsq) : 0.0;
  return FCT_OK;
}

static fct_status tk_run(const fct_dec_run* r, const tk_plan* p, double* errors,
                         fct_decomp_info* info) {
  const fct_dec_engine* e = r->e;
  fct_context* ctx = r->ctx;
  bool in_place = fct_dec_dense_f64(p->X);
  fct_arena ar = {(char*)ctx->workspace, {0, false}};
  tk_bufs b;
  FCT_TRY(tk_layout(r, p, &ar, &b, in_place));
  FCT_TRY(fct_arena_check(ctx, &ar));
  const double* X = in_place ? (const double*)fct_data(p->X) : b.X;
  if (!in_place) FCT_TRY(e->load(r, p->X, b.X));
  double sumsq;
  FCT_TRY(e->scan(r, "tensor", X, p->numel, &sumsq, b.scan));
  fct_decomp_info res = {0.0, 0, 0};
  /* A zero tensor goes through the same steps: its factors are orthonormal
   * (the singular vectors of a zero unfolding), its core zero. */
  double* const* U = b.U;
  FCT_TRY(tk_init(r, p, &b, X));
  fct_dims dc;
  int64_t ncore = 1;
  for (int n = 0; n < p->d.N; ++n) ncore *= p->R[n];
  const double* core = NULL;
  double err = 0.0, prev = 0.0;
  if (p->o.n_iter_max == 0) {
    FCT_TRY(contract(r, p, X, -1, U, b.bufA, b.bufB, &dc, &core));
    FCT_TRY(tk_error(r, sumsq, core, ncore, b.scan, &err));
  }
  for (int32_t it = 0; it < p->o.n_iter_max; ++it) {
    for (int n = 0; n < p->d.N; ++n) {
      fct_dims dy;
      const double* Y;
      FCT_TRY(contract(r, p, X, n, U, b.bufA, b.bufB, &dy, &Y));
      FCT_TRY(e->top_left_sv(r, Y, &dy, n, p->R[n], U[n], p->o.seed, FCT_RNG_FACTOR(n), b.sv));
      if (n == p->d.N - 1) { /* core = Y ×_n U_nᵀ, into the other buffer */
        double* dst = Y == b.bufA ? b.bufB : b.bufA;
        FCT_TRY(e->mode_product_t(r, Y, &dy, n, U[n], p->R[n], dst));
        core = dst;
      }
    }
    FCT_TRY(tk_error(r, sumsq, core, ncore, b.scan, &err));
    if (errors) errors[it] = err;
    res.n_iter = it + 1;
    if (it >= 1 && fabs(prev - err) < p->o.tol) {
      res.converged = 1;
      break;
    }
    prev = err;
  }
  res.rel_error = err;
  for (int n = 0; n < p->d.N; ++n)
    FCT_TRY(e->store(r, p->F[n], 0, U[n], p->d.dim[n], p->R[n], 1, p->d.dim[n]));
  FCT_TRY(e->store(r, p->core, 0, core, 1, ncore, 0, 1));
  if (info) *info = res;
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

static fct_status tk_check(fct_context* ctx, const DLTensor* X, const DLTensor* core, int nf,
                           DLTensor* const* F, const fct_tucker_options* o, tk_plan* p) {
  if (!o) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "opts: expected options, got NULL");
  FCT_TRY(fct_dec_check_input(ctx, "tensor", X, 2, TK_MAX_MODES));
  memset(p, 0, sizeof *p);
  p->X = X;
  p->core = (DLTensor*)core;
  p->F = F;
  p->o = *o;
  p->d.N = X->ndim;
  for (int n = 0; n < X->ndim; ++n) p->d.dim[n] = X->shape[n];
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
    FCT_TRY(fct_check_tensor(ctx, name, F[n], 2));
    int64_t Rn = F[n]->ndim == 2 ? F[n]->shape[1] : 0;
    if (Rn < 1 || Rn > X->shape[n])
      return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                      "rank[%d]: expected 1 <= rank <= %lld (dim %d of tensor), got %lld "
                      "(the columns of %s)",
                      n, (long long)X->shape[n], n, (long long)Rn, name);
    p->R[n] = Rn;
    int64_t shape[2] = {X->shape[n], Rn};
    FCT_TRY(fct_dec_check_output(ctx, name, F[n], X, 2, shape));
    for (int m = 0; m < n; ++m)
      FCT_TRY(fct_check_disjoint(ctx, name, F[n], "another factor", F[m]));
  }
  FCT_TRY(fct_dec_check_output(ctx, "core", core, X, X->ndim, p->R));
  for (int n = 0; n < nf; ++n) FCT_TRY(fct_check_disjoint(ctx, "core", core, "a factor", F[n]));
  /* Contraction order: largest reduction I_m / R_m first (stable). */
  for (int n = 0; n < p->d.N; ++n) p->order[n] = n;
  for (int i = 1; i < p->d.N; ++i)
    for (int j = i; j > 0; --j) {
      int a = p->order[j - 1], c = p->order[j];
      if ((double)p->d.dim[c] / (double)p->R[c] > (double)p->d.dim[a] / (double)p->R[a]) {
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
  FCT_TRY(tk_check(&c, X, core, n_factors, (DLTensor* const*)factors, opts, &p));
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(&c, "tensor", X, &r));
  fct_arena a = {NULL, {0, false}};
  tk_bufs b;
  FCT_TRY(tk_layout(&r, &p, &a, &b, fct_dec_dense_f64(X)));
  if (a.L.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.L.cursor;
  return FCT_OK;
}

fct_status fct_tucker_hooi(fct_context* ctx, const DLTensor* X, DLTensor* core, int n_factors,
                           DLTensor* const* factors, const fct_tucker_options* opts,
                           double* errors, fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  tk_plan p;
  FCT_TRY(tk_check(ctx, X, core, n_factors, factors, opts, &p));
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(ctx, "tensor", X, &r));
  return tk_run(&r, &p, errors, info);
}
