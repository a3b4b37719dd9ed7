/* The CPU backend's pack (a strided view copied dense row-major in its dim
 * order; every permute of the tensorized ops goes through it) against an
 * element-by-element reference: random shapes of 0 to 6 dims (size-1 dims
 * included), their strides permuted, gapped, reversed (negative), or 0
 * (broadcast), both dtypes; the destination NaN-prefilled and followed by
 * guard elements. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "test_util.h"

#define GUARD 4

static int64_t rnd(int64_t lo, int64_t hi) { return lo + rand() % (hi - lo + 1); }

static void one_case(int bits, int nd, unsigned seed) {
  srand(seed);
  size_t es = (size_t)bits / 8;
  int64_t shape[6], st[6], numel = 1;
  for (int i = 0; i < nd; ++i) {
    shape[i] = rnd(0, 9) < 2 ? 1 : rnd(1, 9);
    numel *= shape[i];
  }
  /* Strides of the dims laid out in a random order, with gaps. */
  int order[6];
  for (int i = 0; i < nd; ++i) order[i] = i;
  for (int i = nd - 1; i > 0; --i) {
    int j = (int)rnd(0, i), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  int64_t s = 1;
  for (int k = nd - 1; k >= 0; --k) {
    int d = order[k];
    st[d] = s;
    s *= shape[d] + (rnd(0, 3) == 0 ? rnd(1, 2) : 0);
  }
  int64_t span = s;
  for (int i = 0; i < nd; ++i) {
    if (rnd(0, 7) == 0) st[i] = 0; /* broadcast */
  }
  /* Some dims reversed: start at their last element, negative stride. */
  int64_t base = 0;
  for (int i = 0; i < nd; ++i)
    if (st[i] > 0 && rnd(0, 5) == 0) {
      base += (shape[i] - 1) * st[i];
      st[i] = -st[i];
    }
  char* mem = malloc((size_t)(span > 0 ? span : 1) * es);
  for (int64_t i = 0; i < span; ++i) {
    double v = tb_random();
    if (bits == 32) ((float*)mem)[i] = (float)v;
    else ((double*)mem)[i] = v;
  }
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = mem + base * (int64_t)es;
  t.ndim = nd;
  t.shape = shape;
  t.strides = st;
  t.dtype = (DLDataType){kDLFloat, (uint8_t)bits, 1};
  t.device = (DLDevice){kDLCPU, 0};
  char* dst = malloc((size_t)(numel + GUARD) * es);
  for (int64_t i = 0; i < numel + GUARD; ++i) {
    if (bits == 32) ((float*)dst)[i] = NAN;
    else ((double*)dst)[i] = NAN;
  }
  fct_context c = {0};
  fct_status stt = fct_cpu_backend.pack(&c, &t, dst);
  int64_t bad = 0, idx[6] = {0};
  for (int64_t k = 0; k < numel; ++k) {
    int64_t off = base;
    for (int i = 0; i < nd; ++i) off += idx[i] * st[i];
    double want = bits == 32 ? ((float*)mem)[off] : ((double*)mem)[off];
    double got = bits == 32 ? ((float*)dst)[k] : ((double*)dst)[k];
    bad += !(got == want);
    for (int i = nd - 1; i >= 0 && ++idx[i] == shape[i]; --i) idx[i] = 0;
  }
  for (int64_t i = numel; i < numel + GUARD; ++i)
    bad += bits == 32 ? !isnan(((float*)dst)[i]) : !isnan(((double*)dst)[i]);
  CHECK(stt == FCT_OK && bad == 0, "pack f%d nd=%d seed=%u: %lld wrong elements (status %d)",
        bits, nd, seed, (long long)bad, (int)stt);
  free(mem);
  free(dst);
}

int main(void) {
  for (int bits = 32; bits <= 64; bits += 32)
    for (int nd = 0; nd <= 6; ++nd)
      for (unsigned seed = 1; seed <= 60; ++seed) one_case(bits, nd, seed * 7919u + (unsigned)nd);
  return test_report();
}
