/*
 * svd and randomized_svd on the CUDA backend (cuSOLVER + cuBLAS) against the
 * CPU implementation on the same matrices: float32 and float64, tall and
 * wide, row-major, column-major and gapped (packed on the GPU) strides, on
 * a non-default stream; the same sketch (counter-based RNG) on both sides,
 * so the factors agree up to rounding. Then CP, Tucker and TT on the CUDA
 * engine against the CPU engine (status, error, ranks), NaN input and a
 * short workspace. Exits 77 (ctest: skipped) without a GPU.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_cuda_util.h"

/* A blocking stream: the uploads below run on the legacy stream, which
 * this one waits for. */
static cudaStream_t g_stream;

/* Bytes from the first to one past the last element of t. */
static size_t span_bytes(const test_tensor* t) {
  return (size_t)tb_span(t) * (size_t)(t->dl.dtype.bits / 8);
}

/* A device copy of t (same shape and strides), or of an output's shape. */
static DLTensor to_device(const test_tensor* t, void** mem) {
  DLTensor d = t->dl;
  size_t bytes = span_bytes(t);
  cuda_ok(cudaMalloc(mem, bytes), "cudaMalloc");
  cuda_ok(cudaMemcpy(*mem, t->dl.data, bytes, cudaMemcpyHostToDevice), "upload");
  d.data = *mem;
  d.device = (DLDevice){kDLCUDA, 0};
  return d;
}

static void from_device(test_tensor* t, const void* mem) {
  cuda_ok(cudaMemcpy(t->dl.data, mem, span_bytes(t), cudaMemcpyDeviceToHost), "download");
}

typedef struct result {
  test_tensor *U, *S, *Vh;
  fct_decomp_info info;
  fct_status st;
} result;

static void free_result(result* r) {
  tb_free(r->U);
  tb_free(r->S);
  tb_free(r->Vh);
}

/* Runs (randomized) svd of A with rank r on the CPU (dev == false) or the
 * GPU; outputs come back to the host. */
static result run(const test_tensor* A, int64_t r, bool randomized, bool dev) {
  int bits = A->dl.dtype.bits;
  int64_t m = A->shape[0], n = A->shape[1];
  int64_t us[2] = {m, r}, ss[1] = {r}, vs[2] = {r, n};
  result out = {tb_output(bits, 2, us), tb_output(bits, 1, ss), tb_output(bits, 2, vs),
                {0, 0, 0}, FCT_OK};
  fct_rsvd_options o = {6, 2, 0, 11};
  fct_context c = test_ctx(0);
  DLTensor a = A->dl, u = out.U->dl, s = out.S->dl, v = out.Vh->dl;
  void *ma = NULL, *mu = NULL, *ms = NULL, *mv = NULL, *ws = NULL;
  if (dev) {
    a = to_device(A, &ma);
    u = to_device(out.U, &mu);
    s = to_device(out.S, &ms);
    v = to_device(out.Vh, &mv);
    c.stream = g_stream;
  }
  size_t bytes = 0;
  out.st = randomized ? fct_randomized_svd_workspace(&c, &a, &u, &s, &v, &o, &bytes)
                      : fct_svd_workspace(&c, &a, &u, &s, &v, &bytes);
  if (out.st == FCT_OK) {
    if (dev) cuda_ok(cudaMalloc(&ws, bytes ? bytes : 1), "cudaMalloc workspace");
    else ws = aligned_alloc(256, (bytes + 256) / 256 * 256);
    c.workspace = ws;
    c.workspace_bytes = bytes;
    out.st = randomized ? fct_randomized_svd(&c, &a, &u, &s, &v, &o, &out.info)
                        : fct_svd(&c, &a, &u, &s, &v, &out.info);
  }
  if (dev) {
    cuda_ok(cudaStreamSynchronize(g_stream), "sync");
    from_device(out.U, mu);
    from_device(out.S, ms);
    from_device(out.Vh, mv);
    cudaFree(ma); cudaFree(mu); cudaFree(ms); cudaFree(mv); cudaFree(ws);
  } else {
    free(ws);
  }
  return out;
}

