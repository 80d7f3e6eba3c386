/* The decoder's attention pieces over the paged KV cache (llama_step.c): scores of query heads against a
   block of K, and V's rows weighted by the softmax. A call takes several heads, each with its own pointers
   (one token's G heads of a KV head, or several tokens' in a prefill run), against the same block loads.

   K blocks hold K transposed (kt[d * bs + j]: value d of the block's position j), so vector lanes are
   positions. Every output value gets its operations in each lane alone, in the order the row-major kernels
   used (scores: 8 chains over d, then their sums; weighted sums: one FMA per position in order): the same
   bits at every vector width, head grouping and batch, and as before this layout (the avx2 and avx512
   builds agree bit for bit; the scalar build's plain C rounds on its own). Heads, and a prefill run's tokens,
   go together against the same loads; before, each token streamed every K / V block from L2 on its own. */
#pragma once
#include "step_math.h"

#define AI_ static inline __attribute__((always_inline))
/* For heads h < H, i < cnt: sc[h][i] = <q[h], position off + i of the block> * scale, mx[h] = max(mx[h], them).
   Each score is 8 chains c_r (r = d mod 8, d in order) summed as the row-major kernels did: positions in whole
   eights ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)) (hsum8x8), the last cnt % 8 as dotf
   ((c0 + c4) + (c1 + c5)) + ((c2 + c6) + (c3 + c7)) (hsum8): the same bits as before K was transposed.
   hd % 8 == 0 (scores_block sums other widths in one chain). */
#if defined(__AVX512F__)
AI_ void scores_heads(const int H, const float* const* q, const float* kt, int bs, int off, int cnt, int hd,
                      float scale, float* const* sc, float* mx) {
    const int whole = cnt - cnt % 8;
    for (int i = 0; i < cnt; i += 16) {
        const int c = cnt - i, w = whole - i;
        const __mmask16 m = c >= 16 ? 0xffff : (__mmask16)((1u << c) - 1);
        const __mmask16 mw = w >= 16 ? 0xffff : w > 0 ? (__mmask16)((1u << w) - 1) : 0;  /* lanes in whole eights */
        __m512 a[2][8];
        for (int h = 0; h < H; h++) for (int r = 0; r < 8; r++) a[h][r] = _mm512_setzero_ps();
        const float* k = kt + off + i;
        for (int d0 = 0; d0 < hd; d0 += 8)
            for (int r = 0; r < 8; r++) {
                const __m512 kv = _mm512_maskz_loadu_ps(m, k + (int64_t)(d0 + r) * bs);
                for (int h = 0; h < H; h++) a[h][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[h][d0 + r]), kv, a[h][r]);
            }
        for (int h = 0; h < H; h++) {
            const __m512* v = a[h];
            const __m512 e = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3])),
                                           _mm512_add_ps(_mm512_add_ps(v[4], v[5]), _mm512_add_ps(v[6], v[7])));
            const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v[0], v[4]), _mm512_add_ps(v[1], v[5])),
                                           _mm512_add_ps(_mm512_add_ps(v[2], v[6]), _mm512_add_ps(v[3], v[7])));
            const __m512 sv = _mm512_mul_ps(_mm512_mask_mov_ps(t, mw, e), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc[h] + i, m, sv);
            const float x = _mm512_mask_reduce_max_ps(m, sv);
            mx[h] = x > mx[h] ? x : mx[h];
        }
    }
}
#define SCORE_HEADS 2  /* 2 heads x 8 chains: 16 accumulators */
#elif defined(__AVX2__)
AI_ void scores_heads(const int H, const float* const* q, const float* kt, int bs, int off, int cnt, int hd,
                      float scale, float* const* sc, float* mx) {
    (void)H;  /* one head: 8 chains of 16 registers */
    const int whole = cnt - cnt % 8;
    for (int i = 0; i < cnt; i += 8) {
        const int c = cnt - i;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 v[8];
        for (int r = 0; r < 8; r++) v[r] = _mm256_setzero_ps();
        const float* k = kt + off + i;
        for (int d0 = 0; d0 < hd; d0 += 8)
            for (int r = 0; r < 8; r++)
                v[r] = _mm256_fmadd_ps(_mm256_set1_ps(q[0][d0 + r]), _mm256_maskload_ps(k + (int64_t)(d0 + r) * bs, m), v[r]);
        const __m256 e = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                                       _mm256_add_ps(_mm256_add_ps(v[4], v[5]), _mm256_add_ps(v[6], v[7])));
        const __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[4]), _mm256_add_ps(v[1], v[5])),
                                       _mm256_add_ps(_mm256_add_ps(v[2], v[6]), _mm256_add_ps(v[3], v[7])));
        float o[8];
        _mm256_storeu_ps(o, _mm256_mul_ps(i < whole ? e : t, _mm256_set1_ps(scale)));  /* eights start at 0 */
        for (int l = 0; l < 8 && l < c; l++) { sc[0][i + l] = o[l]; mx[0] = o[l] > mx[0] ? o[l] : mx[0]; }
    }
}
#define SCORE_HEADS 1
#endif
/* any number of heads, SCORE_HEADS at a time (each count a constant: the accumulators stay in registers) */
static void scores_block(int nh, const float* const* q, const float* kt, int bs, int off, int cnt, int hd, float scale,
                         float* const* sc, float* mx) {
#ifdef SCORE_HEADS
    if (hd % 8 == 0) {
        for (int h = 0; h < nh; h += SCORE_HEADS) {
            if (nh - h >= 2) scores_heads(SCORE_HEADS, q + h, kt, bs, off, cnt, hd, scale, sc + h, mx + h);
            else scores_heads(1, q + h, kt, bs, off, cnt, hd, scale, sc + h, mx + h);
        }
        return;
    }
#endif
    for (int h = 0; h < nh; h++)  /* plain C (the scalar build, or hd % 8 != 0): one chain, d in order */
        for (int i = 0; i < cnt; i++) {
            float a = 0.f;
            for (int d = 0; d < hd; d++) a += q[h][d] * kt[(int64_t)d * bs + off + i];
            sc[h][i] = a * scale;
            mx[h] = sc[h][i] > mx[h] ? sc[h][i] : mx[h];
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
