/*
 * Factorized embeddings (lowrank and TT) forward and backward against naive
 * float64 references on random nonzero factors: int64 and int32 indices of
 * 0 to 3 dims, transposed indices, repeated indices, padding_idx, an empty
 * batch, strided and packed factors and grad_y, small chunks, a thread pool
 * running blocks in reverse; outputs NaN-filled so an unwritten element
 * fails. Then determinism of the scatter-add, and bad arguments with their
 * status codes and messages.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

/* ------------------------------------------------------------------------- */
/* Index tensors                                                              */
/* ------------------------------------------------------------------------- */

static uint64_t g_rng = 12345;
static int64_t rnd_below(int64_t n) {
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return (int64_t)((g_rng >> 33) % (uint64_t)n);
}

/* An index tensor of `shape` (2-D ones stored column-major when
 * `transposed`), values drawn in [0, num) with some repeats, or `fixed`. */
static test_index* idx_new(int bits, int nd, const int64_t* shape, bool transposed, int64_t num,
                           const int64_t* fixed) {
  int64_t count = 1;
  for (int i = 0; i < nd; ++i) count *= shape[i];
  int64_t* v = calloc((size_t)count + 1, sizeof(int64_t));
  for (int64_t p = 0; p < count; ++p)
    v[p] = fixed ? fixed[p] : (p % 3 == 2 && p > 0 ? v[p - 2] : rnd_below(num));
  test_index* t = tb_index_new(bits, nd, shape, transposed, v);
  free(v);
  return t;
}

/* A float tensor [rows, cols] keeping every other column of a wider one
 * (neither stride is 1: BLAS cannot read it, so it gets packed). */
static test_tensor* every_other(int bits, int64_t rows, int64_t cols) {
  int64_t wide[2] = {rows, 2 * cols};
  test_tensor* t = tb_new(bits, 2, wide, NULL, 0);
  t->shape[1] = cols;
  t->strides[1] = 2;
  return t;
}

static int64_t prod(const int64_t* v, int n) {
  int64_t p = 1;
  for (int i = 0; i < n; ++i) p *= v[i];
  return p;
}

/* Refills a dense output with NaN (an element the op fails to write shows). */
static test_tensor* fill_nan(test_tensor* t) {
  int64_t n = tb_numel(t);
  for (int64_t p = 0; p < n; ++p) {
    if (t->dl.dtype.bits == 32) ((float*)t->buf)[p] = NAN;
    else ((double*)t->buf)[p] = NAN;
  }
  return t;
}

/* ------------------------------------------------------------------------- */
/* Low-rank                                                                   */
/* ------------------------------------------------------------------------- */

typedef struct lr_case {
  const char* name;
  int64_t num, R, dim;
  int nd;
  int64_t ishape[3];
  bool transposed_idx;
  int64_t pad;
  int factors;  /* 0 row-major, 1 U and V column-major, 2 V every other column */
  int grad_y;   /* 0 contiguous, 1 every other column (packed) */
} lr_case;

