/* 4-bit (NF4 / FP4, bitsandbytes layout) CPU kernels: y = x W^T for a few rows of x, and W
 * dequantized into a caller's float32 buffer; and y = x W^T for a few rows of x against a float32
 * W (lf_linear_f32, a decode step's projections and head). See loraforge/kernels/cpu_gemv.py.
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
 * The vector paths take 32 weights (16 bytes, one block or a part of one) per step. AVX-512: the
 * high nibbles are the even weights, the low nibbles the odd ones, so x is split once per call into
 * even and odd halves per 32-chunk instead of interleaving W; the 16-entry code book sits in a
 * register (one permute per 16 lookups). AVX2 (no 16-entry float permute): the book is kept as four
 * byte planes and looked up with byte shuffles (see row_vec), x reordered once per call to match.
 * Rows of W are handed out to OpenMP threads (the OpenMP runtime torch itself uses) in chunks of
 * 16, dynamically, so a thread the OS has paused does not hold up the rest; products under 2^18
 * multiply-adds stay on the calling thread. Rows of x are taken four at a time so that the
 * accumulators stay in registers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>

/* 8-wide helpers of the AVX2 paths (the 4-bit one on AVX2-only CPUs, the float32 one everywhere) */
#if defined(__FMA__)
#define MADD256(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define MADD256(a, b, c) _mm256_add_ps(c, _mm256_mul_ps(a, b))
#endif
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
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
    uint8_t planes[4][16];      /* byte p of code[q] at planes[p][q] (the AVX2 lookup) */
} weight4;

static void set_planes(weight4 *w) {
    for (int q = 0; q < 16; ++q) {
        uint32_t bits;
        memcpy(&bits, w->code + q, 4);
        for (int p = 0; p < 4; ++p) w->planes[p][q] = (uint8_t)(bits >> (8 * p));
    }
}

/* One weight as the Python side describes it once per layer (kernels/cpu_gemv.py: _Desc). */
typedef struct {
    const uint8_t *packed;
    const float *absmax, *nested, *map8, *offset, *code, *bias;
    const uint8_t *qabsmax;
    int64_t n, k, blocksize;
} weight4_desc;

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

#if defined(__AVX512F__)
/* x [M, K] -> xs [M, K]: per 32-chunk its 16 even then its 16 odd elements */
static void split_chunks(const float *x, int64_t M, int64_t ldx, int64_t K, float *xs) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; ++j) {
                xs[m * K + c + j] = x[m * ldx + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * ldx + c + 2 * j + 1];
            }
}

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
/* The code book lookup without a float permute: byte p of code[q] for 32 codes at once is one
 * byte shuffle (vpshufb) of the book's byte plane p, and two rounds of byte / word unpacking put
 * the four planes back together into floats. Per 128-bit lane that yields, in vector i = 0..3,
 * the even weights c + 8i + 2t (t = 0..3) in the low lane and the odd ones c + 8i + 2t + 1 in the
 * high lane: x is reordered once per call to match (split_chunks). */
static void split_chunks(const float *x, int64_t M, int64_t ldx, int64_t K, float *xs) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K; c += 32)
            for (int i = 0; i < 4; ++i)
                for (int t = 0; t < 4; ++t) {
                    xs[m * K + c + 8 * i + t] = x[m * ldx + c + 8 * i + 2 * t];
                    xs[m * K + c + 8 * i + 4 + t] = x[m * ldx + c + 8 * i + 2 * t + 1];
                }
}


/* The 32 weights of 16 packed bytes times their block's scale, in the order split_chunks gives x:
 * wv[i] = weights c + 8i + 2t (t = 0..3, low lane) and c + 8i + 2t + 1 (high lane). */
static inline __attribute__((always_inline)) void decode32(const __m256i plane[4], const uint8_t *bytes, __m256 scale,
                                                           __m256 wv[4]) {
    /* both lanes hold the 16 bytes; the low lane takes their high nibbles (even weights) */
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes));
    __m256i q = _mm256_and_si256(_mm256_blend_epi32(_mm256_srli_epi16(v, 4), v, 0xF0), _mm256_set1_epi8(15));
    __m256i b0 = _mm256_shuffle_epi8(plane[0], q), b1 = _mm256_shuffle_epi8(plane[1], q);
    __m256i b2 = _mm256_shuffle_epi8(plane[2], q), b3 = _mm256_shuffle_epi8(plane[3], q);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    wv[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)), scale);
    wv[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)), scale);
    wv[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)), scale);
    wv[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)), scale);
}

