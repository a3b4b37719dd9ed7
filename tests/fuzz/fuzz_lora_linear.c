/* libFuzzer harness: fct_lora_linear_forward / _backward and their workspace
 * queries, with each base kind (dense, low-rank, given), dropout options and
 * gradient subsets (fuzz_util.h says how tensors are fuzzed). */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  bool backward = fz_u8(&f) & 1;
  int64_t lead[4], M, sh[8];
  int nl = fz_batch(&f, lead, &M);
  int64_t in = fz_size(&f, 1, 8), out = fz_size(&f, 1, 8), r = fz_size(&f, 1, 4),
          rb = fz_size(&f, 1, 4);
  fct_context ctx;
  fz_context(&f, &ctx);
  fct_lora_options opts = {1.0, 0.0, 7};
  uint8_t ob = fz_u8(&f);
  if (ob & 1) opts.scale = fz_double(&f);
  if (ob & 2) opts.dropout = (ob & 4) ? fz_double(&f) : 0.25;
  if (ob & 8) opts.seed = fz_u64(&f);
  const fct_lora_options* po = (ob & 0xf0) == 0xf0 ? NULL : &opts;
  fct_lora_base base = {0};
  uint8_t kb = fz_u8(&f);
  base.kind = (kb & 0xf0) == 0xf0 ? (int32_t)fz_u32(&f) : kb % 3;
  if ((kb & 0x0c) == 0x0c) base.reserved_ = 1;
  const fct_lora_base* pbase = kb == 0xef ? NULL : &base;

  DLTensor* x = fz_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, false);
  DLTensor* A = fz_tensor(&f, 2, (int64_t[]){r, in}, false);
  DLTensor* B = fz_tensor(&f, 2, (int64_t[]){out, r}, false);
  /* The base's tensors: those of its kind, now and then one of another. */
  uint8_t extra = pbase ? fz_u8(&f) : 0; /* no base: none of its tensors is made */
  if (pbase && (base.kind == FCT_LORA_DENSE || (extra & 0x11) == 0x11))
    base.W = fz_tensor(&f, 2, (int64_t[]){out, in}, false);
  if (pbase && (base.kind == FCT_LORA_LOWRANK || (extra & 0x22) == 0x22)) {
    base.U = fz_tensor(&f, 2, (int64_t[]){out, rb}, false);
    base.V = fz_tensor(&f, 2, (int64_t[]){rb, in}, false);
  }
  if (pbase && (base.kind != FCT_LORA_GIVEN || (extra & 0x44) == 0x44))
    base.bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, false);
  /* The backward never reads base_out (so it is not judged there). */
  if (pbase && !backward && (base.kind == FCT_LORA_GIVEN || (extra & 0x88) == 0x88))
    base.base_out = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
  size_t q = 0;
  if (!backward) {
    DLTensor* y = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, true);
    DLTensor* t = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, r), sh, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "lora_linear_forward",
                 fct_lora_linear_forward_workspace(&ctx, x, A, B, pbase, po, y, t, &q),
                 fct_lora_linear_forward(&ctx, x, A, B, pbase, po, y, t));
  } else {
    DLTensor* gy = fz_tensor(&f, fz_shape_cat(sh, lead, nl, out), sh, false);
    DLTensor* t = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, r), sh, false);
    fct_lora_grads g = {0};
    const fct_lora_grads* pg = fz_u8(&f) == 0xff ? NULL : &g; /* NULL: none made */
    if (pg) {
      g.x = fz_opt_tensor(&f, fz_shape_cat(sh, lead, nl, in), sh, true);
      g.A = fz_opt_tensor(&f, 2, (int64_t[]){r, in}, true);
      g.B = fz_opt_tensor(&f, 2, (int64_t[]){out, r}, true);
      if (base.W) g.W = fz_opt_tensor(&f, 2, (int64_t[]){out, in}, true);
      if (base.U) g.U = fz_opt_tensor(&f, 2, (int64_t[]){out, rb}, true);
      if (base.V) g.V = fz_opt_tensor(&f, 2, (int64_t[]){rb, in}, true);
      if (base.kind != FCT_LORA_GIVEN) g.bias = fz_opt_tensor(&f, 1, (int64_t[]){out}, true);
    }
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "lora_linear_backward",
                 fct_lora_linear_backward_workspace(&ctx, gy, x, A, B, pbase, po, t, pg, &q),
                 fct_lora_linear_backward(&ctx, gy, x, A, B, pbase, po, t, pg));
  }
done:
  fz_end(&f);
  return 0;
}
