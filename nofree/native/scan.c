/* Native helpers for nofree's low-precision anchor scan (nofree/anchors/topk.py).
 *
 * Compiled on first use by nofree/native/__init__.py and called through ctypes; every function
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

#include "jobs.h"

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

/* clamp(round_half_even(x * inv_scale), -127, 127): one anchor value's int8 code, as a float */
static inline float quantize1(float x, float inv_scale) {
    const float q = nearbyintf(x * inv_scale);
    return q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
}

#if defined(__AVX512F__)
/* Writes the lanes of x selected by m, in order, at cols[count..] (their ids col + lane) and
 * vals[count..] (x * qs); returns the new count. Compresses in registers, then full stores: may
 * write (not count) up to 15 slots past the new count. */
static inline int64_t emit_vec_i32(__m512i x, __mmask16 m, int32_t col, float qs, int32_t *cols,
                                   float *vals, int64_t count) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i kept = _mm512_maskz_compress_epi32(m, x);
    _mm512_storeu_si512((void *)(cols + count),
                        _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32(col))));
    _mm512_storeu_ps(vals + count, _mm512_mul_ps(_mm512_cvtepi32_ps(kept), _mm512_set1_ps(qs)));
    return count + __builtin_popcount(m);
}
#endif

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

/* ---- int8 matmul with the candidate selection fused in (AVX-512 VNNI) ----------------------
 *
 * vpdpbusd multiplies unsigned by signed bytes, so anchors are stored as u = a + 128 and each
 * query row's dot product is corrected by corr[r] = 128 * sum(q[r]) (exact in int32). A register
 * tile holds I8_MR query rows x I8_W anchors of int32 dot products over the whole width; it is
 * then either stored (nofree_i8_scores: the plain product, a tile of the int8 scan) or compared
 * with each row's threshold with the passing entries appended as in nofree_take_i32
 * (nofree_i8_take): the scores never reach memory. Threads split the query rows.
 *
 * Packed layouts, 4 consecutive dimensions per 32-bit word, zero-padded (u8: 128) to full tiles:
 *   queries  int8 [ceil(R / I8_MR)][d4][I8_MR][4]
 *   anchors  u8   [ceil(C / I8_W)][d4][I8_W][4]       with d4 = ceil(D / 4)
 */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

#define I8_MR 8                /* query rows per register tile */
#define I8_W 48                /* anchors per register tile: three 16-lane vectors */
#define I8_PANEL (10 * I8_W)   /* anchors whose packed rows stay in L2 while every query passes */

typedef int32_t i32_alias __attribute__((may_alias));

/* acc = vpdpbusd(acc, b, x), written as assembly: GCC 12 copies the accumulator of the intrinsic
 * through a spare register and spills the tile to the stack (3x slower) */
#define I8_DP(acc, b, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(x))
#define I8_DECL(i) __m512i a##i##0 = zero, a##i##1 = zero, a##i##2 = zero;
#define I8_ROW(i)                                   \
    {                                               \
        const __m512i x = _mm512_set1_epi32(qp[i]); \
        I8_DP(a##i##0, b0, x);                      \
        I8_DP(a##i##1, b1, x);                      \
        I8_DP(a##i##2, b2, x);                      \
    }
#define I8_OUT(i) acc[i][0] = a##i##0, acc[i][1] = a##i##1, acc[i][2] = a##i##2;

/* acc[i][j] = sum over the width of q[i] * u[16 j + lane] for one query group and anchor tile */
__attribute__((noinline)) static void i8_tile(const int8_t *qg, const uint8_t *ag, int64_t d4,
                                               __m512i acc[I8_MR][3]) {
    const __m512i zero = _mm512_setzero_si512();
    I8_DECL(0) I8_DECL(1) I8_DECL(2) I8_DECL(3) I8_DECL(4) I8_DECL(5) I8_DECL(6) I8_DECL(7)
    const i32_alias *qp = (const i32_alias *)qg;
    const __m512i *bp = (const __m512i *)ag;
    for (int64_t s = 0; s < d4; s++, qp += I8_MR, bp += 3) {
        const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 1),
                      b2 = _mm512_loadu_si512(bp + 2);
        I8_ROW(0) I8_ROW(1) I8_ROW(2) I8_ROW(3) I8_ROW(4) I8_ROW(5) I8_ROW(6) I8_ROW(7)
    }
    I8_OUT(0) I8_OUT(1) I8_OUT(2) I8_OUT(3) I8_OUT(4) I8_OUT(5) I8_OUT(6) I8_OUT(7)
}

typedef struct {
    const int8_t *qpk;
    const int32_t *corr;
    int64_t R, d4, g0, g1;   /* all query rows; this job's query groups [g0, g1) */
    const uint8_t *apk;
    int64_t C;
    int32_t *s;              /* scores: the R x C tile (row stride ld), or NULL to take */
    int64_t ld;
    const int32_t *thr;      /* take: as nofree_take_i32 */
    int32_t col0;
    const float *qscale;
    int32_t *hist;
    int64_t n_bins;
    float bin_lo, inv_bin_w;
    int32_t *rows, *cols;
    float *vals;
    int64_t start, end;      /* this job writes its triples from start on; end: where it stopped */
    const char *next;        /* memory the next call will read (the next anchor chunk), fetched */
    int64_t next_bytes;      /* into the cache a little after each tile: this job's share */
} i8_job;

static inline __mmask16 i8_valid(int64_t C, int64_t col) {
    return C - col >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - col)) - 1u);
}

