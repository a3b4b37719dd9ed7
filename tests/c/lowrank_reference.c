/* Float64 reference of the low-rank linear layer for the C tests (CPU and
 * CUDA): naive loops over the tensors as they are laid out. */
#include "lowrank_reference.h"

#include <stdlib.h>

ref reference(const test_tensor* x, const test_tensor* U, const test_tensor* V,
                     const test_tensor* b, const test_tensor* g, int64_t M, int64_t in,
                     int64_t out, int64_t r) {
  ref R;
  R.t = calloc((size_t)(M * r + 1), sizeof(double));
  R.y = calloc((size_t)(M * out + 1), sizeof(double));
  R.gt = calloc((size_t)(M * r + 1), sizeof(double));
  R.gx = calloc((size_t)(M * in + 1), sizeof(double));
  R.gU = calloc((size_t)(out * r + 1), sizeof(double));
  R.gV = calloc((size_t)(r * in + 1), sizeof(double));
  R.gb = calloc((size_t)(out + 1), sizeof(double));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i) R.t[m * r + k] += tb_get2(x, m, i) * tb_get2(V, k, i);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < out; ++o) {
      double s = b ? tb_get2(b, 0, o) : 0.0;
      for (int64_t k = 0; k < r; ++k) s += R.t[m * r + k] * tb_get2(U, o, k);
      R.y[m * out + o] = s;
    }
  if (!g) return R;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < out; ++o) {
      double gv = tb_get2(g, m, o);
      R.gb[o] += gv;
      for (int64_t k = 0; k < r; ++k) {
        R.gU[o * r + k] += gv * R.t[m * r + k];
        R.gt[m * r + k] += gv * tb_get2(U, o, k);
      }
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i) {
        R.gV[k * in + i] += R.gt[m * r + k] * tb_get2(x, m, i);
        R.gx[m * in + i] += R.gt[m * r + k] * tb_get2(V, k, i);
      }
  return R;
}

void ref_free(ref* R) {
  free(R->t); free(R->y); free(R->gt); free(R->gx); free(R->gU); free(R->gV); free(R->gb);
}
