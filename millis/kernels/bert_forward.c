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
#include "solo_rule.h"
#include "token_split.h"

typedef struct {
    mat qkv, o, inter, down;                 /* (3D, D), (D, D), (hidden, D), (D, hidden) */
    const float *bqkv, *bo, *bi, *bd;        /* (3D,), (D,), (hidden,), (D,) */
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    /* per input channel, 1 / the smoothing scale of each matrix's input (NULL: none): the row precisions
       quantize x / s against weights stored as W * s (the same product; millis/encoder/smooth.py) */
    const float *sqkv, *so, *si, *sd;        /* (D,), (D,), (D,), (hidden,) */
    /* ModernBERT (prenorm): the rotary table of this layer's base, (max_pos, hd) as cos | sin of the half-dimension
       pairs' angles, and a sliding-window layer's mask as a relative bias (rel_span a head; NULL: a global layer) */
    const float *rope, *win;
    /* DeBERTa (bert_w.dis): the position tables of each head, n_heads fp32 (dis_rows, hd) matrices each: the
       relative embeddings through this layer's key (pk) and query (pq) projections, biases in, times the scale */
    const mat *pk, *pq;
} bert_layer;

typedef struct {
    int32_t n_layers, dim, n_heads, head_dim, hidden, max_pos, type_vocab, act;  /* act: ACT_* */
    float eps;
    int32_t attn;  /* ATTN_*: how op_attend multiplies */
    const float *word, *pos, *typ, *emb_ln_w, *emb_ln_b;  /* (vocab, D), (max_pos, D), (type_vocab, D), (D,) */
    int64_t vocab;
    const bert_layer* layers;
    int32_t ends;  /* int8-row: each sequence's first and last token add a residual row (ends_rows.h) */
    /* MPNet's relative-position bias (NULL: none; fp32 and int8 attention): head h's row of rel_span floats, whose
       entry rel_mid + q - k is added to query q's score of key k (16 spare entries at each end: a lane block
       reads past its last query) */
    const float* rel;
    int32_t rel_span, rel_mid;
    /* ELECTRA-small: the embedding tables and their LayerNorm are emb_dim (E) wide, then x = LN(e) P + pb, with
       proj_t P as (E, D) rows (NULL: no projection, E = D) */
    int32_t emb_dim;
    const float *proj_t, *proj_b;  /* (E, D), (D,) */
    /* ModernBERT's layout (millis/encoder/modernbert.py): pre-LayerNorm layers (x += O attn(LN_a(x)); x += Wd
       (gelu(v) * g) with (v, g) = LN_m(x) Wi, inter (2 hidden, D)), rotary positions (pos NULL: no table), and
       sliding-window layers (window: |q - k| <= window; their win tables span rel_span from rel_mid) */
    int32_t prenorm, window;
    /* DeBERTa-v2 / v3's disentangled attention (millis/encoder/deberta.py; 0: none): bit 1 c2p, bit 2 p2c. Query q's
       score of key k adds q . pk[c] (c2p) + k . pq[c] (p2c), c = dis_at[q - k + max_pos - 1] (its clamped relative
       position bucket, a row of the layer's tables); qk_scale: the scores' scale (0: 1 / sqrt(hd)) */
    int32_t dis, dis_rows;
    const int32_t* dis_at;  /* (2 max_pos - 1,) */
    float qk_scale;
} bert_w;

/* what the matrices take: fp32 rows, xblocks (quantize_act: levels and offset from the matrices' type),
   x16blocks, bf16 rows */
enum { ACT_F32 = 0, ACT_Q8 = 1, ACT_Q16 = 2, ACT_BF16 = 3 };
/* attention: fp32 on the matmul kernels, bf16 on the tile unit (amx_attend: AMX, AVX-512 BF16 vectors, else its C
   form), or int8 on AVX-512 VNNI vectors (i8_attend.h); head sizes 32 and 64, others stay fp32 */
enum { ATTN_F32 = 0, ATTN_BF16_TILES = 1, ATTN_INT8 = 2 };

