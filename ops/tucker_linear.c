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
 * Kept states. The backward reads the forward's intermediates: the input
 * side's states (for grad V_k), X̃ᵀ (for grad core), Zᵀ and the output
 * side's states (for grad U_k). Without `states` it recomputes them per
 * chunk. With it the forward writes two of them there, t = X̃ and z = Zᵀ's
 * rows (T + S elements per row), and the backward takes them instead: z is
 * the core's GEMM, 2·S·T FLOPs per row, the bulk of the pass's FLOPs and its
 * only compute-bound step, and t is what grad core needs besides. The factor
 * steps' intermediates are not kept: each costs 2·i_k (or 2·s_k) FLOPs per
 * element, memory-bound, and together they are larger than x (up to
 * max(in, out)·t_k/i_k per row each), so recomputing them from x or z in
 * cache costs less than writing and reading them back from memory. They are
 * kept only when T + S <= in + out (no more than x's and y's rows together;
 * fct_tucker_linear_states), a rule on shapes alone so that torch's fake
 * kernel knows the output's size. They are used for a batch when the cost
 * model prices both passes with them below its cheapest plans without
 * (keep_pays: forming W may win, or the shared chunks may cost the forward
 * more than the backward saves); else the forward writes zeros there and
 * the backward ignores them. When used, both passes run the chain in the
 * same chunks of rows (keep_chunk), each chunk's t [T, Mc] then z [S, Mc]
 * back to back in the steps' layouts, so neither pass copies them. Both
 * choices are functions of the shapes, M, the dtype and the device, never
 * of the flags, so the two passes always agree on the layout.
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
  bool force_contract, force_form_w;
  bool keep; /* forward: writes states; backward: reads them */
} tk_needs;

typedef struct tk_plan {
  tk_shape s;
  tk_needs n;
  int64_t Mc;
  /* per-row element counts */
  int64_t in_state[FCT_MAX_MODES + 1];  /* before in step j (j = 0: x; j = n_in: X̃ᵀ) */
  int64_t out_state[FCT_MAX_MODES + 1]; /* before out step j (j = 0: Zᵀ; j = n_out: y) */
  int64_t max_state;                    /* over the intermediates (x and y excluded) */
  int64_t in_states_total, out_states_total; /* what the backward recomputes */
  int64_t kept; /* elements per row of the kept states (T + S) when keep */
  fct_param core, V[FCT_MAX_MODES], U[FCT_MAX_MODES];
  /* Forming W instead (form_w): blocks of nb rows of U_1, each W's rows
   * [ob = nb·o_2···o_q, in]; the two runs' intermediates per block. */
  bool form_w;
  int64_t nb, ob;
  int64_t u_max, u_total, v_max, v_total;
  size_t off_p, off_w, off_gw, off_gp, off_us, off_vs;
  size_t off_x, off_g, off_a, off_b, off_in, off_out, off_ga, off_gb, off_scratch;
  size_t bytes;
  double flops;
  double cost; /* the plan's price (FLOP-equivalents) */
} tk_plan;

/* A run of expansion steps, as the chain's output steps: its input
 * [r_1..r_n, Mc] becomes [Mc, m_1..m_n], one mode at a time,
 *   step k: [r_k, r_{>k}, Mc, m_{<k}] -> [r_{>k}, Mc, m_{<k}, m_k]
 * with F_k [m_k, r_k]. Forming W is two runs: the output factors over the
 * core (Mc = T) give P [T, out] = (core·(⊗U)ᵀ viewed per t), then the input
 * factors over P (Mc = out) give W [out, in]. */
typedef struct tk_run {
  int n;
  fct_mat F[FCT_MAX_MODES];
  int64_t modes[FCT_MAX_MODES], ranks[FCT_MAX_MODES];
  int64_t Mc;
} tk_run;

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

/* Elements per row of the kept states (the top of the file): T + S when
 * no more than in + out, else 0 (not kept). */
static int64_t kept_per_row(const tk_side* in, const tk_side* out) {
  int64_t k = in->rank + out->rank; /* each < 2^31 (check_side) */
  return k <= in->size + out->size ? k : 0;
}

/* states: [M·(T + S)], x's dtype and device, C-contiguous; only where the
 * shapes keep states. */
