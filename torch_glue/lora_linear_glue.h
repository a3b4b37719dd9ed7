/* Boxed kernels of the LoRA linear ops, registered in register.c. */
#ifndef FCT_LORA_LINEAR_GLUE_H
#define FCT_LORA_LINEAR_GLUE_H

#include "torch_shim.h"

void fct_lora_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);
void fct_lora_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                     uint64_t num_outputs);

#endif
