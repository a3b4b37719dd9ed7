/* libFuzzer harness: fct_conv_chain_forward / _backward, their workspace
 * queries, fct_conv_chain_check and fct_conv_stage_out_numel (fuzz_util.h
 * says how tensors are fuzzed). Stages are chained consistently (each reads
 * what the previous writes) and then, now and then, one field of one stage
 * is replaced by any size. */
#include "fuzz_util.h"

/* Wrapping products: a corrupted stage gives garbage shapes, not UB. */
static int64_t mw(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
static int64_t aw(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  bool backward = fz_u8(&f) & 1;
  int n = fz_count(&f, 1, 3);
  int alloc_n = n > 0 && n <= FCT_MAX_STAGES + 2 ? n : 1;
  fct_conv_stage* st = fz_alloc(&f, sizeof *st * (size_t)alloc_n);
  int64_t b = fz_range(&f, 1, 2), C = fz_range(&f, 1, 3), H = fz_range(&f, 1, 5),
          W = fz_range(&f, 1, 5);
  int64_t in_c0 = C, in_h0 = H, in_w0 = W;
  int64_t P = 1, Cy = 1;
  for (int i = 0; i < alloc_n; ++i) {
    fct_conv_stage* s = &st[i];
    s->batch = b;
    s->in_channels = C;
    s->in_h = H;
    s->in_w = W;
    uint8_t kind = fz_u8(&f);
    s->out_channels = (kind & 3) == 1 ? C : fz_range(&f, 1, 3);
    s->groups = (kind & 3) == 1 && C > 1 ? C : 1;
    s->kh = fz_range(&f, 1, 3);
    s->kw = fz_range(&f, 1, 3);
    s->stride_h = fz_range(&f, 1, 2);
    s->stride_w = fz_range(&f, 1, 2);
    s->pad_top = fz_range(&f, 0, 1);
    s->pad_bottom = fz_range(&f, 0, 1);
    s->pad_left = fz_range(&f, 0, 1);
    s->pad_right = fz_range(&f, 0, 1);
    s->dil_h = fz_range(&f, 1, 2);
    s->dil_w = fz_range(&f, 1, 2);
    if ((kind & 0xf0) == 0xf0) { /* any value in one field */
      int64_t* fields = &s->batch;
      fields[fz_u8(&f) % 16] = fz_size(&f, 0, 9);
    }
    int64_t ekh = mw(s->dil_h, aw(s->kh, -1)), ekw = mw(s->dil_w, aw(s->kw, -1));
    int64_t OH = aw(aw(aw(s->in_h, s->pad_top), s->pad_bottom), (int64_t)(0 - (uint64_t)aw(ekh, 1)));
    int64_t OW = aw(aw(aw(s->in_w, s->pad_left), s->pad_right), (int64_t)(0 - (uint64_t)aw(ekw, 1)));
    OH = OH >= 0 && s->stride_h > 0 ? aw(OH / s->stride_h, 1) : 1;
    OW = OW >= 0 && s->stride_w > 0 ? aw(OW / s->stride_w, 1) : 1;
    b = s->batch;
    C = s->out_channels;
    H = OH;
    W = OW;
    P = mw(OH, OW);
    Cy = mw(b, s->out_channels);
  }
  int64_t N = fz_size(&f, 0, 3);
  fct_context ctx;
  fz_context(&f, &ctx);
  int64_t spi = 0;
  fct_status cs = fz_check(&f, &ctx, fct_conv_chain_check(&ctx, n, st, &spi), "conv_chain_check");
  (void)fct_conv_stage_out_numel(&st[0]);
  DLTensor* x = fz_tensor(&f, 4, (int64_t[]){N, mw(st[0].batch, in_c0), in_h0, in_w0}, false);
  const DLTensor** w = fz_u8(&f) == 0xff ? NULL : fz_list(&f, alloc_n);
  for (int i = 0; w && i < alloc_n; ++i)
    w[i] = fz_tensor(&f, 4,
                     (int64_t[]){st[i].out_channels,
                                 st[i].groups > 0 ? st[i].in_channels / st[i].groups : 1,
                                 st[i].kh, st[i].kw},
                     false);
  int64_t saved_n = cs == FCT_OK ? mw(N, spi) : 1;
  size_t q = 0;
  if (!backward) {
    DLTensor* bias = fz_opt_tensor(&f, 1, (int64_t[]){Cy}, false);
    DLTensor* y = fz_tensor(&f, 3, (int64_t[]){N, Cy, P}, true);
    DLTensor* saved = fz_opt_tensor(&f, 1, (int64_t[]){saved_n}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "conv_chain_forward",
                 fct_conv_chain_forward_workspace(&ctx, x, n, st, w, bias, y, saved, &q),
                 fct_conv_chain_forward(&ctx, x, n, st, w, bias, y, saved));
  } else {
    DLTensor* gy = fz_tensor(&f, 3, (int64_t[]){N, Cy, P}, false);
    DLTensor* saved = fz_opt_tensor(&f, 1, (int64_t[]){saved_n}, false);
    DLTensor* gx = fz_opt_tensor(&f, 4, (int64_t[]){N, mw(st[0].batch, in_c0), in_h0, in_w0}, true);
    DLTensor** gw = (fz_u8(&f) & 1) ? NULL : (DLTensor**)fz_list(&f, alloc_n);
    for (int i = 0; gw && i < alloc_n; ++i)
      gw[i] = fz_opt_tensor(&f, 4,
                            (int64_t[]){st[i].out_channels,
                                        st[i].groups > 0 ? st[i].in_channels / st[i].groups : 1,
                                        st[i].kh, st[i].kw},
                            true);
    DLTensor* gb = fz_opt_tensor(&f, 1, (int64_t[]){Cy}, true);
    if (f.skip) goto done;
    FZ_QUERY_RUN(&f, &ctx, q, "conv_chain_backward",
                 fct_conv_chain_backward_workspace(&ctx, gy, x, n, st, w, saved, gx,
                                                   (const DLTensor* const*)gw, gb, &q),
                 fct_conv_chain_backward(&ctx, gy, x, n, st, w, saved, gx, gw, gb));
  }
done:
  fz_end(&f);
  return 0;
}
