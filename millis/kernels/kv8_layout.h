/* The int8 attention's packed values (i8_attend.h, i8_attend256.h), as bert_attend.h lays out the token split's
   buffers and amx.c's kernels read them: keys a V dword holds. The avx512 build's vpdpbusd takes four int8 values
   of four keys a dword; AVX2 has no instruction that sums 255 x 127 products without saturating in 16 bits
   (vpmaddubsw), so its vpmaddwd takes two int16 values of two keys a dword: the values take twice the bytes there
   (a key row then holds D key bytes, 2D value bytes and 12 bytes a head of scales: within the 4D bytes a key row
   NativeBert._kv_half allots). */
#pragma once
#if defined(__AVX512BF16__)  /* amx.c's HAVE_VEC_ATTEND: the avx512 build */
#define KV8_PER_DWORD 4
#elif defined(__AVX2__)
#define KV8_PER_DWORD 2
#else
#define KV8_PER_DWORD 4  /* the scalar build has no int8 attention: never read */
#endif
