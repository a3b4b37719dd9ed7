/* CPU primitives of the factorized convolutions (backend.h): im2col
 * and its adjoint col2im, the depthwise convolution and its two adjoints, and
 * the per-channel bias and sums, over dense NCHW blocks of n items.
 * float32/float64. CUDA counterpart: ops/cuda/conv_kernels_cuda.cu.
 *
 * Threads: the pool runs (item, channel) planes, or channels where a result
 * sums over items (depthwise_backward_weight, channel_sums), so no two tasks
 * write the same element and every sum runs in a fixed order: the results do
 * not depend on the number of threads. A task is at least ~64 KB of memory
 * traffic; smaller calls run serially (fct_cpu_parallel). */
#include <string.h>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

/* Outputs o in [lo, hi) of one axis read the input o·s + off inside [0, L);
 * the others read padding. 0 <= lo <= hi <= OL. */
typedef struct span {
  int64_t lo, hi;
} span;

static int64_t floor_div(int64_t a, int64_t b) { /* b > 0 */
  /* Not -((-a + b - 1) / b): that overflowed (UB) for strides near 2^63,
   * which the stage checks accept when the output stays small (stride_w =
   * 2^63 - 1, pad_left = 2): the span then started one output early and the
   * loops read (im2col, forward) or wrote (col2im, backward) before the
   * plane. -(a + 1) cannot overflow for a < 0. */
  return a >= 0 ? a / b : -(-(a + 1) / b) - 1;
}

static span valid_span(int64_t L, int64_t OL, int64_t s, int64_t off) {
  int64_t lo = -floor_div(off, s);            /* ceil(-off / s): o·s + off >= 0 */
  int64_t hi = floor_div(L - 1 - off, s) + 1; /* o·s + off <= L - 1 */
  if (lo < 0) lo = 0;
  if (lo > OL) lo = OL;
  if (hi > OL) hi = OL;
  if (hi < lo) hi = lo;
  return (span){lo, hi};
}

#define T float
#define FN(name) name##_f32
#include "conv_kernels_cpu.inc"
#undef T
#undef FN
#define T double
#define FN(name) name##_f64
#include "conv_kernels_cpu.inc"
#undef T
#undef FN

/* Tasks per pool chunk so that a chunk moves >= ~64 KB (bytes: one task's). */
static int64_t grain_for(int64_t bytes) {
  const int64_t target = (int64_t)64 << 10;
  if (bytes <= 0) return target;
  int64_t g = (target + bytes - 1) / bytes;
  return g < 1 ? 1 : g;
}

static fct_status bad_dtype(fct_context* ctx, const char* what) {
  return fct_fail(ctx, FCT_ERR_DTYPE, "%s (cpu): unsupported dtype (float32 and float64 only)",
                  what);
}

typedef struct conv_job {
  fct_dtype dt;
  const fct_conv_geom* g;
  int64_t n;
  const char* a; /* in, col or gout */
  const char* b; /* w or gout */
  char* out;
  double beta;
  /* channel_bias / channel_sums */
  int64_t C, P, bs;
} conv_job;

/* ------------------------------------------------------------------------- */
/* im2col / col2im: one task per (item, channel) plane                        */
/* ------------------------------------------------------------------------- */

/* plane t = b·C + c: in at t·H·W, col at t·kh·kw·OH·OW (rows (c, i, j) of
 * item b are consecutive, so the planes tile col). */
static void im2col_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const fct_conv_geom* g = j->g;
  const int64_t in_plane = g->H * g->W, col_plane = g->kh * g->kw * g->OH * g->OW;
  for (int64_t t = begin; t < end; ++t) {
    if (j->dt == FCT_F32)
      im2col_plane_f32(g, (const float*)j->a + t * in_plane, (float*)j->out + t * col_plane);
    else
      im2col_plane_f64(g, (const double*)j->a + t * in_plane, (double*)j->out + t * col_plane);
  }
}

static void col2im_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const fct_conv_geom* g = j->g;
  const int64_t in_plane = g->H * g->W, col_plane = g->kh * g->kw * g->OH * g->OW;
  for (int64_t t = begin; t < end; ++t) {
    if (j->dt == FCT_F32)
      col2im_plane_f32(g, (const float*)j->a + t * col_plane, (float*)j->out + t * in_plane);
    else
      col2im_plane_f64(g, (const double*)j->a + t * col_plane, (double*)j->out + t * in_plane);
  }
}

fct_status fct_cpu_im2col(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                          int64_t n, const char* in, char* col) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "im2col");
  int64_t planes = n * g->C, col_plane = g->kh * g->kw * g->OH * g->OW;
  if (planes <= 0 || col_plane <= 0) return FCT_OK;
  conv_job job = {.dt = dt, .g = g, .n = n, .a = in, .out = col};
  int64_t bytes = (col_plane + g->H * g->W) * (int64_t)fct_dtype_bytes(dt);
  fct_cpu_parallel(planes, grain_for(bytes), im2col_tasks, &job);
  return FCT_OK;
}

