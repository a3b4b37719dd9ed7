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
#include "glue_common.h"

/* The next result, [*indices.shape, dim]; NULL (nothing allocated) when
 * indices has too many dims (the C op then names indices). */
static DLTensor* lookup_result(fct_call* c, const DLTensor* indices, int64_t dim) {
  if (indices->ndim < 0 || indices->ndim > FCT_MAX_DIMS - 1) return NULL;
  int64_t shape[FCT_MAX_DIMS];
  for (int i = 0; i < indices->ndim; ++i) shape[i] = indices->shape[i];
  shape[indices->ndim] = dim;
  return fct_call_result(c, indices->ndim + 1, shape);
}

/* ------------------------------------------------------------------------- */
/* Low-rank                                                                   */
/* ------------------------------------------------------------------------- */

void fct_lowrank_embedding_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* indices, U, V */
  fct_take_tensors(&c, stack, 3, d);
  int64_t pad = fct_slot_int(stack[3]);
  fct_call_start(&c, 1);

  /* y is shaped only when U and V are matrices and embedding_dim fits BLAS;
   * otherwise the query names the bad argument (an expanded V of 2^40
   * columns would fail y's allocation as "out of memory?"). */
  bool sane = d[1].ndim == 2 && d[2].ndim == 2 && d[2].shape[1] <= INT32_MAX;
  DLTensor* y = sane ? lookup_result(&c, &d[0], d[2].shape[1]) : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_embedding_forward, &d[0], &d[1], &d[2], pad,
               y);
}

void fct_lowrank_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                           uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* grad_y, indices, U, V */
  fct_take_tensors(&c, stack, 4, d);
  int64_t pad = fct_slot_int(stack[4]);
  bool need[2]; /* U, V */
  fct_slot_bools(stack + 5, 2, need);
  fct_call_start(&c, 2);

  /* grad_U like U, grad_V like V; an empty [0] tensor for one not asked
   * for, or when U/V are not matrices, or R or embedding_dim is too wide for
   * BLAS: the query then names them (an expanded V of 2^40 columns would
   * fail grad_V's allocation as "out of memory?"). */
  bool sane = d[2].ndim == 2 && d[3].ndim == 2 && d[2].shape[1] <= INT32_MAX &&
              d[3].shape[1] <= INT32_MAX;
  DLTensor* gU = fct_call_grad(&c, need[0] && sane, 2, d[2].shape);
  DLTensor* gV = fct_call_grad(&c, need[1] && sane, 2, d[3].shape);
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_embedding_backward, &d[0], &d[1], &d[2], &d[3],
               pad, gU, gV);
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
  a->num = fct_slot_int(slots[0]);
  fct_take_ints(slots[1], FCT_MAX_MODES, &a->n);
  fct_take_ints(slots[2], FCT_MAX_MODES, &a->m);
  fct_take_ints(slots[3], FCT_MAX_MODES + 1, &a->r);
  a->pad = fct_slot_int(slots[4]);
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
  fct_call c = {0};
  DLTensor d[2]; /* indices, weights */
  fct_take_tensors(&c, stack, 2, d);
  tte_args a;
  take_args(stack + 2, &a);
  fct_call_start(&c, 1);
  fct_carve cv;
  int64_t dim;
  tte_views(&c, &a, &d[1], &cv, &dim);

  DLTensor* y = lookup_result(&c, &d[0], dim);
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tt_embedding_forward, &d[0], a.n.n, cv.in, a.num,
               a.pad, y);
}

void fct_tt_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                      uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* grad_y, indices, weights */
  fct_take_tensors(&c, stack, 3, d);
  tte_args a;
  take_args(stack + 3, &a);
  fct_call_start(&c, 2);
  fct_carve cv, gcv;
  int64_t dim;
  tte_views(&c, &a, &d[2], &cv, &dim);

  /* The flat gradient, like weights, carved the same way. */
  DLTensor* gw = fct_call_result(&c, 1, &cv.total);
  fct_carve_copy(&gcv, &cv);
  if (!fct_carve_bind(&c, &gcv, gw, &d[2], "grad_weights", kWhat))
    fct_call_raise(&c, FCT_ERR_SHAPE);
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tt_embedding_backward, &d[0], &d[1], a.n.n, cv.in,
               a.num, a.pad, fct_out_views(gcv.out));
}
