/* The packed kernels: every block format times activation blocks (and F32 times fp32 rows), 8 rows at a
   time in packed.h's layout (written by repack.c at load); see packed.h for the layout and numerics. */
#include "packed.h"
#include "packed512.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <string.h>

void* pool_buffer(void** buf, int64_t* cap, int64_t need);  /* pool.c: this thread's scratch */
#endif

/* How decode (1 token) reads a matrix's rows (a thread's chunk of them), blockq.h's READ_*:
   READ_ONE, one group of 8 rows after another: one sequential stream (q8_stream1, group_dot, float_tile);
   READ_QUAD (AVX-512 Q8_0 / Q7_0 / F32), four adjacent groups at once (packed512.h's 32-row tiles): four short
   streams, a group (K values) long each;
   READ_SPREAD, the chunk's groups in four equal runs, the runs read side by side (spread_rows): four streams as
   long as a quarter of the chunk each.
   Measured, SmolLM2 and Llama-1B-shaped decode against llama.cpp: on Zen 5 (2026-12-01) READ_QUAD took the 1B
   Q8_0 decode from 0.82x to 0.68x llama.cpp's time; on Zen 4 (2026-12-02) READ_ONE took it from 0.84-0.92x to
   0.69x, and the F32 decode from 0.96-1.07x to 0.88-0.94x. On Sapphire Rapids (2026-12-03) one core reads far
   more from several long streams than from one (a plain sum of 1 GiB at 2 threads: 20 GB/s as one stream per
   thread, 24-30 as four), and READ_SPREAD took the Q4_0 matrix-vector product over 300 MB of weights from
   17 to 28 GB/s, Q8_0 from 19 to 27, Q4_K / Q5_0 / Q6_K by 1.16-1.29x (those spend more work per byte).
   So READ_QUAD on AMD family 26 (Zen 5), READ_SPREAD on Intel (family 6), READ_ONE elsewhere. On Zen 4
   (2026-12-03, bench/decode_streams.py, time over READ_ONE's) READ_SPREAD read no faster: 1B Q4_0 1.15,
   Q8_0 0.95 [0.85-1.10], SmolLM2 F32 1.03, Q4_K_M 1.22; READ_QUAD 1.09-1.14. AVX2 builds have no 32-row
   tiles (READ_QUAD reads as READ_ONE there) and no F32 spread. Same sums in every mode: only the speed differs. */
static int cpu_family(void) {
    int family = 0;
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) family = (a >> 8 & 0xF) == 0xF ? 15 + (a >> 20 & 0xFF) : a >> 8 & 0xF;
#endif
    return family;
}
static _Atomic int g_streams;  /* 0 until first asked; atomic: pool workers read it as a caller sets it */
API int decode_streams(int n) {  /* n = READ_ONE, READ_QUAD or READ_SPREAD sets the rule (tests); returns the one in force */
    if (n == READ_ONE || n == READ_QUAD || n == READ_SPREAD) g_streams = n;
    if (!g_streams) {
        const int family = cpu_family();
        g_streams = family == 26 ? READ_QUAD : family == 6 ? READ_SPREAD : READ_ONE;
    }
    return g_streams;
}

/* Decode's software prefetch (blockq.h's pf_distance): each stream's lines this many bytes ahead, or none (0).
   The kernels were written with 1024 (on Zen 5, 2026-11-30; 512-4096 measured alike). On Zen 4 (2026-12-05, the
   VM of the earlier Zen 4 figures) the hardware prefetchers alone read faster: bench/decode_streams.py, 7 rounds,
   1024 bytes ahead took 1.12x the time of none on the 1B Q4_0 decode, 1.13x on Q8_0, 1.02x on SmolLM2 F32 and
   1.07x on Q4_1 (bench/results/decode_streams_zen4_prefetch.json); alike when the VM's bandwidth is low. So none
   on AMD family 25 with AVX-512 (Zen 4), 1024 elsewhere. */
