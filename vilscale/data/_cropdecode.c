/* Decode only the part of a JPEG that a crop needs, scaled in the DCT domain, and resample it to the output.
 *
 * Why this exists: FFCV's decoder (and ours before it) decodes every pixel of the image and then resizes the
 * crop with OpenCV. A RandomResizedCrop with scale (0.08, 1) keeps 40-50 % of an image on average, and a large
 * crop of a large image is shrunk to 224 anyway. libjpeg-turbo's libjpeg API can
 *   - decode at 1/2, 1/4 or 1/8 scale in the DCT domain (reduced-size inverse DCTs, SIMD for 1/2 and 1/4),
 *   - skip the scanlines above the crop without inverse DCT, upsampling or colour conversion
 *     (jpeg_skip_scanlines) and stop after its last row (jpeg_abort_decompress),
 *   - decode only the columns of the crop (jpeg_crop_scanline; the left edge snaps to an iMCU boundary).
 * TurboJPEG's own API gains cropped decompression only in libjpeg-turbo 3.0 (tj3SetCroppingRegion), and its
 * 2.x crop (tjTransform, which FFCV's imdecode uses) re-encodes the cropped coefficients first: slower than a
 * full decode. The libjpeg calls above exist since libjpeg-turbo 1.5.
 *
 * The crop box is given in stored-image pixels and kept exactly, in floating point, at every scale: the
 * resampler reads the box [top, top + height) x [left, left + width) of the scaled image divided by the scale,
 * so crop geometry does not depend on the scale chosen. Downscaling averages source pixels by their area of
 * overlap with each output pixel (what OpenCV's INTER_AREA does on whole pixels); upscaling is bilinear.
 * Pixels outside the box are never read.
 *
 * The functions are called through ctypes from numba-compiled code (many decode threads at once): they keep no
 * state between calls except a per-thread scratch row, and never call into Python.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

/* Status codes (mirrored in vilscale/data/pipeline.py). */
#define VIL_OK 0
#define VIL_CORRUPT 1       /* libjpeg reported an error or a corrupt-data warning */
#define VIL_SIZE_MISMATCH 2 /* the JPEG's header does not have the size the shard's sample table says */
#define VIL_BAD_BOX 3       /* the crop box is not inside the image (a caller bug) */
#define VIL_NO_MEMORY 4

#define MAX_SCALE 8

/* The blending loops are compiled twice on x86-64 Linux (AVX2 and baseline SSE2) and the CPU picks one at load
 * time (an ifunc); elsewhere (arm64, musl) they are compiled once for the baseline. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} error_manager;

static void on_error(j_common_ptr cinfo) { longjmp(((error_manager *)cinfo->err)->jump, 1); }

/* libjpeg reports damaged entropy-coded data (bad Huffman codes, premature end of data, ...) as warnings
 * and carries on with grey blocks; a training sample decoded that way is wrong, so every warning fails. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) longjmp(((error_manager *)cinfo->err)->jump, 1);
}

/* One row of the vertical pass, reused by the calls of a thread. */
static _Thread_local float *scratch_row = NULL;
static _Thread_local size_t scratch_capacity = 0;

static float *row_buffer(size_t floats) {
    if (floats > scratch_capacity) {
        float *grown = (float *)realloc(scratch_row, floats * sizeof(float));
        if (grown == NULL) return NULL;
        scratch_row = grown;
        scratch_capacity = floats;
    }
    return scratch_row;
}

/* Resampling weights of one axis. Every output index o reads the `taps` consecutive source indices
 * first[o] .. first[o] + taps - 1 (all inside [lo, hi)) with weights w[o * taps + t], which sum to 1; outputs
 * that need fewer source pixels get zero weights, so that the blending loops have a fixed trip count and
 * no branch mispredicts. The box [a0, a1) is in source pixels. */
typedef struct {
    int taps;
    int *first;
    float *w;
} axis_t;

static int axis_taps(double a0, double a1, int lo, int hi, int n_out) {
    double step = (a1 - a0) / n_out;
    int taps = step >= 1.0 ? (int)ceil(step) + 1 : 2; /* [a, a + step) touches at most ceil(step) + 1 pixels */
    return taps < hi - lo ? taps : hi - lo;
}

