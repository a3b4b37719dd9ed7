/* libFuzzer harness: the DLPack bridge's tensor checks and views
 * (dlpack_bridge/fct_tensor.h) called directly, as every op calls them
 * first: fct_check_tensor, then on what it accepts fct_fold,
 * fct_mat_blas_ok, fct_check_output, fct_byte_range and fct_check_disjoint;
 * plus the name and status tables with any code. */
#include <stdio.h>
#include <string.h>

#include "fct_tensor.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  fct_context ctx;
  fz_context(&f, &ctx);
  DLTensor* t[2];
  for (int k = 0; k < 2; ++k) {
    int nd = (int)fz_range(&f, 0, 4);
    int64_t sh[4];
    for (int i = 0; i < nd; ++i) sh[i] = fz_size(&f, 0, 5);
    t[k] = fz_tensor(&f, nd, sh, k == 1);
  }
  int min_ndim = (int)fz_range(&f, -1, 3);
  (void)fct_status_string((int)(int8_t)fz_u8(&f));
  (void)fct_device_name((int)(int8_t)fz_u8(&f));
  (void)fct_dtype_name((DLDataType){fz_u8(&f), fz_u8(&f), 1});
  if (f.skip) goto done;
  fct_status s[2];
  for (int k = 0; k < 2; ++k) {
    f.impossible = f.ts[k]->impossible; /* judged tensor by tensor here */
    s[k] = fz_check(&f, &ctx, fct_check_tensor(&ctx, k ? "b" : "a", t[k], min_ndim),
                    "fct_check_tensor");
    if (s[k] != FCT_OK) continue;
    fct_mat m;
    (void)fct_fold(t[k], &m);
    (void)fct_mat_blas_ok(&m);
    fct_mat mt = fct_mat_t(m);
    (void)mt;
    fz_check(&f, &ctx, fct_check_output(&ctx, k ? "b" : "a", t[k], &m), "fct_check_output");
    uintptr_t lo, hi;
    fct_byte_range(t[k], &lo, &hi);
    /* The range must cover the first element and stay within the buffer
     * the decoder made (it is exactly the descriptor's extent). */
    const fz_tens* ft = f.ts[k];
    if (fct_numel(t[k]) > 0 && ft->mem &&
        (lo < (uintptr_t)ft->mem || hi > (uintptr_t)ft->mem + ft->mem_bytes || lo >= hi)) {
      fprintf(stderr, "fuzz: fct_byte_range of tensor %d is outside its memory\n", k);
      __builtin_trap();
    }
  }
  f.impossible = false;
  if (s[0] == FCT_OK && s[1] == FCT_OK)
    fz_check(&f, &ctx, fct_check_disjoint(&ctx, "b", t[1], "a", t[0]), "fct_check_disjoint");
  if (s[0] == FCT_OK && s[1] == FCT_OK)
    fz_check(&f, &ctx, fct_check_same(&ctx, "b", t[1], "a", t[0]), "fct_check_same");
done:
  fz_end(&f);
  return 0;
}
