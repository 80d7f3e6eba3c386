/* The encoder's int8 attention on AVX-512 VNNI vectors, queries in lanes (vec_attend.h's layout and order, with
   vpdpbusd: 64 products an instruction where vdpbf16ps does 32). Precision: q, k and v rounded to int8 with one
   scale per (token, head) (amax / 127, nearest), the scores and the softmax in fp32, and each probability times
   its key's value scale rounded to 8 bits against the query's largest (one scale per query), integer sums.

   Packed keys and values, per head, in quads of keys (a part of the token split packs whole quads: bert_forward.c):
     kq: rows of HD bytes: key j's values / sk[j] + 128 (unsigned: vpdpbusd's first operand)         (broadcast)
     vq: one row of HD dwords a quad: byte e of dword d = value d of key 4g + e / sv[4g + e] (signed)  (broadcast)
     sk, lsv = log2 sv, isv = 1 / sv: per key (a key past the sequence: zero bytes, never read into a result)
   Per block of 16 queries:
     qt: HD / 4 rows of 16 dwords: row p, lane i = values 4p .. 4p + 3 of query i, rounded (signed)
     scores: the integer sums start at -128 (query i's byte sum) (the keys' offset off), then s = sum sq[i] sk[j]
       + lsv[j] (sq with the softmax's scale and log2 e: base 2), and the lane-wise max m: s - m is the log2 of
       the probability times sv[j] over the largest such product of the query,
     p = 255 2^(s - m), rounded into pt (0 .. 255; a quad's four keys a dword); the softmax's sum is that of
       p isv[j] (each key's 2^(score - m) 255),
     P V: one integer accumulator per head value (16 queries; p vq = 255 2^(score - m) v), over the sum at the end.
   Zen 4, one thread, 128 keys, 12 heads (ad hoc, /tmp harness): 0.71x bf16's time at head size 32, 0.67x at 64;
   error against fp32 attention 1.1e-2 of the values' scale where bf16's is 3.3e-3.
   Included by amx.c after vec_attend.h (its helpers: vatt_rows, vatt_bcast, transpose16_epi32, thread_buffer); the
   avx2 build gets i8_attend256.h's form of the same steps, bit for bit, and the scalar build stubs. */
#pragma once
#include "kv8_layout.h"
#if HAVE_VEC_ATTEND

/* log2 x for x > 0 (normal), 4 lanes: the exponent, and log2 of the mantissa in [0.75, 1.5) by a degree-5
   polynomial (absolute error 3e-5: the probabilities' weights 2e-5 off, where their 8 bits are 4e-3) */
static inline __m128 i8_log2_4(__m128 x) {
    const __m128 m2 = _mm_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  /* x = m2 2^getexp(x) */
    const __mmask8 up = _mm_cmp_ps_mask(m2, _mm_set1_ps(1.5f), _CMP_GE_OQ);     /* m2 / 2 in [0.75, 1) */
    const __m128 e = _mm_mask_add_ps(_mm_getexp_ps(x), up, _mm_getexp_ps(x), _mm_set1_ps(1.f));
    const __m128 t = _mm_sub_ps(_mm_mask_mul_ps(m2, up, m2, _mm_set1_ps(0.5f)), _mm_set1_ps(1.f));
    __m128 p = _mm_fmadd_ps(_mm_set1_ps(1.869315560e-1f), t, _mm_set1_ps(-3.670112906e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(4.897824919e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(-7.216367566e-1f));
    p = _mm_fmadd_ps(p, t, _mm_set1_ps(1.442542087e+0f));
    return _mm_fmadd_ps(p, t, e);
}

/* the largest lane of each of r[0..7], all in one go (where eight horizontal reductions took ~60 operations): key
   e's of r[e] in every lane of 128-bit lane e of *a, of r[4 + e] of *b */
static inline void i8_max8(const __m512* r, __m512* a, __m512* b) {
    __m512 x[4], y[2];
    for (int i = 0; i < 4; i++)  /* 256-bit half 0: r[2i]'s 8 partial maxima, half 1: r[2i + 1]'s */
        x[i] = _mm512_max_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++) {  /* 128-bit lane e: r[4i + e]'s 4, then within the lane */
        __m512 z = _mm512_max_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                                 _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
        z = _mm512_max_ps(z, _mm512_permute_ps(z, 0x4E));
        y[i] = _mm512_max_ps(z, _mm512_permute_ps(z, 0xB1));
    }
    *a = y[0];
    *b = y[1];
}
static inline __m128 i8_lanes4(__m512 v) {  /* lanes 0, 4, 8, 12 */
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), v));
}

