/*
 * The CP, Tucker and TT linear ops on the CUDA backend against the same ops
 * on the CPU in float64 (which tests/c/test_{cp,tucker,tt}_linear.c check
 * against a naive reference), on the same values: float32, float64 and
 * bfloat16 (the host values are first rounded to the device dtype), M = 1,
 * M = 0, transposed x, odd core strides (packed on the GPU), the chunked
 * paths (FCT_FLAG_SMALL_CHUNKS), merged TT groups (batched GEMMs and batch
 * reductions through partial sums), on a non-default stream; then the
 * finite check. Exits 77 (ctest: skipped) without a GPU.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_cuda_util.h"
#include "test_tensorized.h"

static double tolerance(test_kind k, double terms) {
  return k == K_F64 ? 1e-11 : k == K_F32 ? 3e-5 * sqrt(terms) : 4e-2;
}

/* ------------------------------------------------------------------------- */
/* One op call on both backends                                              */
/* ------------------------------------------------------------------------- */

enum { OP_CP, OP_TUCKER, OP_TT };

typedef struct op_case {
  int op;
  int64_t M;
  int p, q; /* modes per side (TT: d = p = q) */
  int64_t in[4], out[4];
  int64_t r[5]; /* cp: r[0] = R; tucker: in ranks r[0..p), out ranks r[p..p+q); tt: r_0..r_d */
  int xcol;     /* x stored column-major */
  int odd;      /* factors/cores stored with permuted dims */
} op_case;

/* The parameters of a case as float64 host tensors (factors, core, cores). */
typedef struct params {
  test_tensor* t[9];
  int n;
} params;

static params make_params(const op_case* c) {
  params P = {{0}, 0};
  int col[2] = {1, 0}, odd4[4] = {2, 0, 3, 1};
  const int* o2 = c->odd ? col : NULL;
  if (c->op == OP_CP) {
    for (int k = 0; k < c->p; ++k) P.t[P.n++] = tb_new(64, 2, (int64_t[2]){c->in[k], c->r[0]}, o2, 0);
    for (int k = 0; k < c->q; ++k) P.t[P.n++] = tb_new(64, 2, (int64_t[2]){c->out[k], c->r[0]}, o2, 0);
  } else if (c->op == OP_TUCKER) {
    int64_t S = 1, T = 1;
    for (int k = 0; k < c->p; ++k) T *= c->r[k];
    for (int k = 0; k < c->q; ++k) S *= c->r[c->p + k];
    P.t[P.n++] = tb_new(64, 2, (int64_t[2]){S, T}, o2, 0);
    for (int k = 0; k < c->p; ++k) P.t[P.n++] = tb_new(64, 2, (int64_t[2]){c->in[k], c->r[k]}, o2, 0);
    for (int k = 0; k < c->q; ++k)
      P.t[P.n++] = tb_new(64, 2, (int64_t[2]){c->out[k], c->r[c->p + k]}, o2, 0);
  } else {
    for (int k = 0; k < c->p; ++k)
      P.t[P.n++] = tb_new(64, 4, (int64_t[4]){c->r[k], c->in[k], c->out[k], c->r[k + 1]},
                          c->odd ? odd4 : NULL, 0);
  }
  return P;
}

/* Runs forward + backward (every gradient) of case c on DLTensors that live
 * on one device; outs: y, grad_x, grad_bias, then the parameter gradients. */
static fct_status run_op(const op_case* c, fct_context* ctx, bool query, size_t* bytes,
                         const DLTensor* x, const DLTensor* const* P, int np, const DLTensor* b,
                         const DLTensor* g, DLTensor* y, DLTensor* gx, DLTensor* gb,
                         DLTensor* const* gP, bool backward) {
  int p = c->p, q = c->q;
  if (c->op == OP_CP) {
    if (!backward)
      return query ? fct_cp_linear_forward_workspace(ctx, x, p, P, q, P + p, b, y, NULL, bytes)
                   : fct_cp_linear_forward(ctx, x, p, P, q, P + p, b, y, NULL);
    return query ? fct_cp_linear_backward_workspace(ctx, g, x, p, P, q, P + p, NULL, gx,
                                                    (const DLTensor* const*)gP,
                                                    (const DLTensor* const*)gP + p, gb, bytes)
                 : fct_cp_linear_backward(ctx, g, x, p, P, q, P + p, NULL, gx, gP, gP + p, gb);
  }
  if (c->op == OP_TUCKER) {
    if (!backward)
      return query ? fct_tucker_linear_forward_workspace(ctx, x, P[0], p, P + 1, q, P + 1 + p, b,
                                                         y, NULL, bytes)
                   : fct_tucker_linear_forward(ctx, x, P[0], p, P + 1, q, P + 1 + p, b, y, NULL);
    return query ? fct_tucker_linear_backward_workspace(
                       ctx, g, x, P[0], p, P + 1, q, P + 1 + p, NULL, gx, gP[0],
                       (const DLTensor* const*)gP + 1, (const DLTensor* const*)gP + 1 + p, gb,
                       bytes)
                 : fct_tucker_linear_backward(ctx, g, x, P[0], p, P + 1, q, P + 1 + p, NULL, gx,
                                              gP[0], gP + 1, gP + 1 + p, gb);
  }
  (void)np;
  if (!backward)
    return query ? fct_tt_linear_forward_workspace(ctx, x, p, P, b, y, bytes)
                 : fct_tt_linear_forward(ctx, x, p, P, b, y);
  return query ? fct_tt_linear_backward_workspace(ctx, g, x, p, P, gx,
                                                  (const DLTensor* const*)gP, gb, bytes)
               : fct_tt_linear_backward(ctx, g, x, p, P, gx, gP, gb);
}

