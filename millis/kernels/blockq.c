/* Block-quantized matmul for CPU: GGUF's F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
   weights against activations quantized per block of 32 (xblock), built by millis/kernels/native.py.

   Numerics (as llama.cpp): a weight block decodes to 32 small integers w with a scale (and for Q4_1 /
   K-quants an offset); <w, x> = dw * dx * sum(w * q) (+ offset * s).

   This file: the formats' scalar definitions (decode_block), activation quantization, the float
   weight kernels (AVX2 2-row x 4-token tiles, or plain loops) and the scalar reference for the
   quantized types in GGUF's layout (dot_blocks: what the tests compare the AVX2 kernels against).
   The AVX2 build runs quantized matrices packed at load (packed.c). */
#include "packed.h"  /* blockq.h, and act_offset */

#define PREFETCH_ROWS 8 /* float decode: weight rows prefetched this far ahead */

#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#ifndef __F16C__
float f16_to_f32_scalar(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }

int type_block(int type) {
    switch (type) {
        case T_Q8_0: case T_Q8_0_X16: case T_Q7_0: case T_Q7_A7: case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW:
        case T_Q4_0:
        case T_Q4_1:
        case T_Q5_0: case T_Q5_1: return QK;
        case T_Q4_K: case T_Q5_K: case T_Q6_K: return QK_K;
        default: return 1;
    }
}

int is_float_type(int type) { return type == T_F32 || type == T_F16 || type == T_BF16; }

/* x -> blocks of 32 values q in [-lv, lv] with x ~ d * q, d = amax / lv (lv: 127, or 63 for T_Q7_A7 and
   T_Q7_ROW), stored as q + off (mod 256: packed.h's act_offset; sum and half keep q's sums). amax: the
   block's largest |x|, or the whole row's when row_amax >= 0 (one scale per token: T_Q7_ROW, T_Q7_ROW8).
   ROW_BLOCKS_DQ: the row types' blocks carry d and q alone in the SIMD builds (their tiles, AVX2's, AVX-512's and
   AMX's, read nothing else): the sums took 1-3% of a native encoder forward (Zen 4, alternated in one process:
   bge-small b1xs128 0.985x, b1xs16 0.97x, MiniLM 0.98x, BERT-base 0.993x); s, sum and half keep what they held.
   The scalar build, the reference, writes every field. */
static inline void quantize_levels(const float* x, int64_t K, xblock* out, const float lv, const uint8_t off,
                                   const float row_amax) {
#ifdef __AVX2__
    const int row = row_amax >= 0.f;  /* one scale per token: its d and 1 / d once, no block maxima */
    const float row_d = row_amax / lv, row_id = row_amax > 0.f ? lv / row_amax : 0.f;
#endif
    for (int64_t b = 0; b < K / QK; b++) {
        const float* r = x + b * QK;
#ifdef __AVX2__
        /* the scalar code below, 8 lanes at a time: the same amax, products and round-to-nearest-even
           (cvtps under the default MXCSR rounds as nearbyintf does), so the same bytes */
        __m256 v[4];
        float d = row_d, id = row_id;
        if (row) for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(r + 8 * i);
        else {
            const float amax = block_amax(r, v);
            d = amax / lv; id = amax > 0.f ? lv / amax : 0.f;
        }
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        const __m256i o = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)out[b].q, _mm256_add_epi8(o, _mm256_set1_epi8((char)off)));
        if (row) { out[b].d = d; continue; }  /* the row types' tiles read d and q alone (ROW_BLOCKS_DQ) */
        /* q[0], q[1]: values 0..15; q[2], q[3]: 16..31 -> the two half sums, then their total */
        const __m256i a = _mm256_add_epi32(q[0], q[1]), c = _mm256_add_epi32(q[2], q[3]);
        __m128i h = _mm_hadd_epi32(_mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)),
                                   _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
        h = _mm_hadd_epi32(h, h);  /* lanes 0, 1: the half sums */
        const int h0 = _mm_cvtsi128_si32(h), h1 = _mm_extract_epi32(h, 1), sum = h0 + h1;
