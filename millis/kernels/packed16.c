/* millis's int8 (`--quant int8`): Q8_0 weights (int8, one fp16 scale per 32 values, llama.cpp's bytes)
   run against activations quantized to int16 per 32 values (x16block), not to int8 as Q8_0 files run.

   Why: on SmolLM2-135M (4,096 tinyshakespeare tokens), Q8_0 weights with exact activations agree with
   fp32's top-1 at 98.3% of positions; with per-32 int8 activations too, 96.2%. An int16 activation's
   error is at most 1/65534 of its block's largest value, 258x under int8's, so the weights' rounding is
   all that is left. The bytes read per token are Q8_0's: decode costs the same memory traffic.

   Layout (packed, AVX2 builds): groups of 8 rows (the last padded with zero rows), per 32-value block a
   unit of 272 bytes: d[8] fp16 | 256 bytes, byte 16p + 2r + i = value 2p + i of row r (p < 16).
   One 16-byte load, sign-extended to 16 int16, holds rows 0..7's values (2p, 2p + 1); madd against the
   broadcast pair (x[2p], x[2p + 1]) leaves row r's partial sum in int32 lane r.

   Numerics: a block's integer sum is exact (|sum| <= 32 * 127 * 32767 < 2^31), so how many accumulators
   and in what order never changes it; then acc += float(isum) * (d * dx) per block, in block order for
   every T. A row's result never depends on batch-mates. */
#include "blockq.h"

#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define UNIT 272     /* bytes per (8 rows x 32 values): 8 fp16 scales + 256 int8 */
#define PF_BYTES pf_distance() /* decode: software prefetch this far ahead (packed.c's rule) */
#define MTILE 64      /* tokens quantized and run per pass over a chunk's groups */

API void quantize_x16(const float* x, int64_t K, x16block* out) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float* r = x + b * QK;
#ifdef __AVX2__
        /* the scalar code below, 8 lanes at a time: the same amax, products and rounding, the same values */
        __m256 v[4];
        const float amax = block_amax(r, v);
        const float id = amax > 0.f ? 32767.f / amax : 0.f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        for (int i = 0; i < 2; i++)  /* packs interleaves 128-bit lanes: permute 64-bit quarters back */
            _mm256_storeu_si256((__m256i*)(out[b].q + 16 * i),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * i], q[2 * i + 1]), 0xD8));
#else
        float amax = 0.f;
        for (int i = 0; i < QK; i++) { float v = fabsf(r[i]); amax = v > amax ? v : amax; }
        const float id = amax > 0.f ? 32767.f / amax : 0.f;
        for (int i = 0; i < QK; i++) out[b].q[i] = (int16_t)nearbyintf(r[i] * id);
#endif
        out[b].d = amax / 32767.f;
    }
}

/* scalar reference (GGUF's Q8_0 layout): the same integer sums per block */
float dot16_blocks(const uint8_t* row, const x16block* x, int64_t nb) {
    float r = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        const block_q8_0* b = (const block_q8_0*)row + i;
        int32_t s = 0;
        for (int l = 0; l < QK; l++) s += b->qs[l] * x[i].q[l];
        r += (float)s * (f16_to_f32(b->d) * x[i].d);
    }
    return r;
}

int64_t packed16_bytes(int64_t rows, int64_t cols) { return (rows + 7) / 8 * (cols / QK) * UNIT; }

void pack16_group(const mat* W, int64_t g, uint8_t* dst) {  /* group g of a GGUF-layout Q8_0 matrix */
    const int64_t nb = W->cols / QK;
    memset(dst + g * nb * UNIT, 0, nb * UNIT);
    for (int r = 0; r < 8 && 8 * g + r < W->rows; r++) {
        const block_q8_0* row = (const block_q8_0*)(W->data + (8 * g + r) * W->row_bytes);
        for (int64_t u = 0; u < nb; u++) {
            uint8_t* o = dst + (g * nb + u) * UNIT;
            memcpy(o + 2 * r, &row[u].d, 2);
            for (int p = 0; p < 16; p++) memcpy(o + 16 + 16 * p + 2 * r, row[u].qs + 2 * p, 2);
        }
    }
}

#ifdef __AVX2__
#define AI static inline __attribute__((always_inline))

AI __m256i pair_at(const x16block* x, int p) { int32_t v; memcpy(&v, x->q + 2 * p, 4); return _mm256_set1_epi32(v); }
AI __m256i wpair(const uint8_t* b, int p) {  /* rows 0..7's values (2p, 2p + 1) as int16 */
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + 16 + 16 * p)));
}
AI __m256 block_scale(const uint8_t* b, const x16block* x) {  /* d of the 8 rows x the token's dx */
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b)), _mm256_set1_ps(x->d));
}

