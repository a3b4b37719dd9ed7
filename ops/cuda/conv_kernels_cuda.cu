/*
 * CUDA primitives of the factorized convolutions (backend.h): im2col
 * and its adjoint col2im, the depthwise convolution and its two adjoints, and
 * the per-channel bias and sums, over dense NCHW blocks of n items, on the
 * caller's stream. float32/float64/bfloat16/float16; the 16-bit types
 * accumulate in float (cuda_math.cuh). CPU counterpart:
 * ops/cpu/conv_kernels_cpu.c.
 *
 * No atomics anywhere: col2im and depthwise_backward_input run one thread per
 * input element that gathers its contributions in (i, j) order, and the
 * reductions (depthwise_backward_weight, channel_sums) run one block per
 * result with a fixed tree, so every result is the same from run to run.
 *
 * Index arithmetic is done in 32-bit integers when every index of the call
 * fits (see fits_int32); 64-bit integer division is several times slower.
 */
#include <stdint.h>

#include "cuda_common.cuh"
#include "cuda_math.cuh"

/* The geometry in the kernels' index type. */
template <typename I>
struct geom_i {
  I C, H, W, kh, kw, sh, sw, pt, pl, dh, dw, OH, OW;
};

template <typename I>
static geom_i<I> geom_as(const fct_conv_geom* g) {
  geom_i<I> r;
  r.C = (I)g->C;
  r.H = (I)g->H;
  r.W = (I)g->W;
  r.kh = (I)g->kh;
  r.kw = (I)g->kw;
  r.sh = (I)g->sh;
  r.sw = (I)g->sw;
  r.pt = (I)g->pt;
  r.pl = (I)g->pl;
  r.dh = (I)g->dh;
  r.dw = (I)g->dw;
  r.OH = (I)g->OH;
  r.OW = (I)g->OW;
  return r;
}

/* True when every index a kernel forms for this call fits in int32: element
 * counts of the input and col blocks plus one grid-stride step (so the loop
 * counter cannot wrap), and the coordinates o·s − p + i·d on each axis. */
static bool fits_int32(const fct_conv_geom* g, int64_t n) {
  const int64_t step = (int64_t)FCT_CUDA_MAX_BLOCKS * FCT_CUDA_THREADS;
  const int64_t lim = INT32_MAX - step;
  /* Every term bounded first: strides, paddings and dilations near 2^63 pass
   * the stage checks when the output stays small (ops/conv_chain.c), and
   * OH·sh, kh·dh and the sums below then overflowed int64 (UB), possibly
   * into a small reach and the int32 kernels with truncated geometry (the
   * CPU kernels' span arithmetic had the same overflow:
   * tests/python/test_fuzz_conv_ops.py). Such calls take the int64 kernels. */
  const int64_t big = (int64_t)1 << 30;
  const int64_t terms[] = {g->H, g->W, g->kh, g->kw, g->sh, g->sw, g->pt, g->pl,
                           g->dh, g->dw, g->OH, g->OW};
  for (size_t t = 0; t < sizeof terms / sizeof terms[0]; ++t)
    if (terms[t] >= big) return false;
  /* One image at least: with n = 0 the kernels still index weights and
   * per-image planes (C·kh·kw). Products checked: col is not bounded by the
   * stage checks for depthwise stages. */
  int64_t n1 = n > 0 ? n : 1, in, col;
  const int64_t in_f[] = {n1, g->C, g->H, g->W}, col_f[] = {n1, g->C, g->kh, g->kw, g->OH, g->OW};
  in = col = 1;
  for (size_t t = 0; t < sizeof in_f / sizeof in_f[0]; ++t)
    if (__builtin_mul_overflow(in, in_f[t], &in)) return false;
  for (size_t t = 0; t < sizeof col_f / sizeof col_f[0]; ++t)
    if (__builtin_mul_overflow(col, col_f[t], &col)) return false;
  int64_t reach_h = (g->OH * g->sh > g->H ? g->OH * g->sh : g->H) + g->pt + g->kh * g->dh;
  int64_t reach_w = (g->OW * g->sw > g->W ? g->OW * g->sw : g->W) + g->pl + g->kw * g->dw;
  return in < lim && col < lim && reach_h < ((int64_t)1 << 30) && reach_w < ((int64_t)1 << 30);
}

