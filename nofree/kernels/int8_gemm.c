/* The int8 anchor scan's matmul with the candidate selection fused in (AVX-512 VNNI), for
 * nofree/anchors/search/int8_gemm.py through nofree/kernels/bindings.py.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so anchors are stored as u = a + 128 and each
 * query row's dot product is corrected by corr[r] = 128 * sum(q[r]) (exact in int32). A register
 * tile holds I8_MR query rows x I8_W anchors of int32 dot products over the whole width; it is
 * then either stored (nofree_i8_scores: the plain product, a tile of the int8 scan) or compared
 * with each row's threshold, its passing entries appended the way nofree_take_i32 (select.c)
 * does (nofree_i8_take): the scores never reach memory. Threads split the query rows.
 *
 * Packed layouts, 4 consecutive dimensions per 32-bit word, zero-padded (u8: 128) to full tiles:
 *   queries  int8 [ceil(R / I8_MR)][d4][I8_MR][4]
 *   anchors  u8   [ceil(C / I8_W)][d4][I8_W][4]       with d4 = ceil(D / 4)
 * nofree_i8_tile tells the caller I8_MR and I8_W (both 0 when compiled without VNNI: the scan then
 * uses torch._int_mm and nofree_take_i32).
 */
#include <stdint.h>
#include <string.h>

#include "candidates.h"
#include "jobs.h"

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

/* The register tile: query rows per packed query group, anchors per packed anchor tile. */
void nofree_i8_tile(int64_t *rows, int64_t *cols) {
    *rows = I8_MR;
    *cols = I8_W;
}

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

void nofree_i8_tile(int64_t *rows, int64_t *cols) {
    *rows = 0;
    *cols = 0;
}
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
