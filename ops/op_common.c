/* What the layers' entry points share (see op_common.h). */
#include "op_common.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

fct_machine fct_machine_for(bool cuda) {
  fct_machine m;
  m.cuda = cuda;
  m.flop_per_byte = cuda ? FCT_CUDA_FLOP_PER_BYTE : FCT_CPU_FLOP_PER_BYTE;
  m.call_flops = cuda ? FCT_CUDA_CALL_FLOPS : FCT_CPU_CALL_FLOPS;
  m.chunk_bytes = cuda ? FCT_CUDA_CHUNK_BYTES : FCT_CPU_CHUNK_BYTES;
  m.workspace_cap = cuda ? FCT_CUDA_WORKSPACE_CAP : FCT_CPU_WORKSPACE_CAP;
  return m;
}

/* By hand rather than with snprintf: the checks name every factor on every
 * call, and glibc's snprintf cost ~1.3k instructions a name, 24 of them
 * (more than the plan) in a 4-mode Tucker forward. Truncates as snprintf. */
const char* fct_item_name(char* buf, size_t n, const char* list, int i) {
  if (n == 0) return buf;
  char digits[12];
  int nd = 0;
  unsigned v = i < 0 ? 0u - (unsigned)i : (unsigned)i;
  do {
    digits[nd++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  size_t len = 0;
  for (const char* c = list; *c && len + 1 < n; ++c) buf[len++] = *c;
  if (len + 1 < n) buf[len++] = '[';
  if (i < 0 && len + 1 < n) buf[len++] = '-';
  while (nd > 0 && len + 1 < n) buf[len++] = digits[--nd];
  if (len + 1 < n) buf[len++] = ']';
  buf[len] = '\0';
  return buf;
}

bool fct_fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

fct_status fct_check_input_rows(fct_context* ctx, const char* name, const DLTensor* x,
                                int64_t* M) {
  FCT_TRY(fct_check_tensor(ctx, name, x, 1));
  int64_t m = 1;
  for (int i = 0; i < x->ndim - 1; ++i) {
    if (__builtin_mul_overflow(m, x->shape[i], &m))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: the batch size overflows int64", name);
  }
  if (!fct_fits_int(m))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: the batch size M=%lld must be < 2^31 for BLAS",
                    name, (long long)m);
  *M = m;
  return FCT_OK;
}

fct_status fct_check_batched(fct_context* ctx, const char* name, const DLTensor* t,
                             const DLTensor* x, int64_t last, const char* last_name) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 1));
  FCT_TRY(fct_check_same(ctx, name, t, "x", x));
  bool ok = t->ndim == x->ndim && t->shape[t->ndim - 1] == last;
  for (int i = 0; ok && i < x->ndim - 1; ++i) ok = t->shape[i] == x->shape[i];
  if (!ok)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "%s: expected the leading dims of x and a last dim of %lld (%s), got a "
                    "tensor of %d dims with last dim %lld",
                    name, (long long)last, last_name, t->ndim, (long long)t->shape[t->ndim - 1]);
  return FCT_OK;
}

fct_status fct_check_vector(fct_context* ctx, const char* name, const DLTensor* t,
                            const DLTensor* x, int64_t n, const char* n_name) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 1));
  FCT_TRY(fct_check_same(ctx, name, t, "x", x));
  if (t->ndim != 1 || t->shape[0] != n)
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected shape [%lld] (%s), got %d dims%s", name,
                    (long long)n, n_name, t->ndim,
                    t->ndim == 1 ? " of a different size" : "");
  return FCT_OK;
}

fct_status fct_check_param(fct_context* ctx, const char* name, const DLTensor* t,
                           const DLTensor* x, int ndim, const char* what) {
  FCT_TRY(fct_check_tensor(ctx, name, t, ndim));
  if (t->ndim != ndim)
    return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected %d dims %s, got %d", name, ndim, what,
                    t->ndim);
  return fct_check_same(ctx, name, t, "x", x);
}

fct_status fct_check_tt_core(fct_context* ctx, const char* name, const DLTensor* core, int k,
                             int64_t r_prev, const char* dims) {
  const int64_t* sh = core->shape;
  if (sh[0] != r_prev && k == 0)
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected a first dim of 1 (r_0 = 1), got %lld", name,
                    (long long)sh[0]);
  if (sh[0] != r_prev)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "%s: expected a first dim of %lld (the last dim of cores[%d]), got %lld", name,
                    (long long)r_prev, k - 1, (long long)sh[0]);
  for (int i = 1; i < 4; ++i)
    if (sh[i] < 1)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "%s: expected sizes >= 1 (%s), got [%lld, %lld, %lld, %lld]", name, dims,
                      (long long)sh[0], (long long)sh[1], (long long)sh[2], (long long)sh[3]);
  return FCT_OK;
}

