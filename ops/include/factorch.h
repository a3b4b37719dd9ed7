/*
 * factorch.h: the one public C header of factorch's kernels.
 *
 * Every op takes DLPack DLTensors (borrowed views: factorch never frees or keeps
 * them past the call) plus an fct_context carrying the CUDA stream, a workspace
 * supplied by the caller, flags and an error buffer. Kernels never allocate
 * device memory: ask the matching *_workspace function for the size first.
 *
 * Conventions
 *  - All functions return fct_status; FCT_OK is 0. They never abort, print or
 *    longjmp. On failure a message naming the bad argument and what was
 *    expected is written into ctx->error (when given).
 *  - Shapes are written [rows, cols] in row-major (C) terms. "..." means any
 *    number of leading batch dims, folded into M rows.
 *  - Every non-empty tensor's data + byte_offset must be aligned to its
 *    element size (else FCT_ERR_LAYOUT), and its elements and the span of its
 *    strides must fit 2^62 bytes (else FCT_ERR_OVERFLOW). Empty tensors may
 *    have NULL data and any sizes.
 *  - Input tensors may have arbitrary strides (negative, zero, gaps); they are
 *    packed into the workspace only where BLAS cannot read them as they are.
 *    Output tensors must be dense in their last dim, have foldable leading dims
 *    and must not overlap any other argument.
 *  - dtypes: float32 and float64 on CPU and CUDA; bfloat16 and float16 on CUDA
 *    (float32 accumulation). All tensors of one call share dtype and device.
 *  - Thread safety: every function is re-entrant; concurrent calls need
 *    distinct workspaces.
 *
 * Versioning: a major bump changes a struct layout or a signature; a minor bump
 * only adds functions, status codes or flags.
 */
#ifndef FACTORCH_H
#define FACTORCH_H

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h> /* DLPack 1.x, from an installed dependency */

#ifdef __cplusplus
extern "C" {
#endif

#define FCT_VERSION_MAJOR 0
#define FCT_VERSION_MINOR 1
#define FCT_VERSION_PATCH 0

#if defined(_WIN32)
#define FCT_API __declspec(dllexport)
#else
#define FCT_API __attribute__((visibility("default")))
#endif

/* Status codes. fct_status_string() gives the generic text of each. */
typedef enum fct_status {
  FCT_OK = 0,
  FCT_ERR_NULL_ARGUMENT = 1,   /* a required pointer was NULL */
  FCT_ERR_DTYPE = 2,           /* unsupported dtype, or dtypes differ */
  FCT_ERR_DEVICE = 3,          /* unsupported device, or devices differ */
  FCT_ERR_NDIM = 4,            /* wrong number of dims */
  FCT_ERR_SHAPE = 5,           /* sizes do not match */
  FCT_ERR_LAYOUT = 6,          /* output strides not dense, or overlapping */
  FCT_ERR_OVERFLOW = 7,        /* a size does not fit the index type */
  FCT_ERR_WORKSPACE = 8,       /* workspace missing or too small */
  FCT_ERR_NOT_FINITE = 9,      /* NaN or Inf met while FCT_FLAG_CHECK_FINITE */
  FCT_ERR_UNSUPPORTED = 10,    /* e.g. a CUDA tensor while CUDA is not loaded */
  FCT_ERR_CUDA = 11,           /* CUDA runtime error */
  FCT_ERR_BLAS = 12,           /* cuBLAS error */
  FCT_ERR_INVALID_VALUE = 13,  /* a scalar argument out of range */
  FCT_STATUS_COUNT_ = 14
} fct_status;

/* Returns a static string; never NULL, also for unknown codes. */
FCT_API const char* fct_status_string(int status);

/* Returns FCT_VERSION_MAJOR << 16 | FCT_VERSION_MINOR << 8 | PATCH of the
 * library actually loaded (compare with the header's). */
FCT_API uint32_t fct_version(void);

/* Flags for fct_context.flags. */
#define FCT_FLAG_CHECK_FINITE 1u /* fail with FCT_ERR_NOT_FINITE when NaN/Inf
                                    appear, naming the inputs that hold them.
                                    Scans only tensors that scale with the
                                    batch (outputs like y and grad_x, and
                                    grad_y), never the weights or their
                                    gradients. On CUDA: one stream sync. */

typedef struct fct_context {
  /* Borrowed cudaStream_t for CUDA tensors (NULL: the legacy default stream).
   * Ignored on CPU. */
  void* stream;
  /* Borrowed scratch memory on the tensors' device, of workspace_bytes bytes,
   * at least 256-byte aligned, valid until the call's work is done on
   * `stream`. May be NULL when the workspace query returned 0. */
  void* workspace;
  size_t workspace_bytes;
  uint32_t flags; /* FCT_FLAG_* */
  /* Borrowed caller buffer receiving a NUL-terminated message on failure, or
   * NULL. Left untouched on success. */
  char* error;
  size_t error_bytes;
} fct_context;

/* ------------------------------------------------------------------------- */
/* Low-rank linear: W ≈ U·V.                                                  */
/*   x [..., in], V [r, in], U [out, r], bias [out] or NULL                   */
/*   t [..., r]  = x · Vᵀ            (hidden activation, kept for backward)   */
/*   y [..., out] = t · Uᵀ + bias                                             */
/* M (the product of the leading dims) == 1 runs GEMV, not GEMM.              */
/* ------------------------------------------------------------------------- */

/* Workspace bytes that fct_lowrank_linear_forward needs for these arguments
 * (same pointers as the call; outputs are only inspected, never written). */
FCT_API fct_status fct_lowrank_linear_forward_workspace(
    const fct_context* ctx, const DLTensor* x, const DLTensor* U,
    const DLTensor* V, const DLTensor* bias /* nullable */,
    const DLTensor* y, const DLTensor* t /* nullable */, size_t* bytes);

/* y = x·Vᵀ·Uᵀ + bias. t (nullable) receives x·Vᵀ; when NULL it lives in the
 * workspace. All pointers borrowed. */
FCT_API fct_status fct_lowrank_linear_forward(
    fct_context* ctx, const DLTensor* x, const DLTensor* U, const DLTensor* V,
    const DLTensor* bias /* nullable */, DLTensor* y,
    DLTensor* t /* nullable */);

/* Workspace bytes for fct_lowrank_linear_backward with these arguments. */
FCT_API fct_status fct_lowrank_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
    const DLTensor* U, const DLTensor* V, const DLTensor* t /* nullable */,
    const DLTensor* grad_x, const DLTensor* grad_U, const DLTensor* grad_V,
    const DLTensor* grad_bias, size_t* bytes);

