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
/* C = alpha·A·B + beta·C, otherwise as fct_cpu_gemm. */
void fct_cpu_gemm_scaled(fct_dtype dt, double alpha, const fct_mat* A, const fct_mat* B,
                         const fct_mat* C, double beta);

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

/* OpenBLAS's own threads for one long call outside the pool's GEMMs (a
 * decomposition's LAPACK call, whose panels and reductions the pool cannot
 * split). With a pool installed OpenBLAS is single-threaded; begin raises
 * its count to the pool's size until the matching end puts back the count
 * from before (or the one fct_cpu_set_num_threads asked for meanwhile).
 * Returns whether it raised anything: 0 without a pool (OpenBLAS already
 * runs at the count it was given) or with a pool of one thread; pass it to
 * end. Scopes from several threads nest: the first raises, the last puts
 * back. The count is global, so while a scope is open every OpenBLAS call
 * in the process gets those threads, the single-threaded blocks of
 * fct_cpu_gemm that other threads run in the pool included (correct, but
 * the cores are oversubscribed for that time). After the scope OpenBLAS's
 * workers keep spinning until its thread timeout (2^28 cycles, ~0.1 s):
 * lowering the count does not stop them, so only calls far longer than
 * that are worth a scope. */
int fct_cpu_blas_threads_begin(void);
void fct_cpu_blas_threads_end(int begun);

/* body over [0, n) in the installed thread pool (serially without one, or
 * when n <= grain). */
void fct_cpu_parallel(int64_t n, int64_t grain, fct_parallel_body body, void* arg);

#endif
