/* What the boxed kernels share (glue_common.h). */
#include "glue_common.h"

#include <stdio.h>
#include <string.h>

size_t fct_take_int_array(StableIValue slot, int cap, int64_t* v, int* n) {
  StableListHandle l = fct_slot_list(slot);
  size_t total = 0;
  *n = 0;
  if (!l) return 0;
  if (torch_list_size(l, &total) == 0) {
    for (size_t i = 0; i < total && i < (size_t)cap; ++i) {
      StableIValue item = 0;
      if (torch_list_get_item(l, i, &item) != 0) break;
      v[i] = fct_slot_int(item);
      *n = (int)i + 1;
    }
  }
  torch_delete_list(l);
  return total;
}

void fct_take_ints(StableIValue slot, int cap, fct_ints* out) {
  memset(out, 0, sizeof *out);
  out->total = fct_take_int_array(slot, cap, out->v, &out->n);
}

void fct_take_tensors(fct_call* c, const StableIValue* stack, int n, DLTensor* dl) {
  for (int i = 0; i < n; ++i) {
    AtenTensorHandle h = fct_slot_tensor(stack[i]);
    c->owned.h[c->owned.n++] = h;
    fct_torch_view(h, &dl[i]);
  }
}

bool fct_check_ints(fct_call* c, const char* name, const fct_ints* ints, int lo, int hi,
                    const char* what) {
  bool ok = ints->total >= (size_t)lo && ints->total <= (size_t)hi && ints->n == (int)ints->total;
  for (int i = 0; ok && i < ints->n; ++i) ok = ints->v[i] >= 1;
  if (ok) return true;
  char list[128] = "";
  size_t len = 0;
  for (int i = 0; i < ints->n && len + 24 < sizeof list; ++i)
    len += (size_t)snprintf(list + len, sizeof list - len, "%s%lld", i ? ", " : "",
                            (long long)ints->v[i]);
  snprintf(c->error, sizeof c->error, "%s: expected %d to %d %s, each >= 1, got [%s%s]", name, lo,
           hi, what, list, ints->total > (size_t)ints->n ? ", ..." : "");
  return false;
}

void fct_carve_init(fct_carve* cv) {
  memset(cv, 0, sizeof *cv);
}

void fct_carve_add(fct_carve* cv, int ndim, const int64_t* shape) {
  if (cv->n >= FCT_GLUE_MAX_VIEWS) {
    cv->total = -1;
    return;
  }
  DLTensor* t = &cv->t[cv->n];
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    cv->shape[cv->n][i] = shape[i];
    if (cv->total >= 0 && __builtin_mul_overflow(numel, shape[i], &numel)) cv->total = -1;
  }
  if (cv->total >= 0 && __builtin_add_overflow(cv->total, numel, &cv->total)) cv->total = -1;
  t->ndim = ndim;
  t->shape = cv->shape[cv->n];
  t->strides = NULL; /* compact row-major */
  cv->in[cv->n] = t;
  cv->out[cv->n] = t;
  ++cv->n;
}

void fct_carve_copy(fct_carve* dst, const fct_carve* src) {
  *dst = *src;
  for (int i = 0; i < dst->n; ++i) { /* the copy's pointers must point into the copy */
    dst->t[i].shape = dst->shape[i];
    dst->in[i] = &dst->t[i];
    dst->out[i] = &dst->t[i];
  }
}

