/* kernels_cpu.h (internal): the CPU backend's element kernels, shared by the
 * low-rank op's kernels and the primitives table (backend_cpu.c). */
#ifndef FCT_KERNELS_CPU_H
#define FCT_KERNELS_CPU_H

#include "backend.h"

/* An element loop compiled twice, for AVX2 + FMA and for the baseline
 * x86-64, the copy taken chosen once at load time from the CPU (GCC/clang
 * target_clones). The library itself targets baseline x86-64. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FCT_SIMD_CLONES __attribute__((target_clones("arch=haswell", "default")))
#endif
#endif
#ifndef FCT_SIMD_CLONES
#define FCT_SIMD_CLONES
#endif

/* Every row of y [rows, cols] = bias [cols] (element stride bs). */
void fct_cpu_fill_rows(fct_dtype dt, const fct_mat* y, const char* bias, int64_t bs);

/* out [cols] = column sums of g [rows, cols], accumulated in float64. */
void fct_cpu_column_sums(fct_dtype dt, const fct_mat* g, char* out);

/* The fct_backend entries (backend.h documents each). */
fct_status fct_cpu_pack(fct_context* ctx, const DLTensor* src, char* dst);
fct_status fct_cpu_count_nonfinite(fct_context* ctx, const DLTensor* t, char* scratch,
                                   int64_t* count);
fct_status fct_cpu_gemm_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* A,
                              const fct_mat* B, const fct_mat* C, double beta, int64_t batch,
                              int64_t sa, int64_t sb, int64_t sc);
fct_status fct_cpu_gemm_reduce_entry(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                     double beta, int64_t batch, int64_t sa, int64_t sb,
                                     char* scratch, size_t scratch_bytes);
fct_status fct_cpu_fill_rows_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* y,
                                   const char* bias, int64_t bs);
fct_status fct_cpu_column_sums_entry(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_mat* g, char* out);
fct_status fct_cpu_zero_entry(fct_context* ctx, int device, fct_dtype dt, const fct_mat* C);
fct_status fct_cpu_khatri_rao(fct_context* ctx, int device, fct_dtype dt, int nf,
                              const fct_mat* F, const fct_mat* out);
fct_status fct_cpu_khatri_rao_grad(fct_context* ctx, int device, fct_dtype dt, const fct_mat* gK,
                                   int64_t npre, int64_t nk, int64_t nsuf, const fct_mat* pre,
                                   const fct_mat* suf, const fct_mat* gF);

/* The factorized convolutions' primitives (conv_kernels_cpu.c). */
fct_status fct_cpu_im2col(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                          int64_t n, const char* in, char* col);
fct_status fct_cpu_col2im(fct_context* ctx, int device, fct_dtype dt, const fct_conv_geom* g,
                          int64_t n, const char* col, char* in);
fct_status fct_cpu_depthwise_forward(fct_context* ctx, int device, fct_dtype dt,
                                     const fct_conv_geom* g, int64_t n, const char* in,
                                     const char* w, char* out);
fct_status fct_cpu_depthwise_backward_input(fct_context* ctx, int device, fct_dtype dt,
                                            const fct_conv_geom* g, int64_t n, const char* gout,
                                            const char* w, char* gin);
fct_status fct_cpu_depthwise_backward_weight(fct_context* ctx, int device, fct_dtype dt,
                                             const fct_conv_geom* g, int64_t n, const char* in,
                                             const char* gout, char* gw, double beta);
fct_status fct_cpu_channel_bias(fct_context* ctx, int device, fct_dtype dt, int64_t n,
                                int64_t C, int64_t P, char* out, const char* bias, int64_t bs);
fct_status fct_cpu_channel_sums(fct_context* ctx, int device, fct_dtype dt, int64_t n, int64_t C,
                                int64_t P, const char* g, char* sums);

/* The LoRA op's primitives (lora_cpu.c). */
fct_status fct_cpu_gemm_scaled_entry(fct_context* ctx, int device, fct_dtype dt, double alpha,
                                     const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                     double beta);
fct_status fct_cpu_dropout(fct_context* ctx, int device, fct_dtype dt, const fct_mat* in,
                           const fct_mat* out, uint64_t seed, uint64_t threshold, double scale);

#endif
