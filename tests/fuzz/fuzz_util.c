/* The fuzz input decoder and the checks after each call (fuzz_util.h). */
#include "fuzz_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void fz_begin(fz* f, const uint8_t* data, size_t size) {
  memset(f, 0, sizeof *f);
  f->p = data;
  f->n = size;
  f->dtype = (DLDataType){kDLFloat, 64, 1};
  f->device = (DLDevice){kDLCPU, 0};
  f->trace = getenv("FCT_FUZZ_TRACE") != NULL;
}

uint8_t fz_u8(fz* f) {
  if (f->n == 0) return 0;
  --f->n;
  return *f->p++;
}

uint32_t fz_u32(fz* f) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= (uint32_t)fz_u8(f) << (8 * i);
  return v;
}

uint64_t fz_u64(fz* f) {
  uint64_t lo = fz_u32(f);
  return lo | (uint64_t)fz_u32(f) << 32;
}

int64_t fz_range(fz* f, int64_t lo, int64_t hi) {
  return lo + (int64_t)(fz_u8(f) % (uint64_t)(hi - lo + 1));
}

/* Sizes that overflow products of dims, int32 indexing or byte counts. */
static const int64_t huge_sizes[] = {
    INT64_MAX, INT64_MAX / 2 + 1, (int64_t)1 << 62, (int64_t)1 << 32, ((int64_t)1 << 31) + 1,
    INT32_MAX, (int64_t)1 << 40, -1, INT64_MIN, (int64_t)3037000500 /* sqrt(2^63) */};

int64_t fz_size(fz* f, int64_t lo, int64_t hi) {
  uint8_t b = fz_u8(f);
  if (b == 0xff) return huge_sizes[fz_u8(f) % (sizeof huge_sizes / sizeof *huge_sizes)];
  if (b == 0xfe) return 0;
  return lo + (int64_t)(b % (uint64_t)(hi - lo + 1));
}

double fz_double(fz* f) {
  uint8_t b = fz_u8(f);
  switch (b) {
    case 0xff: return NAN;
    case 0xfe: return INFINITY;
    case 0xfd: return -INFINITY;
    case 0xfc: return 1e308;
    case 0xfb: return -1.0;
    case 0xfa: {
      uint64_t bits = fz_u64(f);
      double d;
      memcpy(&d, &bits, sizeof d);
      return d;
    }
    default: return b / 64.0;
  }
}

void fz_problem(fz* f) {
  uint8_t b = fz_u8(f);
  f->dtype = (DLDataType){kDLFloat, (b & 1) ? 32 : 64, 1};
  if ((b & 0x30) == 0x30) f->dtype = (b & 2) ? (DLDataType){kDLBfloat, 16, 1}
                                             : (DLDataType){kDLFloat, 16, 1};
  if ((b & 0xc0) == 0xc0) f->device = (DLDevice){kDLCUDA, 0};
  f->inject_nan = (b & 0x0c) == 0x0c;
}

static size_t elem_bytes(DLDataType t) {
  size_t b = ((size_t)t.bits * t.lanes + 7) / 8;
  return b ? b : 1;
}

static uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void fill(fz_tens* t, bool output, bool nan_first, size_t first_elem) {
  size_t es = elem_bytes(t->dl.dtype);
  size_t n = t->buf_bytes / es;
  if (t->dl.dtype.code == kDLFloat && t->dl.dtype.bits == 64 && t->dl.dtype.lanes == 1) {
    double* p = t->buf;
    for (size_t i = 0; i < n; ++i)
      p[i] = output ? NAN : ((double)(mix(i + 1) % 1801) - 900.0) / 1000.0 + 0.05;
    if (nan_first && first_elem < n) p[first_elem] = NAN;
  } else if (t->dl.dtype.code == kDLFloat && t->dl.dtype.bits == 32 && t->dl.dtype.lanes == 1) {
    float* p = t->buf;
    for (size_t i = 0; i < n; ++i)
      p[i] = output ? NAN : (float)(((double)(mix(i + 1) % 1801) - 900.0) / 1000.0 + 0.05);
    if (nan_first && first_elem < n) p[first_elem] = NAN;
  } else {
    unsigned char* p = t->buf;
    for (size_t i = 0; i < t->buf_bytes; ++i) p[i] = (unsigned char)mix(i);
  }
}

