/*
 * CP linear entry points (factorch.h): W[(o), (i)] = Σ_r ∏ A_k[i_k, r] ∏ B_k[o_k, r],
 *   z [M, R] = x · KR(A),   y [M, out] = z · KR(B)ᵀ + b,
 * where KR(A) [in, R] is the Khatri–Rao (column-wise Kronecker) product of
 * the input factors, and its gradients. Device independent: checks, plan,
 * workspace layout, then a sequence of backend primitives (backend.h).
 *
 * Contraction order. Forming KR(A) costs in·R multiplies, independent of M,
 * and turns both contractions into GEMMs of 2·M·R·in and 2·M·R·out FLOPs.
 * Contracting x with one factor at a time instead costs the same 2·M·in·R
 * for the first factor (and more after it) and leaves an intermediate of
 * M·(in/i_1)·R elements, so it only pays when M < i_k / 2, and then saves
 * less than the GEMV's own cost: the order is always x → z → y.
 *
 * A few rows (split). At M = 1 the pass is building KR(A) and KR(B) and
 * reading them back once ((in + out)·R elements through memory). For a few
 * rows the last factor of each side is applied on its own instead, so that
 * only the products of the others are built (P = in/i_n and Q = out/o_n
 * rows, i_n and o_n times fewer), per row m (x_m viewed [P, i_n]):
 *   u [i_n, Rc] = x_mᵀ · KR(A_<n),   z_m = Σ_a u[a, :] ⊙ A_n[a, :],
 *   y_m [Q, o_n] += KR(B_<n, z_m) · B_nᵀ   (KR(B_<n) with z_m as one more row factor).
 * The backward alike (backward_split), each factor's gradient from the
 * smaller blocks. Taken when the blocks rebuilt per row (M·Q forward,
 * M·(P + Q) backward) and the two smaller ones stay under half of the full
 * blocks (split_pays).
 *
 * Cost model: what remains to choose is how many columns of KR to build at
 * a time (Rc). Per chunk the blocks KR(A)[:, c] [in, Rc] and KR(B)[:, c]
 * [out, Rc] are built in the workspace and every batch-sized operand is
 * streamed once more: small chunks keep the blocks in cache but stream the
 * batch R/Rc times, large chunks stream it once but spill the blocks to
 * memory (2·(in+out)·R elements of traffic) and need more workspace.
 * chunk_cost() prices both in FLOP-equivalents (op_common.h) and the
 * cheapest of Rc ∈ {R, 64, 128, 256, ...} is taken.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "op_common.h"

/* One side of the factorization: the factors and their mode sizes. */
typedef struct cp_side {
  int n;
  int64_t modes[FCT_MAX_MODES];
  int64_t size; /* ∏ modes */
  const DLTensor* const* f;
} cp_side;

typedef struct cp_shape {
  cp_side in, out;
  int64_t R, M;
  size_t es;
  bool cuda;
} cp_shape;

/* What a call computes besides the forward's y. */
typedef struct cp_needs {
  bool backward;
  bool z_given;          /* forward: z is an output; backward: z is an input */
  bool gx, gb, gin, gout; /* backward outputs asked for */
  bool pack_x, pack_g;
  bool check;            /* FCT_FLAG_CHECK_FINITE */
  bool small;            /* FCT_FLAG_SMALL_CHUNKS */
  bool x_rows, g_rows;   /* x's, grad_y's rows dense (the split reads each as [P, i_n]) */
} cp_needs;

typedef struct cp_plan {
  cp_shape s;
  cp_needs n;
  int64_t Rc;
  bool split;    /* a few rows: the last factor of each side apart (top of the file) */
  int64_t P, Q;  /* split: the rows of KR(A_<n) and KR(B_<n) */
  size_t off_x, off_g, off_kin, off_kout, off_z, off_gz, off_gk, off_pre, off_suf, off_scratch;
  size_t off_ones, off_u, off_tmp, off_gka, off_gkb;
  size_t bytes;
  double flops;
} cp_plan;

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

static fct_status check_side(fct_context* ctx, const char* list, int n, const DLTensor* const* f,
                             const DLTensor* x, int64_t* R, const char* r_from, cp_side* side) {
  char nm[48];
  if (n < 1 || n > FCT_MAX_MODES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "%s: expected 1 to %d factors, got %d", list,
                    FCT_MAX_MODES, n);
  if (!f)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: expected an array of %d tensors, got NULL",
                    list, n);
  side->n = n;
  side->f = f;
  side->size = 1;
  for (int k = 0; k < n; ++k) {
    const char* name = fct_item_name(nm, sizeof nm, list, k);
    FCT_TRY(fct_check_param(ctx, name, f[k], x, 2, "[mode, R]"));
    if (*R < 0) {
      *R = f[k]->shape[1];
      if (*R < 1)
        return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected a rank R >= 1 (its last dim), got %lld",
                        name, (long long)*R);
    }
    if (f[k]->shape[1] != *R)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "%s: expected [mode, R] with R = %lld (the last dim of %s), got [%lld, %lld]",
                      name, (long long)*R, r_from, (long long)f[k]->shape[0],
                      (long long)f[k]->shape[1]);
    if (f[k]->shape[0] < 1)
      return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected a mode size >= 1, got 0", name);
    side->modes[k] = f[k]->shape[0];
    if (__builtin_mul_overflow(side->size, side->modes[k], &side->size) ||
        !fct_fits_int(side->size))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: the product of the mode sizes must be < 2^31",
                      list);
  }
  return FCT_OK;
}

static fct_status check_shape(fct_context* ctx, const DLTensor* x, int n_in,
                              const DLTensor* const* A, int n_out, const DLTensor* const* B,
                              cp_shape* s) {
  memset(s, 0, sizeof *s);
  FCT_TRY(fct_check_input_rows(ctx, "x", x, &s->M));
  s->R = -1;
  FCT_TRY(check_side(ctx, "in_factors", n_in, A, x, &s->R, "in_factors[0]", &s->in));
  FCT_TRY(check_side(ctx, "out_factors", n_out, B, x, &s->R, "in_factors[0]", &s->out));
  if (!fct_fits_int(s->R))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "in_factors[0]: the rank must be < 2^31");
  int64_t last = x->shape[x->ndim - 1];
  if (last != s->in.size)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "x: expected a last dim of %lld (in: the product of the mode sizes of "
                    "in_factors), got %lld",
                    (long long)s->in.size, (long long)last);
  s->es = fct_dtype_bytes(fct_dtype_of(x->dtype));
  s->cuda = x->device.device_type == kDLCUDA;
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan                                                                       */
/* ------------------------------------------------------------------------- */

