/* CPU element kernels: bias rows, column sums, zeroing, and the Khatri–Rao
 * product and its factor gradient (CP layers), plus the fct_backend entries
 * of the tensorized linear ops' primitives (backend.h). float32/float64. */
#include <string.h>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

/* ------------------------------------------------------------------------- */
/* Rows                                                                       */
/* ------------------------------------------------------------------------- */

/* Both run on the pool once there is about a megabyte to go through (at
 * M = 2048 and 4096 outputs, 32 MB: on one core while the others waited,
 * ~4% of a tensorized layer's fwd+bwd). */
enum { POOL_BYTES = 1 << 20, SUM_COLS = 256 };

typedef struct rows_job {
  fct_dtype dt;
  const fct_mat* y;
  const char* bias;
  int64_t bs;
} rows_job;

FCT_SIMD_CLONES static void fill_rows_tasks(int64_t begin, int64_t end, void* arg) {
  const rows_job* j = arg;
  const fct_mat* y = j->y;
  for (int64_t i = begin; i < end; ++i) {
    if (j->dt == FCT_F32) {
      float* row = (float*)y->data + i * y->rs;
      const float* b = (const float*)j->bias;
      for (int64_t c = 0; c < y->cols; ++c) row[c] = b[c * j->bs];
    } else {
      double* row = (double*)y->data + i * y->rs;
      const double* b = (const double*)j->bias;
      for (int64_t c = 0; c < y->cols; ++c) row[c] = b[c * j->bs];
    }
  }
}

void fct_cpu_fill_rows(fct_dtype dt, const fct_mat* y, const char* bias, int64_t bs) {
  if (y->cols == 0) return; /* y's data may be NULL: no row address to form */
  int64_t row_bytes = y->cols * (int64_t)fct_dtype_bytes(dt);
  rows_job j = {dt, y, bias, bs};
  fct_cpu_parallel(y->rows, POOL_BYTES / row_bytes + 1, fill_rows_tasks, &j);
}

typedef struct sums_job {
  fct_dtype dt;
  const fct_mat* g;
  char* out;
} sums_job;

/* Blocks of SUM_COLS columns, each summed over every row in order (so the
 * sums do not depend on the pool); g is read row by row, so a block's sums
 * stay in registers or L1. */
FCT_SIMD_CLONES static void column_sums_tasks(int64_t begin, int64_t end, void* arg) {
  const sums_job* j = arg;
  const fct_mat* g = j->g;
  double acc[SUM_COLS];
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t j0 = blk * SUM_COLS, nj = g->cols - j0 < SUM_COLS ? g->cols - j0 : SUM_COLS;
    memset(acc, 0, sizeof acc);
    for (int64_t i = 0; i < g->rows; ++i) {
      if (j->dt == FCT_F32 && g->cs == 1) { /* the usual case, kept apart to vectorise */
        const float* row = (const float*)g->data + i * g->rs + j0;
        for (int64_t c = 0; c < nj; ++c) acc[c] += row[c];
      } else if (j->dt == FCT_F32) {
        const float* row = (const float*)g->data + i * g->rs + j0 * g->cs;
        for (int64_t c = 0; c < nj; ++c) acc[c] += row[c * g->cs];
      } else {
        const double* row = (const double*)g->data + i * g->rs + j0 * g->cs;
        for (int64_t c = 0; c < nj; ++c) acc[c] += row[c * g->cs];
      }
    }
    for (int64_t c = 0; c < nj; ++c) {
      if (j->dt == FCT_F32) ((float*)j->out)[j0 + c] = (float)acc[c];
      else ((double*)j->out)[j0 + c] = acc[c];
    }
  }
}

void fct_cpu_column_sums(fct_dtype dt, const fct_mat* g, char* out) {
  if (g->cols == 0) return;
  int64_t blocks = (g->cols + SUM_COLS - 1) / SUM_COLS;
  int64_t block_bytes = g->rows * SUM_COLS * (int64_t)fct_dtype_bytes(dt);
  sums_job j = {dt, g, out};
  fct_cpu_parallel(blocks, block_bytes > 0 ? POOL_BYTES / block_bytes + 1 : blocks,
                   column_sums_tasks, &j);
}

/* ------------------------------------------------------------------------- */
/* Khatri–Rao product                                                         */
/* ------------------------------------------------------------------------- */

/* Columns are independent, so the pool splits them; within a block of
 * columns the product is built in place, one factor at a time:
 *   out[(p, a), c] = out[p, c] · F_k[a, c]
 * written for p and a descending, so row p is read before any write reaches
 * it (the write index p·n_k + a is >= p, equal only for the last write of
 * row p). That costs ∏n·(1 + 1/n_last + ...) multiplies, not ∏n·(nf - 1). */
typedef struct kr_job {
  fct_dtype dt;
  int nf;
  const fct_mat* F;
  const fct_mat* out;
  int64_t step; /* columns per task */
} kr_job;

