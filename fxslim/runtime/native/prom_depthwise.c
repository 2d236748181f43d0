#ifndef TILE_BITS /* the file proper; it includes itself for its vector tiles (see TILE_BITS below) */
/* PROM's 3×3 depthwise convs on u8 NHWC codes, for the direct runtime's plans (prom_direct.py).
 *
 * oneDNN 3.2's int8 depthwise kernel was a third of MobileNetV2's conv time at batch 1. Here a block
 * of 64 channels (32 in half vectors) of one input column is loaded once, its three rows' bytes
 * interleaved per channel, and one vpdpbusd then adds three taps of 16 channels to an output; each
 * column feeds every output of a row tile whose window holds it. Without AVX-512 VNNI the portable
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
enum { TILE = 4 }; /* outputs of a row computed together (their windows overlap) */
#define TILE_BITS 512
#include "prom_depthwise.c"
#undef TILE_BITS
#define TILE_BITS 256
#include "prom_depthwise.c"
#undef TILE_BITS

static void row_vector(const prom_dw_params *p, int64_t b, int64_t y) {
    const __m512i zx = _mm512_set1_epi32((int32_t)p->src_zero_point);
    for (int64_t c0 = 0; c0 < p->c; c0 += 64) {
        const int64_t lanes = p->c - c0 < 64 ? p->c - c0 : 64;
        const __mmask64 mask = lanes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << lanes) - 1);
        /* 32 channels or fewer (all of a narrow conv, a wide one's last block) go in half vectors */
        const int half = lanes <= 32;
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
        int64_t x = 0;
#define TILE(count, checked, stride)                                                                 \
    (half ? tile_256(p, b, y, x, count, checked, stride, c0, (__mmask32)mask, corr, zcol)            \
          : tile_512(p, b, y, x, count, checked, stride, c0, mask, corr, zcol))
        for (; x < first || (x < p->ow && x + TILE > last); x += 1)
            TILE(1, 1, s);
        if (s == 1)
            for (; x + TILE <= last; x += TILE)
                TILE(TILE, 0, 1);
        else
            for (; x + TILE <= last; x += TILE)
                TILE(TILE, 0, 2);
        for (; x < p->ow; x += 1)
            TILE(1, 1, s);
#undef TILE
    }
}
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
#else /* TILE_BITS: the tile at one vector width (512: 64 channels, 256: 32), included twice above */
#if TILE_BITS == 512
#define VI __m512i
#define VF __m512
#define VMASK __mmask64
#define V(op) _mm512_##op
#define VLOAD(at) _mm512_loadu_si512(at)
#define VSTORE(at, v) _mm512_storeu_si512(at, v)
#define VZERO() _mm512_setzero_si512()
#define VCORR(v) (v)
#define TILE_FN tile_512
#else /* the first 32 channels of a block of 64: the low half of each of its vectors (quad_lanes) */
#define VI __m256i
#define VF __m256
#define VMASK __mmask32
#define V(op) _mm256_##op
#define VLOAD(at) _mm256_loadu_si256((const __m256i *)(at))
#define VSTORE(at, v) _mm256_storeu_si256((__m256i *)(at), v)
#define VZERO() _mm256_setzero_si256()
#define VCORR(v) _mm512_castsi512_si256(v)
#define TILE_FN tile_256
#endif

/* Outputs x0 .. x0 + count - 1 (count <= TILE) of row y, channels c0 .. c0 + TILE_BITS / 8 - 1, in integers. Each
 * input column is read once and its three rows' bytes interleaved per channel (two unpacks of bytes,
 * two of words), so that one vpdpbusd adds the column's three taps of 16 channels to an output; the
 * column then feeds every output of the tile whose window holds it. The lanes come out permuted
 * within 128 bits (quad_lanes in prom_depthwise.py); the packs back to bytes restore the order. Rows
 * and columns outside the input read as zeros, and each output starts from minus zx times the sum of
 * the weights of its taps inside: corr (all the row's taps inside) plus zcol[kw] per column kw outside.
 * mask: the block's channels (all of them but in the last block). checked: whether some window may leave
 * the input's columns; s: the stride. Both are constants in interior tiles, which then run without the
 * checks and with the column loop unrolled (10-15 % faster than a run-time stride on MobileNetV2's layers). */
