/*
 * The CPU thread-pool dispatch through a public op (lowrank_linear, shapes
 * large enough that its GEMMs are split): stand-in pools that run only some
 * of the threads' shares, or whose other threads come late, still give the
 * float64 reference; two dispatches in a row whose caller waited long at
 * the join stop the pool for the hold (the next calls do not call it), one
 * alone does not, setting the policy ends the hold, stall_ns = 0 never
 * stops it.
 */
#include <math.h>
#include <pthread.h>
#include <time.h>

#include "lowrank_reference.h"
#include "test_util.h"

static int g_calls;
static int64_t g_late_ns; /* how long the other threads come after the caller */
static int g_late_left = -1; /* pool calls still late (-1: every one) */

typedef struct late_share {
  int64_t late_ns, begin, end;
  fct_parallel_body body;
  void* arg;
} late_share;

static void* run_late(void* p) {
  late_share* s = p;
  if (s->late_ns > 0) {
    struct timespec ts = {(time_t)(s->late_ns / 1000000000), (long)(s->late_ns % 1000000000)};
    nanosleep(&ts, NULL);
  }
  for (int64_t i = s->begin; i < s->end; ++i) s->body(i, i + 1, s->arg);
  return NULL;
}

/* Runs the caller's share (index begin) in the calling thread and the others'
 * in a second thread that starts g_late_ns later: a pool whose other threads
 * were descheduled while the caller did the work (g_late_ns < 0: at once).
 * With g_late_ns = 0 all
 * shares run in the calling thread, one after the other (a prompt pool:
 * starting a thread could itself take longer than the stall threshold). */
static int32_t late_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                         void* arg) {
  (void)grain;
  ++g_calls;
  int64_t late = g_late_left == 0 ? 0 : g_late_ns;
  if (g_late_left > 0) --g_late_left;
  if (late == 0) {
    for (int64_t i = begin; i < end; ++i) body(i, i + 1, arg);
    return 0;
  }
  late_share s = {late, begin + 1, end, body, arg};
  pthread_t th;
  if (pthread_create(&th, NULL, run_late, &s) != 0) return 1;
  body(begin, begin + 1, arg);
  pthread_join(th, NULL);
  return 0;
}

/* Runs nothing and says so: factorch must then compute serially. */
static int32_t refusing_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                             void* arg) {
  (void)begin, (void)end, (void)grain, (void)body, (void)arg;
  ++g_calls;
  return 1;
}

static int two_threads(void) { return 2; }

enum { M = 96, IN = 128, OUT = 160, R = 112 }; /* M·R·IN > 2^20: split */

/* One forward against the reference; returns whether y matched. */
static bool forward_ok(const char* label) {
  int64_t xs[2] = {M, IN}, us[2] = {OUT, R}, vs[2] = {R, IN}, bs[1] = {OUT}, ys[2] = {M, OUT};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* U = tb_new(32, 2, us, NULL, 0);
  test_tensor* V = tb_new(32, 2, vs, NULL, 0);
  test_tensor* b = tb_new(32, 1, bs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  ref Rf = reference(x, U, V, b, NULL, M, IN, OUT, R);
  fct_context c = test_ctx(0);
  size_t bytes = 0;
  fct_status st =
      fct_lowrank_linear_forward_workspace(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL, &bytes);
  test_workspace(&c, bytes);
  if (st == FCT_OK) st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, Rf.y, M, OUT);
  bool ok = st == FCT_OK && e <= 2e-5 * sqrt((double)(IN + OUT + M));
  CHECK(ok, "%s: y error %.3g", label, e);
  ref_free(&Rf);
  tb_free(x); tb_free(U); tb_free(V); tb_free(b); tb_free(y);
  return ok;
}

static void test_late_threads(void) {
  /* Prompt threads: the pool is used, nothing stalls. */
  fct_cpu_set_thread_pool(late_pool, two_threads);
  fct_cpu_set_stall_policy(200000, 10 * 1000000000LL, 10 * 1000000000LL);
  uint64_t stalls0 = fct_cpu_pool_stalls();
  g_late_ns = 0;
  g_calls = 0;
  forward_ok("prompt pool");
  CHECK(g_calls > 0, "the pool was not called");
  CHECK(fct_cpu_pool_stalls() == stalls0 && !fct_cpu_pool_resting(),
        "a prompt pool counted as stalled");

  /* A second thread at once: both claim chunks concurrently (the stall
   * count is not judged: starting a thread may take a while). */
  g_late_ns = -1;
  forward_ok("two threads at once");
  fct_cpu_set_stall_policy(200000, 10 * 1000000000LL, 10 * 1000000000LL);

  /* One late dispatch among prompt ones (a lone late wake-up): counted as a
   * stall, but the pool does not rest. */
  /* 20 ms: far above the caller's share even on a loaded machine (a share
   * slower than the wait does not count as a stall). */
  g_late_ns = 20000000;
  g_late_left = 1;
  uint64_t before = fct_cpu_pool_stalls();
  forward_ok("one late dispatch");
  CHECK(fct_cpu_pool_stalls() == before + 1, "one late dispatch counted %llu stalls",
        (unsigned long long)(fct_cpu_pool_stalls() - before));
  CHECK(!fct_cpu_pool_resting(), "the pool rests after one stall");
  g_late_left = -1;

  /* Late threads: the caller does every chunk, then waits 20 ms at the join:
   * the result is right, and two stalls in a row rest the pool (a 10 s
   * hold). */
  forward_ok("late pool");
  CHECK(fct_cpu_pool_stalls() > stalls0, "a 20 ms wait at the join did not count as a stall");
  CHECK(fct_cpu_pool_resting(), "the pool does not rest after two stalls in a row");
  int calls = g_calls;
  forward_ok("resting pool");
  CHECK(g_calls == calls, "a resting pool was called %d times", g_calls - calls);

  /* Setting the policy ends the hold; with stall_ns = 0 nothing stalls. */
  fct_cpu_set_stall_policy(0, 1000000, 1000000);
  CHECK(!fct_cpu_pool_resting(), "setting the policy did not end the hold");
  uint64_t stalls1 = fct_cpu_pool_stalls();
  calls = g_calls;
  forward_ok("late pool, stalls off");
  CHECK(g_calls > calls && fct_cpu_pool_stalls() == stalls1 && !fct_cpu_pool_resting(),
        "stall_ns = 0 still stopped the pool");

  /* A hold of 1 ns is over at once: the next call tries the pool again. */
  fct_cpu_set_stall_policy(200000, 1, 1);
  forward_ok("late pool, 1 ns hold");
  calls = g_calls;
  g_late_ns = 0;
  forward_ok("after a 1 ns hold");
  CHECK(g_calls > calls, "the pool was not tried again after the hold");
  CHECK(!fct_cpu_pool_resting(), "a clean call did not end the hold");
}

static void test_refusing_pool(void) {
  fct_cpu_set_thread_pool(refusing_pool, two_threads);
  fct_cpu_set_stall_policy(200000, 20000000, 1000000000);
  g_calls = 0;
  forward_ok("refusing pool");
  CHECK(g_calls > 0, "the refusing pool was not called");
  CHECK(!fct_cpu_pool_resting(), "a refusing pool made the pool rest");
}

int main(void) {
  test_late_threads();
  test_refusing_pool();
  fct_cpu_set_thread_pool(NULL, NULL);
  fct_cpu_set_stall_policy(200000, 20000000, 1000000000);
  return test_report();
}
