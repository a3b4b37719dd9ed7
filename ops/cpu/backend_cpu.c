/* The CPU backend table (backend.h): OpenBLAS GEMMs and C element kernels. */
#include "kernels_cpu.h"

const fct_backend fct_cpu_backend = {
    .pack = fct_cpu_pack,
    .lowrank_forward = fct_cpu_lowrank_forward,
    .lowrank_backward = fct_cpu_lowrank_backward,
    .count_nonfinite = fct_cpu_count_nonfinite,
    .gemm = fct_cpu_gemm_entry,
    .gemm_reduce = fct_cpu_gemm_reduce_entry,
    .fill_rows = fct_cpu_fill_rows_entry,
    .column_sums = fct_cpu_column_sums_entry,
    .zero = fct_cpu_zero_entry,
    .khatri_rao = fct_cpu_khatri_rao,
    .khatri_rao_grad = fct_cpu_khatri_rao_grad,
};
