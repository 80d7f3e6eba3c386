/* The encoder's bf16 attention on AVX-512 BF16 vectors, queries in lanes (amx.c's amx_attend off the tile unit:
   Zen 4 / 5, Sapphire Rapids with the tile unit off). The precision of the tile form (amx_attend.h): q, k, v
   and the probabilities rounded to bf16 (nearest even), products summed in fp32, the softmax in fp32.

   The tile form run on vectors (vec_tiles.h, before this) stored every 16 x 16 score tile to memory, read it back
   for the softmax (a horizontal max and sum a row) and kept P V's accumulators in memory between key chunks. Here a
   block of 16 queries runs in registers with one query a lane: a score vector is one key against 16 queries,
   so the row max and the sum of e^(s - max) are lane-wise (no reductions), and P V sums every key into
   registers (one accumulator per head value, 16 queries each), transposed once at the end.

   A job's buffers (kb readable to Lp, L rounded up to 8 keys: the rows past L are whatever lies there, their
   scores never read; a last odd key's pair has zeros for the key past it):
     kb: Lp rows of HD bf16: key j's values (k + bk); dword p of a row is the pair (2p, 2p + 1)   (broadcast)
     vp: Lp / 2 rows of HD dwords: row p, dword d = values d of keys 2p (low half) and 2p + 1      (broadcast)
     qt: HD / 2 rows of 16 dwords: row p, lane i = values 2p, 2p + 1 of the block's query i, scaled
     st: Lp rows of 16 fp32 scores (key j, 16 queries);  pt: Lp / 2 rows of 16 dwords: P's key pairs
   Per block of 16 queries: scores (HD / 2 x Lp vdpbf16ps, 8 keys in flight), the lane-wise max, e^(s - max)
   into bf16 pairs and the fp32 sums, then P V (Lp / 2 x HD vdpbf16ps, 16 head values in flight).
   Zen 4 VM, bge-small b1xs128 int7-row, 2 threads, a thread's cycles a forward (ad hoc): scores 1188 -> 993 k,
   softmax 823 -> 439 k, P V with the outputs 1147 -> 988 k, packing 628 -> 431 k (Q here 85 k, K and V 346 k
   with the token split's packed keys, kv_pack_pair: half the keys, after the qkv matmul).
   Included by amx.c after g_vec_attend and g_amx_hw; builds without AVX-512 BF16 get the entry points' stubs. */
#pragma once
#if HAVE_VEC_ATTEND

/* row i of 16 floats at o (i < n) = lane i of the 16 vectors a[0..15] (a[k]: head value d0 + k of 16 queries) */
static inline void vatt_rows(__m512* a, int n, float* out, uint16_t* outb, int64_t ldo, int d0) {
    __m512i r[16];
    for (int k = 0; k < 16; k++) r[k] = _mm512_castps_si512(a[k]);
    transpose16_epi32(r);
    for (int i = 0; i < n; i++) {
        const __m512 v = _mm512_castsi512_ps(r[i]);
        if (outb) _mm256_storeu_si256((__m256i*)(outb + i * ldo + d0), (__m256i)_mm512_cvtneps_pbh(v));
        else _mm512_storeu_ps(out + i * ldo + d0, v);
    }
}

static inline __m512 vatt_bcast(const uint16_t* p) {  /* one dword (a bf16 pair) in every lane */
    int32_t x;
    memcpy(&x, p, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(x));
}

/* keys t and t + 1 (two: else t alone, t + 1's values zero) of one head from their rows x, x + ld (k D values on,
   v 2D): their kb rows at kb, kb + HD and their vp row at vp */
