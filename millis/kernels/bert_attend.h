/* bert_forward.c's attention of one (sequence, head) over a range of its queries: attend(), in int8 on AVX-512
   VNNI or AVX2 vectors (amx.c's attend_int8), in bf16 on the tile unit, on AVX-512 BF16 vectors or in C
   (amx_attend), else in fp32: queries in vector lanes on the SIMD builds (f32_attend.h), two small GEMMs on the
   scalar build's matmul_rows; and the token split's packing of each part's keys and values. Included by
   bert_forward.c after its context (ctx_t, xq_at). */
#pragma once
#include "kv8_layout.h"

static __thread void* tl_buf;    /* per thread: the fp32 attention's buffers (op_attend; pool_buffer) */
static __thread int64_t tl_cap;  /* bytes */
#ifdef __AVX2__
#include "f32_attend.h"  /* attend_f32_lanes */
#define LANES_F32 1
#else
#define LANES_F32 0
#endif

/* head h's packed keys (K: krows rows of HD bf16) and values (V: krows / 2 rows of HD dwords) in a kv buffer */
static uint16_t* kv_keys(const ctx_t* c, uint8_t* kv, int h) {
    return (uint16_t*)kv + (int64_t)h * c->krows * c->m->head_dim;
}
static uint32_t* kv_values(const ctx_t* c, uint8_t* kv, int h) {
    const int64_t HD = c->m->head_dim;
    return (uint32_t*)(kv + (int64_t)c->m->n_heads * c->krows * HD * 2) + (int64_t)h * (c->krows / 2) * HD;
}

/* int8 (i8_attend.h): head h's kq (krows rows of HD bytes), vq (krows / KV8_PER_DWORD rows of HD dwords:
   kv8_layout.h), and its scales: sk, log2 sv, 1 / sv (krows floats each, one after the other) */
static uint8_t* kv8_keys(const ctx_t* c, uint8_t* kv, int h) { return kv + (int64_t)h * c->krows * c->m->head_dim; }
static uint32_t* kv8_values(const ctx_t* c, uint8_t* kv, int h) {
    const int64_t HD = c->m->head_dim;
    return (uint32_t*)(kv + (int64_t)c->m->n_heads * c->krows * HD) + (int64_t)h * (c->krows / KV8_PER_DWORD) * HD;
}
static float* kv8_scales(const ctx_t* c, uint8_t* kv, int h) {
    const int64_t keys = (int64_t)c->m->n_heads * c->krows * c->m->head_dim;  /* bytes of kq; vq's: 4 / KV8 times */
    return (float*)(kv + keys + keys * 4 / KV8_PER_DWORD) + (int64_t)h * 3 * c->krows;
}

/* keys packed together, sharing a V row: a quad (int8, i8_attend.h), a pair (bf16, vec_attend.h) */
static int kv_unit(const bert_w* m) { return m->attn == ATTN_INT8 ? 4 : 2; }

/* the part's tokens [t0, t1) of the layer whose qkv rows and biases these are, packed into kv for every head: key
   j of sequence s at row koff[s] + j; a pair (bf16) or quad (int8) of keys shares a V row, so parts start at whole
   units (split_tokens) */
