// Int8 prefill GEMM in the register-blocked form of kern_gemm_f32.h, on AVX-512 VNNI (zmm,
// vpdpbusd, 6 x 32 tile) and on AVX2 (ymm, vpmaddubsw, 2 x 16 tile; the AVX-512 variant without
// VNNI compiles this too). Included by kern_avx512.cpp and kern_avx2.cpp after kern_gemm_f32.h
// (gf32_tr8); internal linkage. Activations are rounded per *chunk*, a run of at most 8 q8 blocks
// (256 columns) inside one weight group: x ~= dc * xq, dc = max|x_chunk| / 127 (Q8_0's rule on a
// wider block, as ggml's Q8_K does per 256), rounded in lowbit_cpu.cpp. The result equals that
// rounded x times W to fp32 summation order:
//
//     y[m, n] = sum_c dc[m, c] scale[n, g(c)] sum_{k in c} code[n, k] xq[m, k] - sum_g scale zero xs[m, g]
//
// Layouts, per call and thread:
//   x words: per block of MR rows, xw[q * MR + i] = the 4 int8 of row i at columns 4q..4q+3
//            (one 32-bit broadcast feeds a vpdpbusd / vpmaddubsw), with dc and xs per block row
//            (0 past M);
//   panel:   per NR weight rows, pw[q * NR + j] = the 4 codes (as bytes) of row j at columns
//            4q..4q+3, two vectors per q; built by unpacking the nibbles into bytes in column
//            order and transposing 32-bit words by 8 x 8 (gf32_tr8); scale and scale * zero per
//            group transposed beside it (0 past the rows).
// Micro-kernel: MR x NR int32 sums per chunk (exact: at most 256 products of <= 15 * 127 per
// lane), then per chunk one convert and one FMA by dc * scale into fp32 accumulators held across
// the whole row, and the zero term once per group. The dot-product form it replaces (one output
// per register, reduced at the end) ran at 0.55-1.1x of fp32 F.linear on VNNI and
// 0.7-1.0x on AVX2; this one has no reductions and no unpacking in the inner loop.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace lowbit {
namespace {

#if LOWBIT_VNNI
constexpr int kQ8MR = 6;    // activation rows per micro-tile (12 int32 + 12 fp32 zmm accumulators)
constexpr int kQ8NR = 32;   // weight rows per panel (two zmm of 16 int32 lanes)
constexpr int kQ8V = 16;
using q8f = __m512;
using q8i = __m512i;
inline q8f q8_fzero() { return _mm512_setzero_ps(); }
inline q8f q8_fload(const float* p) { return _mm512_loadu_ps(p); }
inline q8f q8_fset(float v) { return _mm512_set1_ps(v); }
inline void q8_fstore(float* p, q8f v) { _mm512_storeu_ps(p, v); }
inline q8f q8_scale(q8f f, q8i a, q8f s, q8f d) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(s, d), f); }
inline q8f q8_fnmadd(q8f a, q8f b, q8f c) { return _mm512_fnmadd_ps(a, b, c); }

