/*
 * Tensor-Train embedding entry points (TT-Rec; factorch.h). The table
 * T [num, dim] is the TT-matrix with cores G_k [r_(k-1), n_k, m_k, r_k]:
 * row i, with digits (i_1..i_d) (i_1 slowest), is
 *   T[i] = G_1[:, i_1, :, :] · G_2[:, i_2, :, :] ··· G_d[:, i_d, :, :]
 * reshaped to dim = ∏ m_k. Device independent: checks, geometry, workspace
 * layout, then backend primitives (backend.h) over chunks of indices.
 *
 * Forward, per index: the state S [D, r] (D = m_1···m_(k-1)) starts as the
 * slice of G_1 and is multiplied left to right by the slices
 * G_k[:, i_k] viewed as [r_(k-1), m_k·r_k]; the last product is the row.
 * That is a chain of products too small for BLAS calls, so the kernels run
 * it directly, one index per task (CPU) or per thread block (CUDA), the
 * states in the workspace.
 *
 * Backward, per index: the chain is rerun keeping the states S_1..S_(d-1),
 * then walked back from grad_y's row: the gradient of slice k is
 * S_kᵀ · gS_(k+1), and gS_k = gS_(k+1) · slice_kᵀ. Each index's slice
 * gradients land in the workspace and are scatter-added into the cores'
 * gradients (only the slices the indices touch; the rest is zero-filled).
 * Repeated indices are not merged: each lookup costs its own chain.
 */
#include <string.h>

#include "embedding_common.h"

typedef struct tte_plan {
  fct_tt_emb_geom g;
  int64_t B, num, N, Mc, pad;
  fct_dtype dt;
  size_t es, acc_es;
  bool cuda, check, pack_g, any_gcore;
  bool gcore[FCT_MAX_MODES];
  fct_param core[FCT_MAX_MODES];
  size_t off_g, off_idx, off_work, off_slices, off_scratch, bytes;
} tte_plan;

static fct_status overflow(fct_context* ctx, const char* what) {
  return fct_fail(ctx, FCT_ERR_OVERFLOW, "cores: %s overflows int64 (sizes too large)", what);
}

/* cores, num_embeddings, indices, padding_idx; fills the geometry (without
 * the cores' addresses, known after binding). */
