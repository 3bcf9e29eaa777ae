/* Pillow's antialiased resampling (Image.resize with a box, BILINEAR or BICUBIC) of an 8-bit RGB image, bit for
 * bit, written for SIMD: the serving decoder's resize + center crop, straight into the network's (3, S, S) layout.
 *
 * Pillow (libImaging/Resample.c) resamples in two separable passes, each rounding to 8 bits, with 22-bit
 * fixed-point coefficients and int32 sums; it loops pixel by pixel, tap by tap: ~1 ms for the 224x224 crop of a
 * 640x427 photo, a third of what decoding it costs. This file does the same integer arithmetic, so the result is
 * identical, vectorised:
 *   horizontal: 8 rows at a time, one per vector lane (the rows are transposed into lane order first), so each tap
 *               is one vector multiply-add whatever the tap positions;
 *   vertical:   along each output row, contiguous in x.
 * Integer sums are exact in any order, so lane order changes nothing. Which pass runs first does change the result
 * (the first rounds to 8 bits): the caller says which, as its Pillow does (ganet/kernels/resample.py).
 *
 * The coefficients come from resample.py, which computes them as Pillow does (double precision, Pillow's order of
 * operations) and checks this file against Pillow itself on first use. Only integers here: the library's
 * -ffast-math cannot change a result.
 *
 *   src       (H, W, 3) uint8, rows src_stride bytes apart
 *   bounds_h  (out_w, 2) int32: first source column and tap count of each output column; coeffs_h (out_w, ksize_h)
 *   bounds_v  (out_h, 2) int32: first source row and tap count of each output row;        coeffs_v (out_h, ksize_v)
 *   need_h / need_v: whether Pillow runs that pass (it skips one that maps the image onto itself)
 *   vertical_first: run the vertical pass first (when both run)
 *   dst       (3, out_h, out_w) uint8
 * Returns 0, or -1 when scratch memory cannot be allocated.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PRECISION_BITS (32 - 8 - 2) /* Pillow's: 8-bit pixels times 22-bit coefficients fit an int32 */
#define LANES 8

typedef int32_t v8i __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint8_t v8u __attribute__((vector_size(LANES)));

static inline v8i clip8(v8i v) { /* Pillow's clip8: v >> 22, saturated to 0..255 */
    v = v >> PRECISION_BITS;
    v &= (v8i)(v > 0);
    v8i over = (v8i)(v > 255);
    return (v & ~over) | (255 & over);
}

static inline v8i load8(const uint8_t *p) { /* 8 bytes -> 8 int32 lanes */
#ifdef __AVX2__ /* one vpmovzxbd; gcc spells the generic conversion byte by byte */
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8u v;
    memcpy(&v, p, LANES);
    return __builtin_convertvector(v, v8i);
#endif
}

static inline void store8(uint8_t *p, v8i v) { /* 8 int32 lanes (already 0..255) -> 8 bytes */
    const v8u b = __builtin_convertvector(v, v8u);
    memcpy(p, &b, LANES);
}

/* One block of up to 8 interleaved RGB rows (their first pixel is column col0; the taps read columns x0 .. x0 +
 * span) -> the same rows of a planar output (3, ., out_w), planes `plane` bytes apart. */