/* FLOPs of one pass (the chunking does not change them). Building a
 * Khatri–Rao block costs about 1.2 multiplies per element (the products of
 * the leading factors are shared); its factor gradients about 3·n_modes. */
static double pass_flops(const cp_shape* s, const cp_needs* n) {
  double M = (double)s->M, in = (double)s->in.size, out = (double)s->out.size, R = (double)s->R;
  if (!n->backward) return 2 * M * R * (in + out) + 1.2 * (in + out) * R;
  double f = 1.2 * (in + out) * R;
  if (n->gx || n->gin) f += 2 * M * out * R;   /* gz = grad_y · KR(B) */
  if (n->gx) f += 2 * M * R * in;              /* grad_x = gz · KR(A)ᵀ */
  if (n->gout) f += 2 * M * out * R + (n->z_given ? 0 : 2 * M * in * R) + 3.0 * s->out.n * out * R;
  if (n->gin) f += 2 * M * in * R + 3.0 * s->in.n * in * R;
  if (n->gb) f += M * out;
  return f;
}

/* Cost of a pass with chunks of Rc columns (see the top of the file):
 * batch-sized operands streamed once per chunk, Khatri–Rao blocks spilled
 * when they outgrow the cache budget, and the calls. */
static double chunk_cost(const cp_plan* p, const fct_machine* mc, int64_t Rc) {
  const cp_shape* s = &p->s;
  const cp_needs* n = &p->n;
  double M = (double)s->M, in = (double)s->in.size, out = (double)s->out.size, R = (double)s->R;
  double block_rows = p->split ? (double)(p->P + p->Q) : in + out;
  double nch = ceil(R / (double)Rc), es = (double)s->es;
  double stream, calls;
  if (!n->backward) {
    stream = nch * M * in + (2 * nch - 1) * M * out + M * R; /* x; y read+written; z */
    calls = 4 * nch;
  } else {
    stream = 4 * M * R; /* gz written and read twice, z read */
    if (n->gx || n->gin) stream += nch * M * out;
    if (n->gx) stream += (2 * nch - 1) * M * in;
    if (n->gout) stream += nch * M * (out + (n->z_given ? 0 : in));
    if (n->gin) stream += nch * M * in;
    /* GEMMs, and one factor-gradient kernel per factor; the Khatri–Rao
     * builds of the partial products are small and run serially. */
    calls = 6 * nch + nch * (s->in.n + s->out.n);
  }
  bool spills = block_rows * (double)Rc * es > (double)mc->chunk_bytes;
  double bytes = es * (stream + (spills ? 2 * block_rows * R : 0));
  return mc->flop_per_byte * bytes + mc->call_flops * calls;
}

/* Largest count of rows of a prefix or suffix Khatri–Rao product needed by
 * the factor gradients of one side. */
static int64_t max_partial(const cp_side* side) {
  int64_t best = 1;
  for (int k = 0; k < side->n; ++k) {
    int64_t pre = 1, suf = 1;
    for (int j = 0; j < k; ++j) pre *= side->modes[j];
    for (int j = k + 1; j < side->n; ++j) suf *= side->modes[j];
    if (pre > best) best = pre;
    if (suf > best) best = suf;
  }
  return best;
}

static void lay_out(cp_plan* p, fct_layout* L) {
  const cp_shape* s = &p->s;
  const cp_needs* n = &p->n;
  int64_t M = s->M, Rc = p->Rc, in = s->in.size, out = s->out.size;
  size_t es = s->es;
  memset(L, 0, sizeof *L);
  if (n->pack_x) p->off_x = fct_layout_take(L, M * in, es);
  if (n->pack_g) p->off_g = fct_layout_take(L, M * out, es);
  bool fwd = !n->backward;
  if (p->split) {
    int64_t ia = s->in.modes[s->in.n - 1], ob = s->out.modes[s->out.n - 1];
    bool z_made = fwd ? !n->z_given : n->gout && !n->z_given;
    p->off_ones = fct_layout_take(L, Rc, es);
    p->off_u = fct_layout_take(L, (ia > ob ? ia : ob) * Rc, es);
    if (fwd || z_made) p->off_kin = fct_layout_take(L, p->P * Rc, es);
    if (fwd || n->gx || n->gin) p->off_kout = fct_layout_take(L, p->Q * Rc, es);
    if (z_made) p->off_z = fct_layout_take(L, M * Rc, es);
    if (!fwd) {
      p->off_tmp = fct_layout_take(L, (p->P > p->Q ? p->P : p->Q) * Rc, es);
      if (n->gx || n->gin) p->off_gz = fct_layout_take(L, M * Rc, es);
      if (n->gin) p->off_gka = fct_layout_take(L, p->P * Rc, es);
      if (n->gout) p->off_gkb = fct_layout_take(L, p->Q * Rc, es);
      if (n->gin || n->gout) {
        int64_t part = n->gin ? max_partial(&s->in) : 1, po = n->gout ? max_partial(&s->out) : 1;
        part = po > part ? po : part;
        p->off_pre = fct_layout_take(L, part * Rc, es);
        p->off_suf = fct_layout_take(L, part * Rc, es);
      }
    }
    if (n->check && p->s.cuda) p->off_scratch = fct_layout_take(L, FCT_CHECK_SCRATCH, 1);
    return;
  }
  bool kin = fwd || n->gx || (n->gout && !n->z_given);
  bool kout = fwd || n->gx || n->gin;
  if (kin) p->off_kin = fct_layout_take(L, in * Rc, es);
  if (kout) p->off_kout = fct_layout_take(L, out * Rc, es);
  if ((fwd && !n->z_given) || (!fwd && n->gout && !n->z_given))
    p->off_z = fct_layout_take(L, M * Rc, es);
  if (!fwd && (n->gx || n->gin)) p->off_gz = fct_layout_take(L, M * Rc, es);
  if (!fwd && (n->gin || n->gout)) {
    int64_t rows = 0, part = 1;
    if (n->gin) {
      rows = in;
      part = max_partial(&s->in);
    }
    if (n->gout) {
      rows = out > rows ? out : rows;
      int64_t po = max_partial(&s->out);
      part = po > part ? po : part;
    }
    p->off_gk = fct_layout_take(L, rows * Rc, es);
    p->off_pre = fct_layout_take(L, part * Rc, es);
    p->off_suf = fct_layout_take(L, part * Rc, es);
  }
  if (n->check && p->s.cuda) p->off_scratch = fct_layout_take(L, FCT_CHECK_SCRATCH, 1);
}

