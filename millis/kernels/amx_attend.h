/* The encoder's attention on the tile unit, in bf16 (amx.c's amx_attend): one (sequence, head) job of
   bert_forward.c's op_attend, fused. For 16 queries at a time: S = Q K^T (a 16 x 16 tile is one TDPBF16PS per
   32 head values), the softmax of those rows in fp32 (the fp32 path's own functions), P rounded to bf16, then
   P V on the tiles, through the job's buffer into its rows (in phases, ATT_FN). Operands bf16 (round to
   nearest even), sums fp32: the precision OpenVINO's bf16 runs attention in. The fp32 path (two GEMMs on the
   AVX kernels) spends 3x its FMA count's time on these small products (K = 32) and its packing; here a
   128-token job is ~200 tile instructions.

   A job's buffers (att_job), keys padded to Lk (a multiple of 32) with zeros in K, V and P:
     q:  Lk rows of HD bf16, (q + bq) * scale, zero rows past L        A tiles, 16 queries x 32 values
     kt: per 16 keys and 32 head values one B tile: row p = values 2p, 2p + 1 of each key (4 bytes a key)
     vt: per 32 keys and 16 head values one B tile: row p = keys 2p, 2p + 1 of each value
     s:  G x Lk fp32 scores;  p: G x Lk bf16 probabilities (A tiles of 32 keys, stride 2 Lk)
     o:  G x HD fp32 outputs before the softmax's division
   (G: the queries of a phase, ATT_GROUP, or Lk when fewer)

   The first part (once): the job, its packing and softmax. The second (included by amx.c for the C form and the
   tile unit): ATT_FN over the tile operations TCONFIG TRELEASE TZERO TLOAD TSTORE TDP. Off the tile unit, AVX-512
   BF16 builds run vec_attend.h instead (queries in lanes). */
#ifndef AMX_ATTEND_ONCE
#define AMX_ATTEND_ONCE
#include "step_math.h"

#define ATT_GROUP 128  /* queries per phase (ATT_FN): s, p and o hold this many rows */
typedef struct {
    int L, Lk, HD;              /* tokens; keys padded to 32; head values (32 or 64) */
    int q0, q1;                 /* the queries computed: [q0, q1) of the L (a part of a token split: bert_forward.c) */
    uint16_t *q, *kt, *vt, *p;  /* Lk x HD; (Lk / 16) x (HD / 32) tiles; (Lk / 32) x (HD / 16) tiles; ATT_GROUP x Lk */
    float *s, *o;               /* ATT_GROUP x Lk; ATT_GROUP x HD */
    float* out;                 /* the job's output rows from query q0's, ldo apart: HD values each (fp32) */
    uint16_t* outb;             /* or, when not NULL, as bf16 (the next matmul's input rows: no fp32 pass) */
    int64_t ldo;
} att_job;

/* a token's q, k and v rows (x, x + D, x + 2D: HD values each) into cache: the rows are strided (a head's values
   in each token's 3D), so att_pack fetches them 8 tokens ahead */
static inline void att_prefetch(const float* x, int64_t D, int HD) {
    for (int o = 0; o < 3; o++)
        for (int b = 0; b < HD * 4; b += 64) __builtin_prefetch((const char*)(x + o * D) + b);
}

#if defined(__AVX512BF16__)
/* r[i] lane j <-> r[j] lane i (16 x 16 dwords): pairs within 128-bit lanes, then the lanes themselves */
static inline void transpose16_epi32(__m512i* r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* u[4g + k], lane l: column 4l + k of rows 4g .. 4g + 3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {  /* row 4l + k: lane g of it from u[4g + k]'s lane l */
        const __m512i p0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), p1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xdd);
        const __m512i p2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
        const __m512i p3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xdd);
        r[k] = _mm512_shuffle_i32x4(p0, p2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(p1, p3, 0x88);
        r[8 + k] = _mm512_shuffle_i32x4(p0, p2, 0xdd);
        r[12 + k] = _mm512_shuffle_i32x4(p1, p3, 0xdd);
    }
}
#endif

/* the job's bf16 operands from its rows of the qkv matrix: token t's q at r + t * ld, k D values on, v 2D (q only
   for the job's queries [q0, q1): the tiles of other rows' scores are never read) */
