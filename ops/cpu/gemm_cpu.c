/* Row-major GEMM/GEMV dispatch over OpenBLAS (scipy-openblas32: symbols carry
 * the scipy_ prefix so they never clash with the BLAS inside torch). */
#include "gemm_cpu.h"
#include "kernels_cpu.h"

#include <cblas.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

/* How BLAS reads a view: row-major as stored (NoTrans, ld = rs), or a
 * column-major view read as the transpose of a row-major one (ld = cs). */
static void blas_form(const fct_mat* m, enum CBLAS_TRANSPOSE* tr, blasint* ld) {
  if (m->cs == 1 && m->rs >= (m->cols > 1 ? m->cols : 1)) {
    *tr = CblasNoTrans;
    *ld = (blasint)m->rs;
  } else {
    *tr = CblasTrans;
    *ld = (blasint)m->cs;
  }
}

static void zero_rows(fct_dtype dt, const fct_mat* C) {
  size_t es = fct_dtype_bytes(dt);
  for (int64_t i = 0; i < C->rows; ++i) memset(C->data + i * C->rs * es, 0, (size_t)C->cols * es);
}

/* y[len] (stride incy) = beta·y + alpha·op(Bmat)·vec, where Bmat is the
 * stored matrix of view B (k x n). want_t: multiply by Bᵀ (result length n). */
static void gemv(fct_dtype dt, double alpha, const fct_mat* B, bool want_t, const char* vec,
                 blasint incv, char* out, blasint incout, double beta) {
  enum CBLAS_TRANSPOSE tr;
  blasint ld;
  blas_form(B, &tr, &ld);
  /* Stored matrix in row-major terms: [B.rows, B.cols] when NoTrans, else
   * [B.cols, B.rows]. */
  blasint sm = tr == CblasNoTrans ? (blasint)B->rows : (blasint)B->cols;
  blasint sn = tr == CblasNoTrans ? (blasint)B->cols : (blasint)B->rows;
  bool stored_t = tr == CblasTrans;
  enum CBLAS_TRANSPOSE op = (want_t != stored_t) ? CblasTrans : CblasNoTrans;
  if (dt == FCT_F32)
    scipy_cblas_sgemv(CblasRowMajor, op, sm, sn, (float)alpha, (const float*)B->data, ld,
                      (const float*)vec, incv, (float)beta, (float*)out, incout);
  else
    scipy_cblas_dgemv(CblasRowMajor, op, sm, sn, alpha, (const double*)B->data, ld,
                      (const double*)vec, incv, beta, (double*)out, incout);
}

/* C [m, n] = alpha·a [m] ⊗ b [n] + beta·C, a = A's column, b = B's row. */
FCT_SIMD_CLONES static void outer(fct_dtype dt, double alpha, const fct_mat* A, const fct_mat* B,
                  const fct_mat* C, double beta) {
  for (int64_t i = 0; i < C->rows; ++i) {
    if (dt == FCT_F32) {
      float a = (float)alpha * ((const float*)A->data)[i * A->rs];
      const float* b = (const float*)B->data;
      float* c = (float*)C->data + i * C->rs;
      if (B->cs == 1 && beta == 0.0) /* the usual case, kept apart to vectorise */
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j];
      else if (beta == 0.0)
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs];
      else
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs] + (float)beta * c[j];
    } else {
      double a = alpha * ((const double*)A->data)[i * A->rs];
      const double* b = (const double*)B->data;
      double* c = (double*)C->data + i * C->rs;
      if (B->cs == 1 && beta == 0.0)
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j];
      else if (beta == 0.0)
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs];
      else
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs] + beta * c[j];
    }
  }
}