/* Whether a pass takes the split (top of the file): a few rows, dense rows
 * of x and grad_y, at least two factors a side, and the blocks it builds
 * (P + Q once per chunk; per row Q in the forward, P + Q in the backward)
 * under half of the full ones. */
enum { SPLIT_MAX_ROWS = 4 };

static bool split_pays(const cp_plan* p) {
  const cp_shape* s = &p->s;
  const cp_needs* n = &p->n;
  if (!n->x_rows || (n->backward && !n->g_rows) || s->M < 1 || s->M > SPLIT_MAX_ROWS ||
      s->in.n < 2 || s->out.n < 2)
    return false;
  double P = (double)p->P, Q = (double)p->Q, per_row = n->backward ? P + Q : Q;
  return (double)s->M * per_row + P + Q < 0.5 * (double)(s->in.size + s->out.size);
}

static fct_status make_plan(fct_context* ctx, const cp_shape* s, const cp_needs* n, cp_plan* p) {
  memset(p, 0, sizeof *p);
  p->s = *s;
  p->n = *n;
  p->P = s->in.size / s->in.modes[s->in.n - 1];
  p->Q = s->out.size / s->out.modes[s->out.n - 1];
  p->split = split_pays(p);
  fct_machine mc = fct_machine_for(s->cuda);
  /* Candidates: R itself, and powers of two from 64 below it. Workspace
   * beyond the cap is refused unless nothing smaller exists. */
  size_t cap = mc.workspace_cap;
  double best_cost = INFINITY;
  int64_t best_rc = s->R;
  size_t best_bytes = SIZE_MAX;
  bool have = false, best_fits = false;
  for (int64_t rc = s->R; rc > 0; rc = fct_smaller_chunk(rc, 64)) {
    p->Rc = rc;
    fct_layout L;
    lay_out(p, &L);
    size_t bytes = L.overflow ? SIZE_MAX : L.cursor;
    bool fits = bytes <= cap;
    double c = chunk_cost(p, &mc, rc);
    /* Fitting candidates beat the others; among fitting ones the cheapest
     * (the larger on ties, seen first); otherwise the smallest workspace. */
    bool take = !have || (fits && !best_fits) ||
                (fits == best_fits && (fits ? c < best_cost : bytes < best_bytes));
    if (take) {
      have = true;
      best_fits = fits;
      best_cost = c;
      best_rc = rc;
      best_bytes = bytes;
    }
  }
  p->Rc = n->small && s->R > 3 ? 3 : best_rc;
  fct_layout L;
  lay_out(p, &L);
  FCT_TRY(fct_layout_done(ctx, &L, &p->bytes));
  p->flops = pass_flops(s, n);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Execution helpers                                                          */
/* ------------------------------------------------------------------------- */

/* Columns [c0, c0 + rc) of a factor as an fct_mat (any strides). */
static fct_mat factor_cols(const DLTensor* f, int64_t c0, int64_t rc, size_t es) {
  int64_t st[2];
  fct_strides(f, st);
  fct_mat m = {fct_data(f) + c0 * st[1] * (int64_t)es, f->shape[0], rc, st[0], st[1]};
  return m;
}

/* out [∏ modes of factors lo..hi-1, rc] = KR of those factors' columns. */
static fct_status build_kr(const fct_exec* e, const cp_side* side, int lo, int hi, int64_t c0,
                           int64_t rc, char* dst, int64_t* rows) {
  fct_mat F[FCT_MAX_MODES];
  int64_t n = 1;
  for (int k = lo; k < hi; ++k) {
    F[k - lo] = factor_cols(side->f[k], c0, rc, e->es);
    n *= side->modes[k];
  }
  fct_mat out = fct_dense(dst, n, rc);
  *rows = n;
  return e->be->khatri_rao(e->ctx, e->device, e->dt, hi - lo, F, &out);
}

/* Gradients of the factors of one side, columns [c0, c0 + rc), from
 * gK [∏ modes, rc] = the gradient of the side's Khatri–Rao block. */
static fct_status side_grads(const fct_exec* e, const cp_plan* p, const cp_side* side,
                             const fct_mat* gK, DLTensor* const* grads, int64_t c0, int64_t rc) {
  for (int k = 0; k < side->n; ++k) {
    if (!grads[k]) continue;
    int64_t npre, nsuf;
    char* pre = fct_ws_at(e, p->off_pre);
    char* suf = fct_ws_at(e, p->off_suf);
    FCT_TRY(build_kr(e, side, 0, k, c0, rc, pre, &npre));
    FCT_TRY(build_kr(e, side, k + 1, side->n, c0, rc, suf, &nsuf));
    fct_mat P = fct_dense(pre, npre, rc), S = fct_dense(suf, nsuf, rc);
    fct_mat G = {fct_data(grads[k]) + c0 * (int64_t)e->es, side->modes[k], rc, p->s.R, 1};
    FCT_TRY(e->be->khatri_rao_grad(e->ctx, e->device, e->dt, gK, npre, side->modes[k], nsuf, &P, &S,
                               &G));
  }
  return FCT_OK;
}

/* A batched input as a BLAS-readable [M, n] view: as it is, or packed. */
static fct_status input_view(const fct_exec* e, const DLTensor* t, bool pack, size_t off,
                             int64_t M, int64_t n, fct_mat* m) {
  if (!pack) {
    fct_fold(t, m);
    return FCT_OK;
  }
  FCT_TRY(e->be->pack(e->ctx, t, fct_ws_at(e, off)));
  *m = fct_ws_mat(e, off, M, n);
  return FCT_OK;
}

static bool any(DLTensor* const* ts, int n) {
  for (int i = 0; ts && i < n; ++i)
    if (ts[i]) return true;
  return false;
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

/* z_m (or gz_m) [1, rc] = Σ_a (x_mᵀ · K)[a, :] ⊙ F[a, :]: x_m [P, i] a row
 * viewed as a matrix, K [P, rc] the Khatri–Rao product of the side's other
 * factors, F [i, rc] the last one's columns, u [i, rc] and ones [1, rc]
 * scratch. */
static fct_status project_row(const fct_exec* e, const fct_mat* xm, const fct_mat* K,
                              const fct_mat* F, const fct_mat* ones, char* u, fct_mat* out) {
  fct_mat xt = fct_mat_t(*xm), U = fct_dense(u, xm->cols, K->cols);
  FCT_TRY(fct_x_gemm(e, &xt, K, &U, 0.0));
  return e->be->khatri_rao_grad(e->ctx, e->device, e->dt, &U, xm->cols, 1, 1, F, ones, out);
}

/* out [∏ modes of the side's factors but the last, rc] = their Khatri–Rao
 * product with row r (a [1, rc] view) as one more factor. */
static fct_status kr_times_row(const fct_exec* e, const cp_side* side, int64_t c0, int64_t rc,
                               const fct_mat* r, char* out, int64_t rows) {
  fct_mat F[FCT_MAX_MODES];
  for (int k = 0; k + 1 < side->n; ++k) F[k] = factor_cols(side->f[k], c0, rc, e->es);
  F[side->n - 1] = *r;
  fct_mat O = fct_dense(out, rows, rc);
  return e->be->khatri_rao(e->ctx, e->device, e->dt, side->n, F, &O);
}

/* The split forward (top of the file), chunk by chunk of Rc columns; y
 * already holds the bias when `bias`. */
static fct_status forward_split(const fct_exec* e, const cp_plan* p, const fct_mat* X,
                                const fct_mat* Y, DLTensor* z, bool bias) {
  const cp_shape* s = &p->s;
  size_t es = e->es;
  int na = s->in.n, nb = s->out.n;
  int64_t ia = s->in.modes[na - 1], ob = s->out.modes[nb - 1], rows;
  char* kin = fct_ws_at(e, p->off_kin);
  char* kout = fct_ws_at(e, p->off_kout);
  char* ones = fct_ws_at(e, p->off_ones);
  char* u = fct_ws_at(e, p->off_u);
  for (int64_t c0 = 0; c0 < s->R; c0 += p->Rc) {
    int64_t rc = s->R - c0 < p->Rc ? s->R - c0 : p->Rc;
    FCT_TRY(build_kr(e, &s->in, 0, na - 1, c0, rc, kin, &rows)); /* KR(A_<n) [P, rc] */
    FCT_TRY(build_kr(e, &s->in, 0, 0, c0, rc, ones, &rows));     /* [1, rc] of ones */
    fct_mat Kin = fct_dense(kin, p->P, rc), Ones = fct_dense(ones, 1, rc);
    fct_mat An = factor_cols(s->in.f[na - 1], c0, rc, es);
    fct_mat BnT = fct_mat_t(factor_cols(s->out.f[nb - 1], c0, rc, es)); /* [rc, o_n] */
    for (int64_t m = 0; m < s->M; ++m) {
      fct_mat Xm = {X->data + m * X->rs * (int64_t)es, p->P, ia, ia, 1}; /* x_m [P, i_n] */
      fct_mat Zm = z ? (fct_mat){fct_data(z) + (m * s->R + c0) * (int64_t)es, 1, rc, rc, 1}
                     : fct_dense(fct_ws_at(e, p->off_z) + m * rc * (int64_t)es, 1, rc);
      FCT_TRY(project_row(e, &Xm, &Kin, &An, &Ones, u, &Zm));
      FCT_TRY(kr_times_row(e, &s->out, c0, rc, &Zm, kout, p->Q)); /* KR(B_<n, z_m) */
      fct_mat Kout = fct_dense(kout, p->Q, rc);
      fct_mat Ym = {Y->data + m * Y->rs * (int64_t)es, p->Q, ob, ob, 1}; /* y_m [Q, o_n] */
      FCT_TRY(fct_x_gemm(e, &Kout, &BnT, &Ym, (c0 > 0 || bias) ? 1.0 : 0.0));
    }
  }
  return FCT_OK;
}

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, int n_in,
                               const DLTensor* const* A, int n_out, const DLTensor* const* B,
                               const DLTensor* bias, const DLTensor* y, const DLTensor* z,
                               cp_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  cp_shape s;
  FCT_TRY(check_shape(ctx, x, n_in, A, n_out, B, &s));
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, s.out.size, "out: the product of the "
                                 "mode sizes of out_factors"));
  fct_mat m;
  FCT_TRY(fct_check_batched(ctx, "y", y, x, s.out.size, "out: the product of the mode sizes of "
                        "out_factors"));
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, s.M, s.out.size, &m));
  if (z) {
    FCT_TRY(fct_check_batched(ctx, "z", z, x, s.R, "R: the rank"));
    FCT_TRY(fct_check_contiguous_output(ctx, "z", z, s.M, s.R, &m));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "x", x);
  fct_args_add_list(&a, "in_factors", n_in, A);
  fct_args_add_list(&a, "out_factors", n_out, B);
  fct_args_add(&a, "bias", bias);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  fct_args_add(&a, "z", z);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  cp_needs n = {0};
  n.z_given = z != NULL;
  n.pack_x = fct_input_needs_pack(x, &m);
  n.x_rows = n.pack_x || m.cs == 1; /* packed x is dense */
  n.check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  n.small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  return make_plan(ctx, &s, &n, p);
}

