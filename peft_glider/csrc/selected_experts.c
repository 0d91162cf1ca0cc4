/* The selected experts' LoRA products of one GLIDER module, for float32 on CPU, in one call; optionally with the
 * routing before them (local scores, global bias, top-k, softmax) in the same pass over each token.
 *
 * For every token n and each of its k selected experts e (with mixing weight w and LoRA scaling s_e):
 *     out[n, :] += w * s_e * BT_e^T (A_e x[n, :])
 * where A_e is the expert's (r_e, d) block of the concatenated A factors and BT_e its (r_e, o) block of the
 * transposed B factors. Only the selected experts are read: N * k * r * (d + o) multiply-adds, x read once
 * per token while it sits in cache. Loaded by peft_glider/native.py through ctypes (no Python C API).
 *
 * AVX2/FMA forms are picked at run time where the CPU has them; portable loops otherwise. Tokens are split
 * across OpenMP threads. The library links `libgomp.so.1` by name, so that once torch has loaded its own copy
 * (same soname) the loader reuses it and both share one thread pool: a second pool (POSIX threads, or another
 * OpenMP runtime) made both 2-3x slower on 2 cores, its threads and torch's spinning ones fighting for the cores.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_AVX2_FORMS 1
#endif

/* Portable forms: h[i] = dot(A[i, :], x) for i < r (A rows of length d); y += sum_i h[i] * BT[i, :] (rows of length o). */
static void low_rank_dots_portable(const float *restrict A, const float *restrict x, int64_t r, int64_t d, float *restrict h) {
    for (int64_t i = 0; i < r; i++) {
        const float *a = A + i * d;
        float t = 0.0f;
        for (int64_t c = 0; c < d; c++) t += a[c] * x[c];
        h[i] = t;
    }
}

static void add_low_rank_portable(const float *restrict BT, const float *restrict h, int64_t r, int64_t o, float *restrict y) {
    for (int64_t i = 0; i < r; i++) {
        const float *b = BT + i * o;
        for (int64_t c = 0; c < o; c++) y[c] += h[i] * b[c];
    }
}

#ifdef HAVE_AVX2_FORMS
__attribute__((target("avx2,fma"))) static float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* AVX2 forms: four (dots) or eight (adds) rows at a time, eight features per instruction. */
__attribute__((target("avx2,fma")))
static void low_rank_dots_avx2(const float *restrict A, const float *restrict x, int64_t r, int64_t d, float *restrict h) {
    int64_t i = 0;
    for (; i + 4 <= r; i += 4) {
        const float *a0 = A + i * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int64_t c = 0;
        for (; c + 8 <= d; c += 8) {
            __m256 xv = _mm256_loadu_ps(x + c);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + c), xv, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + c), xv, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + c), xv, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + c), xv, s3);
        }
        float t0 = sum8(s0), t1 = sum8(s1), t2 = sum8(s2), t3 = sum8(s3);
        for (; c < d; c++) { t0 += a0[c] * x[c]; t1 += a1[c] * x[c]; t2 += a2[c] * x[c]; t3 += a3[c] * x[c]; }
        h[i] = t0; h[i + 1] = t1; h[i + 2] = t2; h[i + 3] = t3;
    }
    if (i < r) low_rank_dots_portable(A + i * d, x, r - i, d, h + i);
}