static inline __attribute__((always_inline)) void TILE_FN(const prom_dw_params *p, int64_t b, int64_t y, int64_t x0,
                                                       const int count, const int checked, const int64_t s,
                                                       int64_t c0, VMASK mask, const __m512i corr[4],
                                                       const __m512i zcol[3][4]) {
    const int64_t c = p->c, block = c0 / 64, left = x0 * s - p->pad;
    const int full = mask == (VMASK) ~(VMASK)0;
    const VI zero = VZERO();
    const uint8_t *rows[3];
    for (int64_t kh = 0; kh < 3; ++kh) {
        int64_t iy = y * s - p->pad + kh;
        rows[kh] = iy >= 0 && iy < p->h ? p->src + ((b * p->h + iy) * p->w) * c + c0 : NULL;
    }
    const int8_t *quads = p->quads + block * 3 * 4 * 64; /* [kw][quarter][64] */
    VI acc[TILE][4];
    for (int t = 0; t < TILE; ++t)
        for (int q = 0; q < 4; ++q) {
            acc[t][q] = VCORR(corr[q]);
            for (int kw = 0; kw < 3 && checked; ++kw) {
                int64_t ix = left + t * s + kw;
                if (ix < 0 || ix >= p->w)
                    acc[t][q] = V(add_epi32)(acc[t][q], VCORR(zcol[kw][q]));
            }
        }
    const int columns = (int)((count - 1) * s + 3);
    for (int j = 0; j < columns; ++j) {
        const int64_t ix = left + j;
        const int inside = !checked || (ix >= 0 && ix < p->w);
        VI r[3];
        for (int kh = 0; kh < 3; ++kh)
            r[kh] = !rows[kh] || !inside ? zero
                    : full               ? VLOAD(rows[kh] + ix * c)
                                         : V(maskz_loadu_epi8)(mask, rows[kh] + ix * c);
        const VI lo01 = V(unpacklo_epi8)(r[0], r[1]), hi01 = V(unpackhi_epi8)(r[0], r[1]);
        const VI lo2 = V(unpacklo_epi8)(r[2], zero), hi2 = V(unpackhi_epi8)(r[2], zero);
        const VI quad[4] = {V(unpacklo_epi16)(lo01, lo2), V(unpackhi_epi16)(lo01, lo2), V(unpacklo_epi16)(hi01, hi2),
                            V(unpackhi_epi16)(hi01, hi2)};
        for (int t = 0; t < TILE; ++t) {
            int kw = j - (int)(t * s);
            if (t >= count || kw < 0 || kw > 2)
                continue;
            for (int q = 0; q < 4; ++q)
                acc[t][q] = V(dpbusd_epi32)(acc[t][q], quad[q], VLOAD(quads + (kw * 4 + q) * 64));
        }
    }
    const float *scale = p->scale4 + block * 64, *bias = p->bias4 + block * 64;
    const VF inverse = V(set1_ps)(p->inverse), zd = V(set1_ps)(p->dst_zero_point);
    const VF fzero = V(setzero_ps)();
    uint8_t *out = p->dst + ((b * p->oh + y) * p->ow + x0) * c + c0;
    for (int t = 0; t < count; ++t) {
        VI q[4];
        for (int k = 0; k < 4; ++k) {
            VF real = V(fmadd_ps)(V(cvtepi32_ps)(acc[t][k]), V(loadu_ps)(scale + 16 * k), V(loadu_ps)(bias + 16 * k));
            if (p->relu)
                real = V(max_ps)(real, fzero); /* NaN cannot occur: the inputs are codes */
            q[k] = V(cvtps_epi32)(V(fmadd_ps)(real, inverse, zd)); /* half to even */
        }
        /* quarter k of 128-bit lane L holds channels 16L + 4k .. 16L + 4k + 3: the packs put them in
         * order, saturating to 0..255 */
        VI bytes = V(packus_epi16)(V(packs_epi32)(q[0], q[1]), V(packs_epi32)(q[2], q[3]));
        if (full)
            VSTORE(out + t * c, bytes);
        else
            V(mask_storeu_epi8)(out + t * c, mask, bytes);
    }
}


#undef VI
#undef VF
#undef VMASK
#undef V
#undef VLOAD
#undef VSTORE
#undef VZERO
#undef VCORR
#undef TILE_FN
#endif /* TILE_BITS */
