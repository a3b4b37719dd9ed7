/*
 * cp_linear forward and backward against a float64 reference that forms W
 * naively from the factors (test_tensorized.c): many mode shapes and ranks
 * (R below, equal to and far above in/out), d = 1..3 on each side, modes of
 * size 1, M = 1 (GEMV), M = 0, batch dims, transposed/gapped x, factors
 * stored column-major, with and without bias and saved z, the chunked paths
 * (FCT_FLAG_SMALL_CHUNKS), every subset of gradients; then bad arguments.
 * Outputs start NaN-filled so an element never written shows.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_tensorized.h"

typedef struct cp_case {
  int64_t M;
  int n_in, n_out;
  int64_t in[4], out[4];
  int64_t R;
} cp_case;

typedef struct cp_model {
  int n_in, n_out;
  int64_t in[4], out[4], R, nin, nout;
} cp_model;

/* W[o, i] = Σ_r ∏ A_k[i_k, r] ∏ B_k[o_k, r]; params = A_0.., B_0.. */
static void cp_reconstruct(const void* mp, double* const* P, double* W) {
  const cp_model* m = mp;
  for (int64_t o = 0; o < m->nout; ++o)
    for (int64_t i = 0; i < m->nin; ++i) {
      int64_t oi[4], ii[4];
      tz_unravel(i, m->n_in, m->in, ii);
      tz_unravel(o, m->n_out, m->out, oi);
      double s = 0;
      for (int64_t r = 0; r < m->R; ++r) {
        double p = 1;
        for (int k = 0; k < m->n_in; ++k) p *= P[k][ii[k] * m->R + r];
        for (int k = 0; k < m->n_out; ++k) p *= P[m->n_in + k][oi[k] * m->R + r];
        s += p;
      }
      W[o * m->nin + i] = s;
    }
}

typedef struct layout_case {
  const char* name;
  int x3d;        /* x as [2, M/2, in] */
  int x_colmajor; /* x stored column-major */
  int64_t gap;    /* extra elements between x's rows */
  int f_colmajor; /* factors stored column-major */
} layout_case;