static fct_status check_states(fct_context* ctx, const DLTensor* states, const DLTensor* x,
                               const tk_shape* s) {
  int64_t per = kept_per_row(&s->in, &s->out), n;
  if (per == 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "states: expected NULL: no states are kept for these shapes (T + S = %lld "
                    "exceeds in + out = %lld; fct_tucker_linear_states)",
                    (long long)(s->in.rank + s->out.rank),
                    (long long)(s->in.size + s->out.size));
  if (__builtin_mul_overflow(s->M, per, &n))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "states: M·(T + S) overflows int64");
  FCT_TRY(fct_check_vector(ctx, "states", states, x, n,
                           "M·(T + S): the batch times the kept elements per row"));
  if (!fct_is_contiguous(states))
    return fct_fail(ctx, FCT_ERR_LAYOUT, "states: expected a C-contiguous tensor");
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
  if (p->form_w) {
    int64_t buf = p->u_max > p->v_max ? p->u_max : p->v_max;
    p->off_p = fct_layout_take(L, s->in.rank * p->ob, es);
    p->off_w = fct_layout_take(L, p->ob * s->in.size, es);
    if (!n->backward) {
      p->off_a = fct_layout_take(L, buf, es);
      p->off_b = fct_layout_take(L, buf, es);
    } else {
      p->off_gw = fct_layout_take(L, p->ob * s->in.size, es);
      p->off_gp = fct_layout_take(L, s->in.rank * p->ob, es);
      p->off_us = fct_layout_take(L, p->u_total, es);
      p->off_vs = fct_layout_take(L, p->v_total, es);
      p->off_ga = fct_layout_take(L, buf, es);
      p->off_gb = fct_layout_take(L, buf, es);
    }
  } else if (!n->backward) {
    p->off_a = fct_layout_take(L, Mc * p->max_state, es);
    p->off_b = fct_layout_take(L, Mc * p->max_state, es);
  } else {
    /* Gradient states have the sizes of the intermediates (grad_y is read
     * in place, grad_x written in place); kept X̃ᵀ and Zᵀ are read from
     * states. */
    int64_t gmax = p->max_state;
    int64_t in_ws = p->in_states_total - (n->keep ? s->in.rank : 0);
    int64_t out_ws = p->out_states_total - (n->keep ? s->out.rank : 0);
    p->off_in = fct_layout_take(L, Mc * in_ws, es);
    p->off_out = fct_layout_take(L, Mc * out_ws, es);
    p->off_ga = fct_layout_take(L, Mc * gmax, es);
    p->off_gb = fct_layout_take(L, Mc * gmax, es);
  }
  if (n->check && p->s.cuda) p->off_scratch = fct_layout_take(L, FCT_CHECK_SCRATCH, 1);
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

/* Elements of state k of a run (k = 0: its input, k = n: its output). */
static int64_t run_state(const tk_run* r, int k) {
  int64_t v = r->Mc;
  for (int j = k; j < r->n; ++j) v *= r->ranks[j];
  for (int j = 0; j < k; ++j) v *= r->modes[j];
  return v;
}

static double run_flops(const tk_run* r) {
  double f = 0;
  for (int k = 0; k < r->n; ++k) f += 2.0 * (double)run_state(r, k) * (double)r->modes[k];
  return f;
}

/* The two runs forming the W rows of U_1's rows [a0, a0 + nbb); the
 * factor views are set once the parameters are bound. */
static void fw_runs(const tk_plan* p, int64_t a0, int64_t nbb, size_t es, tk_run* u,
                    tk_run* v) {
  const tk_shape* s = &p->s;
  memset(u, 0, sizeof *u);
  memset(v, 0, sizeof *v);
  u->n = s->out.n;
  u->Mc = s->in.rank;
  for (int k = 0; k < s->out.n; ++k) {
    u->modes[k] = s->out.modes[k];
    u->ranks[k] = s->out.ranks[k];
    u->F[k] = p->U[k].m;
  }
  u->modes[0] = nbb;
  u->F[0].rows = nbb;
  if (u->F[0].data) u->F[0].data += a0 * u->F[0].rs * (int64_t)es;
  v->n = s->in.n;
  v->Mc = nbb * (s->out.size / s->out.modes[0]);
  for (int k = 0; k < s->in.n; ++k) {
    v->modes[k] = s->in.modes[k];
    v->ranks[k] = s->in.ranks[k];
    v->F[k] = p->V[k].m;
  }
}

/* Block size and intermediate sizes of forming W: a block's rows of W fill
 * at most the chunk budget (one row of U_1 at least). */
static void fw_size(tk_plan* p, const fct_machine* mc) {
  const tk_shape* s = &p->s;
  int64_t rest = s->out.size / s->out.modes[0];
  double row = (double)rest * (double)s->in.size * (double)s->es;
  int64_t nb = (int64_t)((double)mc->chunk_bytes / row);
  if (nb < 1) nb = 1;
  if (nb > s->out.modes[0]) nb = s->out.modes[0];
  if (p->n.small) nb = 1;
  p->nb = nb;
  p->ob = nb * rest;
  tk_run u, v;
  fw_runs(p, 0, nb, s->es, &u, &v);
  p->u_max = p->v_max = 1;
  p->u_total = p->v_total = 0;
  for (int k = 1; k < u.n; ++k) {
    int64_t e = run_state(&u, k);
    if (e > p->u_max) p->u_max = e;
    p->u_total += e;
  }
  for (int k = 1; k < v.n; ++k) {
    int64_t e = run_state(&v, k);
    if (e > p->v_max) p->v_max = e;
    p->v_total += e;
  }
}

