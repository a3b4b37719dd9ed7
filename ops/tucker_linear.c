/*
 * Tucker linear entry points (factorch.h):
 *   W[(o), (i)] = Σ_{s,t} core[s, t] · ∏ U_k[o_k, s_k] · ∏ V_k[i_k, t_k]
 * y = x·Wᵀ + b and its gradients. Device independent: checks, plan,
 * workspace layout, then GEMMs through the backend (backend.h).
 *
 * Contraction order. The factors act on separate modes, so x is projected
 * on every input factor V_k while the tensor shrinks (i_k -> t_k), then
 * multiplied by the core [S, T], then expanded on every output factor:
 * per row 2·Σ_k T_{>k}·I_{<k}·i_k·t_k + 2·S·T + 2·Σ_k S_{>k}·O_{<k}·s_k·o_k
 * FLOPs, against 2·in·out for W. Applying a factor after the core instead
 * would enlarge the core's side of the product; absorbing one into the core
 * ahead of time makes a larger core, more FLOPs per row for any M. Every
 * step is one GEMM over all the rows of a chunk without a transpose: a
 * step contracts the last mode of the input side and prepends its result,
 * so after the input factors the chunk is X̃ᵀ [t_1..t_p, Mc], the core
 * gives Zᵀ [s_1..s_q, Mc], and each output step contracts the first mode and
 * appends its result, ending in y [Mc, o_1..o_q] in place:
 *   in step (mode k, last first):  [t_{>k}, Mc, i_{<k}, i_k] -> [t_k, t_{>k}, Mc, i_{<k}]
 *   out step (mode k, first first): [s_k, s_{>k}, Mc, o_{<k}] -> [s_{>k}, Mc, o_{<k}, o_k]
 *
 * Cost model: the order being fixed, the plan chooses the rows per chunk
 * (Mc). Larger chunks read the core and factors fewer times and make fewer
 * calls; smaller ones keep the chunk's intermediates in cache (and bound the
 * workspace). chunk_cost() prices each Mc in FLOP-equivalents
 * (op_common.h) and the cheapest of Mc ∈ {M, 8, 16, 32, ...} wins.
 *
 * The backward recomputes the forward's intermediates per chunk (memory-
 * bound steps and one core GEMM) rather than keeping them from the forward:
 * that keeps the op's saved state to x alone.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "op_common.h"

typedef struct tk_side {
  int n;
  int64_t modes[FCT_MAX_MODES], ranks[FCT_MAX_MODES];
  int64_t size, rank; /* ∏ modes, ∏ ranks */
  const DLTensor* const* f;
} tk_side;

typedef struct tk_shape {
  tk_side in, out; /* in: V_k [i_k, t_k]; out: U_k [o_k, s_k] */
  int64_t M;
  size_t es;
  bool cuda;
} tk_shape;

typedef struct tk_needs {
  bool backward;
  bool gx, gb, gcore;
  bool gin[FCT_MAX_MODES], gout[FCT_MAX_MODES];
  bool any_gin, any_gout;
  bool pack_x, pack_g, check;
  bool small; /* FCT_FLAG_SMALL_CHUNKS */
} tk_needs;

typedef struct tk_plan {
  tk_shape s;
  tk_needs n;
  int64_t Mc;
  /* per-row element counts */
  int64_t in_state[FCT_MAX_MODES + 1];  /* before in step j (j = 0: x; j = n_in: X̃ᵀ) */
  int64_t out_state[FCT_MAX_MODES + 1]; /* before out step j (j = 0: Zᵀ; j = n_out: y) */
  int64_t max_state;                    /* over the intermediates (x and y excluded) */
  int64_t in_states_total, out_states_total; /* what the backward keeps */
  fct_param core, V[FCT_MAX_MODES], U[FCT_MAX_MODES];
  size_t off_x, off_g, off_a, off_b, off_in, off_out, off_ga, off_gb, off_scratch;
  size_t bytes;
  double flops;
} tk_plan;

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

