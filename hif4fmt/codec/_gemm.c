/*
 * The integer HiF4 matrix product (spec/hifloat4.md section 8), part of hif4fmt.codec._kernel.
 *
 * Why this file exists: a W4A4 layer computes y = HiF4(x * m) @ HiF4(W / m).T + b. Inside one 64-element
 * unit every decoded element is q * s with q an integer in [-28, 28] and s = value(Ea) / 4, so a unit's
 * dot product is (s_a * s_w) * sum q_a q_w: an int8 dot product, exact in int32, times one float32 scale
 * product, also exact. The float32 sum over the units of K is taken in unit order 0, 1, .., U-1 (then the
 * bias is added, then the result is rounded to the output dtype once): that fixes every bit, so the
 * instruction-set copies below (AVX-512 VNNI, AVX2, portable C) give identical results.
 *
 * #included by _kernel.c (one translation unit: it shares the encoder and the buffer checks).
 *
 * Layouts (row-major, contiguous):
 *   activations  q int8 (M, P), scale float32 (M, U) = value(Ea) / 4 (NaN for a unit that held a NaN),
 *                sum int32 (M, U) = the unit's sum of q (the VNNI/AVX2 copies use it, see below);
 *   weights      the packed HiF4 bytes: codes (N, P/2), meta (N, U*4) (spec 4); decoded per call, one
 *                block of columns at a time, into per-thread panels (never a whole decoded weight);
 *   output       float32 or BF16 (M, N); bias: None or float32 (N,).
 * P = K padded to a multiple of 64, U = P / 64.
 *
 * Panels: 32 weight rows (output columns) x the units of one K block. For each unit and each group of 4
 * K-elements ("quad"), 32 lanes of 4 bytes: lane n holds q_w + 32 of its 4 elements, as unsigned bytes.
 * The x86 dot instructions multiply unsigned by signed bytes, so the weight side is offset by +32 (into
 * 4..60) and each unit's integer sum is corrected by -32 * sum(q_a): sum (q_w + 32) q_a - 32 sum q_a =
 * sum q_w q_a, exactly (|every partial sum| < 2^31).
 */

#define GEMM_NR 32                      /* output columns per panel */
#define GEMM_PANELS 4                   /* panels per column block */
#define GEMM_NC (GEMM_NR * GEMM_PANELS) /* output columns per work item */
#define GEMM_KC_UNITS 32                /* units per K block: a block's panels are 32 * 64 * 128 = 256 KiB */
#define GEMM_MC 1024                    /* activation rows per work item at most */
#define GEMM_MR_MAX 6                   /* rows per micro-tile, at most (the AVX-512 copy) */
#define QUADS (UNIT / 4)                /* groups of 4 elements per unit */
#define PANEL_UNIT_BYTES (QUADS * GEMM_NR * 4) /* one unit of one panel: 2 KiB */
#define WEIGHT_OFFSET 32                /* q_w + 32 is unsigned (spec 8.3) */
#define GEMM_SMALL (1 << 22)            /* multiply-adds below which one thread does the whole product */

enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512_VNNI = 3 };

/* signed q of every element-code byte (two elements) for each shift 0..2 (Eb + Ec):
   q_lut[shift][byte] = q(low nibble) | q(high nibble) << 8, q = (-1)^s * (c << shift) as int8 */
static uint16_t q_lut[3][256];

static void init_q_lut(void) {
    for (int shift = 0; shift < 3; shift++)
        for (int byte = 0; byte < 256; byte++) {
            int8_t q[2];
            for (int half = 0; half < 2; half++) {
                const int nibble = (byte >> (4 * half)) & 0xF;
                const int magnitude = (nibble & 7) << shift;
                q[half] = (int8_t)((nibble & 8) ? -magnitude : magnitude);
            }
            q_lut[shift][byte] = (uint16_t)((uint8_t)q[0] | ((uint16_t)(uint8_t)q[1] << 8));
        }
}

/* value(Ea) / 4 as float32 (exact: E6M2 has 3 significant bits, spec 2.4) */
static inline float unit_step(uint8_t ea) {
    const uint32_t bits = ((((uint32_t)ea >> 2) - EA_BIAS + F32_BIAS) << 23) | (((uint32_t)ea & 3u) << E6M2_DROP);
    return f32_of_bits(bits) * 0.25f;
}

/* shift (Eb + Ec) of quad j of a unit with metadata word w (spec 4: Eb byte 1, Ec bytes 2-3) */
static inline int quad_shift(const uint8_t *word, int j) {
    const uint32_t ec = (uint32_t)word[2] | ((uint32_t)word[3] << 8);
    return (int)(((word[1] >> (j >> 1)) & 1u) + ((ec >> j) & 1u));
}

