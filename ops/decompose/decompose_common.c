/* What the decomposition entry points share (see decompose.h). */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/gemm_cpu.h"
#include "decompose.h"

fct_status fct_dec_check_int(fct_context* ctx, const char* what, int64_t v) {
  if (v < 0 || v > INT_MAX)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: %lld does not fit LAPACK's 32-bit indices", what,
                    (long long)v);
  return FCT_OK;
}

fct_status fct_dec_check_input(fct_context* ctx, const char* name, const DLTensor* X,
                               int min_ndim, int max_ndim) {
  if (!X) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: expected a tensor, got NULL", name);
  fct_dtype dt = fct_dtype_of(X->dtype);
  if (dt != FCT_F32 && dt != FCT_F64)
    return fct_fail(ctx, FCT_ERR_DTYPE, "%s: expected dtype float32 or float64, got %s", name,
                    fct_dtype_name(X->dtype));
  FCT_TRY(fct_check_tensor(ctx, name, X, 0));
  if (X->ndim < min_ndim || X->ndim > max_ndim) {
    if (min_ndim == max_ndim)
      return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected %d dims, got %d", name, min_ndim, X->ndim);
    return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected %d to %d dims, got %d", name, min_ndim,
                    max_ndim, X->ndim);
  }
  /* An empty tensor's other dims are still multiplied in groups
   * (unfoldings, CP's split): their product must fit too (a non-empty
   * one's is bounded by fct_check_tensor). */
  bool empty = fct_numel(X) == 0;
  int64_t nonzero = 1;
  for (int i = 0; i < X->ndim; ++i) {
    if (X->shape[i] > INT_MAX)
      return fct_fail(ctx, FCT_ERR_OVERFLOW,
                      "%s: size %lld of dim %d does not fit LAPACK's 32-bit indices", name,
                      (long long)X->shape[i], i);
    if (!empty) continue;
    if (X->shape[i] > 0) nonzero *= X->shape[i];
    if (nonzero > INT_MAX)
      return fct_fail(ctx, FCT_ERR_OVERFLOW,
                      "%s: the product of the nonzero dims up to %d of an empty tensor does not "
                      "fit LAPACK's 32-bit indices",
                      name, i);
  }
  return FCT_OK;
}

static bool is_row_major(const DLTensor* t) {
  if (!t->strides) return true;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != s) return false;
    s *= t->shape[i];
  }
  return true;
}

fct_status fct_dec_check_output(fct_context* ctx, const char* name, const DLTensor* t,
                                const DLTensor* X, int ndim, const int64_t* shape) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 0));
  FCT_TRY(fct_check_same(ctx, name, t, "the input", X));
  bool ok = t->ndim == ndim;
  for (int i = 0; ok && i < ndim; ++i) ok = t->shape[i] == shape[i];
  if (!ok) {
    char want[160] = "", got[160] = "";
    size_t a = 0, b = 0;
    for (int i = 0; i < ndim && a < sizeof want - 24; ++i)
      a += (size_t)snprintf(want + a, sizeof want - a, "%s%lld", i ? ", " : "", (long long)shape[i]);
    for (int i = 0; i < t->ndim && b < sizeof got - 24; ++i)
      b += (size_t)snprintf(got + b, sizeof got - b, "%s%lld", i ? ", " : "",
                            (long long)t->shape[i]);
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected shape [%s], got [%s]", name, want, got);
  }
  if (!is_row_major(t))
    return fct_fail(ctx, FCT_ERR_LAYOUT, "%s: expected a dense row-major (C-contiguous) output",
                    name);
  return fct_check_disjoint(ctx, name, t, "the input", X);
}

/* Calls fn on every innermost row of X (any strides), in row-major order. */
typedef void (*row_fn)(const char* row, int64_t n, int64_t stride, fct_dtype dt, void* arg);

static void for_each_row(const DLTensor* X, row_fn fn, void* arg) {
  if (fct_numel(X) <= 0) return;
  int64_t st[FCT_MAX_DIMS], idx[FCT_MAX_DIMS] = {0};
  fct_strides(X, st);
  int nd = X->ndim;
  fct_dtype dt = fct_dtype_of(X->dtype);
  int64_t es = (int64_t)fct_dtype_bytes(dt);
  if (nd == 0) {
    fn(fct_data(X), 1, 1, dt, arg);
    return;
  }
  int64_t n = X->shape[nd - 1], s = st[nd - 1];
  for (;;) {
    const char* p = fct_data(X);
    for (int d = 0; d < nd - 1; ++d) p += idx[d] * st[d] * es;
    fn(p, n, s, dt, arg);
    int d = nd - 2;
    while (d >= 0 && ++idx[d] == X->shape[d]) idx[d--] = 0;
    if (d < 0) return;
  }
}

typedef struct scan_state {
  double sumsq;
  int64_t bad;
} scan_state;

