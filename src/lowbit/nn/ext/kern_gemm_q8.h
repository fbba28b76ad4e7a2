// Int8 GEMM for prefill (M > gemv_max_m) on q4x32 integer codes, AVX2 (included by kern_avx2.cpp
// and, compiled there with AVX-512 flags, by kern_avx512.cpp for its non-VNNI variant; the VNNI
// variant has its own vpdpbusd form, gemm_q4q8c_vnni; internal linkage in each).
//
// Activations are rounded per *chunk*: a run of at most 8 q8 blocks (256 columns) inside one
// weight group, x[m, k] ~= dc[m, c] * xq[m, k], dc = max|x_chunk| / 127 (Q8_0's rule on a wider
// block, as ggml's Q8_K does per 256). One scale per chunk lets the codes x int8 products add up
// in int16 over the whole chunk: vpmaddubsw pair sums are <= 2 * 15 * 127 = 3810, eight of them
// <= 30480 < 32767, so the sum is exact; it is widened (vpmaddwd by 1) and scaled once per chunk
// instead of once per 32-column block. That is what makes it faster than fp32 FMA here: on Zen 2
// vpmaddubsw / vpmaddwd issue on one pipe, so the per-block form (decode's) needs the same
// cycles per multiply-add as an fp32 GEMM, the per-chunk form ~0.6 of them (bench_kernels.py).
//
//     y[m, n] = sum_c dc[m, c] scale[n, g(c)] dot_c(codes, xq) - sum_g scale zero xs[m, g]
//     xs[m, g] = sum_{c in g} dc[m, c] sum_{k in c} xq[m, k]
//
// Register tile: 3 activation rows x 2 weight rows (12 of the 16 ymm hold int16 sums and fp32
// accumulators; 4 x 2 spills, measured ~4% slower); each block's 2 x 32 codes are unpacked once
// and used for 3 rows, each row's 32 int8 loaded once for 2 weight rows.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace lowbit {
namespace {

inline __m256i gq8_unpack(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                 _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
}

inline float gq8_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// rows m0..m0+MR of y against weight rows n..n+NR
template <int MR, int NR>
inline void gq8_tile(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                     const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t K,
                     const float* scale, const float* zero, int64_t G, float* y, int64_t N,
                     int64_t m0, int64_t n) {
  const int64_t rb = K / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    __m256i p[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) p[i][j] = _mm256_setzero_si256();
    for (int64_t b = cblk[c]; b < cblk[c + 1]; ++b) {
      __m256i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = gq8_unpack(codes + (n + j) * rb + b * 16);
      for (int i = 0; i < MR; ++i) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + i) * K + b * 32));
        for (int j = 0; j < NR; ++j) p[i][j] = _mm256_add_epi16(p[i][j], _mm256_maddubs_epi16(w[j], q));
      }
    }
    const int64_t g = cgrp[c];
    for (int i = 0; i < MR; ++i) {
      const float dv = dc[(m0 + i) * C + c];
      for (int j = 0; j < NR; ++j) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[i][j], ones));
        acc[i][j] = _mm256_fmadd_ps(f, _mm256_set1_ps(dv * scale[(n + j) * G + g]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float a = gq8_hsum(acc[i][j]);
      if (zero)
        for (int64_t g = 0; g < G; ++g) a -= scale[(n + j) * G + g] * zero[(n + j) * G + g] * xs[(m0 + i) * G + g];
      y[(m0 + i) * N + n + j] = a;
    }
}

template <int NR>
inline void gq8_rows(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                     const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t M, int64_t K,
                     const float* scale, const float* zero, int64_t G, float* y, int64_t N, int64_t n) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) gq8_tile<3, NR>(codes, xq, dc, xs, cgrp, cblk, C, K, scale, zero, G, y, N, m, n);
  for (; m < M; ++m) gq8_tile<1, NR>(codes, xq, dc, xs, cgrp, cblk, C, K, scale, zero, G, y, N, m, n);
}

void gemm_q4q8c(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t M, int64_t K,
                const float* scale, const float* zero, int64_t G, float* y, int64_t N,
                int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) gq8_rows<2>(codes, xq, dc, xs, cgrp, cblk, C, M, K, scale, zero, G, y, N, n);
  for (; n < n1; ++n) gq8_rows<1>(codes, xq, dc, xs, cgrp, cblk, C, M, K, scale, zero, G, y, N, n);
}

}  // namespace
}  // namespace lowbit