// int32 sums of one chunk (quads q0..q1) for MR rows x 32 weight rows: one vpdpbusd per 64 products
template <int MR>
inline void q8_chunk(const int32_t* xq, const int32_t* pq, int64_t q0, int64_t q1, q8i (&a)[MR][2]) {
  for (int i = 0; i < MR; ++i) a[i][0] = a[i][1] = _mm512_setzero_si512();
  xq += q0 * MR;
  pq += q0 * kQ8NR;
  for (int64_t q = q0; q < q1; ++q, xq += MR, pq += kQ8NR) {
    const __m512i w0 = _mm512_loadu_si512(pq), w1 = _mm512_loadu_si512(pq + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512i b = _mm512_set1_epi32(xq[i]);
      a[i][0] = _mm512_dpbusd_epi32(a[i][0], w0, b);
      a[i][1] = _mm512_dpbusd_epi32(a[i][1], w1, b);
    }
  }
}
#else
constexpr int kQ8MR = 2;    // 4 int16 + 4 int32 + 4 fp32 ymm accumulators of the 16
constexpr int kQ8NR = 16;   // weight rows per panel (two ymm of 8 int32 lanes)
constexpr int kQ8V = 8;
using q8f = __m256;
using q8i = __m256i;
inline q8f q8_fzero() { return _mm256_setzero_ps(); }
inline q8f q8_fload(const float* p) { return _mm256_loadu_ps(p); }
inline q8f q8_fset(float v) { return _mm256_set1_ps(v); }
inline void q8_fstore(float* p, q8f v) { _mm256_storeu_ps(p, v); }
inline q8f q8_scale(q8f f, q8i a, q8f s, q8f d) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(s, d), f); }
inline q8f q8_fnmadd(q8f a, q8f b, q8f c) { return _mm256_fnmadd_ps(a, b, c); }

// the same sums with vpmaddubsw (u8 x s8 pair sums <= 2 * 15 * 127 = 3810 in int16) added up in
// int16 over the 8 quads of each 32-column block (<= 30480 < 32767: exact), then vpmaddwd by 1
// into int32 once per block
template <int MR>
inline void q8_chunk(const int32_t* xq, const int32_t* pq, int64_t q0, int64_t q1, q8i (&a)[MR][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < MR; ++i) a[i][0] = a[i][1] = _mm256_setzero_si256();
  xq += q0 * MR;
  pq += q0 * kQ8NR;
  for (int64_t q = q0; q < q1; q += 8) {
    __m256i p[MR][2];
    for (int i = 0; i < MR; ++i) p[i][0] = p[i][1] = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t, xq += MR, pq += kQ8NR) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + 8));
      for (int i = 0; i < MR; ++i) {
        const __m256i b = _mm256_set1_epi32(xq[i]);
        p[i][0] = _mm256_add_epi16(p[i][0], _mm256_maddubs_epi16(w0, b));
        p[i][1] = _mm256_add_epi16(p[i][1], _mm256_maddubs_epi16(w1, b));
      }
    }
    for (int i = 0; i < MR; ++i) {
      a[i][0] = _mm256_add_epi32(a[i][0], _mm256_madd_epi16(p[i][0], ones));
      a[i][1] = _mm256_add_epi32(a[i][1], _mm256_madd_epi16(p[i][1], ones));
    }
  }
}
#endif

