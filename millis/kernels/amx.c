/* AMX, Sapphire Rapids' tile unit: two tile GEMMs (amx_tiles.h).

   bf16 (T_BF16_AMX): bf16 weights against bf16 activation rows, fp32 accumulation (TDPBF16PS: 16 tokens
   x 16 rows x 32 values per instruction, 16x AVX-512 BF16's multiply-adds per instruction).

   Layout: groups of 16 rows (the last padded with zero rows); per pair of values p, 64 bytes: row r's
   values 2p, 2p + 1 at 4r, 4r + 2 (packedbf16.c's pairs, 16 rows wide): the 16 pairs of a 32-value step
   are one B tile (16 rows of 64 bytes, stride 64). Activations: bf16 rows as to_bf16 writes them, loaded
   as A tiles straight from the rows (stride 2K); a last partial tile of tokens from a zero-padded copy.
   K must be a multiple of 32 (the native encoder checks its widths).
   Numerics: a bf16 x bf16 product is exact in fp32; the C form (every build) adds them one by one in fp32,
   value 2p then 2p + 1 (the Intrinsics Guide's order). The tile unit rounds its own way (the SDM sums even
   and odd products apart within an instruction, denormals flushed), so AMX bf16 agrees with the C form and
   the AVX kernels to fp32 rounding, not bit for bit. A row's sum never depends on its batch-mates: every
   tile sums from zero, then is stored (or added to Y) whole.

   int8 blocks ("Q8 tiles", mat.tiles beside a matrix's own layout, used for 16 tokens or more: prefill):
   any block format whose 32-value blocks read as value = d * w + m with int8 w (decode_block: Q8_0, Q4_0,
   Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q7_0; not Q6_K, whose scales change every 16 values), against xblocks
   (signed: builds whose activations carry no offset). Per 16-row group and block, AMXQ_UNIT bytes: the B
   tile (8 quads x 16 rows x 4 values: byte 64q + 4r + j = value 4q + j of row r), then the rows' scales.
   TDPBSSD sums one block of 16 tokens x 16 rows exactly in int32 (the block kernels' integer sums);
   amxq_scale then takes the block kernels' float steps, so a row gets the same bits either way.

   The hardware paths run only where amx_init(1) found AMX-BF16 and AMX-INT8 and the kernel granted the
   tile state (arch_prctl ARCH_REQ_XCOMP_PERM): everywhere else the C form runs them. */
#include "packed.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);
void* pool_buffer(void** buf, int64_t* cap, int64_t need);

typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

static void amx_config(tilecfg* cfg) {  /* palette 1: tiles 0-7 of 16 rows x 64 bytes */
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int t = 0; t < 8; t++) { cfg->colsb[t] = 64; cfg->rows[t] = 16; }
}
static void amxq_config(tilecfg* cfg) {  /* C 16 x 16 int32, A 16 tokens x 32 int8, B 8 quads x 64 bytes */
    amx_config(cfg);
    cfg->colsb[4] = cfg->colsb[5] = 32;
    cfg->rows[6] = cfg->rows[7] = 8;
}

/* bytes per 16 rows x 32 values: the B tile (512), then per row d (fp32), sc (int32), m (fp32), dmin (fp32) */
#define AMXQ_UNIT 768
#define AMXR_GROUP(nb) (((nb) + 1) / 2 * 1024 + 128) /* row types: bytes per 16 rows (amxr_pack_group) */
/* the scales (d) and scaled sums (s) of 16 tokens' block (x: token 0's, nb apart). Not vectorized: GCC 12's
   -O3 vectorizes these strided reads with a load past the 16th token (valgrind: a read just after the
   zero-padded tile's buffer, a crash when that buffer ends a mapping). */
