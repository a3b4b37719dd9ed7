/* Float64 references shared by the tests of the tensorized linear ops
 * (CP, Tucker, TT): a dense W reconstructed naively from the factors, then
 * y = x·Wᵀ + b and its gradients; factor gradients by the multilinearity of
 * W (see ref_param_grad), independent of how the ops contract. */
#ifndef FCT_TEST_TENSORIZED_H
#define FCT_TEST_TENSORIZED_H

#include "test_util.h"

/* Dense row-major float64 copy of a test tensor's logical elements. */
double* tz_to_double(const test_tensor* t);

/* The mode indices idx[0..n) of a flat index over modes of sizes dims
 * (row-major: the last mode varies fastest). */
void tz_unravel(int64_t flat, int n, const int64_t* dims, int64_t* idx);

/* W [out, in] from the parameters (dense float64 copies, in the op's order). */
typedef void (*tz_reconstruct_fn)(const void* model, double* const* params, double* W);

/* y [M, out] = x [M, in] · Wᵀ + b (b nullable). */
void tz_forward(const double* x, const double* W, const double* b, int64_t M, int64_t in,
                int64_t out, double* y);

/* gx [M, in] = g · W, gW [out, in] = gᵀ · x, gb [out] = Σ_M g. */
void tz_backward(const double* x, const double* W, const double* g, int64_t M, int64_t in,
                 int64_t out, double* gx, double* gW, double* gb);

/* grad [nk] of ⟨gW, W⟩ w.r.t. params[k] (nk elements): W is linear in each
 * parameter tensor, so the derivative along entry p is ⟨gW, W(params[k] =
 * e_p)⟩, computed by reconstructing W with params[k] replaced by e_p. */
void tz_param_grad(tz_reconstruct_fn fn, const void* model, double** params, int k, int64_t nk,
                   const double* gW, int64_t in, int64_t out, double* grad);

/* Every float64 reference quantity of one case of y = x·W(params)ᵀ + b:
 * x (any dims, folded to [M, in]), the np parameter tensors in the op's
 * order (W from fn), b nullable, g = grad_y [M, out]. All dense row-major,
 * owned (tz_ref_free). */
typedef struct tz_ref {
  double *x, *g, *b; /* copies of the inputs (b NULL without bias) */
  double* P[9];      /* copies of the parameters */
  double *W, *y;     /* W [out, in], y [M, out] */
  double *gx, *gW, *gb;
  double* gP[9]; /* gradient of each parameter (tz_param_grad) */
  int np;
} tz_ref;
tz_ref tz_reference(tz_reconstruct_fn fn, const void* model, const test_tensor* x,
                    test_tensor* const* params, int np, const test_tensor* b,
                    const test_tensor* g, int64_t M, int64_t in, int64_t out);
void tz_ref_free(tz_ref* R);

#endif
