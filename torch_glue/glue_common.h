/*
 * glue_common.h (internal): what the boxed kernels share. Each factorized
 * layer keeps ONE flat parameter tensor holding all its factors or cores
 * back to back (row-major each); the schema passes it with the mode sizes
 * and ranks as int lists, and the kernel carves zero-copy DLTensor views of
 * the factors out of it (and views of the flat gradient the same way, so the
 * C ops write every factor's gradient in place: no torch.cat, no copies).
 */
#ifndef FCT_GLUE_COMMON_H
#define FCT_GLUE_COMMON_H

#include "fct_tensor.h"
#include "kernels.h"
#include "tensor_view.h"

/* ------------------------------------------------------------------------- */
/* Shared helpers (glue_common.c)                                             */
/* ------------------------------------------------------------------------- */

#define FCT_GLUE_MAX_VIEWS (2 * FCT_MAX_MODES + 1)

/* An int[] argument. */
typedef struct fct_ints {
  int64_t v[FCT_MAX_MODES + 1];
  int n;        /* entries read (at most the capacity) */
  size_t total; /* entries in the list */
} fct_ints;

/* Reads the list in `slot` and frees it (the kernel owns it). */
void fct_take_ints(StableIValue slot, int cap, fct_ints* out);
/* The same into v [cap]: *n entries read; returns the list's length. */
size_t fct_take_int_array(StableIValue slot, int cap, int64_t* v, int* n);

/* `n` tensor inputs from the stack: owned handles recorded in c, views. */
void fct_take_tensors(fct_call* c, const StableIValue* stack, int n, AtenTensorHandle* h,
                      DLTensor* dl);

/* False (message in c) unless `ints` holds between lo and hi entries, each
 * >= 1. what: the role, e.g. "the input mode sizes". */
bool fct_check_ints(fct_call* c, const char* name, const fct_ints* ints, int lo, int hi,
                    const char* what);

/* Views carved, in order, out of a flat tensor. */
typedef struct fct_carve {
  DLTensor t[FCT_GLUE_MAX_VIEWS];
  int64_t shape[FCT_GLUE_MAX_VIEWS][4];
  const DLTensor* in[FCT_GLUE_MAX_VIEWS]; /* &t[i], for the C API's arrays */
  DLTensor* out[FCT_GLUE_MAX_VIEWS];
  int n;
  int64_t total; /* elements; -1 after an overflow */
} fct_carve;

void fct_carve_init(fct_carve* cv);
void fct_carve_add(fct_carve* cv, int ndim, const int64_t* shape);
/* dst = the same views as src (not yet bound). */
void fct_carve_copy(fct_carve* dst, const fct_carve* src);

/* Points the views into `flat`, which must be a 1-D contiguous tensor of
 * cv->total elements with x's dtype and device; false with a message in c
 * naming `name` otherwise (`what` says which parameters it should hold). */
bool fct_carve_bind(fct_call* c, fct_carve* cv, const DLTensor* flat, const DLTensor* x,
                    const char* name, const char* what);

/* TT cores [r_k, a_k, b_k, r_(k+1)] (k < d) carved out of `flat`, after
 * checking the lists: a (d mode sizes), b (as many), r (d + 1 ranks, the
 * ends 1); names and roles for the messages. *prod_b = ∏ b_k. ref gives the
 * dtype and device `flat` must have. Raises on bad lists (does not return). */
typedef struct fct_tt_lists {
  const char *a_name, *a_what, *b_name, *b_what;
  const fct_ints *a, *b, *r;
} fct_tt_lists;
void fct_tt_carve(fct_call* c, const fct_tt_lists* l, const DLTensor* flat, const DLTensor* ref,
                  const char* what, fct_carve* cv, int64_t* prod_b);

/* Writes the message into c and raises it (does not return). */
void fct_glue_fail(fct_call* c, fct_status st, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Shape [*lead(x), last] of a batched output, or false when x's rank is
 * out of range (then the C op names x). */
bool fct_batched_shape(const DLTensor* x, int64_t last, int64_t* shape, int* ndim);

/* An empty [0] tensor of x's dtype (a gradient not asked for). */
AtenTensorHandle fct_call_none(fct_call* c, int32_t dtype);

/* The gradients a tensorized backward kernel returns, allocated through
 * torch: grad_x like x, the flat grad_weights (its factor views carved into
 * gcv like cv), grad_bias [out]; an empty [0] tensor stands for a gradient
 * not asked for. Fails the call (raising into Python) on allocation or
 * carving errors. */
typedef struct fct_grads {
  AtenTensorHandle res[3]; /* grad_x, grad_weights, grad_bias: returned to torch */
  DLTensor dgx, dgw, dgb;
  DLTensor* gx; /* for the C op: NULL when not asked for (or x's rank is bad) */
  DLTensor* gb; /* NULL when not asked for */
} fct_grads;

void fct_alloc_grads(fct_call* c, AtenTensorHandle xh, const DLTensor* x, const fct_carve* cv,
                     fct_carve* gcv, int64_t out, bool need_x, bool need_w, bool need_b,
                     const char* what, fct_grads* g);

#endif
