/*
 * Element kernels of the CUDA decompositions (declared in
 * decompose_cuda.cuh): the NaN/Inf scan with the squared norm, strided
 * loads and stores with dtype conversion, the Gaussian sketch (the same
 * counter-based numbers as on the CPU, rng.h), the shift of the power
 * iteration, the sign convention and the error reductions. Reductions use
 * a fixed order (block partials, then one block), so results do not depend
 * on scheduling. Launch errors are reported, kernels never print.
 */
#include "decompose_cuda.cuh"
#include "rng.h"

#define RED_THREADS 256 /* threads of the reduction kernels (a power of 2) */

/* ------------------------------------------------------------------------- */
/* Kernels                                                                    */
/* ------------------------------------------------------------------------- */

template <typename T>
static __global__ void scan_kernel(const T* a, int64_t rows, int64_t cols, int64_t rs,
                                   int64_t cs, double* part_sum, long long* part_bad) {
  __shared__ double ssum[RED_THREADS];
  __shared__ long long sbad[RED_THREADS];
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  double acc = 0;
  long long bad = 0;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t i = e / cols, j = e - i * cols;
    double v = (double)a[i * rs + j * cs];
    if (isfinite(v)) acc += v * v;
    else ++bad;
  }
  ssum[threadIdx.x] = acc;
  sbad[threadIdx.x] = bad;
  __syncthreads();
  for (int w = RED_THREADS / 2; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) {
      ssum[threadIdx.x] += ssum[threadIdx.x + w];
      sbad[threadIdx.x] += sbad[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part_sum[blockIdx.x] = ssum[0];
    part_bad[blockIdx.x] = sbad[0];
  }
}

static __global__ void scan_finish_kernel(const double* part_sum, const long long* part_bad,
                                          int nb, fct_scan_result* out) {
  __shared__ double ssum[RED_THREADS];
  __shared__ long long sbad[RED_THREADS];
  double acc = 0;
  long long bad = 0;
  for (int b = threadIdx.x; b < nb; b += RED_THREADS) {
    acc += part_sum[b];
    bad += part_bad[b];
  }
  ssum[threadIdx.x] = acc;
  sbad[threadIdx.x] = bad;
  __syncthreads();
  for (int w = RED_THREADS / 2; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) {
      ssum[threadIdx.x] += ssum[threadIdx.x + w];
      sbad[threadIdx.x] += sbad[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out->sumsq = ssum[0];
    out->bad = sbad[0];
  }
}

template <typename T>
static __global__ void load_f64_kernel(const T* a, int64_t rows, int64_t cols, int64_t rs,
                                       int64_t cs, double* dst, int64_t drs, int64_t dcs) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t i = e / cols, j = e - i * cols;
    dst[i * drs + j * dcs] = (double)a[i * rs + j * cs];
  }
}

template <typename T>
static __global__ void pack_kernel(const T* a, int64_t rows, int64_t cols, int64_t rs,
                                   int64_t cs, T* dst) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t i = e / cols, j = e - i * cols;
    dst[e] = a[i * rs + j * cs];
  }
}

template <typename T>
static __global__ void sketch_kernel(T* om, int64_t count, uint64_t seed) {
  int64_t pairs = (count + 1) / 2, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += step) {
    double x, y;
    fct_rng_normal_pair(seed, FCT_RNG_SKETCH, (uint64_t)p, &x, &y);
    om[2 * p] = (T)x;
    if (2 * p + 1 < count) om[2 * p + 1] = (T)y;
  }
}

template <typename S, typename D>
static __global__ void convert_kernel(const S* src, D* dst, int64_t n) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step)
    dst[e] = (D)src[e];
}

static __global__ void copy_upper_kernel(const double* A, int64_t lda, int64_t k, double* R) {
  int64_t n = k * k, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t j = e / k, i = e - j * k;
    R[e] = i <= j ? A[i + j * lda] : 0.0;
  }
}

static __global__ void shift_kernel(double* Q, const double* Qprev, int64_t n, const double* s,
                                    int64_t k) {
  double smin = s[k - 1], alpha = 0.5 * smin * smin;
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step)
    Q[e] -= alpha * Qprev[e];
}

