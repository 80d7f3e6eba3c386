/* The tile GEMMs of amx.c (bf16, and int8 blocks), written once over tile operations that amx.c defines
   twice: as AMX's instructions (builds with -mamx-*, run only where the CPU and the kernel allow them) and
   as plain C (every build: the CI machines have no AMX, so the layouts, the tails and the stores are
   checked there).

   Before including: AMX_FN, AMXQ_FN (the functions' names) and
     TCONFIG(cfg) TRELEASE() TZERO(t) TLOAD(t, ptr, stride) TSTORE(t, ptr, stride) TDP(c, a, b) TDPI(c, a, b)
     TDPU(c, a, b) (bf16, signed int8 and unsigned x signed int8 products)
   with tile ids as literal constants (AMX encodes them in the instruction).

   Tiles, 2 x 2 blocking (two A and two B loads per four dot products, as oneDNN's brgemm kernels do):
   0-3 C (16 tokens x 16 rows: fp32, or int32 for one block), 4-5 A (16 tokens x 32 values: bf16 rows, or
   the int8 of xblocks), 6-7 B (16 rows' values in VNNI pairs (bf16) or quads (int8)). */

static void AMX_FN(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy,
                   int acc, const uint16_t* pad) {
    const int64_t K = W->cols, gs = 16 * K;  /* uint16 per 16-row group */
    const uint16_t* Wd = (const uint16_t*)W->data;
    const int64_t full = M / 16 * 16;        /* tokens past `full` come from `pad` (16 rows, zeros after) */
    float c[256];
    tilecfg cfg;
    amx_config(&cfg);
    TCONFIG(&cfg);
    /* tokens outer, rows inner: a block of 32 tokens' A tiles is read from L1 by every group of the chunk, and Y's
       rows are written 32 at a time across the chunk's columns */
    for (int64_t m = 0; m < M; m += 32) {
        const int both = m + 16 < M;     /* a second tile of 16 tokens */
        const int in0 = m + 16 <= M, in1 = m + 32 <= M;
        const uint16_t* a0 = m < full ? X + m * K : pad;
        const uint16_t* a1 = m + 16 < full ? X + (m + 16) * K : pad;
        for (int64_t g = n0 / 16; g * 16 < n1;) {
            const int two = (g + 1) * 16 < n1;   /* a second group of 16 rows */
            const uint16_t *b0 = Wd + g * gs, *b1 = b0 + gs;
            /* whole tiles of Y (16 tokens x 16 rows inside [n0, n1)) are stored in place unless accumulating: a
               tile always sums from zero, then goes to Y (+)= through amx_store (the same sums for every row) */
            const int whole0 = !acc && g * 16 >= n0 && g * 16 + 16 <= n1, whole1 = !acc && (g + 1) * 16 + 16 <= n1;
            float *y0 = Y + m * ldy + g * 16, *y1 = y0 + 16 * ldy;
#define FINISH(t, WHOLE, y, mm, n)                                                                     \
    if (WHOLE) TSTORE(t, y, 4 * ldy);                                                                  \
    else { TSTORE(t, c, 64); amx_store(c, Y, ldy, mm, M, n, n0, n1, acc); }
            TZERO(0);
            if (two) TZERO(1);
            if (both) TZERO(2);
            if (both && two) TZERO(3);
            for (int64_t k = 0; k < K; k += 32) {  /* pairs k / 2 .. k / 2 + 15: 64 bytes each */
                /* the next step's B tiles (past K: the next groups') into L1: a tile load from L2 holds up the
                   products behind it (tiles are not renamed); SPR, alone in a C loop: 1.1-1.3x the rate */
                for (int l = 0; l < 1024; l += 64) {
                    __builtin_prefetch((const char*)(b0 + 16 * (k + 32)) + l, 0, 3);
                    __builtin_prefetch((const char*)(b1 + 16 * (k + 32)) + l, 0, 3);
                }
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
#undef FINISH
            g += two ? 2 : 1;
        }
    }
    TRELEASE();
}

/* int8 blocks (amx.c's Q8 tiles): per 32-value block, C = the int32 sums of 16 tokens x 16 rows (TDPBSSD),
   then amxq_scale's float steps, those of the block kernels (packed.c): a block's scales differ from the
   next one's, so the tile unit sums one block at a time. */
static void AMXQ_FN(const mat* W, int64_t n0, int64_t n1, const xblock* X, int64_t M, float* Y, int64_t ldy,
                    int acc, const xblock* pad) {
    const int64_t nb = W->cols / QK, gu = nb * AMXQ_UNIT;     /* blocks per row, bytes per 16-row group */
    const int64_t xs = nb * (int64_t)sizeof(xblock);          /* A tiles: one token's blocks apart */
    const int64_t full = M / 16 * 16;
    const int super = is_super(W->type);                      /* K-quants: mins folded per 8 blocks */
    int32_t c[4][256];
    float f[4][3][256];                                       /* per C tile: sums, offsets, mins of a super-block */
    float xd[2][16], xsum[2][16];                             /* the two token tiles' block scales and sums */
    tilecfg cfg;
    amxq_config(&cfg);
    TCONFIG(&cfg);
    for (int64_t g = n0 / 16; g * 16 < n1;) {
        const int two = (g + 1) * 16 < n1;
        const uint8_t* t0 = W->tiles + g * gu;
        for (int64_t m = 0; m < M; m += 32) {
            const int both = m + 16 < M;
            const xblock* x0 = m < full ? X + m * nb : pad;
            const xblock* x1 = m + 16 < full ? X + (m + 16) * nb : pad;
            memset(f, 0, sizeof f);
            for (int64_t u = 0; u < nb; u++) {
                const uint8_t *b0 = t0 + u * AMXQ_UNIT, *b1 = b0 + gu;
                const int fold = super && u % 8 == 7;
                TZERO(0);
                TLOAD(4, x0[u].q, xs);
                TLOAD(6, b0, 64);
                TDPI(0, 4, 6);
                if (two) { TZERO(1); TLOAD(7, b1, 64); TDPI(1, 4, 7); }
                if (both) {
                    TZERO(2); TLOAD(5, x1[u].q, xs); TDPI(2, 5, 6);
                    if (two) { TZERO(3); TDPI(3, 5, 7); }
                }
                token_scales(x0 + u, nb, xd[0], xsum[0]);
                if (both) token_scales(x1 + u, nb, xd[1], xsum[1]);
                /* the four stores first: a tile store's lines reach the vector loads late */
                TSTORE(0, c[0], 64);
                if (two) TSTORE(1, c[1], 64);
                if (both) TSTORE(2, c[2], 64);
                if (both && two) TSTORE(3, c[3], 64);
                amxq_scale(c[0], f[0][0], b0, xd[0], xsum[0], super, fold);
                if (two) amxq_scale(c[1], f[1][0], b1, xd[0], xsum[0], super, fold);
                if (both) amxq_scale(c[2], f[2][0], b0, xd[1], xsum[1], super, fold);
                if (both && two) amxq_scale(c[3], f[3][0], b1, xd[1], xsum[1], super, fold);
            }
            for (int t = 0; t < 4; t++)
                for (int i = 0; i < 256; i++) f[t][0][i] += f[t][1][i];  /* the kernels' acc + off */
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++)
                    amx_store(f[2 * i + j][0], Y, ldy, m + 16 * i, M, (g + j) * 16, n0, n1, acc);
        }
        g += two ? 2 : 1;
    }
    TRELEASE();
}

