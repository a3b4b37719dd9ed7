/* Torch tensor handles as DLTensor views, allocation through torch, the CUDA
 * device guard and stream, and raising errors into Python. */
#define _GNU_SOURCE
#include "tensor_view.h"

#include "fct_tensor.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static DLDataType dl_dtype(int32_t d) {
  DLDataType t = {kDLFloat, 32, 1};
  if (d == aoti_torch_dtype_float32()) return t;
  if (d == aoti_torch_dtype_float64()) return (DLDataType){kDLFloat, 64, 1};
  if (d == aoti_torch_dtype_float16()) return (DLDataType){kDLFloat, 16, 1};
  if (d == aoti_torch_dtype_bfloat16()) return (DLDataType){kDLBfloat, 16, 1};
  if (d == aoti_torch_dtype_int64()) return (DLDataType){kDLInt, 64, 1};
  if (d == aoti_torch_dtype_int32()) return (DLDataType){kDLInt, 32, 1};
  if (d == aoti_torch_dtype_uint8()) return (DLDataType){kDLUInt, 8, 1};
  if (d == aoti_torch_dtype_bool()) return (DLDataType){kDLBool, 8, 1};
  return (DLDataType){kDLOpaqueHandle, 0, 1}; /* reported as unsupported */
}

static int32_t dl_device_type(int32_t torch_device) {
  if (torch_device == aoti_torch_device_type_cpu()) return kDLCPU;
  if (torch_device == aoti_torch_device_type_cuda()) return kDLCUDA;
  return kDLExtDev; /* meta, mps, ...: reported as unsupported */
}

void fct_torch_view(AtenTensorHandle h, DLTensor* out) {
  void* data = NULL;
  int64_t ndim = 0, *sizes = NULL, *strides = NULL;
  int32_t dtype = 0, dev = 0, idx = 0;
  aoti_torch_get_data_ptr(h, &data);
  aoti_torch_get_dim(h, &ndim);
  aoti_torch_get_sizes(h, &sizes);
  aoti_torch_get_strides(h, &strides);
  aoti_torch_get_dtype(h, &dtype);
  aoti_torch_get_device_type(h, &dev);
  aoti_torch_get_device_index(h, &idx);
  memset(out, 0, sizeof *out);
  out->data = data; /* storage offset already applied */
  out->ndim = (int32_t)ndim;
  out->shape = sizes;
  out->strides = strides;
  out->dtype = dl_dtype(dtype);
  out->device.device_type = dl_device_type(dev);
  out->device.device_id = idx < 0 ? 0 : idx;
}

/* CUDA entry points of libtorch_cuda, found once at run time so that this
 * library also loads with a CPU-only torch. */
static fct_get_stream_fn g_get_stream;
static fct_create_guard_fn g_create_guard;
static fct_delete_guard_fn g_delete_guard;
static pthread_once_t g_cuda_once = PTHREAD_ONCE_INIT;

static void* find_symbol(const char* name) {
  void* p = dlsym(RTLD_DEFAULT, name);
  if (p) return p;
  void* lib = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);
  if (!lib) return NULL;
  p = dlsym(lib, name);
  dlclose(lib); /* RTLD_NOLOAD took a reference; torch keeps its own */
  return p;
}

static void load_cuda_symbols(void) {
  g_get_stream = (fct_get_stream_fn)find_symbol("aoti_torch_get_current_cuda_stream");
  g_create_guard = (fct_create_guard_fn)find_symbol("aoti_torch_create_cuda_guard");
  g_delete_guard = (fct_delete_guard_fn)find_symbol("aoti_torch_delete_cuda_guard");
}

static _Atomic uint32_t g_flags[2];

__attribute__((visibility("default"))) void fct_torch_set_flags(int cuda, uint32_t flags) {
  atomic_store(&g_flags[cuda ? 1 : 0], flags);
}

uint32_t fct_torch_flags(int32_t device_type) {
  return atomic_load(&g_flags[device_type == aoti_torch_device_type_cuda() ? 1 : 0]);
}

static bool fail(fct_call* c, const char* msg) {
  snprintf(c->error, sizeof c->error, "%s", msg);
  return false;
}

