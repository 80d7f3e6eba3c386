/* One forward pass of a BERT-family encoder (BERT, MiniLM, bge: post-LayerNorm, absolute positions, erf
   GELU) in one C call, over a flat batch of the real tokens only: padding is never computed.

   Tokens: n rows of (id, position, token type), sequences contiguous: sequence s is tokens
   [start[s], start[s + 1]). Every token attends to the tokens of its own sequence (a padding mask's
   zeros are simply absent), at the position the caller gives (HF: its column in the padded batch).

   Per layer (post-LN, as HF's BertLayer):
     qkv = x Wqkv                      one matmul over the fused (3D, D) matrix
     att = softmax(q k^T / sqrt(hd)) v per (sequence, head) job, two GEMMs; q, k, v biases added as read
     x = LN1(x + att Wo + bo)          Wo accumulates into x (the residual), then bias + LN per token
     h = gelu(x Wi + bi)               the exact (erf) GELU
     x = LN2(x + h Wd + bd)
   Matrices: fp32 (packed 8 rows interleaved), Q8_0 or Q7_0 against int8 activation blocks (per 32 values,
   llama.cpp's Q8_1 scheme: no maddubs saturation, packed.c), Q7_0 against 7-bit ones (T_Q7_A7), Q8_0
   against int16 activation blocks (packed16.c), or bf16 against bf16 rows (packedbf16.c).
   Each op that feeds a matmul quantizes its rows as it writes them. x (n, D) holds the last hidden
   states when the call returns; pooling and the task head are the caller's (a (B, D) sized job). */
#include "blockq.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mm_jobs.h"
#include "step_math.h"

typedef struct {
    mat qkv, o, inter, down;                 /* (3D, D), (D, D), (hidden, D), (D, hidden) */
    const float *bqkv, *bo, *bi, *bd;        /* (3D,), (D,), (hidden,), (D,) */
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    /* per input channel, 1 / the smoothing scale of each matrix's input (NULL: none): the row precisions
       quantize x / s against weights stored as W * s (the same product; millis/encoder/smooth.py) */
    const float *sqkv, *so, *si, *sd;        /* (D,), (D,), (D,), (hidden,) */
} bert_layer;

typedef struct {
    int32_t n_layers, dim, n_heads, head_dim, hidden, max_pos, type_vocab, act;  /* act: ACT_* */
    float eps;
    int32_t attn;  /* ATTN_*: how op_attend multiplies */
    const float *word, *pos, *typ, *emb_ln_w, *emb_ln_b;  /* (vocab, D), (max_pos, D), (type_vocab, D), (D,) */
    int64_t vocab;
    const bert_layer* layers;
} bert_w;

/* what the matrices take: fp32 rows, xblocks (quantize_act: levels and offset from the matrices' type),
   x16blocks, bf16 rows */
enum { ACT_F32 = 0, ACT_Q8 = 1, ACT_Q16 = 2, ACT_BF16 = 3 };
/* attention: fp32 on the matmul kernels, or bf16 on the tile unit (amx_attend: AMX, else its C form; head sizes
   32 and 64, others stay fp32) */
enum { ATTN_F32 = 0, ATTN_BF16_TILES = 1 };

typedef struct {   /* buffers for up to n tokens */
    float *x, *qkv, *att, *h;   /* x, att (n, D); qkv (n, 3D); h (n, hidden) */
    void* xq;                   /* activation blocks (n, max(D, hidden) / 32) of the matrices' kind */
} bert_scratch;

typedef struct {
    const bert_w* m; const bert_scratch* s; const int32_t *ids, *pos, *types, *start; const bert_layer* w;
} ctx_t;

/* row t of a matrix's input (K values) -> its activation blocks; inv: 1 / smoothing scale per channel, or NULL */
static void quant_row(const ctx_t* c, const float* x, int64_t K, int64_t t, const float* inv) {
    if (c->m->act == ACT_Q8)  /* as the matrices' type takes them (all share one) */
        quantize_act_smooth(c->m->layers[0].qkv.type, x, inv, K, (xblock*)c->s->xq + t * (K / QK));
    else if (c->m->act == ACT_Q16) quantize_x16(x, K, (x16block*)c->s->xq + t * (K / QK));
    else if (c->m->act == ACT_BF16) to_bf16(x, K, (uint16_t*)c->s->xq + t * K);
}