static fct_status check_side(fct_context* ctx, const char* list, int n, const DLTensor* const* f,
                             const DLTensor* x, tk_side* side) {
  char nm[48];
  if (n < 1 || n > FCT_MAX_MODES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "%s: expected 1 to %d factors, got %d", list,
                    FCT_MAX_MODES, n);
  if (!f)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: expected an array of %d tensors, got NULL",
                    list, n);
  side->n = n;
  side->f = f;
  side->size = side->rank = 1;
  for (int k = 0; k < n; ++k) {
    const char* name = fct_item_name(nm, sizeof nm, list, k);
    FCT_TRY(fct_check_param(ctx, name, f[k], x, 2, "[mode, rank]"));
    if (f[k]->shape[0] < 1 || f[k]->shape[1] < 1)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "%s: expected [mode, rank] with both >= 1, got [%lld, %lld]", name,
                      (long long)f[k]->shape[0], (long long)f[k]->shape[1]);
    side->modes[k] = f[k]->shape[0];
    side->ranks[k] = f[k]->shape[1];
    if (__builtin_mul_overflow(side->size, side->modes[k], &side->size) ||
        __builtin_mul_overflow(side->rank, side->ranks[k], &side->rank) ||
        !fct_fits_int(side->size) || !fct_fits_int(side->rank))
      return fct_fail(ctx, FCT_ERR_OVERFLOW,
                      "%s: the products of the mode sizes and of the ranks must be < 2^31", list);
  }
  return FCT_OK;
}

static fct_status check_shape(fct_context* ctx, const DLTensor* x, const DLTensor* core,
                              int n_in, const DLTensor* const* V, int n_out,
                              const DLTensor* const* U, tk_shape* s) {
  memset(s, 0, sizeof *s);
  FCT_TRY(fct_check_input_rows(ctx, "x", x, &s->M));
  FCT_TRY(check_side(ctx, "in_factors", n_in, V, x, &s->in));
  FCT_TRY(check_side(ctx, "out_factors", n_out, U, x, &s->out));
  FCT_TRY(fct_check_param(ctx, "core", core, x, 2, "[S, T] (the core as a matrix)"));
  if (core->shape[0] != s->out.rank || core->shape[1] != s->in.rank)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "core: expected [S, T] = [%lld, %lld] (the products of the ranks of "
                    "out_factors and in_factors), got [%lld, %lld]",
                    (long long)s->out.rank, (long long)s->in.rank, (long long)core->shape[0],
                    (long long)core->shape[1]);
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

/* Per-row sizes of the states and FLOPs of the forward. */
static double shape_states(tk_plan* p) {
  const tk_shape* s = &p->s;
  double f = 0;
  /* In step j contracts mode k = n_in-1-j: state [t_{>k}, i_{<=k}] -> [t_{>=k}, i_{<k}]. */
  int64_t tsuf = 1, ipre = s->in.size;
  p->in_state[0] = ipre;
  for (int j = 0; j < s->in.n; ++j) {
    int k = s->in.n - 1 - j;
    ipre /= s->in.modes[k];
    f += 2.0 * (double)(tsuf * ipre) * (double)s->in.modes[k] * (double)s->in.ranks[k];
    tsuf *= s->in.ranks[k];
    p->in_state[j + 1] = tsuf * ipre;
  }
  f += 2.0 * (double)s->out.rank * (double)s->in.rank;
  /* Out step k: [s_{>=k}, o_{<k}] -> [s_{>k}, o_{<=k}]. */
  int64_t ssuf = s->out.rank, opre = 1;
  p->out_state[0] = ssuf;
  for (int k = 0; k < s->out.n; ++k) {
    ssuf /= s->out.ranks[k];
    f += 2.0 * (double)(ssuf * opre) * (double)s->out.ranks[k] * (double)s->out.modes[k];
    opre *= s->out.modes[k];
    p->out_state[k + 1] = ssuf * opre;
  }
  p->max_state = 1;
  p->in_states_total = p->out_states_total = 0;
  for (int j = 1; j <= s->in.n; ++j) {
    if (p->in_state[j] > p->max_state) p->max_state = p->in_state[j];
    p->in_states_total += p->in_state[j];
  }
  for (int j = 0; j < s->out.n; ++j) {
    if (p->out_state[j] > p->max_state) p->max_state = p->out_state[j];
    p->out_states_total += p->out_state[j];
  }
  return f; /* per row */
}

