/* CPU primitives of the LoRA linear op (float32, float64): the scaled GEMM
 * and the dropout mask. Entry point and checks: ops/lora_linear.c; the
 * backend table: backend_cpu.c. */
#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "lora_dropout.h"

fct_status fct_cpu_gemm_scaled_entry(fct_context* ctx, int device, fct_dtype dt, double alpha,
                                     const fct_mat* A, const fct_mat* B, const fct_mat* C,
                                     double beta) {
  (void)ctx;
  (void)device;
  fct_cpu_gemm_scaled(dt, alpha, A, B, C, beta);
  return FCT_OK;
}

typedef struct dropout_job {
  fct_dtype dt;
  const fct_mat *in, *out;
  uint64_t seed, threshold;
  double scale;
} dropout_job;

/* The mask is drawn per element from its index, so rows can go to any
 * thread in any order and give the same bits. */
#define DROPOUT_ROWS(T)                                                          \
  do {                                                                           \
    const T scale = (T)j->scale;                                                 \
    for (int64_t r = begin; r < end; ++r) {                                      \
      const T* src = (const T*)j->in->data + r * j->in->rs;                      \
      T* dst = (T*)j->out->data + r * j->out->rs;                                \
      uint64_t base = (uint64_t)r * (uint64_t)cols;                              \
      if (cs == 1)                                                               \
        for (int64_t c = 0; c < cols; ++c) {                                     \
          bool keep = fct_dropout_bits(j->seed, base + (uint64_t)c) >= j->threshold; \
          dst[c] = keep ? src[c] * scale : (T)0;                                 \
        }                                                                        \
      else                                                                       \
        for (int64_t c = 0; c < cols; ++c) {                                     \
          bool keep = fct_dropout_bits(j->seed, base + (uint64_t)c) >= j->threshold; \
          dst[c] = keep ? src[c * cs] * scale : (T)0;                            \
        }                                                                        \
    }                                                                            \
  } while (0)

static void dropout_rows(int64_t begin, int64_t end, void* arg) {
  const dropout_job* j = arg;
  int64_t cols = j->in->cols, cs = j->in->cs;
  if (j->dt == FCT_F32) DROPOUT_ROWS(float);
  else DROPOUT_ROWS(double);
}

fct_status fct_cpu_dropout(fct_context* ctx, int device, fct_dtype dt, const fct_mat* in,
                           const fct_mat* out, uint64_t seed, uint64_t threshold, double scale) {
  (void)ctx;
  (void)device;
  if (in->rows == 0 || in->cols == 0) return FCT_OK;
  dropout_job job = {dt, in, out, seed, threshold, scale};
  /* About 32K elements per task: a hash is a few ns, a task hand-off ~10 us. */
  int64_t grain = (1 << 15) / in->cols + 1;
  fct_cpu_parallel(in->rows, grain, dropout_rows, &job);
  return FCT_OK;
}
