/* The calibration sketch update in one pass (spec/stats-v1.md section 3.1), for CPU activations.
 *
 * update(src, dtype, rows, channels, counts, count_bytes, absmax, absmin, nonfinite,
 *        shift, first_code, bins, threads) -> None
 *
 *   src        contiguous (rows, channels) activations: dtype 0 = float32, 1 = bfloat16, 2 = float16
 *   counts     (channels, bins) int64 (count_bytes 8) or int32 (count_bytes 4), added to in place
 *   absmax     (channels,) float32 read and written as its bit pattern (non-negative, <= +inf)
 *   absmin     (channels,) float32, the same
 *   nonfinite  (channels,) int64, added to
 *   shift      23 - mantissa_bits;  first_code  (127 + exponent_min) << mantissa_bits;  bins  the grid's
 *
 * Per element: a = bits(float32(x)) & 0x7FFFFFFF (bfloat16 and float16 widen exactly, by bit
 * manipulation), bin = clamp((a >> shift) - first_code + 1, 0, bins - 1); max and min over a clamped to
 * 0x7F800000 (NaN counts as +inf); non-finite = a >= 0x7F800000. Integer only: the result does not
 * depend on rounding modes or compiler flags. The caller guarantees int32 counts cannot pass 2^31 - 1
 * (hif4fmt/calibration/sketch.py promotes them to int64 before that).
 *
 * Threads split the channels (each thread owns whole channel tiles and writes only their counts), so no
 * atomics are needed and the result does not depend on the thread count. The GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define ABS_MASK 0x7FFFFFFFu
#define INF_BITS 0x7F800000u
#define TILE 64 /* channels per tile: its counts (64 x 258 x 8 = 132 KB) stay in L2 */
#define MAX_THREADS 256

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2 };

/* |x| of a float16 as float32 bits, exactly (normals, subnormals, zero, inf, NaN). */
static inline uint32_t half_abs_bits(uint16_t h) {
    uint32_t a = h & 0x7FFFu, exponent = a >> 10, mantissa = a & 0x3FFu;
    if (exponent == 0x1Fu) return INF_BITS | (mantissa << 13); /* inf, or a NaN (above INF_BITS) */
    if (exponent != 0) return ((exponent + 112u) << 23) | (mantissa << 13); /* 127 - 15 = 112 */
    if (mantissa == 0) return 0;
    /* subnormal: mantissa x 2^-24; leading bit p in [0, 9] gives 2^(p - 24) */
    int p = 31 - __builtin_clz(mantissa);
    return ((uint32_t)(p - 24 + 127) << 23) | ((mantissa << (23 - p)) & 0x7FFFFFu);
}

typedef struct {
    const void *src;
    int dtype;
    Py_ssize_t rows, channels;
    void *counts;
    int count_bytes;
    uint32_t *absmax, *absmin;
    int64_t *nonfinite;
    int shift;
    int64_t first_code;
    Py_ssize_t bins;
    Py_ssize_t tile_start, tile_stop; /* this worker's tiles */
} Work;

#define LOAD_FLOAT32(i) (f32[i] & ABS_MASK)
#define LOAD_BFLOAT16(i) (((uint32_t)(u16[i] & 0x7FFFu)) << 16) /* bfloat16 = the top half of float32 */
#define LOAD_FLOAT16(i) half_abs_bits(u16[i])

/* One tile of channels [c0, c0 + width) over every row. COUNT: int64_t or int32_t; LOAD: one of the above. */
#define TILE_BODY(COUNT, LOAD)                                                                        \
    do {                                                                                              \
        COUNT *counts = (COUNT *)w->counts;                                                           \
        for (Py_ssize_t r = 0; r < w->rows; r++) {                                                    \
            Py_ssize_t base = r * w->channels + c0;                                                   \
            for (Py_ssize_t j = 0; j < width; j++) {                                                  \
                uint32_t a = LOAD(base + j);                                                          \
                top[j] = a > top[j] ? a : top[j];                                                     \
                bottom[j] = a < bottom[j] ? a : bottom[j];                                            \
                bad[j] += a >= INF_BITS;                                                              \
                int64_t index = (int64_t)(a >> w->shift) - w->first_code + 1;                         \
                index = index < 0 ? 0 : (index > last ? last : index);                                \
                counts[(c0 + j) * w->bins + index] += 1;                                              \
            }                                                                                         \
        }                                                                                             \
    } while (0)

