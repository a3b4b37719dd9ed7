/* Boxed kernels of the factorized embedding ops (torch_glue/embedding_glue.c),
 * registered in register.c. */
#ifndef FCT_EMBEDDING_GLUE_H
#define FCT_EMBEDDING_GLUE_H

#include "torch_shim.h"

void fct_lowrank_embedding_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);
void fct_lowrank_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                           uint64_t num_outputs);
void fct_tt_embedding_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);
void fct_tt_embedding_backward_kernel(StableIValue* stack, uint64_t num_args,
                                      uint64_t num_outputs);

#endif
