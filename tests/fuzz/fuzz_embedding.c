/* libFuzzer harness: the low-rank and Tensor-Train embedding lookups,
 * forward and backward, and their workspace queries (fuzz_util.h says how
 * tensors are fuzzed; indices are in range, now and then one is not). */
#include "fuzz_util.h"

/* padding_idx: none (-1), an index in [0, num], or any value. */
static int64_t padding(fz* f, uint8_t pb, int64_t num) {
  if (pb == 0xff) return (int64_t)fz_u64(f);
  if (!(pb & 1) || num < 0 || num > (1 << 20)) return -1;
  return (int64_t)(pb >> 1) % (num + 1);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  uint8_t what = fz_u8(&f) % 4; /* lowrank fwd, lowrank bwd, tt fwd, tt bwd */
  int nidx = (int)fz_range(&f, 0, 3);
  int64_t ish[8], sh[8];
  for (int i = 0; i < nidx; ++i) ish[i] = fz_size(&f, 0, 4);
  int64_t dim, num;
  fct_context ctx;
  size_t q = 0;
  uint8_t pb = fz_u8(&f);
  if (what < 2) {
    num = fz_size(&f, 1, 9);
    int64_t R = fz_size(&f, 1, 4);
    dim = fz_size(&f, 1, 6);
    int64_t pad = padding(&f, pb, num);
    fz_context(&f, &ctx);
    DLTensor* idx = fz_index_tensor(&f, nidx, ish, num);
    DLTensor* U = fz_tensor(&f, 2, (int64_t[]){num, R}, false);
    DLTensor* V = fz_tensor(&f, 2, (int64_t[]){R, dim}, false);
    int ny = fz_shape_cat(sh, ish, nidx, dim);
    if (what == 0) {
      DLTensor* y = fz_tensor(&f, ny, sh, true);
      if (f.skip) goto done;
      FZ_QUERY_RUN(&f, &ctx, q, "lowrank_embedding_forward",
                   fct_lowrank_embedding_forward_workspace(&ctx, idx, U, V, pad, y, &q),
                   fct_lowrank_embedding_forward(&ctx, idx, U, V, pad, y));
    } else {
      DLTensor* gy = fz_tensor(&f, ny, sh, false);
      DLTensor* gU = fz_opt_tensor(&f, 2, (int64_t[]){num, R}, true);
      DLTensor* gV = fz_opt_tensor(&f, 2, (int64_t[]){R, dim}, true);
      if (f.skip) goto done;
      FZ_QUERY_RUN(&f, &ctx, q, "lowrank_embedding_backward",
                   fct_lowrank_embedding_backward_workspace(&ctx, gy, idx, U, V, pad, gU, gV, &q),
                   fct_lowrank_embedding_backward(&ctx, gy, idx, U, V, pad, gU, gV));
    }
  } else {
    int d = fz_count(&f, 1, 3);
    int nd = d > 0 ? d : 0;
    int64_t n[12], m[12], r[13];
    int64_t cap = 1;
    dim = 1;
    for (int k = 0; k < nd && k < 12; ++k) {
      cap *= (n[k] = fz_range(&f, 1, 3));
      dim *= (m[k] = fz_range(&f, 1, 3));
    }
    for (int k = 0; k <= nd && k < 13; ++k) r[k] = (k == 0 || k == nd) ? 1 : fz_range(&f, 1, 3);
    uint8_t nb = fz_u8(&f);
    num = nb == 0xff ? fz_size(&f, 0, 99) : 1 + (int64_t)nb % cap; /* <= the padded vocabulary */
    int64_t pad = padding(&f, pb, num);
    fz_context(&f, &ctx);
    DLTensor* idx = fz_index_tensor(&f, nidx, ish, num);
    const DLTensor** G = fz_u8(&f) == 0xff ? NULL : fz_list(&f, nd);
    for (int k = 0; G && k < nd && k < 12; ++k)
      G[k] = fz_tensor(&f, 4, (int64_t[]){r[k], n[k], m[k], r[k + 1]}, false);
    int ny = fz_shape_cat(sh, ish, nidx, dim);
    if (what == 2) {
      DLTensor* y = fz_tensor(&f, ny, sh, true);
      if (f.skip) goto done;
      FZ_QUERY_RUN(&f, &ctx, q, "tt_embedding_forward",
                   fct_tt_embedding_forward_workspace(&ctx, idx, d, G, num, pad, y, &q),
                   fct_tt_embedding_forward(&ctx, idx, d, G, num, pad, y));
    } else {
      DLTensor* gy = fz_tensor(&f, ny, sh, false);
      DLTensor** gG = (fz_u8(&f) & 1) ? NULL : (DLTensor**)fz_list(&f, nd);
      for (int k = 0; gG && k < nd && k < 12; ++k)
        gG[k] = fz_opt_tensor(&f, 4, (int64_t[]){r[k], n[k], m[k], r[k + 1]}, true);
      if (f.skip) goto done;
      FZ_QUERY_RUN(&f, &ctx, q, "tt_embedding_backward",
                   fct_tt_embedding_backward_workspace(&ctx, gy, idx, d, G, num, pad,
                                                       (const DLTensor* const*)gG, &q),
                   fct_tt_embedding_backward(&ctx, gy, idx, d, G, num, pad, gG));
    }
  }
done:
  fz_end(&f);
  return 0;
}
