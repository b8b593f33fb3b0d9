/*
 * The CTC log-likelihood, its gradient and its Hessian-vector product in C:
 * what speechbrain_meta/ctc.py computes with tensor operations, here one
 * call each, sample by sample, the loops over the states vectorised (exp and
 * log from the C library's vector functions). Built by
 * speechbrain_meta/ctc_kernel.py with the system's C compiler and called
 * through ctypes on CPU tensors.
 *
 * Layout: per sample b, of T = input_lengths[b] frames and L = 2 S + 1
 * blank-interleaved states (S = target_lengths[b]), three (frames, width)
 * buffers, width = 2 max(S) + 3:
 *   emissions[t, s]   log-probability of state s's label at frame t,
 *   alpha[t, 2 + s]   forward variables (two impossible entries in front),
 *   beta[t, s]        backward variables (impossible entries from L on),
 * and skip[s], 0 where the transition s - 2 -> s is allowed, NEG elsewhere.
 * Impossible states hold multiples of NEG, not -inf, so that every value the
 * loops compute is finite (they are compiled with fast math); NaN and
 * infinite inputs are recognised by their bits.
 *
 * One thread: threads started per call, over the samples, were slower in a
 * trial on two cores, which PyTorch's own threads keep busy (they wait
 * spinning between operations).
 *
 * This file includes itself once per floating-point type (REAL).
 */
#ifndef REAL
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NEG (-1e30)

static int not_finite_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000u) == 0x7f800000u;
}

static int not_finite_double(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

static int minus_infinity_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits == 0xff800000u;
}

static int minus_infinity_double(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits == 0xfff0000000000000ull;
}

/* The label of state s: blank on even states, the target's labels between. */
static inline int64_t label_of(const int64_t *labels, int64_t s, int64_t blank) {
    return s & 1 ? labels[s >> 1] : blank;
}

#define REAL float
#define NAME(name) name##_float
#define EXP expf
#define LOG logf
#define MAX fmaxf
#define TINY FLT_MIN
#define NOT_FINITE not_finite_float
#define MINUS_INFINITY minus_infinity_float
#include "ctc_loops.c"
#undef REAL
#undef NAME
#undef EXP
#undef LOG
#undef MAX
#undef TINY
#undef NOT_FINITE
#undef MINUS_INFINITY

#define REAL double
#define NAME(name) name##_double
#define EXP exp
#define LOG log
#define MAX fmax
#define TINY DBL_MIN
#define NOT_FINITE not_finite_double
#define MINUS_INFINITY minus_infinity_double
#include "ctc_loops.c"

#else /* the functions, for one REAL type */

/* What the three functions read and write; each fills the fields it needs. */
typedef struct {
    const REAL *input; /* (frames, batch, classes): log_probs, or the cotangent */
    int64_t stride_t, stride_b, stride_c;
    const int64_t *labels, *input_lengths, *target_lengths;
    int64_t label_stride, batch, frames, width, blank, classes;
    REAL *emissions, *alpha, *beta, *skip, *log_likelihood, *posterior;
    const REAL *grad;
    REAL *out, *expected; /* (frames, batch, classes), zeroed; (batch,) */
    uint8_t *nan;
} NAME(Problem);

/* The weighted sum of a, b, c with the softmax of x, y, z as weights, those
 * below the smallest normal number zeroed: the expected value carried over
 * one transition. */
static inline REAL NAME(transition)(REAL x, REAL y, REAL z, REAL a, REAL b, REAL c) {
    REAL m = MAX(MAX(x, y), z);
    REAL ex = EXP(x - m), ey = EXP(y - m), ez = EXP(z - m);
    REAL total = ex + ey + ez;
    REAL wx = ex / total, wy = ey / total, wz = ez / total;
    wx = wx > TINY ? wx : 0;
    wy = wy > TINY ? wy : 0;
    wz = wz > TINY ? wz : 0;
    return wx * a + wy * b + wz * c;
}

/* log(exp(x) + exp(y) + exp(z)). */
static inline REAL NAME(log_sum_exp)(REAL x, REAL y, REAL z) {
    REAL m = MAX(MAX(x, y), z);
    return m + LOG(EXP(x - m) + EXP(y - m) + EXP(z - m));
}

/* Posterior of the states of frame t: exp(alpha + beta - emission) over the
 * states, normalised over them (the path is in one state at every frame),
 * alpha and beta taken relative to their maxima before they are added, so
 * that the rounding of large alphas and betas cancels out; zero below the
 * smallest normal number. */