_Atomic int g_pf_bytes = -1;  /* -1 until first asked */
API int decode_prefetch(int n) {  /* n >= 0 sets the distance (tests, A/B runs); returns the one in force */
    if (n >= 0) g_pf_bytes = n;
    if (g_pf_bytes < 0) g_pf_bytes = cpu_family() == 25 && HAVE_AVX512 ? 0 : 1024;
    return g_pf_bytes;
}

static inline int streams_now(void) { return g_streams ? g_streams : decode_streams(0); }

#ifdef __AVX2__
#include "packed_dot.h"
#include "packed_q7.h"
#include "packed_q8.h"

/* out[t] lane r = row r's sum over the payload's 32 values of w * x[t], values 0..15 weighted by the
   int16 multipliers mlo (lanes 2r, 2r+1 for row r), 16..31 by mhi when `weighted` (K-quants' sub-block
   scales), else unweighted (mlo = mhi = 1); kind 4 or 5 (Q8_0 / Q7_0: q8_stream1, q8_tile4; Q6_K: q6k_dot). */
AI void payload_dot(const int kind, const uint8_t* q, const xblock* const* x, const int T, const int weighted,
                    __m256i mlo, __m256i mhi, __m256i* out) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256i lo[4], hi[4];
    for (int t = 0; t < T; t++) lo[t] = hi[t] = _mm256_setzero_si256();
    for (int p = 0; p < 4; p++) {  /* steps p (values 4p..) and p + 4 (values 16 + 4p..) */
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(q + 32 * p));
        __m256i wl = _mm256_and_si256(raw, m4), wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        if (kind == 5) {
            wl = _mm256_or_si256(wl, _mm256_and_si256(bits32(q + 128 + 4 * p), _mm256_set1_epi8(0x10)));
            wh = _mm256_or_si256(wh, _mm256_and_si256(bits32(q + 144 + 4 * p), _mm256_set1_epi8(0x10)));
        }
        for (int t = 0; t < T; t++) {
            if (HAVE_VNNI && !weighted) {  /* int32 sums straight away: no int16 stage, no madd */
                lo[t] = dot_u8s8(lo[t], wl, bcast4(x[t]->q + 4 * p));
                hi[t] = dot_u8s8(hi[t], wh, bcast4(x[t]->q + 16 + 4 * p));
                continue;
            }
            lo[t] = _mm256_add_epi16(lo[t], _mm256_maddubs_epi16(wl, bcast4(x[t]->q + 4 * p)));
            hi[t] = _mm256_add_epi16(hi[t], _mm256_maddubs_epi16(wh, bcast4(x[t]->q + 16 + 4 * p)));
        }
    }
    for (int t = 0; t < T; t++)
        out[t] = HAVE_VNNI && !weighted ? _mm256_add_epi32(lo[t], hi[t])
                                        : _mm256_add_epi32(_mm256_madd_epi16(lo[t], mlo), _mm256_madd_epi16(hi[t], mhi));
}

/* One unit (a block, or a K-quant super-block) u of a group of 8 rows at b against T tokens (x: token t's blocks
   at x + t * xs): acc[t] += its scaled sums, off[t] += its offsets' share (Q4_1, Q5_1, K-quant mins). */