#define KR_BODY(T)                                                                    \
  do {                                                                                \
    T* o = (T*)j->out->data;                                                          \
    const int64_t ors = j->out->rs;                                                   \
    if (j->nf == 0) {                                                                 \
      for (int64_t c = c0; c < c1; ++c) o[c] = (T)1;                                  \
      break;                                                                          \
    }                                                                                 \
    const fct_mat* F0 = &j->F[0];                                                     \
    for (int64_t a = 0; a < F0->rows; ++a) {                                          \
      const T* f = (const T*)F0->data + a * F0->rs;                                   \
      for (int64_t c = c0; c < c1; ++c) o[a * ors + c] = f[c * F0->cs];               \
    }                                                                                 \
    int64_t n = F0->rows;                                                             \
    for (int k = 1; k < j->nf; ++k) {                                                 \
      const fct_mat* Fk = &j->F[k];                                                   \
      int64_t nk = Fk->rows, fcs = Fk->cs;                                            \
      for (int64_t p = n - 1; p >= 0; --p) {                                          \
        for (int64_t a = nk - 1; a >= 0; --a) {                                       \
          const T* src = o + p * ors;                                                 \
          const T* f = (const T*)Fk->data + a * Fk->rs;                               \
          T* dst = o + (p * nk + a) * ors;                                            \
          if (fcs == 1) /* the usual layout, kept apart to vectorise */               \
            for (int64_t c = c0; c < c1; ++c) dst[c] = src[c] * f[c];                 \
          else                                                                        \
            for (int64_t c = c0; c < c1; ++c) dst[c] = src[c] * f[c * fcs];           \
        }                                                                             \
      }                                                                               \
      n *= nk;                                                                        \
    }                                                                                 \
  } while (0)

FCT_SIMD_CLONES static void kr_blocks(int64_t begin, int64_t end, void* arg) {
  const kr_job* j = arg;
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t c0 = blk * j->step, c1 = c0 + j->step < j->out->cols ? c0 + j->step : j->out->cols;
    if (j->dt == FCT_F32) KR_BODY(float);
    else KR_BODY(double);
  }
}

fct_status fct_cpu_khatri_rao(fct_context* ctx, int device, fct_dtype dt, int nf,
                              const fct_mat* F, const fct_mat* out) {
  (void)ctx;
  (void)device;
  if (out->rows == 0 || out->cols == 0) return FCT_OK;
  kr_job job = {dt, nf, F, out, 256};
  int64_t blocks = (out->cols + job.step - 1) / job.step;
  /* Below ~1M products one thread is as fast as a fork/join of the pool
   * (and does not wait for a descheduled thread when the machine is busy). */
  int64_t grain = out->rows * out->cols >= ((int64_t)1 << 20) ? 1 : blocks;
  fct_cpu_parallel(blocks, grain, kr_blocks, &job);
  return FCT_OK;
}

/* gF[a, c] = Σ_{p, s} gK[(p, a, s), c] · pre[p, c] · suf[s, c], summed in
 * float64 (up to ∏n / n_k terms) as Σ_p pre[p, c] · (Σ_s gK[(p, a, s), c] ·
 * suf[s, c]): two flops per term of gK, not three. Tasks: one per (a, block
 * of columns). */
typedef struct krg_job {
  fct_dtype dt;
  const fct_mat *gK, *pre, *suf, *gF;
  int64_t npre, nk, nsuf;
  int64_t step, nblocks;
} krg_job;

#define KRG_BLOCK 256

#define KRG_BODY(T)                                                                    \
  do {                                                                                 \
    const int64_t gcs = j->gK->cs, pcs = j->pre->cs, scs = j->suf->cs;                 \
    const bool dense = gcs == 1 && pcs == 1 && scs == 1;                               \
    for (int64_t p = 0; p < j->npre; ++p) {                                            \
      const T* pr = (const T*)j->pre->data + p * j->pre->rs;                           \
      if (dense && j->nsuf == 1) { /* the last factor (suf: ones): one pass */        \
        const T* g = (const T*)j->gK->data + (p * j->nk + a) * j->gK->rs;              \
        const T* su = (const T*)j->suf->data;                                          \
        for (int64_t c = c0; c < c1; ++c)                                              \
          acc[c - c0] += (double)g[c] * su[c] * pr[c];                                 \
        continue;                                                                      \
      }                                                                                \
      const T* g0 = (const T*)j->gK->data + (p * j->nk + a) * j->nsuf * j->gK->rs;     \
      const T* s0 = (const T*)j->suf->data;                                            \
      const int64_t grs = j->gK->rs, srs = j->suf->rs;                                 \
      int64_t c = c0;                                                                  \
      /* Dense: 16 columns at a time summed over s in registers. */                    \
      for (; dense && c + 16 <= c1; c += 16) {                                         \
        double t[16] = {0};                                                            \
        for (int64_t s = 0; s < j->nsuf; ++s)                                          \
          for (int q = 0; q < 16; ++q)                                                 \
            t[q] += (double)g0[s * grs + c + q] * s0[s * srs + c + q];                 \
        for (int q = 0; q < 16; ++q) inner[c - c0 + q] = t[q];                         \
      }                                                                                \
      for (; c < c1; ++c) {                                                            \
        double t = 0;                                                                  \
        for (int64_t s = 0; s < j->nsuf; ++s)                                          \
          t += (double)g0[s * grs + c * gcs] * s0[s * srs + c * scs];                  \
        inner[c - c0] = t;                                                             \
      }                                                                                \
      if (dense)                                                                       \
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += inner[c - c0] * pr[c];        \
      else                                                                             \
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += inner[c - c0] * pr[c * pcs];  \
    }                                                                                  \
    T* out = (T*)j->gF->data + a * j->gF->rs;                                          \
    for (int64_t c = c0; c < c1; ++c) out[c] = (T)acc[c - c0];                         \
  } while (0)

