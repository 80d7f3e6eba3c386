/* Repacking at load: GGUF's layout (and millis's Q7_0 / F32) -> packed.h's layout of 8 rows interleaved. */
#include "packed.h"

API int64_t packed_bytes(int type, int64_t rows, int64_t cols) {
    if (type == T_BF16_AMX) return amx_bytes(rows, cols);  /* every build: the C form runs where AMX does not */
#ifdef __AVX2__
    if (type == T_F32) return cols % 2 ? 0 : (rows + 7) / 8 * 8 * cols * 4;
    if (type == T_Q8_0_X16) return packed16_bytes(rows, cols);
    if (type == T_BF16_PAIRS) return bf16p_bytes(rows, cols);
    if (!kind_of(type)) return 0;
    return (rows + 7) / 8 * (cols / (is_super(type) ? QK_K : QK)) * unit_bytes(type);
#else
    (void)type; (void)rows; (void)cols;
    return 0;  /* the scalar build runs GGUF's layout */
#endif
}

static void put_payload(int kind, uint8_t* q, int r, const int8_t* w) {  /* block values w[32] of row r */
    for (int s = 0; s < 8; s++)
        for (int j = 0; j < 4; j++) {
            const uint8_t u = (uint8_t)w[4 * s + j];
            const int b = 4 * r + j;
            if (kind == 8) { q[32 * s + b] = u; continue; }
            q[32 * (s & 3) + b] |= (uint8_t)((u & 0xF) << (4 * (s >> 2)));
            if (kind == 5) q[128 + 4 * s + b / 8] |= (uint8_t)(((u >> 4) & 1) << (b % 8));
            if (kind == 6) q[128 + 32 * (s >> 2) + b] |= (uint8_t)(((u >> 4) & 3) << (2 * (s & 3)));
        }
}

static int block_bytes(int type) {
    switch (type) {
        case T_Q8_0: case T_Q7_0: case T_Q7_A7: case T_Q7_ROW: case T_Q7_ROW8: case T_Q8_ROW:
            return sizeof(block_q8_0);
        case T_Q4_0: return sizeof(block_q4_0);
        case T_Q4_1: return sizeof(block_q4_1);
        case T_Q5_0: return sizeof(block_q5_0);
        case T_Q5_1: return sizeof(block_q5_1);
        case T_Q4_K: return sizeof(block_q4_K);
        case T_Q5_K: return sizeof(block_q5_K);
        default: return sizeof(block_q6_K);
    }
}

static void pack_unit(const mat* W, int64_t g, int64_t u, uint8_t* dst) {
    const int type = W->type, kind = kind_of(type), head = head_bytes(type), pb = payload_bytes(kind);
    const int offset = stored_offset(type);  /* stored = w + offset */
    memset(dst, 0, unit_bytes(type));
    uint16_t* d = (uint16_t*)dst;
    for (int r = 0; r < 8 && 8 * g + r < W->rows; r++) {
        const uint8_t* row = W->data + (8 * g + r) * W->row_bytes;
        const uint8_t* blk = row + u * block_bytes(type);
        int8_t w[32]; float sc[2], mn;
        if (!is_super(type)) {  /* d (and m) are each block's first fp16 fields */
            memcpy(d + r, blk, 2);
            decode_block(type, row, u, w, sc, &mn);
            if (head == 32 && kind == 8) {  /* Q7_0 on AVX2: the block's sum, |sum| <= 32 * 63 */
                int16_t sum = 0;
                for (int l = 0; l < 32; l++) sum = (int16_t)(sum + w[l]);
                memcpy(d + 8 + r, &sum, 2);
            } else if (head == 32) memcpy(d + 8 + r, blk + 2, 2);
            for (int l = 0; l < 32; l++) w[l] = (int8_t)(w[l] + offset);
            put_payload(kind, dst + head, r, w);
            continue;
        }
        if (type == T_Q6_K) {
            const block_q6_K* b = (const block_q6_K*)blk;
            d[r] = b->d;
            for (int h = 0; h < 16; h++) dst[16 + 8 * h + r] = (uint8_t)b->scales[h];
        } else {
            const block_q4_K* b = (const block_q4_K*)blk;  /* Q5_K starts the same way */
            d[r] = b->d; d[8 + r] = b->dmin;
            for (int j = 0; j < 8; j++) {
                int s, m;
                scale_min_k4(j, b->scales, &s, &m);
                dst[32 + 8 * j + r] = (uint8_t)s; dst[96 + 8 * j + r] = (uint8_t)m;
            }
        }
        for (int j = 0; j < 8; j++) {
            decode_block(type, row, 8 * u + j, w, sc, &mn);
            for (int l = 0; l < 32; l++) w[l] = (int8_t)(w[l] + offset);
            put_payload(kind, dst + head + j * pb, r, w);
        }
    }
}

