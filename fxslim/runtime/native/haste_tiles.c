/* HASTE's reduced convs, tile by tile, without materialising merged filters (fxslim/runtime/haste_kernel.py).
 *
 * For a tile with B buckets the method convolves the B bucket means of its input window with the
 * merged filters W~[ij, b] = sum over the bucket's channels c of W[c, ij]. The ATen path writes
 * every merged filter (B * k^2 * O floats per tile) and reads it back in a GEMM of only T*T rows.
 * Here a merged filter exists only as four vectors of 16 output channels in registers: for each
 * kernel tap ij and bucket b it is summed from the weight rows of the bucket's channels and at once
 * multiplied into the accumulators of 6 output pixels (24 accumulators; a 4x4 tile is 6 + 6 + 4
 * pixels). Work per tile: C * k^2 * O additions (the merge) and B * k^2 * P * O multiply-adds
 * (the reduced conv) for its P <= T^2 pixels inside the output, as the method counts them. Each
 * pixel's input is a broadcast straight from the tile's bucket means ([B][d], the patch positions
 * per tap precomputed). The accumulators go straight into the output map: a tile layout stitched
 * into it afterwards cost one more pass over the output (6 % of ResNet18's HASTE time at batch 32,
 * NCHW scattered over a plane per channel).
 *
 * Measured on full-width ResNet18 (benchmarks/haste_speed.py, 1 thread), each step against the one
 * before: means read in place of a tap-major copy that cost a scalar gather per (tap, bucket,
 * pixel); 64 channels by 6 pixels instead of 32 by 8 (per bucket 24 multiply-adds for 4 weight
 * loads and 6 broadcasts, where it was 16 for 2 and 8); the tap loop not inlined, so that its
 * offsets stay in registers; no padded pixels. Tile kernel at batch 32: 277 -> 212 ms.
 *
 * Inputs are the tile's patches (each channel's t_h x t_w input window), its buckets (channels
 * sorted by code, bucket starts, bucket count), the weight as rows [blocks][C * k^2][O_b] (row
 * c * k^2 + ij holds W[block * O_b : (block + 1) * O_b, c, ij]) and the bias. Float32 only.
 * AVX-512 code where the compiler targets it, plain C elsewhere (the same sums; fused multiply-adds
 * there, so the last bits may differ).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum {
    VEC = 16,      /* output channels per vector */
    NV = 4,        /* vectors per pass */
    WIDE = NV * VEC, /* output channels per pass */
    PIX = 6,       /* output pixels per pass: 24 accumulators, 4 weight vectors, 1 broadcast */
    GROUP_FLOATS = 1 << 17, /* a group of tiles' bucket means (512 KB): they share each read of the weight */
};

/* means[b * d + q] = the mean over bucket b's channels of patch value q: the sum over the channels in
 * bucket order, from 0, times 1 / size. AVX-512: up to MEAN_VECTORS vectors of patch values summed
 * in registers at a time (all of a 3x3 conv's 36 or 81, a 1x1 stride-2 conv's 49), where a sum kept
 * in memory waited on its own store at every channel, a third of the reduced conv's time on
 * ResNet18's 3x3 layers. */
#ifdef __AVX512F__
enum { MEAN_VECTORS = 6 };

/* The first n of a vector's 16 lanes (none for n <= 0, all for n >= 16). */
static inline __mmask16 first_lanes(int64_t n) {
    return n >= VEC ? (__mmask16)0xffff : n > 0 ? (__mmask16)((1u << n) - 1u) : 0;
}

static inline __attribute__((always_inline)) void means_of(const float *patch, int64_t d, int64_t q0,
                                                            const int64_t *channels, const int64_t *starts,
                                                            int64_t buckets, int64_t c, float *means, const int nv) {
    __mmask16 mask[MEAN_VECTORS];
    for (int v = 0; v < nv; v++) mask[v] = first_lanes(d - q0 - v * VEC);
    for (int64_t b = 0; b < buckets; b++) {
        int64_t s0 = starts[b], s1 = b + 1 < buckets ? starts[b + 1] : c;
        __m512 sum[MEAN_VECTORS];
        for (int v = 0; v < nv; v++) sum[v] = _mm512_setzero_ps();
        for (int64_t s = s0; s < s1; s++) {
            const float *row = patch + channels[s] * d + q0;
            for (int v = 0; v < nv; v++) sum[v] = _mm512_add_ps(sum[v], _mm512_maskz_loadu_ps(mask[v], row + v * VEC));
        }
        __m512 inv = _mm512_set1_ps(1.0f / (float)(s1 - s0));
        for (int v = 0; v < nv; v++)
            _mm512_mask_storeu_ps(means + b * d + q0 + v * VEC, mask[v], _mm512_mul_ps(sum[v], inv));
    }
}