__attribute__((target("avx2,fma")))
static void add_low_rank_avx2(const float *restrict BT, const float *restrict h, int64_t r, int64_t o, float *restrict y) {
    int64_t i = 0;
    for (; i + 8 <= r; i += 8) {  /* eight rows per pass over y: half the passes of four */
        const float *b = BT + i * o;
        __m256 h0 = _mm256_set1_ps(h[i]), h1 = _mm256_set1_ps(h[i + 1]), h2 = _mm256_set1_ps(h[i + 2]);
        __m256 h3 = _mm256_set1_ps(h[i + 3]), h4 = _mm256_set1_ps(h[i + 4]), h5 = _mm256_set1_ps(h[i + 5]);
        __m256 h6 = _mm256_set1_ps(h[i + 6]), h7 = _mm256_set1_ps(h[i + 7]);
        int64_t c = 0;
        for (; c + 8 <= o; c += 8) {
            __m256 acc = _mm256_loadu_ps(y + c);
            acc = _mm256_fmadd_ps(h0, _mm256_loadu_ps(b + c), acc);
            acc = _mm256_fmadd_ps(h1, _mm256_loadu_ps(b + o + c), acc);
            acc = _mm256_fmadd_ps(h2, _mm256_loadu_ps(b + 2 * o + c), acc);
            acc = _mm256_fmadd_ps(h3, _mm256_loadu_ps(b + 3 * o + c), acc);
            acc = _mm256_fmadd_ps(h4, _mm256_loadu_ps(b + 4 * o + c), acc);
            acc = _mm256_fmadd_ps(h5, _mm256_loadu_ps(b + 5 * o + c), acc);
            acc = _mm256_fmadd_ps(h6, _mm256_loadu_ps(b + 6 * o + c), acc);
            acc = _mm256_fmadd_ps(h7, _mm256_loadu_ps(b + 7 * o + c), acc);
            _mm256_storeu_ps(y + c, acc);
        }
        for (; c < o; c++)
            for (int j = 0; j < 8; j++) y[c] += h[i + j] * b[j * o + c];
    }
    for (; i + 4 <= r; i += 4) {
        const float *b0 = BT + i * o, *b1 = b0 + o, *b2 = b1 + o, *b3 = b2 + o;
        __m256 h0 = _mm256_set1_ps(h[i]), h1 = _mm256_set1_ps(h[i + 1]);
        __m256 h2 = _mm256_set1_ps(h[i + 2]), h3 = _mm256_set1_ps(h[i + 3]);
        int64_t c = 0;
        for (; c + 8 <= o; c += 8) {
            __m256 acc = _mm256_loadu_ps(y + c);
            acc = _mm256_fmadd_ps(h0, _mm256_loadu_ps(b0 + c), acc);
            acc = _mm256_fmadd_ps(h1, _mm256_loadu_ps(b1 + c), acc);
            acc = _mm256_fmadd_ps(h2, _mm256_loadu_ps(b2 + c), acc);
            acc = _mm256_fmadd_ps(h3, _mm256_loadu_ps(b3 + c), acc);
            _mm256_storeu_ps(y + c, acc);
        }
        for (; c < o; c++) y[c] += h[i] * b0[c] + h[i + 1] * b1[c] + h[i + 2] * b2[c] + h[i + 3] * b3[c];
    }
    if (i < r) add_low_rank_portable(BT + i * o, h + i, r - i, o, y);
}
#endif

#define MIN_TOKENS_PER_THREAD 16
#define RANK_CHUNK 256

static void add_token_experts(
    const float *x, int64_t d, const float *A, const float *BT, int64_t o,
    const int64_t *row_start, const int64_t *rank, const float *scaling,
    const int64_t *indices, const float *weights, int64_t k, float *y, int avx2) {
    float h[RANK_CHUNK];
    for (int64_t j = 0; j < k; j++) {
        int64_t e = indices[j];
        int64_t r = rank[e], start = row_start[e];
        float w = weights[j] * scaling[e];
        for (int64_t done = 0; done < r; done += RANK_CHUNK) {
            int64_t chunk = r - done < RANK_CHUNK ? r - done : RANK_CHUNK;
            const float *A_rows = A + (start + done) * d, *BT_rows = BT + (start + done) * o;
#ifdef HAVE_AVX2_FORMS
            if (avx2) {
                low_rank_dots_avx2(A_rows, x, chunk, d, h);
                for (int64_t i = 0; i < chunk; i++) h[i] *= w;
                add_low_rank_avx2(BT_rows, h, chunk, o, y);
                continue;
            }
#endif
            low_rank_dots_portable(A_rows, x, chunk, d, h);
            for (int64_t i = 0; i < chunk; i++) h[i] *= w;
            add_low_rank_portable(BT_rows, h, chunk, o, y);
        }
    }
}

