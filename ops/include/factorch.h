/*
 * factorch.h: the one public C header of factorch's kernels.
 *
 * Every op takes DLPack DLTensors (borrowed views: factorch never frees or keeps
 * them past the call) plus an fct_context carrying the CUDA stream, a workspace
 * supplied by the caller, flags and an error buffer. Kernels never allocate
 * device memory: ask the matching *_workspace function for the size first.
 *
 * Conventions
 *  - All functions return fct_status; FCT_OK is 0. They never abort, print or
 *    longjmp. On failure a message naming the bad argument and what was
 *    expected is written into ctx->error (when given).
 *  - Shapes are written [rows, cols] in row-major (C) terms. "..." means any
 *    number of leading batch dims, folded into M rows.
 *  - Input tensors may have arbitrary strides (negative, zero, gaps); they are
 *    packed into the workspace only where BLAS cannot read them as they are.
 *    Output tensors must be dense in their last dim, have foldable leading dims
 *    and must not overlap any other argument.
 *  - dtypes: float32 and float64 on CPU and CUDA; bfloat16 and float16 on CUDA
 *    (float32 accumulation). All tensors of one call share dtype and device.
 *  - Thread safety: every function is re-entrant; concurrent calls need
 *    distinct workspaces.
 *
 * Versioning: a major bump changes a struct layout or a signature; a minor bump
 * only adds functions, status codes or flags.
 */
#ifndef FACTORCH_H
#define FACTORCH_H

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h> /* DLPack 1.x, from an installed dependency */

#ifdef __cplusplus
extern "C" {
#endif

#define FCT_VERSION_MAJOR 0
#define FCT_VERSION_MINOR 1
#define FCT_VERSION_PATCH 0

#if defined(_WIN32)
#define FCT_API __declspec(dllexport)
#else
#define FCT_API __attribute__((visibility("default")))
#endif

/* Status codes. fct_status_string() gives the generic text of each. */
typedef enum fct_status {
  FCT_OK = 0,
  FCT_ERR_NULL_ARGUMENT = 1,   /* a required pointer was NULL */
  FCT_ERR_DTYPE = 2,           /* unsupported dtype, or dtypes differ */
  FCT_ERR_DEVICE = 3,          /* unsupported device, or devices differ */
  FCT_ERR_NDIM = 4,            /* wrong number of dims */
  FCT_ERR_SHAPE = 5,           /* sizes do not match */
  FCT_ERR_LAYOUT = 6,          /* output strides not dense, or overlapping */
  FCT_ERR_OVERFLOW = 7,        /* a size does not fit the index type */
  FCT_ERR_WORKSPACE = 8,       /* workspace missing or too small */
  FCT_ERR_NOT_FINITE = 9,      /* NaN or Inf met while FCT_FLAG_CHECK_FINITE */
  FCT_ERR_UNSUPPORTED = 10,    /* e.g. a CUDA tensor while CUDA is not loaded */
  FCT_ERR_CUDA = 11,           /* CUDA runtime error */
  FCT_ERR_BLAS = 12,           /* cuBLAS error */
  FCT_ERR_INVALID_VALUE = 13,  /* a scalar argument out of range */
  FCT_STATUS_COUNT_ = 14
} fct_status;

/* Returns a static string; never NULL, also for unknown codes. */
FCT_API const char* fct_status_string(int status);

/* Returns FCT_VERSION_MAJOR << 16 | FCT_VERSION_MINOR << 8 | PATCH of the
 * library actually loaded (compare with the header's). */
FCT_API uint32_t fct_version(void);

/* Flags for fct_context.flags. */
#define FCT_FLAG_CHECK_FINITE 1u /* fail with FCT_ERR_NOT_FINITE when NaN/Inf
                                    appear, naming the inputs that hold them.
                                    Scans only tensors that scale with the
                                    batch (outputs like y and grad_x, and
                                    grad_y), never the weights or their
                                    gradients. On CUDA: one stream sync. */

typedef struct fct_context {
  /* Borrowed cudaStream_t for CUDA tensors (NULL: the legacy default stream).
   * Ignored on CPU. */
  void* stream;
  /* Borrowed scratch memory on the tensors' device, of workspace_bytes bytes,
   * at least 256-byte aligned, valid until the call's work is done on
   * `stream`. May be NULL when the workspace query returned 0. */
  void* workspace;
  size_t workspace_bytes;
  uint32_t flags; /* FCT_FLAG_* */
  /* Borrowed caller buffer receiving a NUL-terminated message on failure, or
   * NULL. Left untouched on success. */
  char* error;
  size_t error_bytes;
} fct_context;

/* ------------------------------------------------------------------------- */
/* Low-rank linear: W ≈ U·V.                                                  */
/*   x [..., in], V [r, in], U [out, r], bias [out] or NULL                   */
/*   t [..., r]  = x · Vᵀ            (hidden activation, kept for backward)   */
/*   y [..., out] = t · Uᵀ + bias                                             */
/* M (the product of the leading dims) == 1 runs GEMV, not GEMM.              */
/* ------------------------------------------------------------------------- */

/* Workspace bytes that fct_lowrank_linear_forward needs for these arguments
 * (same pointers as the call; outputs are only inspected, never written). */
FCT_API fct_status fct_lowrank_linear_forward_workspace(
    const fct_context* ctx, const DLTensor* x, const DLTensor* U,
    const DLTensor* V, const DLTensor* bias /* nullable */,
    const DLTensor* y, const DLTensor* t /* nullable */, size_t* bytes);

/* y = x·Vᵀ·Uᵀ + bias. t (nullable) receives x·Vᵀ; when NULL it lives in the
 * workspace. All pointers borrowed. */
FCT_API fct_status fct_lowrank_linear_forward(
    fct_context* ctx, const DLTensor* x, const DLTensor* U, const DLTensor* V,
    const DLTensor* bias /* nullable */, DLTensor* y,
    DLTensor* t /* nullable */);

/* Workspace bytes for fct_lowrank_linear_backward with these arguments. */
FCT_API fct_status fct_lowrank_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
    const DLTensor* U, const DLTensor* V, const DLTensor* t /* nullable */,
    const DLTensor* grad_x, const DLTensor* grad_U, const DLTensor* grad_V,
    const DLTensor* grad_bias, size_t* bytes);

/* Gradients of y = x·Vᵀ·Uᵀ + b given grad_y [..., out]. Each of grad_x
 * [..., in], grad_U [out, r], grad_V [r, in], grad_bias [out] is computed
 * only when non-NULL, and overwritten (not accumulated). t = x·Vᵀ from the
 * forward (nullable: then recomputed in the workspace when needed). All
 * pointers borrowed. */
FCT_API fct_status fct_lowrank_linear_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
    const DLTensor* U, const DLTensor* V, const DLTensor* t /* nullable */,
    DLTensor* grad_x /* nullable */, DLTensor* grad_U /* nullable */,
    DLTensor* grad_V /* nullable */, DLTensor* grad_bias /* nullable */);

/* ------------------------------------------------------------------------- */
/* Backends                                                                   */
/* ------------------------------------------------------------------------- */

/* 1 when a CUDA backend (libfactorch_cuda) is loaded and registered. */
FCT_API int fct_cuda_available(void);

/* Number of threads the CPU BLAS uses (<= 0 leaves it unchanged); returns the
 * number in force. */
FCT_API int fct_cpu_set_num_threads(int n);

#ifdef __cplusplus
}
#endif

#endif /* FACTORCH_H */
