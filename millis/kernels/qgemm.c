/* Int8 matmul for CPU decode (AVX2), built by millis/kernels/cpu_int8.py on first use.

   y (M, N) = sx[m] * sw[n] * <xq[m], wq[n]> + bias[n]
   Weights: int8 symmetric per output row (scale sw), packed as (Np/4, Kp/32, 4, 32): four rows'
   32-byte chunks side by side, so a tile of four rows is one sequential stream.
   Activations: int8 symmetric per row (scale sx), so a row's result does not depend on the other
   rows of the batch. Products use llama.cpp's sign trick: maddubs(|x|, sign(w, x)); both operands
   are within [-127, 127], so the int16 pair sums (<= 2 * 127 * 127) never saturate.
   Threads: OpenMP over tiles of four output rows (libgomp: the runtime torch itself has loaded). */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

/* x (M, K) fp32 rows -> xq (M, Kp) int8 symmetric per row, xa = |xq|, sx = scale per row. Kp >= K, tail zero. */
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int8_t* xq, int8_t* xa, float* sx) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * ldx;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) { float v = fabsf(r[k]); amax = v > amax ? v : amax; }
        float s = amax / 127.f;
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        sx[m] = s;
        int8_t* q = xq + m * Kp;
        int8_t* a = xa + m * Kp;
        for (int64_t k = 0; k < K; k++) {
            int v = (int)nearbyintf(r[k] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[k] = (int8_t)v;
            a[k] = (int8_t)(v < 0 ? -v : v);
        }
        for (int64_t k = K; k < Kp; k++) { q[k] = 0; a[k] = 0; }
    }
}

static inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

static inline void store4(float* yr, __m128i acc, float sx, const float* sw, const float* bias, int64_t t, int64_t N) {
    __m128 r = _mm_mul_ps(_mm_cvtepi32_ps(acc), _mm_mul_ps(_mm_set1_ps(sx), _mm_loadu_ps(sw + 4 * t)));
    if (4 * t + 4 <= N) {
        if (bias) r = _mm_add_ps(r, _mm_loadu_ps(bias + 4 * t));
        _mm_storeu_ps(yr + 4 * t, r);
        return;
    }
    float out[4];
    _mm_storeu_ps(out, r);
    for (int i = 0; i < 4 && 4 * t + i < N; i++) yr[4 * t + i] = out[i] + (bias ? bias[4 * t + i] : 0.f);
}

/* y (M, N) = sx[m] * sw[n] * <xq[m], w[n]> + bias[n]; w packed as (Np/4, Kp/32, 4, 32) int8. */
void qgemm(const int8_t* xq, const int8_t* xa, const float* sx, int64_t M, int64_t Kp,
           const int8_t* wp, const float* sw, const float* bias, int64_t N, float* y, int64_t ldy, int nthreads) {
    const int64_t T = (N + 3) / 4, C = Kp / 32;
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++) {
        const int8_t* wt = wp + t * 4 * Kp;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) {
            const int8_t *x0p = xq + m * Kp, *a0p = xa + m * Kp, *x1p = x0p + Kp, *a1p = a0p + Kp;
            __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
            __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
            for (int64_t c = 0; c < C; c++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i*)(x0p + 32 * c));
                const __m256i ax0 = _mm256_loadu_si256((const __m256i*)(a0p + 32 * c));
                const __m256i x1 = _mm256_loadu_si256((const __m256i*)(x1p + 32 * c));
                const __m256i ax1 = _mm256_loadu_si256((const __m256i*)(a1p + 32 * c));
                const int8_t* w = wt + 128 * c;
#define STEP(W, A0, A1) { const __m256i wv = _mm256_loadu_si256((const __m256i*)(W)); \
                A0 = _mm256_add_epi32(A0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax0, _mm256_sign_epi8(wv, x0)), ones)); \
                A1 = _mm256_add_epi32(A1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax1, _mm256_sign_epi8(wv, x1)), ones)); }
                STEP(w, c00, c10) STEP(w + 32, c01, c11) STEP(w + 64, c02, c12) STEP(w + 96, c03, c13)
#undef STEP
            }
            store4(y + m * ldy, hsum4(c00, c01, c02, c03), sx[m], sw, bias, t, N);
            store4(y + (m + 1) * ldy, hsum4(c10, c11, c12, c13), sx[m + 1], sw, bias, t, N);
        }
        for (; m < M; m++) {
            const int8_t* xr = xq + m * Kp;
            const int8_t* ar = xa + m * Kp;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < C; c++) {
                const __m256i x = _mm256_loadu_si256((const __m256i*)(xr + 32 * c));
                const __m256i ax = _mm256_loadu_si256((const __m256i*)(ar + 32 * c));
                const int8_t* w = wt + 128 * c;
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w)), x)), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + 32)), x)), ones));
                a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + 64)), x)), ones));
                a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + 96)), x)), ones));
            }
            store4(y + m * ldy, hsum4(a0, a1, a2, a3), sx[m], sw, bias, t, N);
        }
    }
}