fct_status fct_cp_linear_forward_workspace(const fct_context* ctx, const DLTensor* x, int n_in,
                                           const DLTensor* const* in_factors, int n_out,
                                           const DLTensor* const* out_factors,
                                           const DLTensor* bias, const DLTensor* y,
                                           const DLTensor* z, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  cp_plan p;
  FCT_TRY(forward_plan(&c, x, n_in, in_factors, n_out, out_factors, bias, y, z, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_cp_linear_forward(fct_context* ctx, const DLTensor* x, int n_in,
                                 const DLTensor* const* in_factors, int n_out,
                                 const DLTensor* const* out_factors, const DLTensor* bias,
                                 DLTensor* y, DLTensor* z) {
  cp_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, n_in, in_factors, n_out, out_factors, bias, y, z, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const cp_shape* s = &p.s;
  if (s->M == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  fct_mat X, Y = fct_dense(fct_data(y), s->M, s->out.size);
  FCT_TRY(input_view(&e, x, p.n.pack_x, p.off_x, s->M, s->in.size, &X));
  if (bias)
    FCT_TRY(e.be->fill_rows(ctx, e.device, e.dt, &Y, fct_data(bias), fct_vector_stride(bias)));
  if (p.split) FCT_TRY(forward_split(&e, &p, &X, &Y, z, bias != NULL));
  for (int64_t c0 = 0; c0 < s->R && !p.split; c0 += p.Rc) {
    int64_t rc = s->R - c0 < p.Rc ? s->R - c0 : p.Rc, rows;
    char* kin = fct_ws_at(&e, p.off_kin);
    char* kout = fct_ws_at(&e, p.off_kout);
    FCT_TRY(build_kr(&e, &s->in, 0, s->in.n, c0, rc, kin, &rows));
    FCT_TRY(build_kr(&e, &s->out, 0, s->out.n, c0, rc, kout, &rows));
    fct_mat Kin = fct_dense(kin, s->in.size, rc), Kout = fct_dense(kout, s->out.size, rc);
    fct_mat Z = z ? (fct_mat){fct_data(z) + c0 * (int64_t)e.es, s->M, rc, s->R, 1}
                  : fct_ws_mat(&e, p.off_z, s->M, rc);
    FCT_TRY(fct_x_gemm(&e, &X, &Kin, &Z, 0.0));              /* z_c [M, rc] = x · KR(A)_c */
    fct_mat KoutT = fct_mat_t(Kout);
    FCT_TRY(fct_x_gemm(&e, &Z, &KoutT, &Y, (c0 > 0 || bias) ? 1.0 : 0.0)); /* y += z_c · KR(B)_cᵀ */
  }
  if (p.n.check) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "x", x);
    fct_args_add_list(&a, "in_factors", n_in, in_factors);
    fct_args_add_list(&a, "out_factors", n_out, out_factors);
    fct_args_add(&a, "bias", bias);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, a.names, a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x, int n_in,
                                const DLTensor* const* A, int n_out, const DLTensor* const* B,
                                const DLTensor* z, const DLTensor* gx,
                                const DLTensor* const* gA, const DLTensor* const* gB,
                                const DLTensor* gb, cp_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  cp_shape s;
  FCT_TRY(check_shape(ctx, x, n_in, A, n_out, B, &s));
  const char* out_what = "out: the product of the mode sizes of out_factors";
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, s.out.size, out_what));
  if (z) FCT_TRY(fct_check_batched(ctx, "z", z, x, s.R, "R: the rank"));
  fct_mat m;
  if (gx) {
    FCT_TRY(fct_check_batched(ctx, "grad_x", gx, x, s.in.size, "in, the last dim of x"));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_x", gx, s.M, s.in.size, &m));
  }
  char nm[48];
  for (int side = 0; side < 2; ++side) {
    const DLTensor* const* gr = side ? gB : gA;
    const DLTensor* const* f = side ? B : A;
    int nf = side ? n_out : n_in;
    const char* list = side ? "grad_out_factors" : "grad_in_factors";
    for (int k = 0; gr && k < nf; ++k) {
      if (!gr[k]) continue;
      const char* name = fct_item_name(nm, sizeof nm, list, k);
      FCT_TRY(fct_check_param(ctx, name, gr[k], x, 2, "[mode, R]"));
      if (gr[k]->shape[0] != f[k]->shape[0] || gr[k]->shape[1] != s.R)
        return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected the shape of its factor [%lld, %lld]",
                        name, (long long)f[k]->shape[0], (long long)s.R);
      FCT_TRY(fct_check_contiguous_output(ctx, name, gr[k], f[k]->shape[0], s.R, &m));
    }
  }
  if (gb) {
    FCT_TRY(fct_check_vector(ctx, "grad_bias", gb, x, s.out.size, out_what));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_bias", gb, 1, s.out.size, &m));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "grad_y", g);
  fct_args_add(&a, "x", x);
  fct_args_add_list(&a, "in_factors", n_in, A);
  fct_args_add_list(&a, "out_factors", n_out, B);
  fct_args_add(&a, "z", z);
  int first_out = a.n;
  fct_args_add(&a, "grad_x", gx);
  fct_args_add_list(&a, "grad_in_factors", n_in, gA);
  fct_args_add_list(&a, "grad_out_factors", n_out, gB);
  fct_args_add(&a, "grad_bias", gb);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));

  cp_needs n = {0};
  n.backward = true;
  n.z_given = z != NULL;
  n.gx = gx != NULL;
  n.gb = gb != NULL;
  n.gin = any((DLTensor* const*)gA, n_in);
  n.gout = any((DLTensor* const*)gB, n_out);
  n.check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  n.small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  /* Decided before x's packing: without z, x is read to recompute it. */
  if (z && n.gout && fct_input_needs_pack(z, &m))
    n.z_given = false; /* recomputing beats teaching every step odd strides */
  bool uses_x = n.gin || (n.gout && !n.z_given);
  bool uses_g = n.gx || n.gin || n.gout || n.gb;
  n.pack_x = uses_x && fct_input_needs_pack(x, &m);
  n.x_rows = !uses_x || n.pack_x || m.cs == 1; /* packed rows are dense */
  n.pack_g = uses_g && fct_input_needs_pack(g, &m);
  n.g_rows = !uses_g || n.pack_g || m.cs == 1;
  return make_plan(ctx, &s, &n, p);
}

