/* The encoder's int8 attention on AVX2 vectors: i8_attend.h's steps and roundings, bit for bit, 8 queries in
   lanes where the avx512 build has 16, with the instructions AVX2 has. The integer sums are the same numbers:
     scores: sum of q k over the head (q, k in [-127, 127]) by vpmaddubsw(|q|, k * sign q) (pairs of products at
       most 2 x 127 x 127 < 2^15: no saturation) and vpmaddwd by ones, where vpdpbusd sums (k + 128) q from
       -128 (q's byte sum); so the keys are stored signed here;
     P V: sum of p v (p in [0, 255], v in [-127, 127]) by vpmaddwd over int16 pairs (2 x 255 x 127 > 2^15 would
       saturate vpmaddubsw), so a V dword holds two keys' int16 values (kv8_layout.h);
   and every float step is i8_attend.h's, lane by lane, in the same order: its getmant / getexp by the exponent's
   bits (sv >= 1e-20 is normal), its scalef by a power of two built from the exponent (exact: the exponent is
   clamped at -126 in both builds). tests/test_int8_attention.py compares the two builds' bytes.
   Layout per head (bert_attend.h): kq rows of HD signed bytes; vq one row of HD dwords per pair of keys (2g, 2g + 1:
   low and high int16); sk, lsv, isv per key. Per block of 8 queries: qa, qs (HD / 4 rows of 8 dwords: |q| and q
   as bytes, 4 values a dword); pt (a row of 8 dwords per pair of keys: p of each, int16 halves).
   Included by i8_attend.h in the avx2 build (amx.c: thread_buffer, att_prefetch, amx_attend_takes). */
#pragma once
#include <immintrin.h>