/* One block per column: the first entry of largest magnitude. */
static __global__ void signs_kernel(const double* U, int64_t rows, int64_t urs, int64_t ucs,
                                    double* sign) {
  __shared__ double sabs[RED_THREADS];
  __shared__ int64_t sidx[RED_THREADS];
  int64_t j = blockIdx.x;
  double best = -1;
  int64_t at = 0;
  for (int64_t i = threadIdx.x; i < rows; i += RED_THREADS) {
    double v = fabs(U[i * urs + j * ucs]);
    if (v > best) best = v, at = i;
  }
  sabs[threadIdx.x] = best;
  sidx[threadIdx.x] = at;
  __syncthreads();
  for (int w = RED_THREADS / 2; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) {
      double ob = sabs[threadIdx.x + w];
      int64_t oi = sidx[threadIdx.x + w];
      if (ob > sabs[threadIdx.x] || (ob == sabs[threadIdx.x] && oi < sidx[threadIdx.x])) {
        sabs[threadIdx.x] = ob;
        sidx[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) sign[j] = U[sidx[0] * urs + j * ucs] >= 0 ? 1.0 : -1.0;
}

template <typename T>
static __global__ void store_kernel(T* out, int64_t rows, int64_t cols, const double* src,
                                    int64_t rs, int64_t cs, const double* sign,
                                    int sign_on_rows) {
  int64_t n = rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t i = e / cols, j = e - i * cols;
    double f = sign ? sign[sign_on_rows ? i : j] : 1.0;
    out[e] = (T)(f * src[i * rs + j * cs]);
  }
}

/* Single block: Σ s² over [0, q) and over [r, q) (mode 0), or the error
 * left after keeping s[0, r) of a matrix of squared norm scan->sumsq. */
static __global__ void error_kernel(const double* s, int64_t q, int64_t r,
                                    const fct_scan_result* scan, double* err) {
  __shared__ double stot[RED_THREADS], stail[RED_THREADS];
  double tot = 0, tail = 0;
  for (int64_t j = threadIdx.x; j < q; j += RED_THREADS) {
    double v = s[j] * s[j];
    tot += v;
    if (j >= r) tail += v;
  }
  stot[threadIdx.x] = tot;
  stail[threadIdx.x] = tail;
  __syncthreads();
  for (int w = RED_THREADS / 2; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) {
      stot[threadIdx.x] += stot[threadIdx.x + w];
      stail[threadIdx.x] += stail[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  if (!scan) {
    *err = stot[0] > 0 ? sqrt(stail[0] / stot[0]) : 0.0;
  } else { /* q == r: stot is the kept energy */
    double rest = scan->sumsq - stot[0];
    *err = scan->sumsq > 0 && rest > 0 ? sqrt(rest / scan->sumsq) : 0.0;
  }
}


/* dst[e] (dense row-major) = X's element e in its logical row-major order. */
template <typename T>
static __global__ void load_nd_kernel(const T* x, fct_nd nd, double* dst, int64_t n) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t rest = e, off = 0;
    for (int d = nd.ndim - 1; d >= 0; --d) {
      int64_t i = rest % nd.shape[d];
      rest /= nd.shape[d];
      off += i * nd.strides[d];
    }
    dst[e] = (double)x[off];
  }
}

static __global__ void rng_kernel(double* a, int64_t n, uint64_t seed, uint64_t stream,
                                  uint64_t first, int normal) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    uint64_t i = first + (uint64_t)e;
    a[e] = normal ? fct_rng_normal(seed, stream, i) : fct_rng_uniform(seed, stream, i);
  }
}

/* src [A, B, C] row-major -> dst [B, A, C] (swap_last 0) or [A, C, B] (1). */
static __global__ void permute3_kernel(const double* src, int64_t A, int64_t B, int64_t C,
                                       double* dst, int swap_last) {
  int64_t n = A * B * C, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t a, b, c;
    if (!swap_last) {
      b = e / (A * C);
      int64_t rem = e - b * (A * C);
      a = rem / C;
      c = rem - a * C;
    } else {
      a = e / (C * B);
      int64_t rem = e - a * (C * B);
      c = rem / B;
      b = rem - c * B;
    }
    dst[e] = src[(a * B + b) * C + c];
  }
}