/* One thread's share of a GEMM (OpenBLAS runs it in the calling thread). */
static void gemm_serial(fct_dtype dt, double alpha, const fct_mat* A, const fct_mat* B,
                        const fct_mat* C, double beta) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  /* An outer product (k == 1, e.g. weight gradients of one token): one
   * streaming pass over C; GEMM would pack both operands for nothing. */
  if (k == 1) {
    outer(dt, alpha, A, B, C, beta);
    return;
  }
  /* One output row: c = Bᵀ·a (a = A's row, element stride A->cs). */
  if (m == 1 && A->cs >= 1) {
    gemv(dt, alpha, B, true, A->data, (blasint)A->cs, C->data, 1, beta);
    return;
  }
  /* One output column: c = A·b (b = B's column, stride B->rs). */
  if (n == 1 && B->rs >= 1) {
    gemv(dt, alpha, A, false, B->data, (blasint)B->rs, C->data, (blasint)C->rs, beta);
    return;
  }
  enum CBLAS_TRANSPOSE ta, tb;
  blasint lda, ldb;
  blas_form(A, &ta, &lda);
  blas_form(B, &tb, &ldb);
  if (dt == FCT_F32)
    scipy_cblas_sgemm(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, (float)alpha,
                      (const float*)A->data, lda, (const float*)B->data, ldb, (float)beta,
                      (float*)C->data, (blasint)C->rs);
  else
    scipy_cblas_dgemm(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, alpha,
                      (const double*)A->data, lda, (const double*)B->data, ldb, beta,
                      (double*)C->data, (blasint)C->rs);
}

/* ------------------------------------------------------------------------- */
/* Threads. A host framework (torch) may install its thread pool; then every  */
/* GEMM is split into one block per pool thread and OpenBLAS runs each block  */
/* in the calling thread. Two thread pools that both spin-wait on the same    */
/* cores (torch's OpenMP and OpenBLAS's pthreads) were measured to slow a     */
/* small training loop down 30x; one pool cannot collide with itself.         */
/* ------------------------------------------------------------------------- */

static _Atomic(fct_parallel_for_fn) g_parallel_for;
static _Atomic(fct_num_threads_fn) g_num_threads;

/* OpenBLAS's thread count is one global, also raised for a while by
 * fct_cpu_blas_threads_begin: every write to it goes through this lock
 * (held for a few calls into OpenBLAS, at most the creation of its worker
 * threads the first time the count rises), so that the count in force
 * after the last scope closes is the one asked for last. */
static atomic_flag g_blas_lock = ATOMIC_FLAG_INIT;
static int g_blas_scopes; /* open scopes */
static int g_blas_after;  /* OpenBLAS's count once the last scope closes */

static void blas_lock(void) {
  while (atomic_flag_test_and_set_explicit(&g_blas_lock, memory_order_acquire)) {
  }
}

static void blas_unlock(void) { atomic_flag_clear_explicit(&g_blas_lock, memory_order_release); }

/* Sets OpenBLAS's count now, or when the open scopes close. Under the lock. */
static void blas_set_count(int n) {
  if (g_blas_scopes > 0) g_blas_after = n;
  else scipy_openblas_set_num_threads(n);
}

void fct_cpu_set_thread_pool(fct_parallel_for_fn parallel_for, fct_num_threads_fn num_threads) {
  if (parallel_for && num_threads) {
    blas_lock();
    blas_set_count(1);
    blas_unlock();
  }
  atomic_store(&g_num_threads, num_threads);
  atomic_store(&g_parallel_for, parallel_for);
}

int fct_cpu_set_num_threads(int n) {
  blas_lock();
  if (n > 0) blas_set_count(n);
  int in_force = scipy_openblas_get_num_threads();
  blas_unlock();
  return in_force;
}

int fct_cpu_blas_threads_begin(void) {
  fct_parallel_for_fn pfor = atomic_load(&g_parallel_for);
  fct_num_threads_fn nthreads = atomic_load(&g_num_threads);
  /* Without a pool OpenBLAS already runs at the count it was given. */
  int want = pfor && nthreads ? nthreads() : 1;
  if (want <= 1) return 0;
  blas_lock();
  if (g_blas_scopes++ == 0) {
    g_blas_after = scipy_openblas_get_num_threads();
    if (want > g_blas_after) scipy_openblas_set_num_threads(want);
  }
  blas_unlock();
  return 1;
}