__attribute__((optimize("no-tree-vectorize"))) static void token_scales(const xblock* x, int64_t nb, float* d,
                                                                        float* s) {
    for (int r = 0; r < 16; r++) { d[r] = x[r * nb].d; s[r] = x[r * nb].s; }
}
/* One block's float steps for 16 tokens x 16 rows, those of the block kernels (packed.c group_dot), so a
   row's result is the same bits on the tiles as there (rows never depend on their batch-mates):
     sum += float(C * sc) * (d * token d)         sc = 1, or the K-quant sub-block's scale
     off += m * token s                           Q4_1 / Q5_1 (m = 0 otherwise: skipped, it adds nothing)
   K-quants: mins += m_j * token s, folded once per super-block (fold): off -= dmin * mins.
   f: the tile's sums, offsets and mins (3 x 256); xd, xs: the 16 tokens' scales and scaled sums (token_scales).
   On AVX-512 builds one 16-lane vector per token, the same operations lane by lane (the tile unit's sums cost
   16 cycles a tile; this loop, once scalar, took as long as they did: 28% of a SmolLM2 prefill's samples). */
static void amxq_scale(const int32_t* c, float* f, const uint8_t* unit, const float* xd, const float* xs, int super,
                       int fold) {
    float *sum = f, *off = f + 256, *mins = f + 512;
    float* into = super ? mins : off;
#if defined(__AVX512F__)
    const __m512 d = _mm512_loadu_ps(unit + 512), m = _mm512_loadu_ps(unit + 640);
    const __m512i sc = _mm512_loadu_si512(unit + 576);
    const int offs = _mm512_test_epi32_mask(_mm512_castps_si512(m), _mm512_castps_si512(m)) != 0;
    for (int r = 0; r < 16; r++) {
        __m512i ci = _mm512_loadu_si512(c + 16 * r);
        if (super) ci = _mm512_mullo_epi32(ci, sc);
        const __m512 dx = _mm512_mul_ps(d, _mm512_set1_ps(xd[r]));
        _mm512_storeu_ps(sum + 16 * r, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci), dx, _mm512_loadu_ps(sum + 16 * r)));
        if (offs)
            _mm512_storeu_ps(into + 16 * r, _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r]), _mm512_loadu_ps(into + 16 * r)));
    }
    if (fold) {
        const __m512 dmin = _mm512_loadu_ps(unit + 704);
        for (int r = 0; r < 16; r++) {  /* fma(-dmin, mins, off): -(dmin * mins) + off, one rounding either way */
            _mm512_storeu_ps(off + 16 * r, _mm512_fnmadd_ps(dmin, _mm512_loadu_ps(mins + 16 * r),
                                                            _mm512_loadu_ps(off + 16 * r)));
            _mm512_storeu_ps(mins + 16 * r, _mm512_setzero_ps());
        }
    }
#else
    float d[16], m[16], dmin[16];
    int32_t sc[16];
    memcpy(d, unit + 512, 64); memcpy(sc, unit + 576, 64); memcpy(m, unit + 640, 64); memcpy(dmin, unit + 704, 64);
    int offs = 0;
    for (int n = 0; n < 16; n++) offs |= m[n] != 0.f;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) sum[16 * r + n] = fmaf((float)(c[16 * r + n] * sc[n]), d[n] * xd[r], sum[16 * r + n]);
    if (offs)
        for (int r = 0; r < 16; r++)
            for (int n = 0; n < 16; n++) into[16 * r + n] = fmaf(m[n], xs[r], into[16 * r + n]);
    if (fold)
        for (int i = 0; i < 256; i++) { off[i] = fmaf(-dmin[i % 16], mins[i], off[i]); mins[i] = 0.f; }
#endif
}

/* Y rows m..m+15 (those < M), columns n..n+15 (those in [n0, n1)) (+)= the C tile c (16 x 16 fp32): the
   partial tiles (whole ones go straight between Y and the tile registers) */
