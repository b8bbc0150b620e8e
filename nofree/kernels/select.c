/* The anchor scan's candidate bookkeeping (nofree/anchors/search/exact.py): taking each score
 * tile's candidates, finding each row's k-th histogram bin, re-quantising anchor chunks, pruning
 * the candidates and ranking each row's best.
 *
 * Compiled on first use by nofree/kernels/build.py and called through nofree/kernels/bindings.py;
 * every function has a pure-torch twin in exact.py that gives bit-identical results (the tests
 * compare them), used whenever no C compiler is available.
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

#include "candidates.h"
#include "jobs.h"

static inline int64_t bin_of(float v, float lo, float inv_w, int64_t n_bins) {
    /* floor((v - lo) * inv_w) clamped to [0, n_bins - 1], as exact._bins computes it in float32
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
    /* a masked load: the lanes not selected are not read (the row's last, partial group) */
    return emit_vec_i32(_mm512_maskz_loadu_epi32((__mmask16)m, p), (__mmask16)m, col, qs, cols, vals, count);
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
    for (int64_t i = 0; i < n; i++) out[i] = (int8_t)quantize1(a[i], inv_scale);
}

typedef struct {
    int32_t *rows, *cols;
    float *vals;
    const float *level;
    int64_t j0, j1, kept;
} prune_job;

static void *prune_run(void *arg) {
    prune_job *p = (prune_job *)arg;
    int64_t m = p->j0;
    for (int64_t j = p->j0; j < p->j1; j++) {
        if (!(p->vals[j] >= p->level[p->rows[j]])) continue;
        p->rows[m] = p->rows[j];
        p->cols[m] = p->cols[j];
        p->vals[m++] = p->vals[j];
    }
    p->kept = m - p->j0;
    return NULL;
}

/* Keep the triples j < n with vals[j] >= level[rows[j]], moved to the front in order; returns how
 * many were kept. Threads compact a share each, then the shares are moved together. */
int64_t nofree_prune(int32_t *rows, int32_t *cols, float *vals, int64_t n, const float *level,
                     int64_t n_threads) {
    prune_job jobs[MAX_THREADS];
    n_threads = thread_count(n_threads, n / 65536 + 1);
    for (int64_t t = 0; t < n_threads; t++) {
        prune_job job = {rows, cols, vals, level, n * t / n_threads, n * (t + 1) / n_threads, 0};
        jobs[t] = job;
    }
    run_jobs(prune_run, jobs, sizeof jobs[0], n_threads);
    int64_t m = jobs[0].kept;
    for (int64_t t = 1; t < n_threads; t++) {
        const int64_t j0 = jobs[t].j0, c = jobs[t].kept;
        memmove(rows + m, rows + j0, (size_t)c * sizeof *rows);
        memmove(cols + m, cols + j0, (size_t)c * sizeof *cols);
        memmove(vals + m, vals + j0, (size_t)c * sizeof *vals);
        m += c;
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

typedef struct {
    scored *items;
    const int64_t *start;
    int64_t r0, r1, k;
    float *out_vals;
    int64_t *out_cols;
} rank_job;

static inline int better(const scored *a, const scored *b) {
    return a->val > b->val || (a->val == b->val && a->col < b->col);
}

static inline void swap_scored(scored *a, scored *b) {
    scored t = *a;
    *a = *b;
    *b = t;
}

/* Reorders items[0..n) so that its k best (by_value_then_col order, a total order here: ids are
 * distinct within a row) come first, in some order: quickselect, median-of-three pivots. */
static void select_best(scored *items, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (better(&items[mid], &items[lo])) swap_scored(&items[mid], &items[lo]);
        if (better(&items[hi], &items[lo])) swap_scored(&items[hi], &items[lo]);
        if (better(&items[hi], &items[mid])) swap_scored(&items[hi], &items[mid]);
        const scored pivot = items[mid]; /* the median of the three */
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (better(&items[i], &pivot)) i++;
            while (better(&pivot, &items[j])) j--;
            if (i <= j) swap_scored(&items[i++], &items[j--]);
        }
        /* now items[lo..j] are at least as good as the pivot, items[i..hi] at most as good */
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

static void *rank_run(void *arg) {
    const rank_job *p = (const rank_job *)arg;
    for (int64_t r = p->r0; r < p->r1; r++) {
        scored *row = p->items + p->start[r];
        select_best(row, p->start[r + 1] - p->start[r], p->k);
        qsort(row, (size_t)p->k, sizeof *row, by_value_then_col);
        for (int64_t i = 0; i < p->k; i++) {
            p->out_vals[r * p->k + i] = row[i].val;
            p->out_cols[r * p->k + i] = row[i].col;
        }
    }
    return NULL;
}

/* The k best (value, col) of each of nb rows from n flat triples (rows[j] in [0, nb)), ordered by
 * decreasing value, ties by increasing col, into out_vals / out_cols (nb x k). Returns -1 when
 * done, the first row with fewer than k triples, or -2 when out of memory. Values must not be NaN.
 * Threads sort a share of the rows each. */
int64_t nofree_top_per_row(const int32_t *rows, const int32_t *cols, const float *vals, int64_t n,
                           int64_t nb, int64_t k, float *out_vals, int64_t *out_cols, int64_t n_threads) {
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
    rank_job jobs[MAX_THREADS];
    n_threads = thread_count(n_threads, nb);
    for (int64_t t = 0; t < n_threads; t++) {
        rank_job job = {items, start, nb * t / n_threads, nb * (t + 1) / n_threads, k, out_vals, out_cols};
        jobs[t] = job;
    }
    run_jobs(rank_run, jobs, sizeof jobs[0], n_threads);
    free(fill);
    free(start);
    free(items);
    return -1;
}
