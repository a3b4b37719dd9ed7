/*
 * Boxed torch kernels of the factorized embeddings (schemas in register.c):
 *   factorch::lowrank_embedding(indices, U, V, padding_idx) -> y
 *   factorch::lowrank_embedding_backward(grad_y, indices, U, V, padding_idx,
 *                                        need_U, need_V) -> (grad_U, grad_V)
 *   factorch::tt_embedding(indices, weights, num_embeddings, modes, dims,
 *                          ranks, padding_idx) -> y
 *   factorch::tt_embedding_backward(grad_y, indices, weights, num_embeddings,
 *                                   modes, dims, ranks, padding_idx) -> grad_weights
 * padding_idx is -1 for none. The TT weights are the layer's flat parameter,
 * the cores G_k [r_k, n_k, m_k, r_(k+1)] row-major, back to back (the
 * tensorized linear layers' layout, glue_common.h); the TT ops take int
 * lists and are registered with torch_library_impl. The C ops:
 * ops/lowrank_embedding.c, ops/tt_embedding.c.
 */
#include <string.h>

#include "glue_common.h"

static int64_t take_int(StableIValue slot) {
  int64_t v;
  memcpy(&v, &slot, sizeof v);
  return v;
}

/* [*indices.shape, dim], or false when indices has too many dims (the C op
 * then names indices). */
static bool lookup_shape(const DLTensor* indices, int64_t dim, int64_t* shape, int* ndim) {
  if (indices->ndim < 0 || indices->ndim > FCT_MAX_DIMS - 1) return false;
  for (int i = 0; i < indices->ndim; ++i) shape[i] = indices->shape[i];
  shape[indices->ndim] = dim;
  *ndim = indices->ndim + 1;
  return true;
}

/* ------------------------------------------------------------------------- */
/* Low-rank                                                                   */
/* ------------------------------------------------------------------------- */

void fct_lowrank_embedding_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* indices, U, V */
  fct_take_tensors(&c, stack, 3, in, d);
  int64_t pad = take_int(stack[3]);
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);

  AtenTensorHandle res[1] = {NULL};
  DLTensor dy;
  int64_t shape[FCT_MAX_DIMS];
  int nd = 0;
  /* y is shaped only when U and V are matrices and embedding_dim fits BLAS;
   * otherwise the query below names the bad argument (an expanded V of 2^40
   * columns failed y's allocation as "out of memory?" before). */
  bool sane = d[1].ndim == 2 && d[2].ndim == 2 && d[2].shape[1] <= INT32_MAX &&
              lookup_shape(&d[0], d[2].shape[1], shape, &nd);
  if (sane) {
    int32_t dtype;
    aoti_torch_get_dtype(in[1], &dtype);
    res[0] = fct_call_empty(&c, dtype, nd, shape);
    if (!res[0]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(res[0], &dy);
  }
  size_t bytes = 0;
  fct_status st = fct_lowrank_embedding_forward_workspace(&c.ctx, &d[0], &d[1], &d[2], pad,
                                                          sane ? &dy : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK) st = fct_lowrank_embedding_forward(&c.ctx, &d[0], &d[1], &d[2], pad, &dy);
  fct_call_end(&c, st, res, 1);
  stack[0] = (StableIValue)(uintptr_t)res[0];
}