/* Expand one packed unit (32 code bytes, 4 metadata bytes) into 64 signed q; return the sum of q. */
static inline int32_t expand_unit(const uint8_t *codes, const uint8_t *word, int8_t *q) {
    int32_t sum = 0;
    for (int j = 0; j < QUADS; j++) {
        const int shift = quad_shift(word, j);
        const uint16_t low = q_lut[shift][codes[2 * j]], high = q_lut[shift][codes[2 * j + 1]];
        q[4 * j] = (int8_t)(low & 0xFF);
        q[4 * j + 1] = (int8_t)(low >> 8);
        q[4 * j + 2] = (int8_t)(high & 0xFF);
        q[4 * j + 3] = (int8_t)(high >> 8);
    }
    for (int i = 0; i < UNIT; i++) sum += q[i];
    return sum;
}

/* ---- the activation side: HiF4(bf16(x * m)) straight to q, unit scales and unit sums ---------------- */

/*
 * Rows [row_start, row_stop) of src (rows x k BF16), times ``multiplier`` (k BF16) first when given, are
 * encoded with the toolkit encoder (spec 3.1, the bytes quantize would store) and written as q int8
 * (rows x P), scale float32 (rows x U) and sum int32 (rows x U). A unit holding a NaN (after the product)
 * gets q = 0, sum 0 and scale NaN, so every output it touches is NaN (as fake_quantize's NaN unit would
 * make it). Padding elements are +0.
 */
VECTOR_CLONES
static void quantize_q_rows(const uint16_t *src, const uint16_t *multiplier, int8_t *q, float *scale, int32_t *sum,
                            Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t row_stop) {
    const Py_ssize_t units = (k + UNIT - 1) / UNIT, padded = units * UNIT;
    uint16_t x[BLOCK];
    uint8_t codes[BLOCK / 2], meta[BLOCK_UNITS * 4];
    for (Py_ssize_t row = row_start; row < row_stop; row++) {
        for (Py_ssize_t first = 0; first < k; first += BLOCK) {
            const int count = (int)(k - first < BLOCK ? k - first : BLOCK);
            const int block_units = load_block(x, src, multiplier, multiplier != NULL, k, row * k + first, count);
            uint8_t nan_unit[BLOCK_UNITS] = {0};
            if (first_nan(x, count) >= 0)
                for (int u = 0; u < block_units; u++) {
                    for (int i = u * UNIT; i < (u + 1) * UNIT; i++) nan_unit[u] |= (x[i] & BF16_MAGNITUDE) > BF16_INF;
                    if (nan_unit[u]) memset(x + u * UNIT, 0, UNIT * sizeof(uint16_t));
                }
            encode_block(x, block_units, codes, meta, NULL);
            const Py_ssize_t unit0 = first / UNIT;
            for (int u = 0; u < block_units; u++) {
                const Py_ssize_t at = row * units + unit0 + u;
                int8_t *row_q = q + row * padded + (unit0 + u) * UNIT;
                const int32_t unit_sum = expand_unit(codes + u * (UNIT / 2), meta + 4 * u, row_q);
                sum[at] = nan_unit[u] ? 0 : unit_sum;
                scale[at] = nan_unit[u] ? f32_of_bits(0x7FC00000u) : unit_step(meta[4 * u]);
            }
        }
    }
}

/* Expand packed rows [row_start, row_stop) (codes rows x P/2, meta rows x U*4) into q, scale and sum;
   return -1 or the flat unit index of the first reserved Ea code 0xFF (rows from its row on unwritten). */
static Py_ssize_t expand_q_rows(const uint8_t *codes, const uint8_t *meta, int8_t *q, float *scale, int32_t *sum,
                                Py_ssize_t units, Py_ssize_t row_start, Py_ssize_t row_stop) {
    for (Py_ssize_t row = row_start; row < row_stop; row++) {
        for (Py_ssize_t u = 0; u < units; u++)
            if (meta[(row * units + u) * 4] == 0xFFu) return row * units + u;
        for (Py_ssize_t u = 0; u < units; u++) {
            const Py_ssize_t at = row * units + u;
            sum[at] = expand_unit(codes + at * (UNIT / 2), meta + at * 4, q + at * UNIT);
            scale[at] = unit_step(meta[at * 4]);
        }
    }
    return -1;
}

/* ---- the weight side: packed HiF4 rows into panels ------------------------------------------------- */

/*
 * Decode weight rows [n0, n0 + GEMM_NC) (rows past n_total are zero: q_w = 0, scale 0) and units
 * [u0, u0 + units) into ``panels`` (GEMM_PANELS x units x PANEL_UNIT_BYTES) and ``panel_scale``
 * (GEMM_PANELS x units x GEMM_NR float32).
 */
