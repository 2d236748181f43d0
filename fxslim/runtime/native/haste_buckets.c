/* HASTE's buckets from hash codes, per tile (fxslim/runtime/haste_kernel.py).
 *
 * A tile's channels with equal codes form a bucket. ATen's path sorts the codes of all tiles as
 * one tensor and builds the bucket indices with cumsum/scatter passes over it; here each tile's
 * codes are sorted in cache and the indices written in one pass. Codes are exact integers held in
 * float32 (L <= 24 planes) or float64; channels come out sorted by (code, channel), so buckets are
 * in code order, as on the ATen path, and a bucket's channels in channel order.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    double code;
    int64_t channel;
} Entry;

static int by_code(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->code != y->code) return x->code < y->code ? -1 : 1;
    return (x->channel > y->channel) - (x->channel < y->channel);
}

enum { CHANNEL_BITS = 20 }; /* a key is code << CHANNEL_BITS | channel, for codes below 2^44 */

/* Stable LSD radix sort of n keys by their code (key >> CHANNEL_BITS), `bits` bits of it: keys
 * given in channel order come out by (code, channel). Passes of at most 8 bits, split evenly (two of
 * 6 bits for 12-bit codes): branch-free, where a comparison sort mispredicts about every other
 * comparison on random codes. tmp: n keys of scratch. */
static void sort_keys(uint64_t *keys, uint64_t *tmp, int64_t n, int bits) {
    int passes = (bits + 7) / 8;
    int digit = passes > 0 ? (bits + passes - 1) / passes : 0;
    for (int pass = 0; pass < passes; pass++) {
        int shift = CHANNEL_BITS + pass * digit;
        uint64_t mask = ((uint64_t)1 << digit) - 1;
        int64_t at[256] = {0};
        for (int64_t i = 0; i < n; i++) at[(keys[i] >> shift) & mask]++;
        for (int64_t b = 0, sum = 0; b <= (int64_t)mask; b++) {
            int64_t k = at[b];
            at[b] = sum;
            sum += k;
        }
        for (int64_t i = 0; i < n; i++) tmp[at[(keys[i] >> shift) & mask]++] = keys[i];
        uint64_t *swap = keys;
        keys = tmp;
        tmp = swap;
    }
    if (passes % 2 == 1) /* the sorted keys are in the caller's scratch: copy them back */
        for (int64_t i = 0; i < n; i++) tmp[i] = keys[i];
}

/* codes: [tiles, c] (float32 when codes32 != NULL, else codes64 float64). Writes channels [tiles,
 * c] (sorted by code, then channel), starts [tiles, c] (bucket b of tile t starts at starts[t * c
 * + b] in that order; entries past the tile's count are c) and count [tiles]. Returns the largest
 * count, or -1 when out of memory. */
int64_t haste_buckets(const float *codes32, const double *codes64, int64_t tiles, int64_t c, int64_t *channels,
                      int64_t *starts, int64_t *count) {
    int64_t largest = 0, failed = 0;
    int packed = c < ((int64_t)1 << CHANNEL_BITS); /* and every code below 2^44, checked per tile */
#pragma omp parallel reduction(max : largest) reduction(| : failed) if (tiles * c > (1 << 14))
    {
        Entry *entries = malloc((size_t)(c > 0 ? c : 1) * sizeof *entries);
        uint64_t *keys = malloc((size_t)(c > 0 ? 2 * c : 1) * sizeof *keys);
        if (entries == NULL || keys == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (entries == NULL || keys == NULL) continue;
            int fits = packed;
            for (int64_t s = 0; s < c; s++) {
                double code = codes32 != NULL ? (double)codes32[t * c + s] : codes64[t * c + s];
                entries[s].code = code;
                entries[s].channel = s;
                fits &= code >= 0.0 && code < (double)((uint64_t)1 << (64 - CHANNEL_BITS));
            }
            if (fits) {
                uint64_t any = 0;
                for (int64_t s = 0; s < c; s++) {
                    uint64_t code = (uint64_t)entries[s].code;
                    any |= code;
                    keys[s] = (code << CHANNEL_BITS) | (uint64_t)s;
                }
                sort_keys(keys, keys + c, c, any == 0 ? 0 : 64 - __builtin_clzll(any));
                for (int64_t s = 0; s < c; s++) {
                    entries[s].channel = (int64_t)(keys[s] & (((uint64_t)1 << CHANNEL_BITS) - 1));
                    entries[s].code = (double)(keys[s] >> CHANNEL_BITS);
                }
            } else {
                qsort(entries, (size_t)c, sizeof *entries, by_code);
            }
            int64_t b = 0;
            for (int64_t s = 0; s < c; s++) {
                channels[t * c + s] = entries[s].channel;
                if (s == 0 || entries[s].code != entries[s - 1].code) starts[t * c + b++] = s;
            }
            count[t] = b;
            for (int64_t rest = b; rest < c; rest++) starts[t * c + rest] = c;
            largest = b > largest ? b : largest;
        }
        free(entries);
        free(keys);
    }
    return failed ? -1 : largest;
}