#define TOKEN_TILE 4

/* scores[t * E + e] = dot(rows[e, :], xs[t]) for the TOKEN_TILE tokens xs: each router row is read once per tile. */
static void tile_dots_portable(const float *rows, int64_t E, int64_t d, const float *const *xs, float *scores) {
    for (int t = 0; t < TOKEN_TILE; t++) low_rank_dots_portable(rows, xs[t], E, d, scores + t * E);
}

#ifdef HAVE_AVX2_FORMS
__attribute__((target("avx2,fma")))
static void tile_dots_avx2(const float *rows, int64_t E, int64_t d, const float *const *xs, float *scores) {
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    int64_t e = 0;
    for (; e + 2 <= E; e += 2) {  /* two rows x four tokens: eight accumulators */
        const float *a0 = rows + e * d, *a1 = a0 + d;
        __m256 s00 = _mm256_setzero_ps(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00, s12 = s00, s13 = s00;
        int64_t c = 0;
        for (; c + 8 <= d; c += 8) {
            __m256 v0 = _mm256_loadu_ps(a0 + c), v1 = _mm256_loadu_ps(a1 + c), y;
            y = _mm256_loadu_ps(x0 + c); s00 = _mm256_fmadd_ps(v0, y, s00); s10 = _mm256_fmadd_ps(v1, y, s10);
            y = _mm256_loadu_ps(x1 + c); s01 = _mm256_fmadd_ps(v0, y, s01); s11 = _mm256_fmadd_ps(v1, y, s11);
            y = _mm256_loadu_ps(x2 + c); s02 = _mm256_fmadd_ps(v0, y, s02); s12 = _mm256_fmadd_ps(v1, y, s12);
            y = _mm256_loadu_ps(x3 + c); s03 = _mm256_fmadd_ps(v0, y, s03); s13 = _mm256_fmadd_ps(v1, y, s13);
        }
        float t00 = sum8(s00), t01 = sum8(s01), t02 = sum8(s02), t03 = sum8(s03);
        float t10 = sum8(s10), t11 = sum8(s11), t12 = sum8(s12), t13 = sum8(s13);
        for (; c < d; c++) {
            t00 += a0[c] * x0[c]; t01 += a0[c] * x1[c]; t02 += a0[c] * x2[c]; t03 += a0[c] * x3[c];
            t10 += a1[c] * x0[c]; t11 += a1[c] * x1[c]; t12 += a1[c] * x2[c]; t13 += a1[c] * x3[c];
        }
        scores[e] = t00; scores[E + e] = t01; scores[2 * E + e] = t02; scores[3 * E + e] = t03;
        scores[e + 1] = t10; scores[E + e + 1] = t11; scores[2 * E + e + 1] = t12; scores[3 * E + e + 1] = t13;
    }
    if (e < E)
        for (int t = 0; t < TOKEN_TILE; t++) low_rank_dots_avx2(rows + e * d, xs[t], 1, d, scores + t * E + e);
}
#endif

/* The sum and the sum of squares of x (d,), accumulated in eight float lanes and combined in double. */
static void sum_and_squares_portable(const float *x, int64_t d, double *total, double *squares) {
    float lane_total[8] = {0}, lane_squares[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8)
        for (int l = 0; l < 8; l++) { lane_total[l] += x[c + l]; lane_squares[l] += x[c + l] * x[c + l]; }
    *total = 0.0; *squares = 0.0;
    for (int l = 0; l < 8; l++) { *total += lane_total[l]; *squares += lane_squares[l]; }
    for (; c < d; c++) { *total += x[c]; *squares += (double)x[c] * x[c]; }
}

#ifdef HAVE_AVX2_FORMS
__attribute__((target("avx2,fma")))
static void sum_and_squares_avx2(const float *x, int64_t d, double *total, double *squares) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, q0 = t0, q1 = t0;
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
        __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + 8);
        t0 = _mm256_add_ps(t0, a); t1 = _mm256_add_ps(t1, b);
        q0 = _mm256_fmadd_ps(a, a, q0); q1 = _mm256_fmadd_ps(b, b, q1);
    }
    *total = sum8(_mm256_add_ps(t0, t1)); *squares = sum8(_mm256_add_ps(q0, q1));
    for (; c < d; c++) { *total += x[c]; *squares += (double)x[c] * x[c]; }
}
#endif