static void decode_weight_block(const uint8_t *codes, const uint8_t *meta, Py_ssize_t n_total, Py_ssize_t total_units,
                                Py_ssize_t n0, Py_ssize_t u0, int units, uint8_t *panels, float *panel_scale) {
    for (int column = 0; column < GEMM_NC; column++) {
        const Py_ssize_t n = n0 + column;
        const int panel = column / GEMM_NR, lane = column % GEMM_NR;
        for (int u = 0; u < units; u++) {
            uint8_t *unit_panel = panels + ((Py_ssize_t)panel * units + u) * PANEL_UNIT_BYTES;
            float *unit_scale = panel_scale + ((Py_ssize_t)panel * units + u) * GEMM_NR;
            if (n >= n_total) {
                for (int j = 0; j < QUADS; j++) memset(unit_panel + (j * GEMM_NR + lane) * 4, WEIGHT_OFFSET, 4);
                unit_scale[lane] = 0.0f;
                continue;
            }
            const Py_ssize_t at = n * total_units + u0 + u;
            const uint8_t *word = meta + at * 4, *unit_codes = codes + at * (UNIT / 2);
            for (int j = 0; j < QUADS; j++) {
                const int shift = quad_shift(word, j);
                /* +32 per byte: q_w + 32 in 4..60, no carry between bytes */
                const uint32_t quad = ((uint32_t)q_lut[shift][unit_codes[2 * j]]
                                       | ((uint32_t)q_lut[shift][unit_codes[2 * j + 1]] << 16));
                const uint32_t offset = (((quad & 0x7F7F7F7Fu) + 0x20202020u) ^ (quad & 0x80808080u));
                memcpy(unit_panel + (j * GEMM_NR + lane) * 4, &offset, 4);
            }
            unit_scale[lane] = unit_step(word[0]);
        }
    }
}

/* ---- micro-kernels: rows x 32 columns over ``units`` units, float32 accumulators in ``c`` ------------
 * a[r]: row r's q at the block's first unit; a_scale[r], a_sum[r]: its scales and sums there; c[r]: row
 * r's 32 float32 accumulators (read, updated unit by unit in order, written). Rows past the tile's real
 * rows point at a real row (computed, never stored by the caller). */

typedef struct {
    const int8_t *a[GEMM_MR_MAX];
    const float *a_scale[GEMM_MR_MAX];
    const int32_t *a_sum[GEMM_MR_MAX];
    float *c[GEMM_MR_MAX];
} Tile;