static void lay_out(tk_plan* p, fct_layout* L) {
  const tk_shape* s = &p->s;
  const tk_needs* n = &p->n;
  size_t es = s->es;
  memset(L, 0, sizeof *L);
  fct_param_lay_out(&p->core, L, es);
  for (int k = 0; k < s->in.n; ++k) fct_param_lay_out(&p->V[k], L, es);
  for (int k = 0; k < s->out.n; ++k) fct_param_lay_out(&p->U[k], L, es);
  if (n->pack_x) p->off_x = fct_layout_take(L, s->M * s->in.size, es);
  if (n->pack_g) p->off_g = fct_layout_take(L, s->M * s->out.size, es);
  int64_t Mc = p->Mc;
  if (!n->backward) {
    p->off_a = fct_layout_take(L, Mc * p->max_state, es);
    p->off_b = fct_layout_take(L, Mc * p->max_state, es);
  } else {
    /* Gradient states have the sizes of the intermediates (grad_y is read
     * in place, grad_x written in place). */
    int64_t gmax = p->max_state;
    p->off_in = fct_layout_take(L, Mc * p->in_states_total, es);
    p->off_out = fct_layout_take(L, Mc * p->out_states_total, es);
    p->off_ga = fct_layout_take(L, Mc * gmax, es);
    p->off_gb = fct_layout_take(L, Mc * gmax, es);
  }
  if (n->check) p->off_scratch = fct_layout_take(L, 256, 1);
}

/* Cost of a pass with chunks of Mc rows (see the top of the file). Traffic:
 * every state is written once and read once per pass; it costs 2x more
 * when a chunk's states outgrow the cache budget (DRAM rather than L3).
 * The core and the factors are read once per chunk; calls per chunk are
 * one GEMM per factor and the core's (twice and more in the backward). */
static double chunk_cost(const tk_plan* p, const fct_machine* mc, int64_t Mc, size_t ws_rows) {
  const tk_shape* s = &p->s;
  double M = (double)s->M, es = (double)s->es;
  double nch = ceil(M / (double)Mc);
  double states = 0;
  for (int j = 0; j <= s->in.n; ++j) states += (double)p->in_state[j];
  for (int j = 0; j <= s->out.n; ++j) states += (double)p->out_state[j];
  double per_row = 2 * states * es * (p->n.backward ? 3 : 1);
  bool fits = (double)ws_rows * (double)Mc <= (double)mc->chunk_bytes;
  double weights = (double)s->out.rank * (double)s->in.rank;
  for (int k = 0; k < s->in.n; ++k) weights += (double)(s->in.modes[k] * s->in.ranks[k]);
  for (int k = 0; k < s->out.n; ++k) weights += (double)(s->out.modes[k] * s->out.ranks[k]);
  double calls = (double)(s->in.n + s->out.n + 1) * (p->n.backward ? 4 : 1);
  return mc->flop_per_byte * (M * per_row * (fits ? 1 : 2) + nch * weights * es *
                                                                  (p->n.backward ? 3 : 1)) +
         mc->call_flops * nch * calls;
}

static fct_status make_plan(fct_context* ctx, tk_plan* p) {
  const tk_shape* s = &p->s;
  double per_row_flops = shape_states(p);
  fct_machine mc = fct_machine_for(s->cuda);
  /* Bytes per row of chunk workspace. */
  size_t row_bytes;
  if (!p->n.backward) {
    row_bytes = 2 * (size_t)p->max_state * s->es;
  } else {
    int64_t gmax = p->max_state;
    row_bytes = (size_t)(p->in_states_total + p->out_states_total + 2 * gmax) * s->es;
  }
  int64_t best_mc = s->M > 0 ? s->M : 1;
  double best = INFINITY;
  if (s->M > 0) {
    for (int64_t mcand = s->M;;) {
      double c = chunk_cost(p, &mc, mcand, row_bytes);
      /* Workspace beyond the cap only when nothing smaller fits. */
      bool fits = (double)row_bytes * (double)mcand <= (double)mc.workspace_cap;
      if ((fits || mcand <= 8) && c < best) {
        best = c;
        best_mc = mcand;
      }
      if (mcand <= 8) break;
      int64_t next = 8;
      while (next * 2 < mcand) next *= 2;
      mcand = next;
    }
  }
  p->Mc = p->n.small && best_mc > 3 ? 3 : best_mc;
  fct_layout L;
  lay_out(p, &L);
  FCT_TRY(fct_layout_done(ctx, &L, &p->bytes));
  double M = (double)s->M;
  if (!p->n.backward) {
    p->flops = M * per_row_flops;
  } else {
    /* Recomputing the forward, then about two GEMMs per forward step. */
    p->flops = 3 * M * per_row_flops + (p->n.gb ? M * (double)s->out.size : 0);
  }
  return FCT_OK;
}

static void init_params(tk_plan* p, const DLTensor* core) {
  const tk_shape* s = &p->s;
  fct_param_init(&p->core, core, s->out.rank, s->in.rank, false);
  for (int k = 0; k < s->in.n; ++k)
    fct_param_init(&p->V[k], s->in.f[k], s->in.modes[k], s->in.ranks[k], false);
  for (int k = 0; k < s->out.n; ++k)
    fct_param_init(&p->U[k], s->out.f[k], s->out.modes[k], s->out.ranks[k], false);
}

