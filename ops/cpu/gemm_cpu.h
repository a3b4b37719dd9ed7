/* gemm_cpu.h (internal): row-major GEMM over OpenBLAS that takes GEMV when
 * one side is a single row or column. */
#ifndef FCT_GEMM_CPU_H
#define FCT_GEMM_CPU_H

#include "fct_tensor.h"

/* C [m, n] = A [m, k] · B [k, n] + beta·C, for float32/float64.
 * A and B: BLAS-readable views (fct_mat_blas_ok); C: row-major (cs == 1).
 * k == 0 gives C = beta·C. */
void fct_cpu_gemm(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                  double beta);

/* C_b = A_b·B_b + beta·C_b for b < batch, X_b = X shifted by b·sX elements
 * (0: shared). Small products run one per pool task, large ones split. */
void fct_cpu_gemm_batched(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                          double beta, int64_t batch, int64_t sa, int64_t sb, int64_t sc);

/* C = Σ_b A_b·B_b + beta·C: the pool splits C, every block sums b in order
 * (deterministic). batch == 0 or k == 0 gives C = beta·C. */
void fct_cpu_gemm_reduce(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                         double beta, int64_t batch, int64_t sa, int64_t sb);

/* Threads of the installed pool (1 without one: OpenBLAS then threads each
 * call itself). */
int fct_cpu_workers(void);

/* body over [0, n) in the installed thread pool (serially without one, or
 * when n <= grain). */
void fct_cpu_parallel(int64_t n, int64_t grain, fct_parallel_body body, void* arg);

#endif
