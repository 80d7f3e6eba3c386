/* Per-token math of the decoder step (llama_step.c) and the encoder (bert_forward.c): vector exp, dot, axpy,
   softmax pieces, SiLU / GELU (tanh and erf), RMSNorm / LayerNorm, RoPE, attention scores and weighted sums.
   AVX2 where the build has it, plain C otherwise (the same results to rounding). */
#pragma once
#include "blockq.h"

#include <math.h>

/* Cephes expf, ~1 ulp on [-88, 88], at a vector width W (256 or 512; RND: the width's round-to-integer
   call, SI: its integer suffix). One body for both, so the AVX-512 loops below do each lane's operations
   of the AVX2 ones (sums kept in 8-lane halves, in the same order): every build gives the same bits. */
#define DEFINE_EXP(NAME, VF, VI, W, RND, SI)                                                               \
    static inline VF NAME(VF x) {                                                                        \
        x = _mm##W##_min_ps(_mm##W##_max_ps(x, _mm##W##_set1_ps(-87.3f)), _mm##W##_set1_ps(88.3f));       \
        VF fx = RND(_mm##W##_mul_ps(x, _mm##W##_set1_ps(1.44269504088896341f)),                          \
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                      \
        x = _mm##W##_fnmadd_ps(fx, _mm##W##_set1_ps(0.693359375f), x);                                   \
        x = _mm##W##_fnmadd_ps(fx, _mm##W##_set1_ps(-2.12194440e-4f), x);                                \
        VF y = _mm##W##_set1_ps(1.9875691500E-4f);                                                       \
        y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(1.3981999507E-3f));                                 \
        y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(8.3334519073E-3f));                                 \
        y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(4.1665795894E-2f));                                 \
        y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(1.6666665459E-1f));                                 \
        y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(5.0000001201E-1f));                                 \
        y = _mm##W##_fmadd_ps(y, _mm##W##_mul_ps(x, x), _mm##W##_add_ps(x, _mm##W##_set1_ps(1.f)));      \
        VI e = _mm##W##_slli_epi32(_mm##W##_add_epi32(_mm##W##_cvtps_epi32(fx), _mm##W##_set1_epi32(127)), 23); \
        return _mm##W##_mul_ps(y, _mm##W##_castsi##SI##_ps(e));                                          \
    }
#ifdef __AVX2__
DEFINE_EXP(exp256, __m256, __m256i, 256, _mm256_round_ps, 256)
#endif
#ifdef __AVX512F__
DEFINE_EXP(exp512, __m512, __m512i, 512, _mm512_roundscale_ps, 512)
#endif

static inline float dotf(const float* a, const float* b, int n) {
    int i = 0; float r = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    r = hsum8(acc);
#endif
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static inline void axpy(float* y, float a, const float* x, int n) {  /* y += a * x */
    int i = 0;
#ifdef __AVX2__
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

static inline float vmax(const float* x, int n) {  /* the largest of x[0..n), n >= 1 */
    int i = 0; float mx = -INFINITY;
#ifdef __AVX2__
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float t[8]; _mm256_storeu_ps(t, m);
    for (int j = 0; j < 8; j++) mx = t[j] > mx ? t[j] : mx;
#endif
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

static inline void vscale(float* x, float a, int n) {  /* x *= a */
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(a)));
#endif
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(a)));
#endif
    for (; i < n; i++) x[i] *= a;
}

/* x[i] = exp(x[i] - mx); returns the sum */
static float exp_shift(float* x, int n, float mx) {
    int i = 0; float sum = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
    }
#endif
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(x + i, e); acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    return sum;
}

static void silu_mul(float* g, const float* u, int n) {  /* g = g * sigmoid(g) * u */
    int i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* g = gelu(g + b) with GELU's tanh form (GPT-2's "gelu_new"): 0.5 x (1 + tanh(y)) = x * sigmoid(2 y),
   y = sqrt(2 / pi) (x + 0.044715 x^3); b may be NULL */
static void bias_gelu(float* g, const float* b, int n) {
    const float k = 0.7978845608028654f, c = 0.044715f;
    int i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        if (b) x = _mm256_add_ps(x, _mm256_loadu_ps(b + i));
        const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        const __m256 y2 = _mm256_mul_ps(_mm256_set1_ps(-2.f * k), _mm256_fmadd_ps(_mm256_set1_ps(c), x3, x));
        _mm256_storeu_ps(g + i, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(y2))));
    }
#endif
    for (; i < n; i++) {
        const float x = g[i] + (b ? b[i] : 0.f);
        g[i] = x / (1.f + expf(-2.f * k * (x + c * x * x * x)));
    }
}

