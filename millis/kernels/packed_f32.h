/* The F32 matrices of packed.c (fp32 weights in groups of 8 rows against fp32 token rows, the native
   encoder's fp32 precision and decoders' F32 tensors): the AVX2 tiles and the row loop, which takes the
   AVX-512 tiles (packed512.h) where the build has them. Included by packed.c after packed512.h. */
#pragma once

/* F32: R groups (8 rows each, R <= 2) x T tokens (T <= 6): 12 accumulators, value k of 16 rows
   (two loads) times token t's x[k] (a broadcast). One accumulator per (row, token), k in order:
   the same sum for every T and R, so a row's result never depends on batch-mates. */
AI void float_tile(const int R, const int T, const float* g0, const float* g1, int64_t K, const float* x, float* out) {
    __m256 a[6][2];
    for (int t = 0; t < T; t++) a[t][0] = a[t][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (T == 1 && (k & 1) == 0 && PF_BYTES) {  /* decode: one line of each group per two values */
            _mm_prefetch((const char*)(g0 + 8 * k) + PF_BYTES, _MM_HINT_T0);
            if (R == 2) _mm_prefetch((const char*)(g1 + 8 * k) + PF_BYTES, _MM_HINT_T0);
        }
        const __m256 w0 = _mm256_loadu_ps(g0 + 8 * k), w1 = R == 2 ? _mm256_loadu_ps(g1 + 8 * k) : w0;
        for (int t = 0; t < T; t++) {
            const __m256 b = _mm256_broadcast_ss(x + t * K + k);
            a[t][0] = _mm256_fmadd_ps(w0, b, a[t][0]);
            if (R == 2) a[t][1] = _mm256_fmadd_ps(w1, b, a[t][1]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 16 * t + 8 * r, a[t][r]);
}
typedef void (*float_fn)(const float*, const float*, int64_t, const float*, float*);
#define FLOAT_FN(R, T) static void float_##R##_##T(const float* g0, const float* g1, int64_t K, const float* x, \
                                                   float* out) { float_tile(R, T, g0, g1, K, x, out); }
FLOAT_FN(1, 1) FLOAT_FN(1, 2) FLOAT_FN(1, 3) FLOAT_FN(1, 4) FLOAT_FN(1, 5) FLOAT_FN(1, 6)
FLOAT_FN(2, 1) FLOAT_FN(2, 2) FLOAT_FN(2, 3) FLOAT_FN(2, 4) FLOAT_FN(2, 5)
/* the prefill tile, written out: GCC keeps float_tile's accumulator array in registers but also stores
   it to the stack every iteration (12 stores per k), a third of the speed. Same operations, same sums. */
static void float_2_6(const float* g0, const float* g1, int64_t K, const float* x, float* out) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0, b4 = a0,
           a5 = a0, b5 = a0;
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(g0 + 8 * k), w1 = _mm256_loadu_ps(g1 + 8 * k);
#define TOKEN(t, A, B) { const __m256 v = _mm256_broadcast_ss(x + t * K + k); \
                         A = _mm256_fmadd_ps(w0, v, A); B = _mm256_fmadd_ps(w1, v, B); }
        TOKEN(0, a0, b0) TOKEN(1, a1, b1) TOKEN(2, a2, b2) TOKEN(3, a3, b3) TOKEN(4, a4, b4) TOKEN(5, a5, b5)
#undef TOKEN
    }
    const __m256 r[12] = {a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5};
    for (int i = 0; i < 12; i++) _mm256_storeu_ps(out + 8 * i, r[i]);
}
static const float_fn FLOAT_FNS[2][6] = {{float_1_1, float_1_2, float_1_3, float_1_4, float_1_5, float_1_6},
                                         {float_2_1, float_2_2, float_2_3, float_2_4, float_2_5, float_2_6}};

#define FLOAT_MTILE (HAVE_AVX512 ? 48 : MTILE)  /* F32: four passes of float_tile512's 12 tokens */

static void float_rows(const mat* W, int64_t n0, int64_t n1, const float* X, int64_t M, float* Y, int64_t ldy, int acc) {
    const int64_t K = W->cols;
#if HAVE_AVX512
    if (M == 1 && streams_now() == READ_SPREAD) {  /* decode: 4 runs of groups side by side (spread_rows) */
        const int64_t g0 = n0 / 8, q = ((n1 + 7) / 8 - g0) / 4;
        for (int64_t i = 0; i < q; i++) {
            float out[32];
            float_tile32x1((const float*)W->data + (g0 + i) * 8 * K, q * 8 * K, K, X, out);
            for (int k = 0; k < 4; k++) store_group(Y, 0, 0, 1, g0 + i + k * q, n1, out + 8 * k, 32, acc);
        }
        n0 = (g0 + 4 * q) * 8;  /* the rest below, a group at a time */
        if (n0 >= n1) return;
    }
#endif
    for (int64_t m0 = 0; m0 < M; m0 += FLOAT_MTILE) {
        const int64_t m1 = m0 + FLOAT_MTILE < M ? m0 + FLOAT_MTILE : M;
        for (int64_t g = n0 / 8; g * 8 < n1;) {
            const int quad = HAVE_AVX512 && (g + 3) * 8 < n1;  /* 4 groups: the 32-row AVX-512 tile */
            const int R = quad ? 4 : (g + 1) * 8 < n1 ? 2 : 1;
            const float* g0 = (const float*)W->data + g * 8 * K;
            for (int64_t m = m0; m < m1;) {
#if HAVE_AVX512
                /* 32 or 16 rows x up to 12 tokens; 1 token on 32 rows where decode_streams is 4 */
                const int T12 = m1 - m < 12 ? (int)(m1 - m) : 12;
                if (R > 1 && (T12 > 1 || (quad && streams_now() == READ_QUAD))) {
                    float out[384];
                    FLOAT512_FNS[R / 2 - 1][T12 - 1](g0, 8 * K, K, X + m * K, out);
                    for (int r = 0; r < R; r++) store_group(Y, ldy, m, T12, g + r, n1, out + 8 * r, 32, acc);
                    m += T12;
                    continue;
                }
#endif
                const int T = m1 - m < 6 ? (int)(m1 - m) : 6;
                const int one = HAVE_AVX512 && T == 1;  /* AVX-512 decode (decode_streams 1): a group at a time */
                for (int h = 0; h < R; h += one ? 1 : 2) {  /* pairs of groups (the last one alone) */
                    const int Rh = R - h < 2 || one ? 1 : 2;
                    const float* gh = g0 + h * 8 * K;
                    float out[96];
                    FLOAT_FNS[Rh - 1][T - 1](gh, gh + 8 * K, K, X + m * K, out);
                    for (int r = 0; r < Rh; r++) store_group(Y, ldy, m, T, g + h + r, n1, out + 8 * r, 16, acc);
                }
                m += T;
            }
            g += R;
        }
    }
}
