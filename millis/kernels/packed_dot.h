/* The AVX2 steps packed.c's kernels share (broadcasts, bit and byte expansions), and Q6_K's payload dot
   product. Included by packed.c inside its __AVX2__ section. */
#pragma once
#include "packed.h"

AI void prefetch_unit(const uint8_t* b, int64_t ub) {  /* decode: PF_BYTES ahead of a stream at b */
    if (PF_BYTES) for (int64_t o = 0; o < ub; o += 64) _mm_prefetch((const char*)b + PF_BYTES + o, _MM_HINT_T0);
}
AI __m256i bcast4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
AI __m256i bits32(const uint8_t* p) {  /* 32 bits -> 32 bytes, 0xFF where the bit is set */
    uint32_t v; memcpy(&v, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i b = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf),
                                      _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
AI __m256i pairs16(__m256i v) { /* int32 lanes -> the same value in both int16 halves (madd multipliers) */
    return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16));
}
AI __m256i load8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
AI __m256i load8s(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }

/* Q6_K's payload (out as payload_dot's): the stored values s = w + 32 (0..63) go to maddubs as they are,
   two steps summed in int16 (pairs at most 2 * 63 * 127: at most 32004) before each madd by the scales,
   and the 32 comes off once per payload: 32 * (sc_lo * X_lo + sc_hi * X_hi) per row, X the activation
   block's sums of values 0..15 and 16..31 (xblock.half), one madd. The same integer sum as w * x with
   sign fix-ups (3 more instructions per step and token), so the same results. */
AI void q6k_dot(const uint8_t* q, const xblock* const* x, const int T, __m256i mlo, __m256i mhi, __m256i* out) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m3 = _mm256_set1_epi8(0x30);
    const __m256i h0 = _mm256_loadu_si256((const __m256i*)(q + 128));
    const __m256i h1 = _mm256_loadu_si256((const __m256i*)(q + 160));
    __m256i acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_si256();
    for (int p = 0; p < 4; p += 2) {  /* steps p, p + 1 (values 4p..4p+7) and p + 4, p + 5 (16 + 4p..) */
        __m256i wl[2], wh[2];
        for (int i = 0; i < 2; i++) {  /* step p + i's 2-bit high parts (bits 2 (p + i)) -> bits 4, 5 */
            const int sh = 2 * (p + i);
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(q + 32 * (p + i)));
            const __m256i bl = sh < 4 ? _mm256_slli_epi16(h0, 4 - sh) : sh > 4 ? _mm256_srli_epi16(h0, sh - 4) : h0;
            const __m256i bh = sh < 4 ? _mm256_slli_epi16(h1, 4 - sh) : sh > 4 ? _mm256_srli_epi16(h1, sh - 4) : h1;
            wl[i] = _mm256_or_si256(_mm256_and_si256(raw, m4), _mm256_and_si256(bl, m3));
            wh[i] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), _mm256_and_si256(bh, m3));
        }
        for (int t = 0; t < T; t++) {
            const int8_t* xq = x[t]->q + 4 * p;
            const __m256i l = _mm256_add_epi16(_mm256_maddubs_epi16(wl[0], bcast4(xq)),
                                               _mm256_maddubs_epi16(wl[1], bcast4(xq + 4)));
            const __m256i h = _mm256_add_epi16(_mm256_maddubs_epi16(wh[0], bcast4(xq + 16)),
                                               _mm256_maddubs_epi16(wh[1], bcast4(xq + 20)));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(l, mlo), _mm256_madd_epi16(h, mhi)));
        }
    }
    const __m256i sc = _mm256_blend_epi16(mlo, mhi, 0xAA);  /* int16 lanes 2r: row r's sc_lo, 2r + 1: sc_hi */
    for (int t = 0; t < T; t++) {
        int32_t halves; memcpy(&halves, x[t]->half, 4);  /* X_lo | X_hi << 16 */
        out[t] = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(_mm256_madd_epi16(sc, _mm256_set1_epi32(halves)), 5));
    }
}