void pool_begin(int threads);
void pool_end(void);
void pool_run(void (*fn)(void*, int64_t), void* ctx, int64_t total);

static void pack_group(void* p, int64_t g) {
    const mat* W = ((const void**)p)[0];
    uint8_t* dst = ((void**)p)[1];
    if (W->type == T_BF16_AMX) { bf16p_pack_group(W, g, 16, dst); return; }  /* g counts groups of 16 rows */
    if (W->type == T_Q8_0_X16) { pack16_group(W, g, dst); return; }
    if (W->type == T_BF16_PAIRS) { bf16p_pack_group(W, g, 8, dst); return; }
    if (W->type == T_F32) {  /* value k of the group's 8 rows: 8 floats at 8 * k */
        float* o = (float*)dst + g * 8 * W->cols;
        for (int r = 0; r < 8; r++) {
            const float* row = (const float*)(W->data + (8 * g + r) * W->row_bytes);
            for (int64_t k = 0; k < W->cols; k++) o[8 * k + r] = 8 * g + r < W->rows ? row[k] : 0.f;
        }
        return;
    }
    const int64_t nu = units(W), ub = unit_bytes(W->type);
    if (paired(W->type, g, W->rows)) {  /* this group's halves of its pair's units (packed.h) */
        uint8_t unit[288];
        const int h = (int)(g & 1);
        int32_t total[8] = {0};  /* each row's weight sum over the whole row */
        for (int64_t u = 0; u < nu; u++) {
            pack_unit(W, g, u, unit);
            uint8_t* pu = dst + ((g & ~(int64_t)1) * nu + 2 * u) * ub;
            for (int r = 0; r < 8; r++) { int16_t w; memcpy(&w, unit + 16 + 2 * r, 2); total[r] += w; }
            if (u != 1) {  /* unit 1's head holds the pair's totals (below) */
                memcpy(pu + 16 * h, unit, 16);
                memcpy(pu + 32 + 16 * h, unit + 16, 16);
            }
            for (int s = 0; s < 8; s++) memcpy(pu + 64 + 64 * s + 32 * h, unit + 32 + 32 * s, 32);
        }
        /* q7r_tile512 reads the 16 rows' totals (int32) from unit 1's head once a tile, not each unit's wsum
           (one unit: its wsum) */
        if (nu > 1) memcpy(dst + ((g & ~(int64_t)1) * nu + 2) * ub + 32 * h, total, 32);
        return;
    }
    for (int64_t u = 0; u < nu; u++) pack_unit(W, g, u, dst + (g * nu + u) * ub);
    if (is_row_type(W->type) && nu > 1) {  /* q7r_tile reads its rows' totals (int32) from unit 1's head once a tile */
        int32_t total[8] = {0};
        for (int64_t u = 0; u < nu; u++)
            for (int r = 0; r < 8; r++) {
                int16_t w;
                memcpy(&w, dst + (g * nu + u) * ub + 16 + 2 * r, 2);
                total[r] += w;
            }
        memcpy(dst + (g * nu + 1) * ub, total, 32);
    }
}

/* GGUF layout -> packed (dst: packed_bytes(...) bytes). 0 on success, -1 when the type is not packed. */
API int repack(const mat* W, uint8_t* dst, int nthreads) {
    if (!packed_bytes(W->type, W->rows, W->cols)) return -1;
    const void* ctx[2] = {W, dst};
    pool_begin(nthreads);
    const int64_t group = W->type == T_BF16_AMX ? 16 : 8;
    pool_run(pack_group, (void*)ctx, (W->rows + group - 1) / group);
    pool_end();
    return 0;
}

API int activation_offset(int type) { return act_offset(type); }  /* for the tests */
