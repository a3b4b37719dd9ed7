/*
 * Registration of factorch's ops with torch's dispatcher, from C, when this
 * library is loaded (torch.ops.load_library). Schemas live here, in one
 * place; fake kernels and autograd are added from Python (factorch/_ops.py).
 *
 * Optional arguments are avoided (freeing an optional's heap slot from C is
 * possible only from torch 2.13): an absent bias is an empty tensor.
 */
#include "factorch.h"
#include "lowrank_linear_glue.h"
#include "torch_shim.h"

typedef struct op_entry {
  const char* schema;
  const char* name;
  fct_boxed_kernel kernel;
} op_entry;

static const op_entry kOps[] = {
    {"lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor bias) -> (Tensor, Tensor)",
     "lowrank_linear", fct_lowrank_linear_kernel},
    {"lowrank_linear_backward(Tensor grad_y, Tensor x, Tensor U, Tensor V, Tensor t, "
     "bool need_x, bool need_U, bool need_V, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)",
     "lowrank_linear_backward", fct_lowrank_linear_backward_kernel},
};
enum { kNumOps = sizeof kOps / sizeof kOps[0] };

/* Kept for the life of the process: deleting a handle unregisters its ops. */
static TorchLibraryHandle g_def, g_cpu, g_cuda;
static int g_status = -1;

/* CPU kernels run their blocks in torch's thread pool rather than OpenBLAS's:
 * two pools spinning on the same cores starve each other (factorch.h). */
static int torch_threads(void) {
  uint32_t n = 1;
  return torch_get_num_threads(&n) == 0 && n > 0 ? (int)n : 1;
}

/* 0 when every op registered; read by Python to report a failed load. */
__attribute__((visibility("default"))) int fct_torch_registration_status(void) {
  return g_status;
}

__attribute__((constructor)) static void fct_register(void) {
  int rc = 0;
  rc |= aoti_torch_library_init_def("factorch", __FILE__, __LINE__, &g_def);
  rc |= aoti_torch_library_init_impl("factorch", "CPU", __FILE__, __LINE__, &g_cpu);
  rc |= aoti_torch_library_init_impl("factorch", "CUDA", __FILE__, __LINE__, &g_cuda);
  for (int i = 0; rc == 0 && i < kNumOps; ++i) {
    rc |= aoti_torch_library_def(g_def, kOps[i].schema);
    rc |= aoti_torch_library_impl(g_cpu, kOps[i].name, kOps[i].kernel);
    rc |= aoti_torch_library_impl(g_cuda, kOps[i].name, kOps[i].kernel);
  }
  g_status = rc;
  fct_cpu_set_thread_pool(torch_parallel_for, torch_threads);
}
