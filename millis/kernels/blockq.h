/* Block-quantized weights (GGUF / ggml layouts) and block-quantized activations: the shared types
   of blockq.c (formats, dot products, matmul) and llama_step.c (the decoder forward). */
#pragma once
#include <stdatomic.h>
#include <stdint.h>

/* ggml type ids, as GGUF stores them */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
       T_BF16 = 30,
       T_Q8_0_X16 = 108 /* millis's int8, not a ggml id: Q8_0 blocks run against int16 activations (packed16.c) */,
       T_Q7_0 = 109 /* millis's int7, not a ggml id: Q8_0's block with values in [-63, 63] (packed.c) */,
       T_BF16_PAIRS = 110 /* millis's bf16, not a ggml id: bf16 weights against bf16 activation rows (packedbf16.c) */,
       T_Q7_A7 = 111 /* millis's int7-a7, not a ggml id: Q7_0's bytes against activations in [-63, 63] (quantize_act):
                        maddubs pairs stay under 2^14, so AVX2 adds two steps in int16 before widening (packed.c) */,
       T_BF16_AMX = 112 /* millis's bf16 for AMX, not a ggml id: T_BF16_PAIRS's values in 16-row tiles (amx.c) */,
       T_Q7_ROW = 113 /* millis's int7-row, not a ggml id: Q7_0's bytes with one scale per row (every block's d the
                         same) against activations in [-63, 63] with one scale per token (quantize_act): the
                         SIMD builds sum a row's products in int32 over all its blocks, one float step per row
                         and token (packed_q7.h's q7r_tile) */,
       T_Q7_ROW8 = 114 /* millis's int7-row-a8, not a ggml id: T_Q7_ROW's weights against activations in
                          [-127, 127] with one scale per token (the same tiles with a madd per step on AVX2) */,
       T_Q8_ROW = 115 /* millis's int8-row, not a ggml id: T_Q7_ROW8's layout with weights in [-127, 127] (one scale
                         per row) against 8-bit activations per token: the avx512 build's vpdpbusd takes them as
                         ROW8's (activations + 128), the avx2 build signed (maddubs(|w|, sign(x, w)): pairs <=
                         2 * 127 * 127, no saturation) */ };
static inline int is_row_type(int type) { return type == T_Q7_ROW || type == T_Q7_ROW8 || type == T_Q8_ROW; }  /* one scale per row */

#define API __attribute__((visibility("default")))  /* what Python calls; the rest stays internal */

#define QK 32    /* values per block (and per activation block) */
#define QK_K 256 /* values per K-quant super-block */

typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;                  /* 34 bytes: d * q */
typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;                 /* 18: d * (q - 8) */
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;              /* 20: d * q + m */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;  /* 22: d * ((q | h << 4) - 16) */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1; /* 24: d * (q | h << 4) + m */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;               /* 144 */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K; /* 176 */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;       /* 210 */

/* One activation block: 32 int8 values with their scale (as llama.cpp's Q8_1): x ~ d * q, and
   s = d * sum(q), which the formats with an offset (Q4_1's m, K-quants' mins) multiply; half: the sums of
   q[0..15] and q[16..31] (Q6_K's offset of 32 per half-block, packed.c). 48 bytes. */
typedef struct { float d, s; int32_t sum; int8_t q[32]; int16_t half[2]; } xblock;  /* sum: of q */
/* One int16 activation block (for T_Q8_0_X16 matrices): x ~ d * q, |q| <= 32767. 68 bytes. */
typedef struct { float d; int16_t q[32]; } x16block;

/* A weight matrix (rows, cols): in GGUF's layout (row r is `row_bytes` bytes at data + r * row_bytes), or
   with `packed` set in packed.c's layout (the AVX2 kernels' for the quantized types). `tiles`: NULL, or
   the same values as AMX Q8 tiles (amx.c), which products over 16 tokens or more run on. */
