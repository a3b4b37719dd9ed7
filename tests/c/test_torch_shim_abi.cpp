// Checks that torch_glue/torch_shim.h declares torch's C shim functions with
// the same types as torch's own headers (which are C++, hence this file is
// C++; it is a test, not part of the plugin). Compiles = passes.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>

#include <cstdio>
#include <type_traits>

// Re-declaring an extern "C" function with other parameter types is a
// compile error, so including our header after torch's checks every
// declaration in it; the static_asserts below spell the main ones out.
#include "torch_shim.h"

// Handles are opaque pointers on both sides; compare everything else exactly.
#define SAME_SIG(fn, ...)                                                          \
  static_assert(std::is_same_v<decltype(&::fn), __VA_ARGS__>, #fn " signature")

SAME_SIG(aoti_torch_library_init_def,
         AOTITorchError (*)(const char*, const char*, uint32_t, TorchLibraryHandle*));
SAME_SIG(aoti_torch_library_init_impl,
         AOTITorchError (*)(const char*, const char*, const char*, uint32_t, TorchLibraryHandle*));
SAME_SIG(aoti_torch_library_def, AOTITorchError (*)(TorchLibraryHandle, const char*));
SAME_SIG(aoti_torch_library_impl,
         AOTITorchError (*)(TorchLibraryHandle, const char*, void (*)(StableIValue*, uint64_t, uint64_t)));
SAME_SIG(aoti_torch_get_data_ptr, AOTITorchError (*)(AtenTensorHandle, void**));
SAME_SIG(aoti_torch_get_sizes, AOTITorchError (*)(AtenTensorHandle, int64_t**));
SAME_SIG(aoti_torch_get_strides, AOTITorchError (*)(AtenTensorHandle, int64_t**));
SAME_SIG(aoti_torch_get_dim, AOTITorchError (*)(AtenTensorHandle, int64_t*));
SAME_SIG(aoti_torch_get_dtype, AOTITorchError (*)(AtenTensorHandle, int32_t*));
SAME_SIG(aoti_torch_get_device_type, AOTITorchError (*)(AtenTensorHandle, int32_t*));
SAME_SIG(aoti_torch_get_device_index, AOTITorchError (*)(AtenTensorHandle, int32_t*));
SAME_SIG(aoti_torch_dtype_float32, int32_t (*)());
SAME_SIG(aoti_torch_dtype_bfloat16, int32_t (*)());
SAME_SIG(aoti_torch_device_type_cuda, int32_t (*)());
SAME_SIG(aoti_torch_empty_strided,
         AOTITorchError (*)(int64_t, const int64_t*, const int64_t*, int32_t, int32_t, int32_t,
                            AtenTensorHandle*));
SAME_SIG(aoti_torch_delete_tensor_object, AOTITorchError (*)(AtenTensorHandle));
SAME_SIG(torch_parallel_for,
         AOTITorchError (*)(int64_t, int64_t, int64_t, void (*)(int64_t, int64_t, void*), void*));
SAME_SIG(torch_get_num_threads, AOTITorchError (*)(uint32_t*));
SAME_SIG(torch_library_impl,
         AOTITorchError (*)(TorchLibraryHandle, const char*, void (*)(StableIValue*, uint64_t, uint64_t),
                            uint64_t));
SAME_SIG(torch_list_size, AOTITorchError (*)(StableListHandle, size_t*));
SAME_SIG(torch_list_get_item, AOTITorchError (*)(StableListHandle, size_t, StableIValue*));
SAME_SIG(torch_delete_list, AOTITorchError (*)(StableListHandle));
static_assert(FCT_TORCH_VERSION_2_10 == TORCH_VERSION_2_10_0, "build version of list kernels");
SAME_SIG(aoti_torch_check, void (*)(bool, const char*, const char*, uint32_t, const char*));

int main() {
  std::puts("1 passed, 0 failed");
  return 0;
}