static void op_embed(void* p, int64_t t) {  /* x = LN(word + position + type) */
    const ctx_t* c = p; const bert_w* m = c->m; const int D = m->dim;
    float* x = c->s->x + t * D;
    const float *w = m->word + (int64_t)c->ids[t] * D, *ps = m->pos + (int64_t)c->pos[t] * D;
    const float* ty = m->typ + (int64_t)c->types[t] * D;
    for (int i = 0; i < D; i++) x[i] = w[i] + ps[i] + ty[i];
    layernorm(x, m->emb_ln_w, m->emb_ln_b, D, m->eps, x);
    quant_row(c, x, D, t, m->layers[0].sqkv);
}

static __thread float* tl_buf;   /* per thread: one head's Q, K, V and scores (op_attend) */
static __thread int64_t tl_cap;
#ifdef __AVX2__
#define PACKED 1   /* K and V^T in packed.c's float layout: the GEMM tiles (16 rows x 6 tokens) run them */
#else
#define PACKED 0   /* the scalar build: row-major, as its matmul_rows takes float weights */
#endif

#if PACKED
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

/* one head's Q (L, HD: (q + bq) * scale), K (packed: 8 keys interleaved, value d of key j at
   (j / 8) * 8 * HD + 8 * d + j % 8, padded keys zero) and V^T (packed: dims d..d+7 of key j at
   (d / 8) * 8 * Lp + 8 * j, padded keys zero) from the head's qkv rows r (q at r, k at r + D, v at r + 2D;
   row stride 3D): the scalar loop's sums and products, 8 lanes at a time, K transposed 8 x 8 in registers */
static void pack_qkv(const float* r, int D, const float* bq, const float* bk, const float* bv, float scale,
                     int L, int Lp, int HD, float* Q, float* K, float* V) {
    const __m256 vs = _mm256_set1_ps(scale), z = _mm256_setzero_ps();
    const int64_t ld = 3 * (int64_t)D;
    for (int j = 0; j < Lp; j++)
        for (int d = 0; d < HD; d += 8) {
            float* v = V + (int64_t)(d / 8) * 8 * Lp + 8 * j;
            if (j >= L) { _mm256_storeu_ps(v, z); continue; }
            const float* q = r + j * ld + d;
            _mm256_storeu_ps(Q + (int64_t)j * HD + d,
                             _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(bq + d)), vs));
            _mm256_storeu_ps(v, _mm256_add_ps(_mm256_loadu_ps(q + 2 * D), _mm256_loadu_ps(bv + d)));
        }
    for (int j0 = 0; j0 < L; j0 += 8)
        for (int d = 0; d < HD; d += 8) {
            __m256 k[8];
            for (int i = 0; i < 8; i++)
                k[i] = j0 + i >= L ? z : _mm256_add_ps(_mm256_loadu_ps(r + (j0 + i) * ld + D + d),
                                                       _mm256_loadu_ps(bk + d));
            transpose8(k);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(K + (int64_t)j0 * HD + 8 * (d + i), k[i]);
        }
}
#endif

/* one (sequence, head): S = Q K^T (L x L, Q scaled), softmax by rows, att = S V: two small GEMMs on the
   matmul kernels, K and V^T packed per job (L <= 512: they stay in L2) */
