/* HTTM's merge and unmerge over rows of float32 features (fxslim/runtime/httm.py).
 *
 * ATen's index_add_ adds one 64-float row in about 55 ns here and index_select copies one in
 * about 100 ns; a row is four AVX-512 loads. Sums keep ATen's order (rows in index order, each
 * group's sum built up row by row, on one thread), so they are the same floats. Every function
 * checks its indices and returns the first out-of-range position (the caller raises, nothing
 * past it written by the group sums, nothing at all by the others), or -1. Deviations and the
 * gather run on OpenMP threads (torch's pool).
 */
#include <stdint.h>
#include <string.h>

/* Rows are read in index order, scattered over a table: ask for the row AHEAD places on while this one
 * is processed (the hardware prefetcher does not follow indices). */
enum { AHEAD = 8 };
static inline void prefetch_row(const float *base, int64_t row, int64_t d) {
    const char *p = (const char *)(base + row * d);
    for (int64_t b = 0; b < d * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b);
}

/* out[group[i], :] += x[i, :] for i < rows; out: [groups, d], set by the caller. */
int64_t httm_group_sums(const float *x, const int64_t *group, int64_t rows, int64_t d, float *out,
                        int64_t groups) {
    for (int64_t i = 0; i < rows; i++) {
        if (i + AHEAD < rows && group[i + AHEAD] >= 0 && group[i + AHEAD] < groups) prefetch_row(out, group[i + AHEAD], d);
        if (group[i] < 0 || group[i] >= groups) return i;
        float *o = out + group[i] * d;
        const float *r = x + i * d;
        for (int64_t c = 0; c < d; c++) o[c] += r[c];
    }
    return -1;
}

/* The first position i < rows with index[i] outside [0, limit), or -1. */
static int64_t first_bad(const int64_t *index, int64_t rows, int64_t limit) {
    for (int64_t i = 0; i < rows; i++)
        if (index[i] < 0 || index[i] >= limit) return i;
    return -1;
}

/* dev[i] = |x[i, :] - means[group[i], :]| (Euclidean) for i < rows; means: [groups, d]. */
int64_t httm_deviations(const float *x, const int64_t *group, int64_t rows, int64_t d, const float *means,
                        int64_t groups, float *dev) {
    int64_t bad = first_bad(group, rows, groups);
    if (bad >= 0) return bad;
#pragma omp parallel for schedule(static) if (rows * d > (1 << 16))
    for (int64_t i = 0; i < rows; i++) {
        if (i + AHEAD < rows) prefetch_row(means, group[i + AHEAD], d);
        const float *m = means + group[i] * d;
        const float *r = x + i * d;
        float s = 0.0f;
        for (int64_t c = 0; c < d; c++) {
            float diff = m[c] - r[c];
            s += diff * diff;
        }
        dev[i] = __builtin_sqrtf(s);
    }
    return -1;
}

/* out[i, :] = table[index[i], :] for i < rows; table: [table_rows, d]. */
int64_t httm_gather_rows(const float *table, int64_t table_rows, const int64_t *index, int64_t rows, int64_t d,
                         float *out) {
    int64_t bad = first_bad(index, rows, table_rows);
    if (bad >= 0) return bad;
#pragma omp parallel for schedule(static) if (rows * d > (1 << 16))
    for (int64_t i = 0; i < rows; i++) {
        if (i + AHEAD < rows) prefetch_row(table, index[i + AHEAD], d);
        memcpy(out + i * d, table + index[i] * d, (size_t)d * sizeof(float));
    }
    return -1;
}