template <typename I>
static __device__ __forceinline__ I first_index() {
  return (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
}
template <typename I>
static __device__ __forceinline__ I grid_step() {
  return (I)gridDim.x * (I)blockDim.x;
}

/* Sum of v over the block (blockDim.x a power of two, part[blockDim.x]), by
 * a fixed tree; every thread gets the sum. part is free again on return. */
template <typename Acc>
static __device__ Acc block_sum(Acc v, Acc* part) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  Acc r = part[0];
  __syncthreads();
  return r;
}

/* ------------------------------------------------------------------------- */
/* Kernels                                                                    */
/* ------------------------------------------------------------------------- */

/* col [n·C, kh, kw, OH, OW] = in [n·C, H, W] at (oh·sh − pt + i·dh,
 * ow·sw − pl + j·dw), 0 in the padding: one thread per col element (writes
 * coalesced along ow). */
template <typename T, typename I>
static __global__ void im2col_kernel(geom_i<I> g, I total, const T* __restrict__ in,
                                     T* __restrict__ col) {
  typedef typename acc_of<T>::type Acc;
  for (I idx = first_index<I>(); idx < total; idx += grid_step<I>()) {
    I r = idx;
    I ow = r % g.OW; r /= g.OW;
    I oh = r % g.OH; r /= g.OH;
    I j = r % g.kw; r /= g.kw;
    I i = r % g.kh;
    I bc = r / g.kh;
    I ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) col[idx] = in[(bc * g.H + ih) * g.W + iw];
    else narrow(col + idx, (Acc)0);
  }
}

/* Calls tap(i, j, oh, ow) for every tap (i, j) and output (oh, ow) that
 * reads input element (h, w), taps in (i, j) order: the gather of col2im
 * and of the depthwise input gradient. An output coordinate o reads h when
 * o·s = h + p − i·d, which decreases with i, so the loops stop at the first
 * negative value. */
template <typename I, typename F>
static __device__ __forceinline__ void for_taps_reading(const geom_i<I>& g, I h, I w, F tap) {
  for (I i = 0; i < g.kh; ++i) {
    I th = h + g.pt - i * g.dh;
    if (th < 0) break;
    if (th % g.sh != 0) continue;
    I oh = th / g.sh;
    if (oh >= g.OH) continue;
    for (I j = 0; j < g.kw; ++j) {
      I tw = w + g.pl - j * g.dw;
      if (tw < 0) break;
      if (tw % g.sw != 0) continue;
      I ow = tw / g.sw;
      if (ow >= g.OW) continue;
      tap(i, j, oh, ow);
    }
  }
}

/* in [n·C, H, W] = Σ of the col entries that read each element: one thread
 * per input element (for_taps_reading). */
template <typename T, typename I>
static __global__ void col2im_kernel(geom_i<I> g, I total, const T* __restrict__ col,
                                     T* __restrict__ in) {
  typedef typename acc_of<T>::type Acc;
  const I plane = g.kh * g.kw * g.OH * g.OW;
  for (I idx = first_index<I>(); idx < total; idx += grid_step<I>()) {
    I r = idx;
    I w = r % g.W; r /= g.W;
    I h = r % g.H;
    I bc = r / g.H;
    const T* cb = col + bc * plane;
    Acc acc = 0;
    for_taps_reading(g, h, w, [&](I i, I j, I oh, I ow) {
      acc += (Acc)widen(cb[((i * g.kw + j) * g.OH + oh) * g.OW + ow]);
    });
    narrow(in + idx, acc);
  }
}

/* out [n·C, OH, OW] = Σ_{i,j} w[c, i, j] · in[b, c, ih, iw]: one thread per
 * output element, taps summed in (i, j) order. */
template <typename T, typename I>
static __global__ void dw_forward_kernel(geom_i<I> g, I total, const T* __restrict__ in,
                                         const T* __restrict__ w, T* __restrict__ out) {
  typedef typename acc_of<T>::type Acc;
  for (I idx = first_index<I>(); idx < total; idx += grid_step<I>()) {
    I r = idx;
    I ow = r % g.OW; r /= g.OW;
    I oh = r % g.OH;
    I bc = r / g.OH;
    I c = bc % g.C;
    const T* ip = in + bc * g.H * g.W;
    const T* wp = w + c * g.kh * g.kw;
    Acc acc = 0;
    for (I i = 0; i < g.kh; ++i) {
      I ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (I j = 0; j < g.kw; ++j) {
        I iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        acc += (Acc)widen(wp[i * g.kw + j]) * (Acc)widen(ip[ih * g.W + iw]);
      }
    }
    narrow(out + idx, acc);
  }
}

