/*
 * hif4fmt.codec._kernel: the HiF4 toolkit encoder (spec/hifloat4.md 3.1) as one compiled pass per unit.
 *
 * Why this file exists: the runtime quantizes every target weight, HiF4(W / m), when it loads a state
 * (wan_runtime.load_pipeline). In torch that is a dozen whole-tensor passes (divide, round, maxima,
 * scales, codes, packing); here each 64-element unit is read once, divided by its mask, encoded and
 * packed while it sits in registers and L1. It computes exactly the float32 operations of
 * ``hif4fmt.codec.encoders.encode_toolkit`` in the same order (compiled with -ffp-contract=off, no
 * fast-math), so the bytes are the same as the torch paths; the tests compare them on every BF16
 * value and on adversarial inputs. Optional: when it is not built, ``hif4fmt.hifloat4`` uses the torch
 * paths (``hif4fmt.hifloat4.kernel_status()`` says which runs).
 *
 * One function, ``quantize_bf16(src, divisor, codes, meta, rows, k, row_start, row_stop)``:
 *   src      buffer of rows * k BF16 values (uint16 bit patterns, native byte order, row-major);
 *   divisor  None, or a buffer of k BF16 values m: element (r, i) is bf16(float(src) / float(m[i]))
 *            first (float32 division, rounded to nearest even BF16: torch's BF16 division);
 *   codes    writable buffer of rows * P/2 bytes, P = k rounded up to a multiple of 64;
 *   meta     writable buffer of rows * P/64 * 4 bytes.
 * Rows row_start..row_stop-1 are written (callers split rows over threads; the GIL is released).
 * Returns -1, or the flat index r * k + i of the first NaN met (after the division), in which case
 * the rows from that one on are not written. Padding elements are +0.
 *
 * The integer matrix product of two HiF4 operands (gemm_q and its activation side quantize_q_bf16,
 * spec/hifloat4.md section 8) lives in _gemm.c, #included below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
/* The spec's arithmetic is IEEE float32 with subnormals. Flush-to-zero / denormals-are-zero are
   per-thread CPU flags (torch.set_flush_denormal sets them on the calling thread only), so each
   kernel entry clears them for its own work and restores them after: the same bytes on every thread. */
#define IEEE_BEGIN unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ & ~0x8040u);
#define IEEE_END _mm_setcsr(saved_csr_);
#else
#define IEEE_BEGIN
#define IEEE_END
#endif
#include <stdint.h>
#include <string.h>

#define UNIT 64          /* elements per unit, spec 2.1 */
#define EC_GROUPS 16     /* groups of 4 per unit (Ec bits) */
#define EB_GROUPS 8      /* groups of 8 per unit (Eb bits) */
#define BF16_MAGNITUDE 0x7FFFu
#define BF16_INF 0x7F80u
#define R7 0.142578125f        /* 1/7 rounded to BF16, spec 3.1 */
#define SCALE_MIN 3.5527136788005009e-15f /* 2^-48 */
#define SCALE_MAX 49152.0f
#define EA_BIAS 48
#define F32_BIAS 127
#define E6M2_DROP 21           /* float32 mantissa bits below the 2 kept by E6M2 */

static inline float f32_of_bits(uint32_t bits) { float value; memcpy(&value, &bits, 4); return value; }
static inline uint32_t bits_of_f32(float value) { uint32_t bits; memcpy(&bits, &value, 4); return bits; }
static inline float f32_of_bf16(uint16_t bf16) { return f32_of_bits((uint32_t)bf16 << 16); }

/* BF16 pattern of float32 ``value`` rounded to nearest, ties to even; NaN -> quiet NaN 0x7FC0 (torch). */
static inline uint16_t bf16_of_f32(float value) {
    uint32_t bits = bits_of_f32(value);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    uint16_t nan = (uint16_t)(0x7FC0u | ((bits >> 16) & 0x8000u));
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded; /* branch-free: vectorizes */
}

static inline float round_bf16(float value) { return f32_of_bf16(bf16_of_f32(value)); }

#define BLOCK_UNITS 16                  /* units encoded together: their temporaries stay in L1 */
#define BLOCK (BLOCK_UNITS * UNIT)
#define REPEAT_4_LANES 0x0001000100010001ull /* one 16-bit value into the 4 lanes of a uint64 */

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) \
    && !defined(HIF4_KERNEL_NO_CLONES) /* the tests build single-target copies with it */