/* Row types (T_Q7_ROW, T_Q7_ROW8: one scale per weight row and per token): a C tile sums a whole row in int32
   (TDPBUSD: the activations' bytes q + off, unsigned, against the signed weights, as vpdpbusd takes them;
   TDPBSSD where a build stores them signed), 64 values an instruction, then amxr_scale's one float step per row
   and token, q7r_tile512's: the same bits as the AVX-512 kernels, with no float work per block.
   Per 32 tokens their blocks' bytes are first copied into one contiguous row each (xa: 32 rows of K2 bytes, the
   row's blocks rounded up to pairs, zeros past K and past M): an A tile is then 16 tokens x 64 bytes, where a
   block's 32 bytes inside its 48-byte xblock made 16 x 32 (SPR, alone in a C loop: 1.7-2x the rate, the copy
   included); a B tile is two blocks' 512 bytes (amxr_pack_group pads a row to pairs of blocks). Tokens outer,
   rows inner: the 32 tokens' A rows are read from cache by every group of the chunk (mm_run gives these
   matrices two chunks per thread, as bf16's). */
static void AMXR_FN(const mat* W, int64_t n0, int64_t n1, const xblock* X, int64_t M, float* Y, int64_t ldy,
                    int acc, uint8_t* xa) {
    const int64_t nb = W->cols / QK, np = (nb + 1) / 2, K2 = 64 * np, gu = AMXR_GROUP(nb);
    const int off = act_offset(W->type);
    int32_t c[256];
    float y[256], xd[2][16];
    tilecfg cfg;
    amx_config(&cfg);
    TCONFIG(&cfg);
    for (int64_t m = 0; m < M; m += 32) {
        const int rows = M - m < 32 ? (int)(M - m) : 32, both = rows > 16;
        for (int t = 0; t < (both ? 32 : 16); t++) {  /* the A rows (tiles read 16 or 32 of them) */
            uint8_t* a = xa + t * K2;
            if (t >= rows) { memset(a, 0, K2); xd[t / 16][t % 16] = 0.f; continue; }
            const xblock* x = X + (m + t) * nb;
            for (int64_t u = 0; u < nb; u++) memcpy(a + 32 * u, x[u].q, 32);
            if (nb % 2) memset(a + 32 * nb, 0, 32);
            xd[t / 16][t % 16] = x[0].d;  /* every block's scale is the token's */
        }
        for (int64_t g = n0 / 16; g * 16 < n1;) {
            const int two = (g + 1) * 16 < n1;
            const uint8_t *t0 = W->tiles + g * gu, *t1 = t0 + gu;
            TZERO(0);
            if (two) TZERO(1);
            if (both) TZERO(2);
            if (both && two) TZERO(3);
            for (int64_t p = 0; p < np; p++) {
#define DOT(c, a, b) do { if (off) TDPU(c, a, b); else TDPI(c, a, b); } while (0)
                TLOAD(4, xa + 64 * p, K2);
                TLOAD(6, t0 + 1024 * p, 64);
                DOT(0, 4, 6);
                if (two) { TLOAD(7, t1 + 1024 * p, 64); DOT(1, 4, 7); }
                if (both) {
                    TLOAD(5, xa + 16 * K2 + 64 * p, K2);
                    DOT(2, 5, 6);
                    if (two) DOT(3, 5, 7);
                }
#undef DOT
            }
            /* whole tiles (16 tokens x 16 rows in [n0, n1)) go straight to Y, written or added to */
#define FINISH(t, tiles, x, mm, n)                                                                      \
    { TSTORE(t, c, 64);                                                                                 \
      if ((mm) + 16 <= M && (n) >= n0 && (n) + 16 <= n1)                                                \
          amxr_scale(c, Y + (mm) * ldy + (n), ldy, (tiles) + 1024 * np, x, acc);                        \
      else { amxr_scale(c, y, 16, (tiles) + 1024 * np, x, 0); amx_store(y, Y, ldy, mm, M, n, n0, n1, acc); } }
            FINISH(0, t0, xd[0], m, g * 16)
            if (two) FINISH(1, t1, xd[0], m, g * 16 + 16)
            if (both) FINISH(2, t0, xd[1], m + 16, g * 16)
            if (both && two) FINISH(3, t1, xd[1], m + 16, g * 16 + 16)
#undef FINISH
            g += two ? 2 : 1;
        }
    }
    TRELEASE();
}