static inline void load_planes(const weight4 *w, __m256i plane[4]) {
    for (int p = 0; p < 4; ++p) plane[p] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w->planes[p]));
}

/* MT rows of x (MT <= 4) against one row of W; K % 32 == 0 and blocksize >= 32, so a block
 * scale holds for a whole 32-chunk. NC = 4 (one row) or 2 chains of fused multiply-adds per row. */
static inline __attribute__((always_inline)) void row_vec(const weight4 *w, const float *xs, int MT, int64_t K, int64_t n, float *out) {
    __m256i plane[4];
    load_planes(w, plane);
    const int NC = MT == 1 ? 4 : 2;
    __m256 acc[4][4];
    for (int m = 0; m < 4; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
    const uint8_t *row = w->packed + ((n * K) >> 1);
    int64_t block = -1;
    __m256 scale = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
        int64_t b = (n * K + c) >> w->shift;
        if (b != block) { block = b; scale = _mm256_set1_ps(block_scale(w, b)); }
        __m256 wv[4];
        decode32(plane, row + (c >> 1), scale, wv);
        for (int m = 0; m < MT; ++m) {
            const float *xm = xs + m * K + c;
            for (int i = 0; i < 4; ++i)
                acc[m][i % NC] = MADD256(wv[i], _mm256_loadu_ps(xm + 8 * i), acc[m][i % NC]);
        }
    }
    for (int m = 0; m < MT; ++m) {
        __m256 s = acc[m][0];
        for (int j = 1; j < NC; ++j) s = _mm256_add_ps(s, acc[m][j]);
        out[m] = hsum8(s);
    }
}
#endif

/* y [M, N] (row stride N) = x [M, K] (row stride ldx) @ W^T (+ bias); returns 0, or -1 when out of memory */
int lf_gemv4(const weight4_desc *d, const float *x, int64_t M, int64_t ldx, float *y) {
    const int64_t N = d->n, K = d->k;
    weight4 w = {d->packed, d->absmax, d->qabsmax, d->nested, d->map8, d->offset, d->code, d->blocksize,
                 log2i(d->blocksize), {{0}}};
    set_planes(&w);
    /* small products run on the calling thread: waking the team costs more than it saves */
    const int team = N * K * M >= (1 << 18);
#if defined(__AVX2__)
    if (K % 32 == 0 && d->blocksize >= 32) {
        float *xs = (float *)malloc(sizeof(float) * (size_t)(M * K));
        if (!xs) return -1;
        split_chunks(x, M, ldx, K, xs);
        #pragma omp parallel for schedule(dynamic, 16) if (team)
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
        #pragma omp parallel for schedule(static) if (team)
        for (int64_t n = 0; n < N; ++n) row_scalar(&w, x, M, ldx, K, n, y, N);
    }
    if (d->bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * N + n] += d->bias[n];
    return 0;
}

/* ----- float32 weights: y = x W^T for a few rows of x -----------------------------------------
 * W [N, K] row-major (nn.Linear's layout), x [M, K] (row stride ldx), y [M, N] (+ bias). The
 * product BLAS libraries pick for this shape with few rows reads W more than once or slowly (MKL
 * 2024: ~2x the bytes' time at one row, ~4x at four, for a 49152 x 576 head). Here each pair of
 * W rows is read once, from memory, and stays in L1 while every row of x passes it: two W rows
 * times up to four x rows of fused multiply-adds per step (8 independent sums), 8 floats wide.
 * Only the order of the sum differs from a BLAS. */

/* out[r][m] = W row r (of RT <= 2, stride K) . x row m (of MT <= 4, stride ldx) */
static inline __attribute__((always_inline)) void f32_tile(const float *w, int RT, int64_t K, const float *x,
                                                           int64_t ldx, int MT, float out[2][4]) {
    int64_t k = 0;
    for (int r = 0; r < 2; ++r)
        for (int m = 0; m < 4; ++m) out[r][m] = 0.0f;
#if defined(__AVX2__)
    __m256 acc[2][4];
    for (int r = 0; r < 2; ++r)
        for (int m = 0; m < 4; ++m) acc[r][m] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv[2];
        for (int r = 0; r < RT; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
        for (int m = 0; m < MT; ++m) {
            __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
            for (int r = 0; r < RT; ++r) acc[r][m] = MADD256(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int m = 0; m < MT; ++m) out[r][m] = hsum8(acc[r][m]);
#endif
    for (; k < K; ++k)
        for (int r = 0; r < RT; ++r)
            for (int m = 0; m < MT; ++m) out[r][m] += w[r * K + k] * x[m * ldx + k];
}

#define F32_TILE_CASE(RT, MT) f32_tile(w + n * K, RT, K, x + m0 * ldx, ldx, MT, out)

static void f32_rows(const float *w, int64_t n, int RT, int64_t K, const float *x, int64_t ldx, int64_t M,
                     float *y, int64_t N) {
    float out[2][4];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int MT = (int)(M - m0 < 4 ? M - m0 : 4);
        /* constant trip counts keep the accumulators in registers */
        if (RT == 2) {
            switch (MT) {
                case 1: F32_TILE_CASE(2, 1); break;
                case 2: F32_TILE_CASE(2, 2); break;
                case 3: F32_TILE_CASE(2, 3); break;
                default: F32_TILE_CASE(2, 4); break;
            }
        } else {
            F32_TILE_CASE(1, MT);
        }
        for (int r = 0; r < RT; ++r)
            for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n + r] = out[r][m];
    }
}

