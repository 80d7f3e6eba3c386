/* A forward pass as a sequence of pool jobs (pool.c), each op split into chunks: the pool's entry points
   and the matmul job shared by the decoder step (llama_step.c) and the encoder (bert_forward.c). */
#pragma once
#include "blockq.h"

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);
void pool_solo(int solo);
int64_t pool_wait_ns(void);

typedef struct {   /* one matmul job: up to 3 matrices sharing one input, split by chunks of rows */
    const mat* W[3]; float* Y[3]; int64_t ld[3]; int n, acc;
    const void* Xq; const float* Xf; int64_t M, rows_per_chunk, first_chunk[4];
} mm_job;

static void mm_chunk(void* p, int64_t c) {
    const mm_job* j = p;
    int i = 0;
    while (c >= j->first_chunk[i + 1]) i++;
    const int64_t n0 = (c - j->first_chunk[i]) * j->rows_per_chunk;
    const int64_t n1 = n0 + j->rows_per_chunk < j->W[i]->rows ? n0 + j->rows_per_chunk : j->W[i]->rows;
    matmul_rows(j->W[i], n0, n1, j->Xq, j->Xf, j->M, j->Y[i], j->ld[i], j->acc);
}

static int g_threads = 1;  /* the threads of the running pass (set after pool_begin) */

/* Y[i] (+)= W[i] X for i < n (up to 3 matrices sharing the input X: activation blocks Xq or fp32 rows Xf,
   M tokens), rows split over the pool */
static void mm_run(int n, const mat* const* W, float* const* Y, const int64_t* ld, int acc, const void* Xq,
                   const float* Xf, int64_t M) {
    mm_job j = {.n = n, .acc = acc, .Xq = Xq, .Xf = Xf, .M = M};
    int64_t rows = 0;
    for (int i = 0; i < n; i++) { j.W[i] = W[i]; j.Y[i] = Y[i]; j.ld[i] = ld[i]; rows += W[i]->rows; }
    /* ~8 chunks per thread (a preempted thread's share is small), at least 16 rows (per-chunk cost) */
    int64_t per = rows / (8 * (int64_t)g_threads);
    per = per < 16 ? 16 : (per + 15) / 16 * 16;
    j.rows_per_chunk = per;
    j.first_chunk[0] = 0;
    for (int i = 0; i < n; i++) j.first_chunk[i + 1] = j.first_chunk[i] + (W[i]->rows + per - 1) / per;
    pool_run(mm_chunk, &j, j.first_chunk[n]);
}
