/* HTTM matching in float32 without a score tensor: each source's best destination, with the GEMM
 * and the argmax in one pass.
 *
 * HTTM's matching (fxslim/runtime/httm.py) picks, for every source of a (head, block) pair, the
 * destination with the largest dot product (destinations are normalised; the source's norm does
 * not change its argmax). As a float32 GEMM with K = d = 64 followed by a max over each row, the
 * scores go out to memory and back: on a CPU without bfloat16 dot products (where the bfloat16
 * screening of httm_best.c does not run) that took twice the FMA time. Here a tile of 16 * SV
 * sources is transposed once (16 x 16 blocks in registers), so that one vector holds one feature of
 * 16 sources; each destination feature is broadcast against it, SV * C scores accumulate in
 * registers over the d features, and each score is compared with its source's best so far straight
 * from the register. Nothing but the chosen index is written.
 *
 * Ties and NaN, as torch.max over the scores after nan_to_num(nan=-inf) (httm.py's float32 path):
 * destinations are visited in order and a score replaces the best only when it is greater, so the
 * first maximal one wins; a NaN score never wins; a source whose every score is NaN or -inf keeps
 * destination 0. Each score is the float32 sum of its d products in feature order (with fused
 * multiply-adds), so the choices equal a float32 GEMM's up to float32 rounding, as between two GEMMs.
 *
 * AVX-512F code where the compiler targets it, plain C elsewhere (the same choices up to that
 * rounding; httm_argmax_vectorized says which: the plain form is about 10x slower than ATen's
 * float32 GEMM and max on an AVX2 CPU, so the caller takes those there). Threads (OpenMP) split the
 * (pair, tile) work items.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* The portable form: one source at a time. */
static void best_plain(const float *x, const int64_t *src, int64_t ns, const float *dst, int64_t nd, int64_t d,
                       int64_t *best) {
    for (int64_t s = 0; s < ns; s++) {
        const float *row = x + src[s] * d;
        float top = -INFINITY;
        int64_t choice = 0;
        for (int64_t c = 0; c < nd; c++) {
            const float *col = dst + c * d;
            float score = 0.0f;
            for (int64_t j = 0; j < d; j++) score = fmaf(row[j], col[j], score);
            if (score > top) { /* false for NaN */
                top = score;
                choice = c;
            }
        }
        best[s] = choice;
    }
}

#ifdef __AVX512F__
/* 16 * SV sources against C destinations: SV * C accumulators in registers. Measured at d = 64 (64 pairs of
 * 1434 sources x 614 destinations, 1 thread, tiles transposed one float at a time): SV 3 C 8 and SV 2 C 12
 * about 60 GMAC/s, 90 % of ATen's float32 GEMM on 2048-square matrices; SV 2 C 10, SV 3 C 6, SV 4 C 6 and
 * SV 1 C 24 34 to 49 (one noisy run). With the register transpose SV 3 C 8 made 74. */
enum { SV = 3, C = 8, TILE = 16 * SV };

/* Scores of the tile's sources (xt: [d][TILE]) against destinations c0 .. c0 + count - 1 (count <= C),
 * folded into each source's best (value, index) per lane. */
static inline __attribute__((always_inline)) void fold(const float *xt, const float *dst, int64_t d, int64_t c0,
                                                       int count, __m512 top[SV], __m512i choice[SV]) {
    __m512 acc[SV][C];
    for (int v = 0; v < SV; v++)
        for (int c = 0; c < C; c++) acc[v][c] = _mm512_setzero_ps();
    const float *col = dst + c0 * d;
    for (int64_t j = 0; j < d; j++) {
        __m512 xv[SV];
        for (int v = 0; v < SV; v++) xv[v] = _mm512_loadu_ps(xt + j * TILE + 16 * v);
        for (int c = 0; c < count; c++) { /* count is the constant C where it matters: fold is inlined */
            __m512 b = _mm512_set1_ps(col[c * d + j]);
            for (int v = 0; v < SV; v++) acc[v][c] = _mm512_fmadd_ps(xv[v], b, acc[v][c]);
        }
    }
    for (int c = 0; c < count; c++) {
        __m512i index = _mm512_set1_epi32((int32_t)(c0 + c));
        for (int v = 0; v < SV; v++) {
            __mmask16 better = _mm512_cmp_ps_mask(acc[v][c], top[v], _CMP_GT_OQ);
            top[v] = _mm512_mask_mov_ps(top[v], better, acc[v][c]);
            choice[v] = _mm512_mask_mov_epi32(choice[v], better, index);
        }
    }
}

/* xt[f * TILE + k] = x[src[k] * d + j0 + f] for the 16 rows k < 16 (0 for k >= rows) and the features
 * f < min(16, d - j0): a 16 x 16 transpose in registers (unpacks, then 128-bit lane shuffles), where
 * one load and store per float took a quarter of the FMA time at 205 destinations. */
