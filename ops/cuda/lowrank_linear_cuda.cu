/*
 * CUDA kernels of the low-rank linear layer (float32, float64, bfloat16,
 * float16; half types accumulate in float32). Computes exactly what
 * ops/cpu/lowrank_linear_cpu.c does; entry points and checks:
 * ops/lowrank_linear.c.
 */
#include <limits.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_common.cuh"

/* ------------------------------------------------------------------------- */
/* Element kernels                                                            */
/* ------------------------------------------------------------------------- */

/* Accumulator of each dtype: float for the 16-bit types and float32, double
 * for float64. */
template <typename T> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

static __device__ __forceinline__ float widen(float v) { return v; }
static __device__ __forceinline__ double widen(double v) { return v; }
static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

static __device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
static __device__ __forceinline__ void narrow(double* p, double v) { *p = v; }
static __device__ __forceinline__ void narrow(__half* p, float v) { *p = __float2half_rn(v); }
static __device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

/* y [rows, cols] (row stride rs) rows = bias [cols] (stride bs). */
template <typename T>
static __global__ void fill_bias_kernel(T* y, int64_t rows, int64_t cols, int64_t rs,
                                        const T* bias, int64_t bs) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t r = i / cols, c = i - r * cols;
    y[r * rs + c] = bias[c * bs];
  }
}

/* c [rows, cols] (row stride rs) = 0. E: an unsigned integer of the
 * element's size (all-zero bits are 0.0 in every float format). */
template <typename E>
static __global__ void zero_rows_kernel(E* c, int64_t rows, int64_t cols, int64_t rs) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t r = i / cols;
    c[r * rs + (i - r * cols)] = 0;
  }
}

/* Column sums: a block covers SUM_COLS columns; its SUM_LANES rows of threads
 * stride over the rows of g, then add their partial sums in shared memory.
 * Deterministic (no atomics), and coalesced when g is row-major. */
#define SUM_COLS 32
#define SUM_LANES 16

/* gb [cols] = Σ_i g [rows, cols] (strides rs, cs), accumulated in Acc. */
template <typename T>
static __global__ void column_sums_kernel(const T* g, int64_t rows, int64_t cols, int64_t rs,
                                          int64_t cs, T* gb) {
  typedef typename acc_of<T>::type Acc;
  __shared__ Acc part[SUM_LANES][SUM_COLS];
  int64_t j = (int64_t)blockIdx.x * SUM_COLS + threadIdx.x;
  Acc acc = 0;
  if (j < cols)
    for (int64_t i = threadIdx.y; i < rows; i += SUM_LANES) acc += widen(g[i * rs + j * cs]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || j >= cols) return;
  Acc s = 0;
  for (int l = 0; l < SUM_LANES; ++l) s += part[l][threadIdx.x];
  narrow(gb + j, s);
}

template <typename T>
static void launch_fill_bias(const fct_cuda_env* env, const fct_mat* y, const char* bias,
                             int64_t bs) {
  int64_t n = y->rows * y->cols;
  fill_bias_kernel<T><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      (T*)y->data, y->rows, y->cols, y->rs, (const T*)bias, bs);
}

template <typename E>
static void launch_zero_rows(const fct_cuda_env* env, const fct_mat* c) {
  int64_t n = c->rows * c->cols;
  zero_rows_kernel<E><<<fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream>>>(
      (E*)c->data, c->rows, c->cols, c->rs);
}

template <typename T>
static void launch_column_sums(const fct_cuda_env* env, const fct_mat* g, char* gb) {
  unsigned blocks = (unsigned)((g->cols + SUM_COLS - 1) / SUM_COLS);
  column_sums_kernel<T><<<blocks, dim3(SUM_COLS, SUM_LANES), 0, env->stream>>>(
      (const T*)g->data, g->rows, g->cols, g->rs, g->cs, (T*)gb);
}