static void scan_row(const char* row, int64_t n, int64_t s, fct_dtype dt, void* arg) {
  scan_state* st = arg;
  double acc = 0.0;
  int64_t bad = 0;
  if (dt == FCT_F32) {
    const float* r = (const float*)row;
    for (int64_t j = 0; j < n; ++j) {
      double v = r[j * s];
      bad += !isfinite(v);
      acc += v * v;
    }
  } else {
    const double* r = (const double*)row;
    for (int64_t j = 0; j < n; ++j) {
      double v = r[j * s];
      bad += !isfinite(v);
      acc += v * v;
    }
  }
  st->sumsq += acc;
  st->bad += bad;
}

/* The whole-tensor passes (scan, load, pack) run over blocks of dim 0 in
 * the host's thread pool. The number of blocks depends only on the shape,
 * and the partial sums are added in block order: the same bits whatever
 * the number of threads. */
#define SCAN_BLOCKS 16

static int64_t n_blocks(const DLTensor* X) {
  if (X->ndim == 0 || fct_numel(X) <= 0) return 1;
  int64_t n = X->shape[0] < SCAN_BLOCKS ? X->shape[0] : SCAN_BLOCKS;
  /* below ~64K elements a wake-up costs more than the pass */
  return fct_numel(X) < (1 << 16) ? 1 : n;
}

/* Rows [lo, hi) of dim 0 of X as a tensor of their own. */
static DLTensor block_of(const DLTensor* X, int64_t nb, int64_t b, int64_t shape0[FCT_MAX_DIMS],
                         int64_t strides[FCT_MAX_DIMS], int64_t* first_row) {
  DLTensor v = *X;
  if (X->ndim == 0 || nb <= 1) {
    *first_row = 0;
    return v;
  }
  int64_t rows = X->shape[0], lo = rows * b / nb, hi = rows * (b + 1) / nb;
  fct_strides(X, strides);
  for (int i = 0; i < X->ndim; ++i) shape0[i] = X->shape[i];
  shape0[0] = hi - lo;
  v.shape = shape0;
  v.strides = strides;
  v.byte_offset += (uint64_t)(lo * strides[0] * (int64_t)fct_dtype_bytes(fct_dtype_of(X->dtype)));
  *first_row = lo;
  return v;
}

typedef struct pass_job {
  const DLTensor* X;
  int64_t nb;
  scan_state* parts; /* scan */
  char* dst;         /* load / pack */
  bool f64;          /* load: convert to float64, else pack in X's dtype */
} pass_job;

static void scan_blocks(int64_t begin, int64_t end, void* arg) {
  const pass_job* j = arg;
  for (int64_t b = begin; b < end; ++b) {
    int64_t sh[FCT_MAX_DIMS], st[FCT_MAX_DIMS], lo;
    DLTensor v = block_of(j->X, j->nb, b, sh, st, &lo);
    j->parts[b] = (scan_state){0.0, 0};
    for_each_row(&v, scan_row, &j->parts[b]);
  }
}

fct_status fct_dec_scan_cpu(fct_context* ctx, const char* name, const DLTensor* X,
                            double* sumsq) {
  scan_state parts[SCAN_BLOCKS], st = {0.0, 0};
  pass_job job = {X, n_blocks(X), parts, NULL, false};
  fct_cpu_parallel(job.nb, 1, scan_blocks, &job);
  for (int64_t b = 0; b < job.nb; ++b) {
    st.sumsq += parts[b].sumsq;
    st.bad += parts[b].bad;
  }
  if (st.bad)
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "%s: holds %lld NaN/Inf values; a decomposition needs finite input", name,
                    (long long)st.bad);
  if (!isfinite(st.sumsq))
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "%s: its squared Frobenius norm overflows float64 (values near %s's "
                    "largest); rescale it first",
                    name, fct_dtype_name(X->dtype));
  *sumsq = st.sumsq;
  return FCT_OK;
}

static void load_row(const char* row, int64_t n, int64_t s, fct_dtype dt, void* arg) {
  double** dst = arg;
  double* d = *dst;
  if (dt == FCT_F32) {
    const float* r = (const float*)row;
    for (int64_t j = 0; j < n; ++j) d[j] = r[j * s];
  } else if (s == 1) {
    memcpy(d, row, (size_t)n * sizeof(double));
  } else {
    const double* r = (const double*)row;
    for (int64_t j = 0; j < n; ++j) d[j] = r[j * s];
  }
  *dst = d + n;
}

static void pack_row(const char* row, int64_t n, int64_t s, fct_dtype dt, void* arg) {
  char** dst = arg;
  size_t es = fct_dtype_bytes(dt);
  if (s == 1) {
    memcpy(*dst, row, (size_t)n * es);
  } else if (dt == FCT_F32) {
    for (int64_t j = 0; j < n; ++j) ((float*)*dst)[j] = ((const float*)row)[j * s];
  } else {
    for (int64_t j = 0; j < n; ++j) ((double*)*dst)[j] = ((const double*)row)[j * s];
  }
  *dst += (size_t)n * es;
}