/* FLOPs of forming W once (both runs over every block). */
static double fw_form_flops(const tk_plan* p) {
  tk_run u, v;
  fw_runs(p, 0, p->s.out.modes[0], p->s.es, &u, &v);
  return run_flops(&u) + run_flops(&v);
}

/* FLOPs of a pass that forms W: forward, W then y = x·Wᵀ; backward, W
 * (for grad_x = grad_y·W) and grad_W = grad_yᵀ·x projected back through the
 * two runs (two GEMMs per step). */
static double fw_flops(const tk_plan* p) {
  const tk_shape* s = &p->s;
  const tk_needs* n = &p->n;
  double M = (double)s->M, dense = 2 * M * (double)s->in.size * (double)s->out.size;
  double form = fw_form_flops(p);
  if (!n->backward) return form + dense;
  bool weights = n->gcore || n->any_gin || n->any_gout;
  double f = form;
  if (n->gx) f += dense;
  if (weights) f += dense + 2 * form;
  if (n->gb) f += M * (double)s->out.size;
  return f;
}

/* Cost of forming W in FLOP-equivalents: its FLOPs, the traffic (x and
 * grad_x streamed once per block, grad_y and y once, W's blocks and the
 * runs' states written and read) and the calls. */
static double fw_cost(const tk_plan* p, const fct_machine* mc) {
  const tk_shape* s = &p->s;
  const tk_needs* n = &p->n;
  double M = (double)s->M, in = (double)s->in.size, out = (double)s->out.size;
  double nblk = ceil((double)s->out.modes[0] / (double)p->nb), es = (double)s->es;
  double states = nblk * (double)(p->u_total + p->v_total) + 2 * (double)s->in.rank * out;
  double elems, calls;
  if (!n->backward) {
    elems = nblk * M * in + M * out + 2 * out * in + 2 * states;
    calls = nblk * (s->in.n + s->out.n + 1);
  } else {
    bool weights = n->gcore || n->any_gin || n->any_gout;
    elems = nblk * M * in * ((weights ? 1 : 0) + (n->gx ? 2 : 0)) +
            M * out * ((weights ? 1 : 0) + (n->gx ? 1 : 0)) + 4 * out * in + 6 * states;
    calls = nblk * (3 * (s->in.n + s->out.n) + 3);
  }
  return fw_flops(p) + mc->flop_per_byte * es * elems + mc->call_flops * calls;
}

/* Bytes per row of the chain's chunk workspace. */
static size_t chunk_row_bytes(const tk_plan* p) {
  const tk_shape* s = &p->s;
  if (!p->n.backward) return 2 * (size_t)p->max_state * s->es;
  int64_t gmax = p->max_state;
  int64_t in_ws = p->in_states_total - (p->n.keep ? s->in.rank : 0);
  int64_t out_ws = p->out_states_total - (p->n.keep ? s->out.rank : 0);
  return (size_t)(in_ws + out_ws + 2 * gmax) * s->es;
}

/* The cheapest chunk of Mc ∈ {M, 8, 16, 32, ...} for plan a, or for a and b
 * run on the same chunks (b nullable: their costs added, the larger
 * workspace per row against the cap); 1 when M == 0. *cost: its cost
 * (INFINITY when M == 0). */
static int64_t cheapest_chunk(const tk_plan* a, const tk_plan* b, const fct_machine* mc,
                              double* cost) {
  int64_t M = a->s.M;
  size_t ra = chunk_row_bytes(a), rb = b ? chunk_row_bytes(b) : 0;
  size_t row = ra > rb ? ra : rb;
  int64_t best_mc = M > 0 ? M : 1;
  double best = INFINITY;
  for (int64_t mcand = M; mcand > 0; mcand = fct_smaller_chunk(mcand, 8)) {
    double c = chunk_cost(a, mc, mcand, ra) + (b ? chunk_cost(b, mc, mcand, rb) : 0.0);
    /* Workspace beyond the cap only when nothing smaller fits. */
    bool fits = (double)row * (double)mcand <= (double)mc->workspace_cap;
    if ((fits || mcand <= 8) && c < best) {
      best = c;
      best_mc = mcand;
    }
  }
  *cost = best;
  return best_mc;
}

/* The rows per chunk of both passes when states are kept (their layout
 * depends on it): the cheapest for the forward and the backward asking for
 * every gradient together. A function of the shapes, M, the dtype and the
 * device alone, so that the two passes agree whatever the flags and the
 * gradients asked for. */
static int64_t keep_chunk(const tk_plan* p, const fct_machine* mc) {
  tk_plan q[2]; /* forward, backward */
  for (int i = 0; i < 2; ++i) {
    q[i] = *p;
    memset(&q[i].n, 0, sizeof q[i].n);
    q[i].n.keep = true;
  }
  tk_needs* n = &q[1].n;
  n->backward = n->gx = n->gb = n->gcore = n->any_gin = n->any_gout = true;
  for (int k = 0; k < FCT_MAX_MODES; ++k) n->gin[k] = n->gout[k] = true;
  double cost;
  return cheapest_chunk(&q[0], &q[1], mc, &cost);
}

