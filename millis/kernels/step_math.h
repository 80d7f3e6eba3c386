/* Per-token math of the decoder step (llama_step.c) and the encoder (bert_forward.c): vector exp, dot, axpy,
   softmax pieces, SiLU / GELU (tanh and erf), RMSNorm / LayerNorm, RoPE (the decoder's attention: attention.h).
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

/* The sum of x[0..n) (sq: of (x - mean)^2) in 32 lanes, the same order in every SIMD build: lane l sums the values
   at l mod 32 in turn (AVX-512: two vectors, AVX2: four), then the lanes fold 32 -> 16 -> 8 and hsum8 adds those;
   the rest past a multiple of 32 one by one after. Four chains where the 8-lane loop had one (a BERT row's mean and
   variance waited on a 48-add and a 48-FMA chain: ~40% of the LayerNorm's time on Zen 4) */
static inline float sum32(float* x, int n, int sq, float mean, const float* add, int* done) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(mean);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; i + 32 <= n; i += 32) {
        __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        if (add) {  /* x += add as it is read (the mean's pass) */
            v0 = _mm512_add_ps(v0, _mm512_loadu_ps(add + i)); v1 = _mm512_add_ps(v1, _mm512_loadu_ps(add + i + 16));
            _mm512_storeu_ps(x + i, v0); _mm512_storeu_ps(x + i + 16, v1);
        }
        if (sq) {
            const __m512 d0 = _mm512_sub_ps(v0, mv), d1 = _mm512_sub_ps(v1, mv);
            a0 = _mm512_fmadd_ps(d0, d0, a0); a1 = _mm512_fmadd_ps(d1, d1, a1);
        } else { a0 = _mm512_add_ps(a0, v0); a1 = _mm512_add_ps(a1, v1); }
    }
    const __m512 a = _mm512_add_ps(a0, a1);  /* lanes l: l and l + 16 */
    s = hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
#elif defined(__AVX2__)
    const __m256 mv = _mm256_set1_ps(mean);
    __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * k);
            if (add) { v = _mm256_add_ps(v, _mm256_loadu_ps(add + i + 8 * k)); _mm256_storeu_ps(x + i + 8 * k, v); }
            if (sq) { const __m256 d = _mm256_sub_ps(v, mv); c[k] = _mm256_fmadd_ps(d, d, c[k]); }
            else c[k] = _mm256_add_ps(c[k], v);
        }
    s = hsum8(_mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3])));  /* AVX-512's folds */
#else
    (void)mean; (void)add;
#endif
    *done = i;
    return s;
}

/* The row quantizer's first pass (blockq.c's smooth_amax) fused into the op that computes the row: each value v
   just written goes times inv into sm (inv NULL: v itself, sm unwritten), and amax keeps the largest |that|. A
   max is exact, so every build finds the same one. */
#if defined(__AVX512F__)
static inline __m512 smooth_max512(__m512 v, const float* inv, float* sm, int i, __m512 amax) {
    if (inv) { v = _mm512_mul_ps(v, _mm512_loadu_ps(inv + i)); _mm512_storeu_ps(sm + i, v); }
    return _mm512_max_ps(amax, _mm512_abs_ps(v));
}
#endif
#ifdef __AVX2__
static inline __m256 smooth_max256(__m256 v, const float* inv, float* sm, int i, __m256 amax) {
    if (inv) { v = _mm256_mul_ps(v, _mm256_loadu_ps(inv + i)); _mm256_storeu_ps(sm + i, v); }
    return _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v));
}
#endif
static inline float smooth_max1(float v, const float* inv, float* sm, int i, float amax) {
    if (inv) { v *= inv[i]; sm[i] = v; }
    return fmaxf(amax, fabsf(v));
}

/* out = w * (x - mean) / sqrt(var + eps) + b (two passes over x: the mean, then the variance). add (NULL: none):
   x += add first, in the mean's pass (x written back). q: when not NULL, the row quantizer's first pass on out
   too (smooth_max: q->inv, q->sm), returning the largest |value| (else 0): the bias add, the LayerNorm and the
   quantizer's smoothing in three passes where they took five (bge-small b1xs128: ~0.28 ms of a forward). */
