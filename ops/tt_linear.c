/*
 * Tensor-Train (TT-matrix) linear entry points (factorch.h):
 *   W[(o_1..o_d), (i_1..i_d)] = G_1[:, i_1, o_1, :] · G_2[:, i_2, o_2, :] ··· G_d[:, i_d, o_d, :]
 * with cores G_k [r_(k-1), i_k, o_k, r_k], r_0 = r_d = 1; y = x·Wᵀ + b and
 * its gradients. Device independent: checks, plan, workspace layout, then
 * GEMMs and permutes through the backend (backend.h).
 *
 * Contraction order. The cores are cut into groups of consecutive cores;
 * each group is merged into one core C_g [r_in, I_g, O_g, r_out] in the
 * workspace (a GEMM chain whose cost does not depend on M), and the rows of
 * x are swept through the groups, right to left (RTL) or left to right
 * (LTR). One step contracts a group's input modes and incoming rank:
 *   RTL, group g:  [I_<g, (I_g, r_out), O_>g] -> [I_<g, (r_in, O_g), O_>g]
 *   LTR, group g:  [O_<g, (r_in, I_g), I_>g] -> [O_<g, (O_g, r_out), I_>g]
 * (per row; the leading M is left out). That is a batch of B = M·I_<g (or
 * M·O_<g) products C_g [n, c] · U_b [c, q], where q = O_>g (or I_>g); when
 * q = 1 (the first group swept) it is a single GEMM. No step transposes the
 * batch: the states are laid out so that each step reads its input where the
 * previous one wrote it, and the last step writes y [M, o_1..o_d] in place.
 * Per row a step costs 2·B·n·c·q FLOPs: with modes of 8 and ranks r, every
 * unmerged step costs 2·512·(core size), merging pairs of cores cuts the
 * product of the outer sizes from 512 to 64 at the price of larger cores.
 * A single group of all d >= 2 cores would be W itself: not a chain, but
 * the second strategy below.
 *
 * Forming W (fw_*). W's rows for a block of o_1 (nb rows of core 0's output
 * mode) are the TT whose core 0 is G_1[:, :, block, :]: merging all its
 * cores right to left gives W_block [nb·o_2···o_d, in] in the chain's own
 * layout. Forward: y[:, block] = x·W_blockᵀ. Backward: grad_x += grad_y[:,
 * block]·W_block, grad W_block = grad_y[:, block]ᵀ·x back through the
 * merge chain (core 0's block gradient, the others accumulated). The cost
 * model prices it beside the best chain; it is taken when cheaper and
 * within the workspace cap (blocks sized by the chunk budget).
 *
 * Cost model. Every grouping (2^(d-1) - 1 of them) and both directions are
 * priced in FLOP-equivalents (op_common.h):
 *   merge FLOPs and traffic (once per call, independent of M)
 *   + M · Σ_steps (2·B·n·c·q FLOPs + FLOP_PER_BYTE · bytes of the states)
 *   + CALL_FLOPS · calls (CPU: one BLAS call per product of a batched step,
 *     one per chunk for single GEMMs; CUDA: one launch per step and chunk)
 * and the cheapest is taken. Rows are processed in chunks sized so that a
 * chunk's states fit the chunk budget (in cache on the CPU), which bounds
 * the workspace and keeps the states out of DRAM.
 *
 * Backward. The states between steps are recomputed chunk by chunk (a
 * forward sweep minus its last step) rather than kept from the forward: the
 * op's saved state is then x alone. Per group, the gradient of the merged
 * core is a batch reduction Σ_b gY_b · U_bᵀ (accumulated over the chunks);
 * the gradients of its member cores follow by back-propagating through the
 * merge chain (again independent of M).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "op_common.h"

typedef struct tt_shape {
  int d;
  int64_t in[FCT_MAX_MODES], out[FCT_MAX_MODES], r[FCT_MAX_MODES + 1];
  int64_t in_size, out_size, M;
  size_t es;
  bool cuda;
} tt_shape;

typedef struct tt_needs {
  bool backward;
  bool gx, gb;
  bool gcore[FCT_MAX_MODES];
  bool any_gcore;
  bool pack_x, pack_g, check;
  bool small; /* FCT_FLAG_SMALL_CHUNKS */
  bool force_contract, force_form_w;
} tt_needs;

typedef struct tt_group {
  int a, b;                   /* cores a..b */
  int64_t I, O, rin, rout;    /* ∏ i, ∏ o, r_a, r_(b+1) */
  int64_t size;               /* rin·I·O·rout */
  int64_t chain;              /* elements of the prefix products P_a..P_b */
  bool grad;                  /* some member core wants its gradient */
  size_t off_prefix, off_cmat, off_gcmat;
} tt_group;

/* Step j of the sweep (per row): a batch of B products [n, c] · [c, q]. */
typedef struct tt_step {
  int g;
  int64_t B, n, c, q;
} tt_step;

typedef struct tt_plan {
  tt_shape s;
  tt_needs n;
  int G;
  bool ltr;
  unsigned cuts; /* bit k: a cut between cores k and k+1 */
  tt_group grp[FCT_MAX_MODES];
  tt_step step[FCT_MAX_MODES];
  int64_t state[FCT_MAX_MODES + 1]; /* per row before step j; state[G] = out */
  int64_t max_state;                /* over states 1..G-1 */
  int64_t states_total;             /* Σ states 1..G-1 (kept by the backward) */
  int64_t max_chain;                /* largest prefix product (temporaries) */
  int64_t Mc;
  fct_param core[FCT_MAX_MODES];
  size_t off_t, off_gp[2], off_gt, off_x, off_g, off_a, off_b, off_states, off_ga, off_gb;
  size_t off_reduce, reduce_bytes, off_scratch;
  size_t bytes;
  double cost, flops;
  /* Forming W: blocks of nb rows of o_1 (nb divides o_1), ob rows of W;
   * core 0's block packed at off_c0, its gradient blocks at off_g0. */
  bool form_w;
  int64_t nb, ob;
  size_t off_c0, off_g0;
} tt_plan;

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