static void part_pack_kv(const ctx_t* c, int64_t t0, int64_t t1, const float* qkv, const float* bqkv, uint8_t* kv) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim, unit = kv_unit(m);
    int64_t sq = 0;
    while (sq < c->n_seq && c->start[sq + 1] <= t0) sq++;
    for (; sq < c->n_seq && c->start[sq] < t1; sq++) {
        const int64_t s0 = c->start[sq], s1 = c->start[sq + 1], a = t0 > s0 ? t0 : s0, b = t1 < s1 ? t1 : s1;
        for (int64_t t = a; t < b; t += unit) {
            const int64_t row = c->koff[sq] + t - s0;  /* a multiple of unit */
            const float* x = qkv + t * 3 * D;
            for (int h = 0; h < m->n_heads; h++) {
                const float *bk = bqkv + D + h * HD, *bv = bqkv + 2 * D + h * HD;
                if (unit == 4) {
                    /* the next quad's keys and values of this head, from L2 meanwhile (the qkv matrix wrote them;
                       bge-small b1xs128, Zen 4: 0.995x the forward's time) */
                    for (int64_t e = t + 4; e < t + 8 && e < b; e++)
                        for (int o = 0; o < HD; o += 16) {
                            __builtin_prefetch(qkv + e * 3 * D + D + h * HD + o);
                            __builtin_prefetch(qkv + e * 3 * D + 2 * D + h * HD + o);
                        }
                    /* and the lines they pack into, for writing: the other part's attention read them a layer ago,
                       so each write first takes them from that core (Zen 4 VM, in spells where the two vCPUs sat
                       far apart, the packing took 0.19 -> 0.62 ms a forward; bge-small b1xs128 0.98x then) */
                    if (t + 4 < b) {
                        const uint8_t* dk = kv8_keys(c, kv, h) + (row + 4) * HD;
                        const uint8_t* dv =
                            (const uint8_t*)(kv8_values(c, kv, h) + (row + 4) / KV8_PER_DWORD * HD);
                        for (int o = 0; o < 4 * HD; o += 64) __builtin_prefetch(dk + o, 1);
                        for (int o = 0; o < 16 * HD / KV8_PER_DWORD; o += 64) __builtin_prefetch(dv + o, 1);
                        if ((row + 4) % 16 == 0)  /* sk, log2 sv, 1 / sv: 16 keys a line */
                            for (int i = 0; i < 3; i++) __builtin_prefetch(kv8_scales(c, kv, h) + i * c->krows + row + 4, 1);
                    }
                    float* sc = kv8_scales(c, kv, h) + row;
                    kv8_pack_quad(x + h * HD, 3 * D, D, bk, bv, b - t < 4 ? (int)(b - t) : 4, HD,
                                  kv8_keys(c, kv, h) + row * HD, kv8_values(c, kv, h) + row / KV8_PER_DWORD * HD, sc,
                                  sc + c->krows, sc + 2 * c->krows);
                } else {
                    kv_pack_pair(x + h * HD, 3 * D, D, bk, bv, t + 1 < b, HD, kv_keys(c, kv, h) + row * HD,
                                 kv_values(c, kv, h) + row / 2 * HD);
                }
            }
        }
    }
}

#include "dis_bias.h"  /* dis_bias: DeBERTa's position terms as a dense bias */

/* keys [k0, k0 + L) of sequence sq against its queries [k0 + qa, k0 + qb) (qa, qb counted from k0; k0 a multiple
   of 8: the packed keys' units and kq's 8-key reads), rows to out / outb; relb[q + k relk] with q and k from k0 too
   (a relative table reads the same entries: q - k is unchanged) */
static void attend_keys(const ctx_t* c, int64_t sq, int h, int k0, int L, int qa, int qb, float* out, uint16_t* outb,
                        const float* relb, int64_t relk) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim;
    const int64_t t0 = c->start[sq] + k0, koff = c->koff ? c->koff[sq] + k0 : 0;
    const float *bq = c->w->bqkv + h * HD, *bk = bq + D, *bv = bk + D;
    const float scale = m->qk_scale > 0 ? m->qk_scale : 1.f / sqrtf((float)HD);
    const float* rows = c->qkv + t0 * 3 * D + h * HD;  /* the keys' q rows (k D values on, v 2D) */
    if (c->kv && m->attn == ATTN_INT8) {
        const float* sc = kv8_scales(c, c->kv, h) + koff;
        kv8_attend(kv8_keys(c, c->kv, h) + koff * HD,
                   kv8_values(c, c->kv, h) + koff / KV8_PER_DWORD * HD, sc,
                   sc + c->krows, sc + 2 * c->krows, rows, 3 * D, bq, scale, L, qa, qb, HD, out, outb, D, relb,
                   relk);
        return;
    }
    if (c->kv) {
        kv_attend(kv_keys(c, c->kv, h) + koff * HD, kv_values(c, c->kv, h) + koff / 2 * HD, rows,
                  3 * D, bq, scale, L, qa, qb, HD, out, outb, D);
        return;
    }
    if (m->attn == ATTN_INT8 && attend_int8(rows, 3 * D, D, bq, bk, bv, scale, L, qa, qb, HD, out, outb, D, relb,
                                            relk))
        return;
    if (m->attn == ATTN_BF16_TILES && amx_attend(rows, 3 * D, D, bq, bk, bv, scale, L, qa, qb, HD, out, outb, D))
        return;
#if LANES_F32
    const int64_t need = f32_lanes_floats(L, HD);
#else
    const int Lp = (L + 7) / 8 * 8;
    const int64_t need = 3 * (int64_t)Lp * HD + (int64_t)L * Lp;
#endif
    float* buf = pool_buffer(&tl_buf, &tl_cap, (int64_t)sizeof(float) * need);
