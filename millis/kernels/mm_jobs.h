/* A forward pass as a sequence of pool jobs (pool.c), each op split into chunks: the pool's entry points
   and the matmul job shared by the decoder step (llama_step.c) and the encoder (bert_forward.c). */
#pragma once
#include "blockq.h"

#include <stdatomic.h>

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);
void pool_solo(int solo);
int64_t pool_wait_ns(void);
int pool_thread_id(void);  /* 0: the caller of pool_run; its workers 1, 2, ... */
void* pool_buffer(void** buf, int64_t* cap, int64_t need);  /* this thread's scratch, freed as a worker ends */

#define MM_CHUNKS 256  /* at most this many chunks per job (a table on the caller's stack) */
typedef struct {   /* one matmul job: up to 3 matrices sharing one input, split into chunks of rows */
    const mat* W[3]; float* Y[3]; int64_t ld[3]; int n, acc;
    const void* Xq; const float* Xf; int64_t M, nc;
    more_rows more[3];  /* further rows through the same weights, per matrix (M 0: none; blockq.h) */
    int8_t mat_of[MM_CHUNKS]; int64_t row0[MM_CHUNKS], row1[MM_CHUNKS];  /* chunk c: W[mat_of[c]] rows [row0, row1) */
} mm_job;

static void mm_chunk(void* p, int64_t c) {
    const mm_job* j = p;
    const int i = j->mat_of[c];
    matmul_rows_more(j->W[i], j->row0[c], j->row1[c], j->Xq, j->Xf, j->M, j->Y[i], j->ld[i], j->acc, &j->more[i]);
}

static int g_threads = 1;  /* the threads of the running pass (set after pool_begin) */

/* fn(ctx, t) for every token t < n, in runs of consecutive tokens: 8 runs per thread (one chunk per token cost
   a claim of the pool's shared counter per row, and each thread's rows scattered: the native encoder's
   LayerNorms waited on rows the other core had written, 1.3 us a 384-wide row) */
typedef struct { void (*fn)(void*, int64_t); void* ctx; int64_t n, per; } rows_job;
static void rows_chunk(void* p, int64_t c) {
    const rows_job* j = p;
    for (int64_t t = c * j->per; t < (c + 1) * j->per && t < j->n; t++) j->fn(j->ctx, t);
}
static void rows_run(void (*fn)(void*, int64_t), void* ctx, int64_t n) {
    const int64_t per = n / (8 * g_threads) > 1 ? n / (8 * g_threads) : 1;
    rows_job j = {fn, ctx, n, per};
    pool_run(rows_chunk, &j, (n + per - 1) / per);
}

/* fn(ctx, q) for each part q < parts, part q by thread q (pool_thread_id) where that thread comes for it, else
   by whichever thread is free: a part's rows stay in the cache of the core that wrote them in the job before (a
   token split, bert_forward.c), and a preempted thread's part is still taken by the others. Each of the
   pool's `parts` calls claims one part not yet taken, its own first, so every part runs once. */
#define MAX_PARTS 64
typedef struct { void (*fn)(void*, int64_t); void* ctx; int64_t parts; _Atomic int taken[MAX_PARTS]; } parts_job;
static void parts_chunk(void* p, int64_t c) {
    parts_job* j = p;
    (void)c;
    const int64_t own = pool_thread_id() % j->parts;
    for (int64_t k = 0; k < j->parts; k++) {
        const int64_t q = (own + k) % j->parts;
        int untaken = 0;
        if (atomic_compare_exchange_strong(&j->taken[q], &untaken, 1)) { j->fn(j->ctx, q); return; }
    }
}
static void parts_run(void (*fn)(void*, int64_t), void* ctx, int64_t parts) {
    parts_job j = {.fn = fn, .ctx = ctx, .parts = parts};
    for (int64_t q = 0; q < parts; q++) atomic_init(&j.taken[q], 0);
    pool_run(parts_chunk, &j, parts);
}