/* [mn, mx]: the element offsets the descriptor reaches; false on overflow. */
static bool extent(const fz_tens* t, int64_t* mn, int64_t* mx, bool* empty) {
  *mn = *mx = 0;
  *empty = false;
  int nd = t->dl.ndim;
  if (nd <= 0 || nd > FZ_SHAPE_SLOTS || !t->dl.shape) return true;
  for (int i = 0; i < nd; ++i)
    if (t->shape[i] == 0) *empty = true;
  if (*empty) return true;
  for (int i = 0; i < nd; ++i) {
    if (t->shape[i] < 0) return true; /* refused on its own; no extent */
    int64_t st = t->dl.strides ? t->strides[i] : 0;
    if (!t->dl.strides) { /* row-major */
      st = 1;
      for (int j = i + 1; j < nd; ++j)
        if (t->shape[j] > 0 && __builtin_mul_overflow(st, t->shape[j], &st)) return false;
    }
    int64_t e;
    if (__builtin_mul_overflow(t->shape[i] - 1, st, &e)) return false;
    if (e < 0 ? __builtin_add_overflow(*mn, e, mn) : __builtin_add_overflow(*mx, e, mx))
      return false;
  }
  return true;
}

/* Gives t a buffer of exactly its extent (plus offset), or a tiny one. */
static void back(fz* f, fz_tens* t, int64_t byte_offset, bool output) {
  int64_t mn, mx;
  bool empty;
  size_t es = elem_bytes(t->dl.dtype);
  bool ok = extent(t, &mn, &mx, &empty);
  int64_t span = 0, bytes = 0;
  if (ok && !empty) {
    ok = !__builtin_sub_overflow(mx, mn, &span) && !__builtin_add_overflow(span, 1, &span) &&
         !__builtin_mul_overflow(span, (int64_t)es, &bytes);
    /* The elements themselves must be countable as well. */
    int64_t n = 1;
    for (int i = 0; ok && i < t->dl.ndim; ++i)
      ok = !__builtin_mul_overflow(n, t->shape[i], &n) &&
           !__builtin_mul_overflow(n, (int64_t)es, &(int64_t){0});
  }
  if (!ok) {
    t->impossible = true;
    t->buf_bytes = 64;
    t->buf = calloc(1, 64);
    t->dl.data = t->buf;
    t->dl.byte_offset = 0;
    return;
  }
  if (empty || t->dl.ndim <= 0 || !t->dl.shape) {
    if (t->dl.ndim <= 0 && !empty) bytes = (int64_t)es, mn = 0; /* a scalar: one element */
    else bytes = 0;
  }
  int64_t numel = 1;
  for (int i = 0; i < t->dl.ndim && i < FZ_SHAPE_SLOTS && t->dl.shape; ++i)
    if (__builtin_mul_overflow(numel, t->shape[i] < 0 ? 0 : t->shape[i], &numel)) numel = INT64_MAX;
  if (span > FZ_MAX_ELEMENTS || numel > FZ_MAX_ELEMENTS) {
    f->skip = true;
    t->buf_bytes = 64;
    t->buf = calloc(1, 64);
    t->dl.data = t->buf;
    return;
  }
  t->buf_bytes = (size_t)bytes;
  /* malloc(0) may return NULL; keep a real pointer for empty tensors. */
  t->buf = malloc(bytes > 0 ? (size_t)bytes : 1);
  fill(t, output, f->inject_nan && !output, (size_t)(-mn));
  /* data + byte_offset is the first element, -mn elements into buf. */
  t->dl.byte_offset = (uint64_t)byte_offset;
  t->dl.data = (char*)t->buf + (-mn) * (int64_t)es - byte_offset;
}

