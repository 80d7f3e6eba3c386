/* Packed weights for the AVX2 kernels: every block format re-laid once at load, 8 rows interleaved.

   Why: in GGUF's layout a row's blocks are contiguous, so a dot product per row pays, per 32 values,
   an fp16 scale conversion, an int -> float conversion, a scale multiply and an FMA, then a
   horizontal sum per row. Packed, one 32-byte load holds 4 consecutive values of each of 8 rows, so
   maddubs against 4 activation values broadcast gives all 8 rows' partial sums in one vector: the
   float work (scales, conversion, FMA) is done once per 8 rows, no horizontal sums remain (lane r is
   row r), and the whole matrix streams as one sequential read (what the hardware prefetcher does best).
   llama.cpp repacks Q4_0 / Q4_K the same way on AVX2 ("CPU_REPACK", block_q4_0x8).

   Layout: groups of 8 rows (the last one padded with zero rows), each a run of units; a unit is one
   32-value block (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or one 256-value super-block (Q4_K, Q5_K, Q6_K):
     simple:  d[8] fp16 | m[8] fp16 (Q4_1, Q5_1) or wsum[8] int16 (Q7_0 on AVX2) | payload
     Q4/5_K:  d[8] fp16 | dmin[8] fp16 | scale[8 sub][8 rows] u8 | min[8 sub][8 rows] u8 | 8 payloads
     Q6_K:    d[8] fp16 | scale[16 halves][8 rows] i8 | 8 payloads
   A payload holds one 32-value block of the 8 rows in 8 steps; step s is values 4s..4s+3:
     4-bit: 128 bytes, byte 32 * (s % 4) + 4 * r + j holds step s's value j of row r in its low
            nibble (s < 4) or high nibble (s >= 4);
     5-bit: the 4-bit part, then 8 words of 32 bits: bit 4 * r + j of word s = the fifth bit;
     6-bit: the 4-bit part, then 64 bytes: bits 2 * (s % 4) of byte 32 * (s / 4) + 4 * r + j;
     8-bit: 256 bytes, byte 32 * s + 4 * r + j.
   Values are stored unsigned as GGUF's bits are (Q4_0 w + 8, Q5_0 w + 16, Q6_K w + 32; Q8_0 signed, or w + 128
   in VNNI builds: Q8_ZERO);
   millis's Q7_0 (values in [-63, 63]): signed on AVX2, with its 8 rows' block sums after d (d[8] fp16 |
   wsum[8] int16 | payload), against activations made unsigned (act_offset: q + 64 for T_Q7_A7, q + 128 for
   T_Q7_0). maddubs then reads each weight vector straight from memory as its signed operand (pairs at most
   2 * 127 * 63 or 2 * 255 * 63), the registers hold only accumulators and broadcasts, and off * wsum comes
   off once per block and row (packed_q7.h's q7s_tile).
   VNNI builds store w + 64 (vpdpbusd's unsigned operand) against the signed activations.

   Numerics: the integer sums of a block are exact (int16 partial sums stay below 2^15: 4 steps of
   pairs at most 2 * 31 * 127 for 5 bits, 8 steps of 2 * 15 * 127 for 4, 2 steps of 2 * 63 * 127 for Q6_K's
   unsigned 6 bits); then per 32 values and row
   acc += float(isum) * (d * dx), and the offsets of Q4_1 / Q5_1 / K-quant mins in their own sum. A
   row's operations are the same for 1 and for 4 tokens, so its result never depends on batch-mates. */
#pragma once
#include "blockq.h"

#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define AI static inline __attribute__((always_inline))
/* Q8_0's stored offset in this build: VNNI builds store w + 128 (vpdpbusd takes it as its unsigned operand:
   no sign fix-ups, no int16 stage that could saturate; 128 x the block's activation sum comes off once per
   block, as for Q7_0); AVX2 builds store w (maddubs(|w|, sign(x, w)): w + 128 would saturate its pairs). */
#define Q8_ZERO (HAVE_VNNI ? 128 : 0)
/* Q7_0 / Q7_A7 stored signed, activations unsigned (above): every AVX2 build without packed512.h's tiles */
#if defined(__AVX2__) && !(defined(__AVX512BW__) && defined(__AVX512VNNI__))
#define Q7_SIGNED 1
#else
#define Q7_SIGNED 0
#endif
/* AVX-512 builds store T_Q7_ROW / T_Q7_ROW8 groups in pairs (repack.c): per unit d[16] fp16 | wsum[16] int16 |
   8 steps of 64 bytes (the pair's first group's 32, then its second's), so q7r_tile512 loads 16 rows' step
   as one vector, not two 32-byte loads and an insert (Zen 4: a gain inside the VM's noise); unit 1's head
   holds instead the 16 rows' weight sums over the whole row (int32), which the tile reads once. A matrix's
   last group, when alone, keeps the 8-row unit. Chunks start at multiples of 16 rows (mm_jobs.h). */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PAIRED_ROWS 1
