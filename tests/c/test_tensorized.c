#include "test_tensorized.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double* tz_to_double(const test_tensor* t) {
  int64_t n = tb_numel(t), idx[8] = {0};
  double* out = calloc((size_t)n + 1, sizeof(double));
  for (int64_t e = 0; e < n; ++e) {
    int64_t rem = e;
    for (int d = t->dl.ndim - 1; d >= 0; --d) {
      idx[d] = rem % t->shape[d];
      rem /= t->shape[d];
    }
    out[e] = tb_get(t, idx);
  }
  return out;
}

void tz_unravel(int64_t flat, int n, const int64_t* dims, int64_t* idx) {
  for (int k = n - 1; k >= 0; --k) {
    idx[k] = flat % dims[k];
    flat /= dims[k];
  }
}

void tz_forward(const double* x, const double* W, const double* b, int64_t M, int64_t in,
                int64_t out, double* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < out; ++o) {
      double s = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) s += x[m * in + i] * W[o * in + i];
      y[m * out + o] = s;
    }
}

void tz_backward(const double* x, const double* W, const double* g, int64_t M, int64_t in,
                 int64_t out, double* gx, double* gW, double* gb) {
  memset(gx, 0, sizeof(double) * (size_t)(M * in));
  memset(gW, 0, sizeof(double) * (size_t)(out * in));
  memset(gb, 0, sizeof(double) * (size_t)out);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < out; ++o) {
      double gv = g[m * out + o];
      gb[o] += gv;
      for (int64_t i = 0; i < in; ++i) {
        gx[m * in + i] += gv * W[o * in + i];
        gW[o * in + i] += gv * x[m * in + i];
      }
    }
}

void tz_param_grad(tz_reconstruct_fn fn, const void* model, double** params, int k, int64_t nk,
                   const double* gW, int64_t in, int64_t out, double* grad) {
  double* saved = params[k];
  double* unit = calloc((size_t)nk + 1, sizeof(double));
  double* W = calloc((size_t)(in * out) + 1, sizeof(double));
  params[k] = unit;
  for (int64_t p = 0; p < nk; ++p) {
    unit[p] = 1.0;
    fn(model, params, W);
    double s = 0;
    for (int64_t e = 0; e < in * out; ++e) s += gW[e] * W[e];
    grad[p] = s;
    unit[p] = 0.0;
  }
  params[k] = saved;
  free(unit);
  free(W);
}

tz_ref tz_reference(tz_reconstruct_fn fn, const void* model, const test_tensor* x,
                    test_tensor* const* params, int np, const test_tensor* b,
                    const test_tensor* g, int64_t M, int64_t in, int64_t out) {
  tz_ref R;
  memset(&R, 0, sizeof R);
  R.np = np;
  R.x = tz_to_double(x);
  R.g = tz_to_double(g);
  R.b = b ? tz_to_double(b) : NULL;
  for (int k = 0; k < np; ++k) R.P[k] = tz_to_double(params[k]);
  R.W = calloc((size_t)(in * out) + 1, sizeof(double));
  fn(model, R.P, R.W);
  R.y = calloc((size_t)(M * out) + 1, sizeof(double));
  tz_forward(R.x, R.W, R.b, M, in, out, R.y);
  R.gx = calloc((size_t)(M * in) + 1, sizeof(double));
  R.gW = calloc((size_t)(in * out) + 1, sizeof(double));
  R.gb = calloc((size_t)out + 1, sizeof(double));
  tz_backward(R.x, R.W, R.g, M, in, out, R.gx, R.gW, R.gb);
  for (int k = 0; k < np; ++k) {
    int64_t nk = tb_numel(params[k]);
    R.gP[k] = calloc((size_t)nk + 1, sizeof(double));
    tz_param_grad(fn, model, R.P, k, nk, R.gW, in, out, R.gP[k]);
  }
  return R;
}

void tz_ref_free(tz_ref* R) {
  free(R->x); free(R->g); free(R->b); free(R->W); free(R->y);
  free(R->gx); free(R->gW); free(R->gb);
  for (int k = 0; k < R->np; ++k) free(R->P[k]), free(R->gP[k]);
}
