/*
 * tt_linear forward and backward against a float64 reference that forms W
 * naively from the cores (test_tensorized.c): d = 1 to 4 cores, ranks from 1
 * to the largest meaningful ones, rectangular and size-1 modes, M = 1,
 * M = 0, batch dims, transposed/gapped x, cores stored with odd strides
 * (packed), the chunked paths (FCT_FLAG_SMALL_CHUNKS), both strategies (the
 * FCT_FLAG_FORCE_* flags), several subsets of
 * gradients. The cases are chosen so that the cost model picks every kind of
 * plan (merged and single groups, both sweep directions); the test checks
 * that it did. Then bad arguments. Outputs start NaN-filled.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_tensorized.h"

typedef struct tt_case {
  int64_t M;
  int d;
  int64_t in[4], out[4], r[5];
} tt_case;

typedef struct tt_model {
  int d;
  int64_t in[4], out[4], r[5], nin, nout;
} tt_model;

/* W[o, i] = G_0[:, i_0, o_0, :] ··· G_(d-1)[:, i_(d-1), o_(d-1), :] (1 x 1). */
static void tt_reconstruct(const void* mp, double* const* P, double* W) {
  const tt_model* m = mp;
  double v[64], nv[64];
  for (int64_t o = 0; o < m->nout; ++o)
    for (int64_t i = 0; i < m->nin; ++i) {
      int64_t oi[4], ii[4];
      tz_unravel(i, m->d, m->in, ii);
      tz_unravel(o, m->d, m->out, oi);
      v[0] = 1.0; /* row vector of length r_k */
      for (int k = 0; k < m->d; ++k) {
        int64_t r0 = m->r[k], r1 = m->r[k + 1], I = m->in[k], O = m->out[k];
        for (int64_t b = 0; b < r1; ++b) {
          double s = 0;
          for (int64_t a = 0; a < r0; ++a)
            s += v[a] * P[k][((a * I + ii[k]) * O + oi[k]) * r1 + b];
          nv[b] = s;
        }
        memcpy(v, nv, sizeof(double) * (size_t)r1);
      }
      W[o * m->nin + i] = v[0];
    }
}

typedef struct layout_case {
  const char* name;
  int x3d, x_colmajor;
  int64_t gap;
  int core_odd; /* cores stored with permuted dims (need packing) */
} layout_case;

static int g_seen_merged, g_seen_single, g_seen_ltr, g_seen_rtl;

static void note_plan(const tt_model* m, int64_t M) {
  fct_linear_plan_info info;
  int64_t r[5];
  memcpy(r, m->r, sizeof r);
  fct_status st = fct_tt_linear_plan(m->d, m->in, m->out, r, M, (DLDevice){kDLCPU, 0},
                                     (DLDataType){kDLFloat, 64, 1}, &info);
  CHECK(st == FCT_OK, "tt plan: status %d", st);
  if (strstr(info.plan, "-")) ++g_seen_merged;
  if (strstr(info.plan, "] ") || strstr(info.plan, "groups [0] ")) ++g_seen_single;
  if (strstr(info.plan, "left-to-right")) ++g_seen_ltr;
  if (strstr(info.plan, "right-to-left")) ++g_seen_rtl;
}

