/* millis's int7 (Q7_0, T_Q7_A7) on AVX2 builds without VNNI (Q7_SIGNED), and T_Q7_ROW / T_Q7_ROW8 (the same signed
   layout with one scale per row and per token) on every SIMD build: the GEMM tiles of packed.c's packed_rows,
   included there. */
#pragma once
#include "packed.h"
#include "packed_dot.h"

/* Q7_0 on AVX2 (Q7_SIGNED, packed.h): R groups (R <= 2) x T tokens (T <= 3). maddubs takes the token's 4
   unsigned values (q + off, broadcast) against 32 weight bytes of 8 rows read from memory as its signed
   operand: the registers hold only accumulators and broadcasts (with the weights as the unsigned operand
   in registers, GCC reloaded one of four each step; Zen 3, one process: MiniLM int7-a7 forward 0.92-0.95x,
   BERT-base unchanged: in L1 the 16 x 3 tile takes 52-60 cycles a block against its multiplies' 36, bound
   by its ~180 vector instructions on 4 pipes). off * wsum comes off once per block and row: the
   same integer sums as x * w, then group_dot's float steps, so every shape gives the same bits and a row
   never depends on its batch-mates. Step loops stay rolled (unrolled, GCC spills a block's products).
   a7 (off 64): maddubs pairs <= 2 * 127 * 63 = 16002, so two steps add in int16 (<= 32004) before one madd:
   3 multiplier-port instructions per 2 steps, not 4. T_Q7_0 (off 128): pairs <= 32130, a madd per step. */
AI __m256i q7s_steps(__m256i xv, __m256i xw, const __m256i* w) {  /* two steps' pairs, added in int16 (a7) */
    return _mm256_add_epi16(_mm256_maddubs_epi16(xv, _mm256_loadu_si256(w)),
                            _mm256_maddubs_epi16(xw, _mm256_loadu_si256(w + 1)));
}
/* a7: steps s and s + 1 of block u, token X, against groups w (and v when R > 1): A (E) += their int32 sums */
#define A7_STEPS(X, A, E) { const __m256i xv = bcast4(X[u].q + 4 * s), xw = bcast4(X[u].q + 4 * s + 4);           \
        A = _mm256_add_epi32(A, _mm256_madd_epi16(q7s_steps(xv, xw, w + s), one));                                \
        if (R > 1) E = _mm256_add_epi32(E, _mm256_madd_epi16(q7s_steps(xv, xw, v + s), one)); }
/* T_Q8_ROW's step: the avx512 build's vpdpbusd (activations + 128); the avx2 build's sign trick (signed ones) */
#if PAIRED_ROWS
#define S8_DOT(A, XV, W) A = _mm256_dpbusd_epi32(A, XV, W)
#else
#define S8_DOT(A, XV, W) A = _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(W), \
                                                                                     _mm256_sign_epi8(XV, W)), one))
#endif
#define S8_STEP(X, A, E) { const __m256i xv = bcast4(X[u].q + 4 * s);                                            \
        S8_DOT(A, xv, _mm256_loadu_si256(w + s));                                                                 \
        if (R > 1) S8_DOT(E, xv, _mm256_loadu_si256(v + s)); }
/* 8-bit (off 128): step s of block u, token X: a madd per step */
#define A8_STEP(X, A, E) { const __m256i xv = bcast4(X[u].q + 4 * s);                                            \
        A = _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, _mm256_loadu_si256(w + s)), one));     \
        if (R > 1) E = _mm256_add_epi32(E, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, _mm256_loadu_si256(v + s)), \
                                                             one)); }
AI void q7s_tile(const int a7, const int R, const int T, const uint8_t* g0, const uint8_t* g1, int64_t nu,
                 const xblock* x, int64_t xs, float* out) {
    const int64_t ub = unit_bytes(T_Q7_0);
    const int shift = a7 ? 6 : 7;  /* off = 1 << shift */
    const __m256i one = _mm256_set1_epi16(1);
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, h0 = f0, h1 = f0, h2 = f0;
    const xblock *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b = g0 + u * ub, *c = g1 + u * ub;
        const __m256i *w = (const __m256i*)(b + 32), *v = (const __m256i*)(c + 32);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, e0 = a0, e1 = a0, e2 = a0;
        if (a7) {
#pragma GCC unroll 1
            for (int s = 0; s < 8; s += 2) {
                A7_STEPS(x0, a0, e0)
                if (T > 1) A7_STEPS(x1, a1, e1)
                if (T > 2) A7_STEPS(x2, a2, e2)
            }
        } else {
#pragma GCC unroll 1
            for (int s = 0; s < 8; s++) {
                A8_STEP(x0, a0, e0)
                if (T > 1) A8_STEP(x1, a1, e1)
                if (T > 2) A8_STEP(x2, a2, e2)
            }
        }
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));
        const __m256i zv = _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(b + 16))), shift);
        const __m256 dw = R > 1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)c)) : dv;
        const __m256i zw =
            R > 1 ? _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(c + 16))), shift) : zv;