#else
        float amax = 0.f;
        for (int i = 0; i < QK; i++) { float v = fabsf(r[i]); amax = v > amax ? v : amax; }
        if (row_amax >= 0.f) amax = row_amax;
        float d = amax / lv, id = amax > 0.f ? lv / amax : 0.f;
        int h0 = 0, h1 = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)nearbyintf(r[i] * id);
            out[b].q[i] = (int8_t)(uint8_t)(v + off);
            if (i < QK / 2) h0 += v; else h1 += v;
        }
        const int sum = h0 + h1;
#endif
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].sum = sum;
        out[b].half[0] = (int16_t)h0;  /* |h| <= 16 * 127 */
        out[b].half[1] = (int16_t)h1;
    }
}
#if defined(__AVX512BW__)
/* quantize_levels for one scale per token (the row types, off 64 or 128: every q + off is a byte in [1, 255]), 16
   lanes at a time: the same products and rounding, q to bytes by vpmovdb (|q| <= lv: no saturation); the same
   bytes as the AVX2 loop, in about half its instructions (the native encoder quantizes every LayerNorm's, GELU's
   and attention's row: ~4% of bge-small's b1xs128 forward on Zen 4). ROW_BLOCKS_DQ: d and q alone. */
static void quantize_row512(const float* x, int64_t K, xblock* out, const float lv, const uint8_t off,
                            const float row_amax) {
    const float d = row_amax / lv, id = row_amax > 0.f ? lv / row_amax : 0.f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m256i vo = _mm256_set1_epi8((char)off);
    for (int64_t b = 0; b < K / QK; b++) {
        const float* r = x + b * QK;
        const __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r), vid)));
        const __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + 16), vid)));
        const __m256i u = _mm256_add_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1), vo);
        _mm256_storeu_si256((__m256i*)out[b].q, u);
        out[b].d = d;
    }
}
#endif
API void quantize_x(const float* x, int64_t K, xblock* out) { quantize_levels(x, K, out, 127.f, 0, -1.f); }
/* x * inv (inv: per channel, or NULL for x) for a packed matrix of this type: values in [-63, 63] for T_Q7_A7
   and T_Q7_ROW, else quantize_x's, each value plus act_offset (AVX2's Q7_0 takes them unsigned, packed.h) */
/* x * inv into sm (inv NULL: x as it is, sm unwritten) and the largest |value|, in one pass (a max is exact:
   every build the same value; the scalar loop is a 1-cycle chain that cost BERT-base b1xs128 1.4 ms of 46) */
static float smooth_amax(const float* x, const float* inv, int64_t K, float* sm) {
    int64_t i = 0;
    float amax = 0.f;
#if defined(__AVX512F__)
    __m512 m16 = _mm512_setzero_ps();
    for (; i + 16 <= K; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (inv) { v = _mm512_mul_ps(v, _mm512_loadu_ps(inv + i)); _mm512_storeu_ps(sm + i, v); }
        m16 = _mm512_max_ps(m16, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(m16);
#endif
#ifdef __AVX2__
    __m256 m = _mm256_setzero_ps();
    for (; i + 8 <= K; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        if (inv) { v = _mm256_mul_ps(v, _mm256_loadu_ps(inv + i)); _mm256_storeu_ps(sm + i, v); }
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v));
    }
    amax = fmaxf(amax, hmax8(m));
#endif
    for (; i < K; i++) {
        const float v = inv ? x[i] * inv[i] : x[i];
        if (inv) sm[i] = v;
        amax = fabsf(v) > amax ? fabsf(v) : amax;
    }
    return amax;
}
/* the row types' second pass: x (already times inv) with its largest |value| known (smooth_amax, or the op that
   wrote the row: step_math.h's smooth_max) */