static void rmsnorm(const float* x, const float* w, int n, float eps, float* out) {
    float ss = dotf(x, x, n) / (float)n;
    const float r = 1.f / sqrtf(ss + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* out = w * (x - mean) / sqrt(var + eps) + b (two passes over x: the mean, then the variance) */
static void layernorm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    int i = 0; float sum = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
    sum = hsum8(acc);
#endif
    for (; i < n; i++) sum += x[i];
    const float mean = sum / (float)n;
    float var = 0.f; i = 0;
#ifdef __AVX2__
    const __m256 mv = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
        acc = _mm256_fmadd_ps(d, d, acc);
    }
    var = hsum8(acc);
#endif
    for (; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / sqrtf(var / (float)n + eps);
    i = 0;
#ifdef __AVX2__
    const __m256 rv = _mm256_set1_ps(r);
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), rv);
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_loadu_ps(w + i), d, _mm256_loadu_ps(b + i)));
    }
#endif
    for (; i < n; i++) out[i] = w[i] * ((x[i] - mean) * r) + b[i];
}

/* g = gelu(g + b) with the exact (erf) GELU of BERT: 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz and
   Stegun 7.1.26 (absolute error under 1.5e-7) on both builds, so they agree to rounding */
static inline float erf_as(float x) {
    const float a = fabsf(x), t = 1.f / (1.f + 0.3275911f * a);
    const float p = 0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)));
    const float y = 1.f - t * p * expf(-a * a);
    return x < 0.f ? -y : y;
}
/* 0.5 x (1 + erf(x / sqrt 2)) at a vector width W (256 / 512) with exp EXP: one body for both builds'
   loops, lane by lane the scalar erf_as's steps */
#define DEFINE_GELU_ERF(NAME, VF, W, EXP)                                                                  \
    static inline VF NAME(VF x) {                                                                        \
        const VF sign = _mm##W##_set1_ps(-0.f), one = _mm##W##_set1_ps(1.f);                             \
        const VF z = _mm##W##_mul_ps(x, _mm##W##_set1_ps(0.70710678118654752f));                         \
        const VF a = _mm##W##_andnot_ps(sign, z);                                                        \
        const VF t = _mm##W##_div_ps(one, _mm##W##_fmadd_ps(_mm##W##_set1_ps(0.3275911f), a, one));      \
        VF p = _mm##W##_set1_ps(1.061405429f);                                                           \
        p = _mm##W##_fmadd_ps(p, t, _mm##W##_set1_ps(-1.453152027f));                                    \
        p = _mm##W##_fmadd_ps(p, t, _mm##W##_set1_ps(1.421413741f));                                     \
        p = _mm##W##_fmadd_ps(p, t, _mm##W##_set1_ps(-0.284496736f));                                    \
        p = _mm##W##_fmadd_ps(p, t, _mm##W##_set1_ps(0.254829592f));                                     \
        const VF e = EXP(_mm##W##_mul_ps(_mm##W##_sub_ps(_mm##W##_setzero_ps(), a), a));                 \
        VF y = _mm##W##_fnmadd_ps(_mm##W##_mul_ps(p, t), e, one);              /* erf(|z|) */            \
        y = _mm##W##_or_ps(y, _mm##W##_and_ps(sign, z));                       /* erf(z): z's sign */    \
        return _mm##W##_mul_ps(_mm##W##_mul_ps(_mm##W##_set1_ps(0.5f), x), _mm##W##_add_ps(one, y));     \
    }
#ifdef __AVX2__
DEFINE_GELU_ERF(gelu_erf256, __m256, 256, exp256)
#endif
#ifdef __AVX512DQ__
DEFINE_GELU_ERF(gelu_erf512, __m512, 512, exp512)
#endif

static void bias_gelu_erf(float* g, const float* b, int n) {
    int i = 0;
#ifdef __AVX512DQ__
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        _mm512_storeu_ps(g + i, gelu_erf512(b ? _mm512_add_ps(x, _mm512_loadu_ps(b + i)) : x));
    }
#endif
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        _mm256_storeu_ps(g + i, gelu_erf256(b ? _mm256_add_ps(x, _mm256_loadu_ps(b + i)) : x));
    }
#endif
    for (; i < n; i++) {
        const float x = g[i] + (b ? b[i] : 0.f);
        g[i] = 0.5f * x * (1.f + erf_as(x * 0.70710678118654752f));
    }
}

static void rope(float* v, int n_heads, int hd, const float* c, const float* s, int neox) {
    const int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float* x = v + h * hd;
        for (int i = 0; i < half; i++) {
            const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
            const float x0 = x[a], x1 = x[b];
            x[a] = x0 * c[i] - x1 * s[i];
            x[b] = x0 * s[i] + x1 * c[i];
        }
    }
}


