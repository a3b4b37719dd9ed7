/* tensor_view.h (internal): torch tensor handles as DLTensor views, and
 * allocations through torch. */
#ifndef FCT_TENSOR_VIEW_H
#define FCT_TENSOR_VIEW_H

#include "factorch.h"
#include "torch_shim.h"

/* Handles a boxed kernel owns; released together on every exit path. */
#define FCT_MAX_HANDLES 24 /* lora_linear_backward: 9 inputs, 7 outputs, workspace */
typedef struct fct_handles {
  AtenTensorHandle h[FCT_MAX_HANDLES];
  int n;
} fct_handles;

/* Everything one kernel call needs from torch: the device, its stream and the
 * context passed to the C op (error buffer included). */
typedef struct fct_call {
  fct_handles owned;
  int32_t device_type; /* torch's code */
  int32_t device_index;
  CUDAGuardHandle guard;
  fct_context ctx;
  char error[512];
} fct_call;

/* A zero-copy DLTensor view of h (shape/strides borrowed from h). */
void fct_torch_view(AtenTensorHandle h, DLTensor* out);

/* Starts a call on the device of `h`: sets the CUDA device guard and fetches
 * the current stream. Returns false with a message on failure. */
bool fct_call_begin(fct_call* c, AtenTensorHandle h);

/* New contiguous tensor of x's dtype on the call's device; recorded in
 * c->owned. NULL on failure (message set). */
AtenTensorHandle fct_call_empty(fct_call* c, int32_t dtype, int64_t ndim, const int64_t* sizes);

/* Allocates `bytes` of workspace (uint8) and points c->ctx at it. */
bool fct_call_workspace(fct_call* c, size_t bytes);

/* Releases every owned handle except those in keep (may be NULL), drops the
 * device guard; on failure raises a Python RuntimeError with c->error. */
void fct_call_end(fct_call* c, fct_status st, const AtenTensorHandle* keep, int nkeep);

/* Flags passed to every C op (FCT_FLAG_*), set from Python. */
uint32_t fct_torch_flags(int32_t device_type);

#endif