static fct_status check_shape(fct_context* ctx, const DLTensor* x, int d,
                              const DLTensor* const* cores, tt_shape* s) {
  char nm[48];
  memset(s, 0, sizeof *s);
  FCT_TRY(fct_check_input_rows(ctx, "x", x, &s->M));
  if (d < 1 || d > FCT_MAX_MODES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "d: expected 1 to %d cores, got %d",
                    FCT_MAX_MODES, d);
  if (!cores)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "cores: expected an array of %d tensors, got NULL",
                    d);
  s->d = d;
  s->in_size = s->out_size = 1;
  s->r[0] = 1;
  for (int k = 0; k < d; ++k) {
    const char* name = fct_item_name(nm, sizeof nm, "cores", k);
    FCT_TRY(fct_check_param(ctx, name, cores[k], x, 4, "[r_(k-1), i_k, o_k, r_k]"));
    FCT_TRY(fct_check_tt_core(ctx, name, cores[k], k, s->r[k], "[r_(k-1), i_k, o_k, r_k]"));
    const int64_t* sh = cores[k]->shape;
    s->in[k] = sh[1];
    s->out[k] = sh[2];
    s->r[k + 1] = sh[3];
    int64_t csz;
    if (__builtin_mul_overflow(s->in_size, sh[1], &s->in_size) ||
        __builtin_mul_overflow(s->out_size, sh[2], &s->out_size) || !fct_fits_int(s->in_size) ||
        !fct_fits_int(s->out_size) || __builtin_mul_overflow(sh[0] * sh[1], sh[2] * sh[3], &csz) ||
        !fct_fits_int(csz))
      return fct_fail(ctx, FCT_ERR_OVERFLOW,
                      "%s: the products of the mode sizes and each core's size must be < 2^31",
                      name);
  }
  FCT_TRY(fct_check_tt_last(ctx, d, s->r[d]));
  int64_t last = x->shape[x->ndim - 1];
  if (last != s->in_size)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "x: expected a last dim of %lld (in: the product of the cores' input modes), "
                    "got %lld",
                    (long long)s->in_size, (long long)last);
  s->es = fct_dtype_bytes(fct_dtype_of(x->dtype));
  s->cuda = x->device.device_type == kDLCUDA;
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan                                                                       */
/* ------------------------------------------------------------------------- */

static void make_groups(tt_plan* p, unsigned cuts) {
  const tt_shape* s = &p->s;
  p->cuts = cuts;
  p->G = 0;
  int a = 0;
  for (int k = 0; k < s->d; ++k) {
    if (k == s->d - 1 || (cuts >> k & 1u)) {
      tt_group* g = &p->grp[p->G++];
      memset(g, 0, sizeof *g);
      g->a = a;
      g->b = k;
      g->I = g->O = 1;
      g->chain = 0;
      for (int l = a; l <= k; ++l) {
        g->I *= s->in[l];
        g->O *= s->out[l];
        if (k > a) g->chain += s->r[a] * g->I * g->O * s->r[l + 1]; /* P_l */
      }
      g->rin = s->r[a];
      g->rout = s->r[k + 1];
      g->size = g->rin * g->I * g->O * g->rout;
      for (int l = a; l <= k; ++l) g->grad = g->grad || p->n.gcore[l];
      a = k + 1;
    }
  }
}

static void make_steps(tt_plan* p) {
  int G = p->G;
  p->max_state = 1;
  p->states_total = 0;
  for (int j = 0; j < G; ++j) {
    int g = p->ltr ? j : G - 1 - j;
    const tt_group* gr = &p->grp[g];
    int64_t Ipre = 1, Isuf = 1, Opre = 1, Osuf = 1;
    for (int h = 0; h < G; ++h) {
      if (h < g) Ipre *= p->grp[h].I, Opre *= p->grp[h].O;
      if (h > g) Isuf *= p->grp[h].I, Osuf *= p->grp[h].O;
    }
    tt_step* st = &p->step[j];
    st->g = g;
    if (p->ltr) {
      st->B = Opre;
      st->c = gr->rin * gr->I;
      st->n = gr->O * gr->rout;
      st->q = Isuf;
    } else {
      st->B = Ipre;
      st->c = gr->I * gr->rout;
      st->n = gr->rin * gr->O;
      st->q = Osuf;
    }
    p->state[j] = st->B * st->c * st->q;
    p->state[j + 1] = st->B * st->n * st->q;
  }
  for (int j = 1; j < G; ++j) {
    if (p->state[j] > p->max_state) p->max_state = p->state[j];
    p->states_total += p->state[j];
  }
  /* The temporaries of the merge chain (T, and gT, gP in the backward)
   * hold a prefix product P_k [r_in, O_(a..k), I_(a..k), r_(k+1)], which
   * is larger than the merged core when an inner rank exceeds the modes
   * after it (e.g. ranks 1, 3, 1 around modes of size 1). Sizing them by
   * the merged cores overran the workspace (heap corruption from Python;
   * found by tests/python/test_fuzz_linear_ops.py). */
  p->max_chain = 1;
  for (int g = 0; g < G; ++g) {
    const tt_group* gr = &p->grp[g];
    int64_t I = 1, O = 1;
    if (gr->size > p->max_chain) p->max_chain = gr->size;
    for (int l = gr->a; l <= gr->b; ++l) {
      I *= p->s.in[l];
      O *= p->s.out[l];
      int64_t pk = gr->rin * I * O * p->s.r[l + 1];
      if (pk > p->max_chain) p->max_chain = pk;
    }
  }
}

/* Is step j one GEMM over all rows of a chunk? (Its trailing size is 1.) */
static bool single_gemm(const tt_step* st) { return st->q == 1; }

/* Forward FLOPs per row, state traffic per row (elements), and CPU calls
 * per row of the batched steps. */
static void per_row(const tt_plan* p, double* flops, double* elems, double* batched_calls,
                    int* single_steps) {
  *flops = *elems = *batched_calls = 0;
  *single_steps = 0;
  for (int j = 0; j < p->G; ++j) {
    const tt_step* st = &p->step[j];
    *flops += 2.0 * (double)st->B * (double)st->n * (double)st->c * (double)st->q;
    *elems += (double)st->B * (double)st->q * (double)(st->c + st->n);
    if (single_gemm(st)) ++*single_steps;
    else *batched_calls += (double)st->B;
  }
}

/* The merge chains: FLOPs, elements permuted, calls. */
static void merge_cost(const tt_plan* p, double* flops, double* elems, double* calls) {
  const tt_shape* s = &p->s;
  *flops = *elems = *calls = 0;
  for (int g = 0; g < p->G; ++g) {
    const tt_group* gr = &p->grp[g];
    *elems += 2.0 * (double)gr->size;
    *calls += 1;
    int64_t rows = gr->rin * s->in[gr->a] * s->out[gr->a];
    for (int k = gr->a + 1; k <= gr->b; ++k) {
      double cols = (double)(s->in[k] * s->out[k] * s->r[k + 1]);
      *flops += 2.0 * (double)rows * (double)s->r[k] * cols;
      *elems += 4.0 * (double)rows * cols;
      *calls += 2;
      rows *= s->in[k] * s->out[k];
    }
  }
}

static int64_t chunk_rows(const tt_plan* p, const fct_machine* mc) {
  const tt_shape* s = &p->s;
  if (s->M <= 1) return 1;
  if (p->n.small) return s->M < 3 ? s->M : 3;
  double row = (double)s->es * (p->n.backward ? (double)(p->states_total + 2 * p->max_state)
                                              : 2.0 * (double)p->max_state);
  double mcr = floor((double)mc->chunk_bytes / (row > 1 ? row : 1));
  if (mcr < 1) mcr = 1;
  return mcr >= (double)s->M ? s->M : (int64_t)mcr;
}

