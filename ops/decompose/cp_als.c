/*
 * CP decomposition by alternating least squares (Kolda & Bader 2009, §3.4),
 * float64, on the CPU or a GPU (engine.h): entry points and the algorithm.
 * The contractions with X (the partial MTTKRPs, the SVD initialisation)
 * run on the engine; the factor algebra, O((Σ I_n)·R + R²) per update,
 * runs on the host in both cases.
 *
 * The model is Σ_r λ_r · A_0[:, r] ∘ ... ∘ A_{N-1}[:, r] with unit-norm
 * columns (the scale lives in λ, which keeps the normal equations well
 * scaled). Updating mode n solves
 *     A_n · (⊛_{m≠n} A_mᵀA_m + l2_reg·I) = X_(n)·(⊙_{m≠n} A_m)
 * (⊛ Hadamard, ⊙ Khatri-Rao; the right side is the MTTKRP).
 * The MTTKRPs come from a two-level dimension tree (tensor_ops_cpu.h): per
 * sweep, one GEMM contracts X with the Khatri-Rao product of the right
 * group's factors before the left modes are updated, one with the left
 * group's after. Cost per sweep: 4·numel·R flops (TensorLy: 2·N·numel·R
 * plus an unfolded copy of X per mode), plus O(R·(Π of the larger group's
 * dims) + (Σ I_n)·R²).
 * The error after a sweep needs no pass over X: with M the last mode's
 * MTTKRP, ⟨X, X̂⟩ = Σ A∘M and ||X̂||² = Σ (AᵀA)∘H (TensorLy does the same).
 *
 * Mode 0's initial factor is never read (the first update overwrites it
 * from the others), so the SVD initialisation skips it, unless a mode
 * smaller than the rank needs it (has_small_modes).
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decompose.h"
#include "rng.h"
#include "tensor_ops_cpu.h"

#define CP_MAX_MODES FCT_MAX_DIMS

typedef struct cp_plan {
  const DLTensor* X;
  DLTensor* const* F; /* factors [I_n, R] */
  DLTensor* w;        /* weights [R] */
  fct_dims d;
  int h;                 /* modes [0, h) and [h, N): the dimension tree's split */
  fct_dims sub[2];       /* the two groups' dims */
  int64_t size[2];       /* Π of each group's dims */
  int64_t R, numel;
  fct_cp_options o;
} cp_plan;

/* Host buffers hold the factor algebra (O((Σ I_n + Π larger group)·R +
 * R²)); engine buffers hold what touches X. On the CPU both are one
 * arena; on a GPU the host ones are allocated by cp_run. */
typedef struct cp_bufs {
  /* engine memory */
  double* X;                 /* NULL: read the input in place */
  double* stage;             /* [max I_n, R]: factors in and out */
  double *sv, *scan;         /* scratch of top_left_sv and scan */
  double *KRd, *Pd;          /* GPU copies of kr and P (NULL on the CPU) */
  /* host memory */
  double* A[CP_MAX_MODES];   /* [I_n, R] column-major */
  double* G[CP_MAX_MODES];   /* A_nᵀA_n [R, R] */
  double *lam, *M, *H, *V, *Gt, *solve;
  double *P[2];          /* P[g]: X contracted with the OTHER group's factors,
                            [size[g], R], feeding group g's MTTKRPs */
  double *kr, *half;     /* a Khatri-Rao product; fct_mttkrp_half's scratch */
} cp_bufs;

