/* 4-bit (NF4 / FP4, bitsandbytes layout) CPU kernels: y = x W^T for a few rows of x, and W
 * dequantized into a caller's float32 buffer. See loraforge/kernels/cpu_gemv.py.
 *
 * W [N, K] is flattened row-major; element e has code (packed[e/2] >> 4) for even e and
 * (packed[e/2] & 15) for odd e, and scale s_b of block b = e / blocksize:
 *   s_b = absmax[b]                                   (float32 scales), or
 *   s_b = map8[c_b] * nested[b / 256] + offset          (double quantization, c_b uint8)
 * w_e = code[q_e] * s_b in float32 (the reference's bits: this file is compiled without FMA
 * contraction, so s_b and w_e are rounded as in PyTorch); y[m, n] = sum_k x[m, k] w[n, k]
 * accumulated in float32 with fused multiply-adds (only the order and the rounding of the sum
 * differ from a BLAS).
 *
 * The vector paths take 32 weights (16 bytes, one block or a part of one) per step: the high
 * nibbles are the even weights, the low nibbles the odd ones, so x is split once per call into
 * even and odd halves per 32-chunk instead of interleaving W; the 16-entry code book sits in
 * registers (one AVX-512 permute, or two AVX2 permutes and a blend, per 16 lookups). Rows of W
 * are shared among OpenMP threads (the OpenMP runtime torch itself uses), rows of x are taken
 * four at a time so that the accumulators stay in registers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *packed;
    const float *absmax;        /* float32 scales, or NULL */
    const uint8_t *qabsmax;     /* uint8 scale codes (double quantization), or NULL */
    const float *nested;        /* one float32 per 256 scales */
    const float *map8;          /* 256-value dynamic map */
    const float *offset;        /* the scales' mean (double quantization) */
    const float *code;          /* 16 values */
    int64_t blocksize;
    int shift;                  /* log2(blocksize): block sizes are powers of two */
} weight4;

static int log2i(int64_t v) {
    int s = 0;
    while ((1LL << s) < v) ++s;
    return s;
}

static inline float block_scale(const weight4 *w, int64_t b) {
    if (w->qabsmax) {
        float s = w->map8[w->qabsmax[b]] * w->nested[b >> 8];
        return s + *w->offset;
    }
    return w->absmax[b];
}

static inline float weight_at(const weight4 *w, int64_t e) {
    uint8_t byte = w->packed[e >> 1];
    int q = (e & 1) ? (byte & 15) : (byte >> 4);
    return w->code[q] * block_scale(w, e >> w->shift);
}

/* one output row n, any K: the scalar definition */
static void row_scalar(const weight4 *w, const float *x, int64_t M, int64_t ldx, int64_t K, int64_t n,
                       float *y, int64_t N) {
    for (int64_t m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * weight_at(w, n * K + k);
        y[m * N + n] = acc;
    }
}

#if defined(__AVX2__)
/* x [M, K] -> xs [M, K]: per 32-chunk its 16 even then its 16 odd elements */
static void split_even_odd(const float *x, int64_t M, int64_t ldx, int64_t K, float *xs) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; ++j) {
                xs[m * K + c + j] = x[m * ldx + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * ldx + c + 2 * j + 1];
            }
}
#endif

#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* MT rows of x (MT <= 4) against one row of W; K % 32 == 0. Even and odd weights accumulate
 * separately: 2 * MT independent chains of fused multiply-adds. */
