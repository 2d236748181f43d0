/* HASTE's reduced convs, tile by tile, without materialising merged filters (fxslim/runtime/haste_kernel.py).
 *
 * For a tile with B buckets the method convolves the B bucket means of its input window with the
 * merged filters W~[ij, b] = sum over the bucket's channels c of W[c, ij]. The ATen path writes
 * every merged filter (B * k^2 * O floats per tile) and reads it back in a GEMM of only T*T rows.
 * Here a merged filter exists only as four vectors of 16 output channels in registers: for each
 * kernel tap ij and bucket b it is summed from the weight rows of the bucket's channels and at once
 * multiplied into the accumulators of 6 output pixels (24 accumulators; a 4x4 tile is 6 + 6 + 4
 * pixels). Work per tile: C * k^2 * O additions (the merge) and B * k^2 * P * O multiply-adds
 * (the reduced conv) for its P <= T^2 pixels inside the output, as the method counts them. Each pixel's input is a broadcast straight from
 * the tile's bucket means ([B][d], the patch positions per tap precomputed).
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

/* means[b * d + q] = the mean over bucket b's channels of patch value q. */
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

/* rows[b] -> W~[ij, b] (WIDE floats; `width` of them real) = the sum of the weight rows at tap ij
 * of bucket b's channels, for every bucket of a tile: a singleton's own weight row where all WIDE
 * floats are real, else a row of `merged` summed in registers. */
#ifdef __AVX512F__
static void merge_rows(const float *w_ij, int64_t row_stride, const int64_t *channels, const int64_t *starts,
                       int64_t c, int64_t buckets, int64_t width, float *merged, const float **rows) {
    __mmask16 mask[NV];
    for (int v = 0; v < NV; v++) {
        int64_t left = width - v * VEC;
        mask[v] = left >= VEC ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
    }
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
    int64_t c, d, b_max, blocks, o_b, k2, pix_pad, tile_floats, out_block_stride, out_tile_stride, nth, ntw;
    float *out;
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
            for (int64_t i = g0; i < g1; i++) {
                int kind = tile_kind(l, i);
                float *o = l->out + block * l->out_block_stride + i * l->out_tile_stride + o0;
                const float *a = w->acc + (i - g0) * pix_pad * WIDE;
                for (int64_t q = 0; q < l->npix[kind]; q++)
                    memcpy(o + l->pixel[kind][q] * o_b, a + q * WIDE, (size_t)width * sizeof *o);
            }
        }
    }
}

/* Every tile's outputs. Tile i's patches are rows (i * C .. + C) of `patches` [tiles * C, d], its
 * buckets row i of channels [tiles, C], starts [tiles, b_max] and count [tiles]; tiles row-major in
 * an nth x ntw grid per sample. Geometry: T x T output tile, k_h x k_w kernel, strides, dilations,
 * tw = patch width, h_out x w_out the conv's output. Writes out[block * out_block_stride + i *
 * out_tile_stride + p * o_b + o] for the pixels p = y * T + x of the T x T tile inside the output;
 * an edge tile's pixels past it (all of a 4x4 tile's but one on a 1x1 output) are neither computed
 * nor written. Returns 0, or -1 when out of memory.
 *
 * Tiles go in groups whose bucket means fit GROUP_FLOATS, at least as many groups as threads
 * where there are tiles enough; threads take groups (OpenMP, torch's pool). */
int64_t haste_tile_convs(const float *patches, int64_t tiles, int64_t c, int64_t d, const int64_t *channels,
                         const int64_t *starts, const int64_t *count, int64_t b_max, const float *w_rows, int64_t blocks, int64_t o_b, const float *bias, int64_t tile,
                         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t tw,
                         int64_t h_out, int64_t w_out, float *out, int64_t out_block_stride, int64_t out_tile_stride) {
    int64_t k2 = kh * kw, pixels = tile * tile, pix_pad = (pixels + PIX - 1) / PIX * PIX;
    int64_t nth = (h_out + tile - 1) / tile, ntw = (w_out + tile - 1) / tile;
    int64_t *at = malloc((size_t)(4 * (k2 * pix_pad + pixels)) * sizeof *at);
    if (at == NULL) return -1;
    Layer l = {patches, w_rows, bias, channels, starts, count, {0}, {0}, {0}, c, d, b_max, blocks, o_b, k2, pix_pad,
               (b_max > 0 ? b_max : 1) * d, out_block_stride, out_tile_stride, nth, ntw, out};
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

/* The tiles' outputs into the output map, cropped: dst[s, blk * o_b + o, ti * T + y, tj * T + x] =
 * src[s, ti, tj, y, x, blk, o] for the pixels inside h_out x w_out, both through their strides
 * (src: 7, dst: 4). ATen's copy of the permuted view walked it element by element; here an NCHW
 * output is written a row of a tile at a time, a channels_last one a pixel's channels at a time. */
void haste_stitch(const float *src, int64_t n, int64_t nth, int64_t ntw, int64_t tile, int64_t blocks, int64_t o_b,
                  const int64_t *ss, float *dst, int64_t h_out, int64_t w_out, const int64_t *ds) {
#pragma omp parallel for schedule(static) if (n * nth * ntw * tile * tile * blocks * o_b > (1 << 16))
    for (int64_t st = 0; st < n * nth * ntw; st++) {
        int64_t s = st / (nth * ntw), ti = st / ntw % nth, tj = st % ntw;
        int64_t rows = h_out - ti * tile < tile ? h_out - ti * tile : tile;
        int64_t cols = w_out - tj * tile < tile ? w_out - tj * tile : tile;
        const float *from = src + s * ss[0] + ti * ss[1] + tj * ss[2];
        float *to = dst + s * ds[0] + ti * tile * ds[2] + tj * tile * ds[3];
        if (ds[1] == 1 && ss[6] == 1) { /* channels_last: each pixel's channels contiguous on both sides */
            for (int64_t y = 0; y < rows; y++)
                for (int64_t x = 0; x < cols; x++)
                    for (int64_t blk = 0; blk < blocks; blk++) {
                        const float *a = from + y * ss[3] + x * ss[4] + blk * ss[5];
                        float *b = to + y * ds[2] + x * ds[3] + blk * o_b;
                        for (int64_t o = 0; o < o_b; o++) b[o] = a[o];
                    }
            continue;
        }
        for (int64_t blk = 0; blk < blocks; blk++)
            for (int64_t o = 0; o < o_b; o++) {
                const float *a = from + blk * ss[5] + o * ss[6];
                float *b = to + (blk * o_b + o) * ds[1];
                for (int64_t y = 0; y < rows; y++)
                    for (int64_t x = 0; x < cols; x++) b[y * ds[2] + x * ds[3]] = a[y * ss[3] + x * ss[4]];
            }
    }
}
