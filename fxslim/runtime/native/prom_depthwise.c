/* PROM's 3×3 depthwise convs on u8 NHWC codes, for the direct runtime's plans (prom_direct.py).
 *
 * oneDNN 3.2's int8 depthwise kernel was a third of MobileNetV2's conv time at batch 1. Here a block of
 * 64 channels (of 32 or fewer: two outputs' in one vector) of one input column is loaded once, its three
 * rows' bytes interleaved per channel, and one vpdpbusd then adds three taps of 16 channels to an output;
 * each column feeds every output of a row tile whose window holds it. Without AVX-512 VNNI the portable
 * form runs (slower than oneDNN: prom_depthwise_vectorized() says which form this build has).
 *
 * Arithmetic, the same as the oneDNN conv the plan would run (u8 src with zero point zx, s8 weights,
 * per-channel scales, f32 bias, optional ReLU, u8 dst with zero point zd):
 *   acc  = sum over the taps inside the input of (x - zx) * w      (an integer: padding adds 0)
 *   real = acc * scale[c] + bias[c], then max(real, 0) with ReLU   (scale = fl32(src scale * w scale))
 *   code = saturate_u8(round_half_even(real * inverse + zd))       (inverse = fl32(1 / dst scale))
 * acc is exact in float32: |x - zx| <= 255, |w| <= 128, 9 taps: below 2^24, so sums in any order agree.
 */
#include <stdint.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VECTOR 1
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *src;  /* [n, h, w, c] u8 codes, channels innermost, contiguous */
    uint8_t *dst;        /* [n, oh, ow, c] */
    const float *weight; /* [9, c]: w[kh * 3 + kw][c] as floats */
    const float *scale;  /* [c] */
    const float *bias;   /* [c] */
    /* the same constants per block of 64 channels, in the lane order of the quad vectors (quad_lanes) */
    const int8_t *quads;    /* [blocks, 3 (kw), 4 (quarter), 16 lanes, 4]: w[0][kw], w[1][kw], w[2][kw], 0 */
    const float *scale4;    /* [blocks, 4, 16] */
    const float *bias4;     /* [blocks, 4, 16] */
    const int32_t *taps4;   /* [blocks, 3 (kh), 3 (kw), 4, 16]: w[kh][kw] */
    int64_t n, h, w, c, oh, ow, stride, pad, relu;
    float src_zero_point, inverse, dst_zero_point;
} prom_dw_params;

/* One output code from its real value (the conv's requantization). */
static inline uint8_t requantize(float acc, float scale, float bias, const prom_dw_params *p) {
    float real = fmaf(acc, scale, bias);
    if (p->relu && !(real > 0.0f))
        real = 0.0f;
    float q = rintf(fmaf(real, p->inverse, p->dst_zero_point));
    return (uint8_t)(q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q));
}

/* Output (y, x) of sample b, one channel at a time: the portable form. */
static void pixel_scalar(const prom_dw_params *p, int64_t b, int64_t y, int64_t x) {
    const int64_t c = p->c;
    uint8_t *out = p->dst + ((b * p->oh + y) * p->ow + x) * c;
    for (int64_t k = 0; k < c; ++k) {
        float acc = 0.0f;
        for (int64_t kh = 0; kh < 3; ++kh) {
            int64_t iy = y * p->stride - p->pad + kh;
            if (iy < 0 || iy >= p->h)
                continue;
            const uint8_t *row = p->src + ((b * p->h + iy) * p->w) * c;
            for (int64_t kw = 0; kw < 3; ++kw) {
                int64_t ix = x * p->stride - p->pad + kw;
                if (ix >= 0 && ix < p->w)
                    acc += ((float)row[ix * c + k] - p->src_zero_point) * p->weight[(kh * 3 + kw) * c + k];
            }
        }
        out[k] = requantize(acc, p->scale[k], p->bias[k], p);
    }
}

#ifdef VECTOR
/* Outputs of a row computed together (their windows overlap): TILE vectors of 64 channels of one output each,
 * or PAIRS vectors of two outputs' 32 channels or fewer each. */
enum { TILE = 4, PAIRS = 4 };

/* The three rows' bytes r[kh] of a column interleaved per channel (two unpacks of bytes, two of words), so that
 * one vpdpbusd adds the column's three taps of 16 channels to an output. The lanes come out permuted within 128
 * bits (quad_lanes in prom_depthwise.py); to_codes' packs back to bytes restore the order. */
static inline __attribute__((always_inline)) void interleave(const __m512i r[3], __m512i quad[4]) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lo01 = _mm512_unpacklo_epi8(r[0], r[1]), hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
    const __m512i lo2 = _mm512_unpacklo_epi8(r[2], zero), hi2 = _mm512_unpackhi_epi8(r[2], zero);
    quad[0] = _mm512_unpacklo_epi16(lo01, lo2);
    quad[1] = _mm512_unpackhi_epi16(lo01, lo2);
    quad[2] = _mm512_unpacklo_epi16(hi01, hi2);
    quad[3] = _mm512_unpackhi_epi16(hi01, hi2);
}