AI void unit_dot(const int type, const int T, const uint8_t* b, int64_t u, const xblock* x, int64_t xs, __m256* acc,
                 __m256* off) {
    const int kind = kind_of(type), head = head_bytes(type), pb = payload_bytes(kind);
    const int zero = type == T_Q6_K ? 0 : stored_offset(type);  /* Q6_K's 32 comes off inside q6k_dot */
    const int has_min = type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
    const __m256i one = _mm256_set1_epi16(1);
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));
    const xblock* xb[4];
    __m256i is[4];
    if (!is_super(type)) {
        for (int t = 0; t < T; t++) xb[t] = x + t * xs + u;
        payload_dot(kind, b + head, xb, T, 0, one, one, is);
        for (int t = 0; t < T; t++) {
            __m256i i = is[t];
            if (zero) i = _mm256_sub_epi32(i, _mm256_set1_epi32(zero * xb[t]->sum));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dv, _mm256_set1_ps(xb[t]->d)), acc[t]);
            if (has_min)
                off[t] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 16))),
                                         _mm256_set1_ps(xb[t]->s), off[t]);
        }
        return;
    }
    __m256 mo[4];
    for (int t = 0; t < T; t++) mo[t] = _mm256_setzero_ps();
    for (int j = 0; j < 8; j++) {
        if (T == 1 && PF_BYTES)  /* decode: the unit PF_BYTES ahead, an eighth per sub-block (a whole unit's 27 lines at once
                        stalled on the core's fill buffers) */
            for (int64_t o = j * unit_bytes(type) / 8 / 64 * 64; o < (j + 1) * unit_bytes(type) / 8; o += 64)
                _mm_prefetch((const char*)b + PF_BYTES + o, _MM_HINT_T0);
        for (int t = 0; t < T; t++) xb[t] = x + t * xs + 8 * u + j;
        __m256i mlo, mhi;
        if (type == T_Q6_K) { mlo = pairs16(load8s(b + 16 + 16 * j)); mhi = pairs16(load8s(b + 24 + 16 * j)); }
        else mlo = mhi = pairs16(load8(b + 32 + 8 * j));
        if (type == T_Q6_K) q6k_dot(b + head + j * pb, xb, T, mlo, mhi, is);
        else payload_dot(kind, b + head + j * pb, xb, T, 1, mlo, mhi, is);
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(dv, _mm256_set1_ps(xb[t]->d)), acc[t]);
        if (has_min) {
            const __m256 mf = _mm256_cvtepi32_ps(load8(b + 96 + 8 * j));
            for (int t = 0; t < T; t++) mo[t] = _mm256_fmadd_ps(mf, _mm256_set1_ps(xb[t]->s), mo[t]);
        }
    }
    if (has_min) {  /* value = d * sc * w - dmin * m: the mins' share, once per super-block */
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 16)));
        for (int t = 0; t < T; t++) off[t] = _mm256_fnmadd_ps(dmin, mo[t], off[t]);
    }
}

/* One group of 8 rows against T tokens (x: token t's blocks at x + t * xs): out[8 * t + r]. */
AI void group_dot(const int type, const int T, const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {
    const int64_t ub = unit_bytes(type);
    __m256 acc[4], off[4];
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int64_t u = 0; u < nu; u++) {
        if (T == 1 && !is_super(type)) prefetch_unit(g + u * ub, ub);  /* super-blocks: inside unit_dot */
        unit_dot(type, T, g + u * ub, u, x, xs, acc, off);
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(acc[t], off[t]));
}
/* Decode: 4 groups (g + k * gs) against 1 token, read as 4 streams side by side: out[8 * k + r], group_dot's
   sums per group. */
AI void group_spread(const int type, const uint8_t* g, int64_t gs, int64_t nu, const xblock* x, float* out) {
    const int64_t ub = unit_bytes(type);
    __m256 acc[4], off[4];
    for (int k = 0; k < 4; k++) acc[k] = off[k] = _mm256_setzero_ps();
    for (int64_t u = 0; u < nu; u++)
        for (int k = 0; k < 4; k++) {
            if (!is_super(type)) prefetch_unit(g + k * gs + u * ub, ub);
            unit_dot(type, 1, g + k * gs + u * ub, u, x, 0, acc + k, off + k);
        }
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * k, _mm256_add_ps(acc[k], off[k]));
}

#define MTILE 64 /* tokens per pass over a chunk's groups (the groups stay in cache meanwhile) */
#include "packed_f32.h"  /* float_tile, float_rows */