/* The portable copy: plain C, the same integer sums and float32 operations. */
static void micro_portable(const Tile *tile, int rows, const uint8_t *panel, const float *panel_scale, int units) {
    for (int r = 0; r < rows; r++) {
        float acc[GEMM_NR];
        memcpy(acc, tile->c[r], sizeof acc);
        for (int u = 0; u < units; u++) {
            const int8_t *a = tile->a[r] + u * UNIT;
            const uint8_t *unit_panel = panel + (Py_ssize_t)u * PANEL_UNIT_BYTES;
            int32_t isum[GEMM_NR];
            for (int n = 0; n < GEMM_NR; n++) isum[n] = -WEIGHT_OFFSET * tile->a_sum[r][u];
            for (int j = 0; j < QUADS; j++)
                for (int n = 0; n < GEMM_NR; n++) {
                    const uint8_t *b = unit_panel + (j * GEMM_NR + n) * 4;
                    isum[n] += b[0] * a[4 * j] + b[1] * a[4 * j + 1] + b[2] * a[4 * j + 2] + b[3] * a[4 * j + 3];
                }
            const float sa = tile->a_scale[r][u];
            for (int n = 0; n < GEMM_NR; n++) /* (float)isum * (sw * sa) is exact: one rounding, the add */
                acc[n] = acc[n] + (float)isum[n] * (panel_scale[u * GEMM_NR + n] * sa);
        }
        memcpy(tile->c[r], acc, sizeof acc);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86_COPIES 1

/* AVX2: vpmaddubsw multiplies u8 x s8 pairs into int16 sums of two products, |pair| <= 2 * 60 * 28 = 3360;
   eight of those are added in int16 (|sum| <= 26880 < 2^15: exact, never saturating), then vpmaddwd by
   ones widens them into int32 quads. Two rows x 16 columns per pass; the float32 accumulators stay in c. */
#define AVX2_QUADS_IN_INT16 8
__attribute__((target("avx2,fma"))) static void micro_avx2(const Tile *tile, int rows, const uint8_t *panel,
                                                           const float *panel_scale, int units) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r0 = 0; r0 < rows; r0 += 2) {
        const int r1 = r0 + 1 < rows ? r0 + 1 : r0;
        for (int half = 0; half < 2; half++) {
            float *c0 = tile->c[r0] + 16 * half, *c1 = tile->c[r1] + 16 * half;
            __m256 f00 = _mm256_loadu_ps(c0), f01 = _mm256_loadu_ps(c0 + 8);
            __m256 f10 = _mm256_loadu_ps(c1), f11 = _mm256_loadu_ps(c1 + 8);
            for (int u = 0; u < units; u++) {
                const uint8_t *unit_panel = panel + (Py_ssize_t)u * PANEL_UNIT_BYTES + half * 64;
                const int8_t *a0 = tile->a[r0] + u * UNIT, *a1 = tile->a[r1] + u * UNIT;
                __m256i i00 = _mm256_set1_epi32(-WEIGHT_OFFSET * tile->a_sum[r0][u]), i01 = i00;
                __m256i i10 = _mm256_set1_epi32(-WEIGHT_OFFSET * tile->a_sum[r1][u]), i11 = i10;
                for (int j0 = 0; j0 < QUADS; j0 += AVX2_QUADS_IN_INT16) {
                    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00;
                    for (int j = j0; j < j0 + AVX2_QUADS_IN_INT16; j++) {
                        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(unit_panel + j * GEMM_NR * 4));
                        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(unit_panel + j * GEMM_NR * 4 + 32));
                        int32_t quad0, quad1;
                        memcpy(&quad0, a0 + 4 * j, 4);
                        memcpy(&quad1, a1 + 4 * j, 4);
                        const __m256i x0 = _mm256_set1_epi32(quad0), x1 = _mm256_set1_epi32(quad1);
                        s00 = _mm256_add_epi16(s00, _mm256_maddubs_epi16(b0, x0));
                        s01 = _mm256_add_epi16(s01, _mm256_maddubs_epi16(b1, x0));
                        s10 = _mm256_add_epi16(s10, _mm256_maddubs_epi16(b0, x1));
                        s11 = _mm256_add_epi16(s11, _mm256_maddubs_epi16(b1, x1));
                    }
                    i00 = _mm256_add_epi32(i00, _mm256_madd_epi16(s00, ones));
                    i01 = _mm256_add_epi32(i01, _mm256_madd_epi16(s01, ones));
                    i10 = _mm256_add_epi32(i10, _mm256_madd_epi16(s10, ones));
                    i11 = _mm256_add_epi32(i11, _mm256_madd_epi16(s11, ones));
                }
                const __m256 s0 = _mm256_loadu_ps(panel_scale + u * GEMM_NR + 16 * half);
                const __m256 s1 = _mm256_loadu_ps(panel_scale + u * GEMM_NR + 16 * half + 8);
                const __m256 sa0 = _mm256_set1_ps(tile->a_scale[r0][u]), sa1 = _mm256_set1_ps(tile->a_scale[r1][u]);
                /* fma(isum, s, f) = f + isum * s rounded once: the product is exact, as in the portable copy */
                f00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i00), _mm256_mul_ps(s0, sa0), f00);
                f01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i01), _mm256_mul_ps(s1, sa0), f01);
                f10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i10), _mm256_mul_ps(s0, sa1), f10);
                f11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i11), _mm256_mul_ps(s1, sa1), f11);
            }
            _mm256_storeu_ps(c0, f00);
            _mm256_storeu_ps(c0 + 8, f01);
            if (r1 != r0) {
                _mm256_storeu_ps(c1, f10);
                _mm256_storeu_ps(c1 + 8, f11);
            }
        }
    }
}

#else
#define HAVE_X86_COPIES 0
#endif

/* The AVX-512 copy is written with these names so that the test suite can also build it over plain C
   vectors (_avx512_emulation.h, -DHIF4_EMULATE_AVX512) and run it, bit for bit against the other
   copies, on a CPU without AVX-512. */
#if defined(HIF4_EMULATE_AVX512)
#include "_avx512_emulation.h"
#define HAVE_AVX512_COPY 1
#define AVX512_TARGET
#elif HAVE_X86_COPIES
#define HAVE_AVX512_COPY 1
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
typedef __m512i V512I;
typedef __m512 V512F;
#define V512_LOADU_I(p) _mm512_loadu_si512((const void *)(p))
#define V512_SET1_I32(v) _mm512_set1_epi32(v)
#define V512_DPBUSD(acc, u8, s8) _mm512_dpbusd_epi32(acc, u8, s8) /* acc + sum of 4 (unsigned u8 x signed s8) */
#define V512_LOADU_F(p) _mm512_loadu_ps(p)
#define V512_SET1_F(v) _mm512_set1_ps(v)
#define V512_STOREU_F(p, v) _mm512_storeu_ps(p, v)
#define V512_CVT_F(v) _mm512_cvtepi32_ps(v)
#define V512_MUL_F(a, b) _mm512_mul_ps(a, b)
#define V512_FMADD_F(a, b, c) _mm512_fmadd_ps(a, b, c)
#else
#define HAVE_AVX512_COPY 0
#endif

