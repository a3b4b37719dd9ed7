/* libFuzzer harness: fct_cp_linear_forward / _backward, their workspace
 * queries and fct_cp_linear_plan (fuzz_util.h says what is fuzzed). */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  uint8_t what = fz_u8(&f) % 3;
  int n_in = fz_count(&f, 1, 3), n_out = fz_count(&f, 1, 3);
  int64_t* im = fz_ints(&f, n_in);
  int64_t* om = fz_ints(&f, n_out);
  int64_t in = 1, out = 1;
  for (int k = 0; k < n_in; ++k) in *= (im[k] = fz_range(&f, 1, 4));
  for (int k = 0; k < n_out; ++k) out *= (om[k] = fz_range(&f, 1, 4));
  int64_t R = fz_size(&f, 1, 5);
  if (what == 2) { /* the plan: raw sizes, any values */
    fz_raw_sizes(&f, im, n_in);
    fz_raw_sizes(&f, om, n_out);
    fct_linear_plan_info info;
    int64_t batch = fz_size(&f, 0, 64);
    uint8_t b = fz_u8(&f);
    fct_status s = fct_cp_linear_plan(n_in, (b & 1) ? NULL : im, n_out, (b & 2) ? NULL : om, R,
                                      batch, f.device, f.dtype, (b & 4) ? NULL : &info);
    fz_check_plan(&f, s, "cp_linear_plan");
    goto done;
  }
  int64_t lead[4], M, sh[8];
  int nl = fz_batch(&f, lead, &M);
  fct_context ctx;
  fz_context(&f, &ctx);
  DLTensor* x = fz_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, false);
  /* A list is NULL (decided first: its tensors are then never made), or
   * exactly n entries long. */
  const DLTensor** A = fz_u8(&f) == 0xff ? NULL : fz_list(&f, n_in);
  const DLTensor** B = fz_list(&f, n_out);
  for (int k = 0; A && k < n_in; ++k) A[k] = fz_tensor(&f, 2, (int64_t[]){im[k], R}, false);
  for (int k = 0; B && k < n_out; ++k) B[k] = fz_tensor(&f, 2, (int64_t[]){om[k], R}, false);
  size_t q = 0;
  if (what == 0) {
    DLTensor* bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, false);
    DLTensor* y = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, true);
    DLTensor* z = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, R), sh, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "cp_linear_forward",
                 fct_cp_linear_forward_workspace(&ctx, x, n_in, A, n_out, B, bias, y, z, &q),
                 fct_cp_linear_forward(&ctx, x, n_in, A, n_out, B, bias, y, z));
  } else {
    DLTensor* gy = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
    DLTensor* z = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, R), sh, false);
    DLTensor* gx = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, true);
    uint8_t b = fz_u8(&f);
    DLTensor** gA = (b & 1) ? NULL : (DLTensor**)fz_list(&f, n_in);
    DLTensor** gB = (b & 2) ? NULL : (DLTensor**)fz_list(&f, n_out);
    for (int k = 0; gA && k < n_in; ++k) gA[k] = fz_opt_tensor(&f, 2, (int64_t[]){im[k], R}, true);
    for (int k = 0; gB && k < n_out; ++k) gB[k] = fz_opt_tensor(&f, 2, (int64_t[]){om[k], R}, true);
    DLTensor* gb = fz_opt_tensor(&f, 1, (int64_t[]){out}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "cp_linear_backward",
                 fct_cp_linear_backward_workspace(&ctx, gy, x, n_in, A, n_out, B, z, gx,
                                                  (const DLTensor* const*)gA,
                                                  (const DLTensor* const*)gB, gb, &q),
                 fct_cp_linear_backward(&ctx, gy, x, n_in, A, n_out, B, z, gx, gA, gB, gb));
  }
done:
  fz_end(&f);
  return 0;
}
