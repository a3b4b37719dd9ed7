/*
 * tucker_linear forward and backward against a float64 reference that forms
 * W naively from the core and factors (test_tensorized.c): 1 to 3 modes per
 * side, ranks below, equal to and above the mode sizes, modes of size 1,
 * M = 1, M = 0, batch dims, transposed/gapped x, factors and core stored
 * column-major (packed), the chunked paths (FCT_FLAG_SMALL_CHUNKS), both
 * strategies (the FCT_FLAG_FORCE_* flags), several
 * subsets of gradients, with and without the states the forward keeps for
 * the backward (then over several chunks too); then bad arguments. Outputs
 * start NaN-filled.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_tensorized.h"

typedef struct tk_case {
  int64_t M;
  int n_in, n_out;
  int64_t in[4], t[4], out[4], s[4];
} tk_case;

typedef struct tk_model {
  int n_in, n_out;
  int64_t in[4], t[4], out[4], s[4];
  int64_t nin, nout, S, T;
} tk_model;

/* params: core [S, T], V_0.. [i_k, t_k], U_0.. [o_k, s_k]. */
static void tk_reconstruct(const void* mp, double* const* P, double* W) {
  const tk_model* m = mp;
  for (int64_t o = 0; o < m->nout; ++o)
    for (int64_t i = 0; i < m->nin; ++i) {
      int64_t oi[4], ii[4];
      tz_unravel(i, m->n_in, m->in, ii);
      tz_unravel(o, m->n_out, m->out, oi);
      double acc = 0;
      for (int64_t sv = 0; sv < m->S; ++sv) {
        int64_t sk[4];
        tz_unravel(sv, m->n_out, m->s, sk);
        double us = 1;
        for (int k = 0; k < m->n_out; ++k) us *= P[1 + m->n_in + k][oi[k] * m->s[k] + sk[k]];
        for (int64_t tv = 0; tv < m->T; ++tv) {
          int64_t tk[4];
          tz_unravel(tv, m->n_in, m->t, tk);
          double vs = 1;
          for (int k = 0; k < m->n_in; ++k) vs *= P[1 + k][ii[k] * m->t[k] + tk[k]];
          acc += P[0][sv * m->T + tv] * us * vs;
        }
      }
      W[o * m->nin + i] = acc;
    }
}

typedef struct layout_case {
  const char* name;
  int x3d, x_colmajor;
  int64_t gap;
  int p_colmajor; /* core and factors stored column-major */
} layout_case;

/* keep: the forward writes the states (where the shapes keep them) and
 * every backward reads them. */