static inline void transpose16(const float *x, const int64_t *src, int64_t rows, int64_t d, int64_t j0, float *xt) {
    __mmask16 features = d - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - j0)) - 1);
    __m512 r[16], t[16];
    for (int k = 0; k < 16; k++)
        r[k] = k < rows ? _mm512_maskz_loadu_ps(features, x + src[k] * d + j0) : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) { /* per 128-bit lane L: rows 2i, 2i+1 at features 4L, 4L+1 | 4L+2, 4L+3 */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + m], lane L: feature 4L + m of rows 4i .. 4i + 3 */
        __m512d lo0 = _mm512_castps_pd(t[4 * i]), lo1 = _mm512_castps_pd(t[4 * i + 2]);
        __m512d hi0 = _mm512_castps_pd(t[4 * i + 1]), hi1 = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
    }
    for (int m = 0; m < 4; m++) { /* lanes L of the four row groups: feature 4L + m of rows 0 .. 15 */
        __m512 ab0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), ab1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
        __m512 cd0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        __m512 cd1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
        __m512 out[4] = {_mm512_shuffle_f32x4(ab0, cd0, 0x88), _mm512_shuffle_f32x4(ab1, cd1, 0x88),
                         _mm512_shuffle_f32x4(ab0, cd0, 0xdd), _mm512_shuffle_f32x4(ab1, cd1, 0xdd)};
        for (int l = 0; l < 4; l++)
            if (4 * l + m < d - j0) _mm512_storeu_ps(xt + (4 * l + m) * TILE, out[l]);
    }
}

/* Sources s0 .. s0 + count - 1 (count <= TILE) of one pair: transposed into xt, then every destination. */
static void best_tile(const float *x, const int64_t *src, int64_t count, const float *dst, int64_t nd, int64_t d,
                      float *xt, int64_t *best) {
    for (int v = 0; v < SV; v++)
        for (int64_t j0 = 0; j0 < d; j0 += 16)
            transpose16(x, src + 16 * v, count - 16 * v, d, j0, xt + j0 * TILE + 16 * v);
    __m512 top[SV];
    __m512i choice[SV];
    for (int v = 0; v < SV; v++) {
        top[v] = _mm512_set1_ps(-INFINITY);
        choice[v] = _mm512_setzero_si512();
    }
    int64_t c0 = 0;
    for (; c0 + C <= nd; c0 += C) fold(xt, dst, d, c0, C, top, choice);
    if (c0 < nd) fold(xt, dst, d, c0, (int)(nd - c0), top, choice);
    int32_t lanes[TILE];
    for (int v = 0; v < SV; v++) _mm512_storeu_si512(lanes + 16 * v, choice[v]);
    for (int64_t k = 0; k < count; k++) best[k] = lanes[k];
}
#endif

/* best[p, s] = the destination c < nd of pair p whose dst[p, c] (d floats) has the largest dot product
 * with x[src[p, s]] (a row of x [rows, d]), for every pair p < pairs and source s < ns. Returns -1 when
 * done, the position in src of the first index outside 0 .. rows - 1 (nothing written), or -2 when out
 * of memory (best then incomplete). Nothing is written when nd < 1. */
int64_t httm_best_f32(const float *x, int64_t rows, const int64_t *src, int64_t pairs, int64_t ns, const float *dst,
                      int64_t nd, int64_t d, int64_t *best) {
    for (int64_t i = 0; i < pairs * ns; i++)
        if (src[i] < 0 || src[i] >= rows) return i;
    if (nd < 1) return -1;
#ifdef __AVX512F__
    if (nd <= INT32_MAX) { /* lane indices are int32 */
        int64_t tiles = (ns + TILE - 1) / TILE, failed = 0;
#pragma omp parallel
        {
            float *xt = malloc(sizeof(float) * (size_t)(d * TILE));
            if (!xt) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t item = 0; item < pairs * tiles; item++) {
                if (!xt) continue;
                int64_t p = item / tiles, s0 = (item % tiles) * TILE;
                int64_t count = ns - s0 < TILE ? ns - s0 : TILE;
                best_tile(x, src + p * ns + s0, count, dst + p * nd * d, nd, d, xt, best + p * ns + s0);
            }
            free(xt);
        }
        return failed ? -2 : -1;
    }
#endif
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < pairs; p++) best_plain(x, src + p * ns, ns, dst + p * nd * d, nd, d, best + p * ns);
    return -1;
}

/* 1 where httm_best_f32 runs its AVX-512F form, 0 where it runs the plain one. */
int httm_argmax_vectorized(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