/* dev: the engine's arena; host: the host's (the same one on the CPU). */
static fct_status cp_layout(const fct_dec_run* r, const cp_plan* p, fct_arena* dev,
                            fct_arena* host, cp_bufs* b, bool in_place) {
  int64_t R = p->R, maxI = 0, init = 0;
  memset(b, 0, sizeof *b);
  if (!in_place) b->X = fct_arena_f64(dev, (size_t)p->numel);
  for (int n = 0; n < p->d.N; ++n) {
    int64_t In = p->d.dim[n];
    b->A[n] = fct_arena_f64(host, (size_t)(In * R));
    b->G[n] = fct_arena_f64(host, (size_t)(R * R));
    maxI = In > maxI ? In : maxI;
    if (p->o.init == FCT_INIT_SVD) {
      int64_t k = R < In ? R : In, s;
      FCT_TRY(r->e->top_left_sv_scratch(r, &p->d, n, k, &s));
      init = s > init ? s : init;
    }
  }
  b->stage = fct_arena_f64(dev, (size_t)(maxI * R));
  b->sv = fct_arena_f64(dev, (size_t)init);
  b->scan = fct_arena_f64(dev, (size_t)r->e->scan_scratch);
  int64_t big = p->size[0] > p->size[1] ? p->size[0] : p->size[1];
  if (!r->e->host) {
    b->KRd = fct_arena_f64(dev, (size_t)(big * R));
    b->Pd = fct_arena_f64(dev, (size_t)(big * R));
  }
  b->lam = fct_arena_f64(host, (size_t)R);
  b->M = fct_arena_f64(host, (size_t)(maxI * R));
  b->H = fct_arena_f64(host, (size_t)(R * R));
  b->V = fct_arena_f64(host, (size_t)(R * R));
  b->Gt = fct_arena_f64(host, (size_t)(R * R));
  b->P[0] = fct_arena_f64(host, (size_t)(p->size[0] * R));
  b->P[1] = fct_arena_f64(host, (size_t)(p->size[1] * R));
  b->kr = fct_arena_f64(host, (size_t)(big * R));
  b->half = fct_arena_f64(host, (size_t)(3 * big));
  b->solve = fct_arena_f64(host, (size_t)fct_la_solve_spd_scratch(maxI, R));
  return FCT_OK;
}

/* Unit-norm columns of A [In, R]; norms[r] = the old norms (0 stays 0). */
static void normalize_columns(double* A, int64_t In, int64_t R, double* norms) {
  for (int64_t r = 0; r < R; ++r) {
    double* c = A + r * In;
    double s = 0;
    for (int64_t i = 0; i < In; ++i) s += c[i] * c[i];
    s = sqrt(s);
    norms[r] = s;
    if (s > 0)
      for (int64_t i = 0; i < In; ++i) c[i] /= s;
  }
}

/* H = ⊛_{m≠n} G_m (all ones when N == 1). */
static void hadamard_others(const cp_plan* p, const cp_bufs* b, int n, double* H) {
  int64_t RR = p->R * p->R;
  for (int64_t e = 0; e < RR; ++e) H[e] = 1.0;
  for (int m = 0; m < p->d.N; ++m) {
    if (m == n) continue;
    for (int64_t e = 0; e < RR; ++e) H[e] *= b->G[m][e];
  }
}

static void gram(const double* A, int64_t In, int64_t R, double* G) {
  fct_la_gemm(true, false, R, R, In, 1.0, A, In, A, In, 0.0, G, R);
}

/* Modes n >= 1 smaller than the rank, whose SVD cannot give R columns:
 * the SVD initialisation starts them from one least-squares update against
 * the other modes' singular vectors (cp_refine_small_modes) rather than
 * from random columns, which on such tensors often leaves ALS in a swamp. */
static bool has_small_modes(const cp_plan* p) {
  for (int n = 1; n < p->d.N; ++n)
    if (p->d.dim[n] < p->R) return true;
  return false;
}

