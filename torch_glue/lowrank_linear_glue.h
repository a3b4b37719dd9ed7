/* Boxed kernels of the low-rank linear ops, registered in register.c. */
#ifndef FCT_LOWRANK_LINEAR_GLUE_H
#define FCT_LOWRANK_LINEAR_GLUE_H

#include "torch_shim.h"

void fct_lowrank_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);
void fct_lowrank_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                        uint64_t num_outputs);
void fct_lowrank_linear_flat_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);
void fct_lowrank_linear_flat_backward_kernel(StableIValue* stack, uint64_t num_args,
                                             uint64_t num_outputs);

#endif
