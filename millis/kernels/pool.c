/* A small thread pool for the forward pass: the caller leads, workers help, nobody waits at a barrier.

   pool_run(fn, ctx, total) runs fn(ctx, chunk) for chunk in [0, total) and returns when all are done.
   Chunks are taken one at a time from a shared counter by the caller and by whichever workers are
   awake; there is no barrier that every thread must reach. So when another process takes a core
   from one of our threads (a server shares its machine), the caller and the other workers take that
   thread's chunks instead of waiting for it: the step slows by the missing core, not by a scheduler
   time slice per op. A worker spins briefly for the next job, then sleeps on a futex.

   The counter holds (job << 32 | next chunk), and it works as a sequence lock over the job's fields
   (fn, ctx, total): the caller first closes it (chunk CLOSED), then writes the fields, then opens
   it at chunk 0. A worker reads the counter, then the fields, then claims a chunk by compare-and-swap
   on the value it read; the claim fails if the caller closed the counter meanwhile, so a worker that
   read another job's fields never runs a chunk with them, and jobs never mix (the pool self-test
   below caught a chunk run twice, or the caller returning early, when this was not so). */
#include "blockq.h"

#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef __x86_64__
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN 200000 /* pause loops (about a millisecond) a worker spins for the next job before it sleeps */

typedef void (*task_fn)(void* ctx, int64_t chunk);

static struct {
    pthread_mutex_t lock;           /* serializes pool_run callers and resizing */
    int n;                          /* workers running (threads - 1, fewer past MAX_THREADS or a failed start) */
    int want;                       /* the thread count last asked for (0: none yet): resize compares with it,
                                       not with n, which a capped or failed start leaves short for good */
    _Atomic int64_t started;        /* workers ever started (tests: pool_workers_started) */
    pthread_t th[MAX_THREADS];
    _Atomic uint32_t seq;           /* job number; workers wait for it to change */
    _Atomic uint64_t next;          /* job << 32 | next chunk */
    _Atomic int64_t done;           /* chunks finished in the current job */
    _Atomic int sleeping, stop;
    _Atomic(task_fn) fn;            /* the job's fields: written only while the counter is CLOSED */
    _Atomic(void*) ctx;
    _Atomic int64_t total;
    int solo;                       /* run jobs on the caller alone (the workers sleep) */
    int64_t wait_ns;                /* time the caller spent waiting for workers' chunks */
} P = {.lock = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void futex_wait(_Atomic uint32_t* a, uint32_t v) { syscall(SYS_futex, a, FUTEX_WAIT_PRIVATE, v, 0, 0, 0); }
static void futex_wake(_Atomic uint32_t* a) { syscall(SYS_futex, a, FUTEX_WAKE_PRIVATE, MAX_THREADS, 0, 0, 0); }

#define CLOSED 0xffffffffu  /* the counter's chunk while the caller writes a job's fields */

/* take and run chunks of job `job` until none is left */
static void work(uint32_t job) {
    uint64_t v = atomic_load(&P.next);
    for (;;) {
        const uint32_t chunk = (uint32_t)v;
        if ((uint32_t)(v >> 32) != job || chunk == CLOSED) return;
        const task_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        void* ctx = atomic_load_explicit(&P.ctx, memory_order_relaxed);
        const int64_t total = atomic_load_explicit(&P.total, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);  /* the fields are read before the claim below */
        if (chunk >= total) return;
        if (!atomic_compare_exchange_weak(&P.next, &v, v + 1)) continue;  /* v reloaded */
        fn(ctx, chunk);  /* the claim held: no new job had closed the counter, so the fields are this job's */
        atomic_fetch_add(&P.done, 1);
        v = atomic_load(&P.next);
    }
}

static __thread int tl_id;  /* 0: the caller; worker i: i + 1 */
int pool_thread_id(void) { return tl_id; }

/* ---- per-thread scratch ----
   Buffers a thread keeps between calls (attention scores, tiles' staging rows: the callers' pointers are
   __thread), grown as needed. A thread's go when it ends: resize() ends the workers whenever a caller asks for
   another thread count, and two models of different thread counts in one process used to leak every worker's
   buffers at each switch (MiniLM, 2 and 3 threads alternated: +14 MB of RSS in 1200 pairs of forwards); a
   caller's thread (a server's request thread) is not ours to end, so a pthread key's destructor frees its
   buffers as it exits (a tiny model called from a fresh thread each time kept every dead thread's). */
#define MAX_BUFFERS 16
static __thread void** tl_bufs[MAX_BUFFERS];
static __thread int64_t* tl_caps[MAX_BUFFERS];
static __thread int tl_nbufs;
static _Atomic int64_t g_buffer_bytes;  /* held by every thread of this library, for tests (pool_buffer_bytes) */
static pthread_key_t g_exit_key;  /* set (non-NULL) in a thread that holds buffers: its destructor frees them */
static pthread_once_t g_exit_once = PTHREAD_ONCE_INIT;
static void free_buffers(void);
static void exit_free(void* unused) { (void)unused; free_buffers(); }  /* the thread's __thread vars still live */
static void make_exit_key(void) { if (pthread_key_create(&g_exit_key, exit_free)) abort(); }
void* pool_buffer(void** buf, int64_t* cap, int64_t need) {  /* *buf, 64-byte aligned, of >= need bytes */
    if (*cap < need) {
        if (!*buf && tl_nbufs < MAX_BUFFERS) {
            if (!tl_nbufs) { pthread_once(&g_exit_once, make_exit_key); pthread_setspecific(g_exit_key, (void*)1); }
            tl_bufs[tl_nbufs] = buf; tl_caps[tl_nbufs++] = cap;
        }
        free(*buf);
        atomic_fetch_sub(&g_buffer_bytes, *cap);
        *buf = aligned_alloc(64, (need + 63) / 64 * 64);
        if (!*buf) abort();  /* as any other allocation failure in the process would end it */
        *cap = need;
        atomic_fetch_add(&g_buffer_bytes, need);
    }
    return *buf;
}
static void free_buffers(void) {  /* a thread's pool_buffer blocks, as it ends (twice is harmless) */
    for (int i = 0; i < tl_nbufs; i++) {
        free(*tl_bufs[i]);
        atomic_fetch_sub(&g_buffer_bytes, *tl_caps[i]);
        *tl_bufs[i] = NULL; *tl_caps[i] = 0;
    }
    tl_nbufs = 0;
}
API int64_t pool_buffer_bytes(void) { return atomic_load(&g_buffer_bytes); }
API int64_t pool_workers_started(void) { return atomic_load(&P.started); }

static void* worker(void* arg) {
    tl_id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&P.seq);
    while (!atomic_load(&P.stop)) {
        uint32_t s;
        int spins = 0;
        while ((s = atomic_load(&P.seq)) == seen && !atomic_load(&P.stop)) {
            if (++spins < SPIN) { RELAX(); continue; }
            atomic_fetch_add(&P.sleeping, 1);
            if (atomic_load(&P.seq) == seen && !atomic_load(&P.stop)) futex_wait(&P.seq, seen);
            atomic_fetch_sub(&P.sleeping, 1);
            spins = 0;
        }
        seen = s;
        work(s);
    }
    free_buffers();
    return 0;
}