void quantize_row_act(int type, const float* x, float row_amax, int64_t K, xblock* out) {
#if defined(__AVX512BW__)
    quantize_row512(x, K, out, type == T_Q7_ROW ? 63.f : 127.f, (uint8_t)act_offset(type), row_amax);
#else
    quantize_levels(x, K, out, type == T_Q7_ROW ? 63.f : 127.f, (uint8_t)act_offset(type), row_amax);
#endif
}
API void quantize_act_smooth(int type, const float* x, const float* inv, int64_t K, xblock* out) {
    float sm[inv ? K : 1] __attribute__((aligned(64)));  /* x * inv, once: the amax and the quantization read it */
    if (is_row_type(type)) {
        const float row_amax = smooth_amax(x, inv, K, sm);
        quantize_row_act(type, inv ? sm : x, row_amax, K, out);
        return;
    }
    if (inv) for (int64_t i = 0; i < K; i++) sm[i] = x[i] * inv[i];
    quantize_levels(inv ? sm : x, K, out, type == T_Q7_A7 ? 63.f : 127.f, (uint8_t)act_offset(type), -1.f);
}
API void quantize_act(int type, const float* x, int64_t K, xblock* out) { quantize_act_smooth(type, x, NULL, K, out); }
/* n rows of K (x: n x K floats) as quantize_act quantizes each: out n x K / 32 blocks (millis.encoder.splade) */
API void quantize_act_rows(int type, const float* x, int64_t n, int64_t K, xblock* out) {
    for (int64_t t = 0; t < n; t++) quantize_act(type, x + t * K, K, out + t * (K / 32));
}

/* K-quant 6-bit scale and min of sub-block j (0..7) */
void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* Block i (of 32 values) of a row: its integers w[32] (signed), per-half scales sc[2] (values 0..15
   use sc[0], 16..31 sc[1]) and offset mn: value = sc * w + mn. The scalar definition of each format. */
void decode_block(int type, const uint8_t* row, int64_t i, int8_t* w, float* sc, float* mn) {
    *mn = 0.f;
    switch (type) {
    case T_Q8_0: case T_Q8_0_X16: case T_Q7_0: case T_Q7_A7: case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW: {
        const block_q8_0* b = (const block_q8_0*)row + i;
        memcpy(w, b->qs, 32); sc[0] = sc[1] = f16_to_f32(b->d); return; }
    case T_Q4_0: {
        const block_q4_0* b = (const block_q4_0*)row + i;
        for (int l = 0; l < 16; l++) { w[l] = (int8_t)((b->qs[l] & 0xF) - 8); w[l + 16] = (int8_t)((b->qs[l] >> 4) - 8); }
        sc[0] = sc[1] = f16_to_f32(b->d); return; }
    case T_Q4_1: {
        const block_q4_1* b = (const block_q4_1*)row + i;
        for (int l = 0; l < 16; l++) { w[l] = (int8_t)(b->qs[l] & 0xF); w[l + 16] = (int8_t)(b->qs[l] >> 4); }
        sc[0] = sc[1] = f16_to_f32(b->d); *mn = f16_to_f32(b->m); return; }
    case T_Q5_0: case T_Q5_1: {  /* bit j of qh is value j's fifth bit */
        const uint8_t *qh, *qs;
        if (type == T_Q5_0) {
            const block_q5_0* b = (const block_q5_0*)row + i;
            qh = b->qh; qs = b->qs; sc[0] = sc[1] = f16_to_f32(b->d);
        } else {
            const block_q5_1* b = (const block_q5_1*)row + i;
            qh = b->qh; qs = b->qs; sc[0] = sc[1] = f16_to_f32(b->d); *mn = f16_to_f32(b->m);
        }
        uint32_t h; memcpy(&h, qh, 4);
        const int off = type == T_Q5_0 ? 16 : 0;
        for (int l = 0; l < 16; l++) {
            w[l] = (int8_t)(((qs[l] & 0xF) | (((h >> l) & 1) << 4)) - off);
            w[l + 16] = (int8_t)(((qs[l] >> 4) | (((h >> (l + 16)) & 1) << 4)) - off);
        }
        return; }
    case T_Q4_K: case T_Q5_K: {
        int sub = (int)(i & 7), s, m;
        const uint8_t *scales, *qs;
        float d, dmin;
        if (type == T_Q4_K) {
            const block_q4_K* b = (const block_q4_K*)row + (i >> 3);
            scales = b->scales; qs = b->qs; d = f16_to_f32(b->d); dmin = f16_to_f32(b->dmin);
            for (int l = 0; l < 32; l++) w[l] = (int8_t)((qs[32 * (sub >> 1) + l] >> (4 * (sub & 1))) & 0xF);
        } else {
            const block_q5_K* b = (const block_q5_K*)row + (i >> 3);
            scales = b->scales; qs = b->qs; d = f16_to_f32(b->d); dmin = f16_to_f32(b->dmin);
            for (int l = 0; l < 32; l++)
                w[l] = (int8_t)(((qs[32 * (sub >> 1) + l] >> (4 * (sub & 1))) & 0xF) | (((b->qh[l] >> sub) & 1) << 4));
        }
        scale_min_k4(sub, scales, &s, &m);
        sc[0] = sc[1] = d * (float)s; *mn = -dmin * (float)m; return; }
    case T_Q6_K: {
        const block_q6_K* b = (const block_q6_K*)row + (i >> 3);
        int sub = (int)(i & 7), n = sub >> 2, k = sub & 3;
        const uint8_t* ql = b->ql + 64 * n + 32 * (k & 1);
        const uint8_t* qh = b->qh + 32 * n;
        for (int l = 0; l < 32; l++)
            w[l] = (int8_t)((((ql[l] >> (4 * (k >> 1))) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4)) - 32);
        float d = f16_to_f32(b->d);
        sc[0] = d * (float)b->scales[8 * n + 2 * k]; sc[1] = d * (float)b->scales[8 * n + 2 * k + 1]; return; }
    }
}