static void run_case(int bits, const tk_case* cc, const layout_case* L, bool bias,
                     uint32_t flags, bool keep) {
  char label[256];
  snprintf(label, sizeof label, "f%d M=%lld n_in=%d n_out=%d %s bias=%d flags=%u keep=%d", bits,
           (long long)cc->M, cc->n_in, cc->n_out, L->name, bias, flags, keep);
  tk_model m;
  memset(&m, 0, sizeof m);
  m.n_in = cc->n_in;
  m.n_out = cc->n_out;
  m.nin = m.nout = m.S = m.T = 1;
  for (int k = 0; k < m.n_in; ++k) {
    m.in[k] = cc->in[k];
    m.t[k] = cc->t[k];
    m.nin *= m.in[k];
    m.T *= m.t[k];
  }
  for (int k = 0; k < m.n_out; ++k) {
    m.out[k] = cc->out[k];
    m.s[k] = cc->s[k];
    m.nout *= m.out[k];
    m.S *= m.s[k];
  }
  int64_t M = cc->M, in = m.nin, out = m.nout;
  int64_t xs[3], ys[3];
  int nd = test_batch_shapes(L->x3d, M, in, out, xs, ys);
  int col[3] = {1, 0, 0};
  const int* pc = L->p_colmajor ? col : NULL;
  test_tensor* x = tb_new(bits, nd, xs, L->x_colmajor ? col : NULL, L->gap);
  int np = 1 + m.n_in + m.n_out;
  test_tensor* Pt[9];
  int64_t csh[2] = {m.S, m.T};
  Pt[0] = tb_new(bits, 2, csh, pc, 0);
  for (int k = 0; k < m.n_in; ++k) {
    int64_t sh[2] = {m.in[k], m.t[k]};
    Pt[1 + k] = tb_new(bits, 2, sh, pc, 0);
  }
  for (int k = 0; k < m.n_out; ++k) {
    int64_t sh[2] = {m.out[k], m.s[k]};
    Pt[1 + m.n_in + k] = tb_new(bits, 2, sh, pc, 0);
  }
  const DLTensor *dV[4], *dU[4];
  for (int k = 0; k < m.n_in; ++k) dV[k] = &Pt[1 + k]->dl;
  for (int k = 0; k < m.n_out; ++k) dU[k] = &Pt[1 + m.n_in + k]->dl;
  int64_t bs[1] = {out};
  test_tensor* b = bias ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* g = tb_new(bits, nd, ys, NULL, 0);
  test_tensor* y = tb_output(bits, nd, ys);
  tz_ref R = tz_reference(tk_reconstruct, &m, x, Pt, np, b, g, M, in, out);
  double tol = bits == 64 ? 1e-11 : 3e-5 * sqrt((double)(in + out + m.S + m.T + M + 1));

  int64_t per_row = -1;
  fct_status st = fct_tucker_linear_states(m.n_in, m.in, m.t, m.n_out, m.out, m.s, &per_row);
  CHECK(st == FCT_OK && per_row == (m.T + m.S <= in + out ? m.T + m.S : 0),
        "%s: states per row %lld", label, (long long)per_row);
  if (keep && per_row == 0) {
    for (int k = 0; k < np; ++k) tb_free(Pt[k]);
    tz_ref_free(&R);
    tb_free(x); tb_free(b); tb_free(g); tb_free(y);
    return;
  }
  int64_t kn[1] = {M * per_row};
  test_tensor* kept = keep ? tb_output(bits, 1, kn) : NULL;
  const DLTensor* kd = kept ? &kept->dl : NULL;

  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  st = fct_tucker_linear_forward_workspace(&c, &x->dl, &Pt[0]->dl, m.n_in, dV, m.n_out, dU,
                                           b ? &b->dl : NULL, &y->dl, kd, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_tucker_linear_forward(&c, &x->dl, &Pt[0]->dl, m.n_in, dV, m.n_out, dU,
                                 b ? &b->dl : NULL, &y->dl, kept ? &kept->dl : NULL);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, R.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);

  /* Variants: everything; grad_x only; core + output factors + bias; the
   * input factors but the first. */
  for (int variant = 0; variant < 4; ++variant) {
    bool want_x = variant <= 1, want_core = variant == 0 || variant == 2;
    bool want_b = variant == 0 || variant == 2;
    test_tensor* gx = tb_output(bits, nd, xs);
    test_tensor* gb = tb_output(bits, 1, bs);
    test_tensor* gP[9];
    for (int k = 0; k < np; ++k) gP[k] = tb_output(bits, 2, Pt[k]->shape);
    DLTensor *gV[4], *gU[4];
    for (int k = 0; k < m.n_in; ++k)
      gV[k] = (variant == 0 || (variant == 3 && (k > 0 || m.n_in == 1))) ? &gP[1 + k]->dl : NULL;
    for (int k = 0; k < m.n_out; ++k)
      gU[k] = (variant == 0 || variant == 2) ? &gP[1 + m.n_in + k]->dl : NULL;
    c = test_ctx(flags);
    st = fct_tucker_linear_backward_workspace(
        &c, &g->dl, &x->dl, &Pt[0]->dl, m.n_in, dV, m.n_out, dU, kd, want_x ? &gx->dl : NULL,
        want_core ? &gP[0]->dl : NULL, (const DLTensor* const*)gV, (const DLTensor* const*)gU,
        want_b ? &gb->dl : NULL, &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace %d: %s", label, variant, test_err);
    test_workspace(&c, bytes);
    st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &Pt[0]->dl, m.n_in, dV, m.n_out, dU, kd,
                                    want_x ? &gx->dl : NULL, want_core ? &gP[0]->dl : NULL, gV,
                                    gU, want_b ? &gb->dl : NULL);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    if (want_x) {
      e = test_rel_err(gx, R.gx, M, in);
      CHECK(e <= tol, "%s: grad_x error %.3g (variant %d)", label, e, variant);
    }
    if (want_b) {
      e = test_rel_err(gb, R.gb, 1, out);
      CHECK(e <= tol, "%s: grad_bias error %.3g (variant %d)", label, e, variant);
    }
    if (want_core) {
      e = test_rel_err(gP[0], R.gP[0], m.S, m.T);
      CHECK(e <= tol, "%s: grad_core error %.3g (variant %d)", label, e, variant);
    }
    for (int k = 0; k < m.n_in; ++k) {
      if (!gV[k]) continue;
      e = test_rel_err(gP[1 + k], R.gP[1 + k], m.in[k], m.t[k]);
      CHECK(e <= tol, "%s: grad_in_factors[%d] error %.3g (variant %d)", label, k, e, variant);
    }
    for (int k = 0; k < m.n_out; ++k) {
      if (!gU[k]) continue;
      e = test_rel_err(gP[1 + m.n_in + k], R.gP[1 + m.n_in + k], m.out[k], m.s[k]);
      CHECK(e <= tol, "%s: grad_out_factors[%d] error %.3g (variant %d)", label, k, e, variant);
    }
    tb_free(gx);
    tb_free(gb);
    for (int k = 0; k < np; ++k) tb_free(gP[k]);
  }
  for (int k = 0; k < np; ++k) tb_free(Pt[k]);
  tz_ref_free(&R);
  tb_free(x); tb_free(b); tb_free(g); tb_free(y); tb_free(kept);
}