static fct_status bind_params(const fct_exec* e, tk_plan* p) {
  FCT_TRY(fct_param_bind(e, &p->core));
  for (int k = 0; k < p->s.in.n; ++k) FCT_TRY(fct_param_bind(e, &p->V[k]));
  for (int k = 0; k < p->s.out.n; ++k) FCT_TRY(fct_param_bind(e, &p->U[k]));
  return FCT_OK;
}

static void add_inputs(fct_args* a, const DLTensor* x, const DLTensor* core, int n_in,
                       const DLTensor* const* V, int n_out, const DLTensor* const* U) {
  fct_args_add(a, "x", x);
  fct_args_add(a, "core", core);
  fct_args_add_list(a, "in_factors", n_in, V);
  fct_args_add_list(a, "out_factors", n_out, U);
}

/* ------------------------------------------------------------------------- */
/* The steps (layouts at the top of the file)                                 */
/* ------------------------------------------------------------------------- */

/* In step j (mode k = n_in-1-j) on a chunk of Mc rows:
 * dst [t_k, R] = V_kᵀ · srcᵀ, src [R, i_k] with R = Mc·(state before)/i_k. */
static fct_status in_step(const fct_exec* e, const tk_plan* p, int j, int64_t Mc,
                          const char* src, char* dst) {
  int k = p->s.in.n - 1 - j;
  int64_t i = p->s.in.modes[k], t = p->s.in.ranks[k];
  int64_t R = Mc * (p->in_state[j] / i);
  fct_mat A = fct_mat_t(p->V[k].m), B = fct_mat_t(fct_dense((char*)src, R, i));
  fct_mat C = fct_dense(dst, t, R);
  return fct_x_gemm(e, &A, &B, &C, 0.0);
}

/* Out step k: dst [Q, o_k] = srcᵀ · U_kᵀ, src [s_k, Q]. */
static fct_status out_step(const fct_exec* e, const tk_plan* p, int k, int64_t Mc,
                           const char* src, char* dst, double beta) {
  int64_t sk = p->s.out.ranks[k], o = p->s.out.modes[k];
  int64_t Q = Mc * (p->out_state[k] / sk);
  fct_mat A = fct_mat_t(fct_dense((char*)src, sk, Q)), B = fct_mat_t(p->U[k].m);
  fct_mat C = fct_dense(dst, Q, o);
  return fct_x_gemm(e, &A, &B, &C, beta);
}

/* Zᵀ [S, Mc] = core [S, T] · X̃ᵀ [T, Mc]. */
static fct_status core_step(const fct_exec* e, const tk_plan* p, int64_t Mc, const char* src,
                            char* dst) {
  fct_mat B = fct_dense((char*)src, p->s.in.rank, Mc);
  fct_mat C = fct_dense(dst, p->s.out.rank, Mc);
  return fct_x_gemm(e, &p->core.m, &B, &C, 0.0);
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, const DLTensor* core,
                               int n_in, const DLTensor* const* V, int n_out,
                               const DLTensor* const* U, const DLTensor* bias, const DLTensor* y,
                               tk_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, core, n_in, V, n_out, U, &p->s));
  const char* out_what = "out: the product of the mode sizes of out_factors";
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, p->s.out.size, out_what));
  fct_mat m;
  FCT_TRY(fct_check_batched(ctx, "y", y, x, p->s.out.size, out_what));
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, p->s.M, p->s.out.size, &m));
  fct_args a;
  a.n = 0;
  add_inputs(&a, x, core, n_in, V, n_out, U);
  fct_args_add(&a, "bias", bias);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  p->n.pack_x = !fct_is_contiguous(x);
  p->n.check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  p->n.small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  init_params(p, core);
  return make_plan(ctx, p);
}

