/* Helpers shared by the C tests: test tensors (tb_*: random values with any
 * strides, read and written as float64), a tiny check/report harness, the
 * context, error buffer and workspace every op call gets, and the relative
 * error of a result against a float64 reference (test_*). */
#ifndef FCT_TEST_UTIL_H
#define FCT_TEST_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "factorch.h"

typedef struct test_tensor {
  DLTensor dl;
  int64_t shape[8];
  int64_t strides[8];
  void* buf; /* owned: freed by tb_free */
} test_tensor;

/* A tensor of `shape` whose memory is laid out with the dims permuted by
 * `order` (NULL: row-major) and `gap` extra elements between innermost rows
 * (so that gap > 0 gives non-foldable strides). Filled with random values in
 * [-1, -0.1] U [0.1, 1] (never zero). bits: 32 or 64. */
test_tensor* tb_new(int bits, int ndim, const int64_t* shape, const int* order, int64_t gap);
/* A random value in [-1, -0.1] U [0.1, 1] (never zero): what tb_new fills
 * with, from one deterministic stream. */
double tb_random(void);
/* Dense row-major, filled with NaN so that an element an op fails to write
 * shows (outputs). */
test_tensor* tb_output(int bits, int ndim, const int64_t* shape);
void tb_free(test_tensor* t);
double tb_get(const test_tensor* t, const int64_t* idx);
void tb_set(test_tensor* t, const int64_t* idx, double v);
/* Element of a tensor folded to [rows, cols] (row-major flat index). */
double tb_get2(const test_tensor* t, int64_t row, int64_t col);
int64_t tb_numel(const test_tensor* t);
/* Elements from the first to one past the last in memory (0 when empty). */
int64_t tb_span(const test_tensor* t);

/* An index tensor (int64 or int32) of `shape` holding vals[p] at logical
 * (row-major) position p; 2-D ones stored column-major when `transposed`. */
typedef struct test_index {
  DLTensor dl;
  int64_t shape[8], strides[8];
  int64_t* vals; /* copy of the values in logical order, owned */
  int64_t count; /* elements */
  int64_t span;  /* elements from the first to one past the last in buf */
  void* buf;
} test_index;
test_index* tb_index_new(int bits, int nd, const int64_t* shape, bool transposed,
                         const int64_t* vals);
void tb_index_free(test_index* t);

extern int g_passed, g_failed;
#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (cond) {                                                     \
      ++g_passed;                                                   \
    } else {                                                        \
      ++g_failed;                                                   \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);          \
      fprintf(stderr, __VA_ARGS__);                                 \
      fprintf(stderr, "\n");                                        \
    }                                                               \
  } while (0)

/* A stand-in for the host's thread pool (fct_cpu_set_thread_pool): runs
 * each block alone, in reverse order, so that a block depending on another's
 * result or on running in order would show. tb_pool_calls counts its calls;
 * tb_three_threads reports 3 workers. */
extern int tb_pool_calls;
int32_t tb_reverse_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                        void* arg);
int tb_three_threads(void);

/* The shapes of x [M, in] and y [M, out] (x3d: [2, M/2, in] and [2, M/2,
 * out]); returns their number of dims. */
int test_batch_shapes(bool x3d, int64_t M, int64_t in, int64_t out, int64_t* xs,
                      int64_t* ys);

/* Prints the closing line and returns the exit status. */
int test_report(void);

/* max |a - ref| / max(|ref|, 1e-300) over a tensor folded to [rows, cols]
 * (ref dense row-major float64); Inf when a holds NaN (an element never
 * written). 0 when empty. */
double test_rel_err(const test_tensor* a, const double* ref, int64_t rows, int64_t cols);
/* The same against another test tensor of the same shape (any layouts). */
double test_rel_diff(const test_tensor* a, const test_tensor* ref);

/* A CPU context (no stream) with the shared error buffer test_err, emptied;
 * test_workspace gives it at least `bytes` of host workspace (one buffer
 * kept and grown; NULL for 0 bytes). */
extern char test_err[512];
fct_context test_ctx(uint32_t flags);
void test_workspace(fct_context* c, size_t bytes);
void test_free_workspace(void);

/* got == want and the message in test_err names `name`. */
void test_expect_fail(fct_status got, fct_status want, const char* name, const char* what);

#endif