void fct_lowrank_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                           uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[4];
  DLTensor d[4]; /* grad_y, indices, U, V */
  fct_take_tensors(&c, stack, 4, in, d);
  int64_t pad = take_int(stack[4]);
  bool need[2] = {(stack[5] & 0xff) != 0, (stack[6] & 0xff) != 0};
  if (!fct_call_begin(&c, in[2])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);

  /* grad_U like U, grad_V like V; an empty [0] tensor for one not asked
   * for (or when U/V are not matrices, or R or embedding_dim is too wide for
   * BLAS: the query then names them; an expanded V of 2^40 columns failed
   * grad_V's allocation as "out of memory?" before). */
  int32_t dtype;
  aoti_torch_get_dtype(in[2], &dtype);
  bool sane = d[2].ndim == 2 && d[3].ndim == 2 && d[2].shape[1] <= INT32_MAX &&
              d[3].shape[1] <= INT32_MAX;
  const DLTensor* like[2] = {&d[2], &d[3]};
  AtenTensorHandle res[2];
  DLTensor dg[2];
  DLTensor* pg[2] = {NULL, NULL};
  for (int i = 0; i < 2; ++i) {
    bool make = need[i] && sane;
    res[i] = make ? fct_call_empty(&c, dtype, 2, like[i]->shape) : fct_call_none(&c, dtype);
    if (!res[i]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    if (make) {
      fct_torch_view(res[i], &dg[i]);
      pg[i] = &dg[i];
    }
  }
  size_t bytes = 0;
  fct_status st = fct_lowrank_embedding_backward_workspace(&c.ctx, &d[0], &d[1], &d[2], &d[3],
                                                           pad, pg[0], pg[1], &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_lowrank_embedding_backward(&c.ctx, &d[0], &d[1], &d[2], &d[3], pad, pg[0], pg[1]);
  fct_call_end(&c, st, res, 2);
  for (int i = 0; i < 2; ++i) stack[i] = (StableIValue)(uintptr_t)res[i];
}

/* ------------------------------------------------------------------------- */
/* Tensor-Train                                                               */
/* ------------------------------------------------------------------------- */

static const char kWhat[] = "the TT cores [r_k, n_k, m_k, r_(k+1)] one after the other";

typedef struct tte_args {
  int64_t num, pad;
  fct_ints n, m, r;
} tte_args;

/* num_embeddings, modes, dims, ranks, padding_idx from their slots; the
 * lists are freed here, before anything can raise. */
static void take_args(const StableIValue* slots, tte_args* a) {
  a->num = take_int(slots[0]);
  fct_take_ints(slots[1], FCT_MAX_MODES, &a->n);
  fct_take_ints(slots[2], FCT_MAX_MODES, &a->m);
  fct_take_ints(slots[3], FCT_MAX_MODES + 1, &a->r);
  a->pad = take_int(slots[4]);
}

/* Carves the core views out of `flat`; *dim = ∏ m_k. Raises on bad lists. */
static void tte_views(fct_call* c, const tte_args* a, const DLTensor* flat, fct_carve* cv,
                      int64_t* dim) {
  fct_tt_lists l = {"modes", "vocabulary mode sizes", "dims",
                    "embedding mode sizes (as many as modes)", &a->n, &a->m, &a->r};
  /* The flat parameter is its own reference for dtype and device. */
  fct_tt_carve(c, &l, flat, flat, kWhat, cv, dim);
}

void fct_tt_embedding_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[2];
  DLTensor d[2]; /* indices, weights */
  fct_take_tensors(&c, stack, 2, in, d);
  tte_args a;
  take_args(stack + 2, &a);
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  int64_t dim;
  tte_views(&c, &a, &d[1], &cv, &dim);

  AtenTensorHandle res[1] = {NULL};
  DLTensor dy;
  int64_t shape[FCT_MAX_DIMS];
  int nd = 0;
  bool sane = lookup_shape(&d[0], dim, shape, &nd);
  if (sane) {
    int32_t dtype;
    aoti_torch_get_dtype(in[1], &dtype);
    res[0] = fct_call_empty(&c, dtype, nd, shape);
    if (!res[0]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(res[0], &dy);
  }
  size_t bytes = 0;
  fct_status st = fct_tt_embedding_forward_workspace(&c.ctx, &d[0], a.n.n, cv.in, a.num, a.pad,
                                                     sane ? &dy : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_tt_embedding_forward(&c.ctx, &d[0], a.n.n, cv.in, a.num, a.pad, &dy);
  fct_call_end(&c, st, res, 1);
  stack[0] = (StableIValue)(uintptr_t)res[0];
}

void fct_tt_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                      uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* grad_y, indices, weights */
  fct_take_tensors(&c, stack, 3, in, d);
  tte_args a;
  take_args(stack + 3, &a);
  if (!fct_call_begin(&c, in[2])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  int64_t dim;
  tte_views(&c, &a, &d[2], &cv, &dim);

  /* The flat gradient, like weights, carved the same way. */
  int32_t dtype;
  aoti_torch_get_dtype(in[2], &dtype);
  AtenTensorHandle res[1];
  res[0] = fct_call_empty(&c, dtype, 1, &cv.total);
  if (!res[0]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
  DLTensor dgw;
  fct_torch_view(res[0], &dgw);
  fct_carve_copy(&gcv, &cv);
  if (!fct_carve_bind(&c, &gcv, &dgw, &d[2], "grad_weights", kWhat))
    fct_call_end(&c, FCT_ERR_SHAPE, NULL, 0);
  size_t bytes = 0;
  fct_status st = fct_tt_embedding_backward_workspace(&c.ctx, &d[0], &d[1], a.n.n, cv.in, a.num,
                                                      a.pad, gcv.in, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_tt_embedding_backward(&c.ctx, &d[0], &d[1], a.n.n, cv.in, a.num, a.pad, gcv.out);
  fct_call_end(&c, st, res, 1);
  stack[0] = (StableIValue)(uintptr_t)res[0];
}
