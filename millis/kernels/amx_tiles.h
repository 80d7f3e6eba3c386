/* The bf16 tile GEMM of amx.c, written once over tile operations that amx.c defines twice: as AMX's
   instructions (builds with -mamx-bf16, run only where the CPU and the kernel allow them) and as plain C
   (every build: the CI machines have no AMX, so the layout, the tails and the stores are checked there).

   Before including: AMX_FN (the function's name) and
     TCONFIG(cfg) TRELEASE() TZERO(t) TLOAD(t, ptr, stride) TSTORE(t, ptr, stride) TDP(c, a, b)
   with tile ids as literal constants (AMX encodes them in the instruction).

   Tiles: 0-3 C (16 tokens x 16 rows, fp32), 4-5 A (16 tokens x 32 values, bf16), 6-7 B (16 pairs x
   16 rows x 2 values: the VNNI pairs of amx.c's layout). One step of 32 values: two A and two B loads,
   four dot products (2 x 2 blocking, as oneDNN's bf16 brgemm kernels do). */

static void AMX_FN(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy,
                   int acc, const uint16_t* pad) {
    const int64_t K = W->cols, gs = 16 * K;  /* uint16 per 16-row group */
    const uint16_t* Wd = (const uint16_t*)W->data;
    const int64_t full = M / 16 * 16;        /* tokens past `full` come from `pad` (16 rows, zeros after) */
    float c[256];
    tilecfg cfg;
    amx_config(&cfg);
    TCONFIG(&cfg);
    for (int64_t g = n0 / 16; g * 16 < n1;) {
        const int two = (g + 1) * 16 < n1;   /* a second group of 16 rows */
        const uint16_t *b0 = Wd + g * gs, *b1 = b0 + gs;
        /* whole tiles of Y (16 tokens x 16 rows inside [n0, n1)) are loaded (acc) and stored in place */
        const int whole0 = g * 16 >= n0 && g * 16 + 16 <= n1, whole1 = (g + 1) * 16 + 16 <= n1;
        for (int64_t m = 0; m < M; m += 32) {
            const int both = m + 16 < M;     /* a second tile of 16 tokens */
            const int in0 = m + 16 <= M, in1 = m + 32 <= M;
            const uint16_t* a0 = m < full ? X + m * K : pad;
            const uint16_t* a1 = m + 16 < full ? X + (m + 16) * K : pad;
            float *y0 = Y + m * ldy + g * 16, *y1 = y0 + 16 * ldy;
#define INIT(t, WHOLE, y) { if (acc && (WHOLE)) TLOAD(t, y, 4 * ldy); else TZERO(t); }
#define FINISH(t, WHOLE, y, mm, n)                                                                     \
    if (WHOLE) TSTORE(t, y, 4 * ldy);                                                                  \
    else { TSTORE(t, c, 64); amx_store(c, Y, ldy, mm, M, n, n0, n1, acc); }
            INIT(0, in0 && whole0, y0)
            if (two) INIT(1, in0 && whole1, y0 + 16)
            if (both) INIT(2, in1 && whole0, y1)
            if (both && two) INIT(3, in1 && whole1, y1 + 16)
            for (int64_t k = 0; k < K; k += 32) {  /* pairs k / 2 .. k / 2 + 15: 64 bytes each */
                TLOAD(4, a0 + k, 2 * K);
                TLOAD(6, b0 + 16 * k, 64);
                TDP(0, 4, 6);
                if (two) { TLOAD(7, b1 + 16 * k, 64); TDP(1, 4, 7); }
                if (both) {
                    TLOAD(5, a1 + k, 2 * K);
                    TDP(2, 5, 6);
                    if (two) TDP(3, 5, 7);
                }
            }
            FINISH(0, in0 && whole0, y0, m, g * 16)
            if (two) { FINISH(1, in0 && whole1, y0 + 16, m, g * 16 + 16) }
            if (both) { FINISH(2, in1 && whole0, y1, m + 16, g * 16) }
            if (both && two) { FINISH(3, in1 && whole1, y1 + 16, m + 16, g * 16 + 16) }
#undef INIT
#undef FINISH
        }
        g += two ? 2 : 1;
    }
    TRELEASE();
}