static inline void vatt_pack_pair(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int two,
                                  int HD, uint16_t* kb, uint32_t* vp) {
    for (int o = 0; o < HD; o += 32) {
        __m512i vq[2];
        for (int e = 0; e < 2; e++) {
            const float* y = x + e * ld;
            __m512i kq = _mm512_setzero_si512();
            vq[e] = kq;
            if (e && !two) continue;
            const float *k = y + D + o, *v = y + 2 * D + o;
            kq = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(k + 16), _mm512_loadu_ps(bk + o + 16)),
                                              _mm512_add_ps(_mm512_loadu_ps(k), _mm512_loadu_ps(bk + o)));
            vq[e] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(bv + o + 16)),
                                                 _mm512_add_ps(_mm512_loadu_ps(v), _mm512_loadu_ps(bv + o)));
            _mm512_storeu_si512(kb + e * HD + o, kq);
        }
        for (int h = 0; h < 2; h++) {  /* values o + 16h ..: key t in the low half of each dword, t + 1 high */
            const __m256i l = h ? _mm512_extracti64x4_epi64(vq[0], 1) : _mm512_castsi512_si256(vq[0]);
            const __m256i u = h ? _mm512_extracti64x4_epi64(vq[1], 1) : _mm512_castsi512_si256(vq[1]);
            const __m512i lo = _mm512_cvtepu16_epi32(l), hi = _mm512_cvtepu16_epi32(u);
            _mm512_storeu_si512(vp + o + 16 * h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* qt for queries b0 .. b0 + n - 1 (n <= 16; lanes past n zero): ((q + bq) * scale) as bf16 pairs, transposed */
static void vatt_pack_q(const float* r, int64_t ld, const float* bq, float scale, int b0, int n, int HD, uint32_t* qt) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int o = 0; o < HD; o += 32) {
        __m512i m[16];
        for (int i = 0; i < 16; i++) {
            if (i >= n) { m[i] = _mm512_setzero_si512(); continue; }
            const float* x = r + (b0 + i) * ld + o;
            const __m512 a = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(bq + o)), vs);
            const __m512 b = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(bq + o + 16)), vs);
            m[i] = (__m512i)_mm512_cvtne2ps_pbh(b, a);  /* dword p: values o + 2p, o + 2p + 1 */
        }
        transpose16_epi32(m);  /* m[p] lane i: query i's pair p */
        for (int p = 0; p < 16; p++) _mm512_storeu_si512(qt + (o / 2 + p) * 16, m[p]);
    }
}

/* the scores of keys j0 .. j0 + 7 against the block's queries into st; mx = their lane-wise max (keys < L) */
static inline __m512 vatt_scores8(const uint32_t* qt, const uint16_t* kb, int j0, int L, int HD, float* st, __m512 mx) {
    __m512 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
    const uint16_t* k0 = kb + (int64_t)j0 * HD;
    for (int p = 0; p < HD / 2; p++) {
        const __m512bh q = (__m512bh)_mm512_loadu_si512(qt + 16 * p);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) a[k] = _mm512_dpbf16_ps(a[k], q, (__m512bh)vatt_bcast(k0 + k * HD + 2 * p));
    }
    for (int k = 0; k < 8; k++) {
        _mm512_storeu_ps(st + (j0 + k) * 16, a[k]);
        if (j0 + k < L) mx = _mm512_max_ps(mx, a[k]);
    }
    return mx;
}

/* P V for head values d0 .. d0 + 15: a[k] lane i = the sum over key pairs p of pt[p] . (values d0 + k of keys 2p,
   2p + 1) */
static inline void vatt_pv16(const uint32_t* pt, const uint32_t* vp, int np, int HD, int d0, __m512* a) {
    for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(pt + 16 * p);
        const uint32_t* v = vp + (int64_t)p * HD + d0;
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) a[k] = _mm512_dpbf16_ps(a[k], w, (__m512bh)vatt_bcast((const uint16_t*)(v + k)));
    }
}

/* 2^t (t <= 0; 0 far below): att_exp's polynomial (2^f, |f| <= 1/2, relative error ~3e-6) scaled by 2^n, with the
   scores in base 2 (one FMA: s log2 e - max log2 e) and without its clamp (scalef underflows to 0 itself): 9
   operations where att_exp took 11 after a subtraction (the softmax was a fifth of the attention's time on Zen 4).
   A degree-4 polynomial (one FMA less, error 4e-5) moved a tenth of a percent of the probabilities to the next bf16,
   and the int7-row-a8 MiniLM's cosine to the C form of the same attention from 0.99989 to 0.9990. */
