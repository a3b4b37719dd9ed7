/*
 * decompose_cuda.cuh (internal to ops/cuda): what the CUDA decompositions
 * (svd_cuda.cu: svd and randomized_svd on cuSOLVER + cuBLAS) share with
 * their element kernels (decompose_kernels_cuda.cu). C linkage throughout.
 *
 * Matrices handed to cuSOLVER/cuBLAS are column-major float64 unless said
 * otherwise; "views" of results are (pointer, row stride, column stride)
 * in elements, so that one store kernel writes U, S and Vh whichever
 * orientation the factorization ran in.
 */
#ifndef FCT_DECOMPOSE_CUDA_CUH
#define FCT_DECOMPOSE_CUDA_CUH

#include <cusolverDn.h>

#include "cuda_common.cuh"
#include "decompose.h"

/* What the NaN/Inf scan leaves on the device. */
typedef struct fct_scan_result {
  double sumsq;
  long long bad;
} fct_scan_result;

/* An N-D strided view (shape and element strides) passed to a kernel by
 * value. */
typedef struct fct_nd {
  int ndim;
  int64_t shape[FCT_MAX_DIMS], strides[FCT_MAX_DIMS];
} fct_nd;

/* Blocks of the scan's first pass (its partial sums live in the
 * workspace: FCT_SCAN_BLOCKS doubles and as many long longs). */
#define FCT_SCAN_BLOCKS 1024

extern "C" {

/* out = (Σ a², number of NaN/Inf) over a [rows, cols] (element strides rs,
 * cs, any sign) of dtype dt; deterministic (fixed reduction order).
 * part_sum/part_bad: FCT_SCAN_BLOCKS entries of workspace. */
fct_status fct_cudec_scan(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_mat* a, double* part_sum, long long* part_bad,
                          fct_scan_result* out);
/* dst[i·drs + j·dcs] (float64) = a[i, j] (dtype dt, strides rs, cs). */
fct_status fct_cudec_load_f64(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* a, double* dst, int64_t drs, int64_t dcs);
/* dst (dense row-major, dtype dt) = a. */
fct_status fct_cudec_pack(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_mat* a, char* dst);
/* om[i], i < count (dtype dt) = fct_rng_normal(seed, FCT_RNG_SKETCH, i). */
fct_status fct_cudec_sketch(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, char* om,
                            int64_t count, uint64_t seed);
/* Conversions of count elements between float32 and float64. */
fct_status fct_cudec_f32_to_f64(fct_context* ctx, const fct_cuda_env* env, const float* src,
                                double* dst, int64_t count);
fct_status fct_cudec_f64_to_f32(fct_context* ctx, const fct_cuda_env* env, const double* src,
                                float* dst, int64_t count);
/* R [k, k] (ld k) = the upper triangle of A's first k rows (ld lda). */
fct_status fct_cudec_copy_upper(fct_context* ctx, const fct_cuda_env* env, const double* A,
                                int64_t lda, int64_t k, double* R);
/* Q[e] −= (s[k−1]² / 2)·Qprev[e] for e < count: the power iteration's
 * shift, read from the device without a sync. */
fct_status fct_cudec_shift(fct_context* ctx, const fct_cuda_env* env, double* Q,
                           const double* Qprev, int64_t count, const double* s, int64_t k);
/* sign[j] = ±1, the sign of the largest-magnitude entry of column j of
 * U (rows entries, u(i, j) = U[i·urs + j·ucs]; the first such entry on
 * ties), for j < k. */
fct_status fct_cudec_signs(fct_context* ctx, const fct_cuda_env* env, const double* U,
                           int64_t rows, int64_t urs, int64_t ucs, int64_t k, double* sign);
/* out (dense row-major [rows, cols], dtype dt)[i, j] = f·src[i·rs + j·cs],
 * f = sign[j] (sign_on_rows 0), sign[i] (1), or 1 (sign NULL). */
fct_status fct_cudec_store(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, char* out,
                           int64_t rows, int64_t cols, const double* src, int64_t rs,
                           int64_t cs, const double* sign, int sign_on_rows);
/* *err = sqrt(Σ_{j>=r} s_j² / Σ_j s_j²) over q values (0 when all are 0). */
fct_status fct_cudec_tail_error(fct_context* ctx, const fct_cuda_env* env, const double* s,
                                int64_t q, int64_t r, double* err);
/* *err = sqrt(max(0, scan->sumsq − Σ_{j<r} s_j²) / scan->sumsq). */
fct_status fct_cudec_kept_error(fct_context* ctx, const fct_cuda_env* env, const double* s,
                                int64_t r, const fct_scan_result* scan, double* err);

/* dst (n doubles, dense) = the tensor at x (dtype dt) viewed through nd, in
 * its logical row-major order. */
fct_status fct_cudec_load_nd(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                             const char* x, const fct_nd* nd, double* dst, int64_t n);
/* a[e] = fct_rng_normal (normal) or fct_rng_uniform of (seed, stream,
 * first + e), e < n. */
fct_status fct_cudec_rng(fct_context* ctx, const fct_cuda_env* env, double* a, int64_t n,
                         uint64_t seed, uint64_t stream, uint64_t first, bool normal);
/* src [A, B, C] (dense row-major) -> dst [B, A, C] (!swap_last) or
 * [A, C, B] (swap_last). */
fct_status fct_cudec_permute3(fct_context* ctx, const fct_cuda_env* env, const double* src,
                              int64_t A, int64_t B, int64_t C, double* dst, bool swap_last);
/* This thread's cuSOLVER handle for env's device, bound to env's stream
 * (handles_cuda.cu, one cache with the cuBLAS handles). */
fct_status fct_cudec_solver(fct_context* ctx, const fct_cuda_env* env, cusolverDnHandle_t* out);
/* FCT_OK, or FCT_ERR_BLAS naming `what` and cuSOLVER's status. */
fct_status fct_cudec_solver_check(fct_context* ctx, cusolverStatus_t st, const char* what);
/* The engine (engine.h) of CP, Tucker and TT on CUDA (engine_cuda.cu). */
extern const fct_dec_engine fct_cudec_engine;

} /* extern "C" */

#endif /* FCT_DECOMPOSE_CUDA_CUH */
