/* HTTM matching through bfloat16 scores, with float32 decisions.
 *
 * HTTM's matching (fxslim/runtime/httm.py) scores sources against destinations with a bfloat16
 * GEMM, four times the float32 GEMM's speed where the CPU has bfloat16 dot products, then calls
 * httm_best_destinations on each chunk of scores. Per row the bfloat16 scores only screen: every
 * destination whose score is within `margin` of the row's largest (wider than twice the bfloat16
 * score's error bound, made per row from the measured rounding errors of the source and the
 * destinations: see httm_best_destinations) is a candidate, and when there is more than one, the
 * candidates are scored again in float32 (from the features themselves) and the first highest
 * wins. So the choice is the float32 argmax (up to float32 rounding, as between any two float32
 * GEMMs), never a bfloat16 near-tie.
 *
 * Scores are compared as int16 keys (a bfloat16's bits with the magnitude bits flipped for
 * negative values): ordered like the values, and integer max/compare vectorise. The choices hold
 * for finite features: the gathers count the rows whose norm is not finite, and the caller then
 * matches on its float32 path instead. AVX-512BW code where the compiler
 * targets it, plain C elsewhere (the same results).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

static inline int16_t key_of_bits(uint16_t bits) {
    int16_t s = (int16_t)bits;
    return (int16_t)(s ^ ((s >> 15) & 0x7fff));
}

static inline float float_of_key(int16_t key) {
    int16_t s = (int16_t)(key ^ ((key >> 15) & 0x7fff));
    uint32_t bits = (uint32_t)(uint16_t)s << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Key of the largest bfloat16 value <= t (t finite). */
static inline int16_t key_at_or_below(float t) {
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);
    uint16_t high = (uint16_t)(bits >> 16);
    if ((bits & 0xffffu) && (bits >> 31)) {
        high += 1; /* negative: dropping the low bits rounds up, so step one further from zero */
    }
    return key_of_bits(high);
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

/* Rows are read in index order, scattered over x: ask for the row AHEAD places on while this one
 * is processed (the hardware prefetcher does not follow indices). */
enum { AHEAD = 8 };
static inline void prefetch_row(const float *base, int64_t row, int64_t d) {
    const char *p = (const char *)(base + row * d);
    for (int64_t b = 0; b < d * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b);
}

/* bfloat16 bits of x, rounded to nearest even (x finite). */
static inline uint16_t bf16_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Whether a row of Euclidean norm `norm` (computed in float32) screens safely: a finite norm means
 * finite features whose squares, and so every dot product with a unit vector, stay in range. */
static inline int unsafe_norm(float norm) { return !(norm <= FLT_MAX); }

/* o16 = the bfloat16 bits of row / scale (row itself when !divide; F.normalize's division when
 * divide), returns the Euclidean norm of the rounding error bf16(v) - v, v = the float32 row /
 * scale (exact in float32: a float and its bfloat16 rounding are within a factor 2). */
static inline float bf16_row(const float *row, int64_t d, int divide, float scale, uint16_t *o16) {
    float e = 0.0f;
    for (int64_t c = 0; c < d; c++) {
        float v = divide ? row[c] / scale : row[c];
        uint16_t b = bf16_bits(v);
        uint32_t bits = (uint32_t)b << 16;
        float r;
        memcpy(&r, &bits, sizeof r);
        o16[c] = b;
        e += (r - v) * (r - v);
    }
    return __builtin_sqrtf(e);
}

/* For i < count: out16[i, :] = x[index[i], :] in bfloat16, norms[i] = the row's Euclidean norm and
 * errs[i] = the norm of its bfloat16 rounding error (the screening margin's share of the source).
 * The GEMM reads the sources of a chunk in order; httm_best_destinations rescores from x itself.
 * Returns how many rows have a norm that is not finite (NaN, inf, or squares beyond float32):
 * their chunk must not be screened. */
int64_t httm_gather_sources(const float *x, const int64_t *index, int64_t count, int64_t d, uint16_t *out16,
                            float *norms, float *errs) {
    int64_t unsafe = 0;
#pragma omp parallel for schedule(static) reduction(+ : unsafe) if (count * d > (1 << 16))
    for (int64_t i = 0; i < count; i++) {
        if (i + AHEAD < count) prefetch_row(x, index[i + AHEAD], d);
        const float *row = x + index[i] * d;
        errs[i] = bf16_row(row, d, 0, 1.0f, out16 + i * d);
        norms[i] = __builtin_sqrtf(dot(row, row, d));
        unsafe += unsafe_norm(norms[i]);
    }
    return unsafe;
}

/* For i < count: scales[i] = max(|x[index[i], :]|, eps) (F.normalize's rule) and out16[i, :] =
 * x[index[i], :] / scales[i] in bfloat16: the destinations of a block class. *err_max = the largest
 * norm of a row's bfloat16 rounding error. Returns how many rows have a norm that is not finite (as
 * httm_gather_sources). */
