/* embedding_cuda.cuh (internal to ops/cuda): the CUDA backend's primitives
 * of the factorized embeddings (backend.h documents each); their kernels
 * are in embedding_cuda.cu. C linkage, hidden visibility. */
#ifndef FCT_EMBEDDING_CUDA_CUH
#define FCT_EMBEDDING_CUDA_CUH

#include "backend.h"

extern "C" {

fct_status fct_cuda_embedding_indices(fct_context* ctx, const DLTensor* indices, int64_t begin,
                                      int64_t count, int64_t num, int64_t padding_idx,
                                      int64_t* out, char* scratch, int64_t* bad,
                                      int64_t* bad_pos, int64_t* bad_value);
fct_status fct_cuda_embedding_gather(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* src, const int64_t* idx, int64_t n,
                                     char* out);
fct_status fct_cuda_embedding_scatter_add(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                          const int64_t* idx, int64_t div, const char* src,
                                          int64_t ss, int64_t P, int64_t num, int64_t Q,
                                          char* dst);
fct_status fct_cuda_tt_embedding_rows(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                      char* y, char* work);
fct_status fct_cuda_tt_embedding_grad(fct_context* ctx, int device, fct_dtype dt,
                                      const fct_tt_emb_geom* g, const int64_t* idx, int64_t n,
                                      const char* gy, char* slices, char* work);

} /* extern "C" */

#endif