extern "C" {

/* y [M, out] rows = bias [out] (stride bs). */
static fct_status fill_bias(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                            const fct_mat* y, const char* bias, int64_t bs) {
  if (y->rows == 0 || y->cols == 0) return FCT_OK;
  switch (dt) {
    case FCT_F32: launch_fill_bias<float>(env, y, bias, bs); break;
    case FCT_F64: launch_fill_bias<double>(env, y, bias, bs); break;
    case FCT_BF16: launch_fill_bias<__nv_bfloat16>(env, y, bias, bs); break;
    case FCT_F16: launch_fill_bias<__half>(env, y, bias, bs); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "lowrank_linear (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "fill_bias_kernel");
}

/* c [rows, cols] = 0 (only the row-major view's elements, not the gaps). */
static fct_status zero_rows(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                            const fct_mat* c) {
  size_t es = fct_dtype_bytes(dt);
  if (es == 8) launch_zero_rows<unsigned long long>(env, c);
  else if (es == 4) launch_zero_rows<unsigned int>(env, c);
  else launch_zero_rows<unsigned short>(env, c);
  return fct_cuda_check_launch(ctx, "zero_rows_kernel");
}

/* gb [out] = column sums of g [M, out]; M == 0 gives zeros. */
static fct_status column_sums(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* g, char* gb) {
  if (g->cols == 0) return FCT_OK;
  switch (dt) {
    case FCT_F32: launch_column_sums<float>(env, g, gb); break;
    case FCT_F64: launch_column_sums<double>(env, g, gb); break;
    case FCT_BF16: launch_column_sums<__nv_bfloat16>(env, g, gb); break;
    case FCT_F16: launch_column_sums<__half>(env, g, gb); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "lowrank_linear (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "column_sums_kernel");
}

/* ------------------------------------------------------------------------- */
/* GEMM on cuBLAS (column-major) for row-major views                          */
/* ------------------------------------------------------------------------- */

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

/* cuBLAS takes int leading dims and increments. Inputs with larger strides
 * were packed by the entry point; outputs and t may still have them. */
static fct_status check_int(fct_context* ctx, int64_t v, const char* what) {
  if (v >= 0 && v <= INT_MAX) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_OVERFLOW,
                  "lowrank_linear (cuda): %s %lld does not fit cuBLAS's int", what, (long long)v);
}

/* out (stride incy) = op(S)·vec + beta·out, float32/float64, where S is the
 * matrix stored under view V and op(S) = Vᵀ when want_t, else V. */
static fct_status gemv(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, const fct_mat* V,
                       bool want_t, const char* vec, int64_t incx, char* out, int64_t incy,
                       double beta) {
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
    float one = 1.0f, b = (float)beta;
    st = cublasSgemv(env->blas, op, sm, sn, &one, (const float*)V->data, (int)ld,
                     (const float*)vec, (int)incx, &b, (float*)out, (int)incy);
    return fct_cublas_check(ctx, st, "cublasSgemv");
  }
  double one = 1.0;
  st = cublasDgemv(env->blas, op, sm, sn, &one, (const double*)V->data, (int)ld,
                   (const double*)vec, (int)incx, &beta, (double*)out, (int)incy);
  return fct_cublas_check(ctx, st, "cublasDgemv");
}

/* C [m, n] = A [m, k] · B [k, n] + beta·C. A, B: BLAS-readable views
 * (fct_mat_blas_ok); C: row-major (cs == 1, ld = C.rs). beta is 0 or 1.
 * The device equivalent of fct_cpu_gemm (gemm_cpu.c), GEMV paths included. */
static fct_status gemm(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, const fct_mat* A,
                       const fct_mat* B, const fct_mat* C, double beta) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return FCT_OK;
  if (k == 0) return beta == 0.0 ? zero_rows(ctx, env, dt, C) : FCT_OK;
  bool full = dt == FCT_F32 || dt == FCT_F64;
  /* One output row: c = Bᵀ·a (a = A's row, element stride A->cs). */
  if (full && m == 1 && A->cs >= 1)
    return gemv(ctx, env, dt, B, true, A->data, A->cs, C->data, 1, beta);
  /* One output column: c = A·b (b = B's column, stride B->rs). */
  if (full && n == 1 && B->rs >= 1)
    return gemv(ctx, env, dt, A, false, B->data, B->rs, C->data, C->rs, beta);

  /* Row-major C is column-major Cᵀ [n, m] with ld = C.rs: Cᵀ = Bᵀ·Aᵀ. */
  int64_t lda, ldb;
  cublasOperation_t opA = op_for_transpose(A, &lda), opB = op_for_transpose(B, &ldb);
  FCT_TRY(check_int(ctx, lda, "leading dimension"));
  FCT_TRY(check_int(ctx, ldb, "leading dimension"));
  FCT_TRY(check_int(ctx, C->rs, "leading dimension"));
  cublasStatus_t st;
  if (dt == FCT_F32) {
    float one = 1.0f, b = (float)beta;
    st = cublasSgemm(env->blas, opB, opA, (int)n, (int)m, (int)k, &one, (const float*)B->data,
                     (int)ldb, (const float*)A->data, (int)lda, &b, (float*)C->data, (int)C->rs);
    return fct_cublas_check(ctx, st, "cublasSgemm");
  }
  if (dt == FCT_F64) {
    double one = 1.0;
    st = cublasDgemm(env->blas, opB, opA, (int)n, (int)m, (int)k, &one, (const double*)B->data,
                     (int)ldb, (const double*)A->data, (int)lda, &beta, (double*)C->data,
                     (int)C->rs);
    return fct_cublas_check(ctx, st, "cublasDgemm");
  }
  /* 16-bit storage, float32 accumulation; alpha and beta are then float. */
  cudaDataType_t ty = dt == FCT_BF16 ? CUDA_R_16BF : CUDA_R_16F;
  float one = 1.0f, b = (float)beta;
  st = cublasGemmEx(env->blas, opB, opA, (int)n, (int)m, (int)k, &one, B->data, ty, (int)ldb,
                    A->data, ty, (int)lda, &b, C->data, ty, (int)C->rs, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT);
  return fct_cublas_check(ctx, st, "cublasGemmEx");
}

