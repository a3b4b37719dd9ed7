#include "test_cuda_util.h"

#include <stdlib.h>
#include <string.h>

const char* const test_kind_name[3] = {"f32", "f64", "bf16"};
cudaStream_t test_stream;
static void* g_dws; /* device workspace */
static size_t g_dws_bytes;

uint16_t test_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float test_from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

bool cuda_ok(cudaError_t e, const char* what) {
  CHECK(e == cudaSuccess, "%s: %s", what, cudaGetErrorString(e));
  return e == cudaSuccess;
}

static size_t kind_bytes(test_kind k) { return k == K_BF16 ? 2 : k == K_F32 ? 4 : 8; }

/* Whether host and device hold the same format (a plain copy). */
static bool same_format(const dev_tensor* t) {
  int bits = t->h->dl.dtype.bits;
  return (t->k == K_F32 && bits == 32) || (t->k == K_F64 && bits == 64);
}

static double host_at(const test_tensor* h, size_t i) {
  return h->dl.dtype.bits == 32 ? (double)((float*)h->dl.data)[i] : ((double*)h->dl.data)[i];
}

static void host_put(test_tensor* h, size_t i, double v) {
  if (h->dl.dtype.bits == 32) ((float*)h->dl.data)[i] = (float)v;
  else ((double*)h->dl.data)[i] = v;
}

void dev_upload(dev_tensor* t) {
  size_t es = kind_bytes(t->k), n = (size_t)t->span;
  if (same_format(t)) {
    cuda_ok(cudaMemcpy(t->d, t->h->dl.data, n * es, cudaMemcpyHostToDevice), "upload");
    return;
  }
  void* tmp = malloc(n * es + es);
  for (size_t i = 0; i < n; ++i) {
    double v = host_at(t->h, i);
    if (t->k == K_F64) {
      ((double*)tmp)[i] = v;
    } else if (t->k == K_F32) {
      ((float*)tmp)[i] = (float)v;
      host_put(t->h, i, (double)(float)v);
    } else {
      uint16_t b = test_to_bf16((float)v);
      ((uint16_t*)tmp)[i] = b;
      host_put(t->h, i, (double)test_from_bf16(b));
    }
  }
  cuda_ok(cudaMemcpy(t->d, tmp, n * es, cudaMemcpyHostToDevice), "upload");
  free(tmp);
}

void dev_download(dev_tensor* t) {
  size_t es = kind_bytes(t->k), n = (size_t)t->span;
  if (same_format(t)) {
    cuda_ok(cudaMemcpy(t->h->dl.data, t->d, n * es, cudaMemcpyDeviceToHost), "download");
    return;
  }
  void* tmp = malloc(n * es + es);
  cuda_ok(cudaMemcpy(tmp, t->d, n * es, cudaMemcpyDeviceToHost), "download");
  for (size_t i = 0; i < n; ++i) {
    double v = t->k == K_F64   ? ((double*)tmp)[i]
               : t->k == K_F32 ? (double)((float*)tmp)[i]
                               : (double)test_from_bf16(((uint16_t*)tmp)[i]);
    host_put(t->h, i, v);
  }
  free(tmp);
}

dev_tensor* dev_new(test_tensor* h, test_kind k, bool output) {
  dev_tensor* t = calloc(1, sizeof *t);
  t->h = h;
  t->k = k;
  t->span = tb_span(h);
  size_t bytes = (size_t)(t->span + 1) * kind_bytes(k);
  cuda_ok(cudaMalloc(&t->d, bytes), "cudaMalloc");
  t->dl = h->dl;
  t->dl.data = t->d;
  t->dl.device = (DLDevice){kDLCUDA, 0};
  t->dl.dtype = k == K_BF16 ? (DLDataType){kDLBfloat, 16, 1}
                            : (DLDataType){kDLFloat, (uint8_t)(kind_bytes(k) * 8), 1};
  if (output) cuda_ok(cudaMemset(t->d, 0xFF, bytes), "cudaMemset");
  else dev_upload(t);
  return t;
}

void dev_free(dev_tensor* t) {
  if (!t) return;
  cudaFree(t->d);
  tb_free(t->h);
  free(t);
}

const DLTensor* dev_dl(const dev_tensor* t) { return t ? &t->dl : NULL; }

double dev_rel_err(dev_tensor* t, const double* ref, int64_t rows, int64_t cols) {
  dev_download(t);
  return test_rel_err(t->h, ref, rows, cols);
}

double dev_rel_diff(dev_tensor* t, const test_tensor* ref) {
  dev_download(t);
  return test_rel_diff(t->h, ref);
}

int test_cuda_begin(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("0 passed, 0 failed (no CUDA device: skipped)\n");
    return 77;
  }
  if (!cuda_ok(cudaStreamCreateWithFlags(&test_stream, cudaStreamNonBlocking), "stream"))
    return test_report();
  return 0;
}

void test_cuda_end(void) {
  cudaFree(g_dws);
  g_dws = NULL;
  g_dws_bytes = 0;
  cudaStreamDestroy(test_stream);
}

fct_context test_cuda_ctx(uint32_t flags) {
  fct_context c = test_ctx(flags);
  c.stream = test_stream;
  return c;
}

void test_cuda_workspace(fct_context* c, size_t bytes) {
  if (bytes > g_dws_bytes) {
    cudaFree(g_dws);
    g_dws = NULL;
    cuda_ok(cudaMalloc(&g_dws, bytes), "cudaMalloc (workspace)");
    g_dws_bytes = bytes;
  }
  c->workspace = bytes ? g_dws : NULL;
  c->workspace_bytes = bytes;
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}
