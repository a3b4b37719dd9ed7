/*
 * backend.h (internal): what the device-independent entry points hand to a
 * backend. The entry points (ops/<op>.c) check arguments, build a plan and lay
 * out the workspace; a backend (ops/cpu, ops/cuda) only computes.
 */
#ifndef FCT_BACKEND_H
#define FCT_BACKEND_H

#include "fct_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Low-rank linear plan. Matrix views are BLAS-readable once the entry point
 * has packed the inputs marked pack_* into the workspace. */
typedef struct fct_lowrank_plan {
  fct_dtype dt;
  int64_t M, in, out, r;
  fct_mat x, U, V; /* [M, in], [out, r], [r, in] */
  fct_mat g;       /* backward: grad_y [M, out] */
  fct_mat t;       /* [M, r]: output/input tensor, or workspace */
  fct_mat y;       /* forward output [M, out] */
  const char* bias; /* [out] with stride bias_stride, or NULL */
  int64_t bias_stride;
  bool t_ready;    /* backward: t holds x·Vᵀ already */
  /* backward outputs, NULL data when not requested */
  fct_mat gx, gU, gV, gt; /* gt [M, r] lives in the workspace */
  char* gb;
  /* scratch for device-side flags (CUDA finite check), in the workspace */
  char* scratch;
} fct_lowrank_plan;

typedef struct fct_backend {
  /* dst (dense row-major, numel elements) = src (any strides). */
  fct_status (*pack)(fct_context* ctx, const DLTensor* src, char* dst);
  fct_status (*lowrank_forward)(fct_context* ctx, const fct_lowrank_plan* p);
  fct_status (*lowrank_backward)(fct_context* ctx, const fct_lowrank_plan* p);
  /* *count = number of NaN/Inf elements of t. scratch: 256 bytes of
   * workspace on t's device (unused on CPU). */
  fct_status (*count_nonfinite)(fct_context* ctx, const DLTensor* t, char* scratch,
                                int64_t* count);
} fct_backend;

extern const fct_backend fct_cpu_backend;

/* Called by libfactorch_cuda when it is loaded; the table must outlive the
 * process (static storage). */
FCT_API void fct_register_cuda_backend(const fct_backend* backend);

/* The backend for t's device, or a failure status with a message in ctx. */
fct_status fct_backend_for(fct_context* ctx, const char* name, const DLTensor* t,
                           const fct_backend** out);

#ifdef __cplusplus
}
#endif

#endif /* FCT_BACKEND_H */
