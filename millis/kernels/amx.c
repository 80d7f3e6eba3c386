/* millis's bf16 on AMX (T_BF16_AMX): bf16 weights against bf16 activation rows, fp32 accumulation, on
   Sapphire Rapids' tile unit (TDPBF16PS: 16 tokens x 16 rows x 32 values per instruction, 16x AVX-512
   BF16's multiply-adds per instruction).

   Layout: groups of 16 rows (the last padded with zero rows); per pair of values p, 64 bytes: row r's
   values 2p, 2p + 1 at 4r, 4r + 2 (packedbf16.c's pairs, 16 rows wide): the 16 pairs of a 32-value step
   are one B tile (16 rows of 64 bytes, stride 64). Activations: bf16 rows as to_bf16 writes them, loaded
   as A tiles straight from the rows (stride 2K); a last partial tile of tokens from a zero-padded copy.
   K must be a multiple of 32 (the native encoder checks its widths).
   Numerics (SDM, TDPBF16PS): per pair, value 2p then 2p + 1 added in fp32 (round to nearest even,
   denormals flushed); a bf16 x bf16 product is exact in fp32. The C form (every build) adds in the same
   order.
   The hardware path runs only where amx_init(1) found AMX-BF16 and the kernel granted the tile state
   (arch_prctl ARCH_REQ_XCOMP_PERM): everywhere else T_BF16_AMX matrices run the C form. */
#include "packed.h"

#include <stdlib.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

/* Y rows m..m+15 (those < M), columns n..n+15 (those in [n0, n1)) (+)= the C tile c (16 x 16 fp32): the
   partial tiles (whole ones go straight between Y and the tile registers) */
static void amx_store(const float* c, float* Y, int64_t ldy, int64_t m, int64_t M, int64_t n, int64_t n0, int64_t n1,
                      int acc) {
    const int64_t lo = n0 > n ? n0 : n, hi = n1 < n + 16 ? n1 : n + 16;
    for (int64_t r = 0; r < 16 && m + r < M; r++) {
        float* y = Y + (m + r) * ldy;
        const float* cr = c + 16 * r - n;
        if (acc) for (int64_t j = lo; j < hi; j++) y[j] += cr[j];
        else for (int64_t j = lo; j < hi; j++) y[j] = cr[j];
    }
}

/* ---- the C form: 8 tiles per thread, the instructions' semantics ---- */
static __thread uint8_t emu[8][16][64];
static inline float bf16_value(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
static void emu_load(int t, const void* p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy(emu[t][r], (const uint8_t*)p + r * stride, 64);
}
static void emu_store(int t, void* p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy((uint8_t*)p + r * stride, emu[t][r], 64);
}
static void emu_dp(int c, int a, int b) {  /* TDPBF16PS c += a . b */
    for (int m = 0; m < 16; m++) {
        float acc[16];
        const uint16_t* x = (const uint16_t*)emu[a][m];
        memcpy(acc, emu[c][m], 64);
        for (int p = 0; p < 16; p++) {
            const uint16_t* w = (const uint16_t*)emu[b][p];
            for (int n = 0; n < 16; n++) {
                acc[n] += bf16_value(x[2 * p]) * bf16_value(w[2 * n]);
                acc[n] += bf16_value(x[2 * p + 1]) * bf16_value(w[2 * n + 1]);
            }
        }
        memcpy(emu[c][m], acc, 64);
    }
}
#define AMX_FN amx_rows_c
#define TCONFIG(cfg) (void)(cfg)
#define TRELEASE() (void)0
#define TZERO(t) memset(emu[t], 0, sizeof emu[t])
#define TLOAD(t, p, s) emu_load(t, p, s)
#define TSTORE(t, p, s) emu_store(t, p, s)
#define TDP(c, a, b) emu_dp(c, a, b)
#include "amx_tiles.h"
#undef AMX_FN
#undef TCONFIG
#undef TRELEASE
#undef TZERO
#undef TLOAD
#undef TSTORE
#undef TDP

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define AMX_FN amx_rows_hw
#define TCONFIG(cfg) _tile_loadconfig(cfg)
#define TRELEASE() _tile_release()
#define TZERO(t) _tile_zero(t)
#define TLOAD(t, p, s) _tile_loadd(t, p, s)
#define TSTORE(t, p, s) _tile_stored(t, p, s)
#define TDP(c, a, b) _tile_dpbf16ps(c, a, b)
#include "amx_tiles.h"
#define HAVE_AMX_BUILD 1
#else
#define HAVE_AMX_BUILD 0
#endif

static int g_amx_hw;  /* amx_init(1) found the tile unit usable in this process */

/* want 1: use AMX when the CPU has AMX-BF16 and the kernel grants the tile state; 0: never.
   Returns 1 when T_BF16_AMX matrices run on the tile unit from now on, else 0 (they run the C form). */
API int amx_init(int want) {
    g_amx_hw = 0;
#if HAVE_AMX_BUILD && defined(__x86_64__)
    unsigned a, b, c, d;
    if (want && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1))
        g_amx_hw = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    (void)want;
#endif
    return g_amx_hw;
}

int64_t amx_bytes(int64_t rows, int64_t cols) { return cols % 32 ? 0 : (rows + 15) / 16 * 16 * cols * 2; }

void amx_pack_group(const mat* W, int64_t g, uint8_t* dst) {  /* rows 16g .. 16g + 15 (g counts 16-row groups) */
    uint16_t* o = (uint16_t*)dst + g * 16 * W->cols;
    for (int r = 0; r < 16; r++) {
        const int64_t n = 16 * g + r;
        const uint16_t* row = (const uint16_t*)(W->data + n * W->row_bytes);
        for (int64_t p = 0; p < W->cols / 2; p++)
            for (int i = 0; i < 2; i++) o[32 * p + 2 * r + i] = n < W->rows ? row[2 * p + i] : 0;
    }
}

static __thread uint16_t* tl_pad;  /* per thread: the last partial tile of tokens, zero-padded to 16 */
static __thread int64_t tl_pad_cap;

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1): W packed (amx_pack_group), X bf16 rows (K apart) */
void amx_rows(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy, int acc) {
    const int64_t K = W->cols, full = M / 16 * 16;
    if (full < M) {
        if (tl_pad_cap < 16 * K) { free(tl_pad); tl_pad = malloc(sizeof(uint16_t) * 16 * K); tl_pad_cap = 16 * K; }
        memset(tl_pad, 0, sizeof(uint16_t) * 16 * K);
        memcpy(tl_pad, X + full * K, sizeof(uint16_t) * (M - full) * K);
    }
#if HAVE_AMX_BUILD
    if (g_amx_hw) { amx_rows_hw(W, n0, n1, X, M, Y, ldy, acc, tl_pad); return; }
#endif
    amx_rows_c(W, n0, n1, X, M, Y, ldy, acc, tl_pad);
}