/* The 64 codes of the sums acc[4] (the conv's requantization, per lane scale and bias). Quarter k of 128-bit
 * lane L holds channels 16L + 4k .. 16L + 4k + 3: the packs put them in order, saturating to 0..255. */
static inline __attribute__((always_inline)) __m512i to_codes(const prom_dw_params *p, const __m512i acc[4],
                                                           const __m512 scale[4], const __m512 bias[4]) {
    const __m512 inverse = _mm512_set1_ps(p->inverse), zd = _mm512_set1_ps(p->dst_zero_point);
    __m512i q[4];
    for (int k = 0; k < 4; ++k) {
        __m512 real = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[k]), scale[k], bias[k]);
        if (p->relu)
            real = _mm512_max_ps(real, _mm512_setzero_ps()); /* NaN cannot occur: the inputs are codes */
        q[k] = _mm512_cvtps_epi32(_mm512_fmadd_ps(real, inverse, zd)); /* half to even */
    }
    return _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
}

/* rows[kh]: where row kh of output row y's windows starts in sample b, at channel c0 (NULL outside the input). */
static inline __attribute__((always_inline)) void window_rows(const prom_dw_params *p, int64_t b, int64_t y,
                                                           int64_t c0, const uint8_t *rows[3]) {
    for (int64_t kh = 0; kh < 3; ++kh) {
        int64_t iy = y * p->stride - p->pad + kh;
        rows[kh] = iy >= 0 && iy < p->h ? p->src + ((b * p->h + iy) * p->w) * p->c + c0 : NULL;
    }
}

/* Both 256-bit halves of v set to its low one. */
static inline __m512i low_twice(__m512i v) {
    return _mm512_shuffle_i64x2(v, v, 0x44);
}

/* Outputs x0 .. x0 + count - 1 (count <= TILE) of row y, channels c0 .. c0 + 63, in integers: each input column
 * is read and interleaved once, then feeds every output of the tile whose window holds it. Rows and columns
 * outside the input read as zeros, and each output starts from minus zx times the sum of the weights of its
 * taps inside: corr (all the row's taps inside) plus zcol[kw] per column kw outside. mask: the block's
 * channels (all of them but in the last block). checked: whether some window may leave the input's columns;
 * s: the stride. Both are constants in interior tiles, which then run without the checks and with the column
 * loop unrolled (10-15 % faster than a run-time stride on MobileNetV2's layers). */
static inline __attribute__((always_inline)) void tile_512(const prom_dw_params *p, int64_t b, int64_t y, int64_t x0,
                                                        const int count, const int checked, const int64_t s,
                                                        int64_t c0, __mmask64 mask, const __m512i corr[4],
                                                        const __m512i zcol[3][4]) {
    const int64_t c = p->c, block = c0 / 64, left = x0 * s - p->pad;
    const int full = mask == ~(__mmask64)0;
    const uint8_t *rows[3];
    window_rows(p, b, y, c0, rows);
    const int8_t *quads = p->quads + block * 3 * 4 * 64; /* [kw][quarter][64] */
    __m512i acc[TILE][4];
    for (int t = 0; t < count; ++t)
        for (int q = 0; q < 4; ++q) {
            acc[t][q] = corr[q];
            for (int kw = 0; kw < 3 && checked; ++kw) {
                int64_t ix = left + t * s + kw;
                if (ix < 0 || ix >= p->w)
                    acc[t][q] = _mm512_add_epi32(acc[t][q], zcol[kw][q]);
            }
        }
    const int columns = (int)((count - 1) * s + 3);
    for (int j = 0; j < columns; ++j) {
        const int64_t ix = left + j;
        const int inside = !checked || (ix >= 0 && ix < p->w);
        __m512i r[3], quad[4];
        for (int kh = 0; kh < 3; ++kh)
            r[kh] = !rows[kh] || !inside ? _mm512_setzero_si512()
                    : full               ? _mm512_loadu_si512(rows[kh] + ix * c)
                                         : _mm512_maskz_loadu_epi8(mask, rows[kh] + ix * c);
        interleave(r, quad);
        for (int t = 0; t < TILE; ++t) {
            int kw = j - (int)(t * s);
            if (t >= count || kw < 0 || kw > 2)
                continue;
            for (int q = 0; q < 4; ++q)
                acc[t][q] = _mm512_dpbusd_epi32(acc[t][q], quad[q], _mm512_loadu_si512(quads + (kw * 4 + q) * 64));
        }
    }
    __m512 scale[4], bias[4];
    for (int k = 0; k < 4; ++k) {
        scale[k] = _mm512_loadu_ps(p->scale4 + block * 64 + 16 * k);
        bias[k] = _mm512_loadu_ps(p->bias4 + block * 64 + 16 * k);
    }
    uint8_t *out = p->dst + ((b * p->oh + y) * p->ow + x0) * c + c0;
    for (int t = 0; t < count; ++t) {
        __m512i bytes = to_codes(p, acc[t], scale, bias);
        if (full)
            _mm512_storeu_si512(out + t * c, bytes);
        else
            _mm512_mask_storeu_epi8(out + t * c, mask, bytes);
    }
}

