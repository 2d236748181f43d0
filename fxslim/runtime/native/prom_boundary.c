/* PROM's model boundaries in one pass each: NaN flags and quantization of the float input, the
 * integer global average pool, the classifier's linear layer, dequantization of the logits.
 *
 * At batch 1 these ops are a fifth of a MobileNetV2's time, almost all of it the fixed cost of
 * 20-odd ATen calls running with cold caches after the convs; here each is one call. Every
 * function computes exactly what its ATen form computes (fxslim/runtime/prom_native.py says which),
 * but the linear layer: oneDNN's arithmetic, whose codes it equals but for rare 1-LSB rounding ties.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>

/* Whether the float32 bits b are a NaN's: exponent all ones, mantissa not zero. */
static inline int nan_bits(uint32_t b) {
    return (b & 0x7fffffffu) > 0x7f800000u;
}

/* flags[i] = 1 when row i of x [rows, per] (contiguous) holds a NaN, else 0. */
void prom_nan_flags(const float *x, int64_t rows, int64_t per, uint8_t *flags) {
    const uint32_t *bits = (const uint32_t *)x;
    for (int64_t i = 0; i < rows; ++i) {
        const uint32_t *row = bits + i * per;
        uint32_t any = 0;
        for (int64_t j = 0; j < per; ++j)
            any |= nan_bits(row[j]);
        flags[i] = (uint8_t)(any != 0);
    }
}

/* out = clamp(rint(clamp(x, -bound, bound) * inverse) + zero_point, 0, 255) for x [N, C, H, W],
 * both with any strides: ATen's quantize_per_tensor to quint8 after the clamp
 * prom_lowered.quantize_qtensor applies. Codes of NaN inputs are unspecified (their samples are
 * flagged and come out NaN). Returns whether the row holds a NaN (read in the same pass). */
static int quantize_row(const float *in, int64_t w, int64_t sw, float bound, float inverse, int32_t z,
                        uint8_t *codes) {
    int64_t i = 0;
    int nan = 0;
#ifdef __AVX512F__
    if (sw == 1) { /* cvtps_epi32 rounds half to even, as rintf does in the default rounding mode */
        const __m512 lo = _mm512_set1_ps(-bound), hi = _mm512_set1_ps(bound), scale = _mm512_set1_ps(inverse);
        const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255), shift = _mm512_set1_epi32(z);
        __mmask16 unordered = 0;
        for (; i + 16 <= w; i += 16) {
            const __m512 raw = _mm512_loadu_ps(in + i);
            unordered |= _mm512_cmp_ps_mask(raw, raw, _CMP_UNORD_Q);
            __m512 v = _mm512_min_ps(_mm512_max_ps(raw, lo), hi);
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, scale)), shift);
            q = _mm512_min_epi32(_mm512_max_epi32(q, zero), top);
            _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(q));
        }
        nan = unordered != 0;
    }
#endif
    for (; i < w; ++i) {
        float v = in[i * sw];
        uint32_t bits;
        __builtin_memcpy(&bits, &v, sizeof bits);
        nan |= nan_bits(bits);
        v = v < -bound ? -bound : (v > bound ? bound : v); /* |v·inverse| stays far inside int32 */
        int32_t q = (int32_t)rintf(v * inverse) + z;
        codes[i] = (uint8_t)(q < 0 ? 0 : (q > 255 ? 255 : q));
    }
    return nan;
}

enum { ROW = 1024 };

#ifdef __AVX512VBMI__
/* Where each byte of 64 interleaved pixels (192 bytes, three vectors) comes from: pair[k] indexes
 * rows 0 and 1 (row 1 from 64), third[k] row 2, for the bytes in from_third[k]. */
typedef struct {
    uint8_t pair[3][64], third[3][64];
    __mmask64 from_third[3];
} interleave_tables;

static void interleave_init(interleave_tables *t) {
    for (int k = 0; k < 3; ++k) {
        t->from_third[k] = 0;
        for (int l = 0; l < 64; ++l) { /* output byte 64k + l: pixel p, channel ch */
            int j = 64 * k + l, p = j / 3, ch = j % 3;
            t->pair[k][l] = (uint8_t)(ch == 1 ? 64 + p : p);
            t->third[k][l] = (uint8_t)p;
            if (ch == 2)
                t->from_third[k] |= (__mmask64)1 << l;
        }
    }
}

/* Three rows of w codes (channels 0, 1, 2 of one image row) written interleaved, pixel after pixel:
 * each 64 pixels as three pairs of byte permutes over the rows rather than 192 single stores. */
