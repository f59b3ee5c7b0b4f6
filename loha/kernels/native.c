/* Optional CPU accelerator: W[rows, K] += s * (a1 @ b1) * (a2 @ b2), one pass over W.
 *
 * Plain C (no Python or torch headers), built on first use by loha/kernels/native.py
 * when a C compiler is present, with -O3 -march=native; never required. Each block
 * of RB rows x CW columns keeps both products in registers (fp32 FMA, summed over the
 * ranks in order), then reads W once, adds s*p1*p2 in fp32 and writes W once, rounded
 * to nearest even: fp32, fp16 (IEEE half) and bf16 weights.
 *
 * a1 (rows, r1), b1 (r1, K), a2 (rows, r2), b2 (r2, K): fp32, row-major, contiguous;
 * W row-major with row stride K. Returns 0, or -1 if this build cannot do the dtype.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define VL 16 /* floats per vector */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vs __attribute__((vector_size(32)));

#if defined(__AVX512F__)
/* 5 rows x 32 columns: 20 accumulators of the 32 zmm registers. Single thread, ns per
 * element of W (RB = 4/5/6/7/8), fp32 1280x1280 rank 16: 0.68/0.33/0.40/0.46/0.47,
 * fp16 1280x11520 rank 8: 0.32/0.26/0.25/0.29/0.31 (RB 4 spilled an accumulator). */
#ifndef RB
#define RB 5 /* rows per block */
#endif
#define NV 2 /* vectors per row per block */
#else
#ifndef RB
#define RB 2
#endif
#define NV 1
#endif
#define CW (VL * NV) /* columns per block */

static inline vf ldf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stf(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* ---- 16 weights at a time, as fp32 ---------------------------------------------- */

static inline vf ld_fp32(const void *p) { return ldf((const float *)p); }
static inline void st_fp32(void *p, vf v) { stf((float *)p, v); }

static inline vf ld_bf16(const void *p) {
    vs h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f);
    return f;
}
static inline void st_bf16(void *p, vf f) {
    vu u; memcpy(&u, &f, sizeof u);
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    vu nan = (vu)(f != f);
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan); /* NaN stays a (quiet) NaN */
    vs h = __builtin_convertvector(r, vs);
    memcpy(p, &h, sizeof h);
}

#if defined(__AVX512F__)
#define HAVE_F16 1
static inline vf ld_fp16(const void *p) {
    __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    vf f; memcpy(&f, &x, sizeof f); return f;
}
static inline void st_fp16(void *p, vf f) {
    __m512 x; memcpy(&x, &f, sizeof x);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(__F16C__) && defined(__AVX__)
#define HAVE_F16 1
static inline vf ld_fp16(const void *p) {
    __m256 x[2];
    x[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    x[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1));
    vf f; memcpy(&f, x, sizeof f); return f;
}
static inline void st_fp16(void *p, vf f) {
    __m256 x[2]; memcpy(x, &f, sizeof f);
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(x[0], _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i *)p + 1, _mm256_cvtps_ph(x[1], _MM_FROUND_TO_NEAREST_INT));
}
#elif defined(__aarch64__)
#define HAVE_F16 1
static inline vf ld_fp16(const void *p) {
    __fp16 h[VL]; memcpy(h, p, sizeof h);
    vf f; for (int k = 0; k < VL; k++) f[k] = (float)h[k];
    return f;
}
static inline void st_fp16(void *p, vf f) {
    __fp16 h[VL]; for (int k = 0; k < VL; k++) h[k] = (__fp16)f[k];
    memcpy(p, h, sizeof h);
}
#else
#define HAVE_F16 0
static inline vf ld_fp16(const void *p) { (void)p; vf f = {0}; return f; }
static inline void st_fp16(void *p, vf f) { (void)p; (void)f; }
#endif

/* ---- one block: NR rows x CW columns, products in registers ----------------------- */