/* Starting factors: unit-norm columns, scale in lam. */
static fct_status cp_init(const fct_dec_run* r, const cp_plan* p, cp_bufs* b, const double* X) {
  const fct_dec_engine* e = r->e;
  int64_t R = p->R;
  bool small = has_small_modes(p);
  for (int64_t j = 0; j < R; ++j) b->lam[j] = 1.0;
  for (int n = 0; n < p->d.N; ++n) {
    int64_t In = p->d.dim[n];
    double* A = b->A[n];
    uint64_t stream = FCT_RNG_FACTOR(n);
    if (p->o.init == FCT_INIT_GIVEN) { /* factor n row-major [In, R] -> column-major */
      FCT_TRY(e->load_transposed(r, p->F[n], In, R, b->stage));
      FCT_TRY(e->to_host(r, A, b->stage, (size_t)(In * R) * sizeof(double)));
      continue;
    }
    bool svd = p->o.init == FCT_INIT_SVD && (n > 0 || p->o.n_iter_max == 0 || small);
    int64_t k = svd ? (R < In ? R : In) : 0;
    if (svd) {
      FCT_TRY(e->top_left_sv(r, X, &p->d, n, k, b->stage, p->o.seed, stream, b->sv));
      FCT_TRY(e->to_host(r, A, b->stage, (size_t)(In * k) * sizeof(double)));
    }
    /* Random entries, uniform [0, 1) as TensorLy draws them, for the columns
     * the SVD cannot give (R > I_n) or all of them. */
    for (int64_t j = k; j < R; ++j)
      for (int64_t i = 0; i < In; ++i)
        A[i + j * In] = fct_rng_uniform(p->o.seed, stream, (uint64_t)(i + j * In));
  }
  if (p->o.init == FCT_INIT_GIVEN && p->w) {
    FCT_TRY(e->load_transposed(r, p->w, 1, R, b->stage));
    FCT_TRY(e->to_host(r, b->lam, b->stage, (size_t)R * sizeof(double)));
  }
  for (int n = 0; n < p->d.N; ++n) {
    normalize_columns(b->A[n], p->d.dim[n], R, b->M);
    for (int64_t j = 0; j < R; ++j) b->lam[j] *= b->M[j];
    gram(b->A[n], p->d.dim[n], R, b->G[n]);
  }
  return FCT_OK;
}

/* b->M = the MTTKRP of mode n, which is mode n - h·g of group g, from
 * b->P[g]. */
static void group_mttkrp(const cp_plan* p, cp_bufs* b, int n) {
  int g = n >= p->h;
  int lo = g ? p->h : 0;
  fct_mttkrp_half(b->P[g], &p->sub[g], n - lo, (const double* const*)(b->A + lo), p->R, b->M,
                  b->half);
}

/* P[g] from X and the other group's current factors: their Khatri-Rao
 * product is formed on the host, X contracted with it by the engine. */
static fct_status refresh_partial(const fct_dec_run* r, const cp_plan* p, cp_bufs* b,
                                  const double* X, int g) {
  int other = 1 - g;
  int64_t R = p->R, T = p->size[other], S = p->size[g];
  int64_t left = p->size[0], right = p->size[1];
  fct_cp_kr(&p->d, p->h, other, (const double* const*)b->A, R, b->kr);
  const double* kr = b->kr;
  double* P = b->P[g];
  if (b->KRd) {
    FCT_TRY(r->e->to_device(r, b->KRd, kr, (size_t)(T * R) * sizeof(double)));
    kr = b->KRd;
    P = b->Pd;
  }
  /* X row-major [left, right] is column-major Xcm [right, left]. */
  if (other) /* P [left, R] = Xcmᵀ·KR_right */
    FCT_TRY(r->e->gemm(r, true, false, left, R, right, X, right, kr, right, P, left));
  else /* P [right, R] = Xcm·KR_left */
    FCT_TRY(r->e->gemm(r, false, false, right, R, left, X, right, kr, left, P, right));
  if (b->Pd) FCT_TRY(r->e->to_host(r, b->P[g], P, (size_t)(S * R) * sizeof(double)));
  return FCT_OK;
}

/* b->M = the last mode's MTTKRP from scratch. */
static fct_status last_mttkrp(const fct_dec_run* r, const cp_plan* p, cp_bufs* b,
                              const double* X) {
  FCT_TRY(refresh_partial(r, p, b, X, 1));
  group_mttkrp(p, b, p->d.N - 1);
  return FCT_OK;
}

