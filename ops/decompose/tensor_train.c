/*
 * Tensor-Train decomposition by TT-SVD (Oseledets 2011, Algorithm 1), CPU,
 * float64: entry points and the algorithm.
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
#include <string.h>

#include "decompose.h"
#include "linalg_cpu.h"

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
  double *C, *U, *VT, *s, *work;
  int* iwork;
  int64_t lwork;
} tt_bufs;

/* Sizes of step k for the largest ranks: C is [a, b], q = min(a, b). */
static void step_dims(const tt_plan* p, int k, int64_t* a, int64_t* b, int64_t* q) {
  int64_t rest = 1;
  for (int j = k + 1; j < p->N; ++j) rest *= p->n[j];
  *a = p->rmax[k] * p->n[k];
  *b = rest;
  *q = *a < *b ? *a : *b;
}

static void tt_layout(const tt_plan* p, fct_arena* ar, tt_bufs* t) {
  int64_t u = 0, vt = 0, q = 0, lw = 1;
  for (int k = 0; k + 1 < p->N; ++k) {
    int64_t a, b, qk;
    step_dims(p, k, &a, &b, &qk);
    u = b * qk > u ? b * qk : u;
    vt = qk * a > vt ? qk * a : vt;
    q = qk > q ? qk : q;
    int64_t l = fct_la_gesdd_lwork(b, a);
    lw = l > lw ? l : lw;
  }
  t->C = fct_arena_f64(ar, (size_t)p->numel);
  t->U = fct_arena_f64(ar, (size_t)u);
  t->VT = fct_arena_f64(ar, (size_t)vt);
  t->s = fct_arena_f64(ar, (size_t)q);
  t->work = fct_arena_f64(ar, (size_t)lw);
  t->iwork = (int*)fct_arena_take(ar, (size_t)(8 * q), sizeof(int));
  t->lwork = lw;
}

/* cores[off + i·cols + j] = src[i·rs + j·cs] in the output's dtype. */
static void store_at(DLTensor* cores, int64_t off, const double* src, int64_t rows, int64_t cols,
                     int64_t rs, int64_t cs) {
  bool f32 = fct_dtype_of(cores->dtype) == FCT_F32;
  char* base = fct_data(cores);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = src[i * rs + j * cs];
      if (f32) ((float*)base)[off + i * cols + j] = (float)v;
      else ((double*)base)[off + i * cols + j] = v;
    }
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

static fct_status tt_run(fct_context* ctx, const tt_plan* p, int64_t* ranks,
                         fct_decomp_info* info) {
  fct_arena ar = {(char*)ctx->workspace, 0, false};
  tt_bufs t;
  tt_layout(p, &ar, &t);
  FCT_TRY_(fct_arena_check(ctx, &ar));
  double sumsq;
  FCT_TRY_(fct_dec_scan_cpu(ctx, "tensor", p->X, &sumsq));
  fct_dec_load_f64(p->X, t.C);
  double tail2 = p->eps > 0 && p->N > 1 ? p->eps * p->eps * sumsq / (double)(p->N - 1) : -1.0;
  double err2 = 0;
  int64_t r = 1, off = 0;
  ranks[0] = 1;
  for (int k = 0; k + 1 < p->N; ++k) {
    int64_t a = r * p->n[k], b = 1;
    for (int j = k + 1; j < p->N; ++j) b *= p->n[j];
    int64_t q = a < b ? a : b;
    int rc = fct_la_gesdd(b, a, t.C, b, t.s, t.U, b, t.VT, q, t.work, t.lwork, t.iwork);
    if (rc != 0)
      return fct_fail(ctx, FCT_ERR_BLAS, "tensor: LAPACK dgesdd failed to converge (info %d) at "
                      "core %d", rc, k);
    double dropped;
    int64_t rn = choose_rank(t.s, q, tail2, p->rmax[k + 1], a, b, &dropped);
    err2 += dropped;
    /* core k [r, n_k, rn] row-major: element (row, j) = VT'[j + row·q]. */
    store_at(p->cores, off, t.VT, a, rn, q, 1);
    off += a * rn;
    /* next C [rn, b] row-major: row j = s_j · U'[:, j]. */
    for (int64_t j = 0; j < rn; ++j)
      for (int64_t c = 0; c < b; ++c) t.C[j * b + c] = t.s[j] * t.U[c + j * b];
    r = rn;
    ranks[k + 1] = rn;
  }
  store_at(p->cores, off, t.C, 1, r * p->n[p->N - 1], 0, 1);
  ranks[p->N] = 1;
  if (info) {
    info->rel_error = sumsq > 0 ? sqrt(err2 / sumsq) : 0.0;
    info->n_iter = 0;
    info->converged = 1;
  }
  return FCT_OK;
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
  FCT_TRY_(fct_dec_check_input(ctx, "tensor", X, 0, FCT_MAX_DIMS));
  FCT_TRY_(fct_dec_cpu_only(ctx, "tensor_train", "tensor", X));
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
    FCT_TRY_(fct_dec_check_int(ctx, "tensor (an unfolding's rows)", a));
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
  FCT_TRY_(tt_check(&c, X, n_modes, mode_sizes, max_ranks, 0.0, &p));
  *elements = p.capacity;
  return FCT_OK;
}

fct_status fct_tensor_train_workspace(const fct_context* ctx, const DLTensor* X, int n_modes,
                                      const int64_t* mode_sizes, const int64_t* max_ranks,
                                      double eps, const DLTensor* cores, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tt_plan p;
  FCT_TRY_(tt_check(&c, X, n_modes, mode_sizes, max_ranks, eps, &p));
  FCT_TRY_(tt_check_cores(&c, &p, cores));
  fct_arena a = {NULL, 0, false};
  tt_bufs t;
  tt_layout(&p, &a, &t);
  if (a.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.used;
  return FCT_OK;
}

fct_status fct_tensor_train(fct_context* ctx, const DLTensor* X, int n_modes,
                            const int64_t* mode_sizes, const int64_t* max_ranks, double eps,
                            DLTensor* cores, int64_t* ranks, fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  if (!ranks) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "ranks: expected n_modes + 1 int64, got NULL");
  tt_plan p;
  FCT_TRY_(tt_check(ctx, X, n_modes, mode_sizes, max_ranks, eps, &p));
  FCT_TRY_(tt_check_cores(ctx, &p, cores));
  p.cores = cores;
  return tt_run(ctx, &p, ranks, info);
}
