/* The CPU backend table (backend.h): OpenBLAS GEMMs and C element kernels. */
#include "kernels_cpu.h"
#include "gemm_cpu.h"
#include "embedding_cpu.h" /* factorized embeddings */

const fct_backend fct_cpu_backend = {
    .pack = fct_cpu_pack,
    .count_nonfinite = fct_cpu_count_nonfinite,
    .gemm = fct_cpu_gemm_entry,
    .gemm_reduce = fct_cpu_gemm_reduce_entry,
    .fill_rows = fct_cpu_fill_rows_entry,
    .column_sums = fct_cpu_column_sums_entry,
    .zero = fct_cpu_zero_entry,
    .khatri_rao = fct_cpu_khatri_rao,
    .khatri_rao_grad = fct_cpu_khatri_rao_grad,
    .im2col = fct_cpu_im2col,
    .col2im = fct_cpu_col2im,
    .depthwise_forward = fct_cpu_depthwise_forward,
    .depthwise_backward_input = fct_cpu_depthwise_backward_input,
    .depthwise_backward_weight = fct_cpu_depthwise_backward_weight,
    .channel_bias = fct_cpu_channel_bias,
    .channel_sums = fct_cpu_channel_sums,
    .workers = fct_cpu_workers,
    .parallel = fct_cpu_parallel,
    /* Factorized embeddings (ops/cpu/embedding_cpu.c). */
    .embedding_indices = fct_cpu_embedding_indices,
    .embedding_gather = fct_cpu_embedding_gather,
    .embedding_scatter_add = fct_cpu_embedding_scatter_add,
    .tt_embedding_rows = fct_cpu_tt_embedding_rows,
    .tt_embedding_grad = fct_cpu_tt_embedding_grad,
    /* LoRA linear (ops/cpu/lora_cpu.c). */
    .gemm_scaled = fct_cpu_gemm_scaled_entry,
    .dropout = fct_cpu_dropout,
};