static void bucket_means(const float *patch, int64_t d, const int64_t *channels, const int64_t *starts, int64_t buckets,
                         int64_t c, float *means) {
    for (int64_t q0 = 0; q0 < d; q0 += MEAN_VECTORS * VEC) {
        int64_t left = (d - q0 + VEC - 1) / VEC;
        switch (left < MEAN_VECTORS ? left : MEAN_VECTORS) {
        case 1: means_of(patch, d, q0, channels, starts, buckets, c, means, 1); break;
        case 2: means_of(patch, d, q0, channels, starts, buckets, c, means, 2); break;
        case 3: means_of(patch, d, q0, channels, starts, buckets, c, means, 3); break;
        case 4: means_of(patch, d, q0, channels, starts, buckets, c, means, 4); break;
        case 5: means_of(patch, d, q0, channels, starts, buckets, c, means, 5); break;
        default: means_of(patch, d, q0, channels, starts, buckets, c, means, MEAN_VECTORS);
        }
    }
}
#else
static void bucket_means(const float *patch, int64_t d, const int64_t *channels, const int64_t *starts, int64_t buckets,
                         int64_t c, float *means) {
    for (int64_t b = 0; b < buckets; b++) {
        int64_t s0 = starts[b], s1 = b + 1 < buckets ? starts[b + 1] : c;
        float *mean = means + b * d;
        for (int64_t q = 0; q < d; q++) mean[q] = 0.0f;
        for (int64_t s = s0; s < s1; s++) {
            const float *row = patch + channels[s] * d;
            for (int64_t q = 0; q < d; q++) mean[q] += row[q];
        }
        float inv = 1.0f / (float)(s1 - s0);
        for (int64_t q = 0; q < d; q++) mean[q] *= inv;
    }
}
#endif

/* rows[b] -> W~[ij, b] (WIDE floats; `width` of them real) = the sum of the weight rows at tap ij
 * of bucket b's channels, for every bucket of a tile: a singleton's own weight row where all WIDE
 * floats are real, else a row of `merged` summed in registers. */
#ifdef __AVX512F__
static void merge_rows(const float *w_ij, int64_t row_stride, const int64_t *channels, const int64_t *starts,
                       int64_t c, int64_t buckets, int64_t width, float *merged, const float **rows) {
    __mmask16 mask[NV];
    for (int v = 0; v < NV; v++) mask[v] = first_lanes(width - v * VEC);
    for (int64_t b = 0; b < buckets; b++) {
        int64_t s0 = starts[b], s1 = b + 1 < buckets ? starts[b + 1] : c;
        const float *row = w_ij + channels[s0] * row_stride;
        if (s1 - s0 == 1 && width == WIDE) {
            rows[b] = row;
            continue;
        }
        __m512 m[NV];
        for (int v = 0; v < NV; v++) m[v] = _mm512_maskz_loadu_ps(mask[v], row + v * VEC);
        for (int64_t s = s0 + 1; s < s1; s++) {
            row = w_ij + channels[s] * row_stride;
            for (int v = 0; v < NV; v++) m[v] = _mm512_add_ps(m[v], _mm512_maskz_loadu_ps(mask[v], row + v * VEC));
        }
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(merged + b * WIDE + v * VEC, m[v]);
        rows[b] = merged + b * WIDE;
    }
}
#else
static void merge_rows(const float *w_ij, int64_t row_stride, const int64_t *channels, const int64_t *starts,
                       int64_t c, int64_t buckets, int64_t width, float *merged, const float **rows) {
    for (int64_t b = 0; b < buckets; b++) {
        int64_t s1 = b + 1 < buckets ? starts[b + 1] : c;
        float *m = merged + b * WIDE;
        for (int v = 0; v < WIDE; v++) m[v] = 0.0f;
        for (int64_t s = starts[b]; s < s1; s++) {
            const float *row = w_ij + channels[s] * row_stride;
            for (int64_t v = 0; v < width; v++) m[v] += row[v];
        }
        rows[b] = m;
    }
}
#endif

/* One tap of one tile for npix <= PIX output pixels: acc[p][v] += sum over buckets b of
 * means[b * d + at[p]] * rows[b][v], at[p] the patch position under pixel p at this tap. */
