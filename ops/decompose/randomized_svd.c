/*
 * Randomized SVD (Halko, Martinsson, Tropp 2011, Algorithms 4.4 and 5.1)
 * with shifted power iterations (after dashSVD, Feng et al. 2024): entry
 * points and the CPU computation.
 *
 *   Ω [n, k] Gaussian (counter-based RNG, rng.h), k = min(r + p, min(m, n))
 *   Q = orth(A·Ω)
 *   n_iter times:  Z = Aᵀ·Q;  α = λ_min(ZᵀZ) / 2;  Q = orth(A·Z − α·Q)
 *                  (= orth((A·Aᵀ − α·I)·Q))
 *   Z = Aᵀ·Q = Bᵀ [n, k];  Z = Qz·Rb;  Rb = Ur·diag(s)·Vrᵀ (dgesdd, k×k)
 *   A ≈ Q·B = (Q·Vr)·diag(s)·(Qz·Ur)ᵀ: U = Q·Vr[:, :r], Vh = (Qz·Ur[:, :r])ᵀ
 *
 * The shift: a power iteration multiplies the component of singular value
 * σ by σ²; (σ² − α) instead widens the ratio between the singular values
 * kept and those beyond the sketch, for free. λ_min(ZᵀZ) is the square of
 * the smallest Ritz value of the sketch, below σ_k², so α <= σ_k²/2 and no
 * discarded direction is ever amplified over a kept one. On decaying
 * spectra this halves the excess error over the optimum of the unshifted
 * iteration (torch.svd_lowrank's) at the same p and n_iter, for a k×k
 * Gram matrix and eigenvalue per iteration.
 *
 * Orthonormalisation by shifted CholeskyQR3 (linalg_cpu.h): BLAS-3 only, so
 * it runs on every thread of the host's pool, where Householder QR would
 * run LAPACK's panels on one; Z is not orthonormalised between A·Aᵀ
 * products (its span is what matters, and in float64 κ(Z)² stays far from
 * 1/eps for the ranks kept).
 *
 * Cost: 2·(2·n_iter + 2)·m·n·k flops in A's own dtype (the only work that
 * touches A; float32 GEMMs for a float32 A, as torch.svd_lowrank does), plus
 * O((m + n)·k²) in float64 for the orthonormalisations and the small SVD,
 * which is where rounding would hurt. Memory O((m + n)·k): A is never
 * copied unless its strides are neither row- nor column-major.
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "cpu/gemm_cpu.h"
#include "decompose.h"
#include "linalg_cpu.h"
#include "rng.h"

typedef struct rsvd_bufs {
  char* Apack;      /* A packed row-major in its dtype, when BLAS cannot read it */
  char *Om, *Yd;    /* panels in A's dtype: Ω / Aᵀ·Q [n, k], A·Ω [m, k] */
  double *Q, *Z;    /* float64 panels [m, k], [n, k] (alias Yd, Om for float64) */
  double *Qprev, *G, *eig;    /* power iterations: previous Q, ZᵀZ, eigmin scratch */
  double *orth;               /* fct_la_orth_fast scratch */
  double *Rb, *s, *Ur, *Vrt, *swork, *Uo, *Vo;
  int* iwork;
  int64_t slwork;
} rsvd_bufs;

static void rsvd_layout(const fct_svd_plan* p, fct_arena* a, rsvd_bufs* b) {
  int64_t m = p->m, n = p->n, k = p->k, big = m > n ? m : n;
  size_t es = fct_dtype_bytes(p->dt);
  memset(b, 0, sizeof *b);
  if (!p->a_blas) b->Apack = fct_arena_take(a, (size_t)(m * n), es);
  b->Om = fct_arena_take(a, (size_t)(n * k), es);
  b->Yd = fct_arena_take(a, (size_t)(m * k), es);
  if (p->dt == FCT_F64) {
    b->Q = (double*)b->Yd;
    b->Z = (double*)b->Om;
  } else {
    b->Q = fct_arena_f64(a, (size_t)(m * k));
    b->Z = fct_arena_f64(a, (size_t)(n * k));
  }
  if (p->n_iter > 0) {
    b->Qprev = fct_arena_f64(a, (size_t)(m * k));
    b->G = fct_arena_f64(a, (size_t)(k * k));
    b->eig = fct_arena_f64(a, (size_t)fct_la_eigmin_scratch(k));
  }
  b->orth = fct_arena_f64(a, (size_t)fct_la_orth_fast_scratch(big, k));
  b->slwork = fct_la_gesdd_lwork(k, k);
  b->Rb = fct_arena_f64(a, (size_t)(k * k));
  b->s = fct_arena_f64(a, (size_t)k);
  b->Ur = fct_arena_f64(a, (size_t)(k * k));
  b->Vrt = fct_arena_f64(a, (size_t)(k * k));
  b->swork = fct_arena_f64(a, (size_t)b->slwork);
  b->iwork = (int*)fct_arena_take(a, (size_t)(8 * k), sizeof(int));
  b->Uo = fct_arena_f64(a, (size_t)(m * p->r));
  b->Vo = fct_arena_f64(a, (size_t)(n * p->r));
}

