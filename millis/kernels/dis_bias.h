/* DeBERTa's disentangled attention terms as a dense bias for attend() (bert_attend.h; included after its buffers'
   helpers). Query i's score of key k adds
       C[i][c] + P[k][c],   c = dis_at[i - k] (the clamped relative-position bucket: a row of the layer's tables)
   with C[i][c] = q_i . pk[c] (c2p) and P[k][c] = k_k . pq[c] (p2c), pk and pq a head's (rows, hd) tables (times the
   scores' scale, millis/encoder/deberta.py). Both are small fp32 GEMMs on the packed tables, per block of 8 queries
   (C) or keys (P) over the table rows the block's distances reach (the job's 8 + L (C) or 8 + its queries (P) rows,
   rounded out to whole groups of the packed tables: 8 rows, the int8 tables' 32-row panels; a GEMM over every row
   the job reaches did 1.5x (C) and 3x (P) the needed products at the token split's 64 queries of 128 keys).
   Gathers along c = at[i - k] walk diagonals of C and P; laid out so that each walk is a run of addresses:
   - P is written with rows one float longer than its width (row k at k (W + 1)): P[k][c] for c = S + i - k (the
     exact buckets) is then at k W + S + i, a run over the queries i of a key: the bias's row of key k, copied;
   - C's row i over the keys k is a (backward) run at fixed i; it is added into the key rows in 16 x 16 tiles.
   With the int8 attention the tables are int8 rows with a scale each (T_Q8_ROW) and the q / k rows go as 8-bit
   rows with a scale each: the products on VNNI's (or AVX2's) integer dot products, as the scores' own. */
#pragma once

/* n rows of HD values (row i at src + i ld, plus b) -> x (fp32, HD apart) and, where xq (int8 tables), its 8-bit
   activation rows (HD / 32 blocks a row, one scale a row) */
static void dis_rows(const float* src, int64_t ld, const float* b, int n, int HD, int type, float* x, xblock* xq) {
    for (int i = 0; i < n; i++) {
        float* r = x + (int64_t)i * HD;
        for (int d = 0; d < HD; d++) r[d] = src[(int64_t)i * ld + d] + b[d];
        if (xq) quantize_act(type, r, HD, xq + (int64_t)i * (HD / QK));  /* (a row type: the row's amax, one scale) */
    }
}

static __thread void* tl_dis;    /* per thread: dis_bias's buffers */
static __thread int64_t tl_dis_cap;

/* The bias of queries [qa, qb) of (sequence sq, head h) over its L keys, as attend's relb with relk (returned): key
   k's row of ldb floats, query qa's first (rows to L rounded up to 8, columns to 16: the lane blocks read them). */
static const float* dis_bias(const ctx_t* c, int64_t sq, int h, int qa, int qb, int64_t* relk) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim, nq = qb - qa;
    const int64_t t0 = c->start[sq];
    const int L = (int)(c->start[sq + 1] - t0), L8 = (L + 7) / 8 * 8, ldb = (nq + 15) / 16 * 16;
    const int32_t* at = m->dis_at + m->max_pos - 1;  /* at[i - k] */
    const int type = ((m->dis & 1) ? c->w->pk : c->w->pq)[h].type, q8 = !is_float_type(type);
    /* a product's rows run over whole groups of the packed tables: 8 rows (fp32), 32 (the row types' panels) */
    const int g = q8 ? 32 : 8;
    const int lo = at[qa - (L - 1)] / g * g, top = at[qb - 1] / g * g + g;
    const int hi = top < m->dis_rows ? top : m->dis_rows, W = hi - lo;
    const int64_t nb = (int64_t)L8 * ldb, nx = (int64_t)(L > nq ? L : nq) * HD;
    const int64_t nc = (m->dis & 1) ? (int64_t)nq * W : 0, np = (m->dis & 2) ? (int64_t)L * (W + 1) : 0;
    const int64_t floats = nb + nx + nc + np, xb = q8 ? nx / QK * (int64_t)sizeof(xblock) : 0;
    float* bt = pool_buffer(&tl_dis, &tl_dis_cap, (int64_t)sizeof(float) * floats + xb + 64);
    float *x = bt + nb, *cq = x + nx, *pc = cq + nc;  /* x: q or k rows; C (row i at i W); P (row k at k (W + 1)) */
    xblock* xq = q8 ? (xblock*)(((uintptr_t)(bt + floats) + 63) & ~(uintptr_t)63) : NULL;
    const float *rows = c->qkv + t0 * 3 * D + h * HD, *bq = c->w->bqkv + h * HD, *bk = bq + D;
    const int64_t xs = HD / QK;  /* xq's blocks a row */
    if (m->dis & 1) {  /* c2p: the queries (biased) against pk, 8 at a time (Y's column n at n - lo) */
        dis_rows(rows + (int64_t)qa * 3 * D, 3 * D, bq, nq, HD, type, x, xq);
        for (int i0 = 0; i0 < nq; i0 += 8) {
            const int i1 = i0 + 8 < nq ? i0 + 8 : nq, e = at[qa + i1 - 1] / g * g + g;
            matmul_rows(&c->w->pk[h], at[qa + i0 - (L - 1)] / g * g, e < hi ? e : hi, xq ? xq + i0 * xs : NULL,
                        x + (int64_t)i0 * HD, i1 - i0, cq + (int64_t)i0 * W - lo, W, 0);
        }
    }
    if (m->dis & 2) {  /* p2c: the keys (biased) against pq, 8 at a time */
        dis_rows(rows + D, 3 * D, bk, L, HD, type, x, xq);
        for (int k0 = 0; k0 < L; k0 += 8) {
            const int k1 = k0 + 8 < L ? k0 + 8 : L, e = at[qb - 1 - k0] / g * g + g;
            matmul_rows(&c->w->pq[h], at[qa - (k1 - 1)] / g * g, e < hi ? e : hi, xq ? xq + k0 * xs : NULL,
                        x + (int64_t)k0 * HD, k1 - k0, pc + (int64_t)k0 * (W + 1) - lo, W + 1, 0);
        }
    }
    for (int k = 0; k < L8; k++) {  /* key k's row: P's run (or zeros), zeros past the queries and the keys */
        float* b = bt + (int64_t)k * ldb;
        int i = 0;
        if ((m->dis & 2) && k < L) {
            const float* p = pc + (int64_t)k * (W + 1) - lo;
            const int32_t* ak = at + qa - k;  /* ak[i]: query qa + i's row for key k */
            for (; i < nq; i++) b[i] = p[ak[i]];
        }
        for (; i < ldb; i++) b[i] = 0.f;
    }
    if (m->dis & 1)  /* C's runs over the keys, added into the key rows a 16 x 16 tile at a time */
        for (int i0 = 0; i0 < nq; i0 += 16)
            for (int k0 = 0; k0 < L; k0 += 16)
                for (int i = i0; i < i0 + 16 && i < nq; i++) {
                    const float* r = cq + (int64_t)i * W - lo;
                    const int32_t* ai = at + qa + i;  /* ai[-k]: query qa + i's row for key k */
                    for (int k = k0; k < k0 + 16 && k < L; k++) bt[(int64_t)k * ldb + i] += r[ai[-k]];
                }
    *relk = ldb;
    return bt - qa;
}
