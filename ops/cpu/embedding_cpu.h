/* embedding_cpu.h (internal): the CPU backend's primitives of the
 * factorized embeddings (backend.h documents each); ops/cpu/embedding_cpu.c. */
#ifndef FCT_EMBEDDING_CPU_H
#define FCT_EMBEDDING_CPU_H

#include "backend.h"

fct_status fct_cpu_embedding_indices(fct_context* ctx, const DLTensor* indices, int64_t begin,
                                     int64_t count, int64_t num, int64_t padding_idx,
                                     int64_t* out, char* scratch, int64_t* bad,
                                     int64_t* bad_pos, int64_t* bad_value);
fct_status fct_cpu_embedding_gather(fct_context* ctx, int device, fct_dtype dt,
                                    const fct_mat* src, const int64_t* idx, int64_t n, char* out);
fct_status fct_cpu_embedding_scatter_add(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                         const int64_t* idx, int64_t div, const char* src,
                                         int64_t ss, int64_t P, int64_t num, int64_t Q,
                                         char* dst);
fct_status fct_cpu_tt_embedding_rows(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                     char* y, char* work);
fct_status fct_cpu_tt_embedding_grad(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                     const char* gy, char* slices, char* work);

#endif