void fct_cpu_blas_threads_end(int begun) {
  if (!begun) return;
  blas_lock();
  if (--g_blas_scopes == 0 && scipy_openblas_get_num_threads() != g_blas_after)
    scipy_openblas_set_num_threads(g_blas_after);
  blas_unlock();
}

/* ------------------------------------------------------------------------- */
/* Dispatch. Every parallel call goes through `dispatch`: the work is cut     */
/* into chunks that the pool's threads (the caller among them) claim from a   */
/* shared counter, so a thread that starts late finds its share taken by the  */
/* others instead of holding them back. The pool's join still waits for every */
/* thread to show up, and on a machine where another process holds a core a   */
/* thread can stay descheduled for a scheduler slice (milliseconds): every    */
/* dispatch would pay that, and an op of many GEMMs many times. A dispatch    */
/* whose caller sat idle at the join for over stall_ns, and longer than it    */
/* worked, stalled; two in a row (a lone late wake-up, as a virtual machine's */
/* idle core gives now and then, is not worth a hold) stop the pool for a     */
/* hold time: calls then run serially in the caller (what a loaded machine    */
/* gives anyway), cut into the same blocks as on the pool so that results do  */
/* not depend on it, and the first dispatch after the hold tries the pool     */
/* again (one stall then renews the hold). A stalled dispatch was measured to */
/* cost 5-35 ms on a 2-core machine beside a busy loop, so holds are long     */
/* next to that: 20 ms at first, four times longer while tries keep stalling  */
/* (up to 1 s: a try then costs ~1.5%), halved after a hold's time without a  */
/* stall.                                                                     */
/* ------------------------------------------------------------------------- */

static _Atomic int64_t g_stall_ns = 200000;      /* 0: never stop the pool */
static _Atomic int64_t g_hold_min_ns = 20000000;
static _Atomic int64_t g_hold_max_ns = 1000000000;
static _Atomic int64_t g_hold_ns = 20000000;     /* the next hold */
static _Atomic int64_t g_held_until;             /* 0, or now_ns() until which the pool rests */
static _Atomic int64_t g_marked_ns;              /* the last hold's end, or the last halving */
static _Atomic uint64_t g_stalls;
static _Atomic int g_streak; /* stalled dispatches in a row */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* No clock read unless a dispatch has stalled since the last clean one. */
static bool pool_held(void) {
  int64_t until = atomic_load_explicit(&g_held_until, memory_order_relaxed);
  return until != 0 && now_ns() < until;
}

/* Threads a split is cut for: the pool's size (1 without a pool), whether
 * or not the pool rests, so that a GEMM's blocks, and so its rounding, are
 * the same either way. (fct_cpu_workers, which sizes workspaces, gives the
 * same: a query and its call must agree.) */
static int split_threads(void) {
  fct_parallel_for_fn pfor = atomic_load(&g_parallel_for);
  fct_num_threads_fn nthreads = atomic_load(&g_num_threads);
  if (!pfor || !nthreads) return 1;
  int t = nthreads();
  return t > 1 ? t : 1;
}

static void note_dispatch(bool stalled, int64_t t) {
  int64_t hold = atomic_load_explicit(&g_hold_ns, memory_order_relaxed);
  int64_t lo = atomic_load_explicit(&g_hold_min_ns, memory_order_relaxed);
  int64_t hi = atomic_load_explicit(&g_hold_max_ns, memory_order_relaxed);
  if (stalled) {
    atomic_fetch_add_explicit(&g_stalls, 1, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&g_streak, 1, memory_order_relaxed) < 1) return;
    atomic_store_explicit(&g_held_until, t + hold, memory_order_relaxed);
    atomic_store_explicit(&g_hold_ns, hold < hi / 4 ? 4 * hold : hi, memory_order_relaxed);
    atomic_store_explicit(&g_marked_ns, t + hold, memory_order_relaxed);
    return;
  }
  if (atomic_load_explicit(&g_streak, memory_order_relaxed) != 0)
    atomic_store_explicit(&g_streak, 0, memory_order_relaxed);
  if (atomic_load_explicit(&g_held_until, memory_order_relaxed) != 0)
    atomic_store_explicit(&g_held_until, 0, memory_order_relaxed);
  /* A whole hold's time without a stall halves the next hold: on a machine
   * that stays busy the tries keep stalling and the hold stays long. */
  if (hold > lo && t - atomic_load_explicit(&g_marked_ns, memory_order_relaxed) > hold) {
    atomic_store_explicit(&g_hold_ns, hold / 2 > lo ? hold / 2 : lo, memory_order_relaxed);
    atomic_store_explicit(&g_marked_ns, t, memory_order_relaxed);
  }
}