/* The cost of the plan in p (groups, direction) with its chunk size. */
static double plan_cost(tt_plan* p, const fct_machine* mc) {
  const tt_shape* s = &p->s;
  double f, el, bcalls, mf, mel, mcalls;
  int singles;
  per_row(p, &f, &el, &bcalls, &singles);
  merge_cost(p, &mf, &mel, &mcalls);
  p->Mc = chunk_rows(p, mc);
  double M = (double)s->M, nch = ceil(M / (double)p->Mc), es = (double)s->es;
  double steps_calls = mc->cuda ? nch * p->G : nch * singles + M * bcalls;
  double cost, flops;
  if (!p->n.backward) {
    flops = mf + M * f;
    cost = flops + mc->flop_per_byte * es * (mel + M * el) +
           mc->call_flops * (mcalls + steps_calls);
  } else {
    /* Recompute (all steps but the last, when core gradients are asked),
     * then a gradient-of-core and a gradient-of-input product per step; the
     * member gradients cost about twice the merge. */
    double last = 2.0 * (double)p->step[p->G - 1].B * (double)p->step[p->G - 1].n *
                  (double)p->step[p->G - 1].c * (double)p->step[p->G - 1].q;
    double rec = p->n.any_gcore ? f - last : 0;
    flops = 3 * mf + M * (rec + 2 * f);
    cost = flops + mc->flop_per_byte * es * (3 * mel + 3 * M * el) +
           mc->call_flops * (3 * mcalls + 3 * steps_calls);
  }
  p->flops = flops;
  return cost;
}

static void lay_out(tt_plan* p, fct_layout* L) {
  const tt_shape* s = &p->s;
  const tt_needs* n = &p->n;
  size_t es = s->es;
  memset(L, 0, sizeof *L);
  for (int k = 0; k < s->d; ++k) fct_param_lay_out(&p->core[k], L, es);
  for (int g = 0; g < p->G; ++g) {
    tt_group* gr = &p->grp[g];
    if (gr->a < gr->b) {
      gr->off_prefix = fct_layout_take(L, gr->chain, es);
      /* RTL reads the last prefix product, [r_in, O, I, r_out], as it is. */
      gr->off_cmat = p->ltr ? fct_layout_take(L, gr->size, es)
                            : gr->off_prefix + (size_t)(gr->chain - gr->size) * es;
    } else {
      gr->off_cmat = fct_layout_take(L, gr->size, es);
    }
  }
  p->off_t = fct_layout_take(L, p->max_chain, es);
  if (n->pack_x) p->off_x = fct_layout_take(L, s->M * s->in_size, es);
  if (!n->backward) {
    if (p->G > 1) {
      p->off_a = fct_layout_take(L, p->Mc * p->max_state, es);
      p->off_b = fct_layout_take(L, p->Mc * p->max_state, es);
    }
  } else {
    if (n->pack_g) p->off_g = fct_layout_take(L, s->M * s->out_size, es);
    if (n->any_gcore) {
      for (int g = 0; g < p->G; ++g)
        if (p->grp[g].grad) p->grp[g].off_gcmat = fct_layout_take(L, p->grp[g].size, es);
      p->off_gp[0] = fct_layout_take(L, p->max_chain, es);
      p->off_gp[1] = fct_layout_take(L, p->max_chain, es);
      p->off_gt = fct_layout_take(L, p->max_chain, es);
      if (p->G > 1) p->off_states = fct_layout_take(L, p->Mc * p->states_total, es);
      size_t red = 0;
      for (int j = 0; j < p->G; ++j) {
        const tt_step* st = &p->step[j];
        if (single_gemm(st) || !p->grp[st->g].grad) continue;
        size_t r = fct_gemm_reduce_scratch(s->cuda, fct_dtype_of((DLDataType){kDLFloat,
                                                                 (uint8_t)(es * 8), 1}),
                                           st->n, st->c, p->Mc * st->B);
        if (r > red) red = r;
      }
      p->reduce_bytes = red;
      if (red) p->off_reduce = fct_layout_take(L, (int64_t)red, 1);
    }
    if (p->G > 1) {
      p->off_ga = fct_layout_take(L, p->Mc * p->max_state, es);
      p->off_gb = fct_layout_take(L, p->Mc * p->max_state, es);
    }
  }
  if (n->check && p->s.cuda) p->off_scratch = fct_layout_take(L, FCT_CHECK_SCRATCH, 1);
}

/* Rows of o_1 per block of W: the largest divisor of o_1 whose block of W
 * fits the chunk budget (1 at least; 1 under FCT_FLAG_SMALL_CHUNKS). */
static void fw_choose_block(tt_plan* p, const fct_machine* mc) {
  const tt_shape* s = &p->s;
  int64_t rest = s->out_size / s->out[0];
  double row = (double)rest * (double)s->in_size * (double)s->es;
  int64_t nb = 1;
  for (int64_t c = 1; c <= s->out[0] && !p->n.small; ++c)
    if (s->out[0] % c == 0 && (double)c * row <= (double)mc->chunk_bytes) nb = c;
  p->nb = nb;
  p->ob = nb * rest;
  p->form_w = true;
}

/* The plan of one block (b): p's with o_1 = nb, one group of every core,
 * right to left (its merged core is W_block [ob, in]); its layout L, then
 * core 0's block and the gradient blocks of core 0. Every block has the same
 * layout. */
static void fw_block_plan(const tt_plan* p, tt_plan* b, fct_layout* L) {
  *b = *p;
  b->s.out[0] = p->nb;
  b->s.out_size = p->ob;
  b->ltr = false;
  make_groups(b, 0);
  make_steps(b);
  b->Mc = b->s.M;
  /* grad_y is packed whole (all blocks read it), not one block's columns. */
  b->n.pack_g = false;
  lay_out(b, L);
  const tt_shape* s = &p->s;
  b->n.pack_g = p->n.pack_g;
  if (p->n.pack_g) b->off_g = fct_layout_take(L, s->M * s->out_size, s->es);
  int64_t c0 = s->r[0] * s->in[0] * p->nb * s->r[1];
  b->off_c0 = fct_layout_take(L, c0, s->es);
  if (p->n.backward && p->n.gcore[0])
    b->off_g0 = fct_layout_take(L, c0 * (s->out[0] / p->nb), s->es);
}

static double fw_flops(const tt_plan* p, const tt_plan* b) {
  const tt_shape* s = &p->s;
  double mf, mel, mcalls;
  merge_cost(b, &mf, &mel, &mcalls);
  double nblk = (double)(s->out[0] / p->nb);
  double dense = 2.0 * (double)s->M * (double)s->in_size * (double)s->out_size;
  if (!p->n.backward) return nblk * mf + dense;
  double f = nblk * mf;
  if (p->n.gx) f += dense;
  if (p->n.any_gcore) f += dense + 2 * nblk * mf;
  return f;
}

/* Forming W in FLOP-equivalents: FLOPs, the merge chains' traffic per
 * block, x (and grad_x) streamed once per block, y or grad_y once, and the
 * calls. */
