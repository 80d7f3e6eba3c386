/* Multiply-adds a second the CPU's vector units sustain, for bench/cpu_ceiling.py.

   mac_rate KERNEL THREADS ITERS   prints one line: "kernel threads seconds macs instr"
   mac_rate clock                  prints "clock GHz" (a chain of dependent adds, one a cycle)

   Each kernel runs 12 independent accumulator chains (latency 4-5 cycles on these cores: 12 keeps any pipe
   busy), operands in registers, no loads: the instruction rate alone. Each thread is pinned to its own CPU of the
   process's affinity mask and runs ITERS x 12 instructions of each kind. Functions carry their own target
   attributes, so the file builds with the compiler's defaults and the caller (which reads /proc/cpuinfo) runs
   only kernels the CPU has. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))
#define T256 __attribute__((target("avx2,fma")))

/* Each kernel is one asm block a pass (the exact instructions, none hoisted or merged by the compiler): 12 independent
   chains, registers only; returns multiply-adds done, *instr: vector instructions issued */
#define R12(OP, A, B) OP " " A ", " B ", %%zmm0\n\t" OP " " A ", " B ", %%zmm1\n\t" OP " " A ", " B ", %%zmm2\n\t" \
    OP " " A ", " B ", %%zmm3\n\t" OP " " A ", " B ", %%zmm4\n\t" OP " " A ", " B ", %%zmm5\n\t"                  \
    OP " " A ", " B ", %%zmm6\n\t" OP " " A ", " B ", %%zmm7\n\t" OP " " A ", " B ", %%zmm8\n\t"                  \
    OP " " A ", " B ", %%zmm9\n\t" OP " " A ", " B ", %%zmm10\n\t" OP " " A ", " B ", %%zmm11\n\t"
#define Y12(OP, A, B) OP " " A ", " B ", %%ymm0\n\t" OP " " A ", " B ", %%ymm1\n\t" OP " " A ", " B ", %%ymm2\n\t" \
    OP " " A ", " B ", %%ymm3\n\t" OP " " A ", " B ", %%ymm4\n\t" OP " " A ", " B ", %%ymm5\n\t"                  \
    OP " " A ", " B ", %%ymm6\n\t" OP " " A ", " B ", %%ymm7\n\t" OP " " A ", " B ", %%ymm8\n\t"                  \
    OP " " A ", " B ", %%ymm9\n\t" OP " " A ", " B ", %%ymm10\n\t" OP " " A ", " B ", %%ymm11\n\t"
/* half and half: six of one kind on chains 0-5, six of another on 6-11 (does the second find pipes the first leaves?) */
#define MIX(OP1, OP2, R1, R2) OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "0\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "6\n\t" \
    OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "1\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "7\n\t"                     \
    OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "2\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "8\n\t"                     \
    OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "3\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "9\n\t"                     \
    OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "4\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "10\n\t"                    \
    OP1 " %%" R1 "14, %%" R1 "15, %%" R1 "5\n\t" OP2 " %%" R2 "14, %%" R2 "15, %%" R2 "11\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
    "xmm12", "xmm13", "xmm14", "xmm15"
/* the operands: zmm14 / zmm15 hold small bytes (no denormals or saturation matter for the rate) */
#define LOOP(BODY) for (long i = 0; i < n; i++) __asm__ volatile(BODY ::: CLOBBER)
#define SETUP512 __asm__ volatile("vpternlogd $0xff, %%zmm14, %%zmm14, %%zmm14\n\tvpabsb %%zmm14, %%zmm14\n\t" \
                                  "vmovdqa64 %%zmm14, %%zmm15" ::: CLOBBER)
#define SETUP256 __asm__ volatile("vpcmpeqd %%ymm14, %%ymm14, %%ymm14\n\tvpabsb %%ymm14, %%ymm14\n\t" \
                                  "vmovdqa %%ymm14, %%ymm15" ::: CLOBBER)