fct_status fct_cpu_col2im(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                          int64_t n, const char* col, char* in) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "col2im");
  int64_t planes = n * g->C, in_plane = g->H * g->W, col_plane = g->kh * g->kw * g->OH * g->OW;
  if (planes <= 0 || in_plane <= 0) return FCT_OK;
  if (col_plane <= 0) { /* nothing reads the input: all zeros */
    memset(in, 0, (size_t)(planes * in_plane) * fct_dtype_bytes(dt));
    return FCT_OK;
  }
  conv_job job = {.dt = dt, .g = g, .n = n, .a = col, .out = in};
  int64_t bytes = (col_plane + in_plane) * (int64_t)fct_dtype_bytes(dt);
  fct_cpu_parallel(planes, grain_for(bytes), col2im_tasks, &job);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Depthwise convolution                                                      */
/* ------------------------------------------------------------------------- */

/* forward / backward_input: plane t = b·C + c uses filter c = t mod C. */
static void dw_forward_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const fct_conv_geom* g = j->g;
  const int64_t in_plane = g->H * g->W, out_plane = g->OH * g->OW, taps = g->kh * g->kw;
  for (int64_t t = begin; t < end; ++t) {
    int64_t c = t % g->C;
    if (j->dt == FCT_F32)
      dw_forward_plane_f32(g, (const float*)j->a + t * in_plane, (const float*)j->b + c * taps,
                           (float*)j->out + t * out_plane);
    else
      dw_forward_plane_f64(g, (const double*)j->a + t * in_plane, (const double*)j->b + c * taps,
                           (double*)j->out + t * out_plane);
  }
}

static void dw_backward_input_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const fct_conv_geom* g = j->g;
  const int64_t in_plane = g->H * g->W, out_plane = g->OH * g->OW, taps = g->kh * g->kw;
  for (int64_t t = begin; t < end; ++t) {
    int64_t c = t % g->C;
    if (j->dt == FCT_F32)
      dw_backward_input_plane_f32(g, (const float*)j->a + t * out_plane,
                                  (const float*)j->b + c * taps, (float*)j->out + t * in_plane);
    else
      dw_backward_input_plane_f64(g, (const double*)j->a + t * out_plane,
                                  (const double*)j->b + c * taps, (double*)j->out + t * in_plane);
  }
}

/* backward_weight: task c owns gw[c, :, :] and sums the items in order. The
 * taps go in chunks of WTAPS running sums (kernels up to 16x16 in one). */
#define WTAPS 256

static void dw_weight_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const fct_conv_geom* g = j->g;
  const int64_t C = g->C, in_plane = g->H * g->W, out_plane = g->OH * g->OW,
                taps = g->kh * g->kw;
  double acc[WTAPS];
  for (int64_t c = begin; c < end; ++c) {
    for (int64_t t0 = 0; t0 < taps; t0 += WTAPS) {
      int64_t t1 = t0 + WTAPS < taps ? t0 + WTAPS : taps;
      memset(acc, 0, sizeof acc);
      for (int64_t b = 0; b < j->n; ++b) {
        int64_t p = b * C + c;
        if (j->dt == FCT_F32)
          dw_weight_plane_f32(g, (const float*)j->a + p * in_plane,
                              (const float*)j->b + p * out_plane, t0, t1, acc);
        else
          dw_weight_plane_f64(g, (const double*)j->a + p * in_plane,
                              (const double*)j->b + p * out_plane, t0, t1, acc);
      }
      for (int64_t t = t0; t < t1; ++t) {
        if (j->dt == FCT_F32) {
          float* w = (float*)j->out + c * taps + t;
          *w = j->beta != 0.0 ? (float)((double)*w + acc[t - t0]) : (float)acc[t - t0];
        } else {
          double* w = (double*)j->out + c * taps + t;
          *w = j->beta != 0.0 ? *w + acc[t - t0] : acc[t - t0];
        }
      }
    }
  }
}

fct_status fct_cpu_depthwise_forward(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_conv_geom* g, int64_t n, const char* in,
                                     const char* w, char* out) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "depthwise_forward");
  int64_t planes = n * g->C, out_plane = g->OH * g->OW;
  if (planes <= 0 || out_plane <= 0) return FCT_OK;
  conv_job job = {.dt = dt, .g = g, .n = n, .a = in, .b = w, .out = out};
  int64_t bytes = (g->H * g->W + out_plane * g->kh * g->kw) * (int64_t)fct_dtype_bytes(dt);
  fct_cpu_parallel(planes, grain_for(bytes), dw_forward_tasks, &job);
  return FCT_OK;
}