static fct_status make_plan(fct_context* ctx, tk_plan* p) {
  const tk_shape* s = &p->s;
  double per_row_flops = shape_states(p);
  fct_machine mc = fct_machine_for(s->cuda);
  double best;
  int64_t best_mc = cheapest_chunk(p, NULL, &mc, &best);
  p->Mc = p->n.small && best_mc > 3 ? 3 : best_mc;
  double M = (double)s->M;
  if (!p->n.backward) {
    p->flops = M * per_row_flops;
  } else {
    /* Recomputing the forward, then about two GEMMs per forward step. */
    p->flops = 3 * M * per_row_flops + (p->n.gb ? M * (double)s->out.size : 0);
  }
  p->form_w = false;
  if (p->n.keep) {
    /* States kept: the chain, in the chunks both passes share; the
     * backward does not recompute the core's GEMM. */
    p->kept = s->in.rank + s->out.rank;
    p->Mc = keep_chunk(p, &mc);
    if (p->n.backward) p->flops -= 2 * M * (double)s->out.rank * (double)s->in.rank;
  }
  p->cost = s->M > 0 ? p->flops + (isfinite(best) && !p->n.keep
                                        ? best
                                        : chunk_cost(p, &mc, p->Mc, chunk_row_bytes(p)))
                     : 0;
  /* Forming W instead: priced with the same constants; taken when cheaper
   * and within the workspace cap (or forced). */
  if (s->M > 0 && !p->n.keep && !(p->n.force_contract && !p->n.force_form_w)) {
    tk_plan w = *p;
    w.form_w = true;
    fw_size(&w, &mc);
    fct_layout L;
    lay_out(&w, &L);
    bool fits = !L.overflow && L.cursor <= mc.workspace_cap;
    /* Priced only when its workspace fits (else its sizes may overflow). */
    double wc = fits ? fw_cost(&w, &mc) : INFINITY;
    if (p->n.force_form_w || wc < p->cost) {
      *p = w;
      p->flops = fw_flops(p);
      p->cost = wc;
    }
  }
  fct_layout L;
  lay_out(p, &L);
  FCT_TRY(fct_layout_done(ctx, &L, &p->bytes));
  return FCT_OK;
}

/* Whether kept states pay for this batch: the forward and the backward
 * (every gradient) with them against the cheapest plans without (which
 * may form W), all priced without the flags, so that both passes decide
 * alike. When they do not, the forward leaves states unwritten and the
 * backward does not read them. */
static bool keep_pays(const tk_plan* p) {
  if (p->s.M == 0) return true;
  tk_plan q[4]; /* forward, backward; without, with states */
  for (int i = 0; i < 4; ++i) {
    q[i] = *p;
    memset(&q[i].n, 0, sizeof q[i].n);
    q[i].n.keep = i >= 2;
    if (i % 2) {
      tk_needs* n = &q[i].n;
      n->backward = n->gx = n->gb = n->gcore = n->any_gin = n->any_gout = true;
      for (int k = 0; k < FCT_MAX_MODES; ++k) n->gin[k] = n->gout[k] = true;
    }
    if (make_plan(NULL, &q[i]) != FCT_OK) return false;
  }
  return q[2].cost + q[3].cost < q[0].cost + q[1].cost;
}

