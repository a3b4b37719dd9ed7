/*
 * Tensor-Train decomposition by TT-SVD (Oseledets 2011, Algorithm 1),
 * float64, on the CPU or a GPU (engine.h): entry points and the algorithm.
 *
 *   C = X as a [n_0, n_1·...·n_{N-1}] matrix
 *   for k = 0 .. N-2: C [r_k·n_k, rest] = U·diag(s)·Vᵀ (thin SVD, dgesdd);
 *     keep r_{k+1} singular values (eps / cap); core k = U[:, :r_{k+1}];
 *     C = diag(s)·Vᵀ, reshaped [r_{k+1}·n_{k+1}, rest / n_{k+1}]
 *   core N-1 = C
 *
 * With a threshold δ = eps·||X|| / sqrt(N − 1) on every step's discarded
 * tail, ||X − TT|| <= eps·||X||; the discarded parts are orthogonal, so the
 * error reported, sqrt(Σ tails²), is exact. Cost: one SVD per step, the
 * first O(n_0 · numel · min(n_0, numel / n_0)); workspace about 2·numel
 * plus LAPACK's (sized for the largest ranks the caps allow).
 *
 * Row-major [a, b] is column-major [b, a] = Cᵀ: dgesdd factors Cᵀ = U'·S·V'ᵀ,
 * so C's left singular vectors are the rows of V'ᵀ and diag(s)·(right
 * singular vectors)ᵀ are U''s columns scaled, already laid out as the
 * row-major next C.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decompose.h"

#define TT_MAX_MODES 64

typedef struct tt_plan {
  const DLTensor* X;
  DLTensor* cores;
  int N;
  int64_t n[TT_MAX_MODES];
  int64_t rmax[TT_MAX_MODES + 1]; /* the largest rank each link can take */
  int64_t numel, capacity;
  double eps;
} tt_plan;

typedef struct tt_bufs {
  double *C, *U, *VT, *s, *work, *scan;
} tt_bufs;

/* Sizes of step k for the largest ranks: C is [a, b], q = min(a, b). */
static void step_dims(const tt_plan* p, int k, int64_t* a, int64_t* b, int64_t* q) {
  int64_t rest = 1;
  for (int j = k + 1; j < p->N; ++j) rest *= p->n[j];
  *a = p->rmax[k] * p->n[k];
  *b = rest;
  *q = *a < *b ? *a : *b;
}

static fct_status tt_layout(const fct_dec_run* r, const tt_plan* p, fct_arena* ar, tt_bufs* t) {
  int64_t u = 0, vt = 0, q = 0, lw = 1;
  for (int k = 0; k + 1 < p->N; ++k) {
    int64_t a, b, qk, l;
    step_dims(p, k, &a, &b, &qk);
    u = b * qk > u ? b * qk : u;
    vt = qk * a > vt ? qk * a : vt;
    q = qk > q ? qk : q;
    FCT_TRY(r->e->svd_scratch(r, b, a, &l));
    lw = l > lw ? l : lw;
    /* At run time a = r_k·n_k may be smaller than sized, and a wide step
     * (a > b) may turn tall: size that orientation too (an engine's SVD
     * may take another path for it, as gesvd on CUDA does). */
    if (a > b) {
      FCT_TRY(r->e->svd_scratch(r, b, b, &l));
      lw = l > lw ? l : lw;
    }
  }
  t->C = fct_arena_f64(ar, (size_t)p->numel);
  t->U = fct_arena_f64(ar, (size_t)u);
  t->VT = fct_arena_f64(ar, (size_t)vt);
  t->s = fct_arena_f64(ar, (size_t)q);
  t->work = fct_arena_f64(ar, (size_t)lw);
  t->scan = fct_arena_f64(ar, (size_t)r->e->scan_scratch);
  return FCT_OK;
}

/* The rank to keep from s[0..q): the smallest whose tail norm² <= tail2
 * (tail2 < 0: drop only values numerically zero), at most cap, at least 1.
 * *dropped receives the discarded tail's norm². */
static int64_t choose_rank(const double* s, int64_t q, double tail2, int64_t cap, int64_t a,
                           int64_t b, double* dropped) {
  int64_t r = q;
  if (tail2 < 0) {
    double cut = s[0] * (double)(a > b ? a : b) * DBL_EPSILON;
    while (r > 1 && s[r - 1] <= cut) --r;
  } else {
    double acc = 0;
    while (r > 1 && acc + s[r - 1] * s[r - 1] <= tail2) {
      acc += s[r - 1] * s[r - 1];
      --r;
    }
  }
  if (r > cap) r = cap;
  if (r < 1) r = 1;
  double d = 0;
  for (int64_t j = q - 1; j >= r; --j) d += s[j] * s[j];
  *dropped = d;
  return r;
}

