/*
 * op_common.h (internal): what the entry points of the layers' ops share
 * (ops/lowrank_linear.c, ops/{cp,tucker,tt}_linear.c, ops/lora_linear.c,
 * ops/conv_chain.c, ops/{lowrank,tt}_embedding.c): argument checks with
 * messages naming the argument, workspace carving, finite checks, the
 * per-call execution state with thin wrappers over the backend primitives,
 * and the machine constants of the cost models.
 */
#ifndef FCT_OP_COMMON_H
#define FCT_OP_COMMON_H

#include "backend.h"
#include "workspace.h"

/* ------------------------------------------------------------------------- */
/* Cost model constants                                                       */
/* ------------------------------------------------------------------------- */

/* The cost models of the three ops price a plan in FLOP-equivalents:
 *   cost = FLOPs + FCT_*_FLOP_PER_BYTE · bytes moved + FCT_*_CALL_FLOPS · calls
 * FLOP_PER_BYTE is the machine balance (peak FLOP/s over the bandwidth the
 * intermediates see: a chunk of rows is sized to stay in cache on the CPU,
 * so nearer L3 than DRAM; HBM on CUDA); CALL_FLOPS is what one BLAS call or
 * kernel launch costs in lost FLOPs: on the CPU a call of any size runs in
 * one fork/join of the host's thread pool, about 10 us when the cores are
 * free and much more when another process holds one of them (a join waits
 * for a descheduled thread), so 25 us at ~200 GFLOP/s; about 5 us at ~10
 * TFLOP/s on a GPU. They need only be right within a factor of a few: they
 * decide between plans whose costs differ by more. */
#define FCT_CPU_FLOP_PER_BYTE 4.0
#define FCT_CPU_CALL_FLOPS 5.0e6
#define FCT_CUDA_FLOP_PER_BYTE 10.0
#define FCT_CUDA_CALL_FLOPS 5.0e7

/* How many bytes of M-scaled intermediates one chunk of rows may use: on the
 * CPU a quarter of the L3 (so a chunk's states are reused from cache between
 * the steps: measured 2x faster than 32 MB chunks for CP at M = 1, 25% for
 * TT at M = 2048); on CUDA a cap on the workspace. */
#define FCT_CPU_CHUNK_BYTES ((size_t)8 << 20)
#define FCT_CUDA_CHUNK_BYTES ((size_t)512 << 20)

/* Plans whose workspace exceeds this are taken only when nothing smaller
 * exists: a few percent of speed is not worth hundreds of MB of a shared
 * machine's memory. */
#define FCT_CPU_WORKSPACE_CAP ((size_t)64 << 20)
#define FCT_CUDA_WORKSPACE_CAP ((size_t)1 << 30)

typedef struct fct_machine {
  double flop_per_byte, call_flops;
  size_t chunk_bytes, workspace_cap;
  bool cuda;
} fct_machine;

fct_machine fct_machine_for(bool cuda);

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

/* "list[i]" into buf (for messages naming one factor or core). */
const char* fct_item_name(char* buf, size_t n, const char* list, int i);

/* BLAS and cuBLAS take int sizes. */
bool fct_fits_int(int64_t v);

/* The chunk sizes a plan tries, largest first: n itself, then least·2^k
 * from the largest below n down to least. The one after n, or 0 when n <=
 * least (none left). */
static inline int64_t fct_smaller_chunk(int64_t n, int64_t least) {
  if (n <= least) return 0;
  int64_t next = least;
  while (next * 2 < n) next *= 2;
  return next;
}

/* x: a tensor of >= 1 dims; *M = product of its leading dims. */
fct_status fct_check_input_rows(fct_context* ctx, const char* name, const DLTensor* x,
                                int64_t* M);

/* t must have x's dtype/device, x's leading dims and a last dim of `last`. */
fct_status fct_check_batched(fct_context* ctx, const char* name, const DLTensor* t,
                             const DLTensor* x, int64_t last, const char* last_name);

