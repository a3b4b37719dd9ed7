/* libFuzzer harness: the decompositions (svd, randomized_svd, cp_als,
 * tucker_hooi, tensor_train) and their workspace / capacity queries, with
 * fuzzed ranks, options, mode-size and max-rank lists (fuzz_util.h says how
 * tensors are fuzzed). Sizes stay small and iteration counts low: every
 * accepted call runs LAPACK. */
#include "fuzz_util.h"

static void svd_family(fz* f, fct_context* ctx, bool randomized) {
  int64_t m = fz_size(f, 1, 6), n = fz_size(f, 1, 6), r = fz_size(f, 1, 4);
  int64_t s = randomized ? r : (int64_t)((uint64_t)r + (uint64_t)fz_range(f, 0, 2));
  DLTensor* A = fz_tensor(f, 2, (int64_t[]){m, n}, false);
  DLTensor* U = fz_tensor(f, 2, (int64_t[]){m, r}, true);
  DLTensor* S = fz_tensor(f, 1, (int64_t[]){s}, true);
  DLTensor* Vh = fz_tensor(f, 2, (int64_t[]){r, n}, true);
  fct_decomp_info info;
  fct_decomp_info* pi = fz_u8(f) & 1 ? NULL : &info;
  size_t q = 0;
  if (f->skip) return;
  if (!randomized) {
    fct_status st = fz_check(f, ctx, fct_svd_workspace(ctx, A, U, S, Vh, &q), "svd_workspace");
    fz_workspace(f, ctx, st, q);
    fz_check(f, ctx, fct_svd(ctx, A, U, S, Vh, pi), "svd");
    return;
  }
  fct_rsvd_options o = {fz_size(f, 0, 4), (int32_t)fz_count(f, 0, 2), 0, fz_u64(f)};
  uint8_t b = fz_u8(f);
  if ((b & 0x0f) == 0x0f) o.reserved_ = 1;
  const fct_rsvd_options* po = (b & 0xf0) == 0xf0 ? NULL : &o;
  fct_status st = fz_check(f, ctx, fct_randomized_svd_workspace(ctx, A, U, S, Vh, po, &q),
                           "randomized_svd_workspace");
  fz_workspace(f, ctx, st, q);
  fz_check(f, ctx, fct_randomized_svd(ctx, A, U, S, Vh, po, pi), "randomized_svd");
}

/* X [I_0..I_{N-1}] with N in [2, 3] (sometimes any), sizes 1..4. */
static int tensor_modes(fz* f, int64_t* I, int lo) {
  int N = fz_count(f, lo, 3);
  for (int k = 0; k < N && k < 8; ++k) I[k] = fz_size(f, 1, 4);
  return N;
}

static void cp(fz* f, fct_context* ctx) {
  int64_t I[8];
  int N = tensor_modes(f, I, 2);
  int nt = N > 0 && N <= 8 ? N : 2;
  if (N <= 0 || N > 8) for (int k = 0; k < nt; ++k) I[k] = 2;
  int64_t R = fz_size(f, 1, 4);
  DLTensor* X = fz_tensor(f, nt, I, false);
  int nf = (fz_u8(f) & 0x0f) == 0x0f ? fz_count(f, 0, 9) : N;
  int nl = nf > 0 && nf < 12 ? nf : 1;
  DLTensor** F = (fz_u8(f) == 0xff) ? NULL : (DLTensor**)fz_list(f, nl);
  for (int k = 0; F && k < nl; ++k) F[k] = fz_tensor(f, 2, (int64_t[]){k < nt ? I[k] : 2, R}, true);
  DLTensor* w = fz_tensor(f, 1, (int64_t[]){R}, true);
  fct_cp_options o = {(int32_t)fz_count(f, 0, 3), (int32_t)fz_count(f, 0, 3), fz_double(f),
                      fz_double(f) / 8, fz_u64(f), (int32_t)fz_range(f, 0, 2), 0};
  uint8_t b = fz_u8(f);
  if ((b & 0x0f) == 0x0f) o.reserved_ = (int32_t)fz_u32(f);
  const fct_cp_options* po = (b & 0xf0) == 0xf0 ? NULL : &o;
  double* errors = (b & 1) || o.n_iter_max <= 0 ? NULL : fz_alloc(f, sizeof(double) * (size_t)o.n_iter_max);
  fct_decomp_info info;
  size_t q = 0;
  if (f->skip) return;
  fct_status st = fz_check(f, ctx,
                           fct_cp_als_workspace(ctx, X, nf, (const DLTensor* const*)F, w, po, &q),
                           "cp_als_workspace");
  fz_workspace(f, ctx, st, q);
  fz_check(f, ctx, fct_cp_als(ctx, X, nf, F, w, po, errors, (b & 2) ? NULL : &info), "cp_als");
}