/* C [rows, k] (column-major, A's dtype) = op(A)·B, op(A) = A [m, n] or Aᵀ,
 * B column-major [inner, k]. As row-major products: Cᵀ = Bᵀ·op(A)ᵀ, which
 * fct_cpu_gemm splits over the thread pool along C's long side (A's). */
static void a_mul(const fct_svd_plan* p, const fct_mat* A, bool transA, const char* B, char* C) {
  int64_t rows = transA ? p->n : p->m, inner = transA ? p->m : p->n, k = p->k;
  fct_mat Bt = {(char*)B, k, inner, inner, 1};
  fct_mat At = fct_mat_t(*A);
  fct_mat Cv = {C, k, rows, rows, 1};
  if (k <= 1) Bt.rs = inner, Cv.rs = rows;
  fct_cpu_gemm(p->dt, &Bt, transA ? A : &At, &Cv, 0.0);
}

/* Conversions between an A-dtype panel and a float64 one (no-ops for
 * float64, where the panels alias). */
static void to_f64(fct_dtype dt, const char* src, double* dst, int64_t len) {
  if (dt == FCT_F64) return;
  for (int64_t i = 0; i < len; ++i) dst[i] = ((const float*)src)[i];
}

static void from_f64(fct_dtype dt, const double* src, char* dst, int64_t len) {
  if (dt == FCT_F64) return;
  for (int64_t i = 0; i < len; ++i) ((float*)dst)[i] = (float)src[i];
}

#define SKETCH_CHUNK 65536 /* even, so chunks start on a pair */

typedef struct sketch_job {
  fct_dtype dt;
  char* om;
  int64_t count;
  uint64_t seed;
} sketch_job;

static void sketch_chunks(int64_t begin, int64_t end, void* arg) {
  const sketch_job* j = arg;
  for (int64_t c = begin; c < end; ++c) {
    int64_t lo = c * SKETCH_CHUNK, hi = lo + SKETCH_CHUNK < j->count ? lo + SKETCH_CHUNK : j->count;
    for (int64_t idx = lo; idx < hi; idx += 2) {
      double v[2];
      fct_rng_normal_pair(j->seed, FCT_RNG_SKETCH, (uint64_t)idx >> 1, &v[0], &v[1]);
      for (int64_t e = 0; e < 2 && idx + e < hi; ++e) {
        if (j->dt == FCT_F32) ((float*)j->om)[idx + e] = (float)v[e];
        else ((double*)j->om)[idx + e] = v[e];
      }
    }
  }
}

