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

#include <cuda_runtime_api.h>

#include "test_util.h"

typedef enum kind { K_F32, K_F64, K_BF16 } kind;
static const char* const kKindName[] = {"f32", "f64", "bf16"};

static cudaStream_t g_stream;
static char g_err[512];
static void* g_dws; /* device workspace */
static size_t g_dws_bytes;
static void* g_hws; /* host workspace (CPU reference runs) */
static size_t g_hws_bytes;

static bool cuda_ok(cudaError_t e, const char* what) {
  CHECK(e == cudaSuccess, "%s: %s", what, cudaGetErrorString(e));
  return e == cudaSuccess;
}

/* bfloat16 <-> float by bits (round to nearest even; finite inputs). */
static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* ------------------------------------------------------------------------- */
/* Device mirrors                                                             */
/* ------------------------------------------------------------------------- */

/* A host tensor (float32 for K_BF16, whose values are first rounded to
 * bfloat16 so both sides agree) mirrored on the device with the same shape
 * and strides. */
typedef struct dev_tensor {
  test_tensor* h;
  DLTensor dl;
  void* d;
  int64_t span;
  kind k;
} dev_tensor;

static size_t dev_es(const dev_tensor* t) { return t->k == K_BF16 ? 2 : t->k == K_F32 ? 4 : 8; }

static void upload(dev_tensor* t) {
  size_t es = dev_es(t), n = (size_t)t->span;
  if (t->k != K_BF16) {
    cuda_ok(cudaMemcpy(t->d, t->h->dl.data, n * es, cudaMemcpyHostToDevice), "upload");
    return;
  }
  uint16_t* tmp = malloc(n * 2 + 2);
  for (size_t i = 0; i < n; ++i) {
    float* v = (float*)t->h->dl.data + i;
    tmp[i] = to_bf16(*v);
    *v = from_bf16(tmp[i]);
  }
  cuda_ok(cudaMemcpy(t->d, tmp, n * 2, cudaMemcpyHostToDevice), "upload");
  free(tmp);
}

static void download(dev_tensor* t) {
  size_t es = dev_es(t), n = (size_t)t->span;
  if (t->k != K_BF16) {
    cuda_ok(cudaMemcpy(t->h->dl.data, t->d, n * es, cudaMemcpyDeviceToHost), "download");
    return;
  }
  uint16_t* tmp = malloc(n * 2 + 2);
  cuda_ok(cudaMemcpy(tmp, t->d, n * 2, cudaMemcpyDeviceToHost), "download");
  for (size_t i = 0; i < n; ++i) ((float*)t->h->dl.data)[i] = from_bf16(tmp[i]);
  free(tmp);
}

/* Mirrors h (owned from now on). Outputs are filled with 0xFF bytes (NaN in
 * every float format) so an element the kernels fail to write shows. */
static dev_tensor* dev_new(test_tensor* h, kind k, bool output) {
  dev_tensor* t = calloc(1, sizeof *t);
  t->h = h;
  t->k = k;
  t->span = tb_numel(h) > 0 ? 1 : 0;
  for (int i = 0; i < h->dl.ndim && t->span; ++i) t->span += (h->shape[i] - 1) * h->strides[i];
  cuda_ok(cudaMalloc(&t->d, (size_t)(t->span + 1) * dev_es(t)), "cudaMalloc");
  t->dl = h->dl;
  t->dl.data = t->d;
  t->dl.device = (DLDevice){kDLCUDA, 0};
  if (k == K_BF16) t->dl.dtype = (DLDataType){kDLBfloat, 16, 1};
  if (output) cuda_ok(cudaMemset(t->d, 0xFF, (size_t)(t->span + 1) * dev_es(t)), "cudaMemset");
  else upload(t);
  return t;
}

static void dev_free(dev_tensor* t) {
  if (!t) return;
  cudaFree(t->d);
  tb_free(t->h);
  free(t);
}

/* Index tensors, host and device. 2-D ones may be stored column-major. */
typedef struct idx_pair {
  DLTensor h, d;
  int64_t shape[8], strides[8];
  void* hbuf;
  void* dbuf;
  int64_t count, span;
} idx_pair;