FCT_SIMD_CLONES static void krg_tasks(int64_t begin, int64_t end, void* arg) {
  const krg_job* j = arg;
  double acc[KRG_BLOCK], inner[KRG_BLOCK];
  for (int64_t t = begin; t < end; ++t) {
    int64_t a = t / j->nblocks, blk = t % j->nblocks;
    int64_t c0 = blk * j->step, c1 = c0 + j->step < j->gF->cols ? c0 + j->step : j->gF->cols;
    memset(acc, 0, sizeof acc);
    if (j->dt == FCT_F32) KRG_BODY(float);
    else KRG_BODY(double);
  }
}

fct_status fct_cpu_khatri_rao_grad(fct_context* ctx, int device, fct_dtype dt, const fct_mat* gK,
                                   int64_t npre, int64_t nk, int64_t nsuf, const fct_mat* pre,
                                   const fct_mat* suf, const fct_mat* gF) {
  (void)ctx;
  (void)device;
  if (gF->rows == 0 || gF->cols == 0) return FCT_OK;
  krg_job job = {dt, gK, pre, suf, gF, npre, nk, nsuf, KRG_BLOCK, 0};
  job.nblocks = (gF->cols + KRG_BLOCK - 1) / KRG_BLOCK;
  int64_t tasks = nk * job.nblocks;
  int64_t grain = npre * nsuf * nk * gF->cols >= ((int64_t)1 << 18) ? 1 : tasks;
  fct_cpu_parallel(tasks, grain, krg_tasks, &job);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* fct_backend entries                                                        */
/* ------------------------------------------------------------------------- */

fct_status fct_cpu_gemm_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                              const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                              int64_t sa, int64_t sb, int64_t sc) {
  (void)ctx;
  (void)device;
  fct_cpu_gemm_batched(dt, A, B, C, beta, batch, sa, sb, sc);
  return FCT_OK;
}

fct_status fct_cpu_gemm_reduce_entry(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                     double beta, int64_t batch, int64_t sa, int64_t sb,
                                     char* scratch, size_t scratch_bytes) {
  (void)ctx;
  (void)device;
  (void)scratch;
  (void)scratch_bytes;
  fct_cpu_gemm_reduce(dt, A, B, C, beta, batch, sa, sb);
  return FCT_OK;
}

fct_status fct_cpu_fill_rows_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* y,
                                   const char* bias, int64_t bs) {
  (void)ctx;
  (void)device;
  fct_cpu_fill_rows(dt, y, bias, bs);
  return FCT_OK;
}

fct_status fct_cpu_column_sums_entry(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* g, char* out) {
  (void)ctx;
  (void)device;
  fct_cpu_column_sums(dt, g, out);
  return FCT_OK;
}

/* Zeroing runs in blocks of at least 1 MB on the pool: the gradient of a
 * large embedding table (46 MB for a 32000 x 363 factor) took longer to zero
 * on one thread than the lookup's whole backward, and a dense C is one block
 * of memory rather than `rows` small memsets (49152 rows of 44 bytes). */
typedef struct zero_job {
  char* data;
  size_t bytes, step;
} zero_job;

static void zero_blocks(int64_t begin, int64_t end, void* arg) {
  const zero_job* j = arg;
  for (int64_t b = begin; b < end; ++b) {
    size_t lo = (size_t)b * j->step, hi = lo + j->step < j->bytes ? lo + j->step : j->bytes;
    memset(j->data + lo, 0, hi - lo);
  }
}

fct_status fct_cpu_zero_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C) {
  (void)ctx;
  (void)device;
  size_t es = fct_dtype_bytes(dt);
  if (C->rows == 0 || C->cols == 0) return FCT_OK;
  if (C->rows > 1 && C->rs != C->cols) { /* gapped rows */
    for (int64_t i = 0; i < C->rows; ++i)
      memset(C->data + i * C->rs * (int64_t)es, 0, (size_t)C->cols * es);
    return FCT_OK;
  }
  const size_t step = (size_t)1 << 20;
  zero_job j = {C->data, (size_t)C->rows * (size_t)C->cols * es, step};
  fct_cpu_parallel((int64_t)((j.bytes + step - 1) / step), 1, zero_blocks, &j);
  return FCT_OK;
}
