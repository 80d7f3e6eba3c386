/* millis's bf16 (T_BF16_PAIRS, the native encoder's `bf16` precision): bf16 weights against bf16 activation
   rows, fp32 accumulation. Half fp32's bytes; on AVX-512 BF16 `vdpbf16ps` does 32 multiply-adds per
   instruction, twice fp32's FMA.

   Activations: each row rounded to bf16 (round to nearest even, integer arithmetic: the same bits on every
   build) as the op that feeds the matmul writes it (to_bf16).
   Layout (packed, SIMD builds): groups of 8 rows (the last padded with zero rows); per pair of values p,
   32 bytes: row r's values 2p, 2p + 1 at 4r, 4r + 2 (vdpbf16ps's pairs: lane r of a 256-bit load is row r).
   Numerics: one fp32 accumulator per (row, token), per pair value 2p + 1 then 2p added (vdpbf16ps's order;
   a bf16 x bf16 product is exact in fp32, so FMA and multiply-then-add agree), pairs in order: the scalar
   reference, the AVX2 tile and the AVX-512 one give the same sums (denormals aside: vdpbf16ps flushes
   them), and a row's result never depends on batch-mates. */
#include "packed.h"

static inline float bf16_f32(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
/* a NaN keeps its sign and top mantissa bits, made quiet (vcvtneps2bf16's rule): rounding it would carry a
   mantissa of low bits alone into Inf, or wrap one >= 0x7FFF8000 past 32 bits into +-0 */
static inline uint16_t bf16_rne(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)(u >> 16 | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

API void to_bf16(const float* x, int64_t K, uint16_t* out) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= K; i += 8) {  /* bf16_rne, 8 lanes; the results fit 16 bits, so packus keeps them */
        const __m256 f = _mm256_loadu_ps(x + i);
        const __m256i u = _mm256_castps_si256(f), hi = _mm256_srli_epi32(u, 16);
        const __m256i odd = _mm256_and_si256(hi, _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)),
                               _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));  /* NaN lanes */
        _mm_storeu_si128((__m128i*)(out + i), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
#endif
    for (; i < K; i++) out[i] = bf16_rne(x[i]);
}

/* the scalar reference (row-major). Not vectorized: GCC 12's -O3 turns this in-order pair reduction into a
   wrong SLP reduction (62 -> 63.5 on a 32-value row of exact values; -O2 and GCC's scalar code are right). */
__attribute__((optimize("no-tree-vectorize"))) float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t K) {
    float acc = 0.f;
    for (int64_t p = 0; p < K / 2; p++) {
        acc += bf16_f32(w[2 * p + 1]) * bf16_f32(x[2 * p + 1]);
        acc += bf16_f32(w[2 * p]) * bf16_f32(x[2 * p]);
    }
    return acc;
}

int64_t bf16p_bytes(int64_t rows, int64_t cols) { return cols % 2 ? 0 : (rows + 7) / 8 * 8 * cols * 2; }

/* rows width * g .. + width - 1 (zero past the matrix) as pairs: per pair of values p, 4 * width bytes, row r's
   values 2p, 2p + 1 at 4r, 4r + 2 (width 8: the AVX groups; 16: AMX's B tiles, amx.c) */
void bf16p_pack_group(const mat* W, int64_t g, int width, uint8_t* dst) {
    uint16_t* o = (uint16_t*)dst + g * width * W->cols;
    for (int r = 0; r < width; r++) {
        const int64_t n = width * g + r;
        const uint16_t* row = (const uint16_t*)(W->data + n * W->row_bytes);
        for (int64_t p = 0; p < W->cols / 2; p++)
            for (int i = 0; i < 2; i++) o[2 * width * p + 2 * r + i] = n < W->rows ? row[2 * p + i] : 0;
    }
}

