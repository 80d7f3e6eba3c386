/* The AVX-512 GEMM tiles (the `avx512` build; included by packed.c): the same packed layout (packed.h: 8 rows
   interleaved per group), two groups side by side in one 512-bit vector, so one instruction does 16 rows.

   Q8_0 / Q7_0 x 4 tokens (q8_tile16x4): per step, 32 bytes of group g and 32 of group g + 1 (rows 0..7 and
   8..15, values 4s..4s+3) in one vector against the token's 4 values broadcast, vpdpbusd: 64 products;
   x 6 tokens over 4 groups (q8_tile32x6): two such vectors per step.
   F32 x up to 12 tokens (float_tile512): two or four groups, 16 or 32 rows, in a vector per pair and value k,
   against x[t][k].

   Numerics: every (row, token) sum is the one packed.c's 8-row tiles compute, in the same order (a block's
   exact integer sum, then one FMA per block; one FMA per k for fp32), so the results are bitwise the
   same as the avx2 build's and never depend on batch-mates. */
#pragma once
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_AVX512 1

AI __m512i cat_i(const uint8_t* a, const uint8_t* b) {  /* 32 bytes at a | 32 bytes at b */
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                              _mm256_loadu_si256((const __m256i*)b), 1);
}
AI __m512 cat_f(const float* a, const float* b) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
}
AI __m512 scales16(const uint8_t* a, const uint8_t* b) {  /* two groups' 8 fp16 scales -> 16 floats */
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                                   _mm_loadu_si128((const __m128i*)b), 1));
}
AI __m512i bcast4z(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

/* groups g0, g1 (16 rows) x tokens x, x + xs, x + 2xs, x + 3xs: out[16 * t + r]. The payload holds w + zero
   (Q7_0: 64; Q8_0: 128, Q8_ZERO): the stored bytes against the activations as they are, zero * (the block's
   activation sum) off. */
AI void q8_tile16x4(const int zero, const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* x, int64_t xs,
                    float* out) {
    const int64_t ub = unit_bytes(T_Q8_0);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    const xblock *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b0 = g0 + u * ub, *b1 = g1 + u * ub;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 2
        for (int s = 0; s < 8; s++) {
            const __m512i w = cat_i(b0 + 16 + 32 * s, b1 + 16 + 32 * s);
            a0 = _mm512_dpbusd_epi32(a0, w, bcast4z(x0[u].q + 4 * s));
            a1 = _mm512_dpbusd_epi32(a1, w, bcast4z(x1[u].q + 4 * s));
            a2 = _mm512_dpbusd_epi32(a2, w, bcast4z(x2[u].q + 4 * s));
            a3 = _mm512_dpbusd_epi32(a3, w, bcast4z(x3[u].q + 4 * s));
        }
        const __m512 dv = scales16(b0, b1);
#define ACC(X, A, F) F = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(A, _mm512_set1_epi32(zero * X[u].sum))), \
                                         _mm512_mul_ps(dv, _mm512_set1_ps(X[u].d)), F);
        ACC(x0, a0, f0) ACC(x1, a1, f1) ACC(x2, a2, f2) ACC(x3, a3, f3)
#undef ACC
    }
    _mm512_storeu_ps(out, f0); _mm512_storeu_ps(out + 16, f1); _mm512_storeu_ps(out + 32, f2);
    _mm512_storeu_ps(out + 48, f3);
}

/* Q4_0 / Q4_1 (4-bit payloads, packed.h: step p's values in the low nibbles, step p + 4's in the high ones)
   x 4 tokens over groups g0, g1: out[16 * t + r]. Q4_0 stores w + 8: 8 * (the block's activation sum) starts
   each accumulator; Q4_1's offsets m * (d_x * sum) add up beside, as group_dot's do. */