static int64_t i8_epilogue(const i8_job *j, __m512i acc[I8_MR][3], int64_t r0, int64_t c, int64_t count) {
    for (int64_t i = 0; i < I8_MR && r0 + i < j->R; i++) {
        const int64_t r = r0 + i;
        const __m512i corr = _mm512_set1_epi32(j->corr[r]);
        for (int64_t v = 0; v < 3 && c + 16 * v < j->C; v++) {
            const int64_t col = c + 16 * v;
            const __mmask16 valid = i8_valid(j->C, col);
            const __m512i dot = _mm512_sub_epi32(acc[i][v], corr);
            if (j->s) {
                _mm512_mask_storeu_epi32((void *)(j->s + r * j->ld + col), valid, dot);
                continue;
            }
            const __mmask16 m = _mm512_mask_cmpge_epi32_mask(valid, dot, _mm512_set1_epi32(j->thr[r]));
            if (!m) continue;
            const int64_t first = count;
            count = emit_vec_i32(dot, m, j->col0 + (int32_t)col, j->qscale[r], j->cols, j->vals, count);
            _mm512_storeu_si512((void *)(j->rows + first), _mm512_set1_epi32((int32_t)r));
            const __m512 kept = _mm512_loadu_ps(j->vals + first);
            /* bins as bin_of computes them: floor((v - lo) * inv_w) in float32, clamped (NaN: 0) */
            __m512 x = _mm512_mul_ps(_mm512_sub_ps(kept, _mm512_set1_ps(j->bin_lo)),
                                     _mm512_set1_ps(j->inv_bin_w));
            x = _mm512_min_ps(_mm512_max_ps(x, _mm512_setzero_ps()), _mm512_set1_ps((float)(j->n_bins - 1)));
            int32_t bins[16];
            _mm512_storeu_si512((void *)bins, _mm512_cvttps_epi32(x));
            int32_t *h = j->hist + r * j->n_bins;
            for (int64_t e = 0; e < count - first; e++) h[bins[e]] += 1;
        }
    }
    return count;
}

static void *i8_run(void *arg) {
    i8_job *j = (i8_job *)arg;
    __m512i acc[I8_MR][3];
    int64_t count = j->start;
    const int64_t tiles = (j->g1 - j->g0) * ((j->C + I8_W - 1) / I8_W);
    const int64_t step = tiles > 0 ? (j->next_bytes / tiles + 63) / 64 * 64 : 0;
    int64_t fetched = 0;
    for (int64_t p0 = 0; p0 < j->C; p0 += I8_PANEL)
        for (int64_t g = j->g0; g < j->g1; g++)
            for (int64_t c = p0; c < j->C && c < p0 + I8_PANEL; c += I8_W) {
                i8_tile(j->qpk + g * j->d4 * I8_MR * 4, j->apk + (c / I8_W) * j->d4 * I8_W * 4, j->d4, acc);
                count = i8_epilogue(j, acc, g * I8_MR, c, count);
                /* memory-bound work of the next call, overlapped with this compute-bound one */
                for (int64_t e = fetched + step; fetched < e && fetched < j->next_bytes; fetched += 64)
                    _mm_prefetch(j->next + fetched, _MM_HINT_T1);
            }
    j->end = count;
    return NULL;
}