/* Gradients of y = x·Vᵀ·Uᵀ + b given grad_y [..., out]. Each of grad_x
 * [..., in], grad_U [out, r], grad_V [r, in], grad_bias [out] is computed
 * only when non-NULL, and overwritten (not accumulated). t = x·Vᵀ from the
 * forward (nullable: then recomputed in the workspace when needed). All
 * pointers borrowed. */
FCT_API fct_status fct_lowrank_linear_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
    const DLTensor* U, const DLTensor* V, const DLTensor* t /* nullable */,
    DLTensor* grad_x /* nullable */, DLTensor* grad_U /* nullable */,
    DLTensor* grad_V /* nullable */, DLTensor* grad_bias /* nullable */);

/* ========================================================================= */
/* Decompositions: truncated and randomized SVD, CP-ALS,                      */
/* Tucker-HOOI, TT-SVD.                                                       */
/*                                                                            */
/* Not autograd ops: each call reads one tensor and writes its factors.       */
/*  - dtypes: float32 and float64 (input and outputs share the dtype). The    */
/*    arithmetic is float64 throughout, except that randomized_svd reads its  */
/*    matrix in the matrix's own dtype (its only O(m·n) work) and            */
/*    orthogonalises in float64.                                             */
/*  - devices: cpu and cuda (cuSOLVER + cuBLAS; the calls synchronise       */
/*    ctx->stream to return errors and ranks on the host). On cuda, cp       */
/*    keeps its factor algebra on the host in memory it allocates (failing   */
/*    with FCT_ERR_WORKSPACE when it cannot); tensor_train allocates its     */
/*    singular values' host copy. FCT_ERR_UNSUPPORTED on cuda when           */
/*    libfactorch_cuda is not loaded.                                        */
/*  - The input may have any strides; it is read, never written. Outputs are */
/*    dense row-major (C-contiguous) and must not overlap the input or each  */
/*    other. Inputs holding NaN/Inf fail with FCT_ERR_NOT_FINITE (always     */
/*    checked, whatever ctx->flags says); impossible ranks fail with         */
/*    FCT_ERR_INVALID_VALUE naming the argument. Zero and rank-deficient     */
/*    inputs are fine (a zero input gives zero factors and error 0).         */
/*  - Deterministic: the same input, options, seed and device give the same  */
/*    bits (the counter-based RNG does not depend on threads).               */
/*  - Workspace: ask the *_workspace function with the same arguments; it    */
/*    includes LAPACK's (the *_work variants are used, so LAPACK does not    */
/*    allocate). Host pointers (errors, ranks, info, options, mode_sizes,    */
/*    max_ranks) are borrowed and never kept.                                */
/* ========================================================================= */

/* What a decomposition reports besides its factors. */
typedef struct fct_decomp_info {
  double rel_error;  /* ||X − X̂||_F / ||X||_F, 0 when X is zero. Iterative
                        methods and randomized_svd compute it from norms
                        (accurate to about 1e-8 absolute). */
  int32_t n_iter;    /* iterations run (CP, Tucker), else 0 */
  int32_t converged; /* 1 when tol stopped the iterations before n_iter_max */
} fct_decomp_info;

/* Truncated SVD A ≈ U·diag(S)·Vh (LAPACK gesdd / cuSOLVER gesvd, float64).
 *   A [m, n]; U [m, r]; Vh [r, n]; S [s] with r <= s <= min(m, n) receives
 *   the s largest singular values (s > r gives the tail, e.g. to choose a
 *   rank by energy). 1 <= r <= min(m, n). Signs: the largest-magnitude entry
 *   of each column of U is positive. Cost: O(m·n·min(m, n)) time, O(m·n)
 *   workspace. info (nullable) receives the exact relative error. */
FCT_API fct_status fct_svd_workspace(const fct_context* ctx, const DLTensor* A,
                                     const DLTensor* U, const DLTensor* S,
                                     const DLTensor* Vh, size_t* bytes);
FCT_API fct_status fct_svd(fct_context* ctx, const DLTensor* A, DLTensor* U,
                           DLTensor* S, DLTensor* Vh,
                           fct_decomp_info* info /* nullable */);

/* Randomized SVD (Halko, Martinsson, Tropp 2011): sketch k = min(r +
 * n_oversamples, min(m, n)) columns, n_iter power iterations (shifted by
 * half the smallest Ritz value squared, after dashSVD, which at the same
 * n_oversamples and n_iter halves the excess error of the plain iteration;
 * each re-orthonormalised), then the SVD of the k x n projection.
 * A [m, n] is read 2·n_iter + 2 times; workspace is O((m + n)·k) (plus
 * m·n when A's strides are neither row- nor column-major, to pack it).
 * Shapes as fct_svd with S [r]. */
typedef struct fct_rsvd_options {
  int64_t n_oversamples; /* >= 0 */
  int32_t n_iter;        /* >= 0 power iterations */
  int32_t reserved_;     /* 0 */
  uint64_t seed;
} fct_rsvd_options;

FCT_API fct_status fct_randomized_svd_workspace(const fct_context* ctx, const DLTensor* A,
                                                const DLTensor* U, const DLTensor* S,
                                                const DLTensor* Vh,
                                                const fct_rsvd_options* opts, size_t* bytes);
FCT_API fct_status fct_randomized_svd(fct_context* ctx, const DLTensor* A, DLTensor* U,
                                      DLTensor* S, DLTensor* Vh,
                                      const fct_rsvd_options* opts,
                                      fct_decomp_info* info /* nullable */);

/* Initialisations of CP and Tucker. */
#define FCT_INIT_SVD 0    /* leading left singular vectors of each unfolding
                             (CP: a mode smaller than the rank starts from one
                             least-squares update against the others) */
#define FCT_INIT_RANDOM 1 /* uniform [0, 1) entries from the seed */
#define FCT_INIT_GIVEN 2  /* the factors (and CP weights) passed in hold the
                             starting point; they are read, then overwritten */