AI void q4_tile16x4(const int has_min, const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* x, int64_t xs,
                    float* out) {
    const int64_t ub = unit_bytes(has_min ? T_Q4_1 : T_Q4_0);
    const int head = head_bytes(has_min ? T_Q4_1 : T_Q4_0), zero = has_min ? 0 : 8;
    const __m512i m4 = _mm512_set1_epi8(0xF);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, o0 = f0, o1 = f0, o2 = f0, o3 = f0;
    const xblock *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b0 = g0 + u * ub, *b1 = g1 + u * ub;
        __m512i a0 = _mm512_set1_epi32(-zero * x0[u].sum), a1 = _mm512_set1_epi32(-zero * x1[u].sum);
        __m512i a2 = _mm512_set1_epi32(-zero * x2[u].sum), a3 = _mm512_set1_epi32(-zero * x3[u].sum);
        for (int p = 0; p < 4; p++) {
            const __m512i raw = cat_i(b0 + head + 32 * p, b1 + head + 32 * p);
            const __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
#define TOK(X, A) A = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(A, lo, bcast4z(X[u].q + 4 * p)), hi, \
                                          bcast4z(X[u].q + 16 + 4 * p));
            TOK(x0, a0) TOK(x1, a1) TOK(x2, a2) TOK(x3, a3)
#undef TOK
        }
        const __m512 dv = scales16(b0, b1);
#define ACC(X, A, F) F = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A), _mm512_mul_ps(dv, _mm512_set1_ps(X[u].d)), F);
        ACC(x0, a0, f0) ACC(x1, a1, f1) ACC(x2, a2, f2) ACC(x3, a3, f3)
#undef ACC
        if (has_min) {
            const __m512 mv = scales16(b0 + 16, b1 + 16);
            o0 = _mm512_fmadd_ps(mv, _mm512_set1_ps(x0[u].s), o0); o1 = _mm512_fmadd_ps(mv, _mm512_set1_ps(x1[u].s), o1);
            o2 = _mm512_fmadd_ps(mv, _mm512_set1_ps(x2[u].s), o2); o3 = _mm512_fmadd_ps(mv, _mm512_set1_ps(x3[u].s), o3);
        }
    }
    _mm512_storeu_ps(out, _mm512_add_ps(f0, o0)); _mm512_storeu_ps(out + 16, _mm512_add_ps(f1, o1));
    _mm512_storeu_ps(out + 32, _mm512_add_ps(f2, o2)); _mm512_storeu_ps(out + 48, _mm512_add_ps(f3, o3));
}

AI __m512i bytes16(const uint8_t* a, const uint8_t* b, const int sign) {  /* two groups' 8 bytes -> 16 int32 */
    const __m128i v = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)a), _mm_loadl_epi64((const __m128i*)b));
    return sign ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v);
}

/* Q4_K / Q6_K (super-blocks of 8 sub-blocks of 32; packed.h's unit) x 4 tokens over groups g0, g1: out[16 * t + r].
   Per sub-block j and row, the exact integer sum of scale * w * x (Q4_K: the unsigned nibbles, one scale; Q6_K:
   w + 32 in 6 bits, a signed scale per half, 32 * (the half's activation sum) off), then group_dot's float steps
   in its order: acc += float(isum) * (d * d_x), K-quant mins m * s_x summed per super-block, times dmin, off.
   group_dot's sums by maddubs / madd, here by vpdpbusd: the same integers, so the same bits. */
