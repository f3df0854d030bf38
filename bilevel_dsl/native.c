/* Fused loops of the soft-MDP kernel (bilevel_dsl/native.py compiles and loads this file).
 *
 * torch runs a soft Bellman step as eight passes over S*A values (the product with P, the
 * maximum over actions, the shift, the clamp, exp, the sum, log, the shift back), each a
 * separate kernel; these functions make one pass per step, and run all the steps of a loop in
 * one call. Only what torch computes is computed here, in float64, in the same order up to
 * the summation order of a product; inf and NaN flow through as in torch (no -ffast-math).
 *
 * P is stored "ELL", action-major: for action a and successor slot k, idx[(a*K + k)*S + s]
 * and val[(a*K + k)*S + s] give the k-th successor of (s, a) and its probability; slots past
 * count[a*S + s] are never read into a sum. The loops over states then vectorise, with glibc's
 * vector exp and log (libmvec).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define BLOCK 256

/* glibc's vector versions of exp and log, declared so that the vectoriser may call them
 * without -ffast-math (which would also assume that no value is inf or NaN). */
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern double log(double);

/* acc[i] = sum_k val[a][k][s0 + i] * v[idx[a][k][s0 + i]] for the len states from s0: one
 * action's rows of the product with P, for one block of states (padding slots left out). */
static inline void block_product(int64_t S, int64_t K, int64_t a, int64_t s0, int64_t len,
                                 const int32_t *idx, const double *val, const int32_t *count,
                                 const double *v, double *acc) {
    const int32_t *c = count + a * S + s0;
    #pragma omp simd
    for (int64_t i = 0; i < len; i++) acc[i] = 0.0;
    for (int64_t k = 0; k < K; k++) {
        const int32_t *ix = idx + (a * K + k) * S + s0;
        const double *p = val + (a * K + k) * S + s0;
        #pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            double term = p[i] * v[ix[i]];
            acc[i] += k < c[i] ? term : 0.0;
        }
    }
}

/* n soft Bellman steps on u = V / tau:
 *     q[a][s] = base[a][s] + gamma * sum_k val[a][k][s] * u[idx[a][k][s]]
 *     u'[s]   = log(sum_a exp(q[a][s] - m[s])) + m[s]
 * with m[s] = shift for every state when use_shift (base then already holds r / tau - shift,
 * and no exponent can overflow or underflow), else m[s] = max_a q[a][s] and each exponent
 * raised to at least exp_floor. When first is not NULL, step 1 takes first_scale * first[s*A + a]
 * for gamma * (P u)[a][s] (a product the caller already has). The last step writes out; tmp
 * (S values) holds every other step. Returns 0, or -1 when out of memory. */
int brl_bellman_steps(int64_t S, int64_t A, int64_t K, const int32_t *idx, const double *val,
                      const int32_t *count, const double *base, double gamma, int use_shift,
                      double shift, double exp_floor, const double *first, double first_scale,
                      int64_t n, const double *u, double *out, double *tmp, int threads) {
    int failed = 0;
    int64_t block = S < BLOCK ? S : BLOCK;  /* the buffers' length: few states, many actions */
    #pragma omp parallel num_threads(threads)
    {
        double *q = malloc(sizeof(double) * (size_t)(A * block + 2 * block));
        #pragma omp atomic
        failed += q == NULL;
        #pragma omp barrier
        if (!failed) {
            double *m = q + A * block, *total = m + block;
            for (int64_t step = 0; step < n; step++) {
                const double *src = step == 0 ? u : ((n - step) % 2 == 0 ? out : tmp);
                double *dst = (n - 1 - step) % 2 == 0 ? out : tmp;
                const double *given = step == 0 ? first : NULL;
                #pragma omp for schedule(static)
                for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
                    int64_t len = S - s0 < BLOCK ? S - s0 : BLOCK;
                    for (int64_t a = 0; a < A; a++) {
                        double *qa = q + a * block;
                        const double *b = base + a * S + s0;
                        if (given != NULL) {
                            for (int64_t i = 0; i < len; i++)
                                qa[i] = b[i] + first_scale * given[(s0 + i) * A + a];
                            continue;
                        }
                        block_product(S, K, a, s0, len, idx, val, count, src, qa);
                        #pragma omp simd
                        for (int64_t i = 0; i < len; i++) qa[i] = b[i] + gamma * qa[i];
                    }
                    if (use_shift) {
                        #pragma omp simd
                        for (int64_t i = 0; i < len; i++) { m[i] = shift; total[i] = 0.0; }
                        for (int64_t a = 0; a < A; a++) {
                            const double *qa = q + a * block;
                            #pragma omp simd
                            for (int64_t i = 0; i < len; i++) total[i] += exp(qa[i]);
                        }
                    } else {
                        #pragma omp simd
                        for (int64_t i = 0; i < len; i++) { m[i] = -INFINITY; total[i] = 0.0; }
                        /* a NaN never wins the maximum, but its exp below is NaN all the same */
                        for (int64_t a = 0; a < A; a++) {
                            const double *qa = q + a * block;
                            #pragma omp simd
                            for (int64_t i = 0; i < len; i++) m[i] = qa[i] > m[i] ? qa[i] : m[i];
                        }
                        for (int64_t a = 0; a < A; a++) {
                            const double *qa = q + a * block;
                            #pragma omp simd
                            for (int64_t i = 0; i < len; i++) {
                                double d = qa[i] - m[i];
                                d = d < exp_floor ? exp_floor : d;
                                total[i] += exp(d);
                            }
                        }
                    }
                    double *o = dst + s0;
                    #pragma omp simd
                    for (int64_t i = 0; i < len; i++) o[i] = log(total[i]) + m[i];
                }
            }
        }
        free(q);
    }
    return failed ? -1 : 0;
}