typedef struct { int32_t type; int32_t packed; const uint8_t* data; int64_t rows, cols, row_bytes; const uint8_t* tiles; } mat;

#ifdef __AVX2__
#include <immintrin.h>
static inline float hmax8(__m256 m) {  /* the largest of a vector's 8 lanes */
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
/* the largest |r[i]| of a 32-value block, its 4 vectors left in v (the activation quantizers' first step:
   the same value as the scalar loop's) */
static inline float block_amax(const float* r, __m256* v) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(r + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
    }
    return hmax8(m);
}
/* The integer dot steps, per int32 lane: acc + sum of 4 products u8 x s8 (dot_u8s8), of 2 products
   s16 x s16 (dot_s16). AVX-512 VNNI does each in one instruction (vpdpbusd / vpdpwssd, exact int32 sums);
   AVX2 as maddubs + madd(1) + add / madd + add: the same sums as long as maddubs's pairs do not saturate
   (every caller keeps a pair within int16: |u| * |s| * 2 <= 2 * 128 * 127). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
static inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
#else
#define HAVE_VNNI 0
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
static inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif
static inline float hsum8(__m256 a) {  /* the sum of a vector's 8 lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif
#ifndef HAVE_VNNI
#define HAVE_VNNI 0
#endif

/* fp16 -> fp32, inlined (an exported function would be called through the PLT in the hot loops) */
#ifdef __F16C__
#include <immintrin.h>
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
float f16_to_f32_scalar(uint16_t h);
static inline float f16_to_f32(uint16_t h) { return f16_to_f32_scalar(h); }
#endif
int type_block(int type);                 /* values per block of `type` (1 for float types) */
/* Block i (of 32 values) of a GGUF row: integers w[32], per-half scales sc[2], offset mn (value = sc * w + mn) */
void decode_block(int type, const uint8_t* row, int64_t i, int8_t* w, float* sc, float* mn);
void scale_min_k4(int j, const uint8_t* q, int* sc, int* m);  /* K-quant sub-block j's 6-bit scale and min */
void packed_rows(const mat* W, int64_t n0, int64_t n1, const void* X, const float* Xf, int64_t M, float* Y,
                 int64_t ldy, int acc);
/* more rows through the same weights in the same call (the native encoder's residual rows, bert_forward.c's
   ends_rows.h): M activation rows X (quantized blocks) into Y (written, not added), each panel of a row type's
   weights read for them while it is in cache from the main rows */
typedef struct { const void* X; int64_t M; float* Y; int64_t ldy; } more_rows;
void packed_rows_more(const mat* W, int64_t n0, int64_t n1, const void* X, const float* Xf, int64_t M, float* Y,
                      int64_t ldy, int acc, const more_rows* more);
void matmul_rows_more(const mat* W, int64_t n0, int64_t n1, const void* Xq, const float* Xf, int64_t M, float* Y,
                      int64_t ldy, int acc, const more_rows* more);
/* how a 1-token product reads a chunk of rows (packed.c decode_streams: the rule for this CPU, or the one set) */
enum { READ_ONE = 1, READ_QUAD = 4, READ_SPREAD = 8 };
/* decode (1 token): how far ahead of a stream the kernels prefetch with software, in bytes (0: not at all);
   packed.c's decode_prefetch sets the rule on first use */
extern _Atomic int g_pf_bytes;  /* atomic: set once by whichever thread asks first (TSan) */
API int decode_prefetch(int n);
static inline int pf_distance(void) { return g_pf_bytes >= 0 ? g_pf_bytes : decode_prefetch(-1); }
API int decode_streams(int n);
API void quantize_x16(const float* x, int64_t K, x16block* out);  /* K % 32 == 0 */
float dot16_blocks(const uint8_t* row, const x16block* x, int64_t nb);  /* T_Q8_0_X16, GGUF's layout */
int64_t packed16_bytes(int64_t rows, int64_t cols);
void pack16_group(const mat* W, int64_t g, uint8_t* dst);
void packed16_rows(const mat* W, int64_t n0, int64_t n1, const x16block* X, int64_t M, float* Y, int64_t ldy,
                   int acc);