static void amx_store(const float* c, float* Y, int64_t ldy, int64_t m, int64_t M, int64_t n, int64_t n0, int64_t n1,
                      int acc) {
    const int64_t lo = n0 > n ? n0 : n, hi = n1 < n + 16 ? n1 : n + 16;
#if defined(__AVX512F__)
    if (lo == n && hi == n + 16) {  /* whole rows of 16 */
        for (int64_t r = 0; r < 16 && m + r < M; r++) {
            float* y = Y + (m + r) * ldy + n;
            const __m512 v = _mm512_loadu_ps(c + 16 * r);
            _mm512_storeu_ps(y, acc ? _mm512_add_ps(_mm512_loadu_ps(y), v) : v);
        }
        return;
    }
#endif
    for (int64_t r = 0; r < 16 && m + r < M; r++) {
        float* y = Y + (m + r) * ldy;
        const float* cr = c + 16 * r;
        if (acc) for (int64_t j = lo; j < hi; j++) y[j] += cr[j - n];
        else for (int64_t j = lo; j < hi; j++) y[j] = cr[j - n];
    }
}

/* Row types' one float step per row and token (q7r_tile512's, so the same bits): y (+)= float(C - z) * (d * token
   d), z = off * the row's weight sum; c: a 16 tokens x 16 rows int32 tile, t: its rows' d[16] then z[16];
   y: 16 rows of 16, ld apart; acc: added to y (the product rounded first, as a separate add would) */
static void amxr_scale(const int32_t* c, float* y, int64_t ld, const uint8_t* t, const float* xd, int acc) {
#if defined(__AVX512F__)
    const __m512 d = _mm512_loadu_ps(t);
    const __m512i z = _mm512_loadu_si512(t + 64);
    for (int r = 0; r < 16; r++) {
        const __m512i sum = _mm512_sub_epi32(_mm512_loadu_si512(c + 16 * r), z);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(xd[r])));
        __asm__("" : "+v"(v));  /* rounded before the add: not contracted into an FMA */
        if (acc) v = _mm512_add_ps(_mm512_loadu_ps(y + ld * r), v);
        _mm512_storeu_ps(y + ld * r, v);
    }
#else
    float d[16]; int32_t z[16];
    memcpy(d, t, 64); memcpy(z, t + 64, 64);
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            volatile float v = (float)(c[16 * r + n] - z[n]) * (d[n] * xd[r]);  /* (not contracted) */
            y[ld * r + n] = acc ? y[ld * r + n] + v : v;
        }
#endif
}

#include "amx_emu.h"  /* the C form of the tile operations */
#define AMX_FN amx_rows_c
#define AMXQ_FN amxq_rows_c
#define AMXR_FN amxr_rows_c
#define ATT_FN attend_c
#define TCONFIG(cfg) (emu_cfg = *(cfg))
#define TRELEASE() (void)0
#define TZERO(t) memset(emu[t], 0, sizeof emu[t])
#define TLOAD(t, p, s) emu_load(t, p, s)
#define TSTORE(t, p, s) emu_store(t, p, s)
#define TDP(c, a, b) emu_dp(c, a, b)
#define TDPI(c, a, b) emu_dp8(c, a, b, 0)
#define TDPU(c, a, b) emu_dp8(c, a, b, 1)
#include "amx_tiles.h"
#include "amx_attend.h"
#include "tile_undef.h"

#if defined(__AVX512BF16__)
#define HAVE_VEC_ATTEND 1  /* vec_attend.h: the attention on AVX-512 BF16 vectors, queries in lanes */
#else
#define HAVE_VEC_ATTEND 0
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#include <immintrin.h>
#define AMX_FN amx_rows_hw
#define AMXQ_FN amxq_rows_hw
#define AMXR_FN amxr_rows_hw
#define ATT_FN attend_hw
/* GCC 12's ldtilecfg / tileloadd asm declare no memory read (beyond 8 bytes of the config): a compiler barrier
   first, so every store they read (the config, the padded tokens) is made before them */
