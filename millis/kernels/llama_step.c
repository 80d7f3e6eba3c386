/* One forward pass of a Llama-family decoder (llama, mistral, qwen2) or of GPT-2 in one C call: a flat
   batch of n tokens, each (id, position, slot), prefill and decode alike; logits of the chosen rows.
   Threads: pool.c (no barriers; a thread another process preempts does not stall the step).

   Per layer: RMSNorm -> Q, K, V (one work split over the three matrices) -> bias, RoPE, K/V written
   to the paged cache -> attention over the slot's positions -> O (+ residual) -> RMSNorm -> gate and
   up (one split) -> SiLU * up -> down (+ residual). Ten pool jobs per layer in one C call (not one
   Python dispatch per op). GPT-2: LayerNorms, learned positions added to the embedding instead of RoPE,
   GELU(up + bias) instead of SwiGLU, O's and down's biases added to the residual before their matmuls.
   Matrices are split by chunks of output rows; per-token ops by token.

   KV cache (paged, fp32): v_pool (n_blocks, n_layers, n_kv, block_size, head_dim), k_pool the same with each
   block's K transposed (head_dim, block_size): scores take a block's positions as vector lanes. A block holds
   every layer's part side by side, so a sequence's memory is one run per block, not one per layer: numpy
   gives the pools transparent huge pages, and with the layers' regions apart the first write to each layer's
   part faulted in (and zeroed) a 2 MB page per layer and pool, 60 for SmolLM2: its first step took ~150 ms
   more than the next (Zen 4 VM, 2026-12-04; 10-30 ms with the layers side by side). Position p
   of slot s lives in block block_table[s * table_stride + p / block_size]. Python allocates the
   blocks before the call. Attention of a token at position p sees positions [lo, p] of its slot
   (lo = p - window + 1 with a sliding window), which the same call has written when they are new. */
#include "blockq.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef struct {
    const float *attn_norm, *ffn_norm;          /* (dim,) */
    const float *bq, *bk, *bv;                  /* qwen2 / gpt2 biases or NULL */
    mat q, k, v, o, gate, up, down;             /* gpt2: no gate (rows 0) */
    const float *attn_norm_b, *ffn_norm_b, *bo, *bup, *bdown;  /* gpt2: LayerNorm and projection biases */
    const float *q_norm, *k_norm;               /* qwen3: RMSNorm weights (head_dim,) of every head of q and k, or NULL */
} layer_w;

typedef struct {
    int32_t n_layers, dim, n_heads, n_kv, head_dim, hidden, vocab, rope_neox, window, block_size;
    float eps, attn_scale;
    const float *rope_cos, *rope_sin;           /* (max_pos, head_dim / 2) */
    int64_t max_pos;
    mat tok_emb, head;                          /* head.rows 0: no head, the output is the final norm's rows (dim) */
    const float* out_norm;
    const layer_w* layers;
    float *k_pool, *v_pool;
    int64_t n_blocks;
    const int32_t* block_table;
    int64_t table_stride;
    int32_t act;       /* how rows are quantized for the matrices (one kind a model): ACT_BLOCKS int8 per 32 values
                          (GGUF's types), ACT_X16 int16 per 32 (T_Q8_0_X16), ACT_ROW int8 per token (T_Q8_ROW) */
    int32_t gpt2;      /* GPT-2: LayerNorm with biases, learned positions (no RoPE), GELU(up) MLP, biases */
    const float *pos_emb, *out_norm_b;          /* gpt2: (max_pos, dim) positions; the final LayerNorm's bias */
} model_w;

typedef struct {   /* buffers for up to n_max tokens */
    float *x, *h, *q, *k, *v, *att, *g, *u;     /* x, h (n, dim); q, att (n, nh*hd); k, v (n, nkv*hd); g, u (n, hidden) */
    void* xq;        /* activation blocks (n, max(dim, nh*hd, hidden) / 32): xblock, x16block with ACT_X16 */
    void* xr;        /* ACT_ROW: the ends' residual blocks (n, max(dim, nh*hd, hidden) / 32) (ends_llama.h) */
    float* yr;       /* ACT_ROW: their products (n, max(nh*hd + 2*nkv*hd, 2*hidden, dim)) */
} scratch_w;

#include "mm_jobs.h"
#include "packed.h"  /* act_offset */
#include "solo_rule.h"
#include "step_math.h"
#include "attention.h"