static void op_attend(void* p, int64_t job) {
    const ctx_t* c = p; const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim, NH = m->n_heads;
    const int64_t sq = job / NH, t0 = c->start[sq];
    const int h = (int)(job % NH), L = (int)(c->start[sq + 1] - t0), Lp = (L + 7) / 8 * 8;
    if (L <= 0) return;
    const float *bq = c->w->bqkv + h * HD, *bk = bq + D, *bv = bk + D, scale = 1.f / sqrtf((float)HD);
    /* bf16 matrices take the output as bf16 rows straight from the tiles (op_quant_att is skipped then) */
    if (m->attn == ATTN_BF16_TILES &&
        amx_attend(c->s->qkv + t0 * 3 * D + h * HD, 3 * D, D, bq, bk, bv, scale, L, HD, c->s->att + t0 * D + h * HD,
                   m->act == ACT_BF16 ? (uint16_t*)c->s->xq + t0 * D + h * HD : NULL, D))
        return;
    const int64_t need = 3 * (int64_t)Lp * HD + (int64_t)L * Lp;
    if (tl_cap < need) { free(tl_buf); tl_buf = malloc(sizeof(float) * need); tl_cap = need; }
    float *Q = tl_buf, *K = Q + (int64_t)Lp * HD, *V = K + (int64_t)Lp * HD, *S = V + (int64_t)Lp * HD;
#if PACKED
    pack_qkv(c->s->qkv + t0 * 3 * D + h * HD, D, bq, bk, bv, scale, L, Lp, HD, Q, K, V);
#else
    memset(K, 0, sizeof(float) * 2 * Lp * HD);  /* padded keys: zero rows (their scores are never read) */
    for (int j = 0; j < L; j++) {  /* row-major Q and K, V^T (HD, Lp) */
        const float* r = c->s->qkv + (t0 + j) * 3 * D + h * HD;
        for (int d = 0; d < HD; d++) {
            Q[j * HD + d] = (r[d] + bq[d]) * scale;
            K[(int64_t)j * HD + d] = r[D + d] + bk[d];
            V[(int64_t)d * Lp + j] = r[2 * D + d] + bv[d];
        }
    }
#endif
    const mat Km = {T_F32, PACKED, (const uint8_t*)K, L, HD, HD * 4};
    matmul_rows(&Km, 0, L, 0, Q, L, S, Lp, 0);              /* S[i][j] = <q_i, k_j> / sqrt(hd) */
    for (int i = 0; i < L; i++) {
        float* s = S + (int64_t)i * Lp;
        vscale(s, 1.f / exp_shift(s, L, vmax(s, L)), L);
        for (int j = L; j < Lp; j++) s[j] = 0.f;
    }
    const mat Vm = {T_F32, PACKED, (const uint8_t*)V, HD, Lp, (int64_t)Lp * 4};
    matmul_rows(&Vm, 0, HD, 0, S, L, c->s->att + t0 * D + h * HD, D, 0);  /* att_i = sum_j s_ij v_j */
}

static void op_quant_att(void* p, int64_t t) {
    const ctx_t* c = p; const int D = c->m->dim;
    quant_row(c, c->s->att + t * D, D, t, c->w->so);
}

/* x (a residual row that a matmul accumulated into) += bias, then LayerNorm and quantized for the next */
static void bias_ln(const ctx_t* c, int64_t t, const float* b, const float* w, const float* lb, const float* inv) {
    const int D = c->m->dim;
    float* x = c->s->x + t * D;
    for (int i = 0; i < D; i++) x[i] += b[i];
    layernorm(x, w, lb, D, c->m->eps, x);
    quant_row(c, x, D, t, inv);
}
/* LN1 feeds this layer's inter matrix; LN2 the next layer's qkv (the last layer's quantized rows go unread) */
static void op_ln1(void* p, int64_t t) {
    const ctx_t* c = p; bias_ln(c, t, c->w->bo, c->w->ln1_w, c->w->ln1_b, c->w->si);
}
static void op_ln2(void* p, int64_t t) {
    const ctx_t* c = p; const int last = c->w == c->m->layers + c->m->n_layers - 1;
    bias_ln(c, t, c->w->bd, c->w->ln2_w, c->w->ln2_b, last ? NULL : (c->w + 1)->sqkv);
}

static void op_gelu(void* p, int64_t t) {
    const ctx_t* c = p; const int H = c->m->hidden;
    float* h = c->s->h + t * H;
    bias_gelu_erf(h, c->w->bi, H);
    quant_row(c, h, H, t, c->w->sd);
}