#define TCONFIG(cfg) do { __asm__ volatile("" ::: "memory"); _tile_loadconfig(cfg); } while (0)
#define TRELEASE() _tile_release()
#define TZERO(t) _tile_zero(t)
#define TLOAD(t, p, s) do { __asm__ volatile("" ::: "memory"); _tile_loadd(t, p, s); } while (0)
#define TSTORE(t, p, s) _tile_stored(t, p, s)
#define TDP(c, a, b) _tile_dpbf16ps(c, a, b)
#define TDPI(c, a, b) _tile_dpbssd(c, a, b)
#define TDPU(c, a, b) _tile_dpbusd(c, a, b)
#include "amx_tiles.h"
#include "amx_attend.h"
#define HAVE_AMX_BUILD 1
#else
#define HAVE_AMX_BUILD 0
#endif

/* amx_init(1) found the tile unit usable in this process. Atomic: a model's load calls amx_init while another
   thread's forward reads it (a plain load on x86) */
static _Atomic int g_amx_hw;

/* want 1: use AMX when the CPU has AMX-BF16 and AMX-INT8 and the kernel grants the tile state; 0: never.
   Returns 1 when T_BF16_AMX matrices and Q8 tiles run on the tile unit from now on, 0 when not (the C form), and
   -errno when the CPU has AMX but the kernel refused the state (kernels.native.init_amx warns). */
API int amx_init(int want) {
    int hw = 0;  /* one store below: a concurrent forward never sees a passing 0 */
#if HAVE_AMX_BUILD && defined(__x86_64__)
    unsigned a, b, c, d;
    if (want && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1) && (d >> 25 & 1))
        hw = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -errno;
#else
    (void)want;
#endif
    atomic_store(&g_amx_hw, hw > 0);
    return hw;
}

/* *buf (64-byte aligned, this thread's: the caller's statics are __thread) grown to at least `need` bytes (pool.c's
   pool_buffer: freed when a pool worker ends) */
static uint8_t* thread_buffer(void** buf, int64_t* cap, int64_t need) { return pool_buffer(buf, cap, need); }

int64_t amx_bytes(int64_t rows, int64_t cols) { return cols % 32 ? 0 : (rows + 15) / 16 * 16 * cols * 2; }

/* the last partial tile of tokens (rows full..M-1 of X, row_bytes each), zero-padded to 16 rows, in a buffer of
   this thread's (grown as needed); NULL when M is a multiple of 16 (no tile reads it) */
static const void* padded_tail(const void* X, int64_t row_bytes, int64_t M) {
    static __thread void* mem;
    static __thread int64_t cap;
    const int64_t full = M / 16 * 16;
    if (full == M) return NULL;
    uint8_t* buf = thread_buffer(&mem, &cap, 16 * row_bytes);
    memset(buf, 0, 16 * row_bytes);
    memcpy(buf, (const uint8_t*)X + full * row_bytes, (M - full) * row_bytes);
    return buf;
}

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1): W in 16-row bf16p_pack_group groups, X bf16 rows */
void amx_rows(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy, int acc) {
    const uint16_t* pad = padded_tail(X, 2 * W->cols, M);
#if HAVE_AMX_BUILD
    if (g_amx_hw) { amx_rows_hw(W, n0, n1, X, M, Y, ldy, acc, pad); return; }
#endif
    amx_rows_c(W, n0, n1, X, M, Y, ldy, acc, pad);
}

