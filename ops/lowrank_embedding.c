/*
 * Low-rank embedding entry points (factorch.h): the table T = U·V,
 * U [num, R], V [R, dim], looked up at `indices`:
 *   forward:  y[n] = U[i_n] · V
 *   backward: grad_V = Σ_n U[i_n]ᵀ · grad_y[n],  grad_U[i] = Σ_(n: i_n = i) grad_y[n] · Vᵀ
 * Device independent: checks, workspace layout, then backend primitives
 * (backend.h) over chunks of indices: pack the chunk's indices, gather its
 * rows of U (B·R elements, against B·dim for a dense lookup's output) and
 * run one GEMM with V. The backward does the reverse with two GEMMs per
 * chunk and a scatter-add of the [chunk, R] rows into grad_U, so its cost
 * is proportional to the batch plus the zero-fill of grad_U.
 * Kernels: ops/cpu/embedding_cpu.c, ops/cuda/embedding_cuda.cu.
 */
#include <string.h>

#include "embedding_common.h"

typedef struct lre_plan {
  int64_t B, num, R, dim, Mc, pad;
  fct_dtype dt;
  size_t es;
  bool cuda, check;
  bool gU, gV;     /* backward: which gradients */
  fct_mat U;       /* [num, R], any strides: the gather reads it */
  fct_param V;     /* [R, dim], BLAS-readable (packed when not) */
  fct_mat g;       /* grad_y folded to [B, dim] (BLAS-readable after bind) */
  bool pack_g;
  size_t off_g, off_idx, off_rows, off_h, off_scratch, bytes;
} lre_plan;

static const char kDim[] = "embedding_dim: the last dim of V";

/* indices, U, V, padding_idx; fills the sizes. */
static fct_status check_args(fct_context* ctx, const DLTensor* indices, const DLTensor* U,
                             const DLTensor* V, int64_t pad, lre_plan* p) {
  memset(p, 0, sizeof *p);
  FCT_TRY(fct_check_tensor(ctx, "U", U, 2));
  if (U->ndim != 2)
    return fct_fail(ctx, FCT_ERR_NDIM, "U: expected 2 dims [num_embeddings, R], got %d",
                    U->ndim);
  FCT_TRY(fct_check_tensor(ctx, "V", V, 2));
  if (V->ndim != 2)
    return fct_fail(ctx, FCT_ERR_NDIM, "V: expected 2 dims [R, embedding_dim], got %d", V->ndim);
  FCT_TRY(fct_check_same(ctx, "V", V, "U", U));
  p->num = U->shape[0];
  p->R = U->shape[1];
  p->dim = V->shape[1];
  if (V->shape[0] != p->R)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "V: expected [R, embedding_dim] with R = %lld (the last dim of U), got "
                    "[%lld, %lld]",
                    (long long)p->R, (long long)V->shape[0], (long long)V->shape[1]);
  if (!fct_fits_int(p->R) || !fct_fits_int(p->dim))
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "U/V: R = %lld and embedding_dim = %lld must each be < 2^31 for BLAS",
                    (long long)p->R, (long long)p->dim);
  FCT_TRY(fct_check_indices(ctx, indices, U, "U", &p->B));
  FCT_TRY(fct_check_padding_idx(ctx, pad, p->num));
  p->pad = pad;
  p->dt = fct_dtype_of(U->dtype);
  p->es = fct_dtype_bytes(p->dt);
  p->cuda = U->device.device_type == kDLCUDA;
  p->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  int64_t st[2];
  fct_strides(U, st);
  p->U = (fct_mat){fct_data(U), p->num, p->R, st[0], st[1]};
  return FCT_OK;
}

/* Chunk rows hold their packed indices, then `mats` [Mc, R] matrices. */
static fct_status lay_out(fct_context* ctx, lre_plan* p, int mats) {
  fct_layout L = {0};
  int64_t r1 = p->R > 0 ? p->R : 1;
  p->Mc = fct_embedding_chunk(ctx, p->cuda, p->B, 8 + (size_t)mats * (size_t)r1 * p->es);
  fct_param_lay_out(&p->V, &L, p->es);
  if (p->pack_g) p->off_g = fct_layout_take(&L, p->B * p->dim, p->es);
  p->off_idx = fct_layout_take(&L, p->Mc, 8);
  p->off_rows = fct_layout_take(&L, mats >= 1 ? p->Mc * p->R : 0, p->es);
  p->off_h = fct_layout_take(&L, mats >= 2 ? p->Mc * p->R : 0, p->es);
  p->off_scratch = fct_layout_take(&L, 256, 1); /* index validation, finite checks */
  return fct_layout_done(ctx, &L, &p->bytes);
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* indices, const DLTensor* U,
                               const DLTensor* V, int64_t pad, const DLTensor* y, lre_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_args(ctx, indices, U, V, pad, p));
  FCT_TRY(fct_check_lookup_rows(ctx, "y", y, indices, p->dim, kDim, U, "U"));
  fct_mat m;
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, p->B, p->dim, &m));
  fct_args a = {.n = 0};
  fct_args_add(&a, "indices", indices);
  fct_args_add(&a, "U", U);
  fct_args_add(&a, "V", V);
  fct_args_add(&a, "y", y);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, 3));
  fct_param_init(&p->V, V, p->R, p->dim, false);
  return lay_out(ctx, p, 1);
}