/* n (<= 4) keys from rows x, x + ld (k D values on, v 2D), biases added: their kq rows (4 x HD bytes), the quad's
   vq row, and per key sk, log2 sv, 1 / sv (a key past n: zero bytes, sk 0). sv is floored at 1e-20: a key whose
   values are all 0 still weighs in the softmax's sum (p / sv) */
static inline __attribute__((always_inline)) void i8_pack_quad_hd(const float* x, int64_t ld, int64_t D,
        const float* bk, const float* bv, int n, const int HD, uint8_t* kq, uint32_t* vq, float* sk, float* lsv,
        float* isv) {
    const int nv = HD / 16;
    const __m512i lo8 = _mm512_set1_epi32(0xFF), off = _mm512_set1_epi32(128);
    __m512 k[4][4], v[4][4], am[8];  /* am: |k| maxima of the 4 keys, then |v| */
    for (int e = 0; e < 4; e++) {
        const float* y = x + e * ld;
        am[e] = am[4 + e] = _mm512_setzero_ps();
        for (int o = 0; o < nv; o++) {
            k[e][o] = v[e][o] = _mm512_setzero_ps();
            if (e >= n) continue;
            k[e][o] = _mm512_add_ps(_mm512_loadu_ps(y + D + 16 * o), _mm512_loadu_ps(bk + 16 * o));
            v[e][o] = _mm512_add_ps(_mm512_loadu_ps(y + 2 * D + 16 * o), _mm512_loadu_ps(bv + 16 * o));
            am[e] = _mm512_max_ps(am[e], _mm512_abs_ps(k[e][o]));
            am[4 + e] = _mm512_max_ps(am[4 + e], _mm512_abs_ps(v[e][o]));
        }
    }
    __m512 mk, mv;
    i8_max8(am, &mk, &mv);
    const __m512 c127 = _mm512_set1_ps(127.f), r127 = _mm512_set1_ps(1.f / 127.f);
    const __m512 ik = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(mk, _mm512_setzero_ps(), _CMP_GT_OQ), c127, mk);
    const __m512 sv = _mm512_max_ps(_mm512_mul_ps(mv, r127), _mm512_set1_ps(1e-20f)), iv = _mm512_div_ps(_mm512_set1_ps(1.f), sv);
    _mm_storeu_ps(sk, i8_lanes4(_mm512_mul_ps(mk, r127)));
    _mm_storeu_ps(lsv, i8_log2_4(i8_lanes4(sv)));
    _mm_storeu_ps(isv, i8_lanes4(iv));
    /* 128-bit lane e in all four, immediates spelled out (a loop counter is one only once the loop is unrolled) */
    const __m512 ikl[4] = {_mm512_shuffle_f32x4(ik, ik, 0x00), _mm512_shuffle_f32x4(ik, ik, 0x55),
                           _mm512_shuffle_f32x4(ik, ik, 0xAA), _mm512_shuffle_f32x4(ik, ik, 0xFF)};
    const __m512 ivl[4] = {_mm512_shuffle_f32x4(iv, iv, 0x00), _mm512_shuffle_f32x4(iv, iv, 0x55),
                           _mm512_shuffle_f32x4(iv, iv, 0xAA), _mm512_shuffle_f32x4(iv, iv, 0xFF)};
    for (int o = 0; o < nv; o++) {
        __m512i w = _mm512_setzero_si512();
        for (int e = 0; e < 4; e++) {
            const __m512i kk = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(k[e][o], ikl[e])), off);
            _mm_storeu_si128((__m128i*)(kq + e * HD + 16 * o), _mm512_cvtepi32_epi8(kk));
            const __m512i b = _mm512_and_si512(_mm512_cvtps_epi32(_mm512_mul_ps(v[e][o], ivl[e])), lo8);
            w = _mm512_or_si512(w, _mm512_slli_epi32(b, 8 * e));
        }
        _mm512_storeu_si512(vq + 16 * o, w);
    }
}
static void i8_pack_quad(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int n, int HD,
                         uint8_t* kq, uint32_t* vq, float* sk, float* lsv, float* isv) {  /* HD a constant in each */
    if (HD == 32) i8_pack_quad_hd(x, ld, D, bk, bv, n, 32, kq, vq, sk, lsv, isv);
    else i8_pack_quad_hd(x, ld, D, bk, bv, n, 64, kq, vq, sk, lsv, isv);
}