static bool call_begin(fct_call* c, AtenTensorHandle h) {
  aoti_torch_get_device_type(h, &c->device_type);
  aoti_torch_get_device_index(h, &c->device_index);
  aoti_torch_get_dtype(h, &c->dtype);
  c->ctx.error = c->error;
  c->ctx.error_bytes = sizeof c->error;
  c->ctx.flags = fct_torch_flags(c->device_type);
  if (c->device_type != aoti_torch_device_type_cuda()) return true;
  pthread_once(&g_cuda_once, load_cuda_symbols);
  if (!g_get_stream || !g_create_guard || !g_delete_guard)
    return fail(c, "factorch: torch's CUDA entry points (libtorch_cuda) were not found");
  if (g_create_guard(c->device_index, &c->guard) != 0)
    return fail(c, "factorch: could not set the CUDA device");
  if (g_get_stream(c->device_index, &c->ctx.stream) != 0)
    return fail(c, "factorch: could not get the current CUDA stream");
  return true;
}

void fct_call_start(fct_call* c, int input) {
  if (!call_begin(c, c->owned.h[input])) fct_call_raise(c, FCT_ERR_CUDA);
}

/* A new contiguous tensor on the call's device, recorded in c->owned.
 * NULL on failure (message set). */
static AtenTensorHandle call_empty(fct_call* c, int32_t dtype, int64_t ndim,
                                   const int64_t* sizes) {
  int64_t strides[FCT_MAX_DIMS];
  if (ndim > FCT_MAX_DIMS) {
    fail(c, "factorch: too many dims for an output");
    return NULL;
  }
  int64_t s = 1;
  for (int64_t i = ndim - 1; i >= 0; --i) {
    strides[i] = s;
    /* Sizes come from the caller's lists and tensors (an expanded batch, TT
     * embedding dims multiplying past 2^63 / rows): checked, as `s *=` would
     * overflow before torch refused the size. */
    if (sizes[i] < 0 || __builtin_mul_overflow(s, sizes[i] > 0 ? sizes[i] : 1, &s)) {
      fail(c, "factorch: an output's sizes are negative or overflow int64");
      return NULL;
    }
  }
  AtenTensorHandle h = NULL;
  if (c->owned.n >= FCT_MAX_HANDLES ||
      aoti_torch_empty_strided(ndim, sizes, strides, dtype, c->device_type, c->device_index,
                               &h) != 0) {
    fail(c, "factorch: allocating an output through torch failed (out of memory?)");
    return NULL;
  }
  c->owned.h[c->owned.n++] = h;
  return h;
}

DLTensor* fct_call_result(fct_call* c, int64_t ndim, const int64_t* sizes) {
  if (c->nres >= FCT_MAX_RESULTS) {
    fail(c, "factorch: too many results for one call");
    fct_call_raise(c, FCT_ERR_WORKSPACE);
  }
  AtenTensorHandle h = call_empty(c, c->dtype, ndim, sizes);
  if (!h) fct_call_raise(c, FCT_ERR_WORKSPACE);
  DLTensor* view = &c->res_view[c->nres];
  c->res[c->nres++] = h;
  fct_torch_view(h, view);
  return view;
}

DLTensor* fct_call_no_result(fct_call* c) {
  int64_t zero = 0;
  fct_call_result(c, 1, &zero);
  return NULL;
}

DLTensor* fct_call_grad(fct_call* c, bool make, int64_t ndim, const int64_t* sizes) {
  return make ? fct_call_result(c, ndim, sizes) : fct_call_no_result(c);
}

/* Large CPU workspaces. glibc serves allocations above 32 MB with fresh
 * mmap'ed pages, so a 45 MB workspace costs ~11,000 page faults (~20 ms
 * measured) on every call. Workspaces from FCT_WS_KEEP_MIN up come instead
 * from one buffer per thread, kept between calls and grown as needed (at
 * most the ops' workspace cap, 64 MB, unless an op needs more), freed when
 * the thread exits or by fct_torch_release_workspace. Smaller ones come from
 * torch's allocator, whose heap already reuses them. */
#define FCT_WS_KEEP_MIN ((size_t)16 << 20)

typedef struct kept_ws {
  void* data;
  size_t bytes;
  bool busy; /* lent to a call in progress on this thread */
} kept_ws;

static pthread_key_t g_ws_key;
static pthread_once_t g_ws_once = PTHREAD_ONCE_INIT;
static bool g_ws_key_ok;

static void free_kept(void* p) {
  kept_ws* k = p;
  free(k->data);
  free(k);
}