static void att_pack(const att_job* j, const float* r, int64_t ld, int64_t D, const float* bq, const float* bk,
                     const float* bv, float scale) {
    const int L = j->L, HD = j->HD, C = HD / 32;
    memset(j->q + (int64_t)L * HD, 0, sizeof(uint16_t) * (j->Lk - L) * HD);
#if defined(__AVX512BF16__)
    /* 32 values a step: (x + b) (* scale) in fp32, rounded to bf16 by vcvtne2ps2bf16 (nearest even, as to_bf16;
       denormals flushed, which scores and probabilities never meet); 16 keys' 16 pairs of a chunk transposed in
       registers into the 16 rows of their tile (in place of a scatter down column t % 16 per key: the same
       bytes; no speed-up was measurable on Zen 4, where packing is ~3 of a job's ~19 us); keys t - 1, t's values
       interleaved per value as 16 dwords (lo: t - 1, hi: t).
       Per token the scalar form below took ~500 cycles, most of a 128-token job's time. */
    const __m512 vs = _mm512_set1_ps(scale);
    __m512i vprev[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  /* key t - 1's values, 2 chunks */
    __m512i kb[2][16];  /* the pairs of keys t - t % 16 .. t, per chunk */
    for (int t = 0; t < j->Lk; t++) {
        const float* x = r + t * ld;
        if (t + 8 < L) att_prefetch(x + 8 * ld, D, HD);
        uint32_t* k = (uint32_t*)j->kt + (int64_t)(t / 16) * C * 256;
        uint32_t* v = (uint32_t*)j->vt + (int64_t)(t / 32) * (HD / 16) * 256 + (t % 32 / 2) * 16;
        for (int c = 0; c < C; c++) {
            __m512i kq = _mm512_setzero_si512(), vq = _mm512_setzero_si512();
            if (t < L) {
                const int o = 32 * c;
                if (t >= j->q0 && t < j->q1) {
                    const __m512 q0 = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(x + o), _mm512_loadu_ps(bq + o)), vs);
                    const __m512 q1 = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(x + o + 16), _mm512_loadu_ps(bq + o + 16)), vs);
                    _mm512_storeu_si512(j->q + (int64_t)t * HD + o, (__m512i)_mm512_cvtne2ps_pbh(q1, q0));
                }
                kq = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(x + D + o + 16), _mm512_loadu_ps(bk + o + 16)),
                                                  _mm512_add_ps(_mm512_loadu_ps(x + D + o), _mm512_loadu_ps(bk + o)));
                vq = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(x + 2 * D + o + 16), _mm512_loadu_ps(bv + o + 16)),
                                                  _mm512_add_ps(_mm512_loadu_ps(x + 2 * D + o), _mm512_loadu_ps(bv + o)));
            }
            kb[c][t % 16] = kq;
            if (t % 16 == 15) {  /* Lk is a multiple of 32: every group of 16 keys ends here */
                transpose16_epi32(kb[c]);  /* row p: pair p of each key */
                for (int p = 0; p < 16; p++) _mm512_storeu_si512(k + c * 256 + p * 16, kb[c][p]);
            }
            if (t & 1) {  /* value n of 16: (key t - 1, key t) as one dword, row (t % 32) / 2 of the tile */
                for (int h = 0; h < 2; h++) {
                    const __m512i lo = _mm512_cvtepu16_epi32(h ? _mm512_extracti64x4_epi64(vprev[c], 1)
                                                               : _mm512_castsi512_si256(vprev[c]));
                    const __m512i hi = _mm512_cvtepu16_epi32(h ? _mm512_extracti64x4_epi64(vq, 1) : _mm512_castsi512_si256(vq));
                    _mm512_storeu_si512(v + (2 * c + h) * 256, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
            } else vprev[c] = vq;
        }
    }
