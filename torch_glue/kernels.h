/*
 * kernels.h (internal): every boxed kernel that register.c registers with
 * torch's dispatcher, by op family; the schemas are in register.c.
 *
 * The boxed calling convention. torch calls a kernel with the op's
 * arguments in stack[0 .. num_args), one 64-bit StableIValue each, in schema
 * order:
 *   Tensor           an AtenTensorHandle the kernel owns and must delete;
 *   int, SymInt      the int64's bits;
 *   float            the bits of a double;
 *   bool             the low byte (the others are not cleared);
 *   int[], SymInt[]  (ops registered with torch_library_impl) a
 *                    StableListHandle the kernel owns and must delete.
 * The kernel writes the op's num_outputs results back to stack[0 ..
 * num_outputs) as new tensor handles, which torch then owns. To fail it
 * releases what it owns and raises through aoti_torch_check, which throws a
 * C++ exception through these C frames (the library is built with
 * -fexceptions). glue_common.h decodes the slots; tensor_view.h owns the
 * handles and raises.
 */
#ifndef FCT_KERNELS_H
#define FCT_KERNELS_H

#include "torch_shim.h"

/* The type of a boxed kernel (the function behind torch_shim.h's
 * fct_boxed_kernel pointer). */
typedef void fct_boxed_kernel_fn(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);

/* Low-rank linear, on U and V (lowrank_linear_glue.c). */
fct_boxed_kernel_fn fct_lowrank_linear_kernel;
fct_boxed_kernel_fn fct_lowrank_linear_backward_kernel;
/* Low-rank linear on a layer's flat parameter (lowrank_linear_glue.c). */
fct_boxed_kernel_fn fct_lowrank_linear_flat_kernel;
fct_boxed_kernel_fn fct_lowrank_linear_flat_backward_kernel;

/* Tensorized linear layers on a flat parameter (cp_linear_glue.c,
 * tucker_linear_glue.c, tt_linear_glue.c). */
fct_boxed_kernel_fn fct_cp_linear_kernel;
fct_boxed_kernel_fn fct_cp_linear_backward_kernel;
fct_boxed_kernel_fn fct_tucker_linear_kernel;
fct_boxed_kernel_fn fct_tucker_linear_backward_kernel;
fct_boxed_kernel_fn fct_tt_linear_kernel;
fct_boxed_kernel_fn fct_tt_linear_backward_kernel;

/* Factorized convolutions: a chain of convolution stages (conv_glue.c). */
fct_boxed_kernel_fn fct_conv_chain_kernel;
fct_boxed_kernel_fn fct_conv_chain_backward_kernel;

/* Factorized embeddings, low-rank and Tensor-Train (embedding_glue.c). */
fct_boxed_kernel_fn fct_lowrank_embedding_kernel;
fct_boxed_kernel_fn fct_lowrank_embedding_backward_kernel;
fct_boxed_kernel_fn fct_tt_embedding_kernel;
fct_boxed_kernel_fn fct_tt_embedding_backward_kernel;

/* LoRA linear (lora_linear_glue.c). */
fct_boxed_kernel_fn fct_lora_linear_kernel;
fct_boxed_kernel_fn fct_lora_linear_backward_kernel;

#endif
