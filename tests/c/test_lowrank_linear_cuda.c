/*
 * lowrank_linear forward and backward on the CUDA backend against a float64
 * CPU reference, on random nonzero inputs: float32, float64 and (loosely)
 * bfloat16; M = 1 (GEMV), an empty batch, k == 0 GEMMs (in = 0, r = 0), a
 * 3-D batch, transposed and strided x (packed on the GPU), a strided bias,
 * with and without bias and saved t; on a non-default stream. Then bad
 * arguments and the finite check. Exits 77 (ctest: skipped) without a GPU.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowrank_reference.h"
#include "test_cuda_util.h"

/* ------------------------------------------------------------------------- */
/* Values                                                                     */
/* ------------------------------------------------------------------------- */

typedef struct layout_case {
  const char* name;
  int x_ndim;
  int x_order[3];   /* memory order of x's dims, outermost first */
  int64_t x_gap;
  int w_transposed; /* U and V stored column-major */
  int step2;        /* x = every other column of a wider tensor, bias stride 2 */
} layout_case;

/* A host tensor [n0, n1] whose last dim keeps every other element. */
static test_tensor* every_other(int bits, int ndim, const int64_t* shape) {
  int64_t wide[3];
  memcpy(wide, shape, sizeof(int64_t) * (size_t)ndim);
  wide[ndim - 1] *= 2;
  test_tensor* t = tb_new(bits, ndim, wide, NULL, 0);
  t->shape[ndim - 1] = shape[ndim - 1];
  t->strides[ndim - 1] = 2;
  return t;
}