/* Scores of G query heads against one block of the K cache, which holds K transposed: kt[d * bs + j] is
   value d of the block's position j (bs positions). For i < cnt: sc[h * ldsc + i] = <q head h, position
   off + i> * scale; mx[h] = max(mx[h], those). Vector lanes are positions: each lane does one FMA per d in
   order from 0, so every vector width (and the fmaf rest) gives the same bits. Heads go four (AVX-512) or
   two (AVX2) at a time against the same loads: 8 independent FMA chains. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void scores_heads512(const int H, const float* q, int hd, const float* kt, int bs, int off, int cnt, float scale,
                        float* sc, int ldsc, float* mx) {
    for (int i = 0; i < cnt; i += 32) {
        const int c = cnt - i;
        const __mmask16 m0 = c >= 16 ? 0xffff : (__mmask16)((1u << c) - 1);
        const __mmask16 m1 = c >= 32 ? 0xffff : c > 16 ? (__mmask16)((1u << (c - 16)) - 1) : 0;
        __m512 a[4][2];
        for (int h = 0; h < H; h++) a[h][0] = a[h][1] = _mm512_setzero_ps();
        const float* k = kt + off + i;
        for (int d = 0; d < hd; d++) {
            const __m512 k0 = _mm512_maskz_loadu_ps(m0, k + (int64_t)d * bs), k1 = _mm512_maskz_loadu_ps(m1, k + (int64_t)d * bs + 16);
            for (int h = 0; h < H; h++) {
                const __m512 qv = _mm512_set1_ps(q[h * hd + d]);
                a[h][0] = _mm512_fmadd_ps(qv, k0, a[h][0]); a[h][1] = _mm512_fmadd_ps(qv, k1, a[h][1]);
            }
        }
        for (int h = 0; h < H; h++) {
            const __m512 s0 = _mm512_mul_ps(a[h][0], _mm512_set1_ps(scale)), s1 = _mm512_mul_ps(a[h][1], _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc + h * ldsc + i, m0, s0);
            _mm512_mask_storeu_ps(sc + h * ldsc + i + 16, m1, s1);
            float t = _mm512_mask_reduce_max_ps(m0, s0);
            if (m1) { const float t1 = _mm512_mask_reduce_max_ps(m1, s1); t = t1 > t ? t1 : t; }
            mx[h] = t > mx[h] ? t : mx[h];
        }
    }
}
#elif defined(__AVX2__)
static inline __m256i lanes_below(int c) {  /* lane l all ones where l < c */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline __attribute__((always_inline)) void scores_heads256(const int H, const float* q, int hd, const float* kt, int bs, int off, int cnt, float scale,
                        float* sc, int ldsc, float* mx) {
    for (int i = 0; i < cnt; i += 32) {
        const int c = cnt - i;
        const __m256i m[4] = {lanes_below(c), lanes_below(c - 8), lanes_below(c - 16), lanes_below(c - 24)};
        __m256 a[2][4];
        for (int h = 0; h < H; h++) for (int v = 0; v < 4; v++) a[h][v] = _mm256_setzero_ps();
        const float* k = kt + off + i;
        for (int d = 0; d < hd; d++) {
            __m256 kv[4];
            for (int v = 0; v < 4; v++) kv[v] = _mm256_maskload_ps(k + (int64_t)d * bs + 8 * v, m[v]);
            for (int h = 0; h < H; h++) {
                const __m256 qv = _mm256_set1_ps(q[h * hd + d]);
                for (int v = 0; v < 4; v++) a[h][v] = _mm256_fmadd_ps(qv, kv[v], a[h][v]);
            }
        }
        for (int h = 0; h < H; h++)
            for (int v = 0; v < 4 && 8 * v < c; v++) {
                float t[8];
                _mm256_storeu_ps(t, _mm256_mul_ps(a[h][v], _mm256_set1_ps(scale)));
                for (int l = 0; l < 8 && 8 * v + l < c; l++) {
                    sc[h * ldsc + i + 8 * v + l] = t[l];
                    mx[h] = t[l] > mx[h] ? t[l] : mx[h];
                }
            }
    }
}
#endif
static void scores_block(const float* q, int G, int hd, const float* kt, int bs, int off, int cnt, float scale,
                         float* sc, int ldsc, float* mx) {
#if defined(__AVX512F__)
    for (int h = 0; h < G; h += 4) {
        const float* qh = q + h * hd; float* sh = sc + h * ldsc;
        switch (G - h < 4 ? G - h : 4) {  /* the heads as a constant: accumulators in registers */
            case 1: scores_heads512(1, qh, hd, kt, bs, off, cnt, scale, sh, ldsc, mx + h); break;
            case 2: scores_heads512(2, qh, hd, kt, bs, off, cnt, scale, sh, ldsc, mx + h); break;
            case 3: scores_heads512(3, qh, hd, kt, bs, off, cnt, scale, sh, ldsc, mx + h); break;
            default: scores_heads512(4, qh, hd, kt, bs, off, cnt, scale, sh, ldsc, mx + h);
        }
    }
#elif defined(__AVX2__)
    int h = 0;
    for (; h + 2 <= G; h += 2) scores_heads256(2, q + h * hd, hd, kt, bs, off, cnt, scale, sc + h * ldsc, ldsc, mx + h);
    for (; h < G; h++) scores_heads256(1, q + h * hd, hd, kt, bs, off, cnt, scale, sc + h * ldsc, ldsc, mx + h);
#else
    for (int h = 0; h < G; h++)
        for (int i = 0; i < cnt; i++) {
            float a = 0.f;
            for (int d = 0; d < hd; d++) a += q[h * hd + d] * kt[(int64_t)d * bs + off + i];
            sc[h * ldsc + i] = a * scale;
            mx[h] = sc[h * ldsc + i] > mx[h] ? sc[h * ldsc + i] : mx[h];
        }
#endif
}

