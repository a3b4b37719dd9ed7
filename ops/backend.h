/*
 * backend.h (internal): what the device-independent entry points of the
 * layers' ops hand to a backend. The entry points (ops/<op>.c) check
 * arguments, build a plan and lay out the workspace; a backend
 * (ops/cpu/backend_cpu.c, ops/cuda/backend_cuda.cu) only computes.
 *
 * The decompositions run on a second table, ops/decompose/engine.h (CPU:
 * ops/cpu/engine_cpu.c, CUDA: ops/cuda/engine_cuda.cu), because they serve
 * a second purpose: one-off factorisations in float64 over column-major
 * LAPACK-style buffers (SVD, QR, mode products), where these primitives run
 * every training step in the tensors' own dtype over row-major strided views.
 */
#ifndef FCT_BACKEND_H
#define FCT_BACKEND_H

#include "fct_tensor.h"
#include "fct_try.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Geometry of one 2-D convolution over [C, H, W] items (a 1-D one has
 * H = kh = 1). Padding is given before each axis (top, left); what lies after
 * is implied by the output size. */
typedef struct fct_conv_geom {
  int64_t C, H, W;    /* input channels (per group of the im2col), height, width */
  int64_t kh, kw;     /* kernel */
  int64_t sh, sw;     /* stride */
  int64_t pt, pl;     /* padding before: top, left */
  int64_t dh, dw;     /* dilation */
  int64_t OH, OW;     /* output size */
} fct_conv_geom;

/* Factorized embeddings: the shape of a TT embedding table, as its backend
 * primitives read it (ops/tt_embedding.c fills it). Cores are numbered from
 * 0 here: core k is G_k [r[k], n[k], m[k], r[k+1]], dense, r[0] = r[d] = 1.
 * Index i's digit k is (i / div[k]) % n[k]. The chain state after cores
 * 0..k-1 is S_k [D[k], r[k]] with D[k] = m[0]···m[k-1]; S_1..S_(d-1) are the
 * intermediates (elements max_state at most, states in all), S_d is the row. */
typedef struct fct_tt_emb_geom {
  int d;
  int64_t n[FCT_MAX_MODES], m[FCT_MAX_MODES], r[FCT_MAX_MODES + 1];
  int64_t div[FCT_MAX_MODES], D[FCT_MAX_MODES + 1];
  const char* core[FCT_MAX_MODES];
  int64_t dim;                        /* D[d] */
  int64_t max_state;                  /* max_(1<=k<d) D[k]·r[k], >= 1 */
  int64_t states;                     /* Σ_(1<=k<d) D[k]·r[k] */
  int64_t state_off[FCT_MAX_MODES];   /* S_k's offset among the states (k >= 1) */
  int64_t gbuf;                       /* max(dim, max_state): a state's gradient */
  int64_t slices;                     /* Σ_k r[k]·m[k]·r[k+1]: one index's slices */
  int64_t slice_off[FCT_MAX_MODES];   /* core k's slice among them */
  int64_t fwd_work, bwd_work;         /* accumulator elements per index: 2·max_state,
                                         states + 2·gbuf */
  double flops;                       /* forward FLOPs per index */
} fct_tt_emb_geom;