/* CP-ALS: X [I_0, ..., I_{N-1}] (N >= 2) ≈ Σ_r weights[r] · A_0[:, r] ∘ ... ∘
 * A_{N-1}[:, r]. factors[n] is [I_n, R] (R >= 1 may exceed every I_n),
 * weights [R]. Each sweep solves the normal equations of every mode in turn,
 * (Hadamard product of the other factors' Gram matrices + l2_reg·I) by
 * Cholesky, falling back to a pseudo-inverse when singular. Stops when the
 * relative error changes by less than tol between sweeps (TensorLy's
 * "abs_rec_error") or after n_iter_max sweeps. normalize_factors: 1 gives
 * unit-norm factor columns with their scale in weights; 0 gives weights of
 * 1 and the scale spread evenly over the factors. Cost per sweep: about
 * 4·numel·R flops (two GEMMs of a dimension tree splitting the dims
 * into two groups of balanced size); workspace numel (none when X is dense
 * float64) + O(R·(size of the larger group) + Σ I_n·R + R²) doubles.
 * errors (nullable, n_iter_max doubles) receives the error after each sweep. */
typedef struct fct_cp_options {
  int32_t n_iter_max;        /* >= 0 */
  int32_t init;              /* FCT_INIT_* */
  double tol;                /* >= 0 */
  double l2_reg;             /* >= 0 */
  uint64_t seed;
  int32_t normalize_factors; /* 0 or 1 */
  int32_t reserved_;         /* 0 */
} fct_cp_options;

FCT_API fct_status fct_cp_als_workspace(const fct_context* ctx, const DLTensor* X,
                                        int n_factors, const DLTensor* const* factors,
                                        const DLTensor* weights, const fct_cp_options* opts,
                                        size_t* bytes);
FCT_API fct_status fct_cp_als(fct_context* ctx, const DLTensor* X, int n_factors,
                              DLTensor* const* factors, DLTensor* weights,
                              const fct_cp_options* opts, double* errors /* nullable */,
                              fct_decomp_info* info /* nullable */);

/* Tucker by HOOI: X ≈ core ×_0 U_0 ×_1 U_1 ... with orthonormal U_n
 * [I_n, R_n] (1 <= R_n <= I_n) and core [R_0, ..., R_{N-1}]. Starts from the
 * HOSVD (FCT_INIT_SVD), orthonormalised random factors, or given factors;
 * each sweep replaces U_n by the leading left singular vectors of
 * X ×_{m≠n} U_mᵀ. Stops as CP does. Cost per sweep: about
 * 2·N·numel·min_n R_n flops plus one symmetric eigensolver per mode;
 * workspace O(numel). */
typedef struct fct_tucker_options {
  int32_t n_iter_max; /* >= 0 */
  int32_t init;       /* FCT_INIT_* */
  double tol;         /* >= 0 */
  uint64_t seed;
} fct_tucker_options;

FCT_API fct_status fct_tucker_hooi_workspace(const fct_context* ctx, const DLTensor* X,
                                             const DLTensor* core, int n_factors,
                                             const DLTensor* const* factors,
                                             const fct_tucker_options* opts, size_t* bytes);
FCT_API fct_status fct_tucker_hooi(fct_context* ctx, const DLTensor* X, DLTensor* core,
                                   int n_factors, DLTensor* const* factors,
                                   const fct_tucker_options* opts,
                                   double* errors /* nullable */,
                                   fct_decomp_info* info /* nullable */);

/* TT-SVD (Oseledets 2011). X is read in its logical row-major order as a
 * tensor of n_modes modes of sizes mode_sizes (NULL: X's own dims; their
 * product must equal X's numel, e.g. pairs of dims merged for a TT-matrix).
 * Rank k (between cores k-1 and k, k = 0..n_modes, ranks[0] = ranks[N] = 1)
 * is the smallest whose discarded singular values have a norm <= eps·||X||
 * / sqrt(N - 1) (eps = 0: only numerically zero ones are dropped), capped
 * by max_ranks[k] (NULL: no cap; entries >= 1; the ends must be 1).
 * Core k, [ranks[k], mode_sizes[k], ranks[k+1]] row-major, is written into
 * `cores` (1-D, the elements fct_tensor_train_capacity returns) right after
 * core k-1. ranks (n_modes + 1 int64) receives the ranks. Cost: one SVD per
 * mode, the first of a [n_0, numel / n_0] matrix; workspace O(numel). */
FCT_API fct_status fct_tensor_train_capacity(const fct_context* ctx, const DLTensor* X,
                                             int n_modes, const int64_t* mode_sizes,
                                             const int64_t* max_ranks, int64_t* elements);
FCT_API fct_status fct_tensor_train_workspace(const fct_context* ctx, const DLTensor* X,
                                              int n_modes, const int64_t* mode_sizes,
                                              const int64_t* max_ranks, double eps,
                                              const DLTensor* cores, size_t* bytes);
FCT_API fct_status fct_tensor_train(fct_context* ctx, const DLTensor* X, int n_modes,
                                    const int64_t* mode_sizes, const int64_t* max_ranks,
                                    double eps, DLTensor* cores, int64_t* ranks,
                                    fct_decomp_info* info /* nullable */);

/* ========================================================================= */
/* Tensorized linear layers: CP, Tucker and Tensor-Train.                     */
/*                                                                            */
/* The weight W [out, in] is a tensor network over in = ∏ i_k and            */
/* out = ∏ o_k, multi-indices row-major (i_1 slowest, as x.reshape(...,      */
/* i_1, .., i_d) numbers them). y = x·Wᵀ + bias and its gradients are         */
/* computed from the factors directly, never forming W: one call per layer   */
/* and direction, intermediates in the workspace. Each call chooses its      */
/* contraction order and chunking from the shapes and the batch size M by a  */
/* cost model (FLOPs + memory traffic + per-call overheads); the             */
/* fct_*_linear_plan functions report the choice without computing.         */
/*  - dtypes and devices as the low-rank op: float32/float64 on CPU and CUDA, */
/*    bfloat16/float16 on CUDA (float32 accumulation inside the GEMMs; the    */
/*    intermediates are stored in the tensors' dtype).                       */
/*  - Inputs (x, grad_y, factors, cores) may have any strides; they are       */
/*    packed into the workspace where needed. Outputs (y, z, gradients) must  */
/*    be C-contiguous (dense row-major) and must not overlap any other       */
/*    argument. Gradients are overwritten, never accumulated; each output,   */
/*    and each entry of an array of gradient outputs, may be NULL (not       */
/*    computed; an array pointer may be NULL too).                           */
/*  - Every mode size and rank must be >= 1; at most FCT_MAX_MODES modes per */
/*    side (CP, Tucker) or cores (TT). M = 0 is fine (gradients of the       */
/*    factors are then zero).                                               */
/*  - FCT_FLAG_CHECK_FINITE checks y (forward), grad_y and grad_x (backward) */
/*    as the low-rank op does.                                               */
/*  - Pointers are borrowed: arrays of tensors and of sizes are read during  */
/*    the call only.                                                         */
/* ========================================================================= */