#define ACC(X, A, F, E, H) { const __m256 xd = _mm256_set1_ps(X[u].d);                                          \
        F = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(A, zv)), _mm256_mul_ps(dv, xd), F);               \
        if (R > 1) H = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(E, zw)), _mm256_mul_ps(dw, xd), H); }
        ACC(x0, a0, f0, e0, h0)
        if (T > 1) ACC(x1, a1, f1, e1, h1)
        if (T > 2) ACC(x2, a2, f2, e2, h2)
#undef ACC
    }
    const __m256 r[6] = {f0, h0, f1, h1, f2, h2};
    for (int t = 0; t < T; t++)
        for (int i = 0; i < R; i++) _mm256_storeu_ps(out + 16 * t + 8 * i, r[2 * t + i]);
}
/* T_Q7_ROW (every SIMD build): Q7_A7's units and steps, but a row's scale and a token's scale are the same in
   every block, so the int32 sums run over the whole row and the float step comes once per row and token:
   (sum over blocks of (x + 64) * w - 64 * (the row's weight sum)) * d_row * d_token. Per block that drops the
   sub / cvt / mul / fma of q7s_tile's epilogue (in L1 on Zen 3: 1.2x its MACs per cycle, near the
   maddubs / madd mix's own limit). |sums| <= K * 127 * 63: int32 holds K up to 268,000. The same integer
   sums and float steps for every T and R, so a row never depends on its batch-mates.
   a8 (T_Q7_ROW8): 8-bit activations, x + 128 (pairs <= 2 * 255 * 63 = 32130: a madd per step; |sums| <=
   K * 255 * 63, K up to 133,000).
   int8-row (T_Q8_ROW, a8 == 2): weights in [-127, 127]; the avx512 build's vpdpbusd (256-bit: a lone group) takes
   the activations + 128 as ROW8's, the avx2 build's maddubs takes |w| against x * sign(w) (signed activations, off
   0: pairs <= 2 * 127 * 127 = 32258, no saturation). |sums| <= K * 255 * 127: K up to 66,000. */
/* the 8 rows' weight sums over the whole row: repack.c's int32 totals in unit 1's head (a one-unit row: its wsum),
   read once a tile, and the tile's values stored straight into Y where its groups are whole: the avx2 build on
   Zen 4, one panel in L1 (ad hoc), 32.3 -> 36.5 MAC a clock at K 768, 36 -> 37.8 at 3072 (each unit's sums
   converted and added, then the values copied through out and store_group, took ~10% at K 768); forwards
   (bench/native_revisions.py --base the commit before) 0.90-0.96x bge-small's time, 0.93-0.99x BERT-base's. */
AI __m256i row_wsum8(const uint8_t* g, int64_t nu) {
    return nu > 1 ? _mm256_loadu_si256((const __m256i*)(g + unit_bytes(T_Q7_ROW)))
                  : _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(g + 16)));
}
/* y: token t's R x 8 values go straight to y + t * ldy (added to it when acc), else into out[16 * t + 8 * i] */
AI void q7r_tile(const int a8, const int R, const int T, const uint8_t* g0, const uint8_t* g1, int64_t nu,
                 const xblock* x, int64_t xs, float* out, float* y, int64_t ldy, int acc) {
    const int64_t ub = unit_bytes(T_Q7_ROW);
    const __m256i one = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, e0 = a0, e1 = a0, e2 = a0;
    __m256i z0 = row_wsum8(g0, nu), z1 = R > 1 ? row_wsum8(g1, nu) : z0;
    const xblock *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b = g0 + u * ub, *c = g1 + u * ub;
        const __m256i *w = (const __m256i*)(b + 32), *v = (const __m256i*)(c + 32);
        if (a8) {  /* (a8 a constant in each tile: the branch folds) */
#define STEP8(X, A, E) { if (a8 == 2) S8_STEP(X, A, E) else A8_STEP(X, A, E) }
#pragma GCC unroll 1
            for (int s = 0; s < 8; s++) {
                STEP8(x0, a0, e0)
                if (T > 1) STEP8(x1, a1, e1)
                if (T > 2) STEP8(x2, a2, e2)
            }
#undef STEP8
            continue;
        }
#pragma GCC unroll 1
        for (int s = 0; s < 8; s += 2) {
            A7_STEPS(x0, a0, e0)
            if (T > 1) A7_STEPS(x1, a1, e1)
            if (T > 2) A7_STEPS(x2, a2, e2)
        }
    }
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g0));  /* the rows' scales */
    const __m256 dw = R > 1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g1)) : dv;
    const int off = act_offset(a8 == 2 ? T_Q8_ROW : a8 ? T_Q7_ROW8 : T_Q7_ROW);  /* the activations' 0 / 64 / 128 */
    z0 = off ? _mm256_sll_epi32(z0, _mm_cvtsi32_si128(__builtin_ctz(off))) : _mm256_setzero_si256();
    z1 = off ? _mm256_sll_epi32(z1, _mm_cvtsi32_si128(__builtin_ctz(off))) : _mm256_setzero_si256();
    const __m256i r[6] = {a0, e0, a1, e1, a2, e2};
    for (int t = 0; t < T; t++) {
        const __m256 xd = _mm256_set1_ps(x[t * xs].d);  /* the token's scale (every block's) */
        for (int i = 0; i < R; i++) {
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r[2 * t + i], i ? z1 : z0)),
                                     _mm256_mul_ps(i ? dw : dv, xd));
            if (!y) { _mm256_storeu_ps(out + 16 * t + 8 * i, v); continue; }
            __asm__("" : "+x"(v));  /* the product rounded before the add (no FMA contraction: store_group's bits) */
            float* p = y + t * ldy + 8 * i;
            _mm256_storeu_ps(p, acc ? _mm256_add_ps(_mm256_loadu_ps(p), v) : v);
        }
    }
}
AI void pf_share(const uint8_t* pf, int64_t bytes, int64_t k, int64_t n) {  /* share k of n of pf's bytes, into L2 */
    if (!pf) return;
    const int64_t share = (bytes + n - 1) / n, end = (k + 1) * share < bytes ? (k + 1) * share : bytes;
    for (int64_t o = k * share / 64 * 64; o < end; o += 64) _mm_prefetch((const char*)pf + o, _MM_HINT_T1);
}
/* R groups x tokens [m, m1) in tiles of 3 (a rest of 4 as 2 + 2), stored into Y: one call per token pass
   (the MiniLM int7-a7 forward: 0.95-0.98x the time of one call per tile, one process, Zen 3);
   kind: 0 int7 (Q7_0), 1 int7-a7 (T_Q7_A7), 2 int7-row (T_Q7_ROW: q7r_tile), 3 int7-row-a8 (T_Q7_ROW8), 4 int8-row
   (T_Q8_ROW) */