fct_status fct_lowrank_embedding_forward_workspace(const fct_context* ctx,
                                                   const DLTensor* indices, const DLTensor* U,
                                                   const DLTensor* V, int64_t padding_idx,
                                                   const DLTensor* y, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  lre_plan p;
  FCT_TRY(forward_plan(&c, indices, U, V, padding_idx, y, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_embedding_forward(fct_context* ctx, const DLTensor* indices,
                                         const DLTensor* U, const DLTensor* V,
                                         int64_t padding_idx, DLTensor* y) {
  lre_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, indices, U, V, padding_idx, y, &p));
  FCT_TRY(fct_exec_begin(ctx, "U", U, &e));
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (p.B == 0) return FCT_OK;
  char* scratch = fct_ws_at(&e, p.off_scratch);
  FCT_TRY(fct_validate_indices(&e, indices, p.B, p.num, "num_embeddings: the first dim of U",
                           scratch));
  if (p.dim == 0) return FCT_OK;
  FCT_TRY(fct_param_bind(&e, &p.V));
  int64_t* idx = (int64_t*)fct_ws_at(&e, p.off_idx);
  char* rows = fct_ws_at(&e, p.off_rows);
  char* y0 = fct_data(y);
  for (int64_t c0 = 0; c0 < p.B; c0 += p.Mc) {
    int64_t n = p.B - c0 < p.Mc ? p.B - c0 : p.Mc;
    FCT_TRY(e.be->embedding_indices(ctx, indices, c0, n, p.num, p.pad, idx, scratch, NULL, NULL,
                                NULL));
    FCT_TRY(e.be->embedding_gather(ctx, e.device, e.dt, &p.U, idx, n, rows)); /* G [n, R] */
    fct_mat G = fct_dense(rows, n, p.R);
    fct_mat Y = fct_dense(y0 + c0 * p.dim * (int64_t)p.es, n, p.dim);
    FCT_TRY(fct_x_gemm(&e, &G, &p.V.m, &Y, 0.0)); /* y [n, dim] = G · V; padding rows: 0 */
  }
  if (p.check) {
    const char* names[] = {"U", "V"};
    const DLTensor* ins[] = {U, V};
    FCT_TRY(fct_check_finite(ctx, e.be, scratch, "y", y, names, ins, 2));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status check_grad(fct_context* ctx, const char* name, const DLTensor* g,
                             const DLTensor* like, const char* like_name) {
  FCT_TRY(fct_check_tensor(ctx, name, g, 2));
  FCT_TRY(fct_check_same(ctx, name, g, like_name, like));
  if (g->ndim != 2 || g->shape[0] != like->shape[0] || g->shape[1] != like->shape[1])
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected the shape of %s [%lld, %lld]", name,
                    like_name, (long long)like->shape[0], (long long)like->shape[1]);
  fct_mat m;
  return fct_check_contiguous_output(ctx, name, g, g->shape[0], g->shape[1], &m);
}

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* indices,
                                const DLTensor* U, const DLTensor* V, int64_t pad,
                                const DLTensor* gU, const DLTensor* gV, lre_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_args(ctx, indices, U, V, pad, p));
  FCT_TRY(fct_check_lookup_rows(ctx, "grad_y", g, indices, p->dim, kDim, U, "U"));
  if (gU) FCT_TRY(check_grad(ctx, "grad_U", gU, U, "U"));
  if (gV) FCT_TRY(check_grad(ctx, "grad_V", gV, V, "V"));
  fct_args a = {.n = 0};
  fct_args_add(&a, "grad_y", g);
  fct_args_add(&a, "indices", indices);
  fct_args_add(&a, "U", U);
  fct_args_add(&a, "V", V);
  fct_args_add(&a, "grad_U", gU);
  fct_args_add(&a, "grad_V", gV);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, 4));
  p->gU = gU != NULL;
  p->gV = gV != NULL;
  /* GEMMs run only when the batch and both factor widths are non-empty;
   * otherwise the gradients are zero-filled (or empty). */
  bool gemms = (p->gU || p->gV) && p->B > 0 && p->R > 0 && p->dim > 0;
  if (gemms) p->pack_g = fct_input_needs_pack(g, &p->g);
  fct_param_init(&p->V, V, p->R, p->dim, false);
  p->V.pack = p->V.pack && gemms && p->gU; /* only grad_U reads V */
  int mats = gemms ? (p->gV ? 1 : 0) + (p->gU ? 1 : 0) : 0;
  return lay_out(ctx, p, mats);
}