/* AVX-512 VNNI: vpdpbusd does 64 u8 x s8 multiply-adds into 16 int32 lanes. Six rows x 32 columns:
   12 integer and 12 float accumulators stay in registers over the K block. */
#define VNNI_ROWS 6
#if HAVE_AVX512_COPY
AVX512_TARGET static void micro_avx512(const Tile *tile, int rows, const uint8_t *panel, const float *panel_scale,
                                       int units) {
    for (int r0 = 0; r0 < rows; r0 += VNNI_ROWS) {
        const int8_t *a[VNNI_ROWS];
        const float *sa[VNNI_ROWS];
        const int32_t *as[VNNI_ROWS];
        V512F f[VNNI_ROWS][2];
        for (int r = 0; r < VNNI_ROWS; r++) {
            const int row = r0 + r < rows ? r0 + r : r0; /* past the tile: repeat a real row, stored never */
            a[r] = tile->a[row];
            sa[r] = tile->a_scale[row];
            as[r] = tile->a_sum[row];
            f[r][0] = V512_LOADU_F(tile->c[row]);
            f[r][1] = V512_LOADU_F(tile->c[row] + 16);
        }
        for (int u = 0; u < units; u++) {
            const uint8_t *unit_panel = panel + (Py_ssize_t)u * PANEL_UNIT_BYTES;
            V512I acc[VNNI_ROWS][2];
            for (int r = 0; r < VNNI_ROWS; r++) acc[r][0] = acc[r][1] = V512_SET1_I32(-WEIGHT_OFFSET * as[r][u]);
            for (int j = 0; j < QUADS; j++) {
                const V512I b0 = V512_LOADU_I(unit_panel + j * GEMM_NR * 4);       /* lanes 0..15 */
                const V512I b1 = V512_LOADU_I(unit_panel + j * GEMM_NR * 4 + 64);  /* lanes 16..31 */
                for (int r = 0; r < VNNI_ROWS; r++) {
                    int32_t quad;
                    memcpy(&quad, a[r] + u * UNIT + 4 * j, 4);
                    const V512I x = V512_SET1_I32(quad);
                    acc[r][0] = V512_DPBUSD(acc[r][0], b0, x);
                    acc[r][1] = V512_DPBUSD(acc[r][1], b1, x);
                }
            }
            const V512F s0 = V512_LOADU_F(panel_scale + u * GEMM_NR), s1 = V512_LOADU_F(panel_scale + u * GEMM_NR + 16);
            for (int r = 0; r < VNNI_ROWS; r++) {
                const V512F scale_a = V512_SET1_F(sa[r][u]);
                /* fma(isum, s, f) = f + isum * s rounded once: the product is exact, as in the portable copy */
                f[r][0] = V512_FMADD_F(V512_CVT_F(acc[r][0]), V512_MUL_F(s0, scale_a), f[r][0]);
                f[r][1] = V512_FMADD_F(V512_CVT_F(acc[r][1]), V512_MUL_F(s1, scale_a), f[r][1]);
            }
        }
        for (int r = 0; r < VNNI_ROWS && r0 + r < rows; r++) {
            V512_STOREU_F(tile->c[r0 + r], f[r][0]);
            V512_STOREU_F(tile->c[r0 + r] + 16, f[r][1]);
        }
    }
}
#endif

typedef void (*MicroKernel)(const Tile *, int, const uint8_t *, const float *, int);

/* Whether this CPU runs copy ``isa`` (ISA_PORTABLE always). */
static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#if defined(HIF4_EMULATE_AVX512)
    if (isa == ISA_AVX512_VNNI) return 1; /* the test build: plain C vectors run anywhere */
#endif
#if HAVE_X86_COPIES
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512_VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
               && __builtin_cpu_supports("fma");
#endif
    return 0;
}

static int best_isa(void) {
    if (isa_supported(ISA_AVX512_VNNI)) return ISA_AVX512_VNNI;
    if (isa_supported(ISA_AVX2)) return ISA_AVX2;
    return ISA_PORTABLE;
}

static const char *isa_name(int isa) {
    return isa == ISA_AVX512_VNNI ? "avx512-vnni" : isa == ISA_AVX2 ? "avx2" : "portable";
}

static MicroKernel micro_kernel(int isa) {
#if HAVE_AVX512_COPY
    if (isa == ISA_AVX512_VNNI) return micro_avx512;
#endif
#if HAVE_X86_COPIES
    if (isa == ISA_AVX2) return micro_avx2;
#endif
    return micro_portable;
}

static int tile_rows(int isa) { return isa == ISA_AVX512_VNNI ? VNNI_ROWS : isa == ISA_AVX2 ? 2 : 1; }

/* ---- the product: work items (row chunk x column block) spread over threads ------------------------ */

