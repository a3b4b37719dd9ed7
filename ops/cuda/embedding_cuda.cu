/*
 * CUDA primitives of the factorized embeddings (backend.h): reading and
 * validating indices, gathering rows, an atomicAdd scatter-add, and the TT
 * chains; float32, float64, bfloat16, float16 (the chains accumulate in
 * float, or double for float64). CPU counterpart: ops/cpu/embedding_cpu.c.
 *
 * Nondeterminism: the scatter-add (grad_U of the low-rank table, the TT
 * cores' gradients) adds with atomicAdd, so when an index occurs several
 * times in a batch its contributions are summed in an order that varies
 * from run to run, and so may the last bits of that row's gradient.
 *
 * The TT chains run one index per thread block: the block's threads split
 * the elements of each small product (a dot product of r or D·C terms
 * each), the states live in the workspace (too large for shared memory at
 * ranks of 32+), and __syncthreads separates the steps. Simple rather than
 * fast: small products leave threads idle.
 */
#include "cuda_common.cuh"
#include "cuda_math.cuh"
#include "embedding_cuda.cuh"

/* Threads per block of the TT chain kernels: one index per block. */
#define EMB_CHAIN_THREADS 128

/* An index tensor's layout, passed to kernels by value. */
typedef struct idx_desc {
  int nd;
  int64_t shape[FCT_MAX_DIMS], st[FCT_MAX_DIMS];
} idx_desc;

/* Element offset of row-major position pos. */
static __device__ __forceinline__ int64_t idx_offset(const idx_desc& d, int64_t pos) {
  int64_t off = 0;
  for (int k = d.nd - 1; k >= 0; --k) {
    int64_t q = pos / d.shape[k];
    off += (pos - q * d.shape[k]) * d.st[k];
    pos = q;
  }
  return off;
}

/* out[t] (nullable) = index at position begin + t, or -1 for padding and
 * for values outside [0, num), which counters (nullable) count ([0]) and
 * locate (the smallest position, [1]). */
template <typename I>
static __global__ void indices_kernel(const I* base, idx_desc d, int64_t begin, int64_t count,
                                      int64_t num, int64_t pad, int64_t* out,
                                      unsigned long long* counters) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < count; t += step) {
    int64_t pos = begin + t;
    int64_t v = (int64_t)base[idx_offset(d, pos)];
    bool outside = v < 0 || v >= num;
    if (out) out[t] = outside || v == pad ? -1 : v;
    if (outside && counters) {
      atomicAdd(counters, 1ull);
      atomicMin(counters + 1, (unsigned long long)pos);
    }
  }
}

/* out [n, cols] (dense) row j = src row idx[j] (strides rs, cs) or zeros.
 * E: an unsigned integer of the element's size (the bits are copied; zero
 * bits are 0.0 in every float format). */
template <typename E>
static __global__ void gather_kernel(const E* src, int64_t rs, int64_t cs, int64_t cols,
                                     const int64_t* idx, int64_t n, E* out) {
  int64_t total = n * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
    int64_t j = t / cols, c = t - j * cols, i = idx[j];
    out[t] = i < 0 ? (E)0 : src[i * rs + c * cs];
  }
}

static __device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
static __device__ __forceinline__ void atomic_add(double* p, double v) { atomicAdd(p, v); }
static __device__ __forceinline__ void atomic_add(__half* p, __half v) { atomicAdd(p, v); }
static __device__ __forceinline__ void atomic_add(__nv_bfloat16* p, __nv_bfloat16 v) {
  atomicAdd(p, v);
}

/* dst [P, num, Q] += src rows: one thread per source element (j, p, q). */
template <typename T>
static __global__ void scatter_add_kernel(int64_t n, const int64_t* idx, int64_t div,
                                          const T* src, int64_t ss, int64_t P, int64_t num,
                                          int64_t Q, T* dst) {
  int64_t PQ = P * Q, total = n * PQ, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
    int64_t j = t / PQ, rem = t - j * PQ, p = rem / Q, q = rem - p * Q;
    int64_t i = idx[j];
    if (i < 0) continue;
    int64_t a = (i / div) % num;
    atomic_add(dst + (p * num + a) * Q + q, src[j * ss + p * Q + q]);
  }
}

