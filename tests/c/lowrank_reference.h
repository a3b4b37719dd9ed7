/* Float64 reference of y = x·Vᵀ·Uᵀ + b and its gradients (C tests). */
#ifndef FCT_LOWRANK_REFERENCE_H
#define FCT_LOWRANK_REFERENCE_H

#include "test_util.h"

typedef struct ref {
  double *t, *y, *gt, *gx, *gU, *gV, *gb; /* dense row-major, owned */
} ref;

/* Every quantity for x [M, in] (any layout), U [out, r], V [r, in], b [out]
 * (nullable) and grad_y g [M, out] (nullable: forward only). */
ref reference(const test_tensor* x, const test_tensor* U, const test_tensor* V,
              const test_tensor* b, const test_tensor* g, int64_t M, int64_t in,
              int64_t out, int64_t r);
void ref_free(ref* R);

#endif