/* t must be [n] with x's dtype and device. */
fct_status fct_check_vector(fct_context* ctx, const char* name, const DLTensor* t,
                            const DLTensor* x, int64_t n, const char* n_name);

/* t must be a tensor of exactly `ndim` dims with x's dtype and device. */
fct_status fct_check_param(fct_context* ctx, const char* name, const DLTensor* t,
                           const DLTensor* x, int ndim, const char* what);

/* The shape of TT core k of a chain, [r_(k-1), a_k, b_k, r_k] (`dims`
 * names them in messages): its first dim must be r_prev (r_0 = 1, then the
 * last dim of the core before) and every size >= 1. The caller checks the
 * tensor itself first (4 dims, dtype, device). fct_check_tt_last: r_d = 1. */
fct_status fct_check_tt_core(fct_context* ctx, const char* name, const DLTensor* core, int k,
                             int64_t r_prev, const char* dims);
fct_status fct_check_tt_last(fct_context* ctx, int d, int64_t r_d);

/* Dense row-major (C-contiguous) tensors; empty ones count as such. */
bool fct_is_contiguous(const DLTensor* t);

/* An output must be C-contiguous (message naming it otherwise). */
fct_status fct_check_dense_output(fct_context* ctx, const char* name, const DLTensor* t);

/* An output must be C-contiguous; m = its [rows, cols] row-major view. */
fct_status fct_check_contiguous_output(fct_context* ctx, const char* name, const DLTensor* t,
                                       int64_t rows, int64_t cols, fct_mat* m);

/* The [M, n] view of a batched input, and whether it must be packed for
 * BLAS to read it (leading dims that do not fold, or neither row- nor
 * column-major, or strides beyond int). */
bool fct_input_needs_pack(const DLTensor* t, fct_mat* view);

/* A dense [rows, cols] view of contiguous memory. */
fct_mat fct_dense(char* data, int64_t rows, int64_t cols);

/* Every argument of a call with its name ("x", "cores[2]", ...), for the
 * overlap checks and NaN reports of the tensorized ops. */
#define FCT_MAX_ARGS 40

/* Fails when an output ts[o] (first_out <= o < n, in that order) shares
 * memory with any other of ts[0..n) (NULL entries: absent); names the pair.
 * n <= FCT_MAX_ARGS. Each byte range is computed once. */
fct_status fct_check_outputs_disjoint(fct_context* ctx, int first_out, const char* const* names,
                                      const DLTensor* const* ts, int n);
typedef struct fct_args {
  const char* names[FCT_MAX_ARGS]; /* borrowed: a name given, or buf */
  const DLTensor* ts[FCT_MAX_ARGS];
  char buf[FCT_MAX_ARGS][32]; /* list items' names */
  int n;
} fct_args;

/* name: borrowed, must outlive a (the entry points pass literals). */
void fct_args_add(fct_args* a, const char* name, const DLTensor* t);
/* list[0], list[1], ... for the n tensors ts (NULL: n absent ones). */
void fct_args_add_list(fct_args* a, const char* list, int n, const DLTensor* const* ts);
/* Outputs are the arguments from index first_out on: each must not overlap
 * any other argument. */
fct_status fct_args_check_overlaps(fct_context* ctx, const fct_args* a, int first_out);

/* Bytes of `count` elements of dt, or FCT_ERR_OVERFLOW naming `name`. */
fct_status fct_elems_bytes(fct_context* ctx, const char* name, int64_t count, fct_dtype dt,
                           size_t* bytes);

/* Workspace layouts (fct_layout): workspace.h. Done: fails naming the
 * overflow, else *bytes = the size. */
fct_status fct_layout_done(fct_context* ctx, const fct_layout* L, size_t* bytes);


/* ------------------------------------------------------------------------- */
/* Execution                                                                  */
/* ------------------------------------------------------------------------- */

/* A factor, core or input used as a [rows, cols] matrix: read in place when
 * it can be (BLAS-readable, or C-contiguous when `contiguous` is asked),
 * else packed into the workspace by fct_param_bind. */
