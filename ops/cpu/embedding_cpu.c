/*
 * CPU primitives of the factorized embeddings (float32, float64; backend.h):
 * reading and validating indices, gathering rows, a deterministic
 * scatter-add, and the TT chains (embedding_cpu_chain.inc). Gather and the
 * chains run in the host's thread pool over indices; the scatter-add over
 * destination rows, so no two tasks write the same element and each
 * element sums its contributions in index order, whatever the threads.
 * Entry points: ops/lowrank_embedding.c, ops/tt_embedding.c.
 */
#include <string.h>

#include "embedding_cpu.h"
#include "gemm_cpu.h"

#define T float
#define FN(name) name##_f32
#include "embedding_cpu_chain.inc"
#undef T
#undef FN
#define T double
#define FN(name) name##_f64
#include "embedding_cpu_chain.inc"
#undef T
#undef FN

/* ------------------------------------------------------------------------- */
/* Indices                                                                    */
/* ------------------------------------------------------------------------- */

/* A row-major walk over a tensor's elements: `off` is the element offset
 * of the current position. */
typedef struct idx_walk {
  int nd;
  int64_t shape[FCT_MAX_DIMS], st[FCT_MAX_DIMS], at[FCT_MAX_DIMS];
  int64_t off;
} idx_walk;

/* Starts at row-major position pos (< numel, so every size is >= 1). */
static void walk_start(idx_walk* w, const DLTensor* t, int64_t pos) {
  w->nd = t->ndim;
  fct_strides(t, w->st);
  w->off = 0;
  for (int k = w->nd - 1; k >= 0; --k) {
    w->shape[k] = t->shape[k];
    w->at[k] = pos % t->shape[k];
    pos /= t->shape[k];
    w->off += w->at[k] * w->st[k];
  }
}

static void walk_next(idx_walk* w) {
  for (int k = w->nd - 1; k >= 0; --k) {
    w->off += w->st[k];
    if (++w->at[k] < w->shape[k]) return;
    w->off -= w->at[k] * w->st[k];
    w->at[k] = 0;
  }
}