static void run_case(int bits, const tt_case* cc, const layout_case* L, bool bias,
                     uint32_t flags) {
  char label[256];
  snprintf(label, sizeof label, "f%d M=%lld d=%d r1=%lld %s bias=%d flags=%u", bits,
           (long long)cc->M, cc->d, (long long)cc->r[1], L->name, bias, flags);
  tt_model m;
  memset(&m, 0, sizeof m);
  m.d = cc->d;
  m.nin = m.nout = 1;
  for (int k = 0; k < m.d; ++k) {
    m.in[k] = cc->in[k];
    m.out[k] = cc->out[k];
    m.nin *= m.in[k];
    m.nout *= m.out[k];
  }
  for (int k = 0; k <= m.d; ++k) m.r[k] = cc->r[k];
  int64_t M = cc->M, in = m.nin, out = m.nout;
  if (bits == 64 && !flags && !L->x3d && !L->x_colmajor && !L->gap && !L->core_odd && bias)
    note_plan(&m, M);
  int64_t xs[3], ys[3];
  int nd = test_batch_shapes(L->x3d, M, in, out, xs, ys);
  int col[3] = {1, 0, 0}, odd[4] = {2, 0, 3, 1};
  test_tensor* x = tb_new(bits, nd, xs, L->x_colmajor ? col : NULL, L->gap);
  test_tensor* G[4];
  const DLTensor* dG[4];
  for (int k = 0; k < m.d; ++k) {
    int64_t sh[4] = {m.r[k], m.in[k], m.out[k], m.r[k + 1]};
    G[k] = tb_new(bits, 4, sh, L->core_odd ? odd : NULL, 0);
    dG[k] = &G[k]->dl;
  }
  int64_t bs[1] = {out};
  test_tensor* b = bias ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* g = tb_new(bits, nd, ys, NULL, 0);
  test_tensor* y = tb_output(bits, nd, ys);
  tz_ref R = tz_reference(tt_reconstruct, &m, x, G, m.d, b, g, M, in, out);
  double rsum = 0;
  for (int k = 0; k <= m.d; ++k) rsum += (double)m.r[k];
  double tol = bits == 64 ? 1e-11 : 4e-5 * sqrt((double)(in + out + M + 1) * rsum);

  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  fct_status st = fct_tt_linear_forward_workspace(&c, &x->dl, m.d, dG, b ? &b->dl : NULL,
                                                  &y->dl, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_tt_linear_forward(&c, &x->dl, m.d, dG, b ? &b->dl : NULL, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, R.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);

  /* Variants: everything; grad_x only; cores only (all); the last core and
   * the bias only. */
  for (int variant = 0; variant < 4; ++variant) {
    bool want_x = variant <= 1, want_b = variant == 0 || variant == 3;
    test_tensor* gx = tb_output(bits, nd, xs);
    test_tensor* gb = tb_output(bits, 1, bs);
    test_tensor* gG[4];
    DLTensor* dgG[4];
    for (int k = 0; k < m.d; ++k) {
      gG[k] = tb_output(bits, 4, G[k]->shape);
      dgG[k] = (variant == 0 || variant == 2 || (variant == 3 && k == m.d - 1)) ? &gG[k]->dl
                                                                              : NULL;
    }
    c = test_ctx(flags);
    st = fct_tt_linear_backward_workspace(&c, &g->dl, &x->dl, m.d, dG, want_x ? &gx->dl : NULL,
                                          (const DLTensor* const*)dgG,
                                          want_b ? &gb->dl : NULL, &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace %d: %s", label, variant, test_err);
    test_workspace(&c, bytes);
    st = fct_tt_linear_backward(&c, &g->dl, &x->dl, m.d, dG, want_x ? &gx->dl : NULL, dgG,
                                want_b ? &gb->dl : NULL);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    if (want_x) {
      e = test_rel_err(gx, R.gx, M, in);
      CHECK(e <= tol, "%s: grad_x error %.3g (variant %d)", label, e, variant);
    }
    if (want_b) {
      e = test_rel_err(gb, R.gb, 1, out);
      CHECK(e <= tol, "%s: grad_bias error %.3g (variant %d)", label, e, variant);
    }
    for (int k = 0; k < m.d; ++k) {
      if (!dgG[k]) continue;
      int64_t rows = m.r[k] * m.in[k] * m.out[k];
      e = test_rel_err(gG[k], R.gP[k], rows, m.r[k + 1]);
      CHECK(e <= tol, "%s: grad_cores[%d] error %.3g (variant %d)", label, k, e, variant);
    }
    tb_free(gx);
    tb_free(gb);
    for (int k = 0; k < m.d; ++k) tb_free(gG[k]);
  }
  for (int k = 0; k < m.d; ++k) tb_free(G[k]);
  tz_ref_free(&R);
  tb_free(x); tb_free(b); tb_free(g); tb_free(y);
}

static void test_values(void) {
  static const tt_case cases[] = {
      {5, 1, {6}, {4}, {1, 1}},                               /* one core: a dense W */
      {5, 2, {2, 3}, {4, 2}, {1, 3, 1}},
      {9, 3, {2, 2, 2}, {3, 2, 2}, {1, 2, 2, 1}},             /* small ranks */
      {12, 3, {3, 3, 3}, {3, 3, 3}, {1, 9, 9, 1}},            /* the largest ranks */
      {8, 3, {4, 4, 4}, {2, 1, 2}, {1, 3, 2, 1}},             /* in >> out, size-1 mode */
      {8, 3, {2, 1, 2}, {4, 4, 4}, {1, 2, 3, 1}},             /* out >> in */
      {6, 4, {2, 2, 2, 2}, {2, 2, 2, 2}, {1, 3, 4, 3, 1}},
      {40, 4, {2, 2, 2, 2}, {2, 2, 2, 2}, {1, 4, 16, 4, 1}},  /* large ranks: merging */
      {1, 3, {3, 2, 2}, {2, 2, 3}, {1, 4, 3, 1}},             /* M = 1 */
      {0, 2, {2, 2}, {3, 2}, {1, 2, 1}},                      /* empty batch */
      /* size-1 modes around a rank-3 link (found by test_fuzz_linear_ops.py:
       * the backward corrupted the heap at M = 2) */
      {2, 4, {1, 3, 1, 3}, {4, 5, 1, 4}, {1, 1, 3, 1, 1}},
      {4, 4, {1, 3, 1, 3}, {4, 5, 1, 4}, {1, 1, 3, 1, 1}},
  };
  static const layout_case layouts[] = {
      {"contiguous", 0, 0, 0, 0},
      {"x col-major, odd cores", 0, 1, 0, 1},
      {"x gapped rows", 0, 0, 3, 0},
      {"x 3-D", 1, 0, 0, 0},
  };
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci)
      for (size_t li = 0; li < sizeof layouts / sizeof layouts[0]; ++li)
        for (int bias = 0; bias < 2; ++bias) {
          if (layouts[li].x3d && cases[ci].M % 2) continue;
          run_case(bits, &cases[ci], &layouts[li], bias, 0);
          if (li <= 1) run_case(bits, &cases[ci], &layouts[li], bias, FCT_FLAG_SMALL_CHUNKS);
          /* Both strategies whatever the cost model prefers; blocks of one row. */
          run_case(bits, &cases[ci], &layouts[li], bias, FCT_FLAG_FORCE_CONTRACT);
          run_case(bits, &cases[ci], &layouts[li], bias, FCT_FLAG_FORCE_FORM_W);
          if (li <= 1)
            run_case(bits, &cases[ci], &layouts[li], bias,
                     FCT_FLAG_FORCE_FORM_W | FCT_FLAG_SMALL_CHUNKS);
        }
  CHECK(g_seen_merged && g_seen_single && g_seen_ltr && g_seen_rtl,
        "the cases cover every kind of plan: merged %d, single %d, ltr %d, rtl %d",
        g_seen_merged, g_seen_single, g_seen_ltr, g_seen_rtl);
}

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, c0[4] = {1, 2, 3, 2}, c1[4] = {2, 3, 2, 1}, ys[2] = {4, 6};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* G0 = tb_new(32, 4, c0, NULL, 0);
  test_tensor* G1 = tb_new(32, 4, c1, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  const DLTensor* G[2] = {&G0->dl, &G1->dl};
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 20);
  fct_status st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  CHECK(st == FCT_OK, "valid call: %s", test_err);
  G1->shape[0] = 3;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[1]: expected a first dim of 2", "rank chain");
  G1->shape[0] = 2;
  G0->shape[0] = 2;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[0]: expected a first dim of 1", "r_0 != 1");
  G0->shape[0] = 1;
  G1->shape[3] = 2;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[1]: expected a last dim of 1", "r_d != 1");
  G1->shape[3] = 1;
  G0->shape[3] = 0;
  G1->shape[0] = 0;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[0]", "rank 0");
  G0->shape[3] = 2;
  G1->shape[0] = 2;
  G0->dl.ndim = 3;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_NDIM, "cores[0]", "3-D core");
  G0->dl.ndim = 4;
  xs[1] = 5;
  test_tensor* x5 = tb_new(32, 2, xs, NULL, 0);
  st = fct_tt_linear_forward(&c, &x5->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "x: expected a last dim of 6", "in mismatch");
  st = fct_tt_linear_forward(&c, &x->dl, 9, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "d", "9 cores");
  st = fct_tt_linear_forward(&c, &x->dl, 2, NULL, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "cores", "NULL cores");
  c.workspace_bytes = 8;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 20);
  int64_t i0[4] = {0, 1, 1, 1};
  tb_set(G0, i0, INFINITY);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_tt_linear_forward(&c, &x->dl, 2, G, NULL, &y->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "cores[0]", "Inf in a core");
  c.flags = 0;
  tb_set(G0, i0, 0.5);
  test_tensor* g = tb_new(32, 2, ys, NULL, 0);
  test_tensor* gG1 = tb_output(32, 4, c0); /* G0's shape */
  DLTensor* gG[2] = {NULL, &gG1->dl};
  st = fct_tt_linear_backward(&c, &g->dl, &x->dl, 2, G, NULL, gG, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_cores[1]", "grad core shape");
  DLTensor* gGa[2] = {&G1->dl, NULL};
  st = fct_tt_linear_backward(&c, &g->dl, &x->dl, 2, G, NULL, gGa, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_cores[0]", "grad core of another's shape");

  /* The cost model on the benchmark's layer: 4096 x 4096 as (8, 8, 8, 8),
   * ranks 50: pairs of merged cores for a moderate batch; W formed (in
   * blocks) for a large one. */
  int64_t modes[4] = {8, 8, 8, 8}, ranks[5] = {1, 50, 50, 50, 1};
  fct_linear_plan_info info;
  st = fct_tt_linear_plan(4, modes, modes, ranks, 128, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_OK && strstr(info.plan, "forward: groups [0-1] [2-3]") &&
            !strcmp(info.forward_strategy, "contract"),
        "tt plan: %d %s", st, info.plan);
  CHECK(info.forward_flops < 2.0 * 128 * 64 * 64 * 64 * 50 * 2 * 1.01 &&
            info.forward_flops > 2.0 * 128 * 64 * 64 * 64 * 50 * 2,
        "tt plan flops %g", info.forward_flops);
  st = fct_tt_linear_plan(4, modes, modes, ranks, 2048, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  double dense = 2.0 * 2048 * 4096 * 4096;
  CHECK(st == FCT_OK && !strcmp(info.forward_strategy, "form_w") &&
            !strcmp(info.backward_strategy, "form_w") && strstr(info.plan, "W formed") &&
            info.forward_flops > dense && info.forward_flops < 1.1 * dense &&
            info.forward_workspace <= ((size_t)64 << 20) &&
            info.backward_workspace <= ((size_t)64 << 20),
        "tt plan at M = 2048: %d %s %s %s %g", st, info.plan, info.forward_strategy,
        info.backward_strategy, info.forward_flops);
  ranks[1] = 0;
  st = fct_tt_linear_plan(4, modes, modes, ranks, 2048, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_SHAPE, "tt plan with a zero rank: %d", st);
  /* Sizes no tensor of the ops could have (tests/fuzz): refused before the
   * plan's products of them overflow int64. */
  int64_t big[2] = {(int64_t)1 << 40, 3}, small[2] = {3, 3}, rk[3] = {1, (int64_t)1 << 40, 1};
  int64_t rk1[3] = {1, 2, 1};
  st = fct_tt_linear_plan(2, big, big, rk1, 64, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "tt plan with modes of 2^40: %d", st);
  st = fct_tt_linear_plan(2, small, small, rk, 64, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "tt plan with a rank of 2^40: %d", st);

  tb_free(x); tb_free(x5); tb_free(G0); tb_free(G1); tb_free(y); tb_free(g); tb_free(gG1);
}

int main(void) {
  test_values();
  test_errors();
  test_free_workspace();
  return test_report();
}