typedef struct fct_backend {
  /* dst (dense row-major, numel elements) = src (any strides). */
  fct_status (*pack)(fct_context* ctx, const DLTensor* src, char* dst);
  /* *count = number of NaN/Inf elements of t. scratch: 256 bytes of
   * workspace on t's device (unused on CPU). */
  fct_status (*count_nonfinite)(fct_context* ctx, const DLTensor* t, char* scratch,
                                int64_t* count);

  /* Primitives of the linear ops (low-rank, CP, Tucker, TT). Their
   * algorithms are written once, device independent, in ops/<op>_linear.c
   * as sequences of these calls. `device` is the tensors' device index
   * (ignored on CPU); matrices are fct_mat views in elements. */

  /* C_b = A_b·B_b + beta·C_b for b < batch, where X_b is X shifted by b·sX
   * elements (sX = 0: shared by every b). A, B: BLAS-readable
   * (fct_mat_blas_ok); C: row-major (cs == 1) and disjoint for distinct b.
   * beta is 0 or 1; k == 0 gives C_b = beta·C_b. */
  fct_status (*gemm)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                     const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                     int64_t sa, int64_t sb, int64_t sc);
  /* C = Σ_b A_b·B_b + beta·C over b < batch (a batch reduction). scratch:
   * fct_gemm_reduce_scratch() bytes of workspace (CUDA keeps partial sums
   * there; unused on CPU). */
  fct_status (*gemm_reduce)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                            const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                            int64_t sa, int64_t sb, char* scratch, size_t scratch_bytes);
  /* Every row of y [rows, cols] (cs == 1) = bias [cols] (element stride bs). */
  fct_status (*fill_rows)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* y,
                          const char* bias, int64_t bs);
  /* out [cols] (dense) = Σ_i g [i, :], accumulated in float64 on CPU and in
   * float32/float64 on CUDA; rows == 0 gives zeros. */
  fct_status (*column_sums)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* g,
                            char* out);
  /* C [rows, cols] (cs == 1) = 0. */
  fct_status (*zero)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C);
  /* Row-wise Kronecker (Khatri–Rao) product of nf factors F_k [n_k, cols]:
   *   out [∏ n_k, cols] (cs == 1), out[(a_0, .., a_{nf-1}), c] = ∏ F_k[a_k, c]
   * with a_0 the slowest index; nf == 0 gives one row of ones. The F_k may
   * have any strides; out must not overlap them. */
  fct_status (*khatri_rao)(fct_context* ctx, int device, fct_dtype dt, int nf,
                           const fct_mat* F, const fct_mat* out);
  /* Gradient of one factor of a Khatri–Rao product: with gK viewed as
   * [npre, nk, nsuf, cols] (rows (p, a, s) of a [npre·nk·nsuf, cols] view),
   *   gF [nk, cols] (cs == 1) = Σ_{p, s} gK[(p, a, s), :] ⊙ pre[p, :] ⊙ suf[s, :]
   * where pre [npre, cols] and suf [nsuf, cols] are the Khatri–Rao products of
   * the factors before and after this one. */
  fct_status (*khatri_rao_grad)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* gK,
                                int64_t npre, int64_t nk, int64_t nsuf, const fct_mat* pre,
                                const fct_mat* suf, const fct_mat* gF);

  /* Primitives of the factorized convolutions (the algorithm is
   * ops/conv_chain.c). Tensors are dense NCHW blocks of n items, each
   * [C, H, W] in and [C, OH, OW] out (geometry in fct_conv_geom). */

  /* col [n, C·kh·kw, OH·OW] = the patches of in [n, C, H, W]:
   *   col[b, (c, i, j), (oh, ow)] = in[b, c, oh·sh − pt + i·dh, ow·sw − pl + j·dw]
   * and 0 where that falls in the padding. */
  fct_status (*im2col)(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                       int64_t n, const char* in, char* col);
  /* The adjoint of im2col: in [n, C, H, W] = Σ of the col entries read from
   * each element (overwrites in; elements no patch reads become 0). */
  fct_status (*col2im)(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                       int64_t n, const char* col, char* in);
  /* Depthwise convolution, one filter w [C, kh, kw] per channel:
   *   out[b, c, oh, ow] = Σ_{i,j} w[c, i, j] · in[b, c, oh·sh − pt + i·dh, ow·sw − pl + j·dw]
   * out [n, C, OH, OW]; and its two adjoints: gin [n, C, H, W] (overwritten)
   * from gout, and gw [C, kh, kw] = beta·gw + Σ_b (beta 0 or 1). */
  fct_status (*depthwise_forward)(fct_context* ctx, int device, fct_dtype dt,
                                  const fct_conv_geom* g, int64_t n, const char* in,
                                  const char* w, char* out);
  fct_status (*depthwise_backward_input)(fct_context* ctx, int device, fct_dtype dt,
                                         const fct_conv_geom* g, int64_t n, const char* gout,
                                         const char* w, char* gin);
  fct_status (*depthwise_backward_weight)(fct_context* ctx, int device, fct_dtype dt,
                                          const fct_conv_geom* g, int64_t n, const char* in,
                                          const char* gout, char* gw, double beta);
  /* out [n, C, P] (dense) += bias[c] along every (b, p); bias has element
   * stride bs. */
  fct_status (*channel_bias)(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                             int64_t P, char* out, const char* bias, int64_t bs);
  /* sums [C] (dense) = Σ_{b, p} g[b, c, p] over g [n, C, P] (dense);
   * accumulated in float64 on CPU, float32/float64 on CUDA. */
  fct_status (*channel_sums)(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                             int64_t P, const char* g, char* sums);

  /* Host workers, for algorithms that split their own work (ops/conv_chain.c
   * gives each CPU thread its own images: one pool dispatch per call rather
   * than one per GEMM). workers(): how many (>= 1); parallel(): body over
   * [0, n) on them. NULL on CUDA: one worker, the device parallelises inside
   * each primitive. Primitives called from inside `parallel` run serially. */
  int (*workers)(void);
  void (*parallel)(int64_t n, int64_t grain, fct_parallel_body body, void* arg);

  /* Factorized embeddings: add their primitives below this line. */

  /* (ops/lowrank_embedding.c, ops/tt_embedding.c.) idx arrays are dense
   * int64 in the workspace, -1 marking an entry to skip (padding). */

  /* Reads `indices` (int64/int32, any shape and strides) at the row-major
   * positions [begin, begin + count). out (nullable) [count] = the values,
   * -1 where a value equals padding_idx (>= 0) or lies outside [0, num).
   * bad (nullable): *bad = how many lie outside [0, num), *bad_pos the
   * position of the first of them and *bad_value its value (host values;
   * on CUDA a stream sync). scratch: 256 bytes of workspace. */
  fct_status (*embedding_indices)(fct_context* ctx, const DLTensor* indices, int64_t begin,
                                  int64_t count, int64_t num, int64_t padding_idx, int64_t* out,
                                  char* scratch, int64_t* bad, int64_t* bad_pos,
                                  int64_t* bad_value);
  /* out [n, src.cols] (dense) row j = src row idx[j] (src: any strides), or
   * zeros where idx[j] < 0. */
  fct_status (*embedding_gather)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* src,
                                 const int64_t* idx, int64_t n, char* out);
  /* dst [P, num, Q] (dense) += the rows of src: for j < n with idx[j] >= 0
   * and a = (idx[j] / div) % num,
   *   dst[p, a, q] += src[j·ss + p·Q + q].
   * CPU: each destination sums in j order (deterministic); CUDA: atomicAdd. */
  fct_status (*embedding_scatter_add)(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                      const int64_t* idx, int64_t div, const char* src,
                                      int64_t ss, int64_t P, int64_t num, int64_t Q, char* dst);
  /* y [n, g.dim] (dense) row j = the TT row idx[j] (zeros where idx[j] < 0).
   * work: n·g.fwd_work accumulator elements (float, or double for float64). */
  fct_status (*tt_embedding_rows)(fct_context* ctx, int device, fct_dtype dt,
                                  const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                  char* y, char* work);
  /* For j < n with idx[j] >= 0: slices [n, g.slices] (dense) row j = the
   * gradients of the slices G_k[:, i_k] its row used (at g.slice_off[k], each
   * [r[k], m[k]·r[k+1]]) given gy [n, g.dim] (dense); rows with idx[j] < 0
   * are left as they are. work: n·g.bwd_work accumulator elements. */
  fct_status (*tt_embedding_grad)(fct_context* ctx, int device, fct_dtype dt,
                                  const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                  const char* gy, char* slices, char* work);

  /* LoRA linear (ops/lora_linear.c). */

  /* C = alpha·A·B + beta·C: one product (the adapter's, scaled by LoRA's
   * s), otherwise as gemm. */
  fct_status (*gemm_scaled)(fct_context* ctx, int device, fct_dtype dt, double alpha,
                            const fct_mat* A, const fct_mat* B, const fct_mat* C, double beta);
  /* Inverted dropout (ops/lora_dropout.h):
   *   out[i, j] = in[i, j] · scale  when fct_dropout_bits(seed, i·cols + j) >= threshold,
   *               0                  otherwise,
   * for in, out [rows, cols]; in may have any strides, out is row-major
   * (cs == 1) and may be in itself (in place, same view). */
  fct_status (*dropout)(fct_context* ctx, int device, fct_dtype dt, const fct_mat* in,
                        const fct_mat* out, uint64_t seed, uint64_t threshold, double scale);
} fct_backend;

/* Scratch bytes backend->gemm_reduce needs on a device of this kind for a
 * reduction of `batch` products of size [m, n] (0 on CPU). */
size_t fct_gemm_reduce_scratch(bool cuda, fct_dtype dt, int64_t m, int64_t n, int64_t batch);

extern const fct_backend fct_cpu_backend;

/* Called by libfactorch_cuda when it is loaded; the table must outlive the
 * process (static storage). */
FCT_API void fct_register_cuda_backend(const fct_backend* backend);

/* The backend for t's device, or a failure status with a message in ctx. */
fct_status fct_backend_for(fct_context* ctx, const char* name, const DLTensor* t,
                           const fct_backend** out);

#ifdef __cplusplus
}
#endif

#endif /* FCT_BACKEND_H */
