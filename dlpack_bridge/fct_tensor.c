/* Validation of DLTensors and zero-copy matrix views (see fct_tensor.h). */
#include "fct_tensor.h"

#include <stdio.h>
#include <string.h>

fct_status fct_fail(fct_context* ctx, fct_status s, const char* fmt, ...) {
  if (ctx && ctx->error && ctx->error_bytes > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, ctx->error_bytes, fmt, ap);
    va_end(ap);
  }
  return s;
}

fct_dtype fct_dtype_of(DLDataType t) {
  if (t.lanes != 1) return FCT_DTYPE_INVALID;
  if (t.code == kDLFloat && t.bits == 32) return FCT_F32;
  if (t.code == kDLFloat && t.bits == 64) return FCT_F64;
  if (t.code == kDLFloat && t.bits == 16) return FCT_F16;
  if (t.code == kDLBfloat && t.bits == 16) return FCT_BF16;
  return FCT_DTYPE_INVALID;
}

const char* fct_dtype_name(DLDataType t) {
  static const char* names[] = {"float32", "float64", "bfloat16", "float16"};
  fct_dtype d = fct_dtype_of(t);
  if (d != FCT_DTYPE_INVALID) return names[d];
  switch (t.code) {
    case kDLInt: return t.bits == 64 ? "int64" : t.bits == 32 ? "int32" : "int";
    case kDLUInt: return t.bits == 8 ? "uint8" : "uint";
    case kDLBool: return "bool";
    case kDLComplex: return "complex";
    default: return "an unsupported dtype";
  }
}

size_t fct_dtype_bytes(fct_dtype d) {
  return d == FCT_F64 ? 8 : d == FCT_F32 ? 4 : 2;
}

const char* fct_device_name(int device_type) {
  switch (device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed";
    case kDLROCM: return "rocm";
    case kDLMetal: return "mps";
    default: return "an unsupported device";
  }
}

void fct_strides(const DLTensor* t, int64_t* strides) {
  if (t->strides) {
    memcpy(strides, t->strides, sizeof(int64_t) * (size_t)t->ndim);
    return;
  }
  /* Saturating: only an empty tensor's product can overflow (its strides
   * are never used to address memory). */
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    strides[i] = s;
    if (__builtin_mul_overflow(s, t->shape[i], &s)) s = INT64_MAX;
  }
}

char* fct_data(const DLTensor* t) {
  /* No offset on NULL (an empty tensor's data may be NULL). */
  return t->data ? (char*)t->data + t->byte_offset : NULL;
}

int64_t fct_numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] == 0) return 0;
  }
  for (int i = 0; i < t->ndim; ++i) {
    if (__builtin_mul_overflow(n, t->shape[i], &n)) return -1;
  }
  return n;
}

fct_status fct_check_tensor(fct_context* ctx, const char* name,
                            const DLTensor* t, int min_ndim) {
  if (!t) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: expected a tensor, got NULL", name);
  if (fct_dtype_of(t->dtype) == FCT_DTYPE_INVALID)
    return fct_fail(ctx, FCT_ERR_DTYPE,
                    "%s: expected dtype float32, float64, bfloat16 or float16, got %s",
                    name, fct_dtype_name(t->dtype));
  int dev = t->device.device_type;
  if (dev != kDLCPU && dev != kDLCUDA)
    return fct_fail(ctx, FCT_ERR_DEVICE, "%s: expected a cpu or cuda tensor, got %s", name,
                    fct_device_name(dev));
  if (dev == kDLCPU && fct_dtype_of(t->dtype) >= FCT_BF16)
    return fct_fail(ctx, FCT_ERR_DTYPE,
                    "%s: %s is supported on cuda only; on cpu expected float32 or float64",
                    name, fct_dtype_name(t->dtype));
  if (t->ndim < min_ndim || t->ndim < 0 || t->ndim > FCT_MAX_DIMS)
    return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected %d to %d dims, got %d", name, min_ndim,
                    FCT_MAX_DIMS, t->ndim);
  if (t->ndim > 0 && !t->shape)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: shape is NULL", name);
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] < 0)
      return fct_fail(ctx, FCT_ERR_SHAPE, "%s: size of dim %d is negative (%lld)", name, i,
                      (long long)t->shape[i]);
  }
  int64_t n = fct_numel(t);
  if (n < 0) return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: number of elements overflows int64", name);
  if (n > 0 && !t->data)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: data is NULL for a non-empty tensor", name);
  return fct_check_memory(ctx, name, t, n, (int64_t)fct_dtype_bytes(fct_dtype_of(t->dtype)));
}