static void interleave3(const interleave_tables *t, const uint8_t *r0, const uint8_t *r1, const uint8_t *r2,
                        int64_t w, uint8_t *out) {
    int64_t i = 0;
    for (; i + 64 <= w; i += 64) {
        const __m512i a = _mm512_loadu_si512(r0 + i), b = _mm512_loadu_si512(r1 + i), c = _mm512_loadu_si512(r2 + i);
        for (int k = 0; k < 3; ++k) {
            __m512i v = _mm512_permutex2var_epi8(a, _mm512_loadu_si512(t->pair[k]), b);
            v = _mm512_mask_permutexvar_epi8(v, t->from_third[k], _mm512_loadu_si512(t->third[k]), c);
            _mm512_storeu_si512(out + 3 * i + 64 * k, v);
        }
    }
    for (; i < w; ++i) {
        out[3 * i] = r0[i];
        out[3 * i + 1] = r1[i];
        out[3 * i + 2] = r2[i];
    }
}
#endif

/* The codes of x (quantize_row) into out, both [N, C, H, W] with any strides; with flags (else NULL),
 * flags[b] = 1 when sample b of x holds a NaN, else 0: prom_nan_flags in the same pass over x. */
void prom_quantize(const float *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn, int64_t sc, int64_t sh,
                   int64_t sw, float bound, float inverse, int64_t zero_point, uint8_t *out, int64_t on, int64_t oc,
                   int64_t oh, int64_t ow, uint8_t *flags) {
    uint8_t codes[ROW];
    const int32_t z = (int32_t)zero_point;
#ifdef __AVX512VBMI__
    if (c == 3 && sw == 1 && oc == 1 && ow == 3 && w <= ROW) { /* RGB rows into channels_last codes */
        uint8_t rows[3][ROW];
        interleave_tables tables;
        interleave_init(&tables);
        for (int64_t b = 0; b < n; ++b) {
            int nan = 0;
            for (int64_t y = 0; y < h; ++y) {
                for (int64_t k = 0; k < 3; ++k)
                    nan |= quantize_row(x + b * sn + k * sc + y * sh, w, 1, bound, inverse, z, rows[k]);
                interleave3(&tables, rows[0], rows[1], rows[2], w, out + b * on + y * oh);
            }
            if (flags)
                flags[b] = (uint8_t)nan;
        }
        return;
    }
#endif
    for (int64_t b = 0; b < n; ++b) {
        int nan = 0;
        for (int64_t y = 0; y < h; ++y)
            for (int64_t k = 0; k < c; ++k) {
                const float *in = x + b * sn + k * sc + y * sh;
                uint8_t *row = out + b * on + k * oc + y * oh;
                for (int64_t start = 0; start < w; start += ROW) {
                    const int64_t len = w - start < ROW ? w - start : ROW;
                    uint8_t *target = ow == 1 ? row + start : codes; /* unit stride: straight in place */
                    if (sw == 1)
                        nan |= quantize_row(in + start, len, 1, bound, inverse, z, target);
                    else
                        nan |= quantize_row(in + start * sw, len, sw, bound, inverse, z, target);
                    if (ow != 1)
                        for (int64_t i = 0; i < len; ++i)
                            row[(start + i) * ow] = codes[i];
                }
            }
        if (flags)
            flags[b] = (uint8_t)nan;
    }
}

static int64_t floor_div(int64_t a, int64_t b) { /* b > 0 */
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* out [N, C] = clamp(floor(((sum_{H,W} x) - H*W*zx) * multiplier + D/2) / D) + zout, lo, hi) with
 * D = H*W << shift, for uint8 x [N, C, H, W] with any strides: prom.global_avg_pool_codes. The
 * caller checks 255*H*W fits an int32, so the int32 sums are exact. Returns -1 when C exceeds the
 * on-stack accumulator (the caller then takes the ATen path). */
