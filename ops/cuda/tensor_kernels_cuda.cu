/*
 * CUDA primitives of the tensorized linear ops (CP, Tucker, TT; backend.h):
 * the Khatri–Rao product and its factor gradient, and the fct_backend
 * entries that enter the tensors' device around the shared GEMM and row
 * kernels. CPU counterpart: ops/cpu/tensor_kernels_cpu.c.
 */
#include "cuda_common.cuh"
#include "cuda_math.cuh"

/* Up to FCT_MAX_MODES factors, passed to kernels by value. */
typedef struct kr_factors {
  int nf;
  const void* p[FCT_MAX_MODES];
  int64_t n[FCT_MAX_MODES], rs[FCT_MAX_MODES], cs[FCT_MAX_MODES];
} kr_factors;

/* out [rows, cols] (row stride ors): out[(a_0..a_{nf-1}), c] = ∏ F_k[a_k, c],
 * a_0 the slowest index; one thread per element, the product in Acc. */
template <typename T>
static __global__ void khatri_rao_kernel(kr_factors f, T* out, int64_t rows, int64_t cols,
                                         int64_t ors) {
  typedef typename acc_of<T>::type Acc;
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t r = i / cols, c = i - r * cols, rem = r;
    Acc prod = 1;
    for (int k = f.nf - 1; k >= 0; --k) {
      int64_t a = rem % f.n[k];
      rem /= f.n[k];
      prod *= (Acc)widen(((const T*)f.p[k])[a * f.rs[k] + c * f.cs[k]]);
    }
    narrow(out + r * ors + c, prod);
  }
}

/* gF [nk, cols] (row stride grs) = Σ_{p, s} gK[(p, a, s), :] ⊙ pre[p, :] ⊙
 * suf[s, :]; one thread per (a, c), reading along c (coalesced). Every
 * operand is dense in its last dim. */
template <typename T>
static __global__ void khatri_rao_grad_kernel(const T* gK, int64_t gks, int64_t npre, int64_t nk,
                                              int64_t nsuf, const T* pre, int64_t prs,
                                              const T* suf, int64_t srs, T* gF, int64_t grs,
                                              int64_t cols) {
  typedef typename acc_of<T>::type Acc;
  int64_t n = nk * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t a = i / cols, c = i - a * cols;
    Acc acc = 0;
    for (int64_t p = 0; p < npre; ++p) {
      Acc pv = (Acc)widen(pre[p * prs + c]);
      const T* row = gK + ((p * nk + a) * nsuf) * gks + c;
      for (int64_t s = 0; s < nsuf; ++s)
        acc += (Acc)widen(row[s * gks]) * pv * (Acc)widen(suf[s * srs + c]);
    }
    narrow(gF + a * grs + c, acc);
  }
}

template <typename T>
static void launch_kr(const fct_cuda_env* env, const kr_factors& f, const fct_mat* out) {
  int64_t n = out->rows * out->cols;
  khatri_rao_kernel<T><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      f, (T*)out->data, out->rows, out->cols, out->rs);
}

template <typename T>
static void launch_krg(const fct_cuda_env* env, const fct_mat* gK, int64_t npre, int64_t nk,
                       int64_t nsuf, const fct_mat* pre, const fct_mat* suf, const fct_mat* gF) {
  int64_t n = nk * gF->cols;
  khatri_rao_grad_kernel<T><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      (const T*)gK->data, gK->rs, npre, nk, nsuf, (const T*)pre->data, pre->rs,
      (const T*)suf->data, suf->rs, (T*)gF->data, gF->rs, gF->cols);
}