#ifdef __AVX2__
/* one group (8 rows) x T <= 4 tokens (rows of x, K apart): out[8 * t + r] */
AI void bf16_group(const int T, const uint16_t* g, int64_t K, const uint16_t* x, float* out) {
    const __m256i himask = _mm256_set1_epi32((int)0xFFFF0000);
    __m256 a[4];
    for (int t = 0; t < T; t++) a[t] = _mm256_setzero_ps();
    for (int64_t p = 0; p < K / 2; p++) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(g + 16 * p));
        const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, himask)), lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        for (int t = 0; t < T; t++) {
            int32_t v; memcpy(&v, x + t * K + 2 * p, 4);
            const __m256i xv = _mm256_set1_epi32(v);
            a[t] = _mm256_fmadd_ps(hi, _mm256_castsi256_ps(_mm256_and_si256(xv, himask)), a[t]);
            a[t] = _mm256_fmadd_ps(lo, _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), a[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + 8 * t, a[t]);
}
static void bf16_group_1(const uint16_t* g, int64_t K, const uint16_t* x, float* out) { bf16_group(1, g, K, x, out); }
static void bf16_group_4(const uint16_t* g, int64_t K, const uint16_t* x, float* out) { bf16_group(4, g, K, x, out); }

#ifdef __AVX512BF16__
#define HAVE_BF16_TILE 1
AI __m512i cat16(const uint16_t* a, const uint16_t* b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                              _mm256_loadu_si256((const __m256i*)b), 1);
}
/* groups g .. g + 3 (32 rows, gs values apart) x 6 tokens: out[32 * t + r], 12 accumulators */
static void bf16_tile32x6(const uint16_t* g, int64_t gs, int64_t K, const uint16_t* x, float* out) {
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0, b4 = a0,
           a5 = a0, b5 = a0;
    for (int64_t p = 0; p < K / 2; p++) {
        const __m512bh w0 = (__m512bh)cat16(g + 16 * p, g + gs + 16 * p);
        const __m512bh w1 = (__m512bh)cat16(g + 2 * gs + 16 * p, g + 3 * gs + 16 * p);
#define TOKEN(t, A, B) { int32_t v; memcpy(&v, x + t * K + 2 * p, 4); const __m512bh xv = (__m512bh)_mm512_set1_epi32(v); \
                         A = _mm512_dpbf16_ps(A, w0, xv); B = _mm512_dpbf16_ps(B, w1, xv); }
        TOKEN(0, a0, b0) TOKEN(1, a1, b1) TOKEN(2, a2, b2) TOKEN(3, a3, b3) TOKEN(4, a4, b4) TOKEN(5, a5, b5)
#undef TOKEN
    }
    const __m512 r[12] = {a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5};
    for (int i = 0; i < 12; i++) _mm512_storeu_ps(out + 16 * i, r[i]);
}
#else
#define HAVE_BF16_TILE 0
#endif

#define MTILE 64 /* tokens per pass over a chunk's groups */

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1) (n0 a multiple of 8): W packed, X bf16 rows */
void bf16p_rows(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy, int acc) {
    const int64_t K = W->cols, gs = 8 * K;
    for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
        const int64_t m1 = m0 + MTILE < M ? m0 + MTILE : M;
        for (int64_t g = n0 / 8; g * 8 < n1;) {
            const int span = HAVE_BF16_TILE && (g + 3) * 8 < n1 ? 4 : 1;
            const uint16_t* gp = (const uint16_t*)W->data + g * gs;
            for (int64_t m = m0; m < m1;) {
#if HAVE_BF16_TILE
                if (span == 4 && m + 6 <= m1) {
                    float out[192];
                    bf16_tile32x6(gp, gs, K, X + m * K, out);
                    for (int i = 0; i < 4; i++) store_group(Y, ldy, m, 6, g + i, n1, out + 8 * i, 32, acc);
                    m += 6;
                    continue;
                }
#endif
                const int T = m + 4 <= m1 ? 4 : 1;
                for (int i = 0; i < span; i++) {
                    float out[32];
                    (T == 4 ? bf16_group_4 : bf16_group_1)(gp + i * gs, K, X + m * K, out);
                    store_group(Y, ldy, m, T, g + i, n1, out, 8, acc);
                }
                m += T;
            }
            g += span;
        }
    }
}
#endif