#define FCT_MAX_MODES 8

/* For fct_context.flags: the tensorized linear ops process the batch (Tucker,
 * TT) or the rank (CP) in chunks of at most 3 rows or columns, whatever the
 * cost model prefers: the smallest workspace and many chunks (the
 * convolution chain forming W: chunks of 3 one-hot images). Slow; meant
 * for tests of the chunked paths. */
#define FCT_FLAG_SMALL_CHUNKS 2u

/* For fct_context.flags: force one strategy of the tensorized linear ops
 * (CP, Tucker, TT) and of the convolution chain (fct_conv_chain_*, below)
 * instead of the cost model's choice, so that tests reach both. CONTRACT: the contraction chain of x with the factors. FORM_W: form
 * W (in row blocks bounded like the chain's chunks) from the factors, then
 * dense GEMMs: y = x·Wᵀ forward; grad_x = grad_y·W and grad_W = grad_yᵀ·x
 * projected on the factors backward. FORM_W wins when both are set.
 * Tucker and TT form W in blocks of rows of the first output mode. CP has
 * the chain only: its forward also produces
 * z = x·KR(A) for the backward, after which y = z·KR(B)ᵀ costs less than
 * forming W, and its backward through W costs 6·in·out·R + 4·M·in·out
 * FLOPs against the chain's 4·M·R·(in + out) (at 4096 x 4096, M = 2048:
 * 1.6x the chain's at 10x compression, 1.9x at 50x). */
#define FCT_FLAG_FORCE_CONTRACT 4u
#define FCT_FLAG_FORCE_FORM_W 8u

/* What a tensorized linear op would do for a batch (fct_*_linear_plan). */
typedef struct fct_linear_plan_info {
  double forward_flops;      /* 2 × multiply-adds of the forward for the batch */
  double backward_flops;     /* of the backward computing every gradient */
  size_t forward_workspace;  /* bytes, for C-contiguous x and grad_y */
  size_t backward_workspace;
  char plan[256];            /* the contraction order chosen, in words */
  /* The strategy chosen per direction: "contract" (the chain of x with the
   * factors) or "form_w" (W formed in row blocks, then dense GEMMs). */
  char forward_strategy[16];
  char backward_strategy[16];
} fct_linear_plan_info;

/* CP: W[(o_1..o_q), (i_1..i_p)] = Σ_r ∏_k A_k[i_k, r] · ∏_k B_k[o_k, r].    */
/*   x [..., in], in_factors A_k [i_k, R] (k < n_in), out_factors B_k      */
/*   [o_k, R] (k < n_out), bias [out] or NULL.                              */
/*   z [..., R] = x · KR(A)   (KR: the Khatri–Rao product, [in, R])          */
/*   y [..., out] = z · KR(B)ᵀ + bias                                        */
/* The Khatri–Rao products are built in chunks of columns in the workspace   */
/* (chunk size from the cost model); z (nullable) is what the backward needs */
/* to skip recomputing x · KR(A).                                           */
FCT_API fct_status fct_cp_linear_forward_workspace(
    const fct_context* ctx, const DLTensor* x, int n_in, const DLTensor* const* in_factors,
    int n_out, const DLTensor* const* out_factors, const DLTensor* bias /* nullable */,
    const DLTensor* y, const DLTensor* z /* nullable */, size_t* bytes);
FCT_API fct_status fct_cp_linear_forward(
    fct_context* ctx, const DLTensor* x, int n_in, const DLTensor* const* in_factors,
    int n_out, const DLTensor* const* out_factors, const DLTensor* bias /* nullable */,
    DLTensor* y, DLTensor* z /* nullable */);
/* Gradients given grad_y [..., out]; z from the forward (nullable: then
 * recomputed chunk by chunk when grad_out_factors are asked for). */
FCT_API fct_status fct_cp_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, int n_in,
    const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* z, const DLTensor* grad_x, const DLTensor* const* grad_in_factors,
    const DLTensor* const* grad_out_factors, const DLTensor* grad_bias, size_t* bytes);
FCT_API fct_status fct_cp_linear_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, int n_in,
    const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* z /* nullable */, DLTensor* grad_x /* nullable */,
    DLTensor* const* grad_in_factors /* nullable */,
    DLTensor* const* grad_out_factors /* nullable */, DLTensor* grad_bias /* nullable */);
FCT_API fct_status fct_cp_linear_plan(int n_in, const int64_t* in_modes, int n_out,
                                      const int64_t* out_modes, int64_t rank, int64_t batch,
                                      DLDevice device, DLDataType dtype,
                                      fct_linear_plan_info* info);

/* Tucker: W[(o), (i)] = Σ_{s, t} core[s, t] ∏_k U_k[o_k, s_k] ∏_k V_k[i_k, t_k] */
/*   core [S, T]: the core tensor [s_1..s_q, t_1..t_p] as a matrix           */
/*   (S = ∏ s_k, T = ∏ t_k); in_factors V_k [i_k, t_k]; out_factors U_k      */
/*   [o_k, s_k]; x, y, bias as for CP.                                       */
/* Order: project x on every input factor (last mode first), multiply by    */
/* the core, expand on every output factor (first mode first): each step is */
/* one GEMM over all rows of a chunk, with no transposes; the cost model    */
/* sizes the chunks.                                                        */
/* Kept states: the forward can write, into `states`, x projected on every */
/* input factor (t [M, T]) and t times the core (z [M, S]), which the       */
/* backward then reads instead of recomputing them: z is the core's GEMM,   */
/* most of the FLOPs. The factor steps' intermediates are always            */
/* recomputed (memory-bound, larger than x). Budget: states are kept only   */
/* when T + S <= in + out (no more than x's and y's rows together);         */
/* fct_tucker_linear_states gives *per_row = T + S then, else 0, and the    */
/* ops reject a states tensor where it is 0. states: [M·per_row], x's dtype */
/* and device, C-contiguous, laid out by chunks of rows in an order of the  */
/* op's own (a function of the shapes, the dtype and the device only): the  */
/* backward must get what the forward wrote for the same x and factors.     */
/* They are used only where the cost model prices the two passes with     */
/* them below its cheapest plans without (which may form W), a choice made */
/* alike in both passes from the shapes, the batch, the dtype and the      */
/* device (not the flags); elsewhere the forward writes zeros there and    */
/* the backward does not read them. When used, both passes contract        */
/* (FCT_FLAG_FORCE_* are ignored) in chunks that FCT_FLAG_SMALL_CHUNKS     */
/* does not change. Without (NULL) the backward recomputes everything.     */
FCT_API fct_status fct_tucker_linear_states(int n_in, const int64_t* in_modes,
                                            const int64_t* in_ranks, int n_out,
                                            const int64_t* out_modes,
                                            const int64_t* out_ranks, int64_t* per_row);
