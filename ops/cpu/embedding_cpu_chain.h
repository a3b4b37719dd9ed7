/*
 * embedding_cpu_chain.h (internal): the TT embedding chains of one element
 * type, included by embedding_cpu.c once per type with
 *   T   the element (and accumulation) type: float or double
 *   SUF a suffix for the function names: f32 or f64
 * Geometry and workspace: fct_tt_emb_geom (backend.h). Small products (the
 * usual TT-Rec ranks: a few thousand multiply-adds) run as plain loops whose
 * innermost loop runs along contiguous memory; large ones (from
 * FCT_CHAIN_BLAS multiply-adds, e.g. [16, 159]·[159, 2544] for a Llama-2
 * table at 10x) through fct_cpu_gemm, which was 5-10x faster there. Inside
 * the pool's per-index tasks that GEMM runs serially; for a single index it
 * splits over the threads.
 */
#define FCT_CAT_(a, b) a##_##b
#define FCT_CAT(a, b) FCT_CAT_(a, b)
#define FN(name) FCT_CAT(name, SUF)
#define FCT_CHAIN_DT (sizeof(T) == 4 ? FCT_F32 : FCT_F64)
#ifndef FCT_CHAIN_BLAS
#define FCT_CHAIN_BLAS ((int64_t)1 << 15)
#endif

/* out [D, C] = S [D, r] · A [r, C], A's rows rs apart. */
static void FN(chain_mul)(const T* S, const T* A, int64_t rs, int64_t D, int64_t r, int64_t C,
                          T* out) {
  if (D * r * C >= FCT_CHAIN_BLAS) {
    fct_mat mS = {(char*)S, D, r, r, 1}, mA = {(char*)A, r, C, rs, 1}, mO = {(char*)out, D, C, C, 1};
    fct_cpu_gemm(FCT_CHAIN_DT, &mS, &mA, &mO, 0.0);
    return;
  }
  for (int64_t x = 0; x < D; ++x) {
    T* o = out + x * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0;
    for (int64_t a = 0; a < r; ++a) {
      T s = S[x * r + a];
      const T* arow = A + a * rs;
      for (int64_t c = 0; c < C; ++c) o[c] += s * arow[c];
    }
  }
}

/* gA [r, C] = S [D, r]ᵀ · gS [D, C] */
static void FN(chain_mul_tn)(const T* S, const T* gS, int64_t D, int64_t r, int64_t C, T* gA) {
  if (D * r * C >= FCT_CHAIN_BLAS) {
    fct_mat mSt = fct_mat_t((fct_mat){(char*)S, D, r, r, 1});
    fct_mat mG = {(char*)gS, D, C, C, 1}, mO = {(char*)gA, r, C, C, 1};
    fct_cpu_gemm(FCT_CHAIN_DT, &mSt, &mG, &mO, 0.0);
    return;
  }
  for (int64_t t = 0; t < r * C; ++t) gA[t] = 0;
  for (int64_t x = 0; x < D; ++x) {
    const T* g = gS + x * C;
    for (int64_t a = 0; a < r; ++a) {
      T s = S[x * r + a];
      T* o = gA + a * C;
      for (int64_t c = 0; c < C; ++c) o[c] += s * g[c];
    }
  }
}

/* out [D, r] = gS [D, C] · A [r, C]ᵀ, A's rows rs apart. */
static void FN(chain_mul_nt)(const T* gS, const T* A, int64_t rs, int64_t D, int64_t r, int64_t C,
                             T* out) {
  if (D * r * C >= FCT_CHAIN_BLAS) {
    fct_mat mG = {(char*)gS, D, C, C, 1}, mO = {(char*)out, D, r, r, 1};
    fct_mat mAt = fct_mat_t((fct_mat){(char*)A, r, C, rs, 1});
    fct_cpu_gemm(FCT_CHAIN_DT, &mG, &mAt, &mO, 0.0);
    return;
  }
  for (int64_t x = 0; x < D; ++x) {
    const T* g = gS + x * C;
    for (int64_t a = 0; a < r; ++a) {
      const T* arow = A + a * rs;
      T s = 0;
      for (int64_t c = 0; c < C; ++c) s += g[c] * arow[c];
      out[x * r + a] = s;
    }
  }
}