/* Wrapping arithmetic for strides derived from fuzzed (maybe huge) sizes:
 * the descriptor is whatever comes out, extent() judges it. */
static int64_t wmul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
static int64_t wneg(int64_t a) { return (int64_t)(0 - (uint64_t)a); }

static fz_tens* new_tensor(fz* f) {
  if (f->nts == FZ_MAX_TENSORS) return NULL;
  fz_tens* t = calloc(1, sizeof *t);
  f->ts[f->nts++] = t;
  return t;
}

DLTensor* fz_tensor(fz* f, int ndim, const int64_t* shape, bool output) {
  fz_tens* t = new_tensor(f);
  if (!t) return NULL;
  uint8_t c = fz_u8(f);
  t->dl.dtype = f->dtype;
  t->dl.device = f->device;
  t->dl.ndim = ndim;
  t->dl.shape = t->shape;
  for (int i = 0; i < ndim && i < FZ_SHAPE_SLOTS; ++i) t->shape[i] = shape[i];
  size_t es = elem_bytes(t->dl.dtype);

  /* Layout (bits 0-2). */
  int layout = c & 7;
  int pick = ndim > 0 ? (int)(fz_u8(f) % (unsigned)ndim) : 0;
  if (layout != 0) {
    t->dl.strides = t->strides;
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      t->strides[i] = s;
      s = wmul(s, t->shape[i] > 0 ? t->shape[i] : 1);
    }
  }
  switch (layout) {
    case 2: /* column-major last two dims */
      if (ndim >= 2) {
        int64_t r = t->shape[ndim - 2] > 0 ? t->shape[ndim - 2] : 1;
        t->strides[ndim - 1] = r;
        t->strides[ndim - 2] = 1;
      }
      break;
    case 3: /* gaps: every dim above the last padded by one element */
      if (ndim >= 1) {
        int64_t s = 1;
        for (int i = ndim - 1; i >= 0; --i) {
          t->strides[i] = s;
          s = (int64_t)((uint64_t)wmul(s, t->shape[i] > 0 ? t->shape[i] : 1) + 1);
        }
      }
      break;
    case 4: t->strides[pick] = wneg(t->strides[pick]); break;
    case 5: t->strides[pick] = 0; break;
    case 6: /* reversed dim order in memory */
      if (ndim >= 1) {
        int64_t s = 1;
        for (int i = 0; i < ndim; ++i) {
          t->strides[i] = s;
          s = wmul(s, t->shape[i] > 0 ? t->shape[i] : 1);
        }
      }
      break;
    case 7:
      for (int i = 0; i < ndim; ++i) t->strides[i] = wneg(t->strides[i]);
      break;
    default: break;
  }
  int64_t byte_offset = (int64_t)es * ((c >> 3) & 3 ? (int64_t[]){0, 1, 7, 64}[(c >> 3) & 3] : 0);

  /* Corruption (bits 5-7 all set). */
  bool misalign = false, null_data = false, null_shape = false;
  fz_tens* alias = NULL;
  if ((c & 0xe0) == 0xe0) {
    uint8_t k = fz_u8(f);
    switch (k % 12) {
      case 0: return NULL;
      case 1:
        t->dl.dtype = (DLDataType){fz_u8(f), fz_u8(f), (uint16_t)(fz_u8(f) % 3)};
        es = elem_bytes(t->dl.dtype);
        byte_offset = 0;
        break;
      case 2: t->dl.device = (DLDevice){(DLDeviceType)(fz_u8(f) % 18), (int32_t)fz_u8(f) - 1}; break;
      case 3:
        t->dl.ndim = (int)fz_range(f, -2, FZ_SHAPE_SLOTS - 1);
        for (int i = ndim; i < FZ_SHAPE_SLOTS; ++i) t->shape[i] = fz_range(f, 0, 3);
        for (int i = ndim; i < FZ_SHAPE_SLOTS; ++i) t->strides[i] = fz_range(f, -2, 3);
        break;
      case 4:
        if (ndim > 0) t->shape[pick] = fz_size(f, 0, 9);
        break;
      case 5: null_shape = ndim > 0; break;
      case 6: null_data = true; break;
      case 7: misalign = true; break;
      case 8:
        if (ndim > 0) {
          t->dl.strides = t->strides;
          uint8_t b = fz_u8(f);
          t->strides[pick] = b >= 0xf0 ? huge_sizes[b % 10] : (int64_t)(int8_t)b;
        }
        break;
      case 9:
        if (f->nts >= 2) alias = f->ts[f->nts - 2];
        break;
      case 10:
        t->dl.dtype.bits = t->dl.dtype.bits == 32 ? 64 : 32;
        es = elem_bytes(t->dl.dtype);
        byte_offset = 0;
        break;
      default: /* several dims at once */
        for (int i = 0; i < ndim; ++i) t->shape[i] = fz_size(f, 0, 5);
        break;
    }
  }
  back(f, t, byte_offset, output);
  t->mem = t->buf;
  t->mem_bytes = t->buf_bytes;
  if (alias && alias->buf && alias->buf_bytes >= t->buf_bytes && !t->impossible) {
    /* Point into the earlier tensor's memory (same offset). */
    char* first = (char*)t->dl.data + t->dl.byte_offset;
    ptrdiff_t into = first - (char*)t->buf;
    t->dl.data = (char*)alias->buf + into - (ptrdiff_t)t->dl.byte_offset;
    t->mem = alias->buf;
    t->mem_bytes = alias->buf_bytes;
  }
  if (misalign && es > 1) t->dl.byte_offset += 1 + fz_u8(f) % (es - 1);
  if (null_data) t->dl.data = NULL;
  if (null_shape) t->dl.shape = NULL;
  if (t->impossible) f->impossible = true;
  /* Misaligned data and an impossible extent: memory the descriptor does
   * not really describe; the op must refuse it. */
  bool empty = false;
  for (int i = 0; i < t->dl.ndim && i < FZ_SHAPE_SLOTS; ++i) empty |= t->shape[i] == 0;
  if (misalign && es > 1 && t->dl.data && !empty) t->impossible = f->impossible = true;
  return &t->dl;
}

