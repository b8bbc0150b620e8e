/* Attention over an explicit list of visible keys per query (nofree/decoding/attention.py).
 *
 * The CLIP scorer runs MAGIC's candidate texts as a prefix tree (nofree/decoding/scorers.py):
 * each token sees the held keys/values of its image's continuation and its own few ancestors in
 * the tree, ~10-30 keys out of the hundred-odd a dense masked attention scores. Here each query
 * visits only its visible keys (a CSR list), so the work is proportional to them. The torch twin
 * in attention.py (scaled_dot_product_attention with a boolean mask) gives the same values up
 * to float rounding (the tests compare them).
 *
 * Layout (float32, contiguous): qkv (N, 3, H, D) - each token's query | key | value, as a packed
 * qkv projection writes them; past_k, past_v (B, H, P, D) - held keys/values of B sequences of P
 * positions. A key number c < B * P is held position c % P of sequence c / P; c >= B * P is
 * token c - B * P of qkv. Query token n sees keys cols[offsets[n] .. offsets[n + 1]) (ascending
 * or not: softmax does not mind); one with no visible key gets zeros. rows (M,) picks the query
 * tokens (NULL: all N, M = N); out (M, H, D).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "jobs.h"

typedef struct {
    const float *qkv, *past_k, *past_v;
    int64_t heads, dim, past_len, n_held;
    const int64_t *offsets, *rows;
    const int32_t *cols;
    float scale;
    float *out;
    int64_t lo, hi, widest;
    int failed;
} attention_job;

/* Dot product of two dim-long rows (the portable path). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t dim) {
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; i++) sum += a[i] * b[i];
    return sum;
}

#if defined(__AVX512F__)
/* exp of 16 values <= 0 (scores minus their maximum): 2^n * p(r), n = round(x / ln 2),
 * r = x - n ln 2 in two parts, p a degree-6 Taylor polynomial (|r| <= ln2 / 2: relative error
 * ~2e-7, like expf); below -87 the result is 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.0f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lowest);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}
#endif

/* Key (which = 1) or value (which = 2) row of key number c for head h. */
static inline const float *kv_row(const attention_job *job, int64_t c, int64_t h, int which) {
    const int64_t H = job->heads, D = job->dim, P = job->past_len;
    if (c < job->n_held)
        return (which == 1 ? job->past_k : job->past_v) + (((c / P) * H + h) * P + c % P) * D;
    return job->qkv + ((c - job->n_held) * 3 + which) * H * D + h * D;
}

#if defined(__AVX512F__)
/* One query row of head width 64 over keys cols[first .. end): scores, exp, weighted values. */
static void attend64(const attention_job *job, const float *q, int64_t first, int64_t end, int64_t h,
                     float *restrict score, float *restrict o) {
    const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32),
                 q3 = _mm512_loadu_ps(q + 48);
    const int64_t w = end - first;
    float top = -INFINITY;
    for (int64_t t = 0; t < w; t++) {
        const float *k = kv_row(job, job->cols[first + t], h, 1);
        __m512 a = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
        __m512 b = _mm512_mul_ps(q1, _mm512_loadu_ps(k + 16));
        a = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a);
        b = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), b);
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * job->scale;
        score[t] = s;
        top = s > top ? s : top;
    }
    __m512 sum16 = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(top);
    for (int64_t t = 0; t < w; t += 16) {
        __mmask16 live = w - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (w - t)) - 1);
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, score + t), shift));
        e = _mm512_maskz_mov_ps(live, e);
        _mm512_mask_storeu_ps(score + t, live, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t t = 0; t < w; t++) {
        const float *v = kv_row(job, job->cols[first + t], h, 2);
        const __m512 p = _mm512_set1_ps(score[t]);
        o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v), o0);
        o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16), o1);
        o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 32), o2);
        o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 48), o3);
    }
    const float total = _mm512_reduce_add_ps(sum16);
    const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
    _mm512_storeu_ps(o, _mm512_mul_ps(o0, inv));
    _mm512_storeu_ps(o + 16, _mm512_mul_ps(o1, inv));
    _mm512_storeu_ps(o + 32, _mm512_mul_ps(o2, inv));
    _mm512_storeu_ps(o + 48, _mm512_mul_ps(o3, inv));
}
#endif