fct_status fct_check_memory(fct_context* ctx, const char* name, const DLTensor* t, int64_t n,
                            int64_t es) {
  if (n == 0) return FCT_OK;
  /* Every byte count and element offset the ops derive from the shape and
   * strides (packed copies, views, overlap checks) must fit int64: refuse
   * descriptors that no memory could hold. */
  if (n > FCT_MAX_SPAN_BYTES / es)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: %lld elements of %lld bytes exceed %lld bytes",
                    name, (long long)n, (long long)es, (long long)FCT_MAX_SPAN_BYTES);
  if (t->strides) {
    int64_t span = 0;
    for (int i = 0; i < t->ndim; ++i) {
      int64_t st = t->strides[i], ext;
      if (st == INT64_MIN || __builtin_mul_overflow(t->shape[i] - 1, st < 0 ? -st : st, &ext) ||
          __builtin_add_overflow(span, ext, &span) || span > FCT_MAX_SPAN_BYTES / es)
        return fct_fail(ctx, FCT_ERR_OVERFLOW,
                        "%s: stride %lld of dim %d reaches beyond %lld bytes", name,
                        (long long)st, i, (long long)FCT_MAX_SPAN_BYTES);
    }
  }
  if ((uintptr_t)fct_data(t) % (uintptr_t)es != 0)
    return fct_fail(ctx, FCT_ERR_LAYOUT,
                    "%s: data + byte_offset is not aligned to the %lld bytes of its dtype %s",
                    name, (long long)es, fct_dtype_name(t->dtype));
  return FCT_OK;
}

fct_status fct_check_same(fct_context* ctx, const char* name, const DLTensor* t,
                          const char* ref_name, const DLTensor* ref) {
  if (t->dtype.code != ref->dtype.code || t->dtype.bits != ref->dtype.bits ||
      t->dtype.lanes != ref->dtype.lanes) {
    char want[32];
    snprintf(want, sizeof want, "%s", fct_dtype_name(ref->dtype));
    return fct_fail(ctx, FCT_ERR_DTYPE, "%s: expected dtype %s (the dtype of %s), got %s", name,
                    want, ref_name, fct_dtype_name(t->dtype));
  }
  if (t->device.device_type != ref->device.device_type ||
      t->device.device_id != ref->device.device_id)
    return fct_fail(ctx, FCT_ERR_DEVICE, "%s: expected device %s:%d (the device of %s), got %s:%d",
                    name, fct_device_name(ref->device.device_type), ref->device.device_id,
                    ref_name, fct_device_name(t->device.device_type), t->device.device_id);
  return FCT_OK;
}