typedef struct { const float* inv; float* sm; } smooth_out;
static float layernorm_q(float* x, const float* add, const float* w, const float* b, int n, float eps, float* out,
                         const smooth_out* q) {
    int i;
    float sum = sum32(x, n, 0, 0.f, add, &i);
    for (; i < n; i++) { if (add) x[i] += add[i]; sum += x[i]; }
    const float mean = sum / (float)n;
    float var = sum32(x, n, 1, mean, NULL, &i);
    for (; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / sqrtf(var / (float)n + eps);
    const float* inv = q ? q->inv : NULL;
    float* sm = q ? q->sm : NULL;
    float amax = 0.f;
    i = 0;
#if defined(__AVX512F__)
    {
        const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(r);
        __m512 am = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv), rv);
            const __m512 o = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), d, _mm512_loadu_ps(b + i));
            _mm512_storeu_ps(out + i, o);
            if (q) am = smooth_max512(o, inv, sm, i, am);
        }
        if (q) amax = _mm512_reduce_max_ps(am);
    }
#endif
#ifdef __AVX2__
    {
        const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(r);
        __m256 am = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), rv);
            const __m256 o = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), d, _mm256_loadu_ps(b + i));
            _mm256_storeu_ps(out + i, o);
            if (q) am = smooth_max256(o, inv, sm, i, am);
        }
        if (q) amax = fmaxf(amax, hmax8(am));
    }
#endif
    for (; i < n; i++) {
        out[i] = w[i] * ((x[i] - mean) * r) + b[i];
        if (q) amax = smooth_max1(out[i], inv, sm, i, amax);
    }
    return amax;
}
static void layernorm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    layernorm_q((float*)x, NULL, w, b, n, eps, out, NULL);  /* (x is written only with an add) */
}

/* g = gelu(g + b) with the exact (erf) GELU of BERT: 0.5 x (1 + erf(x / sqrt 2)); erf(z) for |z| <= 3.3 (+-0.999997
   past it) as z P(z^2) / Q(z^2), a minimax-style rational of degrees 3 / 3 in z^2 (fitted by reweighted least
   squares: absolute error 2.4e-6 in fp32, the GELU's x times that), the same steps on every build: no exp, 13
   operations a vector. Eigen's degrees 6 / 4 (error 4e-7) took 18 (Zen 4: 18 core cycles per 16 values, the
   FMA pipes' count), and the exp-based Abramowitz-Stegun 7.1.26 before it ~27. */
#define ERF_P3 7.435546851e-04f
#define ERF_P2 4.312602605e-02f
#define ERF_P1 1.550485347e-01f
#define ERF_P0 1.128370463e+00f
#define ERF_Q3 9.247254763e-03f
#define ERF_Q2 9.505926258e-02f
#define ERF_Q1 4.707319932e-01f
#define ERF_ZMAX 3.3f
static inline float erf_rational(float x) {
    const float z = fminf(fmaxf(x, -ERF_ZMAX), ERF_ZMAX), z2 = z * z;
    float p = fmaf(z2, ERF_P3, ERF_P2), q = fmaf(z2, ERF_Q3, ERF_Q2);
    p = fmaf(z2, p, ERF_P1); p = fmaf(z2, p, ERF_P0);
    q = fmaf(z2, q, ERF_Q1); q = fmaf(z2, q, 1.f);
    return z * p / q;
}
/* 0.5 x (1 + erf(x / sqrt 2)) at a vector width W (256 / 512) with a / b as DIV: one body for both builds'
   loops, lane by lane the scalar steps, so the same bits (vrcp14ps and a Newton step in place of the
   division: 0.40 against 0.43 ns a value on SPR, and other bits than AVX2's) */