AI void qk_tile16x4(const int type, const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* x, int64_t xs,
                    float* out) {
    const int q6 = type == T_Q6_K, head = head_bytes(type), pb = payload_bytes(kind_of(type));
    const int64_t ub = unit_bytes(type);
    const __m512i m4 = _mm512_set1_epi8(0xF), m3 = _mm512_set1_epi8(0x30);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, o0 = f0, o1 = f0, o2 = f0, o3 = f0;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b0 = g0 + u * ub, *b1 = g1 + u * ub;
        const __m512 dv = scales16(b0, b1);
        __m512 n0 = _mm512_setzero_ps(), n1 = n0, n2 = n0, n3 = n0;  /* the mins' share of this super-block */
        for (int j = 0; j < 8; j++) {
            const xblock *x0 = x + 8 * u + j, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
            const uint8_t *q0 = b0 + head + j * pb, *q1 = b1 + head + j * pb;
            __m512i l0, l1, l2, l3, h0, h1, h2, h3;  /* per token: sums over the low / high half of the block */
            if (q6) {
#define START(X, L, H) L = _mm512_set1_epi32(-32 * X->half[0]); H = _mm512_set1_epi32(-32 * X->half[1]);
                START(x0, l0, h0) START(x1, l1, h1) START(x2, l2, h2) START(x3, l3, h3)
#undef START
            } else {
                l0 = l1 = l2 = l3 = h0 = h1 = h2 = h3 = _mm512_setzero_si512();
            }
            const __m512i hb0 = q6 ? cat_i(q0 + 128, q1 + 128) : m4, hb1 = q6 ? cat_i(q0 + 160, q1 + 160) : m4;
            for (int p = 0; p < 4; p++) {  /* steps p (values 4p..4p+3) and p + 4 (16 + 4p..) */
                const __m512i raw = cat_i(q0 + 32 * p, q1 + 32 * p);
                __m512i wl = _mm512_and_si512(raw, m4), wh = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                if (q6) {  /* step p's 2-bit high parts: bits 2p of hb0 (p + 4's: of hb1) -> bits 4, 5 */
                    const int sh = 2 * p;
                    const __m512i bl = sh < 4 ? _mm512_slli_epi16(hb0, 4 - sh) : _mm512_srli_epi16(hb0, sh - 4);
                    const __m512i bh = sh < 4 ? _mm512_slli_epi16(hb1, 4 - sh) : _mm512_srli_epi16(hb1, sh - 4);
                    wl = _mm512_or_si512(wl, _mm512_and_si512(bl, m3));
                    wh = _mm512_or_si512(wh, _mm512_and_si512(bh, m3));
                }
#define TOK(X, L, H) L = _mm512_dpbusd_epi32(L, wl, bcast4z(X->q + 4 * p)); \
                     H = _mm512_dpbusd_epi32(H, wh, bcast4z(X->q + 16 + 4 * p));
                TOK(x0, l0, h0) TOK(x1, l1, h1) TOK(x2, l2, h2) TOK(x3, l3, h3)
#undef TOK
            }
            /* Q4_K: one scale per sub-block (u8); Q6_K: one per half (i8) */
            const __m512i sl = q6 ? bytes16(b0 + 16 + 16 * j, b1 + 16 + 16 * j, 1)
                                  : bytes16(b0 + 32 + 8 * j, b1 + 32 + 8 * j, 0);
            const __m512i sh = q6 ? bytes16(b0 + 24 + 16 * j, b1 + 24 + 16 * j, 1) : sl;
#define ISUM(L, H) (q6 ? _mm512_add_epi32(_mm512_mullo_epi32(L, sl), _mm512_mullo_epi32(H, sh)) \
                        : _mm512_mullo_epi32(_mm512_add_epi32(L, H), sl))
#define ACC(X, L, H, F) F = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ISUM(L, H)), _mm512_mul_ps(dv, _mm512_set1_ps(X->d)), F);
            ACC(x0, l0, h0, f0) ACC(x1, l1, h1, f1) ACC(x2, l2, h2, f2) ACC(x3, l3, h3, f3)
#undef ACC
#undef ISUM
            if (!q6) {
                const __m512 mf = _mm512_cvtepi32_ps(bytes16(b0 + 96 + 8 * j, b1 + 96 + 8 * j, 0));
                n0 = _mm512_fmadd_ps(mf, _mm512_set1_ps(x0->s), n0);
                n1 = _mm512_fmadd_ps(mf, _mm512_set1_ps(x1->s), n1);
                n2 = _mm512_fmadd_ps(mf, _mm512_set1_ps(x2->s), n2);
                n3 = _mm512_fmadd_ps(mf, _mm512_set1_ps(x3->s), n3);
            }
        }
        if (!q6) {  /* value = d * sc * w - dmin * m */
            const __m512 dmin = scales16(b0 + 16, b1 + 16);
            o0 = _mm512_fnmadd_ps(dmin, n0, o0); o1 = _mm512_fnmadd_ps(dmin, n1, o1);
            o2 = _mm512_fnmadd_ps(dmin, n2, o2); o3 = _mm512_fnmadd_ps(dmin, n3, o3);
        }
    }
    _mm512_storeu_ps(out, _mm512_add_ps(f0, o0)); _mm512_storeu_ps(out + 16, _mm512_add_ps(f1, o1));
    _mm512_storeu_ps(out + 32, _mm512_add_ps(f2, o2)); _mm512_storeu_ps(out + 48, _mm512_add_ps(f3, o3));
}

/* the K-quant tiles, the type a constant in each (the q6 branches compiled out of the loops) */
static void q4k_tile16x4(const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* x, int64_t xs, float* out) {
    qk_tile16x4(T_Q4_K, g0, g1, nu, x, xs, out);
}
static void q6k_tile16x4(const uint8_t* g0, const uint8_t* g1, int64_t nu, const xblock* x, int64_t xs, float* out) {
    qk_tile16x4(T_Q6_K, g0, g1, nu, x, xs, out);
}