FCT_API fct_status fct_tucker_linear_forward_workspace(
    const fct_context* ctx, const DLTensor* x, const DLTensor* core, int n_in,
    const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* bias /* nullable */, const DLTensor* y, const DLTensor* states /* nullable */,
    size_t* bytes);
FCT_API fct_status fct_tucker_linear_forward(
    fct_context* ctx, const DLTensor* x, const DLTensor* core, int n_in,
    const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* bias /* nullable */, DLTensor* y, DLTensor* states /* nullable */);
FCT_API fct_status fct_tucker_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, const DLTensor* core,
    int n_in, const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* states, const DLTensor* grad_x, const DLTensor* grad_core,
    const DLTensor* const* grad_in_factors, const DLTensor* const* grad_out_factors,
    const DLTensor* grad_bias, size_t* bytes);
FCT_API fct_status fct_tucker_linear_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, const DLTensor* core,
    int n_in, const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* states /* nullable */, DLTensor* grad_x /* nullable */,
    DLTensor* grad_core /* nullable */,
    DLTensor* const* grad_in_factors /* nullable */,
    DLTensor* const* grad_out_factors /* nullable */, DLTensor* grad_bias /* nullable */);
FCT_API fct_status fct_tucker_linear_plan(int n_in, const int64_t* in_modes,
                                          const int64_t* in_ranks, int n_out,
                                          const int64_t* out_modes, const int64_t* out_ranks,
                                          int64_t batch, DLDevice device, DLDataType dtype,
                                          fct_linear_plan_info* info);

/* Tensor-Train matrix: W[(o), (i)] = G_1[:, i_1, o_1, :] ··· G_d[:, i_d, o_d, :] */
/*   cores G_k [r_(k-1), i_k, o_k, r_k] (k < d, r_0 = r_d = 1); x, y, bias as */
/*   for CP.                                                                 */
/* Order: the cores are cut into groups of consecutive cores, each group     */
/* merged into one core in the workspace (a cost independent of M), and x    */
/* is swept through the groups right to left or left to right; the cost     */
/* model picks the grouping, the direction and the rows per chunk (a group   */
/* of all d >= 2 cores, which would be W, is never chosen). The backward    */
/* recomputes the sweep's intermediates chunk by chunk.                     */
FCT_API fct_status fct_tt_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                                   int d, const DLTensor* const* cores,
                                                   const DLTensor* bias /* nullable */,
                                                   const DLTensor* y, size_t* bytes);
FCT_API fct_status fct_tt_linear_forward(fct_context* ctx, const DLTensor* x, int d,
                                         const DLTensor* const* cores,
                                         const DLTensor* bias /* nullable */, DLTensor* y);
FCT_API fct_status fct_tt_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, int d,
    const DLTensor* const* cores, const DLTensor* grad_x, const DLTensor* const* grad_cores,
    const DLTensor* grad_bias, size_t* bytes);
FCT_API fct_status fct_tt_linear_backward(fct_context* ctx, const DLTensor* grad_y,
                                          const DLTensor* x, int d,
                                          const DLTensor* const* cores,
                                          DLTensor* grad_x /* nullable */,
                                          DLTensor* const* grad_cores /* nullable */,
                                          DLTensor* grad_bias /* nullable */);
/* ranks: d + 1 values with ranks[0] = ranks[d] = 1. */
FCT_API fct_status fct_tt_linear_plan(int d, const int64_t* in_modes, const int64_t* out_modes,
                                      const int64_t* ranks, int64_t batch, DLDevice device,
                                      DLDataType dtype, fct_linear_plan_info* info);

/* ------------------------------------------------------------------------- */
/* Factorized convolutions: a chain of convolution stages (ops/conv_chain.c)  */
/* ------------------------------------------------------------------------- */

/* Every factorized convolution is a chain of small convolutions applied one
 * after the other to each image, in one op call, forward and backward:
 *   CP:      1x1 C_in->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->C_out
 *   Tucker2: 1x1 C_in->R1, kh x kw R1->R2, 1x1 R2->C_out
 *   lowrank: kh x kw C_in->R, 1x1 R->C_out
 *   TT:      the spatial core on every input channel, then one 1x1 stage per
 *            TT core over the channel modes (factorch/nn/conv.py builds it).
 * A stage sees each image's memory as `batch` items [in_channels, in_h,
 * in_w] (its input being the previous stage's output, reinterpreted: only
 * the element counts must agree) and maps each item to [out_channels, OH,
 * OW] with one weight [out_channels, in_channels / groups, kh, kw] shared by
 * the items, where OH = (in_h + pad_top + pad_bottom − dil_h·(kh − 1) − 1) /
 * stride_h + 1 (likewise OW) must be >= 1. Every size is >= 1 (padding >= 0),
 * groups divide both channel counts. */
typedef struct fct_conv_stage {
  int64_t batch, in_channels, in_h, in_w, out_channels;
  int64_t kh, kw, stride_h, stride_w;
  int64_t pad_top, pad_left, pad_bottom, pad_right;
  int64_t dil_h, dil_w, groups;
} fct_conv_stage;

#define FCT_MAX_STAGES 16

/* Elements per image of stage s's output, and of everything the forward
 * keeps for the backward: the outputs of every stage but the last, except
 * the depthwise stages inside the chain (groups > 1 = in_channels =
 * out_channels, e.g. CP's filters), which the backward recomputes from
 * their inputs. 0 with a message in ctx (nullable) when a stage is
 * invalid. */
FCT_API int64_t fct_conv_stage_out_numel(const fct_conv_stage* stage);
FCT_API fct_status fct_conv_chain_check(fct_context* ctx /* nullable */, int n_stages,
                                        const fct_conv_stage* stages /* [n_stages], borrowed */,
                                        int64_t* saved_per_image /* out, nullable */);

/* x [N, ...] (any strides; the elements of one image count
 * stages[0].batch·in_channels·in_h·in_w), weights[s] the stages' weights
 * (borrowed, any strides), bias [C_y] or NULL, added along y's dim 1.
 * y [N, C_y, ...] C-contiguous, holding the last stage's output per image.
 * saved: NULL, or a C-contiguous tensor of N·saved_per_image elements
 * (fct_conv_chain_check) that receives the intermediate activations the
 * backward reads, stage by stage (N images of a stage, then the next kept
 * stage); without it they live in the workspace. */