static double fw_cost(const tt_plan* p, const tt_plan* b, const fct_machine* mc) {
  const tt_shape* s = &p->s;
  double mf, mel, mcalls;
  merge_cost(b, &mf, &mel, &mcalls);
  double nblk = (double)(s->out[0] / p->nb), es = (double)s->es;
  double M = (double)s->M, in = (double)s->in_size, out = (double)s->out_size;
  double elems, calls;
  if (!p->n.backward) {
    elems = nblk * (mel + M * in) + M * out;
    calls = nblk * (mcalls + 2);
  } else {
    double k = p->n.any_gcore ? 3 : 1;
    elems = nblk * (k * mel + M * in * ((p->n.any_gcore ? 1 : 0) + (p->n.gx ? 2 : 0))) +
            M * out * 2;
    calls = nblk * (k * mcalls + 4);
  }
  return fw_flops(p, b) + mc->flop_per_byte * es * elems + mc->call_flops * calls;
}

static fct_status make_plan(fct_context* ctx, tt_plan* p) {
  fct_machine mc = fct_machine_for(p->s.cuda);
  int d = p->s.d;
  unsigned all = d > 1 ? (1u << (d - 1)) - 1 : 0;
  double best = INFINITY;
  unsigned best_cuts = all;
  bool best_ltr = false;
  for (unsigned cuts = 0; cuts <= all; ++cuts) {
    if (d >= 2 && cuts == 0) continue; /* one group of every core is W: fw_* below */
    for (int dir = 0; dir < 2; ++dir) {
      p->ltr = dir == 1;
      make_groups(p, cuts);
      make_steps(p);
      double c = plan_cost(p, &mc);
      if (c < best) {
        best = c;
        best_cuts = cuts;
        best_ltr = p->ltr;
      }
    }
  }
  p->ltr = best_ltr;
  make_groups(p, best_cuts);
  make_steps(p);
  p->cost = plan_cost(p, &mc);
  p->form_w = false;
  fct_layout L;
  lay_out(p, &L);
  if (d >= 2 && p->s.M > 0 && !(p->n.force_contract && !p->n.force_form_w)) {
    tt_plan w = *p;
    fw_choose_block(&w, &mc);
    tt_plan b;
    fct_layout Lw;
    fw_block_plan(&w, &b, &Lw);
    w.off_x = b.off_x; /* what the entry points read outside the blocks */
    w.off_g = b.off_g;
    w.off_scratch = b.off_scratch;
    double c = fw_cost(&w, &b, &mc);
    bool fits = !Lw.overflow && Lw.cursor <= mc.workspace_cap;
    if (p->n.force_form_w || (fits && c < p->cost)) {
      *p = w;
      p->cost = c;
      p->flops = fw_flops(&w, &b);
      return fct_layout_done(ctx, &Lw, &p->bytes);
    }
  }
  return fct_layout_done(ctx, &L, &p->bytes);
}

static void describe(const tt_plan* p, char* buf, size_t n) {
  size_t len = (size_t)snprintf(buf, n, "groups");
  for (int g = 0; g < p->G && len < n; ++g) {
    if (p->grp[g].a == p->grp[g].b)
      len += (size_t)snprintf(buf + len, n - len, " [%d]", p->grp[g].a);
    else
      len += (size_t)snprintf(buf + len, n - len, " [%d-%d]", p->grp[g].a, p->grp[g].b);
  }
  if (len < n)
    snprintf(buf + len, n - len, " %s, chunks of %lld rows", p->ltr ? "left-to-right" : "right-to-left",
             (long long)p->Mc);
}

/* ------------------------------------------------------------------------- */
/* Merging groups of cores                                                    */
/* ------------------------------------------------------------------------- */

/* Offset (elements) of the prefix product P_k in its group's chain area. */
static int64_t prefix_at(const tt_shape* s, const tt_group* g, int k) {
  int64_t off = 0, I = 1, O = 1;
  for (int l = g->a; l < k; ++l) {
    I *= s->in[l];
    O *= s->out[l];
    off += g->rin * I * O * s->r[l + 1];
  }
  return off;
}

/* Chain layout of P_k: [r_in, O_(a..k), I_(a..k), r_(k+1)]. P_a is G_a with
 * its mode dims swapped; P_k = permute(P_(k-1) · G_k):
 *   T [r_in, O', I', i_k, o_k, r'] -> P_k [r_in, O', o_k, I', i_k, r'] */
static fct_status build_group(const fct_exec* e, const tt_plan* p, int gi) {
  const tt_shape* s = &p->s;
  const tt_group* g = &p->grp[gi];
  int a = g->a;
  const char* Ga = p->core[a].m.data;
  int64_t rin = g->rin, i = s->in[a], o = s->out[a], r1 = s->r[a + 1];
  if (a == g->b) {
    char* dst = fct_ws_at(e, g->off_cmat);
    if (!p->ltr) { /* [r_in, o, i, r_out] */
      int64_t sh[4] = {rin, o, i, r1}, st[4] = {i * o * r1, r1, o * r1, 1};
      return fct_x_permute(e, Ga, 4, sh, st, dst);
    }
    /* [o, r_out, r_in, i] */
    int64_t sh[4] = {o, r1, rin, i}, st[4] = {r1, 1, i * o * r1, o * r1};
    return fct_x_permute(e, Ga, 4, sh, st, dst);
  }
  char* P = fct_ws_at(e, g->off_prefix);
  {
    int64_t sh[4] = {rin, o, i, r1}, st[4] = {i * o * r1, r1, o * r1, 1};
    FCT_TRY(fct_x_permute(e, Ga, 4, sh, st, P));
  }
  int64_t Oc = o, Ic = i;
  for (int k = a + 1; k <= g->b; ++k) {
    int64_t r = s->r[k], ik = s->in[k], ok = s->out[k], rn = s->r[k + 1];
    char* prev = P + prefix_at(s, g, k - 1) * (int64_t)e->es;
    char* cur = P + prefix_at(s, g, k) * (int64_t)e->es;
    char* T = fct_ws_at(e, p->off_t);
    int64_t rows = rin * Oc * Ic, cols = ik * ok * rn;
    fct_mat A = fct_dense(prev, rows, r), B = fct_dense(p->core[k].m.data, r, cols);
    fct_mat C = fct_dense(T, rows, cols);
    FCT_TRY(fct_x_gemm(e, &A, &B, &C, 0.0));
    int64_t s_o = rn, s_i = ok * rn, s_I = ik * ok * rn, s_O = Ic * s_I, s_r = Oc * s_O;
    int64_t sh[6] = {rin, Oc, ok, Ic, ik, rn}, st[6] = {s_r, s_O, s_o, s_I, s_i, 1};
    FCT_TRY(fct_x_permute(e, T, 6, sh, st, cur));
    Oc *= ok;
    Ic *= ik;
  }
  if (p->ltr) { /* [r_in, O, I, r_out] -> [O, r_out, r_in, I] */
    const char* last = P + prefix_at(s, g, g->b) * (int64_t)e->es;
    int64_t O = g->O, I = g->I, ro = g->rout;
    int64_t sh[4] = {O, ro, rin, I}, st[4] = {I * ro, 1, O * I * ro, ro};
    FCT_TRY(fct_x_permute(e, last, 4, sh, st, fct_ws_at(e, g->off_cmat)));
  }
  return FCT_OK;
}