static void init_params(tk_plan* p, const DLTensor* core) {
  const tk_shape* s = &p->s;
  /* Dense: forming W reads it as the input of a run. */
  fct_param_init(&p->core, core, s->out.rank, s->in.rank, true);
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

/* A run forward: st[0] its input, st[n] its output, st[1..n-1] its
 * intermediates (distinct from their neighbours). */
static fct_status run_forward(const fct_exec* e, const tk_run* r, char* const* st) {
  for (int k = 0; k < r->n; ++k) {
    int64_t Q = run_state(r, k) / r->ranks[k];
    fct_mat A = fct_mat_t(fct_dense(st[k], r->ranks[k], Q)), B = fct_mat_t(r->F[k]);
    fct_mat C = fct_dense(st[k + 1], Q, r->modes[k]);
    FCT_TRY(fct_x_gemm(e, &A, &B, &C, 0.0)); /* [Q, m_k] = srcᵀ · F_kᵀ */
  }
  return FCT_OK;
}

/* A run backward from gout (the gradient of st[n]): gF[k] (data NULL: not
 * asked) = betaF[k]·gF[k] + grad F_k; gin (NULL: not asked) = beta_in·gin +
 * the gradient of st[0]; gbuf: two buffers of the largest intermediate. */
static fct_status run_backward(const fct_exec* e, const tk_run* r, char* const* st,
                               const char* gout, const fct_mat* gF, const double* betaF,
                               char* gin, double beta_in, char* const* gbuf) {
  bool need[FCT_MAX_MODES + 1]; /* the gradient of state k is needed */
  need[0] = gin != NULL;
  for (int k = 1; k < r->n; ++k) need[k] = need[k - 1] || gF[k - 1].data != NULL;
  const char* gcur = gout;
  int w = 0;
  for (int k = r->n - 1; k >= 0; --k) {
    int64_t Q = run_state(r, k) / r->ranks[k];
    fct_mat Gt = fct_mat_t(fct_dense((char*)gcur, Q, r->modes[k])); /* [m_k, Q] */
    if (gF[k].data) {
      fct_mat B = fct_mat_t(fct_dense(st[k], r->ranks[k], Q)); /* [Q, r_k] */
      FCT_TRY(fct_x_gemm(e, &Gt, &B, &gF[k], betaF[k]));          /* grad F_k += gᵀ · srcᵀ */
    }
    if (!need[k]) break;
    fct_mat Ft = fct_mat_t(r->F[k]); /* [r_k, m_k] */
    char* dst = k == 0 ? gin : gbuf[w];
    fct_mat C = fct_dense(dst, r->ranks[k], Q);
    FCT_TRY(fct_x_gemm(e, &Ft, &Gt, &C, k == 0 ? beta_in : 0.0)); /* grad src = F_kᵀ · gᵀ */
    gcur = dst;
    w ^= 1;
  }
  return FCT_OK;
}

/* The states of the two runs of one block: the output factors' run from
 * the core to P, the input factors' run from P to W's rows. keep: the
 * intermediates in their own regions (the backward reads them), else in
 * the two alternating buffers. */
static void fw_states(const fct_exec* e, const tk_plan* p, const tk_run* u, const tk_run* v,
                      bool keep, char** su, char** sv) {
  char* buf[2] = {fct_ws_at(e, p->off_a), fct_ws_at(e, p->off_b)};
  char* P = fct_ws_at(e, p->off_p);
  char* at = fct_ws_at(e, p->off_us);
  su[0] = p->core.m.data;
  for (int k = 1; k < u->n; ++k) {
    su[k] = keep ? at : buf[(k - 1) & 1];
    if (keep) at += run_state(u, k) * (int64_t)e->es;
  }
  su[u->n] = P;
  at = fct_ws_at(e, p->off_vs);
  sv[0] = P;
  for (int k = 1; k < v->n; ++k) {
    sv[k] = keep ? at : buf[(k - 1) & 1];
    if (keep) at += run_state(v, k) * (int64_t)e->es;
  }
  sv[v->n] = fct_ws_at(e, p->off_w);
}

/* y = x·Wᵀ + bias with W formed one block of rows at a time. */
static fct_status fw_forward(const fct_exec* e, const tk_plan* p, const char* xb, DLTensor* y,
                             const DLTensor* bias) {
  const tk_shape* s = &p->s;
  int64_t rest = s->out.size / s->out.modes[0];
  fct_mat X = fct_dense((char*)xb, s->M, s->in.size);
  fct_mat Y = fct_dense(fct_data(y), s->M, s->out.size);
  if (bias)
    FCT_TRY(e->be->fill_rows(e->ctx, e->device, e->dt, &Y, fct_data(bias), fct_vector_stride(bias)));
  for (int64_t a0 = 0; a0 < s->out.modes[0]; a0 += p->nb) {
    int64_t nbb = s->out.modes[0] - a0 < p->nb ? s->out.modes[0] - a0 : p->nb, ob = nbb * rest;
    tk_run u, v;
    fw_runs(p, a0, nbb, e->es, &u, &v);
    char *su[FCT_MAX_MODES + 1], *sv[FCT_MAX_MODES + 1];
    fw_states(e, p, &u, &v, false, su, sv);
    FCT_TRY(run_forward(e, &u, su));
    FCT_TRY(run_forward(e, &v, sv));
    fct_mat Wt = fct_mat_t(fct_dense(sv[v.n], ob, s->in.size));
    fct_mat C = {Y.data + a0 * rest * (int64_t)e->es, s->M, ob, s->out.size, 1};
    FCT_TRY(fct_x_gemm(e, &X, &Wt, &C, bias ? 1.0 : 0.0)); /* y[:, block] = x · W_blockᵀ */
  }
  return FCT_OK;
}

/* The gradients with W formed one block of rows at a time: grad_x +=
 * grad_y[:, block]·W_block; grad W_block = grad_y[:, block]ᵀ·x, then back
 * through the input factors' run (grad V_k, grad P) and the output
 * factors' run (grad U_k, U_1's rows of the block, and grad core). */
static fct_status fw_backward(const fct_exec* e, const tk_plan* p, const char* xb,
                              const char* gyb, DLTensor* grad_x, DLTensor* gcore,
                              DLTensor* const* gV, DLTensor* const* gU) {
  const tk_shape* s = &p->s;
  const tk_needs* n = &p->n;
  size_t es = e->es;
  int64_t rest = s->out.size / s->out.modes[0];
  bool weights = n->gcore || n->any_gin || n->any_gout;
  fct_mat X = fct_dense((char*)xb, s->M, s->in.size);
  char* gbuf[2] = {fct_ws_at(e, p->off_ga), fct_ws_at(e, p->off_gb)};
  for (int64_t a0 = 0; a0 < s->out.modes[0]; a0 += p->nb) {
    int64_t nbb = s->out.modes[0] - a0 < p->nb ? s->out.modes[0] - a0 : p->nb, ob = nbb * rest;
    double beta = a0 > 0 ? 1.0 : 0.0;
    tk_run u, v;
    fw_runs(p, a0, nbb, es, &u, &v);
    char *su[FCT_MAX_MODES + 1], *sv[FCT_MAX_MODES + 1];
    fw_states(e, p, &u, &v, true, su, sv);
    FCT_TRY(run_forward(e, &u, su));
    FCT_TRY(run_forward(e, &v, sv));
    fct_mat Gb = {(char*)gyb + a0 * rest * (int64_t)es, s->M, ob, s->out.size, 1};
    if (n->gx) {
      fct_mat Wb = fct_dense(sv[v.n], ob, s->in.size);
      fct_mat Gx = fct_dense(fct_data(grad_x), s->M, s->in.size);
      FCT_TRY(fct_x_gemm(e, &Gb, &Wb, &Gx, beta)); /* grad_x += grad_y[:, block] · W_block */
    }
    if (!weights) continue;
    char* GW = fct_ws_at(e, p->off_gw);
    fct_mat Gbt = fct_mat_t(Gb), C = fct_dense(GW, ob, s->in.size);
    FCT_TRY(fct_x_gemm(e, &Gbt, &X, &C, 0.0)); /* grad W_block = grad_y[:, block]ᵀ · x */
    fct_mat gF[FCT_MAX_MODES];
    double bF[FCT_MAX_MODES];
    for (int k = 0; k < s->in.n; ++k) {
      gF[k] = n->gin[k] ? fct_dense(fct_data(gV[k]), s->in.modes[k], s->in.ranks[k])
                        : (fct_mat){0};
      bF[k] = beta;
    }
    bool need_gp = n->gcore || n->any_gout;
    char* GP = fct_ws_at(e, p->off_gp);
    FCT_TRY(run_backward(e, &v, sv, GW, gF, bF, need_gp ? GP : NULL, 0.0, gbuf));
    if (!need_gp) continue;
    for (int k = 0; k < s->out.n; ++k) {
      gF[k] = n->gout[k] ? fct_dense(fct_data(gU[k]), s->out.modes[k], s->out.ranks[k])
                         : (fct_mat){0};
      bF[k] = beta;
    }
    if (gF[0].data) { /* the block's rows of U_1, written once */
      gF[0].data += a0 * s->out.ranks[0] * (int64_t)es;
      gF[0].rows = nbb;
      bF[0] = 0.0;
    }
    FCT_TRY(run_backward(e, &u, su, GP, gF, bF, gcore ? fct_data(gcore) : NULL, beta, gbuf));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, const DLTensor* core,
                               int n_in, const DLTensor* const* V, int n_out,
                               const DLTensor* const* U, const DLTensor* bias, const DLTensor* y,
                               const DLTensor* states, tk_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, core, n_in, V, n_out, U, &p->s));
  const char* out_what = "out: the product of the mode sizes of out_factors";
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, p->s.out.size, out_what));
  fct_mat m;
  FCT_TRY(fct_check_batched(ctx, "y", y, x, p->s.out.size, out_what));
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, p->s.M, p->s.out.size, &m));
  if (states) FCT_TRY(check_states(ctx, states, x, &p->s));
  fct_args a;
  a.n = 0;
  add_inputs(&a, x, core, n_in, V, n_out, U);
  fct_args_add(&a, "bias", bias);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  fct_args_add(&a, "states", states);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  p->n.keep = states != NULL;
  p->n.pack_x = !fct_is_contiguous(x);
  p->n.check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  p->n.small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  p->n.force_contract = ctx->flags & FCT_FLAG_FORCE_CONTRACT;
  p->n.force_form_w = ctx->flags & FCT_FLAG_FORCE_FORM_W;
  init_params(p, core);
  if (p->n.keep && !keep_pays(p)) p->n.keep = false;
  return make_plan(ctx, p);
}