typedef void (*group_fn)(const uint8_t*, int64_t, const xblock*, int64_t, float*);
typedef void (*spread_fn)(const uint8_t*, int64_t, int64_t, const xblock*, float*);
#define GROUP_FNS(NAME, TYPE)                                                                           \
    static void NAME##_s(const uint8_t* g, int64_t gs, int64_t nu, const xblock* x, float* out) {      \
        group_spread(TYPE, g, gs, nu, x, out); }                                                        \
    static void NAME##_1(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {      \
        group_dot(TYPE, 1, g, nu, x, xs, out); }                                                        \
    static void NAME##_4(const uint8_t* g, int64_t nu, const xblock* x, int64_t xs, float* out) {      \
        group_dot(TYPE, 4, g, nu, x, xs, out); }
GROUP_FNS(g_q4_0, T_Q4_0) GROUP_FNS(g_q4_1, T_Q4_1)
GROUP_FNS(g_q5_0, T_Q5_0)
GROUP_FNS(g_q5_1, T_Q5_1) GROUP_FNS(g_q4_k, T_Q4_K) GROUP_FNS(g_q5_k, T_Q5_K) GROUP_FNS(g_q6_k, T_Q6_K)

static void group_fns(int type, group_fn* f1, group_fn* f4, spread_fn* fs) {
    *fs = 0;
    switch (type) {
        case T_Q8_0: *f1 = q8_0_1; *f4 = q8_0_4; *fs = q8_0_s; return;
        case T_Q7_0: case T_Q7_A7: *f1 = q7_0_1; *f4 = q7_0_4; *fs = Q7_SIGNED ? 0 : q7_0_s; return;
        case T_Q4_0: *f1 = g_q4_0_1; *f4 = g_q4_0_4; *fs = g_q4_0_s; return;
        case T_Q4_1: *f1 = g_q4_1_1; *f4 = g_q4_1_4; *fs = g_q4_1_s; return;
        case T_Q5_0: *f1 = g_q5_0_1; *f4 = g_q5_0_4; *fs = g_q5_0_s; return;
        case T_Q5_1: *f1 = g_q5_1_1; *f4 = g_q5_1_4; *fs = g_q5_1_s; return;
        case T_Q4_K: *f1 = g_q4_k_1; *f4 = g_q4_k_4; *fs = g_q4_k_s; return;
        case T_Q5_K: *f1 = g_q5_k_1; *f4 = g_q5_k_4; *fs = g_q5_k_s; return;
        case T_Q6_K: *f1 = g_q6_k_1; *f4 = g_q6_k_4; *fs = g_q6_k_s; return;
        default: *f1 = g_q6_k_1; *f4 = g_q6_k_4; return;
    }
}

/* decode (1 token): the chunk's groups in 4 equal runs read side by side, one stream each */
static int spread_rows(const mat* W, int64_t n0, int64_t n1, const xblock* X, float* Y, int acc, group_fn f1,
                       spread_fn fs) {
    if (!fs) return 0;
    const int64_t gb = units(W) * unit_bytes(W->type), g0 = n0 / 8, ng = (n1 + 7) / 8 - g0, q = ng / 4, nu = units(W);
    for (int64_t i = 0; i < q; i++) {
        float out[32];
        const uint8_t* gp = W->data + (g0 + i) * gb;
        fs(gp, q * gb, nu, X, out);
        for (int k = 0; k < 4; k++) store_group(Y, 0, 0, 1, g0 + i + k * q, n1, out + 8 * k, 32, acc);
    }
    for (int64_t g = g0 + 4 * q; g < g0 + ng; g++) {
        float out[8];
        f1(W->data + g * gb, nu, X, 0, out);
        store_group(Y, 0, 0, 1, g, n1, out, 8, acc);
    }
    return 1;
}