/* Runs base over n_threads jobs, each a share of the query groups; thread t writes its triples
 * from base->start + (first row of t) * C + t * GROUP on (room for all of its rows plus the
 * overshoot of the full-vector stores), then they are moved together. Returns the new count. */
static int64_t i8_parallel(const i8_job *base, int64_t n_threads) {
    const int64_t groups = (base->R + I8_MR - 1) / I8_MR;
    i8_job jobs[MAX_THREADS];
    n_threads = thread_count(n_threads, groups);
    for (int64_t t = 0; t < n_threads; t++) {
        jobs[t] = *base;
        jobs[t].g0 = groups * t / n_threads;
        jobs[t].g1 = groups * (t + 1) / n_threads;
        jobs[t].start = base->start + jobs[t].g0 * I8_MR * base->C + t * GROUP;
        const int64_t b0 = base->next_bytes * t / n_threads, b1 = base->next_bytes * (t + 1) / n_threads;
        jobs[t].next = base->next ? base->next + b0 : NULL;
        jobs[t].next_bytes = base->next ? b1 - b0 : 0;
    }
    run_jobs(i8_run, jobs, sizeof jobs[0], n_threads);
    int64_t count = jobs[0].end;
    if (base->s) return count;
    for (int64_t t = 1; t < n_threads; t++) {
        const int64_t m = jobs[t].end - jobs[t].start;
        memmove(base->rows + count, base->rows + jobs[t].start, (size_t)m * sizeof(int32_t));
        memmove(base->cols + count, base->cols + jobs[t].start, (size_t)m * sizeof(int32_t));
        memmove(base->vals + count, base->vals + jobs[t].start, (size_t)m * sizeof(float));
        count += m;
    }
    return count;
}

int64_t nofree_i8_layout(void) { return I8_MR * 1000 + I8_W; }

typedef struct {
    const float *a;
    int64_t d, i0, i1;
    float inv_scale;
    uint8_t *out;
} i8_pack_job;

static void *i8_pack_run(void *arg) {
    const i8_pack_job *j = (const i8_pack_job *)arg;
    const int64_t d = j->d, d4 = (d + 3) / 4;
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f), s = _mm512_set1_ps(j->inv_scale);
    /* this job's whole tiles, padding included */
    const int64_t t0 = j->i0 / I8_W, t1 = (j->i1 + I8_W - 1) / I8_W;
    memset(j->out + t0 * d4 * I8_W * 4, 128, (size_t)((t1 - t0) * d4 * I8_W * 4));
    for (int64_t i = j->i0; i < j->i1; i++) {
        i32_alias *dst = (i32_alias *)(j->out + ((i / I8_W) * d4 * I8_W + i % I8_W) * 4);
        const float *src = j->a + i * d;
        int64_t k = 0;
        for (; k + 16 <= d; k += 16) {
            /* clamp, then round half to even (the default rounding mode): as nearbyintf then clamp */
            __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(src + k), s), lo), hi);
            __m128i b = _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x)), _mm_set1_epi8((char)0x80));
            dst[(k / 4) * I8_W] = _mm_extract_epi32(b, 0);
            dst[(k / 4 + 1) * I8_W] = _mm_extract_epi32(b, 1);
            dst[(k / 4 + 2) * I8_W] = _mm_extract_epi32(b, 2);
            dst[(k / 4 + 3) * I8_W] = _mm_extract_epi32(b, 3);
        }
        uint8_t *bytes = (uint8_t *)dst;
        for (; k < d; k++)
            bytes[(k / 4) * I8_W * 4 + k % 4] = (uint8_t)((int)quantize1(src[k], j->inv_scale) + 128);
    }
    return NULL;
}

/* Quantises anchors a (n x d float32, row-major) as nofree_quantize_i8 does and writes them in
 * the packed anchor layout (u8 = int8 + 128; padding 128); threads split the anchor tiles. */