void fct_cpu_set_stall_policy(int64_t stall_ns, int64_t hold_min_ns, int64_t hold_max_ns) {
  if (hold_min_ns < 1) hold_min_ns = 1;
  if (hold_max_ns < hold_min_ns) hold_max_ns = hold_min_ns;
  atomic_store(&g_stall_ns, stall_ns > 0 ? stall_ns : 0);
  atomic_store(&g_hold_min_ns, hold_min_ns);
  atomic_store(&g_hold_max_ns, hold_max_ns);
  atomic_store(&g_hold_ns, hold_min_ns);
  atomic_store(&g_held_until, 0);
  atomic_store(&g_streak, 0);
}

uint64_t fct_cpu_pool_stalls(void) { return atomic_load(&g_stalls); }

int fct_cpu_pool_resting(void) { return pool_held(); }

void fct_cpu_pool_rest(int64_t ns) {
  atomic_store(&g_held_until, ns > 0 ? now_ns() + ns : 0);
}

static _Thread_local int tls_token; /* its address tells the caller's thread */

typedef struct claim_job {
  fct_parallel_body body;
  void* arg;
  int64_t n, step, chunks;
  _Atomic int64_t next; /* the next unclaimed chunk */
  const int* caller;
  int64_t caller_free;  /* now_ns() when the caller found nothing left; 0: not seen */
} claim_job;

static void claim(claim_job* j) {
  for (;;) {
    int64_t c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
    if (c >= j->chunks) return;
    int64_t b = c * j->step, e = b + j->step < j->n ? b + j->step : j->n;
    j->body(b, e, j->arg);
  }
}

/* What each pool thread runs, whatever sub-range it was given. */
static void claim_body(int64_t begin, int64_t end, void* arg) {
  (void)begin;
  (void)end;
  claim_job* j = arg;
  claim(j);
  if (j->caller == &tls_token) j->caller_free = now_ns();
}

/* body over [0, n) in chunks of at least `grain` items, on `threads`
 * (> 1) threads of the installed pool. About four chunks per thread: fine
 * enough that the threads that run can take up a late one's share, coarse
 * enough that claiming costs nothing next to a chunk. */
static void dispatch(int threads, int64_t n, int64_t grain, fct_parallel_body body, void* arg) {
  fct_parallel_for_fn pfor = atomic_load(&g_parallel_for);
  int64_t per = (n + 4 * (int64_t)threads - 1) / (4 * (int64_t)threads);
  int64_t step = per > grain ? per : (grain > 1 ? grain : 1);
  if (!pfor || pool_held()) { /* uninstalled meanwhile, or resting: the same chunks */
    for (int64_t b = 0; b < n; b += step) body(b, b + step < n ? b + step : n, arg);
    return;
  }
  claim_job j = {body, arg, n, step, (n + step - 1) / step, 0, &tls_token, 0};
  int64_t t0 = now_ns();
  int32_t rc = pfor(0, threads, 1, claim_body, &j);
  claim(&j); /* what the pool left, if it did not run */
  int64_t stall = atomic_load_explicit(&g_stall_ns, memory_order_relaxed);
  /* Judged only when the caller took part (torch's pools run a share in
   * the calling thread). */
  if (rc != 0 || stall == 0 || j.caller_free == 0) return;
  int64_t t1 = now_ns();
  int64_t waited = t1 - j.caller_free, worked = j.caller_free - t0;
  note_dispatch(waited > stall && waited > worked, t1);
}

