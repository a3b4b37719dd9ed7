/*
 * tensor_ops_cpu.h (internal): the tensor contractions of CP-ALS and
 * Tucker-HOOI on dense row-major float64 tensors X [I_0, ..., I_{N-1}],
 * done as BLAS calls on reshapes of X, never on explicit unfoldings (an
 * unfolding of a middle mode would be a transposed copy of X).
 *
 * For mode n, X is the 3-D tensor [L, I_n, Rt] with L = Π_{m<n} I_m and
 * Rt = Π_{m>n} I_m: X[l, i, t] at (l·I_n + i)·Rt + t. Factor matrices are
 * column-major [I_m, R] (ld I_m), as in linalg_cpu.h.
 */
#ifndef FCT_TENSOR_OPS_CPU_H
#define FCT_TENSOR_OPS_CPU_H

#include <stdint.h>

#include "engine.h"
#include "linalg_cpu.h"

/* The MTTKRPs of a CP-ALS sweep, M_n = X_(n)·(⊙_{m≠n} A_m) [I_n, R], by a
 * two-level dimension tree: the modes are split at h into a left group
 * [0, h) and a right group [h, N); one GEMM contracts X with the
 * Khatri-Rao product of one group's factors, giving P [Π group', R] for the
 * other group, from which each of that group's MTTKRPs takes only GEMVs
 * over P. A sweep then costs 2 GEMMs (4·numel·R flops, each contracting a
 * large dimension, so BLAS runs near peak) instead of N MTTKRPs over X.
 *
 * fct_cp_split picks h (the most balanced split, 1 <= h < N; 1 for N == 1).
 * fct_cp_kr: KR [Π group, R] (column-major) = the Khatri-Rao product of
 *   `group`'s factors (group 0: left, 1: right), mode lo varying slowest
 *   as in X's row-major order; cp_als.c contracts X with it (one GEMM on
 *   the decomposition's engine) into P [Π other group, R].
 * fct_mttkrp_half: M [I_n, R] for mode n of the OTHER group from P; sub
 *   describes that group's dims, n is counted within it, A its factors;
 *   scratch: 3·Π sub doubles. */
int fct_cp_split(const fct_dims* d);
void fct_cp_group_dims(const fct_dims* d, int h, int group, fct_dims* sub);
void fct_cp_kr(const fct_dims* d, int h, int group, const double* const* A, int64_t R,
               double* KR);
void fct_mttkrp_half(const double* P, const fct_dims* sub, int n, const double* const* A,
                     int64_t R, double* M, double* scratch);

/* Y = X ×_n Uᵀ: dim n of size I_n becomes Rn (U [I_n, Rn]). One GEMM when
 * n is the first or last mode, else L GEMMs. 2·numel·Rn flops. */
void fct_mode_product_t(const double* X, const fct_dims* d, int n, const double* U, int64_t Rn,
                        double* Y);

/* U [I_n, k] (k <= I_n) = orthonormal leading left singular vectors of the
 * unfolding Y_(n) [I_n, P] (P = numel / I_n), s2 [k] (nullable) their
 * squared singular values. Uses the Gram matrix of the smaller side:
 * Y_(n)·Y_(n)ᵀ [I_n, I_n] (syrk) when I_n <= P, else Y_(n)ᵀ·Y_(n) [P, P]
 * and U = Y_(n)·V·diag(1/s), re-orthonormalised, with columns beyond the
 * rank filled from (seed, stream). Both squares the condition number,
 * which only blurs singular vectors whose values are below 1e-8 of the
 * largest: those carry no weight in an initialisation or a HOOI step.
 * Returns LAPACK's info (0: success). */
int64_t fct_top_left_sv_scratch(const fct_dims* d, int n, int64_t k);
int fct_top_left_sv(const double* Y, const fct_dims* d, int n, int64_t k, double* U,
                    double* s2, uint64_t seed, uint64_t stream, double* scratch);

#endif /* FCT_TENSOR_OPS_CPU_H */