/* tile_512 for a block of 32 channels or fewer (mask), count <= 2 * PAIRS: two outputs per vector, output
 * x0 + 2i in the low 256 bits of vector i and x0 + 2i + 1 in the high ones, so that a narrow block fills whole
 * vectors (the first 32 channels of a block's constants, the low half of each of its vectors, serve both).
 * Vector i's tap kw reads column left + 2is + kw in its low half and the column s further in its high half:
 * where the block is 32 channels of 32 and s is 1, both in one load of 64 bytes. */
static inline __attribute__((always_inline)) void tile_pair(const prom_dw_params *p, int64_t b, int64_t y, int64_t x0,
                                                         const int count, const int checked, const int64_t s,
                                                         int64_t c0, __mmask32 mask, const __m512i corr[4],
                                                         const __m512i zcol[3][4]) {
    const int64_t c = p->c, block = c0 / 64, left = x0 * s - p->pad;
    const int adjacent = !checked && s == 1 && c == 32; /* the two outputs' columns and codes are adjacent */
    const int pairs = (count + 1) / 2;
    const uint8_t *rows[3];
    window_rows(p, b, y, c0, rows);
    const int8_t *quads = p->quads + block * 3 * 4 * 64;
    __m512i weight[3][4];
    for (int kw = 0; kw < 3; ++kw)
        for (int q = 0; q < 4; ++q)
            weight[kw][q] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(quads + (kw * 4 + q) * 64)));
    __m512i acc[PAIRS][4];
    for (int i = 0; i < pairs; ++i)
        for (int q = 0; q < 4; ++q) {
            acc[i][q] = low_twice(corr[q]);
            for (int h = 0; h < 2 && checked; ++h)
                for (int kw = 0; kw < 3; ++kw) {
                    int64_t ix = left + (2 * i + h) * s + kw;
                    if (ix < 0 || ix >= p->w)
                        acc[i][q] = _mm512_mask_add_epi32(acc[i][q], h ? 0xFF00 : 0x00FF, acc[i][q],
                                                          low_twice(zcol[kw][q]));
                }
        }
    const int positions = (int)(2 * (pairs - 1) * s + 3);
    for (int j = 0; j < positions; ++j) {
        if (s == 2 && (j & 3) == 3)
            continue; /* vector i reads positions 4i .. 4i + 2 */
        const int64_t ix = left + j;
        __m512i r[3], quad[4];
        for (int kh = 0; kh < 3; ++kh) {
            if (!rows[kh]) {
                r[kh] = _mm512_setzero_si512();
            } else if (adjacent) {
                r[kh] = _mm512_loadu_si512(rows[kh] + ix * c);
            } else { /* a half whose column is outside reads zeros (or belongs to an output past count) */
                const __m256i zero = _mm256_setzero_si256();
                __m256i low = !checked || (ix >= 0 && ix < p->w)
                                  ? _mm256_maskz_loadu_epi8(mask, rows[kh] + ix * c) : zero;
                __m256i high = !checked || (ix + s >= 0 && ix + s < p->w)
                                   ? _mm256_maskz_loadu_epi8(mask, rows[kh] + (ix + s) * c) : zero;
                r[kh] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
            }
        }
        interleave(r, quad);
        for (int i = 0; i < PAIRS; ++i) {
            int kw = j - (int)(2 * i * s);
            if (i >= pairs || kw < 0 || kw > 2)
                continue;
            for (int q = 0; q < 4; ++q)
                acc[i][q] = _mm512_dpbusd_epi32(acc[i][q], quad[q], weight[kw][q]);
        }
    }
    __m512 scale[4], bias[4];
    for (int k = 0; k < 4; ++k) {
        const int64_t at = block * 64 + 16 * k;
        scale[k] = _mm512_castsi512_ps(low_twice(_mm512_castps_si512(_mm512_loadu_ps(p->scale4 + at))));
        bias[k] = _mm512_castsi512_ps(low_twice(_mm512_castps_si512(_mm512_loadu_ps(p->bias4 + at))));
    }
    uint8_t *out = p->dst + ((b * p->oh + y) * p->ow + x0) * c + c0;
    for (int i = 0; i < pairs; ++i) {
        __m512i bytes = to_codes(p, acc[i], scale, bias);
        if (adjacent) {
            _mm512_storeu_si512(out + 2 * i * c, bytes);
            continue;
        }
        _mm256_mask_storeu_epi8(out + 2 * i * c, mask, _mm512_castsi512_si256(bytes));
        if (2 * i + 1 < count)
            _mm256_mask_storeu_epi8(out + (2 * i + 1) * c, mask, _mm512_extracti64x4_epi64(bytes, 1));
    }
}