fct_status fct_check_tt_last(fct_context* ctx, int d, int64_t r_d) {
  if (r_d == 1) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_SHAPE, "cores[%d]: expected a last dim of 1 (r_d = 1), got %lld",
                  d - 1, (long long)r_d);
}

bool fct_is_contiguous(const DLTensor* t) {
  if (fct_numel(t) == 0 || !t->strides) return true;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != s) return false;
    s *= t->shape[i];
  }
  return true;
}

bool fct_input_needs_pack(const DLTensor* t, fct_mat* view) {
  bool folds = fct_fold(t, view);
  return !folds || !fct_mat_blas_ok(view) || view->rs > INT_MAX || view->cs > INT_MAX;
}

fct_mat fct_dense(char* data, int64_t rows, int64_t cols) {
  fct_mat m = {data, rows, cols, cols > 0 ? cols : 1, 1};
  return m;
}

fct_status fct_check_dense_output(fct_context* ctx, const char* name, const DLTensor* t) {
  if (!fct_is_contiguous(t))
    return fct_fail(ctx, FCT_ERR_LAYOUT, "%s: expected a C-contiguous (dense row-major) output",
                    name);
  return FCT_OK;
}

fct_status fct_check_contiguous_output(fct_context* ctx, const char* name, const DLTensor* t,
                                       int64_t rows, int64_t cols, fct_mat* m) {
  FCT_TRY(fct_check_dense_output(ctx, name, t));
  *m = fct_dense(fct_data(t), rows, cols);
  return FCT_OK;
}

fct_status fct_check_outputs_disjoint(fct_context* ctx, int first_out, const char* const* names,
                                      const DLTensor* const* ts, int n) {
  uintptr_t lo[FCT_MAX_ARGS], hi[FCT_MAX_ARGS];
  if (n > FCT_MAX_ARGS)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "too many arguments (%d > %d)", n,
                    FCT_MAX_ARGS);
  for (int i = 0; i < n; ++i) {
    lo[i] = hi[i] = 0;
    if (ts[i]) fct_byte_range(ts[i], &lo[i], &hi[i]);
  }
  for (int o = first_out; o < n; ++o) {
    if (lo[o] >= hi[o]) continue; /* absent or empty */
    for (int i = 0; i < n; ++i)
      if (i != o && lo[i] < hi[i] && lo[o] < hi[i] && lo[i] < hi[o])
        return fct_check_disjoint(ctx, names[o], ts[o], names[i], ts[i]); /* names the pair */
  }
  return FCT_OK;
}

fct_status fct_elems_bytes(fct_context* ctx, const char* name, int64_t count, fct_dtype dt,
                           size_t* bytes) {
  if (count < 0 || !fct_mul_ok((size_t)count, fct_dtype_bytes(dt), bytes))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: workspace size overflows", name);
  return FCT_OK;
}

fct_status fct_layout_done(fct_context* ctx, const fct_layout* L, size_t* bytes) {
  if (L->overflow)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "workspace: the size overflows (sizes too large)");
  *bytes = L->cursor;
  return FCT_OK;
}

fct_status fct_exec_begin(fct_context* ctx, const char* name, const DLTensor* t, fct_exec* e) {
  memset(e, 0, sizeof *e);
  e->ctx = ctx;
  FCT_TRY(fct_backend_for(ctx, name, t, &e->be));
  e->device = t->device.device_id;
  e->dt = fct_dtype_of(t->dtype);
  e->es = fct_dtype_bytes(e->dt);
  e->ws = (char*)ctx->workspace;
  return FCT_OK;
}

void fct_param_init(fct_param* p, const DLTensor* t, int64_t rows, int64_t cols,
                    bool contiguous) {
  memset(p, 0, sizeof *p);
  p->t = t;
  p->rows = rows;
  p->cols = cols;
  if (contiguous || t->ndim != 2) {
    p->pack = !fct_is_contiguous(t);
  } else {
    fct_mat m;
    p->pack = fct_input_needs_pack(t, &m);
  }
}

void fct_param_init_rows(fct_param* p, const DLTensor* t, int64_t rows, int64_t cols) {
  memset(p, 0, sizeof *p);
  p->t = t;
  p->rows = rows;
  p->cols = cols;
  p->fold = true;
  fct_mat m;
  p->pack = fct_input_needs_pack(t, &m);
}

void fct_param_lay_out(fct_param* p, fct_layout* L, size_t es) {
  if (p->pack) p->off = fct_layout_take(L, p->rows * p->cols, es);
}

fct_status fct_param_bind(const fct_exec* e, fct_param* p) {
  if (p->pack) {
    FCT_TRY(e->be->pack(e->ctx, p->t, fct_ws_at(e, p->off)));
    p->m = fct_ws_mat(e, p->off, p->rows, p->cols);
  } else if (p->fold || p->t->ndim == 2) {
    fct_fold(p->t, &p->m);
  } else {
    p->m = fct_dense(fct_data(p->t), p->rows, p->cols);
  }
  return FCT_OK;
}

