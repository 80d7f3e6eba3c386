/* int8-row's second activation row for a decoder step's ends (llama_step.c, ACT_ROW: the decoder embedders' int8-row,
   millis.gen.embedder), as the encoder's ends_rows.h does for [CLS] / [SEP]. One scale per token leaves the other
   channels of a token with massive activations a level or two; in a decoder those are each text's first token (the
   attention sink every later token reads through its keys and values) and the rows a call returns (the pooled
   states). Those tokens also quantize what their row's rounding left (x - q d, at its own scale) into a residual row
   (s->xr), and every matrix adds that row's product into the token's output row: the same matrices over a few more
   rows in the same pass (mm_jobs.h's more rows), the same integer sums a row, so a row never depends on its
   batch-mates. Included by llama_step.c after its step_ctx. */
#pragma once

/* which tokens get a residual row (llm_ends; A/B runs and tests): each text's first (position 0), the returned ones.
   One setting for the library in the process, read at each step's start: set it between steps, not during one. */
enum { ENDS_FIRST = 1, ENDS_OUT = 2 };
static int g_ends = ENDS_FIRST | ENDS_OUT;
API int llm_ends(int mode) { if (mode >= 0 && mode <= 3) g_ends = mode; return g_ends; }  /* -1 asks */

/* token t's residual: x minus what its blocks in xq dequantize to, quantized as any row into its residual row */
static void end_residual(const step_ctx* c, const float* x, int64_t K, int64_t t) {
    float r[K] __attribute__((aligned(64)));
    memcpy(r, x, sizeof(float) * K);
    sub_dequant(T_Q8_ROW, (const xblock*)c->s->xq + t * (K / QK), K, r);
    quantize_act(T_Q8_ROW, r, K, (xblock*)c->s->xr + (int64_t)c->rix[t] * (K / QK));
}

/* the ends of a step of c->n tokens (ACT_ROW only): sets c->rix, c->rtok, c->nr; returns the array to free (NULL:
   none). The returned rows: out_rows (token indices) */
static int32_t* end_rows(step_ctx* c, int64_t n_out) {
    c->rix = c->rtok = NULL; c->nr = 0;
    if (c->m->act != ACT_ROW || !g_ends || c->n <= 0 || !c->s->xr) return NULL;
    int32_t* a = malloc(sizeof(int32_t) * 2 * c->n);
    if (!a) abort();  /* as any other allocation failure in the process would end it */
    int32_t *rix = a, *rtok = a + c->n;
    for (int64_t t = 0; t < c->n; t++) rix[t] = (g_ends & ENDS_FIRST) && c->pos[t] == 0 ? 0 : -1;
    for (int64_t r = 0; r < n_out && (g_ends & ENDS_OUT); r++) rix[c->out_rows[r]] = 0;
    int32_t k = 0;
    for (int64_t t = 0; t < c->n; t++)
        if (rix[t] == 0) { rtok[k] = (int32_t)t; rix[t] = k++; }
    c->rix = rix; c->rtok = rtok; c->nr = k;
    return a;
}

/* Y[i] rows of the ends' tokens += their residual rows' products (yr: matrix i's nr rows, W[i]->rows wide, after
   the matrices before it); a matrix of another type (a float one reads the exact rows) has none */
typedef struct { const step_ctx* c; int n; const mat* const* W; float* const* Y; const int64_t* ld; } fold_job;
static void op_fold(void* p, int64_t r) {
    const fold_job* f = p;
    const float* yr = f->c->s->yr;
    for (int i = 0; i < f->n; i++) {
        const int64_t rows = f->W[i]->rows;
        if (f->W[i]->type != T_Q8_ROW) continue;
        float* y = f->Y[i] + (int64_t)f->c->rtok[r] * f->ld[i];
        const float* v = yr + r * rows;
        for (int64_t j = 0; j < rows; j++) y[j] += v[j];
        yr += f->c->nr * rows;
    }
}

/* the step's matmul of up to 3 matrices over its n tokens (mm_run), the ends' residual rows in the same pass */
static void mm_step(const step_ctx* c, int n, const mat* const* W, float* const* Y, const int64_t* ld, int acc,
                    const float* Xf, int64_t M) {
    if (!c->nr) { mm_run(n, W, Y, ld, acc, c->s->xq, Xf, M); return; }
    more_rows more[3];
    int64_t off = 0;
    for (int i = 0; i < n; i++) {  /* only the int8-row matrices read the residual rows (the activations' rounding) */
        const int row = W[i]->type == T_Q8_ROW;
        more[i] = (more_rows){c->s->xr, row ? c->nr : 0, c->s->yr + off, W[i]->rows};
        off += row ? c->nr * W[i]->rows : 0;
    }
    mm_run_more(n, W, Y, ld, acc, c->s->xq, Xf, M, more);
    fold_job f = {c, n, W, Y, ld};
    rows_run(op_fold, &f, c->nr);
}