/* The bare product out[a][s] = sum_k val[a][k][s] * v[idx[a][k][s]]: what the fused loops'
 * products cost without their epilogues, the floor that bench/scaling.py times them against. */
void brl_product(int64_t S, int64_t A, int64_t K, const int32_t *idx, const double *val,
                 const int32_t *count, const double *v, double *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
        int64_t len = S - s0 < BLOCK ? S - s0 : BLOCK;
        for (int64_t a = 0; a < A; a++) {
            block_product(S, K, a, s0, len, idx, val, count, v, out + a * S + s0);
        }
    }
}

/* The policy at V and the product it comes from, both in P's (S, A) layout:
 *     expected[s*A + a] = sum_k val[a][k][s] * V[idx[a][k][s]]
 *     pi[s*A + a]       = softmax_a(base[a][s] + scale * expected[s*A + a])
 * (shifted by each state's maximum, exponents raised to at least exp_floor). Returns 0, or -1
 * when out of memory. */
int brl_policy(int64_t S, int64_t A, int64_t K, const int32_t *idx, const double *val,
               const int32_t *count, const double *base, double scale, double exp_floor,
               const double *V, double *expected, double *pi, int threads) {
    int failed = 0;
    int64_t block = S < BLOCK ? S : BLOCK;  /* the buffers' length: few states, many actions */
    #pragma omp parallel num_threads(threads)
    {
        /* q: the logits, then their exps; e: the product; both (A, block), written out
         * state by state so that the stores to (S, A) are contiguous */
        double *q = malloc(sizeof(double) * (size_t)(2 * A * block + 2 * block));
        #pragma omp atomic
        failed += q == NULL;
        #pragma omp barrier
        if (!failed) {
            double *e = q + A * block, *m = e + A * block, *total = m + block;
            #pragma omp for schedule(static)
            for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
                int64_t len = S - s0 < BLOCK ? S - s0 : BLOCK;
                #pragma omp simd
                for (int64_t i = 0; i < len; i++) { m[i] = -INFINITY; total[i] = 0.0; }
                for (int64_t a = 0; a < A; a++) {
                    double *qa = q + a * block, *ea = e + a * block;
                    const double *b = base + a * S + s0;
                    block_product(S, K, a, s0, len, idx, val, count, V, ea);
                    #pragma omp simd
                    for (int64_t i = 0; i < len; i++) {
                        qa[i] = b[i] + scale * ea[i];
                        m[i] = qa[i] > m[i] ? qa[i] : m[i];
                    }
                }
                for (int64_t a = 0; a < A; a++) {
                    double *qa = q + a * block;
                    #pragma omp simd
                    for (int64_t i = 0; i < len; i++) {
                        double d = qa[i] - m[i];
                        qa[i] = exp(d < exp_floor ? exp_floor : d);
                        total[i] += qa[i];
                    }
                }
                for (int64_t i = 0; i < len; i++) {
                    double *out_e = expected + (s0 + i) * A, *out_pi = pi + (s0 + i) * A;
                    for (int64_t a = 0; a < A; a++) {
                        out_e[a] = e[a * block + i];
                        out_pi[a] = q[a * block + i] / total[i];
                    }
                }
            }
        }
        free(q);
    }
    return failed ? -1 : 0;
}