/* ------------------------------------------------------------------------- */
/* Forward and backward                                                       */
/* ------------------------------------------------------------------------- */

static fct_status forward_on(fct_context* ctx, const fct_cuda_env* env,
                             const fct_lowrank_plan* p) {
  fct_mat Vt = fct_mat_t(p->V), Ut = fct_mat_t(p->U);
  /* t [M, r] = x [M, in] · Vᵀ [in, r] */
  FCT_TRY(gemm(ctx, env, p->dt, &p->x, &Vt, &p->t, 0.0));
  if (p->bias) FCT_TRY(fill_bias(ctx, env, p->dt, &p->y, p->bias, p->bias_stride));
  /* y [M, out] (+)= t [M, r] · Uᵀ [r, out] */
  return gemm(ctx, env, p->dt, &p->t, &Ut, &p->y, p->bias ? 1.0 : 0.0);
}

static fct_status backward_on(fct_context* ctx, const fct_cuda_env* env,
                              const fct_lowrank_plan* p) {
  if (p->gb) FCT_TRY(column_sums(ctx, env, p->dt, &p->g, p->gb)); /* gb [out] = Σ_M g */
  if (p->gU.data) {
    if (!p->t_ready) {
      fct_mat Vt = fct_mat_t(p->V);
      FCT_TRY(gemm(ctx, env, p->dt, &p->x, &Vt, &p->t, 0.0)); /* t [M, r] = x · Vᵀ */
    }
    fct_mat gT = fct_mat_t(p->g);
    FCT_TRY(gemm(ctx, env, p->dt, &gT, &p->t, &p->gU, 0.0)); /* gU [out, r] = gᵀ [out, M] · t */
  }
  /* Keyed on the outputs rather than on gt.data (as the CPU code is): gt is
   * NULL when it is empty and the workspace is NULL, yet grad_x (r == 0) or
   * grad_V (M == 0) must still be written as zeros. */
  if (p->gx.data || p->gV.data) {
    FCT_TRY(gemm(ctx, env, p->dt, &p->g, &p->U, &p->gt, 0.0)); /* gt [M, r] = g [M, out] · U */
    if (p->gV.data) {
      fct_mat gtT = fct_mat_t(p->gt);
      FCT_TRY(gemm(ctx, env, p->dt, &gtT, &p->x, &p->gV, 0.0)); /* gV [r, in] = gtᵀ · x */
    }
    if (p->gx.data)
      FCT_TRY(gemm(ctx, env, p->dt, &p->gt, &p->V, &p->gx, 0.0)); /* gx [M, in] = gt · V */
  }
  return FCT_OK;
}

/* The first non-NULL pointer: tells fct_cuda_enter the tensors' device. */
static const void* first_data(const char* const* ptrs, int n) {
  for (int i = 0; i < n; ++i)
    if (ptrs[i]) return ptrs[i];
  return NULL;
}

fct_status fct_cuda_lowrank_forward(fct_context* ctx, const fct_lowrank_plan* p) {
  const char* ptrs[] = {p->y.data, p->x.data, p->U.data, p->V.data, p->t.data};
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, -1, first_data(ptrs, 5), true, &env));
  return fct_cuda_leave(ctx, &env, forward_on(ctx, &env, p));
}

fct_status fct_cuda_lowrank_backward(fct_context* ctx, const fct_lowrank_plan* p) {
  const char* ptrs[] = {p->g.data, p->x.data, p->U.data, p->V.data,
                        p->gx.data, p->gU.data, p->gV.data, p->gb};
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, -1, first_data(ptrs, 8), true, &env));
  return fct_cuda_leave(ctx, &env, backward_on(ctx, &env, p));
}

} /* extern "C" */
