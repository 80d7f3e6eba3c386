/* The shared-machine rule of a pass of pool jobs (llama_step.c's decode step, bert_forward.c's forward): when the
   caller spent over a third of its passes' time waiting for a worker that another process had preempted holding
   a chunk, judged over passes spanning window_ns, run the next SOLO_PASSES passes on the caller alone (one full
   core beats two contended ones), then try the workers again. One pass was the window before: on the Zen 4 VM a
   few milliseconds of another thread's spinning (an OpenMP pool's, after its parallel region) then sent most
   SmolLM2 F32 steps solo, at about half the speed (2026-12-05: 20.5 against 12 ms a step in the minutes the VM
   reads fast). Between pool_begin and pool_end; one rule per kind of pass (each kernel library its own). */
#pragma once
#include "mm_jobs.h"

#define SOLO_PASSES 32
typedef struct {
    int left;                   /* passes still to run alone */
    double win_ns, win_wait_ns; /* the window so far: passes' time, the caller's waiting in it */
    double window_ns;           /* how long a window the rule judges (0: each pass alone) */
    int64_t entered;            /* times the solo passes began */
} solo_rule;
#define SOLO_RULE_INIT {0, 0.0, 0.0, 50e6, 0}

static int solo_take(solo_rule* r) {  /* whether the next pass runs alone */
    if (r->left > 0) { r->left--; return 1; }
    return 0;
}
/* at a pass's start: whether it runs alone (the pool told so) */
static int solo_begin(solo_rule* r) {
    const int solo = solo_take(r);
    pool_solo(solo);
    return solo;
}
/* at its end (before pool_end): a pass of pass_ns on `threads` threads, the caller's waiting from pool_wait_ns */
static void solo_end(solo_rule* r, int was_solo, int threads, double pass_ns, double wait_ns) {
    if (was_solo || threads <= 1) return;
    r->win_ns += pass_ns;
    r->win_wait_ns += wait_ns;
    if (r->win_ns >= r->window_ns) {
        if (r->win_wait_ns > r->win_ns / 3) { r->left = SOLO_PASSES; r->entered++; }
        r->win_ns = r->win_wait_ns = 0;
    }
}

/* the rule over n made-up passes (tests): pass i took pass_ns[i], the caller waited wait_ns[i] of it (both
   ignored for a pass run alone); solo[i]: whether pass i ran alone; returns the times the solo passes began */
API int64_t solo_rule_replay(int n, const double* pass_ns, const double* wait_ns, int threads, double window_ns,
                             int* solo) {
    solo_rule r = SOLO_RULE_INIT;
    r.window_ns = window_ns;
    for (int i = 0; i < n; i++) {
        solo[i] = solo_take(&r);
        solo_end(&r, solo[i], threads, pass_ns[i], wait_ns[i]);
    }
    return r.entered;
}