static void run_tile(const Work *w, Py_ssize_t tile) {
    Py_ssize_t c0 = tile * TILE, width = w->channels - c0 < TILE ? w->channels - c0 : TILE;
    int64_t last = (int64_t)w->bins - 1;
    const uint32_t *f32 = (const uint32_t *)w->src;
    const uint16_t *u16 = (const uint16_t *)w->src;
    uint32_t top[TILE], bottom[TILE];
    int64_t bad[TILE];
    for (Py_ssize_t j = 0; j < width; j++) {
        top[j] = 0;
        bottom[j] = 0xFFFFFFFFu;
        bad[j] = 0;
    }
    if (w->dtype == DTYPE_BFLOAT16) {
        if (w->count_bytes == 8) TILE_BODY(int64_t, LOAD_BFLOAT16); else TILE_BODY(int32_t, LOAD_BFLOAT16);
    } else if (w->dtype == DTYPE_FLOAT16) {
        if (w->count_bytes == 8) TILE_BODY(int64_t, LOAD_FLOAT16); else TILE_BODY(int32_t, LOAD_FLOAT16);
    } else {
        if (w->count_bytes == 8) TILE_BODY(int64_t, LOAD_FLOAT32); else TILE_BODY(int32_t, LOAD_FLOAT32);
    }
    for (Py_ssize_t j = 0; j < width; j++) {
        uint32_t t = top[j] > INF_BITS ? INF_BITS : top[j];
        uint32_t b = bottom[j] > INF_BITS ? INF_BITS : bottom[j];
        if (t > w->absmax[c0 + j]) w->absmax[c0 + j] = t;
        if (b < w->absmin[c0 + j]) w->absmin[c0 + j] = b;
        w->nonfinite[c0 + j] += bad[j];
    }
}

static void *run_tiles(void *argument) {
    const Work *w = (const Work *)argument;
    for (Py_ssize_t tile = w->tile_start; tile < w->tile_stop; tile++) run_tile(w, tile);
    return NULL;
}

static int check_size(const Py_buffer *buffer, Py_ssize_t expected, const char *name) {
    if (buffer->len != expected) {
        PyErr_Format(PyExc_ValueError, "_sketch_kernel.update: %s holds %zd bytes, expected %zd", name,
                     buffer->len, expected);
        return -1;
    }
    return 0;
}

static PyObject *update(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src = {0}, counts = {0}, absmax = {0}, absmin = {0}, nonfinite = {0};
    int dtype, count_bytes, shift, threads;
    Py_ssize_t rows, channels, bins;
    long long first_code;
    if (!PyArg_ParseTuple(args, "y*innw*iw*w*w*iLni", &src, &dtype, &rows, &channels, &counts, &count_bytes,
                          &absmax, &absmin, &nonfinite, &shift, &first_code, &bins, &threads))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t element = dtype == DTYPE_FLOAT32 ? 4 : 2;
    if (dtype < DTYPE_FLOAT32 || dtype > DTYPE_FLOAT16 || (count_bytes != 4 && count_bytes != 8) || rows < 0
        || channels <= 0 || bins < 2 || shift < 13 || shift > 23 || channels > PY_SSIZE_T_MAX / (bins * 8)
        || (rows > 0 && channels > PY_SSIZE_T_MAX / (rows * element))) {
        PyErr_SetString(PyExc_ValueError, "_sketch_kernel.update: invalid dtype, count width, shape or grid");
        goto done;
    }
    if (check_size(&src, rows * channels * element, "src") || check_size(&counts, channels * bins * count_bytes, "counts")
        || check_size(&absmax, channels * 4, "absmax") || check_size(&absmin, channels * 4, "absmin")
        || check_size(&nonfinite, channels * 8, "nonfinite"))
        goto done;
    if (rows > 0) {
        Py_ssize_t tiles = (channels + TILE - 1) / TILE;
        if (threads < 1) threads = 1;
        if (threads > MAX_THREADS) threads = MAX_THREADS;
        if (threads > tiles) threads = (int)tiles;
        Work works[MAX_THREADS];
        pthread_t helpers[MAX_THREADS];
        Py_BEGIN_ALLOW_THREADS
        for (int t = 0; t < threads; t++) {
            Work *w = &works[t];
            w->src = src.buf;
            w->dtype = dtype;
            w->rows = rows;
            w->channels = channels;
            w->counts = counts.buf;
            w->count_bytes = count_bytes;
            w->absmax = (uint32_t *)absmax.buf;
            w->absmin = (uint32_t *)absmin.buf;
            w->nonfinite = (int64_t *)nonfinite.buf;
            w->shift = shift;
            w->first_code = first_code;
            w->bins = bins;
            w->tile_start = tiles * t / threads;
            w->tile_stop = tiles * (t + 1) / threads;
        }
        int started = 0;
        for (; started < threads - 1; started++) /* the calling thread runs the last share itself */
            if (pthread_create(&helpers[started], NULL, run_tiles, &works[started]) != 0) break;
        for (int t = started; t < threads; t++) run_tiles(&works[t]); /* shares no helper took: still exact */
        for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&absmax);
    PyBuffer_Release(&absmin);
    PyBuffer_Release(&nonfinite);
    return result;
}

static PyMethodDef methods[] = {
    {"update", update, METH_VARARGS,
     "update(src, dtype, rows, channels, counts, count_bytes, absmax, absmin, nonfinite, shift, first_code, "
     "bins, threads): add a (rows, channels) activation block to a per-channel sketch (spec/stats-v1.md 3.1)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sketch_kernel",
                                    "The compiled calibration sketch update (spec/stats-v1.md 3.1).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sketch_kernel(void) { return PyModule_Create(&module); }