static fct_status build_groups(const fct_exec* e, tt_plan* p) {
  for (int k = 0; k < p->s.d; ++k) FCT_TRY(fct_param_bind(e, &p->core[k]));
  for (int g = 0; g < p->G; ++g) FCT_TRY(build_group(e, p, g));
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Sweep steps                                                                */
/* ------------------------------------------------------------------------- */

static fct_mat cmat(const fct_exec* e, const tt_plan* p, const tt_step* st) {
  return fct_ws_mat(e, p->grp[st->g].off_cmat, st->n, st->c);
}

/* dst = step j applied to src, for a chunk of Mc rows. */
static fct_status sweep_step(const fct_exec* e, const tt_plan* p, int j, int64_t Mc,
                             const char* src, char* dst, double beta) {
  const tt_step* st = &p->step[j];
  fct_mat C = cmat(e, p, st);
  int64_t Bt = Mc * st->B;
  if (single_gemm(st)) { /* Y [Bt, n] = U [Bt, c] · Cᵀ */
    fct_mat U = fct_dense((char*)src, Bt, st->c), Ct = fct_mat_t(C);
    fct_mat Y = fct_dense(dst, Bt, st->n);
    return fct_x_gemm(e, &U, &Ct, &Y, beta);
  }
  /* Y_b [n, q] = C [n, c] · U_b [c, q] */
  fct_mat U = fct_dense((char*)src, st->c, st->q), Y = fct_dense(dst, st->n, st->q);
  return fct_x_gemm_batched(e, &C, &U, &Y, beta, Bt, 0, st->c * st->q, st->n * st->q);
}

static void init_params(tt_plan* p, const DLTensor* const* cores) {
  const tt_shape* s = &p->s;
  for (int k = 0; k < s->d; ++k)
    fct_param_init(&p->core[k], cores[k], s->r[k] * s->in[k] * s->out[k], s->r[k + 1], true);
}

/* ------------------------------------------------------------------------- */
/* Forming W                                                                  */
/* ------------------------------------------------------------------------- */

static fct_status group_grads(const fct_exec* e, const tt_plan* p, int gi,
                              DLTensor* const* gcores, double beta, char* g0);

static fct_status fw_bind(const fct_exec* e, tt_plan* p, tt_plan* b) {
  for (int k = 0; k < p->s.d; ++k) FCT_TRY(fct_param_bind(e, &p->core[k]));
  fct_layout L;
  fw_block_plan(p, b, &L);
  return FCT_OK;
}

/* W's rows for o_1 in [a0, a0 + nb): core 0's block packed, then merged
 * with the other cores; *W = W_block [ob, in]. */
static fct_status fw_form_block(const fct_exec* e, const tt_plan* p, tt_plan* b, int64_t a0,
                                char** W) {
  const tt_shape* s = &p->s;
  int64_t ri = s->r[0] * s->in[0], o1 = s->out[0], r1 = s->r[1];
  char* c0 = fct_ws_at(e, b->off_c0);
  int64_t sh[3] = {ri, p->nb, r1}, st[3] = {o1 * r1, r1, 1};
  FCT_TRY(fct_x_permute(e, p->core[0].m.data + a0 * r1 * (int64_t)e->es, 3, sh, st, c0));
  b->core[0].m = fct_dense(c0, ri * p->nb, r1);
  FCT_TRY(build_group(e, b, 0));
  *W = fct_ws_at(e, b->grp[0].off_cmat);
  return FCT_OK;
}

static fct_status fw_forward(const fct_exec* e, tt_plan* p, const char* xb, DLTensor* y,
                             const DLTensor* bias) {
  const tt_shape* s = &p->s;
  tt_plan b;
  FCT_TRY(fw_bind(e, p, &b));
  int64_t rest = s->out_size / s->out[0];
  fct_mat X = fct_dense((char*)xb, s->M, s->in_size), Y = fct_dense(fct_data(y), s->M, s->out_size);
  if (bias)
    FCT_TRY(e->be->fill_rows(e->ctx, e->device, e->dt, &Y, fct_data(bias), fct_vector_stride(bias)));
  for (int64_t a0 = 0; a0 < s->out[0]; a0 += p->nb) {
    char* W;
    FCT_TRY(fw_form_block(e, p, &b, a0, &W));
    fct_mat Wt = fct_mat_t(fct_dense(W, p->ob, s->in_size));
    fct_mat C = {Y.data + a0 * rest * (int64_t)e->es, s->M, p->ob, s->out_size, 1};
    FCT_TRY(fct_x_gemm(e, &X, &Wt, &C, bias ? 1.0 : 0.0)); /* y[:, block] = x · W_blockᵀ */
  }
  return FCT_OK;
}

static fct_status fw_backward(const fct_exec* e, tt_plan* p, const char* xb, const char* gyb,
                              DLTensor* grad_x, DLTensor* const* grad_cores) {
  const tt_shape* s = &p->s;
  const tt_needs* n = &p->n;
  size_t es = e->es;
  tt_plan b;
  FCT_TRY(fw_bind(e, p, &b));
  int64_t rest = s->out_size / s->out[0], nblk = s->out[0] / p->nb;
  int64_t c0 = s->r[0] * s->in[0] * p->nb * s->r[1];
  fct_mat X = fct_dense((char*)xb, s->M, s->in_size);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    int64_t a0 = blk * p->nb;
    double beta = blk > 0 ? 1.0 : 0.0;
    char* W;
    FCT_TRY(fw_form_block(e, p, &b, a0, &W));
    fct_mat Gb = {(char*)gyb + a0 * rest * (int64_t)es, s->M, p->ob, s->out_size, 1};
    if (n->gx) {
      fct_mat Wb = fct_dense(W, p->ob, s->in_size);
      fct_mat Gx = fct_dense(fct_data(grad_x), s->M, s->in_size);
      FCT_TRY(fct_x_gemm(e, &Gb, &Wb, &Gx, beta)); /* grad_x += grad_y[:, block] · W_block */
    }
    if (!n->any_gcore) continue;
    fct_mat Gbt = fct_mat_t(Gb), GC = fct_ws_mat(e, b.grp[0].off_gcmat, p->ob, s->in_size);
    FCT_TRY(fct_x_gemm(e, &Gbt, &X, &GC, 0.0)); /* grad W_block = grad_y[:, block]ᵀ · x */
    char* g0 = n->gcore[0] ? fct_ws_at(e, b.off_g0) + blk * c0 * (int64_t)es : NULL;
    FCT_TRY(group_grads(e, &b, 0, grad_cores, beta, g0));
  }
  if (n->any_gcore && n->gcore[0]) { /* [blk, r_0·i_1, nb, r_1] -> [r_0·i_1, (blk, nb), r_1] */
    int64_t ri = s->r[0] * s->in[0], r1 = s->r[1];
    int64_t sh[4] = {ri, nblk, p->nb, r1}, st[4] = {p->nb * r1, c0, r1, 1};
    FCT_TRY(fct_x_permute(e, fct_ws_at(e, b.off_g0), 4, sh, st, fct_data(grad_cores[0])));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, int d,
                               const DLTensor* const* cores, const DLTensor* bias,
                               const DLTensor* y, tt_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, d, cores, &p->s));
  const char* out_what = "out: the product of the cores' output modes";
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, p->s.out_size, out_what));
  fct_mat m;
  FCT_TRY(fct_check_batched(ctx, "y", y, x, p->s.out_size, out_what));
  FCT_TRY(fct_check_contiguous_output(ctx, "y", y, p->s.M, p->s.out_size, &m));
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "x", x);
  fct_args_add_list(&a, "cores", d, cores);
  fct_args_add(&a, "bias", bias);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  p->n.pack_x = !fct_is_contiguous(x);
  p->n.check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  p->n.small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  p->n.force_contract = ctx->flags & FCT_FLAG_FORCE_CONTRACT;
  p->n.force_form_w = ctx->flags & FCT_FLAG_FORCE_FORM_W;
  init_params(p, cores);
  return make_plan(ctx, p);
}