/* The slice of core k for index i: G_k[:, i_k] as [r[k], m[k]·r[k+1]],
 * rows n[k]·m[k]·r[k+1] apart (*rs). */
template <typename T>
static __device__ __forceinline__ const T* chain_slice(const fct_tt_emb_geom& g, int k, int64_t i,
                                                       int64_t* rs) {
  int64_t C = g.m[k] * g.r[k + 1];
  *rs = g.n[k] * C;
  return (const T*)g.core[k] + ((i / g.div[k]) % g.n[k]) * C;
}

/* y [n, dim] row j = the TT row of idx[j]: S_1 = slice 0 (copied to the
 * work buffer), S_(k+1) [D[k], m[k]·r[k+1]] = S_k [D[k], r[k]] · slice k,
 * alternating index j's two work buffers; the last product goes to y. */
template <typename T>
static __global__ void tt_rows_kernel(fct_tt_emb_geom g, const int64_t* idx, int64_t n, T* y,
                                      typename acc_of<T>::type* work) {
  typedef typename acc_of<T>::type Acc;
  int64_t rs;
  /* Every thread of a block walks the same j: the control flow around the
   * __syncthreads below is uniform within the block. */
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
    T* row = y + j * g.dim;
    const int64_t i = idx[j];
    if (i < 0) {
      for (int64_t t = threadIdx.x; t < g.dim; t += blockDim.x) narrow(row + t, (Acc)0);
      continue;
    }
    const T* A0 = chain_slice<T>(g, 0, i, &rs);
    if (g.d == 1) {
      for (int64_t t = threadIdx.x; t < g.dim; t += blockDim.x) row[t] = A0[t];
      continue;
    }
    Acc* buf[2] = {work + j * g.fwd_work, work + j * g.fwd_work + g.max_state};
    for (int64_t t = threadIdx.x; t < g.D[1] * g.r[1]; t += blockDim.x) buf[1][t] = widen(A0[t]);
    __syncthreads();
    int cur = 1;
    for (int k = 1; k < g.d; ++k) {
      const int64_t r = g.r[k], C = g.m[k] * g.r[k + 1], D = g.D[k];
      const T* A = chain_slice<T>(g, k, i, &rs);
      const Acc* S = buf[cur];
      Acc* out = buf[cur ^ 1];
      const bool last = k == g.d - 1;
      for (int64_t t = threadIdx.x; t < D * C; t += blockDim.x) {
        const int64_t x = t / C, c = t - x * C;
        Acc s = 0;
        for (int64_t a = 0; a < r; ++a) s += S[x * r + a] * (Acc)widen(A[a * rs + c]);
        if (last) narrow(row + t, s);
        else out[t] = s;
      }
      __syncthreads();
      cur ^= 1;
    }
  }
}

/* slices [n, g.slices] row j = the gradients of the slices index j used:
 * the forward again keeping S_1..S_(d-1) (in Acc), then back from gy's row:
 *   grad slice k [r[k], C] = S_kᵀ · gS,  gS <- gS · slice_kᵀ  [D[k], r[k]]. */