static void copy_blocks(int64_t begin, int64_t end, void* arg) {
  const pass_job* j = arg;
  int64_t numel = fct_numel(j->X);
  int64_t per_row = j->X->ndim && j->X->shape[0] ? numel / j->X->shape[0] : numel;
  size_t es = j->f64 ? sizeof(double) : fct_dtype_bytes(fct_dtype_of(j->X->dtype));
  for (int64_t b = begin; b < end; ++b) {
    int64_t sh[FCT_MAX_DIMS], st[FCT_MAX_DIMS], lo;
    DLTensor v = block_of(j->X, j->nb, b, sh, st, &lo);
    char* d = j->dst + (size_t)(lo * per_row) * es;
    if (j->f64) {
      double* dd = (double*)d;
      for_each_row(&v, load_row, &dd);
    } else {
      for_each_row(&v, pack_row, &d);
    }
  }
}

void fct_dec_load_f64(const DLTensor* X, double* dst) {
  pass_job job = {X, n_blocks(X), NULL, (char*)dst, true};
  fct_cpu_parallel(job.nb, 1, copy_blocks, &job);
}

void fct_dec_pack(const DLTensor* X, char* dst) {
  pass_job job = {X, n_blocks(X), NULL, dst, false};
  fct_cpu_parallel(job.nb, 1, copy_blocks, &job);
}

bool fct_dec_dense_f64(const DLTensor* X) {
  return fct_dtype_of(X->dtype) == FCT_F64 && is_row_major(X);
}

void fct_dec_store(DLTensor* out, const double* src, int64_t rows, int64_t cols, int64_t rs,
                   int64_t cs) {
  char* base = fct_data(out);
  bool f32 = fct_dtype_of(out->dtype) == FCT_F32;
  for (int64_t i = 0; i < rows; ++i) {
    const double* s = src + i * rs;
    if (f32) {
      float* d = (float*)base + i * cols;
      for (int64_t j = 0; j < cols; ++j) d[j] = (float)s[j * cs];
    } else {
      double* d = (double*)base + i * cols;
      for (int64_t j = 0; j < cols; ++j) d[j] = s[j * cs];
    }
  }
}

void fct_dec_fix_signs(double* U, int64_t m, int64_t urs, int64_t ucs, double* V, int64_t n,
                       int64_t vrs, int64_t vcs, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    double big = 0.0;
    int64_t at = 0;
    for (int64_t i = 0; i < m; ++i) {
      double a = fabs(U[i * urs + j * ucs]);
      if (a > big) big = a, at = i;
    }
    if (U[at * urs + j * ucs] >= 0.0) continue;
    for (int64_t i = 0; i < m; ++i) U[i * urs + j * ucs] = -U[i * urs + j * ucs];
    for (int64_t c = 0; c < n; ++c) V[j * vrs + c * vcs] = -V[j * vrs + c * vcs];
  }
}

/* Set once by libfactorch_cuda's constructor (like the lowrank backend). */
static _Atomic(const fct_decompose_backend*) g_cuda_decompose = NULL;

void fct_register_cuda_decompose(const fct_decompose_backend* backend) {
  atomic_store(&g_cuda_decompose, backend);
}

fct_status fct_cuda_decompose_for(fct_context* ctx, const char* name,
                                  const fct_decompose_backend** out) {
  *out = atomic_load(&g_cuda_decompose);
  if (*out) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_UNSUPPORTED,
                  "%s: is a cuda tensor, but factorch's CUDA backend is not loaded (built "
                  "without CUDA, or libfactorch_cuda could not be loaded)",
                  name);
}

fct_status fct_dec_run_for(fct_context* ctx, const char* name, const DLTensor* X,
                           fct_dec_run* r) {
  r->ctx = ctx;
  r->e = &fct_dec_cpu_engine;
  r->device = 0;
  if (X->device.device_type == kDLCPU) {
    const char* split = getenv("FACTORCH_TEST_DEVICE_PATH");
    if (split && strcmp(split, "1") == 0) r->e = &fct_dec_cpu_engine_split;
    return FCT_OK;
  }
  if (X->device.device_type != kDLCUDA)
    return fct_fail(ctx, FCT_ERR_DEVICE, "%s: expected a cpu or cuda tensor, got a %s tensor",
                    name, fct_device_name(X->device.device_type));
  const fct_decompose_backend* be;
  FCT_TRY(fct_cuda_decompose_for(ctx, name, &be));
  if (!be->engine)
    return fct_fail(ctx, FCT_ERR_UNSUPPORTED, "%s: the loaded CUDA backend has no decomposition "
                    "engine", name);
  r->e = be->engine;
  r->device = X->device.device_id;
  return FCT_OK;
}
