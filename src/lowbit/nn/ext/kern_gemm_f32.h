// fp32 GEMM for prefill (M > gemv_max_m) on the q4x32 / u8 containers: y = x @ W^T with W
// dequantized panel by panel, never whole. Included by kern_avx2.cpp (ymm, MR x NR = 6 x 16) and
// kern_avx512.cpp (zmm, 8 x 32); internal linkage in each. Needs dequant_q4 / dequant_u8 (with a
// column range) defined before the include.
//
// The form is the usual register-blocked one (an outer product per k):
//   x is packed once per call (gemm_pack_x) into blocks of MR rows, k-major within each
//   KC-column chunk: xp[k0 * Mp + mb * kc * MR + (k - k0) * MR + i] = x[mb * MR + i, k], rows
//   past M zero, Mp = M rounded up to MR (read in place, MR rows of stride K, it ran 10-20%
//   slower at M = 512: one TLB page per row and chunk);
//   per NR weight rows and KC columns, the codes are dequantized (the exact reference values)
//   into a row-major buffer and transposed by 8 x 8 blocks into a k-major panel
//   panel[(k - k0) * NR + j] = W[n + j, k] (L1-resident: 16 KiB / 32 KiB);
//   the micro-kernel keeps an MR x NR tile of y in registers: per k, NR / VL panel loads and MR
//   broadcasts of x, MR * NR / VL FMAs, and adds the tile into y once per chunk.
// What it replaces (dequantize a row tile, at::mm_out on it) made MKL repack the whole of x for
// every tile: at K = 8960 a tile was 16 rows, and the repacking cost ~30% of the product.
// The result differs from the dequantize-then-matmul reference only in fp32 summation order.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace lowbit {
namespace {

#ifndef LOWBIT_GEMM_KC
#define LOWBIT_GEMM_KC 256
#endif
constexpr int64_t kGemmKC = LOWBIT_GEMM_KC;   // columns per chunk (x chunk of M x 256 floats stays in L2)

#if defined(__AVX512F__)
constexpr int kGemmMR = 8, kGemmNR = 32;
using gvec = __m512;
constexpr int kVL = 16;
inline gvec gv_zero() { return _mm512_setzero_ps(); }
inline gvec gv_load(const float* p) { return _mm512_loadu_ps(p); }
inline void gv_store(float* p, gvec v) { _mm512_storeu_ps(p, v); }
inline gvec gv_bcast(const float* p) { return _mm512_set1_ps(*p); }
inline gvec gv_fma(gvec a, gvec b, gvec c) { return _mm512_fmadd_ps(a, b, c); }
inline gvec gv_add(gvec a, gvec b) { return _mm512_add_ps(a, b); }
#else
constexpr int kGemmMR = 6, kGemmNR = 16;
using gvec = __m256;
constexpr int kVL = 8;
inline gvec gv_zero() { return _mm256_setzero_ps(); }
inline gvec gv_load(const float* p) { return _mm256_loadu_ps(p); }
inline void gv_store(float* p, gvec v) { _mm256_storeu_ps(p, v); }
inline gvec gv_bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline gvec gv_fma(gvec a, gvec b, gvec c) { return _mm256_fmadd_ps(a, b, c); }
inline gvec gv_add(gvec a, gvec b) { return _mm256_add_ps(a, b); }
#endif
constexpr int kNV = kGemmNR / kVL;

// c[i * ldc + j] (+)= sum_k a[k * MR + i] * b[k * NR + j], i < MR, j < NR
inline void gf32_tile(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool acc) {
  gvec t[kGemmMR][kNV];
#pragma GCC unroll 8
  for (int i = 0; i < kGemmMR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) t[i][v] = gv_zero();
  for (int64_t k = 0; k < kc; ++k, a += kGemmMR, b += kGemmNR) {
    gvec w[kNV];
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) w[v] = gv_load(b + v * kVL);
#pragma GCC unroll 8
    for (int i = 0; i < kGemmMR; ++i) {
      const gvec xi = gv_bcast(a + i);
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) t[i][v] = gv_fma(xi, w[v], t[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kGemmMR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) {
      float* p = c + i * ldc + v * kVL;
      gv_store(p, acc ? gv_add(gv_load(p), t[i][v]) : t[i][v]);
    }
}

// dst[j * ld + i] = src[i * ls + j] for an 8 x 8 block
inline void gf32_tr8(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// x (M, K) row-major -> the packed blocks mb0..mb1 above
void gemm_pack_x(const float* x, int64_t M, int64_t K, int64_t mb0, int64_t mb1, float* xp) {
  const int64_t Mp = (M + kGemmMR - 1) / kGemmMR * kGemmMR;
  for (int64_t mb = mb0; mb < mb1; ++mb) {
    const int64_t m = mb * kGemmMR, mv = M - m < kGemmMR ? M - m : kGemmMR;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
      const int64_t kc = K - k0 < kGemmKC ? K - k0 : kGemmKC;
      float* dst = xp + k0 * Mp + mb * kc * kGemmMR;
      if (kGemmMR == 8 && mv == 8) {
        for (int64_t k = 0; k < kc; k += 8) gf32_tr8(x + m * K + k0 + k, K, dst + k * 8, 8);
        continue;
      }
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < kGemmMR; ++i) dst[k * kGemmMR + i] = i < mv ? x[(m + i) * K + k0 + k] : 0.f;
    }
  }
}

// y[:, n0:n1] = x @ W[n0:n1]^T for the packed x. Columns n0..n1 of y (row stride N) are written whole.
template <bool Q4>
void gemm_f32_rows(const uint8_t* codes, const float* xp, int64_t M, int64_t K, int64_t gs,
                   const float* lut, const float* scale, const float* zero, int64_t G,
                   float* y, int64_t N, int64_t n0, int64_t n1) {
  alignas(64) float rows[kGemmNR * kGemmKC];
  alignas(64) float panel[kGemmKC * kGemmNR];
  alignas(64) float ctmp[kGemmMR * kGemmNR];
  const int64_t Mp = (M + kGemmMR - 1) / kGemmMR * kGemmMR;
  for (int64_t n = n0; n < n1; n += kGemmNR) {
    const int64_t nv = n1 - n < kGemmNR ? n1 - n : kGemmNR;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
      const int64_t kc = K - k0 < kGemmKC ? K - k0 : kGemmKC;   // a multiple of 32
      if (Q4) dequant_q4(codes, K, gs, lut, scale, zero, G, n, n + nv, k0, k0 + kc, rows);
      else    dequant_u8(codes, K, gs, scale, zero, G, n, n + nv, k0, k0 + kc, rows);
      if (nv < kGemmNR) std::memset(rows + nv * kc, 0, sizeof(float) * (kGemmNR - nv) * kc);
      for (int64_t j = 0; j < kGemmNR; j += 8)
        for (int64_t k = 0; k < kc; k += 8) gf32_tr8(rows + j * kc + k, kc, panel + k * kGemmNR + j, kGemmNR);
      const float* xc = xp + k0 * Mp;
      for (int64_t m = 0; m < M; m += kGemmMR) {
        const float* a = xc + m * kc;
        float* c = y + m * N + n;
        const int64_t mv = M - m < kGemmMR ? M - m : kGemmMR;
        if (mv == kGemmMR && nv == kGemmNR) {
          gf32_tile(a, panel, kc, c, N, k0 > 0);
        } else {
          gf32_tile(a, panel, kc, ctmp, kGemmNR, false);
          for (int64_t i = 0; i < mv; ++i)
            for (int64_t j = 0; j < nv; ++j) c[i * N + j] = (k0 > 0 ? c[i * N + j] : 0.f) + ctmp[i * kGemmNR + j];
        }
      }
    }
  }
}

void gemm_f32_q4(const uint8_t* codes, const float* xp, int64_t M, int64_t K, int64_t gs,
                 const float* lut, const float* scale, const float* zero, int64_t G,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  gemm_f32_rows<true>(codes, xp, M, K, gs, lut, scale, zero, G, y, N, n0, n1);
}

void gemm_f32_u8(const uint8_t* codes, const float* xp, int64_t M, int64_t K, int64_t gs,
                 const float* scale, const float* zero, int64_t G,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  gemm_f32_rows<false>(codes, xp, M, K, gs, nullptr, scale, zero, G, y, N, n0, n1);
}

}  // namespace
}  // namespace lowbit