FCT_API fct_status fct_conv_chain_forward_workspace(
    const fct_context* ctx, const DLTensor* x, int n_stages, const fct_conv_stage* stages,
    const DLTensor* const* weights, const DLTensor* bias /* nullable */, const DLTensor* y,
    const DLTensor* saved /* nullable */, size_t* bytes);
FCT_API fct_status fct_conv_chain_forward(fct_context* ctx, const DLTensor* x, int n_stages,
                                          const fct_conv_stage* stages,
                                          const DLTensor* const* weights,
                                          const DLTensor* bias /* nullable */, DLTensor* y,
                                          DLTensor* saved /* nullable */);
/* Gradients of the forward's x, weights and bias from grad_y (any strides).
 * saved: what the forward wrote (required when n_stages > 1). grad_x,
 * grad_weights[s] (shaped as the weights) and grad_bias are C-contiguous
 * outputs (caller-owned); NULL (or a NULL grad_weights array) skips them. */
FCT_API fct_status fct_conv_chain_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, int n_stages,
    const fct_conv_stage* stages, const DLTensor* const* weights,
    const DLTensor* saved /* nullable when n_stages == 1 */, const DLTensor* grad_x,
    const DLTensor* const* grad_weights, const DLTensor* grad_bias, size_t* bytes);
FCT_API fct_status fct_conv_chain_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, int n_stages,
    const fct_conv_stage* stages, const DLTensor* const* weights,
    const DLTensor* saved /* nullable when n_stages == 1 */, DLTensor* grad_x /* nullable */,
    DLTensor* const* grad_weights /* nullable, entries too */, DLTensor* grad_bias /* nullable */);

/* Two strategies, chosen per call on the CPU from the batch size and the
 * shapes (the chain's cost constants), or forced by FCT_FLAG_FORCE_CONTRACT
 * / FCT_FLAG_FORCE_FORM_W (FORM_W wins when both are set):
 *  - "contract": the chain of stages above.
 *  - "form_w": form the dense kernel W [C_out, C_in / groups', KH, KW] of the
 *    whole chain (its response to the C_in·KH·KW one-hot images, in chunks),
 *    then one dense convolution of x; backward: grad_x and grad_W through
 *    the dense convolution, grad_W projected on the stages' weights (the
 *    chain's backward on the same one-hot images).
 * Only chains that compose exactly into one convolution can form W: every
 * stage has batch 1 and reads exactly the previous stage's [C, OH, OW], and
 * along each axis at most one stage has a kernel, stride or padding other
 * than 1, 1, 0 (channel mixers around one spatial stage: Tucker-2,
 * low-rank; CP's kh x 1 and 1 x kw filters); the composed convolution takes
 * each axis's geometry from that stage, and groups' = the gcd of the
 * stages' groups. Others (TT) run the chain, also under FORCE_FORM_W; so
 * does CUDA. A training forward (saved given) makes the backward's choice,
 * since a backward that runs the chain reads the activations the forward
 * saved: the flags must be the same for both calls. The workspace stays
 * bounded: W and its gradient, one chunk of one-hot images (chunk budget),
 * the chain's per-chunk buffers. */

/* What the convolution chain would do for `batch` images (C-contiguous
 * tensors): forward_strategy for an inference forward (a training forward
 * follows backward_strategy), FLOPs, workspace bytes and in `plan` whether
 * the chain composes and both strategies' prices. flags: FCT_FLAG_* as the
 * op would see them (the FORCE flags). */
FCT_API fct_status fct_conv_chain_plan(int n_stages, const fct_conv_stage* stages, int64_t batch,
                                       DLDevice device, DLDataType dtype, uint32_t flags,
                                       fct_linear_plan_info* info);

/* ========================================================================= */
/* Factorized embeddings: low-rank and Tensor-Train (TT-Rec).                 */
/*                                                                            */
/* A table T [num, dim] kept factorized: y = T[indices] and the gradients of */
/* the factors given grad_y, computed from the looked-up rows only (T is     */
/* never formed). Entry points: ops/lowrank_embedding.c, ops/tt_embedding.c. */
/*  - indices: int64 or int32, any shape (0 to 7 dims) and strides, on the   */
/*    factors' device; y [*indices.shape, dim]. Every index must lie in      */
/*    [0, num): otherwise FCT_ERR_INVALID_VALUE naming `indices` (how many,  */
/*    the first one's position and value). On CUDA this check costs one      */
/*    stream sync per call.                                                  */
/*  - padding_idx: -1 (none) or an index in [0, num) whose lookups give a    */
/*    zero row and pass no gradient (nn.Embedding's padding row, which is    */
/*    zero and never updated). Other values: FCT_ERR_INVALID_VALUE.          */
/*  - dtypes and devices as the linear ops: float32/float64 on CPU and CUDA, */
/*    bfloat16/float16 on CUDA. Factors and grad_y may have any strides      */
/*    (packed into the workspace where a kernel needs them dense); outputs   */
/*    (y, gradients) must be C-contiguous and must not overlap any other     */
/*    argument.                                                              */
/*  - Gradients are overwritten, never accumulated: zero except in the rows  */
/*    (lowrank) or core slices (TT) that the indices touch, so the cost is   */
/*    proportional to the batch plus one zero-fill. CPU: deterministic (each */
/*    row's contributions are summed in index order, whatever the threads).  */
/*    CUDA: atomicAdd, so the order of the additions, and the last bits of a */
/*    row looked up more than once, vary from run to run; 16-bit dtypes add  */
/*    in their own precision.                                                */
/*  - Empty index tensors are fine (y is empty, gradients are zero).         */
/*  - FCT_FLAG_CHECK_FINITE scans y (forward) and grad_y (backward).         */
/*    FCT_FLAG_SMALL_CHUNKS: chunks of at most 3 indices (tests).            */
/*  - Pointers are borrowed; arrays of cores are read during the call only.  */
/* ========================================================================= */

/* Low-rank: T = U·V, U [num, R], V [R, dim].                                 */
/*   forward:  y[n] = U[indices[n]] · V   (gather rows of U, one GEMM a chunk) */
/*   backward: grad_V [R, dim] = Σ_n U[indices[n]]ᵀ · grad_y[n]   (GEMMs)     */
/*             grad_U [num, R] = 0, then row indices[n] += grad_y[n] · Vᵀ     */
/*             (a GEMM per chunk, then a scatter-add of its rows)            */
FCT_API fct_status fct_lowrank_embedding_forward_workspace(
    const fct_context* ctx, const DLTensor* indices, const DLTensor* U, const DLTensor* V,
    int64_t padding_idx, const DLTensor* y, size_t* bytes);