#else
    float tmp[64];
    uint16_t kb[64], vb[2][64];
    for (int t = 0; t < j->Lk; t++) {
        const float* x = r + t * ld;
        if (t + 8 < L) att_prefetch(x + 8 * ld, D, HD);
        if (t < L) {
            for (int d = 0; d < HD; d++) tmp[d] = (x[d] + bq[d]) * scale;
            to_bf16(tmp, HD, j->q + (int64_t)t * HD);
            for (int d = 0; d < HD; d++) tmp[d] = x[D + d] + bk[d];
            to_bf16(tmp, HD, kb);
            for (int d = 0; d < HD; d++) tmp[d] = x[2 * D + d] + bv[d];
            to_bf16(tmp, HD, vb[t & 1]);
        } else {
            memset(kb, 0, sizeof kb);
            memset(vb[t & 1], 0, sizeof vb[0]);
        }
        /* key t: column t % 16 of its tiles, the pair (2p, 2p + 1) of chunk c in row p */
        uint32_t* k = (uint32_t*)j->kt + (int64_t)(t / 16) * C * 256 + t % 16;
        for (int c = 0; c < C; c++)
            for (int p = 0; p < 16; p++) memcpy(k + c * 256 + p * 16, kb + 32 * c + 2 * p, 4);
        if (t & 1) {  /* keys t - 1, t: row (t % 32) / 2 of their chunk's tiles, interleaved per value */
            uint16_t* v = j->vt + (int64_t)(t / 32) * (HD / 16) * 512 + (t % 32 / 2) * 32;
            for (int b = 0; b < HD / 16; b++)
                for (int n = 0; n < 16; n++) {
                    v[b * 512 + 2 * n] = vb[0][16 * b + n];
                    v[b * 512 + 2 * n + 1] = vb[1][16 * b + n];
                }
        }
    }
#endif
}

#if defined(__AVX512BF16__)
/* e^x for x <= 0 (underflow to 0 below -87), relative error ~3e-6: 2^f (|f| <= 1/2) by its degree-5 Taylor
   polynomial, scaled by 2^n. Enough for probabilities rounded to bf16 (2^-9) and summed in fp32. */