/* Local scores of a tile of tokens against the router rows (E, d), scores (TOKEN_TILE, E): `rows . x` times
 * `1 / std(x)` for standardized (Phatgoose) rows, whose zero mean makes the token's mean drop out; `|rows . x|`
 * otherwise (Arrow). */
static void tile_local_scores(const float *const *xs, int64_t d, const float *rows, int64_t E, int standardize,
                              float eps, float *scores, int avx2) {
#ifdef HAVE_AVX2_FORMS
    if (avx2) tile_dots_avx2(rows, E, d, xs, scores);
    else
#endif
        tile_dots_portable(rows, E, d, xs, scores);
    for (int t = 0; t < TOKEN_TILE; t++) {
        float *token_scores = scores + t * E;
        if (standardize) {
            double total, squares;
#ifdef HAVE_AVX2_FORMS
            if (avx2) sum_and_squares_avx2(xs[t], d, &total, &squares);
            else
#endif
                sum_and_squares_portable(xs[t], d, &total, &squares);
            double variance = (squares - total * total / d) / d;
            float inverse_std = (float)(1.0 / sqrt((variance > 0.0 ? variance : 0.0) + eps));
            for (int64_t e = 0; e < E; e++) token_scores[e] *= inverse_std;
        } else {
            for (int64_t e = 0; e < E; e++) token_scores[e] = fabsf(token_scores[e]);
        }
    }
}

/* The k largest logits among present experts (rank > 0), best first, and their softmax weights. */
static void top_k_softmax(const float *logits, const int64_t *rank, int64_t E, int64_t k, int64_t *indices,
                          float *weights) {
    for (int64_t j = 0; j < k; j++) { indices[j] = -1; weights[j] = -INFINITY; }
    for (int64_t e = 0; e < E; e++) {
        if (rank[e] == 0) continue;
        float value = logits[e];
        if (indices[k - 1] >= 0 && !(value > weights[k - 1])) continue;
        int64_t j = k - 1;
        for (; j > 0 && (indices[j - 1] < 0 || value > weights[j - 1]); j--) {
            indices[j] = indices[j - 1]; weights[j] = weights[j - 1];
        }
        indices[j] = e; weights[j] = value;
    }
    float best = weights[0], total = 0.0f;
    for (int64_t j = 0; j < k; j++) { weights[j] = expf(weights[j] - best); total += weights[j]; }
    for (int64_t j = 0; j < k; j++) weights[j] /= total;
}

#define MAX_EXPERTS 2048 /* = native.MAX_EXPERTS, which routing.can_fuse_routing checks before any call */

/* Whether to run the AVX2 forms: asked for (`simd`) and supported by this CPU. */
static int use_avx2(int simd) {
#ifdef HAVE_AVX2_FORMS
    return simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    (void)simd;
    return 0;
#endif
}

/* Threads for a call: at most `num_threads`, each with at least MIN_TOKENS_PER_THREAD tokens. */
static int thread_count(int64_t n_tokens, int num_threads) {
    return n_tokens / MIN_TOKENS_PER_THREAD < num_threads ? (int)(n_tokens / MIN_TOKENS_PER_THREAD) : num_threads;
}