extern "C" {

static fct_status kr_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, int nf,
                        const fct_mat* F, const fct_mat* out) {
  if (out->rows == 0 || out->cols == 0) return FCT_OK;
  if (nf < 0 || nf > FCT_MAX_MODES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "khatri_rao (cuda): %d factors", nf);
  kr_factors f;
  f.nf = nf;
  for (int k = 0; k < nf; ++k) {
    f.p[k] = F[k].data;
    f.n[k] = F[k].rows;
    f.rs[k] = F[k].rs;
    f.cs[k] = F[k].cs;
  }
  switch (dt) {
    case FCT_F32: launch_kr<float>(env, f, out); break;
    case FCT_F64: launch_kr<double>(env, f, out); break;
    case FCT_BF16: launch_kr<__nv_bfloat16>(env, f, out); break;
    case FCT_F16: launch_kr<__half>(env, f, out); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "khatri_rao (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "khatri_rao_kernel");
}

static fct_status krg_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                         const fct_mat* gK, int64_t npre, int64_t nk, int64_t nsuf,
                         const fct_mat* pre, const fct_mat* suf, const fct_mat* gF) {
  if (gF->rows == 0 || gF->cols == 0) return FCT_OK;
  if (gK->cs != 1 || pre->cs != 1 || suf->cs != 1 || gF->cs != 1)
    return fct_fail(ctx, FCT_ERR_LAYOUT, "khatri_rao_grad (cuda): operands must be dense rows");
  switch (dt) {
    case FCT_F32: launch_krg<float>(env, gK, npre, nk, nsuf, pre, suf, gF); break;
    case FCT_F64: launch_krg<double>(env, gK, npre, nk, nsuf, pre, suf, gF); break;
    case FCT_BF16: launch_krg<__nv_bfloat16>(env, gK, npre, nk, nsuf, pre, suf, gF); break;
    case FCT_F16: launch_krg<__half>(env, gK, npre, nk, nsuf, pre, suf, gF); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "khatri_rao_grad (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "khatri_rao_grad_kernel");
}

/* ------------------------------------------------------------------------- */
/* fct_backend entries: enter the tensors' device, run, restore.             */
/* ------------------------------------------------------------------------- */

fct_status fct_cuda_gemm_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                               const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                               int64_t sa, int64_t sb, int64_t sc) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, true, &env));
  return fct_cuda_leave(ctx, &env,
                        fct_cuda_gemm_batched(ctx, &env, dt, A, B, C, beta, batch, sa, sb, sc));
}

fct_status fct_cuda_gemm_reduce_entry(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                      double beta, int64_t batch, int64_t sa, int64_t sb,
                                      char* scratch, size_t scratch_bytes) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, true, &env));
  return fct_cuda_leave(ctx, &env,
                        fct_cuda_gemm_reduce(ctx, &env, dt, A, B, C, beta, batch, sa, sb,
                                             scratch, scratch_bytes));
}

fct_status fct_cuda_fill_rows_entry(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* y, const char* bias, int64_t bs) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, fct_cuda_fill_rows(ctx, &env, dt, y, bias, bs));
}

fct_status fct_cuda_column_sums_entry(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_mat* g, char* out) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  fct_status st;
  if (g->rows == 0) { /* the kernel would write zeros too; keep it explicit */
    fct_mat o = {out, 1, g->cols, g->cols, 1};
    st = fct_cuda_zero_rows(ctx, &env, dt, &o);
  } else {
    st = fct_cuda_column_sums(ctx, &env, dt, g, out);
  }
  return fct_cuda_leave(ctx, &env, st);
}

fct_status fct_cuda_zero_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, fct_cuda_zero_rows(ctx, &env, dt, C));
}

fct_status fct_cuda_khatri_rao(fct_context* ctx, int device, fct_dtype dt, int nf,
                               const fct_mat* F, const fct_mat* out) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, kr_on(ctx, &env, dt, nf, F, out));
}

fct_status fct_cuda_khatri_rao_grad(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* gK, int64_t npre, int64_t nk, int64_t nsuf,
                                    const fct_mat* pre, const fct_mat* suf, const fct_mat* gF) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, krg_on(ctx, &env, dt, gK, npre, nk, nsuf, pre, suf, gF));
}

} /* extern "C" */