/* gin [n·C, H, W] = the adjoint of dw_forward applied to gout: one thread per
 * input element gathering its outputs as col2im does (for_taps_reading). */
template <typename T, typename I>
static __global__ void dw_backward_input_kernel(geom_i<I> g, I total, const T* __restrict__ gout,
                                                const T* __restrict__ w, T* __restrict__ gin) {
  typedef typename acc_of<T>::type Acc;
  for (I idx = first_index<I>(); idx < total; idx += grid_step<I>()) {
    I r = idx;
    I x = r % g.W; r /= g.W;
    I h = r % g.H;
    I bc = r / g.H;
    I c = bc % g.C;
    const T* gp = gout + bc * g.OH * g.OW;
    const T* wp = w + c * g.kh * g.kw;
    Acc acc = 0;
    for_taps_reading(g, h, x, [&](I i, I j, I oh, I ow) {
      acc += (Acc)widen(wp[i * g.kw + j]) * (Acc)widen(gp[oh * g.OW + ow]);
    });
    narrow(gin + idx, acc);
  }
}

/* gw [C, kh, kw] = beta·gw + Σ_{b, oh, ow} gout[b, c, oh, ow] · in[b, c, ih, iw]:
 * one block per (c, i, j) (grid-stride over them), its threads striding over
 * the n·OH·OW positions, then a fixed tree (block_sum). */
template <typename T, typename I>
static __global__ void dw_backward_weight_kernel(geom_i<I> g, I n, const T* __restrict__ in,
                                                 const T* __restrict__ gout, T* __restrict__ gw,
                                                 int accumulate) {
  typedef typename acc_of<T>::type Acc;
  __shared__ Acc part[FCT_CUDA_THREADS];
  const I taps = g.kh * g.kw, ohw = g.OH * g.OW, positions = n * ohw;
  for (I k = (I)blockIdx.x; k < g.C * taps; k += (I)gridDim.x) {
    I c = k / taps, t = k - c * taps, i = t / g.kw, j = t - i * g.kw;
    Acc acc = 0;
    for (I q = (I)threadIdx.x; q < positions; q += (I)blockDim.x) {
      I b = q / ohw, rem = q - b * ohw;
      I oh = rem / g.OW, ow = rem - oh * g.OW;
      I ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      I bc = b * g.C + c;
      acc += (Acc)widen(gout[bc * ohw + rem]) * (Acc)widen(in[(bc * g.H + ih) * g.W + iw]);
    }
    Acc s = block_sum(acc, part);
    if (threadIdx.x == 0) {
      if (accumulate) s += (Acc)widen(gw[k]);
      narrow(gw + k, s);
    }
  }
}

/* out [n·C, P] += bias[c · bs]: one thread per element. */
template <typename T>
static __global__ void channel_bias_kernel(int64_t total, int64_t C, int64_t P, T* out,
                                           const T* __restrict__ bias, int64_t bs) {
  typedef typename acc_of<T>::type Acc;
  for (int64_t idx = first_index<int64_t>(); idx < total; idx += grid_step<int64_t>()) {
    int64_t c = (idx / P) % C;
    narrow(out + idx, (Acc)widen(out[idx]) + (Acc)widen(bias[c * bs]));
  }
}

/* sums [C] = Σ_{b, p} g[b, c, p]: one block per channel (grid-stride over
 * them), a fixed tree at the end. */
template <typename T>
static __global__ void channel_sums_kernel(int64_t n, int64_t C, int64_t P,
                                           const T* __restrict__ g, T* __restrict__ sums) {
  typedef typename acc_of<T>::type Acc;
  __shared__ Acc part[FCT_CUDA_THREADS];
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    Acc acc = 0;
    for (int64_t b = 0; b < n; ++b) {
      const T* row = g + (b * C + c) * P;
      for (int64_t p = threadIdx.x; p < P; p += blockDim.x) acc += (Acc)widen(row[p]);
    }
    Acc s = block_sum(acc, part);
    if (threadIdx.x == 0) narrow(sums + c, s);
  }
}

/* ------------------------------------------------------------------------- */
/* Launches                                                                   */
/* ------------------------------------------------------------------------- */

/* Which element-wise kernel a launch runs. */
enum conv_kind { K_IM2COL, K_COL2IM, K_DW_FORWARD, K_DW_BACKWARD_INPUT };