typedef struct {   /* buffers for up to n tokens */
    float *x, *qkv, *att, *h;   /* x, att (n, D); qkv (n, 3D); h (n, hidden) */
    void* xq;                   /* activation blocks (n, max(D, hidden) / 32) of the matrices' kind */
    float* qkv2;                /* (n, 3D): the token split's other qkv (odd layers) */
    uint8_t* kv;                /* 2 x 4 (2n + 8) D bytes (int8: 4n + 8): the token split's packed keys and values */
    void* xr;                   /* (slots, max(D, hidden) / 32) activation blocks: ends_rows.h's residual slots */
    float* yr;                  /* (slots, max(3D, hidden)): their products; slots <= min(n, 2 sequences) */
    float* hg;                  /* (n, 2 hidden): prenorm's inter rows, value | gate (GLU) */
} bert_scratch;

typedef struct {
    const bert_w* m; const bert_scratch* s; const int32_t *ids, *pos, *types, *start; const bert_layer* w;
    int64_t n_seq;
    const int64_t* firsts;  /* first_only's last layer: the sequences with tokens (row j of its compact rows: firsts[j]) */
    const int64_t* tb;   /* the token split (NULL: the row split): part q holds tokens [tb[q], tb[q + 1]) */
    /* this layer's q, k, v rows, and where the token split writes the next layer's: a part that reaches the next
       layer's qkv must not overwrite keys and values another part's attention is still reading */
    float *qkv, *qkv_next;
    /* the token split's packed keys and values (kv_packed): this layer's, and where the parts pack the next
       layer's (NULL: none); sequence s's keys from row koff[s] of a head's krows */
    uint8_t *kv, *kv_next;
    const int64_t* koff;
    int64_t krows;
    int64_t xs, unit;    /* a part's region of xq: xs units of 32 values a token (max(D, hidden) / 32), of `unit` bytes */
    double* part_s;      /* the token split: part q's seconds, and the thread that ran it (token_split.h) */
    int* part_tid;
    const int32_t *rix, *rtok, *rpre;  /* ends_rows.h's slots (NULL: none): a row's, a slot's row, slots before a row */
} ctx_t;

/* token t's activation blocks for a K-wide input, in the region of the part whose first token is `base`: that
   part's tokens K / 32 units apart from unit base * xs, so that parts writing D- and hidden-wide rows at once
   never overlap (the row split is one part, base 0: token t at t * K / 32) */
static void* xq_at(const ctx_t* c, int64_t K, int64_t base, int64_t t) {
    return (uint8_t*)c->s->xq + (base * c->xs + (t - base) * (K / QK)) * c->unit;
}

#include "ends_rows.h"

/* row t of a matrix's input (K values) -> its activation blocks; inv: 1 / smoothing scale per channel, or NULL */
static void quant_row(const ctx_t* c, const float* x, int64_t K, int64_t base, int64_t t, const float* inv) {
    void* dst = xq_at(c, K, base, t);
    if (c->m->act == ACT_Q8)  /* as the matrices' type takes them (all share one) */
        quantize_act_smooth(c->m->layers[0].qkv.type, x, inv, K, dst);
    else if (c->m->act == ACT_Q16) quantize_x16(x, K, dst);
    else if (c->m->act == ACT_BF16) to_bf16(x, K, dst);
}

/* the row types (one activation scale per token) take their smoothing and amax from the op that writes the row */
static int row_quantized(const bert_w* m) { return m->act == ACT_Q8 && is_row_type(m->layers[0].qkv.type); }

/* row t's x (x += add first, add NULL: none) through LayerNorm (w, lb) into out (x itself, or prenorm's other
   row), then quantized for the next matrix */
static void ln_quant(const ctx_t* c, float* x, const float* add, const float* w, const float* lb, int64_t base,
                     int64_t t, const float* inv, float* out) {
    const int D = c->m->dim;
    if (row_quantized(c->m)) {
        float sm[D] __attribute__((aligned(64)));  /* whole lines for its 64-byte vectors */
        const smooth_out q = {inv, sm};
        const float amax = layernorm_q(x, add, w, lb, D, c->m->eps, out, &q);
        quantize_row_act(c->m->layers[0].qkv.type, inv ? sm : out, amax, D, xq_at(c, D, base, t));
        ends_residual(c, inv ? sm : out, NULL, D, xq_at(c, D, base, t), base, t);
        return;
    }
    layernorm_q(x, add, w, lb, D, c->m->eps, out, NULL);
    quant_row(c, out, D, base, t, inv);
}

/* ELECTRA-small's row t: e = LN(word + position + type) at width E, x = e P + pb (fp32: E D multiply-adds a token,
   a small share of a layer's), then quantized for layer 0's qkv as an attention row is for O */