#define DEFINE_GELU_ERF(NAME, VF, W, DIV)                                                                \
    static inline VF NAME(VF x) {                                                                        \
        const VF z = _mm##W##_min_ps(_mm##W##_max_ps(_mm##W##_mul_ps(x, _mm##W##_set1_ps(0.70710678118654752f)), \
                                                     _mm##W##_set1_ps(-ERF_ZMAX)), _mm##W##_set1_ps(ERF_ZMAX)); \
        const VF z2 = _mm##W##_mul_ps(z, z);                                                             \
        VF p = _mm##W##_fmadd_ps(z2, _mm##W##_set1_ps(ERF_P3), _mm##W##_set1_ps(ERF_P2));                \
        VF q = _mm##W##_fmadd_ps(z2, _mm##W##_set1_ps(ERF_Q3), _mm##W##_set1_ps(ERF_Q2));                \
        p = _mm##W##_fmadd_ps(z2, p, _mm##W##_set1_ps(ERF_P1));                                          \
        p = _mm##W##_fmadd_ps(z2, p, _mm##W##_set1_ps(ERF_P0));                                          \
        q = _mm##W##_fmadd_ps(z2, q, _mm##W##_set1_ps(ERF_Q1));                                          \
        q = _mm##W##_fmadd_ps(z2, q, _mm##W##_set1_ps(1.f));                                             \
        const VF y = DIV(_mm##W##_mul_ps(z, p), q);                                                      \
        const VF hx = _mm##W##_mul_ps(_mm##W##_set1_ps(0.5f), x);                                        \
        return _mm##W##_fmadd_ps(hx, y, hx);  /* x/2 + x/2 erf */                                        \
    }
#ifdef __AVX2__
DEFINE_GELU_ERF(gelu_erf256, __m256, 256, _mm256_div_ps)
#endif
#ifdef __AVX512DQ__
DEFINE_GELU_ERF(gelu_erf512, __m512, 512, _mm512_div_ps)
#endif

/* out = gelu(x + b) (b NULL: none), times (gate + bg) where gate is not NULL (a GLU: ModernBERT's value | gate
   halves; bg never NULL then); out may be x. q: as layernorm_q's (the row quantizer's first pass on the outputs,
   their largest |value| returned). */
static float gelu_gate_q(const float* x, const float* b, const float* gate, const float* bg, int n, float* out,
                         const smooth_out* q) {
    const float* inv = q ? q->inv : NULL;
    float* sm = q ? q->sm : NULL;
    float amax = 0.f;
    int i = 0;
#ifdef __AVX512DQ__
    {
        __m512 am = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            __m512 o = gelu_erf512(b ? _mm512_add_ps(v, _mm512_loadu_ps(b + i)) : v);
            if (gate) o = _mm512_mul_ps(o, _mm512_add_ps(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(bg + i)));
            _mm512_storeu_ps(out + i, o);
            if (q) am = smooth_max512(o, inv, sm, i, am);
        }
        if (q) amax = _mm512_reduce_max_ps(am);
    }
#endif
#ifdef __AVX2__
    {
        __m256 am = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            __m256 o = gelu_erf256(b ? _mm256_add_ps(v, _mm256_loadu_ps(b + i)) : v);
            if (gate) o = _mm256_mul_ps(o, _mm256_add_ps(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(bg + i)));
            _mm256_storeu_ps(out + i, o);
            if (q) am = smooth_max256(o, inv, sm, i, am);
        }
        if (q) amax = fmaxf(amax, hmax8(am));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i] + (b ? b[i] : 0.f);
        const float hv = 0.5f * v;
        out[i] = fmaf(hv, erf_rational(v * 0.70710678118654752f), hv) * (gate ? gate[i] + bg[i] : 1.f);
        if (q) amax = smooth_max1(out[i], inv, sm, i, amax);
    }
    return amax;
}
static float bias_gelu_erf_q(float* g, const float* b, int n, const smooth_out* q) {
    return gelu_gate_q(g, b, NULL, NULL, n, g, q);
}
static void bias_gelu_erf(float* g, const float* b, int n) { bias_gelu_erf_q(g, b, n, NULL); }

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
