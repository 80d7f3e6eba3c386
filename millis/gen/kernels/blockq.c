/* Block-quantized matmul for CPU: GGUF's F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
   weights against activations quantized per block of 32 (xblock), built by millis/gen/kernels/native.py.

   Numerics (as llama.cpp): a weight block decodes to 32 small integers w with a scale (and for Q4_1 /
   K-quants an offset); <w, x> = dw * dx * sum(w * q) (+ offset * s). Integer products use
   maddubs(|w| or w unsigned, x): every weight is within [-63, 63] (Q8_0: [-127, 127]) and every
   activation within [-127, 127], so the int16 pair sums (<= 2 * 127 * 127) never saturate.

   ISA: the AVX2 + FMA + F16C path below; compiled without AVX2 the scalar path (the reference the
   tests compare against: same integer sums, plain loops). One row kernel per format, for 1 and for
   4 activation rows at once (prefill: a weight block is decoded once for four tokens). */
#include "blockq.h"

#define PREFETCH_ROWS 8 /* decode: weight rows prefetched this far ahead (see the pair kernels) */

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
        case T_Q8_0: case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: return QK;
        case T_Q4_K: case T_Q5_K: case T_Q6_K: return QK_K;
        default: return 1;
    }
}

int is_float_type(int type) { return type == T_F32 || type == T_F16 || type == T_BF16; }

API void quantize_x(const float* x, int64_t K, xblock* out) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float* r = x + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; i++) { float v = fabsf(r[i]); amax = v > amax ? v : amax; }
        float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int i = 0; i < QK; i++) { int v = (int)nearbyintf(r[i] * id); out[b].q[i] = (int8_t)v; sum += v; }
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

/* K-quant 6-bit scale and min of sub-block j (0..7) */
static inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* Block i (of 32 values) of a row: its integers w[32] (signed), per-half scales sc[2] (values 0..15
   use sc[0], 16..31 sc[1]) and offset mn: value = sc * w + mn. The scalar definition of each format. */