static inline __m512 att_exp(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.33335581e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61812911e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55041087e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226507e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147181e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* rows r < rows of s -> e^(s - the row's max) over the L keys, as bf16 in p, and inv[r] = 1 / their sum (the
   outputs are scaled after P V); the keys past L and the rows past `rows` (queries past L: their outputs are
   never stored) zero */
static void att_softmax(const att_job* j, const float* s16, uint16_t* p16, int rows, float* inv) {
    const int L = j->L, Lk = j->Lk;
    for (int r = 0; r < 16; r++) {
        uint16_t* p = p16 + (int64_t)r * Lk;
        inv[r] = 0.f;
        if (r >= rows) { memset(p, 0, sizeof(uint16_t) * Lk); continue; }
        const float* s = s16 + (int64_t)r * Lk;
#if defined(__AVX512BF16__)
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int i = 0; i < L; i += 16)
            m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(L - i >= 16 ? 0xffff : (__mmask16)((1u << (L - i)) - 1), s + i));
        m = _mm512_set1_ps(_mm512_reduce_max_ps(m));  /* the masked lanes' zeros never exceed a real max's e^0 */
        for (int i = 0; i < Lk; i += 32) {  /* keys past L: lanes masked to 0 */
            const __mmask16 ka = L - i >= 16 ? 0xffff : L - i > 0 ? (__mmask16)((1u << (L - i)) - 1) : 0;
            const __mmask16 kb = L - i >= 32 ? 0xffff : L - i > 16 ? (__mmask16)((1u << (L - i - 16)) - 1) : 0;
            const __m512 a = _mm512_maskz_mov_ps(ka, att_exp(_mm512_sub_ps(_mm512_loadu_ps(s + i), m)));
            const __m512 b = _mm512_maskz_mov_ps(kb, att_exp(_mm512_sub_ps(_mm512_loadu_ps(s + i + 16), m)));
            sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
            _mm512_storeu_si512(p + i, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
        inv[r] = 1.f / _mm512_reduce_add_ps(sum);
#else
        inv[r] = 1.f / exp_shift(s, L, vmax(s, L));
        to_bf16(s, L, p);
        memset(p + L, 0, sizeof(uint16_t) * (Lk - L));
#endif
    }
}
#endif

/* S tile i (16 queries x keys 16 (k + i)..): C tile i = Q K^T, B tiles 6 and 7 in turn (A: 4, and 5 for the
   second 32 head values); the stores follow all of a group's products */
#define ATT_SCORES(i, B)                                                            \
    TZERO(i);                                                                       \
    TLOAD(B, kt + (int64_t)((k + i) * C) * 1024, 64);                               \
    TDP(i, 4, B);                                                                   \
    if (C == 2) { TLOAD(B, kt + (int64_t)((k + i) * C + 1) * 1024, 64); TDP(i, 5, B); }
#define ATT_STORE(i) TSTORE(i, s + 16 * (k + i), 4 * Lk);

/* In phases over up to ATT_GROUP queries: every block's scores, then their softmax, then every block's P V, then
   the outputs. A tile's rows read by vector loads soon after its store (and P's rows by a tile load soon after
   the vector stores) wait for them: one 16-query block through all four steps in turn spent most of its time
   there (SPR, a 128-token job of head size 32: 30 us, where its ~130 tile products take ~3) */
static void ATT_FN(const att_job* j) {
    const int Lk = j->Lk, HD = j->HD, C = HD / 32, nk = Lk / 16;
    const uint8_t *kt = (const uint8_t*)j->kt, *vt = (const uint8_t*)j->vt;
    float inv[ATT_GROUP];
    tilecfg cfg;
    amx_config(&cfg);
    TCONFIG(&cfg);
    for (int g0 = j->q0; g0 < j->q1; g0 += ATT_GROUP) {
        const int n = j->q1 - g0 < ATT_GROUP ? j->q1 - g0 : ATT_GROUP;  /* queries g0 .. g0 + n - 1 */
        for (int b = 0; b < n; b += 16) {  /* S = Q K^T: 16 queries x Lk keys per block, fp32 */
            float* s = j->s + (int64_t)b * Lk;
            TLOAD(4, j->q + (int64_t)(g0 + b) * HD, 2 * HD);
            if (C == 2) TLOAD(5, j->q + (int64_t)(g0 + b) * HD + 32, 2 * HD);
            for (int k = 0; k < nk; k += 4) {  /* nk is even: tiles 0, 1, and 2, 3 unless two are left */
                if (k + 2 < nk) {
                    ATT_SCORES(0, 6) ATT_SCORES(1, 7) ATT_SCORES(2, 6) ATT_SCORES(3, 7)
                    ATT_STORE(0) ATT_STORE(1) ATT_STORE(2) ATT_STORE(3)
                } else {
                    ATT_SCORES(0, 6) ATT_SCORES(1, 7)
                    ATT_STORE(0) ATT_STORE(1)
                }
            }
        }
        for (int b = 0; b < n; b += 16)
            att_softmax(j, j->s + (int64_t)b * Lk, j->p + (int64_t)b * Lk, n - b < 16 ? n - b : 16, inv + b);
        for (int b = 0; b < n; b += 16) {  /* O (16 queries x HD) = P V: C tiles 0..HD/16 - 1, P's 32 keys in tile 4 */
            const uint16_t* p = j->p + (int64_t)b * Lk;
            float* o = j->o + (int64_t)b * HD;
            TZERO(0); TZERO(1);
            if (C == 2) { TZERO(2); TZERO(3); }
            for (int kc = 0; kc < Lk / 32; kc++) {  /* V's 32 keys in tiles 6 and 7 in turn */
                const uint8_t* v = vt + (int64_t)kc * (HD / 16) * 1024;
                TLOAD(4, p + 32 * kc, 2 * Lk);
                TLOAD(6, v, 64); TDP(0, 4, 6);
                TLOAD(7, v + 1024, 64); TDP(1, 4, 7);
                if (C == 2) { TLOAD(6, v + 2048, 64); TDP(2, 4, 6); TLOAD(7, v + 3072, 64); TDP(3, 4, 7); }
            }
            TSTORE(0, o, 4 * HD); TSTORE(1, o + 16, 4 * HD);
            if (C == 2) { TSTORE(2, o + 32, 4 * HD); TSTORE(3, o + 48, 4 * HD); }
        }
        for (int r = 0; r < n; r++) {  /* the rows' sums of e^(s - max): the softmax's division */
            float* o = j->o + (int64_t)r * HD;
            const int64_t at = (int64_t)(g0 - j->q0 + r) * j->ldo;
            if (j->outb) { vscale(o, inv[r], HD); to_bf16(o, HD, j->outb + at); continue; }
            for (int d = 0; d < HD; d++) j->out[at + d] = o[d] * inv[r];
        }
    }
    TRELEASE();
}
#undef ATT_SCORES
#undef ATT_STORE