#ifdef __AVX512F__
static inline __attribute__((always_inline)) void tap_pixels(const float *means, int64_t d, const int64_t *at,
                                                              int64_t buckets, const float *const *rows, float *acc,
                                                              const int npix) {
    __m512 a[PIX][NV];
    int64_t off[PIX];
    for (int p = 0; p < npix; p++) {
        off[p] = at[p];
        for (int v = 0; v < NV; v++) a[p][v] = _mm512_loadu_ps(acc + p * WIDE + v * VEC);
    }
    const float *m = means;
    for (int64_t b = 0; b < buckets; b++, m += d) {
        __m512 w[NV];
        for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_ps(rows[b] + v * VEC);
        for (int p = 0; p < npix; p++) {
            __m512 x = _mm512_set1_ps(m[off[p]]);
            for (int v = 0; v < NV; v++) a[p][v] = _mm512_fmadd_ps(x, w[v], a[p][v]);
        }
    }
    for (int p = 0; p < npix; p++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc + p * WIDE + v * VEC, a[p][v]);
}

/* Not inlined: in a function of its own the pixel offsets stay in registers (inlined, the enclosing
 * loops' values pushed them to the stack). A 4x4 tile is 6 + 6 + 4 pixels, without padding; an edge
 * tile's pixels inside the output, 1 to 6 at a time. */
__attribute__((noinline)) static void tile_tap(const float *means, int64_t d, const int64_t *at, int64_t buckets,
                                               const float *const *rows, float *acc, int64_t npix) {
    switch (npix) {
    case 1: tap_pixels(means, d, at, buckets, rows, acc, 1); break;
    case 2: tap_pixels(means, d, at, buckets, rows, acc, 2); break;
    case 3: tap_pixels(means, d, at, buckets, rows, acc, 3); break;
    case 4: tap_pixels(means, d, at, buckets, rows, acc, 4); break;
    case 5: tap_pixels(means, d, at, buckets, rows, acc, 5); break;
    default: tap_pixels(means, d, at, buckets, rows, acc, PIX);
    }
}
#else
static void tile_tap(const float *means, int64_t d, const int64_t *at, int64_t buckets, const float *const *rows,
                     float *acc, int64_t npix) {
    for (int64_t b = 0; b < buckets; b++) {
        const float *m = means + b * d;
        for (int64_t p = 0; p < npix; p++)
            for (int v = 0; v < WIDE; v++) acc[p * WIDE + v] += m[at[p]] * rows[b][v];
    }
}
#endif

/* One layer's arguments (see haste_tile_convs) and what follows from them. */
typedef struct {
    const float *patches, *w_rows, *bias;
    const int64_t *channels, *starts, *count;
    /* per kind of tile (interior, last column, last row, both; see tile_kind): its pixels inside the
     * output, at[kind][ij * pix_pad + q] the patch position under the q-th of them at tap ij and
     * pixel[kind][q] its index in the tile's T x T outputs */
    const int64_t *at[4], *pixel[4];
    int64_t npix[4];
    int64_t c, d, b_max, blocks, o_b, k2, pix_pad, tile_floats, tile, nth, ntw;
    float *dst;    /* the output map [N, O, H_out, W_out] of this call's samples */
    int64_t ds[4]; /* its strides */
} Layer;

/* Tile i's kind: bit 1 if it is in the last row of tiles, bit 0 in the last column (tiles row-major
 * per sample); the kinds differ where the output's size is not a multiple of T. */
static int tile_kind(const Layer *l, int64_t i) {
    int64_t t = i % (l->nth * l->ntw);
    return (t / l->ntw == l->nth - 1 ? 2 : 0) | (t % l->ntw == l->ntw - 1 ? 1 : 0);
}

/* One thread's buffers. */
typedef struct {
    float *means, *acc, *merged;
    const float **rows;
} Work;

static void free_work(Work *w) {
    free(w->means);
    free(w->acc);
    free(w->merged);
    free((void *)w->rows);
}

static int alloc_work(Work *w, const Layer *l, int64_t group) {
    int64_t buckets = l->b_max > 0 ? l->b_max : 1;
    w->means = malloc((size_t)(group * l->tile_floats) * sizeof *w->means);
    w->acc = malloc((size_t)(group * l->pix_pad * WIDE) * sizeof *w->acc);
    w->merged = malloc((size_t)(buckets * WIDE) * sizeof *w->merged);
    w->rows = malloc((size_t)buckets * sizeof *w->rows);
    if (w->means && w->acc && w->merged && w->rows) return 0;
    free_work(w);
    return -1;
}