static void axis_weights(double a0, double a1, int lo, int hi, int n_out, axis_t *axis) {
    double step = (a1 - a0) / n_out;
    int taps = axis->taps;
    for (int o = 0; o < n_out; o++) {
        float *wo = axis->w + (size_t)o * taps;
        int i0, n = 0;
        double w0, w1 = 0.0, total = 0.0;
        if (step >= 1.0) { /* area: overlap of [a, b) with each source pixel [i, i + 1) */
            double a = a0 + o * step, b = a + step;
            i0 = (int)floor(a);
            int i1 = (int)ceil(b);
            if (i0 < lo) i0 = lo;
            if (i1 > hi) i1 = hi;
            if (i1 - i0 > taps) i1 = i0 + taps;
            for (int i = i0; i < i1; i++) total += fmax(0.0, fmin(b, i + 1.0) - fmax(a, (double)i));
            if (i1 <= i0 || total <= 0.0) { /* only reachable through rounding at the box edge */
                i0 = i0 < hi ? i0 : hi - 1;
                n = 1;
                w0 = total = 1.0;
            } else {
                n = i1 - i0;
                w0 = fmax(0.0, fmin(b, i0 + 1.0) - a);
            }
            int start = i0 + taps > hi ? hi - taps : i0; /* keep the window inside [lo, hi) */
            for (int t = 0; t < taps; t++) wo[t] = 0.0f;
            wo[i0 - start] = (float)(w0 / total);
            for (int i = i0 + 1; i < i0 + n; i++)
                wo[i - start] = (float)(fmax(0.0, fmin(b, i + 1.0) - fmax(a, (double)i)) / total);
            axis->first[o] = start;
        } else { /* bilinear between the two nearest pixel centres */
            double c = a0 + (o + 0.5) * step - 0.5;
            if (c < lo) c = lo;
            if (c > hi - 1) c = hi - 1;
            i0 = (int)floor(c);
            w1 = c - i0;
            int start = i0 + taps > hi ? hi - taps : i0;
            for (int t = 0; t < taps; t++) wo[t] = 0.0f;
            wo[i0 - start] = (float)(1.0 - w1);
            if (i0 + 1 < hi) wo[i0 + 1 - start] = (float)w1;
            axis->first[o] = start;
        }
    }
}

/* row[j] = sum_t w[t] * lines[t][j]: the vertical pass, contiguous and vectorised (AVX2 where the CPU has it). */
VECTOR_CLONES static void blend_rows(const uint8_t *const *restrict lines,
                                                                         const float *restrict w, int taps,
                                                                         int len, float *restrict row) {
    const uint8_t *l0 = lines[0];
    float w0 = w[0];
    if (taps == 2) {
        const uint8_t *l1 = lines[1];
        float w1 = w[1];
        for (int j = 0; j < len; j++) row[j] = w0 * (float)l0[j] + w1 * (float)l1[j];
    } else if (taps == 3) {
        const uint8_t *l1 = lines[1], *l2 = lines[2];
        float w1 = w[1], w2 = w[2];
        for (int j = 0; j < len; j++) row[j] = w0 * (float)l0[j] + w1 * (float)l1[j] + w2 * (float)l2[j];
    } else {
        for (int j = 0; j < len; j++) row[j] = w0 * (float)l0[j];
        for (int t = 1; t < taps; t++) {
            const uint8_t *lt = lines[t];
            float wt = w[t];
            for (int j = 0; j < len; j++) row[j] += wt * (float)lt[j];
        }
    }
}

/* Four floats in one vector register (GCC/clang vector extension: SSE on x86-64, NEON on arm64). */
typedef float float4 __attribute__((vector_size(16)));