/* n affine adjoint steps through P^T, stored CSR with rows t and columns s*A + a:
 *     y[s*A + a] = g[s*A + a] + sign * pi[s*A + a] * (z[s] + d[s])
 *     z'[t]      = c[t] + alpha * sum_j vals[j] * y[cols[j]]
 * (d, c: NULL for zero). The centred adjoint step is sign 1, d = -sum_a g, c = 0, alpha =
 * gamma; the fixed-point step on w is sign -1, d = 0, c = sum_a g, alpha = -gamma. y holds S*A
 * values; the last step writes out and tmp (S values) holds every other step. */
void brl_adjoint_steps(int64_t S, int64_t A, const int64_t *rows, const int32_t *cols,
                       const double *vals, const double *g, const double *pi, const double *d,
                       const double *c, double sign, double alpha, int64_t n, const double *z,
                       double *out, double *tmp, double *y, int threads) {
    #pragma omp parallel num_threads(threads)
    for (int64_t step = 0; step < n; step++) {
        const double *src = step == 0 ? z : ((n - step) % 2 == 0 ? out : tmp);
        double *dst = (n - 1 - step) % 2 == 0 ? out : tmp;
        #pragma omp for schedule(static)
        for (int64_t s = 0; s < S; s++) {
            double zs = src[s] + (d != NULL ? d[s] : 0.0);
            #pragma omp simd
            for (int64_t a = 0; a < A; a++) y[s * A + a] = g[s * A + a] + sign * pi[s * A + a] * zs;
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < S; t++) {
            double sum = 0.0;
            for (int64_t j = rows[t]; j < rows[t + 1]; j++) sum += vals[j] * y[cols[j]];
            dst[t] = (c != NULL ? c[t] : 0.0) + alpha * sum;
        }
    }
}

/* The same steps by scattering along P's rows in the ELL layout: each thread adds its share of
 * the states' terms into a private copy of z' (S values; acc holds threads * S), then the
 * copies are summed. Reads P once, in the forward layout, and gathers nothing from an S*A
 * vector. */
void brl_adjoint_steps_scatter(int64_t S, int64_t A, int64_t K, const int32_t *idx,
                               const double *val, const int32_t *count, const double *g,
                               const double *pi, const double *d, const double *c, double sign,
                               double alpha, int64_t n, const double *z, double *out,
                               double *tmp, double *acc, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), me = omp_get_thread_num();
        double *mine = acc + (int64_t)me * S;
        for (int64_t step = 0; step < n; step++) {
            const double *src = step == 0 ? z : ((n - step) % 2 == 0 ? out : tmp);
            double *dst = (n - 1 - step) % 2 == 0 ? out : tmp;
            for (int64_t t = 0; t < S; t++) mine[t] = 0.0;
            #pragma omp for schedule(static)
            for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
                int64_t len = S - s0 < BLOCK ? S - s0 : BLOCK;
                for (int64_t a = 0; a < A; a++) {
                    const int32_t *cnt = count + a * S + s0;
                    for (int64_t i = 0; i < len; i++) {
                        int64_t s = s0 + i;
                        double zs = src[s] + (d != NULL ? d[s] : 0.0);
                        double y = g[s * A + a] + sign * pi[s * A + a] * zs;
                        for (int64_t k = 0; k < cnt[i]; k++) {
                            int64_t e = (a * K + k) * S + s;
                            mine[idx[e]] += val[e] * y;
                        }
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < S; t++) {
                double sum = 0.0;
                for (int j = 0; j < nt; j++) sum += acc[(int64_t)j * S + t];
                dst[t] = (c != NULL ? c[t] : 0.0) + alpha * sum;
            }
        }
    }
}