static double max_diff(const test_tensor* a, const test_tensor* b) {
  double d = 0;
  int64_t rows = a->dl.ndim == 2 ? a->shape[0] : 1, cols = a->shape[a->dl.ndim - 1];
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d = fmax(d, fabs(tb_get2(a, i, j) - tb_get2(b, i, j)));
  return d;
}

/* A rank-`rank` matrix with singular values 2^-j plus a little noise, so
 * that the singular values are distinct and the vectors well defined. */
static void fill_planted(test_tensor* A, int64_t rank) {
  int64_t m = A->shape[0], n = A->shape[1];
  double* u = malloc((size_t)(m * rank) * sizeof(double));
  double* v = malloc((size_t)(n * rank) * sizeof(double));
  for (int64_t e = 0; e < m * rank; ++e) u[e] = sin(0.7 * (double)e + 1.0);
  for (int64_t e = 0; e < n * rank; ++e) v[e] = cos(1.3 * (double)e + 0.5);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c) {
      double s = 1e-3 * sin((double)(i * n + c));
      for (int64_t j = 0; j < rank; ++j) s += pow(0.5, (double)j) * u[i * rank + j] * v[c * rank + j];
      int64_t idx[2] = {i, c};
      tb_set(A, idx, s);
    }
  free(u);
  free(v);
}

static void compare(int bits, int64_t m, int64_t n, int64_t r, const int* order, int64_t gap,
                    bool randomized) {
  char label[128];
  snprintf(label, sizeof label, "%s f%d [%lld, %lld] r=%lld order=%s gap=%lld",
           randomized ? "rsvd" : "svd", bits, (long long)m, (long long)n, (long long)r,
           order ? "T" : "-", (long long)gap);
  int64_t shape[2] = {m, n};
  test_tensor* A = tb_new(bits, 2, shape, order, gap);
  fill_planted(A, r + 2);
  result cpu = run(A, r, randomized, false);
  result gpu = run(A, r, randomized, true);
  CHECK(cpu.st == FCT_OK && gpu.st == FCT_OK, "%s: cpu %d gpu %d (%s)", label, cpu.st, gpu.st,
        test_err);
  if (cpu.st == FCT_OK && gpu.st == FCT_OK) {
    double tol = bits == 64 ? 1e-8 : 2e-3;
    CHECK(max_diff(cpu.S, gpu.S) <= tol, "%s: S differs by %.3g", label, max_diff(cpu.S, gpu.S));
    CHECK(max_diff(cpu.U, gpu.U) <= tol, "%s: U differs by %.3g", label, max_diff(cpu.U, gpu.U));
    CHECK(max_diff(cpu.Vh, gpu.Vh) <= tol, "%s: Vh differs by %.3g", label,
          max_diff(cpu.Vh, gpu.Vh));
    CHECK(fabs(cpu.info.rel_error - gpu.info.rel_error) <= (bits == 64 ? 1e-7 : 1e-3),
          "%s: rel_error cpu %.9f gpu %.9f", label, cpu.info.rel_error, gpu.info.rel_error);
  }
  free_result(&cpu);
  free_result(&gpu);
  tb_free(A);
}

static void bad_inputs(void) {
  int64_t shape[2] = {12, 9};
  test_tensor* A = tb_new(64, 2, shape, NULL, 0);
  ((double*)A->buf)[5] = NAN;
  result g = run(A, 3, false, true);
  CHECK(g.st == FCT_ERR_NOT_FINITE && strstr(test_err, "A: holds 1 NaN/Inf"), "svd NaN: %d %s",
        g.st, test_err);
  free_result(&g);
  g = run(A, 3, true, true);
  CHECK(g.st == FCT_ERR_NOT_FINITE, "rsvd NaN: %d %s", g.st, test_err);
  free_result(&g);
  tb_free(A);
}

/* ------------------------------------------------------------------------- */
/* CP, Tucker and TT: the CUDA engine against the CPU engine                  */
/* ------------------------------------------------------------------------- */

enum { DEC_CP, DEC_TUCKER, DEC_TT };

typedef struct dec_result {
  fct_status st;
  fct_decomp_info info;
  int64_t ranks[4];
  double out_sumsq; /* Σ of the squared outputs: the same factors give the same */
} dec_result;