static inline float4 load4(const float *p) {
    float4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The horizontal pass of one output row, from the vertical pass's row (3 floats per pixel) into three planes
 * of n_out floats each (R, G, B; mirrored when `flip`). Each pixel is blended as one 4-float vector (R, G, B and
 * the next pixel's R), so `row` needs one float of padding. */
VECTOR_CLONES static void blend_columns(const float *restrict row,
                                                                            const axis_t *restrict x, int n_out,
                                                                            float *restrict blended, int flip) {
    int taps = x->taps;
    for (int o = 0; o < n_out; o++) {
        int p = flip ? n_out - 1 - o : o;
        const float *wx = x->w + (size_t)o * taps;
        const float *px = row + (size_t)x->first[o] * 3;
        float4 sum;
        if (taps == 2) {
            sum = wx[0] * load4(px) + wx[1] * load4(px + 3);
        } else if (taps == 3) {
            sum = wx[0] * load4(px) + wx[1] * load4(px + 3) + wx[2] * load4(px + 6);
        } else {
            sum = wx[0] * load4(px);
            for (int t = 1; t < taps; t++) sum += wx[t] * load4(px + 3 * t);
        }
        blended[p] = sum[0];
        blended[n_out + p] = sum[1];
        blended[2 * n_out + p] = sum[2];
    }
}

/* Round and saturate to 8 bits (vectorised: no branch per value). */
VECTOR_CLONES static void to_u8(const float *restrict values, int n,
                                                                    uint8_t *restrict dst) {
    for (int j = 0; j < n; j++) {
        int v = (int)(values[j] + 0.5f);
        v = v < 0 ? 0 : v;
        dst[j] = (uint8_t)(v > 255 ? 255 : v);
    }
}

/* Resample the box [y0, y1) x [x0, x1) of an RGB image (rows of `stride` bytes; rows [row_lo, row_hi) and
 * columns [col_lo, col_hi) may be read) to a 3 x out_h x out_w (CHW) image, mirrored left-right when `flip`. */
static int resample(const uint8_t *src, size_t stride, int row_lo, int row_hi, int col_lo, int col_hi, double y0,
                    double x0, double y1, double x1, uint8_t *out, int out_h, int out_w, int flip) {
    axis_t y = {axis_taps(y0, y1, row_lo, row_hi, out_h), NULL, NULL};
    axis_t x = {axis_taps(x0, x1, col_lo, col_hi, out_w), NULL, NULL};
    y.first = (int *)malloc(sizeof(int) * (size_t)out_h);
    x.first = (int *)malloc(sizeof(int) * (size_t)out_w);
    y.w = (float *)malloc(sizeof(float) * (size_t)out_h * y.taps);
    x.w = (float *)malloc(sizeof(float) * (size_t)out_w * x.taps);
    int cols = col_hi - col_lo;
    float *row = row_buffer((size_t)(cols + out_w) * 3 + 1), *blended = row + (size_t)cols * 3 + 1;
    const uint8_t **lines = (const uint8_t **)malloc(sizeof(uint8_t *) * (size_t)y.taps);
    int status = VIL_OK;
    if (!y.first || !x.first || !y.w || !x.w || !row || !lines) {
        status = VIL_NO_MEMORY;
        goto done;
    }
    axis_weights(y0, y1, row_lo, row_hi, out_h, &y);
    axis_weights(x0 - col_lo, x1 - col_lo, 0, cols, out_w, &x);
    for (int oy = 0; oy < out_h; oy++) {
        for (int t = 0; t < y.taps; t++) lines[t] = src + (size_t)(y.first[oy] + t) * stride + (size_t)col_lo * 3;
        blend_rows(lines, y.w + (size_t)oy * y.taps, y.taps, cols * 3, row);
        blend_columns(row, &x, out_w, blended, flip);
        for (int c = 0; c < 3; c++)
            to_u8(blended + (size_t)c * out_w, out_w, out + (size_t)c * out_h * out_w + (size_t)oy * out_w);
    }
done:
    free(y.first);
    free(x.first);
    free(y.w);
    free(x.w);
    free(lines);
    return status;
}

static int box_is_valid(int64_t height, int64_t width, int64_t top, int64_t left, int64_t crop_h, int64_t crop_w,
                        int64_t out_h, int64_t out_w) {
    return height > 0 && width > 0 && top >= 0 && left >= 0 && crop_h > 0 && crop_w > 0 && top + crop_h <= height &&
           left + crop_w <= width && out_h > 0 && out_w > 0;
}

/* The DCT-domain scale for a crop: the largest of 1, 2, 4, 8 that keeps the scaled crop at least as large as
 * the output on both sides, so the resampler only ever shrinks what was decoded at reduced size. */
int64_t vil_crop_scale(int64_t crop_h, int64_t crop_w, int64_t out_h, int64_t out_w) {
    int64_t scale = 1;
    while (scale < MAX_SCALE && crop_h >= 2 * scale * out_h && crop_w >= 2 * scale * out_w) scale *= 2;
    return scale;
}

/* Resample the box of an already decoded (raw) height x width x 3 image to a 3 x out_h x out_w image. */
int64_t vil_resize_box(const uint8_t *image, int64_t height, int64_t width, int64_t top, int64_t left,
                       int64_t crop_h, int64_t crop_w, uint8_t *out, int64_t out_h, int64_t out_w, int64_t flip) {
    if (!box_is_valid(height, width, top, left, crop_h, crop_w, out_h, out_w)) return VIL_BAD_BOX;
    return resample(image, (size_t)width * 3, (int)top, (int)(top + crop_h), (int)left, (int)(left + crop_w),
                    (double)top, (double)left, (double)(top + crop_h), (double)(left + crop_w), out, (int)out_h,
                    (int)out_w, (int)flip);
}

/* Decode the rows and columns of `jpeg` (size bytes, height x width) that the box needs, at the scale
 * vil_crop_scale picks, into `scratch` (at least height * width * 3 bytes), and resample the box to `out`
 * (3 x out_h x out_w).
 * Returns a VIL_* status; on failure `out` holds unspecified pixels. */
int64_t vil_crop_decode(const uint8_t *jpeg, uint64_t size, int64_t height, int64_t width, int64_t top,
                        int64_t left, int64_t crop_h, int64_t crop_w, uint8_t *out, int64_t out_h, int64_t out_w,
                        int64_t flip, uint8_t *scratch, uint64_t scratch_size) {
    if (!box_is_valid(height, width, top, left, crop_h, crop_w, out_h, out_w)) return VIL_BAD_BOX;
    struct jpeg_decompress_struct cinfo;
    error_manager err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    volatile int created = 0;
    if (setjmp(err.jump)) {
        if (created) jpeg_destroy_decompress(&cinfo);
        return VIL_CORRUPT;
    }
    jpeg_create_decompress(&cinfo);
    created = 1;
    jpeg_mem_src(&cinfo, (const unsigned char *)jpeg, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if ((int64_t)cinfo.image_height != height || (int64_t)cinfo.image_width != width) {
        jpeg_destroy_decompress(&cinfo);
        return VIL_SIZE_MISMATCH;
    }
    int64_t scale = vil_crop_scale(crop_h, crop_w, out_h, out_w);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST; /* what FFCV's decoder uses (TJFLAG_FASTDCT) */
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    jpeg_start_decompress(&cinfo);
    double y0 = (double)top / scale, y1 = (double)(top + crop_h) / scale;
    double x0 = (double)left / scale, x1 = (double)(left + crop_w) / scale;
    JDIMENSION row_lo = (JDIMENSION)floor(y0), row_hi = (JDIMENSION)ceil(y1);
    JDIMENSION col_lo = (JDIMENSION)floor(x0), col_hi = (JDIMENSION)ceil(x1);
    if (row_hi > cinfo.output_height) row_hi = cinfo.output_height;
    if (col_hi > cinfo.output_width) col_hi = cinfo.output_width;
    JDIMENSION x_offset = col_lo, crop_width = col_hi - col_lo;
    if (crop_width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x_offset, &crop_width);
    else x_offset = 0;
    size_t stride = (size_t)cinfo.output_width * cinfo.output_components;
    if (cinfo.output_components != 3 || stride * (row_hi - row_lo) > scratch_size) {
        jpeg_destroy_decompress(&cinfo);
        return VIL_NO_MEMORY;
    }
    if (row_lo > 0) jpeg_skip_scanlines(&cinfo, row_lo);
    while (cinfo.output_scanline < row_hi) {
        JSAMPROW rows[4];
        JDIMENSION base = cinfo.output_scanline - row_lo, want = row_hi - cinfo.output_scanline;
        if (want > 4) want = 4;
        for (JDIMENSION r = 0; r < want; r++) rows[r] = scratch + (size_t)(base + r) * stride;
        jpeg_read_scanlines(&cinfo, rows, want);
    }
    jpeg_abort_decompress(&cinfo); /* the rows below the crop are never decoded */
    jpeg_destroy_decompress(&cinfo);
    created = 0;
    return resample(scratch, stride, 0, (int)(row_hi - row_lo), (int)(col_lo - x_offset), (int)(col_hi - x_offset),
                    y0 - row_lo, x0 - x_offset, y1 - row_lo, x1 - x_offset, out, (int)out_h, (int)out_w, (int)flip);
}

/* HWC -> CHW, for the images that OpenCV resized (height x width x 3 -> 3 x height x width). */
void vil_hwc_to_chw(const uint8_t *restrict src, int64_t height, int64_t width, uint8_t *restrict dst) {
    size_t plane = (size_t)height * width;
    for (size_t i = 0; i < plane; i++) {
        dst[i] = src[3 * i];
        dst[plane + i] = src[3 * i + 1];
        dst[2 * plane + i] = src[3 * i + 2];
    }
}

/* An importable module, so that the build can be found with importlib; the functions are called through
 * ctypes (numba calls ctypes functions without the GIL), not through Python. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode",
                                    "vilscale's JPEG crop decoder (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__cropdecode(void) { return PyModule_Create(&module); }