bool fct_carve_bind(fct_call* c, fct_carve* cv, const DLTensor* flat, const DLTensor* x,
                    const char* name, const char* what) {
  fct_context* ctx = &c->ctx;
  /* x first: the flat tensor is compared with it, so a bad x (int64, or
   * None: an undefined tensor) must be named as x, not as a flat tensor of
   * the wrong dtype. Every caller's x needs >= 1 dim, as its C op then checks
   * too. */
  if (x != flat && fct_check_tensor(ctx, "x", x, 1) != FCT_OK) return false;
  if (fct_check_tensor(ctx, name, flat, 1) != FCT_OK) return false;
  if (fct_check_same(ctx, name, flat, "x", x) != FCT_OK) return false;
  int64_t n = flat->shape[0];
  if (cv->total < 0) {
    snprintf(c->error, sizeof c->error, "%s: the sizes of %s overflow int64", name, what);
    return false;
  }
  if (flat->ndim != 1 || n != cv->total || (n > 1 && flat->strides && flat->strides[0] != 1)) {
    snprintf(c->error, sizeof c->error,
             "%s: expected a contiguous 1-D tensor of %lld elements (%s), got %d dims with %lld "
             "elements",
             name, (long long)cv->total, what, flat->ndim, (long long)fct_numel(flat));
    return false;
  }
  char* base = fct_data(flat);
  size_t es = (size_t)flat->dtype.bits / 8;
  int64_t off = 0;
  for (int i = 0; i < cv->n; ++i) {
    DLTensor* t = &cv->t[i];
    t->data = base + off * (int64_t)es;
    t->byte_offset = 0;
    t->device = flat->device;
    t->dtype = flat->dtype;
    off += fct_numel(t);
  }
  return true;
}

DLTensor* fct_batched_result(fct_call* c, const DLTensor* x, int64_t last) {
  if (x->ndim < 1 || x->ndim > FCT_MAX_DIMS) return NULL;
  int64_t shape[FCT_MAX_DIMS];
  for (int i = 0; i < x->ndim - 1; ++i) shape[i] = x->shape[i];
  shape[x->ndim - 1] = last;
  return fct_call_result(c, x->ndim, shape);
}

void fct_alloc_grads(fct_call* c, const DLTensor* x, const fct_carve* cv, fct_carve* gcv,
                     int64_t out, const bool need[3], const char* what, fct_grads* g) {
  bool sane = x->ndim >= 1 && x->ndim <= FCT_MAX_DIMS;
  g->gx = fct_call_grad(c, need[0] && sane, x->ndim, x->shape);
  DLTensor* gw = fct_call_grad(c, need[1], 1, &cv->total);
  g->gb = fct_call_grad(c, need[2], 1, &out);
  fct_carve_copy(gcv, cv);
  if (need[1] && !fct_carve_bind(c, gcv, gw, x, "grad_weights", what))
    fct_call_raise(c, FCT_ERR_SHAPE);
}

void fct_tt_carve(fct_call* c, const fct_tt_lists* l, const DLTensor* flat, const DLTensor* ref,
                  const char* what, fct_carve* cv, int64_t* prod_b) {
  if (!fct_check_ints(c, l->a_name, l->a, 1, FCT_MAX_MODES, l->a_what) ||
      !fct_check_ints(c, l->b_name, l->b, l->a->n, l->a->n, l->b_what) ||
      !fct_check_ints(c, "ranks", l->r, l->a->n + 1, l->a->n + 1, "ranks (d + 1)"))
    fct_call_raise(c, FCT_ERR_INVALID_VALUE);
  int d = l->a->n;
  const int64_t* r = l->r->v;
  if (r[0] != 1 || r[d] != 1)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE,
                  "ranks: expected the first and last of the d + 1 ranks to be 1, got %lld and "
                  "%lld",
                  (long long)r[0], (long long)r[d]);
  *prod_b = 1;
  for (int k = 0; k < d; ++k)
    if (__builtin_mul_overflow(*prod_b, l->b->v[k], prod_b))
      fct_call_fail(c, FCT_ERR_OVERFLOW, "%s: the product overflows int64", l->b_name);
  fct_carve_init(cv);
  for (int k = 0; k < d; ++k)
    fct_carve_add(cv, 4, (int64_t[4]){r[k], l->a->v[k], l->b->v[k], r[k + 1]});
  if (!fct_carve_bind(c, cv, flat, ref, "weights", what)) fct_call_raise(c, FCT_ERR_SHAPE);
}