template <typename T, typename I>
static void launch_elementwise(const fct_cuda_env* env, conv_kind kind, const fct_conv_geom* g,
                               int64_t total, const char* a, const char* w, char* out) {
  geom_i<I> gi = geom_as<I>(g);
  unsigned blocks = fct_cuda_blocks(total);
  cudaStream_t s = env->stream;
  switch (kind) {
    case K_IM2COL:
      im2col_kernel<T, I><<<blocks, FCT_CUDA_THREADS, 0, s>>>(gi, (I)total, (const T*)a, (T*)out);
      break;
    case K_COL2IM:
      col2im_kernel<T, I><<<blocks, FCT_CUDA_THREADS, 0, s>>>(gi, (I)total, (const T*)a, (T*)out);
      break;
    case K_DW_FORWARD:
      dw_forward_kernel<T, I><<<blocks, FCT_CUDA_THREADS, 0, s>>>(gi, (I)total, (const T*)a,
                                                                (const T*)w, (T*)out);
      break;
    case K_DW_BACKWARD_INPUT:
      dw_backward_input_kernel<T, I><<<blocks, FCT_CUDA_THREADS, 0, s>>>(
          gi, (I)total, (const T*)a, (const T*)w, (T*)out);
      break;
  }
}

template <typename T>
static void launch_elementwise_t(const fct_cuda_env* env, conv_kind kind, const fct_conv_geom* g,
                                 int64_t n, int64_t total, const char* a, const char* w,
                                 char* out) {
  if (fits_int32(g, n)) launch_elementwise<T, int32_t>(env, kind, g, total, a, w, out);
  else launch_elementwise<T, int64_t>(env, kind, g, total, a, w, out);
}

template <typename T>
static void launch_dw_weight(const fct_cuda_env* env, const fct_conv_geom* g, int64_t n,
                             const char* in, const char* gout, char* gw, int accumulate) {
  int64_t results = g->C * g->kh * g->kw;
  unsigned blocks = (unsigned)(results < FCT_CUDA_MAX_BLOCKS ? results : FCT_CUDA_MAX_BLOCKS);
  if (fits_int32(g, n))
    dw_backward_weight_kernel<T, int32_t><<<blocks, FCT_CUDA_THREADS, 0, env->stream>>>(
        geom_as<int32_t>(g), (int32_t)n, (const T*)in, (const T*)gout, (T*)gw, accumulate);
  else
    dw_backward_weight_kernel<T, int64_t><<<blocks, FCT_CUDA_THREADS, 0, env->stream>>>(
        geom_as<int64_t>(g), n, (const T*)in, (const T*)gout, (T*)gw, accumulate);
}

template <typename T>
static void launch_channel_bias(const fct_cuda_env* env, int64_t n, int64_t C, int64_t P,
                                char* out, const char* bias, int64_t bs) {
  int64_t total = n * C * P;
  channel_bias_kernel<T><<<fct_cuda_blocks(total), FCT_CUDA_THREADS, 0, env->stream>>>(
      total, C, P, (T*)out, (const T*)bias, bs);
}

template <typename T>
static void launch_channel_sums(const fct_cuda_env* env, int64_t n, int64_t C, int64_t P,
                                const char* g, char* sums) {
  unsigned blocks = (unsigned)(C < FCT_CUDA_MAX_BLOCKS ? C : FCT_CUDA_MAX_BLOCKS);
  channel_sums_kernel<T><<<blocks, FCT_CUDA_THREADS, 0, env->stream>>>(n, C, P, (const T*)g,
                                                                       (T*)sums);
}

/* Runs CALL with T bound to dt's storage type, or fails with FCT_ERR_DTYPE. */
#define CONV_DISPATCH(WHAT, CALL)                                                   \
  switch (dt) {                                                                     \
    case FCT_F32: { typedef float T; CALL; break; }                                 \
    case FCT_F64: { typedef double T; CALL; break; }                                \
    case FCT_BF16: { typedef __nv_bfloat16 T; CALL; break; }                        \
    case FCT_F16: { typedef __half T; CALL; break; }                                \
    default: return fct_fail(ctx, FCT_ERR_DTYPE, "%s (cuda): unsupported dtype", WHAT); \
  }

