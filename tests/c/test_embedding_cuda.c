/*
 * Factorized embeddings (lowrank and TT) on the CUDA backend against the
 * same ops on the CPU (which test_embedding.c checks against float64
 * references): float32, float64 and (loosely) bfloat16; int64 and int32
 * indices, transposed indices, repeats, padding_idx, a 0-d index, an empty
 * batch, a packed V, a large batch of heavy repeats (atomicAdd scatter); on a
 * non-default stream; outputs filled with NaN bytes. Then out-of-range
 * indices, a device mix and the finite check. Exits 77 (ctest: skipped)
 * without a GPU.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_cuda_util.h"

/* Index tensors on the host and mirrored on the device. */
typedef struct idx_pair {
  test_index* h;
  DLTensor d;
  void* dbuf;
} idx_pair;

static idx_pair* idx_new(int bits, int nd, const int64_t* shape, bool transposed,
                         const int64_t* vals) {
  idx_pair* t = calloc(1, sizeof *t);
  t->h = tb_index_new(bits, nd, shape, transposed, vals);
  size_t bytes = ((size_t)t->h->span + 1) * (size_t)bits / 8;
  cuda_ok(cudaMalloc(&t->dbuf, bytes), "cudaMalloc (indices)");
  cuda_ok(cudaMemcpy(t->dbuf, t->h->buf, bytes, cudaMemcpyHostToDevice), "upload (indices)");
  t->d = t->h->dl;
  t->d.data = t->dbuf;
  t->d.device = (DLDevice){kDLCUDA, 0};
  return t;
}

static void idx_free(idx_pair* t) {
  if (!t) return;
  cudaFree(t->dbuf);
  tb_index_free(t->h);
  free(t);
}

/* A host float tensor of `shape` (float32 for bf16), dense. */
static test_tensor* host_like(test_kind k, int nd, const int64_t* shape) {
  return tb_new(k == K_F64 ? 64 : 32, nd, shape, NULL, 0);
}

static double tol_for(test_kind k, int64_t repeats) {
  if (k == K_F64) return 1e-12;
  if (k == K_F32) return 1e-5 * sqrt((double)repeats + 8);
  return 4e-2; /* bfloat16 storage; the scatter adds in bfloat16 */
}

/* Indices in [0, num): repeats every third entry, `pad` at position 1. */
static int64_t* make_vals(int64_t count, int64_t num, int64_t pad) {
  int64_t* v = malloc((size_t)(count + 1) * sizeof(int64_t));
  for (int64_t p = 0; p < count; ++p)
    v[p] = p % 3 == 2 ? v[p - 2] : (p * 7919 + 13) % num;
  if (pad >= 0 && count > 1) v[1] = pad;
  return v;
}

/* ------------------------------------------------------------------------- */
/* Low-rank                                                                   */
/* ------------------------------------------------------------------------- */

typedef struct lr_case {
  const char* name;
  int64_t num, R, dim;
  int nd;
  int64_t ishape[2];
  bool transposed, packed_v;
  int64_t pad;
  int idx_bits;
} lr_case;

