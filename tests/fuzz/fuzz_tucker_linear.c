/* libFuzzer harness: fct_tucker_linear_forward / _backward (with and
 * without the kept states), their workspace queries, fct_tucker_linear_plan
 * and fct_tucker_linear_states (fuzz_util.h says what is fuzzed). */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  uint8_t what = fz_u8(&f) % 3;
  int n_in = fz_count(&f, 1, 3), n_out = fz_count(&f, 1, 3);
  int64_t *im = fz_ints(&f, n_in), *ir = fz_ints(&f, n_in);
  int64_t *om = fz_ints(&f, n_out), *orr = fz_ints(&f, n_out);
  int64_t in = 1, out = 1, S = 1, T = 1;
  for (int k = 0; k < n_in; ++k) {
    in *= (im[k] = fz_range(&f, 1, 4));
    T *= (ir[k] = fz_range(&f, 1, 3));
  }
  for (int k = 0; k < n_out; ++k) {
    out *= (om[k] = fz_range(&f, 1, 4));
    S *= (orr[k] = fz_range(&f, 1, 3));
  }
  if (what == 2) {
    fz_raw_sizes(&f, ir, n_in);
    fz_raw_sizes(&f, om, n_out);
    fct_linear_plan_info info;
    int64_t batch = fz_size(&f, 0, 64);
    uint8_t b = fz_u8(&f);
    fct_status s = fct_tucker_linear_plan(n_in, (b & 1) ? NULL : im, (b & 8) ? NULL : ir, n_out,
                                          (b & 2) ? NULL : om, (b & 16) ? NULL : orr, batch,
                                          f.device, f.dtype, (b & 4) ? NULL : &info);
    fz_check_plan(&f, s, "tucker_linear_plan");
    int64_t per_row = -1;
    s = fct_tucker_linear_states(n_in, (b & 1) ? NULL : im, (b & 8) ? NULL : ir, n_out,
                                 (b & 2) ? NULL : om, (b & 16) ? NULL : orr,
                                 (b & 32) ? NULL : &per_row);
    if (s == FCT_OK && (per_row < 0 || per_row > (int64_t)1 << 32)) __builtin_trap();
    goto done;
  }
  int64_t lead[4], M, sh[8];
  int nl = fz_batch(&f, lead, &M);
  fct_context ctx;
  fz_context(&f, &ctx);
  int64_t kn; /* the kept states' size, saturated (M may be huge) */
  if (__builtin_mul_overflow(M, S + T, &kn)) kn = INT64_MAX;
  DLTensor* x = fz_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, false);
  DLTensor* core = fz_tensor(&f, 2, (int64_t[]){S, T}, false);
  /* A list is NULL (decided first: its tensors are then never made), or
   * exactly n entries long. */
  const DLTensor** V = fz_list(&f, n_in);
  const DLTensor** U = fz_u8(&f) == 0xff ? NULL : fz_list(&f, n_out);
  for (int k = 0; V && k < n_in; ++k) V[k] = fz_tensor(&f, 2, (int64_t[]){im[k], ir[k]}, false);
  for (int k = 0; U && k < n_out; ++k) U[k] = fz_tensor(&f, 2, (int64_t[]){om[k], orr[k]}, false);
  size_t q = 0;
  if (what == 0) {
    DLTensor* bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, false);
    DLTensor* y = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, true);
    DLTensor* st = fz_opt_tensor(&f, 1, (int64_t[]){kn}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "tucker_linear_forward",
                 fct_tucker_linear_forward_workspace(&ctx, x, core, n_in, V, n_out, U, bias, y, st,
                                                     &q),
                 fct_tucker_linear_forward(&ctx, x, core, n_in, V, n_out, U, bias, y, st));
  } else {
    DLTensor* gy = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
    DLTensor* gx = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, true);
    DLTensor* gcore = fz_opt_tensor(&f, 2, (int64_t[]){S, T}, true);
    uint8_t b = fz_u8(&f);
    DLTensor** gV = (b & 1) ? NULL : (DLTensor**)fz_list(&f, n_in);
    DLTensor** gU = (b & 2) ? NULL : (DLTensor**)fz_list(&f, n_out);
    for (int k = 0; gV && k < n_in; ++k)
      gV[k] = fz_opt_tensor(&f, 2, (int64_t[]){im[k], ir[k]}, true);
    for (int k = 0; gU && k < n_out; ++k)
      gU[k] = fz_opt_tensor(&f, 2, (int64_t[]){om[k], orr[k]}, true);
    DLTensor* gb = fz_opt_tensor(&f, 1, (int64_t[]){out}, true);
    DLTensor* st = fz_opt_tensor(&f, 1, (int64_t[]){kn}, false);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "tucker_linear_backward",
                 fct_tucker_linear_backward_workspace(&ctx, gy, x, core, n_in, V, n_out, U, st, gx,
                                                      gcore, (const DLTensor* const*)gV,
                                                      (const DLTensor* const*)gU, gb, &q),
                 fct_tucker_linear_backward(&ctx, gy, x, core, n_in, V, n_out, U, st, gx, gcore,
                                            gV, gU, gb));
  }
done:
  fz_end(&f);
  return 0;
}