fct_status fct_tucker_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                               const DLTensor* core, int n_in,
                                               const DLTensor* const* in_factors, int n_out,
                                               const DLTensor* const* out_factors,
                                               const DLTensor* bias, const DLTensor* y,
                                               const DLTensor* states, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tk_plan p;
  FCT_TRY(forward_plan(&c, x, core, n_in, in_factors, n_out, out_factors, bias, y, states, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_tucker_linear_forward(fct_context* ctx, const DLTensor* x, const DLTensor* core,
                                     int n_in, const DLTensor* const* in_factors, int n_out,
                                     const DLTensor* const* out_factors, const DLTensor* bias,
                                     DLTensor* y, DLTensor* states) {
  tk_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, core, n_in, in_factors, n_out, out_factors, bias, y, states, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tk_shape* s = &p.s;
  if (s->M == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  FCT_TRY(bind_params(&e, &p));
  if (states && !p.n.keep) {
    /* Not used for this batch (keep_pays): zeros, so that the op's outputs
     * are a function of its inputs. */
    fct_mat K = fct_dense(fct_data(states), s->M, kept_per_row(&s->in, &s->out));
    FCT_TRY(e.be->zero(ctx, e.device, e.dt, &K));
  }
  char* xb;
  FCT_TRY(fct_x_dense_base(&e, x, p.n.pack_x, p.off_x, &xb));
  int64_t bst = fct_vector_stride(bias);
  char* buf[2] = {fct_ws_at(&e, p.off_a), fct_ws_at(&e, p.off_b)};
  if (p.form_w) FCT_TRY(fw_forward(&e, &p, xb, y, bias));
  for (int64_t m0 = 0; m0 < s->M && !p.form_w; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    const char* cur = xb + m0 * s->in.size * (int64_t)e.es;
    /* Kept: this chunk's X̃ᵀ [T, Mc], then Zᵀ [S, Mc], in states. */
    char* kt = p.n.keep ? fct_data(states) + m0 * p.kept * (int64_t)e.es : NULL;
    int w = 0;
    for (int j = 0; j < s->in.n; ++j, w ^= 1) {
      char* dst = kt && j == s->in.n - 1 ? kt : buf[w];
      FCT_TRY(in_step(&e, &p, j, Mc, cur, dst));
      cur = dst;
    }
    char* zt = kt ? kt + Mc * s->in.rank * (int64_t)e.es : buf[w];
    FCT_TRY(core_step(&e, &p, Mc, cur, zt));
    cur = zt;
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
                                int n_out, const DLTensor* const* U, const DLTensor* states,
                                const DLTensor* gx, const DLTensor* gcore,
                                const DLTensor* const* gV, const DLTensor* const* gU,
                                const DLTensor* gb, tk_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, core, n_in, V, n_out, U, &p->s));
  const tk_shape* s = &p->s;
  const char* out_what = "out: the product of the mode sizes of out_factors";
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, s->out.size, out_what));
  if (states) FCT_TRY(check_states(ctx, states, x, s));
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
  fct_args_add(&a, "states", states);
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
  n->keep = states != NULL;
  bool work = n->gx || n->gcore || n->any_gin || n->any_gout;
  n->pack_x = work && !fct_is_contiguous(x);
  n->pack_g = (work || n->gb) && !fct_is_contiguous(g);
  n->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  n->small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  n->force_contract = ctx->flags & FCT_FLAG_FORCE_CONTRACT;
  n->force_form_w = ctx->flags & FCT_FLAG_FORCE_FORM_W;
  init_params(p, core);
  if (n->keep && !keep_pays(p)) n->keep = false;
  return make_plan(ctx, p);
}