static void run_case(int bits, const cp_case* cc, const layout_case* L, bool bias, bool keep_z,
                     uint32_t flags) {
  char label[256];
  snprintf(label, sizeof label, "f%d M=%lld R=%lld n_in=%d n_out=%d %s bias=%d z=%d flags=%u",
           bits, (long long)cc->M, (long long)cc->R, cc->n_in, cc->n_out, L->name, bias, keep_z,
           flags);
  cp_model m = {cc->n_in, cc->n_out, {0}, {0}, cc->R, 1, 1};
  for (int k = 0; k < cc->n_in; ++k) m.in[k] = cc->in[k], m.nin *= cc->in[k];
  for (int k = 0; k < cc->n_out; ++k) m.out[k] = cc->out[k], m.nout *= cc->out[k];
  int64_t M = cc->M, in = m.nin, out = m.nout, R = m.R;
  int64_t xs[3], ys[3], zs[3];
  int nd = test_batch_shapes(L->x3d, M, in, out, xs, ys);
  memcpy(zs, xs, sizeof xs);
  zs[nd - 1] = R;
  int col[3] = {1, 0, 0};
  test_tensor* x = tb_new(bits, nd, xs, L->x_colmajor ? col : NULL, L->gap);
  test_tensor *F[8], **A = F, **B = F + m.n_in, *gA[4], *gB[4];
  DLTensor *dA[4], *dB[4], *dgA[4], *dgB[4];
  for (int k = 0; k < m.n_in; ++k) {
    int64_t sh[2] = {m.in[k], R};
    A[k] = tb_new(bits, 2, sh, L->f_colmajor ? col : NULL, 0);
    dA[k] = &A[k]->dl;
  }
  for (int k = 0; k < m.n_out; ++k) {
    int64_t sh[2] = {m.out[k], R};
    B[k] = tb_new(bits, 2, sh, L->f_colmajor ? col : NULL, 0);
    dB[k] = &B[k]->dl;
  }
  int64_t bs[1] = {out};
  test_tensor* b = bias ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* g = tb_new(bits, nd, ys, NULL, 0);
  test_tensor* y = tb_output(bits, nd, ys);
  test_tensor* z = tb_output(bits, nd, zs);

  /* Reference, and z = x · KR(A). */
  tz_ref Ref = tz_reference(cp_reconstruct, &m, x, F, m.n_in + m.n_out, b, g, M, in, out);
  double* zr = calloc((size_t)(M * R) + 1, sizeof(double));
  for (int64_t mm = 0; mm < M; ++mm)
    for (int64_t r = 0; r < R; ++r) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) {
        int64_t rem = i;
        double p = 1;
        for (int k = m.n_in - 1; k >= 0; --k)
          p *= Ref.P[k][(rem % m.in[k]) * R + r], rem /= m.in[k];
        s += Ref.x[mm * in + i] * p;
      }
      zr[mm * R + r] = s;
    }
  double tol = bits == 64 ? 1e-11 : 3e-5 * sqrt((double)(in + out + R + M + 1));

  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  fct_status st = fct_cp_linear_forward_workspace(&c, &x->dl, m.n_in, (const DLTensor* const*)dA,
                                                  m.n_out, (const DLTensor* const*)dB,
                                                  b ? &b->dl : NULL, &y->dl,
                                                  keep_z ? &z->dl : NULL, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_cp_linear_forward(&c, &x->dl, m.n_in, (const DLTensor* const*)dA, m.n_out,
                             (const DLTensor* const*)dB, b ? &b->dl : NULL, &y->dl,
                             keep_z ? &z->dl : NULL);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, Ref.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  if (keep_z) {
    e = test_rel_err(z, zr, M, R);
    CHECK(e <= tol, "%s: z error %.3g", label, e);
  }

  /* Backward variants: everything; grad_x only; out factors + bias only;
   * in factors only (one of them skipped). */
  for (int variant = 0; variant < 4; ++variant) {
    bool want_x = variant <= 1, want_b = variant == 0 || variant == 2;
    test_tensor* gx = tb_output(bits, nd, xs);
    test_tensor* gb = tb_output(bits, 1, bs);
    DLTensor** pgA = NULL;
    DLTensor** pgB = NULL;
    for (int k = 0; k < m.n_in; ++k) {
      int64_t sh[2] = {m.in[k], R};
      gA[k] = tb_output(bits, 2, sh);
      dgA[k] = (variant == 0 || (variant == 3 && k != m.n_in - 1) || (variant == 3 && m.n_in == 1))
                   ? &gA[k]->dl
                   : NULL;
    }
    for (int k = 0; k < m.n_out; ++k) {
      int64_t sh[2] = {m.out[k], R};
      gB[k] = tb_output(bits, 2, sh);
      dgB[k] = (variant == 0 || variant == 2) ? &gB[k]->dl : NULL;
    }
    if (variant == 0 || variant == 3) pgA = dgA;
    if (variant == 0 || variant == 2) pgB = dgB;
    const DLTensor* zin = keep_z ? &z->dl : NULL;
    c = test_ctx(flags);
    st = fct_cp_linear_backward_workspace(&c, &g->dl, &x->dl, m.n_in, (const DLTensor* const*)dA,
                                          m.n_out, (const DLTensor* const*)dB, zin,
                                          want_x ? &gx->dl : NULL, (const DLTensor* const*)pgA,
                                          (const DLTensor* const*)pgB, want_b ? &gb->dl : NULL,
                                          &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace %d: %s", label, variant, test_err);
    test_workspace(&c, bytes);
    st = fct_cp_linear_backward(&c, &g->dl, &x->dl, m.n_in, (const DLTensor* const*)dA, m.n_out,
                                (const DLTensor* const*)dB, zin, want_x ? &gx->dl : NULL, pgA,
                                pgB, want_b ? &gb->dl : NULL);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    if (want_x) {
      e = test_rel_err(gx, Ref.gx, M, in);
      CHECK(e <= tol, "%s: grad_x error %.3g (variant %d)", label, e, variant);
    }
    if (want_b) {
      e = test_rel_err(gb, Ref.gb, 1, out);
      CHECK(e <= tol, "%s: grad_bias error %.3g (variant %d)", label, e, variant);
    }
    for (int k = 0; pgA && k < m.n_in; ++k) {
      if (!pgA[k]) continue;
      e = test_rel_err(gA[k], Ref.gP[k], m.in[k], R);
      CHECK(e <= tol, "%s: grad_in_factors[%d] error %.3g (variant %d)", label, k, e, variant);
    }
    for (int k = 0; pgB && k < m.n_out; ++k) {
      e = test_rel_err(gB[k], Ref.gP[m.n_in + k], m.out[k], R);
      CHECK(e <= tol, "%s: grad_out_factors[%d] error %.3g (variant %d)", label, k, e, variant);
    }
    tb_free(gx);
    tb_free(gb);
    for (int k = 0; k < m.n_in; ++k) tb_free(gA[k]);
    for (int k = 0; k < m.n_out; ++k) tb_free(gB[k]);
  }

  for (int k = 0; k < m.n_in + m.n_out; ++k) tb_free(F[k]);
  tz_ref_free(&Ref);
  free(zr);
  tb_free(x); tb_free(b); tb_free(g); tb_free(y); tb_free(z);
}

static void test_values(void) {
  static const cp_case cases[] = {
      {5, 2, 1, {2, 3}, {4}, 3},
      {1, 3, 2, {3, 2, 2}, {2, 3}, 5},     /* M = 1: GEMV */
      {0, 2, 2, {2, 2}, {3, 1}, 2},        /* empty batch */
      {7, 1, 1, {4}, {5}, 1},              /* one mode each side, rank 1 */
      {6, 3, 2, {2, 2, 2}, {3, 3}, 40},    /* R far above in and out */
      {4, 2, 2, {1, 3}, {2, 1}, 2},        /* modes of size 1 */
      {34, 2, 2, {4, 4}, {4, 4}, 7},       /* more rows */
      /* a few rows: the forward (first), both passes (the other two) apply
       * the last factor of each side apart */
      {1, 3, 3, {4, 4, 4}, {4, 4, 3}, 6},
      {1, 3, 3, {2, 2, 16}, {2, 2, 16}, 5},
      {2, 2, 2, {4, 16}, {16, 4}, 3},
  };
  static const layout_case layouts[] = {
      {"contiguous", 0, 0, 0, 0},
      {"x col-major, factors col-major", 0, 1, 0, 1},
      {"x gapped rows", 0, 0, 3, 0},
      {"x 3-D", 1, 0, 0, 0},
  };
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci)
      for (size_t li = 0; li < sizeof layouts / sizeof layouts[0]; ++li)
        for (int variant = 0; variant < 2; ++variant) {
          if (layouts[li].x3d && cases[ci].M % 2) continue;
          bool bias = variant == 0, keep_z = variant == 0;
          run_case(bits, &cases[ci], &layouts[li], bias, keep_z, 0);
          if (li == 0 || li == 2)
            run_case(bits, &cases[ci], &layouts[li], !bias, keep_z, FCT_FLAG_SMALL_CHUNKS);
        }
}

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, a0[2] = {2, 3}, a1[2] = {3, 3}, b0[2] = {5, 3}, ys[2] = {4, 5};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* A0 = tb_new(32, 2, a0, NULL, 0);
  test_tensor* A1 = tb_new(32, 2, a1, NULL, 0);
  test_tensor* B0 = tb_new(32, 2, b0, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  const DLTensor* A[2] = {&A0->dl, &A1->dl};
  const DLTensor* B[1] = {&B0->dl};
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 20);
  fct_status st;

  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  CHECK(st == FCT_OK, "valid call: %s", test_err);

  A1->shape[1] = 4; /* rank differs */
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "in_factors[1]", "rank mismatch");
  A1->shape[1] = 3;
  B0->shape[1] = 2;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "out_factors[0]", "out rank mismatch");
  B0->shape[1] = 3;
  A1->shape[0] = 2; /* in = 4 != 6 */
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "x: expected a last dim of 4", "in mismatch");
  A1->shape[0] = 3;
  A0->shape[1] = 0;
  A1->shape[1] = 0;
  B0->shape[1] = 0;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "in_factors[0]", "rank 0");
  A0->shape[1] = A1->shape[1] = B0->shape[1] = 3;
  st = fct_cp_linear_forward(&c, &x->dl, 0, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "in_factors", "no input factors");
  st = fct_cp_linear_forward(&c, &x->dl, 9, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "in_factors", "too many factors");
  st = fct_cp_linear_forward(&c, &x->dl, 2, NULL, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "in_factors", "NULL array");
  test_tensor* A64 = tb_new(64, 2, a1, NULL, 0);
  const DLTensor* Amix[2] = {&A0->dl, &A64->dl};
  st = fct_cp_linear_forward(&c, &x->dl, 2, Amix, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "in_factors[1]", "dtype mix");
  int64_t bad_b[1] = {4};
  test_tensor* b = tb_new(32, 1, bad_b, NULL, 0);
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, &b->dl, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "bias", "bias size");
  /* y transposed: not C-contiguous; y aliasing x. */
  y->strides[0] = 1;
  y->strides[1] = 4;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y not contiguous");
  y->strides[0] = 5;
  y->strides[1] = 1;
  DLTensor alias = y->dl;
  alias.data = A0->dl.data;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &alias, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y overlaps a factor");
  /* Workspace too small. */
  c.workspace_bytes = 16;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 20);
  /* NaN in a factor with the finite check: named. */
  int64_t i01[2] = {0, 1};
  tb_set(A1, i01, NAN);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_cp_linear_forward(&c, &x->dl, 2, A, 1, B, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "in_factors[1]", "NaN in a factor");
  CHECK(strstr(test_err, "in_factors[0]") == NULL, "only the factor holding NaN is named: %s",
        test_err);
  tb_set(A1, i01, 0.5);
  /* Backward: grad_y with NaN; a factor gradient of the wrong shape. */
  test_tensor* g = tb_new(32, 2, ys, NULL, 0);
  int64_t i00[2] = {0, 0};
  tb_set(g, i00, INFINITY);
  test_tensor* gx = tb_output(32, 2, xs);
  st = fct_cp_linear_backward(&c, &g->dl, &x->dl, 2, A, 1, B, NULL, &gx->dl, NULL, NULL, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "grad_y", "Inf in grad_y");
  c.flags = 0;
  test_tensor* gA0 = tb_output(32, 2, a1); /* A1's shape, not A0's */
  DLTensor* gA[2] = {&gA0->dl, NULL};
  st = fct_cp_linear_backward(&c, &g->dl, &x->dl, 2, A, 1, B, NULL, NULL, gA, NULL, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_in_factors[0]", "gradient shape");
  DLTensor* gA_alias[2] = {NULL, &A1->dl};
  st = fct_cp_linear_backward(&c, &g->dl, &x->dl, 2, A, 1, B, NULL, NULL, gA_alias, NULL, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_in_factors[1]", "gradient aliasing its factor");

  /* The plan report. */
  int64_t modes[4] = {8, 8, 8, 8};
  fct_linear_plan_info info;
  st = fct_cp_linear_plan(4, modes, 4, modes, 1311, 2048, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_OK && info.forward_flops > 2.0 * 2048 * 1311 * 8192 &&
            strstr(info.plan, "Khatri-Rao") != NULL,
        "cp plan: %d %g %s", st, info.forward_flops, info.plan);
  st = fct_cp_linear_plan(0, modes, 4, modes, 8, 1, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_INVALID_VALUE, "cp plan with no input modes: %d", st);
  /* Sizes no tensor of the ops could have (tests/fuzz): the ops' bounds,
   * before the plan's products of them overflow int64. */
  int64_t huge[1] = {(int64_t)1 << 40}, one[1] = {2};
  st = fct_cp_linear_plan(1, huge, 1, huge, 4, 1 << 20, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "cp plan with in = out = 2^40: %d", st);
  st = fct_cp_linear_plan(1, one, 1, one, 4, (int64_t)1 << 40, (DLDevice){kDLCPU, 0},
                          (DLDataType){kDLFloat, 32, 1}, &info);
  CHECK(st == FCT_ERR_OVERFLOW, "cp plan with a batch of 2^40: %d", st);

  tb_free(x); tb_free(A0); tb_free(A1); tb_free(B0); tb_free(y); tb_free(A64); tb_free(b);
  tb_free(g); tb_free(gx); tb_free(gA0);
}

/* z given with strides BLAS cannot read is recomputed from x instead, so x
 * must then be packed when its leading dims do not fold: the backward with
 * such z and x gives what it gives with dense x and no z. */
static void test_recomputed_z_packs_x(int bits) {
  int64_t xs[3] = {2, 3, 4}, zs[3] = {2, 3, 3}, ys[3] = {2, 3, 5};
  int perm[3] = {1, 0, 2}; /* memory [3, 2, k]: leading dims do not fold */
  int64_t as[2] = {2, 3}, bs[2] = {5, 3};
  test_tensor *A0 = tb_new(bits, 2, as, NULL, 0), *A1 = tb_new(bits, 2, as, NULL, 0);
  test_tensor* B0 = tb_new(bits, 2, bs, NULL, 0);
  const DLTensor* A[2] = {&A0->dl, &A1->dl};
  const DLTensor* B[1] = {&B0->dl};
  test_tensor* xd = tb_new(bits, 3, xs, NULL, 0);
  test_tensor* xp = tb_new(bits, 3, xs, perm, 0);
  test_tensor* g = tb_new(bits, 3, ys, NULL, 0);
  test_tensor* y = tb_output(bits, 3, ys);
  test_tensor* zd = tb_output(bits, 3, zs);
  test_tensor* zp = tb_new(bits, 3, zs, perm, 0);
  int64_t i[3];
  for (i[0] = 0; i[0] < 2; ++i[0])
    for (i[1] = 0; i[1] < 3; ++i[1])
      for (i[2] = 0; i[2] < 4; ++i[2]) tb_set(xp, i, tb_get(xd, i));
  fct_context c = test_ctx(0);
  size_t bytes = 0;
  fct_status st = fct_cp_linear_forward_workspace(&c, &xd->dl, 2, A, 1, B, NULL, &y->dl, &zd->dl,
                                                  &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK) st = fct_cp_linear_forward(&c, &xd->dl, 2, A, 1, B, NULL, &y->dl, &zd->dl);
  CHECK(st == FCT_OK, "recomputed z: forward: %s", test_err);
  for (i[0] = 0; i[0] < 2; ++i[0])
    for (i[1] = 0; i[1] < 3; ++i[1])
      for (i[2] = 0; i[2] < 3; ++i[2]) tb_set(zp, i, tb_get(zd, i));
  test_tensor* want = tb_output(bits, 2, bs);
  test_tensor* got = tb_output(bits, 2, bs);
  for (int run = 0; run < 2; ++run) {
    DLTensor* gB[1] = {run == 0 ? &want->dl : &got->dl};
    const DLTensor* x = run == 0 ? &xd->dl : &xp->dl;
    const DLTensor* z = run == 0 ? NULL : &zp->dl;
    c = test_ctx(0);
    st = fct_cp_linear_backward_workspace(&c, &g->dl, x, 2, A, 1, B, z, NULL, NULL,
                                          (const DLTensor* const*)gB, NULL, &bytes);
    test_workspace(&c, bytes);
    if (st == FCT_OK) st = fct_cp_linear_backward(&c, &g->dl, x, 2, A, 1, B, z, NULL, NULL, gB, NULL);
    CHECK(st == FCT_OK, "recomputed z: backward %d: %s", run, test_err);
  }
  double* ref = tz_to_double(want);
  double e = test_rel_err(got, ref, 5, 3);
  CHECK(e <= (bits == 64 ? 1e-12 : 1e-5), "f%d recomputed z, unfoldable x: grad_out_factors[0] "
        "error %.3g against dense x", bits, e);
  free(ref);
  test_tensor* all[] = {A0, A1, B0, xd, xp, g, y, zd, zp, want, got};
  for (size_t k = 0; k < sizeof all / sizeof *all; ++k) tb_free(all[k]);
}

int main(void) {
  test_values();
  test_errors();
  test_recomputed_z_packs_x(64);
  test_recomputed_z_packs_x(32);
  test_free_workspace();
  return test_report();
}