/* One copy per instruction set, picked at load time; every one does the same IEEE float32 operations. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static inline uint16_t max_u16(uint16_t a, uint16_t b) { return a > b ? a : b; }

/* Fold 8 bytes of 0/1 (flag j in byte j, little-endian) into one byte, flag j at bit j (spec 4). */
static inline uint8_t fold_flags(const uint8_t *flags) {
    uint64_t v;
    memcpy(&v, flags, 8);
    v |= v >> 7;
    v |= v >> 14;
    v |= v >> 28;
    return (uint8_t)v;
}

/*
 * Encode ``units`` (1..BLOCK_UNITS) whole units of BF16 patterns ``x`` (no NaN) into ``codes`` (32 bytes
 * per unit) and ``meta`` (4 bytes per unit): spec 3.1 and 4. Every loop runs over the whole block with
 * contiguous accesses so the compiler vectorizes it. With p = m4 * r per group of 4 (float32, as
 * the spec), the steps are rewritten with identities that are exact:
 *   Eb = (m8 * r >= 4) = (p of either group of 4 in the group of 8 >= 4): rounding a product by r > 0
 *        is monotonic, so m8 * r is the larger p;
 *   Ec = (p / s2 >= 2) = (p >= 2 * s2): dividing by 1 or 2 is exact (and cannot matter below 2^-126);
 *   the multiplier r / (s2 * s3) * 4 = r * 2^(2 - Eb - Ec) is exact: r is a positive normal BF16
 *        (2^-16 < r <= 2^48), so its BF16 pattern plus (2 - Eb - Ec) << 7 is the multiplier's pattern.
 */
__attribute__((always_inline)) static inline void encode_block(const uint16_t *restrict x, int units,
                                                              uint8_t *restrict codes, uint8_t *restrict meta,
                                                              uint16_t *restrict values) {
    const int count = units * UNIT, groups = units * EC_GROUPS;
    uint16_t mag[BLOCK], max4[BLOCK / 4], max64[BLOCK_UNITS], reciprocal[BLOCK_UNITS], multiplier[BLOCK / 4];
    uint32_t scale_bits[BLOCK_UNITS];
    uint16_t ge4_pairs[BLOCK / 8], eb_pairs[BLOCK / 8], element_pairs[BLOCK / 2];
    uint8_t ge2[BLOCK / 4], eb[BLOCK / 8], ec[BLOCK / 4];
    uint64_t lanes[BLOCK / 4];      /* per group of 4: its multiplier's BF16 pattern in 4 lanes */
    uint8_t *ge4 = (uint8_t *)ge4_pairs, *eb_of_group = (uint8_t *)eb_pairs, *element = (uint8_t *)element_pairs;
    for (int i = 0; i < count; i++) mag[i] = x[i] & BF16_MAGNITUDE;
    /* step 1: maxima (non-negative, non-NaN BF16 patterns order like their values) */
    for (int g = 0; g < groups; g++)
        max4[g] = max_u16(max_u16(mag[4 * g], mag[4 * g + 1]), max_u16(mag[4 * g + 2], mag[4 * g + 3]));
    for (int u = 0; u < units; u++) {
        uint16_t top = 0;
        for (int j = 0; j < EC_GROUPS; j++) top = max_u16(top, max4[u * EC_GROUPS + j]);
        max64[u] = top;
    }
    /* steps 2-4 per unit: sf = E6M2(clamp(bf16(m64 * r7))), r = bf16(1 / sf); metadata byte 0 = Ea */
    for (int u = 0; u < units; u++) {
        float scale = round_bf16(f32_of_bf16(max64[u]) * R7);
        scale = scale < SCALE_MIN ? SCALE_MIN : (scale > SCALE_MAX ? SCALE_MAX : scale);
        uint32_t bits = bits_of_f32(scale);
        bits = (bits + ((1u << (E6M2_DROP - 1)) - 1u) + ((bits >> E6M2_DROP) & 1u)) & ~((1u << E6M2_DROP) - 1u);
        scale_bits[u] = bits;
        reciprocal[u] = bf16_of_f32(1.0f / f32_of_bits(bits));
        meta[4 * u] = (uint8_t)(((((bits >> 23) & 0xFFu) - F32_BIAS + EA_BIAS) << 2) | ((bits >> E6M2_DROP) & 3u));
    }
    /* steps 5-6: p = m4 * r; Eb per group of 8 from its two groups of 4; Ec; the multiplier per group */
    for (int u = 0; u < units; u++) {
        const float r = f32_of_bf16(reciprocal[u]);
        for (int j = 0; j < EC_GROUPS; j++) {
            const float product = f32_of_bf16(max4[u * EC_GROUPS + j]) * r;
            ge4[u * EC_GROUPS + j] = product >= 4.0f;
            ge2[u * EC_GROUPS + j] = product >= 2.0f;
        }
    }
    for (int j = 0; j < groups / 2; j++) { /* little-endian pairs: group 2j in the low byte */
        const uint16_t either = (uint16_t)((ge4_pairs[j] | (ge4_pairs[j] >> 8)) & 1u);
        eb[j] = (uint8_t)either;
        eb_pairs[j] = (uint16_t)(either * 0x0101u); /* Eb of the group of 8, for each of its groups of 4 */
    }
    for (int g = 0; g < groups; g++) ec[g] = eb_of_group[g] ? ge4[g] : ge2[g];
    for (int u = 0; u < units; u++)
        for (int j = 0; j < EC_GROUPS; j++) {
            const int g = u * EC_GROUPS + j;
            multiplier[g] = (uint16_t)(reciprocal[u] + ((2 - eb_of_group[g] - ec[g]) << 7));
        }
    for (int g = 0; g < groups; g++) lanes[g] = (uint64_t)multiplier[g] * REPEAT_4_LANES;
    /* step 7: c = min(floor(|x| * multiplier + 0.5), 7), two float32 roundings as in the torch path;
       the sign bit of x becomes bit 3; two codes per byte, first element in the low nibble */
    const uint16_t *element_multiplier = (const uint16_t *)lanes;
    for (int i = 0; i < count; i++) {
        float rounded = f32_of_bf16(mag[i]) * f32_of_bf16(element_multiplier[i]) + 0.5f;
        rounded = rounded < 7.5f ? rounded : 7.5f; /* inf -> 7.5; truncating what is left is the floor */
        element[i] = (uint8_t)((int)rounded | ((x[i] >> 12) & 0x8));
    }
    for (int n = 0; n < count / 2; n++) {
        const uint16_t pair = element_pairs[n]; /* little-endian: e[2n] | e[2n+1] << 8 */
        codes[n] = (uint8_t)(pair | (pair >> 4));
    }
    for (int u = 0; u < units; u++) {
        meta[4 * u + 1] = fold_flags(eb + u * EB_GROUPS);
        meta[4 * u + 2] = fold_flags(ec + u * EC_GROUPS);
        meta[4 * u + 3] = fold_flags(ec + u * EC_GROUPS + 8);
    }
    if (values == NULL) return;
    /* decode (spec 2): value = (-1)^s * c * step, step = sf * 2^(Eb + Ec) / 4 per group of 4. step has
       the 3 significant bits of sf, c has 3: both products are exact, and exact in BF16 (its top half) */
    for (int u = 0; u < units; u++)
        for (int j = 0; j < EC_GROUPS; j++) {
            const int g = u * EC_GROUPS + j;
            const float step = f32_of_bits(scale_bits[u]) * (float)(1 << (eb_of_group[g] + ec[g])) * 0.25f;
            lanes[g] = (uint64_t)(bits_of_f32(step) >> 16) * REPEAT_4_LANES;
        }
    const uint16_t *element_step = (const uint16_t *)lanes;
    for (int i = 0; i < count; i++) {
        const float value = (float)(element[i] & 0x7) * f32_of_bf16(element_step[i]);
        values[i] = (uint16_t)((bits_of_f32(value) >> 16) | (x[i] & 0x8000u)); /* c = 0 keeps the sign: -0 */
    }
}