template <typename T>
static __global__ void tt_grad_kernel(fct_tt_emb_geom g, const int64_t* idx, int64_t n,
                                      const T* gy, T* slices, typename acc_of<T>::type* work) {
  typedef typename acc_of<T>::type Acc;
  int64_t rs;
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) { /* uniform per block, as above */
    const int64_t i = idx[j];
    if (i < 0) continue;
    Acc* states = work + j * g.bwd_work;
    Acc* gbuf[2] = {states + g.states, states + g.states + g.gbuf};
    T* sl = slices + j * g.slices;
    if (g.d > 1) {
      const T* A0 = chain_slice<T>(g, 0, i, &rs);
      Acc* S1 = states + g.state_off[1];
      for (int64_t t = threadIdx.x; t < g.D[1] * g.r[1]; t += blockDim.x) S1[t] = widen(A0[t]);
      __syncthreads();
      for (int k = 1; k < g.d - 1; ++k) {
        const int64_t r = g.r[k], C = g.m[k] * g.r[k + 1], D = g.D[k];
        const T* A = chain_slice<T>(g, k, i, &rs);
        const Acc* S = states + g.state_off[k];
        Acc* out = states + g.state_off[k + 1];
        for (int64_t t = threadIdx.x; t < D * C; t += blockDim.x) {
          const int64_t x = t / C, c = t - x * C;
          Acc s = 0;
          for (int64_t a = 0; a < r; ++a) s += S[x * r + a] * (Acc)widen(A[a * rs + c]);
          out[t] = s;
        }
        __syncthreads();
      }
    }
    const T* grow = gy + j * g.dim;
    for (int64_t t = threadIdx.x; t < g.dim; t += blockDim.x) gbuf[0][t] = widen(grow[t]);
    __syncthreads();
    int cur = 0;
    for (int k = g.d - 1; k >= 0; --k) {
      const int64_t r = g.r[k], C = g.m[k] * g.r[k + 1], D = g.D[k];
      const Acc* gS = gbuf[cur];
      T* gA = sl + g.slice_off[k];
      if (k == 0) { /* D[0] = r[0] = 1: the slice gradient is gS itself */
        for (int64_t t = threadIdx.x; t < C; t += blockDim.x) narrow(gA + t, gS[t]);
        break;
      }
      const Acc* S = states + g.state_off[k];
      for (int64_t t = threadIdx.x; t < r * C; t += blockDim.x) {
        const int64_t a = t / C, c = t - a * C;
        Acc s = 0;
        for (int64_t x = 0; x < D; ++x) s += S[x * r + a] * gS[x * C + c];
        narrow(gA + t, s);
      }
      const T* A = chain_slice<T>(g, k, i, &rs);
      Acc* out = gbuf[cur ^ 1];
      for (int64_t t = threadIdx.x; t < D * r; t += blockDim.x) {
        const int64_t x = t / r, a = t - x * r;
        Acc s = 0;
        for (int64_t c = 0; c < C; ++c) s += gS[x * C + c] * (Acc)widen(A[a * rs + c]);
        out[t] = s;
      }
      __syncthreads();
      cur ^= 1;
    }
  }
}

static unsigned chain_blocks(int64_t n) {
  return (unsigned)(n < FCT_CUDA_MAX_BLOCKS ? n : FCT_CUDA_MAX_BLOCKS);
}

template <typename T>
static void launch_rows(const fct_cuda_env* env, const fct_tt_emb_geom* g, const int64_t* idx,
                        int64_t n, char* y, char* work) {
  typedef typename acc_of<T>::type Acc;
  tt_rows_kernel<T><<<chain_blocks(n), EMB_CHAIN_THREADS, 0, env->stream>>>(*g, idx, n, (T*)y,
                                                                            (Acc*)work);
}

template <typename T>
static void launch_grad(const fct_cuda_env* env, const fct_tt_emb_geom* g, const int64_t* idx,
                        int64_t n, const char* gy, char* slices, char* work) {
  typedef typename acc_of<T>::type Acc;
  tt_grad_kernel<T><<<chain_blocks(n), EMB_CHAIN_THREADS, 0, env->stream>>>(
      *g, idx, n, (const T*)gy, (T*)slices, (Acc*)work);
}

template <typename T>
static void launch_scatter(const fct_cuda_env* env, int64_t n, const int64_t* idx, int64_t div,
                           const char* src, int64_t ss, int64_t P, int64_t num, int64_t Q,
                           char* dst) {
  scatter_add_kernel<T><<<fct_cuda_blocks(n * P * Q), FCT_CUDA_THREADS, 0, env->stream>>>(
      n, idx, div, (const T*)src, ss, P, num, Q, (T*)dst);
}

template <typename E>
static void launch_gather(const fct_cuda_env* env, const fct_mat* src, const int64_t* idx,
                          int64_t n, char* out) {
  gather_kernel<E><<<fct_cuda_blocks(n * src->cols), FCT_CUDA_THREADS, 0, env->stream>>>(
      (const E*)src->data, src->rs, src->cs, src->cols, idx, n, (E*)out);
}