/* the block of KV head g that holds position p of the slot, in layer l: block_size x head_dim values */
static inline float* kv_block(const model_w* m, float* pool, int l, int slot, int p, int g) {
    const int64_t blk = m->block_table[(int64_t)slot * m->table_stride + p / m->block_size];
    return pool + (((int64_t)blk * m->n_layers + l) * m->n_kv + g) * m->block_size * m->head_dim;
}

#define MAX_GROUP 64  /* query heads per KV head (native_llama.py MAX_GROUP refuses more at load) */

/* Attention of Q tokens (Q <= RUN_TOKENS) of one slot at positions pos[0..Q) (a prefill's run of consecutive
   positions, or one token), the G query heads of KV head g each, over positions [lo_i, pos[i]] of the slot,
   block by block (one table lookup per block): each block of K (then of V) is read once for all the heads of
   the tokens that see the same part of it (attention.h: those heads against the same loads). q[i], out[i]:
   token i's G heads of hd values, contiguous; sc: room for Q * G * max_pos scores. */
#define RUN_TOKENS 4
#define RUN_HEADS (RUN_TOKENS * MAX_GROUP)
/* the part [*s0, *s1] of the block of positions [j, j + bs) that a token seeing [lo, p] sees (empty: s0 > s1) */
static inline void seen_part(int lo, int p, int j, int bs, int* s0, int* s1) {
    *s0 = lo > j ? lo : j; *s1 = p < j + bs - 1 ? p : j + bs - 1;
}
static void attend(const model_w* m, int l, int slot, int Q, const int32_t* pos, const float* const* q,
                   float* const* out, float* sc, int g, int G) {
    const int hd = m->head_dim, bs = m->block_size;
    int lo[RUN_TOKENS], first = pos[0], last = pos[0];
    const float* qh[RUN_HEADS]; float *oh[RUN_HEADS], *sh[RUN_HEADS]; float mx[RUN_HEADS], inv[RUN_HEADS];
    for (int i = 0; i < Q; i++) {
        lo[i] = m->window > 0 && pos[i] - m->window + 1 > 0 ? pos[i] - m->window + 1 : 0;
        first = lo[i] < first ? lo[i] : first; last = pos[i] > last ? pos[i] : last;
        for (int h = 0; h < G; h++) {
            const int e = i * G + h;
            qh[e] = q[i] + h * hd; oh[e] = out[i] + h * hd; sh[e] = sc + (int64_t)e * m->max_pos; mx[e] = -INFINITY;
        }
        memset(out[i], 0, sizeof(float) * hd * G);
    }
    for (int pass = 0; pass < 2; pass++) {  /* scores; then, after the softmax, V's weighted rows */
        if (pass == 1)
            for (int e = 0; e < Q * G; e++) inv[e] = 1.f / exp_shift(sh[e], pos[e / G] - lo[e / G] + 1, mx[e]);
        for (int j = first - first % bs; j <= last; j += bs) {  /* the block of positions [j, j + bs) */
            const float* kv = kv_block(m, pass == 0 ? m->k_pool : m->v_pool, l, slot, j, g);
            for (int i = 0; i < Q;) {  /* tokens i..k-1 see the same part [s0, s1] of it (s0 and s1 grow with i) */
                int s0, s1, k = i + 1, k0, k1;
                seen_part(lo[i], pos[i], j, bs, &s0, &s1);
                while (k < Q && (seen_part(lo[k], pos[k], j, bs, &k0, &k1), k0 == s0 && k1 == s1)) k++;
                if (s0 <= s1) {
                    float* at[RUN_HEADS]; const float* wt[RUN_HEADS];  /* each head's scores from position s0 */
                    for (int e = i * G; e < k * G; e++) wt[e - i * G] = at[e - i * G] = sh[e] + s0 - lo[e / G];
                    if (pass == 0)
                        scores_block((k - i) * G, qh + i * G, kv, bs, s0 - j, s1 - s0 + 1, hd, m->attn_scale, at, mx + i * G);
                    else weighted_block((k - i) * G, oh + i * G, wt, inv + i * G, kv + (int64_t)(s0 - j) * hd, s1 - s0 + 1, hd);
                }
                i = k;
            }
        }
    }
}

static void add_bias(float* y, const float* b, int n) { if (b) for (int i = 0; i < n; i++) y[i] += b[i]; }