/* s_host: the singular values on the host (t->s itself on the CPU). */
static fct_status tt_steps(const fct_dec_run* r, const tt_plan* p, tt_bufs* t, double* s_host,
                           int64_t* ranks, fct_decomp_info* info) {
  const fct_dec_engine* e = r->e;
  FCT_TRY(e->load(r, p->X, t->C));
  double sumsq;
  FCT_TRY(e->scan(r, "tensor", t->C, p->numel, &sumsq, t->scan));
  double tail2 = p->eps > 0 && p->N > 1 ? p->eps * p->eps * sumsq / (double)(p->N - 1) : -1.0;
  double err2 = 0;
  int64_t rk = 1, off = 0;
  ranks[0] = 1;
  for (int k = 0; k + 1 < p->N; ++k) {
    int64_t a = rk * p->n[k], b = 1;
    for (int j = k + 1; j < p->N; ++j) b *= p->n[j];
    int64_t q = a < b ? a : b;
    char what[32];
    snprintf(what, sizeof what, "core %d", k);
    FCT_TRY(e->svd(r, b, a, t->C, t->s, t->U, t->VT, t->work, what));
    FCT_TRY(e->to_host(r, s_host, t->s, (size_t)q * sizeof(double)));
    double dropped;
    int64_t rn = choose_rank(s_host, q, tail2, p->rmax[k + 1], a, b, &dropped);
    err2 += dropped;
    /* core k [rk, n_k, rn] row-major: element (row, j) = VT'[j + row·q]. */
    FCT_TRY(e->store(r, p->cores, off, t->VT, a, rn, q, 1));
    off += a * rn;
    /* next C [rn, b] row-major: row j = s_j · U'[:, j]. */
    FCT_TRY(e->copy(r, t->C, t->U, rn, b, b, 1, t->s));
    rk = rn;
    ranks[k + 1] = rn;
  }
  FCT_TRY(e->store(r, p->cores, off, t->C, 1, rk * p->n[p->N - 1], 0, 1));
  ranks[p->N] = 1;
  if (info) {
    info->rel_error = sumsq > 0 ? sqrt(err2 / sumsq) : 0.0;
    info->n_iter = 0;
    info->converged = 1;
  }
  return FCT_OK;
}