static void run_case(const op_case* c, test_kind k, uint32_t flags) {
  static const char* const kOp[] = {"cp", "tucker", "tt"};
  char label[160];
  snprintf(label, sizeof label, "%s %s M=%lld xcol=%d odd=%d flags=%u", kOp[c->op], test_kind_name[k],
           (long long)c->M, c->xcol, c->odd, flags);
  int64_t in = 1, out = 1;
  for (int k2 = 0; k2 < c->p; ++k2) in *= c->in[k2];
  for (int k2 = 0; k2 < c->q; ++k2) out *= c->out[k2];
  int col[2] = {1, 0};
  /* Inputs on the device; their host values rounded to what it holds. */
  dev_tensor* dx = dev_new(tb_new(64, 2, (int64_t[2]){c->M, in}, c->xcol ? col : NULL, 0), k,
                           false);
  dev_tensor* db = dev_new(tb_new(64, 1, (int64_t[1]){out}, NULL, 0), k, false);
  dev_tensor* dg = dev_new(tb_new(64, 2, (int64_t[2]){c->M, out}, NULL, 0), k, false);
  params P = make_params(c);
  dev_tensor *dP[9], *dgP[9];
  for (int i = 0; i < P.n; ++i) dP[i] = dev_new(P.t[i], k, false);

  /* CPU float64 on the same (rounded) values: the reference. */
  test_tensor* y = tb_output(64, 2, (int64_t[2]){c->M, out});
  test_tensor* gx = tb_output(64, 2, (int64_t[2]){c->M, in});
  test_tensor* gb = tb_output(64, 1, (int64_t[1]){out});
  test_tensor* gP[9];
  const DLTensor* hP[9];
  DLTensor* hgP[9];
  for (int i = 0; i < P.n; ++i) {
    gP[i] = tb_output(64, P.t[i]->dl.ndim, P.t[i]->shape);
    hP[i] = &P.t[i]->dl;
    hgP[i] = &gP[i]->dl;
  }
  size_t bytes = 0;
  for (int pass = 0; pass < 2; ++pass) {
    fct_context hc = test_ctx(0);
    fct_status st = run_op(c, &hc, true, &bytes, &dx->h->dl, hP, P.n, &db->h->dl, &dg->h->dl,
                           &y->dl, &gx->dl, &gb->dl, hgP, pass == 1);
    test_workspace(&hc, bytes);
    if (st == FCT_OK)
      st = run_op(c, &hc, false, NULL, &dx->h->dl, hP, P.n, &db->h->dl, &dg->h->dl, &y->dl,
                  &gx->dl, &gb->dl, hgP, pass == 1);
    CHECK(st == FCT_OK, "%s: cpu reference pass %d: %s", label, pass, test_err);
  }

  /* The same on the GPU. */
  dev_tensor* dy = dev_new(tb_output(64, 2, y->shape), k, true);
  dev_tensor* dgx = dev_new(tb_output(64, 2, gx->shape), k, true);
  dev_tensor* dgb = dev_new(tb_output(64, 1, gb->shape), k, true);
  const DLTensor* pP[9];
  DLTensor* pgP[9];
  for (int i = 0; i < P.n; ++i) {
    dgP[i] = dev_new(tb_output(64, gP[i]->dl.ndim, gP[i]->shape), k, true);
    pP[i] = &dP[i]->dl;
    pgP[i] = &dgP[i]->dl;
  }
  for (int pass = 0; pass < 2; ++pass) {
    fct_context dc = test_cuda_ctx(flags);
    test_cuda_workspace(&dc, 0);
    fct_status st = run_op(c, &dc, true, &bytes, &dx->dl, pP, P.n, &db->dl, &dg->dl, &dy->dl,
                           &dgx->dl, &dgb->dl, pgP, pass == 1);
    CHECK(st == FCT_OK, "%s: workspace %d: %s", label, pass, test_err);
    dc = test_cuda_ctx(flags);
    test_cuda_workspace(&dc, bytes);
    st = run_op(c, &dc, false, NULL, &dx->dl, pP, P.n, &db->dl, &dg->dl, &dy->dl, &dgx->dl,
                &dgb->dl, pgP, pass == 1);
    CHECK(st == FCT_OK, "%s: cuda pass %d: %s", label, pass, test_err);
    cuda_ok(cudaStreamSynchronize(test_stream), "cudaStreamSynchronize");
  }
  double terms = (double)(in + out + c->M + 16);
  double tol = tolerance(k, terms);
  double e = dev_rel_diff(dy, y);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  e = dev_rel_diff(dgx, gx);
  CHECK(e <= tol, "%s: grad_x error %.3g", label, e);
  e = dev_rel_diff(dgb, gb);
  CHECK(e <= tol, "%s: grad_bias error %.3g", label, e);
  for (int i = 0; i < P.n; ++i) {
    e = dev_rel_diff(dgP[i], gP[i]);
    CHECK(e <= tol, "%s: gradient of parameter %d error %.3g", label, i, e);
  }

  dev_free(dx); dev_free(db); dev_free(dg); dev_free(dy); dev_free(dgx); dev_free(dgb);
  for (int i = 0; i < P.n; ++i) {
    dev_free(dP[i]); /* frees P.t[i] */
    dev_free(dgP[i]);
    tb_free(gP[i]);
  }
  tb_free(y); tb_free(gx); tb_free(gb);
}