static inline __m512 vatt_exp2(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.33335581e-3f), f, _mm512_set1_ps(9.61812911e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55041087e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226507e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147181e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* queries [q0, q1) of a job (query i's row at q + i * ld) against its packed keys and values (kb, vp: L keys,
   kb readable to L rounded up to 8 keys; rows past L never read into a result), outputs as amx_attend's */
static void vatt_blocks(const uint16_t* kb, const uint32_t* vp, const float* q, int64_t ld, const float* bq,
                        float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo) {
    static __thread void* mem;
    static __thread int64_t cap;
    const int Lp = (L + 7) / 8 * 8, np = (L + 1) / 2;
    /* bytes: qt (HD / 2 x 16 dwords), st (Lp x 16 fp32), pt (Lp / 2 x 16 dwords) */
    const int64_t qb = (int64_t)HD * 32, sb = (int64_t)Lp * 64;
    uint8_t* buf = thread_buffer(&mem, &cap, qb + sb + sb / 2);
    uint32_t *qt = (uint32_t*)buf, *pt = (uint32_t*)(buf + qb + sb);
    float* st = (float*)(buf + qb);
    const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int b0 = q0; b0 < q1; b0 += 16) {
        const int n = q1 - b0 < 16 ? q1 - b0 : 16;
        vatt_pack_q(q, ld, bq, scale, b0, n, HD, qt);
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int j0 = 0; j0 < L; j0 += 8) mx = vatt_scores8(qt, kb, j0, L, HD, st, mx);
        const __m512 l2e = _mm512_set1_ps(1.44269504f), ml = _mm512_mul_ps(mx, l2e);
        for (int p = 0; p < np; p++) {  /* e^(s - max) of keys 2p, 2p + 1 (a key past L: 0) as one bf16 pair a lane */
            const __m512 e0 = vatt_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(st + 32 * p), l2e, ml));
            const __m512 e1 = 2 * p + 1 < L ? vatt_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(st + 32 * p + 16), l2e, ml))
                                            : _mm512_setzero_ps();
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            const __m512i c = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  /* words 0..15: e0, 16..31: e1 -> interleaved */
            _mm512_storeu_si512(pt + 16 * p, _mm512_permutexvar_epi16(ix, c));
        }
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
        for (int d0 = 0; d0 < HD; d0 += 16) {
            __m512 a[16];
            vatt_pv16(pt, vp, np, HD, d0, a);
            for (int k = 0; k < 16; k++) a[k] = _mm512_mul_ps(a[k], inv);
            const int64_t at = (int64_t)(b0 - q0) * ldo;
            vatt_rows(a, n, outb ? NULL : out + at, outb ? outb + at : NULL, ldo, d0);
        }
    }
}

/* amx_attend's contract (amx.c), on vectors: the job's keys and values packed into a thread buffer, then its blocks */
static void vec_attend(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                       float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo) {
    static __thread void* mem;
    static __thread int64_t cap;
    const int64_t kvb = (int64_t)((L + 7) / 8 * 8) * HD * 2;  /* kb, vp: bytes each */
    uint8_t* buf = thread_buffer(&mem, &cap, 2 * kvb);
    uint16_t* kb = (uint16_t*)buf;
    uint32_t* vp = (uint32_t*)(buf + kvb);
    for (int t = 0; t < L; t += 2) {
        const float* x = r + t * ld;
        if (t + 8 < L) { att_prefetch(x + 8 * ld, D, HD); att_prefetch(x + 9 * ld, D, HD); }
        vatt_pack_pair(x, ld, D, bk, bv, t + 1 < L, HD, kb + (int64_t)t * HD, vp + (int64_t)t / 2 * HD);
    }
    vatt_blocks(kb, vp, r, ld, bq, scale, L, q0, q1, HD, out, outb, ldo);
}

/* The token split's packed keys and values (bert_forward.c): each part packs its own tokens' keys and values once
   (kv_pack_pair: kb and vp rows), and every part's attention reads them (kv_attend: vatt_blocks), where each
   (sequence, head) job packed all of its keys itself (half of them written by the other core). In force where
   amx_attend runs on these vectors (kv_packed). */
API int kv_packed(int HD) { return g_vec_attend && !g_amx_hw && amx_attend_takes(HD); }
API void kv_pack_pair(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int two, int HD,
                      uint16_t* kb, uint32_t* vp) {
    vatt_pack_pair(x, ld, D, bk, bv, two, HD, kb, vp);
}
API void kv_attend(const uint16_t* kb, const uint32_t* vp, const float* q, int64_t ld, const float* bq, float scale,
                   int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo) {
    vatt_blocks(kb, vp, q, ld, bq, scale, L, q0, q1, HD, out, outb, ldo);
}
#else
API int kv_packed(int HD) { (void)HD; return 0; }  /* never in force: the others are never called */
API void kv_pack_pair(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int two, int HD,
                      uint16_t* kb, uint32_t* vp) {
    (void)x; (void)ld; (void)D; (void)bk; (void)bv; (void)two; (void)HD; (void)kb; (void)vp;
}
API void kv_attend(const uint16_t* kb, const uint32_t* vp, const float* q, int64_t ld, const float* bq, float scale,
                   int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo) {
    (void)kb; (void)vp; (void)q; (void)ld; (void)bq; (void)scale; (void)L; (void)q0; (void)q1; (void)HD; (void)out;
    (void)outb; (void)ldo;
}
#endif