static double sumsq_of(const test_tensor* t) {
  double s = 0;
  int64_t last = t->shape[t->dl.ndim - 1];
  for (int64_t e = 0; e < tb_numel(t); ++e) {
    double v = tb_get2(t, e / last, e % last);
    s += v * v;
  }
  return s;
}

/* Runs `which` on X [6, 7, 8] (rank 3 everywhere) on the CPU or the GPU
 * with a workspace of the queried size minus `short_by` bytes. */
static dec_result run_dec(int which, const test_tensor* X, bool dev, size_t short_by) {
  int bits = X->dl.dtype.bits;
  dec_result res = {FCT_OK, {0, 0, 0}, {0}, 0};
  test_tensor* outs[5] = {NULL};
  int nout = 0;
  int64_t R = 3;
  if (which == DEC_CP || which == DEC_TUCKER) {
    for (int n = 0; n < 3; ++n) {
      int64_t fs[2] = {X->shape[n], R};
      outs[nout++] = tb_output(bits, 2, fs);
    }
    int64_t ws[3] = {R, R, R};
    outs[nout++] = tb_output(bits, which == DEC_CP ? 1 : 3, ws);
  } else {
    int64_t cap[1] = {6 * 3 + 3 * 7 * 3 + 3 * 8};
    outs[nout++] = tb_output(bits, 1, cap);
  }
  fct_context c = test_ctx(0);
  DLTensor x = X->dl, o[5];
  void *mx = NULL, *mo[5] = {NULL}, *ws = NULL;
  for (int i = 0; i < nout; ++i) o[i] = outs[i]->dl;
  if (dev) {
    x = to_device(X, &mx);
    for (int i = 0; i < nout; ++i) o[i] = to_device(outs[i], &mo[i]);
    c.stream = g_stream;
  }
  DLTensor* F[3] = {&o[0], &o[1], &o[2]};
  fct_cp_options co = {20, FCT_INIT_RANDOM, 0, 0, 3, 1, 0};
  fct_tucker_options to = {4, FCT_INIT_SVD, 0, 0};
  int64_t caps[4] = {1, R, R, 1};
  size_t bytes = 0;
  if (which == DEC_CP)
    res.st = fct_cp_als_workspace(&c, &x, 3, (const DLTensor* const*)F, &o[3], &co, &bytes);
  else if (which == DEC_TUCKER)
    res.st = fct_tucker_hooi_workspace(&c, &x, &o[3], 3, (const DLTensor* const*)F, &to, &bytes);
  else
    res.st = fct_tensor_train_workspace(&c, &x, 3, NULL, caps, 0.0, &o[0], &bytes);
  if (res.st == FCT_OK) {
    if (dev) cuda_ok(cudaMalloc(&ws, bytes ? bytes : 1), "cudaMalloc workspace");
    else ws = aligned_alloc(256, (bytes + 256) / 256 * 256);
    c.workspace = ws;
    c.workspace_bytes = bytes - (short_by < bytes ? short_by : bytes);
    if (which == DEC_CP)
      res.st = fct_cp_als(&c, &x, 3, F, &o[3], &co, NULL, &res.info);
    else if (which == DEC_TUCKER)
      res.st = fct_tucker_hooi(&c, &x, &o[3], 3, F, &to, NULL, &res.info);
    else
      res.st = fct_tensor_train(&c, &x, 3, NULL, caps, 0.0, &o[0], res.ranks, &res.info);
  }
  if (dev) {
    cuda_ok(cudaStreamSynchronize(g_stream), "sync");
    for (int i = 0; i < nout; ++i) from_device(outs[i], mo[i]);
    cudaFree(mx);
    for (int i = 0; i < nout; ++i) cudaFree(mo[i]);
    cudaFree(ws);
  } else {
    free(ws);
  }
  /* CP (same host-side random start) and TT (unique up to signs) give the
   * same factors; Tucker's core has the same norm whatever the bases. */
  int last = which == DEC_TT ? 0 : nout - 1;
  res.out_sumsq = res.st == FCT_OK ? sumsq_of(outs[last]) : 0;
  for (int i = 0; i < nout; ++i) tb_free(outs[i]);
  return res;
}