/* log2 x for x > 0 (normal), 4 lanes: i8_attend.h's, with getexp / getmant from the bits */
static inline __m128 i8_log2_4(__m128 x) {
    const __m128i bits = _mm_castps_si128(x);
    const __m128 m2 = _mm_castsi128_ps(_mm_or_si128(_mm_and_si128(bits, _mm_set1_epi32(0x007FFFFF)),
                                                    _mm_set1_epi32(0x3F800000)));  /* [1, 2) */
    const __m128 ex = _mm_cvtepi32_ps(_mm_sub_epi32(_mm_srli_epi32(bits, 23), _mm_set1_epi32(127)));
    const __m128 up = _mm_cmp_ps(m2, _mm_set1_ps(1.5f), _CMP_GE_OQ);
    const __m128 e = _mm_blendv_ps(ex, _mm_add_ps(ex, _mm_set1_ps(1.f)), up);
    const __m128 t = _mm_sub_ps(_mm_blendv_ps(m2, _mm_mul_ps(m2, _mm_set1_ps(0.5f)), up), _mm_set1_ps(1.f));
    __m128 p = _mm_fmadd_ps(_mm_set1_ps(1.869315560e-1f), t, _mm_set1_ps(-3.670112906e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(4.897824919e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(-7.216367566e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(1.442542087e+0f));
    return _mm_fmadd_ps(p, t, e);
}

/* 2^t for -126 <= t <= 8: i8_attend.h's i8_exp2, 2^n from its exponent bits for scalef */
static inline __m256 i8_exp2_256(__m256 t) {
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(5.550410866e-2f), f, _mm256_set1_ps(2.402265070e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471806e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float i8_hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* r[i] lane j <-> r[j] lane i (8 x 8 dwords) */
static inline void transpose8_epi32(__m256i* r) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
    }
}

/* 32 int32 in [-127, 127] (a[0..3]: values 0-7, 8-15, ...) as 32 bytes in order */
static inline __m256i i8_bytes32(const __m256i* a) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3]));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline __m256 i8_abs256(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

/* n (<= 4) keys from rows x, x + ld (k D values on, v 2D), biases added: their kq rows (4 x HD signed bytes), the
   two pair rows of vq (2 x HD dwords), and per key sk, log2 sv, 1 / sv: i8_pack_quad_hd's values */
static inline __attribute__((always_inline)) void i8_pack_quad_hd(const float* x, int64_t ld, int64_t D,
        const float* bk, const float* bv, int n, const int HD, uint8_t* kq, uint32_t* vq, float* sk, float* lsv,
        float* isv) {
    const int nv = HD / 8;
    __m256 k[4][8], v[4][8];
    float ik[4], iv[4], svs[4];
    for (int e = 0; e < 4; e++) {
        const float* y = x + e * ld;
        __m256 ak = _mm256_setzero_ps(), av = _mm256_setzero_ps();
        for (int o = 0; o < nv; o++) {
            k[e][o] = v[e][o] = _mm256_setzero_ps();
            if (e >= n) continue;
            k[e][o] = _mm256_add_ps(_mm256_loadu_ps(y + D + 8 * o), _mm256_loadu_ps(bk + 8 * o));
            v[e][o] = _mm256_add_ps(_mm256_loadu_ps(y + 2 * D + 8 * o), _mm256_loadu_ps(bv + 8 * o));
            ak = _mm256_max_ps(ak, i8_abs256(k[e][o]));
            av = _mm256_max_ps(av, i8_abs256(v[e][o]));
        }
        /* the vector form's lane steps, one key at a time (IEEE: the same roundings) */
        const float mk = i8_hmax8(ak), mv = i8_hmax8(av), r127 = 1.f / 127.f;
        ik[e] = mk > 0.f ? 127.f / mk : 0.f;
        const float sv = fmaxf(mv * r127, 1e-20f);
        svs[e] = sv;
        iv[e] = 1.f / sv;
        sk[e] = mk * r127;
        isv[e] = iv[e];
    }
    _mm_storeu_ps(lsv, i8_log2_4(_mm_loadu_ps(svs)));
    __m256i vi[4][8];
    for (int e = 0; e < 4; e++) {
        for (int o = 0; o < nv; o++) vi[e][o] = _mm256_cvtps_epi32(_mm256_mul_ps(v[e][o], _mm256_set1_ps(iv[e])));
        for (int c = 0; c < HD / 32; c++) {
            __m256i a[4];
            for (int o = 0; o < 4; o++)
                a[o] = _mm256_cvtps_epi32(_mm256_mul_ps(k[e][4 * c + o], _mm256_set1_ps(ik[e])));
            _mm256_storeu_si256((__m256i*)(kq + e * HD + 32 * c), i8_bytes32(a));
        }
    }
    for (int g = 0; g < 2; g++)  /* pair g: keys 2g (low halves) and 2g + 1 (high) */
        for (int o = 0; o < nv; o++)
            _mm256_storeu_si256((__m256i*)(vq + g * HD + 8 * o),
                                _mm256_blend_epi16(vi[2 * g][o], _mm256_slli_epi32(vi[2 * g + 1][o], 16), 0xAA));
}
static void i8_pack_quad(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int n, int HD,
                         uint8_t* kq, uint32_t* vq, float* sk, float* lsv, float* isv) {  /* HD a constant in each */
    if (HD == 32) i8_pack_quad_hd(x, ld, D, bk, bv, n, 32, kq, vq, sk, lsv, isv);
    else i8_pack_quad_hd(x, ld, D, bk, bv, n, 64, kq, vq, sk, lsv, isv);
}

/* qa, qs for queries b0 .. b0 + n - 1 (n <= 8; lanes past n zero); *sq: each one's scale times `scale` */
static void i8_pack_q(const float* r, int64_t ld, const float* bq, float scale, int b0, int n, int HD, uint32_t* qa,
                      uint32_t* qs, __m256* sq) {
    __m256i m[2][8];  /* [dwords 0-7 / 8-15][query] */
    float ss[8];
    for (int i = 0; i < 8; i++) {
        m[0][i] = m[1][i] = _mm256_setzero_si256();
        ss[i] = 0.f;
        if (i >= n) continue;
        const float* x = r + (int64_t)(b0 + i) * ld;
        __m256 q[8], a = _mm256_setzero_ps();
        for (int o = 0; o < HD / 8; o++) {
            q[o] = _mm256_add_ps(_mm256_loadu_ps(x + 8 * o), _mm256_loadu_ps(bq + 8 * o));
            a = _mm256_max_ps(a, i8_abs256(q[o]));
        }
        const float mq = i8_hmax8(a);
        const __m256 iq = _mm256_set1_ps(mq > 0.f ? 127.f / mq : 0.f);
        for (int c = 0; c < HD / 32; c++) {
            __m256i qi[4];
            for (int o = 0; o < 4; o++) qi[o] = _mm256_cvtps_epi32(_mm256_mul_ps(q[4 * c + o], iq));
            m[c][i] = i8_bytes32(qi);
        }
        ss[i] = mq / 127.f * scale;
    }
    for (int c = 0; c < HD / 32; c++) {
        transpose8_epi32(m[c]);  /* m[c][p] lane i: query i's dword 8c + p */
        for (int p = 0; p < 8; p++) {
            _mm256_storeu_si256((__m256i*)(qs + 8 * (8 * c + p)), m[c][p]);
            _mm256_storeu_si256((__m256i*)(qa + 8 * (8 * c + p)), _mm256_abs_epi8(m[c][p]));
        }
    }
    *sq = _mm256_loadu_ps(ss);
}

/* keys j0 .. j0 + 3 against the block's queries into st: s + log2 sv (base 2); mx: their lane-wise max (keys < L).
   Four keys a pass (the avx512 form's eight): with eight accumulators GCC hoisted every broadcast and spilled
   three accumulators each step in AVX2's 16 registers */
static inline __m256 i8_scores4(const uint32_t* qa, const uint32_t* qs, const uint8_t* kq, const float* sk,
                                const float* lsv, int j0, int L, int HD, __m256 sq, float* st, __m256 mx,
                                const float* rb, int64_t rk) {  /* rb, rk: as the avx512 form's */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    const uint8_t* k0 = kq + (int64_t)j0 * HD;
    for (int p = 0; p < HD / 4; p++) {
        const __m256i ua = _mm256_loadu_si256((const __m256i*)(qa + 8 * p));
        const __m256i us = _mm256_loadu_si256((const __m256i*)(qs + 8 * p));
        int32_t w[4];
        for (int k = 0; k < 4; k++) memcpy(w + k, k0 + k * HD + 4 * p, 4);
        /* |q| (k sign q) = q k, pairs at most 2 x 127 x 127 */
#define SC(k) a##k = _mm256_add_epi32(a##k, _mm256_madd_epi16(                                         \
                  _mm256_maddubs_epi16(ua, _mm256_sign_epi8(_mm256_set1_epi32(w[k]), us)), ones));
        SC(0) SC(1) SC(2) SC(3)
#undef SC
    }
    const __m256i a[4] = {a0, a1, a2, a3};
    for (int k = 0; k < 4; k++) {
        __m256 s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[k]), _mm256_mul_ps(sq, _mm256_set1_ps(sk[j0 + k])),
                                   _mm256_set1_ps(lsv[j0 + k]));
        if (rb) s = _mm256_fmadd_ps(_mm256_loadu_ps(rb + (j0 + k) * rk), _mm256_set1_ps(1.44269504f), s);
        _mm256_storeu_ps(st + (j0 + k) * 8, s);
        if (j0 + k < L) mx = _mm256_max_ps(mx, s);
    }
    return mx;
}

