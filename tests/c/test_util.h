/* Helpers shared by the C tests: random tensors with any strides, a float64
 * reference reader, and a tiny check/report harness. */
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
  void* buf; /* owned: freed by tt_free */
} test_tensor;

/* A tensor of `shape` whose memory is laid out with the dims permuted by
 * `order` (NULL: row-major) and `gap` extra elements between innermost rows
 * (so that gap > 0 gives non-foldable strides). Filled with random values in
 * [-1, -0.1] U [0.1, 1] (never zero). bits: 32 or 64. */
test_tensor* tt_new(int bits, int ndim, const int64_t* shape, const int* order, int64_t gap);
/* Dense row-major, filled with NaN so that an element an op fails to write
 * shows (outputs). */
test_tensor* tt_output(int bits, int ndim, const int64_t* shape);
void tt_free(test_tensor* t);
double tt_get(const test_tensor* t, const int64_t* idx);
void tt_set(test_tensor* t, const int64_t* idx, double v);
/* Element of a tensor folded to [rows, cols] (row-major flat index). */
double tt_get2(const test_tensor* t, int64_t row, int64_t col);
int64_t tt_numel(const test_tensor* t);

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
 * result or on running in order would show. tt_pool_calls counts its calls;
 * tt_three_threads reports 3 workers. */
extern int tt_pool_calls;
int32_t tt_reverse_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                        void* arg);
int tt_three_threads(void);

/* Prints the closing line and returns the exit status. */
int test_report(void);

#endif