API void dequant_row(int type, const uint8_t* w, int64_t K, float* out) {
    if (type == T_F32) { memcpy(out, w, K * 4); return; }
    if (type == T_F16) { for (int64_t k = 0; k < K; k++) out[k] = f16_to_f32(((const uint16_t*)w)[k]); return; }
    if (type == T_BF16) { for (int64_t k = 0; k < K; k++) out[k] = bf16_to_f32(((const uint16_t*)w)[k]); return; }
    int8_t q[32]; float sc[2], mn;
    for (int64_t i = 0; i < K / QK; i++) {
        decode_block(type, w, i, q, sc, &mn);
        for (int l = 0; l < 32; l++) out[i * QK + l] = sc[l >> 4] * (float)q[l] + mn;
    }
}

/* Float weight types against fp32 activations: T tokens x 2 rows per pass (prefill: each weight
   load feeds T tokens), one accumulator per (token, row) summed in the same order for every T, so a
   row's result is bit-identical in decode and in prefill. */
#ifdef __AVX2__
static inline __m256 wload8(int type, const uint8_t* row, int64_t k) {
    if (type == T_F32) return _mm256_loadu_ps((const float*)row + k);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)row + k));
    if (type == T_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif
static inline float wscalar(int type, const uint8_t* row, int64_t k) {
    return type == T_F32 ? ((const float*)row)[k] : type == T_F16 ? f16_to_f32(((const uint16_t*)row)[k])
                                                                   : bf16_to_f32(((const uint16_t*)row)[k]);
}
/* out[t * 2 + r] = <row r, x[t]> for r < R (1 or 2), t < T (1..4); x rows K apart */
static void float_tile(int type, const uint8_t* w0, int64_t rb, int R, const float* x, int64_t K, int T, float* out) {
    int64_t k = 0;
#ifdef __AVX2__
    __m256 acc[4][2];
    for (int t = 0; t < 4; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    if (R == 2 && T == 4) {  /* the hot case, fully unrolled */
        for (; k + 8 <= K; k += 8) {
            const __m256 a = wload8(type, w0, k), b = wload8(type, w0 + rb, k);
            for (int t = 0; t < 4; t++) {
                const __m256 xv = _mm256_loadu_ps(x + t * K + k);
                acc[t][0] = _mm256_fmadd_ps(a, xv, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(b, xv, acc[t][1]);
            }
        }
    } else if (R == 2 && T == 1) {  /* decode: two rows against one token */
        __m256 a0 = acc[0][0], a1 = acc[0][1];
        for (; k + 8 <= K; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(wload8(type, w0, k), xv, a0);
            a1 = _mm256_fmadd_ps(wload8(type, w0 + rb, k), xv, a1);
        }
        acc[0][0] = a0; acc[0][1] = a1;
    } else {
        for (; k + 8 <= K; k += 8)
            for (int r = 0; r < R; r++) {
                const __m256 a = wload8(type, w0 + r * rb, k);
                for (int t = 0; t < T; t++) acc[t][r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + t * K + k), acc[t][r]);
            }
    }
    for (int t = 0; t < T; t++) for (int r = 0; r < R; r++) out[t * 2 + r] = hsum8(acc[t][r]);
#else
    for (int t = 0; t < T; t++) for (int r = 0; r < R; r++) out[t * 2 + r] = 0.f;
#endif
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++)
            for (int64_t j = k; j < K; j++) out[t * 2 + r] += wscalar(type, w0 + r * rb, j) * x[t * K + j];
}

/* scalar reference: the same integer sums per block */
static float dot_blocks(int type, const uint8_t* row, const xblock* x, int64_t nb) {
    float r = 0.f; int8_t w[32]; float sc[2], mn;
    for (int64_t i = 0; i < nb; i++) {
        decode_block(type, row, i, w, sc, &mn);
        int s0 = 0, s1 = 0;
        for (int l = 0; l < 16; l++) { s0 += w[l] * x[i].q[l]; s1 += w[l + 16] * x[i].q[l + 16]; }
        /* (mn is 0 for the row types, whose blocks carry no s in the SIMD builds: ROW_BLOCKS_DQ) */
        r += x[i].d * (sc[0] * (float)s0 + sc[1] * (float)s1) + (mn != 0.f ? mn * x[i].s : 0.f);
    }
    return r;
}

#define MTILE 64 /* activation rows per pass over the weight rows (they stay in cache meanwhile) */

void matmul_rows(const mat* W, int64_t n0, int64_t n1, const void* Xq, const float* Xf, int64_t M,
                 float* Y, int64_t ldy, int acc) {
    const int64_t K = W->cols, nb = K / QK;
    if (W->packed && W->type == T_BF16_AMX) { amx_rows(W, n0, n1, Xq, M, Y, ldy, acc); return; }
    if (W->tiles && M >= 16) { amxq_rows(W, n0, n1, Xq, M, Y, ldy, acc); return; }  /* prefill on AMX */
#ifdef __AVX2__
    if (W->packed) { packed_rows(W, n0, n1, Xq, Xf, M, Y, ldy, acc); return; }
#endif
    if (is_float_type(W->type)) {  /* float weights: rows in pairs x tokens in fours */
        for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
            const int64_t m1 = m0 + MTILE < M ? m0 + MTILE : M;
            for (int64_t n = n0; n < n1; n += 2) {
                const uint8_t* row = W->data + n * W->row_bytes;
                const int R = n + 2 <= n1 ? 2 : 1;
                if (M == 1 && n + PREFETCH_ROWS + R <= W->rows)  /* decode: the rows PREFETCH_ROWS ahead */
                    for (int64_t b = 0; b < R * W->row_bytes; b += 64)
                        __builtin_prefetch(row + PREFETCH_ROWS * W->row_bytes + b);
                for (int64_t m = m0; m < m1; m += 4) {
                    const int T = m + 4 <= m1 ? 4 : (int)(m1 - m);
                    float out[8];
                    float_tile(W->type, row, W->row_bytes, R, Xf + m * K, K, T, out);
                    for (int t = 0; t < T; t++)
                        for (int r = 0; r < R; r++) {
                            float* y = Y + (m + t) * ldy + n + r;
                            *y = acc ? *y + out[t * 2 + r] : out[t * 2 + r];
                        }
                }
            }
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++)  /* GGUF's layout: the scalar reference */
        for (int64_t m = 0; m < M; m++) {
            const uint8_t* row = W->data + n * W->row_bytes;
            const int bf16 = W->type == T_BF16_PAIRS || W->type == T_BF16_AMX;  /* row-major bf16 */
            const float v = W->type == T_Q8_0_X16 ? dot16_blocks(row, (const x16block*)Xq + m * nb, nb)
                            : bf16                ? dot_bf16((const uint16_t*)row, (const uint16_t*)Xq + m * K, K)
                                                  : dot_blocks(W->type, row, (const xblock*)Xq + m * nb, nb);
            float* y = Y + m * ldy + n;
            *y = acc ? *y + v : v;
        }
}

/* matmul_rows, and `more` rows (NULL or M 0: none): a row type's packed panels take them in the same pass (the
   SIMD builds off the tile unit), any other matrix in a second call */
void matmul_rows_more(const mat* W, int64_t n0, int64_t n1, const void* Xq, const float* Xf, int64_t M, float* Y,
                      int64_t ldy, int acc, const more_rows* more) {
    if (!more || more->M <= 0) { matmul_rows(W, n0, n1, Xq, Xf, M, Y, ldy, acc); return; }
#ifdef __AVX2__
    if (M > 0 && W->packed && is_row_type(W->type) && !(W->tiles && M >= 16)) {
        packed_rows_more(W, n0, n1, Xq, Xf, M, Y, ldy, acc, more);
        return;
    }
#endif
    if (M > 0) matmul_rows(W, n0, n1, Xq, Xf, M, Y, ldy, acc);
    /* where the tile unit took the tokens, it takes the more rows too (the same bits): its tiles of these rows are
       in cache now, where the packed panels are a second copy of the weights, read from memory again (BERT-base
       int8-row b1xs16 on Sapphire Rapids: 2.1x int7-row's time) */
    if (W->tiles && M >= 16) { amxq_rows(W, n0, n1, more->X, more->M, more->Y, more->ldy, 0); return; }
    matmul_rows(W, n0, n1, more->X, NULL, more->M, more->Y, more->ldy, 0);
}

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);