/* groups g .. g + 3 (32 rows, gb bytes apart) x 6 tokens: out[32 * t + r]. 12 integer and 12 float
   accumulators in registers (AVX-512 has 32): per step 2 weight vectors and 6 broadcasts feed 12 vpdpbusd,
   where the 16-row tile's 1 and 4 feed 4 (loads, not multiplies, bound that one). */
AI void q8_tile32x6(const int zero, const uint8_t* g, int64_t gb, int64_t nu, const xblock* x, int64_t xs,
                    float* out) {
    const int64_t ub = unit_bytes(T_Q8_0);
    __m512 fa0 = _mm512_setzero_ps(), fa1 = fa0, fa2 = fa0, fa3 = fa0, fa4 = fa0, fa5 = fa0;
    __m512 fb0 = fa0, fb1 = fa0, fb2 = fa0, fb3 = fa0, fb4 = fa0, fb5 = fa0;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b0 = g + u * ub, *b1 = b0 + gb, *b2 = b1 + gb, *b3 = b2 + gb;
        /* the accumulators start at -zero * (the block's activation sum): the offset is off when they end */
#define START(t) _mm512_set1_epi32(-zero * x[t * xs + u].sum)
        __m512i ia0 = START(0), ia1 = START(1), ia2 = START(2), ia3 = START(3), ia4 = START(4), ia5 = START(5);
#undef START
        __m512i ib0 = ia0, ib1 = ia1, ib2 = ia2, ib3 = ia3, ib4 = ia4, ib5 = ia5;
#pragma GCC unroll 1
        for (int s = 0; s < 8; s++) {
            const __m512i w0 = cat_i(b0 + 16 + 32 * s, b1 + 16 + 32 * s), w1 = cat_i(b2 + 16 + 32 * s, b3 + 16 + 32 * s);
#define TOK(t) { const __m512i xv = bcast4z(x[t * xs + u].q + 4 * s); \
                 ia##t = _mm512_dpbusd_epi32(ia##t, w0, xv); ib##t = _mm512_dpbusd_epi32(ib##t, w1, xv); }
            TOK(0) TOK(1) TOK(2) TOK(3) TOK(4) TOK(5)
#undef TOK
        }
        const __m512 d0 = scales16(b0, b1), d1 = scales16(b2, b3);
#define ACC(t) { const __m512 dx = _mm512_set1_ps(x[t * xs + u].d);                                   \
                 fa##t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia##t), _mm512_mul_ps(d0, dx), fa##t);     \
                 fb##t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib##t), _mm512_mul_ps(d1, dx), fb##t); }
        ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    }
    const __m512 r[12] = {fa0, fb0, fa1, fb1, fa2, fb2, fa3, fb3, fa4, fb4, fa5, fb5};
    for (int i = 0; i < 12; i++) _mm512_storeu_ps(out + 16 * i, r[i]);
}

/* Decode (1 token) over 4 groups: four interleaved streams, each prefetched PF_BYTES ahead (one stream per
   group, as the 8-row kernels read, leaves a core's memory parallelism unused at Zen 5's bandwidth; on Zen 4
   it is the slower way: packed.c's decode_streams). The same per-row sums and float steps as q8_stream1 /
   float_tile at T = 1 (+ 0.f: group_dot's zero offset). */