/* Fill x[0..count) with bf16(src[i] / divisor[i mod k]), or bf16(src[i] * divisor[i mod k]) when
   ``multiply``, or src[i] when divisor is NULL, for flat indices from ``first``. */
__attribute__((always_inline)) static inline void load_scaled(uint16_t *restrict x, const uint16_t *restrict src,
                                                             const uint16_t *restrict divisor, int multiply,
                                                             Py_ssize_t k, Py_ssize_t first, int count) {
    if (divisor == NULL) {
        memcpy(x, src + first, (size_t)count * sizeof(uint16_t));
        return;
    }
    int done = 0;
    while (done < count) { /* one run per row the block touches: the divisor restarts at each row */
        const Py_ssize_t column = (first + done) % k;
        const int run = (int)(k - column < count - done ? k - column : count - done);
        const uint16_t *in = src + first + done, *by = divisor + column;
        uint16_t *out = x + done;
        if (multiply)
            for (int i = 0; i < run; i++) out[i] = bf16_of_f32(f32_of_bf16(in[i]) * f32_of_bf16(by[i]));
        else
            for (int i = 0; i < run; i++) out[i] = bf16_of_f32(f32_of_bf16(in[i]) / f32_of_bf16(by[i]));
        done += run;
    }
}

/* Return -1, or the offset in x[0..count) of the first NaN pattern. */
static inline int first_nan(const uint16_t *x, int count) {
    uint16_t top = 0;
    for (int i = 0; i < count; i++) top = max_u16(top, x[i] & BF16_MAGNITUDE);
    if (top <= BF16_INF) return -1;
    for (int i = 0; i < count; i++)
        if ((x[i] & BF16_MAGNITUDE) > BF16_INF) return i;
    return -1;
}