static fct_status check_args(fct_context* ctx, const DLTensor* indices, int d,
                             const DLTensor* const* cores, int64_t num, int64_t pad,
                             tte_plan* p) {
  memset(p, 0, sizeof *p);
  fct_tt_emb_geom* g = &p->g;
  if (d < 1 || d > FCT_MAX_MODES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "d: expected 1 to %d cores, got %d",
                    FCT_MAX_MODES, d);
  if (!cores)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "cores: expected an array of %d tensors, got NULL",
                    d);
  char nm[48];
  g->d = d;
  g->r[0] = 1;
  for (int k = 0; k < d; ++k) {
    const char* name = fct_item_name(nm, sizeof nm, "cores", k);
    FCT_TRY(fct_check_tensor(ctx, name, cores[k], 4));
    if (cores[k]->ndim != 4)
      return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected 4 dims [r_(k-1), n_k, m_k, r_k], got %d",
                      name, cores[k]->ndim);
    if (k > 0) FCT_TRY(fct_check_same(ctx, name, cores[k], "cores[0]", cores[0]));
    FCT_TRY(fct_check_tt_core(ctx, name, cores[k], k, g->r[k], "[r_(k-1), n_k, m_k, r_k]"));
    const int64_t* sh = cores[k]->shape;
    g->n[k] = sh[1];
    g->m[k] = sh[2];
    g->r[k + 1] = sh[3];
  }
  FCT_TRY(fct_check_tt_last(ctx, d, g->r[d]));
  /* Sizes: the padded vocabulary N, the digits' divisors, D_k, the states
   * and the slices, every product checked. */
  p->N = 1;
  for (int k = d - 1; k >= 0; --k) {
    g->div[k] = p->N;
    if (__builtin_mul_overflow(p->N, g->n[k], &p->N)) return overflow(ctx, "the vocabulary ∏ n_k");
  }
  g->D[0] = 1;
  g->max_state = 1;
  for (int k = 0; k < d; ++k) {
    int64_t st, sl, c;
    if (__builtin_mul_overflow(g->D[k], g->m[k], &g->D[k + 1]))
      return overflow(ctx, "embedding_dim ∏ m_k");
    if (__builtin_mul_overflow(g->m[k], g->r[k + 1], &c) ||
        __builtin_mul_overflow(g->r[k], c, &sl) ||
        __builtin_add_overflow(g->slices, sl, &g->slices))
      return overflow(ctx, "a core's slice");
    g->slice_off[k] = g->slices - sl;
    if (k == 0) continue;
    if (__builtin_mul_overflow(g->D[k], g->r[k], &st)) return overflow(ctx, "a chain state");
    g->state_off[k] = g->states;
    if (__builtin_add_overflow(g->states, st, &g->states)) return overflow(ctx, "the states");
    if (st > g->max_state) g->max_state = st;
    g->flops += 2.0 * (double)st * (double)c;
  }
  g->dim = g->D[d];
  g->gbuf = g->dim > g->max_state ? g->dim : g->max_state;
  if (__builtin_mul_overflow(g->max_state, 2, &g->fwd_work) ||
      __builtin_mul_overflow(g->gbuf, 2, &g->bwd_work) ||
      __builtin_add_overflow(g->bwd_work, g->states, &g->bwd_work))
    return overflow(ctx, "the workspace per index");
  if (num < 0 || num > p->N)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "num_embeddings: expected 0 to %lld (the product of the cores' n_k), got %lld",
                    (long long)p->N, (long long)num);
  p->num = num;
  FCT_TRY(fct_check_indices(ctx, indices, cores[0], "cores[0]", &p->B));
  FCT_TRY(fct_check_padding_idx(ctx, pad, num));
  p->pad = pad;
  p->dt = fct_dtype_of(cores[0]->dtype);
  p->es = fct_dtype_bytes(p->dt);
  p->acc_es = p->dt == FCT_F64 ? 8 : 4; /* the kernels' states: float, or double */
  p->cuda = cores[0]->device.device_type == kDLCUDA;
  p->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  for (int k = 0; k < d; ++k)
    fct_param_init(&p->core[k], cores[k], g->r[k] * g->n[k], g->m[k] * g->r[k + 1], true);
  return FCT_OK;
}

/* Per chunk index: its packed index, `work` accumulators, `slices` values. */
static fct_status lay_out(fct_context* ctx, tte_plan* p, int64_t work, int64_t slices) {
  size_t per;
  if (!fct_mul_ok((size_t)work, p->acc_es, &per) ||
      __builtin_add_overflow(per, 8 + (size_t)slices * p->es, &per))
    return overflow(ctx, "the workspace per index");
  p->Mc = fct_embedding_chunk(ctx, p->cuda, p->B, per);
  fct_layout L = {0};
  for (int k = 0; k < p->g.d; ++k) fct_param_lay_out(&p->core[k], &L, p->es);
  if (p->pack_g) p->off_g = fct_layout_take(&L, p->B * p->g.dim, p->es);
  p->off_idx = fct_layout_take(&L, p->Mc, 8);
  p->off_work = fct_layout_take(&L, p->Mc * work, p->acc_es);
  p->off_slices = fct_layout_take(&L, p->Mc * slices, p->es);
  p->off_scratch = fct_layout_take(&L, 256, 1);
  return fct_layout_done(ctx, &L, &p->bytes);
}

static void add_cores(fct_args* a, const char* list, int d, const DLTensor* const* ts) {
  fct_args_add_list(a, list, d, ts);
}

/* Binds (packs) the cores and points the geometry at them. */
static fct_status bind_cores(const fct_exec* e, tte_plan* p) {
  for (int k = 0; k < p->g.d; ++k) {
    FCT_TRY(fct_param_bind(e, &p->core[k]));
    p->g.core[k] = p->core[k].m.data;
  }
  return FCT_OK;
}