/* Relative error of [[lam; A]] from scratch (used when no sweep ran). */
static fct_status cp_error(const fct_dec_run* r, const cp_plan* p, cp_bufs* b, const double* X,
                           double sumsq, double* err) {
  int N = p->d.N, n = N - 1;
  int64_t R = p->R, In = p->d.dim[n];
  FCT_TRY(last_mttkrp(r, p, b, X));
  double ip = 0, nh = 0;
  for (int64_t j = 0; j < R; ++j)
    for (int64_t i = 0; i < In; ++i) ip += b->lam[j] * b->A[n][i + j * In] * b->M[i + j * In];
  hadamard_others(p, b, -1, b->H);
  for (int64_t j = 0; j < R; ++j)
    for (int64_t k = 0; k < R; ++k) nh += b->lam[j] * b->lam[k] * b->H[j + k * R];
  double e2 = sumsq - 2 * ip + nh;
  *err = e2 > 0 ? sqrt(e2 / sumsq) : 0.0;
  return FCT_OK;
}

/* One ALS update of mode n from its MTTKRP in b->M. On the last mode, *ip
 * and *nh receive ⟨X, X̂⟩ and ||X̂||² of the updated model. */
static void cp_update(const cp_plan* p, cp_bufs* b, int n, double* ip, double* nh) {
  int64_t R = p->R, In = p->d.dim[n], RR = R * R;
  double* A = b->A[n];
  hadamard_others(p, b, n, b->H);
  memcpy(A, b->M, (size_t)(In * R) * sizeof(double));
  memcpy(b->V, b->H, (size_t)RR * sizeof(double));
  for (int64_t r = 0; r < R; ++r) b->V[r + r * R] += p->o.l2_reg;
  fct_la_solve_spd_right(In, R, b->V, R, A, In, b->solve);
  gram(A, In, R, b->Gt); /* of the unnormalised factor, which holds λ */
  if (n == p->d.N - 1) {
    double s = 0, t = 0;
    for (int64_t e = 0; e < In * R; ++e) s += A[e] * b->M[e];
    for (int64_t e = 0; e < RR; ++e) t += b->Gt[e] * b->H[e];
    *ip = s;
    *nh = t;
  }
  normalize_columns(A, In, R, b->lam);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < R; ++s) {
      double d = b->lam[r] * b->lam[s];
      b->G[n][r + s * R] = d > 0 ? b->Gt[r + s * R] / d : 0.0;
    }
}

/* See has_small_modes: one ALS update of each small mode, in order. */
static fct_status cp_refine_small_modes(const fct_dec_run* r, const cp_plan* p, cp_bufs* b,
                                        const double* X) {
  if (p->o.init != FCT_INIT_SVD || p->o.n_iter_max == 0 || !has_small_modes(p)) return FCT_OK;
  for (int n = 1; n < p->d.N; ++n) {
    if (p->d.dim[n] >= p->R) continue;
    double ip, nh;
    FCT_TRY(refresh_partial(r, p, b, X, n >= p->h));
    group_mttkrp(p, b, n);
    cp_update(p, b, n, &ip, &nh);
  }
  return FCT_OK;
}

static fct_status cp_store(const fct_dec_run* r, const cp_plan* p, cp_bufs* b) {
  const fct_dec_engine* e = r->e;
  int N = p->d.N;
  int64_t R = p->R;
  if (!p->o.normalize_factors) { /* λ_r^(1/N) into every factor, weights 1 */
    for (int n = 0; n < N; ++n)
      for (int64_t j = 0; j < R; ++j) {
        double s = pow(b->lam[j], 1.0 / N);
        for (int64_t i = 0; i < p->d.dim[n]; ++i) b->A[n][i + j * p->d.dim[n]] *= s;
      }
    for (int64_t j = 0; j < R; ++j) b->lam[j] = 1.0;
  }
  for (int n = 0; n < N; ++n) {
    int64_t In = p->d.dim[n];
    FCT_TRY(e->to_device(r, b->stage, b->A[n], (size_t)(In * R) * sizeof(double)));
    FCT_TRY(e->store(r, p->F[n], 0, b->stage, In, R, 1, In));
  }
  FCT_TRY(e->to_device(r, b->stage, b->lam, (size_t)R * sizeof(double)));
  return e->store(r, p->w, 0, b->stage, 1, R, 0, 1);
}