AI void q8_tile32x1(const int zero, const uint8_t* g, int64_t gb, int64_t nu, const xblock* x, float* out) {
    const int64_t ub = unit_bytes(T_Q8_0);
    __m512 fa = _mm512_setzero_ps(), fb = fa;
    for (int64_t u = 0; u < nu; u++) {
        const uint8_t *b0 = g + u * ub, *b1 = b0 + gb, *b2 = b1 + gb, *b3 = b2 + gb;
        if (PF_BYTES) for (int64_t o = 0; o < ub; o += 64) {
            _mm_prefetch((const char*)b0 + PF_BYTES + o, _MM_HINT_T0); _mm_prefetch((const char*)b1 + PF_BYTES + o, _MM_HINT_T0);
            _mm_prefetch((const char*)b2 + PF_BYTES + o, _MM_HINT_T0); _mm_prefetch((const char*)b3 + PF_BYTES + o, _MM_HINT_T0);
        }
        __m512i ia = _mm512_set1_epi32(-zero * x[u].sum), ib = ia;
        for (int s = 0; s < 8; s++) {
            const __m512i xv = bcast4z(x[u].q + 4 * s);
            ia = _mm512_dpbusd_epi32(ia, cat_i(b0 + 16 + 32 * s, b1 + 16 + 32 * s), xv);
            ib = _mm512_dpbusd_epi32(ib, cat_i(b2 + 16 + 32 * s, b3 + 16 + 32 * s), xv);
        }
        const __m512 dx = _mm512_set1_ps(x[u].d);
        fa = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(scales16(b0, b1), dx), fa);
        fb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), _mm512_mul_ps(scales16(b2, b3), dx), fb);
    }
    _mm512_storeu_ps(out, _mm512_add_ps(fa, _mm512_setzero_ps()));
    _mm512_storeu_ps(out + 16, _mm512_add_ps(fb, _mm512_setzero_ps()));
}
static void float_tile32x1(const float* g, int64_t gs, int64_t K, const float* x, float* out) {
    __m512 a = _mm512_setzero_ps(), b = a;
    for (int64_t k = 0; k < K; k++) {
        if ((k & 1) == 0 && PF_BYTES)  /* one line of each stream per two values */
            for (int i = 0; i < 4; i++) _mm_prefetch((const char*)(g + i * gs + 8 * k) + PF_BYTES, _MM_HINT_T0);
        const __m512 v = _mm512_set1_ps(x[k]);
        a = _mm512_fmadd_ps(cat_f(g + 8 * k, g + gs + 8 * k), v, a);
        b = _mm512_fmadd_ps(cat_f(g + 2 * gs + 8 * k, g + 3 * gs + 8 * k), v, b);
    }
    _mm512_storeu_ps(out, a); _mm512_storeu_ps(out + 16, b);
}

/* Q pairs of groups (Q <= 2: groups g .. g + 2Q - 1, 16 or 32 rows; gs floats apart) x T tokens (T <= 12; rows
   of x, K apart): out[32 * t + r]. One FMA per k for each (row, token), k in order: the 8-row tiles' bits at
   any Q and T. 12 tokens (24 accumulators) do 24 FMAs per two weight vectors: the weights stream from L2 half
   as often as at 6. With Q and T constants the accumulator arrays stay in registers. */
