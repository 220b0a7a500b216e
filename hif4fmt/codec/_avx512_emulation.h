/*
 * Plain-C stand-ins for the nine AVX-512 operations the integer GEMM's AVX-512 VNNI copy uses (_gemm.c).
 *
 * Why this file exists: the project's CI and development machines have no AVX-512, so the AVX-512 copy
 * of the kernel could never run there. Built with -DHIF4_EMULATE_AVX512 (tests/test_integer_gemm.py
 * does), _gemm.c compiles that copy's source over these definitions, which follow the Intel intrinsics
 * guide lane for lane (vpdpbusd: each 32-bit lane adds the four products of its unsigned bytes of the
 * second operand and signed bytes of the third, wrapping; vfmadd: one rounding), and the test compares
 * it with the portable and AVX2 copies bit for bit. Never part of an installed build.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct { int32_t lane[16]; } V512I;
typedef struct { float lane[16]; } V512F;

static inline V512I V512_LOADU_I(const void *p) { V512I r; memcpy(r.lane, p, sizeof r.lane); return r; }
static inline V512I V512_SET1_I32(int32_t v) { V512I r; for (int i = 0; i < 16; i++) r.lane[i] = v; return r; }
static inline V512I V512_DPBUSD(V512I acc, V512I u8, V512I s8) {
    for (int i = 0; i < 16; i++) {
        uint8_t a[4];
        int8_t b[4];
        memcpy(a, &u8.lane[i], 4);
        memcpy(b, &s8.lane[i], 4);
        const int32_t sum = a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3];
        acc.lane[i] = (int32_t)((uint32_t)acc.lane[i] + (uint32_t)sum);
    }
    return acc;
}
static inline V512F V512_LOADU_F(const float *p) { V512F r; memcpy(r.lane, p, sizeof r.lane); return r; }
static inline V512F V512_SET1_F(float v) { V512F r; for (int i = 0; i < 16; i++) r.lane[i] = v; return r; }
static inline void V512_STOREU_F(float *p, V512F v) { memcpy(p, v.lane, sizeof v.lane); }
static inline V512F V512_CVT_F(V512I v) { V512F r; for (int i = 0; i < 16; i++) r.lane[i] = (float)v.lane[i]; return r; }
static inline V512F V512_MUL_F(V512F a, V512F b) { for (int i = 0; i < 16; i++) a.lane[i] *= b.lane[i]; return a; }
static inline V512F V512_FMADD_F(V512F a, V512F b, V512F c) {
    for (int i = 0; i < 16; i++) c.lane[i] = fmaf(a.lane[i], b.lane[i], c.lane[i]);
    return c;
}