static int g_row_pf = 1;
/* the int7-row tiles' prefetch (row_panel512's next slab; q7s_panel's next panel on AVX2): 0 / 1 sets it (tests,
   A/B runs), -1 asks; 1 when in force */
API int row_prefetch(int want) {
    if (want == 0 || want == 1) g_row_pf = want;
    return g_row_pf;
}
#if HAVE_AVX512
/* int7-row (T_Q7_ROW / ROW8) on AVX-512: groups g .. g + span - 1 (span 2 or 4: 16 or 32 rows at gp) x tokens
   [m0, m1) (X: token m0's blocks; at most MTILE tokens) in tiles of up to 6 (packed512.h's q7r_tile512).
   K runs in slabs of at most SLAB_UNITS units: a slab of the panel (32 rows x 768 values, 27 KB) stays in L1
   while every token tile reads it (BERT-base's down matrix, K 3072, read its 110 KB panel from L2 once per
   tile), the int32 sums carried from slab to slab in `part`: the same sums, so the same bits.
   Meanwhile the next slab (this panel's next, or the next panel's first) is prefetched into L2, a share per
   call spread over its units, and a chunk's first slab all at once: at a few tokens the weights come from
   memory, and one stream read on demand left the multiplies waiting (Zen 4, BERT-base int7-row-a8, one thread,
   its 48 matrices in turn at 16 tokens: 0.75x the time with the prefetch; the b1xs16 forward at 2 threads
   0.91x, bge-small 0.94x). */
#define SLAB_UNITS 24
static void prefetch_bytes(const uint8_t* p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T1);
}
/* the last token tile's rows and `more`'s (packed_rows_more), copied into one run of rows X: rows [0, main) are Y's
   rows from m (added to when acc), the rest more's (written into Y2): a part tile of main rows takes the residual
   rows beside it (MiniLM b1xs16, a part of 8 tokens and 1 residual row: tiles 6 + 3, not 6 + 2 and then 1) */