typedef struct { const mat* W; const void* Xq; const float* Xf; int64_t M; float* Y; int64_t ldy, per; int acc;
                 const more_rows* more; } mm_args;
static void mm_chunk1(void* p, int64_t c) {
    const mm_args* a = p;
    const int64_t n0 = c * a->per, n1 = n0 + a->per < a->W->rows ? n0 + a->per : a->W->rows;
    matmul_rows_more(a->W, n0, n1, a->Xq, a->Xf, a->M, a->Y, a->ldy, a->acc, a->more);
}

static void run_chunks(mm_args* a, int nthreads) {  /* a's rows in chunks of `per` over the pool's threads */
    if (nthreads < 1) nthreads = 1;
    if (a->W->rows > 16 * 8 * nthreads) a->per = (a->W->rows / (8 * nthreads) + 15) / 16 * 16;
    pool_begin(nthreads);
    pool_run(mm_chunk1, a, (a->W->rows + a->per - 1) / a->per);
    pool_end();
}

API void matmul(const mat* W, const void* Xq, const float* Xf, int64_t M, float* Y, int64_t ldy, int acc,
                int nthreads) {
    mm_args a = {W, Xq, Xf, M, Y, ldy, 16, acc, NULL};
    run_chunks(&a, nthreads);
}
/* matmul, and M2 more rows X2 (quantized blocks, K / 32 a row) written into Y2 (ldy2 apart) in the same pass
   (matmul_rows_more; the tests hold it to two matmul calls' bits) */
API void matmul_more(const mat* W, const void* Xq, int64_t M, float* Y, int64_t ldy, int acc, const void* X2,
                     int64_t M2, float* Y2, int64_t ldy2, int nthreads) {
    const more_rows more = {X2, M2, Y2, ldy2};
    mm_args a = {W, Xq, NULL, M, Y, ldy, 16, acc, &more};
    run_chunks(&a, nthreads);
}
