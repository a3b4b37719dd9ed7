/* libFuzzer harness: fct_tt_linear_forward / _backward, their workspace
 * queries and fct_tt_linear_plan (fuzz_util.h says what is fuzzed). */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  uint8_t what = fz_u8(&f) % 3;
  int d = fz_count(&f, 1, 4);
  int64_t *im = fz_ints(&f, d), *om = fz_ints(&f, d), *rk = fz_ints(&f, d + 1);
  int64_t in = 1, out = 1;
  for (int k = 0; k < d; ++k) {
    in *= (im[k] = fz_range(&f, 1, 3));
    out *= (om[k] = fz_range(&f, 1, 3));
  }
  for (int k = 0; k <= d && d > 0; ++k) rk[k] = (k == 0 || k == d) ? 1 : fz_range(&f, 1, 3);
  if (what == 2) {
    fz_raw_sizes(&f, rk, d > 0 ? d + 1 : 0);
    fz_raw_sizes(&f, im, d);
    fct_linear_plan_info info;
    int64_t batch = fz_size(&f, 0, 64);
    uint8_t b = fz_u8(&f);
    fct_status s = fct_tt_linear_plan(d, (b & 1) ? NULL : im, (b & 2) ? NULL : om,
                                      (b & 8) ? NULL : rk, batch, f.device, f.dtype,
                                      (b & 4) ? NULL : &info);
    fz_check_plan(&f, s, "tt_linear_plan");
    goto done;
  }
  int64_t lead[4], M, sh[8];
  int nl = fz_batch(&f, lead, &M);
  fct_context ctx;
  fz_context(&f, &ctx);
  DLTensor* x = fz_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, false);
  /* A list is NULL (decided first: its tensors are then never made), or
   * exactly d entries long. */
  const DLTensor** G = fz_u8(&f) == 0xff ? NULL : fz_list(&f, d);
  for (int k = 0; G && k < d; ++k)
    G[k] = fz_tensor(&f, 4, (int64_t[]){rk[k], im[k], om[k], rk[k + 1]}, false);
  size_t q = 0;
  if (what == 0) {
    DLTensor* bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, false);
    DLTensor* y = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "tt_linear_forward",
                 fct_tt_linear_forward_workspace(&ctx, x, d, G, bias, y, &q),
                 fct_tt_linear_forward(&ctx, x, d, G, bias, y));
  } else {
    DLTensor* gy = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
    DLTensor* gx = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, true);
    DLTensor** gG = (fz_u8(&f) & 1) ? NULL : (DLTensor**)fz_list(&f, d);
    for (int k = 0; gG && k < d; ++k)
      gG[k] = fz_opt_tensor(&f, 4, (int64_t[]){rk[k], im[k], om[k], rk[k + 1]}, true);
    DLTensor* gb = fz_opt_tensor(&f, 1, (int64_t[]){out}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "tt_linear_backward",
                 fct_tt_linear_backward_workspace(&ctx, gy, x, d, G, gx, (const DLTensor* const*)gG,
                                                  gb, &q),
                 fct_tt_linear_backward(&ctx, gy, x, d, G, gx, gG, gb));
  }
done:
  fz_end(&f);
  return 0;
}
