/* HASTE's hash codes of every channel's window (fxslim/runtime/haste_kernel.py).
 *
 * ATen's path projects the windows with one GEMM [tiles*C, d] @ [d, L] (L = 12: a shape BLAS runs
 * at a fraction of its speed), then centres the projections over the channels of each tile,
 * compares them with 0 and packs the bits in four more passes over [tiles, C, L] floats. Here each
 * tile is projected, centred and packed in cache: eight windows at a time against all planes at
 * once (the planes transposed, 16 to a vector).
 *
 * Projections sum the d products in order with fused multiply-adds; the channel sum is taken in
 * double and rounded to float (exact where ATen's float sum is, e.g. for integer data), divided and
 * subtracted in float as ATen does. ATen's GEMM and sums round in other orders, so a code can
 * differ where a centred projection lies within float32 rounding of 0: the same tie the loop
 * reference (which centres before projecting) already breaks its own way.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { MAX_PLANES = 64, VEC = 16, ROWS = 8 };

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

/* windows: [tiles * c, d], planes: [L, d] (float32, contiguous). Writes codes [tiles, c]: the sum
 * over l of 2^l for the planes where the (centred over the tile's channels, when center != 0)
 * projection is > 0; as float32 exact integers into codes32 when it is not NULL (L <= 24), else as
 * float64 into codes64. Returns 0, or -1 when L > 64 or out of memory. */
int64_t haste_codes(const float *windows, const float *planes, int64_t tiles, int64_t c, int64_t d, int64_t L,
                    int64_t center, float *codes32, double *codes64) {
    if (L > MAX_PLANES)
        return -1;
    const int64_t lpad = (L + VEC - 1) / VEC * VEC;
    float *planes_t = calloc((size_t)(d * lpad), sizeof *planes_t);
    if (planes_t == NULL)
        return -1;
    for (int64_t l = 0; l < L; l++)
        for (int64_t j = 0; j < d; j++) planes_t[j * lpad + l] = planes[l * d + j];
    int64_t failed = 0;
#pragma omp parallel reduction(| : failed) if (tiles * c * d > (1 << 16))
    {
        float *proj = malloc((size_t)((c > 0 ? c : 1) * lpad) * sizeof *proj);
        if (proj == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (proj == NULL) continue;
            project(windows + t * c * d, c, d, planes_t, lpad, proj);
            float mean[MAX_PLANES] = {0};
            if (center) {
                double sum[MAX_PLANES] = {0};
                for (int64_t k = 0; k < c; ++k)
                    for (int64_t l = 0; l < L; ++l) sum[l] += proj[k * lpad + l];
                for (int64_t l = 0; l < L; ++l) mean[l] = (float)sum[l] / (float)c; /* as ATen divides its float sum */
            }
            for (int64_t k = 0; k < c; ++k) {
                uint64_t code = 0;
                for (int64_t l = 0; l < L; ++l) code |= (uint64_t)(proj[k * lpad + l] - mean[l] > 0.0f) << l;
                if (codes32 != NULL)
                    codes32[t * c + k] = (float)code;
                else
                    codes64[t * c + k] = (double)code;
            }
        }
        free(proj);
    }
    free(planes_t);
    return failed ? -1 : 0;
}