AI void float_tile512(const int Q, const int T, const float* g, int64_t gs, int64_t K, const float* x, float* out) {
    __m512 a[12], b[12];
    for (int t = 0; t < T; t++) a[t] = b[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 w0 = cat_f(g + 8 * k, g + gs + 8 * k);
        const __m512 w1 = Q > 1 ? cat_f(g + 2 * gs + 8 * k, g + 3 * gs + 8 * k) : w0;
#pragma GCC unroll 12
        for (int t = 0; t < T; t++) {
            const __m512 v = _mm512_set1_ps(x[t * K + k]);
            a[t] = _mm512_fmadd_ps(w0, v, a[t]);
            if (Q > 1) b[t] = _mm512_fmadd_ps(w1, v, b[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        _mm512_storeu_ps(out + 32 * t, a[t]);
        if (Q > 1) _mm512_storeu_ps(out + 32 * t + 16, b[t]);
    }
}
typedef void (*float512_fn)(const float*, int64_t, int64_t, const float*, float*);
#define FT512(Q, T) static void float512_##Q##_##T(const float* g, int64_t gs, int64_t K, const float* x, float* out) \
                    { float_tile512(Q, T, g, gs, K, x, out); }
#define FT512_ALL(Q) FT512(Q, 2) FT512(Q, 3) FT512(Q, 4) FT512(Q, 5) FT512(Q, 6) FT512(Q, 7) FT512(Q, 8) FT512(Q, 9) \
                     FT512(Q, 10) FT512(Q, 11) FT512(Q, 12)
FT512(1, 1) FT512_ALL(1) FT512_ALL(2)
#define FT512_ROW(Q, ONE) {ONE, float512_##Q##_2, float512_##Q##_3, float512_##Q##_4, float512_##Q##_5, float512_##Q##_6, \
                           float512_##Q##_7, float512_##Q##_8, float512_##Q##_9, float512_##Q##_10, float512_##Q##_11,   \
                           float512_##Q##_12}
/* [Q - 1][T - 1]; 32 rows x 1 token is decode's four-stream kernel */
static const float512_fn FLOAT512_FNS[2][12] = {FT512_ROW(1, float512_1_1), FT512_ROW(2, float_tile32x1)};
#undef FT512
#undef FT512_ALL
#undef FT512_ROW
/* T_Q7_ROW / T_Q7_ROW8 (int7-row, int7-row-a8: shift 6 / 7) over Q pairs of groups (Q <= 2: 16 or 32 rows;
   packed.h's PAIRED_ROWS layout, pairs 2 * gb bytes apart) x T tokens (T <= 6): out[32 * t + r]. packed_q7.h's
   q7r_tile with vpdpbusd: the token's values + 64 or + 128 (unsigned operand, broadcast) against the signed
   weights (one 64-byte load per 16 rows and step); the int32 sums over the whole row are the AVX2 build's exactly
   (maddubs / madd of the same products), and so is the one float step per row and token: the same bits
   in both builds. No per-block float work; the rows' weight sums (the offset's term) are read once.
   Units [u0, u1) of K (a slab, packed.c's row_panel512): the sums start from `part` unless `first`, and go back
   there unless `last`, which ends with the float step: into out (32 floats a token), or, when y is not NULL,
   straight into the output rows (token t's 16 Q values at y + t * ldy, added to them when acc: the copy through
   out and store_group, 512-bit stores read back in 256-bit halves, took ~5% of a K = 384 matrix's time: one
   thread, M 64, Zen 4, 87% -> 92% of the VNNI peak). pn: where to prefetch pstep bytes a unit (and 2 * gb
   on for the second pair), or NULL. */
/* the 16 rows' weight sums over the whole row (repack.c: int32 in unit 1's head; a one-unit row, u1 == 1: its
   unit's int16 wsum), read once a tile as its sums' start where the unit loop added up each unit's, and
   subtracted at the float step (Zen 4, bge-small b1xs128: 0.99x the forward's time) */
static inline __m512i row_wsums(const uint8_t* g, int64_t ub, int64_t u1) {
    return u1 > 1 ? _mm512_loadu_si512(g + 2 * ub) : _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)(g + 32)));
}
AI void q7r_tile512(const int Q, const int T, const int shift, const uint8_t* pn, int64_t pstep, const uint8_t* g,
                    int64_t gb, int64_t u0, int64_t u1, const xblock* x, int64_t xs, int32_t* part, int first, int last,
                    float* out, float* y, int64_t ldy, int acc) {
    const int64_t ub = unit_bytes(T_Q7_ROW);
    /* the sums start at -offset * the rows' weight sums (exact in int32; the slabs after carry them on) */
    const __m128i sh = _mm_cvtsi32_si128(shift);
    const __m512i zero = _mm512_setzero_si512();
    const __m512i za = first ? _mm512_sub_epi32(zero, _mm512_sll_epi32(row_wsums(g, ub, u1), sh)) : zero;
    const __m512i zb = first && Q > 1 ? _mm512_sub_epi32(zero, _mm512_sll_epi32(row_wsums(g + 2 * gb, ub, u1), sh)) : za;
    __m512i ia0 = za, ia1 = za, ia2 = za, ia3 = za, ia4 = za, ia5 = za;
    __m512i ib0 = zb, ib1 = zb, ib2 = zb, ib3 = zb, ib4 = zb, ib5 = zb;
    __m512i* pv = (__m512i*)part;  /* the slabs before: ia0..5, ib0..5 (unaligned) */
#define LD(i, v) v = _mm512_loadu_si512(pv + i)
    if (!first) { LD(0, ia0); LD(1, ia1); LD(2, ia2); LD(3, ia3); LD(4, ia4); LD(5, ia5); LD(6, ib0); LD(7, ib1);
                  LD(8, ib2); LD(9, ib3); LD(10, ib4); LD(11, ib5); }
#undef LD
    for (int64_t u = u0; u < u1; u++) {  /* pairs of groups (packed.h's PAIRED_ROWS): 2 * ub bytes a unit */
        const uint8_t *p0 = g + 2 * u * ub, *p1 = p0 + 2 * gb;
        if (pn)  /* this call's share of the next slab, a few lines a unit from each pair of groups */
            for (int64_t o = (u - u0) * pstep; o < (u - u0 + 1) * pstep; o += 64) {
                _mm_prefetch((const char*)pn + o, _MM_HINT_T1);
                if (Q > 1) _mm_prefetch((const char*)pn + 2 * gb + o, _MM_HINT_T1);
            }
#pragma GCC unroll 1
        for (int s = 0; s < 8; s++) {
            const __m512i w0 = _mm512_loadu_si512(p0 + 64 + 64 * s);
            const __m512i w1 = Q > 1 ? _mm512_loadu_si512(p1 + 64 + 64 * s) : w0;
#define TOK(t) if (T > t) { const __m512i xv = bcast4z(x[t * xs + u].q + 4 * s); ia##t = _mm512_dpbusd_epi32(ia##t, xv, w0); \
                            if (Q > 1) ib##t = _mm512_dpbusd_epi32(ib##t, xv, w1); }
            TOK(0) TOK(1) TOK(2) TOK(3) TOK(4) TOK(5)
#undef TOK
        }
    }
    if (!last) {
#define ST(i, v) _mm512_storeu_si512(pv + i, v)
        ST(0, ia0); ST(1, ia1); ST(2, ia2); ST(3, ia3); ST(4, ia4); ST(5, ia5); ST(6, ib0); ST(7, ib1);
        ST(8, ib2); ST(9, ib3); ST(10, ib4); ST(11, ib5);
#undef ST
        return;
    }
    const __m512 da = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));  /* the rows' scales */
    const __m512 db = Q > 1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g + 2 * gb))) : da;