fct_status fct_lowrank_embedding_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* indices, const DLTensor* U,
    const DLTensor* V, int64_t padding_idx, const DLTensor* grad_U, const DLTensor* grad_V,
    size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  lre_plan p;
  FCT_TRY(backward_plan(&c, grad_y, indices, U, V, padding_idx, grad_U, grad_V, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_embedding_backward(fct_context* ctx, const DLTensor* grad_y,
                                          const DLTensor* indices, const DLTensor* U,
                                          const DLTensor* V, int64_t padding_idx,
                                          DLTensor* grad_U, DLTensor* grad_V) {
  lre_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, indices, U, V, padding_idx, grad_U, grad_V, &p));
  FCT_TRY(fct_exec_begin(ctx, "U", U, &e));
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (!p.gU && !p.gV) return FCT_OK;
  char* scratch = fct_ws_at(&e, p.off_scratch);
  /* The backward op may be called on its own: the indices are validated
   * again before any scatter writes through them. */
  FCT_TRY(fct_validate_indices(&e, indices, p.B, p.num, "num_embeddings: the first dim of U",
                           scratch));
  fct_mat gUm = fct_dense(p.gU ? fct_data(grad_U) : NULL, p.num, p.R);
  fct_mat gVm = fct_dense(p.gV ? fct_data(grad_V) : NULL, p.R, p.dim);
  /* (Empty gradients are left alone: their data may be NULL.) */
  if (p.gU && p.num > 0 && p.R > 0) FCT_TRY(e.be->zero(ctx, e.device, e.dt, &gUm));
  bool gemms = p.B > 0 && p.R > 0 && p.dim > 0;
  if (!gemms) {
    if (p.gV && p.R > 0 && p.dim > 0) FCT_TRY(e.be->zero(ctx, e.device, e.dt, &gVm));
    return FCT_OK;
  }
  if (p.gU) FCT_TRY(fct_param_bind(&e, &p.V));
  if (p.pack_g) {
    FCT_TRY(e.be->pack(ctx, grad_y, fct_ws_at(&e, p.off_g)));
    p.g = fct_ws_mat(&e, p.off_g, p.B, p.dim);
  }
  int64_t* idx = (int64_t*)fct_ws_at(&e, p.off_idx);
  char* rows = fct_ws_at(&e, p.off_rows);
  char* h = p.gV ? fct_ws_at(&e, p.off_h) : rows; /* the second matrix, or the only one */
  fct_mat Vt = fct_mat_t(p.V.m);
  for (int64_t c0 = 0; c0 < p.B; c0 += p.Mc) {
    int64_t n = p.B - c0 < p.Mc ? p.B - c0 : p.Mc;
    fct_mat gc = p.g; /* grad_y rows [c0, c0 + n): any BLAS-readable view */
    gc.data += c0 * p.g.rs * (int64_t)p.es;
    gc.rows = n;
    if (n <= 1) gc.rs = gc.cs == 1 ? (p.dim > 0 ? p.dim : 1) : 1; /* fct_fold's rule */
    FCT_TRY(e.be->embedding_indices(ctx, indices, c0, n, p.num, p.pad, idx, scratch, NULL, NULL,
                                NULL));
    if (p.gV) { /* grad_V [R, dim] (+)= G [n, R]ᵀ · grad_y [n, dim]; padding rows of G are 0 */
      FCT_TRY(e.be->embedding_gather(ctx, e.device, e.dt, &p.U, idx, n, rows));
      fct_mat Gt = fct_mat_t(fct_dense(rows, n, p.R));
      FCT_TRY(fct_x_gemm(&e, &Gt, &gc, &gVm, c0 > 0 ? 1.0 : 0.0));
    }
    if (p.gU) { /* H [n, R] = grad_y · Vᵀ, then grad_U[i_n] += H[n] (padding skipped) */
      fct_mat H = fct_dense(h, n, p.R);
      FCT_TRY(fct_x_gemm(&e, &gc, &Vt, &H, 0.0));
      FCT_TRY(e.be->embedding_scatter_add(ctx, e.device, e.dt, n, idx, 1, h, p.R, 1, p.num, p.R,
                                      gUm.data));
    }
  }
  if (p.check) FCT_TRY(fct_check_finite_grad(ctx, e.be, scratch, grad_y, "lowrank_embedding"));
  return FCT_OK;
}
