/* Native helpers for nofree's low-precision anchor scan (nofree/anchors/topk.py).
 *
 * Compiled on first use by nofree/anchors/native.py and called through ctypes; every function
 * has a pure-torch twin in topk.py that gives bit-identical results (the tests compare them),
 * used whenever no C compiler is available.
 *
 * A score tile holds approximate query-anchor scores, R query rows by C anchor columns, row
 * stride ld: int32 dot products of an int8 scan (value = score * qscale[row]) or the int16 bit
 * patterns of bfloat16 scores (value = the bfloat16 itself; only used when every row threshold
 * is positive, so that integer order is value order for all entries that can pass).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GROUP 16 /* entries compared at once; a group with none passing costs one compare */

static inline int64_t bin_of(float v, float lo, float inv_w, int64_t n_bins) {
    /* floor((v - lo) * inv_w) clamped to [0, n_bins - 1], as topk._bins computes it in float32
     * (truncation is floor for the non-negative values that reach it) */
    float x = (v - lo) * inv_w;
    if (!(x >= 0.0f)) return 0; /* also NaN */
    if (x >= (float)(n_bins - 1)) return n_bins - 1;
    return (int64_t)x;
}

static inline float bf16_value(int16_t bits) {
    uint32_t u = ((uint32_t)(uint16_t)bits) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Bit i set when p[i] >= t, for the GROUP entries at p. */
static inline uint32_t ge_mask_i32(const int32_t *p, int32_t t) {
#if defined(__AVX512F__)
    return (uint32_t)_mm512_cmpge_epi32_mask(_mm512_loadu_si512((const void *)p), _mm512_set1_epi32(t));
#elif defined(__AVX2__)
    if (t == INT32_MIN) return 0xFFFFu;
    __m256i below = _mm256_set1_epi32(t - 1); /* p >= t  <=>  p > t - 1 */
    uint32_t lo = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)p), below)));
    uint32_t hi = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(p + 8)), below)));
    return lo | (hi << 8);
#else
    uint32_t m = 0;
    for (int i = 0; i < GROUP; i++) m |= (uint32_t)(p[i] >= t) << i;
    return m;
#endif
}

static inline uint32_t ge_mask_i16(const int16_t *p, int16_t t) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return (uint32_t)_mm256_cmpge_epi16_mask(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi16(t));
#elif defined(__AVX2__)
    if (t == INT16_MIN) return 0xFFFFu;
    __m256i gt = _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi16((int16_t)(t - 1)));
    __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(gt), _mm256_extracti128_si256(gt, 1));
    return (uint32_t)_mm_movemask_epi8(bytes);
#else
    uint32_t m = 0;
    for (int i = 0; i < GROUP; i++) m |= (uint32_t)(p[i] >= t) << i;
    return m;
#endif
}

/* Writes the entries at p selected by mask m (bit i: p[i], i < GROUP; only selected entries are
 * read), in order, at cols/vals[count..]; returns the new count. May write (not count) up to
 * GROUP slots past the new count. */
static inline int64_t emit_i32(const int32_t *p, uint32_t m, int32_t col, float qs, int32_t *cols,
                               float *vals, int64_t count) {
#if defined(__AVX512F__)
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* a masked load: the lanes not selected are not read (the row's last, partial group) */
    __m512i x = _mm512_maskz_compress_epi32((__mmask16)m, _mm512_maskz_loadu_epi32((__mmask16)m, p));
    __m512i c = _mm512_maskz_compress_epi32((__mmask16)m, _mm512_add_epi32(lane, _mm512_set1_epi32(col)));
    _mm512_storeu_si512((void *)(cols + count), c);
    _mm512_storeu_ps(vals + count, _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(qs)));
    return count + __builtin_popcount(m);
#else
    while (m) {
        int i = __builtin_ctz(m);
        m &= m - 1;
        cols[count] = col + i;
        vals[count++] = (float)p[i] * qs;
    }
    return count;
#endif
}

/* With AVX-512 emitting an empty group is cheaper than a mispredicted branch (a few percent of
 * groups passing, at random, is the common case mid-scan) */
#if defined(__AVX512F__)
#define BRANCHLESS 1
#else
#define BRANCHLESS 0
#endif

static inline int64_t emit_i16(const int16_t *p, uint32_t m, int32_t col, float qs, int32_t *cols,
                               float *vals, int64_t count) {
    (void)qs;
    while (m) {
        int i = __builtin_ctz(m);
        m &= m - 1;
        cols[count] = col + i;
        vals[count++] = bf16_value(p[i]);
    }
    return count;
}

/* Every entry s[r, c] >= thr[r] of the R x C tile (row stride ld), appended from out[n] on as
 * (row, col0 + c, value) in row-then-column order, with hist[r, bin(value)] += 1 for each;
 * returns the new count. value = s * qscale[r] for int32 tiles (int8 scans), the bfloat16 whose
 * bit pattern s is for int16 tiles. The caller guarantees room for n + R * C + GROUP entries. */