static fct_status rsvd_cpu(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info) {
  fct_arena ar = {(char*)ctx->workspace, {0, false}};
  rsvd_bufs b;
  rsvd_layout(p, &ar, &b);
  FCT_TRY(fct_arena_check(ctx, &ar));
  double sumsq;
  FCT_TRY(fct_dec_scan_cpu(ctx, "A", p->A, &sumsq));
  int64_t m = p->m, n = p->n, k = p->k;
  fct_dtype dt = p->dt;
  fct_mat A = p->a;
  if (!p->a_blas) {
    fct_dec_pack(p->A, b.Apack);
    A = (fct_mat){b.Apack, m, n, n, 1};
  }
  /* Ω [n, k], element (i, j) = normal(seed, i + j·n): the same on CUDA,
   * and whatever the threads (each number is a function of its index). */
  sketch_job sj = {dt, b.Om, n * k, p->seed};
  fct_cpu_parallel((n * k + SKETCH_CHUNK - 1) / SKETCH_CHUNK, 1, sketch_chunks, &sj);
  a_mul(p, &A, false, b.Om, b.Yd); /* Y = A·Ω */
  to_f64(dt, b.Yd, b.Q, m * k);
  /* Intermediate bases need only span the right space, well conditioned;
   * the last (which B = Qᵀ·A uses) must be orthonormal. */
  fct_la_orth_fast(m, k, b.Q, m, NULL, p->n_iter > 0, b.orth);
  for (int32_t it = 0; it < p->n_iter; ++it) {
    memcpy(b.Qprev, b.Q, (size_t)(m * k) * sizeof(double));
    from_f64(dt, b.Q, b.Yd, m * k);
    a_mul(p, &A, true, b.Yd, b.Om); /* Z = Aᵀ·Q */
    to_f64(dt, b.Om, b.Z, n * k);
    fct_la_gemm(true, false, k, k, n, 1.0, b.Z, n, b.Z, n, 0.0, b.G, k); /* ZᵀZ = QᵀAAᵀQ */
    double lmin = fct_la_eigmin(k, b.G, k, b.eig);
    double alpha = lmin > 0 ? 0.5 * lmin : 0.0;
    a_mul(p, &A, false, b.Om, b.Yd); /* A·Z */
    to_f64(dt, b.Yd, b.Q, m * k);
    for (int64_t e = 0; e < m * k; ++e) b.Q[e] -= alpha * b.Qprev[e];
    fct_la_orth_fast(m, k, b.Q, m, NULL, it + 1 < p->n_iter, b.orth);
  }
  from_f64(dt, b.Q, b.Yd, m * k);
  a_mul(p, &A, true, b.Yd, b.Om); /* Bᵀ = Aᵀ·Q [n, k] */
  to_f64(dt, b.Om, b.Z, n * k);
  fct_la_orth_fast(n, k, b.Z, n, b.Rb, false, b.orth); /* Bᵀ = Qz·Rb */
  int rc = fct_la_gesdd(k, k, b.Rb, k, b.s, b.Ur, k, b.Vrt, k, b.swork, b.slwork, b.iwork);
  if (rc != 0)
    return fct_fail(ctx, FCT_ERR_BLAS, "A: LAPACK dgesdd failed to converge (info %d)", rc);
  fct_la_gemm(false, true, m, p->r, k, 1.0, b.Q, m, b.Vrt, k, 0.0, b.Uo, m); /* Q·Vr */
  fct_la_gemm(false, false, n, p->r, k, 1.0, b.Z, n, b.Ur, k, 0.0, b.Vo, n);  /* Qz·Ur */
  fct_dec_fix_signs(b.Uo, m, 1, m, b.Vo, n, n, 1, p->r);
  fct_dec_store(p->U, b.Uo, m, p->r, 1, m);
  fct_dec_store(p->Vh, b.Vo, p->r, n, n, 1);
  fct_dec_store(p->S, b.s, 1, p->r, 0, 1);
  if (info) {
    /* U·diag(s)·Vh = P·A for an orthogonal projector P, so
     * ||A − P·A||² = ||A||² − Σ s². */
    double kept = 0;
    for (int64_t j = 0; j < p->r; ++j) kept += b.s[j] * b.s[j];
    double rest = sumsq - kept;
    info->rel_error = sumsq > 0 && rest > 0 ? sqrt(rest / sumsq) : 0.0;
    info->n_iter = p->n_iter;
    info->converged = 1;
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Entry points                                                               */
/* ------------------------------------------------------------------------- */

static fct_status rsvd_plan(fct_context* ctx, const DLTensor* A, const DLTensor* U,
                            const DLTensor* S, const DLTensor* Vh, const fct_rsvd_options* o,
                            fct_svd_plan* p) {
  if (!o) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "opts: expected options, got NULL");
  FCT_TRY(fct_dec_svd_plan(ctx, A, U, S, Vh, true, p));
  if (o->n_oversamples < 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "n_oversamples: expected >= 0, got %lld",
                    (long long)o->n_oversamples);
  if (o->n_iter < 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "n_iter: expected >= 0, got %d", o->n_iter);
  int64_t q = p->m < p->n ? p->m : p->n;
  p->k = o->n_oversamples > q - p->r ? q : p->r + o->n_oversamples;
  p->n_iter = o->n_iter;
  p->seed = o->seed;
  return FCT_OK;
}

fct_status fct_randomized_svd_workspace(const fct_context* ctx, const DLTensor* A,
                                        const DLTensor* U, const DLTensor* S,
                                        const DLTensor* Vh, const fct_rsvd_options* opts,
                                        size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  fct_svd_plan p;
  FCT_TRY(rsvd_plan(&c, A, U, S, Vh, opts, &p));
  if (A->device.device_type == kDLCUDA) {
    const fct_decompose_backend* be;
    FCT_TRY(fct_cuda_decompose_for(&c, "A", &be));
    return be->rsvd_workspace(&c, &p, bytes);
  }
  fct_arena a = {NULL, {0, false}};
  rsvd_bufs b;
  rsvd_layout(&p, &a, &b);
  if (a.L.overflow) return fct_fail(&c, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  *bytes = a.L.cursor;
  return FCT_OK;
}

fct_status fct_randomized_svd(fct_context* ctx, const DLTensor* A, DLTensor* U, DLTensor* S,
                              DLTensor* Vh, const fct_rsvd_options* opts,
                              fct_decomp_info* info) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  fct_svd_plan p;
  FCT_TRY(rsvd_plan(ctx, A, U, S, Vh, opts, &p));
  if (A->device.device_type == kDLCUDA) {
    const fct_decompose_backend* be;
    FCT_TRY(fct_cuda_decompose_for(ctx, "A", &be));
    return be->rsvd(ctx, &p, info);
  }
  return rsvd_cpu(ctx, &p, info);
}