/* Y[i] (+)= W[i] X for i < n (up to 3 matrices sharing the input X: activation blocks Xq or fp32 rows Xf,
   M tokens), rows split over the pool.
   The job's rows (all its matrices in turn) go in equal shares, one per thread (mm_shares: per thread), in
   multiples of 16 rows (packed groups of 8, the 2-group tiles); a share is cut where a matrix ends (QKV at 2
   threads: q[0,480) | q[480,576) k v). Each chunk is one long stream, and the pool's shared counter is
   claimed a few times a job. Guided chunks (an eighth of the rows left per thread, down to 1/128 of the
   job) cost more than the balance they bought: Zen 4 VM, 2 threads, alternated in one process (2026-12-04,
   the same bits): SmolLM2-shaped decode Q8_0 0.75x / Q4_1 0.77x the step's time (QKV 0.95 -> 0.65 ms a
   token, O 0.66 -> 0.40), prefill of 128 tokens 0.98x, batch 8 0.96x; encoders int7-row b1xs16 BERT-base
   0.80x, bge-small 0.74x, MiniLM 0.83x, b1xs128 0.93-0.95x, b8xs128 0.97x; 2 chunks per thread sat in
   between (decode 0.84x), and with a CPU-bound process beside it decode still ran 0.97x guided's time
   (a preempted worker's share is the caller's to wait for; pool.c's solo steps bound that).
   bf16 on AMX tiles, and the row types' tiles (int7-row) at 16 tokens or more: two chunks per thread per
   matrix (multiples of 32 rows), as measured on SPR against guided chunks (MiniLM native-bf16 b8xs128
   0.91x, b1xs128 0.93x, b1xs16 0.81x the time). A row's sum does not depend on its chunk. */
static int g_shares = 1;
API int mm_shares(int n) { if (n > 0 && n <= 16) g_shares = n; return g_shares; }  /* n <= 0 asks */
/* more (NULL: none): further rows through the same weights (blockq.h's more_rows), one entry per matrix */
static void mm_run_more(int n, const mat* const* W, float* const* Y, const int64_t* ld, int acc, const void* Xq,
                        const float* Xf, int64_t M, const more_rows* more) {
    mm_job j = {.n = n, .acc = acc, .Xq = Xq, .Xf = Xf, .M = M};
    for (int i = 0; i < n && more; i++) j.more[i] = more[i];
    int64_t total = 0;
    for (int i = 0; i < n; i++) { j.W[i] = W[i]; j.Y[i] = Y[i]; j.ld[i] = ld[i]; total += W[i]->rows; }
    const int64_t parts = (int64_t)g_threads * g_shares, share = ((total + parts - 1) / parts + 15) / 16 * 16;
    int64_t room = share;  /* rows left in the current share */
    for (int i = 0; i < n; i++)
        for (int64_t r = 0; r < W[i]->rows;) {
            const int amx = W[i]->type == T_BF16_AMX || (W[i]->tiles && is_row_type(W[i]->type) && M >= 16);
            int64_t size = amx ? (W[i]->rows / (2 * (int64_t)g_threads) + 31) / 32 * 32 : room;
            /* the table's last entries: the rest of each matrix in one chunk (keeps every matrix covered) */
            if (r + size > W[i]->rows || j.nc >= MM_CHUNKS - (n - i)) size = W[i]->rows - r;
            j.mat_of[j.nc] = (int8_t)i; j.row0[j.nc] = r; j.row1[j.nc] = r + size; j.nc++;
            r += size; room = room - size > 0 ? room - size : share;
        }
    pool_run(mm_chunk, &j, j.nc);
}
static void mm_run(int n, const mat* const* W, float* const* Y, const int64_t* ld, int acc, const void* Xq,
                   const float* Xf, int64_t M) {
    mm_run_more(n, W, Y, ld, acc, Xq, Xf, M, NULL);
}