API void to_bf16(const float* x, int64_t K, uint16_t* out);  /* fp32 -> bf16, round to nearest even */
float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t K);  /* T_BF16_PAIRS, row-major */
int64_t bf16p_bytes(int64_t rows, int64_t cols);
void bf16p_pack_group(const mat* W, int64_t g, int width, uint8_t* dst);  /* width 8 or 16 (AMX) rows */
void bf16p_rows(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy, int acc);
int64_t amx_bytes(int64_t rows, int64_t cols);
void amx_rows(const mat* W, int64_t n0, int64_t n1, const uint16_t* X, int64_t M, float* Y, int64_t ldy, int acc);
API int amx_init(int want);
API int amx_attend_takes(int HD);
API int amx_attend(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                   float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo);  /* encoder attention, tiles */
API int kv_packed(int HD);
API void kv_pack_pair(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int two, int HD,
                      uint16_t* kb, uint32_t* vp);
API void kv_attend(const uint16_t* kb, const uint32_t* vp, const float* q, int64_t ld, const float* bq, float scale,
                   int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo);
API int kv8_takes(int HD);  /* the int8 attention (i8_attend.h): avx512 builds, head sizes 32 and 64 */
API void kv8_pack_quad(const float* x, int64_t ld, int64_t D, const float* bk, const float* bv, int n, int HD,
                       uint8_t* kq, uint32_t* vq, float* sk, float* lsv, float* isv);
API void kv8_attend(const uint8_t* kq, const uint32_t* vq, const float* sk, const float* lsv, const float* isv,
                    const float* q, int64_t ld, const float* bq, float scale, int L, int q0, int q1, int HD, float* out,
                    uint16_t* outb, int64_t ldo, const float* relb, int64_t relk);  /* relb, relk: f32_attend.h's */
API int attend_int8(const float* r, int64_t ld, int64_t D, const float* bq, const float* bk, const float* bv,
                    float scale, int L, int q0, int q1, int HD, float* out, uint16_t* outb, int64_t ldo,
                    const float* relb, int64_t relk);
void amxq_rows(const mat* W, int64_t n0, int64_t n1, const xblock* X, int64_t M, float* Y, int64_t ldy, int acc);
int is_float_type(int type);              /* F32 / F16 / BF16: multiplied with fp32 activations */
API void quantize_x(const float* x, int64_t K, xblock* out);   /* K % 32 == 0 */
API void quantize_act(int type, const float* x, int64_t K, xblock* out);  /* for a packed matrix (repack.c) */
API void quantize_act_smooth(int type, const float* x, const float* inv, int64_t K, xblock* out);  /* of x * inv */
void quantize_row_act(int type, const float* x, float row_amax, int64_t K, xblock* out);  /* T_Q7_ROW / ROW8 */
API void dequant_row(int type, const uint8_t* w, int64_t K, float* out);

/* Y[m * ldy + n] (+)= <W[n], X[m]> for n in [n0, n1), m < M. X: xblocks (K / 32 per row) for the
   quantized types (x16blocks for T_Q8_0_X16), fp32 rows (K per row) for the float ones. `acc`: add to Y
   instead of writing. Packed, [n0, n1) is whole 8-row groups, and for the row types (T_Q7_ROW, ROW8, Q8_ROW) whole
   32-row panels (or runs to W's last row): a cut panel is read as another layout (wrong values, no fault). */
void matmul_rows(const mat* W, int64_t n0, int64_t n1, const void* Xq, const float* Xf, int64_t M,
                 float* Y, int64_t ldy, int acc);
/* The same, rows [0, W.rows) split over `nthreads` OpenMP threads (the standalone entry point). */
API void matmul(const mat* W, const void* Xq, const float* Xf, int64_t M, float* Y, int64_t ldy, int acc,
            int nthreads);