/*
 * Rows [row_start, row_stop) are worked as segments: runs of elements whose units follow each other
 * with no padding inside. When k is a multiple of 64 the whole range is one segment (the units of
 * consecutive rows are consecutive, so blocks run across row ends); otherwise each row is one, its last
 * unit padded with +0. A segment starting at flat element ``start`` (a row start) has its first unit
 * at flat unit index start / k * units. Both walkers below call their segment function per segment.
 */
static inline Py_ssize_t segment_count(Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t row_stop) {
    return k % UNIT == 0 ? (row_stop > row_start ? 1 : 0) : row_stop - row_start;
}
static inline Py_ssize_t segment_start(Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t segment) {
    return (row_start + (k % UNIT == 0 ? 0 : segment)) * k;
}
static inline Py_ssize_t segment_length(Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t row_stop) {
    return k % UNIT == 0 ? (row_stop - row_start) * k : k;
}

/* Load block [first, first + count) of a segment into x, scaled, zero padded to whole units; return its units. */
__attribute__((always_inline)) static inline int load_block(uint16_t *restrict x, const uint16_t *src,
                                                           const uint16_t *scale, int multiply, Py_ssize_t k,
                                                           Py_ssize_t first, int count) {
    const int units = (count + UNIT - 1) / UNIT;
    load_scaled(x, src, scale, multiply, k, first, count);
    for (int i = count; i < units * UNIT; i++) x[i] = 0; /* padding: +0 */
    return units;
}

/* Encode one segment; return -1 or the flat index of the first NaN (nothing written from its block on). */
__attribute__((always_inline)) static inline Py_ssize_t quantize_segment(const uint16_t *src, const uint16_t *divisor,
                                                                        uint8_t *codes, uint8_t *meta, Py_ssize_t k,
                                                                        Py_ssize_t start, Py_ssize_t length) {
    const Py_ssize_t unit_base = start / k * ((k + UNIT - 1) / UNIT);
    uint16_t x[BLOCK];
    for (Py_ssize_t offset = 0; offset < length; offset += BLOCK) {
        const int count = (int)(length - offset < BLOCK ? length - offset : BLOCK);
        const int units = load_block(x, src, divisor, 0, k, start + offset, count);
        const int nan = first_nan(x, count);
        if (nan >= 0) return start + offset + nan;
        const Py_ssize_t unit = unit_base + offset / UNIT;
        encode_block(x, units, codes + unit * (UNIT / 2), meta + unit * 4, NULL);
    }
    return -1;
}

/* Encode rows [row_start, row_stop); return -1 or the flat index of the first NaN. */
VECTOR_CLONES
static Py_ssize_t quantize_rows(const uint16_t *src, const uint16_t *divisor, uint8_t *codes, uint8_t *meta,
                                Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t row_stop) {
    for (Py_ssize_t s = 0; s < segment_count(k, row_start, row_stop); s++) {
        const Py_ssize_t found = quantize_segment(src, divisor, codes, meta, k, segment_start(k, row_start, s),
                                                  segment_length(k, row_start, row_stop));
        if (found >= 0) return found;
    }
    return -1;
}

/* Fake-quantize one block: values[0..count) = HiF4 quantize-dequantize of x (units whole units, zero
   padded past count). A unit holding a NaN comes out all NaN, as in the torch paths (here the quiet
   NaN 0x7FC0; the NaN bit patterns of the paths may differ). */
__attribute__((always_inline)) static inline void fake_block(uint16_t *restrict x, int units, int count,
                                                            uint16_t *restrict values) {
    uint8_t codes[BLOCK / 2], meta[BLOCK_UNITS * 4];
    uint16_t decoded[BLOCK];
    uint8_t nan_unit[BLOCK_UNITS] = {0};
    const int has_nan = first_nan(x, count) >= 0;
    if (has_nan)
        for (int u = 0; u < units; u++) {
            for (int i = u * UNIT; i < (u + 1) * UNIT && i < count; i++)
                nan_unit[u] |= (x[i] & BF16_MAGNITUDE) > BF16_INF;
            if (nan_unit[u]) memset(x + u * UNIT, 0, UNIT * sizeof(uint16_t)); /* encoded, then overwritten */
        }
    encode_block(x, units, codes, meta, decoded);
    memcpy(values, decoded, (size_t)count * sizeof(uint16_t));
    if (has_nan)
        for (int u = 0; u < units; u++)
            if (nan_unit[u])
                for (int i = u * UNIT; i < (u + 1) * UNIT && i < count; i++) values[i] = 0x7FC0u;
}

