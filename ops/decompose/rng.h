/*
 * rng.h (internal): the decompositions' random numbers. Counter-based: the
 * i-th number of stream `stream` under `seed` is a hash of (seed, stream, i),
 * so any element can be computed on its own, by any thread, on the CPU or a
 * GPU, and the result never depends on how work is split. The hash is
 * splitmix64's finaliser (Steele, Lea, Flood 2014), which passes BigCrush
 * when used on a counter; normals come from Box-Muller (cosine branch).
 * Usable from C and from CUDA device code.
 */
#ifndef FCT_RNG_H
#define FCT_RNG_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define FCT_HD static __host__ __device__ __forceinline__
#else
#define FCT_HD static inline
#endif

/* Streams: one per use, so that e.g. CP's factor n never reuses the numbers
 * of factor n-1. */
#define FCT_RNG_SKETCH 0x5eed0001ull      /* randomized_svd's test matrix */
#define FCT_RNG_FACTOR(n) (0x5eed0100ull + (uint64_t)(n)) /* init of factor n */

FCT_HD uint64_t fct_mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
FCT_HD double fct_rng_uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  uint64_t key = fct_mix64(seed ^ fct_mix64(stream));
  return (double)(fct_mix64(key + i * 0xD1B54A32D192ED03ull) >> 11) * 0x1.0p-53;
}

/* Standard normals 2·pair and 2·pair + 1 (both Box-Muller branches from
 * one pair of uniforms). 1 - u lies in (0, 1], so the log is finite. */
FCT_HD void fct_rng_normal_pair(uint64_t seed, uint64_t stream, uint64_t pair, double* a,
                                double* b) {
  double u1 = fct_rng_uniform(seed, stream, 2 * pair);
  double u2 = fct_rng_uniform(seed, stream, 2 * pair + 1);
  double rad = sqrt(-2.0 * log(1.0 - u1)), ang = 6.283185307179586 * u2;
  *a = rad * cos(ang);
  *b = rad * sin(ang);
}

/* Standard normal number i (the same value the pairs give). */
FCT_HD double fct_rng_normal(uint64_t seed, uint64_t stream, uint64_t i) {
  double a, b;
  fct_rng_normal_pair(seed, stream, i >> 1, &a, &b);
  return (i & 1) ? b : a;
}

#endif /* FCT_RNG_H */
