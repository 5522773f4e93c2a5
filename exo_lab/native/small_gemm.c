/* cblas_sgemm for decode-sized products, in front of OpenBLAS.
 *
 * MLX computes x @ W.T on the CPU with cblas_sgemm. OpenBLAS (0.3.21, as in Debian 12) packs
 * the whole weight matrix for every call, so a decode step (M = 1..16 rows of x) reads and writes
 * each weight several times: about 5 GB/s on one core where a plain pass over the weights reads
 * 20 GB/s. This library defines cblas_sgemm and is loaded before OpenBLAS (exo_lab._blas), so MLX
 * calls it. For row-major x @ W.T with at most SMALL_M rows it streams W once, each output element
 * one dot product in a fixed order (the same for every M and every thread count: batch-invariant
 * and deterministic); x @ W with W not transposed (attention's probabilities @ values) likewise, each
 * output element one fma chain; everything else goes to OpenBLAS's own cblas_sgemm.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

enum { RowMajor = 101, ColMajor = 102 };
enum { NoTrans = 111, Trans = 112 };
#define SMALL_M 16
#define PARALLEL_WEIGHTS (1 << 22) /* split over threads from this many weights (16 MB of fp32) */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;

/* OpenBLAS's functions: the next definitions after this library (LD_PRELOAD="this openblas"), or those of
 * the library exo_small_gemm_use names (exo_lab._blas calls it after loading both with ctypes). */
static void resolve(void) {
    if (real_sgemm) return;
    real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
}

int exo_small_gemm_use(const char *blas_path) {
    void *h = dlopen(blas_path, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    if (!h) h = dlopen(blas_path, RTLD_NOW | RTLD_GLOBAL);
    if (!h) return 0;
    sgemm_fn m = (sgemm_fn)dlsym(h, "cblas_sgemm");
    if (!m) return 0;
    real_sgemm = m;
    return 1;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* hsum of 4 accumulators at once, each in hsum's order ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)): the
 * same bits, a few shuffles for four outputs instead of a reduction each (attention's scores at decode are
 * one-row products of a head's 64 or 128 values: the reductions were much of their time). */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    /* lanes i + 4 added to lanes i: [a0's 4 | a1's 4], [a2's | a3's] */
    __m256 p01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    __m256 p23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    /* lanes 0 + 2 and 1 + 3 of each: [a0 a0 a2 a2 | a1 a1 a3 a3] */
    __m256 q = _mm256_add_ps(_mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 2, 3, 2)));
    /* the two halves of each: [a0 a2 . . | a1 a3 . .] */
    __m256 r = _mm256_add_ps(_mm256_shuffle_ps(q, q, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(q, q, _MM_SHUFFLE(3, 1, 3, 1)));
    __m128 lo = _mm256_castps256_ps128(r), hi = _mm256_extractf128_ps(r, 1);
    return _mm_unpacklo_ps(lo, hi); /* [a0 a1 a2 a3] */
}

static inline void store(float *c, float dot, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * dot : alpha * dot + beta * *c;
}

/* One dot product: 8 lanes over k, summed, then the tail. Every (m, n) below is computed exactly so. */
static inline float dot1(const float *x, const float *w, int K) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), acc);
    float s = hsum(acc);
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* Rows n..n+3 of W against every row of x, two rows of x at a time (8 accumulators; W's four rows stay in
 * L1/L2 while the pairs pass over them). Each (m, n) sums in dot1's order. */