void nofree_i8_pack_anchors(const float *a, int64_t n, int64_t d, float inv_scale, uint8_t *out,
                            int64_t n_threads) {
    const int64_t tiles = (n + I8_W - 1) / I8_W;
    i8_pack_job jobs[MAX_THREADS];
    n_threads = thread_count(n_threads, tiles);
    for (int64_t t = 0; t < n_threads; t++) {
        const int64_t i0 = tiles * t / n_threads * I8_W, i1 = tiles * (t + 1) / n_threads * I8_W;
        i8_pack_job job = {a, d, i0, i1 < n ? i1 : n, inv_scale, out};
        jobs[t] = job;
    }
    run_jobs(i8_pack_run, jobs, sizeof jobs[0], n_threads);
}

/* s[r, c] = dot(q[r], a[c]) for the R x C product of packed queries and anchors (row stride ld):
 * the same int32 values as torch._int_mm. */
void nofree_i8_scores(const int8_t *qpk, const int32_t *corr, int64_t R, int64_t d4, const uint8_t *apk,
                      int64_t C, int32_t *s, int64_t ld, int64_t n_threads) {
    i8_job job = {0};
    job.qpk = qpk, job.corr = corr, job.R = R, job.d4 = d4, job.apk = apk, job.C = C, job.s = s, job.ld = ld;
    i8_parallel(&job, n_threads);
}

/* nofree_take_i32 of the product nofree_i8_scores would write, without writing it: the same
 * triples (in another order: tile by tile) and the same histogram counts. The caller guarantees
 * room for n + ceil(R / I8_MR) * I8_MR * C + n_threads * GROUP entries. The next_bytes at next
 * (or nothing, when NULL) are fetched into the cache on the way: the next chunk's anchors. */
int64_t nofree_i8_take(const int8_t *qpk, const int32_t *corr, int64_t R, int64_t d4, const uint8_t *apk,
                       int64_t C, const int32_t *thr, int32_t col0, const float *qscale, int32_t *hist,
                       int64_t n_bins, float bin_lo, float inv_bin_w, int32_t *rows, int32_t *cols,
                       float *vals, int64_t n, const void *next, int64_t next_bytes, int64_t n_threads) {
    i8_job job = {0};
    job.qpk = qpk, job.corr = corr, job.R = R, job.d4 = d4, job.apk = apk, job.C = C;
    job.next = (const char *)next, job.next_bytes = next ? next_bytes : 0;
    job.thr = thr, job.col0 = col0, job.qscale = qscale, job.hist = hist, job.n_bins = n_bins;
    job.bin_lo = bin_lo, job.inv_bin_w = inv_bin_w, job.rows = rows, job.cols = cols, job.vals = vals;
    job.start = n;
    return i8_parallel(&job, n_threads);
}

#else /* no AVX-512 VNNI: the scan uses torch._int_mm and nofree_take_i32 */

int64_t nofree_i8_layout(void) { return 0; }
void nofree_i8_pack_anchors(const float *a, int64_t n, int64_t d, float inv_scale, uint8_t *out,
                            int64_t n_threads) {
    (void)a, (void)n, (void)d, (void)inv_scale, (void)out, (void)n_threads;
}
void nofree_i8_scores(const int8_t *qpk, const int32_t *corr, int64_t R, int64_t d4, const uint8_t *apk,
                      int64_t C, int32_t *s, int64_t ld, int64_t n_threads) {
    (void)qpk, (void)corr, (void)R, (void)d4, (void)apk, (void)C, (void)s, (void)ld, (void)n_threads;
}
int64_t nofree_i8_take(const int8_t *qpk, const int32_t *corr, int64_t R, int64_t d4, const uint8_t *apk,
                       int64_t C, const int32_t *thr, int32_t col0, const float *qscale, int32_t *hist,
                       int64_t n_bins, float bin_lo, float inv_bin_w, int32_t *rows, int32_t *cols,
                       float *vals, int64_t n, const void *next, int64_t next_bytes, int64_t n_threads) {
    (void)next, (void)next_bytes;
    (void)qpk, (void)corr, (void)R, (void)d4, (void)apk, (void)C, (void)thr, (void)col0, (void)qscale;
    (void)hist, (void)n_bins, (void)bin_lo, (void)inv_bin_w, (void)rows, (void)cols, (void)vals;
    (void)n_threads;
    return n;
}
#endif