int64_t prom_global_avg_pool(const uint8_t *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn,
                             int64_t sc, int64_t sh, int64_t sw, int64_t zx, int64_t multiplier, int64_t shift,
                             int64_t zout, int64_t lo, int64_t hi, uint8_t *out) {
    enum { MAX_CHANNELS = 8192 };
    int32_t acc[MAX_CHANNELS];
    if (c > MAX_CHANNELS)
        return -1;
    const int64_t hw = h * w, denominator = hw << shift;
    for (int64_t b = 0; b < n; ++b) {
        for (int64_t k = 0; k < c; ++k)
            acc[k] = 0;
        for (int64_t y = 0; y < h; ++y)
            for (int64_t i = 0; i < w; ++i) {
                const uint8_t *pixel = x + b * sn + y * sh + i * sw;
                if (sc == 1)
                    for (int64_t k = 0; k < c; ++k)
                        acc[k] += pixel[k];
                else
                    for (int64_t k = 0; k < c; ++k)
                        acc[k] += pixel[k * sc];
            }
        for (int64_t k = 0; k < c; ++k) {
            int64_t v = ((int64_t)acc[k] - hw * zx) * multiplier + (denominator >> 1);
            v = floor_div(v, denominator) + zout;
            out[b * c + k] = (uint8_t)(v < lo ? lo : (v > hi ? hi : v));
        }
    }
    return 0;
}

/* out = (float)(q - zero_point) * scale for uint8 q [rows, per] (contiguous); rows whose flag is
 * set come out NaN (flags may be NULL): prom.dequantized. */
void prom_dequantize(const uint8_t *q, int64_t rows, int64_t per, int64_t zero_point, float scale,
                     const uint8_t *flags, float *out) {
    const float z = (float)zero_point;
    for (int64_t i = 0; i < rows; ++i) {
        const uint8_t *in = q + i * per;
        float *row = out + i * per;
        if (flags != 0 && flags[i]) {
            for (int64_t j = 0; j < per; ++j)
                row[j] = NAN;
            continue;
        }
        for (int64_t j = 0; j < per; ++j)
            row[j] = ((float)in[j] - z) * scale;
    }
}

/* The classifier's linear layer on u8 codes: out [N, O] = saturate_u8(round_half_even(
 *   ((sum_k (x[k] - zx) * w[o][k]) * scale[o] + bias[o]) * inverse + zo)), the arithmetic of oneDNN's
 * u8 linear that fxslim::qlinear runs (scale = fl32(x scale * w scale), inverse = fl32(1 / out scale)).
 * packed: the weights as [ceil(O / 16)][ceil(K / 4)][16][4] (zeros beyond O and K), so that one VNNI
 * dot product adds four inputs to 16 outputs; wsum[o] = sum_k w[o][k]. The integer sums are exact
 * (255 * 128 * K stays in int32 for K below 65793); both forms convert them to float alike. */
static inline int32_t four_codes(const uint8_t *x, int64_t k, int64_t j) { /* x[4j .. 4j + 3], zeros past k */
    uint8_t four[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < 4 && 4 * j + i < k; ++i)
        four[i] = x[4 * j + i];
    int32_t word;
    __builtin_memcpy(&word, four, 4);
    return word;
}

/* Outputs [o0, o0 + lanes) of one row, one at a time: the portable form. */
static void linear_lanes(const uint8_t *x, int64_t k, int64_t o0, int64_t lanes, int64_t zx, const int8_t *w,
                         const int32_t *wsum, const float *scale, const float *bias, float inverse, float zo,
                         uint8_t *out) {
    const int64_t k4 = (k + 3) / 4;
    for (int64_t l = 0; l < lanes; ++l) {
        int32_t acc = 0;
        for (int64_t j = 0; j < k4; ++j) {
            int32_t word = four_codes(x, k, j);
            const uint8_t *bytes = (const uint8_t *)&word;
            for (int i = 0; i < 4; ++i)
                acc += (int32_t)bytes[i] * (int32_t)w[64 * j + 4 * l + i];
        }
        float real = fmaf((float)(acc - (int32_t)zx * wsum[o0 + l]), scale[o0 + l], bias[o0 + l]);
        float q = rintf(fmaf(real, inverse, zo));
        out[o0 + l] = (uint8_t)(q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q));
    }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
enum { BLOCKS = 4 }; /* blocks of 16 outputs summed side by side: independent dot-product chains */

/* Blocks [first, first + count) (count <= BLOCKS) of one row: each x word is broadcast once for all of
 * them. One block at a time, every vpdpbusd waited for the one before (its latency, not its throughput,
 * set the pace): MobileNetV2's 1280 -> 1000 classifier took 1.9x as long per call at batch 1, 3x at 16. */