fct_status fct_tucker_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                               const DLTensor* core, int n_in,
                                               const DLTensor* const* in_factors, int n_out,
                                               const DLTensor* const* out_factors,
                                               const DLTensor* bias, const DLTensor* y,
                                               size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tk_plan p;
  FCT_TRY(forward_plan(&c, x, core, n_in, in_factors, n_out, out_factors, bias, y, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_tucker_linear_forward(fct_context* ctx, const DLTensor* x, const DLTensor* core,
                                     int n_in, const DLTensor* const* in_factors, int n_out,
                                     const DLTensor* const* out_factors, const DLTensor* bias,
                                     DLTensor* y) {
  tk_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, core, n_in, in_factors, n_out, out_factors, bias, y, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tk_shape* s = &p.s;
  if (s->M == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  FCT_TRY(bind_params(&e, &p));
  char* xb;
  FCT_TRY(fct_x_dense_base(&e, x, p.n.pack_x, p.off_x, &xb));
  int64_t bst = fct_vector_stride(bias);
  char* buf[2] = {fct_ws_at(&e, p.off_a), fct_ws_at(&e, p.off_b)};
  for (int64_t m0 = 0; m0 < s->M; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    const char* cur = xb + m0 * s->in.size * (int64_t)e.es;
    int w = 0;
    for (int j = 0; j < s->in.n; ++j, w ^= 1) {
      FCT_TRY(in_step(&e, &p, j, Mc, cur, buf[w]));
      cur = buf[w];
    }
    FCT_TRY(core_step(&e, &p, Mc, cur, buf[w]));
    cur = buf[w];
    w ^= 1;
    char* yrows = fct_data(y) + m0 * s->out.size * (int64_t)e.es;
    for (int k = 0; k < s->out.n; ++k, w ^= 1) {
      bool last = k == s->out.n - 1;
      char* dst = last ? yrows : buf[w];
      if (last && bias) {
        fct_mat Yc = fct_dense(yrows, Mc, s->out.size);
        FCT_TRY(e.be->fill_rows(ctx, e.device, e.dt, &Yc, fct_data(bias), bst));
      }
      FCT_TRY(out_step(&e, &p, k, Mc, cur, dst, last && bias ? 1.0 : 0.0));
      cur = dst;
    }
  }
  if (p.n.check) {
    fct_args a;
    a.n = 0;
    add_inputs(&a, x, core, n_in, in_factors, n_out, out_factors);
    fct_args_add(&a, "bias", bias);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, a.names, a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status check_grad(fct_context* ctx, const char* name, const DLTensor* g,
                             const DLTensor* like, const DLTensor* x) {
  fct_mat m;
  FCT_TRY(fct_check_param(ctx, name, g, x, 2, "(the shape of its parameter)"));
  if (g->shape[0] != like->shape[0] || g->shape[1] != like->shape[1])
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected the shape of its parameter [%lld, %lld]",
                    name, (long long)like->shape[0], (long long)like->shape[1]);
  return fct_check_contiguous_output(ctx, name, g, like->shape[0], like->shape[1], &m);
}

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                const DLTensor* core, int n_in, const DLTensor* const* V,
                                int n_out, const DLTensor* const* U, const DLTensor* gx,
                                const DLTensor* gcore, const DLTensor* const* gV,
                                const DLTensor* const* gU, const DLTensor* gb, tk_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, core, n_in, V, n_out, U, &p->s));
  const tk_shape* s = &p->s;
  const char* out_what = "out: the product of the mode sizes of out_factors";
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, s->out.size, out_what));
  fct_mat m;
  if (gx) {
    FCT_TRY(fct_check_batched(ctx, "grad_x", gx, x, s->in.size, "in, the last dim of x"));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_x", gx, s->M, s->in.size, &m));
  }
  if (gcore) FCT_TRY(check_grad(ctx, "grad_core", gcore, core, x));
  char nm[48];
  tk_needs* n = &p->n;
  n->backward = true;
  for (int k = 0; gV && k < n_in; ++k) {
    if (!gV[k]) continue;
    FCT_TRY(check_grad(ctx, fct_item_name(nm, sizeof nm, "grad_in_factors", k), gV[k], V[k], x));
    n->gin[k] = n->any_gin = true;
  }
  for (int k = 0; gU && k < n_out; ++k) {
    if (!gU[k]) continue;
    FCT_TRY(check_grad(ctx, fct_item_name(nm, sizeof nm, "grad_out_factors", k), gU[k], U[k], x));
    n->gout[k] = n->any_gout = true;
  }
  if (gb) {
    FCT_TRY(fct_check_vector(ctx, "grad_bias", gb, x, s->out.size, out_what));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_bias", gb, 1, s->out.size, &m));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "grad_y", g);
  add_inputs(&a, x, core, n_in, V, n_out, U);
  int first_out = a.n;
  fct_args_add(&a, "grad_x", gx);
  fct_args_add(&a, "grad_core", gcore);
  fct_args_add_list(&a, "grad_in_factors", n_in, gV);
  fct_args_add_list(&a, "grad_out_factors", n_out, gU);
  fct_args_add(&a, "grad_bias", gb);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  n->gx = gx != NULL;
  n->gcore = gcore != NULL;
  n->gb = gb != NULL;
  bool work = n->gx || n->gcore || n->any_gin || n->any_gout;
  n->pack_x = work && !fct_is_contiguous(x);
  n->pack_g = (work || n->gb) && !fct_is_contiguous(g);
  n->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  n->small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  init_params(p, core);
  return make_plan(ctx, p);
}