static void horizontal_block(const uint8_t *src, ptrdiff_t stride, int rows_left, int col0, int x0, int span,
                             uint8_t *lanes, uint8_t *block, const int32_t *bounds, const int32_t *coeffs, int ksize,
                             int out_w, uint8_t *tmp, ptrdiff_t plane) {
    /* lanes (span, 3, 8): lanes[(x * 3 + c) * 8 + i] = channel c of pixel x0 + x in row i: a pixel's taps are one
     * vector per channel. Past the image's last row, the last row repeats (computed, then dropped). */
    const uint8_t *row[LANES];
    for (int i = 0; i < LANES; i++)
        row[i] = src + (ptrdiff_t)(i < rows_left ? i : rows_left - 1) * stride + (ptrdiff_t)(x0 - col0) * 3;
    int x = 0;
#ifdef __SSE2__ /* 16 bytes of each row at a time, an 8 x 16 byte transpose in three rounds of unpacks */
    for (; x + 16 <= 3 * span; x += 16) {
        __m128i a[LANES], b[LANES];
        for (int i = 0; i < LANES; i++)
            a[i] = _mm_loadu_si128((const __m128i *)(row[i] + x));
        for (int i = 0; i < LANES; i += 2) { /* rows i, i+1 interleaved: bytes 0-7, then 8-15 */
            b[i] = _mm_unpacklo_epi8(a[i], a[i + 1]);
            b[i + 1] = _mm_unpackhi_epi8(a[i], a[i + 1]);
        }
        for (int i = 0; i < LANES; i += 4) { /* rows i..i+3: bytes 0-3, 4-7, 8-11, 12-15 */
            a[i] = _mm_unpacklo_epi16(b[i], b[i + 2]);
            a[i + 1] = _mm_unpackhi_epi16(b[i], b[i + 2]);
            a[i + 2] = _mm_unpacklo_epi16(b[i + 1], b[i + 3]);
            a[i + 3] = _mm_unpackhi_epi16(b[i + 1], b[i + 3]);
        }
        for (int j = 0; j < 4; j++) { /* rows 0..7 of bytes 4j..4j+3: two bytes per store */
            _mm_storeu_si128((__m128i *)(lanes + (ptrdiff_t)(x + 4 * j) * LANES), _mm_unpacklo_epi32(a[j], a[j + 4]));
            _mm_storeu_si128((__m128i *)(lanes + (ptrdiff_t)(x + 4 * j + 2) * LANES),
                             _mm_unpackhi_epi32(a[j], a[j + 4]));
        }
    }
#endif
    for (; x < 3 * span; x++)
        for (int i = 0; i < LANES; i++)
            lanes[x * LANES + i] = row[i][x];
    /* block (3, out_w, 8): the block's output, still in lane order */
    for (int xx = 0; xx < out_w; xx++) {
        const uint8_t *p = lanes + (ptrdiff_t)(bounds[2 * xx] - x0) * 3 * LANES;
        const int32_t *k = coeffs + (ptrdiff_t)xx * ksize;
        const int n = bounds[2 * xx + 1];
        v8i r = (v8i){0} + (1 << (PRECISION_BITS - 1)), g = r, b = r;
        for (int t = 0; t < n; t++, p += 3 * LANES) {
            const int32_t w = k[t];
            r += load8(p) * w;
            g += load8(p + LANES) * w;
            b += load8(p + 2 * LANES) * w;
        }
        store8(block + (ptrdiff_t)xx * LANES, clip8(r));
        store8(block + ((ptrdiff_t)out_w + xx) * LANES, clip8(g));
        store8(block + ((ptrdiff_t)2 * out_w + xx) * LANES, clip8(b));
    }
    const int valid = rows_left < LANES ? rows_left : LANES;
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < valid; i++) {
            const uint8_t *in = block + (ptrdiff_t)c * out_w * LANES + i;
            uint8_t *out = tmp + c * plane + (ptrdiff_t)i * out_w;
            for (int xx = 0; xx < out_w; xx++)
                out[xx] = in[xx * LANES];
        }
}

/* [*lo, *hi): the source pixels (columns or rows) that n outputs with these bounds read. */
static void tap_span(const int32_t *bounds, int n, int *lo, int *hi) {
    *lo = bounds[0], *hi = 0;
    for (int i = 0; i < n; i++) {
        if (bounds[2 * i] < *lo) *lo = bounds[2 * i];
        if (bounds[2 * i] + bounds[2 * i + 1] > *hi) *hi = bounds[2 * i] + bounds[2 * i + 1];
    }
}

/* The horizontal pass over `rows` interleaved rows -> planar out (3, rows, out_w), planes `plane` bytes apart. */
static int horizontal_pass(const uint8_t *src, ptrdiff_t stride, int rows, int col0, const int32_t *bounds,
                           const int32_t *coeffs, int ksize, int out_w, uint8_t *out, ptrdiff_t plane) {
    int x0, x1;
    tap_span(bounds, out_w, &x0, &x1);
    const int span = x1 - x0;
    /* (+ 1: never malloc(0), whose NULL would read as a failure) */
    uint8_t *lanes = malloc((size_t)3 * (size_t)span * LANES + 1), *block = malloc((size_t)3 * (size_t)out_w * LANES);
    if (!lanes || !block) {
        free(lanes);
        free(block);
        return -1;
    }
    for (int r = 0; r < rows; r += LANES)
        horizontal_block(src + (ptrdiff_t)r * stride, stride, rows - r, col0, x0, span, lanes, block, bounds, coeffs,
                         ksize, out_w, out + (ptrdiff_t)r * out_w, plane);
    free(block);
    free(lanes);
    return 0;
}

/* The vertical pass over rows of `width` bytes (any layout: it is the same for each byte column); output row yy
 * reads input rows bounds[2 yy] - shift, ... */
