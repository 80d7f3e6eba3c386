/* Per-token math of the decoder step (llama_step.c): vector exp, dot, axpy, softmax pieces, SiLU / GELU,
   RMSNorm / LayerNorm, RoPE. AVX2 where the build has it, plain C otherwise (the same results to rounding). */
#pragma once
#include "blockq.h"

#include <math.h>

#ifdef __AVX2__
static inline __m256 exp256(__m256 x) {  /* Cephes expf, ~1 ulp on [-88, 88] */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
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

/* x[i] = exp(x[i] - mx); returns the sum */
static float exp_shift(float* x, int n, float mx) {
    int i = 0; float sum = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
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

static void layernorm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    float mean = 0.f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    float var = 0.f;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / sqrtf(var / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * ((x[i] - mean) * r) + b[i];
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