fct_status fct_x_permute(const fct_exec* e, const char* data, int ndim, const int64_t* shape,
                         const int64_t* strides, char* dst) {
  DLTensor v;
  memset(&v, 0, sizeof v);
  v.data = (void*)data;
  v.ndim = ndim;
  v.shape = (int64_t*)shape;
  v.strides = (int64_t*)strides;
  v.device.device_type = e->be == &fct_cpu_backend ? kDLCPU : kDLCUDA;
  v.device.device_id = e->device;
  v.dtype.lanes = 1;
  v.dtype.bits = (uint8_t)(e->es * 8);
  v.dtype.code = e->dt == FCT_BF16 ? kDLBfloat : kDLFloat;
  if (fct_numel(&v) == 0) return FCT_OK;
  return e->be->pack(e->ctx, &v, dst);
}

void fct_args_add(fct_args* a, const char* name, const DLTensor* t) {
  a->names[a->n] = name;
  a->ts[a->n++] = t;
}

void fct_args_add_list(fct_args* a, const char* list, int n, const DLTensor* const* ts) {
  for (int k = 0; k < n; ++k) {
    fct_item_name(a->buf[a->n], sizeof a->buf[a->n], list, k);
    a->names[a->n] = a->buf[a->n];
    a->ts[a->n++] = ts ? ts[k] : NULL;
  }
}

fct_status fct_args_check_overlaps(fct_context* ctx, const fct_args* a, int first_out) {
  return fct_check_outputs_disjoint(ctx, first_out, a->names, a->ts, a->n);
}

/* ------------------------------------------------------------------------- */
/* Finite checks                                                              */
/* ------------------------------------------------------------------------- */

fct_status fct_check_finite(fct_context* ctx, const fct_backend* be, char* scratch,
                            const char* name, const DLTensor* out, const char* const* names,
                            const DLTensor* const* ins, int n) {
  if (!out) return FCT_OK;
  int64_t bad = 0;
  FCT_TRY(be->count_nonfinite(ctx, out, scratch, &bad));
  if (!bad) return FCT_OK;
  char list[160] = "";
  size_t len = 0;
  const char* dtype = "";
  for (int i = 0; i < n; ++i) {
    if (!ins[i]) continue;
    dtype = fct_dtype_name(ins[i]->dtype);
    int64_t c = 0;
    FCT_TRY(be->count_nonfinite(ctx, ins[i], scratch, &c));
    if (c > 0 && len + 24 < sizeof list)
      len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "", names[i]);
  }
  if (len)
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "%s: %lld NaN/Inf values in the result; the inputs %s hold NaN or Inf", name,
                    (long long)bad, list);
  return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                  "%s: %lld NaN/Inf values in the result although all inputs are finite "
                  "(overflow in %s)",
                  name, (long long)bad, dtype);
}

fct_status fct_check_finite_grad(fct_context* ctx, const fct_backend* be, char* scratch,
                                 const DLTensor* g, const char* op) {
  int64_t bad = 0;
  FCT_TRY(be->count_nonfinite(ctx, g, scratch, &bad));
  if (bad)
    return fct_fail(ctx, FCT_ERR_NOT_FINITE,
                    "grad_y: %lld NaN/Inf values in the gradient flowing into %s",
                    (long long)bad, op);
  return FCT_OK;
}

size_t fct_gemm_reduce_scratch(bool cuda, fct_dtype dt, int64_t m, int64_t n, int64_t batch) {
  if (!cuda || batch <= 1 || m <= 0 || n <= 0) return 0;
  /* CUDA sums `chunk` partial products per batched GEMM, kept in the
   * accumulation type (float, or double for float64). About 64 MB bounds the
   * scratch while keeping the batched GEMMs long. */
  size_t acc = dt == FCT_F64 ? 8 : 4;
  size_t one = (size_t)m * (size_t)n * acc;
  size_t chunk = ((size_t)64 << 20) / one;
  if (chunk < 1) chunk = 1;
  if (chunk > (size_t)batch) chunk = (size_t)batch;
  return chunk * one;
}

fct_status fct_x_dense_base(const fct_exec* e, const DLTensor* t, bool pack, size_t off,
                            char** base) {
  if (!pack) {
    *base = fct_data(t);
    return FCT_OK;
  }
  FCT_TRY(e->be->pack(e->ctx, t, fct_ws_at(e, off)));
  *base = fct_ws_at(e, off);
  return FCT_OK;
}

int64_t fct_vector_stride(const DLTensor* v) {
  if (!v) return 1;
  int64_t st[1];
  fct_strides(v, st);
  return st[0];
}