static void *attention_run(void *arg) {
    attention_job *job = arg;
    const int64_t H = job->heads, D = job->dim;
    float *score = malloc(sizeof(float) * (size_t)(job->widest > 0 ? job->widest : 1));
    if (!score) {
        job->failed = 1;
        return NULL;
    }
    for (int64_t m = job->lo; m < job->hi; m++) {
        const int64_t n = job->rows ? job->rows[m] : m;
        const int64_t first = job->offsets[n], end = job->offsets[n + 1];
        for (int64_t h = 0; h < H; h++) {
            const float *q = job->qkv + n * 3 * H * D + h * D;
            float *restrict o = job->out + (m * H + h) * D;
#if defined(__AVX512F__)
            if (D == 64) { /* the common head width: query and output in registers */
                attend64(job, q, first, end, h, score, o);
                continue;
            }
#endif
            float top = -INFINITY, total = 0.0f;
            for (int64_t t = first; t < end; t++) {
                float s = dot(q, kv_row(job, job->cols[t], h, 1), D) * job->scale;
                score[t - first] = s;
                if (s > top) top = s;
            }
            memset(o, 0, sizeof(float) * (size_t)D);
            for (int64_t t = first; t < end; t++) {
                const float *restrict v = kv_row(job, job->cols[t], h, 2);
                float p = expf(score[t - first] - top);
                total += p;
                for (int64_t i = 0; i < D; i++) o[i] += p * v[i];
            }
            if (total > 0.0f) {
                float inv = 1.0f / total;
                for (int64_t i = 0; i < D; i++) o[i] *= inv;
            }
        }
    }
    free(score);
    return NULL;
}

/* Returns 0, or -1 when a thread's scratch could not be allocated (out is then incomplete). */
int64_t nofree_list_attention(const float *qkv, const float *past_k, const float *past_v, int64_t n_seq,
                              int64_t past_len, int64_t heads, int64_t dim, const int64_t *offsets,
                              const int32_t *cols, const int64_t *rows, int64_t n_rows, float scale,
                              float *out, int64_t n_threads) {
    attention_job jobs[MAX_THREADS];
    int64_t widest = 0, total = 0;
    for (int64_t m = 0; m < n_rows; m++) {
        const int64_t n = rows ? rows[m] : m, w = offsets[n + 1] - offsets[n];
        widest = w > widest ? w : widest;
        total += w + 1;
    }
    /* one thread below ~32k visible keys: starting one, and competing with the OpenMP workers
     * that spin after the matmul before, cost more than it saves at MAGIC's sizes */
    n_threads = thread_count(n_threads, total / 32768 + 1);
    /* each thread gets a run of query rows with about the same number of visible keys */
    int64_t m = 0, done = 0;
    for (int64_t t = 0; t < n_threads; t++) {
        jobs[t] = (attention_job){qkv, past_k, past_v, heads, dim, past_len, n_seq * past_len, offsets, rows,
                                  cols, scale, out, m, m, widest, 0};
        const int64_t goal = t == n_threads - 1 ? total : total * (t + 1) / n_threads;
        while (m < n_rows && done < goal) {
            const int64_t n = rows ? rows[m] : m;
            done += offsets[n + 1] - offsets[n] + 1;
            m++;
        }
        jobs[t].hi = m;
    }
    run_jobs(attention_run, jobs, sizeof jobs[0], n_threads);
    for (int64_t t = 0; t < n_threads; t++)
        if (jobs[t].failed) return -1;
    return 0;
}