void lf_linear_f32(const float *w, const float *bias, int64_t N, int64_t K, const float *x, int64_t M, int64_t ldx,
                   float *y) {
    const int team = N * K * M >= (1 << 18);
    const int64_t pairs = N / 2;
    #pragma omp parallel for schedule(dynamic, 32) if (team)
    for (int64_t p = 0; p < pairs; ++p) f32_rows(w, 2 * p, 2, K, x, ldx, M, y, N);
    if (N % 2) f32_rows(w, N - 1, 1, K, x, ldx, M, y, N);
    if (bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
}

/* dst [end - start] float32 = elements start..end of the weight (one block, scale s) */
static void dequant_block(const weight4 *w, int64_t start, int64_t end, float s, float *dst) {
    const uint8_t *packed = w->packed;
    const float *code = w->code;
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
        _mm512_storeu_ps(dst + (e - start), _mm512_permutex2var_ps(we, first, wo));
        _mm512_storeu_ps(dst + (e - start) + 16, _mm512_permutex2var_ps(we, second, wo));
    }
#elif defined(__AVX2__)
    __m256i plane[4];
    load_planes(w, plane);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   /* evens | odds -> in order */
    const __m256 sv = _mm256_set1_ps(s);
    for (; e + 32 <= end; e += 32) {
        __m256 wv[4];
        decode32(plane, packed + (e >> 1), sv, wv);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + (e - start) + 8 * i, _mm256_permutevar8x32_ps(wv[i], order));
    }
#endif
    for (; e < end; ++e) {
        uint8_t byte = packed[e >> 1];
        dst[e - start] = code[(e & 1) ? (byte & 15) : (byte >> 4)] * s;
    }
}

/* out [numel] float32 = the dequantized weight (element order as stored) */
void lf_dequant4(int64_t numel, const uint8_t *packed, const float *absmax, const uint8_t *qabsmax,
                 const float *nested, const float *map8, const float *offset, const float *code, int64_t blocksize,
                 float *out) {
    weight4 w = {packed, absmax, qabsmax, nested, map8, offset, code, blocksize, log2i(blocksize), {{0}}};
    set_planes(&w);
    int64_t nblocks = (numel + blocksize - 1) >> w.shift;
    #pragma omp parallel for schedule(dynamic, 64)
    for (int64_t b = 0; b < nblocks; ++b) {
        int64_t start = b * blocksize, end = start + blocksize < numel ? start + blocksize : numel;
        dequant_block(&w, start, end, block_scale(&w, b), out + start);
    }
}

/* out [numel] bfloat16 (as uint16) = lf_dequant4's float32 values rounded to nearest even, the
   bits torch's .to(torch.bfloat16) gives (the values are finite: no NaN case) */
void lf_dequant4_bf16(int64_t numel, const uint8_t *packed, const float *absmax, const uint8_t *qabsmax,
                      const float *nested, const float *map8, const float *offset, const float *code,
                      int64_t blocksize, uint16_t *out) {
    weight4 w = {packed, absmax, qabsmax, nested, map8, offset, code, blocksize, log2i(blocksize), {{0}}};
    set_planes(&w);
    int64_t nblocks = (numel + blocksize - 1) >> w.shift;
    #pragma omp parallel for schedule(dynamic, 64)
    for (int64_t b = 0; b < nblocks; ++b) {
        float tmp[4096];   /* blocksize <= 4096 */
        int64_t start = b * blocksize, end = start + blocksize < numel ? start + blocksize : numel;
        dequant_block(&w, start, end, block_scale(&w, b), tmp);
        for (int64_t e = 0; e < end - start; ++e) {
            uint32_t bits;
            memcpy(&bits, tmp + e, 4);
            out[start + e] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
    }
}