FCT_API fct_status fct_lowrank_embedding_forward(fct_context* ctx, const DLTensor* indices,
                                                 const DLTensor* U, const DLTensor* V,
                                                 int64_t padding_idx, DLTensor* y);
FCT_API fct_status fct_lowrank_embedding_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* indices, const DLTensor* U,
    const DLTensor* V, int64_t padding_idx, const DLTensor* grad_U, const DLTensor* grad_V,
    size_t* bytes);
FCT_API fct_status fct_lowrank_embedding_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* indices, const DLTensor* U,
    const DLTensor* V, int64_t padding_idx, DLTensor* grad_U /* nullable */,
    DLTensor* grad_V /* nullable */);

/* Tensor-Train (TT-Rec): num <= ∏ n_k (the vocabulary padded up), dim =     */
/* ∏ m_k, cores G_k [r_(k-1), n_k, m_k, r_k] (k = 1..d, r_0 = r_d = 1).      */
/* Row i, with digits (i_1..i_d) in the mixed radix (n_1..n_d), i_1 slowest: */
/*   T[i] = G_1[:, i_1, :, :] ··· G_d[:, i_d, :, :]  reshaped to [dim]       */
/* (m_1 slowest): the rows of fct_tt_linear's W transposed, with input modes */
/* n_k and output modes m_k. Per index a chain of d − 1 small products, left */
/* to right: 2·Σ_(k>=2) (m_1···m_(k-1))·r_(k-1)·m_k·r_k FLOPs. The backward   */
/* keeps the chain's states and runs it back, giving per index the gradient  */
/* of every slice G_k[:, i_k, :, :], scatter-added into grad_cores.          */
FCT_API fct_status fct_tt_embedding_forward_workspace(
    const fct_context* ctx, const DLTensor* indices, int d, const DLTensor* const* cores,
    int64_t num_embeddings, int64_t padding_idx, const DLTensor* y, size_t* bytes);
FCT_API fct_status fct_tt_embedding_forward(fct_context* ctx, const DLTensor* indices, int d,
                                            const DLTensor* const* cores,
                                            int64_t num_embeddings, int64_t padding_idx,
                                            DLTensor* y);
FCT_API fct_status fct_tt_embedding_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* indices, int d,
    const DLTensor* const* cores, int64_t num_embeddings, int64_t padding_idx,
    const DLTensor* const* grad_cores, size_t* bytes);
FCT_API fct_status fct_tt_embedding_backward(
    fct_context* ctx, const DLTensor* grad_y, const DLTensor* indices, int d,
    const DLTensor* const* cores, int64_t num_embeddings, int64_t padding_idx,
    DLTensor* const* grad_cores /* nullable, entries too */);

/* ========================================================================= */
/* LoRA linear: a base layer plus a low-rank adapter, in one call.            */
/*                                                                            */
/*   y [..., out] = base + scale · t · Bᵀ,   t [..., r] = drop(x) · Aᵀ        */
/*   x [..., in], A [r, in], B [out, r]                                       */
/* where base is one of (fct_lora_base.kind)                                 */
/*   FCT_LORA_DENSE:   x · Wᵀ + bias,          W [out, in]                    */
/*   FCT_LORA_LOWRANK: (x · Vᵀ) · Uᵀ + bias,   U [out, rb], V [rb, in]        */
/*   FCT_LORA_GIVEN:   base_out [..., out], computed by any other layer       */
/*                     (CP, Tucker, TT, ...); copied into y first.           */
/* The adapter's product is accumulated into y by its GEMM (beta = 1): no    */
/* separate add pass and no output-sized temporary.                          */
/*                                                                            */
/* Dropout (p = fct_lora_options.dropout in [0, 1)) applies to the adapter's */
/* input only (the base sees x): drop(x) = x ⊙ m / (1 − p) with              */
/*   m[i] = 1 when fct_lora_dropout_bits(seed, i) >= p · 2^64, else 0,       */
/* i = row · in + col the element's index in x folded to [M, in] (row-major  */
/* over the leading dims). The bits are a counter-based hash (splitmix64's   */
/* output at position i + 1 of the stream seeded with `seed`), the same on   */
/* CPU and CUDA and for any thread count, so the backward regenerates the    */
/* mask from the seed: no mask is stored. While p > 0 the forward, and a     */
/* backward asked for grad_A or without t, hold drop(x) [M, in] in the       */
/* workspace for the duration of the call.                                   */
/*                                                                            */
/*  - dtypes and devices as the linear ops: float32/float64 on CPU and CUDA, */
/*    bfloat16/float16 on CUDA (float32 accumulation). All tensors share     */
/*    x's dtype and device.                                                  */
/*  - Inputs may have any strides (packed into the workspace where BLAS      */
/*    cannot read them). y, t and the gradients must be C-contiguous and     */
/*    must not overlap any other argument.                                  */
/*  - M = 0 is fine (weight gradients are then zero); r, rb >= 1.            */
/*  - FCT_FLAG_CHECK_FINITE scans y (forward), grad_x or grad_y (backward).  */
/*  - Pointers (the structs and every tensor in them) are borrowed for the   */
/*    call only.                                                             */
/* ========================================================================= */

typedef enum fct_lora_base_kind {
  FCT_LORA_DENSE = 0,
  FCT_LORA_LOWRANK = 1,
  FCT_LORA_GIVEN = 2
} fct_lora_base_kind;

/* The base layer. Only the tensors of `kind` are read; the others must be
 * NULL. All borrowed. */
typedef struct fct_lora_base {
  int32_t kind;             /* fct_lora_base_kind */
  int32_t reserved_;        /* 0 */
  const DLTensor* W;        /* DENSE: [out, in] */
  const DLTensor* U;        /* LOWRANK: [out, rb] */
  const DLTensor* V;        /* LOWRANK: [rb, in] */
  const DLTensor* bias;     /* DENSE, LOWRANK: [out] or NULL */
  const DLTensor* base_out; /* GIVEN, forward only: [..., out] (x's leading dims) */
} fct_lora_base;

typedef struct fct_lora_options {
  double scale;   /* s, finite (LoRA's alpha / r) */
  double dropout; /* p in [0, 1); 0: no dropout */
  uint64_t seed;  /* the dropout mask's seed (ignored when p == 0) */
} fct_lora_options;