static fct_status cp_solve(const fct_dec_run* r, const cp_plan* p, cp_bufs* b, bool in_place,
                           double* errors, fct_decomp_info* info) {
  const fct_dec_engine* e = r->e;
  const double* X = in_place ? (const double*)fct_data(p->X) : b->X;
  if (!in_place) FCT_TRY(e->load(r, p->X, b->X));
  double sumsq;
  FCT_TRY(e->scan(r, "tensor", X, p->numel, &sumsq, b->scan));
  fct_decomp_info res = {0.0, 0, 0};
  if (sumsq == 0) { /* zero (or empty) tensor: zero model, no error */
    for (int n = 0; n < p->d.N; ++n)
      memset(b->A[n], 0, (size_t)(p->d.dim[n] * p->R) * sizeof(double));
    memset(b->lam, 0, (size_t)p->R * sizeof(double));
    FCT_TRY(cp_store(r, p, b));
    res.converged = 1;
    if (info) *info = res;
    return FCT_OK;
  }
  FCT_TRY(cp_init(r, p, b, X));
  FCT_TRY(cp_refine_small_modes(r, p, b, X));
  double err = 0.0, prev = 0.0;
  if (p->o.n_iter_max == 0) FCT_TRY(cp_error(r, p, b, X, sumsq, &err));
  for (int32_t it = 0; it < p->o.n_iter_max; ++it) {
    double ip = 0, nh = 0;
    for (int n = 0; n < p->d.N; ++n) {
      if (n == 0) FCT_TRY(refresh_partial(r, p, b, X, 0));     /* right group fixed now */
      if (n == p->h) FCT_TRY(refresh_partial(r, p, b, X, 1));  /* left group updated */
      group_mttkrp(p, b, n);
      cp_update(p, b, n, &ip, &nh);
    }
    double e2 = sumsq - 2 * ip + nh;
    err = e2 > 0 ? sqrt(e2 / sumsq) : 0.0;
    if (errors) errors[it] = err;
    res.n_iter = it + 1;
    if (it >= 1 && fabs(prev - err) < p->o.tol) {
      res.converged = 1;
      break;
    }
    prev = err;
  }
  res.rel_error = err;
  FCT_TRY(cp_store(r, p, b));
  if (info) *info = res;
  return FCT_OK;
}

/* On the CPU one arena, the caller's workspace; on a GPU the host buffers
 * come from malloc (the workspace is device memory). */