T512 static double k_vnni512(long n, double* instr) {
    SETUP512; LOOP(R12("vpdpbusd", "%%zmm14", "%%zmm15")); *instr = 12.0 * n; return 64 * 12.0 * n;
}
T512 static double k_vnni256(long n, double* instr) {
    SETUP512; LOOP(Y12("vpdpbusd", "%%ymm14", "%%ymm15")); *instr = 12.0 * n; return 32 * 12.0 * n;
}
T512 static double k_bf16dot512(long n, double* instr) {
    SETUP512; LOOP(R12("vdpbf16ps", "%%zmm14", "%%zmm15")); *instr = 12.0 * n; return 32 * 12.0 * n;
}
T512 static double k_fma512(long n, double* instr) {
    SETUP512; LOOP(R12("vfmadd231ps", "%%zmm14", "%%zmm15")); *instr = 12.0 * n; return 16 * 12.0 * n;
}
T512 static double k_vnni512_bf16dot512(long n, double* instr) {
    SETUP512; LOOP(MIX("vpdpbusd", "vdpbf16ps", "zmm", "zmm")); *instr = 12.0 * n; return (64 + 32) * 6.0 * n;
}
T512 static double k_vnni512_fma512(long n, double* instr) {
    SETUP512; LOOP(MIX("vpdpbusd", "vfmadd231ps", "zmm", "zmm")); *instr = 12.0 * n; return (64 + 16) * 6.0 * n;
}
/* VNNI beside the AVX2 int8 step's first half (vpmaddubsw: 32 products a ymm, pairs summed to int16) */
T512 static double k_vnni512_maddubs256(long n, double* instr) {
    SETUP512; LOOP(MIX("vpdpbusd", "vpmaddubsw", "zmm", "ymm")); *instr = 12.0 * n; return (64 + 32) * 6.0 * n;
}
/* the AVX2 int8 dot step: vpmaddubsw (32 u8 x s8 products, pairs to int16), vpmaddwd by ones (pairs to int32),
   vpaddd: two multiply-pipe instructions per 32 multiply-adds (6 temporaries, 6 accumulators: 16 ymm registers) */
#define STEP256(K, A) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #K "\n\tvpmaddwd %%ymm13, %%ymm" #K ", %%ymm" #K "\n\t" \
    "vpaddd %%ymm" #K ", %%ymm" #A ", %%ymm" #A "\n\t"
T256 static double k_maddubs256(long n, double* instr) {
    SETUP256;
    __asm__ volatile("vpcmpeqw %%ymm13, %%ymm13, %%ymm13\n\tvpsrlw $15, %%ymm13, %%ymm13" ::: CLOBBER);  /* ones */
    LOOP(STEP256(0, 6) STEP256(1, 7) STEP256(2, 8) STEP256(3, 9) STEP256(4, 10) STEP256(5, 11)
         STEP256(0, 6) STEP256(1, 7) STEP256(2, 8) STEP256(3, 9) STEP256(4, 10) STEP256(5, 11));
    *instr = 24.0 * n; return 32 * 12.0 * n;
}
/* the same with two steps summed in int16 before the vpmaddwd (millis's int7 form on AVX2: 7-bit activations and
   weights keep two steps' pairs within int16): 64 products per two vpmaddubsw, one vpaddw, one vpmaddwd and one
   vpaddd; *instr counts the vpmaddubsw (32 products each) */
#define STEP2X(K, A) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #K "\n\tvpmaddubsw %%ymm15, %%ymm14, %%ymm12\n\t"        \
    "vpaddw %%ymm12, %%ymm" #K ", %%ymm" #K "\n\tvpmaddwd %%ymm13, %%ymm" #K ", %%ymm" #K "\n\t"                 \
    "vpaddd %%ymm" #K ", %%ymm" #A ", %%ymm" #A "\n\t"
T256 static double k_maddubs256x2(long n, double* instr) {
    SETUP256;
    __asm__ volatile("vpcmpeqw %%ymm13, %%ymm13, %%ymm13\n\tvpsrlw $15, %%ymm13, %%ymm13" ::: CLOBBER);  /* ones */
    LOOP(STEP2X(0, 6) STEP2X(1, 7) STEP2X(2, 8) STEP2X(3, 9) STEP2X(4, 10) STEP2X(5, 11));
    *instr = 12.0 * n; return 64 * 6.0 * n;
}
T256 static double k_fma256(long n, double* instr) {
    SETUP256; LOOP(Y12("vfmadd231ps", "%%ymm14", "%%ymm15")); *instr = 12.0 * n; return 8 * 12.0 * n;
}

/* AMX (Sapphire Rapids and later): 4 accumulator tiles (tmm0-3, 16 rows x 16 int32 / fp32) against 4 source tiles
   (tmm4-7, 16 rows x 64 bytes), all in the tile registers: one tdpbusd is 16 x 16 x 64 int8 products, one tdpbf16ps
   16 x 16 x 32 bf16 ones. Each thread asks the kernel for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM) and loads
   its configuration; the caller runs these only where /proc/cpuinfo lists amx_tile and amx_int8 / amx_bf16. */