static void test_values(void) {
  static const tk_case cases[] = {
      {5, 2, 1, {2, 3}, {2, 2}, {4}, {3}},
      {1, 3, 2, {3, 2, 2}, {2, 1, 2}, {2, 3}, {2, 2}}, /* M = 1 */
      {0, 2, 2, {2, 2}, {1, 2}, {3, 1}, {2, 1}},       /* empty batch */
      {7, 1, 1, {4}, {4}, {5}, {5}},                   /* square factors */
      {6, 2, 2, {3, 3}, {4, 5}, {2, 3}, {3, 4}},       /* ranks above the modes */
      {4, 2, 2, {1, 3}, {1, 2}, {2, 1}, {2, 1}},       /* modes of size 1 */
      {34, 2, 2, {4, 4}, {2, 3}, {4, 4}, {3, 2}},
  };
  static const layout_case layouts[] = {
      {"contiguous", 0, 0, 0, 0},
      {"x col-major, core/factors col-major", 0, 1, 0, 1},
      {"x gapped rows", 0, 0, 3, 0},
      {"x 3-D", 1, 0, 0, 0},
  };
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci)
      for (size_t li = 0; li < sizeof layouts / sizeof layouts[0]; ++li)
        for (int bias = 0; bias < 2; ++bias) {
          if (layouts[li].x3d && cases[ci].M % 2) continue;
          const tk_case* cc = &cases[ci];
          const layout_case* L = &layouts[li];
          /* keep: these W are small, so the cost model forms W and the
           * states go unused (test_kept_states uses them). */
          for (int keep = 0; keep < 2; ++keep) {
            run_case(bits, cc, L, bias, 0, keep);
            if (li <= 1) run_case(bits, cc, L, bias, FCT_FLAG_SMALL_CHUNKS, keep);
            /* Both strategies whatever the cost model prefers; blocks of one
             * row. (Kept states, where they pay: the flags change neither.) */
            run_case(bits, cc, L, bias, FCT_FLAG_FORCE_CONTRACT, keep);
            run_case(bits, cc, L, bias, FCT_FLAG_FORCE_FORM_W, keep);
            if (li <= 1)
              run_case(bits, cc, L, bias, FCT_FLAG_FORCE_FORM_W | FCT_FLAG_SMALL_CHUNKS, keep);
          }
        }
}

/* Kept states where the cost model uses them (the chain beats forming W;
 * layers too large for the naive reference): the forward writes every
 * element of states (they start NaN), y is the same, and every subset of
 * the gradients equals the recomputing backward's, in one chunk of rows
 * and over several (chunks of 4096 rows in float64, 8192 in float32 for
 * the first shape). */
/* Element i of a 1-D or 2-D tensor in row-major order. */
static double flat_get(const test_tensor* t, int64_t i) {
  if (t->dl.ndim == 1) return tb_get(t, &i);
  return tb_get2(t, i / t->shape[1], i % t->shape[1]);
}

