/* tensor_view.h (internal): one boxed kernel's call into a C op. Torch
 * tensor handles become DLTensor views; the results and the workspace are
 * allocated through torch; every handle the kernel owns is released on every
 * exit path, and failures are raised into Python. */
#ifndef FCT_TENSOR_VIEW_H
#define FCT_TENSOR_VIEW_H

#include "factorch.h"
#include "torch_shim.h"

/* Handles a boxed kernel owns; released together on every exit path. */
#define FCT_MAX_HANDLES 24 /* lora_linear_backward: 9 inputs, 7 outputs, workspace */
/* Results a boxed kernel returns (lora_linear_backward: 7). */
#define FCT_MAX_RESULTS 8

typedef struct fct_handles {
  AtenTensorHandle h[FCT_MAX_HANDLES];
  int n;
} fct_handles;

/* Everything one kernel call needs from torch: the device, its stream, the
 * dtype of its results, the results themselves and the context passed to the
 * C op (error buffer included). Zero-initialise it. */
typedef struct fct_call {
  fct_handles owned; /* the inputs first (fct_take_tensors), then allocations */
  AtenTensorHandle res[FCT_MAX_RESULTS]; /* also in owned until returned */
  DLTensor res_view[FCT_MAX_RESULTS];
  int nres;
  int32_t device_type; /* torch's code */
  int32_t device_index;
  int32_t dtype; /* torch's code, of the input the call started on */
  CUDAGuardHandle guard;
  bool kept_ws; /* the workspace is the thread's kept buffer (tensor_view.c) */
  fct_context ctx;
  char error[512];
} fct_call;

/* A zero-copy DLTensor view of h (shape/strides borrowed from h). */
void fct_torch_view(AtenTensorHandle h, DLTensor* out);

/* Starts the call on the device of c->owned.h[input], one of the kernel's
 * tensor inputs (fct_take_tensors records them first), whose dtype the
 * results get: sets the CUDA device guard and fetches the current stream.
 * Raises on failure. */
void fct_call_start(fct_call* c, int input);

/* The call's next result: a new contiguous tensor of the call's dtype,
 * returned to torch by fct_call_return in the order allocated. Returns its
 * view; raises on failure. */
DLTensor* fct_call_result(fct_call* c, int64_t ndim, const int64_t* sizes);

/* The next result as an empty [0] tensor (a gradient not asked for).
 * Returns NULL: what the C ops take for an output not asked for. */
DLTensor* fct_call_no_result(fct_call* c);

/* fct_call_result when `make`, fct_call_no_result otherwise. */
DLTensor* fct_call_grad(fct_call* c, bool make, int64_t ndim, const int64_t* sizes);

/* Allocates `bytes` of workspace (uint8) and points c->ctx at it (large CPU
 * workspaces: the thread's kept buffer, lent until the call ends). */
bool fct_call_workspace(fct_call* c, size_t bytes);

/* Ends the call. On FCT_OK with `n` results allocated: writes them to
 * stack[0 .. n) and releases every other owned handle. Otherwise releases
 * everything and raises a Python RuntimeError with c->error (or st's
 * generic message when empty). */
void fct_call_return(fct_call* c, fct_status st, StableIValue* stack, int n);

/* Releases everything and raises st with the message already in c->error
 * (or st's generic one): does not return. */
void fct_call_raise(fct_call* c, fct_status st);

/* Writes the message into c and raises it (does not return). */
void fct_call_fail(fct_call* c, fct_status st, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Flags passed to every C op (FCT_FLAG_*), set from Python. */
uint32_t fct_torch_flags(int32_t device_type);

#endif