static void resize(int threads) {  /* with P.lock held */
    if (threads == P.want) return;
    if (P.n) {
        atomic_store(&P.stop, 1); atomic_fetch_add(&P.seq, 1); futex_wake(&P.seq);
        for (int i = 0; i < P.n; i++) pthread_join(P.th[i], 0);
        atomic_store(&P.stop, 0); P.n = 0;
    }
    P.want = threads;
    /* into th[n]: after a failed start, th[0..n) still holds exactly the running workers' handles */
    for (int i = 0; i < threads - 1 && i < MAX_THREADS; i++)
        if (pthread_create(&P.th[P.n], 0, worker, (void*)(intptr_t)(P.n + 1)) == 0) { P.n++; P.started++; }
}

/* each pass starts with every thread (a solo pass's flag does not reach the next caller: packing at a model's load) */
void pool_begin(int threads) {
    pthread_mutex_lock(&P.lock); resize(threads < 1 ? 1 : threads); P.wait_ns = 0; P.solo = 0;
}
void pool_end(void) { pthread_mutex_unlock(&P.lock); }
void pool_solo(int solo) { P.solo = solo; }       /* between pool_begin and pool_end */
int64_t pool_wait_ns(void) { return P.wait_ns; }  /* since pool_begin */

/* between pool_begin and pool_end */
void pool_run(task_fn fn, void* ctx, int64_t total) {
    if (total <= 0) return;
    if (P.n == 0 || P.solo || total == 1) { for (int64_t c = 0; c < total; c++) fn(ctx, c); return; }
    const uint32_t job = atomic_load(&P.seq) + 1;
    atomic_store(&P.next, (uint64_t)job << 32 | CLOSED);  /* claims on the old job's value fail from now */
    atomic_thread_fence(memory_order_seq_cst);
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&P.total, total, memory_order_relaxed);
    atomic_store(&P.done, 0);
    atomic_store(&P.next, (uint64_t)job << 32);  /* opens it (seq_cst: after the fields above) */
    atomic_store(&P.seq, job);  /* publishes the job (seq_cst: after the fields above) */
    if (atomic_load(&P.sleeping)) futex_wake(&P.seq);
    work(job);
    if (atomic_load(&P.done) < total) {  /* a worker still holds a chunk (or was preempted holding one) */
        const int64_t t0 = now_ns();
        while (atomic_load(&P.done) < total) RELAX();
        P.wait_ns += now_ns() - t0;
    }
}

/* ---- a check of the pool's one promise: every chunk of every job runs exactly once, before
   pool_run returns. Jobs of 1..5 chunks alternate (a stale worker that mixes two jobs runs a
   chunk twice or lets the caller return early); returns the chunks run other than once. */
typedef struct { _Atomic int32_t runs[8]; } selftest_job;
static void selftest_chunk(void* p, int64_t c) {
    selftest_job* j = p;
    for (volatile int i = 0; i < 50; i++) {}  /* a little work, so that threads overlap */
    atomic_fetch_add(&j->runs[c], 1);
}
API int64_t pool_selftest(int threads, int64_t jobs) {
    int64_t bad = 0;
    pool_begin(threads);
    for (int64_t n = 0; n < jobs; n++) {
        selftest_job j[2];
        const int total = 2 + (int)(n % 4);
        for (int i = 0; i < 8; i++) atomic_store(&j[n % 2].runs[i], 0);
        pool_run(selftest_chunk, &j[n % 2], total);
        for (int i = 0; i < 8; i++) bad += atomic_load(&j[n % 2].runs[i]) != (i < total);
    }
    pool_end();
    return bad;
}
