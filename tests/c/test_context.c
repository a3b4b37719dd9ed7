/* The contexts, error buffer and host workspace of the C tests (declared in
 * test_util.h). Apart from test_util.c because these need libfactorch
 * (fct_status_string), which the tests of internals do not link. */
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

char test_err[512];
static void* g_ws;
static size_t g_ws_bytes;

fct_context test_ctx(uint32_t flags) {
  fct_context c = {0};
  c.error = test_err;
  c.error_bytes = sizeof test_err;
  c.flags = flags;
  test_err[0] = 0;
  return c;
}

void test_workspace(fct_context* c, size_t bytes) {
  if (bytes > g_ws_bytes) {
    free(g_ws);
    g_ws = aligned_alloc(256, (bytes + 255) / 256 * 256);
    g_ws_bytes = bytes;
  }
  c->workspace = bytes ? g_ws : NULL;
  c->workspace_bytes = bytes;
}

void test_free_workspace(void) {
  free(g_ws);
  g_ws = NULL;
  g_ws_bytes = 0;
}

void test_expect_fail(fct_status got, fct_status want, const char* name, const char* what) {
  CHECK(got == want, "%s: expected status %d (%s), got %d: %s", what, want,
        fct_status_string(want), got, test_err);
  CHECK(strstr(test_err, name) != NULL, "%s: message '%s' does not name '%s'", what, test_err,
        name);
}