#ifdef __AVX512F__
/* r[p] = 16 channels of pixel p -> r[c] = channel c's 16 pixels (per 128-bit lane: unpack 32-bit, then
 * 64-bit, then two rounds of 128-bit shuffles). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) { /* u[g + j], lane k: element 4k + j of rows g .. g + 3 */
        u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
    }
    for (int j = 0; j < 4; j++) {
        __m512 a_lo = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), a_hi = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
        __m512 b_lo = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
        __m512 b_hi = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_f32x4(a_lo, b_lo, 0x88);
        r[4 + j] = _mm512_shuffle_f32x4(a_lo, b_lo, 0xDD);
        r[8 + j] = _mm512_shuffle_f32x4(a_hi, b_hi, 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(a_hi, b_hi, 0xDD);
    }
}
#endif

/* Tile i's accumulators a[q * WIDE + v] (its q-th pixel inside the output, output channel o + v, v <
 * width) into the output map. Channels_last: a pixel's channels at once. NCHW, a whole 4x4 tile: 16
 * channels of its 16 pixels transposed in registers, then a row of 4 pixels per store. Else one value
 * at a time. */
static void write_tile(const Layer *l, int64_t i, int64_t o, int64_t width, const float *a) {
    int kind = tile_kind(l, i);
    int64_t t = i % (l->nth * l->ntw), tile = l->tile, npix = l->npix[kind];
    const int64_t *ds = l->ds, *pixel = l->pixel[kind];
    float *corner = l->dst + i / (l->nth * l->ntw) * ds[0] + o * ds[1] + t / l->ntw * tile * ds[2] + t % l->ntw * tile * ds[3];
    if (ds[1] == 1) {
        for (int64_t q = 0; q < npix; q++)
            memcpy(corner + pixel[q] / tile * ds[2] + pixel[q] % tile * ds[3], a + q * WIDE, (size_t)width * sizeof *a);
        return;
    }
#ifdef __AVX512F__
    if (tile == 4 && npix == 16 && ds[3] == 1) {
        for (int64_t c0 = 0; c0 < width; c0 += 16) {
            int64_t n = width - c0 < 16 ? width - c0 : 16;
            __mmask16 lanes = first_lanes(n);
            __m512 r[16];
            for (int p = 0; p < 16; p++) r[p] = _mm512_maskz_loadu_ps(lanes, a + p * WIDE + c0);
            transpose16(r);
            for (int64_t c = 0; c < n; c++) {
                float *plane = corner + (c0 + c) * ds[1];
                _mm_storeu_ps(plane, _mm512_castps512_ps128(r[c]));
                _mm_storeu_ps(plane + ds[2], _mm512_extractf32x4_ps(r[c], 1));
                _mm_storeu_ps(plane + 2 * ds[2], _mm512_extractf32x4_ps(r[c], 2));
                _mm_storeu_ps(plane + 3 * ds[2], _mm512_extractf32x4_ps(r[c], 3));
            }
        }
        return;
    }
#endif
    for (int64_t q = 0; q < npix; q++) {
        float *to = corner + pixel[q] / tile * ds[2] + pixel[q] % tile * ds[3];
        for (int64_t v = 0; v < width; v++) to[v * ds[1]] = a[q * WIDE + v];
    }
}

/* Sorted tiles [g0, g1): means, then output channels WIDE at a time with kernel taps outermost, so
 * the weight slice of one (tap, WIDE channels) is read once per group from memory and then from
 * cache by every tile of the group. */
static void run_group(const Layer *l, Work *w, int64_t g0, int64_t g1) {
    int64_t c = l->c, k2 = l->k2, pix_pad = l->pix_pad, o_b = l->o_b;
    for (int64_t i = g0; i < g1; i++)
        bucket_means(l->patches + i * c * l->d, l->d, l->channels + i * c, l->starts + i * l->b_max,
                     l->count[i], c, w->means + (i - g0) * l->tile_floats);
    for (int64_t block = 0; block < l->blocks; block++) {
        const float *weight = l->w_rows + block * c * k2 * o_b;
        for (int64_t o0 = 0; o0 < o_b; o0 += WIDE) {
            int64_t width = o_b - o0 < WIDE ? o_b - o0 : WIDE;
            float start[WIDE] = {0};
            if (l->bias != NULL) memcpy(start, l->bias + block * o_b + o0, (size_t)width * sizeof *start);
            for (int64_t i = 0; i < (g1 - g0) * pix_pad; i++) memcpy(w->acc + i * WIDE, start, sizeof start);
            for (int64_t ij = 0; ij < k2; ij++) {
                for (int64_t i = g0; i < g1; i++) {
                    int kind = tile_kind(l, i);
                    int64_t npix = l->npix[kind];
                    merge_rows(weight + ij * o_b + o0, k2 * o_b, l->channels + i * c, l->starts + i * l->b_max, c,
                               l->count[i], width, w->merged, w->rows);
                    for (int64_t p0 = 0; p0 < npix; p0 += PIX)
                        tile_tap(w->means + (i - g0) * l->tile_floats, l->d, l->at[kind] + ij * pix_pad + p0,
                                 l->count[i], w->rows, w->acc + ((i - g0) * pix_pad + p0) * WIDE,
                                 npix - p0 < PIX ? npix - p0 : PIX);
                }
            }
            for (int64_t i = g0; i < g1; i++)
                write_tile(l, i, block * o_b + o0, width, w->acc + (i - g0) * pix_pad * WIDE);
        }
    }
}

