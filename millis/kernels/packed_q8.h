/* Q8_0 and millis's Q7_0 on the AVX2 kernels' 8-row groups (packed.h's layout): 4 tokens (q8_tile4), 1 token as one
   stream (q8_stream1) or as four streams side by side (q8_spread, packed.c's READ_SPREAD), and packed.c's
   group_fns entries for them. Included by packed.c inside its __AVX2__ section. */
#pragma once
#include "packed.h"
#include "packed_dot.h"

/* Q8_0 or Q7_0 x 4 tokens, written out, the step loop kept rolled: group_dot's generic form (and this one
   unrolled) has GCC compute all 32 products of a block before summing them, spilling them to the stack.
   The same integer sum per block and the same float steps as group_dot, so the same results.
   zero = 0 (Q8_0 on AVX2): |w| against the activations with w's signs. Otherwise (stored w + zero: Q7_0,
   Q8_0 on VNNI): the stored bytes against the activations as they are, zero * (the block's sum) off. */
AI void q8_tile4(const int zero, const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    const int q7 = zero != 0;
    const int64_t ub = unit_bytes(T_Q8_0);
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    const xblock *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t* b = g + u * ub;
        const uint8_t* q = b + 16;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 1
        for (int s = 0; s < 8; s++) {
            const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * s));
            const __m256i aw = q7 ? w : _mm256_sign_epi8(w, w);
#define TOK(X, A) { const __m256i xv = bcast4(X[u].q + 4 * s), sx = q7 ? xv : _mm256_sign_epi8(xv, w); \
                    A = dot_u8s8(A, aw, sx); }
            TOK(x0, a0) TOK(x1, a1) TOK(x2, a2) TOK(x3, a3)
#undef TOK
        }
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));
#define ACC(X, A, F) { const __m256i i = q7 ? _mm256_sub_epi32(A, _mm256_set1_epi32(zero * X[u].sum)) : A; \
                       F = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dv, _mm256_set1_ps(X[u].d)), F); }
        ACC(x0, a0, f0) ACC(x1, a1, f1) ACC(x2, a2, f2) ACC(x3, a3, f3)
#undef ACC
    }
    _mm256_storeu_ps(out, f0); _mm256_storeu_ps(out + 8, f1); _mm256_storeu_ps(out + 16, f2);
    _mm256_storeu_ps(out + 24, f3);
}
/* Q8_0 / Q7_0 (VNNI builds' w + 64 or w + 128: zero) x 1 token (decode): one group of 8 rows, one sequential stream
   prefetched PF_BYTES ahead, two integer chains (even and odd steps) added exactly per block, then q8_tile4's
   float step. Zen 4, SmolLM2 decode, processes alternated (2026-12-02): the Q8_0 head (49152 x 576) 1.0-1.15 ms
   against 1.3-2.1 ms on the 4-stream tile (decode_streams), Llama-1B-shape Q8_0 decode 35-44 ms against 47-49
   (why is not settled: that tile's 4 streams run only 4.9 KB each at K = 576; micro-benchmarks of the matrices
   alone did not show the gap). */
AI void q8_unit(const int zero, const uint8_t* b, const xblock* x, __m256* f) {  /* one block into *f */
    const int q7 = zero != 0;
    const uint8_t* q = b + 16;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (int s = 0; s < 8; s += 2) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(q + 32 * s));
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(q + 32 * s + 32));
        const __m256i x0 = bcast4(x->q + 4 * s), x1 = bcast4(x->q + 4 * s + 4);
        a0 = dot_u8s8(a0, q7 ? w0 : _mm256_sign_epi8(w0, w0), q7 ? x0 : _mm256_sign_epi8(x0, w0));
        a1 = dot_u8s8(a1, q7 ? w1 : _mm256_sign_epi8(w1, w1), q7 ? x1 : _mm256_sign_epi8(x1, w1));
    }
    __m256i i = _mm256_add_epi32(a0, a1);
    if (q7) i = _mm256_sub_epi32(i, _mm256_set1_epi32(zero * x->sum));
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));
    *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dv, _mm256_set1_ps(x->d)), *f);
}
AI void q8_stream1(const int zero, const uint8_t* g, int64_t nu, const xblock* x, float* out) {
    const int64_t ub = unit_bytes(T_Q8_0);
    __m256 f = _mm256_setzero_ps();
    for (int64_t u = 0; u < nu; u++) {
        prefetch_unit(g + u * ub, ub);
        q8_unit(zero, g + u * ub, x + u, &f);
    }
    _mm256_storeu_ps(out, _mm256_add_ps(f, _mm256_setzero_ps()));  /* + 0.f: group_dot's zero offset */
}
/* 4 groups (g + k * gs) as 4 streams side by side (group_spread): out[8 * k + r], q8_stream1's sums */
AI void q8_spread(const int zero, const uint8_t* g, int64_t gs, int64_t nu, const xblock* x, float* out) {
    const int64_t ub = unit_bytes(T_Q8_0);
    __m256 f[4];
    for (int k = 0; k < 4; k++) f[k] = _mm256_setzero_ps();
    for (int64_t u = 0; u < nu; u++)
        for (int k = 0; k < 4; k++) {
            prefetch_unit(g + k * gs + u * ub, ub);
            q8_unit(zero, g + k * gs + u * ub, x + u, f + k);
        }
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * k, _mm256_add_ps(f[k], _mm256_setzero_ps()));
}
static void q8_0_s(const uint8_t* g, int64_t gs, int64_t nu, const xblock* x, float* out) {
    q8_spread(stored_offset(T_Q8_0), g, gs, nu, x, out);
}
static void q7_0_s(const uint8_t* g, int64_t gs, int64_t nu, const xblock* x, float* out) {
    q8_spread(stored_offset(T_Q7_0), g, gs, nu, x, out);
}
static void q8_0_1(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    (void)xs; q8_stream1(stored_offset(T_Q8_0), g, nu, x, out);
}
static void q7_0_1(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    (void)xs; q8_stream1(stored_offset(T_Q7_0), g, nu, x, out);
}
static void q8_0_4(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    q8_tile4(stored_offset(T_Q8_0), g, nu, x, xs, out);
}
static void q7_0_4(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    q8_tile4(stored_offset(T_Q7_0), g, nu, x, xs, out);
}