typedef struct { const xblock* X; int64_t rows, main, m; float* Y2; int64_t ldy2; } staged_rows;
#define STAGED_MORE 12  /* more rows than this go in a pass of their own (row_more) */
static void row_panel512(const mat* W, int span, const uint8_t* gp, int64_t gb, int64_t nu, int64_t g, int64_t n0,
                         int64_t n1, const xblock* X, int64_t nbx, int64_t m0, int64_t m1, float* Y, int64_t ldy, int acc,
                         const staged_rows* sr) {
    const int shift = __builtin_ctz(act_offset(W->type));  /* log2 of the activations' 64 / 128 */
    const int64_t ub = unit_bytes(W->type);
    /* the tiles that share the prefetch of the next slab: the tokens', or the staged rows' when there are no others
       (1 to 5 tokens: their only tile is staged) */
    const int staged_only = m1 == m0 && sr;
    const int64_t tiles = staged_only ? (sr->rows + 5) / 6 : m1 > m0 ? (m1 - m0 + 5) / 6 : 1,
                  slabs = (nu + SLAB_UNITS - 1) / SLAB_UNITS, su = (nu + slabs - 1) / slabs;
    const int next_panel = (g + 2 * span) * 8 <= n1;  /* the chunk has another whole panel */
    if (g_row_pf && g * 8 == n0)  /* the chunk's first slab: all its lines at once, not one stream's at a time */
        for (int i = 0; i < span / 2; i++) prefetch_bytes(gp + 2 * i * gb, 2 * su * ub);
    int32_t part[(MTILE + 5) / 6][12 * 16];  /* per tile: 12 accumulators, 16 lanes each */
    int32_t part2[(5 + STAGED_MORE + 5) / 6][12 * 16];  /* the staged rows' tiles */
    float out[192];
    const int whole = (g + span) * 8 <= n1;  /* every row of the panel in the chunk: the tiles write Y themselves */
    for (int64_t sl = 0; sl < slabs; sl++) {
        const int64_t u0 = sl * su, u1 = u0 + su < nu ? u0 + su : nu;
        /* the slab after this one (this panel's next, or the next panel's first), spread over this slab's calls */
        const uint8_t* target = !g_row_pf ? NULL : sl + 1 < slabs ? gp + 2 * u1 * ub : next_panel ? gp + span * gb : NULL;
        const int64_t share = (2 * su * ub + tiles - 1) / tiles, pstep = (share / (u1 - u0) + 63) / 64 * 64;
        for (int64_t m = m0, tile = 0; m < m1; tile++) {
            const int T = m1 - m < 6 ? (int)(m1 - m) : 6;
            Q7R512_FNS[span / 2 - 1][T - 1](shift, target ? target + tile * share : NULL, pstep, gp, gb, u0, u1,
                                            X + (m - m0) * nbx, nbx, part[tile], sl == 0, sl == slabs - 1, out,
                                            whole ? Y + m * ldy + g * 8 : NULL, ldy, acc);
            if (sl == slabs - 1 && !whole)
                for (int i = 0; i < span; i++) store_group(Y, ldy, m, T, g + i, n1, out + 8 * i, 32, acc);
            m += T;
        }
        for (int64_t s = 0, k = 0; sr && s < sr->rows; k++) {  /* the same tiles, through out */
            const int T = sr->rows - s < 6 ? (int)(sr->rows - s) : 6;
            Q7R512_FNS[span / 2 - 1][T - 1](shift, staged_only && target ? target + k * share : NULL, pstep, gp, gb, u0,
                                            u1, sr->X + s * nbx, nbx, part2[k], sl == 0, sl == slabs - 1, out, NULL,
                                            ldy, acc);
            if (sl == slabs - 1) {
                const int nm = sr->main - s <= 0 ? 0 : sr->main - s < T ? (int)(sr->main - s) : T;  /* Y's rows */
                for (int i = 0; i < span; i++) {
                    store_group(Y, ldy, sr->m + s, nm, g + i, n1, out + 8 * i, 32, acc);
                    store_group(sr->Y2, sr->ldy2, s + nm - sr->main, T - nm, g + i, n1, out + 32 * nm + 8 * i, 32, 0);
                }
            }
            s += T;
        }
    }
}
#endif

/* a row type's panel (span groups from g) against `more`'s rows, written into its Y: packed_rows' tiles */
static void row_more(const mat* W, int span, const uint8_t* gp, int64_t gb, int64_t nu, int64_t g, int64_t n0,
                     int64_t n1, int64_t nbx, const more_rows* more) {
    const xblock* X = more->X;
    for (int64_t m0 = 0; m0 < more->M; m0 += MTILE) {
        const int64_t m1 = m0 + MTILE < more->M ? m0 + MTILE : more->M;
#if HAVE_AVX512
        if (span >= 2) {
            row_panel512(W, span, gp, gb, nu, g, n0, n1, X + m0 * nbx, nbx, m0, m1, more->Y, more->ldy, 0, NULL);
            continue;
        }
#else
        (void)n0;
#endif
        Q7S_FNS[q7s_kind(W->type)][span - 1](gp, gp + (span - 1) * gb, nu, X, nbx, m0, m1, more->Y, more->ldy, g, n1, 0, NULL, 0);
    }
}

void packed_rows(const mat* W, int64_t n0, int64_t n1, const void* Xv, const float* Xf, int64_t M, float* Y,
                 int64_t ldy, int acc) {
    packed_rows_more(W, n0, n1, Xv, Xf, M, Y, ldy, acc, NULL);
}

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1) (n0 a multiple of 8), m < M: W packed. Xv: the
   activation blocks (quantized types; x16blocks for T_Q8_0_X16), Xf: fp32 rows (F32). more (NULL: none): a row
   type's further rows (blockq.h), each panel's in the first token pass right after the main rows' */