/* For heads h < G: out[h * hd + d] += sum over r < cnt of (w[h * ldw + r] * inv[h]) * v[r * hd + d] (V's rows,
   hd apart), one FMA per r in order for each value: the same bits at every vector width and grouping. Heads
   go together against the same row loads (AVX-512: 3 heads x 64 values, AVX2: 2 x 32): 8 to 12 independent
   FMA chains, where one head's 32 values (2 to 4 chains) waited on the FMA latency. */
#define WBLOCK(NAME, VEC, LANES, SET1, LOAD, STORE, FMA)                                                        \
    static inline __attribute__((always_inline)) void NAME(const int H, const int V, float* out, const float* w, \
                                                          int ldw, const float* inv, const float* v, int cnt,   \
                                                          int hd) {                                           \
        VEC o[3][4];                                                                                         \
        for (int h = 0; h < H; h++) for (int j = 0; j < V; j++) o[h][j] = LOAD(out + h * hd + LANES * j);      \
        for (int r = 0; r < cnt; r++) {                                                                      \
            VEC x[4];                                                                                        \
            for (int j = 0; j < V; j++) x[j] = LOAD(v + (int64_t)r * hd + LANES * j);                          \
            for (int h = 0; h < H; h++) {                                                                    \
                const VEC a = SET1(w[h * ldw + r] * inv[h]);                                                 \
                for (int j = 0; j < V; j++) o[h][j] = FMA(a, x[j], o[h][j]);                                   \
            }                                                                                                \
        }                                                                                                    \
        for (int h = 0; h < H; h++) for (int j = 0; j < V; j++) STORE(out + h * hd + LANES * j, o[h][j]);      \
    }
#if defined(__AVX512F__)
WBLOCK(wblock512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps)
#elif defined(__AVX2__)
WBLOCK(wblock256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps)
#endif
#undef WBLOCK
static void weighted_block(float* out, const float* w, int ldw, const float* inv, const float* v, int cnt, int hd, int G) {
#if defined(__AVX512F__)
    if (hd % 32 == 0) {
        for (int d0 = 0; d0 < hd; d0 += 64)  /* 64 values (4 vectors), or the last 32 */
            for (int h = 0; h < G; h += 3) {
                float* o = out + h * hd + d0; const float* wh = w + h * ldw; const float* vd = v + d0;
                const int H = G - h < 3 ? G - h : 3, wide = hd - d0 >= 64;
                if (H == 3) { if (wide) wblock512(3, 4, o, wh, ldw, inv + h, vd, cnt, hd); else wblock512(3, 2, o, wh, ldw, inv + h, vd, cnt, hd); }
                else if (H == 2) { if (wide) wblock512(2, 4, o, wh, ldw, inv + h, vd, cnt, hd); else wblock512(2, 2, o, wh, ldw, inv + h, vd, cnt, hd); }
                else { if (wide) wblock512(1, 4, o, wh, ldw, inv + h, vd, cnt, hd); else wblock512(1, 2, o, wh, ldw, inv + h, vd, cnt, hd); }
            }
        return;
    }
#elif defined(__AVX2__)
    if (hd % 32 == 0) {
        for (int d0 = 0; d0 < hd; d0 += 32)
            for (int h = 0; h < G; h += 2) {
                float* o = out + h * hd + d0; const float* wh = w + h * ldw; const float* vd = v + d0;
                if (G - h >= 2) wblock256(2, 4, o, wh, ldw, inv + h, vd, cnt, hd);
                else wblock256(1, 4, o, wh, ldw, inv + h, vd, cnt, hd);
            }
        return;
    }
#endif
    for (int h = 0; h < G; h++)
        for (int r = 0; r < cnt; r++) axpy(out + h * hd, w[h * ldw + r] * inv[h], v + (int64_t)r * hd, hd);
}