static void embed_projected(const ctx_t* c, int64_t base, int64_t t, float* x) {
    const bert_w* m = c->m; const int D = m->dim, E = m->emb_dim;
    float e[E];
    const float *w = m->word + (int64_t)c->ids[t] * E, *ps = m->pos + (int64_t)c->pos[t] * E;
    const float* ty = m->typ + (int64_t)c->types[t] * E;
    for (int i = 0; i < E; i++) e[i] = w[i] + ps[i] + ty[i];
    layernorm_q(e, NULL, m->emb_ln_w, m->emb_ln_b, E, m->eps, e, NULL);
    memcpy(x, m->proj_b, sizeof(float) * D);
    for (int i = 0; i < E; i++) {  /* row by row of P: the inner loop over D vectorizes (no reduction) */
        const float ei = e[i], *p = m->proj_t + (int64_t)i * D;
        for (int o = 0; o < D; o++) x[o] += ei * p[o];
    }
    quant_row(c, x, D, base, t, m->layers[0].sqkv);
    ends_residual(c, x, m->layers[0].sqkv, D, xq_at(c, D, base, t), base, t);
}

static void embed_row(const ctx_t* c, int64_t base, int64_t t) {  /* x = LN(word + position + type) */
    const bert_w* m = c->m; const int D = m->dim;
    float* x = c->s->x + t * D;
    if (m->proj_t) { embed_projected(c, base, t, x); return; }
    const float *w = m->word + (int64_t)c->ids[t] * D, *ty = m->typ + (int64_t)c->types[t] * D;
    if (m->pos) {
        const float* ps = m->pos + (int64_t)c->pos[t] * D;
        for (int i = 0; i < D; i++) x[i] = w[i] + ps[i] + ty[i];
    } else {
        for (int i = 0; i < D; i++) x[i] = w[i] + ty[i];
    }
    ln_quant(c, x, NULL, m->emb_ln_w, m->emb_ln_b, base, t, m->layers[0].sqkv, x);
    if (m->prenorm) memcpy(c->s->att + t * D, x, sizeof(float) * D);  /* layer 0's qkv input (it has no LN_a) */
}
static void op_embed(void* p, int64_t t) { embed_row(p, 0, t); }

#include "bert_attend.h"  /* attend(): one (sequence, head), a range of its queries */

/* the bf16 attention on the tiles writes the bf16 rows itself, unless a head size sent its jobs to the fp32 path */
static int bf16_rows(const bert_w* m) {
    return m->attn != ATTN_F32 && m->act == ACT_BF16 && amx_attend_takes(m->head_dim);
}
static void op_attend(void* p, int64_t job) {  /* the row split: one (sequence, head), all its queries */
    const ctx_t* c = p; const bert_w* m = c->m;
    const int64_t sq = job / m->n_heads, t0 = c->start[sq];
    const int h = (int)(job % m->n_heads);
    attend(c, sq, h, 0, (int)(c->start[sq + 1] - t0), 0, t0);
}

static void quant_att_row(const ctx_t* c, int64_t base, int64_t t) {
    const int D = c->m->dim;
    quant_row(c, c->s->att + t * D, D, base, t, c->w->so);
    ends_residual(c, c->s->att + t * D, c->w->so, D, xq_at(c, D, base, t), base, t);
}
static void op_quant_att(void* p, int64_t t) { quant_att_row(p, 0, t); }

/* x (a residual row that a matmul accumulated into) += bias, then LayerNorm and quantized for the next */
/* prenorm: the LayerNorm'd row goes to att's row (free between O and the next attention), x stays the residual;
   the last layer's LN2 (ModernBERT's final norm) writes x itself */