fct_status fct_tucker_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, const DLTensor* core,
    int n_in, const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* grad_x, const DLTensor* grad_core, const DLTensor* const* grad_in_factors,
    const DLTensor* const* grad_out_factors, const DLTensor* grad_bias, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tk_plan p;
  FCT_TRY(backward_plan(&c, grad_y, x, core, n_in, in_factors, n_out, out_factors, grad_x,
                    grad_core, grad_in_factors, grad_out_factors, grad_bias, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

/* The gradient outputs as [rows, cols] views, each zeroed when M == 0. */
static fct_status zero_grads(const fct_exec* e, const tk_plan* p, DLTensor* gcore,
                             DLTensor* const* gV, DLTensor* const* gU) {
  const tk_shape* s = &p->s;
  if (gcore) {
    fct_mat G = fct_dense(fct_data(gcore), s->out.rank, s->in.rank);
    FCT_TRY(e->be->zero(e->ctx, e->device, e->dt, &G));
  }
  for (int k = 0; k < s->in.n; ++k) {
    if (!p->n.gin[k]) continue;
    fct_mat G = fct_dense(fct_data(gV[k]), s->in.modes[k], s->in.ranks[k]);
    FCT_TRY(e->be->zero(e->ctx, e->device, e->dt, &G));
  }
  for (int k = 0; k < s->out.n; ++k) {
    if (!p->n.gout[k]) continue;
    fct_mat G = fct_dense(fct_data(gU[k]), s->out.modes[k], s->out.ranks[k]);
    FCT_TRY(e->be->zero(e->ctx, e->device, e->dt, &G));
  }
  return FCT_OK;
}

/* One chunk of rows [m0, m0 + Mc) of the backward; weight gradients are
 * accumulated (beta = 1) after the first chunk. */
static fct_status backward_chunk(const fct_exec* e, const tk_plan* p, const char* xrows,
                                 const char* grows, char* gxrows, DLTensor* gcore,
                                 DLTensor* const* gV, DLTensor* const* gU, int64_t Mc,
                                 double beta) {
  const tk_shape* s = &p->s;
  const tk_needs* n = &p->n;
  size_t es = e->es;
  /* Which in steps still need the gradient of their input: step j needs
   * it when j > 0 and something below asks for it, or j == 0 and grad_x. */
  bool need_below[FCT_MAX_MODES + 1];
  need_below[0] = n->gx;
  for (int j = 1; j <= s->in.n; ++j) {
    int k = s->in.n - j; /* mode contracted by step j - 1 */
    need_below[j] = need_below[j - 1] || n->gin[k];
  }
  bool need_core_grad = need_below[s->in.n]; /* gradient of X̃ᵀ */
  bool need_gz = need_core_grad || n->gcore;

  /* Recompute the forward: in states (kept), core, out states (kept); the
   * weight gradients need them, grad_x alone does not. */
  bool need_states = n->gcore || n->any_gin || n->any_gout;
  char* in_states[FCT_MAX_MODES + 1];
  in_states[0] = (char*)xrows;
  char* at = fct_ws_at(e, p->off_in);
  for (int j = 0; j < s->in.n; ++j) {
    in_states[j + 1] = at;
    at += Mc * p->in_state[j + 1] * (int64_t)es;
    if (need_states) FCT_TRY(in_step(e, p, j, Mc, in_states[j], in_states[j + 1]));
  }
  char* out_states[FCT_MAX_MODES];
  at = fct_ws_at(e, p->off_out);
  for (int k = 0; k < s->out.n; ++k) {
    out_states[k] = at;
    at += Mc * p->out_state[k] * (int64_t)es;
  }
  if (n->any_gout) {
    FCT_TRY(core_step(e, p, Mc, in_states[s->in.n], out_states[0]));
    for (int k = 0; k + 1 < s->out.n; ++k)
      FCT_TRY(out_step(e, p, k, Mc, out_states[k], out_states[k + 1], 0.0));
  }

  /* Out steps backward, k = last .. 0: grad [Q, o_k] -> grad [s_k, Q]. */
  char* gbuf[2] = {fct_ws_at(e, p->off_ga), fct_ws_at(e, p->off_gb)};
  int w = 0;
  const char* gcur = grows;
  for (int k = s->out.n - 1; k >= 0; --k) {
    int64_t sk = s->out.ranks[k], o = s->out.modes[k];
    int64_t Q = Mc * (p->out_state[k] / sk);
    fct_mat Gt = fct_mat_t(fct_dense((char*)gcur, Q, o)); /* [o_k, Q] */
    if (n->gout[k]) {
      fct_mat Zt = fct_mat_t(fct_dense(out_states[k], sk, Q)); /* [Q, s_k] */
      fct_mat C = fct_dense(fct_data(gU[k]), o, sk);
      FCT_TRY(fct_x_gemm(e, &Gt, &Zt, &C, beta)); /* grad U_k [o_k, s_k] += gᵀ · Zᵀ */
    }
    bool lower = false; /* a gradient of an output factor before this one */
    for (int l = 0; l < k; ++l) lower = lower || n->gout[l];
    bool more = need_gz || lower;
    if (!more) return FCT_OK;
    fct_mat Ut = fct_mat_t(p->U[k].m); /* [s_k, o_k] */
    fct_mat C = fct_dense(gbuf[w], sk, Q);
    FCT_TRY(fct_x_gemm(e, &Ut, &Gt, &C, 0.0)); /* grad [s_k, Q] = U_kᵀ · gᵀ */
    gcur = gbuf[w];
    w ^= 1;
  }
  /* Core: grad Zᵀ [S, Mc] -> grad core [S, T], grad X̃ᵀ [T, Mc]. */
  fct_mat GZ = fct_dense((char*)gcur, s->out.rank, Mc);
  if (n->gcore) {
    fct_mat Xt = fct_mat_t(fct_dense(in_states[s->in.n], s->in.rank, Mc)); /* [Mc, T] */
    fct_mat C = fct_dense(fct_data(gcore), s->out.rank, s->in.rank);
    FCT_TRY(fct_x_gemm(e, &GZ, &Xt, &C, beta));
  }
  if (!need_core_grad) return FCT_OK;
  fct_mat coreT = fct_mat_t(p->core.m);
  fct_mat GX = fct_dense(gbuf[w], s->in.rank, Mc);
  FCT_TRY(fct_x_gemm(e, &coreT, &GZ, &GX, 0.0));
  gcur = gbuf[w];
  w ^= 1;
  /* In steps backward, j = n_in-1 .. 0 (modes 0 .. n_in-1). */
  for (int j = s->in.n - 1; j >= 0; --j) {
    int k = s->in.n - 1 - j;
    int64_t i = s->in.modes[k], t = s->in.ranks[k];
    int64_t R = Mc * (p->in_state[j] / i);
    fct_mat Gt = fct_mat_t(fct_dense((char*)gcur, t, R)); /* [R, t_k] */
    if (n->gin[k]) {
      fct_mat Xt = fct_mat_t(fct_dense(in_states[j], R, i)); /* [i_k, R] */
      fct_mat C = fct_dense(fct_data(gV[k]), i, t);
      FCT_TRY(fct_x_gemm(e, &Xt, &Gt, &C, beta)); /* grad V_k [i_k, t_k] += Xᵀ · gᵀ */
    }
    if (!need_below[j]) break;
    fct_mat Vt = fct_mat_t(p->V[k].m); /* [t_k, i_k] */
    char* dst = j == 0 ? gxrows : gbuf[w];
    fct_mat C = fct_dense(dst, R, i);
    FCT_TRY(fct_x_gemm(e, &Gt, &Vt, &C, 0.0)); /* grad [R, i_k] = gᵀ · V_kᵀ */
    gcur = dst;
    w ^= 1;
  }
  return FCT_OK;
}

fct_status fct_tucker_linear_backward(fct_context* ctx, const DLTensor* grad_y,
                                      const DLTensor* x, const DLTensor* core, int n_in,
                                      const DLTensor* const* in_factors, int n_out,
                                      const DLTensor* const* out_factors, DLTensor* grad_x,
                                      DLTensor* grad_core, DLTensor* const* grad_in_factors,
                                      DLTensor* const* grad_out_factors, DLTensor* grad_bias) {
  tk_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, x, core, n_in, in_factors, n_out, out_factors, grad_x,
                    grad_core, (const DLTensor* const*)grad_in_factors,
                    (const DLTensor* const*)grad_out_factors, grad_bias, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tk_shape* s = &p.s;
  const tk_needs* n = &p.n;
  bool work = n->gx || n->gcore || n->any_gin || n->any_gout;
  if (!work && !n->gb) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (n->check && s->M > 0)
    FCT_TRY(
        fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "tucker_linear"));
  FCT_TRY(bind_params(&e, &p));
  char *xb = NULL, *gb = NULL;
  FCT_TRY(fct_x_dense_base(&e, grad_y, n->pack_g, p.off_g, &gb));
  if (n->gb) {
    fct_mat G = fct_dense(gb, s->M, s->out.size);
    FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, &G, fct_data(grad_bias)));
  }
  if (!work) return FCT_OK;
  if (s->M == 0) return zero_grads(&e, &p, grad_core, grad_in_factors, grad_out_factors);
  FCT_TRY(fct_x_dense_base(&e, x, n->pack_x, p.off_x, &xb));
  for (int64_t m0 = 0; m0 < s->M; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    char* gx = grad_x ? fct_data(grad_x) + m0 * s->in.size * (int64_t)e.es : NULL;
    FCT_TRY(backward_chunk(&e, &p, xb + m0 * s->in.size * (int64_t)e.es,
                       gb + m0 * s->out.size * (int64_t)e.es, gx, grad_core, grad_in_factors,
                       grad_out_factors, Mc, m0 > 0 ? 1.0 : 0.0));
  }
  if (n->check && grad_x) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "grad_y", grad_y);
    add_inputs(&a, x, core, n_in, in_factors, n_out, out_factors);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "grad_x", grad_x, a.names,
                         a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan report                                                                */