/* ------------------------------------------------------------------------- */
/* Launchers                                                                  */
/* ------------------------------------------------------------------------- */

#define LAUNCH(n) fct_cuda_blocks(n), FCT_CUDA_THREADS, 0, env->stream

extern "C" {

fct_status fct_cudec_scan(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_mat* a, double* part_sum, long long* part_bad,
                          fct_scan_result* out) {
  int64_t n = a->rows * a->cols;
  unsigned nb = n > 0 ? fct_cuda_blocks(n) : 1;
  if (nb > FCT_SCAN_BLOCKS) nb = FCT_SCAN_BLOCKS;
  if (dt == FCT_F32)
    scan_kernel<float><<<nb, RED_THREADS, 0, env->stream>>>(
        (const float*)a->data, a->rows, a->cols, a->rs, a->cs, part_sum, part_bad);
  else
    scan_kernel<double><<<nb, RED_THREADS, 0, env->stream>>>(
        (const double*)a->data, a->rows, a->cols, a->rs, a->cs, part_sum, part_bad);
  FCT_TRY(fct_cuda_check_launch(ctx, "scan_kernel"));
  scan_finish_kernel<<<1, RED_THREADS, 0, env->stream>>>(part_sum, part_bad, (int)nb, out);
  return fct_cuda_check_launch(ctx, "scan_finish_kernel");
}

fct_status fct_cudec_load_f64(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* a, double* dst, int64_t drs, int64_t dcs) {
  int64_t n = a->rows * a->cols;
  if (n == 0) return FCT_OK;
  if (dt == FCT_F32)
    load_f64_kernel<float><<<LAUNCH(n)>>>((const float*)a->data, a->rows, a->cols, a->rs, a->cs,
                                          dst, drs, dcs);
  else
    load_f64_kernel<double><<<LAUNCH(n)>>>((const double*)a->data, a->rows, a->cols, a->rs,
                                           a->cs, dst, drs, dcs);
  return fct_cuda_check_launch(ctx, "load_f64_kernel");
}

fct_status fct_cudec_pack(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_mat* a, char* dst) {
  int64_t n = a->rows * a->cols;
  if (n == 0) return FCT_OK;
  if (dt == FCT_F32)
    pack_kernel<float><<<LAUNCH(n)>>>((const float*)a->data, a->rows, a->cols, a->rs, a->cs,
                                      (float*)dst);
  else
    pack_kernel<double><<<LAUNCH(n)>>>((const double*)a->data, a->rows, a->cols, a->rs, a->cs,
                                       (double*)dst);
  return fct_cuda_check_launch(ctx, "pack_kernel");
}

fct_status fct_cudec_sketch(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, char* om,
                            int64_t count, uint64_t seed) {
  int64_t pairs = (count + 1) / 2;
  if (pairs == 0) return FCT_OK;
  if (dt == FCT_F32) sketch_kernel<float><<<LAUNCH(pairs)>>>((float*)om, count, seed);
  else sketch_kernel<double><<<LAUNCH(pairs)>>>((double*)om, count, seed);
  return fct_cuda_check_launch(ctx, "sketch_kernel");
}

fct_status fct_cudec_f32_to_f64(fct_context* ctx, const fct_cuda_env* env, const float* src,
                                double* dst, int64_t count) {
  if (count == 0) return FCT_OK;
  convert_kernel<float, double><<<LAUNCH(count)>>>(src, dst, count);
  return fct_cuda_check_launch(ctx, "convert_kernel");
}

fct_status fct_cudec_f64_to_f32(fct_context* ctx, const fct_cuda_env* env, const double* src,
                                float* dst, int64_t count) {
  if (count == 0) return FCT_OK;
  convert_kernel<double, float><<<LAUNCH(count)>>>(src, dst, count);
  return fct_cuda_check_launch(ctx, "convert_kernel");
}

fct_status fct_cudec_copy_upper(fct_context* ctx, const fct_cuda_env* env, const double* A,
                                int64_t lda, int64_t k, double* R) {
  if (k == 0) return FCT_OK;
  copy_upper_kernel<<<LAUNCH(k * k)>>>(A, lda, k, R);
  return fct_cuda_check_launch(ctx, "copy_upper_kernel");
}

fct_status fct_cudec_shift(fct_context* ctx, const fct_cuda_env* env, double* Q,
                           const double* Qprev, int64_t count, const double* s, int64_t k) {
  if (count == 0 || k == 0) return FCT_OK;
  shift_kernel<<<LAUNCH(count)>>>(Q, Qprev, count, s, k);
  return fct_cuda_check_launch(ctx, "shift_kernel");
}

fct_status fct_cudec_signs(fct_context* ctx, const fct_cuda_env* env, const double* U,
                           int64_t rows, int64_t urs, int64_t ucs, int64_t k, double* sign) {
  if (k == 0) return FCT_OK;
  signs_kernel<<<(unsigned)k, RED_THREADS, 0, env->stream>>>(U, rows, urs, ucs, sign);
  return fct_cuda_check_launch(ctx, "signs_kernel");
}

fct_status fct_cudec_store(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, char* out,
                           int64_t rows, int64_t cols, const double* src, int64_t rs,
                           int64_t cs, const double* sign, int sign_on_rows) {
  int64_t n = rows * cols;
  if (n == 0) return FCT_OK;
  if (dt == FCT_F32)
    store_kernel<float><<<LAUNCH(n)>>>((float*)out, rows, cols, src, rs, cs, sign, sign_on_rows);
  else
    store_kernel<double><<<LAUNCH(n)>>>((double*)out, rows, cols, src, rs, cs, sign,
                                        sign_on_rows);
  return fct_cuda_check_launch(ctx, "store_kernel");
}

fct_status fct_cudec_tail_error(fct_context* ctx, const fct_cuda_env* env, const double* s,
                                int64_t q, int64_t r, double* err) {
  error_kernel<<<1, RED_THREADS, 0, env->stream>>>(s, q, r, NULL, err);
  return fct_cuda_check_launch(ctx, "error_kernel");
}

fct_status fct_cudec_kept_error(fct_context* ctx, const fct_cuda_env* env, const double* s,
                                int64_t r, const fct_scan_result* scan, double* err) {
  error_kernel<<<1, RED_THREADS, 0, env->stream>>>(s, r, r, scan, err);
  return fct_cuda_check_launch(ctx, "error_kernel");
}

fct_status fct_cudec_load_nd(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                             const char* x, const fct_nd* nd, double* dst, int64_t n) {
  if (n == 0) return FCT_OK;
  if (dt == FCT_F32) load_nd_kernel<float><<<LAUNCH(n)>>>((const float*)x, *nd, dst, n);
  else load_nd_kernel<double><<<LAUNCH(n)>>>((const double*)x, *nd, dst, n);
  return fct_cuda_check_launch(ctx, "load_nd_kernel");
}

fct_status fct_cudec_rng(fct_context* ctx, const fct_cuda_env* env, double* a, int64_t n,
                         uint64_t seed, uint64_t stream, uint64_t first, bool normal) {
  if (n == 0) return FCT_OK;
  rng_kernel<<<LAUNCH(n)>>>(a, n, seed, stream, first, normal ? 1 : 0);
  return fct_cuda_check_launch(ctx, "rng_kernel");
}

fct_status fct_cudec_permute3(fct_context* ctx, const fct_cuda_env* env, const double* src,
                              int64_t A, int64_t B, int64_t C, double* dst, bool swap_last) {
  int64_t n = A * B * C;
  if (n == 0) return FCT_OK;
  permute3_kernel<<<LAUNCH(n)>>>(src, A, B, C, dst, swap_last ? 1 : 0);
  return fct_cuda_check_launch(ctx, "permute3_kernel");
}

} /* extern "C" */