static const char kNum[] = "num_embeddings";

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* indices, int d,
                               const DLTensor* const* cores, int64_t num, int64_t pad,
                               const DLTensor* y, tte_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_args(ctx, indices, d, cores, num, pad, p));
  FCT_TRY(fct_check_lookup_rows(ctx, "y", y, indices, p->g.dim,
                            "embedding_dim: the product of the cores' m_k", cores[0],
                            "cores[0]"));
  fct_mat m;
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, p->B, p->g.dim, &m));
  fct_args a = {.n = 0};
  fct_args_add(&a, "indices", indices);
  add_cores(&a, "cores", d, cores);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  return lay_out(ctx, p, p->g.fwd_work, 0);
}

fct_status fct_tt_embedding_forward_workspace(const fct_context* ctx, const DLTensor* indices,
                                              int d, const DLTensor* const* cores,
                                              int64_t num_embeddings, int64_t padding_idx,
                                              const DLTensor* y, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tte_plan p;
  FCT_TRY(forward_plan(&c, indices, d, cores, num_embeddings, padding_idx, y, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_tt_embedding_forward(fct_context* ctx, const DLTensor* indices, int d,
                                    const DLTensor* const* cores, int64_t num_embeddings,
                                    int64_t padding_idx, DLTensor* y) {
  tte_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, indices, d, cores, num_embeddings, padding_idx, y, &p));
  FCT_TRY(fct_exec_begin(ctx, "cores[0]", cores[0], &e));
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (p.B == 0) return FCT_OK;
  char* scratch = fct_ws_at(&e, p.off_scratch);
  FCT_TRY(fct_validate_indices(&e, indices, p.B, p.num, kNum, scratch));
  FCT_TRY(bind_cores(&e, &p));
  int64_t* idx = (int64_t*)fct_ws_at(&e, p.off_idx);
  char* work = fct_ws_at(&e, p.off_work);
  char* y0 = fct_data(y);
  for (int64_t c0 = 0; c0 < p.B; c0 += p.Mc) {
    int64_t n = p.B - c0 < p.Mc ? p.B - c0 : p.Mc;
    FCT_TRY(e.be->embedding_indices(ctx, indices, c0, n, p.num, p.pad, idx, scratch, NULL, NULL,
                                NULL));
    FCT_TRY(e.be->tt_embedding_rows(ctx, e.device, e.dt, &p.g, idx, n,
                                y0 + c0 * p.g.dim * (int64_t)p.es, work));
  }
  if (p.check) {
    fct_args a = {.n = 0};
    add_cores(&a, "cores", d, cores);
    FCT_TRY(fct_check_finite(ctx, e.be, scratch, "y", y, a.names, a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* grad_y,
                                const DLTensor* indices, int d, const DLTensor* const* cores,
                                int64_t num, int64_t pad, const DLTensor* const* gcores,
                                tte_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_args(ctx, indices, d, cores, num, pad, p));
  FCT_TRY(fct_check_lookup_rows(ctx, "grad_y", grad_y, indices, p->g.dim,
                            "embedding_dim: the product of the cores' m_k", cores[0],
                            "cores[0]"));
  char nm[48];
  fct_mat m;
  for (int k = 0; gcores && k < d; ++k) {
    if (!gcores[k]) continue;
    const char* name = fct_item_name(nm, sizeof nm, "grad_cores", k);
    FCT_TRY(fct_check_tensor(ctx, name, gcores[k], 4));
    FCT_TRY(fct_check_same(ctx, name, gcores[k], "cores[0]", cores[0]));
    bool same = gcores[k]->ndim == 4;
    for (int i = 0; same && i < 4; ++i) same = gcores[k]->shape[i] == cores[k]->shape[i];
    if (!same)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "%s: expected the shape of its core [%lld, %lld, %lld, %lld]", name,
                      (long long)cores[k]->shape[0], (long long)cores[k]->shape[1],
                      (long long)cores[k]->shape[2], (long long)cores[k]->shape[3]);
    FCT_TRY(fct_check_contiguous_output(ctx, name, gcores[k], 1, 1, &m));
    p->gcore[k] = p->any_gcore = true;
  }
  fct_args a = {.n = 0};
  fct_args_add(&a, "grad_y", grad_y);
  fct_args_add(&a, "indices", indices);
  add_cores(&a, "cores", d, cores);
  int first_out = a.n;
  add_cores(&a, "grad_cores", d, gcores);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  bool work = p->any_gcore && p->B > 0;
  p->pack_g = work && !fct_is_contiguous(grad_y);
  if (!work)
    for (int k = 0; k < d; ++k) p->core[k].pack = false;
  return lay_out(ctx, p, work ? p->g.bwd_work : 0, work ? p->g.slices : 0);
}

fct_status fct_tt_embedding_backward_workspace(const fct_context* ctx, const DLTensor* grad_y,
                                               const DLTensor* indices, int d,
                                               const DLTensor* const* cores,
                                               int64_t num_embeddings, int64_t padding_idx,
                                               const DLTensor* const* grad_cores,
                                               size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tte_plan p;
  FCT_TRY(backward_plan(&c, grad_y, indices, d, cores, num_embeddings, padding_idx, grad_cores,
                    &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_tt_embedding_backward(fct_context* ctx, const DLTensor* grad_y,
                                     const DLTensor* indices, int d,
                                     const DLTensor* const* cores, int64_t num_embeddings,
                                     int64_t padding_idx, DLTensor* const* grad_cores) {
  tte_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, indices, d, cores, num_embeddings, padding_idx,
                    (const DLTensor* const*)grad_cores, &p));
  FCT_TRY(fct_exec_begin(ctx, "cores[0]", cores[0], &e));
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (!p.any_gcore) return FCT_OK;
  const fct_tt_emb_geom* g = &p.g;
  char* gc[FCT_MAX_MODES];
  for (int k = 0; k < d; ++k) {
    if (!p.gcore[k]) continue;
    gc[k] = fct_data(grad_cores[k]);
    fct_mat z = fct_dense(gc[k], g->r[k] * g->n[k], g->m[k] * g->r[k + 1]);
    FCT_TRY(e.be->zero(ctx, e.device, e.dt, &z));
  }
  if (p.B == 0) return FCT_OK;
  char* scratch = fct_ws_at(&e, p.off_scratch);
  /* Validated again: the backward op may be called on its own, and the
   * scatter writes through the indices. */
  FCT_TRY(fct_validate_indices(&e, indices, p.B, p.num, kNum, scratch));
  FCT_TRY(bind_cores(&e, &p));
  const char* gy = fct_data(grad_y);
  if (p.pack_g) {
    FCT_TRY(e.be->pack(ctx, grad_y, fct_ws_at(&e, p.off_g)));
    gy = fct_ws_at(&e, p.off_g);
  }
  int64_t* idx = (int64_t*)fct_ws_at(&e, p.off_idx);
  char* work = fct_ws_at(&e, p.off_work);
  char* slices = fct_ws_at(&e, p.off_slices);
  for (int64_t c0 = 0; c0 < p.B; c0 += p.Mc) {
    int64_t n = p.B - c0 < p.Mc ? p.B - c0 : p.Mc;
    FCT_TRY(e.be->embedding_indices(ctx, indices, c0, n, p.num, p.pad, idx, scratch, NULL, NULL,
                                NULL));
    FCT_TRY(e.be->tt_embedding_grad(ctx, e.device, e.dt, g, idx, n,
                                gy + c0 * g->dim * (int64_t)p.es, slices, work));
    for (int k = 0; k < d; ++k) {
      if (!p.gcore[k]) continue;
      /* grad G_k[a, i_k, c] += slice_k of index j [a, c], i_k its digit k */
      FCT_TRY(e.be->embedding_scatter_add(ctx, e.device, e.dt, n, idx, g->div[k],
                                      slices + g->slice_off[k] * (int64_t)p.es, g->slices,
                                      g->r[k], g->n[k], g->m[k] * g->r[k + 1], gc[k]));
    }
  }
  if (p.check) FCT_TRY(fct_check_finite_grad(ctx, e.be, scratch, grad_y, "tt_embedding"));
  return FCT_OK;
}