static void tucker(fz* f, fct_context* ctx) {
  int64_t I[8], R[8];
  int N = tensor_modes(f, I, 2);
  int nt = N > 0 && N <= 8 ? N : 2;
  if (N <= 0 || N > 8) for (int k = 0; k < nt; ++k) I[k] = 2;
  for (int k = 0; k < nt; ++k) R[k] = fz_size(f, 1, I[k] > 0 && I[k] < 9 ? I[k] : 1);
  DLTensor* X = fz_tensor(f, nt, I, false);
  DLTensor* core = fz_tensor(f, nt, R, true);
  int nf = (fz_u8(f) & 0x0f) == 0x0f ? fz_count(f, 0, 9) : N;
  int nl = nf > 0 && nf < 12 ? nf : 1;
  DLTensor** F = (fz_u8(f) == 0xff) ? NULL : (DLTensor**)fz_list(f, nl);
  for (int k = 0; F && k < nl; ++k)
    F[k] = fz_tensor(f, 2, (int64_t[]){k < nt ? I[k] : 2, k < nt ? R[k] : 1}, true);
  fct_tucker_options o = {(int32_t)fz_count(f, 0, 3), (int32_t)fz_count(f, 0, 3),
                          fz_double(f), fz_u64(f)};
  uint8_t b = fz_u8(f);
  const fct_tucker_options* po = (b & 0xf0) == 0xf0 ? NULL : &o;
  double* errors = (b & 1) || o.n_iter_max <= 0 ? NULL : fz_alloc(f, sizeof(double) * (size_t)o.n_iter_max);
  fct_decomp_info info;
  size_t q = 0;
  if (f->skip) return;
  fct_status st = fz_check(f, ctx,
                           fct_tucker_hooi_workspace(ctx, X, core, nf, (const DLTensor* const*)F,
                                                     po, &q),
                           "tucker_hooi_workspace");
  fz_workspace(f, ctx, st, q);
  fz_check(f, ctx, fct_tucker_hooi(ctx, X, core, nf, F, po, errors, (b & 2) ? NULL : &info),
           "tucker_hooi");
}

static void tensor_train(fz* f, fct_context* ctx) {
  int64_t I[8];
  int N = tensor_modes(f, I, 1);
  int nt = N > 0 && N <= 8 ? N : 2;
  if (N <= 0 || N > 8) for (int k = 0; k < nt; ++k) I[k] = 2;
  DLTensor* X = fz_tensor(f, nt, I, false);
  uint8_t b = fz_u8(f);
  /* mode_sizes: X's dims, a merge of them, any values, or NULL. */
  int nm = N;
  int64_t* modes = NULL;
  if (b & 1) {
    nm = (b & 2) ? fz_count(f, 1, 4) : (N > 1 ? 1 : N);
    modes = fz_ints(f, nm > 0 ? nm : 1);
    int64_t numel = 1;
    for (int k = 0; k < nt; ++k) numel = (int64_t)((uint64_t)numel * (uint64_t)I[k]);
    if (nm == 1 && modes) modes[0] = numel;
    else for (int k = 0; k < nm && modes; ++k) modes[k] = fz_size(f, 1, 4);
  }
  int64_t* maxr = NULL;
  if (b & 4) {
    maxr = fz_ints(f, nm + 1 > 0 ? nm + 1 : 1);
    for (int k = 0; k <= nm && maxr; ++k) maxr[k] = (k == 0 || k == nm) && !(b & 8) ? 1 : fz_size(f, 1, 4);
  }
  double eps = (b & 16) ? fz_double(f) : 0.0;
  fct_context quiet = *ctx;
  int64_t cap = 0;
  fct_status cs = fz_check(f, ctx, fct_tensor_train_capacity(ctx, X, nm, modes, maxr, &cap),
                           "tensor_train_capacity");
  (void)quiet;
  DLTensor* cores = fz_tensor(f, 1, (int64_t[]){cs == FCT_OK ? cap : 4}, true);
  int64_t* ranks = (b & 32) ? NULL : fz_ints(f, nm + 1 > 0 ? nm + 1 : 1);
  fct_decomp_info info;
  size_t q = 0;
  if (f->skip) return;
  fct_status st = fz_check(f, ctx,
                           fct_tensor_train_workspace(ctx, X, nm, modes, maxr, eps, cores, &q),
                           "tensor_train_workspace");
  fz_workspace(f, ctx, st, q);
  fz_check(f, ctx, fct_tensor_train(ctx, X, nm, modes, maxr, eps, cores, ranks,
                                    (b & 64) ? NULL : &info),
           "tensor_train");
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz f;
  fz_begin(&f, data, size);
  fz_problem(&f);
  uint8_t what = fz_u8(&f) % 5;
  fct_context ctx;
  fz_context(&f, &ctx);
  switch (what) {
    case 0: svd_family(&f, &ctx, false); break;
    case 1: svd_family(&f, &ctx, true); break;
    case 2: cp(&f, &ctx); break;
    case 3: tucker(&f, &ctx); break;
    default: tensor_train(&f, &ctx); break;
  }
  fz_end(&f);
  return 0;
}