/* Fake-quantize rows [row_start, row_stop) of src (times ``multiplier`` first, when given) into out. */
VECTOR_CLONES
static void fake_quantize_rows(const uint16_t *src, const uint16_t *multiplier, uint16_t *out, Py_ssize_t k,
                               Py_ssize_t row_start, Py_ssize_t row_stop) {
    uint16_t x[BLOCK];
    for (Py_ssize_t s = 0; s < segment_count(k, row_start, row_stop); s++) {
        const Py_ssize_t start = segment_start(k, row_start, s), length = segment_length(k, row_start, row_stop);
        for (Py_ssize_t offset = 0; offset < length; offset += BLOCK) {
            const int count = (int)(length - offset < BLOCK ? length - offset : BLOCK);
            const int units = load_block(x, src, multiplier, 1, k, start + offset, count);
            fake_block(x, units, count, out + start + offset);
        }
    }
}

/* Check a buffer holds at least ``expected`` bytes and, for 16-bit data, sits at an even address. */
static int check_buffer(const Py_buffer *buffer, Py_ssize_t expected, const char *function, const char *name,
                        int two_byte) {
    if (buffer->len < expected) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd bytes, needs %zd", function, name, buffer->len, expected);
        return 0;
    }
    if (two_byte && ((uintptr_t)buffer->buf & 1u)) {
        PyErr_Format(PyExc_ValueError, "%s: %s is not 2-byte aligned", function, name);
        return 0;
    }
    return 1;
}

/* Check rows and k (k > 0, padded sizes representable) and the row range. */
static int check_shape(Py_ssize_t rows, Py_ssize_t k, Py_ssize_t row_start, Py_ssize_t row_stop, const char *function) {
    if (rows < 0 || k <= 0 || k > PY_SSIZE_T_MAX / 8 || row_start < 0 || row_stop < row_start || row_stop > rows
        || (rows > 0 && rows > PY_SSIZE_T_MAX / 4 / (k + UNIT))) {
        PyErr_Format(PyExc_ValueError, "%s: bad rows, k or row range", function);
        return 0;
    }
    return 1;
}

static PyObject *quantize_bf16(PyObject *self, PyObject *args) {
    Py_buffer src = {0}, divisor = {0}, codes = {0}, meta = {0};
    PyObject *divisor_object;
    Py_ssize_t rows, k, row_start, row_stop, found = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Ow*w*nnnn", &src, &divisor_object, &codes, &meta, &rows, &k, &row_start,
                          &row_stop))
        return NULL;
    int have_divisor = divisor_object != Py_None;
    int ok = 1;
    if (have_divisor && PyObject_GetBuffer(divisor_object, &divisor, PyBUF_SIMPLE) != 0) ok = 0;
    const char *name = "quantize_bf16";
    ok = ok && check_shape(rows, k, row_start, row_stop, name);
    const Py_ssize_t units = ok ? (k + UNIT - 1) / UNIT : 0;
    ok = ok && check_buffer(&src, rows * k * 2, name, "src", 1)
         && check_buffer(&codes, rows * units * (UNIT / 2), name, "codes", 0)
         && check_buffer(&meta, rows * units * 4, name, "meta", 0)
         && (!have_divisor || check_buffer(&divisor, k * 2, name, "divisor", 1));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        IEEE_BEGIN
        found = quantize_rows((const uint16_t *)src.buf, have_divisor ? (const uint16_t *)divisor.buf : NULL,
                              (uint8_t *)codes.buf, (uint8_t *)meta.buf, k, row_start, row_stop);
        IEEE_END
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&meta);
    if (have_divisor && divisor.obj != NULL) PyBuffer_Release(&divisor);
    return ok ? PyLong_FromSsize_t(found) : NULL;
}