DLTensor* fz_opt_tensor(fz* f, int ndim, const int64_t* shape, bool output) {
  if (fz_u8(f) & 1) return NULL;
  return fz_tensor(f, ndim, shape, output);
}

DLTensor* fz_index_tensor(fz* f, int ndim, const int64_t* shape, int64_t num) {
  DLDataType keep = f->dtype;
  uint8_t b = fz_u8(f);
  f->dtype = (b & 1) ? (DLDataType){kDLInt, 32, 1} : (DLDataType){kDLInt, 64, 1};
  bool nan = f->inject_nan;
  f->inject_nan = false;
  DLTensor* d = fz_tensor(f, ndim, shape, false);
  f->inject_nan = nan;
  f->dtype = keep;
  if (!d) return NULL;
  fz_tens* t = f->ts[f->nts - 1];
  if (t->impossible || !t->buf || t->dl.dtype.code != kDLInt || t->dl.dtype.lanes != 1) return d;
  bool wild = (b & 0x06) == 0x06; /* some indices out of range */
  if (t->dl.dtype.bits == 64) {
    int64_t* p = t->buf;
    for (size_t i = 0; i < t->buf_bytes / 8; ++i)
      p[i] = num > 0 ? (int64_t)(mix(i + b) % (uint64_t)num) : 0;
    if (wild && t->buf_bytes >= 8) p[fz_u8(f) % (t->buf_bytes / 8)] = (int64_t)fz_u64(f);
  } else if (t->dl.dtype.bits == 32) {
    int32_t* p = t->buf;
    for (size_t i = 0; i < t->buf_bytes / 4; ++i)
      p[i] = num > 0 ? (int32_t)(mix(i + b) % (uint64_t)num) : 0;
    if (wild && t->buf_bytes >= 4) p[fz_u8(f) % (t->buf_bytes / 4)] = (int32_t)fz_u32(f);
  }
  return d;
}