/* ---- Q8 tiles ---- */
static int amxq_type(int type) {  /* blocks of value = d * w + m, int8 w; activations without an offset */
    switch (type) {
        case T_Q8_0: case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q4_K: case T_Q5_K: case T_Q7_0:
        case T_Q7_A7: return act_offset(type) == 0;
        default: return 0;
    }
}
/* bytes of W's Q8 tiles (W in GGUF's layout), 0 when its type has none */
API int64_t amxq_bytes(int type, int64_t rows, int64_t cols) {
    if (is_row_type(type)) return cols % QK ? 0 : (rows + 15) / 16 * AMXR_GROUP(cols / QK);
    return amxq_type(type) && cols % QK == 0 ? (rows + 15) / 16 * (cols / QK) * AMXQ_UNIT : 0;
}
static void amxq_pack_group(void* p, int64_t g) {
    const mat* W = ((const void**)p)[0];
    uint8_t* dst = (uint8_t*)((void**)p)[1] + g * (W->cols / QK) * AMXQ_UNIT;
    for (int64_t u = 0; u < W->cols / QK; u++) {
        uint8_t* unit = dst + u * AMXQ_UNIT;
        float d[16] = {0}, m[16] = {0}, dmin[16] = {0};
        int32_t sc[16];
        memset(unit, 0, 512);
        for (int r = 0; r < 16; r++) sc[r] = 1;
        for (int r = 0; r < 16 && 16 * g + r < W->rows; r++) {
            const uint8_t* row = W->data + (16 * g + r) * W->row_bytes;
            int8_t w[32]; float s2[2], mn;
            decode_block(W->type, row, u, w, s2, &mn);
            for (int k = 0; k < 32; k++) unit[64 * (k / 4) + 4 * r + k % 4] = (uint8_t)w[k];
            if (!is_super(W->type)) { d[r] = s2[0]; m[r] = mn; continue; }
            /* K-quants as the block kernels take them: d and dmin per super-block, sub-block j's integer
               scale and min (Q4_K and Q5_K start alike) */
            const block_q4_K* b = (const block_q4_K*)(row + (u / 8) * (W->type == T_Q4_K ? sizeof(block_q4_K)
                                                                                      : sizeof(block_q5_K)));
            int s, mj;
            scale_min_k4((int)(u % 8), b->scales, &s, &mj);
            d[r] = f16_to_f32(b->d); dmin[r] = f16_to_f32(b->dmin); sc[r] = s; m[r] = (float)mj;
        }
        memcpy(unit + 512, d, 64); memcpy(unit + 576, sc, 64); memcpy(unit + 640, m, 64); memcpy(unit + 704, dmin, 64);
    }
}
/* row types: per 16-row group the B tiles of every block (512 bytes each, amxq_pack_group's; a zero block after
   an odd count: two blocks make one 16 x 64-byte tile), then the rows' scales d (fp32) and off * their weight
   sums (int32: what the activations' offset adds, amxr_scale) */
static void amxr_pack_group(void* p, int64_t g) {
    const mat* W = ((const void**)p)[0];
    const int64_t nb = W->cols / QK, scales = (nb + 1) / 2 * 1024;
    uint8_t* dst = (uint8_t*)((void**)p)[1] + g * AMXR_GROUP(nb);
    float d[16] = {0};
    int32_t z[16] = {0};
    memset(dst, 0, scales);
    for (int r = 0; r < 16 && 16 * g + r < W->rows; r++) {
        const uint8_t* row = W->data + (16 * g + r) * W->row_bytes;
        for (int64_t u = 0; u < nb; u++) {
            int8_t w[32]; float s2[2], mn;
            decode_block(W->type, row, u, w, s2, &mn);
            for (int k = 0; k < 32; k++) { dst[u * 512 + 64 * (k / 4) + 4 * r + k % 4] = (uint8_t)w[k]; z[r] += w[k]; }
            d[r] = s2[0];  /* the row's scale: every block's */
        }
        z[r] *= act_offset(W->type);
    }
    memcpy(dst + scales, d, 64); memcpy(dst + scales + 64, z, 64);
}
/* W (GGUF's layout) -> its Q8 tiles in dst (amxq_bytes); 0, or -1 when the type has none */
API int amxq_pack(const mat* W, uint8_t* dst, int nthreads) {
    if (!amxq_bytes(W->type, W->rows, W->cols)) return -1;
    const void* ctx[2] = {W, dst};
    pool_begin(nthreads);
    pool_run(is_row_type(W->type) ? amxr_pack_group : amxq_pack_group, (void*)ctx, (W->rows + 15) / 16);
    pool_end();
    return 0;
}

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1) from W's Q8 tiles (W->tiles), X: xblocks */
void amxq_rows(const mat* W, int64_t n0, int64_t n1, const xblock* X, int64_t M, float* Y, int64_t ldy, int acc) {
    if (is_row_type(W->type)) {  /* the A rows of 32 tokens, contiguous (amx_tiles.h AMXR_FN) */
        static __thread void* xa;
        static __thread int64_t cap;
        uint8_t* a = thread_buffer(&xa, &cap, 32 * 64 * ((W->cols / QK + 1) / 2));
#if HAVE_AMX_BUILD
        if (g_amx_hw) { amxr_rows_hw(W, n0, n1, X, M, Y, ldy, acc, a); return; }
#endif
        amxr_rows_c(W, n0, n1, X, M, Y, ldy, acc, a);
        return;
    }
    const xblock* pad = padded_tail(X, W->cols / QK * (int64_t)sizeof(xblock), M);
#if HAVE_AMX_BUILD
    if (g_amx_hw) { amxq_rows_hw(W, n0, n1, X, M, Y, ldy, acc, pad); return; }
#endif
    amxq_rows_c(W, n0, n1, X, M, Y, ldy, acc, pad);
}