fct_status fct_cp_linear_backward_workspace(const fct_context* ctx, const DLTensor* grad_y,
                                            const DLTensor* x, int n_in,
                                            const DLTensor* const* in_factors, int n_out,
                                            const DLTensor* const* out_factors,
                                            const DLTensor* z, const DLTensor* grad_x,
                                            const DLTensor* const* grad_in_factors,
                                            const DLTensor* const* grad_out_factors,
                                            const DLTensor* grad_bias, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  cp_plan p;
  FCT_TRY(backward_plan(&c, grad_y, x, n_in, in_factors, n_out, out_factors, z, grad_x,
                    grad_in_factors, grad_out_factors, grad_bias, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

/* The gradients of the split's leading factors (side: those factors) from
 * gK [∏ modes, rc], peeling the last mode at each step rather than building
 * a prefix and a suffix product for every factor: with cur [P_k·m_k, rc]
 * (rows (p, a), gK at first),
 *   grad F_k = Σ_p cur[(p, a), :] ⊙ KR(F_<k)[p, :],
 *   cur      = Σ_a cur[(p, a), :] ⊙ F_k[a, :]   [P_k, rc], for the factors before,
 * down to grad F_0 = cur. Overwrites gK (a workspace buffer); the pre and
 * suf buffers hold KR(F_<k) and the other cur. */
static fct_status peel_grads(const fct_exec* e, const cp_plan* p, const cp_side* side,
                             const fct_mat* gK, DLTensor* const* grads, int64_t c0, int64_t rc,
                             const fct_mat* ones) {
  int first = -1; /* the first factor whose gradient is asked for */
  for (int k = 0; k < side->n && first < 0; ++k)
    if (grads[k]) first = k;
  if (first < 0) return FCT_OK;
  fct_mat cur = *gK;
  char* other = fct_ws_at(e, p->off_suf);
  char* pre = fct_ws_at(e, p->off_pre);
  int64_t rows = side->size, npre;
  for (int k = side->n - 1; k >= first; --k) {
    int64_t mk = side->modes[k], Pk = rows / mk;
    if (grads[k]) {
      fct_mat G = {fct_data(grads[k]) + c0 * (int64_t)e->es, mk, rc, p->s.R, 1};
      fct_mat Pm = *ones;
      if (k > 0) {
        FCT_TRY(build_kr(e, side, 0, k, c0, rc, pre, &npre)); /* KR(F_<k) [P_k, rc] */
        Pm = fct_dense(pre, Pk, rc);
      }
      FCT_TRY(e->be->khatri_rao_grad(e->ctx, e->device, e->dt, &cur, Pk, mk, 1, &Pm, ones, &G));
    }
    if (k == first) break;
    fct_mat F = factor_cols(side->f[k], c0, rc, e->es), next = fct_dense(other, Pk, rc);
    FCT_TRY(e->be->khatri_rao_grad(e->ctx, e->device, e->dt, &cur, 1, Pk, mk, ones, &F, &next));
    other = cur.data;
    cur = next;
    rows = Pk;
  }
  return FCT_OK;
}

/* One row's share of a side's factor gradients in the split backward:
 * r [P, i] the row (x_m or g_m) viewed as a matrix, w [1, rc] its weights
 * (gz_m or z_m), F [i, rc] the last factor's columns, T [P, rc] =
 * KR(F_<n, w) built by the caller when gF (the last factor's gradient,
 * nullable) is asked, u scratch [i, rc]:
 *   gF[:, c0:] (+)= rᵀ · T,   GK (nullable) (+)= r · KR(F, w) = gKR(F_<n). */
static fct_status row_grads(const fct_exec* e, const fct_mat* r, const fct_mat* F,
                            const fct_mat* w, const fct_mat* T, DLTensor* gF, const fct_mat* GK,
                            char* u, int64_t c0, int64_t rc, double beta) {
  if (gF) {
    fct_mat rt = fct_mat_t(*r);
    fct_mat G = {fct_data(gF) + c0 * (int64_t)e->es, r->cols, rc, gF->shape[1], 1};
    FCT_TRY(fct_x_gemm(e, &rt, T, &G, beta));
  }
  if (GK) {
    fct_mat Fs[2] = {*F, *w}, S = fct_dense(u, r->cols, rc);
    FCT_TRY(e->be->khatri_rao(e->ctx, e->device, e->dt, 2, Fs, &S));
    FCT_TRY(fct_x_gemm(e, r, &S, GK, beta));
  }
  return FCT_OK;
}

/* The split backward (top of the file), per chunk of columns and row m
 * (x_m [P, i_n], g_m [Q, o_n]):
 *   gz_m = Σ_b (g_mᵀ·KR(B_<n))[b, :] ⊙ B_n[b, :]  (z_m alike from x_m, when not given)
 *   grad_x_m [P, i_n] += KR(A_<n, gz_m) · A_nᵀ
 *   grad A_n += x_mᵀ · KR(A_<n, gz_m),  gKR(A_<n) += x_m · KR(A_n, gz_m) -> grad A_k<n
 *   grad B_n += g_mᵀ · KR(B_<n, z_m),   gKR(B_<n) += g_m · KR(B_n, z_m)  -> grad B_k<n
 * (the leading factors' gradients by peel_grads). */
static fct_status backward_split(const fct_exec* e, const cp_plan* p, const fct_mat* G,
                                 const fct_mat* X, const DLTensor* z, DLTensor* grad_x,
                                 DLTensor* const* gA, DLTensor* const* gB) {
  const cp_shape* s = &p->s;
  const cp_needs* n = &p->n;
  size_t es = e->es;
  int na = s->in.n, nb = s->out.n;
  int64_t ia = s->in.modes[na - 1], ob = s->out.modes[nb - 1], M = s->M, R = s->R, rows;
  bool z_made = n->gout && !n->z_given;
  bool need_gz = n->gx || n->gin;
  cp_side in_lead = s->in, out_lead = s->out; /* the factors before the last */
  in_lead.n = na - 1;
  in_lead.size = p->P;
  out_lead.n = nb - 1;
  out_lead.size = p->Q;
  bool lead_in = false, lead_out = false;
  for (int k = 0; k + 1 < na; ++k) lead_in = lead_in || (gA && gA[k]);
  for (int k = 0; k + 1 < nb; ++k) lead_out = lead_out || (gB && gB[k]);
  char* u = fct_ws_at(e, p->off_u);
  char* tmp = fct_ws_at(e, p->off_tmp);
  fct_mat Zf = {0};
  if (n->gout && n->z_given) fct_fold(z, &Zf);
  for (int64_t c0 = 0; c0 < R; c0 += p->Rc) {
    int64_t rc = R - c0 < p->Rc ? R - c0 : p->Rc;
    FCT_TRY(build_kr(e, &s->in, 0, 0, c0, rc, fct_ws_at(e, p->off_ones), &rows));
    fct_mat Ones = fct_ws_mat(e, p->off_ones, 1, rc);
    fct_mat An = factor_cols(s->in.f[na - 1], c0, rc, es);
    fct_mat Bn = factor_cols(s->out.f[nb - 1], c0, rc, es);
    fct_mat Zr[SPLIT_MAX_ROWS], GZr[SPLIT_MAX_ROWS]; /* this chunk's rows of z and gz */
    if (need_gz) {
      FCT_TRY(build_kr(e, &s->out, 0, nb - 1, c0, rc, fct_ws_at(e, p->off_kout), &rows));
      fct_mat Kb = fct_ws_mat(e, p->off_kout, p->Q, rc);
      for (int64_t m = 0; m < M; ++m) {
        fct_mat gm = {G->data + m * G->rs * (int64_t)es, p->Q, ob, ob, 1};
        GZr[m] = fct_dense(fct_ws_at(e, p->off_gz) + m * rc * (int64_t)es, 1, rc);
        FCT_TRY(project_row(e, &gm, &Kb, &Bn, &Ones, u, &GZr[m]));
      }
    }
    if (z_made) {
      FCT_TRY(build_kr(e, &s->in, 0, na - 1, c0, rc, fct_ws_at(e, p->off_kin), &rows));
      fct_mat Ka = fct_ws_mat(e, p->off_kin, p->P, rc);
      for (int64_t m = 0; m < M; ++m) {
        fct_mat xm = {X->data + m * X->rs * (int64_t)es, p->P, ia, ia, 1};
        Zr[m] = fct_dense(fct_ws_at(e, p->off_z) + m * rc * (int64_t)es, 1, rc);
        FCT_TRY(project_row(e, &xm, &Ka, &An, &Ones, u, &Zr[m]));
      }
    } else if (n->gout) {
      for (int64_t m = 0; m < M; ++m)
        Zr[m] = (fct_mat){Zf.data + (m * Zf.rs + c0 * Zf.cs) * (int64_t)es, 1, rc, Zf.rs, Zf.cs};
    }
    for (int64_t m = 0; m < M; ++m) {
      double beta = m > 0 ? 1.0 : 0.0;
      fct_mat xm = {0}, gm = {G->data + m * G->rs * (int64_t)es, p->Q, ob, ob, 1};
      if (n->gin) xm = (fct_mat){X->data + m * X->rs * (int64_t)es, p->P, ia, ia, 1};
      fct_mat T = fct_dense(tmp, p->P, rc); /* KR(A_<n, gz_m), when grad_x or grad A_n */
      if (n->gx || (gA && gA[na - 1])) {
        FCT_TRY(kr_times_row(e, &s->in, c0, rc, &GZr[m], tmp, p->P));
        if (n->gx) {
          fct_mat Gxm = {fct_data(grad_x) + m * s->in.size * (int64_t)es, p->P, ia, ia, 1};
          fct_mat AnT = fct_mat_t(An);
          FCT_TRY(fct_x_gemm(e, &T, &AnT, &Gxm, c0 > 0 ? 1.0 : 0.0));
        }
      }
      if (n->gin) {
        fct_mat GK = fct_ws_mat(e, p->off_gka, p->P, rc);
        FCT_TRY(row_grads(e, &xm, &An, &GZr[m], &T, gA[na - 1], lead_in ? &GK : NULL, u, c0,
                          rc, beta));
      }
      if (n->gout) {
        if (gB[nb - 1]) FCT_TRY(kr_times_row(e, &s->out, c0, rc, &Zr[m], tmp, p->Q));
        fct_mat Tb = fct_dense(tmp, p->Q, rc), GK = fct_ws_mat(e, p->off_gkb, p->Q, rc);
        FCT_TRY(row_grads(e, &gm, &Bn, &Zr[m], &Tb, gB[nb - 1], lead_out ? &GK : NULL, u, c0,
                          rc, beta));
      }
    }
    if (lead_in) {
      fct_mat GK = fct_ws_mat(e, p->off_gka, p->P, rc);
      FCT_TRY(peel_grads(e, p, &in_lead, &GK, gA, c0, rc, &Ones));
    }
    if (lead_out) {
      fct_mat GK = fct_ws_mat(e, p->off_gkb, p->Q, rc);
      FCT_TRY(peel_grads(e, p, &out_lead, &GK, gB, c0, rc, &Ones));
    }
  }
  return FCT_OK;
}

fct_status fct_cp_linear_backward(fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
                                  int n_in, const DLTensor* const* in_factors, int n_out,
                                  const DLTensor* const* out_factors, const DLTensor* z,
                                  DLTensor* grad_x, DLTensor* const* grad_in_factors,
                                  DLTensor* const* grad_out_factors, DLTensor* grad_bias) {
  cp_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, x, n_in, in_factors, n_out, out_factors, z, grad_x,
                    (const DLTensor* const*)grad_in_factors,
                    (const DLTensor* const*)grad_out_factors, grad_bias, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const cp_needs* n = &p.n;
  if (!n->gx && !n->gin && !n->gout && !n->gb) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  const cp_shape* s = &p.s;
  int64_t M = s->M, in = s->in.size, out = s->out.size;
  /* Finiteness is checked on what scales with the batch (grad_y before,
   * grad_x after), as the low-rank op does. */
  if (n->check && M > 0)
    FCT_TRY(fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "cp_linear"));
  fct_mat G = {0}, X = {0};
  if (n->gx || n->gin || n->gout || n->gb)
    FCT_TRY(input_view(&e, grad_y, n->pack_g, p.off_g, M, out, &G));
  if (n->gin || (n->gout && !n->z_given)) FCT_TRY(input_view(&e, x, n->pack_x, p.off_x, M, in, &X));
  if (n->gb) FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, &G, fct_data(grad_bias)));
  fct_mat Gx = n->gx ? fct_dense(fct_data(grad_x), M, in) : (fct_mat){0};
  if (p.split && (n->gx || n->gin || n->gout))
    FCT_TRY(backward_split(&e, &p, &G, &X, z, grad_x, grad_in_factors, grad_out_factors));
  for (int64_t c0 = 0; c0 < s->R && !p.split && (n->gx || n->gin || n->gout); c0 += p.Rc) {
    int64_t rc = s->R - c0 < p.Rc ? s->R - c0 : p.Rc, rows;
    fct_mat Kin = fct_ws_mat(&e, p.off_kin, in, rc);
    fct_mat Kout = fct_ws_mat(&e, p.off_kout, out, rc);
    if (n->gx || (n->gout && !n->z_given))
      FCT_TRY(build_kr(&e, &s->in, 0, s->in.n, c0, rc, Kin.data, &rows));
    if (n->gx || n->gin) FCT_TRY(build_kr(&e, &s->out, 0, s->out.n, c0, rc, Kout.data, &rows));
    fct_mat Z = {0};
    if (n->gout) {
      if (n->z_given) {
        fct_fold(z, &Z);
        if (Z.data) Z.data += c0 * Z.cs * (int64_t)e.es; /* an empty z's data may be NULL */
        Z.cols = rc;
      } else {
        Z = fct_ws_mat(&e, p.off_z, M, rc);
        FCT_TRY(fct_x_gemm(&e, &X, &Kin, &Z, 0.0)); /* z_c = x · KR(A)_c */
      }
    }
    fct_mat GZ = {0};
    if (n->gx || n->gin) {
      GZ = fct_ws_mat(&e, p.off_gz, M, rc);
      FCT_TRY(fct_x_gemm(&e, &G, &Kout, &GZ, 0.0)); /* gz [M, rc] = grad_y · KR(B)_c */
    }
    if (n->gx) {
      fct_mat KinT = fct_mat_t(Kin);
      FCT_TRY(fct_x_gemm(&e, &GZ, &KinT, &Gx, c0 > 0 ? 1.0 : 0.0)); /* grad_x += gz · KR(A)_cᵀ */
    }
    if (n->gout) {
      fct_mat GK = fct_ws_mat(&e, p.off_gk, out, rc), Gt = fct_mat_t(G);
      FCT_TRY(fct_x_gemm(&e, &Gt, &Z, &GK, 0.0)); /* gKR(B)_c [out, rc] = grad_yᵀ · z_c */
      FCT_TRY(side_grads(&e, &p, &s->out, &GK, grad_out_factors, c0, rc));
    }
    if (n->gin) {
      fct_mat GK = fct_ws_mat(&e, p.off_gk, in, rc), Xt = fct_mat_t(X);
      FCT_TRY(fct_x_gemm(&e, &Xt, &GZ, &GK, 0.0)); /* gKR(A)_c [in, rc] = xᵀ · gz */
      FCT_TRY(side_grads(&e, &p, &s->in, &GK, grad_in_factors, c0, rc));
    }
  }
  if (n->check && n->gx) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "grad_y", grad_y);
    fct_args_add(&a, "x", x);
    fct_args_add_list(&a, "in_factors", n_in, in_factors);
    fct_args_add_list(&a, "out_factors", n_out, out_factors);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "grad_x", grad_x, a.names,
                         a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan report                                                                */