typedef struct gemm_job {
  fct_dtype dt;
  const fct_mat *A, *B, *C;
  double alpha, beta;
  bool split_rows; /* else split the columns of B and C */
  int64_t step;    /* rows or columns per block */
} gemm_job;

static void gemm_blocks(int64_t begin, int64_t end, void* arg) {
  const gemm_job* j = arg;
  size_t es = fct_dtype_bytes(j->dt);
  for (int64_t b = begin; b < end; ++b) {
    fct_mat A = *j->A, B = *j->B, C = *j->C;
    int64_t dim = j->split_rows ? C.rows : C.cols;
    int64_t lo = b * j->step, hi = lo + j->step < dim ? lo + j->step : dim;
    if (lo >= hi) continue;
    if (j->split_rows) { /* C [lo:hi, :] = A [lo:hi, :] · B */
      A.data += lo * A.rs * (int64_t)es;
      C.data += lo * C.rs * (int64_t)es;
      A.rows = C.rows = hi - lo;
    } else { /* C [:, lo:hi] = A · B [:, lo:hi] */
      B.data += lo * B.cs * (int64_t)es;
      C.data += lo * (int64_t)es;
      B.cols = C.cols = hi - lo;
    }
    gemm_serial(j->dt, j->alpha, &A, &B, &C, j->beta);
  }
}

/* A product whose C is too small to split (at most 16 x 16: the gradient of
 * a small factor, a sum over every row of a batch) but whose k is long is
 * cut into pieces of k: piece 0 goes into C (with beta), each other piece
 * into a partial product of its own on the caller's stack, and the caller
 * adds them in piece order. The pieces are a function of the shape alone,
 * not of the pool's size. Without it the gradient of a tensorized layer's
 * factor ([8, 4] summed over 65536 rows of a chunk) runs on one core while
 * the others wait. */
enum {
  SPLITK_MAX_C = 16,     /* C's rows and columns at most */
  SPLITK_MIN_K = 1024,   /* k per piece at least */
  SPLITK_PIECES = 16,    /* pieces at most */
  SPLITK_BYTES = 16384   /* the partial products at most */
};

typedef struct splitk_job {
  fct_dtype dt;
  const fct_mat *A, *B, *C;
  double alpha, beta;
  int64_t step;
  char* parts; /* [pieces - 1][m·n], dense */
} splitk_job;

static void splitk_pieces(int64_t begin, int64_t end, void* arg) {
  const splitk_job* j = arg;
  size_t es = fct_dtype_bytes(j->dt);
  int64_t m = j->C->rows, n = j->C->cols, k = j->A->cols;
  for (int64_t b = begin; b < end; ++b) {
    int64_t lo = b * j->step, hi = lo + j->step < k ? lo + j->step : k;
    fct_mat A = *j->A, B = *j->B; /* A [:, lo:hi], B [lo:hi, :] */
    A.data += lo * A.cs * (int64_t)es;
    B.data += lo * B.rs * (int64_t)es;
    A.cols = B.rows = hi - lo;
    if (b == 0) {
      gemm_serial(j->dt, j->alpha, &A, &B, j->C, j->beta);
    } else {
      fct_mat P = {j->parts + (b - 1) * m * n * (int64_t)es, m, n, n, 1};
      memset(P.data, 0, (size_t)(m * n) * es); /* stack bytes: never read as values */
      gemm_serial(j->dt, j->alpha, &A, &B, &P, 0.0);
    }
  }
}

/* Pieces for C = A·B (0: not a split-k product). */
static int64_t splitk_count(fct_dtype dt, int64_t m, int64_t n, int64_t k) {
  if (m > SPLITK_MAX_C || n > SPLITK_MAX_C || k < 2 * SPLITK_MIN_K) return 0;
  if ((double)m * (double)n * (double)k < (double)(1 << 20)) return 0;
  int64_t pieces = k / SPLITK_MIN_K;
  int64_t room = 1 + SPLITK_BYTES / (m * n * (int64_t)fct_dtype_bytes(dt));
  if (pieces > room) pieces = room;
  return pieces < SPLITK_PIECES ? pieces : SPLITK_PIECES;
}