static void decode_block(int type, const uint8_t* row, int64_t i, int8_t* w, float* sc, float* mn) {
    *mn = 0.f;
    switch (type) {
    case T_Q8_0: {
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

#ifdef __AVX2__
static inline __m256i mul_ss(__m256i w, __m256i x) {  /* 8 int32 sums of 4 products each, w signed */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
static inline __m256i mul_us(__m256i w, __m256i x) {  /* w unsigned (0..63) */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
static inline __m256i nibbles16(const uint8_t* qs) {  /* 16 bytes -> 32 values: low nibbles, then high */
    __m128i t = _mm_loadu_si128((const __m128i*)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0xF));
}

/* ROWS(NAME, M, UNSIGNED, DEC): the kernel of one format for M activation rows. DEC decodes block i
   of `row` into wq (__m256i), sc (__m256: the per-lane scale; lanes 0-3 hold values 0..15) and mn.
   Every kernel (these, the pair kernel below) sums a row's blocks in the same order into one
   accumulator: a row's result is bit-identical whatever M, the tiling and the thread split, so a
   request's tokens never depend on its batch-mates. */
#define STEP(I, A, O, UNSIGNED, DEC) {                                                                 \
        const int64_t i = (I); __m256i wq; __m256 sc; float mn = 0.f;                                  \
        DEC()                                                                                          \
        for (int j = 0; j < M_; j++) {                                                                 \
            const xblock* xb = x + j * xs + i;                                                         \
            const __m256i xq = _mm256_loadu_si256((const __m256i*)xb->q);                             \
            const __m256i p = UNSIGNED ? mul_us(wq, xq) : mul_ss(wq, xq);                              \
            A[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sc, _mm256_set1_ps(xb->d)), A[j]); \
            O[j] += mn * xb->s;                                                                        \
        } }
#define ROWS(NAME, M, UNSIGNED, DEC)                                                                   \
static void NAME(const uint8_t* row, const xblock* x, int64_t xs, int64_t nb, float* out) {           \
    enum { M_ = M };                                                                                   \
    __m256 a0[M]; float o0[M];                                                                         \
    for (int j = 0; j < M; j++) { a0[j] = _mm256_setzero_ps(); o0[j] = 0.f; }                          \
    for (int64_t i2 = 0; i2 < nb; i2++) STEP(i2, a0, o0, UNSIGNED, DEC)                                \
    for (int j = 0; j < M; j++) out[j] = hsum8(a0[j]) + o0[j];                                          \
}

#define DEC_Q8_0() const block_q8_0* b = (const block_q8_0*)row + i;                                   \
    wq = _mm256_loadu_si256((const __m256i*)b->qs); sc = _mm256_set1_ps(f16_to_f32(b->d));
#define DEC_Q4_0() const block_q4_0* b = (const block_q4_0*)row + i;                                   \
    wq = _mm256_sub_epi8(nibbles16(b->qs), _mm256_set1_epi8(8)); sc = _mm256_set1_ps(f16_to_f32(b->d));
#define DEC_Q4_1() const block_q4_1* b = (const block_q4_1*)row + i;                                   \
    wq = nibbles16(b->qs); sc = _mm256_set1_ps(f16_to_f32(b->d)); mn = f16_to_f32(b->m);
/* 32 bits -> 32 bytes, 0xFF where the bit is set (llama.cpp's bytes_from_bits_32) */
static inline __m256i bits32(const uint8_t* p) {
    uint32_t v; memcpy(&v, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i b = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf),
                                      _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
#define DEC_Q5_0() const block_q5_0* b = (const block_q5_0*)row + i;  /* (q | h << 4) - 16: h ? q : q | 0xF0 */ \
    wq = _mm256_or_si256(nibbles16(b->qs), _mm256_andnot_si256(bits32(b->qh), _mm256_set1_epi8((char)0xF0))); \
    sc = _mm256_set1_ps(f16_to_f32(b->d));
#define DEC_Q5_1() const block_q5_1* b = (const block_q5_1*)row + i;                                   \
    wq = _mm256_or_si256(nibbles16(b->qs), _mm256_and_si256(bits32(b->qh), _mm256_set1_epi8(0x10)));  \
    sc = _mm256_set1_ps(f16_to_f32(b->d)); mn = f16_to_f32(b->m);
#define DEC_KMIN(BT, QH)                                                                               \
    const BT* b = (const BT*)row + (i >> 3); const int sub = (int)(i & 7); int s_, m_;                 \
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(b->qs + 32 * (sub >> 1)));                \
    wq = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (sub & 1)), _mm256_set1_epi8(0xF));              \
    QH                                                                                                 \
    scale_min_k4(sub, b->scales, &s_, &m_);                                                            \
    sc = _mm256_set1_ps(f16_to_f32(b->d) * (float)s_); mn = -f16_to_f32(b->dmin) * (float)m_;
#define DEC_Q4_K() DEC_KMIN(block_q4_K, )
#define DEC_Q5_K() DEC_KMIN(block_q5_K,                                                                 \
    const __m256i h_ = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)b->qh), sub), \
                                        _mm256_set1_epi8(1));                                          \
    wq = _mm256_or_si256(wq, _mm256_slli_epi16(h_, 4));)
#define DEC_Q6_K() const block_q6_K* b = (const block_q6_K*)row + (i >> 3);                            \
    const int sub = (int)(i & 7), n_ = sub >> 2, k_ = sub & 3;                                         \
    const __m256i ql_ = _mm256_loadu_si256((const __m256i*)(b->ql + 64 * n_ + 32 * (k_ & 1)));        \
    const __m256i qh_ = _mm256_loadu_si256((const __m256i*)(b->qh + 32 * n_));                        \
    const __m256i lo_ = _mm256_and_si256(_mm256_srli_epi16(ql_, 4 * (k_ >> 1)), _mm256_set1_epi8(0xF)); \
    const __m256i hi_ = _mm256_and_si256(_mm256_srli_epi16(qh_, 2 * k_), _mm256_set1_epi8(3));        \
    wq = _mm256_sub_epi8(_mm256_or_si256(lo_, _mm256_slli_epi16(hi_, 4)), _mm256_set1_epi8(32));      \
    const float d_ = f16_to_f32(b->d);                                                                 \
    sc = _mm256_set_m128(_mm_set1_ps(d_ * b->scales[8 * n_ + 2 * k_ + 1]), _mm_set1_ps(d_ * b->scales[8 * n_ + 2 * k_]));

