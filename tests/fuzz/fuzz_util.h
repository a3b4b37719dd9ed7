/*
 * fuzz_util.h: the decoder shared by the libFuzzer harnesses of factorch's C
 * ABI. A harness reads the problem's sizes from the fuzz input, then asks for
 * each tensor by its expected shape; the decoder reads a control byte per
 * tensor that keeps it valid (a zero byte: dense row-major, no offset) or
 * lays it out otherwise (column-major, gaps, negative or zero strides, a
 * byte offset) or corrupts it (NULL tensor, shape, data or strides, other
 * dtypes and devices, bad ndim, misaligned data, huge sizes or strides,
 * memory shared with an earlier tensor).
 *
 * The ABI cannot know how big a caller's buffer is, so every tensor gets a
 * heap buffer of exactly the bytes its descriptor reaches: an op reading
 * outside what it was described gives an ASan report. A descriptor whose
 * byte extent overflows int64 (no buffer can hold it) gets a tiny buffer and
 * must be refused; one that is merely too big to allocate here makes the
 * harness skip the call (fz.skip), since an op may rightly accept it.
 *
 * After each call fz_check traps (a finding) when the status is out of range,
 * when a failure left no message, or when a call accepted a descriptor no
 * memory can hold.
 */
#ifndef FCT_FUZZ_UTIL_H
#define FCT_FUZZ_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "factorch.h"

#define FZ_MAX_TENSORS 96
#define FZ_MAX_ALLOCS 32
#define FZ_SHAPE_SLOTS 16       /* shape/strides arrays: room for a bad ndim */
#define FZ_MAX_ELEMENTS (1 << 16) /* per tensor, larger ones are skipped */
#define FZ_MAX_WORKSPACE ((size_t)1 << 26)

typedef struct fz_tens {
  DLTensor dl;
  int64_t shape[FZ_SHAPE_SLOTS];
  int64_t strides[FZ_SHAPE_SLOTS];
  void* buf;
  size_t buf_bytes;
  const void* mem;  /* the buffer data points into: buf, or an alias's */
  size_t mem_bytes;
  bool impossible; /* byte extent overflows, or misaligned: must be refused */
} fz_tens;

typedef struct fz {
  const uint8_t* p;
  size_t n;
  DLDataType dtype; /* the problem's dtype and device */
  DLDevice device;
  fz_tens* ts[FZ_MAX_TENSORS];
  int nts;
  bool skip;        /* a tensor too big to back with memory here */
  bool impossible;  /* some tensor passed is impossible */
  bool inject_nan;  /* first element of inputs is NaN */
  void* ws;
  char err[256];
  bool trace;       /* FCT_FUZZ_TRACE set: print each call's status */
  void* allocs[FZ_MAX_ALLOCS]; /* arrays of tensors and of sizes */
  int nallocs;
} fz;

/* Input decoding: bytes past the end read as 0. */
void fz_begin(fz* f, const uint8_t* data, size_t size);
uint8_t fz_u8(fz* f);
uint32_t fz_u32(fz* f);
uint64_t fz_u64(fz* f);
/* lo + u8 % (hi - lo + 1). */
int64_t fz_range(fz* f, int64_t lo, int64_t hi);
/* A size: mostly small, sometimes 0 or huge (0xff bytes pick huge ones). */
int64_t fz_size(fz* f, int64_t lo, int64_t hi);
double fz_double(fz* f); /* mostly small values, sometimes NaN/Inf/huge */

/* The problem's dtype and device: f32/f64 on the cpu mostly, sometimes
 * bf16/f16 or cuda (refused: no CUDA backend in the fuzz build). */
void fz_problem(fz* f);

/* A tensor with the expected shape, as the control byte decides (NULL when
 * it decides so). output: fill with NaN instead of data. */
DLTensor* fz_tensor(fz* f, int ndim, const int64_t* shape, bool output);
/* Same, for optional arguments: NULL when the control byte's low bit of a
 * separate byte is set (or the tensor decides so). */
DLTensor* fz_opt_tensor(fz* f, int ndim, const int64_t* shape, bool output);
/* An int64 / int32 index tensor of that shape with values in [lo, hi]
 * (sometimes outside), dtype from the control byte. */
DLTensor* fz_index_tensor(fz* f, int ndim, const int64_t* shape, int64_t num);

/* A context: flags, error buffer (sometimes short or NULL). */
void fz_context(fz* f, fct_context* ctx);
/* Workspace for a call after its query returned (qs, q): exact, one byte
 * short, NULL, none or more, from the input. */
void fz_workspace(fz* f, fct_context* ctx, fct_status qs, size_t q);
/* Checks a call's status (traps on a finding); returns it. */
fct_status fz_check(fz* f, const fct_context* ctx, fct_status s, const char* what);
/* The same for a call without a context (the plans). */
fct_status fz_check_plan(fz* f, fct_status s, const char* what);
/* One op call as a caller makes it: the workspace query `query` (which
 * writes its size into q), checked as NAME "_workspace"; the workspace it
 * asked for (fz_workspace); then the op `call`, checked as NAME. */
#define FZ_QUERY_RUN(f, ctx, q, name, query, call)                      \
  do {                                                                  \
    fct_status fz_qs_ = fz_check((f), (ctx), (query), name "_workspace"); \
    fz_workspace((f), (ctx), fz_qs_, (q));                              \
    fz_check((f), (ctx), (call), name);                                 \
  } while (0)

/* For the plans: each of v[0..n) is replaced, after a 0xff byte, by a raw
 * size (fz_size in [0, 9]: sometimes 0 or huge). */
void fz_raw_sizes(fz* f, int64_t* v, int n);

/* Leading (batch) dims of an activation: 0 to 2 of them, their product in
 * M; returns how many. */
int fz_batch(fz* f, int64_t* lead, int64_t* M);
/* out = [lead..., last]; returns the ndim. */
int fz_shape_cat(int64_t* out, const int64_t* lead, int nlead, int64_t last);

/* Zeroed memory freed by fz_end, sized exactly (ASan sees a read past it). */
void* fz_alloc(fz* f, size_t bytes);
/* An array of n tensor pointers / int64 (NULL when n <= 0). */
const DLTensor** fz_list(fz* f, int n);
int64_t* fz_ints(fz* f, int n);
/* A count in [lo, hi], sometimes outside (negative, too many). */
int fz_count(fz* f, int lo, int hi);

/* Frees everything of this input. */
void fz_end(fz* f);

#endif