/* P V for head values d0 .. d0 + 3 over np pairs of keys: a[k] lane i = the integer sum for value d0 + k (four a
   pass, as the scores) */
static inline void i8_pv4(const uint32_t* pt, const uint32_t* vq, int np, int HD, int d0, __m256i* a) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int g = 0; g < np; g++) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(pt + 8 * g));
        const uint32_t* v = vq + (int64_t)g * HD + d0;
#define PV(k) a##k = _mm256_add_epi32(a##k, _mm256_madd_epi16(w, _mm256_set1_epi32((int32_t)v[k])));
        PV(0) PV(1) PV(2) PV(3)
#undef PV
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
}

/* queries [q0, q1) of a job (query i's row at q + i * ld) against its packed keys and values (L keys; kq readable
   to L rounded up to 8 keys, vq to whole quads), outputs as amx_attend's */
static void i8_blocks(const uint8_t* kq, const uint32_t* vq, const float* sk, const float* lsv, const float* isv,
                      const float* q, int64_t ld, const float* bq, float scale, int L, int q0, int q1, int HD,
                      float* out, uint16_t* outb, int64_t ldo, const float* relb, int64_t relk) {
    static __thread void* mem;
    static __thread int64_t cap;
    const int Lp = (L + 7) / 8 * 8, nq = (L + 3) / 4;
    /* bytes: qa, qs (HD / 4 x 8 dwords each), st (Lp x 8 fp32), pt (2 nq x 8 dwords) */
    const int64_t qb = (int64_t)HD * 8, sb = (int64_t)Lp * 32;
    uint8_t* buf = thread_buffer(&mem, &cap, 2 * qb + sb + (int64_t)nq * 64);
    uint32_t *qa = (uint32_t*)buf, *qs = (uint32_t*)(buf + qb), *pt = (uint32_t*)(buf + 2 * qb + sb);
    float* st = (float*)(buf + 2 * qb);
    const float l2e = 1.44269504f;
    for (int b0 = q0; b0 < q1; b0 += 8) {
        const int n = q1 - b0 < 8 ? q1 - b0 : 8;
        __m256 sq;
        i8_pack_q(q, ld, bq, scale * l2e, b0, n, HD, qa, qs, &sq);
        __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int j0 = 0; j0 < L; j0 += 4)
            mx = i8_scores4(qa, qs, kq, sk, lsv, j0, L, HD, sq, st, mx, relb ? relb + b0 : NULL, relk);
        const __m256 top = _mm256_sub_ps(_mm256_set1_ps(7.99435344f), mx);  /* log2 255 - max */
        for (int g = 0; g < 2 * nq; g++) {  /* pairs of keys (those past L: p 0) */
            __m256i w = _mm256_setzero_si256();
            for (int j = 0; j < 2 && 2 * g + j < L; j++) {
                const int k = 2 * g + j;
                const __m256 t = _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(st + 8 * k), top),
                                               _mm256_set1_ps(-126.f));
                const __m256 p = i8_exp2_256(t);
                sum = _mm256_fmadd_ps(p, _mm256_set1_ps(isv[k]), sum);
                w = _mm256_or_si256(w, _mm256_slli_epi32(_mm256_cvtps_epi32(p), 16 * j));
            }
            _mm256_storeu_si256((__m256i*)(pt + 8 * g), w);
        }
        const __m256 back = _mm256_div_ps(_mm256_set1_ps(1.f), sum);
        for (int d0 = 0; d0 < HD; d0 += 8) {
            __m256i a[8];
            i8_pv4(pt, vq, 2 * nq, HD, d0, a);
            i8_pv4(pt, vq, 2 * nq, HD, d0 + 4, a + 4);
            for (int k = 0; k < 8; k++) a[k] = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(a[k]), back));
            transpose8_epi32(a);  /* a[i]: query b0 + i's values d0 .. d0 + 7 */
            const int64_t at = (int64_t)(b0 - q0) * ldo;
            for (int i = 0; i < n; i++) {
                if (outb) to_bf16((const float*)&a[i], 8, outb + at + i * ldo + d0);
                else _mm256_storeu_si256((__m256i*)(out + at + i * ldo + d0), a[i]);
            }
        }
    }
}
