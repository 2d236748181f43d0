/* HASTE's hash codes from the projections of every channel's window (fxslim/runtime/haste_kernel.py).
 *
 * ATen's path centres the projections over the channels of each tile, compares them with 0 and
 * packs the bits with a matmul: four passes over [tiles, C, L] floats, three times as long as the
 * projection GEMM before them. Here each tile's C·L projections are read once, in cache.
 *
 * The channel sum is taken in double and rounded to float (exact where ATen's float sum is, e.g.
 * for integer data), divided and subtracted in float as ATen does; ATen sums in another order, so a code can differ where a centred projection lies within
 * float32 rounding of 0, the same tie the loop reference (which centres before projecting) already
 * breaks its own way.
 */
#include <stdint.h>

enum { MAX_PLANES = 64 };

/* proj: [tiles, c, L] float32 (contiguous). Writes codes [tiles, c]: sum over l of 2^l for the
 * planes where the (centred, when center != 0) projection is > 0; as float32 exact integers into
 * codes32 when it is not NULL (L <= 24), else as float64 into codes64. Returns -1 when L > 64. */
int64_t haste_codes(const float *proj, int64_t tiles, int64_t c, int64_t L, int64_t center, float *codes32,
                    double *codes64) {
    if (L > MAX_PLANES)
        return -1;
    for (int64_t t = 0; t < tiles; ++t) {
        const float *p = proj + t * c * L;
        float mean[MAX_PLANES];
        for (int64_t l = 0; l < L; ++l)
            mean[l] = 0.0f;
        if (center) {
            double sum[MAX_PLANES] = {0};
            for (int64_t k = 0; k < c; ++k)
                for (int64_t l = 0; l < L; ++l)
                    sum[l] += p[k * L + l];
            for (int64_t l = 0; l < L; ++l)
                mean[l] = (float)sum[l] / (float)c; /* as ATen divides its float sum */
        }
        for (int64_t k = 0; k < c; ++k) {
            uint64_t code = 0;
            for (int64_t l = 0; l < L; ++l)
                code |= (uint64_t)(p[k * L + l] - mean[l] > 0.0f) << l;
            if (codes32 != 0)
                codes32[t * c + k] = (float)code;
            else
                codes64[t * c + k] = (double)code;
        }
    }
    return 0;
}
