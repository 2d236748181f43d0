/* HTTM's merge and unmerge over rows of float32 features (fxslim/runtime/httm.py).
 *
 * ATen's index_add_ adds one 64-float row in about 55 ns here and index_select copies one in
 * about 100 ns; a row is four AVX-512 loads. Sums keep ATen's order (rows in index order, each
 * group's sum built up row by row on one thread), so they are the same floats. Every function
 * checks its indices and returns the first out-of-range position (the caller raises, nothing
 * written), or -1. All run on OpenMP threads (torch's pool); the group sums split by sample and
 * head, whose groups are disjoint.
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

/* out[group[i], :] += x[i, :] for i < rows; out: [groups, d], set by the caller. The rows are
 * `segments` equal runs (one per sample and head in HTTM's layout) and run s adds only into groups
 * [s * per, (s + 1) * per), per = groups / segments, so runs go to OpenMP threads while each group's
 * sum is still built up row by row in index order. Returns the first position whose group is outside
 * its run's range (nothing added then), or -1. */
int64_t httm_group_sums(const float *x, const int64_t *group, int64_t rows, int64_t d, float *out,
                        int64_t groups, int64_t segments) {
    int64_t run = rows / segments, per = groups / segments;
    for (int64_t s = 0; s < segments; s++)
        for (int64_t i = s * run; i < (s + 1) * run; i++)
            if (group[i] < s * per || group[i] >= (s + 1) * per) return i;
#pragma omp parallel for schedule(static) if (segments > 1 && rows * d > (1 << 16))
    for (int64_t s = 0; s < segments; s++) {
        for (int64_t i = s * run; i < (s + 1) * run; i++) {
            if (i + AHEAD < (s + 1) * run) prefetch_row(out, group[i + AHEAD], d);
            float *o = out + group[i] * d;
            const float *r = x + i * d;
            for (int64_t c = 0; c < d; c++) o[c] += r[c];
        }
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