/* the product rounded before the add (an empty asm on it: GCC contracted mul + add into an FMA in some tiles, and
   a token's sum then depended on its place in the tile: tests/test_row_quantization.py) */
#define PUT(p, v) { float* p_ = (p); __m512 v_ = (v); __asm__("" : "+v"(v_));                                  \
                    _mm512_storeu_ps(p_, acc ? _mm512_add_ps(_mm512_loadu_ps(p_), v_) : v_); }
#define OUT(t) if (T > t) { const __m512 xd = _mm512_set1_ps(x[t * xs].d);                                          \
        const __m512 va = _mm512_mul_ps(_mm512_cvtepi32_ps(ia##t), _mm512_mul_ps(da, xd));     \
        const __m512 vb = Q > 1 ? _mm512_mul_ps(_mm512_cvtepi32_ps(ib##t),                 \
                                                _mm512_mul_ps(db, xd)) : va;                                        \
        if (y) { PUT(y + t * ldy, va) if (Q > 1) PUT(y + t * ldy + 16, vb) }                                       \
        else { _mm512_storeu_ps(out + 32 * t, va); if (Q > 1) _mm512_storeu_ps(out + 32 * t + 16, vb); } }
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5)
#undef OUT
#undef PUT
}
typedef void (*q7r512_fn)(int, const uint8_t*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, const xblock*, int64_t,
                          int32_t*, int, int, float*, float*, int64_t, int);
#define Q7R512(Q, T)                                                                                                 \
    static void q7r512_##Q##_##T(int shift, const uint8_t* pn, int64_t pstep, const uint8_t* g, int64_t gb, int64_t u0, \
                                 int64_t u1, const xblock* x, int64_t xs, int32_t* part, int first, int last,     \
                                 float* out, float* y, int64_t ldy, int acc) {                                       \
        q7r_tile512(Q, T, shift, pn, pstep, g, gb, u0, u1, x, xs, part, first, last, out, y, ldy, acc); }
Q7R512(1, 1) Q7R512(1, 2) Q7R512(1, 3) Q7R512(1, 4) Q7R512(1, 5) Q7R512(1, 6)
Q7R512(2, 1) Q7R512(2, 2) Q7R512(2, 3) Q7R512(2, 4) Q7R512(2, 5) Q7R512(2, 6)
static const q7r512_fn Q7R512_FNS[2][6] = {{q7r512_1_1, q7r512_1_2, q7r512_1_3, q7r512_1_4, q7r512_1_5, q7r512_1_6},
                                           {q7r512_2_1, q7r512_2_2, q7r512_2_3, q7r512_2_4, q7r512_2_5, q7r512_2_6}};
#else
#define HAVE_AVX512 0
#endif
