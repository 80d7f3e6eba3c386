/* int8-row's second activation row at each sequence's ends (bert_forward.c, included after its ctx_t).
   BERT-family models put massive activations on a few channels of their [CLS] and [SEP] tokens (amax / rms ~38 in
   MiniLM's GELU rows, against 7-15 elsewhere), and one scale per token then leaves those tokens' other channels
   a level or two: on one- to three-word texts, where they are most of a mean-pooled vector, int7-row-a8 kept a
   cosine of 0.975 to fp32. With m->ends, each sequence's first and last token also quantize what their row's
   rounding left (x - q d, at its own scale: ~15 bits together) into a slot of s->xr, and every matrix adds
   that slot's product into the token's output row: the same matrix over a few more rows (2 a sequence), the same
   integer sums a row, so a row still never depends on its batch-mates. MiniLM, an fp32 emulation and then these
   kernels: docs/encoders.md. */
#pragma once
#include "packed.h"  /* act_offset */

/* slot r's activation blocks for a K-wide input, in the region of the part whose first slot is r0 (as xq_at: that
   part's slots K / 32 units apart from unit r0 * xs, so that parts writing D- and hidden-wide rows at once never
   overlap; the row split is one part, r0 0) */
static void* xr_at(const ctx_t* c, int64_t K, int64_t r0, int64_t r) {
    return (uint8_t*)c->s->xr + (r0 * c->xs + (r - r0) * (K / QK)) * c->unit;
}

/* token (or compact row) t's residual, when it has a slot: v (times inv, when not NULL: the same products as the
   quantizer's) the values its blocks `main` quantized (K wide); base: the first token of t's part. r = v - q d per
   value (a loop the compiler vectorizes), then quantized as any row */
static void ends_residual(const ctx_t* c, const float* v, const float* inv, int64_t K, const void* main, int64_t base,
                          int64_t t) {
    if (!c->rix || c->rix[t] < 0) return;
    const int type = c->m->layers[0].qkv.type;
    float r[K] __attribute__((aligned(64)));
    for (int64_t k = 0; k < K; k++) r[k] = inv ? v[k] * inv[k] : v[k];
    __asm__ volatile("" ::: "memory");  /* r rounded to floats, as the quantizer's products: no FMA across */
    sub_dequant(type, main, K, r);
    quantize_act_smooth(type, r, NULL, K, xr_at(c, K, c->rpre[base], c->rix[t]));
}

/* the residual rows of slots [r0, r1) (a part's) for W: its input's slots in, their products out (yr: the part's
   rows, W->rows apart, from row r0 of the widest matrix's, as parts run other matrices meanwhile) */
static more_rows ends_rows_of(const ctx_t* c, const mat* W, int64_t r0, int64_t r1) {
    const int64_t D = c->m->dim, H = c->m->hidden;
    if (!c->rix || r1 <= r0) return (more_rows){NULL, 0, NULL, 0};
    return (more_rows){xr_at(c, W->cols, r0, r0), r1 - r0, c->s->yr + r0 * (3 * D > H ? 3 * D : H), W->rows};
}
/* Y rows of the tokens with slots in [r0, r1) += their residual rows' products (ends_rows_of's) */
static void ends_fold(const ctx_t* c, const mat* W, float* Y, int64_t ld, int64_t r0, int64_t r1) {
    const more_rows e = ends_rows_of(c, W, r0, r1);
    for (int64_t r = 0; r < e.M; r++) {
        float* y = Y + (int64_t)c->rtok[r0 + r] * ld;
        const float* v = e.Y + r * e.ldy;
        for (int64_t j = 0; j < e.ldy; j++) y[j] += v[j];
    }
}
/* the row split's matmul of W over rows [0, n) (xq, or Xf), the residual rows in the same pass */
static void mm_ends(const ctx_t* c, const mat* W, float* Y, int64_t ld, int acc, const float* Xf, int64_t n) {
    const int64_t nr = c->rix ? c->rpre[n] : 0;
    const more_rows e = ends_rows_of(c, W, 0, nr);
    const mat* Ws[1] = {W}; float* Ys[1] = {Y}; const int64_t lds[1] = {ld};
    mm_run_more(1, Ws, Ys, lds, acc, c->s->xq, Xf, n, &e);
    ends_fold(c, W, Y, ld, 0, nr);
}

/* the slots of a forward over n rows: rix[t] (-1: none), rtok[slot], rpre[t] (slots before row t); every row when
   all_rows (first_only's compact rows are all first tokens), else each sequence's first and last. NULL: no slots. */
static int32_t* ends_slots(const bert_w* m, int64_t n, int64_t n_seq, const int32_t* start, int all_rows) {
    if (!m->ends || m->act != ACT_Q8 || m->layers[0].qkv.type != T_Q8_ROW || n <= 0) return NULL;
    int32_t* a = malloc(sizeof(int32_t) * (3 * n + 1));
    if (!a) abort();  /* as any other allocation failure in the process would end it */
    int32_t *rix = a, *rtok = a + n, *rpre = a + 2 * n;
    for (int64_t t = 0; t < n; t++) rix[t] = all_rows ? 0 : -1;
    if (!all_rows)
        for (int64_t q = 0; q < n_seq; q++)
            if (start[q + 1] > start[q]) rix[start[q]] = rix[start[q + 1] - 1] = 0;
    int32_t k = 0;
    for (int64_t t = 0; t < n; t++) {
        rpre[t] = k;
        if (rix[t] == 0) { rtok[k] = (int32_t)t; rix[t] = k++; }
    }
    rpre[n] = k;
    return a;
}
static void ends_use(ctx_t* c, int32_t* slots, int64_t n) {  /* ends_slots' arrays for a forward over n rows */
    c->rix = slots; c->rtok = slots ? slots + n : NULL; c->rpre = slots ? slots + 2 * n : NULL;
}
