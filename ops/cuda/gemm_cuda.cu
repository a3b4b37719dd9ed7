/*
 * Row-major GEMMs on cuBLAS (column-major) for the linear ops: single
 * products (GEMV for one row or column), strided batches, and batch
 * reductions through partial sums. float32/float64 natively; bfloat16 and
 * float16 through GemmEx with float32 accumulation. The device equivalent of
 * ops/cpu/gemm_cpu.c.
 */
#include <limits.h>

#include "cuda_common.cuh"
#include "cuda_math.cuh"

/* C [rows, cols] (row stride rs) = (keep ? C : 0) + Σ_j P_j, P_j the np
 * partial products [rows, cols] (dense, in the accumulation type). */
template <typename T, typename Acc>
static __global__ void add_partials_kernel(T* C, int64_t rows, int64_t cols, int64_t rs,
                                           const Acc* P, int64_t np, bool keep) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t r = i / cols, c = i - r * cols;
    Acc s = keep ? (Acc)widen(C[r * rs + c]) : (Acc)0;
    for (int64_t j = 0; j < np; ++j) s += P[j * n + i];
    narrow(C + r * rs + c, s);
  }
}

template <typename T, typename Acc>
static void launch_add_partials(const fct_cuda_env* env, const fct_mat* C, const char* P,
                                int64_t np, bool keep) {
  int64_t n = C->rows * C->cols;
  add_partials_kernel<T, Acc><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      (T*)C->data, C->rows, C->cols, C->rs, (const Acc*)P, np, keep);
}

extern "C" {

/* cuBLAS sees the memory of a view as a column-major matrix. A row-major
 * view (cs == 1, ld = rs) is, so read, the view's transpose: op N yields
 * mᵀ. A column-major view (rs == 1, ld = cs) is read as m itself: op T
 * yields mᵀ. Same test as gemm_cpu.c's blas_form. */
static cublasOperation_t op_for_transpose(const fct_mat* m, int64_t* ld) {
  if (m->cs == 1 && m->rs >= (m->cols > 1 ? m->cols : 1)) {
    *ld = m->rs;
    return CUBLAS_OP_N;
  }
  *ld = m->cs;
  return CUBLAS_OP_T;
}

/* cuBLAS takes int sizes, leading dims and increments. Inputs with larger
 * strides were packed by the entry points; outputs may still have them. */
static fct_status check_int(fct_context* ctx, int64_t v, const char* what) {
  if (v >= 0 && v <= INT_MAX) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_OVERFLOW, "gemm (cuda): %s %lld does not fit cuBLAS's int", what,
                  (long long)v);
}

/* out (stride incy) = alpha·op(S)·vec + beta·out, float32/float64, where S
 * is the matrix stored under view V and op(S) = Vᵀ when want_t, else V. */
static fct_status gemv(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, double alpha,
                       const fct_mat* V, bool want_t, const char* vec, int64_t incx, char* out,
                       int64_t incy, double beta) {
  int64_t ld;
  cublasOperation_t form = op_for_transpose(V, &ld);
  FCT_TRY(check_int(ctx, ld, "leading dimension"));
  FCT_TRY(check_int(ctx, incx, "increment"));
  FCT_TRY(check_int(ctx, incy, "increment"));
  /* Stored column-major: S = Vᵀ [cols, rows] when form is N, else S = V. */
  int sm = (int)(form == CUBLAS_OP_N ? V->cols : V->rows);
  int sn = (int)(form == CUBLAS_OP_N ? V->rows : V->cols);
  cublasOperation_t op = (want_t == (form == CUBLAS_OP_N)) ? CUBLAS_OP_N : CUBLAS_OP_T;
  cublasStatus_t st;
  if (dt == FCT_F32) {
    float a = (float)alpha, b = (float)beta;
    st = cublasSgemv(env->blas, op, sm, sn, &a, (const float*)V->data, (int)ld,
                     (const float*)vec, (int)incx, &b, (float*)out, (int)incy);
    return fct_cublas_check(ctx, st, "cublasSgemv");
  }
  st = cublasDgemv(env->blas, op, sm, sn, &alpha, (const double*)V->data, (int)ld,
                   (const double*)vec, (int)incx, &beta, (double*)out, (int)incy);
  return fct_cublas_check(ctx, st, "cublasDgemv");
}

