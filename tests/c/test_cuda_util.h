/* Helpers shared by the CUDA C tests: the device dtypes a test runs in,
 * device mirrors of test tensors (dev_*), the stream, context and device
 * workspace of an op call on the GPU, and the no-GPU skip. */
#ifndef FCT_TEST_CUDA_UTIL_H
#define FCT_TEST_CUDA_UTIL_H

#include <cuda_runtime_api.h>

#include "test_util.h"

/* The dtype on the device. A test tensor on the host holds float32 for
 * K_F32 and K_BF16 and float64 for K_F64, or float64 for every kind (then
 * the upload rounds it to what the device holds). */
typedef enum test_kind { K_F32, K_F64, K_BF16 } test_kind;
extern const char* const test_kind_name[3]; /* "f32", "f64", "bf16" */

/* bfloat16 <-> float by bits (round to nearest even; finite inputs). */
uint16_t test_to_bf16(float f);
float test_from_bf16(uint16_t b);

/* e == cudaSuccess, else a failed CHECK naming `what`. */
bool cuda_ok(cudaError_t e, const char* what);

/* A test tensor mirrored in device memory with the same shape and strides,
 * as `k`. The host tensor is owned (freed by dev_free); its values are first
 * rounded to what `k` holds so that both sides agree. */
typedef struct dev_tensor {
  test_tensor* h;
  DLTensor dl; /* shares h's shape and strides arrays */
  void* d;
  int64_t span; /* elements from the first to one past the last */
  test_kind k;
} dev_tensor;

/* Mirrors h (owned from now on): uploads its values, or for an output fills
 * the device memory with 0xFF bytes (NaN in every float format) so that an
 * element the kernels fail to write shows. */
dev_tensor* dev_new(test_tensor* h, test_kind k, bool output);
void dev_free(dev_tensor* t);
/* Host -> device (after changing h's values), device -> host. */
void dev_upload(dev_tensor* t);
void dev_download(dev_tensor* t);
/* &t->dl, or NULL for a NULL t. */
const DLTensor* dev_dl(const dev_tensor* t);
/* test_rel_err / test_rel_diff of the downloaded device values. */
double dev_rel_err(dev_tensor* t, const double* ref, int64_t rows, int64_t cols);
double dev_rel_diff(dev_tensor* t, const test_tensor* ref);

/* The non-blocking stream every op under test runs on. */
extern cudaStream_t test_stream;
/* 0 when there is a GPU and test_stream was created; else the exit status
 * the test returns at once: 77 (ctest: skipped) without a GPU. */
int test_cuda_begin(void);
/* Frees the device workspace and the stream. */
void test_cuda_end(void);

/* test_ctx on test_stream. */
fct_context test_cuda_ctx(uint32_t flags);
/* At least `bytes` of device workspace (one buffer kept and grown; NULL for
 * 0 bytes), then a device synchronization: uploads ran on the legacy
 * stream, the op runs on test_stream. */
void test_cuda_workspace(fct_context* c, size_t bytes);

#endif