/* time per op kind, summed over calls (bert_profile reads and resets it) */
enum { B_EMBED, B_QKV, B_ATTN, B_O, B_LN, B_INTER, B_GELU, B_DOWN, B_N };
static double prof[B_N];
static inline double secs(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define TIMED(K, STMT) { const double t_ = secs(); STMT; prof[K] += secs() - t_; }
API void bert_profile(double* out) { for (int i = 0; i < B_N; i++) { out[i] = prof[i]; prof[i] = 0; } }

/* Returns 0, or 1 when an id, position or token type is out of range (nothing is computed then). */
API int bert_forward(const bert_w* m, const bert_scratch* s, int64_t n, const int32_t* ids, const int32_t* pos,
                     const int32_t* types, int64_t n_seq, const int32_t* start, int nthreads) {
    const int D = m->dim, H = m->hidden;
    for (int64_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab || pos[t] < 0 || pos[t] >= m->max_pos || types[t] < 0 ||
            types[t] >= m->type_vocab) return 1;
    if (start[0] != 0 || start[n_seq] != n) return 1;
    for (int64_t q = 0; q < n_seq; q++) if (start[q + 1] < start[q]) return 1;
    pool_begin(nthreads);
    g_threads = nthreads < 1 ? 1 : nthreads;
    ctx_t c = {.m = m, .s = s, .ids = ids, .pos = pos, .types = types, .start = start};
    const int f32 = m->act == ACT_F32;
    TIMED(B_EMBED, rows_run(op_embed, &c, n));
    for (int l = 0; l < m->n_layers; l++) {
        const bert_layer* w = &m->layers[l];
        c.w = w;
        { const mat* W[1] = {&w->qkv}; float* Y[1] = {s->qkv}; const int64_t ld[1] = {3 * D};
          TIMED(B_QKV, mm_run(1, W, Y, ld, 0, s->xq, s->x, n)); }
        /* (the bf16 attention on tiles writes bf16 rows itself, unless a head size sent a job to the fp32 path) */
        const int bf16_rows = m->attn == ATTN_BF16_TILES && m->act == ACT_BF16 && amx_attend_takes(m->head_dim);
        TIMED(B_ATTN, pool_run(op_attend, &c, n_seq * m->n_heads);
              if (!f32 && !bf16_rows) rows_run(op_quant_att, &c, n));
        { const mat* W[1] = {&w->o}; float* Y[1] = {s->x}; const int64_t ld[1] = {D};
          TIMED(B_O, mm_run(1, W, Y, ld, 1, s->xq, s->att, n)); }
        TIMED(B_LN, rows_run(op_ln1, &c, n));
        { const mat* W[1] = {&w->inter}; float* Y[1] = {s->h}; const int64_t ld[1] = {H};
          TIMED(B_INTER, mm_run(1, W, Y, ld, 0, s->xq, s->x, n)); }
        TIMED(B_GELU, rows_run(op_gelu, &c, n));
        { const mat* W[1] = {&w->down}; float* Y[1] = {s->x}; const int64_t ld[1] = {D};
          TIMED(B_DOWN, mm_run(1, W, Y, ld, 1, s->xq, s->h, n)); }
        TIMED(B_LN, rows_run(op_ln2, &c, n));
    }
    pool_end();
    return 0;
}

/* Sentence vectors from the last hidden states x (n, D) of sequences [start[s], start[s + 1]): the mean
   (mode 0; zeros for an empty sequence) or the max (mode 1; -1e9 for an empty one) of each sequence's
   rows, then L2-normalized when `normalize` (norm floored at 1e-12). out (n_seq, D). */
API void bert_pool(const float* x, int D, int64_t n_seq, const int32_t* start, int mode, int normalize, float* out) {
    for (int64_t q = 0; q < n_seq; q++) {
        float* o = out + q * D;
        const int64_t t0 = start[q], t1 = start[q + 1];
        for (int i = 0; i < D; i++) o[i] = mode == 1 ? -1e9f : 0.f;
        for (int64_t t = t0; t < t1; t++) {
            const float* r = x + t * D;
            if (mode == 1) for (int i = 0; i < D; i++) o[i] = r[i] > o[i] ? r[i] : o[i];
            else for (int i = 0; i < D; i++) o[i] += r[i];
        }
        if (mode == 0 && t1 > t0) for (int i = 0; i < D; i++) o[i] /= (float)(t1 - t0);
        if (normalize) {
            double ss = 0.;
            for (int i = 0; i < D; i++) ss += (double)o[i] * o[i];
            const float nrm = (float)sqrt(ss), inv = 1.f / (nrm > 1e-12f ? nrm : 1e-12f);
            for (int i = 0; i < D; i++) o[i] *= inv;
        }
    }
}