static inline __attribute__((always_inline)) void row_vec(const weight4 *w, const float *xs, int MT, int64_t K, int64_t n, float *out) {
    const __m512 book = _mm512_loadu_ps(w->code);
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[4], odd[4];
    for (int m = 0; m < 4; ++m) acc[m] = odd[m] = _mm512_setzero_ps();
    const uint8_t *row = w->packed + ((n * K) >> 1);
    int64_t block = -1;
    __m512 scale = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
        int64_t b = (n * K + c) >> w->shift;
        if (b != block) { block = b; scale = _mm512_set1_ps(block_scale(w, b)); }
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c >> 1))));
        __m512 we = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), book), scale);
        __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, low4), book), scale);
        for (int m = 0; m < MT; ++m) {
            const float *xm = xs + m * K + c;
            acc[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xm), acc[m]);
            odd[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xm + 16), odd[m]);
        }
    }
    for (int m = 0; m < MT; ++m) out[m] = hsum(_mm512_add_ps(acc[m], odd[m]));
}
#elif defined(__AVX2__)
#if defined(__FMA__)
#define MADD256(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define MADD256(a, b, c) _mm256_add_ps(c, _mm256_mul_ps(a, b))
#endif
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 lookup(__m256i idx, __m256 lo8, __m256 hi8, __m256i seven) {
    __m256 a = _mm256_permutevar8x32_ps(lo8, idx);
    __m256 b = _mm256_permutevar8x32_ps(hi8, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
}

static inline __attribute__((always_inline)) void row_vec(const weight4 *w, const float *xs, int MT, int64_t K, int64_t n, float *out) {
    const __m256 lo8 = _mm256_loadu_ps(w->code), hi8 = _mm256_loadu_ps(w->code + 8);
    const __m256i low4 = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    __m256 acc[4], odd[4];
    for (int m = 0; m < 4; ++m) acc[m] = odd[m] = _mm256_setzero_ps();
    const uint8_t *row = w->packed + ((n * K) >> 1);
    int64_t block = -1;
    __m256 scale = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
        int64_t b = (n * K + c) >> w->shift;
        if (b != block) { block = b; scale = _mm256_set1_ps(block_scale(w, b)); }
        for (int h = 0; h < 2; ++h) {   /* bytes 8h .. 8h + 7: even / odd weights 8h .. 8h + 7 */
            __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (c >> 1) + 8 * h)));
            __m256 we = _mm256_mul_ps(lookup(_mm256_srli_epi32(q, 4), lo8, hi8, seven), scale);
            __m256 wo = _mm256_mul_ps(lookup(_mm256_and_si256(q, low4), lo8, hi8, seven), scale);
            for (int m = 0; m < MT; ++m) {
                const float *xm = xs + m * K + c + 8 * h;
                acc[m] = MADD256(we, _mm256_loadu_ps(xm), acc[m]);
                odd[m] = MADD256(wo, _mm256_loadu_ps(xm + 16), odd[m]);
            }
        }
    }
    for (int m = 0; m < MT; ++m) out[m] = hsum(_mm256_add_ps(acc[m], odd[m]));
}
#endif

/* y [M, N] (row stride N) = x [M, K] (row stride ldx) @ W^T (+ bias); returns 0, or -1 when out of memory */
int lf_gemv4(const float *x, int64_t M, int64_t ldx, int64_t N, int64_t K,
             const uint8_t *packed, const float *absmax, const uint8_t *qabsmax, const float *nested,
             const float *map8, const float *offset, const float *code, int64_t blocksize,
             const float *bias, float *y) {
    weight4 w = {packed, absmax, qabsmax, nested, map8, offset, code, blocksize, log2i(blocksize)};
#if defined(__AVX2__)
    if (K % 32 == 0) {
        float *xs = (float *)malloc(sizeof(float) * (size_t)(M * K));
        if (!xs) return -1;
        split_even_odd(x, M, ldx, K, xs);
        #pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            float out[4];
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                int MT = (int)(M - m0 < 4 ? M - m0 : 4);
                /* constant trip counts let the compiler keep the accumulators in registers */
                switch (MT) {
                    case 1: row_vec(&w, xs + m0 * K, 1, K, n, out); break;
                    case 2: row_vec(&w, xs + m0 * K, 2, K, n, out); break;
                    case 3: row_vec(&w, xs + m0 * K, 3, K, n, out); break;
                    default: row_vec(&w, xs + m0 * K, 4, K, n, out); break;
                }
                for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n] = out[m];
            }
        }
        free(xs);
    } else
#endif
    {
        #pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; ++n) row_scalar(&w, x, M, ldx, K, n, y, N);
    }
    if (bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
    return 0;
}

/* out [numel] float32 = the dequantized weight (element order as stored) */
void lf_dequant4(int64_t numel, const uint8_t *packed, const float *absmax, const uint8_t *qabsmax,
                 const float *nested, const float *map8, const float *offset, const float *code, int64_t blocksize,
                 float *out) {
    weight4 w = {packed, absmax, qabsmax, nested, map8, offset, code, blocksize, log2i(blocksize)};
    int64_t nblocks = (numel + blocksize - 1) >> w.shift;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        int64_t start = b * blocksize, end = start + blocksize < numel ? start + blocksize : numel;
        float s = block_scale(&w, b);
        int64_t e = start;
#if defined(__AVX512F__)
        const __m512 book = _mm512_loadu_ps(code);
        const __m512i low4 = _mm512_set1_epi32(15);
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        const __m512 sv = _mm512_set1_ps(s);
        for (; e + 32 <= end; e += 32) {   /* start is even: blocksize is */
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + (e >> 1))));
            __m512 we = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), book), sv);
            __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, low4), book), sv);
            _mm512_storeu_ps(out + e, _mm512_permutex2var_ps(we, first, wo));
            _mm512_storeu_ps(out + e + 16, _mm512_permutex2var_ps(we, second, wo));
        }
#endif
        for (; e < end; ++e) {
            uint8_t byte = packed[e >> 1];
            out[e] = code[(e & 1) ? (byte & 15) : (byte >> 4)] * s;
        }
    }
}