static PyObject *fake_quantize_bf16(PyObject *self, PyObject *args) {
    Py_buffer src = {0}, multiplier = {0}, out = {0};
    PyObject *multiplier_object;
    Py_ssize_t rows, k, row_start, row_stop;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Ow*nnnn", &src, &multiplier_object, &out, &rows, &k, &row_start, &row_stop))
        return NULL;
    int have_multiplier = multiplier_object != Py_None;
    int ok = 1;
    if (have_multiplier && PyObject_GetBuffer(multiplier_object, &multiplier, PyBUF_SIMPLE) != 0) ok = 0;
    const char *name = "fake_quantize_bf16";
    ok = ok && check_shape(rows, k, row_start, row_stop, name) && check_buffer(&src, rows * k * 2, name, "src", 1)
         && check_buffer(&out, rows * k * 2, name, "out", 1)
         && (!have_multiplier || check_buffer(&multiplier, k * 2, name, "multiplier", 1));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        IEEE_BEGIN
        fake_quantize_rows((const uint16_t *)src.buf, have_multiplier ? (const uint16_t *)multiplier.buf : NULL,
                           (uint16_t *)out.buf, k, row_start, row_stop);
        IEEE_END
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    if (have_multiplier && multiplier.obj != NULL) PyBuffer_Release(&multiplier);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* ---- dequantize: packed codes and metadata back to BF16 values (spec 2, 4) ------------------------- */

/* Decode rows [row_start, row_stop) into out (rows x k BF16, padding dropped); return -1 or the flat
   unit index (row * units + unit) of the first reserved Ea code 0xFF (nothing is written from its row on). */
VECTOR_CLONES
static Py_ssize_t dequantize_rows(const uint8_t *codes, const uint8_t *meta, uint16_t *out, Py_ssize_t k,
                                  Py_ssize_t row_start, Py_ssize_t row_stop) {
    const Py_ssize_t units = (k + UNIT - 1) / UNIT;
    uint16_t values[UNIT];
    for (Py_ssize_t row = row_start; row < row_stop; row++) {
        const uint8_t *row_meta = meta + row * units * 4;
        for (Py_ssize_t unit = 0; unit < units; unit++)
            if (row_meta[4 * unit] == 0xFFu) return row * units + unit;
        for (Py_ssize_t unit = 0; unit < units; unit++) {
            const uint8_t *word = row_meta + 4 * unit, *unit_codes = codes + (row * units + unit) * (UNIT / 2);
            const uint32_t ea = word[0], eb = word[1], ec = (uint32_t)word[2] | ((uint32_t)word[3] << 8);
            /* value(Ea) = (1 + m/4) * 2^(E - 48) as float32 bits; a step is value(Ea) * 2^(Eb+Ec) / 4 */
            const uint32_t ea_bits = (((ea >> 2) - EA_BIAS + F32_BIAS) << 23) | ((ea & 3u) << E6M2_DROP);
            uint64_t step_lanes[EC_GROUPS]; /* per group of 4: its step's BF16 pattern in 4 lanes (exact) */
            for (int j = 0; j < EC_GROUPS; j++) {
                const float step =
                    f32_of_bits(ea_bits) * (float)(1u << (((eb >> (j >> 1)) & 1u) + ((ec >> j) & 1u))) * 0.25f;
                step_lanes[j] = (uint64_t)(bits_of_f32(step) >> 16) * REPEAT_4_LANES;
            }
            uint16_t pairs[UNIT / 2]; /* byte n -> e[2n] | e[2n+1] << 8 (little-endian: element order) */
            for (int n = 0; n < UNIT / 2; n++)
                pairs[n] = (uint16_t)((unit_codes[n] & 0xFu) | ((uint16_t)(unit_codes[n] >> 4) << 8));
            const uint8_t *element = (const uint8_t *)pairs;
            const uint16_t *element_step = (const uint16_t *)step_lanes;
            for (int i = 0; i < UNIT; i++) {
                const float value = (float)(element[i] & 0x7u) * f32_of_bf16(element_step[i]); /* exact */
                values[i] = (uint16_t)((bits_of_f32(value) >> 16) | ((uint16_t)(element[i] & 0x8u) << 12));
            }
            const Py_ssize_t first = unit * UNIT;
            const Py_ssize_t count = k - first < UNIT ? k - first : UNIT;
            memcpy(out + row * k + first, values, (size_t)count * sizeof(uint16_t));
        }
    }
    return -1;
}

static PyObject *dequantize_bf16(PyObject *self, PyObject *args) {
    Py_buffer codes = {0}, meta = {0}, out = {0};
    Py_ssize_t rows, k, row_start, row_stop, found = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*nnnn", &codes, &meta, &out, &rows, &k, &row_start, &row_stop)) return NULL;
    const char *name = "dequantize_bf16";
    int ok = check_shape(rows, k, row_start, row_stop, name);
    const Py_ssize_t units = ok ? (k + UNIT - 1) / UNIT : 0;
    ok = ok && check_buffer(&codes, rows * units * (UNIT / 2), name, "codes", 0)
         && check_buffer(&meta, rows * units * 4, name, "meta", 0) && check_buffer(&out, rows * k * 2, name, "out", 1);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        IEEE_BEGIN
        found = dequantize_rows((const uint8_t *)codes.buf, (const uint8_t *)meta.buf, (uint16_t *)out.buf, k,
                                row_start, row_stop);
        IEEE_END
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&meta);
    PyBuffer_Release(&out);
    return ok ? PyLong_FromSsize_t(found) : NULL;
}