void fz_context(fz* f, fct_context* ctx) {
  memset(ctx, 0, sizeof *ctx);
  uint8_t b = fz_u8(f);
  ctx->flags = b & 3;
  if ((b & 0xf0) == 0xf0) ctx->flags |= (uint32_t)fz_u8(f) << 2;
  memset(f->err, 0, sizeof f->err);
  ctx->error = f->err;
  ctx->error_bytes = sizeof f->err;
  switch ((b >> 2) & 3) {
    case 1: ctx->error_bytes = (b & 0x10) ? 1 : 7; break;
    case 2: if ((b & 0x30) == 0x30) ctx->error = NULL; break;
    default: break;
  }
}

void fz_workspace(fz* f, fct_context* ctx, fct_status qs, size_t q) {
  free(f->ws);
  f->ws = NULL;
  ctx->workspace = NULL;
  ctx->workspace_bytes = 0;
  uint8_t b = fz_u8(f);
  if (qs != FCT_OK || q > FZ_MAX_WORKSPACE) {
    /* Too big to give: a small one, which must be refused. */
    if (posix_memalign(&f->ws, 256, 256) == 0) {
      ctx->workspace = f->ws;
      ctx->workspace_bytes = 256;
    }
    return;
  }
  size_t give = q;
  switch (b % 8) {
    case 1: give = q > 0 ? q - 1 : 0; break; /* one byte short */
    case 2: ctx->workspace_bytes = q; return; /* NULL with a size */
    case 3: return;                           /* none */
    case 4: give = q + 999; break;
    default: break;
  }
  if (posix_memalign(&f->ws, 256, give > 0 ? give : 1) != 0) return;
  ctx->workspace = f->ws;
  ctx->workspace_bytes = give;
}

/* The tensors of this input, for a finding's report. */
static void dump(const fz* f) {
  for (int i = 0; i < f->nts; ++i) {
    const fz_tens* t = f->ts[i];
    fprintf(stderr, "  tensor %d: dtype %d/%d/%d device %d:%d ndim %d offset %llu%s%s%s shape",
            i, t->dl.dtype.code, t->dl.dtype.bits, t->dl.dtype.lanes, t->dl.device.device_type,
            t->dl.device.device_id, t->dl.ndim, (unsigned long long)t->dl.byte_offset,
            t->impossible ? " IMPOSSIBLE" : "", t->dl.data ? "" : " data=NULL",
            t->dl.shape ? "" : " shape=NULL");
    for (int d = 0; d < t->dl.ndim && d < FZ_SHAPE_SLOTS; ++d)
      fprintf(stderr, " %lld", (long long)t->shape[d]);
    if (t->dl.strides) {
      fprintf(stderr, " strides");
      for (int d = 0; d < t->dl.ndim && d < FZ_SHAPE_SLOTS; ++d)
        fprintf(stderr, " %lld", (long long)t->strides[d]);
    }
    fprintf(stderr, "\n");
  }
}

