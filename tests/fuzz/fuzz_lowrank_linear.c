/* libFuzzer harness: fct_lowrank_linear_forward / _backward and their
 * workspace queries (fuzz_util.h says what is fuzzed). */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  int64_t lead[4], M, sh[8];
  int nl = fz_batch(&f, lead, &M);
  int64_t in = fz_size(&f, 1, 9), out = fz_size(&f, 1, 9), r = fz_size(&f, 1, 5);
  fct_context ctx;
  fz_context(&f, &ctx);
  bool backward = fz_u8(&f) & 1;

  DLTensor* x = fz_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, false);
  DLTensor* U = fz_tensor(&f, 2, (int64_t[]){out, r}, false);
  DLTensor* V = fz_tensor(&f, 2, (int64_t[]){r, in}, false);
  size_t q = 0;
  if (!backward) {
    DLTensor* bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, false);
    DLTensor* y = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, true);
    DLTensor* t = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, r), sh, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "lowrank_linear_forward",
                 fct_lowrank_linear_forward_workspace(&ctx, x, U, V, bias, y, t, &q),
                 fct_lowrank_linear_forward(&ctx, x, U, V, bias, y, t));
  } else {
    DLTensor* gy = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
    DLTensor* t = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, r), sh, false);
    DLTensor* gx = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, true);
    DLTensor* gU = fz_opt_tensor(&f, 2, (int64_t[]){out, r}, true);
    DLTensor* gV = fz_opt_tensor(&f, 2, (int64_t[]){r, in}, true);
    DLTensor* gb = fz_opt_tensor(&f, 1, (int64_t[]){out}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "lowrank_linear_backward",
                 fct_lowrank_linear_backward_workspace(&ctx, gy, x, U, V, t, gx, gU, gV, gb, &q),
                 fct_lowrank_linear_backward(&ctx, gy, x, U, V, t, gx, gU, gV, gb));
  }
done:
  fz_end(&f);
  return 0;
}