/* ------------------------------------------------------------------------- */

static fct_status side_from(int n, const int64_t* modes, const int64_t* ranks, tk_side* side) {
  if (n < 1 || n > FCT_MAX_MODES || !modes || !ranks) return FCT_ERR_INVALID_VALUE;
  side->n = n;
  side->size = side->rank = 1;
  for (int k = 0; k < n; ++k) {
    if (modes[k] < 1 || ranks[k] < 1) return FCT_ERR_SHAPE;
    side->modes[k] = modes[k];
    side->ranks[k] = ranks[k];
    /* The ops' bounds (check_side), so the plan's products fit int64. */
    if (__builtin_mul_overflow(side->size, modes[k], &side->size) ||
        __builtin_mul_overflow(side->rank, ranks[k], &side->rank) ||
        !fct_fits_int(side->size) || !fct_fits_int(side->rank))
      return FCT_ERR_OVERFLOW;
  }
  return FCT_OK;
}

fct_status fct_tucker_linear_plan(int n_in, const int64_t* in_modes, const int64_t* in_ranks,
                                  int n_out, const int64_t* out_modes, const int64_t* out_ranks,
                                  int64_t batch, DLDevice device, DLDataType dtype,
                                  fct_linear_plan_info* info) {
  if (!info) return FCT_ERR_NULL_ARGUMENT;
  if (batch < 0 || fct_dtype_of(dtype) == FCT_DTYPE_INVALID) return FCT_ERR_INVALID_VALUE;
  if (!fct_fits_int(batch)) return FCT_ERR_OVERFLOW; /* M < 2^31, as the ops */
  tk_plan pf, pb;
  memset(&pf, 0, sizeof pf);
  FCT_TRY(side_from(n_in, in_modes, in_ranks, &pf.s.in));
  FCT_TRY(side_from(n_out, out_modes, out_ranks, &pf.s.out));
  pf.s.M = batch;
  pf.s.es = fct_dtype_bytes(fct_dtype_of(dtype));
  pf.s.cuda = device.device_type == kDLCUDA;
  pb = pf;
  pb.n.backward = pb.n.gx = pb.n.gb = pb.n.gcore = pb.n.any_gin = pb.n.any_gout = true;
  for (int k = 0; k < FCT_MAX_MODES; ++k) pb.n.gin[k] = pb.n.gout[k] = true;
  FCT_TRY(make_plan(NULL, &pf));
  FCT_TRY(make_plan(NULL, &pb));
  memset(info, 0, sizeof *info);
  info->forward_flops = pf.flops;
  info->backward_flops = pb.flops;
  info->forward_workspace = pf.bytes;
  info->backward_workspace = pb.bytes;
  snprintf(info->plan, sizeof info->plan,
           "tucker: %d input factors (last first), core [%lld, %lld], %d output factors "
           "(first first); chunks of %lld rows (forward), %lld (backward)",
           n_in, (long long)pf.s.out.rank, (long long)pf.s.in.rank, n_out, (long long)pf.Mc,
           (long long)pb.Mc);
  return FCT_OK;
}
