/* HASTE's front of a layer, tile by tile (fxslim/runtime/haste_kernel.py): every channel's input
 * window of each tile and, given the planes, the tile's hash codes while its windows are in cache.
 *
 * ATen's path builds a zero canvas, copies x in and copies the windows out (three passes), then
 * projects the windows with one GEMM [tiles*C, d] @ [d, L] (L = 12: a shape BLAS runs at a fraction
 * of its speed) and centres, compares and packs the projections in four more passes over
 * [tiles, C, L] floats. Here a tile's windows are gathered straight from x (any strides, zero
 * padding by range) and projected against all planes at once, eight windows at a time (the planes
 * transposed, 16 to a vector), then centred and packed.
 *
 * Projections sum the d products in order with fused multiply-adds; the channel sum is taken in
 * double and rounded to float (exact where ATen's float sum is, e.g. for integer data), divided and
 * subtracted in float as ATen does. ATen's GEMM and sums round in other orders, so a code can
 * differ where a centred projection lies within float32 rounding of 0: the same tie the loop
 * reference (which centres before projecting) already breaks its own way.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { MAX_PLANES = 64, VEC = 16, ROWS = 8 };

/* The c windows of tile (ti, tj) of sample s into out [c][th * tw]: x[s, ch, y, xx] at y = ti * tile
 * * sh + u - ph, xx = tj * tile * sw + v - pw when 0 <= y < rows and 0 <= xx < cols, else 0 (rows,
 * cols: the input rows and columns some output reads). */
static void gather(const float *x, int64_t c, int64_t x_sn, int64_t x_sc, int64_t x_sh, int64_t x_sw, int64_t rows,
                   int64_t cols, int64_t ph, int64_t pw, int64_t s, int64_t ti, int64_t tj, int64_t tile, int64_t sh,
                   int64_t sw, int64_t th, int64_t tw, float *out) {
    int64_t d = th * tw, y0 = ti * tile * sh - ph, x0 = tj * tile * sw - pw;
    int64_t v0 = x0 < 0 ? -x0 : 0, v1 = cols - x0 < tw ? cols - x0 : tw; /* columns inside the input */
#ifdef __AVX512F__
    if (x_sw == 1 && tw <= 16) { /* a window row is one masked load and store, zeros outside the input */
        const __mmask16 store = (__mmask16)((1u << tw) - 1u);
        const __mmask16 load = v1 <= v0 ? 0 : (__mmask16)(((1u << v1) - 1u) & ~((1u << v0) - 1u));
        for (int64_t ch = 0; ch < c; ch++) {
            const float *plane = x + s * x_sn + ch * x_sc;
            for (int64_t u = 0; u < th; u++) {
                int64_t y = y0 + u;
                __m512 row = _mm512_setzero_ps();
                if (y >= 0 && y < rows) /* lanes outside [v0, v1) are masked: never read */
                    row = _mm512_maskz_loadu_ps(load, (const float *)((uintptr_t)(plane + y * x_sh) + x0 * (intptr_t)sizeof(float)));
                _mm512_mask_storeu_ps(out + ch * d + u * tw, store, row);
            }
        }
        return;
    }
#endif
    for (int64_t ch = 0; ch < c; ch++) {
        float *o = out + ch * d;
        const float *plane = x + s * x_sn + ch * x_sc;
        for (int64_t u = 0; u < th; u++) {
            float *row = o + u * tw;
            int64_t y = y0 + u;
            if (y < 0 || y >= rows || v1 <= v0) {
                memset(row, 0, (size_t)tw * sizeof *row);
                continue;
            }
            const float *in = plane + y * x_sh + (x0 + v0) * x_sw;
            for (int64_t v = 0; v < v0; v++) row[v] = 0.0f;
            if (x_sw == 1) {
                memcpy(row + v0, in, (size_t)(v1 - v0) * sizeof *row);
            } else {
                for (int64_t v = v0; v < v1; v++) row[v] = in[(v - v0) * x_sw];
            }
            for (int64_t v = v1; v < tw; v++) row[v] = 0.0f;
        }
    }
}

/* proj[k * lpad + l] = <window k, plane l> for the c windows of one tile; planes_t: [d][lpad]. */
static void project(const float *windows, int64_t c, int64_t d, const float *planes_t, int64_t lpad, float *proj) {
    int64_t k = 0;
#ifdef __AVX512F__
    for (; k + ROWS <= c; k += ROWS) /* eight independent chains hide the multiply-add latency */
        for (int64_t l0 = 0; l0 < lpad; l0 += VEC) {
            __m512 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t j = 0; j < d; j++) {
                __m512 p = _mm512_loadu_ps(planes_t + j * lpad + l0);
                for (int r = 0; r < ROWS; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(windows[(k + r) * d + j]), p, acc[r]);
            }
            for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(proj + (k + r) * lpad + l0, acc[r]);
        }
#endif
    for (; k < c; k++)
        for (int64_t l = 0; l < lpad; l++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < d; j++) sum = __builtin_fmaf(windows[k * d + j], planes_t[j * lpad + l], sum);
            proj[k * lpad + l] = sum;
        }
}

/* Whether any of the n floats is NaN or infinite (x - x is 0 only for a finite x). */
static int any_nonfinite(const float *v, int64_t n) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(v[i] - v[i] == 0.0f);
    return bad;
}

