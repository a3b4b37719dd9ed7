/*
 * Registration of factorch's ops with torch's dispatcher, from C, when this
 * library is loaded (torch.ops.load_library). Schemas live here, in one
 * place; fake kernels and autograd are added from Python (factorch/_ops.py).
 *
 * Optional arguments are avoided (freeing an optional's heap slot from C is
 * possible only from torch 2.13): an absent bias is an empty tensor.
 *
 * Ops with `int[]` arguments (the tensorized layers' mode sizes and ranks)
 * are registered with torch_library_impl and build version 2.10, from which
 * on a list reaches the kernel as a StableListHandle that C can read and
 * free (torch_list_*); the others keep aoti_torch_library_impl.
 */
#include "factorch.h"
#include "kernels.h"
#include "torch_shim.h"

typedef struct op_entry {
  const char* schema;
  const char* name;
  fct_boxed_kernel kernel;
  bool lists; /* takes int[] arguments: register with torch_library_impl */
} op_entry;

static const op_entry kOps[] = {
    {"lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor bias) -> (Tensor, Tensor)",
     "lowrank_linear", fct_lowrank_linear_kernel, false},
    {"lowrank_linear_backward(Tensor grad_y, Tensor x, Tensor U, Tensor V, Tensor t, "
     "bool need_x, bool need_U, bool need_V, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)",
     "lowrank_linear_backward", fct_lowrank_linear_backward_kernel, false},
    /* The same on a layer's flat parameter: V [rank, in] then U [out_features, rank]. */
    {"lowrank_linear_flat(Tensor x, Tensor weights, Tensor bias, int out_features, int rank) "
     "-> (Tensor, Tensor)",
     "lowrank_linear_flat", fct_lowrank_linear_flat_kernel, false},
    {"lowrank_linear_flat_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor t, "
     "int out_features, int rank, bool need_x, bool need_weights, bool need_bias) "
     "-> (Tensor, Tensor, Tensor)",
     "lowrank_linear_flat_backward", fct_lowrank_linear_flat_backward_kernel, false},
    /* Tensorized linear layers: weights is the flat parameter
     * holding every factor or core (torch_glue/cp_linear_glue.c etc.). */
    {"cp_linear(Tensor x, Tensor weights, Tensor bias, int[] in_modes, int[] out_modes, "
     "int rank) -> (Tensor, Tensor)",
     "cp_linear", fct_cp_linear_kernel, true},
    {"cp_linear_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor z, int[] in_modes, "
     "int[] out_modes, int rank, bool need_x, bool need_weights, bool need_bias) "
     "-> (Tensor, Tensor, Tensor)",
     "cp_linear_backward", fct_cp_linear_backward_kernel, true},
    /* states: what the forward keeps for the backward ([0] unless keep and
     * the shapes keep them: fct_tucker_linear_states). */
    {"tucker_linear(Tensor x, Tensor weights, Tensor bias, int[] in_modes, int[] out_modes, "
     "int[] in_ranks, int[] out_ranks, bool keep) -> (Tensor, Tensor)",
     "tucker_linear", fct_tucker_linear_kernel, true},
    {"tucker_linear_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor states, "
     "int[] in_modes, int[] out_modes, int[] in_ranks, int[] out_ranks, bool need_x, "
     "bool need_weights, bool need_bias) -> (Tensor, Tensor, Tensor)",
     "tucker_linear_backward", fct_tucker_linear_backward_kernel, true},
    {"tt_linear(Tensor x, Tensor weights, Tensor bias, int[] in_modes, int[] out_modes, "
     "int[] ranks) -> Tensor",
     "tt_linear", fct_tt_linear_kernel, true},
    {"tt_linear_backward(Tensor grad_y, Tensor x, Tensor weights, int[] in_modes, "
     "int[] out_modes, int[] ranks, bool need_x, bool need_weights, bool need_bias) "
     "-> (Tensor, Tensor, Tensor)",
     "tt_linear_backward", fct_tt_linear_backward_kernel, true},
    /* Factorized convolutions: a chain of convolution stages
     * (torch_glue/conv_glue.c; layouts in factorch/_conv_layout.py). The
     * stage lists hold the input's height and width, so they are SymInt[]:
     * torch.export and dynamic torch.compile keep the sizes symbolic (an
     * int[] would specialise them); eager calls hand C plain int64s. */
    {"conv_chain(Tensor x, Tensor weights, Tensor bias, SymInt[] stages, SymInt[] out_shape, "
     "bool keep) -> (Tensor, Tensor)",
     "conv_chain", fct_conv_chain_kernel, true},
    {"conv_chain_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor saved, SymInt[] stages, "
     "bool need_x, bool need_weights, bool need_bias) -> (Tensor, Tensor, Tensor)",
     "conv_chain_backward", fct_conv_chain_backward_kernel, true},
    /* Factorized embeddings (torch_glue/embedding_glue.c).
     * padding_idx: -1 for none. TT weights: the flat parameter of cores. */
    {"lowrank_embedding(Tensor indices, Tensor U, Tensor V, int padding_idx) -> Tensor",
     "lowrank_embedding", fct_lowrank_embedding_kernel, false},
    {"lowrank_embedding_backward(Tensor grad_y, Tensor indices, Tensor U, Tensor V, "
     "int padding_idx, bool need_U, bool need_V) -> (Tensor, Tensor)",
     "lowrank_embedding_backward", fct_lowrank_embedding_backward_kernel, false},
    {"tt_embedding(Tensor indices, Tensor weights, int num_embeddings, int[] modes, "
     "int[] dims, int[] ranks, int padding_idx) -> Tensor",
     "tt_embedding", fct_tt_embedding_kernel, true},
    {"tt_embedding_backward(Tensor grad_y, Tensor indices, Tensor weights, int num_embeddings, "
     "int[] modes, int[] dims, int[] ranks, int padding_idx) -> Tensor",
     "tt_embedding_backward", fct_tt_embedding_backward_kernel, true},
    /* LoRA linear (torch_glue/lora_linear_glue.c): base_kind 0 dense (W),
     * 1 low-rank (U, V), 2 given (base_out); absent tensors are empty ones.
     * seed: a one-element int64 cpu tensor, read only when dropout > 0. */
    {"lora_linear(Tensor x, Tensor A, Tensor B, Tensor W, Tensor U, Tensor V, Tensor base_out, "
     "Tensor bias, Tensor seed, int base_kind, float scale, float dropout) -> (Tensor, Tensor)",
     "lora_linear", fct_lora_linear_kernel, false},
    {"lora_linear_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor W, Tensor U, "
     "Tensor V, Tensor t, Tensor seed, int base_kind, float scale, float dropout, bool need_x, "
     "bool need_A, bool need_B, bool need_W, bool need_U, bool need_V, bool need_bias) "
     "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
     "lora_linear_backward", fct_lora_linear_backward_kernel, false},
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
    if (kOps[i].lists) {
      rc |= torch_library_impl(g_cpu, kOps[i].name, kOps[i].kernel, FCT_TORCH_VERSION_2_10);
      rc |= torch_library_impl(g_cuda, kOps[i].name, kOps[i].kernel, FCT_TORCH_VERSION_2_10);
    } else {
      rc |= aoti_torch_library_impl(g_cpu, kOps[i].name, kOps[i].kernel);
      rc |= aoti_torch_library_impl(g_cuda, kOps[i].name, kOps[i].kernel);
    }
  }
  g_status = rc;
  fct_cpu_set_thread_pool(torch_parallel_for, torch_threads);
}