typedef struct {
    const int8_t *a_q;
    const float *a_scale;
    const int32_t *a_sum;
    const uint8_t *w_codes, *w_meta;
    const float *bias;     /* NULL: no bias */
    void *out;             /* float32 or BF16 (M, N) */
    int out_bf16;
    Py_ssize_t m, n, units;
    Py_ssize_t row_chunk, row_chunks, column_blocks;
    MicroKernel micro;
    int rows_per_tile;
    Py_ssize_t next;       /* next work item (atomic) */
    int failed;            /* a thread could not get its scratch memory (atomic) */
} Gemm;

/* Round-to-output and store one accumulator row segment: value = acc (+ bias[n]), then float32 or BF16. */
static void store_row(const Gemm *g, Py_ssize_t row, Py_ssize_t n0, int count, const float *acc) {
    for (int i = 0; i < count; i++) {
        const float value = g->bias != NULL ? acc[i] + g->bias[n0 + i] : acc[i];
        if (g->out_bf16) ((uint16_t *)g->out)[row * g->n + n0 + i] = bf16_of_f32(value);
        else ((float *)g->out)[row * g->n + n0 + i] = value;
    }
}

static void gemm_item(Gemm *g, Py_ssize_t item, uint8_t *panels, float *panel_scale, float *c) {
    const Py_ssize_t chunk = item / g->column_blocks, block = item % g->column_blocks;
    const Py_ssize_t m0 = chunk * g->row_chunk, m1 = m0 + g->row_chunk < g->m ? m0 + g->row_chunk : g->m;
    const Py_ssize_t n0 = block * GEMM_NC;
    const int columns = (int)(g->n - n0 < GEMM_NC ? g->n - n0 : GEMM_NC);
    const Py_ssize_t padded = g->units * UNIT;
    memset(c, 0, (size_t)(m1 - m0) * GEMM_NC * sizeof(float)); /* every sum starts at +0 (spec 8.2) */
    for (Py_ssize_t u0 = 0; u0 < g->units; u0 += GEMM_KC_UNITS) { /* K blocks in order: units in order */
        const int units = (int)(g->units - u0 < GEMM_KC_UNITS ? g->units - u0 : GEMM_KC_UNITS);
        decode_weight_block(g->w_codes, g->w_meta, g->n, g->units, n0, u0, units, panels, panel_scale);
        for (Py_ssize_t r0 = m0; r0 < m1; r0 += g->rows_per_tile) {
            const int rows = (int)(m1 - r0 < g->rows_per_tile ? m1 - r0 : g->rows_per_tile);
            for (int panel = 0; panel * GEMM_NR < columns; panel++) {
                Tile tile;
                for (int r = 0; r < rows; r++) {
                    const Py_ssize_t row = r0 + r;
                    tile.a[r] = g->a_q + row * padded + u0 * UNIT;
                    tile.a_scale[r] = g->a_scale + row * g->units + u0;
                    tile.a_sum[r] = g->a_sum + row * g->units + u0;
                    tile.c[r] = c + (row - m0) * GEMM_NC + panel * GEMM_NR;
                }
                g->micro(&tile, rows, panels + (Py_ssize_t)panel * units * PANEL_UNIT_BYTES,
                         panel_scale + (Py_ssize_t)panel * units * GEMM_NR, units);
            }
        }
    }
    for (Py_ssize_t row = m0; row < m1; row++) store_row(g, row, n0, columns, c + (row - m0) * GEMM_NC);
}

static void *gemm_worker(void *arg) {
    Gemm *g = (Gemm *)arg;
    const Py_ssize_t items = g->row_chunks * g->column_blocks;
    uint8_t *panels = NULL;
    float *panel_scale = NULL, *c = NULL;
    IEEE_BEGIN
    if (posix_memalign((void **)&panels, 64, (size_t)GEMM_PANELS * GEMM_KC_UNITS * PANEL_UNIT_BYTES) != 0) panels = NULL;
    panel_scale = malloc((size_t)GEMM_PANELS * GEMM_KC_UNITS * GEMM_NR * sizeof(float));
    c = malloc((size_t)g->row_chunk * GEMM_NC * sizeof(float));
    if (panels == NULL || panel_scale == NULL || c == NULL) {
        __atomic_store_n(&g->failed, 1, __ATOMIC_RELAXED);
    } else {
        for (;;) {
            const Py_ssize_t item = __atomic_fetch_add(&g->next, 1, __ATOMIC_RELAXED);
            if (item >= items) break;
            gemm_item(g, item, panels, panel_scale, c);
        }
    }
    IEEE_END
    free(panels);
    free(panel_scale);
    free(c);
    return NULL;
}

/* Run the product on ``threads`` threads (the caller's included); return 0, or -1 when no thread got
   its scratch memory (then nothing may be written). A thread that fails leaves its items to the others. */
