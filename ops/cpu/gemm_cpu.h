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

#endif
