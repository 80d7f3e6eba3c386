/* bert_forward.c's token split: where the parts' tokens are cut, and each thread's measured speed that places the
   cuts. A part's time grows with its tokens (the same matrices, LayerNorms and attention per token), so equal
   counts leave the faster thread waiting when one core runs slower: Zen 4 VM, bge-small b1xs128, in the VM's
   spells where one vCPU ran its matmuls 8-35% slower than the other (its part 9.4-9.6 ms against 8.5), the main
   thread waited ~1 ms a forward. Each forward's parts are timed (per thread: tokens a second, relative to the
   others), an average over forwards sets the next shares, and a cut moves only where the share asks for half a
   key unit or more past the even cut: in quiet minutes the cuts stay even. The same bits wherever the cut falls:
   a row's ops never read another row. Included by bert_forward.c. */
#pragma once
#include <stdatomic.h>

/* per pool thread: its speed relative to the others, an average over forwards, stored less 1 (zero: even) */
static _Atomic double g_speed_less1[MAX_PARTS];
static _Atomic int g_adapt = 1;  /* 0: even shares whatever was measured */
#define SPEED_KEEP 0.75  /* of the average a forward keeps (4 forwards to follow a change) */
#define SPEED_MIN 0.5    /* a thread's share is not cut below half the even one */

static double speed_of(int t) { return 1.0 + atomic_load(&g_speed_less1[t]); }
static void set_speed(int t, double v) { atomic_store(&g_speed_less1[t], v - 1.0); }
static double thread_speed(int t) { return atomic_load(&g_adapt) ? speed_of(t) : 1.0; }  /* what the cuts use */

/* part q of P: tokens [tb[q], tb[q + 1]); part q runs on pool thread q (mm_jobs.h's parts_chunk claims its own
   first), so its share is thread q's speed over the sum. The cuts move to a sequence's end within an eighth of a
   part, and a cut inside a sequence goes to the nearest multiple of `unit` keys from its start (the keys one part
   packs together); nearest, not up: a share a hair over even keeps the even cut */
static void split_tokens(int64_t n, int64_t n_seq, const int32_t* start, int P, int unit, int64_t* tb) {
    double sum = 0.0, acc = 0.0;
    for (int q = 0; q < P; q++) sum += thread_speed(q);
    tb[0] = 0; tb[P] = n;
    int64_t sq = 0;
    for (int q = 1; q < P; q++) {
        acc += thread_speed(q - 1);
        const int64_t cut = (int64_t)(n * acc / sum + 0.5), slack = n / (8 * P);
        while (sq < n_seq && start[sq + 1] <= cut) sq++;  /* the sequence holding token `cut` */
        const int64_t lo = start[sq], hi = sq < n_seq ? start[sq + 1] : n;
        int64_t at = cut;
        if (cut - lo <= hi - cut) { if (cut - lo <= slack) at = lo; } else if (hi - cut <= slack) at = hi;
        if (at > lo && at < hi && (at - lo) % unit) at = lo + (at - lo + unit / 2) / unit * unit;
        if (at > hi) at = hi;
        tb[q] = at < tb[q - 1] ? tb[q - 1] : at;
    }
}

/* after a forward: part q's tokens, the seconds its layers took and the thread that ran them (-1: none) -> each
   thread's tokens a second over the mean of those measured, into its average */
static void update_speeds(int P, const int64_t* tb, const double* secs, const int* tid) {
    double rate[MAX_PARTS], mean = 0.0;
    int m = 0, seen[MAX_PARTS] = {0};
    for (int q = 0; q < P; q++) {
        rate[q] = 0.0;
        if (tid[q] < 0 || tid[q] >= P || tb[q + 1] <= tb[q] || secs[q] <= 0.0 || seen[tid[q]]++) continue;
        rate[q] = (double)(tb[q + 1] - tb[q]) / secs[q];
        mean += rate[q];
        m++;
    }
    if (m < 2) return;  /* one thread ran every part: nothing to compare */
    mean /= m;
    for (int q = 0; q < P; q++) {
        if (rate[q] <= 0.0) continue;
        double v = SPEED_KEEP * speed_of(tid[q]) + (1.0 - SPEED_KEEP) * rate[q] / mean;
        v = v < SPEED_MIN ? SPEED_MIN : v > 1.0 / SPEED_MIN ? 1.0 / SPEED_MIN : v;
        set_speed(tid[q], v);
    }
}

/* the cuts follow the threads' speeds (1, the default) or stay even (0; tests and A/B runs); -1 asks */
API int bert_adaptive_split(int on) {
    if (on == 0 || on == 1) atomic_store(&g_adapt, on);
    return atomic_load(&g_adapt);
}
/* threads' speeds: n values read into out (when not NULL), then set from in (when not NULL) */
API void bert_thread_speeds(int n, double* out, const double* in) {
    for (int i = 0; i < n && i < MAX_PARTS; i++) {
        if (out) out[i] = speed_of(i);
        if (in) set_speed(i, in[i]);
    }
}
/* split_tokens for tests: P parts of n tokens in n_seq sequences (start: n_seq + 1 offsets) into tb (P + 1) */
API void bert_token_cuts(int64_t n, int64_t n_seq, const int32_t* start, int P, int unit, int64_t* tb) {
    if (P >= 1 && P <= MAX_PARTS && unit >= 1) split_tokens(n, n_seq, start, P, unit, tb);
}