static void NAME(frame_posterior)(const REAL *alpha, const REAL *beta,
                                  const REAL *emission, int64_t states,
                                  REAL *posterior) {
    REAL top_alpha = NEG, top_beta = NEG, top = NEG;
    for (int64_t s = 0; s < states; ++s) {
        top_alpha = MAX(top_alpha, alpha[2 + s]);
        top_beta = MAX(top_beta, beta[s]);
    }
    for (int64_t s = 0; s < states; ++s) {
        posterior[s] = (alpha[2 + s] - top_alpha) + (beta[s] - top_beta) - emission[s];
        top = MAX(top, posterior[s]);
    }
    REAL total = 0, floor = LOG(TINY);
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < states; ++s) {
        REAL x = posterior[s] - top;
        posterior[s] = x > floor ? EXP(x) : 0;
        total += posterior[s];
    }
    for (int64_t s = 0; s < states; ++s) posterior[s] /= total;
}

static void NAME(forward_samples)(const NAME(Problem) *q) {
    const int64_t width = q->width, size = q->frames * width;
    for (int64_t b = 0; b < q->batch; ++b) {
        const int64_t T = q->input_lengths[b], L = 2 * q->target_lengths[b] + 1;
        const int64_t *target = q->labels + b * q->label_stride;
        REAL *e = q->emissions + b * size, *a = q->alpha + b * size;
        REAL *be = q->beta + b * size, *sk = q->skip + b * width;
        q->nan[b] = 0;
        for (int64_t s = 0; s < width; ++s)
            sk[s] = s < L && (s & 1) && s >= 3 && target[s >> 1] != target[(s >> 1) - 1]
                        ? 0 : NEG;
        for (int64_t t = 0; t < T; ++t) {
            const REAL *row = q->input + t * q->stride_t + b * q->stride_b;
            for (int64_t s = 0; s < L; ++s) {
                REAL x = row[label_of(target, s, q->blank) * q->stride_c];
                if (NOT_FINITE(x) && !MINUS_INFINITY(x)) {
                    q->nan[b] = 1;
                    x = 0;
                }
                e[t * width + s] = MINUS_INFINITY(x) || x < NEG ? NEG : x;
            }
            for (int64_t s = L; s < width; ++s) e[t * width + s] = NEG;
        }
        if (T == 0) {
            q->log_likelihood[b] = L == 1 ? 0 : NEG;
            continue;
        }
        for (int64_t s = 0; s < width; ++s) a[s] = NEG;
        a[2] = e[0];
        if (L > 1) a[3] = e[1];
        for (int64_t t = 1; t < T; ++t) {
            const REAL *before = a + (t - 1) * width, *emission = e + t * width;
            REAL *now = a + t * width;
            now[0] = now[1] = NEG;
#pragma omp simd
            for (int64_t s = 0; s < L; ++s)
                now[s + 2] = NAME(log_sum_exp)(before[s + 2], before[s + 1],
                                               before[s] + sk[s]) + emission[s];
            for (int64_t s = L + 2; s < width; ++s) now[s] = NEG;
        }
        const REAL *final = a + (T - 1) * width + 2;
        q->log_likelihood[b] = NAME(log_sum_exp)(final[L - 1], L > 1 ? final[L - 2] : NEG, NEG);

        REAL *end = be + (T - 1) * width;
        for (int64_t s = 0; s < width; ++s) end[s] = NEG;
        end[L - 1] = e[(T - 1) * width + L - 1];
        if (L > 1) end[L - 2] = e[(T - 1) * width + L - 2];
        for (int64_t t = T - 2; t >= 0; --t) {
            const REAL *after = be + (t + 1) * width, *emission = e + t * width;
            REAL *now = be + t * width;
#pragma omp simd
            for (int64_t s = 0; s < L; ++s)
                now[s] = NAME(log_sum_exp)(after[s], after[s + 1], after[s + 2] + sk[s + 2])
                         + emission[s];
            for (int64_t s = L; s < width; ++s) now[s] = NEG;
        }
    }
}

/* log p(target | input) per sample, with the emissions, alphas, betas and
 * skips kept for the derivatives; nan[b] = 1 where the sample's sequence
 * holds a NaN or +inf (computed as if it were 0, the loss made NaN by the
 * caller). -inf and values below NEG count as NEG. Returns the number of
 * labels outside [0, classes), and then computes nothing. */