#define BLOCK(NAME, NR, LD, ST, ES)                                                         \
    static inline void NAME(char *w, int64_t K, int64_t i, int64_t j, const float *a1,    \
                            const float *b1, int64_t r1, const float *a2, const float *b2, \
                            int64_t r2, float s) {                                         \
        vf p[NR][NV], q[NR][NV];                                                            \
        for (int rr = 0; rr < NR; rr++)                                                     \
            for (int v = 0; v < NV; v++) { p[rr][v] = (vf){0}; q[rr][v] = (vf){0}; }        \
        int64_t rm = r1 < r2 ? r1 : r2;                                                     \
        for (int64_t r = 0; r < rm; r++) { /* both products at once: 2·NR·NV chains */     \
            vf b[NV], c[NV];                                                                \
            for (int v = 0; v < NV; v++) {                                                  \
                b[v] = ldf(b1 + r * K + j + v * VL);                                        \
                c[v] = ldf(b2 + r * K + j + v * VL);                                        \
            }                                                                               \
            for (int rr = 0; rr < NR; rr++) {                                               \
                float x = a1[(i + rr) * r1 + r], y = a2[(i + rr) * r2 + r];                 \
                for (int v = 0; v < NV; v++) {                                              \
                    p[rr][v] += x * b[v];                                                   \
                    q[rr][v] += y * c[v];                                                   \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int64_t r = rm; r < r1; r++) {                                                 \
            vf b[NV];                                                                       \
            for (int v = 0; v < NV; v++) b[v] = ldf(b1 + r * K + j + v * VL);               \
            for (int rr = 0; rr < NR; rr++) {                                               \
                float x = a1[(i + rr) * r1 + r];                                            \
                for (int v = 0; v < NV; v++) p[rr][v] += x * b[v];                          \
            }                                                                               \
        }                                                                                   \
        for (int64_t r = rm; r < r2; r++) {                                                 \
            vf b[NV];                                                                       \
            for (int v = 0; v < NV; v++) b[v] = ldf(b2 + r * K + j + v * VL);               \
            for (int rr = 0; rr < NR; rr++) {                                               \
                float x = a2[(i + rr) * r2 + r];                                            \
                for (int v = 0; v < NV; v++) q[rr][v] += x * b[v];                          \
            }                                                                               \
        }                                                                                   \
        for (int rr = 0; rr < NR; rr++)                                                     \
            for (int v = 0; v < NV; v++) {                                                  \
                char *at = w + ((i + rr) * K + j + v * VL) * ES;                            \
                ST(at, LD(at) + s * (p[rr][v] * q[rr][v]));                                 \
            }                                                                               \
    }

#define KERNEL(T, ES)                                                                      \
    BLOCK(block_full_##T, RB, ld_##T, st_##T, ES)                                          \
    BLOCK(block_one_##T, 1, ld_##T, st_##T, ES)                                            \
    static void rows_##T(char *w, int64_t rows, int64_t K, const float *a1, const float *b1, \
                         int64_t r1, const float *a2, const float *b2, int64_t r2, float s) { \
        int64_t kfull = K - K % CW;                                                         \
        int64_t i = 0;                                                                      \
        for (; i + RB <= rows; i += RB)                                                     \
            for (int64_t j = 0; j < kfull; j += CW)                                         \
                block_full_##T(w, K, i, j, a1, b1, r1, a2, b2, r2, s);                      \
        for (; i < rows; i++)                                                               \
            for (int64_t j = 0; j < kfull; j += CW)                                         \
                block_one_##T(w, K, i, j, a1, b1, r1, a2, b2, r2, s);                       \
        /* the last K % CW columns: 16 at a time through a zero-padded buffer */            \
        for (int64_t j = kfull; j < K; j += VL) {                                           \
            int64_t n = K - j < VL ? K - j : VL;                                            \
            for (i = 0; i < rows; i++) {                                                    \
                float p[VL] = {0}, q[VL] = {0};                                             \
                for (int64_t r = 0; r < r1; r++)                                            \
                    for (int64_t c = 0; c < n; c++) p[c] += a1[i * r1 + r] * b1[r * K + j + c]; \
                for (int64_t r = 0; r < r2; r++)                                            \
                    for (int64_t c = 0; c < n; c++) q[c] += a2[i * r2 + r] * b2[r * K + j + c]; \
                char buf[VL * 4] = {0};                                                     \
                char *at = w + (i * K + j) * ES;                                            \
                memcpy(buf, at, n * ES);                                                    \
                st_##T(buf, ld_##T(buf) + s * (ldf(p) * ldf(q)));                           \
                memcpy(at, buf, n * ES);                                                    \
            }                                                                               \
        }                                                                                   \
    }

KERNEL(fp32, 4)
KERNEL(fp16, 2)
KERNEL(bf16, 2)

/* dtype: 0 fp32, 1 fp16, 2 bf16 */
int loha_hadamard_rows(void *w, int dtype, int64_t rows, int64_t K, const float *a1,
                       const float *b1, int64_t r1, const float *a2, const float *b2,
                       int64_t r2, float s) {
    switch (dtype) {
    case 0: rows_fp32((char *)w, rows, K, a1, b1, r1, a2, b2, r2, s); return 0;
    case 1:
        if (!HAVE_F16) return -1;
        rows_fp16((char *)w, rows, K, a1, b1, r1, a2, b2, r2, s); return 0;
    case 2: rows_bf16((char *)w, rows, K, a1, b1, r1, a2, b2, r2, s); return 0;
    }
    return -1;
}

int loha_native_version(void) { return 1; }
