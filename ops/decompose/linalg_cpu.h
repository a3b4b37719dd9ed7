/*
 * linalg_cpu.h (internal): the float64 dense linear algebra of the CPU
 * decompositions, over OpenBLAS + LAPACK (scipy_ prefixed symbols). Every
 * matrix here is COLUMN-major with a leading dimension, as LAPACK wants; a
 * dense row-major [a, b] buffer is the column-major [b, a] matrix, its
 * transpose. LAPACK is called through the LAPACKE *_work functions with the
 * column-major layout, which neither transpose nor allocate: the caller
 * supplies every workspace (sized by the *_lwork queries, which touch no
 * data). A LAPACK call of about half a second of one core or more runs on
 * OpenBLAS's own threads, as many as the host's pool has, for its duration
 * (linalg_cpu.c, LAPACK_THREADS_FLOPS): its results then depend on that
 * count in the last bits (the same bits for the same count).
 */
#ifndef FCT_LINALG_CPU_H
#define FCT_LINALG_CPU_H

#include <stdbool.h>
#include <stdint.h>

/* C [m, n] = alpha·op(A)·op(B) + beta·C; op(X) = Xᵀ when tX. With
 * alpha == 1 this runs through fct_cpu_gemm, i.e. split over the host's
 * thread pool when one is installed (under torch OpenBLAS itself is
 * single-threaded); else one OpenBLAS call. */
void fct_la_gemm(bool tA, bool tB, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                 double* C, int64_t ldc);
/* y [m or n] = alpha·op(A)·x + beta·y for A [m, n]. */
void fct_la_gemv(bool tA, int64_t m, int64_t n, double alpha, const double* A, int64_t lda,
                 const double* x, int64_t incx, double beta, double* y, int64_t incy);
/* C [n, n] (both triangles) = alpha·op(A)·op(A)ᵀ + beta·C, where op(A) is
 * [n, k]: A [n, k] when !tA, A [k, n] when tA. */
void fct_la_syrk(bool tA, int64_t n, int64_t k, double alpha, const double* A, int64_t lda,
                 double beta, double* C, int64_t ldc);
/* Mirrors the upper triangle of C [n, n] into the lower one. */
void fct_la_symmetrize(int64_t n, double* C, int64_t ldc);

/* Orthonormalises the k columns of A [m, k] (m >= k) in place: Householder
 * QR, then Q formed explicitly. Q spans A's columns where they are
 * independent and is orthonormal in any case (zero columns included). */
int64_t fct_la_orth_lwork(int64_t m, int64_t k);
void fct_la_orth(int64_t m, int64_t k, double* A, int64_t lda, double* tau, double* work,
                 int64_t lwork);
/* The same, also returning the triangular factor R [k, k] (ld k, zeros
 * below the diagonal): A = Q·R on entry. */
void fct_la_orth_r(int64_t m, int64_t k, double* A, int64_t lda, double* R, double* tau,
                   double* work, int64_t lwork);

/* Orthonormalises Y [m, k] (m >= k) in place with shifted CholeskyQR3
 * (Fukaya et al. 2020): three rounds of Gram matrix (syrk over row blocks
 * in the thread pool), Cholesky of k×k and a triangular solve split by
 * rows, all BLAS-3 and parallel, where Householder QR (fct_la_orth) runs
 * LAPACK's panels on one thread. The shift of the first round keeps the
 * Cholesky factorisation defined up to cond(Y) ~ 1/eps; when it still
 * fails (Y rank-deficient) the rest is done by Householder QR. The third
 * round runs only when the second started far from orthonormal.
 * basis_only: one (shifted) round, which leaves Y spanning the same space
 * with cond(Y) = O(1) (orthonormal to about cond(Y_in)²·eps): enough for
 * the intermediate bases of a power iteration. R (nullable) receives
 * Y_in = Y_out·R, k×k upper triangular. Scratch: fct_la_orth_fast_scratch
 * doubles. */
int64_t fct_la_orth_fast_scratch(int64_t m, int64_t k);
void fct_la_orth_fast(int64_t m, int64_t k, double* Y, int64_t ldy, double* R, bool basis_only,
                      double* scratch);

/* The smallest eigenvalue of the symmetric A [n, n] (upper triangle read,
 * A destroyed); 0 when LAPACK fails. */
int64_t fct_la_eigmin_scratch(int64_t n);
double fct_la_eigmin(int64_t n, double* A, int64_t lda, double* scratch);

/* Singular values only of A [n, n] (destroyed), descending (gesdd 'N').
 * iwork: 8·n ints. Returns LAPACK's info. */
int64_t fct_la_svdvals_lwork(int64_t n);
int fct_la_svdvals(int64_t n, double* A, double* s, double* work, int64_t lwork, int* iwork);

/* B [m, k] = B·R for an upper triangular R [k, k] (trmm). */
void fct_la_mul_upper_right(int64_t m, int64_t k, const double* R, int64_t ldr, double* B,
                            int64_t ldb);

/* Thin SVD A [m, n] = U·diag(s)·VT (gesdd, jobz 'S'), q = min(m, n):
 * U [m, q], VT [q, n], s descending. A is destroyed. iwork: 8·q ints.
 * Returns LAPACK's info (0: converged). */
int64_t fct_la_gesdd_lwork(int64_t m, int64_t n);
int fct_la_gesdd(int64_t m, int64_t n, double* A, int64_t lda, double* s, double* U,
                 int64_t ldu, double* VT, int64_t ldvt, double* work, int64_t lwork, int* iwork);

/* The k largest eigenpairs of the symmetric A [n, n] (upper triangle read,
 * A destroyed), eigenvalues w [k] descending, eigenvectors Z [n, k]
 * (syevr with an index range). isuppz: 2·k ints. Returns LAPACK's info. */
void fct_la_syevr_lwork(int64_t n, int64_t k, int64_t* lwork, int64_t* liwork);
int fct_la_syevr_top(int64_t n, int64_t k, double* A, int64_t lda, double* w, double* Z,
                     int64_t ldz, int* isuppz, double* work, int64_t lwork, int* iwork,
                     int64_t liwork);

/* B [m, R] = B·V⁻¹ for a symmetric positive semi-definite V [R, R]
 * (destroyed): Cholesky when V is positive definite, else the
 * pseudo-inverse from V's eigenpairs (eigenvalues below R·eps·max dropped),
 * so that singular normal equations (rank-deficient factors, a zero
 * tensor) give the least-squares solution instead of NaN. Scratch: what
 * fct_la_solve_spd_scratch returns, in doubles. Returns true when the
 * pseudo-inverse was needed. */
int64_t fct_la_solve_spd_scratch(int64_t m, int64_t R);
bool fct_la_solve_spd_right(int64_t m, int64_t R, double* V, int64_t ldv, double* B,
                            int64_t ldb, double* scratch);

#endif /* FCT_LINALG_CPU_H */
