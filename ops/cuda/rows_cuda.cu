/*
 * CUDA row kernels shared by the linear ops: bias rows, zeroing, column
 * sums (float32, float64, bfloat16, float16; sums accumulate in float32 or
 * float64). CPU counterpart: ops/cpu/tensor_kernels_cpu.c.
 */
#include "cuda_common.cuh"
#include "cuda_math.cuh"

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

fct_status fct_cuda_fill_rows(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* y, const char* bias, int64_t bs) {
  if (y->rows == 0 || y->cols == 0) return FCT_OK;
  switch (dt) {
    case FCT_F32: launch_fill_bias<float>(env, y, bias, bs); break;
    case FCT_F64: launch_fill_bias<double>(env, y, bias, bs); break;
    case FCT_BF16: launch_fill_bias<__nv_bfloat16>(env, y, bias, bs); break;
    case FCT_F16: launch_fill_bias<__half>(env, y, bias, bs); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "fill_rows (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "fill_bias_kernel");
}

fct_status fct_cuda_zero_rows(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* c) {
  if (c->rows == 0 || c->cols == 0) return FCT_OK;
  size_t es = fct_dtype_bytes(dt);
  if (es == 8) launch_zero_rows<unsigned long long>(env, c);
  else if (es == 4) launch_zero_rows<unsigned int>(env, c);
  else launch_zero_rows<unsigned short>(env, c);
  return fct_cuda_check_launch(ctx, "zero_rows_kernel");
}

fct_status fct_cuda_column_sums(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                const fct_mat* g, char* gb) {
  if (g->cols == 0) return FCT_OK;
  switch (dt) {
    case FCT_F32: launch_column_sums<float>(env, g, gb); break;
    case FCT_F64: launch_column_sums<double>(env, g, gb); break;
    case FCT_BF16: launch_column_sums<__nv_bfloat16>(env, g, gb); break;
    case FCT_F16: launch_column_sums<__half>(env, g, gb); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "column_sums (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "column_sums_kernel");
}

} /* extern "C" */