/* ---- quantize_many: many tensors in one call, rows spread over threads ---------------------------- */

typedef struct {
    Py_buffer src, divisor, codes, meta;
    int have_divisor;
    Py_ssize_t rows, k;
    Py_ssize_t nan; /* -1, or the smallest flat NaN index found (atomic min) */
} Job;

typedef struct {
    Job *jobs;
    Py_ssize_t *item_job, *item_start, *item_stop;
    Py_ssize_t items;
    Py_ssize_t next; /* next item to take (atomic) */
} Work;

static void *work_items(void *arg) {
    Work *work = (Work *)arg;
    IEEE_BEGIN
    for (;;) {
        const Py_ssize_t item = __atomic_fetch_add(&work->next, 1, __ATOMIC_RELAXED);
        if (item >= work->items) break;
        Job *job = &work->jobs[work->item_job[item]];
        const Py_ssize_t found = quantize_rows((const uint16_t *)job->src.buf,
                                               job->have_divisor ? (const uint16_t *)job->divisor.buf : NULL,
                                               (uint8_t *)job->codes.buf, (uint8_t *)job->meta.buf, job->k,
                                               work->item_start[item], work->item_stop[item]);
        if (found >= 0) {
            Py_ssize_t current = __atomic_load_n(&job->nan, __ATOMIC_RELAXED);
            while ((current < 0 || found < current)
                   && !__atomic_compare_exchange_n(&job->nan, &current, found, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            }
        }
    }
    IEEE_END
    return NULL;
}

static void release_jobs(Job *jobs, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (jobs[i].src.obj) PyBuffer_Release(&jobs[i].src);
        if (jobs[i].divisor.obj) PyBuffer_Release(&jobs[i].divisor);
        if (jobs[i].codes.obj) PyBuffer_Release(&jobs[i].codes);
        if (jobs[i].meta.obj) PyBuffer_Release(&jobs[i].meta);
    }
    PyMem_Free(jobs);
}

#define MAX_THREADS 256
#define ITEM_ELEMENTS (1 << 16) /* rows per work item: about this many elements */

static PyObject *quantize_many(PyObject *self, PyObject *args) {
    PyObject *sequence;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oi", &sequence, &threads)) return NULL;
    PyObject *list = PySequence_Fast(sequence, "quantize_many: expected a list of jobs");
    if (list == NULL) return NULL;
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(list);
    if (threads < 1 || threads > MAX_THREADS) threads = threads < 1 ? 1 : MAX_THREADS;
    Job *jobs = PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(Job));
    if (jobs == NULL) { Py_DECREF(list); return PyErr_NoMemory(); }
    Py_ssize_t items = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Job *job = &jobs[i];
        PyObject *divisor_object, *item = PySequence_Fast_GET_ITEM(list, i);
        job->nan = -1;
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "quantize_many: job %zd: a job is (src, divisor, codes, meta, rows, k)", i);
            goto fail;
        }
        if (!PyArg_ParseTuple(item, "y*Ow*w*nn;quantize_many: a job is (src, divisor, codes, meta, rows, k)",
                              &job->src, &divisor_object, &job->codes, &job->meta, &job->rows, &job->k))
            goto fail;
        job->have_divisor = divisor_object != Py_None;
        if (job->have_divisor && PyObject_GetBuffer(divisor_object, &job->divisor, PyBUF_SIMPLE) != 0) goto fail;
        char name[48];
        snprintf(name, sizeof name, "quantize_many: job %zd", i);
        if (!check_shape(job->rows, job->k, 0, job->rows, name)) goto fail;
        const Py_ssize_t units = (job->k + UNIT - 1) / UNIT;
        if (!check_buffer(&job->src, job->rows * job->k * 2, name, "src", 1) ||
            !check_buffer(&job->codes, job->rows * units * (UNIT / 2), name, "codes", 0) ||
            !check_buffer(&job->meta, job->rows * units * 4, name, "meta", 0) ||
            (job->have_divisor && !check_buffer(&job->divisor, job->k * 2, name, "divisor", 1)))
            goto fail;
        const Py_ssize_t step = ITEM_ELEMENTS / job->k > 0 ? ITEM_ELEMENTS / job->k : 1;
        items += (job->rows + step - 1) / step;
    }
    Work work = {jobs, NULL, NULL, NULL, items, 0};
    work.item_job = PyMem_Malloc(3 * (size_t)(items > 0 ? items : 1) * sizeof(Py_ssize_t));
    if (work.item_job == NULL) { PyErr_NoMemory(); goto fail; }
    work.item_start = work.item_job + items;
    work.item_stop = work.item_start + items;
    for (Py_ssize_t i = 0, item = 0; i < count; i++) {
        const Py_ssize_t step = ITEM_ELEMENTS / jobs[i].k > 0 ? ITEM_ELEMENTS / jobs[i].k : 1;
        for (Py_ssize_t start = 0; start < jobs[i].rows; start += step, item++) {
            work.item_job[item] = i;
            work.item_start[item] = start;
            work.item_stop[item] = start + step < jobs[i].rows ? start + step : jobs[i].rows;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_t helpers[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads && t <= items; t++) {
        if (pthread_create(&helpers[started], NULL, work_items, &work) != 0) break; /* fewer threads: still correct */
        started++;
    }
    work_items(&work);
    for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
    Py_END_ALLOW_THREADS
    PyMem_Free(work.item_job);
    PyObject *result = PyList_New(count);
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        PyObject *value = PyLong_FromSsize_t(jobs[i].nan);
        if (value == NULL) Py_CLEAR(result);
        else PyList_SET_ITEM(result, i, value);
    }
    release_jobs(jobs, count);
    Py_DECREF(list);
    return result;
fail:
    release_jobs(jobs, count);
    Py_DECREF(list);
    return NULL;
}