#if LANES_F32
    attend_f32_lanes(rows, 3 * D, D, bq, bk, bv, scale, L, qa, qb, HD, out, D, buf, relb, relk);
#else
    float *Q = buf, *K = Q + (int64_t)Lp * HD, *V = K + (int64_t)Lp * HD, *S = V + (int64_t)Lp * HD;
    memset(K, 0, sizeof(float) * 2 * Lp * HD);  /* padded keys: zero rows (their scores are never read) */
    for (int j = 0; j < L; j++) {  /* row-major Q and K, V^T (HD, Lp) */
        const float* r = c->qkv + (t0 + j) * 3 * D + h * HD;
        for (int d = 0; d < HD; d++) {
            Q[j * HD + d] = (r[d] + bq[d]) * scale;
            K[(int64_t)j * HD + d] = r[D + d] + bk[d];
            V[(int64_t)d * Lp + j] = r[2 * D + d] + bv[d];
        }
    }
    const int nq = qb - qa;
    const mat Km = {T_F32, 0, (const uint8_t*)K, L, HD, HD * 4};
    matmul_rows(&Km, 0, L, 0, Q + (int64_t)qa * HD, nq, S, Lp, 0);  /* S[i][j] = <q_i, k_j> / sqrt(hd) */
    for (int i = 0; i < nq; i++) {
        float* s = S + (int64_t)i * Lp;
        if (relb)
            for (int j = 0; j < L; j++) s[j] += relb[qa + i + j * relk];
        vscale(s, 1.f / exp_shift(s, L, vmax(s, L)), L);
        for (int j = L; j < Lp; j++) s[j] = 0.f;
    }
    const mat Vm = {T_F32, 0, (const uint8_t*)V, HD, Lp, (int64_t)Lp * 4};
    matmul_rows(&Vm, 0, HD, 0, S, nq, out, D, 0);  /* att_i = sum_j s_ij v_j */
#endif
}

/* one (sequence, head), queries [qa, qb) of its L: S = Q K^T (Q scaled), softmax by rows, att = S V. The rows go
   to att from row `dst` on (query qa's; its token's row but in the last layer of first_only) (and, bf16 matrices
   taking the output straight from the tiles, to their xq rows in the region of the part whose first token is
   `base`: op_quant_att is skipped then). Where the token split packed this layer's keys and values (c->kv), from
   those. A sliding-window layer's queries go in spans of about the window, each against the keys its window
   reaches alone (the rest would score WINDOW_BIAS: 0 in the softmax, ~2^-126 where the int8 form clamps its
   exponent), so a long input's local layers cost (span + 2 window) keys a query, not L. */
static void attend(const ctx_t* c, int64_t sq, int h, int qa, int qb, int64_t base, int64_t dst) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim;
    const int L = (int)(c->start[sq + 1] - c->start[sq]);
    if (L <= 0 || qa >= qb) return;
    float* out = c->s->att + dst * D + h * HD;
    uint16_t* outb = m->act == ACT_BF16 ? (uint16_t*)xq_at(c, D, base, dst) + h * HD : NULL;
    /* MPNet's relative bias (relb[q - k]): the int8 and fp32 forms add it (bert_forward refuses it with bf16's); a
       ModernBERT sliding-window layer's mask the same way, where the sequence is longer than the window */
    const float* relb = m->rel ? m->rel + (int64_t)h * m->rel_span + m->rel_mid : NULL;
    int64_t relk = -1;  /* relb[q + k relk]: a relative table (relb[q - k]), or DeBERTa's dense rows */
    if (m->dis) relb = dis_bias(c, sq, h, qa, qb, &relk);
    if (!(c->w->win && L > m->window + 1)) {
        attend_keys(c, sq, h, 0, L, qa, qb, out, outb, relb, relk);
        return;
    }
    relb = c->w->win + (int64_t)h * m->rel_span + m->rel_mid;
    const int W = m->window, span = (W + 15) / 16 * 16;  /* 16: the int8 and fp32 kernels' query block */
    for (int a = qa; a < qb; a += span) {
        const int b = qb - a < span ? qb : a + span;
        const int k0 = (a - W > 0 ? a - W : 0) / 8 * 8, k1 = b + W < L ? b + W : L;  /* keys [a - W, b - 1 + W] */
        attend_keys(c, sq, h, k0, k1 - k0, a - k0, b - k0, out + (int64_t)(a - qa) * D,
                    outb ? (uint16_t*)xq_at(c, D, base, dst + a - qa) + h * HD : NULL, relb, relk);
    }
}