static void lowrank_case(int bits, int idx_bits, uint32_t flags, const lr_case* L) {
  char label[256];
  snprintf(label, sizeof label, "lowrank f%d i%d flags=%u %s", bits, idx_bits, flags, L->name);
  const int64_t num = L->num, R = L->R, dim = L->dim;
  int cm[2] = {1, 0};
  int64_t us[2] = {num, R}, vs[2] = {R, dim};
  test_tensor* U = tb_new(bits, 2, us, L->factors == 1 ? cm : NULL, 0);
  test_tensor* V = L->factors == 2 ? every_other(bits, R, dim)
                                   : tb_new(bits, 2, vs, L->factors == 1 ? cm : NULL, 0);
  test_index* I = idx_new(idx_bits, L->nd, L->ishape, L->transposed_idx, num, NULL);
  int64_t B = I->count;
  if (L->pad >= 0 && B > 1) { /* make sure the padding row is looked up */
    int64_t fixed[64];
    for (int64_t p = 0; p < B; ++p) fixed[p] = p == 1 ? L->pad : I->vals[p];
    tb_index_free(I);
    I = idx_new(idx_bits, L->nd, L->ishape, L->transposed_idx, num, fixed);
  }
  int64_t ys[4];
  for (int i = 0; i < L->nd; ++i) ys[i] = L->ishape[i];
  ys[L->nd] = dim;
  test_tensor* y = tb_output(bits, L->nd + 1, ys);
  test_tensor* g = L->grad_y ? every_other(bits, B, dim) : tb_new(bits, L->nd + 1, ys, NULL, 0);
  if (L->grad_y) { /* view it with y's shape: [*ishape, dim], rows 2·dim apart */
    g->dl.ndim = L->nd + 1;
    memcpy(g->shape, ys, sizeof ys);
    int64_t s = 2 * dim;
    g->strides[L->nd] = 2;
    for (int i = L->nd - 1; i >= 0; --i) {
      g->strides[i] = s;
      s *= ys[i];
    }
  }
  test_tensor* gU = tb_output(bits, 2, us);
  test_tensor* gV = tb_output(bits, 2, vs);

  /* References in float64. */
  double* ry = calloc((size_t)(B * dim) + 1, sizeof(double));
  double* rgU = calloc((size_t)(num * R) + 1, sizeof(double));
  double* rgV = calloc((size_t)(R * dim) + 1, sizeof(double));
  for (int64_t n = 0; n < B; ++n) {
    int64_t i = I->vals[n];
    if (i == L->pad) continue; /* zero row, no gradient */
    for (int64_t o = 0; o < dim; ++o) {
      double s = 0, go = tb_get2(g, n, o);
      for (int64_t a = 0; a < R; ++a) {
        s += tb_get2(U, i, a) * tb_get2(V, a, o);
        rgU[i * R + a] += go * tb_get2(V, a, o);
        rgV[a * dim + o] += tb_get2(U, i, a) * go;
      }
      ry[n * dim + o] = s;
    }
  }
  double tol = bits == 64 ? 1e-12 : 1e-5 * sqrt((double)(R + B + 1));

  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  fct_status st = fct_lowrank_embedding_forward_workspace(&c, &I->dl, &U->dl, &V->dl, L->pad,
                                                          &y->dl, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, L->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, ry, B, dim);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  for (int64_t n = 0; n < B; ++n)
    if (I->vals[n] == L->pad)
      for (int64_t o = 0; o < dim; ++o)
        CHECK(tb_get2(y, n, o) == 0.0, "%s: padding row %lld not zero", label, (long long)n);

  /* Backward: both gradients, then each alone. */
  for (int variant = 0; variant < 3; ++variant) {
    fill_nan(gU);
    fill_nan(gV);
    DLTensor* ogU = variant != 2 ? &gU->dl : NULL;
    DLTensor* ogV = variant != 1 ? &gV->dl : NULL;
    c = test_ctx(flags);
    st = fct_lowrank_embedding_backward_workspace(&c, &g->dl, &I->dl, &U->dl, &V->dl, L->pad,
                                                  ogU, ogV, &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
    test_workspace(&c, bytes);
    st = fct_lowrank_embedding_backward(&c, &g->dl, &I->dl, &U->dl, &V->dl, L->pad, ogU, ogV);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    if (ogU) {
      e = test_rel_err(gU, rgU, num, R);
      CHECK(e <= tol, "%s: grad_U error %.3g (variant %d)", label, e, variant);
      for (int64_t i = 0; i < num; ++i) { /* rows not looked up (and padding): exactly 0 */
        bool seen = false;
        for (int64_t n = 0; n < B; ++n) seen |= I->vals[n] == i && i != L->pad;
        for (int64_t a = 0; !seen && a < R; ++a)
          CHECK(tb_get2(gU, i, a) == 0.0, "%s: grad_U row %lld not zero", label, (long long)i);
      }
    }
    if (ogV) {
      e = test_rel_err(gV, rgV, R, dim);
      CHECK(e <= tol, "%s: grad_V error %.3g (variant %d)", label, e, variant);
    }
  }
  free(ry); free(rgU); free(rgV);
  tb_free(U); tb_free(V); tb_free(y); tb_free(g); tb_free(gU); tb_free(gV);
  tb_index_free(I);
}

static void test_lowrank(uint32_t flags) {
  static const lr_case cases[] = {
      /* name, num, R, dim, nd, ishape, transposed, pad, factors, grad_y */
      {"2-d", 11, 4, 7, 2, {3, 5, 0}, false, -1, 0, 0},
      {"1-d, padding", 11, 4, 7, 1, {9, 0, 0}, false, 3, 0, 0},
      {"transposed indices", 11, 4, 7, 2, {4, 3, 0}, true, -1, 0, 0},
      {"0-d index", 11, 4, 7, 0, {0, 0, 0}, false, -1, 0, 0},
      {"3-d, column-major U/V", 13, 3, 8, 3, {2, 3, 2}, false, 5, 1, 0},
      {"V and grad_y packed", 9, 5, 6, 2, {5, 2, 0}, false, -1, 2, 1},
      {"rank 1", 6, 1, 5, 1, {7, 0, 0}, false, 0, 0, 0},
      {"full rank", 5, 5, 5, 1, {8, 0, 0}, false, -1, 0, 0},
      {"empty batch", 11, 4, 7, 2, {0, 5, 0}, false, 2, 0, 0},
      {"one row", 1, 2, 3, 1, {4, 0, 0}, false, -1, 0, 0},
      {"many rows", 200, 16, 24, 2, {6, 9, 0}, false, 7, 0, 0},
  };
  for (int bits = 32; bits <= 64; bits += 32)
    for (int ib = 32; ib <= 64; ib += 32)
      for (size_t k = 0; k < sizeof cases / sizeof cases[0]; ++k)
        lowrank_case(bits, ib, flags, &cases[k]);
}

/* ------------------------------------------------------------------------- */
/* Tensor-Train                                                               */
/* ------------------------------------------------------------------------- */

typedef struct tt_case {
  const char* name;
  int d;
  int64_t n[4], m[4], r[5];
  int64_t num;
  int nd;
  int64_t ishape[2];
  int64_t pad;
  bool strided_core; /* core 1 stored with its dims permuted: packed */
} tt_case;

/* Index i's digits, i_1 slowest. */
static void digits(const tt_case* T, int64_t i, int64_t* dig) {
  for (int k = T->d - 1; k >= 0; --k) {
    dig[k] = i % T->n[k];
    i /= T->n[k];
  }
}

/* Element G_k[a, ik, o, b]. */
static double core_at(test_tensor* const* G, int k, int64_t a, int64_t ik, int64_t o, int64_t b) {
  int64_t at[4] = {a, ik, o, b};
  return tb_get(G[k], at);
}

/* The reference row and, given g (nullable), the gradients: brute force
 * over every output multi-index and every choice of the inner ranks. */
static void tt_reference(const tt_case* T, test_tensor* const* G, int64_t i, const double* grow,
                         double* row, double* const* gG) {
  int d = T->d;
  int64_t dig[4], dim = prod(T->m, d);
  digits(T, i, dig);
  int64_t inner = prod(T->r + 1, d - 1);
  for (int64_t o = 0; o < dim; ++o) {
    int64_t om[4], rem = o;
    for (int k = d - 1; k >= 0; --k) {
      om[k] = rem % T->m[k];
      rem /= T->m[k];
    }
    double s = 0;
    for (int64_t q = 0; q < inner; ++q) {
      int64_t a[5] = {0, 0, 0, 0, 0}, rq = q;
      for (int k = d - 1; k >= 1; --k) {
        a[k] = rq % T->r[k];
        rq /= T->r[k];
      }
      double f[4], p = 1;
      for (int k = 0; k < d; ++k) {
        f[k] = core_at(G, k, a[k], dig[k], om[k], a[k + 1]);
        p *= f[k];
      }
      s += p;
      if (!grow) continue;
      for (int k = 0; k < d; ++k) { /* ∂p/∂G_k = the product of the others */
        double others = 1;
        for (int l = 0; l < d; ++l)
          if (l != k) others *= f[l];
        int64_t off = ((a[k] * T->n[k] + dig[k]) * T->m[k] + om[k]) * T->r[k + 1] + a[k + 1];
        gG[k][off] += grow[o] * others;
      }
    }
    row[o] = s;
  }
}

/* Runs the backward; returns the status. */
static fct_status tt_backward(uint32_t flags, const tt_case* T, const test_tensor* g,
                              const test_index* I, test_tensor* const* G, test_tensor* const* gG,
                              const bool* want) {
  const DLTensor* cores[4];
  DLTensor* gcores[4];
  for (int k = 0; k < T->d; ++k) {
    cores[k] = &G[k]->dl;
    gcores[k] = want[k] ? &fill_nan(gG[k])->dl : NULL;
  }
  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  fct_status st = fct_tt_embedding_backward_workspace(&c, &g->dl, &I->dl, T->d, cores, T->num,
                                                      T->pad, (const DLTensor* const*)gcores,
                                                      &bytes);
  if (st != FCT_OK) return st;
  test_workspace(&c, bytes);
  return fct_tt_embedding_backward(&c, &g->dl, &I->dl, T->d, cores, T->num, T->pad, gcores);
}

static void tt_case_run(int bits, int idx_bits, uint32_t flags, const tt_case* T) {
  char label[256];
  snprintf(label, sizeof label, "tt f%d i%d flags=%u %s", bits, idx_bits, flags, T->name);
  int d = T->d;
  int64_t dim = prod(T->m, d);
  test_tensor* G[4];
  test_tensor* gG[4];
  double* rgG[4];
  for (int k = 0; k < d; ++k) {
    int64_t sh[4] = {T->r[k], T->n[k], T->m[k], T->r[k + 1]};
    int order[4] = {2, 0, 3, 1};
    G[k] = tb_new(bits, 4, sh, T->strided_core && k == 1 ? order : NULL, 0);
    gG[k] = tb_output(bits, 4, sh);
    rgG[k] = calloc((size_t)prod(sh, 4), sizeof(double));
  }
  test_index* I = idx_new(idx_bits, T->nd, T->ishape, false, T->num, NULL);
  int64_t B = I->count;
  if (T->pad >= 0 && B > 1) {
    int64_t fixed[64];
    for (int64_t p = 0; p < B; ++p) fixed[p] = p == 1 ? T->pad : I->vals[p];
    tb_index_free(I);
    I = idx_new(idx_bits, T->nd, T->ishape, false, T->num, fixed);
  }
  int64_t ys[3];
  for (int i = 0; i < T->nd; ++i) ys[i] = T->ishape[i];
  ys[T->nd] = dim;
  test_tensor* y = tb_output(bits, T->nd + 1, ys);
  /* grad_y transposed in memory when 2-D (not contiguous: packed). */
  int tr[3] = {1, 0, 2};
  test_tensor* g = tb_new(bits, T->nd + 1, ys, T->nd == 1 ? tr : NULL, 0);
  double* ry = calloc((size_t)(B * dim) + 1, sizeof(double));
  double* grow = calloc((size_t)dim + 1, sizeof(double));
  for (int64_t n = 0; n < B; ++n) {
    if (I->vals[n] == T->pad) continue;
    for (int64_t o = 0; o < dim; ++o) grow[o] = tb_get2(g, n, o);
    tt_reference(T, G, I->vals[n], grow, ry + n * dim, rgG);
  }
  double tol = bits == 64 ? 1e-12 : 1e-5 * sqrt((double)(B + 8));

  const DLTensor* cores[4];
  for (int k = 0; k < d; ++k) cores[k] = &G[k]->dl;
  fct_context c = test_ctx(flags);
  size_t bytes = 0;
  fct_status st = fct_tt_embedding_forward_workspace(&c, &I->dl, d, cores, T->num, T->pad,
                                                     &y->dl, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_tt_embedding_forward(&c, &I->dl, d, cores, T->num, T->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, ry, B, dim);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);

  for (int variant = 0; variant < 2; ++variant) {
    bool want[4] = {true, variant == 0, true, variant == 0};
    st = tt_backward(flags, T, g, I, G, gG, want);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    for (int k = 0; k < d; ++k) {
      if (!want[k]) continue;
      /* rows of the 4-D tensor as tb_get2 folds it: [r·n·m, r'] */
      int64_t rows = T->r[k] * T->n[k] * T->m[k], cols = T->r[k + 1];
      e = test_rel_err(gG[k], rgG[k], rows, cols);
      CHECK(e <= tol, "%s: grad_cores[%d] error %.3g (variant %d)", label, k, e, variant);
    }
  }
  free(ry); free(grow);
  for (int k = 0; k < d; ++k) {
    tb_free(G[k]); tb_free(gG[k]); free(rgG[k]);
  }
  tb_free(y); tb_free(g); tb_index_free(I);
}

static const tt_case kTT[] = {
    /* name, d, n, m, r, num, nd, ishape, pad, strided_core */
    {"d=3 padded vocabulary", 3, {3, 2, 4}, {2, 3, 2}, {1, 3, 2, 1}, 20, 1, {13}, -1, false},
    {"d=3 padding, 2-d indices", 3, {3, 2, 4}, {2, 3, 2}, {1, 3, 2, 1}, 24, 2, {4, 5}, 7, false},
    {"d=2 packed core", 2, {5, 4}, {3, 4}, {1, 4, 1}, 17, 1, {11}, 16, true},
    {"d=1 (dense)", 1, {6}, {5}, {1, 1}, 6, 1, {9}, -1, false},
    {"d=4 modes of 1", 4, {2, 1, 3, 2}, {1, 2, 3, 1}, {1, 2, 3, 2, 1}, 12, 1, {10}, 0, true},
    {"empty batch", 3, {3, 2, 4}, {2, 3, 2}, {1, 3, 2, 1}, 20, 2, {0, 3}, -1, false},
    {"0-d index", 2, {5, 4}, {3, 4}, {1, 4, 1}, 20, 0, {0}, -1, false},
};

static void test_tt(uint32_t flags) {
  for (int bits = 32; bits <= 64; bits += 32)
    for (int ib = 32; ib <= 64; ib += 32)
      for (size_t k = 0; k < sizeof kTT / sizeof kTT[0]; ++k) tt_case_run(bits, ib, flags, &kTT[k]);
}

/* Batches large enough for the gather, the scatter-add and the TT chains to
 * be split across the pool's tasks (the small cases above stay serial). */
static const lr_case kBigLowrank = {"big batch", 300, 8, 16, 1, {4096, 0, 0}, false, -1, 0, 0};
static const tt_case kBigTT = {"big batch", 3, {4, 3, 4}, {4, 4, 4}, {1, 8, 8, 1}, 48, 1,
                               {1024}, -1, false};

static void test_big(void) {
  lowrank_case(32, 64, 0, &kBigLowrank);
  tt_case_run(64, 32, 0, &kBigTT);
}

/* The TT backward's gradients (no BLAS inside) are bit-identical with and
 * without a thread pool on a batch of many repeats: the scatter-add sums
 * each element in index order, whichever task owns it. */
static void test_determinism(void) {
  const tt_case* T = &kBigTT;
  int64_t sh[3][4];
  test_tensor *G[3], *gA[3], *gB[3];
  for (int k = 0; k < 3; ++k) {
    int64_t s[4] = {T->r[k], T->n[k], T->m[k], T->r[k + 1]};
    memcpy(sh[k], s, sizeof s);
    G[k] = tb_new(32, 4, s, NULL, 0);
    gA[k] = tb_output(32, 4, s);
    gB[k] = tb_output(32, 4, s);
  }
  int64_t B = T->ishape[0];
  int64_t* vals = malloc((size_t)B * sizeof(int64_t));
  for (int64_t p = 0; p < B; ++p) vals[p] = (p * 7) % 5 * 9; /* five indices, each ~200 times */
  test_index* I = idx_new(64, 1, T->ishape, false, T->num, vals);
  int64_t gs[2] = {B, 64};
  test_tensor* g = tb_new(32, 2, gs, NULL, 0);
  bool want[3] = {true, true, true};
  fct_cpu_set_thread_pool(NULL, NULL);
  CHECK(tt_backward(0, T, g, I, G, gA, want) == FCT_OK, "determinism serial: %s", test_err);
  fct_cpu_set_thread_pool(tb_reverse_pool, tb_three_threads);
  CHECK(tt_backward(0, T, g, I, G, gB, want) == FCT_OK, "determinism pool: %s", test_err);
  fct_cpu_set_thread_pool(NULL, NULL);
  for (int k = 0; k < 3; ++k)
    CHECK(memcmp(gA[k]->buf, gB[k]->buf, (size_t)prod(sh[k], 4) * 4) == 0,
          "grad_cores[%d] differs between serial and pooled runs", k);
  for (int k = 0; k < 3; ++k) {
    tb_free(G[k]); tb_free(gA[k]); tb_free(gB[k]);
  }
  free(vals);
  tb_free(g);
  tb_index_free(I);
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */
/* ------------------------------------------------------------------------- */

static void test_lowrank_errors(void) {
  int64_t us[2] = {10, 3}, vs[2] = {3, 4}, is[1] = {5}, ys[2] = {5, 4};
  test_tensor* U = tb_new(32, 2, us, NULL, 0);
  test_tensor* V = tb_new(32, 2, vs, NULL, 0);
  test_tensor* V64 = tb_new(64, 2, vs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  test_tensor* gU = tb_output(32, 2, us);
  int64_t ok_vals[5] = {0, 9, 3, 3, 1}, big_vals[5] = {0, 10, 3, 12, 1}, neg_vals[5] = {0, 1, -1,
                                                                                        2, 3};
  test_index* I = idx_new(64, 1, is, false, 10, ok_vals);
  test_index* Ibig = idx_new(64, 1, is, false, 10, big_vals);
  test_index* Ineg = idx_new(32, 1, is, false, 10, neg_vals);
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 16);
  fct_status st;

  st = fct_lowrank_embedding_forward(&c, &Ibig->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "index >= num");
  CHECK(strstr(test_err, "2 values out of range [0, 10)") && strstr(test_err, "position 1, is 10"),
        "message counts and locates: %s", test_err);
  st = fct_lowrank_embedding_forward(&c, &Ineg->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "negative index (int32)");
  CHECK(strstr(test_err, "is -1") != NULL, "negative value reported: %s", test_err);
  st = fct_lowrank_embedding_backward(&c, &y->dl, &Ibig->dl, &U->dl, &V->dl, -1, &gU->dl, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "backward index >= num");

  I->dl.dtype = (DLDataType){kDLFloat, 32, 1};
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "indices", "float indices");
  I->dl.dtype = (DLDataType){kDLInt, 16, 1};
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "indices", "int16 indices");
  I->dl.dtype = (DLDataType){kDLInt, 64, 1};
  I->dl.device = (DLDevice){kDLCUDA, 0};
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DEVICE, "indices", "indices on another device");
  I->dl.device = (DLDevice){kDLCPU, 0};
  st = fct_lowrank_embedding_forward(&c, NULL, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "indices", "NULL indices");
  /* Descriptors no memory can hold (tests/fuzz): misaligned, huge strides. */
  I->dl.byte_offset = 4;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "indices", "int64 indices at a 4-byte offset");
  I->dl.byte_offset = 0;
  int64_t huge_stride[1] = {(int64_t)1 << 61};
  int64_t* keep_strides = I->dl.strides;
  I->dl.strides = huge_stride;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "indices", "indices with a stride of 2^61 elements");
  I->dl.strides = keep_strides;

  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, 10, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "padding_idx", "padding_idx >= num");
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -2, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "padding_idx", "padding_idx -2");

  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V64->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "V", "dtype mix");
  V->shape[0] = 2;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "V", "V/R mismatch");
  V->shape[0] = 3;
  U->dl.ndim = 1;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_NDIM, "U", "1-D U");
  U->dl.ndim = 2;
  y->shape[1] = 5;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "y shape");
  y->shape[1] = 4;
  y->strides[0] = 0;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y broadcast");
  y->strides[0] = 4;
  DLTensor alias = y->dl;
  alias.data = U->dl.data;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &alias);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y overlaps U");
  st = fct_lowrank_embedding_backward(&c, &y->dl, &I->dl, &U->dl, &V->dl, -1, &V->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_U", "grad_U shape");
  st = fct_lowrank_embedding_backward(&c, &y->dl, &I->dl, &U->dl, &V->dl, -1, &U->dl, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_U", "grad_U aliases U");

  c.workspace_bytes = 8;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 16);
  CHECK(fct_lowrank_embedding_forward(NULL, &I->dl, &U->dl, &V->dl, -1, &y->dl) ==
            FCT_ERR_NULL_ARGUMENT, "NULL ctx");

  /* Overflowing sizes: an index tensor beyond int64, U beyond int64. */
  int64_t huge[2] = {(int64_t)1 << 62, 8}, hstr[2] = {0, 0};
  DLTensor hi = I->dl;
  hi.ndim = 2;
  hi.shape = huge;
  hi.strides = hstr;
  st = fct_lowrank_embedding_forward(&c, &hi, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "indices", "indices numel overflow");
  int64_t hu[2] = {(int64_t)1 << 40, (int64_t)1 << 40}, hus[2] = {0, 0};
  DLTensor hU = U->dl;
  hU.shape = hu;
  hU.strides = hus;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &hU, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "U", "U numel overflow");

  /* CUDA tensors without the backend. */
  if (!fct_cuda_available()) {
    DLTensor cu[4] = {I->dl, U->dl, V->dl, y->dl};
    for (int k = 0; k < 4; ++k) cu[k].device = (DLDevice){kDLCUDA, 0};
    st = fct_lowrank_embedding_forward(&c, &cu[0], &cu[1], &cu[2], -1, &cu[3]);
    test_expect_fail(st, FCT_ERR_UNSUPPORTED, "cuda", "cuda not loaded");
  }

  /* Finite checks: NaN in U shows in y (named), NaN in grad_y (named). */
  int64_t at[2] = {3, 1};
  tb_set(U, at, NAN);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_embedding_forward(&c, &I->dl, &U->dl, &V->dl, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "U", "NaN in U");
  st = fct_lowrank_embedding_backward(&c, &y->dl, &I->dl, &U->dl, &V->dl, -1, &gU->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "grad_y", "NaN in grad_y");
  c.flags = 0;

  tb_free(U); tb_free(V); tb_free(V64); tb_free(y); tb_free(gU);
  tb_index_free(I); tb_index_free(Ibig); tb_index_free(Ineg);
}

