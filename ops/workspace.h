/*
 * workspace.h (internal): the one workspace carver of ops/. Every op lays
 * out its workspace with the same code twice: once to size it (the
 * *_workspace query, which has no memory) and once for the call, so the two
 * cannot disagree. Regions are FCT_WS_ALIGN aligned (fct_ws_take); a size
 * that overflows poisons the layout, and the failure is reported once, when
 * the layout is done.
 *
 * Two views of one carver, because the ops hold on to what they carve in two
 * ways:
 *  - fct_layout hands out offsets, resolved later against the caller's
 *    workspace (fct_ws_at in op_common.h): the layers' ops record them in a
 *    plan before they know where the workspace is;
 *  - fct_arena is a layout with a base pointer and hands out pointers at once
 *    (NULL while sizing): the decompositions' layout functions run again
 *    over the workspace and fill their buffer structs directly.
 * Inline: libfactorch_cuda carves its decomposition workspaces with it too.
 */
#ifndef FCT_WORKSPACE_H
#define FCT_WORKSPACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fct_tensor.h"

typedef struct fct_layout {
  size_t cursor; /* bytes laid out so far */
  bool overflow; /* a size overflowed: the layout is invalid */
} fct_layout;

/* Reserves n elements of es bytes; returns the offset (0 once poisoned).
 * Sizes beyond SIZE_MAX / 4 count as overflow: no workspace is that large,
 * and the bound keeps sums of offsets in range. */
static inline size_t fct_layout_reserve(fct_layout* L, size_t n, size_t es) {
  size_t bytes;
  if (L->overflow || !fct_mul_ok(n, es, &bytes) || L->cursor > SIZE_MAX / 2 ||
      bytes > SIZE_MAX / 4) {
    L->overflow = true;
    return 0;
  }
  return fct_ws_take(&L->cursor, bytes);
}

/* As fct_layout_reserve for a signed element count (< 0 poisons). */
static inline size_t fct_layout_take(fct_layout* L, int64_t count, size_t es) {
  if (count < 0) {
    L->overflow = true;
    return 0;
  }
  return fct_layout_reserve(L, (size_t)count, es);
}

/* A layout resolved as it is carved: base is the workspace, or NULL while
 * sizing. */
typedef struct fct_arena {
  char* base;
  fct_layout L;
} fct_arena;

/* n elements of `elem` bytes; NULL while sizing or once poisoned. */
static inline void* fct_arena_take(fct_arena* a, size_t n, size_t elem) {
  size_t off = fct_layout_reserve(&a->L, n, elem);
  return a->base && !a->L.overflow ? a->base + off : NULL;
}

static inline double* fct_arena_f64(fct_arena* a, size_t n) {
  return (double*)fct_arena_take(a, n, sizeof(double));
}

/* The caller's workspace must hold `bytes` (FCT_ERR_WORKSPACE otherwise). */
static inline fct_status fct_check_workspace(fct_context* ctx, size_t bytes) {
  if (ctx->workspace_bytes < bytes || (bytes > 0 && !ctx->workspace))
    return fct_fail(ctx, FCT_ERR_WORKSPACE, "workspace: expected at least %zu bytes, got %zu%s",
                    bytes, ctx->workspace ? ctx->workspace_bytes : (size_t)0,
                    ctx->workspace ? "" : " (NULL)");
  return FCT_OK;
}

#endif /* FCT_WORKSPACE_H */