fct_status fct_cpu_depthwise_backward_input(fct_context* ctx, int device, fct_dtype dt,
                                            const fct_conv_geom* g, int64_t n, const char* gout,
                                            const char* w, char* gin) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "depthwise_backward_input");
  int64_t planes = n * g->C, in_plane = g->H * g->W, out_plane = g->OH * g->OW;
  if (planes <= 0 || in_plane <= 0) return FCT_OK;
  if (out_plane <= 0 || g->kh * g->kw <= 0) { /* no output reads the input */
    memset(gin, 0, (size_t)(planes * in_plane) * fct_dtype_bytes(dt));
    return FCT_OK;
  }
  conv_job job = {.dt = dt, .g = g, .n = n, .a = gout, .b = w, .out = gin};
  int64_t bytes = (in_plane + out_plane * g->kh * g->kw) * (int64_t)fct_dtype_bytes(dt);
  fct_cpu_parallel(planes, grain_for(bytes), dw_backward_input_tasks, &job);
  return FCT_OK;
}

fct_status fct_cpu_depthwise_backward_weight(fct_context* ctx, int device, fct_dtype dt,
                                             const fct_conv_geom* g, int64_t n, const char* in,
                                             const char* gout, char* gw, double beta) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "depthwise_backward_weight");
  int64_t taps = g->kh * g->kw;
  if (g->C <= 0 || taps <= 0) return FCT_OK;
  if (n < 0) n = 0;
  /* With n == 0 or an empty output the tasks still run: they write beta·gw. */
  if (g->OH * g->OW <= 0) n = 0;
  conv_job job = {.dt = dt, .g = g, .n = n, .a = in, .b = gout, .out = gw, .beta = beta};
  int64_t bytes =
      n * (g->H * g->W + g->OH * g->OW * taps) * (int64_t)fct_dtype_bytes(dt) + taps * 8;
  fct_cpu_parallel(g->C, grain_for(bytes), dw_weight_tasks, &job);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Per-channel bias and sums over [n, C, P]                                   */
/* ------------------------------------------------------------------------- */

/* row t = b·C + c of out [n·C, P] += bias[c]. */
static void bias_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const int64_t P = j->P;
  for (int64_t t = begin; t < end; ++t) {
    int64_t c = t % j->C;
    if (j->dt == FCT_F32) {
      float* o = (float*)j->out + t * P;
      const float v = ((const float*)j->b)[c * j->bs];
      for (int64_t p = 0; p < P; ++p) o[p] += v;
    } else {
      double* o = (double*)j->out + t * P;
      const double v = ((const double*)j->b)[c * j->bs];
      for (int64_t p = 0; p < P; ++p) o[p] += v;
    }
  }
}

/* sums[c] = Σ_b Σ_p g[b, c, p] in double, items in order. */
static void sums_tasks(int64_t begin, int64_t end, void* arg) {
  const conv_job* j = arg;
  const int64_t P = j->P, C = j->C;
  for (int64_t c = begin; c < end; ++c) {
    double s = 0;
    for (int64_t b = 0; b < j->n; ++b) {
      if (j->dt == FCT_F32) s += sum_f32((const float*)j->a + (b * C + c) * P, P);
      else s += sum_f64((const double*)j->a + (b * C + c) * P, P);
    }
    if (j->dt == FCT_F32) ((float*)j->out)[c] = (float)s;
    else ((double*)j->out)[c] = s;
  }
}

fct_status fct_cpu_channel_bias(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                int64_t C, int64_t P, char* out, const char* bias, int64_t bs) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "channel_bias");
  if (n <= 0 || C <= 0 || P <= 0) return FCT_OK;
  conv_job job = {.dt = dt, .b = bias, .out = out, .C = C, .P = P, .bs = bs};
  fct_cpu_parallel(n * C, grain_for(2 * P * (int64_t)fct_dtype_bytes(dt)), bias_tasks, &job);
  return FCT_OK;
}

fct_status fct_cpu_channel_sums(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                                int64_t P, const char* g, char* sums) {
  (void)device;
  if (dt != FCT_F32 && dt != FCT_F64) return bad_dtype(ctx, "channel_sums");
  if (C <= 0) return FCT_OK;
  if (n < 0 || P <= 0) n = 0; /* the tasks write zeros */
  conv_job job = {.dt = dt, .n = n, .a = g, .out = sums, .C = C, .P = P};
  fct_cpu_parallel(C, grain_for(n * P * (int64_t)fct_dtype_bytes(dt) + 8), sums_tasks, &job);
  return FCT_OK;
}