static void bias_ln(const ctx_t* c, int64_t base, int64_t t, const float* b, const float* w, const float* lb,
                    const float* inv, int in_place) {
    float* x = c->s->x + t * c->m->dim;
    ln_quant(c, x, b, w, lb, base, t, inv, c->m->prenorm && !in_place ? c->s->att + t * c->m->dim : x);
}
/* LN1 feeds this layer's inter matrix; LN2 the next layer's qkv (the last layer's quantized rows go unread) */
static void ln1_row(const ctx_t* c, int64_t base, int64_t t) {
    bias_ln(c, base, t, c->w->bo, c->w->ln1_w, c->w->ln1_b, c->w->si, 0);
}
static void ln2_row(const ctx_t* c, int64_t base, int64_t t) {
    const int last = c->w == c->m->layers + c->m->n_layers - 1;
    bias_ln(c, base, t, c->w->bd, c->w->ln2_w, c->w->ln2_b, last ? NULL : (c->w + 1)->sqkv, last);
}
/* the rows a matrix reads in fp32 (ACT_F32): qkv's and inter's are LN outputs, x in post-LN, att's rows in prenorm */
static float* ln_rows(const ctx_t* c) { return c->m->prenorm ? c->s->att : c->s->x; }
/* where inter writes: h, or prenorm's (n, 2 hidden) value | gate rows */
static float* inter_rows(const ctx_t* c) { return c->m->prenorm ? c->s->hg : c->s->h; }
static int64_t inter_ld(const ctx_t* c) { return c->m->prenorm ? 2 * (int64_t)c->m->hidden : c->m->hidden; }