int64_t httm_gather_destinations(const float *x, const int64_t *index, int64_t count, int64_t d, float eps,
                                 uint16_t *out16, float *scales, float *err_max) {
    int64_t unsafe = 0;
    float worst = 0.0f;
#pragma omp parallel for schedule(static) reduction(+ : unsafe) reduction(max : worst) if (count * d > (1 << 16))
    for (int64_t i = 0; i < count; i++) {
        if (i + AHEAD < count) prefetch_row(x, index[i + AHEAD], d);
        const float *row = x + index[i] * d;
        float norm = __builtin_sqrtf(dot(row, row, d));
        unsafe += unsafe_norm(norm);
        float scale = norm > eps ? norm : eps;
        scales[i] = scale;
        float e = bf16_row(row, d, 1, scale, out16 + i * d);
        worst = e > worst ? e : worst;
    }
    *err_max = worst;
    return unsafe;
}

#ifdef __AVX512BW__
/* 32 scores from p (lanes outside `valid` read as +0.0), as raw int16 bits or as keys. */
static inline __m512i bits32(const uint16_t *p, __mmask32 valid) { return _mm512_maskz_loadu_epi16(valid, p); }

static inline __m512i keys_of(__m512i s) {
    return _mm512_xor_si512(s, _mm512_and_si512(_mm512_srai_epi16(s, 15), _mm512_set1_epi16(0x7fff)));
}

static inline __mmask32 tail_mask(int64_t j, int64_t cols) {
    int64_t left = cols - j;
    return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
}

static inline int16_t hmax(__m512i v) {
    __m256i t = _mm256_max_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    __m128i u = _mm_max_epi16(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_max_epi16(u, _mm_shuffle_epi32(u, 0x4e));
    u = _mm_max_epi16(u, _mm_shuffle_epi32(u, 0xb1));
    u = _mm_max_epi16(u, _mm_shufflelo_epi16(u, 0xb1));
    return (int16_t)_mm_extract_epi16(u, 0);
}

/* Largest key of the row. The raw bits of a non-negative bfloat16 are its key and exceed the
 * raw bits of every negative one (sign bit set: negative as int16), so the raw maximum is the
 * answer whenever it is non-negative; only a row of negative scores needs the keys. */
static int16_t row_top(const uint16_t *row, int64_t cols) {
    __m512i a = _mm512_set1_epi16(INT16_MIN), b = a;
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) {
        a = _mm512_max_epi16(a, _mm512_loadu_si512(row + j));
        b = _mm512_max_epi16(b, _mm512_loadu_si512(row + j + 32));
    }
    for (; j < cols; j += 32) {
        __mmask32 m = tail_mask(j, cols);
        a = _mm512_mask_max_epi16(a, m, a, bits32(row + j, m));
    }
    int16_t top = hmax(_mm512_max_epi16(a, b));
    if (top >= 0) return top;
    __m512i k = _mm512_set1_epi16(INT16_MIN);
    for (j = 0; j < cols; j += 32) {
        __mmask32 m = tail_mask(j, cols);
        k = _mm512_mask_max_epi16(k, m, k, keys_of(bits32(row + j, m)));
    }
    return hmax(k);
}

static inline int64_t add_hits(uint32_t hits, int64_t j0, int32_t *cand, int64_t n, int64_t cap) {
    for (; hits; hits &= hits - 1, n++) {
        if (n < cap) cand[n] = (int32_t)(j0 + __builtin_ctz(hits));
    }
    return n;
}

/* The columns whose key is >= floor_key, in order, into cand (the first cap of them); returns how
 * many there are. With a positive floor the raw bits compare like the keys (negative scores are
 * negative int16s, below it). */
static int64_t candidates(const uint16_t *row, int64_t cols, int16_t floor_key, int32_t *cand, int64_t cap) {
    __m512i floor_v = _mm512_set1_epi16(floor_key);
    int64_t n = 0, j = 0;
    if (floor_key > 0) {
        for (; j + 32 <= cols; j += 32)
            n = add_hits(_mm512_cmpge_epi16_mask(_mm512_loadu_si512(row + j), floor_v), j, cand, n, cap);
    } else {
        for (; j + 32 <= cols; j += 32)
            n = add_hits(_mm512_cmpge_epi16_mask(keys_of(_mm512_loadu_si512(row + j)), floor_v), j, cand, n, cap);
    }
    if (j < cols) {
        __mmask32 m = tail_mask(j, cols);
        n = add_hits(_mm512_mask_cmpge_epi16_mask(m, keys_of(bits32(row + j, m)), floor_v), j, cand, n, cap);
    }
    return n;
}
#else
static int16_t row_top(const uint16_t *row, int64_t cols) {
    int16_t top = INT16_MIN;
    for (int64_t j = 0; j < cols; j++) {
        int16_t k = key_of_bits(row[j]);
        top = k > top ? k : top;
    }
    return top;
}