#define TAMX __attribute__((target("amx-tile,amx-int8,amx-bf16")))
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;
TAMX static int amx_setup(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return 0;
    static __thread tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    __asm__ volatile("ldtilecfg %0\n\ttilezero %%tmm4\n\ttilezero %%tmm5\n\ttilezero %%tmm6\n\ttilezero %%tmm7\n\t"
                     "tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3" :: "m"(cfg) : "memory");
    return 1;
}
#define A4(OP) OP " %%tmm4, %%tmm5, %%tmm0\n\t" OP " %%tmm6, %%tmm5, %%tmm1\n\t" OP " %%tmm4, %%tmm7, %%tmm2\n\t" \
    OP " %%tmm6, %%tmm7, %%tmm3\n\t"
TAMX static double k_amx_int8(long n, double* instr) {
    if (!amx_setup()) { *instr = 0; return 0; }
    for (long i = 0; i < n / 4; i++) __asm__ volatile(A4("tdpbusd") ::: "memory");
    __asm__ volatile("tilerelease" ::: "memory");
    *instr = 4.0 * (n / 4); return 16.0 * 16 * 64 * 4 * (n / 4);
}
TAMX static double k_amx_bf16(long n, double* instr) {
    if (!amx_setup()) { *instr = 0; return 0; }
    for (long i = 0; i < n / 4; i++) __asm__ volatile(A4("tdpbf16ps") ::: "memory");
    __asm__ volatile("tilerelease" ::: "memory");
    *instr = 4.0 * (n / 4); return 16.0 * 16 * 32 * 4 * (n / 4);
}

typedef double (*kernel_fn)(long, double*);
static const struct { const char* name; kernel_fn fn; } KERNELS[] = {
    {"vnni512", k_vnni512}, {"vnni256", k_vnni256}, {"bf16dot512", k_bf16dot512}, {"fma512", k_fma512},
    {"vnni512+bf16dot512", k_vnni512_bf16dot512}, {"vnni512+fma512", k_vnni512_fma512},
    {"vnni512+maddubs256", k_vnni512_maddubs256}, {"maddubs256", k_maddubs256},
    {"maddubs256x2", k_maddubs256x2}, {"fma256", k_fma256},
    {"amx_int8", k_amx_int8}, {"amx_bf16", k_amx_bf16},
};

typedef struct { kernel_fn fn; long n; int cpu; double secs, macs, instr; pthread_barrier_t* go; } job;

static void* run(void* p) {
    job* j = p;
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(j->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    double instr;
    j->fn(j->n / 10, &instr);  /* warm the units up (AVX-512 clocks, the scheduler's placement) */
    pthread_barrier_wait(j->go);
    const double t0 = now();
    j->macs = j->fn(j->n, &j->instr);
    j->secs = now() - t0;
    return NULL;
}

int main(int argc, char** argv) {
    if (argc == 2 && !strcmp(argv[1], "clock")) {
        const long n = 200000000; uint64_t x = 0; const double t0 = now();
        for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
        printf("clock %.4f\n", 4.0 * n / (now() - t0) / 1e9);
        return 0;
    }
    if (argc != 4) { fprintf(stderr, "usage: mac_rate KERNEL THREADS ITERS | mac_rate clock\n"); return 2; }
    kernel_fn fn = NULL;
    for (size_t i = 0; i < sizeof KERNELS / sizeof KERNELS[0]; i++) if (!strcmp(argv[1], KERNELS[i].name)) fn = KERNELS[i].fn;
    const int threads = atoi(argv[2]);
    const long iters = atol(argv[3]);
    if (!fn || threads < 1 || threads > 256 || iters < 10) { fprintf(stderr, "mac_rate: bad kernel or counts\n"); return 2; }
    cpu_set_t mask; CPU_ZERO(&mask); sched_getaffinity(0, sizeof mask, &mask);
    int cpus[256], nc = 0;
    for (int c = 0; c < CPU_SETSIZE && nc < 256; c++) if (CPU_ISSET(c, &mask)) cpus[nc++] = c;
    if (threads > nc) { fprintf(stderr, "mac_rate: %d threads, %d CPUs\n", threads, nc); return 2; }
    pthread_barrier_t go; pthread_barrier_init(&go, NULL, threads);
    job jobs[256]; pthread_t tid[256];
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){fn, iters, cpus[t], 0, 0, 0, &go};
        pthread_create(&tid[t], NULL, run, &jobs[t]);
    }
    double secs = 0, macs = 0, instr = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        if (jobs[t].secs > secs) secs = jobs[t].secs;
        macs += jobs[t].macs; instr += jobs[t].instr;
    }
    printf("%s %d %.6f %.6g %.6g\n", argv[1], threads, secs, macs, instr);
    return 0;
}