static void test_values(void) {
  static const op_case cases[] = {
      {OP_CP, 5, 2, 1, {2, 3}, {4}, {3}, 0, 0},
      {OP_CP, 1, 3, 2, {3, 2, 2}, {2, 3}, {5}, 0, 1},
      {OP_CP, 34, 2, 2, {4, 4}, {4, 4}, {70}, 1, 0},
      {OP_CP, 0, 2, 2, {2, 2}, {3, 1}, {2}, 0, 0},
      {OP_TUCKER, 5, 2, 1, {2, 3}, {4}, {2, 2, 3}, 0, 0},
      {OP_TUCKER, 1, 3, 2, {3, 2, 2}, {2, 3}, {2, 1, 2, 2, 2}, 1, 1},
      {OP_TUCKER, 34, 2, 2, {4, 4}, {4, 4}, {2, 3, 3, 2}, 0, 0},
      {OP_TUCKER, 0, 2, 2, {2, 2}, {3, 1}, {1, 2, 2, 1}, 0, 0},
      {OP_TT, 5, 2, 2, {2, 3}, {4, 2}, {1, 3, 1}, 0, 0},
      {OP_TT, 40, 4, 4, {2, 2, 2, 2}, {2, 2, 2, 2}, {1, 4, 16, 4, 1}, 0, 1},
      {OP_TT, 8, 3, 3, {2, 1, 2}, {4, 4, 4}, {1, 2, 3, 1}, 1, 0},
      {OP_TT, 12, 3, 3, {3, 3, 3}, {3, 3, 3}, {1, 9, 9, 1}, 0, 0},
      {OP_TT, 1, 3, 3, {3, 2, 2}, {2, 2, 3}, {1, 4, 3, 1}, 0, 0},
      {OP_TT, 0, 2, 2, {2, 2}, {3, 2}, {1, 2, 1}, 0, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    for (int k = K_F32; k <= K_BF16; ++k) {
      run_case(&cases[i], (test_kind)k, 0);
      if (k == K_F64) run_case(&cases[i], (test_kind)k, FCT_FLAG_SMALL_CHUNKS);
    }
}

static void test_finite_check(void) {
  int64_t xs[2] = {4, 6}, c0[4] = {1, 2, 3, 2}, c1[4] = {2, 3, 2, 1}, ys[2] = {4, 6};
  test_tensor* G1 = tb_new(64, 4, c1, NULL, 0);
  int64_t i1[4] = {0, 1, 1, 1};
  tb_set(G1, i1, NAN);
  dev_tensor* dx = dev_new(tb_new(64, 2, xs, NULL, 0), K_F32, false);
  dev_tensor* d0 = dev_new(tb_new(64, 4, c0, NULL, 0), K_F32, false);
  dev_tensor* d1 = dev_new(G1, K_F32, false);
  dev_tensor* dy = dev_new(tb_output(64, 2, ys), K_F32, true);
  const DLTensor* G[2] = {&d0->dl, &d1->dl};
  fct_context c = test_cuda_ctx(FCT_FLAG_CHECK_FINITE);
  test_cuda_workspace(&c, 1 << 20);
  fct_status st = fct_tt_linear_forward(&c, &dx->dl, 2, G, NULL, &dy->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "cores[1]", "NaN in a core on the GPU");
  CHECK(strstr(test_err, "cores[0]") == NULL, "only cores[1] is named: %s", test_err);
  dev_free(dx); dev_free(d0); dev_free(d1); dev_free(dy);
}

int main(void) {
  int skip = test_cuda_begin();
  if (skip) return skip;
  CHECK(fct_cuda_available(), "libfactorch_cuda registered its backend");
  test_values();
  test_finite_check();
  test_cuda_end();
  test_free_workspace();
  return test_report();
}