static int64_t candidates(const uint16_t *row, int64_t cols, int16_t floor_key, int32_t *cand, int64_t cap) {
    int64_t n = 0;
    for (int64_t j = 0; j < cols; j++) {
        if (key_of_bits(row[j]) >= floor_key) {
            if (n < cap) cand[n] = (int32_t)j;
            n++;
        }
    }
    return n;
}
#endif

/* The candidate (column) whose float32 score src . x[dst_index[j]] / dst_scales[j] is highest (the
 * destination normalised as F.normalize does, up to float32 rounding), the first of equals. */
static int64_t rescore(const float *src, const float *x, const int64_t *dst_index, const float *dst_scales, int64_t d,
                       const int32_t *cand, int64_t count) {
    int64_t choice = cand[0];
    float best = dot(src, x + dst_index[choice] * d, d) / dst_scales[choice];
    for (int64_t i = 1; i < count; i++) {
        int64_t j = cand[i];
        float s = dot(src, x + dst_index[j] * d, d) / dst_scales[j];
        if (s > best) {
            best = s;
            choice = j;
        }
    }
    return choice;
}

/* scores: [pairs, rows, cols] bfloat16 bits, row r of pair p scoring source x[src_index[p * rows + r]]
 * (Euclidean norm norms[.], bfloat16 rounding error of norm errs[.]) against the cols destinations
 * x[dst_index[p * cols + j]] / dst_scales[p * cols + j] (bfloat16 rounding errors of norm <= dst_err).
 * Writes the best destination (column) of pair p's row r to best[p * best_pair_stride + r].
 *
 * A row's candidates are the destinations whose bfloat16 score is within
 *     margin = 1.01 * (2 E + 2 out_rel |top|) / (1 - out_rel) + abs_margin
 * of its largest, top, where E = errs k + (norms + errs) dst_err + gamma (norms + errs) (k + dst_err)
 * + gamma norms bounds, for every destination, the distance of its bfloat16 score before the
 * output's rounding from its exact score plus a float32 score's error: the inputs' rounding errors
 * against unit destinations (of float32 norm at most k = 1 + gamma + 2^-22: a float32 sum of
 * squares, a square root and a division each rounded; below 1 when eps applies), then float32 sums
 * of d products (gamma = d 2^-24 / (1 - d 2^-24), d < 2^20) in the GEMM and in the float32
 * reference. The output's rounding to bfloat16 moves a score s by at most out_rel |s| (out_rel =
 * u / (1 - u), u = 2^-8), and abs_margin covers products and inputs flushed to zero as denormals.
 * A destination left out scores below top by more than both errors: it cannot be float32's choice.
 * 1 % slack covers the float32 evaluation of the margin.
 * Returns how many rows were scored again in float32, or -1 when out of memory. */
int64_t httm_best_destinations(const uint16_t *scores, int64_t pairs, int64_t rows, int64_t cols, const float *x,
                               const int64_t *src_index, const float *norms, const float *errs,
                               const int64_t *dst_index, const float *dst_scales, float dst_err, int64_t d,
                               float gamma, float out_rel, float abs_margin, int64_t *best, int64_t best_pair_stride) {
    enum { CAP = 64 };
    const float unit = 1.0f + gamma + 0x1p-22f, widen = 1.01f / (1.0f - out_rel);
    int64_t rescored = 0, failed = 0;
#pragma omp parallel reduction(+ : rescored) reduction(| : failed) if (pairs * rows * cols > (1 << 18))
    {
        int32_t cand[CAP];
        int32_t *all = NULL; /* cols entries, made on first need */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < pairs * rows; i++) {
            int64_t p = i / rows, r = i % rows;
            const int64_t *dst_index_p = dst_index + p * cols;
            const float *dst_scales_p = dst_scales + p * cols;
            const uint16_t *row = scores + i * cols;
            if (i + AHEAD < pairs * rows) prefetch_row(x, src_index[i + AHEAD], d);
            const float *src = x + src_index[i] * d;
            float norm = norms[i], err = errs[i];
            float e = err * unit + (norm + err) * dst_err + gamma * (norm + err) * (unit + dst_err) + gamma * norm;
            float top = float_of_key(row_top(row, cols));
            float margin = widen * (2.0f * e + 2.0f * out_rel * __builtin_fabsf(top)) + abs_margin;
            int16_t floor_key = key_at_or_below(top - margin);
            int64_t count = candidates(row, cols, floor_key, cand, CAP);
            int64_t choice = cand[0];
            if (count > CAP) { /* more near-ties than the list holds: a list as long as the row */
                if (all == NULL && (all = malloc((size_t)cols * sizeof *all)) == NULL) {
                    failed = 1;
                    continue;
                }
                count = candidates(row, cols, floor_key, all, cols);
                choice = rescore(src, x, dst_index_p, dst_scales_p, d, all, count);
            } else if (count > 1) {
                choice = rescore(src, x, dst_index_p, dst_scales_p, d, cand, count);
            }
            rescored += count > 1;
            best[p * best_pair_stride + r] = choice;
        }
        free(all);
    }
    return failed ? -1 : rescored;
}