/* ---- the step as a sequence of pool jobs (mm_jobs.h, pool.c) ---- */
/* time per op kind, summed over steps (llm_profile reads and resets it): where a step's time goes */
enum { P_EMBED, P_NORM, P_QKV, P_ROPE, P_ATTN, P_QUANT, P_O, P_FFN_UP, P_SWIGLU, P_DOWN, P_HEAD, P_N };
static double prof[P_N];
static inline double secs(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define TIMED(K, STMT) { const double t_ = secs(); STMT; prof[K] += secs() - t_; }
API void llm_profile(double* out) { for (int i = 0; i < P_N; i++) { out[i] = prof[i]; prof[i] = 0; } }
static solo_rule g_solo = SOLO_RULE_INIT;  /* a shared machine's steps on the caller alone (solo_rule.h) */
/* window_ms >= 0 sets the rule's window (0: each step alone, the rule before 2026-12-05); returns the times the
   solo steps began in this process */
API int64_t llm_solo(int window_ms) { if (window_ms >= 0) g_solo.window_ns = window_ms * 1e6; return g_solo.entered; }

typedef struct {
    const model_w* m; const scratch_w* s; int64_t n; const int32_t *ids, *pos, *slots, *out_rows;
    const layer_w* w; int l;
    const int32_t *rix, *rtok; int64_t nr;  /* ACT_ROW's ends: token t's residual row rix[t] (-1: none), rtok[r] */
} step_ctx;

/* row t of x (K values) -> its activation blocks in the scratch (the kind the model's matrices take) */
enum { ACT_BLOCKS = 0, ACT_X16 = 1, ACT_ROW = 2 };
static void quant_plain(const step_ctx* c, const float* x, int64_t K, int64_t t) {
    if (c->m->act == ACT_X16) quantize_x16(x, K, (x16block*)c->s->xq + t * (K / QK));
    else if (c->m->act == ACT_ROW) quantize_act(T_Q8_ROW, x, K, (xblock*)c->s->xq + t * (K / QK));
    else quantize_x(x, K, (xblock*)c->s->xq + t * (K / QK));
}
#include "ends_llama.h"
/* token t's row: quant_plain, and with ACT_ROW at an end (ends_llama.h) what its rounding left, in its residual row */
static void quant_row(const step_ctx* c, const float* x, int64_t K, int64_t t) {
    quant_plain(c, x, K, t);
    if (c->rix && c->rix[t] >= 0) end_residual(c, x, K, t);
}
static void op_embed(void* p, int64_t t) {
    const step_ctx* c = p; const model_w* m = c->m;
    dequant_row(m->tok_emb.type, m->tok_emb.data + c->ids[t] * m->tok_emb.row_bytes, m->dim, c->s->x + t * m->dim);
    if (m->pos_emb) add_bias(c->s->x + t * m->dim, m->pos_emb + (int64_t)c->pos[t] * m->dim, m->dim);
}
/* RMSNorm, or GPT-2's LayerNorm when the norm has a bias */
static void norm(const model_w* m, const float* x, const float* w, const float* b, float* out) {
    if (b) layernorm(x, w, b, m->dim, m->eps, out);
    else rmsnorm(x, w, m->dim, m->eps, out);
}
static void op_attn_norm(void* p, int64_t t) {
    const step_ctx* c = p; const int D = c->m->dim;
    norm(c->m, c->s->x + t * D, c->w->attn_norm, c->w->attn_norm_b, c->s->h + t * D);
    quant_row(c, c->s->h + t * D, D, t);
}
static void op_ffn_norm(void* p, int64_t t) {
    const step_ctx* c = p; const int D = c->m->dim;
    norm(c->m, c->s->x + t * D, c->w->ffn_norm, c->w->ffn_norm_b, c->s->h + t * D);
    quant_row(c, c->s->h + t * D, D, t);
}
/* A step of PREFILL_TOKENS tokens or more runs as a prefill: K stored in a job per KV head (op_store_k), and
   attention in runs of RUN_TOKENS tokens (op_attend). K of token t, head g, goes into its block transposed
   (kv_block); a block's 32 positions share its 64-byte lines, and a job per token had two threads writing the
   same lines (2.5x the time of RoPE and the stores together). */
#define PREFILL_TOKENS 32
static void store_k(const step_ctx* c, int64_t t, int g) {
    const model_w* m = c->m; const int HD = m->head_dim, bs = m->block_size;
    float* kt = kv_block(m, m->k_pool, c->l, c->slots[t], c->pos[t], g) + c->pos[t] % bs;
    const float* k = c->s->k + t * m->n_kv * HD + g * HD;
    for (int d = 0; d < HD; d++) kt[(int64_t)d * bs] = k[d];
}
static void op_rope_store(void* p, int64_t t) {
    const step_ctx* c = p; const model_w* m = c->m; const scratch_w* s = c->s; const layer_w* w = c->w;
    const int HD = m->head_dim, QD = m->n_heads * HD, KD = m->n_kv * HD;
    float *q = s->q + t * QD, *k = s->k + t * KD, *v = s->v + t * KD;
    add_bias(q, w->bq, QD); add_bias(k, w->bk, KD); add_bias(v, w->bv, KD);
    if (w->q_norm) {  /* Qwen3: each head's q and k RMS-normed before RoPE */
        for (int h = 0; h < m->n_heads; h++) rmsnorm(q + h * HD, w->q_norm, HD, m->eps, q + h * HD);
        for (int h = 0; h < m->n_kv; h++) rmsnorm(k + h * HD, w->k_norm, HD, m->eps, k + h * HD);
    }
    if (!m->gpt2) {
        const float* cs = m->rope_cos + (int64_t)c->pos[t] * (HD / 2);
        const float* sn = m->rope_sin + (int64_t)c->pos[t] * (HD / 2);
        rope(q, m->n_heads, HD, cs, sn, m->rope_neox);
        rope(k, m->n_kv, HD, cs, sn, m->rope_neox);
    }
    for (int g = 0; g < m->n_kv; g++) {
        if (c->n < PREFILL_TOKENS) store_k(c, t, g);
        memcpy(kv_block(m, m->v_pool, c->l, c->slots[t], c->pos[t], g) + (int64_t)(c->pos[t] % m->block_size) * HD,
               v + g * HD, sizeof(float) * HD);
    }
}
static void op_store_k(void* p, int64_t g) {  /* every token's K of KV head g (steps of PREFILL_TOKENS or more) */
    const step_ctx* c = p;
    for (int64_t t = 0; t < c->n; t++) store_k(c, t, (int)g);
}
static __thread void* tl_scores;    /* attention scores: one buffer per thread, grown as needed (pool_buffer) */
static __thread int64_t tl_cap;     /* bytes */
/* one job per KV head and token, or, in a prefill, per KV head and RUN_TOKENS tokens (split into runs of
   consecutive positions of one slot) */
static int64_t attend_tokens(const step_ctx* c) { return c->n >= PREFILL_TOKENS ? RUN_TOKENS : 1; }
static void op_attend(void* p, int64_t job) {
    const step_ctx* c = p; const model_w* m = c->m;
    const int NH = m->n_heads, HD = m->head_dim, QD = NH * HD, G = NH / m->n_kv, g = (int)(job % m->n_kv);
    const int64_t per = attend_tokens(c), t0 = job / m->n_kv * per, t1 = t0 + per < c->n ? t0 + per : c->n;
    float* scores = pool_buffer(&tl_scores, &tl_cap, (int64_t)sizeof(float) * RUN_TOKENS * G * m->max_pos);
    for (int64_t t = t0; t < t1;) {
        int64_t e = t + 1;
        while (e < t1 && c->slots[e] == c->slots[t] && c->pos[e] == c->pos[e - 1] + 1) e++;
        const float* q[RUN_TOKENS]; float* out[RUN_TOKENS];
        for (int64_t i = t; i < e; i++) { q[i - t] = c->s->q + i * QD + g * G * HD; out[i - t] = c->s->att + i * QD + g * G * HD; }
        attend(m, c->l, c->slots[t], (int)(e - t), c->pos + t, q, out, scores, g, G);
        t = e;
    }
}
static void op_quant_att(void* p, int64_t t) {
    const step_ctx* c = p; const int QD = c->m->n_heads * c->m->head_dim;
    add_bias(c->s->x + t * c->m->dim, c->w->bo, c->m->dim);  /* O's bias, into the residual O adds to */
    quant_row(c, c->s->att + t * QD, QD, t);
}
static void op_swiglu(void* p, int64_t t) {
    const step_ctx* c = p; const int H = c->m->hidden;
    if (c->m->gpt2) bias_gelu(c->s->g + t * H, c->w->bup, H);  /* g = up x: gelu(g + b) */
    else silu_mul(c->s->g + t * H, c->s->u + t * H, H);
    add_bias(c->s->x + t * c->m->dim, c->w->bdown, c->m->dim);  /* down's bias, into the residual */
    quant_row(c, c->s->g + t * H, H, t);
}
static void op_out_norm(void* p, int64_t r) {
    const step_ctx* c = p; const int D = c->m->dim;
    norm(c->m, c->s->x + (int64_t)c->out_rows[r] * D, c->m->out_norm, c->m->out_norm_b, c->s->h + r * D);
    quant_plain(c, c->s->h + r * D, D, r);  /* (r: an output row, not a token: no residual) */
}

API int llm_forward(const model_w* m, const scratch_w* s, int64_t n, const int32_t* ids, const int32_t* pos,
                    const int32_t* slots, int64_t n_out, const int32_t* out_rows, float* logits, int nthreads) {
    const int D = m->dim, H = m->hidden, HD = m->head_dim, QD = m->n_heads * HD, KD = m->n_kv * HD;
    for (int64_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab || pos[t] < 0 || pos[t] >= m->max_pos) return 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pool_begin(nthreads);
    g_threads = nthreads < 1 ? 1 : nthreads;
    const int was_solo = solo_begin(&g_solo);  /* a shared machine: solo_rule.h */
    step_ctx c = {.m = m, .s = s, .n = n, .ids = ids, .pos = pos, .slots = slots, .out_rows = out_rows};
    int32_t* ends = end_rows(&c, n_out);  /* ACT_ROW: the ends' residual rows (NULL: none) */
    const int64_t per_job = attend_tokens(&c);  /* tokens per attention job */
    TIMED(P_EMBED, rows_run(op_embed, &c, n));
    for (int l = 0; l < m->n_layers; l++) {
        const layer_w* w = &m->layers[l];
        c.w = w; c.l = l;
        TIMED(P_NORM, rows_run(op_attn_norm, &c, n));
        { const mat* W[3] = {&w->q, &w->k, &w->v}; float* Y[3] = {s->q, s->k, s->v}; const int64_t ld[3] = {QD, KD, KD};
          TIMED(P_QKV, mm_step(&c, 3, W, Y, ld, 0, s->h, n)); }
        TIMED(P_ROPE, rows_run(op_rope_store, &c, n));
        if (n >= PREFILL_TOKENS) TIMED(P_ROPE, pool_run(op_store_k, &c, m->n_kv));
        TIMED(P_ATTN, pool_run(op_attend, &c, (n + per_job - 1) / per_job * m->n_kv));
        TIMED(P_QUANT, rows_run(op_quant_att, &c, n));
        { const mat* W[1] = {&w->o}; float* Y[1] = {s->x}; const int64_t ld[1] = {D};
          TIMED(P_O, mm_step(&c, 1, W, Y, ld, 1, s->att, n)); }
        TIMED(P_NORM, rows_run(op_ffn_norm, &c, n));
        { const mat* W[2] = {m->gpt2 ? &w->up : &w->gate, &w->up}; float* Y[2] = {s->g, s->u};
          const int64_t ld[2] = {H, H};  /* gpt2: up alone, into g */
          TIMED(P_FFN_UP, mm_step(&c, m->gpt2 ? 1 : 2, W, Y, ld, 0, s->h, n)); }
        TIMED(P_SWIGLU, rows_run(op_swiglu, &c, n));
        { const mat* W[1] = {&w->down}; float* Y[1] = {s->x}; const int64_t ld[1] = {D};
          TIMED(P_DOWN, mm_step(&c, 1, W, Y, ld, 1, s->g, n)); }
    }
    TIMED(P_NORM, rows_run(op_out_norm, &c, n_out));
    if (m->head.rows) {
        const mat* W[1] = {&m->head}; float* Y[1] = {logits}; const int64_t ld[1] = {m->vocab};
        TIMED(P_HEAD, mm_run(1, W, Y, ld, 0, s->xq, s->h, n_out));
    } else {  /* an embedder: the normed hidden states are the output */
        memcpy(logits, s->h, sizeof(float) * (size_t)n_out * D);
    }
    free(ends);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double step_ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    solo_end(&g_solo, was_solo, g_threads, step_ns, (double)pool_wait_ns());
    pool_end();
    return 0;
}