extern "C" {

/* The layout of an index tensor; a contiguous one as one flat dim. */
static idx_desc describe_indices(const DLTensor* t) {
  idx_desc d;
  d.nd = t->ndim;
  fct_strides(t, d.st);
  bool dense = true;
  int64_t s = 1;
  for (int k = t->ndim - 1; k >= 0; --k) {
    d.shape[k] = t->shape[k];
    if (t->shape[k] != 1 && d.st[k] != s) dense = false;
    s *= t->shape[k];
  }
  if (dense) {
    d.nd = 1;
    d.shape[0] = s > 0 ? s : 1;
    d.st[0] = 1;
  }
  return d;
}

/* The element offset of row-major position pos (host side). */
static int64_t host_offset(const DLTensor* t, int64_t pos) {
  int64_t st[FCT_MAX_DIMS], off = 0;
  fct_strides(t, st);
  for (int k = t->ndim - 1; k >= 0; --k) {
    off += (pos % t->shape[k]) * st[k];
    pos /= t->shape[k];
  }
  return off;
}

static fct_status indices_on(fct_context* ctx, const fct_cuda_env* env, const DLTensor* t,
                             int64_t begin, int64_t count, int64_t num, int64_t pad,
                             int64_t* out, char* scratch, int64_t* bad, int64_t* bad_pos,
                             int64_t* bad_value) {
  unsigned long long* counters = bad ? (unsigned long long*)scratch : NULL;
  if (counters) {
    FCT_TRY(fct_cuda_check(ctx, cudaMemsetAsync(counters, 0, 8, env->stream),
                           "cudaMemsetAsync (indices)"));
    FCT_TRY(fct_cuda_check(ctx, cudaMemsetAsync(counters + 1, 0xFF, 8, env->stream),
                           "cudaMemsetAsync (indices)"));
  }
  if (count > 0) {
    idx_desc d = describe_indices(t);
    unsigned blocks = fct_cuda_blocks(count);
    if (t->dtype.bits == 64)
      indices_kernel<int64_t><<<blocks, FCT_CUDA_THREADS, 0, env->stream>>>(
          (const int64_t*)fct_data(t), d, begin, count, num, pad, out, counters);
    else
      indices_kernel<int32_t><<<blocks, FCT_CUDA_THREADS, 0, env->stream>>>(
          (const int32_t*)fct_data(t), d, begin, count, num, pad, out, counters);
    FCT_TRY(fct_cuda_check_launch(ctx, "indices_kernel"));
  }
  if (!bad) return FCT_OK;
  unsigned long long host[2] = {0, 0};
  FCT_TRY(fct_cuda_check(ctx,
                         cudaMemcpyAsync(host, counters, sizeof host, cudaMemcpyDeviceToHost,
                                         env->stream),
                         "cudaMemcpyAsync (indices)"));
  /* The one stream sync of the index check (factorch.h). */
  FCT_TRY(fct_cuda_check(ctx, cudaStreamSynchronize(env->stream),
                         "cudaStreamSynchronize (indices)"));
  *bad = (int64_t)host[0];
  *bad_pos = host[0] ? (int64_t)host[1] : -1;
  *bad_value = 0;
  if (!host[0]) return FCT_OK;
  /* Only on the way to an error: fetch the first bad value for the message. */
  size_t es = t->dtype.bits / 8;
  int64_t v64 = 0;
  int32_t v32 = 0;
  const char* at = fct_data(t) + host_offset(t, *bad_pos) * (int64_t)es;
  FCT_TRY(fct_cuda_check(ctx,
                         cudaMemcpyAsync(es == 8 ? (void*)&v64 : (void*)&v32, at, es,
                                         cudaMemcpyDeviceToHost, env->stream),
                         "cudaMemcpyAsync (indices)"));
  FCT_TRY(fct_cuda_check(ctx, cudaStreamSynchronize(env->stream),
                         "cudaStreamSynchronize (indices)"));
  *bad_value = es == 8 ? v64 : v32;
  return FCT_OK;
}

static fct_status gather_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                            const fct_mat* src, const int64_t* idx, int64_t n, char* out) {
  size_t es = fct_dtype_bytes(dt);
  if (es == 8) launch_gather<unsigned long long>(env, src, idx, n, out);
  else if (es == 4) launch_gather<unsigned int>(env, src, idx, n, out);
  else launch_gather<unsigned short>(env, src, idx, n, out);
  return fct_cuda_check_launch(ctx, "gather_kernel");
}