static void make_ws_key(void) { g_ws_key_ok = pthread_key_create(&g_ws_key, free_kept) == 0; }

/* This thread's kept buffer of at least `bytes`, marked busy; NULL when
 * none can be had (no key, busy, out of memory): the caller allocates. */
static void* take_kept(size_t bytes) {
  pthread_once(&g_ws_once, make_ws_key);
  if (!g_ws_key_ok) return NULL;
  kept_ws* k = pthread_getspecific(g_ws_key);
  if (!k) {
    k = calloc(1, sizeof *k);
    if (!k || pthread_setspecific(g_ws_key, k) != 0) {
      free(k);
      return NULL;
    }
  }
  if (k->busy) return NULL;
  if (k->bytes < bytes) {
    free(k->data);
    k->data = NULL;
    k->bytes = 0;
    size_t want = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1); /* whole MBs */
    if (posix_memalign(&k->data, 64, want) != 0) return NULL;
    k->bytes = want;
  }
  k->busy = true;
  return k->data;
}

static void give_back_kept(void) {
  kept_ws* k = g_ws_key_ok ? pthread_getspecific(g_ws_key) : NULL;
  if (k) k->busy = false;
}

__attribute__((visibility("default"))) size_t fct_torch_release_workspace(void) {
  pthread_once(&g_ws_once, make_ws_key);
  kept_ws* k = g_ws_key_ok ? pthread_getspecific(g_ws_key) : NULL;
  if (!k || k->busy) return 0;
  size_t had = k->bytes;
  free(k->data);
  k->data = NULL;
  k->bytes = 0;
  return had;
}

__attribute__((visibility("default"))) size_t fct_torch_kept_workspace(void) {
  pthread_once(&g_ws_once, make_ws_key);
  kept_ws* k = g_ws_key_ok ? pthread_getspecific(g_ws_key) : NULL;
  return k ? k->bytes : 0;
}

bool fct_call_workspace(fct_call* c, size_t bytes) {
  c->ctx.workspace = NULL;
  c->ctx.workspace_bytes = bytes;
  if (bytes == 0) return true;
  if (bytes >= FCT_WS_KEEP_MIN && c->device_type == aoti_torch_device_type_cpu()) {
    c->ctx.workspace = take_kept(bytes);
    if (c->ctx.workspace) {
      c->kept_ws = true;
      return true;
    }
  }
  int64_t n = (int64_t)bytes;
  AtenTensorHandle h = call_empty(c, aoti_torch_dtype_uint8(), 1, &n);
  if (!h) return false;
  aoti_torch_get_data_ptr(h, &c->ctx.workspace);
  return true;
}

/* Releases every owned handle (but the results when keep_results) and drops
 * the device guard. */
static void release(fct_call* c, bool keep_results) {
  for (int i = 0; i < c->owned.n; ++i) {
    bool kept = false;
    for (int k = 0; keep_results && k < c->nres; ++k) kept |= c->res[k] == c->owned.h[i];
    if (!kept) aoti_torch_delete_tensor_object(c->owned.h[i]);
  }
  c->owned.n = 0;
  if (c->kept_ws) {
    give_back_kept();
    c->kept_ws = false;
  }
  if (c->guard) {
    g_delete_guard(c->guard);
    c->guard = NULL;
  }
}

void fct_call_raise(fct_call* c, fct_status st) {
  release(c, false);
  if (!c->error[0]) snprintf(c->error, sizeof c->error, "%s", fct_status_string(st));
  aoti_torch_check(false, "factorch", __FILE__, __LINE__, c->error);
}

void fct_call_fail(fct_call* c, fct_status st, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->error, sizeof c->error, fmt, ap);
  va_end(ap);
  fct_call_raise(c, st);
}

void fct_call_return(fct_call* c, fct_status st, StableIValue* stack, int n) {
  if (st == FCT_OK && c->nres != n) {
    /* Only reachable if a C op accepted an output left unallocated. */
    snprintf(c->error, sizeof c->error,
             "factorch: internal error: %d of the op's %d results were allocated", c->nres, n);
    st = FCT_ERR_INVALID_VALUE;
  }
  if (st != FCT_OK) fct_call_raise(c, st);
  release(c, true);
  for (int i = 0; i < n; ++i) stack[i] = (StableIValue)(uintptr_t)c->res[i];
}