void packed_rows_more(const mat* W, int64_t n0, int64_t n1, const void* Xv, const float* Xf, int64_t M, float* Y,
                      int64_t ldy, int acc, const more_rows* more) {
    if (W->type == T_F32) { float_rows(W, n0, n1, Xf, M, Y, ldy, acc); return; }
    if (W->type == T_Q8_0_X16) { packed16_rows(W, n0, n1, Xv, M, Y, ldy, acc); return; }
    if (W->type == T_BF16_PAIRS) { bf16p_rows(W, n0, n1, Xv, M, Y, ldy, acc); return; }
    const xblock* X = Xv;
    group_fn f1, f4;
    spread_fn fs;
    group_fns(W->type, &f1, &f4, &fs);
    if (!more && M == 1 && streams_now() == READ_SPREAD && spread_rows(W, n0, n1, X, Y, acc, f1, fs)) return;
    const int64_t nu = units(W), gb = nu * unit_bytes(W->type), nbx = W->cols / QK;
    int staged = 0;
#if HAVE_AVX512
    staged_rows sr = {0};
    if (more && is_row_type(W->type) && more->M <= STAGED_MORE && M > 0) {  /* the last tile's rows and more's */
        static __thread void* buf;
        static __thread int64_t cap;
        const int64_t rest = (M - (M - 1) / MTILE * MTILE) % 6;  /* the last chunk's part tile */
        xblock* st = pool_buffer(&buf, &cap, (int64_t)sizeof(xblock) * (rest + more->M) * nbx);
        memcpy(st, X + (M - rest) * nbx, sizeof(xblock) * rest * nbx);
        memcpy(st + rest * nbx, more->X, sizeof(xblock) * more->M * nbx);
        sr = (staged_rows){st, rest + more->M, rest, M - rest, more->Y, more->ldy};
        staged = 1;
    }
#endif
    for (int64_t m0 = 0; m0 < M; m0 += MTILE) {
        const int64_t m1 = m0 + MTILE < M ? m0 + MTILE : M;
        for (int64_t g = n0 / 8; g * 8 < n1;) {
            /* AVX-512, Q8_0 / Q7_0: 4 groups x 6 tokens (32-row tile), 2 groups x 4 tokens (16-row tile);
               Q8_0 / Q7_0 also 4 groups x 1 token where decode_streams is 4; Q4_0 / Q4_1: 2 groups x 4 tokens
               (their 1-token rows stay on the 8-row kernel: a 4-stream Q4 tile measured slower on the 1B Q4_0
               decode on Zen 5, 0.83x llama.cpp's time against 0.75x); Q4_K / Q6_K: 2 groups x 4 tokens
               (qk_tile16x4); T_Q7_ROW / ROW8: 4 or 2 groups x up to 6 tokens */
            const int q8 = HAVE_AVX512 && (W->type == T_Q8_0 || W->type == T_Q7_0 || W->type == T_Q7_A7);
            const int q4 = HAVE_AVX512 && (W->type == T_Q4_0 || W->type == T_Q4_1);
            const int qk = HAVE_AVX512 && (W->type == T_Q4_K || W->type == T_Q6_K);  /* qk_tile16x4 */
            const int a7 = W->type == T_Q7_A7, row = is_row_type(W->type);
            const int q7 = row || (Q7_SIGNED && (W->type == T_Q7_0 || a7));  /* q7s_panel: AVX2 builds, and T_Q7_ROW */
            const int wide = q8 || (HAVE_AVX512 && row);  /* 32-row tiles */
            const int span = wide && (g + 3) * 8 < n1 ? 4 : (q8 || q4 || qk || q7) && (g + 1) * 8 < n1 ? 2 : 1;
            const uint8_t* gp = W->data + g * gb;
            for (int64_t m = m0; m < m1;) {
#if HAVE_AVX512
                if (row && span >= 2) {  /* int7-row: 16 or 32 rows x up to 6 tokens (packed512.h) */
                    const int last = staged && m1 == M;  /* the staged rows go with the last chunk */
                    row_panel512(W, span, gp, gb, nu, g, n0, n1, X + m0 * nbx, nbx, m0, last ? sr.m : m1, Y, ldy, acc,
                                 last ? &sr : NULL);
                    m = m1;
                    continue;
                }
                const int zero = stored_offset(W->type);
                if (span == 4 && (m + 6 <= m1 || (streams_now() == READ_QUAD && m1 - m < 4))) {  /* 6 tokens, or 1 (decode, rests) */
                    float out[192];
                    const int T = m + 6 <= m1 ? 6 : 1;
                    if (T == 6) q8_tile32x6(zero, gp, gb, nu, X + m * nbx, nbx, out);
                    else q8_tile32x1(zero, gp, gb, nu, X + m * nbx, out);
                    for (int i = 0; i < 4; i++) store_group(Y, ldy, m, T, g + i, n1, out + 8 * i, 32, acc);
                    m += T;
                    continue;
                }
                if (span >= 2 && m + 4 <= m1 && !q7) {
                    for (int h = 0; h < span; h += 2) {
                        float out[64];
                        if (qk) (W->type == T_Q4_K ? q4k_tile16x4 : q6k_tile16x4)(gp + h * gb, gp + (h + 1) * gb, nu,
                                                                                  X + m * nbx, nbx, out);
                        else if (q4) q4_tile16x4(W->type == T_Q4_1, gp + h * gb, gp + (h + 1) * gb, nu, X + m * nbx, nbx, out);
                        else q8_tile16x4(zero, gp + h * gb, gp + (h + 1) * gb, nu, X + m * nbx, nbx, out);
                        for (int i = 0; i < 2; i++) store_group(Y, ldy, m, 4, g + h + i, n1, out + 8 * i, 16, acc);
                    }
                    m += 4;
                    continue;
                }
#endif
                if (q7) {
                    const int kind7 = q7s_kind(W->type);
                    /* int7-row: the chunk's next panel (up to `span` groups) into L2, a share per token tile, in the
                       first pass (later passes find the chunk in cache). The avx2 build on Zen 4 (2 threads, in one
                       process, alternated, the same bits; three runs): BERT-base b1xs16 / b1xs32 / b1xs128 0.84-0.91x
                       / 0.76-0.87x / 0.89-0.98x the time without it, bge-small 0.83-0.87x / 0.88-0.94x / 0.95-0.98x;
                       b8xs128 0.98-1.02x (1.02-1.05x with every pass prefetching). A 32-row x 2-token asm tile
                       beside it (8 accumulators, a step's broadcasts shared by 4 groups) gained 0-2% at 16 tokens
                       and lost 3-15% from 64 (its 4 groups' panel no longer fits L1): not kept. */
                    const int64_t ahead = (n1 + 7) / 8 - (g + span) < span ? (n1 + 7) / 8 - (g + span) : span;
                    const uint8_t* pf = row && g_row_pf && m0 == 0 && ahead > 0 ? gp + span * gb : NULL;
                    Q7S_FNS[kind7][span - 1](gp, gp + (span - 1) * gb, nu, X, nbx, m, m1, Y, ldy, g, n1, acc, pf,
                                                 ahead * gb);
                    m = m1;
                    continue;
                }
                const int T = m + 4 <= m1 ? 4 : 1;
                for (int i = 0; i < span; i++) {
                    float out[32];
                    (T == 4 ? f4 : f1)(gp + i * gb, nu, X + m * nbx, nbx, out);
                    store_group(Y, ldy, m, T, g + i, n1, out, 8, acc);
                }
                m += T;
            }
            if (more && row && m0 == 0 && !(HAVE_AVX512 && span >= 2 && staged)) row_more(W, span, gp, gb, nu, g, n0, n1, nbx, more);
            g += span;
        }
    }
}
#endif