#include "_gemm.c" /* the integer HiF4 matrix product (spec 8): shares the encoder and the checks above */

/* Which of the target_clones copies the loader picked on this CPU (the same test GCC's dispatcher makes). */
static PyObject *instruction_set(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) \
    && !defined(HIF4_KERNEL_NO_CLONES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return PyUnicode_FromString("x86-64-v4 (AVX-512)");
    if (__builtin_cpu_supports("x86-64-v3")) return PyUnicode_FromString("x86-64-v3 (AVX2)");
    return PyUnicode_FromString("x86-64 (baseline)");
#else
    return PyUnicode_FromString("single-target");
#endif
}

/* The format constants this file declares, for the test that compares them with hif4fmt/codec/format.py
   (the one table of HiF4 facts; C cannot import it, so the test keeps the two in step). */
static PyObject *constants(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return Py_BuildValue("{s:i,s:i,s:i,s:d,s:d,s:d,s:i,s:i}", "unit", UNIT, "ec_per_unit", EC_GROUPS, "eb_per_unit",
                         EB_GROUPS, "toolkit_r7", (double)R7, "scale_min", (double)SCALE_MIN, "scale_max",
                         (double)SCALE_MAX, "ea_exponent_bias", EA_BIAS, "ea_reserved_code", 0xFF);
}

static PyMethodDef methods[] = {
    {"constants", constants, METH_NOARGS, "constants() -> the HiF4 format constants compiled in"},
    {"instruction_set", instruction_set, METH_NOARGS, "instruction_set() -> which vector code copy runs here"},
    {"quantize_bf16", quantize_bf16, METH_VARARGS,
     "quantize_bf16(src, divisor, codes, meta, rows, k, row_start, row_stop) -> -1 or the flat index of a NaN"},
    {"quantize_many", quantize_many, METH_VARARGS,
     "quantize_many(jobs, threads) -> [-1 or the flat index of a NaN, ...]; a job is "
     "(src, divisor, codes, meta, rows, k) as for quantize_bf16, all rows; rows are spread over threads"},
    {"dequantize_bf16", dequantize_bf16, METH_VARARGS,
     "dequantize_bf16(codes, meta, out, rows, k, row_start, row_stop) -> -1 or the flat index of a unit with Ea 0xFF"},
    {"fake_quantize_bf16", fake_quantize_bf16, METH_VARARGS,
     "fake_quantize_bf16(src, multiplier, out, rows, k, row_start, row_stop) -> None"},
    {"quantize_q_bf16", quantize_q_bf16, METH_VARARGS,
     "quantize_q_bf16(src, multiplier, q, scale, sum, rows, k, row_start, row_stop) -> None: HiF4(x * m) as int8 q, "
     "float32 unit scales value(Ea)/4 (NaN for a NaN unit) and int32 unit sums of q"},
    {"expand_q", expand_q, METH_VARARGS,
     "expand_q(codes, meta, q, scale, sum, rows, k, row_start, row_stop) -> -1 or the flat unit index of Ea 0xFF"},
    {"gemm_q", gemm_q, METH_VARARGS,
     "gemm_q(a_q, a_scale, a_sum, w_codes, w_meta, bias, out, m, n, k, out_bf16, isa, threads) -> the copy that ran"},
    {"gemm_instruction_sets", gemm_instruction_sets, METH_NOARGS,
     "gemm_instruction_sets() -> [(name, isa), ...]: the integer GEMM copies this CPU runs, best first"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "HiF4 toolkit encoder, one pass per unit.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) {
    init_q_lut();
    return PyModule_Create(&module);
}