/* ---- attention ---- */
/* One (sequence, head) of the encoder's attention on tiles in bf16 (amx_attend.h): for queries q0 <= i < q1 of
   the L, out[(i - q0) * ldo + d] (d < HD) = the softmax over j < L of <(q_i + bq) scale, k_j + bk> times
   (v_j + bv), from the job's rows of the qkv matrix (token t's q at r + t * ld, k D values on, v 2D); written to
   outb as bf16 instead when outb is not NULL. Returns 1, or 0 (nothing done) unless HD is 32 or 64 and
   0 <= q0 < q1 <= L. */
API int amx_attend_takes(int HD) { return HD == 32 || HD == 64; }  /* head sizes of whole tiles (1 or 2) */
static int g_vec_attend = HAVE_VEC_ATTEND;
/* Off the tile unit, amx_attend runs on AVX-512 BF16 vectors (vec_attend.h) where the build has them, else the C
   form. want 0 / 1 sets it (tests: 0 runs the C form), -1 asks; returns 1 when the vector form is in force. */
API int attend_vectors(int want) {
    if (want == 0 || want == 1) g_vec_attend = want && HAVE_VEC_ATTEND;
    return g_vec_attend;
}
#include "vec_attend.h"  /* vec_attend, and the token split's packed keys: kv_packed, kv_pack_pair, kv_attend */
#include "i8_attend.h"  /* the int8 attention: kv8_takes, kv8_pack_quad, kv8_attend, attend_int8 */
API int amx_attend(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                   float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo) {
    static __thread void* mem;
    static __thread int64_t cap;
    if (!amx_attend_takes(HD) || L <= 0 || q0 < 0 || q1 > L || q0 >= q1) return 0;
#if HAVE_VEC_ATTEND
    if (g_vec_attend && !g_amx_hw) { vec_attend(r, ld, D, bq, bk, bv, scale, L, q0, q1, HD, out, outb, ldo); return 1; }
#endif
    const int Lk = (L + 31) / 32 * 32, G = Lk < ATT_GROUP ? Lk : ATT_GROUP;
    /* bytes: q, kt, vt alike; s, and p half of it; o */
    const int64_t q = (int64_t)Lk * HD * 2, s = (int64_t)G * Lk * 4, o = (int64_t)G * HD * 4;
    uint8_t* buf = thread_buffer(&mem, &cap, 3 * q + s + s / 2 + o);
    const att_job j = {L, Lk, HD, q0, q1, (uint16_t*)buf, (uint16_t*)(buf + q), (uint16_t*)(buf + 2 * q),
                       (uint16_t*)(buf + 3 * q + s), (float*)(buf + 3 * q), (float*)(buf + 3 * q + s + s / 2),
                       out, outb, ldo};
    att_pack(&j, r, ld, D, bq, bk, bv, scale);
#if HAVE_AMX_BUILD
    if (g_amx_hw) { attend_hw(&j); return 1; }
#endif
    attend_c(&j);
    return 1;
}