/* ------------------------------------------------------------------------- */

static fct_status side_from_modes(int n, const int64_t* modes, cp_side* side, const char* name) {
  if (n < 1 || n > FCT_MAX_MODES || !modes) return FCT_ERR_INVALID_VALUE;
  side->n = n;
  side->size = 1;
  for (int k = 0; k < n; ++k) {
    if (modes[k] < 1) return FCT_ERR_SHAPE;
    side->modes[k] = modes[k];
    /* The bounds the ops put on tensors' sizes (check_side), so that the
     * plan's products of two sizes fit int64 as they do there. */
    if (__builtin_mul_overflow(side->size, modes[k], &side->size) || !fct_fits_int(side->size))
      return FCT_ERR_OVERFLOW;
  }
  (void)name;
  return FCT_OK;
}

fct_status fct_cp_linear_plan(int n_in, const int64_t* in_modes, int n_out,
                              const int64_t* out_modes, int64_t rank, int64_t batch,
                              DLDevice device, DLDataType dtype, fct_linear_plan_info* info) {
  if (!info) return FCT_ERR_NULL_ARGUMENT;
  cp_shape s;
  memset(&s, 0, sizeof s);
  FCT_TRY(side_from_modes(n_in, in_modes, &s.in, "in_modes"));
  FCT_TRY(side_from_modes(n_out, out_modes, &s.out, "out_modes"));
  if (rank < 1 || batch < 0 || fct_dtype_of(dtype) == FCT_DTYPE_INVALID)
    return FCT_ERR_INVALID_VALUE;
  if (!fct_fits_int(rank) || !fct_fits_int(batch)) return FCT_ERR_OVERFLOW; /* as the ops */
  s.R = rank;
  s.M = batch;
  s.es = fct_dtype_bytes(fct_dtype_of(dtype));
  s.cuda = device.device_type == kDLCUDA;
  cp_needs nf = {0}, nb = {0};
  nf.z_given = nf.x_rows = true;
  nb.backward = nb.z_given = nb.gx = nb.gb = nb.gin = nb.gout = true;
  nb.x_rows = nb.g_rows = true;
  cp_plan pf, pb;
  FCT_TRY(make_plan(NULL, &s, &nf, &pf));
  FCT_TRY(make_plan(NULL, &s, &nb, &pb));
  memset(info, 0, sizeof *info);
  info->forward_flops = pf.flops;
  info->backward_flops = pb.flops;
  info->forward_workspace = pf.bytes;
  info->backward_workspace = pb.bytes;
  snprintf(info->plan, sizeof info->plan,
           "cp: z = x·KR(in) then y = z·KR(out)^T, Khatri-Rao blocks of %lld columns "
           "(forward%s), %lld (backward%s), R = %lld",
           (long long)pf.Rc, pf.split ? ", the last factor of each side apart" : "",
           (long long)pb.Rc, pb.split ? ", the same" : "", (long long)s.R);
  /* CP has the chain only (factorch.h, FCT_FLAG_FORCE_FORM_W). */
  snprintf(info->forward_strategy, sizeof info->forward_strategy, "contract");
  snprintf(info->backward_strategy, sizeof info->backward_strategy, "contract");
  return FCT_OK;
}