ROWS(rows1_q8_0, 1, 0, DEC_Q8_0) ROWS(rows4_q8_0, 4, 0, DEC_Q8_0)
ROWS(rows1_q4_0, 1, 0, DEC_Q4_0) ROWS(rows4_q4_0, 4, 0, DEC_Q4_0)
ROWS(rows1_q4_1, 1, 1, DEC_Q4_1) ROWS(rows4_q4_1, 4, 1, DEC_Q4_1)
ROWS(rows1_q5_0, 1, 0, DEC_Q5_0) ROWS(rows4_q5_0, 4, 0, DEC_Q5_0)
ROWS(rows1_q5_1, 1, 1, DEC_Q5_1) ROWS(rows4_q5_1, 4, 1, DEC_Q5_1)
ROWS(rows1_q4_k, 1, 1, DEC_Q4_K) ROWS(rows4_q4_k, 4, 1, DEC_Q4_K)
ROWS(rows1_q5_k, 1, 1, DEC_Q5_K) ROWS(rows4_q5_k, 4, 1, DEC_Q5_K)
ROWS(rows1_q6_k, 1, 0, DEC_Q6_K) ROWS(rows4_q6_k, 4, 0, DEC_Q6_K)

/* decode (one token): two weight rows per pass share each activation block's load and scale. The
   weights stream from memory once per token: software prefetch PREFETCH_ROWS rows ahead keeps more
   cache-line fills in flight than the hardware prefetcher does across 4 KiB pages. */

#define HALF(R, A, O, UNSIGNED, DEC) {                                                                 \
        const uint8_t* row = (R); __m256i wq; __m256 sc; float mn = 0.f;                               \
        DEC()                                                                                          \
        const __m256i p = UNSIGNED ? mul_us(wq, xq) : mul_ss(wq, xq);                                  \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sc, dx), A);                          \
        O += mn * xb->s; }
#define PAIR(NAME, UNSIGNED, DEC)                                                                      \
static void NAME(const uint8_t* r0, const uint8_t* r1, const xblock* x, int64_t nb, float* out) {     \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0; float o0 = 0.f, o1 = 0.f;                                \
    const int64_t rb = r1 - r0, ahead = PREFETCH_ROWS * rb;  /* the rows PREFETCH_ROWS ahead */         \
    for (int64_t i = 0; i < nb; i++) {                                                                 \
        const xblock* xb = x + i;                                                                      \
        if ((i & 1) == 0) { __builtin_prefetch(r0 + ahead + i * rb / nb);                              \
                            __builtin_prefetch(r1 + ahead + i * rb / nb); }                            \
        const __m256i xq = _mm256_loadu_si256((const __m256i*)xb->q);                                 \
        const __m256 dx = _mm256_set1_ps(xb->d);                                                       \
        HALF(r0, a0, o0, UNSIGNED, DEC) HALF(r1, a1, o1, UNSIGNED, DEC)                                \
    }                                                                                                  \
    out[0] = hsum8(a0) + o0; out[1] = hsum8(a1) + o1;                                                    \
}
PAIR(pair_q8_0, 0, DEC_Q8_0) PAIR(pair_q4_0, 0, DEC_Q4_0) PAIR(pair_q4_1, 1, DEC_Q4_1)
PAIR(pair_q5_0, 0, DEC_Q5_0) PAIR(pair_q5_1, 1, DEC_Q5_1)
PAIR(pair_q4_k, 1, DEC_Q4_K) PAIR(pair_q5_k, 1, DEC_Q5_K) PAIR(pair_q6_k, 0, DEC_Q6_K)

typedef void (*pair_fn)(const uint8_t*, const uint8_t*, const xblock*, int64_t, float*);
static pair_fn pair_of(int type) {
    switch (type) {
        case T_Q8_0: return pair_q8_0;
        case T_Q4_0: return pair_q4_0;
        case T_Q4_1: return pair_q4_1;
        case T_Q5_0: return pair_q5_0;
        case T_Q5_1: return pair_q5_1;
        case T_Q4_K: return pair_q4_k;
        case T_Q5_K: return pair_q5_k;
        default: return pair_q6_k;
    }
}