static cudaDataType_t cuda_type(fct_dtype dt) {
  switch (dt) {
    case FCT_F64: return CUDA_R_64F;
    case FCT_BF16: return CUDA_R_16BF;
    case FCT_F16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

fct_status fct_cuda_gemm(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                         const fct_mat* A, const fct_mat* B, const fct_mat* C, double beta) {
  return fct_cuda_gemm_scaled(ctx, env, dt, 1.0, A, B, C, beta);
}

fct_status fct_cuda_gemm_scaled(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                double alpha, const fct_mat* A, const fct_mat* B,
                                const fct_mat* C, double beta) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return FCT_OK;
  if (k == 0) return beta == 0.0 ? fct_cuda_zero_rows(ctx, env, dt, C) : FCT_OK;
  bool full = dt == FCT_F32 || dt == FCT_F64;
  /* One output row: c = Bᵀ·a (a = A's row, element stride A->cs). */
  if (full && m == 1 && A->cs >= 1)
    return gemv(ctx, env, dt, alpha, B, true, A->data, A->cs, C->data, 1, beta);
  /* One output column: c = A·b (b = B's column, stride B->rs). */
  if (full && n == 1 && B->rs >= 1)
    return gemv(ctx, env, dt, alpha, A, false, B->data, B->rs, C->data, C->rs, beta);

  /* Row-major C is column-major Cᵀ [n, m] with ld = C.rs: Cᵀ = Bᵀ·Aᵀ. */
  int64_t lda, ldb;
  cublasOperation_t opA = op_for_transpose(A, &lda), opB = op_for_transpose(B, &ldb);
  FCT_TRY(check_int(ctx, m, "size"));
  FCT_TRY(check_int(ctx, n, "size"));
  FCT_TRY(check_int(ctx, k, "size"));
  FCT_TRY(check_int(ctx, lda, "leading dimension"));
  FCT_TRY(check_int(ctx, ldb, "leading dimension"));
  FCT_TRY(check_int(ctx, C->rs, "leading dimension"));
  cublasStatus_t st;
  if (dt == FCT_F32) {
    float a = (float)alpha, b = (float)beta;
    st = cublasSgemm(env->blas, opB, opA, (int)n, (int)m, (int)k, &a, (const float*)B->data,
                     (int)ldb, (const float*)A->data, (int)lda, &b, (float*)C->data, (int)C->rs);
    return fct_cublas_check(ctx, st, "cublasSgemm");
  }
  if (dt == FCT_F64) {
    st = cublasDgemm(env->blas, opB, opA, (int)n, (int)m, (int)k, &alpha, (const double*)B->data,
                     (int)ldb, (const double*)A->data, (int)lda, &beta, (double*)C->data,
                     (int)C->rs);
    return fct_cublas_check(ctx, st, "cublasDgemm");
  }
  /* 16-bit storage, float32 accumulation; alpha and beta are then float. */
  cudaDataType_t ty = cuda_type(dt);
  float a = (float)alpha, b = (float)beta;
  st = cublasGemmEx(env->blas, opB, opA, (int)n, (int)m, (int)k, &a, B->data, ty, (int)ldb,
                    A->data, ty, (int)lda, &b, C->data, ty, (int)C->rs, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT);
  return fct_cublas_check(ctx, st, "cublasGemmEx");
}

/* A, B and a [m, n] output of type ctype (the accumulation type for batch
 * reductions) with strides in elements of their own types. */
static fct_status strided_batched(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                  const fct_mat* A, const fct_mat* B, void* C, int64_t ldc,
                                  cudaDataType_t ctype, double beta, int64_t batch, int64_t sa,
                                  int64_t sb, int64_t sc, int64_t m, int64_t n) {
  int64_t k = A->cols, lda, ldb;
  cublasOperation_t opA = op_for_transpose(A, &lda), opB = op_for_transpose(B, &ldb);
  FCT_TRY(check_int(ctx, m, "size"));
  FCT_TRY(check_int(ctx, n, "size"));
  FCT_TRY(check_int(ctx, k, "size"));
  FCT_TRY(check_int(ctx, lda, "leading dimension"));
  FCT_TRY(check_int(ctx, ldb, "leading dimension"));
  FCT_TRY(check_int(ctx, ldc, "leading dimension"));
  FCT_TRY(check_int(ctx, batch, "batch count"));
  cudaDataType_t ty = cuda_type(dt);
  cublasStatus_t st;
  if (dt == FCT_F64) {
    double one = 1.0;
    st = cublasGemmStridedBatchedEx(env->blas, opB, opA, (int)n, (int)m, (int)k, &one, B->data,
                                    ty, (int)ldb, (long long)sb, A->data, ty, (int)lda,
                                    (long long)sa, &beta, C, ctype, (int)ldc, (long long)sc,
                                    (int)batch, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT);
  } else {
    float one = 1.0f, b = (float)beta;
    st = cublasGemmStridedBatchedEx(env->blas, opB, opA, (int)n, (int)m, (int)k, &one, B->data,
                                    ty, (int)ldb, (long long)sb, A->data, ty, (int)lda,
                                    (long long)sa, &b, C, ctype, (int)ldc, (long long)sc,
                                    (int)batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }
  return fct_cublas_check(ctx, st, "cublasGemmStridedBatchedEx");
}

fct_status fct_cuda_gemm_batched(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                 const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                 double beta, int64_t batch, int64_t sa, int64_t sb,
                                 int64_t sc) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (batch <= 0 || m == 0 || n == 0) return FCT_OK;
  if (batch == 1) return fct_cuda_gemm(ctx, env, dt, A, B, C, beta);
  size_t es = fct_dtype_bytes(dt);
  if (k == 0) {
    if (beta != 0.0) return FCT_OK;
    if (C->rs == n && sc == m * n) { /* the batches are one dense block */
      fct_mat all = {C->data, batch * m, n, n, 1};
      return fct_cuda_zero_rows(ctx, env, dt, &all);
    }
    for (int64_t b = 0; b < batch; ++b) {
      fct_mat Cb = *C;
      Cb.data += b * sc * (int64_t)es;
      FCT_TRY(fct_cuda_zero_rows(ctx, env, dt, &Cb));
    }
    return FCT_OK;
  }
  return strided_batched(ctx, env, dt, A, B, C->data, C->rs, cuda_type(dt), beta, batch, sa, sb,
                         sc, m, n);
}

fct_status fct_cuda_gemm_reduce(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                double beta, int64_t batch, int64_t sa, int64_t sb, char* scratch,
                                size_t scratch_bytes) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return FCT_OK;
  if (batch <= 0 || k == 0)
    return beta == 0.0 ? fct_cuda_zero_rows(ctx, env, dt, C) : FCT_OK;
  if (batch == 1) return fct_cuda_gemm(ctx, env, dt, A, B, C, beta);
  /* Partial products go to scratch in the accumulation type (float, double
   * for float64), `chunk` at a time, then are added into C in order: no
   * atomics, so the result does not depend on scheduling. */
  size_t acc = dt == FCT_F64 ? 8 : 4, es = fct_dtype_bytes(dt);
  size_t one = (size_t)m * (size_t)n * acc;
  int64_t chunk = (int64_t)(scratch_bytes / one);
  if (!scratch || chunk < 1)
    return fct_fail(ctx, FCT_ERR_WORKSPACE,
                    "workspace: the batch reduction needs %zu bytes of scratch, got %zu", one,
                    scratch_bytes);
  if (chunk > batch) chunk = batch;
  cudaDataType_t accty = dt == FCT_F64 ? CUDA_R_64F : CUDA_R_32F;
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    int64_t nb = batch - b0 < chunk ? batch - b0 : chunk;
    fct_mat Ab = *A, Bb = *B;
    Ab.data += b0 * sa * (int64_t)es;
    Bb.data += b0 * sb * (int64_t)es;
    FCT_TRY(strided_batched(ctx, env, dt, &Ab, &Bb, scratch, n, accty, 0.0, nb, sa, sb, m * n, m,
                            n));
    bool keep = b0 > 0 || beta != 0.0;
    switch (dt) {
      case FCT_F32: launch_add_partials<float, float>(env, C, scratch, nb, keep); break;
      case FCT_F64: launch_add_partials<double, double>(env, C, scratch, nb, keep); break;
      case FCT_BF16: launch_add_partials<__nv_bfloat16, float>(env, C, scratch, nb, keep); break;
      case FCT_F16: launch_add_partials<__half, float>(env, C, scratch, nb, keep); break;
      default: return fct_fail(ctx, FCT_ERR_DTYPE, "gemm_reduce (cuda): unsupported dtype");
    }
    FCT_TRY(fct_cuda_check_launch(ctx, "add_partials_kernel"));
  }
  return FCT_OK;
}

} /* extern "C" */
