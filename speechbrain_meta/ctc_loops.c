/*
 * The two time loops of speechbrain_meta/ctc.py in C: one pass over the
 * states per time step instead of a few tensor kernels per step, the inner
 * loop vectorised (exp and log from the C library's vector functions).
 * Built by speechbrain_meta/ctc_kernel.py with the system's C compiler and
 * called through ctypes on contiguous CPU tensors of shape (frames, columns),
 * the flat layout of ctc._Plan, whose values are finite by construction
 * (impossible states hold multiples of ctc._NEG, not -inf).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

/* alpha[t, n] = log(exp(alpha[t-1, n]) + exp(alpha[t-1, n-1])
 *                   + exp(alpha[t-1, n-2] + skip[n-2])) + emission[t, n],
 * alpha[t, 0:2] = start[0] and alpha[0] = emission[0] + start: as
 * ctc._alpha_loop, the sum of three exponentials taken relative to their
 * maximum in one step. */
#define ALPHA_LOOP(NAME, TYPE, EXP, LOG, MAX)                                 \
    void NAME(const TYPE *emissions, const TYPE *skip, const TYPE *start,     \
              TYPE *alpha, int64_t frames, int64_t columns) {                 \
        for (int64_t n = 0; n < columns; ++n)                                 \
            alpha[n] = emissions[n] + start[n];                               \
        for (int64_t t = 1; t < frames; ++t) {                                \
            const TYPE *before = alpha + (t - 1) * columns;                   \
            const TYPE *emission = emissions + t * columns;                   \
            TYPE *now = alpha + t * columns;                                  \
            now[0] = now[1] = start[0];                                       \
            _Pragma("omp simd")                                               \
            for (int64_t n = 2; n < columns; ++n) {                           \
                TYPE x = before[n], y = before[n - 1];                        \
                TYPE z = before[n - 2] + skip[n - 2];                         \
                TYPE m = MAX(MAX(x, y), z);                                   \
                now[n] = m + LOG(EXP(x - m) + EXP(y - m) + EXP(z - m))        \
                         + emission[n];                                       \
            }                                                                 \
        }                                                                     \
    }
ALPHA_LOOP(alpha_loop_float, float, expf, logf, fmaxf)
ALPHA_LOOP(alpha_loop_double, double, exp, log, fmax)

/* sums[t, n] = sum_k w[k, t-1, n] * (sums + values)[t-1, n-2+k], sums[0] = 0
 * and sums[t, 0:2] = 0, with the posterior transition weights w computed on
 * the fly from the alphas: the softmax over k of (alpha[t-1, n-2] +
 * skip[n-2], alpha[t-1, n-1], alpha[t-1, n]), weights below the smallest
 * normal number zeroed. As ctc._prefix_sum_loop on
 * ctc._transition_weights, without the weights' (3, frames - 1, columns - 2)
 * tensor. */
#define EXPECTED_PREFIX_SUMS(NAME, TYPE, EXP, MAX, TINY)                      \
    void NAME(const TYPE *alpha, const TYPE *skip, const TYPE *values,        \
              TYPE *sums, TYPE *before, int64_t frames, int64_t columns) {    \
        for (int64_t n = 0; n < columns; ++n) sums[n] = 0;                    \
        for (int64_t t = 1; t < frames; ++t) {                                \
            const TYPE *a = alpha + (t - 1) * columns;                        \
            const TYPE *last = sums + (t - 1) * columns;                      \
            const TYPE *value = values + (t - 1) * columns;                   \
            TYPE *now = sums + t * columns;                                   \
            now[0] = now[1] = 0;                                              \
            _Pragma("omp simd")                                               \
            for (int64_t n = 0; n < columns; ++n)                             \
                before[n] = last[n] + value[n];                               \
            _Pragma("omp simd")                                               \
            for (int64_t n = 2; n < columns; ++n) {                           \
                TYPE x = a[n - 2] + skip[n - 2], y = a[n - 1], z = a[n];      \
                TYPE m = MAX(MAX(x, y), z);                                   \
                TYPE ex = EXP(x - m), ey = EXP(y - m), ez = EXP(z - m);       \
                TYPE total = ex + ey + ez;                                    \
                TYPE wx = ex / total, wy = ey / total, wz = ez / total;       \
                wx = wx > TINY ? wx : 0;                                      \
                wy = wy > TINY ? wy : 0;                                      \
                wz = wz > TINY ? wz : 0;                                      \
                now[n] = wx * before[n - 2] + wy * before[n - 1]              \
                         + wz * before[n];                                    \
            }                                                                 \
        }                                                                     \
    }
EXPECTED_PREFIX_SUMS(expected_prefix_sums_float, float, expf, fmaxf, FLT_MIN)
EXPECTED_PREFIX_SUMS(expected_prefix_sums_double, double, exp, fmax, DBL_MIN)