fct_status fct_tt_linear_forward_workspace(const fct_context* ctx, const DLTensor* x, int d,
                                           const DLTensor* const* cores, const DLTensor* bias,
                                           const DLTensor* y, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tt_plan p;
  FCT_TRY(forward_plan(&c, x, d, cores, bias, y, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_tt_linear_forward(fct_context* ctx, const DLTensor* x, int d,
                                 const DLTensor* const* cores, const DLTensor* bias,
                                 DLTensor* y) {
  tt_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, d, cores, bias, y, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tt_shape* s = &p.s;
  if (s->M == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  char* xb;
  if (p.form_w) {
    FCT_TRY(fct_x_dense_base(&e, x, p.n.pack_x, p.off_x, &xb));
    FCT_TRY(fw_forward(&e, &p, xb, y, bias));
    goto check;
  }
  FCT_TRY(build_groups(&e, &p));
  FCT_TRY(fct_x_dense_base(&e, x, p.n.pack_x, p.off_x, &xb));
  int64_t bst = fct_vector_stride(bias);
  char* buf[2] = {fct_ws_at(&e, p.off_a), fct_ws_at(&e, p.off_b)};
  for (int64_t m0 = 0; m0 < s->M; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    const char* cur = xb + m0 * s->in_size * (int64_t)e.es;
    char* yrows = fct_data(y) + m0 * s->out_size * (int64_t)e.es;
    if (bias) {
      fct_mat Yc = fct_dense(yrows, Mc, s->out_size);
      FCT_TRY(e.be->fill_rows(ctx, e.device, e.dt, &Yc, fct_data(bias), bst));
    }
    for (int j = 0; j < p.G; ++j) {
      bool last = j == p.G - 1;
      char* dst = last ? yrows : buf[j & 1];
      FCT_TRY(sweep_step(&e, &p, j, Mc, cur, dst, last && bias ? 1.0 : 0.0));
      cur = dst;
    }
  }
check:
  if (p.n.check) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "x", x);
    fct_args_add_list(&a, "cores", d, cores);
    fct_args_add(&a, "bias", bias);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, a.names, a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x, int d,
                                const DLTensor* const* cores, const DLTensor* gx,
                                const DLTensor* const* gcores, const DLTensor* gb, tt_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, d, cores, &p->s));
  const tt_shape* s = &p->s;
  const char* out_what = "out: the product of the cores' output modes";
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, s->out_size, out_what));
  fct_mat m;
  if (gx) {
    FCT_TRY(fct_check_batched(ctx, "grad_x", gx, x, s->in_size, "in, the last dim of x"));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_x", gx, s->M, s->in_size, &m));
  }
  tt_needs* n = &p->n;
  n->backward = true;
  char nm[48];
  for (int k = 0; gcores && k < d; ++k) {
    if (!gcores[k]) continue;
    const char* name = fct_item_name(nm, sizeof nm, "grad_cores", k);
    FCT_TRY(fct_check_param(ctx, name, gcores[k], x, 4, "(the shape of its core)"));
    for (int i = 0; i < 4; ++i)
      if (gcores[k]->shape[i] != cores[k]->shape[i])
        return fct_fail(ctx, FCT_ERR_SHAPE,
                        "%s: expected the shape of its core [%lld, %lld, %lld, %lld]", name,
                        (long long)cores[k]->shape[0], (long long)cores[k]->shape[1],
                        (long long)cores[k]->shape[2], (long long)cores[k]->shape[3]);
    FCT_TRY(fct_check_contiguous_output(ctx, name, gcores[k], 1, 1, &m));
    n->gcore[k] = n->any_gcore = true;
  }
  if (gb) {
    FCT_TRY(fct_check_vector(ctx, "grad_bias", gb, x, s->out_size, out_what));
    FCT_TRY(fct_check_contiguous_output(ctx, "grad_bias", gb, 1, s->out_size, &m));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "grad_y", g);
  fct_args_add(&a, "x", x);
  fct_args_add_list(&a, "cores", d, cores);
  int first_out = a.n;
  fct_args_add(&a, "grad_x", gx);
  fct_args_add_list(&a, "grad_cores", d, gcores);
  fct_args_add(&a, "grad_bias", gb);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  n->gx = gx != NULL;
  n->gb = gb != NULL;
  bool work = n->gx || n->any_gcore;
  n->pack_x = n->any_gcore && !fct_is_contiguous(x);
  n->pack_g = (work || n->gb) && !fct_is_contiguous(g);
  n->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  n->small = ctx->flags & FCT_FLAG_SMALL_CHUNKS;
  n->force_contract = ctx->flags & FCT_FLAG_FORCE_CONTRACT;
  n->force_form_w = ctx->flags & FCT_FLAG_FORCE_FORM_W;
  init_params(p, cores);
  return make_plan(ctx, p);
}

