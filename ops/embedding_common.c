/* Shared pieces of the factorized embeddings' entry points (see
 * embedding_common.h). */
#include "embedding_common.h"

#include <limits.h>
#include <stdio.h>

fct_status fct_check_indices(fct_context* ctx, const DLTensor* t, const DLTensor* ref,
                             const char* ref_name, int64_t* count) {
  if (!t) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "indices: expected a tensor, got NULL");
  if (t->dtype.code != kDLInt || t->dtype.lanes != 1 ||
      (t->dtype.bits != 64 && t->dtype.bits != 32))
    return fct_fail(ctx, FCT_ERR_DTYPE, "indices: expected dtype int64 or int32, got %s",
                    fct_dtype_name(t->dtype));
  if (t->device.device_type != ref->device.device_type ||
      t->device.device_id != ref->device.device_id)
    return fct_fail(ctx, FCT_ERR_DEVICE,
                    "indices: expected device %s:%d (the device of %s), got %s:%d",
                    fct_device_name(ref->device.device_type), ref->device.device_id, ref_name,
                    fct_device_name(t->device.device_type), t->device.device_id);
  if (t->ndim < 0 || t->ndim > FCT_MAX_DIMS - 1)
    return fct_fail(ctx, FCT_ERR_NDIM,
                    "indices: expected 0 to %d dims (the output adds one), got %d",
                    FCT_MAX_DIMS - 1, t->ndim);
  if (t->ndim > 0 && !t->shape)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "indices: shape is NULL");
  for (int i = 0; i < t->ndim; ++i)
    if (t->shape[i] < 0)
      return fct_fail(ctx, FCT_ERR_SHAPE, "indices: size of dim %d is negative (%lld)", i,
                      (long long)t->shape[i]);
  int64_t n = fct_numel(t);
  if (n < 0)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "indices: number of elements overflows int64");
  if (n > 0 && !t->data)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "indices: data is NULL for a non-empty tensor");
  FCT_TRY(fct_check_memory(ctx, "indices", t, n, t->dtype.bits / 8));
  *count = n;
  return FCT_OK;
}

fct_status fct_check_padding_idx(fct_context* ctx, int64_t padding_idx, int64_t num) {
  if (padding_idx == -1 || (padding_idx >= 0 && padding_idx < num)) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                  "padding_idx: expected -1 (none) or an index in [0, %lld) (num_embeddings), "
                  "got %lld",
                  (long long)num, (long long)padding_idx);
}

fct_status fct_check_lookup_rows(fct_context* ctx, const char* name, const DLTensor* t,
                                 const DLTensor* indices, int64_t dim, const char* dim_what,
                                 const DLTensor* ref, const char* ref_name) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 1));
  FCT_TRY(fct_check_same(ctx, name, t, ref_name, ref));
  bool ok = t->ndim == indices->ndim + 1 && t->shape[t->ndim - 1] == dim;
  for (int i = 0; ok && i < indices->ndim; ++i) ok = t->shape[i] == indices->shape[i];
  if (!ok)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "%s: expected the shape of indices and a last dim of %lld (%s), got a "
                    "tensor of %d dims with last dim %lld",
                    name, (long long)dim, dim_what, t->ndim, (long long)t->shape[t->ndim - 1]);
  return FCT_OK;
}

int64_t fct_embedding_chunk(const fct_context* ctx, bool cuda, int64_t count, size_t per_index) {
  if (count <= 0) return 0;
  fct_machine m = fct_machine_for(cuda);
  int64_t mc = per_index ? (int64_t)(m.chunk_bytes / per_index) : count;
  if (mc < 1) mc = 1;
  if (mc > count) mc = count;
  if (mc > INT_MAX) mc = INT_MAX;
  if ((ctx->flags & FCT_FLAG_SMALL_CHUNKS) && mc > 3) mc = 3;
  return mc;
}

fct_status fct_validate_indices(const fct_exec* e, const DLTensor* indices, int64_t count,
                                int64_t num, const char* what_num, char* scratch) {
  if (count == 0) return FCT_OK;
  int64_t bad = 0, pos = 0, value = 0;
  FCT_TRY(e->be->embedding_indices(e->ctx, indices, 0, count, num, -1, NULL, scratch, &bad, &pos,
                               &value));
  if (bad == 0) return FCT_OK;
  return fct_fail(e->ctx, FCT_ERR_INVALID_VALUE,
                  "indices: %lld value%s out of range [0, %lld) (%s); the first, at flat "
                  "position %lld, is %lld",
                  (long long)bad, bad == 1 ? "" : "s", (long long)num, what_num, (long long)pos,
                  (long long)value);
}
