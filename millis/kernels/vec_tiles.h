/* The tile operations of the encoder's attention (amx_attend.h's ATT_FN) on AVX-512 BF16 vectors: amx.c's
   attend_vec, for CPUs with vdpbf16ps and no tile unit (Zen 4 / 5; Sapphire Rapids with the tile unit off).
   Zen 4 runs a 512-bit vdpbf16ps (32 multiply-adds) at about the rate of a 512-bit fp32 FMA (16), so the same
   phases as on the tiles do the products of the fp32 path (two GEMMs on the AVX kernels) at twice the rate.

   A loaded tile is its address and stride only: TLOAD reads nothing, TDP reads the operands in place (ATT_FN's
   A and B tiles are its job's buffers, unchanged between a TLOAD and the TDPs that use it). An accumulator tile
   (TZERO, TDP's c, TSTORE) is 16 x 16 fp32 in vt_acc. TDP c += a . b: b's 16 rows (pairs of values) in 16
   registers, a row's pair p broadcast against row p, 8 rows of c at once (8 independent chains of 16 products).
   vdpbf16ps adds a pair's two exact products in its own order (the SDM: value 2p + 1 first), so the sums agree
   with the C form and the tile unit to fp32 rounding, not bit for bit. */
#pragma once
typedef struct {
    const uint8_t* p;
    int64_t s;
} vt_ref;
static __thread vt_ref vt_src[8];                                   /* loaded tiles: 16 rows, s bytes apart */
static __thread float vt_acc[8][16][16] __attribute__((aligned(64))); /* accumulator tiles */
/* TZERO only marks a tile: the next TDP starts from zero registers, not a 1 KB memset read back (bge-small
   b1xs128, Zen 4, ad hoc: the score phase 1.12-1.14 M cycles a forward against 1.25-1.29) */
static __thread int vt_zero[8];
static inline void vt_tzero(int t) { vt_zero[t] = 1; }

static inline void vt_dp(int c, int a, int b) {
    const uint8_t *A = vt_src[a].p, *B = vt_src[b].p;
    const int64_t as = vt_src[a].s, bs = vt_src[b].s;
    __m512bh w[16];
#pragma GCC unroll 16
    for (int p = 0; p < 16; p++) w[p] = (__m512bh)_mm512_loadu_si512(B + p * bs);
    const int z = vt_zero[c];
    vt_zero[c] = 0;
    for (int m0 = 0; m0 < 16; m0 += 8) {
        __m512 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i] = z ? _mm512_setzero_ps() : _mm512_load_ps(vt_acc[c][m0 + i]);
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++)
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                int32_t x;
                memcpy(&x, A + (m0 + i) * as + 4 * p, 4);
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(x), w[p]);
            }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) _mm512_store_ps(vt_acc[c][m0 + i], acc[i]);
    }
}
static inline void vt_store(int t, void* p, int64_t s) {
    for (int r = 0; r < 16; r++)
        _mm512_storeu_ps((uint8_t*)p + r * s, vt_zero[t] ? _mm512_setzero_ps() : _mm512_load_ps(vt_acc[t][r]));
}