#else
#define PAIRED_ROWS 0
#endif
static inline int paired(int type, int64_t g, int64_t rows) {  /* group g is stored in a pair */
    return PAIRED_ROWS && is_row_type(type) && (g | 1) * 8 < rows;
}
#define PF_BYTES pf_distance() /* decode: software prefetch this far ahead of the stream (blockq.h) */

static inline int kind_of(int type) {  /* bits per stored value, 0 when the type is not packed */
    switch (type) {
        case T_Q4_0: case T_Q4_1: case T_Q4_K: return 4;
        case T_Q5_0: case T_Q5_1: case T_Q5_K: return 5;
        case T_Q6_K: return 6;
        case T_Q8_0: case T_Q7_0: case T_Q7_A7: case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW: return 8;
        default: return 0;
    }
}
/* stored value - value, per packed type: the one offset rule of repack.c and the kernels */
static inline int stored_offset(int type) {
    switch (type) {
        case T_Q4_0: return 8;
        case T_Q5_0: return 16;
        case T_Q6_K: return 32;
        case T_Q7_0: case T_Q7_A7: return Q7_SIGNED ? 0 : 64;
        case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW: return 0;  /* every SIMD build: q7r_tile's layout */
        case T_Q8_0: return Q8_ZERO;
        default: return 0;
    }
}
/* activation value as the kernels take it - quantized value, per matrix type (quantize_act adds it) */
static inline int act_offset(int type) {
#ifdef __AVX2__
    /* every SIMD build (q7r_tile); the scalar build takes them signed, and so does the avx2 build's T_Q8_ROW */
    if (is_row_type(type)) return type == T_Q7_ROW ? 64 : type == T_Q7_ROW8 || PAIRED_ROWS ? 128 : 0;
#endif
    return !Q7_SIGNED ? 0 : type == T_Q7_A7 ? 64 : type == T_Q7_0 ? 128 : 0;
}
/* r[0..K) -= what activation blocks q (quantize_act's for `type`) dequantize to: the rounding's residual, which
   int8-row's ends quantize again (the encoder's ends_rows.h, the decoder's ends_llama.h) */
static inline void sub_dequant(int type, const xblock* q, int64_t K, float* r) {
    const uint8_t off = (uint8_t)act_offset(type);
    for (int64_t b = 0; b < K / QK; b++) {
        const float d = q[b].d;
        const uint8_t* qb = (const uint8_t*)q[b].q;
        float* rb = r + b * QK;
        for (int i = 0; i < QK; i++) rb[i] -= (float)(int8_t)(uint8_t)(qb[i] - off) * d;
    }
}
static inline int is_super(int type) { return type == T_Q4_K || type == T_Q5_K || type == T_Q6_K; }
static inline int payload_bytes(int kind) { return kind == 4 ? 128 : kind == 5 ? 160 : kind == 6 ? 192 : 256; }
static inline int head_bytes(int type) {
    switch (type) {
        case T_Q4_1: case T_Q5_1: return 32;
        case T_Q7_0: case T_Q7_A7: return Q7_SIGNED ? 32 : 16;
        case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW: return 32;
        case T_Q4_K: case T_Q5_K: return 160;
        case T_Q6_K: return 144;
        default: return 16;
    }
}
static inline int64_t unit_bytes(int type) { return head_bytes(type) + (is_super(type) ? 8 : 1) * payload_bytes(kind_of(type)); }
static inline int64_t units(const mat* W) { return W->cols / (is_super(W->type) ? QK_K : QK); }

#ifdef __AVX2__
/* rows [8g, 8g + 8) of tokens m..m+T-1 from out[8 * t]: Y (+)= out, rows at or past n1 skipped */
static inline void store_group(float* Y, int64_t ldy, int64_t m, int T, int64_t g, int64_t n1, const float* out, int ostride,
                        int acc) {
    for (int t = 0; t < T; t++) {
        float* y = Y + (m + t) * ldy + g * 8;
        const float* o = out + ostride * t;
        if (g * 8 + 8 <= n1) {
            const __m256 v = _mm256_loadu_ps(o);
            _mm256_storeu_ps(y, acc ? _mm256_add_ps(_mm256_loadu_ps(y), v) : v);
        } else {
            for (int r = 0; g * 8 + r < n1; r++) y[r] = acc ? y[r] + o[r] : o[r];
        }
    }
}
#endif