typedef struct fct_param {
  const DLTensor* t;
  fct_mat m; /* valid after fct_param_bind */
  int64_t rows, cols;
  bool pack;
  bool fold; /* read in place through fct_fold (a batched input) */
  size_t off;
} fct_param;

void fct_param_init(fct_param* p, const DLTensor* t, int64_t rows, int64_t cols,
                    bool contiguous);
/* A batched input [..., cols] (x, grad_y) as its [rows, cols] view: read in
 * place when its leading dims fold into a BLAS-readable matrix
 * (fct_input_needs_pack), else packed. */
void fct_param_init_rows(fct_param* p, const DLTensor* t, int64_t rows, int64_t cols);
void fct_param_lay_out(fct_param* p, fct_layout* L, size_t es);

/* One call's execution state: the backend and device, the dtype, and the
 * resolved workspace. */
typedef struct fct_exec {
  fct_context* ctx;
  const fct_backend* be;
  int device;
  fct_dtype dt;
  size_t es;
  char* ws;
} fct_exec;

fct_status fct_exec_begin(fct_context* ctx, const char* name, const DLTensor* t, fct_exec* e);

/* NULL when there is no workspace (then every region in it is empty). */
static inline char* fct_ws_at(const fct_exec* e, size_t off) {
  return e->ws ? e->ws + off : NULL;
}

/* A dense [rows, cols] matrix in the workspace at off. */
static inline fct_mat fct_ws_mat(const fct_exec* e, size_t off, int64_t rows, int64_t cols) {
  return fct_dense(fct_ws_at(e, off), rows, cols);
}

/* C = A·B + beta·C (one product). */
static inline fct_status fct_x_gemm(const fct_exec* e, const fct_mat* A, const fct_mat* B,
                                    const fct_mat* C, double beta) {
  return e->be->gemm(e->ctx, e->device, e->dt, A, B, C, beta, 1, 0, 0, 0);
}

static inline fct_status fct_x_gemm_batched(const fct_exec* e, const fct_mat* A,
                                            const fct_mat* B, const fct_mat* C, double beta,
                                            int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
  return e->be->gemm(e->ctx, e->device, e->dt, A, B, C, beta, batch, sa, sb, sc);
}

struct fct_exec;
fct_status fct_param_bind(const struct fct_exec* e, fct_param* p);

/* t's elements as dense row-major memory: t's own when !pack (t is
 * C-contiguous), else packed once into the workspace at off. */
fct_status fct_x_dense_base(const fct_exec* e, const DLTensor* t, bool pack, size_t off,
                            char** base);

/* The element stride of a 1-D tensor (a bias); 1 for NULL. */
int64_t fct_vector_stride(const DLTensor* v);

/* dst (dense, row-major order of the view) = a strided view of src memory:
 * ndim dims of `shape` with element `strides`, starting at `data`. */
fct_status fct_x_permute(const fct_exec* e, const char* data, int ndim, const int64_t* shape,
                         const int64_t* strides, char* dst);

/* ------------------------------------------------------------------------- */
/* Finite checks                                                              */
/* ------------------------------------------------------------------------- */

/* Bytes of workspace the checks below take as `scratch` on CUDA (device-side
 * counts). The CPU scan needs none, so the ops reserve it for CUDA calls
 * only: a CPU call that needs no other workspace then allocates none (at
 * M = 1 the allocation cost more than the scan); scratch may be NULL there. */
#define FCT_CHECK_SCRATCH 256

/* When out holds NaN/Inf: fails naming the inputs that hold them (ins may
 * contain NULLs, skipped), or blaming overflow when all are finite. */
fct_status fct_check_finite(fct_context* ctx, const fct_backend* be, char* scratch,
                            const char* name, const DLTensor* out, const char* const* names,
                            const DLTensor* const* ins, int n);

/* Fails when grad_y holds NaN/Inf ("... flowing into <op>"). */
fct_status fct_check_finite_grad(fct_context* ctx, const fct_backend* be, char* scratch,
                                 const DLTensor* g, const char* op);

#endif /* FCT_OP_COMMON_H */