template <int MR>
inline void q8v_tile(const int32_t* xw, const int32_t* pw, const float* dcb, const float* xsb,
                     const float* swt, const float* szt, const int32_t* cgrp, const int32_t* cblk,
                     int64_t C, float* c, int64_t ldc) {
  q8f f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = q8_fzero();
  for (int64_t ch = 0; ch < C; ++ch) {
    q8i a[MR][2];
    q8_chunk<MR>(xw, pw, int64_t(cblk[ch]) * 8, int64_t(cblk[ch + 1]) * 8, a);
    const int64_t g = cgrp[ch];
    const q8f s0 = q8_fload(swt + g * kQ8NR), s1 = q8_fload(swt + g * kQ8NR + kQ8V);
    for (int i = 0; i < MR; ++i) {
      const q8f d = q8_fset(dcb[ch * MR + i]);
      f[i][0] = q8_scale(f[i][0], a[i][0], s0, d);
      f[i][1] = q8_scale(f[i][1], a[i][1], s1, d);
    }
    if (szt != nullptr && (ch + 1 == C || cgrp[ch + 1] != g)) {
      const q8f z0 = q8_fload(szt + g * kQ8NR), z1 = q8_fload(szt + g * kQ8NR + kQ8V);
      for (int i = 0; i < MR; ++i) {
        const q8f xv = q8_fset(xsb[g * MR + i]);
        f[i][0] = q8_fnmadd(z0, xv, f[i][0]);
        f[i][1] = q8_fnmadd(z1, xv, f[i][1]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    q8_fstore(c + i * ldc, f[i][0]);
    q8_fstore(c + i * ldc + kQ8V, f[i][1]);
  }
}

void gemm_q4q8c_blk(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                     const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t M, int64_t K,
                     const float* scale, const float* zero, int64_t G, float* y, int64_t N,
                     int64_t n0, int64_t n1) {
  constexpr int MR = kQ8MR, NR = kQ8NR;
  const int64_t Q = K / 4, nmb = (M + MR - 1) / MR;
  // x words, dc and xs per MR-row block (zero rows past M)
  Buf<int32_t> xw(nmb * Q * MR);   // Buf, not std::vector: see lowbit_kern.h
  Buf<float> dcb(nmb * C * MR), xsb(nmb * G * MR);
  for (int64_t mb = 0; mb < nmb; ++mb)
    for (int i = 0; i < MR; ++i) {
      const int64_t m = mb * MR + i;
      int32_t* dst = xw.data() + mb * Q * MR + i;
      if (m >= M) {
        for (int64_t q = 0; q < Q; ++q) dst[q * MR] = 0;
        continue;
      }
      const int8_t* src = xq + m * K;
      for (int64_t q = 0; q < Q; ++q) std::memcpy(dst + q * MR, src + 4 * q, 4);
      for (int64_t ch = 0; ch < C; ++ch) dcb[(mb * C + ch) * MR + i] = dc[m * C + ch];
      for (int64_t g = 0; g < G; ++g) xsb[(mb * G + g) * MR + i] = xs[m * G + g];
    }
  Buf<int32_t> pw(Q * NR);
  Buf<uint8_t> rows(8 * K);
  Buf<float> swt(G * NR), szt(zero ? G * NR : 0);
  alignas(64) float ctmp[MR * NR];
  const int64_t rb = K / 2;
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nv = n1 - n < NR ? n1 - n : NR;
    // the panel: 8 rows at a time unpacked to bytes in column order, then words transposed
    for (int64_t jb = 0; jb < NR; jb += 8) {
      for (int64_t j = 0; j < 8; ++j) {
        uint8_t* r = rows.data() + j * K;
        if (jb + j >= nv) {
          std::memset(r, 0, K);
          continue;
        }
        const uint8_t* p = codes + (n + jb + j) * rb;
        const __m128i m4 = _mm_set1_epi8(0x0F);
        for (int64_t k = 0; k < K; k += 32) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(r + k), _mm_and_si128(b, m4));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(r + k + 16), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
        }
      }
      const float* rw = reinterpret_cast<const float*>(rows.data());   // 32-bit words, moved bit-exact
      float* pwf = reinterpret_cast<float*>(pw.data());
      for (int64_t q = 0; q < Q; q += 8) gf32_tr8(rw + q, Q, pwf + q * NR + jb, NR);
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < NR; ++j) {
        const float s = j < nv ? scale[(n + j) * G + g] : 0.f;
        swt[g * NR + j] = s;
        if (zero) szt[g * NR + j] = j < nv ? s * zero[(n + j) * G + g] : 0.f;
      }
    for (int64_t mb = 0; mb < nmb; ++mb) {
      const int64_t m = mb * MR, mv = M - m < MR ? M - m : MR;
      const bool full = mv == MR && nv == NR;
      float* c = full ? y + m * N + n : ctmp;
      q8v_tile<MR>(xw.data() + mb * Q * MR, pw.data(), dcb.data() + mb * C * MR, xsb.data() + mb * G * MR,
                   swt.data(), zero ? szt.data() : nullptr, cgrp, cblk, C, c, full ? N : NR);
      if (!full)
        for (int64_t i = 0; i < mv; ++i)
          for (int64_t j = 0; j < nv; ++j) y[(m + i) * N + n + j] = ctmp[i * NR + j];
    }
  }
}

}  // namespace
}  // namespace lowbit