int64_t NAME(ctc_forward)(const REAL *log_probs, int64_t stride_t, int64_t stride_b,
                          int64_t stride_c, const int64_t *labels,
                          int64_t label_stride, const int64_t *input_lengths,
                          const int64_t *target_lengths, int64_t batch, int64_t frames,
                          int64_t width, int64_t blank, int64_t classes,
                          REAL *emissions, REAL *alpha, REAL *beta,
                          REAL *skip, REAL *log_likelihood, uint8_t *nan) {
    int64_t invalid = 0;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < target_lengths[b]; ++i) {
            const int64_t label = labels[b * label_stride + i];
            invalid += label < 0 || label >= classes;
        }
    if (invalid) return invalid;
    NAME(Problem) q = {
        .input = log_probs, .stride_t = stride_t, .stride_b = stride_b,
        .stride_c = stride_c, .labels = labels, .input_lengths = input_lengths,
        .target_lengths = target_lengths, .label_stride = label_stride,
        .batch = batch, .frames = frames, .width = width, .blank = blank,
        .classes = classes, .emissions = emissions, .alpha = alpha, .beta = beta,
        .skip = skip, .log_likelihood = log_likelihood, .nan = nan};
    NAME(forward_samples)(&q);
    return 0;
}

static void NAME(gradient_samples)(const NAME(Problem) *q, REAL *scratch) {
    const int64_t width = q->width, size = q->frames * width;
    for (int64_t b = 0; b < q->batch; ++b) {
        const int64_t T = q->input_lengths[b], L = 2 * q->target_lengths[b] + 1;
        const int64_t *target = q->labels + b * q->label_stride;
        if (q->log_likelihood[b] <= NEG / 2) {
            if (q->posterior) memset(q->posterior + b * size, 0, size * sizeof(REAL));
            continue;
        }
        for (int64_t t = 0; t < q->frames; ++t) {
            const int64_t at = b * size + t * width;
            REAL *p = q->posterior ? q->posterior + at : scratch;
            memset(p, 0, width * sizeof(REAL));
            if (t >= T) continue;
            NAME(frame_posterior)(q->alpha + at, q->beta + at, q->emissions + at, L, p);
            REAL *out = q->out + (t * q->batch + b) * q->classes;
            for (int64_t s = 0; s < L; ++s)
                out[label_of(target, s, q->blank)] += p[s] * q->grad[b];
        }
    }
}

/* d log-likelihood / d log_probs times grad[b], into the zeroed (frames,
 * batch, classes) tensor gradient; the states' posteriors also into
 * posterior (same layout as the emissions) unless it is NULL. Zero for
 * infeasible samples (log-likelihood below NEG / 2) and past each input.
 * scratch holds width values. */
void NAME(ctc_gradient)(const REAL *emissions, const REAL *alpha, const REAL *beta,
                        const REAL *log_likelihood, const REAL *grad,
                        const int64_t *labels, int64_t label_stride,
                        const int64_t *input_lengths, const int64_t *target_lengths,
                        int64_t batch, int64_t frames, int64_t width, int64_t blank,
                        int64_t classes, REAL *gradient,
                        REAL *posterior, REAL *scratch) {
    NAME(Problem) q = {
        .labels = labels, .input_lengths = input_lengths,
        .target_lengths = target_lengths, .label_stride = label_stride,
        .batch = batch, .frames = frames, .width = width, .blank = blank,
        .classes = classes, .emissions = (REAL *)emissions, .alpha = (REAL *)alpha,
        .beta = (REAL *)beta, .log_likelihood = (REAL *)log_likelihood,
        .posterior = posterior, .grad = grad, .out = gradient};
    NAME(gradient_samples)(&q, scratch);
}