extern "C" {

/* The element-wise ones: im2col/dw_forward write `out_total` outputs,
 * col2im/dw_backward_input write the n·C·H·W inputs. */
static fct_status elementwise_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                 conv_kind kind, const char* op, const char* kernel,
                                 const fct_conv_geom* g,
                                 int64_t n, const char* a, const char* w, char* out) {
  int64_t total;
  switch (kind) {
    case K_IM2COL: total = n * g->C * g->kh * g->kw * g->OH * g->OW; break;
    case K_DW_FORWARD: total = n * g->C * g->OH * g->OW; break;
    default: total = n * g->C * g->H * g->W; break;
  }
  if (total <= 0) return FCT_OK;
  CONV_DISPATCH(op, launch_elementwise_t<T>(env, kind, g, n, total, a, w, out));
  return fct_cuda_check_launch(ctx, kernel);
}

static fct_status entry(fct_context* ctx, int device, fct_dtype dt, conv_kind kind,
                        const char* op, const char* kernel, const fct_conv_geom* g, int64_t n,
                        const char* a, const char* w, char* out) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env,
                        elementwise_on(ctx, &env, dt, kind, op, kernel, g, n, a, w, out));
}

fct_status fct_cuda_im2col(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                           int64_t n, const char* in, char* col) {
  return entry(ctx, device, dt, K_IM2COL, "im2col", "im2col_kernel", g, n, in, NULL, col);
}

fct_status fct_cuda_col2im(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                           int64_t n, const char* col, char* in) {
  return entry(ctx, device, dt, K_COL2IM, "col2im", "col2im_kernel", g, n, col, NULL, in);
}

fct_status fct_cuda_depthwise_forward(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_conv_geom* g, int64_t n, const char* in,
                                      const char* w, char* out) {
  return entry(ctx, device, dt, K_DW_FORWARD, "depthwise_forward", "dw_forward_kernel", g, n, in,
               w, out);
}

fct_status fct_cuda_depthwise_backward_input(fct_context* ctx, int device, fct_dtype dt,
                                             const fct_conv_geom* g, int64_t n, const char* gout,
                                             const char* w, char* gin) {
  return entry(ctx, device, dt, K_DW_BACKWARD_INPUT, "depthwise_backward_input",
               "dw_backward_input_kernel", g, n, gout, w, gin);
}

static fct_status dw_weight_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                               const fct_conv_geom* g, int64_t n, const char* in,
                               const char* gout, char* gw, double beta) {
  if (g->C * g->kh * g->kw <= 0) return FCT_OK;
  if (n < 0) n = 0;
  int accumulate = beta != 0.0;
  CONV_DISPATCH("depthwise_backward_weight",
                launch_dw_weight<T>(env, g, n, in, gout, gw, accumulate));
  return fct_cuda_check_launch(ctx, "dw_backward_weight_kernel");
}

fct_status fct_cuda_depthwise_backward_weight(fct_context* ctx, int device, fct_dtype dt,
                                              const fct_conv_geom* g, int64_t n, const char* in,
                                              const char* gout, char* gw, double beta) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, dw_weight_on(ctx, &env, dt, g, n, in, gout, gw, beta));
}

static fct_status channel_bias_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                  int64_t n, int64_t C, int64_t P, char* out, const char* bias,
                                  int64_t bs) {
  if (n <= 0 || C <= 0 || P <= 0) return FCT_OK;
  CONV_DISPATCH("channel_bias", launch_channel_bias<T>(env, n, C, P, out, bias, bs));
  return fct_cuda_check_launch(ctx, "channel_bias_kernel");
}

fct_status fct_cuda_channel_bias(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                 int64_t C, int64_t P, char* out, const char* bias, int64_t bs) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, channel_bias_on(ctx, &env, dt, n, C, P, out, bias, bs));
}

static fct_status channel_sums_on(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                                  int64_t n, int64_t C, int64_t P, const char* g, char* sums) {
  if (C <= 0) return FCT_OK;
  if (n < 0 || P <= 0) n = 0; /* the kernel writes zeros */
  if (P < 0) P = 0;
  CONV_DISPATCH("channel_sums", launch_channel_sums<T>(env, n, C, P, g, sums));
  return fct_cuda_check_launch(ctx, "channel_sums_kernel");
}

fct_status fct_cuda_channel_sums(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                                 int64_t P, const char* g, char* sums) {
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, device, NULL, false, &env));
  return fct_cuda_leave(ctx, &env, channel_sums_on(ctx, &env, dt, n, C, P, g, sums));
}

} /* extern "C" */
