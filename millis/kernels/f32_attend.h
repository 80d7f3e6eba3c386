/* The encoder's fp32 attention with queries in vector lanes (bert_attend.h's attend on the SIMD builds: every
   precision on AVX2 CPUs, fp32 and int8-a16 on AVX-512 ones). Before, it ran as two small GEMMs on the matmul
   kernels (S = Q K^T, P V: K = 32 or 64), with K and V^T packed per job: 38% of the FMA peak (bge-small b1xs128,
   the avx2 build on Zen 4, 3.5 ms of a 19.5 ms forward).

   A block of W queries (8 on AVX2, 16 on AVX-512) is one vector a step: a score vector is one key against the
   W queries, the softmax's max and sums are lane-wise, and P V sums the keys into one accumulator per head value.
   Each lane does one query's scalar steps in a fixed order, so both builds give the same bits:
     s_j = fma chain over d = 0 .. HD - 1 of q[d] k_j[d]      (q = (q + bq) scale, k = k + bk)
     m = max_j s_j;  e_j = exp(s_j - m) (step_math.h's exp);  sum = e_0 + e_1 + ... in key order
     out[d] = (fma chain over j of e_j v_j[d]) * (1 / sum)     (v = v + bv)
   relb (NULL: none): a bias relb[q + k relk] added to query q's score of key k: MPNet's relative-position bias
   (relk -1: relb[q - k]), or DeBERTa's dense one (relk: the row of a key's biases, queries in a row).
   Buffers of the job (a thread's): kr (L rounded up to 8, and 8 more rows: a score group reads up to 12 keys past
   its start; rows past L are never read into a result), vr (L x HD), qt (HD x W: the block's queries, transposed),
   st (keys x W scores, then e). Chains: 12 keys (or head values) in flight, where 8 chains of 4-cycle FMAs at two
   a cycle had no slack (69% of the FMA peak). */
#pragma once

static inline void transpose8(__m256* r) {  /* an 8 x 8 block of floats, rows <-> columns */
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
/* qt (HD x W) from queries b0 .. b0 + n - 1 (rows ld apart; lanes past n zero): (q + bq) * scale, 8 x 8 blocks
   transposed in registers (a scalar gather of the strided rows was a sixth of the attention's cycles) */
static inline void f32_pack_q(const float* r, int64_t ld, const float* bq, float scale, int b0, int n, int HD, int W,
                              float* qt) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int g = 0; g < W; g += 8)
        for (int d0 = 0; d0 < HD; d0 += 8) {
            __m256 m[8];
            for (int i = 0; i < 8; i++)
                m[i] = g + i < n ? _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(r + (b0 + g + i) * ld + d0),
                                                               _mm256_loadu_ps(bq + d0)), vs)
                                 : _mm256_setzero_ps();
            transpose8(m);
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(qt + (d0 + k) * W + g, m[k]);
        }
}

/* the scores of keys j0 .. j0 + KF - 1 (KF chains), into st, mx their max (keys < L) */
#define SCORES_KF(KF)                                                                                             \
    {                                                                                                             \
        VF a[KF];                                                                                                 \
        for (int k = 0; k < KF; k++) a[k] = ZERO;                                                                 \
        const float* k0 = kr + (int64_t)j0 * HD;                                                                  \
        for (int d = 0; d < HD; d++) {                                                                            \
            const VF q = LOAD(qt + d * W);                                                                        \
            for (int k = 0; k < KF; k++) a[k] = FMA(q, SET1(k0[k * HD + d]), a[k]);                               \
        }                                                                                                         \
        for (int k = 0; k < KF && j0 + k < L; k++) {                                                             \
            if (relb) a[k] = ADD(a[k], LOAD(relb + b0 + (j0 + k) * relk));  /* lane i: query b0 + i's bias */   \
            STORE(st + (j0 + k) * W, a[k]);                                                                       \
            mx = MAX(mx, a[k]);                                                                                   \
        }                                                                                                         \
    }
/* head values d0 .. d0 + DF - 1 (DF chains over the keys), scaled by inv, into the block's output rows */
#define PV_DF(DF)                                                                                                 \
    {                                                                                                             \
        VF a[DF];                                                                                                 \
        for (int k = 0; k < DF; k++) a[k] = ZERO;                                                                 \
        for (int j = 0; j < L; j++) {                                                                             \
            const VF p = LOAD(st + j * W);                                                                        \
            const float* v = vr + (int64_t)j * HD + d0;                                                           \
            for (int k = 0; k < DF; k++) a[k] = FMA(p, SET1(v[k]), a[k]);                                         \
        }                                                                                                         \
        float o[DF * W];                                                                                          \
        for (int k = 0; k < DF; k++) STORE(o + k * W, MUL(a[k], inv));                                            \
        for (int i = 0; i < n; i++)                                                                               \
            for (int k = 0; k < DF; k++) out[(int64_t)(b0 - q0 + i) * ldo + d0 + k] = o[k * W + i];              \
    }
