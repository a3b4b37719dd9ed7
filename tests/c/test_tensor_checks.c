/* The DLPack bridge's views and checks: folding batch dims, BLAS-readable
 * layouts, byte ranges and overlap detection. */
#include <stdint.h>
#include <string.h>

#include "fct_tensor.h"
#include "test_util.h"

static DLTensor view(float* data, int nd, int64_t* shape, int64_t* strides) {
  DLTensor t = {0};
  t.data = data;
  t.ndim = nd;
  t.shape = shape;
  t.strides = strides;
  t.dtype = (DLDataType){kDLFloat, 32, 1};
  t.device = (DLDevice){kDLCPU, 0};
  return t;
}

int main(void) {
  static float buf[4096];
  fct_mat m;

  int64_t s3[3] = {2, 3, 4}, st3[3] = {12, 4, 1};
  DLTensor t = view(buf, 3, s3, st3);
  CHECK(fct_fold(&t, &m) && m.rows == 6 && m.cols == 4 && m.rs == 4 && m.cs == 1,
        "contiguous 3-D folds to [6, 4]");
  CHECK(fct_mat_blas_ok(&m), "contiguous is BLAS-readable");

  int64_t st3b[3] = {4, 8, 1}; /* dims 0 and 1 swapped in memory */
  t = view(buf, 3, s3, st3b);
  CHECK(!fct_fold(&t, &m), "permuted batch dims do not fold");

  int64_t s2[2] = {5, 3}, st2c[2] = {1, 5};
  t = view(buf, 2, s2, st2c);
  CHECK(fct_fold(&t, &m) && fct_mat_blas_ok(&m) && m.rs == 1 && m.cs == 5,
        "column-major is BLAS-readable as a transpose");

  int64_t st2z[2] = {0, 1};
  t = view(buf, 2, s2, st2z);
  CHECK(fct_fold(&t, &m) && !fct_mat_blas_ok(&m), "broadcast rows need packing");

  int64_t s1[2] = {1, 7}, st1[2] = {999, 3};
  t = view(buf, 2, s1, st1);
  CHECK(fct_fold(&t, &m) && fct_mat_blas_ok(&m) && m.cs == 3, "one strided row: a vector");

  int64_t sneg[2] = {3, 3}, stneg[2] = {-3, 1};
  t = view(buf + 6, 2, sneg, stneg);
  uintptr_t lo, hi;
  fct_byte_range(&t, &lo, &hi);
  CHECK(lo == (uintptr_t)buf && hi == (uintptr_t)(buf + 9), "negative stride byte range");

  fct_context ctx = {0};
  char err[256];
  ctx.error = err;
  ctx.error_bytes = sizeof err;
  DLTensor a = view(buf, 2, s2, NULL), b = view(buf + 14, 2, s2, NULL);
  CHECK(fct_check_disjoint(&ctx, "a", &a, "b", &b) == FCT_ERR_LAYOUT && strstr(err, "b"),
        "overlap detected and named");
  b = view(buf + 15, 2, s2, NULL);
  CHECK(fct_check_disjoint(&ctx, "a", &a, "b", &b) == FCT_OK, "adjacent is disjoint");

  int64_t sbad[2] = {-1, 3};
  t = view(buf, 2, sbad, NULL);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_SHAPE && strstr(err, "w"),
        "negative size rejected");
  int64_t s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  t = view(buf, 9, s9, NULL);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_NDIM, "too many dims");
  t = view(NULL, 2, s2, NULL);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_NULL_ARGUMENT, "NULL data");
  int64_t s0[2] = {0, 3};
  t = view(NULL, 2, s0, NULL);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_OK, "NULL data is fine when empty");
  CHECK(fct_check_output(&ctx, "o", &t, &m) == FCT_OK, "empty output is fine");
  int64_t s0b[3] = {2, 0, 6}, st0b[3] = {0, 0, 0}; /* numpy's strides for an empty array */
  t = view(buf, 3, s0b, st0b);
  CHECK(fct_check_output(&ctx, "o", &t, &m) == FCT_OK && m.rows == 0 && m.cs == 1,
        "empty output with zero strides is fine");
  int64_t s0c[2] = {4, 0}, st0c[2] = {0, 0};
  t = view(buf, 2, s0c, st0c);
  CHECK(fct_check_output(&ctx, "o", &t, &m) == FCT_OK && m.cols == 0,
        "output without columns is fine");

  /* Descriptors no memory can hold, found by tests/fuzz: refused before any
   * product of their sizes and strides can overflow. */
  int64_t s2b[2] = {2, 3}, sthuge[2] = {(int64_t)1 << 62, 1};
  t = view(buf, 2, s2b, sthuge);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_OVERFLOW && strstr(err, "w"),
        "a stride reaching past 2^62 bytes is refused");
  int64_t stmin[2] = {INT64_MIN, 1};
  t = view(buf, 2, s2b, stmin);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_OVERFLOW, "stride INT64_MIN is refused");
  int64_t sbig[2] = {(int64_t)1 << 61, 2}, st0[2] = {0, 1};
  t = view(buf, 2, sbig, st0);
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_OVERFLOW,
        "2^62 float32 elements (2^64 bytes, even broadcast) are refused");
  t = view(buf, 2, s2b, NULL);
  t.byte_offset = 2;
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_ERR_LAYOUT && strstr(err, "aligned"),
        "data + byte_offset not aligned to float32 is refused");
  t.byte_offset = 4;
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_OK, "an element-aligned offset is fine");
  /* Empty tensors with huge dims: their products overflow, but nothing is
   * read (no UB under UBSan, NULL data with an offset stays NULL). */
  int64_t sz[3] = {0, (int64_t)1 << 62, (int64_t)1 << 62};
  t = view(NULL, 3, sz, NULL);
  t.byte_offset = 12;
  CHECK(fct_check_tensor(&ctx, "w", &t, 1) == FCT_OK && fct_data(&t) == NULL,
        "empty tensor with huge dims and NULL data is fine");
  CHECK(fct_fold(&t, &m) && m.rows == 0, "it folds to no rows");
  int64_t sz2[3] = {(int64_t)1 << 62, 4, 0};
  t = view(buf, 3, sz2, NULL);
  fct_fold(&t, &m);
  CHECK(m.cols == 0, "an empty last dim folds to no cols");

  size_t cur = 10;
  CHECK(fct_ws_take(&cur, 5) == 256 && cur == 261, "workspace carving aligns to 256");
  size_t out;
  CHECK(!fct_mul_ok(SIZE_MAX / 2, 3, &out), "size_t overflow detected");
  return test_report();
}