static void test_tt_errors(void) {
  int64_t s0[4] = {1, 3, 2, 2}, s1[4] = {2, 4, 3, 1}, is[1] = {4}, ys[2] = {4, 6};
  test_tensor* G0 = tb_new(32, 4, s0, NULL, 0);
  test_tensor* G1 = tb_new(32, 4, s1, NULL, 0);
  test_tensor* G1d = tb_new(64, 4, s1, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  test_tensor* g0 = tb_output(32, 4, s0);
  int64_t vals[4] = {0, 11, 5, 2}, bad[4] = {0, 11, 12, 2};
  test_index* I = idx_new(64, 1, is, false, 12, vals);
  test_index* Ibad = idx_new(64, 1, is, false, 12, bad);
  const DLTensor* cores[2] = {&G0->dl, &G1->dl};
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 16);
  fct_status st;

  st = fct_tt_embedding_forward(&c, &I->dl, 2, cores, 12, -1, &y->dl);
  CHECK(st == FCT_OK, "tt errors baseline: %s", test_err);
  st = fct_tt_embedding_forward(&c, &Ibad->dl, 2, cores, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "tt index >= num");
  CHECK(strstr(test_err, "num_embeddings") != NULL, "names num_embeddings: %s", test_err);
  st = fct_tt_embedding_forward(&c, &I->dl, 2, cores, 13, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "num_embeddings", "num > ∏ n_k");
  st = fct_tt_embedding_forward(&c, &I->dl, 2, cores, 12, 12, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "padding_idx", "tt padding_idx");
  st = fct_tt_embedding_forward(&c, &I->dl, 0, cores, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "d", "d = 0");
  st = fct_tt_embedding_forward(&c, &I->dl, 2, NULL, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "cores", "NULL cores");
  const DLTensor* mixed[2] = {&G0->dl, &G1d->dl};
  st = fct_tt_embedding_forward(&c, &I->dl, 2, mixed, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "cores[1]", "core dtype mix");
  const DLTensor* swapped[2] = {&G1->dl, &G0->dl};
  st = fct_tt_embedding_forward(&c, &I->dl, 2, swapped, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[0]", "r_0 != 1");
  const DLTensor* one[1] = {&G0->dl};
  st = fct_tt_embedding_forward(&c, &I->dl, 1, one, 3, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[0]", "r_d != 1");
  G1->shape[0] = 3;
  st = fct_tt_embedding_forward(&c, &I->dl, 2, cores, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "cores[1]", "rank chain");
  G1->shape[0] = 2;
  y->shape[1] = 5;
  st = fct_tt_embedding_forward(&c, &I->dl, 2, cores, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "tt y shape");
  y->shape[1] = 6;
  DLTensor* gcores[2] = {&g0->dl, &g0->dl};
  st = fct_tt_embedding_backward(&c, &y->dl, &I->dl, 2, cores, 12, -1, gcores);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_cores[1]", "grad core shape");
  DLTensor* gself[2] = {&G0->dl, NULL};
  st = fct_tt_embedding_backward(&c, &y->dl, &I->dl, 2, cores, 12, -1, gself);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_cores[0]", "grad core aliases core");

  /* A vocabulary ∏ n_k beyond int64 (zero strides: nothing is read). */
  int64_t hs[4] = {1, (int64_t)1 << 40, 1, 1}, hz[4] = {0, 0, 0, 0};
  DLTensor h0 = G0->dl, h1 = G0->dl;
  h0.shape = hs;
  h0.strides = hz;
  h1.shape = hs;
  h1.strides = hz;
  const DLTensor* huge[2] = {&h0, &h1};
  st = fct_tt_embedding_forward(&c, &I->dl, 2, huge, 12, -1, &y->dl);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "cores", "vocabulary overflow");

  tb_free(G0); tb_free(G1); tb_free(G1d); tb_free(y); tb_free(g0);
  tb_index_free(I); tb_index_free(Ibad);
}

int main(void) {
  test_lowrank(0); /* OpenBLAS's own threads */
  test_tt(0);
  fct_cpu_set_thread_pool(tb_reverse_pool, tb_three_threads);
  test_lowrank(FCT_FLAG_SMALL_CHUNKS);
  test_tt(FCT_FLAG_SMALL_CHUNKS);
  test_lowrank(FCT_FLAG_CHECK_FINITE);
  test_tt(FCT_FLAG_CHECK_FINITE);
  test_big();
  fct_cpu_set_thread_pool(NULL, NULL);
  test_determinism();
  test_lowrank_errors();
  test_tt_errors();
  test_free_workspace();
  return test_report();
}