static inline __attribute__((always_inline)) void linear_blocks(const uint8_t *x, int64_t k, int64_t o,
        int64_t first, const int count, int64_t zx, const int8_t *packed, const int32_t *wsum, const float *scale,
        const float *bias, float inverse, float zo, uint8_t *out) {
    const int64_t k4 = (k + 3) / 4, whole = k / 4;
    __m512i acc[BLOCKS];
    for (int t = 0; t < count; ++t)
        acc[t] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k4; ++j) {
        int32_t word;
        if (j < whole)
            __builtin_memcpy(&word, x + 4 * j, 4);
        else
            word = four_codes(x, k, j);
        const __m512i xw = _mm512_set1_epi32(word);
        for (int t = 0; t < count; ++t)
            acc[t] = _mm512_dpbusd_epi32(acc[t], xw, _mm512_loadu_si512(packed + ((first + t) * k4 + j) * 64));
    }
    for (int t = 0; t < count; ++t) {
        const int64_t o0 = (first + t) * 16, lanes = o - o0 < 16 ? o - o0 : 16;
        const __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
        const __m512i correction = _mm512_mullo_epi32(_mm512_set1_epi32((int32_t)zx),
                                                      _mm512_maskz_loadu_epi32(mask, wsum + o0));
        __m512 real = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], correction)),
                                      _mm512_maskz_loadu_ps(mask, scale + o0),
                                      _mm512_maskz_loadu_ps(mask, bias + o0));
        __m512i q = _mm512_cvtps_epi32(_mm512_fmadd_ps(real, _mm512_set1_ps(inverse), _mm512_set1_ps(zo)));
        q = _mm512_max_epi32(q, _mm512_setzero_si512());
        _mm_mask_storeu_epi8(out + o0, mask, _mm512_cvtusepi32_epi8(q)); /* saturates at 255 */
    }
}
#endif

static void linear_row(const uint8_t *x, int64_t k, int64_t o, int64_t zx, const int8_t *packed, const int32_t *wsum,
                       const float *scale, const float *bias, float inverse, float zo, uint8_t *out, int portable) {
    const int64_t k4 = (k + 3) / 4;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    if (!portable) {
        const int64_t blocks = (o + 15) / 16;
        int64_t first = 0;
        for (; first + BLOCKS <= blocks; first += BLOCKS)
            linear_blocks(x, k, o, first, BLOCKS, zx, packed, wsum, scale, bias, inverse, zo, out);
        if (first < blocks)
            linear_blocks(x, k, o, first, (int)(blocks - first), zx, packed, wsum, scale, bias, inverse, zo, out);
        return;
    }
#endif
    (void)portable; /* without AVX-512 VNNI every row takes the portable form */
    for (int64_t o0 = 0; o0 < o; o0 += 16)
        linear_lanes(x, k, o0, o - o0 < 16 ? o - o0 : 16, zx, packed + (o0 / 16) * k4 * 64, wsum, scale, bias,
                     inverse, zo, out);
}

/* portable: 1 for the one-output-at-a-time form (which machines without AVX-512 VNNI always run). */
void prom_linear(const uint8_t *x, int64_t n, int64_t k, int64_t o, int64_t zx, const int8_t *packed,
                 const int32_t *wsum, const float *scale, const float *bias, float inverse, int64_t zo, uint8_t *out,
                 int64_t portable) {
    for (int64_t b = 0; b < n; ++b)
        linear_row(x + b * k, k, o, zx, packed, wsum, scale, bias, inverse, (float)zo, out + b * o, (int)portable);
}

/* A classifier head in one call: global average pool, linear layer, dequantization (the three
 * functions above, in turn, through buffers of its own), so that Python makes one call where it
 * made five, each paying its fixed cost with caches cold after the convs. The same values as the
 * three calls. Returns -1 (nothing written) when the pool cannot run here or memory runs out. */
int64_t prom_head(const uint8_t *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn, int64_t sc, int64_t sh,
                  int64_t sw, int64_t zx, int64_t multiplier, int64_t shift, int64_t pool_zout, int64_t lo,
                  int64_t hi, int64_t o, int64_t linear_zx, const int8_t *packed, const int32_t *wsum,
                  const float *scale, const float *bias, float inverse, int64_t linear_zout, int64_t portable,
                  int64_t out_zero_point, float out_scale, const uint8_t *flags, float *out) {
    uint8_t *pooled = malloc((size_t)(n * c + n * o) + 1);
    if (!pooled)
        return -1;
    uint8_t *codes = pooled + n * c;
    int64_t status = prom_global_avg_pool(x, n, c, h, w, sn, sc, sh, sw, zx, multiplier, shift, pool_zout, lo, hi,
                                          pooled);
    if (status >= 0) {
        prom_linear(pooled, n, c, o, linear_zx, packed, wsum, scale, bias, inverse, linear_zout, codes, portable);
        prom_dequantize(codes, n, o, out_zero_point, out_scale, flags, out);
    }
    free(pooled);
    return status;
}