static void test_kept_states(void) {
  static const tk_case cases[] = {
      {130, 2, 2, {16, 16}, {4, 4}, {16, 16}, {4, 4}},
      {9001, 2, 2, {16, 16}, {4, 4}, {16, 16}, {4, 4}},
      {131, 3, 3, {8, 8, 8}, {3, 2, 4}, {4, 8, 8}, {2, 3, 2}},
      {2500, 2, 3, {16, 32}, {8, 4}, {8, 8, 8}, {2, 3, 2}},
  };
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci) {
      const tk_case* cc = &cases[ci];
      char label[128];
      snprintf(label, sizeof label, "kept states f%d M=%lld case %zu", bits, (long long)cc->M,
               ci);
      int64_t M = cc->M, in = 1, out = 1, S = 1, T = 1;
      test_tensor* P[9];
      const DLTensor *V[4], *U[4];
      for (int k = 0; k < cc->n_in; ++k) {
        int64_t sh[2] = {cc->in[k], cc->t[k]};
        P[1 + k] = tb_new(bits, 2, sh, NULL, 0);
        V[k] = &P[1 + k]->dl;
        in *= cc->in[k];
        T *= cc->t[k];
      }
      for (int k = 0; k < cc->n_out; ++k) {
        int64_t sh[2] = {cc->out[k], cc->s[k]};
        P[1 + cc->n_in + k] = tb_new(bits, 2, sh, NULL, 0);
        U[k] = &P[1 + cc->n_in + k]->dl;
        out *= cc->out[k];
        S *= cc->s[k];
      }
      int np = 1 + cc->n_in + cc->n_out;
      int64_t csh[2] = {S, T}, xs[2] = {M, in}, ys[2] = {M, out}, bs[1] = {out},
              kn[1] = {M * (S + T)};
      P[0] = tb_new(bits, 2, csh, NULL, 0);
      test_tensor* x = tb_new(bits, 2, xs, NULL, 0);
      test_tensor* b = tb_new(bits, 1, bs, NULL, 0);
      test_tensor* g = tb_new(bits, 2, ys, NULL, 0);
      test_tensor* kept = tb_output(bits, 1, kn);
      test_tensor* y[2] = {tb_output(bits, 2, ys), tb_output(bits, 2, ys)};
      double tol = bits == 64 ? 1e-12 : 1e-5;
      for (int keep = 0; keep < 2; ++keep) {
        fct_context c = test_ctx(0);
        size_t bytes = 0;
        DLTensor* st = keep ? &kept->dl : NULL;
        fct_status rc = fct_tucker_linear_forward_workspace(&c, &x->dl, &P[0]->dl, cc->n_in, V,
                                                            cc->n_out, U, &b->dl, &y[keep]->dl,
                                                            st, &bytes);
        CHECK(rc == FCT_OK, "%s: forward workspace: %s", label, test_err);
        test_workspace(&c, bytes);
        rc = fct_tucker_linear_forward(&c, &x->dl, &P[0]->dl, cc->n_in, V, cc->n_out, U, &b->dl,
                                       &y[keep]->dl, st);
        CHECK(rc == FCT_OK, "%s: forward: %s", label, test_err);
      }
      int64_t nan_at = -1;
      for (int64_t i = 0; i < kn[0] && nan_at < 0; ++i)
        if (!isfinite(flat_get(kept, i))) nan_at = i;
      CHECK(nan_at < 0, "%s: states[%lld] not written", label, (long long)nan_at);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < out; ++o) {
          int64_t ix[2] = {m, o};
          double a = tb_get(y[0], ix), k = tb_get(y[1], ix);
          if (fabs(a - k) > tol * (1 + fabs(a))) {
            CHECK(false, "%s: y[%lld, %lld] %g with states, %g without", label, (long long)m,
                  (long long)o, k, a);
            m = M;
            break;
          }
        }
      /* Every gradient; grad_x alone; the core and the output factors; the
       * input factors but the first. */
      for (int variant = 0; variant < 4; ++variant) {
        test_tensor* gx[2];
        test_tensor* gP[2][9];
        for (int keep = 0; keep < 2; ++keep) {
          gx[keep] = tb_output(bits, 2, xs);
          for (int k = 0; k < np; ++k) gP[keep][k] = tb_output(bits, 2, P[k]->shape);
          DLTensor *gV[4] = {0}, *gU[4] = {0};
          for (int k = 0; k < cc->n_in; ++k)
            if (variant == 0 || (variant == 3 && k > 0)) gV[k] = &gP[keep][1 + k]->dl;
          for (int k = 0; k < cc->n_out; ++k)
            if (variant == 0 || variant == 2) gU[k] = &gP[keep][1 + cc->n_in + k]->dl;
          DLTensor* gxd = variant <= 1 ? &gx[keep]->dl : NULL;
          DLTensor* gcd = variant == 0 || variant == 2 ? &gP[keep][0]->dl : NULL;
          const DLTensor* st = keep ? &kept->dl : NULL;
          fct_context c = test_ctx(0);
          size_t bytes = 0;
          fct_status rc = fct_tucker_linear_backward_workspace(
              &c, &g->dl, &x->dl, &P[0]->dl, cc->n_in, V, cc->n_out, U, st, gxd, gcd,
              (const DLTensor* const*)gV, (const DLTensor* const*)gU, NULL, &bytes);
          CHECK(rc == FCT_OK, "%s: backward workspace: %s", label, test_err);
          test_workspace(&c, bytes);
          rc = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &P[0]->dl, cc->n_in, V, cc->n_out,
                                          U, st, gxd, gcd, gV, gU, NULL);
          CHECK(rc == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
        }
        double worst = 0;
        bool nan = false;
        for (int k = -1; k < np; ++k) {
          const test_tensor* a = k < 0 ? gx[0] : gP[0][k];
          const test_tensor* kk = k < 0 ? gx[1] : gP[1][k];
          int64_t n = tb_numel(a);
          double scale = 1;
          for (int64_t i = 0; i < n; ++i) {
            double va = flat_get(a, i);
            if (isfinite(va) && fabs(va) > scale) scale = fabs(va);
          }
          for (int64_t i = 0; i < n; ++i) {
            double va = flat_get(a, i), vk = flat_get(kk, i);
            if (isnan(va) != isnan(vk)) nan = true; /* asked for in one run only */
            if (!isnan(va) && fabs(va - vk) / scale > worst) worst = fabs(va - vk) / scale;
          }
        }
        CHECK(!nan && worst <= tol, "%s: variant %d: gradients with states differ by %.3g%s",
              label, variant, worst, nan ? " (NaN in one)" : "");
        for (int keep = 0; keep < 2; ++keep) {
          tb_free(gx[keep]);
          for (int k = 0; k < np; ++k) tb_free(gP[keep][k]);
        }
      }
      for (int k = 0; k < np; ++k) tb_free(P[k]);
      tb_free(x); tb_free(b); tb_free(g); tb_free(kept); tb_free(y[0]); tb_free(y[1]);
    }
}

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, v0[2] = {2, 2}, v1[2] = {3, 2}, u0[2] = {5, 3}, cs[2] = {3, 4},
          ys[2] = {4, 5};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* V0 = tb_new(32, 2, v0, NULL, 0);
  test_tensor* V1 = tb_new(32, 2, v1, NULL, 0);
  test_tensor* U0 = tb_new(32, 2, u0, NULL, 0);
  test_tensor* core = tb_new(32, 2, cs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  const DLTensor* V[2] = {&V0->dl, &V1->dl};
  const DLTensor* U[1] = {&U0->dl};
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 20);
  fct_status st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  CHECK(st == FCT_OK, "valid call: %s", test_err);
  core->shape[1] = 5;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "core", "core shape");
  core->shape[1] = 4;
  V1->shape[0] = 4; /* in = 8 */
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "x: expected a last dim of 8", "in mismatch");
  V1->shape[0] = 3;
  V1->shape[1] = 0;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "in_factors[1]", "rank 0");
  V1->shape[1] = 2;
  V0->dl.ndim = 3;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NDIM, "in_factors[0]", "3-D factor");
  V0->dl.ndim = 2;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 0, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "out_factors", "no output factors");
  y->shape[1] = 6;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "y shape");
  y->shape[1] = 5;
  c.workspace_bytes = 8;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 20);
  int64_t i11[2] = {1, 1};
  tb_set(core, i11, NAN);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "core", "NaN in the core");
  c.flags = 0;
  tb_set(core, i11, 0.25);
  test_tensor* g = tb_new(32, 2, ys, NULL, 0);
  test_tensor* gcore = tb_output(32, 2, v1); /* wrong shape */
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, NULL, NULL,
                                  &gcore->dl, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_core", "grad_core shape");
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, NULL, &x->dl, NULL,
                                  NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_x", "grad_x aliases x");

  /* States: T + S = 4 + 3 = 7 per row, M = 4. */
  int64_t kn[1] = {28};
  test_tensor* kept = tb_output(32, 1, kn);
  test_tensor* gx = tb_output(32, 2, xs);
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, &kept->dl);
  CHECK(st == FCT_OK, "forward with states: %s", test_err);
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &kept->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  CHECK(st == FCT_OK, "backward with states: %s", test_err);
  kept->shape[0] = 27;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, &kept->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "states", "states of the wrong size (forward)");
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &kept->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "states", "states of the wrong size (backward)");
  kept->shape[0] = 28;
  kept->dl.dtype.bits = 64;
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &kept->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "states", "states of another dtype");
  kept->dl.dtype.bits = 32;
  kept->dl.device.device_type = kDLCUDA;
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &kept->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_DEVICE, "states", "states on another device");
  kept->dl.device.device_type = kDLCPU;
  int64_t wn[1] = {56};
  test_tensor* wide = tb_output(32, 1, wn); /* 28 elements, every other one */
  wide->shape[0] = 28;
  wide->strides[0] = 2;
  wide->dl.strides = wide->strides;
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &wide->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "states", "strided states");
  st = fct_tucker_linear_backward(&c, &g->dl, &x->dl, &core->dl, 2, V, 1, U, &x->dl, &gx->dl,
                                  NULL, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "states", "x as states");
  DLTensor over = kept->dl; /* states overlapping y */
  over.data = y->dl.data;
  st = fct_tucker_linear_forward(&c, &x->dl, &core->dl, 2, V, 1, U, NULL, &y->dl, &over);
  test_expect_fail(st, FCT_ERR_LAYOUT, "states", "states overlapping y");
  tb_free(wide);
  /* Not kept for shapes whose T + S exceeds in + out. */
  int64_t ir[1] = {4}, im[1] = {2}, sts = -1;
  st = fct_tucker_linear_states(1, im, ir, 1, im, ir, &sts);
  CHECK(st == FCT_OK && sts == 0, "states of T + S = 8 > in + out = 4: %d %lld", st,
        (long long)sts);
  st = fct_tucker_linear_states(1, im, ir, 1, im, NULL, &sts);
  CHECK(st != FCT_OK, "states with NULL out_ranks: %d", st);
  tb_free(kept);
  tb_free(gx);

  int64_t modes[4] = {8, 8, 8, 8}, ranks[4] = {6, 6, 6, 6};
  fct_linear_plan_info info;
  st = fct_tucker_linear_plan(4, modes, ranks, 4, modes, ranks, 2048, (DLDevice){kDLCPU, 0},
                              (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_OK && info.forward_flops > 2.0 * 2048 * 1296 * 1296 &&
            info.forward_flops < 2.0 * 2048 * 4096 * 4096 / 5 && strstr(info.plan, "tucker"),
        "tucker plan: %d %g %s", st, info.forward_flops, info.plan);
  /* Sizes no tensor of the ops could have (tests/fuzz): refused before the
   * plan's products of them overflow int64. */
  int64_t big[1] = {(int64_t)1 << 40}, r1[1] = {2};
  st = fct_tucker_linear_plan(1, big, r1, 1, big, r1, 1 << 20, (DLDevice){kDLCPU, 0},
                              (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "tucker plan with in = out = 2^40: %d", st);
  st = fct_tucker_linear_plan(1, r1, r1, 1, r1, r1, (int64_t)1 << 40, (DLDevice){kDLCPU, 0},
                              (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "tucker plan with a batch of 2^40: %d", st);

  tb_free(x); tb_free(V0); tb_free(V1); tb_free(U0); tb_free(core); tb_free(y); tb_free(g);
  tb_free(gcore);
}

int main(void) {
  test_values();
  test_kept_states();
  test_errors();
  test_free_workspace();
  return test_report();
}
