/* The C form of the tile unit (amx.c): 8 tiles per thread, shaped by the last TCONFIG, with the instructions'
   semantics. Every build has it: the CI machines have no AMX, so the tile kernels' layouts, tails and stores are
   checked through it. */
#pragma once
static __thread uint8_t emu[8][16][64];
static __thread tilecfg emu_cfg;
static inline float bf16_value(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
static void emu_load(int t, const void* p, int64_t stride) {
    for (int r = 0; r < emu_cfg.rows[t]; r++) memcpy(emu[t][r], (const uint8_t*)p + r * stride, emu_cfg.colsb[t]);
}
static void emu_store(int t, void* p, int64_t stride) {
    for (int r = 0; r < emu_cfg.rows[t]; r++) memcpy((uint8_t*)p + r * stride, emu[t][r], emu_cfg.colsb[t]);
}
static void emu_dp(int c, int a, int b) {  /* TDPBF16PS c += a . b, pairs in order, value 2p then 2p + 1 */
    for (int m = 0; m < 16; m++) {
        float acc[16];
        const uint16_t* x = (const uint16_t*)emu[a][m];
        memcpy(acc, emu[c][m], 64);
        for (int p = 0; p < emu_cfg.colsb[a] / 4; p++) {
            const uint16_t* w = (const uint16_t*)emu[b][p];
            for (int n = 0; n < 16; n++) {
                acc[n] += bf16_value(x[2 * p]) * bf16_value(w[2 * n]);
                acc[n] += bf16_value(x[2 * p + 1]) * bf16_value(w[2 * n + 1]);
            }
        }
        memcpy(emu[c][m], acc, 64);
    }
}
/* TDPBSSD (a_unsigned 0) / TDPBUSD (1): c += a . b over int8 quads, a's bytes signed or unsigned against signed
   b, int32 sums */
static void emu_dp8(int c, int a, int b, int a_unsigned) {
    for (int m = 0; m < 16; m++) {
        int32_t acc[16];
        memcpy(acc, emu[c][m], 64);
        for (int q = 0; q < emu_cfg.colsb[a] / 4; q++) {
            const int8_t* w = (const int8_t*)emu[b][q];
            for (int j = 0; j < 4; j++) {
                const uint8_t xb = emu[a][m][4 * q + j];
                const int32_t x = a_unsigned ? (int32_t)xb : (int32_t)(int8_t)xb;
                for (int n = 0; n < 16; n++) acc[n] += x * (int32_t)w[4 * n + j];
            }
        }
        memcpy(emu[c][m], acc, 64);
    }
}
