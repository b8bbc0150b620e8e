/* What the anchor scan's selection kernels share (select.c, and int8_gemm.c, which fuses the
 * selection into its matmul): the group width, the int8 rounding of an anchor value, and the
 * vector append of passing entries as candidate (col, value) pairs. */
#ifndef NOFREE_CANDIDATES_H
#define NOFREE_CANDIDATES_H

#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GROUP 16 /* entries compared at once; a group with none passing costs one compare */

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

#endif