/* the vector type and operations (VF, W lanes, LOAD .. EXP) are the build's: defined below before the one use */
#define F32_ATTEND(NAME)                                                                                          \
    static void NAME(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,      \
                     float scale, int L, int q0, int q1, int HD, float* out, int64_t ldo, float* buf,                \
                     const float* relb, int64_t relk) {                                                            \
        const int L8 = (L + 7) / 8 * 8;                                                                            \
        float *kr = buf, *vr = kr + (int64_t)(L8 + 8) * HD, *qt = vr + (int64_t)L * HD;                             \
        float* st = qt + (int64_t)HD * W;                                                                         \
        for (int j = 0; j < L; j++)                                                                               \
            for (int d = 0; d < HD; d++) {                                                                        \
                kr[(int64_t)j * HD + d] = r[j * ld + D + d] + bk[d];                                              \
                vr[(int64_t)j * HD + d] = r[j * ld + 2 * D + d] + bv[d];                                          \
            }                                                                                                     \
        for (int b0 = q0; b0 < q1; b0 += W) {                                                                     \
            const int n = q1 - b0 < W ? q1 - b0 : W;                                                              \
            f32_pack_q(r, ld, bq, scale, b0, n, HD, W, qt);                                                       \
            VF mx = SET1(-INFINITY), sum = ZERO;                                                                  \
            for (int j0 = 0; j0 < L;) {  /* 12 keys in flight (8 at the end): 12 chains of FMAs */                \
                if (j0 + 12 <= L8) { SCORES_KF(12) j0 += 12; } else { SCORES_KF(8) j0 += 8; }  /* < L8 + 8 */    \
            }                                                                                                     \
            for (int j = 0; j < L; j++) {                                                                         \
                const VF e = EXP(SUB(LOAD(st + j * W), mx));                                                      \
                sum = ADD(sum, e);                                                                                \
                STORE(st + j * W, e);                                                                             \
            }                                                                                                     \
            const VF inv = DIV(SET1(1.f), sum);                                                                   \
            for (int d0 = 0; d0 < HD;) {  /* 12 head values in flight (8 where 12 would not divide the rest) */   \
                const int rest = HD - d0;                                                                         \
                if (rest >= 20 || rest == 12) { PV_DF(12) d0 += 12; } else { PV_DF(8) d0 += 8; }                  \
            }                                                                                                     \
        }                                                                                                         \
    }

#if defined(__AVX512F__)
#define VF __m512
#define W 16
#define LOAD _mm512_loadu_ps
#define STORE _mm512_storeu_ps
#define SET1 _mm512_set1_ps
#define ZERO _mm512_setzero_ps()
#define FMA _mm512_fmadd_ps
#define MAX _mm512_max_ps
#define SUB _mm512_sub_ps
#define MUL _mm512_mul_ps
#define ADD _mm512_add_ps
#define DIV _mm512_div_ps
#define EXP exp512
#else
#define VF __m256
#define W 8
#define LOAD _mm256_loadu_ps
#define STORE _mm256_storeu_ps
#define SET1 _mm256_set1_ps
#define ZERO _mm256_setzero_ps()
#define FMA _mm256_fmadd_ps
#define MAX _mm256_max_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
#define ADD _mm256_add_ps
#define DIV _mm256_div_ps
#define EXP exp256
#endif
F32_ATTEND(attend_f32_lanes)
#undef VF
#undef W
#undef LOAD
#undef STORE
#undef SET1
#undef ZERO
#undef FMA
#undef MAX
#undef SUB
#undef MUL
#undef ADD
#undef DIV
#undef EXP
#undef F32_ATTEND
#undef SCORES_KF
#undef PV_DF
/* floats attend_f32_lanes's buffer takes for a job of L keys */
static inline int64_t f32_lanes_floats(int L, int HD) {
    const int64_t L8 = (L + 7) / 8 * 8;
    return (L8 + 8 + L + 16) * HD + L8 * 16;  /* kr, vr, qt, st (at most 16 lanes) */
}