static fct_status tt_run(const fct_dec_run* r, const tt_plan* p, int64_t* ranks,
                         fct_decomp_info* info) {
  fct_arena ar = {(char*)r->ctx->workspace, {0, false}};
  tt_bufs t;
  FCT_TRY(tt_layout(r, p, &ar, &t));
  FCT_TRY(fct_arena_check(r->ctx, &ar));
  if (r->e->host) return tt_steps(r, p, &t, t.s, ranks, info);
  /* The rank choice reads the singular values on the host. */
  int64_t q = 1;
  for (int k = 0; k + 1 < p->N; ++k) {
    int64_t a, b, qk;
    step_dims(p, k, &a, &b, &qk);
    q = qk > q ? qk : q;
  }
  double* s_host = malloc((size_t)q * sizeof(double));
  if (!s_host)
    return fct_fail(r->ctx, FCT_ERR_WORKSPACE, "tensor_train: cannot allocate %lld host doubles",
                    (long long)q);
  fct_status st = tt_steps(r, p, &t, s_host, ranks, info);
  free(s_host);
  return st;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

static int64_t min3(int64_t a, int64_t b, int64_t c) {
  int64_t m = a < b ? a : b;
  return m < c ? m : c;
}

/* Checks everything but the output and fills p (capacity included). */
static fct_status tt_check(fct_context* ctx, const DLTensor* X, int N, const int64_t* sizes,
                           const int64_t* caps, double eps, tt_plan* p) {
  FCT_TRY(fct_dec_check_input(ctx, "tensor", X, 0, FCT_MAX_DIMS));
  memset(p, 0, sizeof *p);
  p->X = X;
  p->eps = eps;
  p->numel = fct_numel(X);
  if (p->numel > INT_MAX)
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "tensor: %lld elements; LAPACK's 32-bit indices allow at most 2^31 - 1",
                    (long long)p->numel);
  if (!(eps >= 0) || !isfinite(eps))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "eps: expected a finite value >= 0, got %g", eps);
  if (sizes) {
    if (N < 1 || N > TT_MAX_MODES)
      return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "n_modes: expected 1 to %d, got %d",
                      TT_MAX_MODES, N);
    int64_t prod = 1;
    for (int k = 0; k < N; ++k) {
      if (sizes[k] < 1)
        return fct_fail(ctx, FCT_ERR_SHAPE, "mode_sizes[%d]: expected >= 1, got %lld", k,
                        (long long)sizes[k]);
      if (__builtin_mul_overflow(prod, sizes[k], &prod)) prod = -1;
      p->n[k] = sizes[k];
      if (prod < 0) break;
    }
    if (prod != p->numel)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "mode_sizes: their product must equal the %lld elements of tensor",
                      (long long)p->numel);
  } else {
    if (N != X->ndim || N < 1)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "n_modes: expected %d (the dims of tensor, mode_sizes being NULL), got %d",
                      X->ndim, N);
    for (int k = 0; k < N; ++k) p->n[k] = X->shape[k];
  }
  p->N = N;
  if (p->numel == 0)
    return fct_fail(ctx, FCT_ERR_SHAPE, "tensor: expected no empty dims for tensor_train");
  if (caps && (caps[0] != 1 || caps[N] != 1))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "rank: expected the first and last TT ranks to be 1, got %lld and %lld",
                    (long long)caps[0], (long long)caps[N]);
  int64_t left = 1, cap_total = 0;
  p->rmax[0] = 1;
  for (int k = 1; k <= N; ++k) {
    left *= p->n[k - 1];
    int64_t right = p->numel / left;
    if (caps && caps[k] < 1)
      return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "rank[%d]: expected >= 1, got %lld", k,
                      (long long)caps[k]);
    p->rmax[k] = min3(caps ? caps[k] : INT64_MAX, left, right);
  }
  for (int k = 0; k < N; ++k) {
    int64_t e;
    if (__builtin_mul_overflow(p->rmax[k] * p->n[k], p->rmax[k + 1], &e) ||
        __builtin_add_overflow(cap_total, e, &cap_total))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "rank: the cores' sizes overflow int64");
  }
  p->capacity = cap_total;
  for (int k = 0; k + 1 < N; ++k) {
    int64_t a, b, q;
    step_dims(p, k, &a, &b, &q);
    FCT_TRY(fct_dec_check_int(ctx, "tensor (an unfolding's rows)", a));
  }
  return FCT_OK;
}

static fct_status tt_check_cores(fct_context* ctx, const tt_plan* p, const DLTensor* cores) {
  int64_t shape[1] = {p->capacity};
  return fct_dec_check_output(ctx, "cores", cores, p->X, 1, shape);
}

fct_status fct_tensor_train_capacity(const fct_context* ctx, const DLTensor* X, int n_modes,
                                     const int64_t* mode_sizes, const int64_t* max_ranks,
                                     int64_t* elements) {
  if (!ctx || !elements) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tt_plan p;
  FCT_TRY(tt_check(&c, X, n_modes, mode_sizes, max_ranks, 0.0, &p));
  *elements = p.capacity;
  return FCT_OK;
}

fct_status fct_tensor_train_workspace(const fct_context* ctx, const DLTensor* X, int n_modes,
                                      const int64_t* mode_sizes, const int64_t* max_ranks,
                                      double eps, const DLTensor* cores, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tt_plan p;
  FCT_TRY(tt_check(&c, X, n_modes, mode_sizes, max_ranks, eps, &p));
  FCT_TRY(tt_check_cores(&c, &p, cores));
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(&c, "tensor", X, &r));
  fct_arena a = {NULL, {0, false}};
  tt_bufs t;
  FCT_TRY(tt_layout(&r, &p, &a, &t));
  if (a.L.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.L.cursor;
  return FCT_OK;
}

fct_status fct_tensor_train(fct_context* ctx, const DLTensor* X, int n_modes,
                            const int64_t* mode_sizes, const int64_t* max_ranks, double eps,
                            DLTensor* cores, int64_t* ranks, fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  if (!ranks) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "ranks: expected n_modes + 1 int64, got NULL");
  tt_plan p;
  FCT_TRY(tt_check(ctx, X, n_modes, mode_sizes, max_ranks, eps, &p));
  FCT_TRY(tt_check_cores(ctx, &p, cores));
  p.cores = cores;
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(ctx, "tensor", X, &r));
  return tt_run(&r, &p, ranks, info);
}