#define DEFINE_TAKE(NAME, T, MASK, EMIT)                                                       \
    int64_t NAME(const T *s, int64_t R, int64_t C, int64_t ld, const T *thr, int32_t col0,     \
                 const float *qscale, int32_t *hist, int64_t n_bins, float bin_lo,             \
                 float inv_bin_w, int32_t *rows, int32_t *cols, float *vals, int64_t n) {      \
        int64_t count = n;                                                                     \
        for (int64_t r = 0; r < R; r++) {                                                      \
            const T *row = s + r * ld;                                                         \
            const T t = thr[r];                                                                \
            const float qs = qscale[r];                                                        \
            int64_t start = count, c = 0;                                                      \
            for (; c + GROUP <= C; c += GROUP) {                                               \
                uint32_t m = MASK(row + c, t);                                                 \
                if (BRANCHLESS || m) count = EMIT(row + c, m, col0 + (int32_t)c, qs, cols, vals, count); \
            }                                                                                  \
            for (; c < C; c++)                                                                 \
                if (row[c] >= t) count = EMIT(row + c, 1u, col0 + (int32_t)c, qs, cols, vals, count); \
            int32_t *h = hist + r * n_bins;                                                    \
            for (int64_t j = start; j < count; j++) {                                          \
                rows[j] = (int32_t)r;                                                          \
                h[bin_of(vals[j], bin_lo, inv_bin_w, n_bins)] += 1;                            \
            }                                                                                  \
        }                                                                                      \
        return count;                                                                          \
    }

DEFINE_TAKE(nofree_take_i32, int32_t, ge_mask_i32, emit_i32)
DEFINE_TAKE(nofree_take_i16, int16_t, ge_mask_i16, emit_i16)

/* Per row of hist (R x n_bins), the highest bin b >= lo where the count from the top reaches k:
 * out[r] = b, or -1 when the bins lo.. hold fewer than k entries. */
void nofree_kth_bins(const int32_t *hist, int64_t R, int64_t n_bins, int64_t k, int64_t lo,
                     int64_t *out) {
    for (int64_t r = 0; r < R; r++) {
        const int32_t *h = hist + r * n_bins;
        int64_t total = 0, b = n_bins - 1;
        for (; b >= lo; b--) {
            total += h[b];
            if (total >= k) break;
        }
        out[r] = b >= lo ? b : -1;
    }
}

/* out = clamp(round_half_even(a * inv_scale), -127, 127) as int8, for n floats. */
void nofree_quantize_i8(const float *a, int64_t n, float inv_scale, int8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        float x = nearbyintf(a[i] * inv_scale);
        x = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
        out[i] = (int8_t)x;
    }
}

/* Keep the triples j < n with vals[j] >= level[rows[j]], moved to the front in order; returns how
 * many were kept. */
int64_t nofree_prune(int32_t *rows, int32_t *cols, float *vals, int64_t n, const float *level) {
    int64_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        if (!(vals[j] >= level[rows[j]])) continue;
        rows[m] = rows[j];
        cols[m] = cols[j];
        vals[m++] = vals[j];
    }
    return m;
}

typedef struct {
    float val;
    int32_t col;
} scored;

static int by_value_then_col(const void *pa, const void *pb) {
    const scored *a = (const scored *)pa, *b = (const scored *)pb;
    if (a->val != b->val) return a->val > b->val ? -1 : 1; /* decreasing value */
    return (a->col > b->col) - (a->col < b->col);         /* then increasing id */
}

/* The k best (value, col) of each of nb rows from n flat triples (rows[j] in [0, nb)), ordered by
 * decreasing value, ties by increasing col, into out_vals / out_cols (nb x k). Returns -1 when
 * done, the first row with fewer than k triples, or -2 when out of memory. Values must not be NaN. */
int64_t nofree_top_per_row(const int32_t *rows, const int32_t *cols, const float *vals, int64_t n,
                           int64_t nb, int64_t k, float *out_vals, int64_t *out_cols) {
    int64_t *start = (int64_t *)calloc((size_t)nb + 1, sizeof *start);
    scored *items = (scored *)malloc((size_t)(n > 0 ? n : 1) * sizeof *items);
    if (!start || !items) {
        free(start);
        free(items);
        return -2;
    }
    for (int64_t j = 0; j < n; j++) start[rows[j] + 1]++;
    for (int64_t r = 0; r < nb; r++) start[r + 1] += start[r];
    for (int64_t r = 0; r < nb; r++)
        if (start[r + 1] - start[r] < k) {
            free(start);
            free(items);
            return r;
        }
    int64_t *fill = (int64_t *)malloc((size_t)nb * sizeof *fill);
    if (!fill) {
        free(start);
        free(items);
        return -2;
    }
    memcpy(fill, start, (size_t)nb * sizeof *fill);
    for (int64_t j = 0; j < n; j++) {
        scored item = {vals[j], cols[j]};
        items[fill[rows[j]]++] = item;
    }
    for (int64_t r = 0; r < nb; r++) {
        scored *row = items + start[r];
        qsort(row, (size_t)(start[r + 1] - start[r]), sizeof *row, by_value_then_col);
        for (int64_t i = 0; i < k; i++) {
            out_vals[r * k + i] = row[i].val;
            out_cols[r * k + i] = row[i].col;
        }
    }
    free(fill);
    free(start);
    free(items);
    return -1;
}