static void compare_engines(int bits, const int* order, int64_t gap) {
  int64_t shape[3] = {6, 7, 8};
  test_tensor* X = tb_new(bits, 3, shape, order, gap);
  for (int64_t e = 0; e < 6 * 7 * 8; ++e) { /* rank 3 plus a little noise */
    int64_t i = e / 56, j = (e / 8) % 7, k = e % 8, idx[3] = {i, j, k};
    double v = 1e-3 * sin((double)e);
    for (int r = 0; r < 3; ++r)
      v += pow(0.6, r) * sin(1.0 + i * (r + 1.0)) * cos(0.5 + j * (r + 0.7)) *
           sin(0.3 + k * (r + 1.3));
    tb_set(X, idx, v);
  }
  const char* names[3] = {"cp", "tucker", "tt"};
  double tol = bits == 64 ? 1e-8 : 1e-4;
  for (int which = DEC_CP; which <= DEC_TT; ++which) {
    dec_result cpu = run_dec(which, X, false, 0), gpu = run_dec(which, X, true, 0);
    CHECK(cpu.st == FCT_OK && gpu.st == FCT_OK, "%s f%d gap %lld: cpu %d gpu %d (%s)",
          names[which], bits, (long long)gap, cpu.st, gpu.st, test_err);
    if (cpu.st != FCT_OK || gpu.st != FCT_OK) continue;
    CHECK(fabs(cpu.info.rel_error - gpu.info.rel_error) <= tol,
          "%s f%d: rel_error cpu %.10f gpu %.10f", names[which], bits, cpu.info.rel_error,
          gpu.info.rel_error);
    CHECK(fabs(cpu.out_sumsq - gpu.out_sumsq) <= tol * (1 + cpu.out_sumsq),
          "%s f%d: outputs' norm² cpu %.10f gpu %.10f", names[which], bits, cpu.out_sumsq,
          gpu.out_sumsq);
    CHECK(cpu.info.n_iter == gpu.info.n_iter, "%s: n_iter %d vs %d", names[which],
          cpu.info.n_iter, gpu.info.n_iter);
    for (int k = 0; k < 4 && which == DEC_TT; ++k)
      CHECK(cpu.ranks[k] == gpu.ranks[k], "tt: rank %d cpu %lld gpu %lld", k,
            (long long)cpu.ranks[k], (long long)gpu.ranks[k]);
  }
  /* a workspace one byte short, and NaN input, on the GPU */
  for (int which = DEC_CP; which <= DEC_TT; ++which) {
    dec_result g = run_dec(which, X, true, 1);
    CHECK(g.st == FCT_ERR_WORKSPACE, "%s short workspace: %d %s", names[which], g.st, test_err);
  }
  int64_t idx[3] = {2, 3, 4};
  tb_set(X, idx, NAN);
  for (int which = DEC_CP; which <= DEC_TT; ++which) {
    dec_result g = run_dec(which, X, true, 0);
    CHECK(g.st == FCT_ERR_NOT_FINITE && strstr(test_err, "tensor: holds 1 NaN/Inf"),
          "%s NaN: %d %s", names[which], g.st, test_err);
  }
  tb_free(X);
}

int main(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("no CUDA device: skipped\n");
    return 77;
  }
  if (!fct_cuda_available()) {
    fprintf(stderr, "libfactorch_cuda is not loaded\n");
    return 1;
  }
  cuda_ok(cudaStreamCreate(&g_stream), "cudaStreamCreate");
  int T[2] = {1, 0};
  for (int bits = 32; bits <= 64; bits += 32)
    for (int rnd = 0; rnd <= 1; ++rnd) {
      compare(bits, 40, 30, 4, NULL, 0, rnd);
      compare(bits, 30, 50, 5, NULL, 0, rnd);
      compare(bits, 33, 33, 3, T, 0, rnd);
      compare(bits, 36, 20, 4, NULL, 3, rnd);
    }
  bad_inputs();
  int P[3] = {2, 0, 1};
  for (int bits = 32; bits <= 64; bits += 32) {
    compare_engines(bits, NULL, 0);
    compare_engines(bits, P, 2); /* strided: loaded on the GPU through its strides */
  }
  cudaStreamDestroy(g_stream);
  return test_report();
}