static void block4(int M, int K, float alpha, const float *A, int lda, const float *w, int ldb, float beta,
                   float *C, int ldc, int n) {
    const float *w0 = w, *w1 = w + ldb, *w2 = w + 2 * (size_t)ldb, *w3 = w + 3 * (size_t)ldb;
    const float *ws[4] = {w0, w1, w2, w3};
    int K8 = K - K % 8;
    int m = 0;
    for (; m + 2 <= M; m += 2) {
        const float *x0 = A + (size_t)m * lda, *x1 = x0 + lda;
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
        __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        for (int k = 0; k < K8; k += 8) {
            __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
            __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
            __m256 y0 = _mm256_loadu_ps(x0 + k), y1 = _mm256_loadu_ps(x1 + k);
            a00 = _mm256_fmadd_ps(y0, v0, a00);
            a01 = _mm256_fmadd_ps(y0, v1, a01);
            a02 = _mm256_fmadd_ps(y0, v2, a02);
            a03 = _mm256_fmadd_ps(y0, v3, a03);
            a10 = _mm256_fmadd_ps(y1, v0, a10);
            a11 = _mm256_fmadd_ps(y1, v1, a11);
            a12 = _mm256_fmadd_ps(y1, v2, a12);
            a13 = _mm256_fmadd_ps(y1, v3, a13);
        }
        float sums[2][4];
        _mm_storeu_ps(sums[0], hsum4(a00, a01, a02, a03));
        _mm_storeu_ps(sums[1], hsum4(a10, a11, a12, a13));
        for (int i = 0; i < 2; i++) {
            const float *x = i ? x1 : x0;
            for (int j = 0; j < 4; j++) {
                float s = sums[i][j];
                for (int k = K8; k < K; k++) s += x[k] * ws[j][k];
                store(C + (size_t)(m + i) * ldc + n + j, s, alpha, beta);
            }
        }
    }
    for (; m < M; m++) {
        const float *x0 = A + (size_t)m * lda;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K8; k += 8) {
            __m256 y0 = _mm256_loadu_ps(x0 + k);
            a0 = _mm256_fmadd_ps(y0, _mm256_loadu_ps(w0 + k), a0);
            a1 = _mm256_fmadd_ps(y0, _mm256_loadu_ps(w1 + k), a1);
            a2 = _mm256_fmadd_ps(y0, _mm256_loadu_ps(w2 + k), a2);
            a3 = _mm256_fmadd_ps(y0, _mm256_loadu_ps(w3 + k), a3);
        }
        float sums[4];
        _mm_storeu_ps(sums, hsum4(a0, a1, a2, a3));
        for (int j = 0; j < 4; j++) {
            float s = sums[j];
            for (int k = K8; k < K; k++) s += x0[k] * ws[j][k];
            store(C + (size_t)m * ldc + n + j, s, alpha, beta);
        }
    }
}

/* C[M, N] = alpha * A[M, K] @ B[N, K].T + beta * C, all row-major. */
void exo_small_gemm_nt(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    int blocks = N / 4;
#pragma omp parallel for schedule(static) if ((size_t)N * K >= PARALLEL_WEIGHTS)
    for (int b = 0; b < blocks; b++) block4(M, K, alpha, A, lda, B + (size_t)4 * b * ldb, ldb, beta, C, ldc, 4 * b);
    for (int n = 4 * blocks; n < N; n++)
        for (int m = 0; m < M; m++)
            store(C + (size_t)m * ldc + n, dot1(A + (size_t)m * lda, B + (size_t)n * ldb, K), alpha, beta);
}

/* Columns [n0, n0 + W * 8) of row a @ B into c: W vectors of 8 columns, each column one fma chain over k in order. */
#define NN_COLUMNS(W)                                                                                          \
    static inline void nn_columns##W(const float *a, const float *B, int ldb, int K, int n0, float alpha,     \
                                     float beta, float *c) {                                                  \
        __m256 acc[W];                                                                                        \
        for (int j = 0; j < W; j++) acc[j] = _mm256_setzero_ps();                                             \
        for (int k = 0; k < K; k++) {                                                                         \
            const __m256 ak = _mm256_set1_ps(a[k]);                                                           \
            const float *b = B + (size_t)k * ldb + n0;                                                        \
            for (int j = 0; j < W; j++) acc[j] = _mm256_fmadd_ps(ak, _mm256_loadu_ps(b + 8 * j), acc[j]);    \
        }                                                                                                     \
        for (int j = 0; j < W; j++) {                                                                         \
            float out[8];                                                                                     \
            _mm256_storeu_ps(out, acc[j]);                                                                    \
            for (int i = 0; i < 8; i++) store(c + n0 + 8 * j + i, out[i], alpha, beta);                       \
        }                                                                                                     \
    }
NN_COLUMNS(8)
NN_COLUMNS(1)

/* C[M, N] = alpha * A[M, K] @ B[K, N] + beta * C, all row-major: each (m, n) one fma chain over k in order (a
 * vector lane, or fmaf for the last N % 8 columns: the same roundings), so the same for every M, N and thread
 * count. What attention's probabilities @ values is at decode (M = 1, N = the head size), where OpenBLAS's sgemv
 * took ~4 us a call for ~32 K products (MLX calls it once per query head and layer). */
void exo_small_gemm_nn(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    int blocks = N / 64;
    for (int m = 0; m < M; m++) {
        const float *a = A + (size_t)m * lda;
        float *c = C + (size_t)m * ldc;
#pragma omp parallel for schedule(static) if ((size_t)N * K >= PARALLEL_WEIGHTS)
        for (int b = 0; b < blocks; b++) nn_columns8(a, B, ldb, K, 64 * b, alpha, beta, c);
        int n = 64 * blocks;
        for (; n + 8 <= N; n += 8) nn_columns1(a, B, ldb, K, n, alpha, beta, c);
        for (; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s = fmaf(a[k], B[(size_t)k * ldb + n], s);
            store(c + n, s, alpha, beta);
        }
    }
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    resolve();
    if (order == RowMajor && ta == NoTrans && M <= SMALL_M && K > 0) {
        if (tb == Trans) {
            exo_small_gemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            return;
        }
        exo_small_gemm_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