/* Every tile's outputs. Tile i's patches are rows (i * C .. + C) of `patches` [tiles * C, d], its
 * buckets row i of channels [tiles, C], starts [tiles, b_max] and count [tiles]; tiles row-major in
 * an nth x ntw grid per sample. Geometry: T x T output tile, k_h x k_w kernel, strides, dilations,
 * tw = patch width, h_out x w_out the conv's output. Writes the output map dst [N, O, h_out, w_out]
 * (strides ds, any layout) straight from the accumulators: an edge tile's pixels past the output (all
 * of a 4x4 tile's but one on a 1x1 output) are neither computed nor written. Returns 0, or -1 when out
 * of memory.
 *
 * Tiles go in groups whose bucket means fit GROUP_FLOATS, at least as many groups as threads
 * where there are tiles enough; threads take groups (OpenMP, torch's pool). */
int64_t haste_tile_convs(const float *patches, int64_t tiles, int64_t c, int64_t d, const int64_t *channels,
                         const int64_t *starts, const int64_t *count, int64_t b_max, const float *w_rows, int64_t blocks, int64_t o_b, const float *bias, int64_t tile,
                         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t tw,
                         int64_t h_out, int64_t w_out, float *dst, const int64_t *ds) {
    int64_t k2 = kh * kw, pixels = tile * tile, pix_pad = (pixels + PIX - 1) / PIX * PIX;
    int64_t nth = (h_out + tile - 1) / tile, ntw = (w_out + tile - 1) / tile;
    int64_t *at = malloc((size_t)(4 * (k2 * pix_pad + pixels)) * sizeof *at);
    if (at == NULL) return -1;
    Layer l = {patches, w_rows, bias, channels, starts, count, {0}, {0}, {0}, c, d, b_max, blocks, o_b, k2, pix_pad,
               (b_max > 0 ? b_max : 1) * d, tile, nth, ntw, dst, {ds[0], ds[1], ds[2], ds[3]}};
    for (int kind = 0; kind < 4; kind++) {
        int64_t rows = kind & 2 ? h_out - (nth - 1) * tile : tile, cols = kind & 1 ? w_out - (ntw - 1) * tile : tile;
        int64_t *table = at + kind * (k2 * pix_pad + pixels), *pixel = table + k2 * pix_pad, q = 0;
        for (int64_t y = 0; y < rows; y++)
            for (int64_t x = 0; x < cols; x++) pixel[q++] = y * tile + x;
        for (int64_t ij = 0; ij < k2; ij++)
            for (int64_t r = 0; r < pix_pad; r++) { /* past the tile's pixels: position 0, never written out */
                int64_t p = pixel[r < q ? r : 0];
                table[ij * pix_pad + r] = r < q ? ((p / tile) * sh + (ij / kw) * dh) * tw + (p % tile) * sw + (ij % kw) * dw : 0;
            }
        l.at[kind] = table;
        l.pixel[kind] = pixel;
        l.npix[kind] = q;
    }
    int64_t threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    int64_t group = GROUP_FLOATS / l.tile_floats > 1 ? GROUP_FLOATS / l.tile_floats : 1;
    int64_t per_thread = (tiles + threads - 1) / threads;
    if (per_thread < group) group = per_thread > 1 ? per_thread : 1;
    int64_t groups = (tiles + group - 1) / group, failed = 0;
#pragma omp parallel if (groups > 1) reduction(| : failed)
    {
        Work w;
        if (alloc_work(&w, &l, group) < 0) {
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < groups; g++)
                run_group(&l, &w, g * group, (g + 1) * group < tiles ? (g + 1) * group : tiles);
            free_work(&w);
        }
    }
    free(at);
    return failed ? -1 : 0;
}