fct_status fct_tt_linear_backward_workspace(const fct_context* ctx, const DLTensor* grad_y,
                                            const DLTensor* x, int d,
                                            const DLTensor* const* cores,
                                            const DLTensor* grad_x,
                                            const DLTensor* const* grad_cores,
                                            const DLTensor* grad_bias, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  tt_plan p;
  FCT_TRY(backward_plan(&c, grad_y, x, d, cores, grad_x, grad_cores, grad_bias, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

/* One chunk: recompute the states (when core gradients are asked), then walk
 * the steps backwards. Merged-core gradients accumulate (beta) over chunks. */
static fct_status backward_chunk(const fct_exec* e, const tt_plan* p, const char* xrows,
                                 const char* grows, char* gxrows, int64_t Mc, double beta) {
  const tt_needs* n = &p->n;
  int G = p->G;
  size_t es = e->es;
  char* states[FCT_MAX_MODES + 1];
  states[0] = (char*)xrows;
  char* at = fct_ws_at(e, p->off_states);
  for (int j = 1; j < G; ++j) {
    states[j] = at;
    at += Mc * p->state[j] * (int64_t)es;
  }
  if (n->any_gcore)
    for (int j = 0; j + 1 < G; ++j) FCT_TRY(sweep_step(e, p, j, Mc, states[j], states[j + 1], 0.0));

  /* Which steps still have to pass the gradient to their input. */
  bool below[FCT_MAX_MODES + 1];
  below[0] = n->gx;
  for (int j = 1; j <= G; ++j) below[j] = below[j - 1] || p->grp[p->step[j - 1].g].grad;

  char* gbuf[2] = {fct_ws_at(e, p->off_ga), fct_ws_at(e, p->off_gb)};
  const char* gy = grows;
  for (int j = G - 1; j >= 0; --j) {
    const tt_step* st = &p->step[j];
    const tt_group* gr = &p->grp[st->g];
    fct_mat C = cmat(e, p, st);
    int64_t Bt = Mc * st->B;
    if (gr->grad) {
      fct_mat GC = fct_ws_mat(e, gr->off_gcmat, st->n, st->c);
      if (single_gemm(st)) { /* gC [n, c] += gYᵀ [n, Bt] · U [Bt, c] */
        fct_mat GYt = fct_mat_t(fct_dense((char*)gy, Bt, st->n));
        fct_mat U = fct_dense(states[j], Bt, st->c);
        FCT_TRY(fct_x_gemm(e, &GYt, &U, &GC, beta));
      } else { /* gC [n, c] += Σ_b gY_b [n, q] · U_bᵀ [q, c] */
        fct_mat GY = fct_dense((char*)gy, st->n, st->q);
        fct_mat Ut = fct_mat_t(fct_dense(states[j], st->c, st->q));
        FCT_TRY(e->be->gemm_reduce(e->ctx, e->device, e->dt, &GY, &Ut, &GC, beta, Bt,
                               st->n * st->q, st->c * st->q, fct_ws_at(e, p->off_reduce),
                               p->reduce_bytes));
      }
    }
    if (!below[j]) break;
    char* dst = j == 0 ? gxrows : gbuf[j & 1];
    if (single_gemm(st)) { /* gU [Bt, c] = gY [Bt, n] · C [n, c] */
      fct_mat GY = fct_dense((char*)gy, Bt, st->n), U = fct_dense(dst, Bt, st->c);
      FCT_TRY(fct_x_gemm(e, &GY, &C, &U, 0.0));
    } else { /* gU_b [c, q] = Cᵀ [c, n] · gY_b [n, q] */
      fct_mat Ct = fct_mat_t(C), GY = fct_dense((char*)gy, st->n, st->q);
      fct_mat U = fct_dense(dst, st->c, st->q);
      FCT_TRY(fct_x_gemm_batched(e, &Ct, &GY, &U, 0.0, Bt, 0, st->n * st->q, st->c * st->q));
    }
    gy = dst;
  }
  return FCT_OK;
}

/* The member cores' gradients from a group's merged-core gradient: back
 * through the merge chain (the inverse permutes of build_group). Cores after
 * the first: beta·grad + the new one; the first core's gradient goes to g0
 * when given (forming W: one block of it), else to its output. */
static fct_status group_grads(const fct_exec* e, const tt_plan* p, int gi,
                              DLTensor* const* gcores, double beta, char* g0) {
  const tt_shape* s = &p->s;
  const tt_group* g = &p->grp[gi];
  int a = g->a;
  const char* gc = fct_ws_at(e, g->off_gcmat);
  int64_t rin = g->rin;
  if (a == g->b) {
    if (!p->n.gcore[a]) return FCT_OK;
    int64_t i = s->in[a], o = s->out[a], ro = g->rout;
    char* dst = fct_data(gcores[a]);
    int64_t sh[4] = {rin, i, o, ro};
    if (!p->ltr) { /* [r_in, o, i, r_out] */
      int64_t st[4] = {o * i * ro, ro, i * ro, 1};
      return fct_x_permute(e, gc, 4, sh, st, dst);
    }
    /* [o, r_out, r_in, i] */
    int64_t st[4] = {i, 1, ro * rin * i, rin * i};
    return fct_x_permute(e, gc, 4, sh, st, dst);
  }
  char* gp[2] = {fct_ws_at(e, p->off_gp[0]), fct_ws_at(e, p->off_gp[1])};
  const char* cur = gc;
  int w = 0;
  if (p->ltr) { /* [O, r_out, r_in, I] -> [r_in, O, I, r_out] */
    int64_t O = g->O, I = g->I, ro = g->rout;
    int64_t sh[4] = {rin, O, I, ro}, st[4] = {I, ro * rin * I, 1, rin * I};
    FCT_TRY(fct_x_permute(e, gc, 4, sh, st, gp[w]));
    cur = gp[w];
    w ^= 1;
  }
  const char* P = fct_ws_at(e, g->off_prefix);
  int64_t Oc = g->O, Ic = g->I;
  for (int k = g->b; k > a; --k) {
    bool earlier = false;
    for (int l = a; l < k; ++l) earlier = earlier || p->n.gcore[l];
    if (!p->n.gcore[k] && !earlier) break;
    int64_t r = s->r[k], ik = s->in[k], ok = s->out[k], rn = s->r[k + 1];
    Oc /= ok;
    Ic /= ik;
    /* gP_k [r_in, O', o_k, I', i_k, r'] -> gT [r_in, O', I', i_k, o_k, r'] */
    int64_t t_i = rn, t_I = ik * rn, t_o = Ic * t_I, t_O = ok * t_o, t_r = Oc * t_O;
    int64_t sh[6] = {rin, Oc, Ic, ik, ok, rn}, st[6] = {t_r, t_O, t_I, t_i, t_o, 1};
    char* gT = fct_ws_at(e, p->off_gt);
    FCT_TRY(fct_x_permute(e, cur, 6, sh, st, gT));
    int64_t rows = rin * Oc * Ic, cols = ik * ok * rn;
    fct_mat GT = fct_dense(gT, rows, cols);
    const char* Pprev = P + prefix_at(s, g, k - 1) * (int64_t)e->es;
    if (p->n.gcore[k]) { /* grad G_k [r, cols] = P_(k-1)ᵀ · gT */
      fct_mat Pt = fct_mat_t(fct_dense((char*)Pprev, rows, r));
      fct_mat C = fct_dense(fct_data(gcores[k]), r, cols);
      FCT_TRY(fct_x_gemm(e, &Pt, &GT, &C, beta));
    }
    if (!earlier) break;
    /* gP_(k-1) [rows, r] = gT · G_kᵀ */
    fct_mat Gkt = fct_mat_t(fct_dense(p->core[k].m.data, r, cols));
    fct_mat C = fct_dense(gp[w], rows, r);
    FCT_TRY(fct_x_gemm(e, &GT, &Gkt, &C, 0.0));
    cur = gp[w];
    w ^= 1;
    if (k - 1 == a && p->n.gcore[a]) { /* gP_a [r_in, o, i, r] -> [r_in, i, o, r] */
      int64_t i = s->in[a], o = s->out[a], r1 = s->r[a + 1];
      int64_t sh4[4] = {rin, i, o, r1}, st4[4] = {o * i * r1, r1, i * r1, 1};
      FCT_TRY(fct_x_permute(e, cur, 4, sh4, st4, g0 ? g0 : fct_data(gcores[a])));
    }
  }
  return FCT_OK;
}

fct_status fct_tt_linear_backward(fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
                                  int d, const DLTensor* const* cores, DLTensor* grad_x,
                                  DLTensor* const* grad_cores, DLTensor* grad_bias) {
  tt_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, x, d, cores, grad_x, (const DLTensor* const*)grad_cores,
                    grad_bias, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const tt_shape* s = &p.s;
  const tt_needs* n = &p.n;
  bool work = n->gx || n->any_gcore;
  if (!work && !n->gb) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (n->check && s->M > 0)
    FCT_TRY(fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "tt_linear"));
  char *xb = NULL, *gb = NULL;
  FCT_TRY(fct_x_dense_base(&e, grad_y, n->pack_g, p.off_g, &gb));
  if (n->gb) {
    fct_mat G = fct_dense(gb, s->M, s->out_size);
    FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, &G, fct_data(grad_bias)));
  }
  if (!work) return FCT_OK;
  if (s->M == 0) {
    for (int k = 0; k < s->d; ++k) {
      if (!n->gcore[k]) continue;
      fct_mat G = fct_dense(fct_data(grad_cores[k]), s->r[k] * s->in[k] * s->out[k], s->r[k + 1]);
      FCT_TRY(e.be->zero(ctx, e.device, e.dt, &G));
    }
    return FCT_OK;
  }
  if (n->any_gcore) FCT_TRY(fct_x_dense_base(&e, x, n->pack_x, p.off_x, &xb));
  if (p.form_w) {
    FCT_TRY(fw_backward(&e, &p, xb, gb, grad_x, grad_cores));
    goto check;
  }
  FCT_TRY(build_groups(&e, &p));
  for (int64_t m0 = 0; m0 < s->M; m0 += p.Mc) {
    int64_t Mc = s->M - m0 < p.Mc ? s->M - m0 : p.Mc;
    char* gx = grad_x ? fct_data(grad_x) + m0 * s->in_size * (int64_t)e.es : NULL;
    const char* xr = xb ? xb + m0 * s->in_size * (int64_t)e.es : NULL;
    FCT_TRY(backward_chunk(&e, &p, xr, gb + m0 * s->out_size * (int64_t)e.es, gx, Mc,
                       m0 > 0 ? 1.0 : 0.0));
  }
  for (int g = 0; g < p.G; ++g)
    if (p.grp[g].grad) FCT_TRY(group_grads(&e, &p, g, grad_cores, 0.0, NULL));
check:
  if (n->check && grad_x) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "grad_y", grad_y);
    fct_args_add(&a, "x", x);
    fct_args_add_list(&a, "cores", d, cores);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "grad_x", grad_x, a.names,
                         a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan report                                                                */