/* qt for queries b0 .. b0 + n - 1 (n <= 16; lanes past n zero); *c0: -128 (each query's byte sum), *sq: its scale
   times `scale` (the softmax's, with log2 e) */
static void i8_pack_q(const float* r, int64_t ld, const float* bq, float scale, int b0, int n, int HD, uint32_t* qt,
                      __m512i* c0, __m512* sq) {
    __m512i m[16];
    int32_t cs[16];
    float ss[16];
    for (int i = 0; i < 16; i++) {
        m[i] = _mm512_setzero_si512();
        cs[i] = 0;
        ss[i] = 0.f;
        if (i >= n) continue;
        const float* x = r + (int64_t)(b0 + i) * ld;
        __m512 q[4], a = _mm512_setzero_ps();
        for (int o = 0; o < HD / 16; o++) {
            q[o] = _mm512_add_ps(_mm512_loadu_ps(x + 16 * o), _mm512_loadu_ps(bq + 16 * o));
            a = _mm512_max_ps(a, _mm512_abs_ps(q[o]));
        }
        const float mq = _mm512_reduce_max_ps(a);
        const __m512 iq = _mm512_set1_ps(mq > 0.f ? 127.f / mq : 0.f);
        __m512i sum = _mm512_setzero_si512();
        __m128i b[4];
        for (int o = 0; o < HD / 16; o++) {
            const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(q[o], iq));
            sum = _mm512_add_epi32(sum, qi);
            b[o] = _mm512_cvtepi32_epi8(qi);
        }
        /* immediates spelled out, not a loop's counter: a build that does not unroll it (the thread sanitizer's,
           tests/test_amx.py) could not compile it */
        m[i] = _mm512_inserti32x4(_mm512_inserti32x4(m[i], b[0], 0), b[1], 1);
        if (HD == 64) m[i] = _mm512_inserti32x4(_mm512_inserti32x4(m[i], b[2], 2), b[3], 3);
        cs[i] = -128 * _mm512_reduce_add_epi32(sum);
        ss[i] = mq / 127.f * scale;
    }
    transpose16_epi32(m);  /* m[p] lane i: query i's dword p */
    for (int p = 0; p < HD / 4; p++) _mm512_storeu_si512(qt + 16 * p, m[p]);
    *c0 = _mm512_loadu_si512(cs);
    *sq = _mm512_loadu_ps(ss);
}

/* keys j0 .. j0 + 7 against the block's queries into st: s + log2 sv (base 2); mx: their lane-wise max (keys < L).
   rb (NULL: none): the bias at the block's first query (rb[i + j rk]: query i's of key j; f32_attend.h's relb,
   relk), in base 2 */
static inline __m512 i8_scores8(const uint32_t* qt, const uint8_t* kq, const float* sk, const float* lsv, int j0, int L,
                                int HD, __m512i c0, __m512 sq, float* st, __m512 mx, const float* rb,
                                int64_t rk) {
    __m512i a[8];
    for (int k = 0; k < 8; k++) a[k] = c0;
    const uint8_t* k0 = kq + (int64_t)j0 * HD;
    for (int p = 0; p < HD / 4; p++) {
        const __m512i q = _mm512_loadu_si512(qt + 16 * p);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) a[k] = _mm512_dpbusd_epi32(a[k], _mm512_castps_si512(vatt_bcast((const uint16_t*)(k0 + k * HD + 4 * p))), q);
    }
    for (int k = 0; k < 8; k++) {
        __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[k]), _mm512_mul_ps(sq, _mm512_set1_ps(sk[j0 + k])),
                                   _mm512_set1_ps(lsv[j0 + k]));
        if (rb) s = _mm512_fmadd_ps(_mm512_loadu_ps(rb + (j0 + k) * rk), _mm512_set1_ps(1.44269504f), s);
        _mm512_storeu_ps(st + (j0 + k) * 16, s);
        if (j0 + k < L) mx = _mm512_max_ps(mx, s);
    }
    return mx;
}

/* 2^t (t <= 0; 0 far below) to the 8 bits the probabilities keep: vatt_exp2 with a degree-3 polynomial (relative
   error ~1e-4 where a step of 255 is 4e-3) */
