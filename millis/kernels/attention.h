/* The decoder's attention pieces over the paged KV cache (llama_step.c): scores of query heads against a
   block of K, and V's rows weighted by the softmax. A call takes several heads, each with its own pointers
   (one token's G heads of a KV head, or several tokens' in a prefill run), against the same block loads.

   K blocks hold K transposed (kt[d * bs + j]: value d of the block's position j), so vector lanes are
   positions. Every output value gets one FMA per d (scores) or per position (weighted sums) in order, in
   each lane alone: the same bits at every vector width, head grouping and batch (the avx2 and avx512
   builds agree bit for bit; the scalar build's plain C rounds on its own). Heads go several at a time so
   that 8-24 FMA chains are independent: one head's 2-4 chains waited on the FMA latency, and one token at
   a time streamed each K / V block from L2 per token. */
#pragma once
#include "step_math.h"

#define AI_ static inline __attribute__((always_inline))
#define MAX_HEADS 8  /* heads per scores call (AVX-512: 2 x 8 accumulators) */

/* For heads h < H, i < cnt: sc[h][i] = <q[h], position off + i of the block> * scale, mx[h] = max(mx[h], them). */
#if defined(__AVX512F__)
AI_ void scores_heads(const int H, const float* const* q, const float* kt, int bs, int off, int cnt, int hd,
                      float scale, float* const* sc, float* mx) {
    for (int i = 0; i < cnt; i += 32) {
        const int c = cnt - i;
        const __mmask16 m0 = c >= 16 ? 0xffff : (__mmask16)((1u << c) - 1);
        const __mmask16 m1 = c >= 32 ? 0xffff : c > 16 ? (__mmask16)((1u << (c - 16)) - 1) : 0;
        __m512 a[MAX_HEADS][2];
        for (int h = 0; h < H; h++) a[h][0] = a[h][1] = _mm512_setzero_ps();
        const float* k = kt + off + i;
        for (int d = 0; d < hd; d++) {
            const __m512 k0 = _mm512_maskz_loadu_ps(m0, k + (int64_t)d * bs);
            const __m512 k1 = _mm512_maskz_loadu_ps(m1, k + (int64_t)d * bs + 16);
            for (int h = 0; h < H; h++) {
                const __m512 qv = _mm512_set1_ps(q[h][d]);
                a[h][0] = _mm512_fmadd_ps(qv, k0, a[h][0]); a[h][1] = _mm512_fmadd_ps(qv, k1, a[h][1]);
            }
        }
        for (int h = 0; h < H; h++) {
            const __m512 s0 = _mm512_mul_ps(a[h][0], _mm512_set1_ps(scale)), s1 = _mm512_mul_ps(a[h][1], _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc[h] + i, m0, s0);
            _mm512_mask_storeu_ps(sc[h] + i + 16, m1, s1);
            float t = _mm512_mask_reduce_max_ps(m0, s0);
            if (m1) { const float t1 = _mm512_mask_reduce_max_ps(m1, s1); t = t1 > t ? t1 : t; }
            mx[h] = t > mx[h] ? t : mx[h];
        }
    }
}
#define SCORE_HEADS 8
#elif defined(__AVX2__)
static inline __m256i lanes_below(int c) {  /* lane l all ones where l < c */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
AI_ void scores_heads(const int H, const float* const* q, const float* kt, int bs, int off, int cnt, int hd,
                      float scale, float* const* sc, float* mx) {
    for (int i = 0; i < cnt; i += 32) {
        const int c = cnt - i;
        const __m256i m[4] = {lanes_below(c), lanes_below(c - 8), lanes_below(c - 16), lanes_below(c - 24)};
        __m256 a[2][4];
        for (int h = 0; h < H; h++) for (int v = 0; v < 4; v++) a[h][v] = _mm256_setzero_ps();
        const float* k = kt + off + i;
        for (int d = 0; d < hd; d++) {
            __m256 kv[4];
            for (int v = 0; v < 4; v++) kv[v] = _mm256_maskload_ps(k + (int64_t)d * bs + 8 * v, m[v]);
            for (int h = 0; h < H; h++) {
                const __m256 qv = _mm256_set1_ps(q[h][d]);
                for (int v = 0; v < 4; v++) a[h][v] = _mm256_fmadd_ps(qv, kv[v], a[h][v]);
            }
        }
        for (int h = 0; h < H; h++)
            for (int v = 0; v < 4 && 8 * v < c; v++) {
                float t[8];
                _mm256_storeu_ps(t, _mm256_mul_ps(a[h][v], _mm256_set1_ps(scale)));
                for (int l = 0; l < 8 && 8 * v + l < c; l++) {
                    sc[h][i + 8 * v + l] = t[l];
                    mx[h] = t[l] > mx[h] ? t[l] : mx[h];
                }
            }
    }
}
#define SCORE_HEADS 2
#else
static void scores_heads(const int H, const float* const* q, const float* kt, int bs, int off, int cnt, int hd,
                         float scale, float* const* sc, float* mx) {
    for (int h = 0; h < H; h++)
        for (int i = 0; i < cnt; i++) {
            float a = 0.f;
            for (int d = 0; d < hd; d++) a += q[h][d] * kt[(int64_t)d * bs + off + i];
            sc[h][i] = a * scale;
            mx[h] = sc[h][i] > mx[h] ? sc[h][i] : mx[h];
        }
}
#define SCORE_HEADS 1
#endif
/* any number of heads, SCORE_HEADS at a time (each count a constant: the accumulators stay in registers) */
static void scores_block(int nh, const float* const* q, const float* kt, int bs, int off, int cnt, int hd, float scale,
                         float* const* sc, float* mx) {
    for (int h = 0; h < nh; h += SCORE_HEADS) {
        const float* const* qh = q + h; float* const* sh = sc + h;
        switch (nh - h < SCORE_HEADS ? nh - h : SCORE_HEADS) {
#define CASE(H) case H: scores_heads(H, qh, kt, bs, off, cnt, hd, scale, sh, mx + h); break;
            CASE(1)
#if SCORE_HEADS > 1
            CASE(2)
#endif
#if SCORE_HEADS > 2
            CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#endif
#undef CASE
        }
    }
}

/* For heads h < H: out[h][d] += sum over r < cnt of (w[h][r] * inv[h]) * v[r * hd + d] for d < V vectors' lanes
   (V's rows hd apart, from the caller's d0). */
#define WEIGHTED(VEC, LANES, SET1, LOAD, STORE, FMA)                                                           \
    AI_ void weighted_heads(const int H, const int V, float* const* out, const float* const* w, const float* inv, \
                            const float* v, int cnt, int hd, int d0) {                                          \
        VEC o[6][4];                                                                                          \
        for (int h = 0; h < H; h++) for (int j = 0; j < V; j++) o[h][j] = LOAD(out[h] + d0 + LANES * j);        \
        for (int r = 0; r < cnt; r++) {                                                                       \
            VEC x[4];                                                                                         \
            for (int j = 0; j < V; j++) x[j] = LOAD(v + (int64_t)r * hd + d0 + LANES * j);                      \
            for (int h = 0; h < H; h++) {                                                                     \
                const VEC a = SET1(w[h][r] * inv[h]);                                                         \
                for (int j = 0; j < V; j++) o[h][j] = FMA(a, x[j], o[h][j]);                                    \
            }                                                                                                 \
        }                                                                                                     \
        for (int h = 0; h < H; h++) for (int j = 0; j < V; j++) STORE(out[h] + d0 + LANES * j, o[h][j]);        \
    }
#if defined(__AVX512F__)
WEIGHTED(__m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps)
#define WEIGHT_HEADS 6   /* 6 heads x 4 vectors: 24 accumulators */
#define WEIGHT_SPAN 64   /* values per pass over V's rows */
#define WEIGHT_LANES 16
#elif defined(__AVX2__)
WEIGHTED(__m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps)
#define WEIGHT_HEADS 2   /* 2 heads x 4 vectors: 8 accumulators of 16 registers */
#define WEIGHT_SPAN 32
#define WEIGHT_LANES 8
#endif
#undef WEIGHTED

/* any number of heads: out[h] += the weighted rows of this block (hd values each) */
static void weighted_block(int nh, float* const* out, const float* const* w, const float* inv, const float* v, int cnt,
                           int hd) {
#ifdef WEIGHT_SPAN
    if (hd % 32 == 0) {
        for (int d0 = 0; d0 < hd; d0 += WEIGHT_SPAN)
            for (int h = 0; h < nh; h += WEIGHT_HEADS) {
                const int H = nh - h < WEIGHT_HEADS ? nh - h : WEIGHT_HEADS, wide = hd - d0 >= WEIGHT_SPAN;
                float* const* oh = out + h; const float* const* wh = w + h;
                switch (H * 2 + wide) {  /* WEIGHT_SPAN values (4 vectors), or the last 32 (AVX-512: 2) */
#define CASE(H) case 2 * H + 1: weighted_heads(H, 4, oh, wh, inv + h, v, cnt, hd, d0); break; \
                case 2 * H: weighted_heads(H, 32 / WEIGHT_LANES, oh, wh, inv + h, v, cnt, hd, d0); break;
                    CASE(1) CASE(2)
#if WEIGHT_HEADS > 2
                    CASE(3) CASE(4) CASE(5) CASE(6)
#endif
#undef CASE
                }
            }
        return;
    }
#endif
    for (int h = 0; h < nh; h++)
        for (int r = 0; r < cnt; r++) axpy(out[h], w[h][r] * inv[h], v + (int64_t)r * hd, hd);
}
#undef AI_