/* What a routing call binds once (peft_glider/native.py's RouteAndAdd, which lays out the same fields): router rows
 * (E, d) contiguous; bias (n_tokens / group, E) or NULL: the global scores times alpha, one row per group of
 * consecutive tokens; the experts (see the file comment for A, BT, row_start, rank, scaling); k <= number of
 * experts with rank > 0. Passing it by address keeps a decoding step's call to a few arguments. */
typedef struct {
    const float *rows;
    int64_t E, d;
    int64_t standardize;
    double eps;
    const float *bias;
    const float *A, *BT;
    int64_t o;
    const int64_t *row_start, *rank;
    const float *scaling;
    int64_t k;
} GliderRouting;

/* Route and add, one call per module: x (n_tokens, r->d) with row stride x_stride, `group` consecutive tokens per
 * bias row; writes each token's selected experts (n_tokens, k) and weights (both NULL: not wanted, kept on the
 * stack), adds into out (row stride out_stride). */
void glider_route_and_add(
    const GliderRouting *r, const float *x, int64_t n_tokens, int64_t x_stride, int64_t group,
    int64_t *indices, float *weights, float *out, int64_t out_stride, int num_threads, int simd) {
    const int avx2 = use_avx2(simd), threads = thread_count(n_tokens, num_threads);
    const int64_t tiles = (n_tokens + TOKEN_TILE - 1) / TOKEN_TILE, E = r->E, k = r->k;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t tile = 0; tile < tiles; tile++) {
        float logits[TOKEN_TILE * MAX_EXPERTS];
        int64_t own_indices[MAX_EXPERTS];
        float own_weights[MAX_EXPERTS];
        const int64_t first = tile * TOKEN_TILE;
        const int64_t count = n_tokens - first < TOKEN_TILE ? n_tokens - first : TOKEN_TILE;
        const float *xs[TOKEN_TILE];  /* a short last tile repeats its last token; the repeats are not used */
        for (int64_t t = 0; t < TOKEN_TILE; t++) xs[t] = x + (first + (t < count ? t : count - 1)) * x_stride;
        tile_local_scores(xs, r->d, r->rows, E, (int)r->standardize, (float)r->eps, logits, avx2);
        for (int64_t t = 0; t < count; t++) {
            const int64_t n = first + t;
            float *token_logits = logits + t * E;
            if (r->bias != NULL) {
                const float *row_bias = r->bias + (n / group) * E;
                for (int64_t e = 0; e < E; e++) token_logits[e] += row_bias[e];
            }
            int64_t *token_indices = indices != NULL ? indices + n * k : own_indices;
            float *token_weights = weights != NULL ? weights + n * k : own_weights;
            top_k_softmax(token_logits, r->rank, E, k, token_indices, token_weights);
            add_token_experts(xs[t], r->d, r->A, r->BT, r->o, r->row_start, r->rank, r->scaling, token_indices,
                              token_weights, k, out + n * out_stride, avx2);
        }
    }
}

/* Entry point; see the file comment. x (n_tokens, d) with row stride x_stride; A (R, d) and BT (R, o) contiguous;
 * row_start, rank, scaling (E,): each expert's first row, rank and LoRA scaling; indices (n_tokens, k) int64 and
 * weights (n_tokens, k) contiguous; out (n_tokens, o) with row stride out_stride; simd 0 forces the portable
 * loops (tests). */
void glider_add_selected_experts(
    const float *x, int64_t n_tokens, int64_t d, int64_t x_stride,
    const float *A, const float *BT, int64_t o,
    const int64_t *row_start, const int64_t *rank, const float *scaling,
    const int64_t *indices, const float *weights, int64_t k,
    float *out, int64_t out_stride, int num_threads, int simd) {
    const int avx2 = use_avx2(simd), threads = thread_count(n_tokens, num_threads);
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < n_tokens; n++) {
        add_token_experts(x + n * x_stride, d, A, BT, o, row_start, rank, scaling, indices + n * k, weights + n * k, k,
                          out + n * out_stride, avx2);
    }
}
