/*
 * embedding_common.h (internal): what the entry points of the factorized
 * embeddings (ops/lowrank_embedding.c, ops/tt_embedding.c) share: checks of
 * the index tensor, of padding_idx and of the [*indices.shape, dim] tensors
 * (y, grad_y), chunk sizing, and the validation pass over the indices.
 */
#ifndef FCT_EMBEDDING_COMMON_H
#define FCT_EMBEDDING_COMMON_H

#include "op_common.h"

/* indices: non-NULL, int64 or int32, 0 to FCT_MAX_DIMS - 1 dims (y adds
 * one), on ref's device; *count = its number of elements. */
fct_status fct_check_indices(fct_context* ctx, const DLTensor* indices, const DLTensor* ref,
                             const char* ref_name, int64_t* count);

/* padding_idx: -1 (none) or in [0, num). */
fct_status fct_check_padding_idx(fct_context* ctx, int64_t padding_idx, int64_t num);

/* t (y, grad_y) must be [*indices.shape, dim] with ref's dtype and device.
 * dim_what says where dim comes from. */
fct_status fct_check_lookup_rows(fct_context* ctx, const char* name, const DLTensor* t,
                                 const DLTensor* indices, int64_t dim, const char* dim_what,
                                 const DLTensor* ref, const char* ref_name);

/* Indices per chunk when each costs per_index bytes of workspace: the
 * chunk budget of the device (op_common.h), at most `count` and 2^31 - 1
 * (GEMM rows), 3 under FCT_FLAG_SMALL_CHUNKS; 0 only when count is 0. */
int64_t fct_embedding_chunk(const fct_context* ctx, bool cuda, int64_t count, size_t per_index);

/* One pass over all the indices: fails with FCT_ERR_INVALID_VALUE naming
 * `indices` when any lies outside [0, num). what_num names num in the
 * message. scratch: 256 bytes of workspace. */
fct_status fct_validate_indices(const fct_exec* e, const DLTensor* indices, int64_t count,
                                int64_t num, const char* what_num, char* scratch);

#endif /* FCT_EMBEDDING_COMMON_H */