static inline __m512 i8_exp2(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(5.550410866e-2f), f, _mm512_set1_ps(2.402265070e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471806e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* P V for head values d0 .. d0 + 15 over nq quads of keys: a[k] lane i = the integer sum for value d0 + k */
static inline void i8_pv16(const uint32_t* pt, const uint32_t* vq, int nq, int HD, int d0, __m512i* a) {
    for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_si512();
    for (int g = 0; g < nq; g++) {
        const __m512i w = _mm512_loadu_si512(pt + 16 * g);
        const uint32_t* v = vq + (int64_t)g * HD + d0;
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) a[k] = _mm512_dpbusd_epi32(a[k], w, _mm512_set1_epi32((int32_t)v[k]));
    }
}

/* queries [q0, q1) of a job (query i's row at q + i * ld) against its packed keys and values (L keys; kq readable
   to L rounded up to 8 keys), outputs as amx_attend's; relb (NULL: none): a bias relb[q + k relk] added to query
   q's score of key k (f32_attend.h's; readable for 16 queries a block and keys to L rounded up to 8) */
static void i8_blocks(const uint8_t* kq, const uint32_t* vq, const float* sk, const float* lsv, const float* isv,
                      const float* q, int64_t ld, const float* bq, float scale, int L, int q0, int q1, int HD,
                      float* out, uint16_t* outb, int64_t ldo, const float* relb, int64_t relk) {
    static __thread void* mem;
    static __thread int64_t cap;
    const int Lp = (L + 7) / 8 * 8, nq = (L + 3) / 4;
    /* bytes: qt (HD / 4 x 16 dwords), st (Lp x 16 fp32), pt (Lp / 4 x 16 dwords) */
    const int64_t qb = (int64_t)HD * 16, sb = (int64_t)Lp * 64;
    uint8_t* buf = thread_buffer(&mem, &cap, qb + sb + sb / 4);
    uint32_t *qt = (uint32_t*)buf, *pt = (uint32_t*)(buf + qb + sb);
    float* st = (float*)(buf + qb);
    const float l2e = 1.44269504f;
    for (int b0 = q0; b0 < q1; b0 += 16) {
        const int n = q1 - b0 < 16 ? q1 - b0 : 16;
        __m512i c0;
        __m512 sq;
        i8_pack_q(q, ld, bq, scale * l2e, b0, n, HD, qt, &c0, &sq);
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int j0 = 0; j0 < L; j0 += 8)
            mx = i8_scores8(qt, kq, sk, lsv, j0, L, HD, c0, sq, st, mx, relb ? relb + b0 : NULL, relk);
        /* p = 255 2^(s + log2 sv - max) in 0 .. 255, rounded into pt (a quad's four keys a dword; keys past L 0);
           the softmax's sum is that of p / sv (2^(s - max), as P V's sums are of p v / sv) */
        const __m512 top = _mm512_sub_ps(_mm512_set1_ps(7.99435344f), mx);  /* log2 255 - max */
        for (int g = 0; g < nq; g++) {
            __m512i w = _mm512_setzero_si512();
            for (int j = 0; j < 4 && 4 * g + j < L; j++) {
                const int k = 4 * g + j;
                /* t >= -126 (p then far under the 8 bits' half step): the AVX2 form's 2^n stays normal */
                const __m512 t = _mm512_max_ps(_mm512_add_ps(_mm512_loadu_ps(st + 16 * k), top),
                                               _mm512_set1_ps(-126.f));
                const __m512 p = i8_exp2(t);
                sum = _mm512_fmadd_ps(p, _mm512_set1_ps(isv[k]), sum);
                w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtps_epi32(p), 8 * j));
            }
            _mm512_storeu_si512(pt + 16 * g, w);
        }
        const __m512 back = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
        for (int d0 = 0; d0 < HD; d0 += 16) {
            __m512i a[16];
            __m512 o[16];
            i8_pv16(pt, vq, nq, HD, d0, a);
            for (int k = 0; k < 16; k++) o[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(a[k]), back);
            const int64_t at = (int64_t)(b0 - q0) * ldo;
            vatt_rows(o, n, outb ? NULL : out + at, outb ? outb + at : NULL, ldo, d0);
        }
    }
}

#elif defined(__AVX2__)
#include "i8_attend256.h"  /* the same steps on AVX2, 8 queries a block */
#endif