/* one block (unit b) of a group of 8 rows against a token's block x: acc += its scaled sums */
AI void unit16(const uint8_t* b, const x16block* x, __m256* acc) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int p = 0; p < 16; p += 2) {
        s0 = dot_s16(s0, wpair(b, p), pair_at(x, p));
        s1 = dot_s16(s1, wpair(b, p + 1), pair_at(x, p + 1));
    }
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), block_scale(b, x), *acc);
}
AI void prefetch16(const uint8_t* b) { if (PF_BYTES) for (int o = 0; o < UNIT; o += 64) _mm_prefetch((const char*)b + PF_BYTES + o, _MM_HINT_T0); }

/* One group of 8 rows against 1 or 4 tokens (token t's blocks at x + t * xs): out[8 * t + r]. Written
   out per token: GCC spills an accumulator array indexed by t to the stack every step. */
static void group16_1(const uint8_t* g, int64_t nb, const x16block* x, int64_t xs, float* out) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t u = 0; u < nb; u++) {
        prefetch16(g + u * UNIT);
        unit16(g + u * UNIT, x + u, &acc);
    }
    _mm256_storeu_ps(out, acc);
}
/* decode: groups g + k * gs (k < 4) against 1 token, read as 4 streams side by side (packed.c's READ_SPREAD):
   out[8 * k + r], group16_1's sums per group */
static void group16_spread(const uint8_t* g, int64_t gs, int64_t nb, const x16block* x, float* out) {
    __m256 acc[4];
    for (int k = 0; k < 4; k++) acc[k] = _mm256_setzero_ps();
    for (int64_t u = 0; u < nb; u++)
        for (int k = 0; k < 4; k++) {
            prefetch16(g + k * gs + u * UNIT);
            unit16(g + k * gs + u * UNIT, x + u, acc + k);
        }
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * k, acc[k]);
}
static void store16(float* Y, int64_t g, int64_t n1, const float* o, int acc) {  /* one token's rows 8g.. (< n1) */
    float* y = Y + g * 8;
    for (int r = 0; r < 8 && g * 8 + r < n1; r++) y[r] = acc ? y[r] + o[r] : o[r];
}
static void group16_4(const uint8_t* g, int64_t nb, const x16block* x, int64_t xs, float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const x16block *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs;
    for (int64_t u = 0; u < nb; u++) {
        const uint8_t* b = g + u * UNIT;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (int p = 0; p < 16; p++) {
            const __m256i w = wpair(b, p);
            s0 = dot_s16(s0, w, pair_at(x0 + u, p));
            s1 = dot_s16(s1, w, pair_at(x1 + u, p));
            s2 = dot_s16(s2, w, pair_at(x2 + u, p));
            s3 = dot_s16(s3, w, pair_at(x3 + u, p));
        }
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), block_scale(b, x0 + u), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), block_scale(b, x1 + u), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), block_scale(b, x2 + u), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s3), block_scale(b, x3 + u), a3);
    }
    _mm256_storeu_ps(out, a0); _mm256_storeu_ps(out + 8, a1); _mm256_storeu_ps(out + 16, a2);
    _mm256_storeu_ps(out + 24, a3);
}

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1) (n0 a multiple of 8), m < M; W packed here. */
void packed16_rows(const mat* W, int64_t n0, int64_t n1, const x16block* X, int64_t M, float* Y, int64_t ldy,
                   int acc) {
    const int64_t nb = W->cols / QK;
    if (M == 1 && decode_streams(0) == READ_SPREAD) {  /* the chunk's groups in 4 runs side by side */
        const int64_t g0 = n0 / 8, ng = (n1 + 7) / 8 - g0, q = ng / 4;
        for (int64_t i = 0; i < q; i++) {
            float out[32];
            group16_spread(W->data + (g0 + i) * nb * UNIT, q * nb * UNIT, nb, X, out);
            for (int k = 0; k < 4; k++) store16(Y, g0 + i + k * q, n1, out + 8 * k, acc);
        }
        for (int64_t g = g0 + 4 * q; g < g0 + ng; g++) {
            float out[8];
            group16_1(W->data + g * nb * UNIT, nb, X, 0, out);
            store16(Y, g, n1, out, acc);
        }
        return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
        const int64_t m1 = m0 + MTILE < M ? m0 + MTILE : M;
        for (int64_t g = n0 / 8; g * 8 < n1; g++) {
            const uint8_t* gp = W->data + g * nb * UNIT;
            for (int64_t m = m0; m < m1;) {
                const int T = m + 4 <= m1 ? 4 : 1;
                float out[32];
                (T == 4 ? group16_4 : group16_1)(gp, nb, X + m * nb, nb, out);
                for (int t = 0; t < T; t++) store16(Y + (m + t) * ldy, g, n1, out + 8 * t, acc);
                m += T;
            }
        }
    }
}
#endif
