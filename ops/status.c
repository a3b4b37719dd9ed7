/* Status messages, version, backend registry. */
#include <stdatomic.h>

#include "backend.h"

static const char* const kMessages[FCT_STATUS_COUNT_] = {
    [FCT_OK] = "success",
    [FCT_ERR_NULL_ARGUMENT] = "a required argument is NULL",
    [FCT_ERR_DTYPE] = "unsupported or mismatched dtype",
    [FCT_ERR_DEVICE] = "unsupported or mismatched device",
    [FCT_ERR_NDIM] = "wrong number of dimensions",
    [FCT_ERR_SHAPE] = "mismatched sizes",
    [FCT_ERR_LAYOUT] = "output strides not dense or overlapping",
    [FCT_ERR_OVERFLOW] = "a size overflows the index type",
    [FCT_ERR_WORKSPACE] = "workspace missing or too small",
    [FCT_ERR_NOT_FINITE] = "NaN or Inf encountered",
    [FCT_ERR_UNSUPPORTED] = "unsupported on this build or device",
    [FCT_ERR_CUDA] = "CUDA runtime error",
    [FCT_ERR_BLAS] = "BLAS error",
    [FCT_ERR_INVALID_VALUE] = "invalid argument value",
};

const char* fct_status_string(int status) {
  if (status < 0 || status >= FCT_STATUS_COUNT_) return "unknown factorch status";
  return kMessages[status];
}

uint32_t fct_version(void) {
  return (FCT_VERSION_MAJOR << 16) | (FCT_VERSION_MINOR << 8) | FCT_VERSION_PATCH;
}

/* Set once by libfactorch_cuda's constructor, read by every call. */
static _Atomic(const fct_backend*) g_cuda_backend = NULL;

void fct_register_cuda_backend(const fct_backend* backend) {
  atomic_store(&g_cuda_backend, backend);
}

int fct_cuda_available(void) { return atomic_load(&g_cuda_backend) != NULL; }

fct_status fct_backend_for(fct_context* ctx, const char* name, const DLTensor* t,
                           const fct_backend** out) {
  *out = NULL;
  if (t->device.device_type == kDLCPU) {
    *out = &fct_cpu_backend;
    return FCT_OK;
  }
  if (t->device.device_type == kDLCUDA) {
    *out = atomic_load(&g_cuda_backend);
    if (*out) return FCT_OK;
    return fct_fail(ctx, FCT_ERR_UNSUPPORTED,
                    "%s: is a cuda tensor, but factorch's CUDA backend is not loaded "
                    "(built without CUDA, or libfactorch_cuda could not be loaded)",
                    name);
  }
  return fct_fail(ctx, FCT_ERR_DEVICE, "%s: expected a cpu or cuda tensor, got %s", name,
                  fct_device_name(t->device.device_type));
}