static fct_status cp_run(const fct_dec_run* r, const cp_plan* p, double* errors,
                         fct_decomp_info* info) {
  fct_context* ctx = r->ctx;
  bool in_place = fct_dec_dense_f64(p->X);
  fct_arena dev = {(char*)ctx->workspace, {0, false}};
  cp_bufs b;
  if (r->e->host) {
    FCT_TRY(cp_layout(r, p, &dev, &dev, &b, in_place));
    FCT_TRY(fct_arena_check(ctx, &dev));
    return cp_solve(r, p, &b, in_place, errors, info);
  }
  fct_arena sizing = {NULL, {0, false}};
  FCT_TRY(cp_layout(r, p, &dev, &sizing, &b, in_place));
  FCT_TRY(fct_arena_check(ctx, &dev));
  if (sizing.L.overflow) return fct_fail(ctx, FCT_ERR_OVERFLOW, "cp: host buffers overflow size_t");
  char* mem = malloc(sizing.L.cursor ? sizing.L.cursor : 1);
  if (!mem)
    return fct_fail(ctx, FCT_ERR_WORKSPACE, "cp: cannot allocate %zu bytes of host buffers",
                    sizing.L.cursor);
  fct_arena host = {mem, {0, false}};
  dev = (fct_arena){(char*)ctx->workspace, {0, false}};
  fct_status st = cp_layout(r, p, &dev, &host, &b, in_place);
  if (st == FCT_OK) st = cp_solve(r, p, &b, in_place, errors, info);
  free(mem);
  return st;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

static fct_status cp_check(fct_context* ctx, const DLTensor* X, int nf, DLTensor* const* F,
                           const DLTensor* w, const fct_cp_options* o, cp_plan* p) {
  if (!o) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "opts: expected options, got NULL");
  FCT_TRY(fct_dec_check_input(ctx, "tensor", X, 2, CP_MAX_MODES));
  memset(p, 0, sizeof *p);
  p->X = X;
  p->F = F;
  p->w = (DLTensor*)w;
  p->o = *o;
  p->d.N = X->ndim;
  for (int n = 0; n < X->ndim; ++n) p->d.dim[n] = X->shape[n];
  p->numel = fct_numel(X);
  if (p->numel > INT_MAX)
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "tensor: %lld elements; LAPACK's 32-bit indices allow at most 2^31 - 1",
                    (long long)p->numel);
  p->h = fct_cp_split(&p->d);
  for (int g = 0; g < 2; ++g) {
    fct_cp_group_dims(&p->d, p->h, g, &p->sub[g]);
    p->size[g] = fct_dims_numel(&p->sub[g]);
  }
  if (nf != X->ndim || !F)
    return fct_fail(ctx, FCT_ERR_SHAPE, "factors: expected %d factors (one per dim of tensor), got %d",
                    X->ndim, F ? nf : 0);
  if (o->n_iter_max < 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "n_iter_max: expected >= 0, got %d", o->n_iter_max);
  if (!(o->tol >= 0) || !isfinite(o->tol))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "tol: expected a finite value >= 0, got %g", o->tol);
  if (!(o->l2_reg >= 0) || !isfinite(o->l2_reg))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "l2_reg: expected a finite value >= 0, got %g",
                    o->l2_reg);
  if (o->init < FCT_INIT_SVD || o->init > FCT_INIT_GIVEN)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "init: expected FCT_INIT_SVD, FCT_INIT_RANDOM or FCT_INIT_GIVEN, got %d",
                    o->init);
  if (o->normalize_factors != 0 && o->normalize_factors != 1)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "normalize_factors: expected 0 or 1, got %d",
                    o->normalize_factors);
  FCT_TRY(fct_check_tensor(ctx, "factors[0]", F[0], 2));
  p->R = F[0]->ndim == 2 ? F[0]->shape[1] : 0;
  if (p->R < 1)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "rank: expected >= 1 (the columns of factors[0], [I_0, rank]), got %lld",
                    (long long)p->R);
  FCT_TRY(fct_dec_check_int(ctx, "rank", p->R));
  for (int n = 0; n < nf; ++n) {
    char name[32];
    snprintf(name, sizeof name, "factors[%d]", n);
    int64_t shape[2] = {X->shape[n], p->R};
    FCT_TRY(fct_dec_check_output(ctx, name, F[n], X, 2, shape));
    for (int m = 0; m < n; ++m)
      FCT_TRY(fct_check_disjoint(ctx, name, F[n], "another factor", F[m]));
  }
  int64_t wshape[1] = {p->R};
  FCT_TRY(fct_dec_check_output(ctx, "weights", w, X, 1, wshape));
  for (int n = 0; n < nf; ++n) FCT_TRY(fct_check_disjoint(ctx, "weights", w, "a factor", F[n]));
  return FCT_OK;
}

fct_status fct_cp_als_workspace(const fct_context* ctx, const DLTensor* X, int n_factors,
                                const DLTensor* const* factors, const DLTensor* weights,
                                const fct_cp_options* opts, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  cp_plan p;
  FCT_TRY(cp_check(&c, X, n_factors, (DLTensor* const*)factors, weights, opts, &p));
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(&c, "tensor", X, &r));
  fct_arena a = {NULL, {0, false}}, host = {NULL, {0, false}};
  cp_bufs b;
  bool in_place = fct_dec_dense_f64(X);
  FCT_TRY(cp_layout(&r, &p, &a, r.e->host ? &a : &host, &b, in_place));
  if (a.L.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.L.cursor;
  return FCT_OK;
}

fct_status fct_cp_als(fct_context* ctx, const DLTensor* X, int n_factors, DLTensor* const* factors,
                      DLTensor* weights, const fct_cp_options* opts, double* errors,
                      fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  cp_plan p;
  FCT_TRY(cp_check(ctx, X, n_factors, factors, weights, opts, &p));
  fct_dec_run r;
  FCT_TRY(fct_dec_run_for(ctx, "tensor", X, &r));
  return cp_run(&r, &p, errors, info);
}