/* The outputs of row y from `from` to end (exclusive) in checked tiles of `step` outputs (the last may have
 * fewer): one output per tile_512 (a constant count keeps that tile lean), two per tile_pair (one vector). */
#define CHECKED(tile, step, kind_mask, from, end)                                                         \
    for (int64_t xc = (from); xc < (end); xc += (step))                                                   \
        tile(p, b, y, xc, (step) == 1 || (end) - xc >= (step) ? (step) : 1, 1, s, c0, kind_mask, corr, zcol)

/* Row y: interior tiles where whole tiles fit between the columns the windows leave, checked ones around. */
#define ROW(tile, width, step, kind_mask)                                                                 \
    do {                                                                                                  \
        int64_t x = first < p->ow ? first : p->ow;                                                        \
        CHECKED(tile, step, kind_mask, 0, x);                                                             \
        if (s == 1)                                                                                       \
            for (; x + (width) <= last; x += (width))                                                     \
                tile(p, b, y, x, (width), 0, 1, c0, kind_mask, corr, zcol);                               \
        else                                                                                              \
            for (; x + (width) <= last; x += (width))                                                     \
                tile(p, b, y, x, (width), 0, 2, c0, kind_mask, corr, zcol);                               \
        CHECKED(tile, step, kind_mask, x, p->ow);                                                         \
    } while (0)

static void row_vector(const prom_dw_params *p, int64_t b, int64_t y) {
    const __m512i zx = _mm512_set1_epi32((int32_t)p->src_zero_point);
    for (int64_t c0 = 0; c0 < p->c; c0 += 64) {
        const int64_t lanes = p->c - c0 < 64 ? p->c - c0 : 64;
        const __mmask64 mask = lanes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << lanes) - 1);
        const int32_t *taps = p->taps4 + (c0 / 64) * 9 * 64; /* [kh][kw][64] */
        __m512i corr[4], zcol[3][4];
        for (int q = 0; q < 4; ++q) {
            corr[q] = _mm512_setzero_si512();
            for (int kw = 0; kw < 3; ++kw) {
                __m512i column = _mm512_setzero_si512(); /* the weights of column kw in the rows inside */
                for (int64_t kh = 0; kh < 3; ++kh) {
                    int64_t iy = y * p->stride - p->pad + kh;
                    if (iy >= 0 && iy < p->h)
                        column = _mm512_add_epi32(column, _mm512_loadu_si512(taps + (kh * 3 + kw) * 64 + 16 * q));
                }
                zcol[kw][q] = _mm512_mullo_epi32(zx, column);
                corr[q] = _mm512_sub_epi32(corr[q], zcol[kw][q]);
            }
        }
        /* outputs whose windows are inside the input's columns: [first, last) */
        const int64_t s = p->stride, first = (p->pad + s - 1) / s;
        int64_t last = p->w - 3 + p->pad >= 0 ? (p->w - 3 + p->pad) / s + 1 : 0;
        last = last > p->ow ? p->ow : last;
        if (lanes <= 32) /* all of a narrow conv, or a wide one's last block */
            ROW(tile_pair, 2 * PAIRS, 2, (__mmask32)mask);
        else
            ROW(tile_512, TILE, 1, mask);
    }
}
#undef ROW
#undef CHECKED
#endif

/* The conv of p (see the file's comment); returns 0. Rows of all samples are shared among OpenMP threads. */
int prom_depthwise3x3(const prom_dw_params *p) {
    const int64_t rows = p->n * p->oh;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t b = r / p->oh, y = r % p->oh;
#ifdef VECTOR
        row_vector(p, b, y);
#else
        for (int64_t x = 0; x < p->ow; ++x)
            pixel_scalar(p, b, y, x);
#endif
    }
    return 0;
}

/* 1 when this build has the vector form (AVX-512 with VNNI), else 0: the portable one is slower than oneDNN. */
int prom_depthwise_vectorized(void) {
#ifdef VECTOR
    return 1;
#else
    return 0;
#endif
}

/* The portable form on its own, for tests of the vector form on machines that have it. */
int prom_depthwise3x3_scalar(const prom_dw_params *p) {
    for (int64_t b = 0; b < p->n; ++b)
        for (int64_t y = 0; y < p->oh; ++y)
            for (int64_t x = 0; x < p->ow; ++x)
                pixel_scalar(p, b, y, x);
    return 0;
}