#if HAVE_VEC_ATTEND || defined(__AVX2__)
/* The entry points. In the token split each part packs its own tokens' quads once (kv8_pack_quad) and every part's
   attention reads them (kv8_attend); elsewhere a (sequence, head) job packs its keys itself (attend_int8). */
API int kv8_takes(int HD) { return amx_attend_takes(HD); }  /* head sizes 32 and 64 (1 to 4 vectors a row) */
API void kv8_pack_quad(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int n, int HD,
                       uint8_t* kq, uint32_t* vq, float* sk, float* lsv, float* isv) {
    i8_pack_quad(x, ld, D, bk, bv, n, HD, kq, vq, sk, lsv, isv);
}
API void kv8_attend(const uint8_t* kq, const uint32_t* vq, const float* sk, const float* lsv, const float* isv,
                    const float* q, int64_t ld, const float* bq, float scale, int L, int q0, int q1, int HD, float* out,
                    uint16_t* outb, int64_t ldo, const float* relb, int64_t relk) {
    i8_blocks(kq, vq, sk, lsv, isv, q, ld, bq, scale, L, q0, q1, HD, out, outb, ldo, relb, relk);
}
/* amx_attend's contract in int8 (relb as i8_blocks'): returns 1, or 0 (nothing done) unless HD is 32 or 64 and
   0 <= q0 < q1 <= L */
API int attend_int8(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                    float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo,
                    const float* relb, int64_t relk) {
    static __thread void* mem;
    static __thread int64_t cap;
    if (!kv8_takes(HD) || L <= 0 || q0 < 0 || q1 > L || q0 >= q1) return 0;
    const int64_t Lp = (L + 7) / 8 * 8;  /* kq and the scales readable to Lp keys; vq: Lp / KV8_PER_DWORD rows */
    const int64_t vb = Lp / KV8_PER_DWORD * HD * 4;
    uint8_t* buf = thread_buffer(&mem, &cap, Lp * HD + vb + 12 * Lp);
    uint8_t* kq = buf;
    uint32_t* vq = (uint32_t*)(buf + Lp * HD);
    float *sk = (float*)(buf + Lp * HD + vb), *lsv = sk + Lp, *isv = lsv + Lp;
    for (int t = 0; t < L; t += 4) {
        const float* x = r + t * ld;
        for (int e = 8; e < 12 && t + e < L; e++) att_prefetch(x + e * ld, D, HD);
        i8_pack_quad(x, ld, D, bk, bv, L - t < 4 ? L - t : 4, HD, kq + (int64_t)t * HD,
                     vq + (int64_t)t / KV8_PER_DWORD * HD,
                     sk + t, lsv + t, isv + t);
    }
    i8_blocks(kq, vq, sk, lsv, isv, r, ld, bq, scale, L, q0, q1, HD, out, outb, ldo, relb, relk);
    return 1;
}
#else
API int kv8_takes(int HD) { (void)HD; return 0; }  /* never in force: the others are never called */
API void kv8_pack_quad(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int n, int HD,
                       uint8_t* kq, uint32_t* vq, float* sk, float* lsv, float* isv) {
    (void)x; (void)ld; (void)D; (void)bk; (void)bv; (void)n; (void)HD; (void)kq; (void)vq; (void)sk; (void)lsv;
    (void)isv;
}
API void kv8_attend(const uint8_t* kq, const uint32_t* vq, const float* sk, const float* lsv, const float* isv,
                    const float* q, int64_t ld, const float* bq, float scale, int L, int q0, int q1, int HD, float* out,
                    uint16_t* outb, int64_t ldo, const float* relb, int64_t relk) {
    (void)relk; (void)kq; (void)vq; (void)sk; (void)lsv; (void)isv; (void)q; (void)ld; (void)bq; (void)scale; (void)L;
    (void)q0;
    (void)q1; (void)HD; (void)out; (void)outb; (void)ldo; (void)relb;
}
API int attend_int8(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                    float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo,
                    const float* relb, int64_t relk) {
    (void)relk; (void)r; (void)ld; (void)D; (void)bq; (void)bk; (void)bv; (void)scale; (void)L; (void)q0; (void)q1;
    (void)HD;
    (void)out; (void)outb; (void)ldo; (void)relb;
    return 0;
}
#endif
/* keys a packed V dword holds (kv8_layout.h): 4 on the avx512 build, 2 on avx2 */
API int kv8_keys_per_dword(void) { return KV8_PER_DWORD; }
