/* A (B, T) batch as HF takes it, in one C call: bert_encode flattens the tokens the mask keeps, runs bert_forward
   (bert_forward.c) and pools, where the Python around it (a dozen numpy calls before the forward and the pooling
   after, each on caches the forward had just flushed) took ~0.2 ms a call: bge-small b1xs128's forward is ~8.5 ms,
   its b1xs16's ~1.5. */
#include "blockq.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "step_math.h"

API int bert_forward(const void* m, const void* s, int64_t n, const int32_t* ids, const int32_t* pos,
                     const int32_t* types, int64_t n_seq, const int32_t* start, int nthreads, int first_only);

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

/* The SPLADE head's transform epilogue (millis.encoder.splade) on n rows of H floats, in place: + b, the encoder's
   erf GELU, then LayerNorm (w, beta, eps). numpy's float64 GELU took 17 ms of BERT-base b8xs128's head (1,024 rows). */
API void gelu_norm_rows(float* x, const float* b, const float* w, const float* beta, float eps, int64_t n, int H) {
    float tmp[H];
    for (int64_t t = 0; t < n; t++) {
        float* r = x + t * H;
        bias_gelu_erf(r, b, H);
        layernorm(r, w, beta, H, eps, tmp);
        memcpy(r, tmp, sizeof(float) * H);
    }
}

/* ids, mask, types (NULL: zeros): (B, T) int64. The tokens whose mask is not 0 go in row order, each at its column
   as its position (sequence b: the kept tokens of row b), through bert_forward (first_only for mode 2); then out
   (B, D) from the last hidden states x (the scratch's, D wide): mode 0 / 1 bert_pool's mean / max (normalized when
   `normalize`), mode 2 each row's column-0 token ([CLS]; zeros where the mask drops it), as it is. Returns 0, or 1
   when an id or token type anywhere in the batch is out of range (then nothing is computed). */
API int bert_encode(const void* m, const void* s, const float* x, int D, int64_t vocab, int64_t type_vocab, int64_t B,
                    int64_t T, const int64_t* ids, const int64_t* mask, const int64_t* types, int nthreads, int mode,
                    int normalize, float* out) {
    int64_t n = 0;
    for (int64_t i = 0; i < B * T; i++) {  /* every id and type, kept or not (as HF's embedding lookup reads them) */
        if (ids[i] < 0 || ids[i] >= vocab || (types && (types[i] < 0 || types[i] >= type_vocab))) return 1;
        n += mask[i] != 0;
    }
    int32_t* buf = malloc(sizeof(int32_t) * (3 * n + B + 1));
    if (!buf) abort();  /* as any other allocation failure in the process would end it */
    int32_t *id = buf, *pos = buf + n, *ty = buf + 2 * n, *start = buf + 3 * n;
    int64_t k = 0;
    start[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T; t++) {
            const int64_t i = b * T + t;
            if (!mask[i]) continue;
            id[k] = (int32_t)ids[i]; pos[k] = (int32_t)t; ty[k] = types ? (int32_t)types[i] : 0; k++;
        }
        start[b + 1] = (int32_t)k;
    }
    const int rc = bert_forward(m, s, n, id, pos, ty, B, start, nthreads, mode == 2);
    if (!rc && mode < 2) bert_pool(x, D, B, start, mode, normalize, out);
    if (!rc && mode == 2)
        for (int64_t b = 0; b < B; b++) {
            if (start[b + 1] > start[b] && mask[b * T]) memcpy(out + b * D, x + (int64_t)start[b] * D, sizeof(float) * D);
            else memset(out + b * D, 0, sizeof(float) * D);
        }
    free(buf);
    return rc;
}