static int gemm_run(Gemm *g, int threads) {
    const Py_ssize_t items = g->row_chunks * g->column_blocks;
    pthread_t helpers[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads && t < items; t++) {
        if (pthread_create(&helpers[started], NULL, gemm_worker, g) != 0) break; /* fewer threads: still correct */
        started++;
    }
    gemm_worker(g);
    for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
    return __atomic_load_n(&g->next, __ATOMIC_RELAXED) >= items ? 0 : -1;
}

/*
 * gemm_q(a_q, a_scale, a_sum, w_codes, w_meta, bias, out, m, n, k, out_bf16, isa, threads) -> the copy's name
 *   a_q int8 (m, P), a_scale float32 (m, U), a_sum int32 (m, U): from quantize_q_bf16 / expand_q;
 *   w_codes uint8 (n, P/2), w_meta uint8 (n, U*4): packed HiF4 (no Ea 0xFF: the caller checks);
 *   bias None or float32 (n,); out float32 or (out_bf16) BF16 (m, n); k the unpadded length;
 *   isa 0 (best this CPU runs), 1 portable, 2 avx2, 3 avx512-vnni; threads >= 1.
 */
static PyObject *gemm_q(PyObject *self, PyObject *args) {
    Py_buffer a_q = {0}, a_scale = {0}, a_sum = {0}, w_codes = {0}, w_meta = {0}, bias = {0}, out = {0};
    PyObject *bias_object;
    Py_ssize_t m, n, k;
    int out_bf16, isa, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*Ow*nnnpii", &a_q, &a_scale, &a_sum, &w_codes, &w_meta, &bias_object, &out,
                          &m, &n, &k, &out_bf16, &isa, &threads))
        return NULL;
    const char *name = "gemm_q";
    const int have_bias = bias_object != Py_None;
    int ok = !(have_bias && PyObject_GetBuffer(bias_object, &bias, PyBUF_SIMPLE) != 0);
    if (ok && (m < 0 || n <= 0 || k <= 0 || k > PY_SSIZE_T_MAX / 8 || m > PY_SSIZE_T_MAX / 8 / (k + UNIT)
               || n > PY_SSIZE_T_MAX / 8 / (k + UNIT) || (m > 0 && n > PY_SSIZE_T_MAX / 8 / m))) {
        PyErr_Format(PyExc_ValueError, "%s: bad m, n or k", name);
        ok = 0;
    }
    if (ok && (isa < ISA_AUTO || isa > ISA_AVX512_VNNI || (isa != ISA_AUTO && !isa_supported(isa)))) {
        PyErr_Format(PyExc_ValueError, "%s: instruction set %d is not available on this CPU", name, isa);
        ok = 0;
    }
    const Py_ssize_t units = ok ? (k + UNIT - 1) / UNIT : 0;
    ok = ok && check_buffer(&a_q, m * units * UNIT, name, "a_q", 0)
         && check_buffer(&a_scale, m * units * 4, name, "a_scale", 0)
         && check_buffer(&a_sum, m * units * 4, name, "a_sum", 0)
         && check_buffer(&w_codes, n * units * (UNIT / 2), name, "w_codes", 0)
         && check_buffer(&w_meta, n * units * 4, name, "w_meta", 0)
         && (!have_bias || check_buffer(&bias, n * 4, name, "bias", 0))
         && check_buffer(&out, m * n * (out_bf16 ? 2 : 4), name, "out", 1);
    const int chosen = isa == ISA_AUTO ? best_isa() : isa;
    int failed = 0;
    if (ok && m > 0) {
        Gemm g = {0};
        g.a_q = a_q.buf;
        g.a_scale = a_scale.buf;
        g.a_sum = a_sum.buf;
        g.w_codes = w_codes.buf;
        g.w_meta = w_meta.buf;
        g.bias = have_bias ? bias.buf : NULL;
        g.out = out.buf;
        g.out_bf16 = out_bf16;
        g.m = m;
        g.n = n;
        g.units = units;
        g.micro = micro_kernel(chosen);
        g.rows_per_tile = tile_rows(chosen);
        g.column_blocks = (n + GEMM_NC - 1) / GEMM_NC;
        if (threads < 1 || threads > MAX_THREADS) threads = threads < 1 ? 1 : MAX_THREADS;
        if ((double)m * (double)n * (double)k < GEMM_SMALL) threads = 1;
        /* row chunks: whole columns blocks feed the threads when there are enough (each weight block is then
           decoded once per call); otherwise rows are split too, in chunks of at least one tile */
        Py_ssize_t chunks = (m + GEMM_MC - 1) / GEMM_MC;
        const Py_ssize_t wanted = 2 * (Py_ssize_t)threads;
        if (chunks * g.column_blocks < wanted) {
            const Py_ssize_t most = (m + g.rows_per_tile - 1) / g.rows_per_tile;
            chunks = (wanted + g.column_blocks - 1) / g.column_blocks;
            if (chunks > most) chunks = most;
        }
        g.row_chunk = (m + chunks - 1) / chunks;
        g.row_chunks = (m + g.row_chunk - 1) / g.row_chunk;
        Py_BEGIN_ALLOW_THREADS
        IEEE_BEGIN
        failed = gemm_run(&g, threads);
        IEEE_END
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a_q);
    PyBuffer_Release(&a_scale);
    PyBuffer_Release(&a_sum);
    PyBuffer_Release(&w_codes);
    PyBuffer_Release(&w_meta);
    PyBuffer_Release(&out);
    if (have_bias && bias.obj != NULL) PyBuffer_Release(&bias);
    if (!ok) return NULL;
    if (failed) return PyErr_NoMemory();
    return PyUnicode_FromString(isa_name(chosen));
}