static void gemm_splitk(fct_dtype dt, double alpha, const fct_mat* A, const fct_mat* B,
                        const fct_mat* C, double beta, int64_t pieces) {
  _Alignas(64) char parts[SPLITK_BYTES];
  int64_t m = C->rows, n = C->cols, k = A->cols;
  int64_t step = (k + pieces - 1) / pieces;
  step = (step + 15) / 16 * 16;
  pieces = (k + step - 1) / step;
  splitk_job job = {dt, A, B, C, alpha, beta, step, parts};
  fct_cpu_parallel(pieces, 1, splitk_pieces, &job);
  for (int64_t i = 0; i < m; ++i) {
    if (dt == FCT_F32) {
      float* c = (float*)C->data + i * C->rs;
      for (int64_t b = 1; b < pieces; ++b) {
        const float* p = (const float*)parts + ((b - 1) * m + i) * n;
        for (int64_t jj = 0; jj < n; ++jj) c[jj] += p[jj];
      }
    } else {
      double* c = (double*)C->data + i * C->rs;
      for (int64_t b = 1; b < pieces; ++b) {
        const double* p = (const double*)parts + ((b - 1) * m + i) * n;
        for (int64_t jj = 0; jj < n; ++jj) c[jj] += p[jj];
      }
    }
  }
}

void fct_cpu_gemm(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                  double beta) {
  fct_cpu_gemm_scaled(dt, 1.0, A, B, C, beta);
}

void fct_cpu_gemm_scaled(fct_dtype dt, double alpha, const fct_mat* A, const fct_mat* B,
                         const fct_mat* C, double beta) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0) zero_rows(dt, C);
    return; /* beta == 1: C unchanged */
  }
  int64_t pieces = splitk_count(dt, m, n, k);
  if (pieces > 1) {
    gemm_splitk(dt, alpha, A, B, C, beta, pieces);
    return;
  }
  /* Below ~2^20 multiply-adds a block is too small to pay for a wake-up. */
  int threads = (double)m * (double)n * (double)k < (double)(1 << 20) ? 1 : split_threads();
  if (threads <= 1) {
    gemm_serial(dt, alpha, A, B, C, beta);
    return;
  }
  /* Split the longer side of C into one block per thread, in multiples of 16
   * so that column blocks of a float row start on a cache line. */
  gemm_job job = {dt, A, B, C, alpha, beta, m >= n, 0};
  int64_t dim = job.split_rows ? m : n;
  int64_t step = (dim + threads - 1) / threads;
  job.step = (step + 15) / 16 * 16;
  int64_t blocks = (dim + job.step - 1) / job.step;
  if (blocks <= 1) gemm_serial(dt, alpha, A, B, C, beta);
  else dispatch(threads, blocks, 1, gemm_blocks, &job);
}

/* ------------------------------------------------------------------------- */
/* Batches (the tensorized linear ops). Small products are spread over the    */
/* pool one whole product per task: splitting a GEMM below ~2^20 multiply-    */
/* adds costs more in wake-ups than it gains, and a loop of them would leave  */
/* every thread but one idle.                                                 */
/* ------------------------------------------------------------------------- */

static fct_mat shifted(const fct_mat* m, int64_t elems, size_t es) {
  fct_mat r = *m;
  if (r.data) r.data += elems * (int64_t)es; /* an empty operand's data may be NULL */
  return r;
}

typedef struct batch_job {
  fct_dtype dt;
  const fct_mat *A, *B, *C;
  double beta;
  int64_t sa, sb, sc;
} batch_job;

static void batch_blocks(int64_t begin, int64_t end, void* arg) {
  const batch_job* j = arg;
  size_t es = fct_dtype_bytes(j->dt);
  for (int64_t b = begin; b < end; ++b) {
    fct_mat A = shifted(j->A, b * j->sa, es), B = shifted(j->B, b * j->sb, es);
    fct_mat C = shifted(j->C, b * j->sc, es);
    gemm_serial(j->dt, 1.0, &A, &B, &C, j->beta);
  }
}