static void NAME(hvp_samples)(const NAME(Problem) *q, REAL *scratch) {
    const int64_t width = q->width, size = q->frames * width;
    REAL *u = scratch, *later = u + size;
    REAL *carried = later + size, *sum = carried + width + 2;
    for (int64_t b = 0; b < q->batch; ++b) {
        const int64_t T = q->input_lengths[b], L = 2 * q->target_lengths[b] + 1;
        const int64_t *target = q->labels + b * q->label_stride;
        const REAL *a = q->alpha + b * size, *be = q->beta + b * size;
        const REAL *p = q->posterior + b * size, *sk = q->skip + b * width;
        double total = 0; /* E[U], summed in double: it reaches every entry */
        for (int64_t t = 0; t < T; ++t) {
            const REAL *row = q->input + t * q->stride_t + b * q->stride_b;
            REAL *ut = u + t * width;
            for (int64_t s = 0; s < L; ++s) {
                ut[s] = row[label_of(target, s, q->blank) * q->stride_c];
                total += p[t * width + s] * ut[s];
            }
            for (int64_t s = L; s < width; ++s) ut[s] = 0;
        }
        const REAL mean = (REAL)total;
        q->expected[b] = mean;
        if (T == 0) continue;

        /* later[t, s] = E[sum of u after t | state s at t], backwards. */
        memset(later + (T - 1) * width, 0, width * sizeof(REAL));
        for (int64_t t = T - 2; t >= 0; --t) {
            const REAL *next = be + (t + 1) * width;
            const REAL *g = later + (t + 1) * width, *un = u + (t + 1) * width;
            REAL *now = later + t * width;
            for (int64_t s = 0; s < width; ++s) sum[s] = g[s] + un[s];
            sum[width] = sum[width + 1] = 0;
#pragma omp simd
            for (int64_t s = 0; s < L; ++s)
                now[s] = NAME(transition)(next[s], next[s + 1], next[s + 2] + sk[s + 2],
                                          sum[s], sum[s + 1], sum[s + 2]);
            for (int64_t s = L; s < width; ++s) now[s] = 0;
        }

        /* carried[2 + s] = E[sum of u before t | state s at t], forwards. */
        memset(carried, 0, (width + 2) * sizeof(REAL));
        memset(sum, 0, (width + 2) * sizeof(REAL));
        for (int64_t t = 0; t < T; ++t) {
            const REAL *ut = u + t * width, *pt = p + t * width;
            const REAL *g = later + t * width;
            REAL *out = q->out + (t * q->batch + b) * q->classes;
            for (int64_t s = 0; s < L; ++s)
                out[label_of(target, s, q->blank)] +=
                    q->grad[b] * pt[s] * (ut[s] + carried[2 + s] + g[s] - mean);
            if (t == T - 1) break;
            for (int64_t s = 0; s < L; ++s) sum[2 + s] = carried[2 + s] + ut[s];
            const REAL *now = a + t * width;
#pragma omp simd
            for (int64_t s = 0; s < L; ++s)
                carried[2 + s] = NAME(transition)(now[s] + sk[s], now[s + 1], now[s + 2],
                                                  sum[s], sum[s + 1], sum[s + 2]);
        }
    }
}

/* The Hessian-vector product of the log-likelihood: for the cotangent
 * upstream (frames, batch, classes) of the gradient, u its entries at each
 * state's label and U the sum of u along a path,
 *   hvp = grad[b] posterior (u + E[U before t | s, t] + E[U after t | s, t] - E[U])
 * scattered to the labels (into the zeroed hvp), and expected[b] = E[U]. The
 * two conditional expectations are linear recursions with the posterior
 * transition weights (softmax of alpha over each state's predecessors, of
 * beta over its successors). scratch holds 2 frames x width + 2 (width + 2)
 * values. */
void NAME(ctc_hvp)(const REAL *alpha, const REAL *beta, const REAL *skip,
                   const REAL *posterior, const REAL *upstream, int64_t stride_t,
                   int64_t stride_b, int64_t stride_c, const REAL *grad,
                   const int64_t *labels, int64_t label_stride,
                   const int64_t *input_lengths, const int64_t *target_lengths,
                   int64_t batch, int64_t frames, int64_t width, int64_t blank,
                   int64_t classes, REAL *hvp, REAL *expected,
                   REAL *scratch) {
    NAME(Problem) q = {
        .input = upstream, .stride_t = stride_t, .stride_b = stride_b,
        .stride_c = stride_c, .labels = labels, .input_lengths = input_lengths,
        .target_lengths = target_lengths, .label_stride = label_stride,
        .batch = batch, .frames = frames, .width = width, .blank = blank,
        .classes = classes, .alpha = (REAL *)alpha, .beta = (REAL *)beta,
        .skip = (REAL *)skip, .posterior = (REAL *)posterior, .grad = grad,
        .out = hvp, .expected = expected};
    NAME(hvp_samples)(&q, scratch);
}

#endif