fct_status fct_tucker_linear_backward_workspace(
    const fct_context* ctx, const DLTensor* grad_y, const DLTensor* x, const DLTensor* core,
    int n_in, const DLTensor* const* in_factors, int n_out, const DLTensor* const* out_factors,
    const DLTensor* states, const DLTensor* grad_x, const DLTensor* grad_core,
    const DLTensor* const* grad_in_factors, const DLTensor* const* grad_out_factors,
    const DLTensor* grad_bias, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tk_plan p;
  FCT_TRY(backward_plan(&c, grad_y, x, core, n_in, in_factors, n_out, out_factors, states,
                        grad_x, grad_core, grad_in_factors, grad_out_factors, grad_bias, &p));
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
 * accumulated (beta = 1) after the first chunk. kept: the chunk's X̃ᵀ then
 * Zᵀ from the forward, or NULL (recomputed). */
static fct_status backward_chunk(const fct_exec* e, const tk_plan* p, const char* xrows,
                                 const char* grows, char* gxrows, char* kept, DLTensor* gcore,
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

  /* The forward's states, as far as the weight gradients read them (grad_x
   * alone reads none): in_states[j] (j < n_in) by grad V of mode n_in-1-j,
   * in_states[n_in] = X̃ᵀ by grad core and by the core step recomputing Zᵀ,
   * out_states[k] by grad U_k (out_states[0] = Zᵀ). Kept X̃ᵀ and Zᵀ are
   * read from states; the rest is recomputed into the workspace. */
  int in_last = 0; /* in_states[1 .. in_last] are computed */
  for (int j = 1; j < s->in.n; ++j)
    if (n->gin[s->in.n - 1 - j]) in_last = j;
  if (!kept && (n->gcore || n->any_gout)) in_last = s->in.n;
  int out_last = -1; /* out_states[0 .. out_last] are needed */
  for (int k = 0; k < s->out.n; ++k)
    if (n->gout[k]) out_last = k;
  char* in_states[FCT_MAX_MODES + 1];
  in_states[0] = (char*)xrows;
  char* at = fct_ws_at(e, p->off_in);
  for (int j = 0; j < s->in.n; ++j) {
    if (kept && j + 1 == s->in.n) {
      in_states[j + 1] = kept;
    } else {
      in_states[j + 1] = at;
      at += Mc * p->in_state[j + 1] * (int64_t)es;
    }
    if (j < in_last) FCT_TRY(in_step(e, p, j, Mc, in_states[j], in_states[j + 1]));
  }
  char* out_states[FCT_MAX_MODES];
  at = fct_ws_at(e, p->off_out);
  for (int k = 0; k < s->out.n; ++k) {
    if (kept && k == 0) {
      out_states[0] = kept + Mc * s->in.rank * (int64_t)es;
    } else {
      out_states[k] = at;
      at += Mc * p->out_state[k] * (int64_t)es;
    }
  }
  if (out_last >= 0) {
    if (!kept) FCT_TRY(core_step(e, p, Mc, in_states[s->in.n], out_states[0]));
    for (int k = 0; k < out_last; ++k)
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
                                      const DLTensor* const* out_factors,
                                      const DLTensor* states, DLTensor* grad_x,
                                      DLTensor* grad_core, DLTensor* const* grad_in_factors,
                                      DLTensor* const* grad_out_factors, DLTensor* grad_bias) {
  tk_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, x, core, n_in, in_factors, n_out, out_factors, states,
                        grad_x, grad_core, (const DLTensor* const*)grad_in_factors,
                        (const DLTensor* const*)grad_out_factors, grad_bias, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tk_shape* s = &p.s;
  const tk_needs* n = &p.n;
  bool work = n->gx || n->gcore || n->any_gin || n->any_gout;
  if (!work && !n->gb) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (n->check && s->M > 0)
    FCT_TRY(fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "tucker_linear"));
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
  if (p.form_w)
    FCT_TRY(fw_backward(&e, &p, xb, gb, grad_x, grad_core, grad_in_factors, grad_out_factors));
  for (int64_t m0 = 0; m0 < s->M && !p.form_w; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    char* gx = grad_x ? fct_data(grad_x) + m0 * s->in.size * (int64_t)e.es : NULL;
    char* kept = n->keep ? fct_data(states) + m0 * p.kept * (int64_t)e.es : NULL;
    FCT_TRY(backward_chunk(&e, &p, xb + m0 * s->in.size * (int64_t)e.es,
                           gb + m0 * s->out.size * (int64_t)e.es, gx, kept, grad_core,
                           grad_in_factors, grad_out_factors, Mc, m0 > 0 ? 1.0 : 0.0));
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

static fct_status side_from(int n, const int64_t* modes, const int64_t* ranks, tk_side* side);

fct_status fct_tucker_linear_states(int n_in, const int64_t* in_modes, const int64_t* in_ranks,
                                    int n_out, const int64_t* out_modes,
                                    const int64_t* out_ranks, int64_t* per_row) {
  if (!per_row) return FCT_ERR_NULL_ARGUMENT;
  tk_side in, out;
  memset(&in, 0, sizeof in);
  memset(&out, 0, sizeof out);
  FCT_TRY(side_from(n_in, in_modes, in_ranks, &in));
  FCT_TRY(side_from(n_out, out_modes, out_ranks, &out));
  *per_row = kept_per_row(&in, &out);
  return FCT_OK;
}

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
  /* The backward as training runs it: with the kept states where the
   * layers keep them and they pay. */
  pb.n.keep = kept_per_row(&pb.s.in, &pb.s.out) > 0 && keep_pays(&pb);
  FCT_TRY(make_plan(NULL, &pf));
  FCT_TRY(make_plan(NULL, &pb));
  memset(info, 0, sizeof *info);
  info->forward_flops = pf.flops;
  info->backward_flops = pb.flops;
  info->forward_workspace = pf.bytes;
  info->backward_workspace = pb.bytes;
  char f[64], b[80];
  snprintf(f, sizeof f, pf.form_w ? "W formed in blocks of %lld rows" : "chunks of %lld rows",
           (long long)(pf.form_w ? pf.ob : pf.Mc));
  if (pb.n.keep)
    snprintf(b, sizeof b, "kept t and z (%lld per row), both passes in chunks of %lld rows",
             (long long)pb.kept, (long long)pb.Mc);
  else
    snprintf(b, sizeof b, pb.form_w ? "W formed in blocks of %lld rows" : "chunks of %lld rows",
             (long long)(pb.form_w ? pb.ob : pb.Mc));
  snprintf(info->plan, sizeof info->plan,
           "tucker: %d input factors (last first), core [%lld, %lld], %d output factors "
           "(first first); forward: %s; backward: %s",
           n_in, (long long)pf.s.out.rank, (long long)pf.s.in.rank, n_out, f, b);
  snprintf(info->forward_strategy, sizeof info->forward_strategy, "%s",
           pf.form_w ? "form_w" : "contract");
  snprintf(info->backward_strategy, sizeof info->backward_strategy, "%s",
           pb.form_w ? "form_w" : "contract");
  return FCT_OK;
}