static fct_status scatter_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, int64_t n,
                             const int64_t* idx, int64_t div, const char* src, int64_t ss,
                             int64_t P, int64_t num, int64_t Q, char* dst) {
  switch (dt) {
    case FCT_F32: launch_scatter<float>(env, n, idx, div, src, ss, P, num, Q, dst); break;
    case FCT_F64: launch_scatter<double>(env, n, idx, div, src, ss, P, num, Q, dst); break;
    case FCT_BF16: launch_scatter<__nv_bfloat16>(env, n, idx, div, src, ss, P, num, Q, dst); break;
    case FCT_F16: launch_scatter<__half>(env, n, idx, div, src, ss, P, num, Q, dst); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "embedding_scatter_add (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "scatter_add_kernel");
}

static fct_status rows_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_tt_emb_geom* g, const int64_t* idx, int64_t n, char* y,
                          char* work) {
  switch (dt) {
    case FCT_F32: launch_rows<float>(env, g, idx, n, y, work); break;
    case FCT_F64: launch_rows<double>(env, g, idx, n, y, work); break;
    case FCT_BF16: launch_rows<__nv_bfloat16>(env, g, idx, n, y, work); break;
    case FCT_F16: launch_rows<__half>(env, g, idx, n, y, work); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "tt_embedding_rows (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "tt_rows_kernel");
}

static fct_status grad_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                          const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                          const char* gy, char* slices, char* work) {
  switch (dt) {
    case FCT_F32: launch_grad<float>(env, g, idx, n, gy, slices, work); break;
    case FCT_F64: launch_grad<double>(env, g, idx, n, gy, slices, work); break;
    case FCT_BF16: launch_grad<__nv_bfloat16>(env, g, idx, n, gy, slices, work); break;
    case FCT_F16: launch_grad<__half>(env, g, idx, n, gy, slices, work); break;
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "tt_embedding_grad (cuda): unsupported dtype");
  }
  return fct_cuda_check_launch(ctx, "tt_grad_kernel");
}

/* ------------------------------------------------------------------------- */
/* fct_backend entries: enter the tensors' device, run, restore.             */
/* ------------------------------------------------------------------------- */

fct_status fct_cuda_embedding_indices(fct_context* ctx, const DLTensor* indices, int64_t begin,
                                      int64_t count, int64_t num, int64_t padding_idx,
                                      int64_t* out, char* scratch, int64_t* bad,
                                      int64_t* bad_pos, int64_t* bad_value) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, indices->device.device_id, NULL, false, &env));
  return fct_cuda_leave(ctx, &env,
                        indices_on(ctx, &env, indices, begin, count, num, padding_idx, out,
                                   scratch, bad, bad_pos, bad_value));
}

fct_status fct_cuda_embedding_gather(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* src, const int64_t* idx, int64_t n,
                                     char* out) {
  if (n <= 0 || src->cols <= 0) return FCT_OK;
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, gather_on(ctx, &env, dt, src, idx, n, out));
}

fct_status fct_cuda_embedding_scatter_add(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                          const int64_t* idx, int64_t div, const char* src,
                                          int64_t ss, int64_t P, int64_t num, int64_t Q,
                                          char* dst) {
  if (n <= 0 || num <= 0 || P <= 0 || Q <= 0) return FCT_OK;
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env,
                        scatter_on(ctx, &env, dt, n, idx, div, src, ss, P, num, Q, dst));
}

fct_status fct_cuda_tt_embedding_rows(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                      char* y, char* work) {
  if (n <= 0) return FCT_OK;
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, rows_on(ctx, &env, dt, g, idx, n, y, work));
}

fct_status fct_cuda_tt_embedding_grad(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                      const char* gy, char* slices, char* work) {
  if (n <= 0) return FCT_OK;
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, grad_on(ctx, &env, dt, g, idx, n, gy, slices, work));
}

} /* extern "C" */
