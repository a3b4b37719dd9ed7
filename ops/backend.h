/*
 * backend.h (internal): what the device-independent entry points hand to a
 * backend. The entry points (ops/<op>.c) check arguments, build a plan and lay
 * out the workspace; a backend (ops/cpu, ops/cuda) only computes.
 */
#ifndef FCT_BACKEND_H
#define FCT_BACKEND_H

#include "fct_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Low-rank linear plan. Matrix views are BLAS-readable once the entry point
 * has packed the inputs marked pack_* into the workspace. */
typedef struct fct_lowrank_plan {
  fct_dtype dt;
  int64_t M, in, out, r;
  fct_mat x, U, V; /* [M, in], [out, r], [r, in] */
  fct_mat g;       /* backward: grad_y [M, out] */
  fct_mat t;       /* [M, r]: output/input tensor, or workspace */
  fct_mat y;       /* forward output [M, out] */
  const char* bias; /* [out] with stride bias_stride, or NULL */
  int64_t bias_stride;
  bool t_ready;    /* backward: t holds x·Vᵀ already */
  /* backward outputs, NULL data when not requested */
  fct_mat gx, gU, gV, gt; /* gt [M, r] lives in the workspace */
  char* gb;
  /* scratch for device-side flags (CUDA finite check), in the workspace */
  char* scratch;
} fct_lowrank_plan;

typedef struct fct_backend {
  /* dst (dense row-major, numel elements) = src (any strides). */
  fct_status (*pack)(fct_context* ctx, const DLTensor* src, char* dst);
  fct_status (*lowrank_forward)(fct_context* ctx, const fct_lowrank_plan* p);
  fct_status (*lowrank_backward)(fct_context* ctx, const fct_lowrank_plan* p);
  /* *count = number of NaN/Inf elements of t. scratch: 256 bytes of
   * workspace on t's device (unused on CPU). */
  fct_status (*count_nonfinite)(fct_context* ctx, const DLTensor* t, char* scratch,
                                int64_t* count);

  /* Primitives of the tensorized linear ops (CP, Tucker, TT: issue 3). Their
   * algorithms are written once, device independent, in ops/<op>_linear.c
   * as sequences of these calls. `device` is the tensors' device index
   * (ignored on CPU); matrices are fct_mat views in elements. */

  /* C_b = A_b·B_b + beta·C_b for b < batch, where X_b is X shifted by b·sX
   * elements (sX = 0: shared by every b). A, B: BLAS-readable
   * (fct_mat_blas_ok); C: row-major (cs == 1) and disjoint for distinct b.
   * beta is 0 or 1; k == 0 gives C_b = beta·C_b. */
  fct_status (*gemm)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                     const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                     int64_t sa, int64_t sb, int64_t sc);
  /* C = Σ_b A_b·B_b + beta·C over b < batch (a batch reduction). scratch:
   * fct_gemm_reduce_scratch() bytes of workspace (CUDA keeps partial sums
   * there; unused on CPU). */
  fct_status (*gemm_reduce)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                            const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                            int64_t sa, int64_t sb, char* scratch, size_t scratch_bytes);
  /* Every row of y [rows, cols] (cs == 1) = bias [cols] (element stride bs). */
  fct_status (*fill_rows)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* y,
                          const char* bias, int64_t bs);
  /* out [cols] (dense) = Σ_i g [i, :], accumulated in float64 on CPU and in
   * float32/float64 on CUDA; rows == 0 gives zeros. */
  fct_status (*column_sums)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* g,
                            char* out);
  /* C [rows, cols] (cs == 1) = 0. */
  fct_status (*zero)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C);
  /* Row-wise Kronecker (Khatri–Rao) product of nf factors F_k [n_k, cols]:
   *   out [∏ n_k, cols] (cs == 1), out[(a_0, .., a_{nf-1}), c] = ∏ F_k[a_k, c]
   * with a_0 the slowest index; nf == 0 gives one row of ones. The F_k may
   * have any strides; out must not overlap them. */
  fct_status (*khatri_rao)(fct_context* ctx, int device, fct_dtype dt, int nf,
                           const fct_mat* F, const fct_mat* out);
  /* Gradient of one factor of a Khatri–Rao product: with gK viewed as
   * [npre, nk, nsuf, cols] (rows (p, a, s) of a [npre·nk·nsuf, cols] view),
   *   gF [nk, cols] (cs == 1) = Σ_{p, s} gK[(p, a, s), :] ⊙ pre[p, :] ⊙ suf[s, :]
   * where pre [npre, cols] and suf [nsuf, cols] are the Khatri–Rao products of
   * the factors before and after this one. */
  fct_status (*khatri_rao_grad)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* gK,
                                int64_t npre, int64_t nk, int64_t nsuf, const fct_mat* pre,
                                const fct_mat* suf, const fct_mat* gF);
} fct_backend;

/* Scratch bytes backend->gemm_reduce needs on a device of this kind for a
 * reduction of `batch` products of size [m, n] (0 on CPU). */
size_t fct_gemm_reduce_scratch(bool cuda, fct_dtype dt, int64_t m, int64_t n, int64_t batch);

extern const fct_backend fct_cpu_backend;

/* Called by libfactorch_cuda when it is loaded; the table must outlive the
 * process (static storage). */
FCT_API void fct_register_cuda_backend(const fct_backend* backend);

/* The backend for t's device, or a failure status with a message in ctx. */
fct_status fct_backend_for(fct_context* ctx, const char* name, const DLTensor* t,
                           const fct_backend** out);

#ifdef __cplusplus
}
#endif

#endif /* FCT_BACKEND_H */