/* Core k's slice for index i: G_k[:, i_k, :, :] as [r[k], m[k]·r[k+1]], its
 * rows *rs = n[k]·m[k]·r[k+1] elements apart. */
static const T* FN(chain_slice)(const fct_tt_emb_geom* g, int k, int64_t i, int64_t* rs) {
  int64_t C = g->m[k] * g->r[k + 1];
  *rs = g->n[k] * C;
  return (const T*)g->core[k] + ((i / g->div[k]) % g->n[k]) * C;
}

/* y rows [b, e) (row j: dim elements) = the TT rows of idx[j]. The first
 * state S_1 = G_0[0, i_0] is read in place (r[0] = 1 makes it contiguous);
 * the later ones alternate between index j's two work buffers, the last
 * product lands in y. */
static void FN(chain_rows)(const fct_tt_emb_geom* g, const int64_t* idx, int64_t b, int64_t e,
                           T* y, T* work) {
  const int d = g->d;
  for (int64_t j = b; j < e; ++j) {
    T* row = y + j * g->dim;
    int64_t i = idx[j], rs;
    if (i < 0) {
      for (int64_t o = 0; o < g->dim; ++o) row[o] = 0;
      continue;
    }
    T* buf[2] = {work + j * g->fwd_work, work + j * g->fwd_work + g->max_state};
    const T* S = FN(chain_slice)(g, 0, i, &rs);
    if (d == 1) {
      memcpy(row, S, (size_t)g->dim * sizeof(T));
      continue;
    }
    for (int k = 1; k < d; ++k) {
      const T* A = FN(chain_slice)(g, k, i, &rs);
      T* out = k == d - 1 ? row : buf[k & 1];
      FN(chain_mul)(S, A, rs, g->D[k], g->r[k], g->m[k] * g->r[k + 1], out);
      S = out;
    }
  }
}

/* slices rows [b, e) (row j: g->slices elements) = the gradients of the
 * slices index j used, given gy rows (dim elements each). Forward again,
 * keeping S_2..S_(d-1) in index j's work (S_1 is read from core 0), then
 * back: gA_k = S_kᵀ · gS, gS <- gS · A_kᵀ, alternating two buffers. */
static void FN(chain_grad)(const fct_tt_emb_geom* g, const int64_t* idx, int64_t b, int64_t e,
                           const T* gy, T* slices, T* work) {
  const int d = g->d;
  for (int64_t j = b; j < e; ++j) {
    int64_t i = idx[j], rs;
    if (i < 0) continue;
    T* states = work + j * g->bwd_work;
    T* gbuf[2] = {states + g->states, states + g->states + g->gbuf};
    T* sl = slices + j * g->slices;
    const T* S[FCT_MAX_MODES];
    S[0] = NULL; /* S_0 = [1]: never read */
    if (d > 1) S[1] = FN(chain_slice)(g, 0, i, &rs);
    for (int k = 1; k < d - 1; ++k) {
      T* out = states + g->state_off[k + 1];
      const T* A = FN(chain_slice)(g, k, i, &rs);
      FN(chain_mul)(S[k], A, rs, g->D[k], g->r[k], g->m[k] * g->r[k + 1], out);
      S[k + 1] = out;
    }
    const T* gS = gy + j * g->dim; /* gS_d [D[d-1], m[d-1]] */
    int cur = 0;
    for (int k = d - 1; k >= 0; --k) {
      int64_t C = g->m[k] * g->r[k + 1];
      T* gA = sl + g->slice_off[k];
      if (k == 0) { /* D[0] = r[0] = 1: the slice gradient is gS itself */
        memcpy(gA, gS, (size_t)C * sizeof(T));
        break;
      }
      FN(chain_mul_tn)(S[k], gS, g->D[k], g->r[k], C, gA);
      const T* A = FN(chain_slice)(g, k, i, &rs);
      FN(chain_mul_nt)(gS, A, rs, g->D[k], g->r[k], C, gbuf[cur]);
      gS = gbuf[cur];
      cur ^= 1;
    }
  }
}

#undef FN
#undef FCT_CHAIN_DT
#undef FCT_CAT
#undef FCT_CAT_