static void lowrank_case(test_kind k, const lr_case* L) {
  char label[256];
  snprintf(label, sizeof label, "lowrank %s %s", test_kind_name[k], L->name);
  int64_t us[2] = {L->num, L->R}, vs[2] = {L->R, L->dim};
  int64_t count = 1, ys[3];
  for (int i = 0; i < L->nd; ++i) count *= ys[i] = L->ishape[i];
  ys[L->nd] = L->dim;
  int64_t* vals = make_vals(count, L->num, L->pad);
  idx_pair* I = idx_new(L->idx_bits, L->nd, L->ishape, L->transposed, vals);
  dev_tensor* U = dev_new(host_like(k, 2, us), k, false);
  test_tensor* hv;
  if (L->packed_v) { /* every other column: neither stride is 1, packed on the GPU */
    int64_t wide[2] = {L->R, 2 * L->dim};
    hv = tb_new(k == K_F64 ? 64 : 32, 2, wide, NULL, 0);
    hv->shape[1] = L->dim;
    hv->strides[1] = 2;
  } else {
    hv = host_like(k, 2, vs);
  }
  dev_tensor* V = dev_new(hv, k, false);
  dev_tensor* g = dev_new(host_like(k, L->nd + 1, ys), k, false);
  dev_tensor* y = dev_new(tb_output(k == K_F64 ? 64 : 32, L->nd + 1, ys), k, true);
  dev_tensor* gU = dev_new(tb_output(k == K_F64 ? 64 : 32, 2, us), k, true);
  dev_tensor* gV = dev_new(tb_output(k == K_F64 ? 64 : 32, 2, vs), k, true);
  /* The CPU on the (rounded) host values. */
  test_tensor* ry = tb_output(k == K_F64 ? 64 : 32, L->nd + 1, ys);
  test_tensor* rgU = tb_output(k == K_F64 ? 64 : 32, 2, us);
  test_tensor* rgV = tb_output(k == K_F64 ? 64 : 32, 2, vs);
  size_t bytes = 0;
  fct_context c = test_ctx(0);
  fct_status st = fct_lowrank_embedding_forward_workspace(&c, &I->h->dl, &U->h->dl, &V->h->dl,
                                                          L->pad, &ry->dl, &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK)
    st = fct_lowrank_embedding_forward(&c, &I->h->dl, &U->h->dl, &V->h->dl, L->pad, &ry->dl);
  CHECK(st == FCT_OK, "%s: cpu forward: %s", label, test_err);
  st = fct_lowrank_embedding_backward_workspace(&c, &g->h->dl, &I->h->dl, &U->h->dl, &V->h->dl,
                                                L->pad, &rgU->dl, &rgV->dl, &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK)
    st = fct_lowrank_embedding_backward(&c, &g->h->dl, &I->h->dl, &U->h->dl, &V->h->dl, L->pad,
                                        &rgU->dl, &rgV->dl);
  CHECK(st == FCT_OK, "%s: cpu backward: %s", label, test_err);

  c = test_cuda_ctx(0);
  st = fct_lowrank_embedding_forward_workspace(&c, &I->d, &U->dl, &V->dl, L->pad, &y->dl,
                                               &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_cuda_workspace(&c, bytes);
  st = fct_lowrank_embedding_forward(&c, &I->d, &U->dl, &V->dl, L->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "sync (forward)");
  double e = dev_rel_diff(y, ry), tol = tol_for(k, count);
  CHECK(e <= tol, "%s: y differs by %.3g > %.3g", label, e, tol);

  c = test_cuda_ctx(0);
  st = fct_lowrank_embedding_backward_workspace(&c, &g->dl, &I->d, &U->dl, &V->dl, L->pad,
                                                &gU->dl, &gV->dl, &bytes);
  CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
  test_cuda_workspace(&c, bytes);
  st = fct_lowrank_embedding_backward(&c, &g->dl, &I->d, &U->dl, &V->dl, L->pad, &gU->dl,
                                      &gV->dl);
  CHECK(st == FCT_OK, "%s: backward: %s", label, test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "sync (backward)");
  e = dev_rel_diff(gU, rgU);
  CHECK(e <= tol, "%s: grad_U differs by %.3g > %.3g", label, e, tol);
  e = dev_rel_diff(gV, rgV);
  CHECK(e <= tol, "%s: grad_V differs by %.3g > %.3g", label, e, tol);

  free(vals);
  idx_free(I);
  dev_free(U); dev_free(V); dev_free(g); dev_free(y); dev_free(gU); dev_free(gV);
  tb_free(ry); tb_free(rgU); tb_free(rgV);
}

/* ------------------------------------------------------------------------- */
/* Tensor-Train                                                               */
/* ------------------------------------------------------------------------- */

typedef struct tt_case {
  const char* name;
  int d;
  int64_t n[3], m[3], r[4];
  int64_t num;
  int nd;
  int64_t ishape[2];
  int64_t pad;
  int idx_bits;
} tt_case;

static void tt_case_run(test_kind k, const tt_case* T) {
  char label[256];
  snprintf(label, sizeof label, "tt %s %s", test_kind_name[k], T->name);
  int bits = k == K_F64 ? 64 : 32;
  int64_t dim = 1, count = 1, ys[3];
  for (int j = 0; j < T->d; ++j) dim *= T->m[j];
  for (int i = 0; i < T->nd; ++i) count *= ys[i] = T->ishape[i];
  ys[T->nd] = dim;
  int64_t* vals = make_vals(count, T->num, T->pad);
  idx_pair* I = idx_new(T->idx_bits, T->nd, T->ishape, false, vals);
  dev_tensor *G[3], *gG[3];
  test_tensor* rgG[3];
  const DLTensor *hc[3], *dc[3];
  DLTensor *hg[3], *dg[3];
  for (int j = 0; j < T->d; ++j) {
    int64_t sh[4] = {T->r[j], T->n[j], T->m[j], T->r[j + 1]};
    G[j] = dev_new(host_like(k, 4, sh), k, false);
    gG[j] = dev_new(tb_output(bits, 4, sh), k, true);
    rgG[j] = tb_output(bits, 4, sh);
    hc[j] = &G[j]->h->dl;
    dc[j] = &G[j]->dl;
    hg[j] = &rgG[j]->dl;
    dg[j] = &gG[j]->dl;
  }
  dev_tensor* g = dev_new(host_like(k, T->nd + 1, ys), k, false);
  dev_tensor* y = dev_new(tb_output(bits, T->nd + 1, ys), k, true);
  test_tensor* ry = tb_output(bits, T->nd + 1, ys);

  size_t bytes = 0;
  fct_context c = test_ctx(0);
  fct_status st = fct_tt_embedding_forward_workspace(&c, &I->h->dl, T->d, hc, T->num, T->pad,
                                                     &ry->dl, &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK) st = fct_tt_embedding_forward(&c, &I->h->dl, T->d, hc, T->num, T->pad, &ry->dl);
  CHECK(st == FCT_OK, "%s: cpu forward: %s", label, test_err);
  st = fct_tt_embedding_backward_workspace(&c, &g->h->dl, &I->h->dl, T->d, hc, T->num, T->pad,
                                           (const DLTensor* const*)hg, &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK)
    st = fct_tt_embedding_backward(&c, &g->h->dl, &I->h->dl, T->d, hc, T->num, T->pad, hg);
  CHECK(st == FCT_OK, "%s: cpu backward: %s", label, test_err);

  c = test_cuda_ctx(0);
  st = fct_tt_embedding_forward_workspace(&c, &I->d, T->d, dc, T->num, T->pad, &y->dl, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_cuda_workspace(&c, bytes);
  st = fct_tt_embedding_forward(&c, &I->d, T->d, dc, T->num, T->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "sync (forward)");
  double e = dev_rel_diff(y, ry), tol = tol_for(k, count);
  CHECK(e <= tol, "%s: y differs by %.3g > %.3g", label, e, tol);

  c = test_cuda_ctx(0);
  st = fct_tt_embedding_backward_workspace(&c, &g->dl, &I->d, T->d, dc, T->num, T->pad,
                                           (const DLTensor* const*)dg, &bytes);
  CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
  test_cuda_workspace(&c, bytes);
  st = fct_tt_embedding_backward(&c, &g->dl, &I->d, T->d, dc, T->num, T->pad, dg);
  CHECK(st == FCT_OK, "%s: backward: %s", label, test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "sync (backward)");
  for (int j = 0; j < T->d; ++j) {
    e = dev_rel_diff(gG[j], rgG[j]);
    CHECK(e <= tol, "%s: grad_cores[%d] differs by %.3g > %.3g", label, j, e, tol);
  }

  free(vals);
  idx_free(I);
  for (int j = 0; j < T->d; ++j) {
    dev_free(G[j]); dev_free(gG[j]); tb_free(rgG[j]);
  }
  dev_free(g); dev_free(y); tb_free(ry);
}

static void test_values(void) {
  static const lr_case lr[] = {
      /* name, num, R, dim, nd, ishape, transposed, packed_v, pad, idx_bits */
      {"2-d, padding", 37, 5, 12, 2, {4, 6}, false, false, 3, 64},
      {"int32 transposed", 37, 5, 12, 2, {5, 3}, true, false, -1, 32},
      {"0-d index", 37, 5, 12, 0, {0, 0}, false, false, -1, 64},
      {"empty batch", 37, 5, 12, 2, {0, 4}, false, false, 2, 64},
      {"packed V", 20, 4, 9, 1, {11, 0}, false, true, -1, 64},
      {"big batch, repeats", 50, 8, 32, 1, {3000, 0}, false, false, 7, 64},
  };
  static const tt_case tt[] = {
      /* name, d, n, m, r, num, nd, ishape, pad, idx_bits */
      {"d=3 padded vocabulary", 3, {3, 2, 4}, {2, 3, 2}, {1, 3, 2, 1}, 20, 1, {13, 0}, 7, 64},
      {"d=2 int32 2-d", 2, {5, 4}, {3, 4}, {1, 4, 1, 0}, 17, 2, {3, 4}, -1, 32},
      {"d=1", 1, {6, 0, 0}, {5, 0, 0}, {1, 1, 0, 0}, 6, 1, {9, 0}, 0, 64},
      {"empty batch", 3, {3, 2, 4}, {2, 3, 2}, {1, 3, 2, 1}, 20, 2, {0, 3}, -1, 64},
      {"big batch, repeats", 3, {4, 3, 4}, {4, 4, 4}, {1, 8, 8, 1}, 48, 1, {2048, 0}, 5, 64},
  };
  for (int k = K_F32; k <= K_BF16; ++k) {
    for (size_t i = 0; i < sizeof lr / sizeof lr[0]; ++i) {
      if (k == K_BF16 && lr[i].ishape[0] > 100) continue; /* bf16 atomics: small batches */
      lowrank_case((test_kind)k, &lr[i]);
    }
    for (size_t i = 0; i < sizeof tt / sizeof tt[0]; ++i) {
      if (k == K_BF16 && tt[i].ishape[0] > 100) continue;
      tt_case_run((test_kind)k, &tt[i]);
    }
  }
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */
/* ------------------------------------------------------------------------- */

static void test_errors(void) {
  int64_t us[2] = {10, 3}, vs[2] = {3, 4}, is[2] = {2, 3}, ys[3] = {2, 3, 4};
  dev_tensor* U = dev_new(tb_new(32, 2, us, NULL, 0), K_F32, false);
  dev_tensor* V = dev_new(tb_new(32, 2, vs, NULL, 0), K_F32, false);
  dev_tensor* y = dev_new(tb_output(32, 3, ys), K_F32, true);
  int64_t bad[6] = {0, 1, 2, 3, 12, 4}, neg[6] = {0, -3, 2, 3, 4, 5}, ok[6] = {0, 1, 2, 3, 4, 5};
  idx_pair* Ib = idx_new(64, 2, is, false, bad);
  idx_pair* In = idx_new(32, 2, is, true, neg);
  idx_pair* Io = idx_new(64, 2, is, false, ok);
  fct_context c = test_cuda_ctx(0);
  test_cuda_workspace(&c, 1 << 16);
  fct_status st;

  CHECK(fct_cuda_available(), "libfactorch_cuda registered its backend");
  st = fct_lowrank_embedding_forward(&c, &Ib->d, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "index >= num on cuda");
  CHECK(strstr(test_err, "position 4, is 12") != NULL, "position and value: %s", test_err);
  /* int32, stored column-major: logical (row-major) position 1 holds -3. */
  st = fct_lowrank_embedding_forward(&c, &In->d, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "negative int32 index on cuda");
  CHECK(strstr(test_err, "is -3") != NULL, "negative value reported: %s", test_err);
  st = fct_lowrank_embedding_forward(&c, &Io->h->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DEVICE, "indices", "host indices, device factors");
  st = fct_lowrank_embedding_forward(&c, &Io->d, &U->dl, &V->dl, -1, &y->dl);
  CHECK(st == FCT_OK, "valid indices after failures: %s", test_err);

  /* The finite check on the GPU: NaN in U reaches y and is named. */
  int64_t at[2] = {2, 1};
  tb_set(U->h, at, NAN);
  dev_upload(U);
  test_cuda_workspace(&c, 1 << 16);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_embedding_forward(&c, &Io->d, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "U", "NaN in U on cuda");
  cuda_ok(cudaStreamSynchronize(test_stream), "sync (errors)");

  idx_free(Ib); idx_free(In); idx_free(Io);
  dev_free(U); dev_free(V); dev_free(y);
}

int main(void) {
  int skip = test_cuda_begin();
  if (skip) return skip;
  test_values();
  test_errors();
  test_cuda_end();
  test_free_workspace();
  return test_report();
}