fct_status fz_check(fz* f, const fct_context* ctx, fct_status s, const char* what) {
  if (f->trace) fprintf(stderr, "fuzz: %s -> %d %s\n", what, (int)s, s ? f->err : "");
  bool bad = ((int)s < 0 || (int)s >= FCT_STATUS_COUNT_) ||
             (s != FCT_OK && ctx->error == f->err && ctx->error_bytes >= 8 && f->err[0] == '\0') ||
             (s == FCT_OK && f->impossible);
  if (bad || f->trace) dump(f);
  if ((int)s < 0 || (int)s >= FCT_STATUS_COUNT_) {
    fprintf(stderr, "fuzz: %s returned status %d, not an fct_status\n", what, (int)s);
    __builtin_trap();
  }
  if (s != FCT_OK && ctx->error == f->err && ctx->error_bytes >= 8 && f->err[0] == '\0') {
    fprintf(stderr, "fuzz: %s failed with %d (%s) and wrote no message\n", what, (int)s,
            fct_status_string(s));
    __builtin_trap();
  }
  if (s == FCT_OK && f->impossible) {
    fprintf(stderr, "fuzz: %s accepted a descriptor no memory can hold (overflowing extent "
            "or misaligned data)\n", what);
    __builtin_trap();
  }
  if (ctx->error == f->err && ctx->error_bytes <= sizeof f->err &&
      memchr(f->err, '\0', ctx->error_bytes ? ctx->error_bytes : 1) == NULL) {
    fprintf(stderr, "fuzz: %s left the error message unterminated\n", what);
    __builtin_trap();
  }
  memset(f->err, 0, sizeof f->err);
  return s;
}

void fz_raw_sizes(fz* f, int64_t* v, int n) {
  for (int k = 0; k < n; ++k)
    if (fz_u8(f) == 0xff) v[k] = fz_size(f, 0, 9);
}

fct_status fz_check_plan(fz* f, fct_status s, const char* what) {
  fct_context none = {0};
  return fz_check(f, &none, s, what);
}

void* fz_alloc(fz* f, size_t bytes) {
  if (f->nallocs == FZ_MAX_ALLOCS) return NULL;
  void* p = calloc(1, bytes ? bytes : 1);
  f->allocs[f->nallocs++] = p;
  return p;
}

const DLTensor** fz_list(fz* f, int n) {
  return n > 0 ? fz_alloc(f, sizeof(DLTensor*) * (size_t)n) : NULL;
}

int64_t* fz_ints(fz* f, int n) { return n > 0 ? fz_alloc(f, sizeof(int64_t) * (size_t)n) : NULL; }

int fz_count(fz* f, int lo, int hi) {
  uint8_t b = fz_u8(f);
  if (b == 0xff) return (int)fz_range(f, -3, hi + 4); /* out of range */
  return lo + b % (hi - lo + 1);
}

void fz_end(fz* f) {
  for (int i = 0; i < f->nallocs; ++i) free(f->allocs[i]);
  f->nallocs = 0;
  for (int i = 0; i < f->nts; ++i) {
    free(f->ts[i]->buf);
    free(f->ts[i]);
  }
  free(f->ws);
  f->nts = 0;
  f->ws = NULL;
}

int fz_batch(fz* f, int64_t* lead, int64_t* M) {
  int n = (int)(fz_u8(f) % 3);
  *M = 1;
  for (int i = 0; i < n; ++i) {
    lead[i] = fz_size(f, 0, 4);
    if (__builtin_mul_overflow(*M, lead[i] < 0 ? 0 : lead[i], M)) *M = INT64_MAX;
  }
  if (n == 0 && (fz_u8(f) & 1)) n = -1; /* 1-d x: no batch dims */
  return n < 0 ? 0 : n;
}

int fz_shape_cat(int64_t* out, const int64_t* lead, int nlead, int64_t last) {
  for (int i = 0; i < nlead; ++i) out[i] = lead[i];
  out[nlead] = last;
  return nlead + 1;
}

/* libFuzzer calls this once: one BLAS thread (the inputs are tiny, and
 * thread start-up would dominate every execution). */
int LLVMFuzzerInitialize(int* argc, char*** argv) {
  (void)argc;
  (void)argv;
  fct_cpu_set_num_threads(1);
  return 0;
}
