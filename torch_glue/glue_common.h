/*
 * glue_common.h (internal): what the boxed kernels share, on top of the
 * call (tensor_view.h): decoding stack slots, the query -> workspace -> run
 * -> return sequence, int-list arguments, and the views carved out of a
 * layer's flat parameter.
 *
 * Flat parameters: each factorized layer keeps ONE parameter tensor holding
 * all its factors or cores back to back (row-major each); the schema passes
 * it with the mode sizes and ranks, and the kernel carves zero-copy DLTensor
 * views of the factors out of it (and views of the flat gradient the same
 * way, so the C ops write every factor's gradient in place: no torch.cat, no
 * copies).
 */
#ifndef FCT_GLUE_COMMON_H
#define FCT_GLUE_COMMON_H

#include <string.h>

#include "fct_tensor.h"
#include "kernels.h"
#include "tensor_view.h"

/* ------------------------------------------------------------------------- */
/* Stack slots (the boxed calling convention: kernels.h)                      */
/* ------------------------------------------------------------------------- */

static inline AtenTensorHandle fct_slot_tensor(StableIValue s) {
  return (AtenTensorHandle)(uintptr_t)s;
}
/* A bool sits in the slot's low byte; the other bytes are not cleared. */
static inline bool fct_slot_bool(StableIValue s) {
  return (s & 0xff) != 0;
}
static inline int64_t fct_slot_int(StableIValue s) {
  int64_t v;
  memcpy(&v, &s, sizeof v);
  return v;
}
/* A `float` argument: the bits of a double. */
static inline double fct_slot_double(StableIValue s) {
  double v;
  memcpy(&v, &s, sizeof v);
  return v;
}
/* An int[] or SymInt[] (kernels registered with torch_library_impl). */
static inline StableListHandle fct_slot_list(StableIValue s) {
  return (StableListHandle)(uintptr_t)s;
}
/* n consecutive bool slots (the backward ops' need_* flags). */
static inline void fct_slot_bools(const StableIValue* s, int n, bool* out) {
  for (int i = 0; i < n; ++i) out[i] = fct_slot_bool(s[i]);
}

/* The n tensor inputs at the bottom of the stack: the kernel owns them, so
 * they are recorded in c->owned (as inputs 0 .. n-1) for release; dl[i] is a
 * view of input i. */
void fct_take_tensors(fct_call* c, const StableIValue* stack, int n, DLTensor* dl);

/* An optional tensor argument. The schemas have no optionals (register.c):
 * an absent tensor arrives as an empty one, and the C ops take NULL. */
static inline const DLTensor* fct_nullable(const DLTensor* t) {
  return fct_numel(t) == 0 ? NULL : t;
}

/* ------------------------------------------------------------------------- */
/* Running a C op                                                             */
/* ------------------------------------------------------------------------- */

/*
 * The end of every boxed kernel: asks op##_workspace for its workspace with
 * the op's arguments (the same pointers, as factorch.h requires), allocates
 * it through torch, runs op, then hands the call's num_outputs results to
 * torch through the stack, or raises the first failure (fct_call_return).
 * The arguments are op's after its context.
 */
#define FCT_GLUE_RUN(c, stack, num_outputs, op, ...)                                        \
  do {                                                                                      \
    size_t fct_bytes_ = 0;                                                                  \
    fct_status fct_st_ = op##_workspace(&(c)->ctx, __VA_ARGS__, &fct_bytes_);               \
    if (fct_st_ == FCT_OK && !fct_call_workspace((c), fct_bytes_)) fct_st_ = FCT_ERR_WORKSPACE; \
    if (fct_st_ == FCT_OK) fct_st_ = op(&(c)->ctx, __VA_ARGS__);                            \
    fct_call_return((c), fct_st_, (stack), (int)(num_outputs));                             \
  } while (0)

/* An array of gradient views (or NULL) as an argument of FCT_GLUE_RUN: the
 * query takes it as `const DLTensor* const*`, the op as `DLTensor* const*`,
 * and C converts T* const* to const T* const* only through a cast. The
 * parameter type checks the array; void* converts to both. */
static inline void* fct_out_views(DLTensor* const* views) {
  return (void*)views;
}

/* ------------------------------------------------------------------------- */
/* Int-list arguments (int[] and SymInt[], an owned StableListHandle)         */
/* ------------------------------------------------------------------------- */

#define FCT_GLUE_MAX_VIEWS (2 * FCT_MAX_MODES + 1)

/* An int[] argument. */
typedef struct fct_ints {
  int64_t v[FCT_MAX_MODES + 1];
  int n;        /* entries read (at most the capacity) */
  size_t total; /* entries in the list */
} fct_ints;

/* Reads the list in `slot` and frees it (the kernel owns it). A kernel takes
 * its lists before anything can raise, which would leak them. */
void fct_take_ints(StableIValue slot, int cap, fct_ints* out);
/* The same into v [cap]: *n entries read; returns the list's length. */
size_t fct_take_int_array(StableIValue slot, int cap, int64_t* v, int* n);

/* False (message in c) unless `ints` holds between lo and hi entries, each
 * >= 1. what: the role, e.g. "the input mode sizes". */
bool fct_check_ints(fct_call* c, const char* name, const fct_ints* ints, int lo, int hi,
                    const char* what);

/* ------------------------------------------------------------------------- */
/* Views of a flat parameter                                                  */
/* ------------------------------------------------------------------------- */

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

/* ------------------------------------------------------------------------- */
/* Results                                                                    */
/* ------------------------------------------------------------------------- */

/* The next result, [*lead(x), last], of an op batched over x's leading dims;
 * NULL (nothing allocated) when x has no dims or too many, for the C op then
 * names x. Raises when the allocation fails. */
DLTensor* fct_batched_result(fct_call* c, const DLTensor* x, int64_t last);

/* The results of a flat-parameter backward kernel, in this order: grad_x
 * like x, the flat grad_weights (its views carved into gcv like cv),
 * grad_bias [out]; an empty [0] tensor stands for a gradient not asked for,
 * and for grad_x when x's rank is bad (the C op then names x). Raises on
 * allocation or carving errors. */
typedef struct fct_grads {
  DLTensor* gx; /* for the C op: NULL when not made */
  DLTensor* gb; /* NULL when not asked for */
} fct_grads;

/* need: grad_x, grad_weights, grad_bias asked for. */
void fct_alloc_grads(fct_call* c, const DLTensor* x, const fct_carve* cv, fct_carve* gcv,
                     int64_t out, const bool need[3], const char* what, fct_grads* g);

#endif
