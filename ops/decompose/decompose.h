/*
 * decompose.h (internal): what the decomposition entry points
 * (ops/decompose/) share: argument checks, the scan for NaN/Inf, loading
 * inputs as float64 and storing float64 results in the output's dtype, a
 * workspace arena, and the table through which libfactorch_cuda provides
 * svd and randomized_svd for CUDA tensors, and the engine (engine.h) on
 * which CP, Tucker and TT run there.
 */
#ifndef FCT_DECOMPOSE_H
#define FCT_DECOMPOSE_H

#include <stdint.h>

#include "engine.h"
#include "fct_tensor.h"
#include "workspace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Workspace arena: fct_arena (workspace.h), and its final check. */

/* Fails with FCT_ERR_OVERFLOW when the arena overflowed, FCT_ERR_WORKSPACE
 * when ctx's workspace is smaller than a->L.cursor. */
static inline fct_status fct_arena_check(fct_context* ctx, const fct_arena* a) {
  if (a->L.overflow)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "workspace: its size overflows size_t");
  return fct_check_workspace(ctx, a->L.cursor);
}

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

/* The tensor to decompose: float32/float64, cpu or cuda, ndim in
 * [min_ndim, max_ndim], sizes fit int32 (LAPACK's index type). */
fct_status fct_dec_check_input(fct_context* ctx, const char* name, const DLTensor* X,
                               int min_ndim, int max_ndim);
/* An output: X's dtype and device, exactly `shape`, dense row-major
 * (C-contiguous), disjoint from X. */
fct_status fct_dec_check_output(fct_context* ctx, const char* name, const DLTensor* t,
                                const DLTensor* X, int ndim, const int64_t* shape);
/* Fails with FCT_ERR_OVERFLOW when v does not fit LAPACK's int32. */
fct_status fct_dec_check_int(fct_context* ctx, const char* what, int64_t v);

/* CPU: sum of squares of X (float64); fails with FCT_ERR_NOT_FINITE naming
 * `name` when X holds NaN or Inf. */
fct_status fct_dec_scan_cpu(fct_context* ctx, const char* name, const DLTensor* X,
                            double* sumsq);
/* CPU: X (any strides, float32/float64) -> dense row-major float64 dst. */
void fct_dec_load_f64(const DLTensor* X, double* dst);
/* True when X holds float64 in dense row-major order (on any device): the
 * engine reads it in place instead of loading it. */
bool fct_dec_dense_f64(const DLTensor* X);

/* CPU: out (dense row-major [rows, cols], float32/float64) [i, j] =
 * src[i·rs + j·cs] (float64, strides in elements). */
void fct_dec_store(DLTensor* out, const double* src, int64_t rows, int64_t cols, int64_t rs,
                   int64_t cs);
/* CPU: X (any strides) -> dense row-major dst in X's own dtype. */
void fct_dec_pack(const DLTensor* X, char* dst);
/* A deterministic sign for singular pairs: flips column j of U and row j of
 * V (j < k) together so that the entry of largest magnitude in U's column is
 * positive. u(i, j) = U[i·urs + j·ucs] for i < m, v(j, c) = V[j·vrs + c·vcs]
 * for c < n. */
void fct_dec_fix_signs(double* U, int64_t m, int64_t urs, int64_t ucs, double* V, int64_t n,
                       int64_t vrs, int64_t vcs, int64_t k);

/* ------------------------------------------------------------------------- */
/* Plans handed to a backend (CPU code in ops/decompose, CUDA code in        */
/* ops/cuda/svd_cuda.cu).                                                    */
/* ------------------------------------------------------------------------- */
typedef struct fct_svd_plan {
  fct_dtype dt;
  int64_t m, n, r, s; /* A [m, n]; U [m, r]; S [s]; Vh [r, n] */
  const DLTensor* A;  /* any strides */
  fct_mat a;          /* A as a 2-D view (strides in elements) */
  bool a_blas;        /* a is row- or column-major: BLAS reads it in place */
  DLTensor *U, *S, *Vh;
  /* randomized only */
  int64_t k;          /* sketch size min(r + p, min(m, n)) */
  int32_t n_iter;
  uint64_t seed;
} fct_svd_plan;

/* Checks the arguments of svd (randomized: S must be [r]) and fills p. */
fct_status fct_dec_svd_plan(fct_context* ctx, const DLTensor* A, const DLTensor* U,
                            const DLTensor* S, const DLTensor* Vh, bool randomized,
                            fct_svd_plan* p);
/* sqrt(Σ_{j>=r} s_j² / Σ_j s_j²) over q singular values, 0 when all are 0. */
double fct_dec_tail_error(const double* s, int64_t q, int64_t r);

typedef struct fct_decompose_backend {
  /* Workspace bytes (may need the device: cuSOLVER's buffer queries). */
  fct_status (*svd_workspace)(fct_context* ctx, const fct_svd_plan* p, size_t* bytes);
  fct_status (*svd)(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info);
  fct_status (*rsvd_workspace)(fct_context* ctx, const fct_svd_plan* p, size_t* bytes);
  fct_status (*rsvd)(fct_context* ctx, const fct_svd_plan* p, fct_decomp_info* info);
  const fct_dec_engine* engine; /* CP-ALS, Tucker-HOOI and TT-SVD */
} fct_decompose_backend;

/* Called by libfactorch_cuda when it is loaded (static storage). */
FCT_API void fct_register_cuda_decompose(const fct_decompose_backend* backend);
/* The CUDA table, or FCT_ERR_UNSUPPORTED naming `name` when not loaded. */
fct_status fct_cuda_decompose_for(fct_context* ctx, const char* name,
                                  const fct_decompose_backend** out);

#ifdef __cplusplus
}
#endif

#endif /* FCT_DECOMPOSE_H */