/* Gradients to compute: each nullable (not computed), overwritten (never
 * accumulated), caller-owned, shaped as its input: x [..., in], A [r, in],
 * B [out, r], W [out, in], U [out, rb], V [rb, in], bias [out]. Gradients of
 * W, U, V and bias are computed only when given (a frozen base costs no
 * weight-sized work or memory); base_out's gradient is grad_y itself. */
typedef struct fct_lora_grads {
  DLTensor* x;
  DLTensor* A;
  DLTensor* B;
  DLTensor* W;
  DLTensor* U;
  DLTensor* V;
  DLTensor* bias;
} fct_lora_grads;

/* The dropout hash: 64 random bits for element i under `seed`. */
FCT_API uint64_t fct_lora_dropout_bits(uint64_t seed, uint64_t i);

/* Workspace bytes of fct_lora_linear_forward with these arguments (outputs
 * only inspected). */
FCT_API fct_status fct_lora_linear_forward_workspace(
    const fct_context* ctx, const DLTensor* x, const DLTensor* A, const DLTensor* B,
    const fct_lora_base* base, const fct_lora_options* opts, const DLTensor* y,
    const DLTensor* t /* nullable */, size_t* bytes);

/* y = base + s · drop(x)·Aᵀ·Bᵀ. t (nullable) receives drop(x)·Aᵀ, which the
 * backward reads; when NULL it lives in the workspace. */
FCT_API fct_status fct_lora_linear_forward(fct_context* ctx, const DLTensor* x,
                                           const DLTensor* A, const DLTensor* B,
                                           const fct_lora_base* base,
                                           const fct_lora_options* opts, DLTensor* y,
                                           DLTensor* t /* nullable */);

/* Workspace bytes of fct_lora_linear_backward with these arguments. */
FCT_API fct_status fct_lora_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, const DLTensor* A,
    const DLTensor* B, const fct_lora_base* base, const fct_lora_options* opts,
    const DLTensor* t /* nullable */, const fct_lora_grads* grads, size_t* bytes);

/* Gradients of the forward with the same base and options (base_out is not
 * read), given grad_y [..., out] (any strides). t: the forward's (nullable:
 * recomputed when grad_B needs it).
 *   grad_B = s · grad_yᵀ · t          grad_t = s · grad_y · B
 *   grad_A = grad_tᵀ · drop(x)        grad_x = base's + drop'(grad_t · A)
 *   grad_W = grad_yᵀ · x              grad_bias = Σ_rows grad_y
 *   grad_U = grad_yᵀ · (x·Vᵀ)         grad_V = (grad_y · U)ᵀ · x
 * where drop' applies the forward's mask and 1/(1 − p) in place on grad_x
 * before the base's part is accumulated into it (beta = 1). */
FCT_API fct_status fct_lora_linear_backward(fct_context* ctx, const DLTensor* grad_y,
                                            const DLTensor* x, const DLTensor* A,
                                            const DLTensor* B, const fct_lora_base* base,
                                            const fct_lora_options* opts,
                                            const DLTensor* t /* nullable */,
                                            const fct_lora_grads* grads);

/* ------------------------------------------------------------------------- */
/* Backends                                                                   */
/* ------------------------------------------------------------------------- */

/* 1 when a CUDA backend (libfactorch_cuda) is loaded and registered. */
FCT_API int fct_cuda_available(void);

/* Number of threads the CPU BLAS uses (<= 0 leaves it unchanged); returns the
 * number in force. Has no effect on splitting while a thread pool is set.
 * While a decomposition's long LAPACK call has raised the count (below), n
 * takes effect when that call ends and the raised count is returned. */
FCT_API int fct_cpu_set_num_threads(int n);

/* CPU threading. By default the CPU kernels use OpenBLAS's threads. A host
 * framework with a thread pool of its own should install it here: then each
 * GEMM is split into one block per pool thread and OpenBLAS runs single-
 * threaded inside them, because two pools spin-waiting on the same cores slow
 * each other down badly. libfactorch_torch installs torch's pool on load.
 *
 * The one exception: the decompositions' long LAPACK calls (an SVD or an
 * eigensolver of ~0.5 s or more on one core), which the pool cannot split, run
 * with OpenBLAS's count raised to num_threads() for their duration, then set
 * back (ops/cpu/gemm_cpu.h, fct_cpu_blas_threads_begin).
 *
 * parallel_for must call body(b, e, arg) over sub-ranges [b, e) covering
 * [begin, end) exactly once, possibly concurrently, and return 0 (nonzero:
 * it did not run; factorch then computes serially). num_threads returns the
 * pool's size. Both NULL: back to OpenBLAS's threads (whose count is then 1
 * until fct_cpu_set_num_threads). */
typedef void (*fct_parallel_body)(int64_t begin, int64_t end, void* arg);
typedef int32_t (*fct_parallel_for_fn)(int64_t begin, int64_t end, int64_t grain,
                                       fct_parallel_body body, void* arg);
typedef int (*fct_num_threads_fn)(void);
FCT_API void fct_cpu_set_thread_pool(fct_parallel_for_fn parallel_for,
                                     fct_num_threads_fn num_threads);

/* A busy machine. Each parallel call is cut into chunks that the pool's
 * threads claim as they come (the calling thread must take part, as
 * torch's pools do), but the pool's join still waits for every thread, and
 * when another process holds a core one of them can be descheduled for a
 * scheduler slice. Two calls in a row whose caller then sat idle at the
 * join for over stall_ns (and longer than it worked) stop the pool for a
 * hold: calls run serially in the caller, in the same blocks, until it
 * ends, then the pool is tried again (one stall then renews the hold). The
 * hold starts at hold_min_ns, grows fourfold while tries stall, up to
 * hold_max_ns, and halves after each hold's time without a stall. Defaults:
 * 200 µs, 20 ms, 1 s; stall_ns = 0 never stops the pool. Setting the policy ends a
 * hold. The outputs are the same bits either way. */
FCT_API void fct_cpu_set_stall_policy(int64_t stall_ns, int64_t hold_min_ns, int64_t hold_max_ns);
/* Calls that stalled since the library was loaded; whether the pool rests now. */
FCT_API uint64_t fct_cpu_pool_stalls(void);
FCT_API int fct_cpu_pool_resting(void);
/* Rests the pool for ns from now (0: ends a rest), as a stall would: for a
 * caller that knows the machine is busy, and for tests. */
FCT_API void fct_cpu_pool_rest(int64_t ns);

#ifdef __cplusplus
}
#endif

#endif /* FACTORCH_H */