/* ------------------------------------------------------------------------- */

fct_status fct_tt_linear_plan(int d, const int64_t* in_modes, const int64_t* out_modes,
                              const int64_t* ranks, int64_t batch, DLDevice device,
                              DLDataType dtype, fct_linear_plan_info* info) {
  if (!info || !in_modes || !out_modes || !ranks) return FCT_ERR_NULL_ARGUMENT;
  if (d < 1 || d > FCT_MAX_MODES || batch < 0 || fct_dtype_of(dtype) == FCT_DTYPE_INVALID ||
      ranks[0] != 1 || ranks[d] != 1)
    return FCT_ERR_INVALID_VALUE;
  tt_plan pf, pb;
  memset(&pf, 0, sizeof pf);
  tt_shape* s = &pf.s;
  s->d = d;
  s->in_size = s->out_size = 1;
  for (int k = 0; k <= d; ++k) {
    if (ranks[k] < 1) return FCT_ERR_SHAPE;
    s->r[k] = ranks[k];
  }
  for (int k = 0; k < d; ++k) {
    if (in_modes[k] < 1 || out_modes[k] < 1) return FCT_ERR_SHAPE;
    s->in[k] = in_modes[k];
    s->out[k] = out_modes[k];
    /* The ops' bounds (check_shape), so the plan's products fit int64. */
    int64_t csz;
    if (__builtin_mul_overflow(s->in_size, in_modes[k], &s->in_size) ||
        __builtin_mul_overflow(s->out_size, out_modes[k], &s->out_size) ||
        !fct_fits_int(s->in_size) || !fct_fits_int(s->out_size) ||
        __builtin_mul_overflow(ranks[k], in_modes[k], &csz) ||
        __builtin_mul_overflow(csz, out_modes[k], &csz) ||
        __builtin_mul_overflow(csz, ranks[k + 1], &csz) || !fct_fits_int(csz))
      return FCT_ERR_OVERFLOW;
  }
  if (!fct_fits_int(batch)) return FCT_ERR_OVERFLOW;
  s->M = batch;
  s->es = fct_dtype_bytes(fct_dtype_of(dtype));
  s->cuda = device.device_type == kDLCUDA;
  pb = pf;
  pb.n.backward = pb.n.gx = pb.n.gb = pb.n.any_gcore = true;
  for (int k = 0; k < d; ++k) pb.n.gcore[k] = true;
  FCT_TRY(make_plan(NULL, &pf));
  FCT_TRY(make_plan(NULL, &pb));
  memset(info, 0, sizeof *info);
  info->forward_flops = pf.flops;
  info->backward_flops = pb.flops;
  info->forward_workspace = pf.bytes;
  info->backward_workspace = pb.bytes;
  char f[112], b[112];
  describe(&pf, f, sizeof f);
  describe(&pb, b, sizeof b);
  snprintf(info->plan, sizeof info->plan, "tt forward: %s; backward: %s", f, b);
  /* The chains stay described (factorch/_decomp.py mirrors the forward's
   * groups); forming W, where taken, is said after them. */
  if (pf.form_w || pb.form_w) {
    tt_plan* w = pf.form_w ? &pf : &pb;
    size_t len = strlen(info->plan);
    snprintf(info->plan + len, sizeof info->plan - len,
             "; instead W formed in blocks of %lld rows (%s)", (long long)w->ob,
             pf.form_w && pb.form_w ? "forward and backward" : pf.form_w ? "forward" : "backward");
  }
  snprintf(info->forward_strategy, sizeof info->forward_strategy, "%s",
           pf.form_w ? "form_w" : "contract");
  snprintf(info->backward_strategy, sizeof info->backward_strategy, "%s",
           pb.form_w ? "form_w" : "contract");
  return FCT_OK;
}
