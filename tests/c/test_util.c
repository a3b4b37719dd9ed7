#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int g_passed, g_failed;

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static double rnd(void) { /* splitmix64 -> [0, 1) */
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 11) / 9007199254740992.0;
}

double tb_random(void) {
  double v = 0.1 + 0.9 * rnd();
  return rnd() < 0.5 ? -v : v;
}

int64_t tb_numel(const test_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->dl.ndim; ++i) n *= t->shape[i];
  return n;
}

int64_t tb_span(const test_tensor* t) {
  if (tb_numel(t) == 0) return 0;
  int64_t s = 1;
  for (int i = 0; i < t->dl.ndim; ++i) s += (t->shape[i] - 1) * t->strides[i];
  return s;
}

static test_tensor* alloc(int bits, int ndim, const int64_t* shape) {
  test_tensor* t = calloc(1, sizeof *t);
  memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
  t->dl.ndim = ndim;
  t->dl.shape = t->shape;
  t->dl.strides = t->strides;
  t->dl.dtype = (DLDataType){kDLFloat, (uint8_t)bits, 1};
  t->dl.device = (DLDevice){kDLCPU, 0};
  return t;
}

test_tensor* tb_new(int bits, int ndim, const int64_t* shape, const int* order, int64_t gap) {
  test_tensor* t = alloc(bits, ndim, shape);
  int ord[8];
  for (int i = 0; i < ndim; ++i) ord[i] = order ? order[i] : i;
  /* ord lists dims from outermost to innermost in memory. */
  int64_t s = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    int d = ord[k];
    t->strides[d] = s;
    s *= shape[d] > 0 ? shape[d] : 1;
    if (k == ndim - 1) s += gap;
  }
  size_t n = (size_t)s + 1;
  t->buf = malloc(n * (size_t)(bits / 8));
  for (size_t i = 0; i < n; ++i) {
    double v = tb_random();
    if (bits == 32) ((float*)t->buf)[i] = (float)v;
    else ((double*)t->buf)[i] = v;
  }
  t->dl.data = t->buf;
  return t;
}

test_tensor* tb_output(int bits, int ndim, const int64_t* shape) {
  test_tensor* t = alloc(bits, ndim, shape);
  int64_t s = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    t->strides[k] = s;
    s *= shape[k] > 0 ? shape[k] : 1;
  }
  t->buf = malloc(((size_t)s + 1) * (size_t)(bits / 8));
  for (int64_t i = 0; i <= s; ++i) {
    if (bits == 32) ((float*)t->buf)[i] = NAN;
    else ((double*)t->buf)[i] = NAN;
  }
  t->dl.data = t->buf;
  return t;
}

void tb_free(test_tensor* t) {
  if (!t) return;
  free(t->buf);
  free(t);
}

test_index* tb_index_new(int bits, int nd, const int64_t* shape, bool transposed,
                         const int64_t* vals) {
  test_index* t = calloc(1, sizeof *t);
  t->count = 1;
  for (int i = 0; i < nd; ++i) {
    t->shape[i] = shape[i];
    t->count *= shape[i];
  }
  int64_t s = 1;
  for (int i = nd - 1; i >= 0; --i) {
    t->strides[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
  if (transposed && nd == 2) {
    t->strides[0] = 1;
    t->strides[1] = shape[0] > 0 ? shape[0] : 1;
  }
  t->span = s;
  t->vals = calloc((size_t)t->count + 1, sizeof(int64_t));
  t->buf = calloc((size_t)s + 1, (size_t)bits / 8);
  for (int64_t p = 0; p < t->count; ++p) {
    t->vals[p] = vals[p];
    int64_t off = 0, rem = p;
    for (int i = nd - 1; i >= 0; --i) {
      off += (rem % shape[i]) * t->strides[i];
      rem /= shape[i];
    }
    if (bits == 64) ((int64_t*)t->buf)[off] = vals[p];
    else ((int32_t*)t->buf)[off] = (int32_t)vals[p];
  }
  t->dl.data = t->buf;
  t->dl.ndim = nd;
  t->dl.shape = t->shape;
  t->dl.strides = t->strides;
  t->dl.dtype = (DLDataType){kDLInt, (uint8_t)bits, 1};
  t->dl.device = (DLDevice){kDLCPU, 0};
  return t;
}

void tb_index_free(test_index* t) {
  if (!t) return;
  free(t->vals);
  free(t->buf);
  free(t);
}

static char* at(const test_tensor* t, const int64_t* idx) {
  int64_t off = 0;
  for (int i = 0; i < t->dl.ndim; ++i) off += idx[i] * t->strides[i];
  return (char*)t->dl.data + t->dl.byte_offset + off * (t->dl.dtype.bits / 8);
}

double tb_get(const test_tensor* t, const int64_t* idx) {
  char* p = at(t, idx);
  return t->dl.dtype.bits == 32 ? *(float*)p : *(double*)p;
}

void tb_set(test_tensor* t, const int64_t* idx, double v) {
  char* p = at(t, idx);
  if (t->dl.dtype.bits == 32) *(float*)p = (float)v;
  else *(double*)p = v;
}

double tb_get2(const test_tensor* t, int64_t row, int64_t col) {
  int64_t idx[8];
  int nd = t->dl.ndim;
  idx[nd - 1] = col;
  for (int i = nd - 2; i >= 0; --i) {
    idx[i] = row % t->shape[i];
    row /= t->shape[i];
  }
  return tb_get(t, idx);
}

int test_batch_shapes(bool x3d, int64_t M, int64_t in, int64_t out, int64_t* xs,
                      int64_t* ys) {
  int nd = x3d ? 3 : 2;
  if (x3d) {
    xs[0] = ys[0] = 2;
    xs[1] = ys[1] = M / 2;
  } else {
    xs[0] = ys[0] = M;
  }
  xs[nd - 1] = in;
  ys[nd - 1] = out;
  return nd;
}

int tb_pool_calls;

int32_t tb_reverse_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                        void* arg) {
  (void)grain;
  ++tb_pool_calls;
  for (int64_t i = end - 1; i >= begin; --i) body(i, i + 1, arg);
  return 0;
}

int tb_three_threads(void) { return 3; }

int test_report(void) {
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}

double test_rel_err(const test_tensor* a, const double* ref, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0.0;
  double num = 0, den = 1e-300;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double d = fabs(tb_get2(a, i, j) - ref[i * cols + j]);
      if (d != d) return INFINITY;
      num = d > num ? d : num;
      den = fabs(ref[i * cols + j]) > den ? fabs(ref[i * cols + j]) : den;
    }
  return num / den;
}

double test_rel_diff(const test_tensor* a, const test_tensor* ref) {
  int64_t n = tb_numel(ref), idx[8] = {0};
  double num = 0, den = 1e-300;
  for (int64_t e = 0; e < n; ++e) {
    int64_t rem = e;
    for (int d = ref->dl.ndim - 1; d >= 0; --d) {
      idx[d] = rem % ref->shape[d];
      rem /= ref->shape[d];
    }
    double r = tb_get(ref, idx), d = fabs(tb_get(a, idx) - r);
    if (d != d) return INFINITY;
    num = d > num ? d : num;
    den = fabs(r) > den ? fabs(r) : den;
  }
  return n > 0 ? num / den : 0.0;
}