typedef void (*rows_fn)(const uint8_t*, const xblock*, int64_t, int64_t, float*);
static void kernels_of(int type, rows_fn* k1, rows_fn* k4) {
    switch (type) {
        case T_Q8_0: *k1 = rows1_q8_0; *k4 = rows4_q8_0; return;
        case T_Q4_0: *k1 = rows1_q4_0; *k4 = rows4_q4_0; return;
        case T_Q4_1: *k1 = rows1_q4_1; *k4 = rows4_q4_1; return;
        case T_Q5_0: *k1 = rows1_q5_0; *k4 = rows4_q5_0; return;
        case T_Q5_1: *k1 = rows1_q5_1; *k4 = rows4_q5_1; return;
        case T_Q4_K: *k1 = rows1_q4_k; *k4 = rows4_q4_k; return;
        case T_Q5_K: *k1 = rows1_q5_k; *k4 = rows4_q5_k; return;
        default: *k1 = rows1_q6_k; *k4 = rows4_q6_k; return;
    }
}
#else
/* scalar reference: the same integer sums per block */
static float dot_blocks(int type, const uint8_t* row, const xblock* x, int64_t nb) {
    float r = 0.f; int8_t w[32]; float sc[2], mn;
    for (int64_t i = 0; i < nb; i++) {
        decode_block(type, row, i, w, sc, &mn);
        int s0 = 0, s1 = 0;
        for (int l = 0; l < 16; l++) { s0 += w[l] * x[i].q[l]; s1 += w[l + 16] * x[i].q[l + 16]; }
        r += x[i].d * (sc[0] * (float)s0 + sc[1] * (float)s1) + mn * x[i].s;
    }
    return r;
}
#endif

#define MTILE 64 /* activation rows per pass over the weight rows (they stay in cache meanwhile) */

void matmul_rows(const mat* W, int64_t n0, int64_t n1, const xblock* Xq, const float* Xf, int64_t M,
                 float* Y, int64_t ldy, int acc) {
    const int64_t K = W->cols, nb = K / QK;
    const int fl = is_float_type(W->type);
#ifdef __AVX2__
    rows_fn k1 = 0, k4 = 0;
    if (!fl) kernels_of(W->type, &k1, &k4);
#endif
#ifdef __AVX2__
    if (M == 1 && !fl) {  /* decode: rows in pairs */
        const pair_fn k2 = pair_of(W->type);
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) {
            float out[2];
            k2(W->data + n * W->row_bytes, W->data + (n + 1) * W->row_bytes, Xq, nb, out);
            Y[n] = acc ? Y[n] + out[0] : out[0];
            Y[n + 1] = acc ? Y[n + 1] + out[1] : out[1];
        }
        for (; n < n1; n++) {
            float out[1];
            k1(W->data + n * W->row_bytes, Xq, nb, nb, out);
            Y[n] = acc ? Y[n] + out[0] : out[0];
        }
        return;
    }
#endif
    if (fl) {  /* float weights: rows in pairs x tokens in fours */
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
    for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
        const int64_t m1 = m0 + MTILE < M ? m0 + MTILE : M;
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t* row = W->data + n * W->row_bytes;
            float out[4];
            for (int64_t m = m0; m < m1;) {
                int cnt = 1;
#ifdef __AVX2__
                if (m + 4 <= m1) { k4(row, Xq + m * nb, nb, nb, out); cnt = 4; }
                else k1(row, Xq + m * nb, nb, nb, out);
#else
                out[0] = dot_blocks(W->type, row, Xq + m * nb, nb);
#endif
                for (int j = 0; j < cnt; j++) {
                    float* y = Y + (m + j) * ldy + n;
                    *y = acc ? *y + out[j] : out[j];
                }
                m += cnt;
            }
        }
    }
}

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);

typedef struct { const mat* W; const xblock* Xq; const float* Xf; int64_t M; float* Y; int64_t ldy, per; int acc; } mm_args;
static void mm_chunk1(void* p, int64_t c) {
    const mm_args* a = p;
    const int64_t n0 = c * a->per, n1 = n0 + a->per < a->W->rows ? n0 + a->per : a->W->rows;
    matmul_rows(a->W, n0, n1, a->Xq, a->Xf, a->M, a->Y, a->ldy, a->acc);
}

API void matmul(const mat* W, const xblock* Xq, const float* Xf, int64_t M, float* Y, int64_t ldy, int acc,
                int nthreads) {
    mm_args a = {W, Xq, Xf, M, Y, ldy, 16, acc};
    if (W->rows > 16 * 8 * nthreads) a.per = (W->rows / (8 * nthreads) + 15) / 16 * 16;
    pool_begin(nthreads);
    pool_run(mm_chunk1, &a, (W->rows + a.per - 1) / a.per);
    pool_end();
}
