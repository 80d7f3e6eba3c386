/* bert_forward.c's attention of one (sequence, head) over a range of its queries: attend(), on the tile unit or
   its AVX-512 BF16 / C forms in bf16 (amx.c's amx_attend), else in fp32 on the matmul kernels (K and V^T packed
   per job). Included by bert_forward.c after its context (ctx_t, xq_at). */
#pragma once

static __thread float* tl_buf;   /* per thread: one head's Q, K, V and scores (op_attend) */
static __thread int64_t tl_cap;
#ifdef __AVX2__
#define PACKED 1   /* K and V^T in packed.c's float layout: the GEMM tiles (16 rows x 6 tokens) run them */
#else
#define PACKED 0   /* the scalar build: row-major, as its matmul_rows takes float weights */
#endif

#if PACKED
static inline void transpose8(__m256* r) {  /* an 8 x 8 block of floats, rows <-> columns */
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* one head's Q (L, HD: (q + bq) * scale), K (packed: 8 keys interleaved, value d of key j at
   (j / 8) * 8 * HD + 8 * d + j % 8, padded keys zero) and V^T (packed: dims d..d+7 of key j at
   (d / 8) * 8 * Lp + 8 * j, padded keys zero) from the head's qkv rows r (q at r, k at r + D, v at r + 2D;
   row stride 3D): the scalar loop's sums and products, 8 lanes at a time, K transposed 8 x 8 in registers */
static void pack_qkv(const float* r, int D, const float* bq, const float* bk, const float* bv, float scale,
                     int L, int Lp, int HD, float* Q, float* K, float* V) {
    const __m256 vs = _mm256_set1_ps(scale), z = _mm256_setzero_ps();
    const int64_t ld = 3 * (int64_t)D;
    for (int j = 0; j < Lp; j++)
        for (int d = 0; d < HD; d += 8) {
            float* v = V + (int64_t)(d / 8) * 8 * Lp + 8 * j;
            if (j >= L) { _mm256_storeu_ps(v, z); continue; }
            const float* q = r + j * ld + d;
            _mm256_storeu_ps(Q + (int64_t)j * HD + d,
                             _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(bq + d)), vs));
            _mm256_storeu_ps(v, _mm256_add_ps(_mm256_loadu_ps(q + 2 * D), _mm256_loadu_ps(bv + d)));
        }
    for (int j0 = 0; j0 < L; j0 += 8)
        for (int d = 0; d < HD; d += 8) {
            __m256 k[8];
            for (int i = 0; i < 8; i++)
                k[i] = j0 + i >= L ? z : _mm256_add_ps(_mm256_loadu_ps(r + (j0 + i) * ld + D + d),
                                                       _mm256_loadu_ps(bk + d));
            transpose8(k);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(K + (int64_t)j0 * HD + 8 * (d + i), k[i]);
        }
}
#endif

/* one (sequence, head), queries [qa, qb) of its L: S = Q K^T (Q scaled), softmax by rows, att = S V: two small
   GEMMs on the matmul kernels, K and V^T packed per job (L <= 512: they stay in L2). The rows go to att from row
   `dst` on (query qa's; its token's row but in the last layer of first_only) (and, bf16 matrices taking the
   output straight from the tiles, to their xq rows in the region of the part whose first token is `base`:
   op_quant_att is skipped then). */
static void attend(const ctx_t* c, int64_t sq, int h, int qa, int qb, int64_t base, int64_t dst) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim;
    const int64_t t0 = c->start[sq];
    const int L = (int)(c->start[sq + 1] - t0), Lp = (L + 7) / 8 * 8;
    if (L <= 0 || qa >= qb) return;
    const float *bq = c->w->bqkv + h * HD, *bk = bq + D, *bv = bk + D, scale = 1.f / sqrtf((float)HD);
    float* out = c->s->att + dst * D + h * HD;
    uint16_t* outb = m->act == ACT_BF16 ? (uint16_t*)xq_at(c, D, base, dst) + h * HD : NULL;
    if (m->attn == ATTN_BF16_TILES &&
        amx_attend(c->qkv + t0 * 3 * D + h * HD, 3 * D, D, bq, bk, bv, scale, L, qa, qb, HD, out, outb, D))
        return;
    const int64_t need = 3 * (int64_t)Lp * HD + (int64_t)L * Lp;
    if (tl_cap < need) { free(tl_buf); tl_buf = malloc(sizeof(float) * need); tl_cap = need; }
    float *Q = tl_buf, *K = Q + (int64_t)Lp * HD, *V = K + (int64_t)Lp * HD, *S = V + (int64_t)Lp * HD;
#if PACKED
    pack_qkv(c->qkv + t0 * 3 * D + h * HD, D, bq, bk, bv, scale, L, Lp, HD, Q, K, V);
#else
    memset(K, 0, sizeof(float) * 2 * Lp * HD);  /* padded keys: zero rows (their scores are never read) */
    for (int j = 0; j < L; j++) {  /* row-major Q and K, V^T (HD, Lp) */
        const float* r = c->qkv + (t0 + j) * 3 * D + h * HD;
        for (int d = 0; d < HD; d++) {
            Q[j * HD + d] = (r[d] + bq[d]) * scale;
            K[(int64_t)j * HD + d] = r[D + d] + bk[d];
            V[(int64_t)d * Lp + j] = r[2 * D + d] + bv[d];
        }
    }
#endif
    const int nq = qb - qa;
    const mat Km = {T_F32, PACKED, (const uint8_t*)K, L, HD, HD * 4};
    matmul_rows(&Km, 0, L, 0, Q + (int64_t)qa * HD, nq, S, Lp, 0);  /* S[i][j] = <q_i, k_j> / sqrt(hd) */
    for (int i = 0; i < nq; i++) {
        float* s = S + (int64_t)i * Lp;
        vscale(s, 1.f / exp_shift(s, L, vmax(s, L)), L);
        for (int j = L; j < Lp; j++) s[j] = 0.f;
    }
    const mat Vm = {T_F32, PACKED, (const uint8_t*)V, HD, Lp, (int64_t)Lp * 4};
    matmul_rows(&Vm, 0, HD, 0, S, nq, out, D, 0);  /* att_i = sum_j s_ij v_j */
}