static int vertical_pass(const uint8_t *in, ptrdiff_t in_stride, int width, const int32_t *bounds, int shift,
                         const int32_t *coeffs, int ksize, int out_h, uint8_t *out, ptrdiff_t out_stride) {
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)width + 1);
    if (!acc) return -1;
    for (int yy = 0; yy < out_h; yy++) {
        const int ymin = bounds[2 * yy] - shift, n = bounds[2 * yy + 1];
        const int32_t *k = coeffs + (ptrdiff_t)yy * ksize;
        for (int x = 0; x < width; x++)
            acc[x] = 1 << (PRECISION_BITS - 1);
        for (int t = 0; t < n; t++) {
            const uint8_t *row = in + (ptrdiff_t)(ymin + t) * in_stride;
            const int32_t w = k[t];
            for (int x = 0; x < width; x++)
                acc[x] += row[x] * w;
        }
        uint8_t *o = out + (ptrdiff_t)yy * out_stride;
        for (int x = 0; x < width; x++) {
            const int32_t v = acc[x] >> PRECISION_BITS;
            o[x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
    free(acc);
    return 0;
}

__attribute__((visibility("default"))) int ganet_resample_rgb_chw(
    const uint8_t *src, int src_h, int src_w, ptrdiff_t src_stride,
    int need_h, const int32_t *bounds_h, const int32_t *coeffs_h, int ksize_h, int out_w,
    int need_v, const int32_t *bounds_v, const int32_t *coeffs_v, int ksize_v, int out_h,
    int vertical_first, uint8_t *dst) {
    const ptrdiff_t out_plane = (ptrdiff_t)out_h * out_w;
    int status = 0;
    uint8_t *tmp = NULL;
    if (need_h && need_v && vertical_first) {
        /* vertical over the columns the horizontal taps read -> interleaved (out_h, span, 3) -> horizontal */
        int x0, x1;
        tap_span(bounds_h, out_w, &x0, &x1);
        const int width = 3 * (x1 - x0);
        if (!(tmp = malloc((size_t)out_h * (size_t)width + 1))) return -1;
        status = vertical_pass(src + (ptrdiff_t)x0 * 3, src_stride, width, bounds_v, 0, coeffs_v, ksize_v, out_h,
                               tmp, width);
        if (!status)
            status = horizontal_pass(tmp, width, out_h, x0, bounds_h, coeffs_h, ksize_h, out_w, dst, out_plane);
    } else if (need_h) {
        /* horizontal over the rows the vertical taps read -> planar (3, rows, out_w) -> vertical, plane by plane */
        int first, last;
        tap_span(bounds_v, out_h, &first, &last);
        const int rows = need_v ? last - first : out_h;
        const ptrdiff_t plane = (ptrdiff_t)rows * out_w;
        if (!need_v) /* Pillow's vertical bounds then cover every row, once: write straight to dst */
            return horizontal_pass(src, src_stride, out_h, 0, bounds_h, coeffs_h, ksize_h, out_w, dst, out_plane);
        if (!(tmp = malloc((size_t)(3 * plane) + 1))) return -1;
        status = horizontal_pass(src + (ptrdiff_t)first * src_stride, src_stride, rows, 0, bounds_h, coeffs_h,
                                 ksize_h, out_w, tmp, plane);
        for (int c = 0; c < 3 && !status; c++)
            status = vertical_pass(tmp + c * plane, out_w, out_w, bounds_v, first, coeffs_v, ksize_v, out_h,
                                   dst + c * out_plane, out_w);
    } else {
        /* no horizontal pass: deinterleave (H, W, 3) -> (3, H, W), into dst when there is no vertical pass either */
        const ptrdiff_t plane = (ptrdiff_t)src_h * src_w;
        if (need_v && !(tmp = malloc((size_t)(3 * plane)))) return -1;
        uint8_t *planes = need_v ? tmp : dst;
        for (int y = 0; y < src_h; y++) {
            const uint8_t *row = src + (ptrdiff_t)y * src_stride;
            for (int x = 0; x < src_w; x++)
                for (int c = 0; c < 3; c++)
                    planes[c * plane + (ptrdiff_t)y * src_w + x] = row[3 * x + c];
        }
        for (int c = 0; c < 3 && need_v && !status; c++)
            status = vertical_pass(tmp + c * plane, src_w, src_w, bounds_v, 0, coeffs_v, ksize_v, out_h,
                                   dst + c * out_plane, out_w);
    }
    free(tmp);
    return status;
}
