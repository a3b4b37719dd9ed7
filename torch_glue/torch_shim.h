/*
 * torch_shim.h: the few functions of libtorch's C ABI (the AOTI shim) that
 * factorch calls, declared here because torch's own shim headers are C++.
 * tests/c/test_torch_shim_abi.cpp checks each declaration against torch's
 * headers. Every function returns 0 on success. Present in torch 2.7 - 2.15.
 */
#ifndef FCT_TORCH_SHIM_H
#define FCT_TORCH_SHIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t AOTITorchError;
typedef struct AtenTensorOpaque* AtenTensorHandle;
typedef struct TorchLibraryOpaque* TorchLibraryHandle;
typedef uint64_t StableIValue;
typedef void (*fct_boxed_kernel)(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);

/* Registration. A library handle unregisters its ops when deleted: factorch
 * keeps its handles for the life of the process. */
AOTITorchError aoti_torch_library_init_def(const char* ns, const char* file, uint32_t line,
                                           TorchLibraryHandle* ret);
AOTITorchError aoti_torch_library_init_impl(const char* ns, const char* dispatch_key,
                                            const char* file, uint32_t line,
                                            TorchLibraryHandle* ret);
AOTITorchError aoti_torch_library_def(TorchLibraryHandle self, const char* schema);
AOTITorchError aoti_torch_library_impl(TorchLibraryHandle self, const char* name,
                                       fct_boxed_kernel fn);

/* Tensor accessors. Pointers returned are borrowed from the tensor. */
AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle t, void** ret);
AOTITorchError aoti_torch_get_sizes(AtenTensorHandle t, int64_t** ret);
AOTITorchError aoti_torch_get_strides(AtenTensorHandle t, int64_t** ret);
AOTITorchError aoti_torch_get_dim(AtenTensorHandle t, int64_t* ret);
AOTITorchError aoti_torch_get_dtype(AtenTensorHandle t, int32_t* ret);
AOTITorchError aoti_torch_get_device_type(AtenTensorHandle t, int32_t* ret);
AOTITorchError aoti_torch_get_device_index(AtenTensorHandle t, int32_t* ret);

int32_t aoti_torch_dtype_float32(void);
int32_t aoti_torch_dtype_float64(void);
int32_t aoti_torch_dtype_float16(void);
int32_t aoti_torch_dtype_bfloat16(void);
int32_t aoti_torch_dtype_uint8(void);
int32_t aoti_torch_dtype_int32(void);
int32_t aoti_torch_dtype_int64(void);
int32_t aoti_torch_dtype_bool(void);
int32_t aoti_torch_device_type_cpu(void);
int32_t aoti_torch_device_type_cuda(void);

/* Allocation through torch's (caching) allocator; returns a new owned handle. */
AOTITorchError aoti_torch_empty_strided(int64_t ndim, const int64_t* sizes,
                                        const int64_t* strides, int32_t dtype,
                                        int32_t device_type, int32_t device_index,
                                        AtenTensorHandle* ret);
AOTITorchError aoti_torch_delete_tensor_object(AtenTensorHandle t);

/* Throws a C++ exception (a Python RuntimeError) when cond is false: it
 * unwinds through C frames, so release everything owned before calling. */
void aoti_torch_check(bool cond, const char* func, const char* file, uint32_t line,
                      const char* msg);

/* torch's intra-op thread pool (stable shim, torch >= 2.10). */
typedef void (*fct_torch_parallel_func)(int64_t begin, int64_t end, void* ctx);
AOTITorchError torch_parallel_for(int64_t begin, int64_t end, int64_t grain_size,
                                  fct_torch_parallel_func func, void* ctx);
AOTITorchError torch_get_num_threads(uint32_t* out_num_threads);

/* Kernels registered with torch_library_impl and a build version >= 2.10
 * receive list arguments (`int[]`) as an owned StableListHandle of
 * StableIValues: read them with torch_list_size / torch_list_get_item and
 * free them with torch_delete_list (stable shim, torch >= 2.10). */
typedef struct StableListOpaque* StableListHandle;
AOTITorchError torch_library_impl(TorchLibraryHandle self, const char* name, fct_boxed_kernel fn,
                                  uint64_t extension_build_version);
AOTITorchError torch_list_size(StableListHandle list_handle, size_t* size);
AOTITorchError torch_list_get_item(StableListHandle list_handle, size_t index,
                                   StableIValue* element);
AOTITorchError torch_delete_list(StableListHandle list_handle);
/* The build version passed to torch_library_impl: the oldest torch whose
 * conventions the kernels follow (TORCH_VERSION_2_10_0 in torch's
 * headers/version.h). */
#define FCT_TORCH_VERSION_2_10 ((2ULL << 56) | (10ULL << 48))

/* CUDA-only (libtorch_cuda); looked up at run time, see tensor_view.c. */
typedef struct CUDAGuardOpaque* CUDAGuardHandle;
typedef AOTITorchError (*fct_get_stream_fn)(int32_t device_index, void** ret_stream);
typedef AOTITorchError (*fct_create_guard_fn)(int32_t device_index, CUDAGuardHandle* ret);
typedef AOTITorchError (*fct_delete_guard_fn)(CUDAGuardHandle guard);

#ifdef __cplusplus
}
#endif

#endif /* FCT_TORCH_SHIM_H */
