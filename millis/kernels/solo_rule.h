/* The shared-machine rule of a pass of pool jobs (llama_step.c's decode step, bert_forward.c's forward): when the
   caller spent over a third of its passes' time waiting for a worker that another process had preempted holding
   a chunk, judged over passes spanning window_ns, run the passes of the next SOLO_NS on the caller alone (one full
   core beats two contended ones), then try the workers again. One pass was the window before: on the Zen 4 VM a
   few milliseconds of another thread's spinning (an OpenMP pool's, after its parallel region) then sent most
   SmolLM2 F32 steps solo, at about half the speed (2026-12-05: 20.5 against 12 ms a step in the minutes the VM
   reads fast). Between pool_begin and pool_end; one rule per kind of pass (each kernel library its own). */
#pragma once
#include "mm_jobs.h"

#include <time.h>

/* A span of solo passes is time, not a count: 32 passes (the rule before) were 0.3 s of decode steps but 1.9 s of
   BERT-base b1xs128 forwards (58 ms alone, 29 with the workers) after a 0.5 s hog had long ended; and in the encoder
   bench a process caught by a peer's spinning threads ran half its rounds solo, 2x their time. Each span that the
   next window (the probe) finds contended again is twice the last, up to SOLO_MAX_NS; a quiet window resets it. */
#define SOLO_NS 100e6
#define SOLO_MAX_NS 1.6e9
#define SOLO_IDLE_NS 1e9  /* a gap this long without passes starts over: window and span (a new episode) */
typedef struct {
    double until_ns;            /* passes that start before this (CLOCK_MONOTONIC, ns) run alone */
    double span_ns;             /* the next solo span: SOLO_NS, doubled while contended */
    double last_ns;             /* when the last pass ended (0: none yet) */
    double win_ns, win_wait_ns; /* the window so far: passes' time, the caller's waiting in it */
    double window_ns;           /* how long a window the rule judges (0: each pass alone) */
    int64_t entered;            /* times the solo passes began */
} solo_rule;
#define SOLO_RULE_INIT {0.0, SOLO_NS, 0.0, 0.0, 0.0, 50e6, 0}

static double solo_now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
static int solo_take(const solo_rule* r, double now_ns) { return now_ns < r->until_ns; }  /* whether this pass runs alone */
/* at a pass's start: whether it runs alone (the pool told so) */
static int solo_begin(solo_rule* r) {
    const int solo = solo_take(r, solo_now_ns());
    pool_solo(solo);
    return solo;
}
/* at a pass's end (now_ns; before pool_end): a pass of pass_ns on `threads` threads, the caller's waiting from
   pool_wait_ns */
static void solo_judge(solo_rule* r, int was_solo, int threads, double pass_ns, double wait_ns, double now_ns) {
    if (r->last_ns > 0 && now_ns - pass_ns - r->last_ns > SOLO_IDLE_NS) { r->span_ns = SOLO_NS; r->win_ns = r->win_wait_ns = 0; }
    r->last_ns = now_ns;
    if (was_solo || threads <= 1) return;
    r->win_ns += pass_ns;
    r->win_wait_ns += wait_ns;
    if (r->win_ns >= r->window_ns) {
        if (r->win_wait_ns > r->win_ns / 3) {
            r->until_ns = now_ns + r->span_ns;
            r->span_ns = 2 * r->span_ns < SOLO_MAX_NS ? 2 * r->span_ns : SOLO_MAX_NS;
            r->entered++;
        } else {
            r->span_ns = SOLO_NS;
        }
        r->win_ns = r->win_wait_ns = 0;
    }
}
static void solo_end(solo_rule* r, int was_solo, int threads, double pass_ns, double wait_ns) {
    solo_judge(r, was_solo, threads, pass_ns, wait_ns, solo_now_ns());
}

/* the rule over n made-up passes from time 0 (tests): pass i began gap_ns[i] after the one before ended (NULL: back
   to back) and took pass_ns[i], the caller waited wait_ns[i] of it (both ignored for a pass run alone); solo[i]:
   whether pass i ran alone; returns the times the solo passes began */
API int64_t solo_rule_replay(int n, const double* pass_ns, const double* wait_ns, const double* gap_ns, int threads,
                             double window_ns, int* solo) {
    solo_rule r = SOLO_RULE_INIT;
    r.window_ns = window_ns;
    double t = 1.0;  /* (last_ns 0 means no pass yet) */
    for (int i = 0; i < n; i++) {
        t += gap_ns ? gap_ns[i] : 0.0;
        solo[i] = solo_take(&r, t);
        t += pass_ns[i];
        solo_judge(&r, solo[i], threads, pass_ns[i], wait_ns[i], t);
    }
    return r.entered;
}