void fct_cpu_gemm_batched(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                          double beta, int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
  size_t es = fct_dtype_bytes(dt);
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (batch <= 0 || m == 0 || n == 0) return;
  bool small = (double)m * (double)n * (double)k < (double)(1 << 20);
  int threads = k == 0 || batch == 1 || !small ? 1 : split_threads();
  if (threads <= 1) {
    for (int64_t b = 0; b < batch; ++b) {
      fct_mat Ab = shifted(A, b * sa, es), Bb = shifted(B, b * sb, es), Cb = shifted(C, b * sc, es);
      fct_cpu_gemm(dt, &Ab, &Bb, &Cb, beta);
    }
    return;
  }
  batch_job job = {dt, A, B, C, beta, sa, sb, sc};
  dispatch(threads, batch, 1, batch_blocks, &job);
}

/* A reduction C = Σ_b A_b·B_b + beta·C is split over C's rows or columns,
 * each block summing every b in order: deterministic, and no scratch. */
typedef struct reduce_job {
  fct_dtype dt;
  const fct_mat *A, *B, *C;
  double beta;
  int64_t batch, sa, sb;
  bool split_rows;
  int64_t step;
} reduce_job;

static void reduce_blocks(int64_t begin, int64_t end, void* arg) {
  const reduce_job* j = arg;
  size_t es = fct_dtype_bytes(j->dt);
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t dim = j->split_rows ? j->C->rows : j->C->cols;
    int64_t lo = blk * j->step, hi = lo + j->step < dim ? lo + j->step : dim;
    if (lo >= hi) continue;
    for (int64_t b = 0; b < j->batch; ++b) {
      fct_mat A = shifted(j->A, b * j->sa, es), B = shifted(j->B, b * j->sb, es), C = *j->C;
      if (j->split_rows) {
        A.data += lo * A.rs * (int64_t)es;
        C.data += lo * C.rs * (int64_t)es;
        A.rows = C.rows = hi - lo;
      } else {
        B.data += lo * B.cs * (int64_t)es;
        C.data += lo * (int64_t)es;
        B.cols = C.cols = hi - lo;
      }
      gemm_serial(j->dt, 1.0, &A, &B, &C, b == 0 ? j->beta : 1.0);
    }
  }
}

void fct_cpu_gemm_reduce(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                         double beta, int64_t batch, int64_t sa, int64_t sb) {
  size_t es = fct_dtype_bytes(dt);
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return;
  if (batch <= 0 || k == 0) {
    if (beta == 0.0) zero_rows(dt, C);
    return;
  }
  double work = (double)m * (double)n * (double)k * (double)batch;
  int threads = work < (double)(1 << 20) || (m < 32 && n < 32) ? 1 : split_threads();
  if (threads <= 1) {
    for (int64_t b = 0; b < batch; ++b) {
      fct_mat Ab = shifted(A, b * sa, es), Bb = shifted(B, b * sb, es);
      fct_cpu_gemm(dt, &Ab, &Bb, C, b == 0 ? beta : 1.0);
    }
    return;
  }
  reduce_job job = {dt, A, B, C, beta, batch, sa, sb, m >= n, 0};
  int64_t dim = job.split_rows ? m : n;
  int64_t step = (dim + threads - 1) / threads;
  job.step = (step + 15) / 16 * 16;
  int64_t blocks = (dim + job.step - 1) / job.step;
  if (blocks <= 1) reduce_blocks(0, blocks, &job);
  else dispatch(threads, blocks, 1, reduce_blocks, &job);
}

int fct_cpu_workers(void) {
  fct_parallel_for_fn pfor = atomic_load(&g_parallel_for);
  fct_num_threads_fn nthreads = atomic_load(&g_num_threads);
  int threads = pfor && nthreads ? nthreads() : 1;
  return threads > 1 ? threads : 1;
}

void fct_cpu_parallel(int64_t n, int64_t grain, fct_parallel_body body, void* arg) {
  if (n <= 0) return;
  int threads = n <= grain ? 1 : split_threads();
  if (threads <= 1) body(0, n, arg);
  else dispatch(threads, n, grain, body, arg);
}