fct_status fct_cpu_embedding_indices(fct_context* ctx, const DLTensor* indices, int64_t begin,
                                     int64_t count, int64_t num, int64_t padding_idx,
                                     int64_t* out, char* scratch, int64_t* bad,
                                     int64_t* bad_pos, int64_t* bad_value) {
  (void)ctx;
  (void)scratch;
  int64_t nbad = 0, first = -1, first_value = 0;
  if (count > 0) {
    /* One pass, serial: a read and a compare per index, against the R or
     * dim multiply-adds each index costs afterwards. */
    idx_walk w;
    walk_start(&w, indices, begin);
    const char* base = fct_data(indices);
    bool wide = indices->dtype.bits == 64;
    for (int64_t j = 0; j < count; ++j, walk_next(&w)) {
      int64_t v = wide ? ((const int64_t*)base)[w.off] : ((const int32_t*)base)[w.off];
      bool outside = v < 0 || v >= num;
      if (outside && nbad++ == 0) {
        first = begin + j;
        first_value = v;
      }
      if (out) out[j] = outside || v == padding_idx ? -1 : v;
    }
  }
  if (bad) {
    *bad = nbad;
    *bad_pos = first;
    *bad_value = first_value;
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Gather                                                                     */
/* ------------------------------------------------------------------------- */

typedef struct gather_job {
  fct_dtype dt;
  const fct_mat* src;
  const int64_t* idx;
  char* out;
} gather_job;

static void gather_body(int64_t b, int64_t e, void* arg) {
  const gather_job* j = (const gather_job*)arg;
  const fct_mat* s = j->src;
  const int64_t es = (int64_t)fct_dtype_bytes(j->dt), cols = s->cols;
  for (int64_t r = b; r < e; ++r) {
    char* o = j->out + r * cols * es;
    int64_t i = j->idx[r];
    if (i < 0) {
      memset(o, 0, (size_t)(cols * es));
      continue;
    }
    const char* row = s->data + i * s->rs * es;
    if (s->cs == 1) {
      memcpy(o, row, (size_t)(cols * es));
    } else if (j->dt == FCT_F32) {
      for (int64_t c = 0; c < cols; ++c) ((float*)o)[c] = ((const float*)row)[c * s->cs];
    } else {
      for (int64_t c = 0; c < cols; ++c) ((double*)o)[c] = ((const double*)row)[c * s->cs];
    }
  }
}

fct_status fct_cpu_embedding_gather(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* src, const int64_t* idx, int64_t n,
                                    char* out) {
  (void)ctx;
  (void)device;
  if (n <= 0 || src->cols <= 0) return FCT_OK;
  gather_job job = {dt, src, idx, out};
  int64_t grain = 16384 / src->cols; /* rows worth a task: ~16K elements */
  fct_cpu_parallel(n, grain > 1 ? grain : 1, gather_body, &job);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Scatter-add                                                                */
/* ------------------------------------------------------------------------- */

typedef struct scatter_job {
  fct_dtype dt;
  int64_t n, div, ss, P, num, Q;
  const int64_t* idx;
  const char* src;
  char* dst;
} scatter_job;

/* Destination rows [a0, a1): every task scans all n indices (a compare
 * each) and adds only the rows it owns, in j order. */
static void scatter_body(int64_t a0, int64_t a1, void* arg) {
  const scatter_job* s = (const scatter_job*)arg;
  for (int64_t j = 0; j < s->n; ++j) {
    int64_t i = s->idx[j];
    if (i < 0) continue;
    int64_t a = (i / s->div) % s->num;
    if (a < a0 || a >= a1) continue;
    for (int64_t p = 0; p < s->P; ++p) {
      int64_t doff = (p * s->num + a) * s->Q, soff = j * s->ss + p * s->Q;
      if (s->dt == FCT_F32) {
        float* d = (float*)s->dst + doff;
        const float* x = (const float*)s->src + soff;
        for (int64_t q = 0; q < s->Q; ++q) d[q] += x[q];
      } else {
        double* d = (double*)s->dst + doff;
        const double* x = (const double*)s->src + soff;
        for (int64_t q = 0; q < s->Q; ++q) d[q] += x[q];
      }
    }
  }
}

fct_status fct_cpu_embedding_scatter_add(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                         const int64_t* idx, int64_t div, const char* src,
                                         int64_t ss, int64_t P, int64_t num, int64_t Q,
                                         char* dst) {
  (void)ctx;
  (void)device;
  if (n <= 0 || num <= 0 || P <= 0 || Q <= 0) return FCT_OK;
  scatter_job job = {dt, n, div, ss, P, num, Q, idx, src, dst};
  /* Small scatters stay serial; larger ones get at most ~16 tasks, so the
   * repeated scans of the indices stay a small fraction of the adds. */
  if ((double)n * (double)P * (double)Q < 32768.0 || num == 1) {
    scatter_body(0, num, &job);
    return FCT_OK;
  }
  int64_t grain = num / 16;
  fct_cpu_parallel(num, grain > 1 ? grain : 1, scatter_body, &job);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* TT chains                                                                  */
/* ------------------------------------------------------------------------- */

typedef struct chain_job {
  fct_dtype dt;
  const fct_tt_emb_geom* g;
  const int64_t* idx;
  char* y;
  const char* gy;
  char* slices;
  char* work;
} chain_job;

static void rows_body(int64_t b, int64_t e, void* arg) {
  const chain_job* j = (const chain_job*)arg;
  if (j->dt == FCT_F32)
    chain_rows_f32(j->g, j->idx, b, e, (float*)j->y, (float*)j->work);
  else
    chain_rows_f64(j->g, j->idx, b, e, (double*)j->y, (double*)j->work);
}

static void grad_body(int64_t b, int64_t e, void* arg) {
  const chain_job* j = (const chain_job*)arg;
  if (j->dt == FCT_F32)
    chain_grad_f32(j->g, j->idx, b, e, (const float*)j->gy, (float*)j->slices, (float*)j->work);
  else
    chain_grad_f64(j->g, j->idx, b, e, (const double*)j->gy, (double*)j->slices,
                   (double*)j->work);
}

/* Indices worth one task: ~200K FLOPs. */
static int64_t chain_grain(const fct_tt_emb_geom* g, double factor) {
  double per = factor * g->flops + (double)g->dim + 1.0;
  double grain = 2e5 / per;
  return grain < 1.0 ? 1 : (int64_t)grain;
}

fct_status fct_cpu_tt_embedding_rows(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                     char* y, char* work) {
  (void)ctx;
  (void)device;
  if (n <= 0) return FCT_OK;
  chain_job job = {dt, g, idx, y, NULL, NULL, work};
  fct_cpu_parallel(n, chain_grain(g, 1.0), rows_body, &job);
  return FCT_OK;
}

fct_status fct_cpu_tt_embedding_grad(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                     const char* gy, char* slices, char* work) {
  (void)ctx;
  (void)device;
  if (n <= 0) return FCT_OK;
  chain_job job = {dt, g, idx, NULL, gy, slices, work};
  fct_cpu_parallel(n, chain_grain(g, 3.0), grad_body, &job);
  return FCT_OK;
}