/* codes[k] for the c windows of one tile: the sum over l of 2^l for the planes where the (centred
 * over the tile's channels, when center != 0) projection is > 0. With AVX-512 16 planes at a time
 * (the same sums, in the same order: per plane a double sum over the channels in turn). A tile whose
 * projections are not all finite is projected again with the NaN and inf of its windows taken as 0:
 * one such value would make the channel mean, so every code, the same (the whole tile one bucket).
 * Returns 0, or -1 when out of memory. */
static int tile_codes(const float *windows, int64_t c, int64_t d, const float *planes_t, int64_t L, int64_t lpad,
                      int64_t center, float *proj, float *codes32, double *codes64) {
    project(windows, c, d, planes_t, lpad, proj);
    if (any_nonfinite(proj, c * lpad)) { /* hashed on the windows with NaN and inf taken as 0 */
        float *finite = malloc((size_t)(c * d) * sizeof *finite);
        if (finite == NULL)
            return -1;
        for (int64_t i = 0; i < c * d; i++) finite[i] = windows[i] - windows[i] == 0.0f ? windows[i] : 0.0f;
        project(finite, c, d, planes_t, lpad, proj);
        free(finite);
    }
    float mean[MAX_PLANES] = {0};
#ifdef __AVX512F__
    if (center)
        for (int64_t l0 = 0; l0 < lpad; l0 += VEC) {
            __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
            for (int64_t k = 0; k < c; ++k) {
                __m512 p = _mm512_loadu_ps(proj + k * lpad + l0);
                lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
                hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1))));
            }
            __m512 sum = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
            _mm512_storeu_ps(mean + l0, _mm512_div_ps(sum, _mm512_set1_ps((float)c))); /* as ATen divides its float sum */
        }
    uint64_t keep = L >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << L) - 1u;
    for (int64_t k = 0; k < c; ++k) {
        uint64_t code = 0;
        for (int64_t l0 = 0; l0 < lpad; l0 += VEC) {
            __m512 centred = _mm512_sub_ps(_mm512_loadu_ps(proj + k * lpad + l0), _mm512_loadu_ps(mean + l0));
            code |= (uint64_t)_mm512_cmp_ps_mask(centred, _mm512_setzero_ps(), _CMP_GT_OQ) << l0;
        }
        code &= keep;
#else
    if (center) {
        double sum[MAX_PLANES] = {0};
        for (int64_t k = 0; k < c; ++k)
            for (int64_t l = 0; l < L; ++l) sum[l] += proj[k * lpad + l];
        for (int64_t l = 0; l < L; ++l) mean[l] = (float)sum[l] / (float)c; /* as ATen divides its float sum */
    }
    for (int64_t k = 0; k < c; ++k) {
        uint64_t code = 0;
        for (int64_t l = 0; l < L; ++l) code |= (uint64_t)(proj[k * lpad + l] - mean[l] > 0.0f) << l;
#endif
        if (codes32 != NULL)
            codes32[k] = (float)code;
        else
            codes64[k] = (double)code;
    }
    return 0;
}

/* patches[((s * nth + ti) * ntw + tj) * c + ch][u * tw + v]: every tile's windows (see gather) of x
 * [n, c, ., .] read through its strides (any layout). With planes ([L, d], float32) also the codes
 * [tiles, c] of each tile (see tile_codes): float32 exact integers into codes32 when it is not NULL
 * (L <= 24), else float64 into codes64. Returns 0, or -1 when L > 64 or out of memory. */
int64_t haste_front(const float *x, int64_t n, int64_t c, int64_t x_sn, int64_t x_sc, int64_t x_sh, int64_t x_sw,
                    int64_t rows, int64_t cols, int64_t ph, int64_t pw, int64_t nth, int64_t ntw, int64_t tile,
                    int64_t sh, int64_t sw, int64_t th, int64_t tw, float *patches, const float *planes, int64_t L,
                    int64_t center, float *codes32, double *codes64) {
    const int64_t d = th * tw, lpad = (L + VEC - 1) / VEC * VEC;
    if (planes != NULL && L > MAX_PLANES)
        return -1;
    float *planes_t = NULL;
    if (planes != NULL) {
        planes_t = calloc((size_t)(d * lpad > 0 ? d * lpad : 1), sizeof *planes_t);
        if (planes_t == NULL)
            return -1;
        for (int64_t l = 0; l < L; l++)
            for (int64_t j = 0; j < d; j++) planes_t[j * lpad + l] = planes[l * d + j];
    }
    int64_t failed = 0;
#pragma omp parallel reduction(| : failed) if (n * nth * ntw * c * d > (1 << 16))
    {
        float *proj = planes != NULL ? malloc((size_t)((c > 0 ? c : 1) * lpad) * sizeof *proj) : NULL;
        if (planes != NULL && proj == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t st = 0; st < n * nth * ntw; st++) {
            float *windows = patches + st * c * d;
            gather(x, c, x_sn, x_sc, x_sh, x_sw, rows, cols, ph, pw, st / (nth * ntw), st / ntw % nth, st % ntw, tile,
                   sh, sw, th, tw, windows);
            if (proj != NULL && tile_codes(windows, c, d, planes_t, L, lpad, center, proj,
                                           codes32 ? codes32 + st * c : NULL, codes64 ? codes64 + st * c : NULL))
                failed = 1;
        }
        free(proj);
    }
    free(planes_t);
    return failed ? -1 : 0;
}
