/*
 * lora_dropout.h (internal): the LoRA op's dropout mask, one definition
 * compiled for the CPU and for CUDA devices so that both draw the same bits.
 *
 * Element i of x folded to [M, in] (i = row · in + col) is kept when
 * fct_dropout_bits(seed, i) >= threshold, threshold = p · 2^64
 * (fct_dropout_threshold), and then scaled by 1 / (1 − p). The bits are
 * splitmix64's output at position i + 1 of the stream seeded with `seed`:
 * counter based (any element on its own, in any order, on any thread), so
 * the backward regenerates the forward's mask from the seed alone.
 */
#ifndef FCT_LORA_DROPOUT_H
#define FCT_LORA_DROPOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define FCT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FCT_HOST_DEVICE inline
#endif

static FCT_HOST_DEVICE uint64_t fct_dropout_bits(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* p · 2^64 for p in [0, 1): the largest such product, (1 − 2^-53) · 2^64,
 * is below 2^64, so the conversion is exact and in range. */
static inline uint64_t fct_dropout_threshold(double p) {
  return p <= 0.0 ? 0 : (uint64_t)(p * 18446744073709551616.0);
}

#endif /* FCT_LORA_DROPOUT_H */