bool fct_fold(const DLTensor* t, fct_mat* m) {
  int64_t st[FCT_MAX_DIMS];
  fct_strides(t, st);
  int nd = t->ndim;
  m->data = fct_data(t);
  m->cols = nd >= 1 ? t->shape[nd - 1] : 1;
  m->cs = nd >= 1 ? st[nd - 1] : 1;
  m->rows = 1;
  m->rs = 0;
  bool ok = true;
  int64_t expect = 0; /* stride the next outer non-trivial dim must have */
  bool have = false;
  for (int i = nd - 2; i >= 0; --i) {
    int64_t n = t->shape[i];
    /* Only an empty tensor's products can overflow (fct_check_tensor bounds
     * the others): saturate its row count, wrap the unused stride. */
    if (m->rows != 0 && __builtin_mul_overflow(m->rows, n, &m->rows)) m->rows = INT64_MAX;
    if (n == 0) m->rows = 0;
    if (n == 1) continue;
    if (!have) {
      m->rs = st[i];
      have = true;
    } else if (st[i] != expect) {
      ok = false;
    }
    expect = (int64_t)((uint64_t)st[i] * (uint64_t)n);
  }
  if (m->rows == 0 || m->cols == 0) {
    /* Empty: any strides will do (numpy gives empty arrays zero strides);
     * report the dense row-major layout the output checks expect. */
    m->cs = 1;
    m->rs = m->cols > 0 ? m->cols : 1;
    return true;
  }
  /* A dim of size <= 1 has no meaningful stride: give it the one BLAS wants. */
  if (m->rows <= 1) m->rs = m->cols > 0 ? (m->cs == 1 ? m->cols : 1) : 1;
  if (m->cols <= 1) m->cs = 1;
  return ok;
}

bool fct_mat_blas_ok(const fct_mat* m) {
  int64_t r1 = m->rows > 1 ? m->rows : 1, c1 = m->cols > 1 ? m->cols : 1;
  if (m->cs == 1 && m->rs >= c1) return true;
  if (m->rs == 1 && m->cs >= r1) return true;
  return false;
}

fct_status fct_check_output(fct_context* ctx, const char* name, const DLTensor* t,
                            fct_mat* m) {
  bool folds = fct_fold(t, m);
  int64_t c1 = m->cols > 1 ? m->cols : 1;
  if (!folds || m->cs != 1 || (m->rows > 1 && m->rs < c1))
    return fct_fail(ctx, FCT_ERR_LAYOUT,
                    "%s: expected an output with unit stride in the last dim, foldable "
                    "leading dims and no overlapping elements",
                    name);
  return FCT_OK;
}

void fct_byte_range(const DLTensor* t, uintptr_t* lo, uintptr_t* hi) {
  int64_t st[FCT_MAX_DIMS];
  fct_strides(t, st);
  size_t es = (t->dtype.bits * t->dtype.lanes + 7) / 8;
  uintptr_t base = (uintptr_t)fct_data(t);
  if (fct_numel(t) <= 0) {
    *lo = *hi = base;
    return;
  }
  int64_t mn = 0, mx = 0;
  for (int i = 0; i < t->ndim; ++i) {
    int64_t ext = (t->shape[i] - 1) * st[i];
    if (ext < 0) mn += ext; else mx += ext;
  }
  *lo = base + (intptr_t)(mn * (int64_t)es);
  *hi = base + (intptr_t)(mx * (int64_t)es) + es;
}

fct_status fct_check_disjoint(fct_context* ctx, const char* out_name, const DLTensor* out,
                              const char* other_name, const DLTensor* other) {
  if (!out || !other) return FCT_OK;
  uintptr_t alo, ahi, blo, bhi;
  fct_byte_range(out, &alo, &ahi);
  fct_byte_range(other, &blo, &bhi);
  if (alo < ahi && blo < bhi && alo < bhi && blo < ahi)
    return fct_fail(ctx, FCT_ERR_LAYOUT, "%s: expected memory disjoint from %s, but they overlap",
                    out_name, other_name);
  return FCT_OK;
}

size_t fct_ws_take(size_t* cursor, size_t bytes) {
  size_t at = (*cursor + FCT_WS_ALIGN - 1) / FCT_WS_ALIGN * FCT_WS_ALIGN;
  *cursor = at + bytes;
  return at;
}

bool fct_mul_ok(size_t a, size_t b, size_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

fct_mat fct_mat_t(fct_mat m) {
  fct_mat r = {m.data, m.cols, m.rows, m.cs, m.rs};
  /* Keep the normalisation of fct_fold: a trivial dim gets BLAS's stride. */
  if (r.rows <= 1) r.rs = r.cs == 1 ? (r.cols > 0 ? r.cols : 1) : 1;
  if (r.cols <= 1) r.cs = 1;
  return r;
}