static void run_case(test_kind k, int64_t M, int64_t in, int64_t out, int64_t r, bool bias,
                     bool keep_t, const layout_case* L) {
  char label[256];
  snprintf(label, sizeof label, "%s M=%lld in=%lld out=%lld r=%lld bias=%d t=%d %s",
           test_kind_name[k], (long long)M, (long long)in, (long long)out, (long long)r, bias,
           keep_t, L->name);
  int bits = k == K_F64 ? 64 : 32;
  int64_t xs[3], ys[3], ts[3];
  int nd = test_batch_shapes(L->x_ndim == 3, M, in, out, xs, ys);
  test_batch_shapes(L->x_ndim == 3, M, in, r, xs, ts);
  int wt[2] = {1, 0};
  int64_t us[2] = {out, r}, vs[2] = {r, in}, bs[1] = {out};
  const int* xo = L->x_order[0] || L->x_order[1] ? L->x_order : NULL;
  test_tensor* hx = L->step2 ? every_other(bits, nd, xs) : tb_new(bits, nd, xs, xo, L->x_gap);
  dev_tensor* x = dev_new(hx, k, false);
  dev_tensor* U = dev_new(tb_new(bits, 2, us, L->w_transposed ? wt : NULL, 0), k, false);
  dev_tensor* V = dev_new(tb_new(bits, 2, vs, L->w_transposed ? wt : NULL, 0), k, false);
  dev_tensor* b = NULL;
  if (bias)
    b = dev_new(L->step2 ? every_other(bits, 1, bs) : tb_new(bits, 1, bs, NULL, 0), k, false);
  dev_tensor* g = dev_new(tb_new(bits, nd, ys, NULL, 0), k, false);
  dev_tensor* y = dev_new(tb_output(bits, nd, ys), k, true);
  dev_tensor* t = dev_new(tb_output(bits, nd, ts), k, true);
  ref R = reference(x->h, U->h, V->h, b ? b->h : NULL, g->h, M, in, out, r);
  double tol = k == K_F64 ? 1e-12 : k == K_F32 ? 2e-5 * sqrt((double)(in + out + M + 1)) : 3e-2;

  fct_context c = test_cuda_ctx(0);
  size_t bytes = 0;
  fct_status st = fct_lowrank_linear_forward_workspace(&c, &x->dl, &U->dl, &V->dl, dev_dl(b),
                                                       &y->dl, keep_t ? &t->dl : NULL, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_cuda_workspace(&c, bytes);
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, dev_dl(b), &y->dl,
                                  keep_t ? &t->dl : NULL);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "cudaStreamSynchronize (forward)");
  double e = dev_rel_err(y, R.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  if (keep_t) {
    e = dev_rel_err(t, R.t, M, r);
    CHECK(e <= tol, "%s: t error %.3g", label, e);
  }

  /* Backward: all gradients, then only grad_U (needs t), then only grad_x;
   * with the saved t when we have it, else recomputed. */
  for (int variant = 0; variant < 3; ++variant) {
    bool want_x = variant != 1, want_U = variant != 2, want_all = variant == 0;
    dev_tensor* gx = want_x ? dev_new(tb_output(bits, nd, xs), k, true) : NULL;
    dev_tensor* gU = want_U ? dev_new(tb_output(bits, 2, us), k, true) : NULL;
    dev_tensor* gV = want_all ? dev_new(tb_output(bits, 2, vs), k, true) : NULL;
    dev_tensor* gb = want_all ? dev_new(tb_output(bits, 1, bs), k, true) : NULL;
    const DLTensor* tin = keep_t ? &t->dl : NULL;
    c = test_cuda_ctx(0);
    st = fct_lowrank_linear_backward_workspace(&c, &g->dl, &x->dl, &U->dl, &V->dl, tin,
                                               dev_dl(gx), dev_dl(gU), dev_dl(gV),
                                               dev_dl(gb), &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
    test_cuda_workspace(&c, bytes);
    st = fct_lowrank_linear_backward(&c, &g->dl, &x->dl, &U->dl, &V->dl, tin,
                                     gx ? &gx->dl : NULL, gU ? &gU->dl : NULL,
                                     gV ? &gV->dl : NULL, gb ? &gb->dl : NULL);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    cuda_ok(cudaStreamSynchronize(test_stream), "cudaStreamSynchronize (backward)");
    if (gx) {
      e = dev_rel_err(gx, R.gx, M, in);
      CHECK(e <= tol, "%s: grad_x error %.3g (variant %d)", label, e, variant);
    }
    if (gU) {
      e = dev_rel_err(gU, R.gU, out, r);
      CHECK(e <= tol, "%s: grad_U error %.3g (variant %d)", label, e, variant);
    }
    if (gV) {
      e = dev_rel_err(gV, R.gV, r, in);
      CHECK(e <= tol, "%s: grad_V error %.3g", label, e);
    }
    if (gb) {
      e = dev_rel_err(gb, R.gb, 1, out);
      CHECK(e <= tol, "%s: grad_bias error %.3g", label, e);
    }
    dev_free(gx); dev_free(gU); dev_free(gV); dev_free(gb);
  }
  ref_free(&R);
  dev_free(x); dev_free(U); dev_free(V); dev_free(b); dev_free(g); dev_free(y); dev_free(t);
}

static void test_values(void) {
  static const layout_case layouts[] = {
      {"contiguous", 2, {0, 0, 0}, 0, 0, 0},
      {"x col-major, U/V transposed", 2, {1, 0, 0}, 0, 1, 0},
      {"x rows with gaps", 2, {0, 0, 0}, 3, 0, 0},
      {"x every other column (packed), bias stride 2", 2, {0, 0, 0}, 0, 0, 1},
      {"x 3-D", 3, {0, 0, 0}, 0, 0, 0},
      {"x 3-D non-foldable (packed)", 3, {1, 0, 2}, 0, 0, 0},
  };
  static const int64_t shapes[][4] = {
      /* M, in, out, r */
      {6, 13, 11, 5}, {6, 13, 11, 1}, {6, 13, 11, 11}, /* r = min(in, out) */
      {1, 17, 9, 4},  {1, 9, 17, 9},                   /* M = 1: GEMV */
      {6, 13, 1, 5},                                   /* out = 1: GEMV on columns */
      {0, 8, 6, 3},                                    /* empty batch */
      {4, 0, 5, 3},   {4, 6, 5, 0},                    /* in = 0, r = 0: k == 0 GEMMs */
      {64, 40, 72, 16},
  };
  for (int k = K_F32; k <= K_BF16; ++k)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s)
      for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; ++l)
        for (int bias = 0; bias < 2; ++bias) {
          if (layouts[l].x_ndim == 3 && shapes[s][0] % 2) continue;
          run_case((test_kind)k, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], bias, bias,
                   &layouts[l]);
        }
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */
/* ------------------------------------------------------------------------- */

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, us[2] = {5, 3}, vs[2] = {3, 6}, ys[2] = {4, 5}, bs[1] = {5};
  dev_tensor* x = dev_new(tb_new(32, 2, xs, NULL, 0), K_F32, false);
  dev_tensor* U = dev_new(tb_new(32, 2, us, NULL, 0), K_F32, false);
  dev_tensor* V = dev_new(tb_new(32, 2, vs, NULL, 0), K_F32, false);
  dev_tensor* y = dev_new(tb_output(32, 2, ys), K_F32, true);
  dev_tensor* b = dev_new(tb_new(32, 1, bs, NULL, 0), K_F32, false);
  dev_tensor* U64 = dev_new(tb_new(64, 2, us, NULL, 0), K_F64, false);
  dev_tensor* xs2 = dev_new(every_other(32, 2, xs), K_F32, false);
  fct_context c = test_cuda_ctx(0);
  test_cuda_workspace(&c, 1 << 16);
  fct_status st;

  CHECK(fct_cuda_available(), "libfactorch_cuda registered its backend");

  st = fct_lowrank_linear_forward(&c, &x->dl, &U64->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "U", "dtype mix");

  DLTensor host_U = U->h->dl; /* the same values, on the CPU */
  st = fct_lowrank_linear_forward(&c, &x->dl, &host_U, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DEVICE, "U", "device mix");

  c.workspace_bytes = 4; /* xs2 needs packing */
  st = fct_lowrank_linear_forward(&c, &xs2->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_cuda_workspace(&c, 1 << 16);

  /* NaN in x with the finite check on (count_nonfinite on the GPU): named;
   * off: propagates to y's row 1 silently. */
  int64_t i12[2] = {1, 2}, i10[2] = {1, 0}, i00[2] = {0, 0};
  tb_set(x->h, i12, NAN);
  dev_upload(x);
  test_cuda_workspace(&c, 1 << 16);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "x", "NaN in x");
  CHECK(strstr(test_err, "bias") == NULL, "only x is named: %s", test_err);
  c.flags = 0;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  CHECK(st == FCT_OK, "NaN without check: %s", test_err);
  cuda_ok(cudaStreamSynchronize(test_stream), "cudaStreamSynchronize");
  dev_download(y);
  CHECK(isnan(tb_get(y->h, i10)), "NaN propagates to y's row 1");
  CHECK(!isnan(tb_get(y->h, i00)), "row 0 of y stays finite");

  /* The finite check passes on finite data (the count comes back as 0). */
  tb_set(x->h, i12, 0.5);
  dev_upload(x);
  test_cuda_workspace(&c, 1 << 16);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  CHECK(st == FCT_OK, "finite check on finite data: %s", test_err);
  c.flags = 0;

  dev_free(x); dev_free(U); dev_free(V); dev_free(y); dev_free(b); dev_free(U64); dev_free(xs2);
}

int main(void) {
  int skip = test_cuda_begin();
  if (skip) return skip;
  test_values();
  test_errors();
  test_cuda_end();
  return test_report();
}
