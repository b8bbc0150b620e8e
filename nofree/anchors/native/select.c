/* Threshold selection over a score tile: the hot loop of nofree.anchors.topk's candidate scan.
 *
 * For a row-major tile s (rows x cols) and one threshold per row, write the (row, col, value)
 * of every entry with s[r, c] >= thr[r], in row-major order, and return how many there are.
 * Writing stops at `cap` entries but counting goes on, so a caller whose buffers were too small
 * learns the size it needs and calls again. Columns are visited in blocks of 64, first tested as a
 * whole (a compare-and-or loop compilers vectorise): most blocks hold nothing above the threshold.
 * Plain C99 with no dependencies; nofree compiles it on first use (see native/__init__.py).
 */
#include <stdint.h>

#define BLOCK 64

#define NOFREE_SELECT(NAME, T)                                                              \
long long NAME(const T *s, long long rows, long long cols, long long row_stride,            \
               const T *thr, int32_t *out_r, int32_t *out_c, T *out_v, long long cap) {      \
    long long n = 0;                                                                        \
    for (long long r = 0; r < rows; ++r) {                                                  \
        const T *row = s + r * row_stride;                                                  \
        const T t = thr[r];                                                                 \
        long long c = 0;                                                                    \
        for (; c + BLOCK <= cols; c += BLOCK) {                                             \
            int hit = 0;                                                                    \
            for (int j = 0; j < BLOCK; ++j) hit |= row[c + j] >= t;                         \
            if (!hit) continue;                                                             \
            for (int j = 0; j < BLOCK; ++j) {                                               \
                if (row[c + j] >= t) {                                                      \
                    if (n < cap) { out_r[n] = (int32_t)r; out_c[n] = (int32_t)(c + j);      \
                                   out_v[n] = row[c + j]; }                                 \
                    ++n;                                                                    \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (; c < cols; ++c) {                                                             \
            if (row[c] >= t) {                                                              \
                if (n < cap) { out_r[n] = (int32_t)r; out_c[n] = (int32_t)c; out_v[n] = row[c]; } \
                ++n;                                                                        \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    return n;                                                                               \
}

NOFREE_SELECT(nofree_select_i32, int32_t)
NOFREE_SELECT(nofree_select_i16, int16_t)
NOFREE_SELECT(nofree_select_f32, float)