/* quantize_q_bf16(src, multiplier, q, scale, sum, rows, k, row_start, row_stop) -> None (see quantize_q_rows) */
static PyObject *quantize_q_bf16(PyObject *self, PyObject *args) {
    Py_buffer src = {0}, multiplier = {0}, q = {0}, scale = {0}, sum = {0};
    PyObject *multiplier_object;
    Py_ssize_t rows, k, row_start, row_stop;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Ow*w*w*nnnn", &src, &multiplier_object, &q, &scale, &sum, &rows, &k, &row_start,
                          &row_stop))
        return NULL;
    const int have_multiplier = multiplier_object != Py_None;
    int ok = !(have_multiplier && PyObject_GetBuffer(multiplier_object, &multiplier, PyBUF_SIMPLE) != 0);
    const char *name = "quantize_q_bf16";
    ok = ok && check_shape(rows, k, row_start, row_stop, name);
    const Py_ssize_t units = ok ? (k + UNIT - 1) / UNIT : 0;
    ok = ok && check_buffer(&src, rows * k * 2, name, "src", 1) && check_buffer(&q, rows * units * UNIT, name, "q", 0)
         && check_buffer(&scale, rows * units * 4, name, "scale", 0) && check_buffer(&sum, rows * units * 4, name, "sum", 0)
         && (!have_multiplier || check_buffer(&multiplier, k * 2, name, "multiplier", 1));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        IEEE_BEGIN
        quantize_q_rows((const uint16_t *)src.buf, have_multiplier ? (const uint16_t *)multiplier.buf : NULL,
                        (int8_t *)q.buf, (float *)scale.buf, (int32_t *)sum.buf, k, row_start, row_stop);
        IEEE_END
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&q);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&sum);
    if (have_multiplier && multiplier.obj != NULL) PyBuffer_Release(&multiplier);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* expand_q(codes, meta, q, scale, sum, rows, k, row_start, row_stop) -> -1 or the flat unit index of Ea 0xFF */
static PyObject *expand_q(PyObject *self, PyObject *args) {
    Py_buffer codes = {0}, meta = {0}, q = {0}, scale = {0}, sum = {0};
    Py_ssize_t rows, k, row_start, row_stop, found = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*w*w*nnnn", &codes, &meta, &q, &scale, &sum, &rows, &k, &row_start, &row_stop))
        return NULL;
    const char *name = "expand_q";
    int ok = check_shape(rows, k, row_start, row_stop, name);
    const Py_ssize_t units = ok ? (k + UNIT - 1) / UNIT : 0;
    ok = ok && check_buffer(&codes, rows * units * (UNIT / 2), name, "codes", 0)
         && check_buffer(&meta, rows * units * 4, name, "meta", 0) && check_buffer(&q, rows * units * UNIT, name, "q", 0)
         && check_buffer(&scale, rows * units * 4, name, "scale", 0) && check_buffer(&sum, rows * units * 4, name, "sum", 0);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        found = expand_q_rows((const uint8_t *)codes.buf, (const uint8_t *)meta.buf, (int8_t *)q.buf,
                              (float *)scale.buf, (int32_t *)sum.buf, units, row_start, row_stop);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&meta);
    PyBuffer_Release(&q);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&sum);
    return ok ? PyLong_FromSsize_t(found) : NULL;
}

/* gemm_instruction_sets() -> the copies this CPU runs, best first */
static PyObject *gemm_instruction_sets(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *names = PyList_New(0);
    for (int isa = ISA_AVX512_VNNI; names != NULL && isa >= ISA_PORTABLE; isa--) {
        if (!isa_supported(isa)) continue;
        PyObject *value = Py_BuildValue("(si)", isa_name(isa), isa);
        if (value == NULL || PyList_Append(names, value) != 0) Py_CLEAR(names);
        Py_XDECREF(value);
    }
    return names;
}
