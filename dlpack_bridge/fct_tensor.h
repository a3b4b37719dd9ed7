/*
 * fct_tensor.h (internal): validation of incoming DLTensors and zero-copy
 * matrix views over them. Shared by every op and both backends, so a check is
 * written once.
 */
#ifndef FCT_TENSOR_H
#define FCT_TENSOR_H

#include <stdarg.h>
#include <stdbool.h>

#include "factorch.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FCT_MAX_DIMS 8
#define FCT_WS_ALIGN 256

typedef enum fct_dtype {
  FCT_F32 = 0,
  FCT_F64 = 1,
  FCT_BF16 = 2,
  FCT_F16 = 3,
  FCT_DTYPE_INVALID = -1
} fct_dtype;

/* A 2-D view [rows, cols] of memory owned by someone else; strides in
 * elements (may be 0 or negative for inputs). */
typedef struct fct_mat {
  char* data;
  int64_t rows, cols;
  int64_t rs, cs;
} fct_mat;

/* Writes a printf-style message into ctx->error (if any) and returns s. */
fct_status fct_fail(fct_context* ctx, fct_status s, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

fct_dtype fct_dtype_of(DLDataType t);
const char* fct_dtype_name(DLDataType t);
size_t fct_dtype_bytes(fct_dtype d);
const char* fct_device_name(int device_type);

/* Element strides of t (compact row-major when t->strides is NULL). */
void fct_strides(const DLTensor* t, int64_t* strides);
/* First element's address. */
char* fct_data(const DLTensor* t);
/* Number of elements; -1 when the product overflows int64. */
int64_t fct_numel(const DLTensor* t);

/* The most bytes a tensor's elements may span (2^62): larger descriptors
 * describe no real memory, and products of their sizes and strides could
 * overflow int64 inside the ops. */
#define FCT_MAX_SPAN_BYTES ((int64_t)1 << 62)

/* t must be non-NULL, have a supported dtype and device, ndim in
 * [min_ndim, FCT_MAX_DIMS], non-negative sizes and a non-NULL data pointer
 * unless empty; when not empty, its elements and the span of its strides
 * must fit FCT_MAX_SPAN_BYTES and data + byte_offset must be aligned to the
 * element size. */
fct_status fct_check_tensor(fct_context* ctx, const char* name,
                            const DLTensor* t, int min_ndim);

/* The memory part of fct_check_tensor, for tensors of other dtypes (the
 * embeddings' indices): n elements of es bytes (n = fct_numel(t), no dim
 * negative) must fit FCT_MAX_SPAN_BYTES with their strides' span, and data +
 * byte_offset must be aligned to es. */
fct_status fct_check_memory(fct_context* ctx, const char* name, const DLTensor* t, int64_t n,
                            int64_t es);

/* t must match ref's dtype and device (ref already checked). */
fct_status fct_check_same(fct_context* ctx, const char* name, const DLTensor* t,
                          const char* ref_name, const DLTensor* ref);

/* Fold [..., k] into [M, k]. Returns false when the leading dims cannot be
 * described by one stride (then the tensor must be packed). Size-1 dims are
 * ignored; strides of the result are normalised so that a dimension of size
 * <= 1 gets the stride BLAS expects. */
bool fct_fold(const DLTensor* t, fct_mat* m);

/* A view that BLAS reads in place: row-major (cs == 1, rs >= cols) or
 * column-major (rs == 1, cs >= rows). */
bool fct_mat_blas_ok(const fct_mat* m);

/* Outputs: dense last dim, leading dims foldable, no two elements sharing
 * memory. */
fct_status fct_check_output(fct_context* ctx, const char* name,
                            const DLTensor* t, fct_mat* m);

/* Byte range [lo, hi) that t's elements touch; lo == hi when empty. */
void fct_byte_range(const DLTensor* t, uintptr_t* lo, uintptr_t* hi);
/* Fails with FCT_ERR_LAYOUT when output `out` shares memory with `other`. */
fct_status fct_check_disjoint(fct_context* ctx, const char* out_name,
                              const DLTensor* out, const char* other_name,
                              const DLTensor* other);

/* Carves `bytes` from a workspace cursor, FCT_WS_ALIGN aligned. */
size_t fct_ws_take(size_t* cursor, size_t bytes);

/* Transposed view [cols, rows]. */
fct_mat fct_mat_t(fct_mat m);

/* a*b with overflow detection (returns false on overflow). */
bool fct_mul_ok(size_t a, size_t b, size_t* out);

#ifdef __cplusplus
}
#endif

#endif /* FCT_TENSOR_H */