/* prenorm: row t's q and k of every head rotated at its position by layer w's table (HF's rotate_half pairs) */
static void rope_row(const ctx_t* c, const bert_layer* w, float* qkv, int64_t t) {
    const bert_w* m = c->m;
    const int D = m->dim, HD = m->head_dim, half = HD / 2;
    const float *cs = w->rope + (int64_t)c->pos[t] * HD, *sn = cs + half;
    float* r = qkv + t * 3 * D;
    for (int j = 0; j < 2 * m->n_heads; j++) {  /* the q heads, then the k heads: the row's first 2D values */
        float* v = r + (int64_t)j * HD;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}
static void op_rope(void* p, int64_t t) { const ctx_t* c = p; rope_row(c, c->w, c->qkv, t); }
static void part_rope(const ctx_t* c, const bert_layer* w, float* qkv, int64_t t0, int64_t t1) {
    if (w->rope) for (int64_t t = t0; t < t1; t++) rope_row(c, w, qkv, t);
}
static void op_ln1(void* p, int64_t t) { ln1_row(p, 0, t); }
static void op_ln2(void* p, int64_t t) { ln2_row(p, 0, t); }

/* prenorm's GLU: h = gelu(v + bv) * (g + bg) from row t's value | gate, then quantized for down */
static void glu_row(const ctx_t* c, int64_t base, int64_t t) {
    const int H = c->m->hidden;
    const float *y = c->s->hg + t * 2 * H, *inv = c->w->sd;
    float* h = c->s->h + t * H;
    if (row_quantized(c->m)) {
        float sm[H] __attribute__((aligned(64)));
        const smooth_out q = {inv, sm};
        const float amax = gelu_gate_q(y, c->w->bi, y + H, c->w->bi + H, H, h, &q);
        quantize_row_act(c->m->layers[0].qkv.type, inv ? sm : h, amax, H, xq_at(c, H, base, t));
        ends_residual(c, inv ? sm : h, NULL, H, xq_at(c, H, base, t), base, t);
        return;
    }
    gelu_gate_q(y, c->w->bi, y + H, c->w->bi + H, H, h, NULL);  /* (one pass: a scalar max loop took 1.2 ns a value) */
    quant_row(c, h, H, base, t, inv);
}
static void gelu_row(const ctx_t* c, int64_t base, int64_t t) {
    if (c->m->prenorm) { glu_row(c, base, t); return; }
    const int H = c->m->hidden;
    float* h = c->s->h + t * H;
    if (row_quantized(c->m)) {
        float sm[H] __attribute__((aligned(64)));
        const smooth_out q = {c->w->sd, sm};
        const float amax = bias_gelu_erf_q(h, c->w->bi, H, &q);
        quantize_row_act(c->m->layers[0].qkv.type, c->w->sd ? sm : h, amax, H, xq_at(c, H, base, t));
        ends_residual(c, c->w->sd ? sm : h, NULL, H, xq_at(c, H, base, t), base, t);
        return;
    }
    bias_gelu_erf(h, c->w->bi, H);
    quant_row(c, h, H, base, t, c->w->sd);
}
static void op_gelu(void* p, int64_t t) { gelu_row(p, 0, t); }

/* time per op kind, summed over calls (bert_profile reads and resets it) */
enum { B_EMBED, B_QKV, B_ATTN, B_O, B_LN, B_INTER, B_GELU, B_DOWN, B_N };
static double prof[B_N];
static inline double secs(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define TIMED(K, STMT) { const double t_ = secs(); STMT; prof[K] += secs() - t_; }
/* in the token split: the caller's own part's ops (a part's time, not the job's) */
#define PART_TIMED(K, STMT) { const double t_ = secs(); STMT; if (pool_thread_id() == 0) prof[K] += secs() - t_; }
API void bert_profile(double* out) { for (int i = 0; i < B_N; i++) { out[i] = prof[i]; prof[i] = 0; } }

/* ---- the token split: each thread its own tokens through a whole layer ----
   From g_split_min tokens a thread, the tokens go in one part per thread (cut at a sequence's end where one is
   near the even cut), and each part runs a layer on its own rows: attention for its queries (every key and
   value of its sequences is there once the job before has ended), O, LN1, inter, GELU, down, LN2, then the
   next layer's qkv, each matrix whole over the part's tokens. One pool job a layer instead of eight, and each
   row an op reads was written by the same core. In the row split the matrices' rows (output features) go in
   one share per thread, and the next op read every token's row from both cores' caches (BERT-base b1xs128,
   Zen 4 VM: the GELU and the LayerNorms took 5.7 and 3.3 ms a forward at 2 threads, 2.7 and 1.5 at one).
   Weights: each thread reads all of every matrix, where the row split's threads read their half once per 64
   tokens (MTILE): the same bytes at 128 tokens. The same bits either way: a row's sum depends neither on its
   chunk nor on its token's tile, and a query's attention not on the other queries.
   Zen 4 VM, 2 threads, int7-row, alternated in one process (2026-12-04): BERT-base b1xs128 0.83x the row split's
   time (GELU 4.7 -> 1.4 ms, LayerNorms 2.8 -> 0.8, attention 5.0 -> 3.7), b1xs64 0.81x, b1xs32 0.78x;
   bge-small b1xs64 0.73x, b1xs32 0.97x, b1xs128 0.94-0.98x; b8xs128 0.99-1.04x. At 8 tokens a thread each
   thread's reading all the weights cost more (BERT-base b1xs16 1.15x), so from 16. The cuts follow each
   thread's measured speed (token_split.h). Narrower models from half as many (their weights a quarter the
   bytes): Zen 4 VM, b1xs16 (8 tokens a thread) alternated in one process (2026-12-05), the row split over the
   token split: bge-small 1.04x in quiet minutes and 1.5x in the VM's slow spells, MiniLM 1.5x; BERT-base 0.95x
   quiet, 1.0-1.14x slow (so it stays from 16). */
static int g_split_min = 16;
/* tokens a thread from which a model of width D splits by tokens: g_split_min at D >= 768, half at D <= 384 */
static int64_t split_min_for(int D) {
    const int64_t w = D < 384 ? 384 : D > 768 ? 768 : D;
    return (int64_t)g_split_min * w / 768;
}
static solo_rule g_solo = SOLO_RULE_INIT;  /* forwards on the caller alone while another process holds a core */
/* window_ms >= 0 sets the solo rule's window (solo_rule.h); returns the times the solo forwards began */
API int64_t bert_solo(int window_ms) { if (window_ms >= 0) g_solo.window_ns = window_ms * 1e6; return g_solo.entered; }
/* tokens per thread (at width 768; split_min_for) from which bert_forward splits by tokens: n >= 0 sets it (0:
   always), -1 asks */
API int bert_token_split(int n) { if (n >= 0) g_split_min = n; return g_split_min; }

/* Y rows [t0, t1) (+)= W's whole rows times the part's inputs (xq in its region; Xf the fp32 rows, K wide) */
static void mm_part(const ctx_t* c, const mat* W, float* Y, int64_t ld, int acc, const float* Xf, int64_t t0,
                    int64_t t1) {
    const int64_t K = W->cols;
    const int64_t r0 = c->rix ? c->rpre[t0] : 0, r1 = c->rix ? c->rpre[t1] : 0;  /* the part's residual rows */
    const more_rows more = ends_rows_of(c, W, r0, r1);
    matmul_rows_more(W, 0, W->rows, xq_at(c, K, t0, t0), Xf + t0 * K, t1 - t0, Y + t0 * ld, ld, acc, &more);
    ends_fold(c, W, Y, ld, r0, r1);
}
static void part_rows(const ctx_t* c, int64_t q, void (*row)(const ctx_t*, int64_t, int64_t)) {
    for (int64_t t = c->tb[q]; t < c->tb[q + 1]; t++) row(c, c->tb[q], t);
}
static void part_attend(const ctx_t* c, int64_t t0, int64_t t1) {  /* queries [t0, t1), every head */
    const bert_w* m = c->m;
    int64_t sq = 0;
    while (sq < c->n_seq && c->start[sq + 1] <= t0) sq++;
    for (; sq < c->n_seq && c->start[sq] < t1; sq++) {
        const int64_t s0 = c->start[sq], a = t0 > s0 ? t0 : s0, b = t1 < c->start[sq + 1] ? t1 : c->start[sq + 1];
        for (int h = 0; h < m->n_heads; h++) attend(c, sq, h, (int)(a - s0), (int)(b - s0), t0, a);
    }
}
static void part_embed_(const ctx_t* c, int64_t q) {  /* embeddings, then layer 0's qkv */
    const int64_t t0 = c->tb[q], t1 = c->tb[q + 1];
    if (t0 >= t1) return;
    PART_TIMED(B_EMBED, part_rows(c, q, embed_row));
    PART_TIMED(B_QKV, mm_part(c, &c->m->layers[0].qkv, c->s->qkv, 3 * c->m->dim, 0, ln_rows(c), t0, t1);
               part_rope(c, &c->m->layers[0], c->s->qkv, t0, t1);
               if (c->kv_next) part_pack_kv(c, t0, t1, c->s->qkv, c->m->layers[0].bqkv, c->kv_next));
}
static void part_layer_(const ctx_t* c, int64_t q) {  /* layer c->w from its attention on, then the next layer's qkv */
    const bert_w* m = c->m; const bert_layer* w = c->w; const bert_scratch* s = c->s;
    const int D = m->dim, H = m->hidden;
    const int64_t t0 = c->tb[q], t1 = c->tb[q + 1];
    if (t0 >= t1) return;
    PART_TIMED(B_ATTN, part_attend(c, t0, t1);
               if (m->act != ACT_F32 && !bf16_rows(m)) part_rows(c, q, quant_att_row));
    PART_TIMED(B_O, mm_part(c, &w->o, s->x, D, 1, s->att, t0, t1));
    PART_TIMED(B_LN, part_rows(c, q, ln1_row));
    PART_TIMED(B_INTER, mm_part(c, &w->inter, inter_rows(c), inter_ld(c), 0, ln_rows(c), t0, t1));
    PART_TIMED(B_GELU, part_rows(c, q, gelu_row));
    PART_TIMED(B_DOWN, mm_part(c, &w->down, s->x, D, 1, s->h, t0, t1));
    PART_TIMED(B_LN, part_rows(c, q, ln2_row));
    if (w + 1 < m->layers + m->n_layers)
        PART_TIMED(B_QKV, mm_part(c, &(w + 1)->qkv, c->qkv_next, 3 * D, 0, ln_rows(c), t0, t1);
                   part_rope(c, w + 1, c->qkv_next, t0, t1);
                   if (c->kv_next) part_pack_kv(c, t0, t1, c->qkv_next, (w + 1)->bqkv, c->kv_next));
}
/* parts_run's jobs: a part's seconds and thread kept for the next forward's cuts (token_split.h) */
#define PART_CLOCK(c, q, STMT) { const double t_ = secs(); STMT; (c)->part_s[q] += secs() - t_; \
                                 (c)->part_tid[q] = pool_thread_id(); }
static void part_embed(void* p, int64_t q) { PART_CLOCK((const ctx_t*)p, q, part_embed_(p, q)) }
static void part_layer(void* p, int64_t q) { PART_CLOCK((const ctx_t*)p, q, part_layer_(p, q)) }

/* ---- first_only: the last layer for each sequence's first token alone ----
   A [CLS] head (a classifier, a reranker, CLS pooling) reads one row a sequence of the last hidden states. Every
   token's keys and values of the last layer come from the layer before (its qkv rows are all there), but the
   last layer's queries, O, LayerNorms, inter, GELU and down matter only at the first tokens: those rows are
   gathered into k compact rows (one per sequence with tokens) of `spare` (the qkv buffer the last layer does not
   read: x then att, 2 k D <= 3 n D floats), run through the row split's ops, and written back to x at their
   tokens. The other rows of x keep the layer before's states. The same bits at the first tokens as the whole
   layer: a row's ops never read another row, and a query's attention reads only keys and values. One layer in
   L of the per-token work is gone (MiniLM-L6: a sixth). */
/* the row split's ops of layer c->w after its attention, over rows [0, n) of c->s (att -> x): the attention rows
   quantized (unless the bf16 tiles wrote them), O into x, LN1, inter, GELU, down into x, LN2 */
static void rows_after_attention(const ctx_t* c, int64_t n) {
    const bert_w* m = c->m; const bert_scratch* s = c->s; const bert_layer* w = c->w;
    const int D = m->dim, H = m->hidden;
    if (m->act != ACT_F32 && !bf16_rows(m)) TIMED(B_ATTN, rows_run(op_quant_att, (void*)c, n));
    TIMED(B_O, mm_ends(c, &w->o, s->x, D, 1, s->att, n));
    TIMED(B_LN, rows_run(op_ln1, (void*)c, n));
    TIMED(B_INTER, mm_ends(c, &w->inter, inter_rows(c), inter_ld(c), 0, ln_rows(c), n));
    TIMED(B_GELU, rows_run(op_gelu, (void*)c, n));
    TIMED(B_DOWN, mm_ends(c, &w->down, s->x, D, 1, s->h, n));
    TIMED(B_LN, rows_run(op_ln2, (void*)c, n));
}

static void op_attend_first(void* p, int64_t job) {  /* (compact row j, head): query 0 of sequence firsts[j] */
    const ctx_t* c = p;
    const int64_t j = job / c->m->n_heads;
    attend(c, c->firsts[j], (int)(job % c->m->n_heads), 0, 1, 0, j);
}
static void last_layer_first_tokens(const ctx_t* c, float* spare) {
    const bert_w* m = c->m; const bert_scratch* s = c->s;
    const int D = m->dim;
    int64_t* firsts = malloc(sizeof(int64_t) * (c->n_seq ? c->n_seq : 1)), k = 0;
    if (!firsts) abort();  /* as any other allocation failure in the process would end it */
    for (int64_t sq = 0; sq < c->n_seq; sq++)
        if (c->start[sq + 1] > c->start[sq]) firsts[k++] = sq;
    bert_scratch cs = *s;
    cs.x = spare;
    cs.att = spare + k * D;
    for (int64_t j = 0; j < k; j++) memcpy(cs.x + j * D, s->x + (int64_t)c->start[firsts[j]] * D, sizeof(float) * D);
    ctx_t cc = *c;
    cc.s = &cs; cc.tb = NULL; cc.firsts = firsts;
    int32_t* slots = c->rix ? ends_slots(m, k, 0, NULL, 1) : NULL;  /* every compact row is a first token */
    ends_use(&cc, slots, k);
    TIMED(B_ATTN, pool_run(op_attend_first, &cc, k * m->n_heads));
    rows_after_attention(&cc, k);
    free(slots);
    for (int64_t j = 0; j < k; j++) memcpy(s->x + (int64_t)c->start[firsts[j]] * D, cs.x + j * D, sizeof(float) * D);
    free(firsts);
}

/* Returns 0, or 1 when an id, position or token type is out of range (nothing is computed then). first_only: the
   last layer computes each sequence's first token only (above); x's other rows then hold the layer before's. */
API int bert_forward(const bert_w* m, const bert_scratch* s, int64_t n, const int32_t* ids, const int32_t* pos,
                     const int32_t* types, int64_t n_seq, const int32_t* start, int nthreads, int first_only) {
    const int D = m->dim, H = m->hidden;
    for (int64_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab || pos[t] < 0 || pos[t] >= m->max_pos || types[t] < 0 ||
            types[t] >= m->type_vocab) return 1;
    if (start[0] != 0 || start[n_seq] != n) return 1;
    for (int64_t q = 0; q < n_seq; q++) if (start[q + 1] < start[q]) return 1;
    /* the relative bias's (the window's, DeBERTa's buckets') table spans distances below max_pos (and its spare
       lanes): a longer sequence would read past it (positions alone in range let a 700-token sequence through a
       512-position MPNet) */
    const int biased = m->rel || m->window || m->dis;
    for (int64_t q = 0; biased && q < n_seq; q++) if (start[q + 1] - start[q] > m->max_pos) return 1;
    if (biased && m->attn == ATTN_BF16_TILES) return 1;  /* the bf16 forms add no bias (NativeBert) */
    const double began = secs();
    pool_begin(nthreads);
    g_threads = nthreads < 1 ? 1 : nthreads;
    const int solo = solo_begin(&g_solo);  /* a shared machine: the caller alone (solo_rule.h) */
    const int64_t unit = m->act == ACT_Q8 ? (int64_t)sizeof(xblock) : m->act == ACT_Q16 ? (int64_t)sizeof(x16block)
                         : m->act == ACT_BF16 ? 64 : 0;
    ctx_t c = {.m = m, .s = s, .ids = ids, .pos = pos, .types = types, .start = start, .n_seq = n_seq,
               .xs = (D > H ? D : H) / QK, .unit = unit, .qkv = s->qkv};
    int32_t* slots = ends_slots(m, n, n_seq, start, 0);
    ends_use(&c, slots, n);
    const int P = solo ? 1 : g_threads;
    if (n >= split_min_for(D) * P && P <= MAX_PARTS) {  /* the token split */
        int64_t tb[MAX_PARTS + 1];
        double part_s[MAX_PARTS] = {0};
        int part_tid[MAX_PARTS];
        for (int q = 0; q < P; q++) part_tid[q] = -1;
        const int unit = kv_unit(m);
        split_tokens(n, n_seq, start, P, unit, tb);
        c.tb = tb;
        c.part_s = part_s;
        c.part_tid = part_tid;
        /* packed keys and values: sequence s from row koff[s] (lengths rounded up to whole units), 8 rows to spare
           (the score loop reads keys in eights); two buffers of 4 krows D bytes, a layer's and the next's */
        int64_t* koff = NULL;
        uint8_t* kvb[2] = {NULL, NULL};
        if (s->kv && (m->attn == ATTN_INT8 ? kv8_takes(m->head_dim) : m->attn == ATTN_BF16_TILES && kv_packed(m->head_dim))
            && (koff = malloc(sizeof(int64_t) * (n_seq + 1)))) {
            koff[0] = 0;
            for (int64_t q = 0; q < n_seq; q++) koff[q + 1] = koff[q] + (start[q + 1] - start[q] + unit - 1) / unit * unit;
            c.koff = koff;
            c.krows = koff[n_seq] + 8;
            kvb[0] = s->kv;
            kvb[1] = s->kv + 4 * c.krows * D;
        }
        c.kv_next = kvb[0];
        parts_run(part_embed, &c, P);  /* layer 0's qkv into s->qkv (and its keys and values packed) */
        for (int l = 0; l < m->n_layers; l++) {
            c.w = &m->layers[l];
            c.qkv = l % 2 ? s->qkv2 : s->qkv;
            c.qkv_next = l % 2 ? s->qkv : s->qkv2;
            c.kv = c.kv_next;  /* what the job before packed this layer's keys into (NULL: nothing) */
            /* first_only's last layer attends from the qkv rows: nothing to pack for it */
            c.kv_next = first_only && l + 2 == m->n_layers ? NULL : kvb[(l + 1) % 2];
            if (first_only && l == m->n_layers - 1) last_layer_first_tokens(&c, c.qkv_next);
            else parts_run(part_layer, &c, P);
        }
        free(koff);
        free(slots);
        solo_end(&g_solo, solo, g_threads, (secs() - began) * 1e9, (double)pool_wait_ns());
        pool_end();
        update_speeds(P, tb, part_s, part_tid);
        return 0;
    }
    TIMED(B_EMBED, rows_run(op_embed, &c, n));
    for (int l = 0; l < m->n_layers; l++) {
        const bert_layer* w = &m->layers[l];
        c.w = w;
        TIMED(B_QKV, mm_ends(&c, &w->qkv, s->qkv, 3 * D, 0, ln_rows(&c), n); if (w->rope) rows_run(op_rope, &c, n));
        if (first_only && l == m->n_layers - 1) { last_layer_first_tokens(&c, s->qkv2); break; }
        TIMED(B_ATTN, pool_run(op_attend, &c, n_seq * m->n_heads));
        rows_after_attention(&c, n);
    }
    free(slots);
    solo_end(&g_solo, solo, g_threads, (secs() - began) * 1e9, (double)pool_wait_ns());
    pool_end();
    return 0;
}