static idx_pair* idx_new(int bits, int nd, const int64_t* shape, bool transposed,
                         const int64_t* vals) {
  idx_pair* t = calloc(1, sizeof *t);
  t->count = 1;
  for (int i = 0; i < nd; ++i) {
    t->shape[i] = shape[i];
    t->count *= shape[i];
  }
  int64_t s = 1;
  for (int i = nd - 1; i >= 0; --i) {
    t->strides[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
  if (transposed && nd == 2) {
    t->strides[0] = 1;
    t->strides[1] = shape[0] > 0 ? shape[0] : 1;
  }
  t->span = s;
  size_t es = (size_t)bits / 8;
  t->hbuf = calloc((size_t)s + 1, es);
  for (int64_t p = 0; p < t->count; ++p) {
    int64_t off = 0, rem = p;
    for (int i = nd - 1; i >= 0; --i) {
      off += (rem % shape[i]) * t->strides[i];
      rem /= shape[i];
    }
    if (bits == 64) ((int64_t*)t->hbuf)[off] = vals[p];
    else ((int32_t*)t->hbuf)[off] = (int32_t)vals[p];
  }
  cuda_ok(cudaMalloc(&t->dbuf, ((size_t)s + 1) * es), "cudaMalloc (indices)");
  cuda_ok(cudaMemcpy(t->dbuf, t->hbuf, ((size_t)s + 1) * es, cudaMemcpyHostToDevice),
          "upload (indices)");
  t->h.data = t->hbuf;
  t->h.ndim = nd;
  t->h.shape = t->shape;
  t->h.strides = t->strides;
  t->h.dtype = (DLDataType){kDLInt, (uint8_t)bits, 1};
  t->h.device = (DLDevice){kDLCPU, 0};
  t->d = t->h;
  t->d.data = t->dbuf;
  t->d.device = (DLDevice){kDLCUDA, 0};
  return t;
}

static void idx_free(idx_pair* t) {
  if (!t) return;
  cudaFree(t->dbuf);
  free(t->hbuf);
  free(t);
}

static fct_context make_ctx(bool cuda, uint32_t flags) {
  fct_context c = {0};
  c.stream = cuda ? g_stream : NULL;
  c.error = g_err;
  c.error_bytes = sizeof g_err;
  c.flags = flags;
  g_err[0] = 0;
  return c;
}

static void ensure_ws(fct_context* c, bool cuda, size_t bytes) {
  if (cuda) {
    if (bytes > g_dws_bytes) {
      cudaFree(g_dws);
      g_dws = NULL;
      cuda_ok(cudaMalloc(&g_dws, bytes), "cudaMalloc (workspace)");
      g_dws_bytes = bytes;
    }
    c->workspace = bytes ? g_dws : NULL;
    /* Uploads ran on the legacy stream, the op runs on g_stream. */
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  } else {
    if (bytes > g_hws_bytes) {
      free(g_hws);
      g_hws = aligned_alloc(256, (bytes + 255) / 256 * 256);
      g_hws_bytes = bytes;
    }
    c->workspace = bytes ? g_hws : NULL;
  }
  c->workspace_bytes = bytes;
}

/* A host float tensor of `shape` (float32 for bf16), dense. */
static test_tensor* host_like(kind k, int nd, const int64_t* shape) {
  return tb_new(k == K_F64 ? 64 : 32, nd, shape, NULL, 0);
}

/* max |gpu - cpu| / max |cpu| over n dense elements; NaN gives Inf. */
static double rel_diff(dev_tensor* gpu, const test_tensor* cpu) {
  download(gpu);
  int64_t n = tb_numel(cpu);
  double num = 0, den = 1e-300;
  for (int64_t i = 0; i < n; ++i) {
    double a = cpu->dl.dtype.bits == 32 ? ((float*)cpu->buf)[i] : ((double*)cpu->buf)[i];
    double b = gpu->h->dl.dtype.bits == 32 ? ((float*)gpu->h->buf)[i]
                                           : ((double*)gpu->h->buf)[i];
    double d = fabs(a - b);
    if (d != d) return INFINITY;
    num = d > num ? d : num;
    den = fabs(a) > den ? fabs(a) : den;
  }
  return n > 0 ? num / den : 0.0;
}

static double tol_for(kind k, int64_t repeats) {
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

static void lowrank_case(kind k, const lr_case* L) {
  char label[256];
  snprintf(label, sizeof label, "lowrank %s %s", kKindName[k], L->name);
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
  fct_context c = make_ctx(false, 0);
  fct_status st = fct_lowrank_embedding_forward_workspace(&c, &I->h, &U->h->dl, &V->h->dl,
                                                          L->pad, &ry->dl, &bytes);
  ensure_ws(&c, false, bytes);
  if (st == FCT_OK)
    st = fct_lowrank_embedding_forward(&c, &I->h, &U->h->dl, &V->h->dl, L->pad, &ry->dl);
  CHECK(st == FCT_OK, "%s: cpu forward: %s", label, g_err);
  st = fct_lowrank_embedding_backward_workspace(&c, &g->h->dl, &I->h, &U->h->dl, &V->h->dl,
                                                L->pad, &rgU->dl, &rgV->dl, &bytes);
  ensure_ws(&c, false, bytes);
  if (st == FCT_OK)
    st = fct_lowrank_embedding_backward(&c, &g->h->dl, &I->h, &U->h->dl, &V->h->dl, L->pad,
                                        &rgU->dl, &rgV->dl);
  CHECK(st == FCT_OK, "%s: cpu backward: %s", label, g_err);

  c = make_ctx(true, 0);
  st = fct_lowrank_embedding_forward_workspace(&c, &I->d, &U->dl, &V->dl, L->pad, &y->dl,
                                               &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, g_err);
  ensure_ws(&c, true, bytes);
  st = fct_lowrank_embedding_forward(&c, &I->d, &U->dl, &V->dl, L->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, g_err);
  cuda_ok(cudaStreamSynchronize(g_stream), "sync (forward)");
  double e = rel_diff(y, ry), tol = tol_for(k, count);
  CHECK(e <= tol, "%s: y differs by %.3g > %.3g", label, e, tol);

  c = make_ctx(true, 0);
  st = fct_lowrank_embedding_backward_workspace(&c, &g->dl, &I->d, &U->dl, &V->dl, L->pad,
                                                &gU->dl, &gV->dl, &bytes);
  CHECK(st == FCT_OK, "%s: backward workspace: %s", label, g_err);
  ensure_ws(&c, true, bytes);
  st = fct_lowrank_embedding_backward(&c, &g->dl, &I->d, &U->dl, &V->dl, L->pad, &gU->dl,
                                      &gV->dl);
  CHECK(st == FCT_OK, "%s: backward: %s", label, g_err);
  cuda_ok(cudaStreamSynchronize(g_stream), "sync (backward)");
  e = rel_diff(gU, rgU);
  CHECK(e <= tol, "%s: grad_U differs by %.3g > %.3g", label, e, tol);
  e = rel_diff(gV, rgV);
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

static void tt_case_run(kind k, const tt_case* T) {
  char label[256];
  snprintf(label, sizeof label, "tt %s %s", kKindName[k], T->name);
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
  fct_context c = make_ctx(false, 0);
  fct_status st = fct_tt_embedding_forward_workspace(&c, &I->h, T->d, hc, T->num, T->pad,
                                                     &ry->dl, &bytes);
  ensure_ws(&c, false, bytes);
  if (st == FCT_OK) st = fct_tt_embedding_forward(&c, &I->h, T->d, hc, T->num, T->pad, &ry->dl);
  CHECK(st == FCT_OK, "%s: cpu forward: %s", label, g_err);
  st = fct_tt_embedding_backward_workspace(&c, &g->h->dl, &I->h, T->d, hc, T->num, T->pad,
                                           (const DLTensor* const*)hg, &bytes);
  ensure_ws(&c, false, bytes);
  if (st == FCT_OK)
    st = fct_tt_embedding_backward(&c, &g->h->dl, &I->h, T->d, hc, T->num, T->pad, hg);
  CHECK(st == FCT_OK, "%s: cpu backward: %s", label, g_err);

  c = make_ctx(true, 0);
  st = fct_tt_embedding_forward_workspace(&c, &I->d, T->d, dc, T->num, T->pad, &y->dl, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, g_err);
  ensure_ws(&c, true, bytes);
  st = fct_tt_embedding_forward(&c, &I->d, T->d, dc, T->num, T->pad, &y->dl);
  CHECK(st == FCT_OK, "%s: forward: %s", label, g_err);
  cuda_ok(cudaStreamSynchronize(g_stream), "sync (forward)");
  double e = rel_diff(y, ry), tol = tol_for(k, count);
  CHECK(e <= tol, "%s: y differs by %.3g > %.3g", label, e, tol);

  c = make_ctx(true, 0);
  st = fct_tt_embedding_backward_workspace(&c, &g->dl, &I->d, T->d, dc, T->num, T->pad,
                                           (const DLTensor* const*)dg, &bytes);
  CHECK(st == FCT_OK, "%s: backward workspace: %s", label, g_err);
  ensure_ws(&c, true, bytes);
  st = fct_tt_embedding_backward(&c, &g->dl, &I->d, T->d, dc, T->num, T->pad, dg);
  CHECK(st == FCT_OK, "%s: backward: %s", label, g_err);
  cuda_ok(cudaStreamSynchronize(g_stream), "sync (backward)");
  for (int j = 0; j < T->d; ++j) {
    e = rel_diff(gG[j], rgG[j]);
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
      lowrank_case((kind)k, &lr[i]);
    }
    for (size_t i = 0; i < sizeof tt / sizeof tt[0]; ++i) {
      if (k == K_BF16 && tt[i].ishape[0] > 100) continue;
      tt_case_run((kind)k, &tt[i]);
    }
  }
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */
/* ------------------------------------------------------------------------- */

static void expect_fail(fct_status got, fct_status want, const char* name, const char* what) {
  CHECK(got == want, "%s: expected status %d (%s), got %d: %s", what, want,
        fct_status_string(want), got, g_err);
  CHECK(strstr(g_err, name) != NULL, "%s: message '%s' does not name '%s'", what, g_err, name);
}

static void test_errors(void) {
  int64_t us[2] = {10, 3}, vs[2] = {3, 4}, is[2] = {2, 3}, ys[3] = {2, 3, 4};
  dev_tensor* U = dev_new(tb_new(32, 2, us, NULL, 0), K_F32, false);
  dev_tensor* V = dev_new(tb_new(32, 2, vs, NULL, 0), K_F32, false);
  dev_tensor* y = dev_new(tb_output(32, 3, ys), K_F32, true);
  int64_t bad[6] = {0, 1, 2, 3, 12, 4}, neg[6] = {0, -3, 2, 3, 4, 5}, ok[6] = {0, 1, 2, 3, 4, 5};
  idx_pair* Ib = idx_new(64, 2, is, false, bad);
  idx_pair* In = idx_new(32, 2, is, true, neg);
  idx_pair* Io = idx_new(64, 2, is, false, ok);
  fct_context c = make_ctx(true, 0);
  ensure_ws(&c, true, 1 << 16);
  fct_status st;

  CHECK(fct_cuda_available(), "libfactorch_cuda registered its backend");
  st = fct_lowrank_embedding_forward(&c, &Ib->d, &U->dl, &V->dl, -1, &y->dl);
  expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "index >= num on cuda");
  CHECK(strstr(g_err, "position 4, is 12") != NULL, "position and value: %s", g_err);
  /* int32, stored column-major: logical (row-major) position 1 holds -3. */
  st = fct_lowrank_embedding_forward(&c, &In->d, &U->dl, &V->dl, -1, &y->dl);
  expect_fail(st, FCT_ERR_INVALID_VALUE, "indices", "negative int32 index on cuda");
  CHECK(strstr(g_err, "is -3") != NULL, "negative value reported: %s", g_err);
  st = fct_lowrank_embedding_forward(&c, &Io->h, &U->dl, &V->dl, -1, &y->dl);
  expect_fail(st, FCT_ERR_DEVICE, "indices", "host indices, device factors");
  st = fct_lowrank_embedding_forward(&c, &Io->d, &U->dl, &V->dl, -1, &y->dl);
  CHECK(st == FCT_OK, "valid indices after failures: %s", g_err);

  /* The finite check on the GPU: NaN in U reaches y and is named. */
  int64_t at[2] = {2, 1};
  tb_set(U->h, at, NAN);
  upload(U);
  ensure_ws(&c, true, 1 << 16);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_embedding_forward(&c, &Io->d, &U->dl, &V->dl, -1, &y->dl);
  expect_fail(st, FCT_ERR_NOT_FINITE, "U", "NaN in U on cuda");
  cuda_ok(cudaStreamSynchronize(g_stream), "sync (errors)");

  idx_free(Ib); idx_free(In); idx_free(Io);
  dev_free(U); dev_free(V); dev_free(y);
}

int main(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("0 passed, 0 failed (no CUDA device: skipped)\n");
    return 77;
  }
  if (!cuda_ok(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "stream"))
    return test_report();
  test_values();
  test_errors();
  cudaFree(g_dws);
  free(g_hws);
  cudaStreamDestroy(g_stream);
  return test_report();
}