AI void q7s_panel(const int kind, const int R, const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* X,
                  int64_t nbx, int64_t m, int64_t m1, float* Y, int64_t ldy, int64_t g, int64_t n1, int acc,
                  const uint8_t* pf, int64_t pf_bytes) {
    const int64_t tiles = (m1 - m + 2) / 3;
    const int whole = (g + R) * 8 <= n1;  /* every row of the R groups in the chunk: the row tiles write Y */
    for (int64_t k = 0; m < m1; k++) {
        pf_share(pf, pf_bytes, k, tiles);
        const int64_t left = m1 - m;
        const int T = left >= 3 && left != 4 ? 3 : left >= 2 ? 2 : 1;
        float out[48], *y = Y + m * ldy + g * 8;
#define TILE(T) { if (kind >= 2) q7r_tile(kind - 2, R, T, g0, g1, nu, X + m * nbx, nbx, out, whole ? y : NULL, \
                                        ldy, acc);                                                             \
                  else q7s_tile(kind, R, T, g0, g1, nu, X + m * nbx, nbx, out); }
        if (T == 3) TILE(3)
        else if (T == 2) TILE(2)
        else TILE(1)
#undef TILE
        if (!(whole && kind >= 2))
            for (int i = 0; i < R; i++) store_group(Y, ldy, m, T, g + i, n1, out + 8 * i, 16, acc);
        m += T;
    }
}
typedef void (*q7s_fn)(const uint8_t*, const uint8_t*, int64_t, const xblock*, int64_t, int64_t, int64_t, float*,
                       int64_t, int64_t, int64_t, int, const uint8_t*, int64_t);
#define Q7S(KIND, R)                                                                                        \
    static void q7s_##KIND##_##R(const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* X, int64_t nbx, \
                                 int64_t m, int64_t m1, float* Y, int64_t ldy, int64_t g, int64_t n1, int acc,  \
                                 const uint8_t* pf, int64_t pf_bytes) {                                          \
        q7s_panel(KIND, R, g0, g1, nu, X, nbx, m, m1, Y, ldy, g, n1, acc, pf, pf_bytes); }
Q7S(0, 1) Q7S(0, 2) Q7S(1, 1) Q7S(1, 2) Q7S(2, 1) Q7S(2, 2) Q7S(3, 1) Q7S(3, 2) Q7S(4, 1) Q7S(4, 2)
static inline int q7s_kind(int type) {  /* q7s_panel's kind of a Q7_0 / row type */
    return type == T_Q7_A7 ? 1 : type == T_Q7_ROW ? 2 : type == T_Q7_ROW8 ? 3 : type == T_Q8_ROW ? 4 : 0;
}
static const q7s_fn Q7S_FNS[5][2] = {{q7s_0_1, q7s_0_2}, {q7s_1_1, q7s_1_2}, {q7s_2_1, q7s_2_2}, {q7s_3_1, q7s_3_2},
                                     {q7s_4_1, q7s_4_2}};
