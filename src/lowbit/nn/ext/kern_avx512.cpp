// AVX-512 kernels, compiled twice: -DLOWBIT_VNNI=1 (-mavx512vnni: vpdpbusd for the q8 dot
// products) -> kern_avx512vnni, and without (vpmaddubsw + vpmaddwd, AVX512BW) -> kern_avx512.
// Both need AVX512 F, BW, VL, DQ (Skylake-X and later, Zen 4).
//
// q4 fp32 GEMV: vpmovzxbd spreads 16 packed bytes over 16 int32 lanes; vpermps reads only the low
// 4 bits of each index, so permuting the group's folded 16-entry table lg[c] = (lut[c]-zero)*scale
// by the lanes looks up the low nibble directly and, after a 4-bit shift, the high one.
// 6 zmm ops per 32 weights; values equal the reference's dequantized weights exactly.
//
// q8 integer decode path (gemv_q8): kern_q8_units.h's units. q4: 4 blocks per zmm, the 64
// packed bytes' low nibbles (columns 0-15 of each block) and high nibbles (16-31) each meet 64
// int8 activations stored in that order, so no shuffle is needed; vpdpbusd (u8 x s8, 4 products
// into each int32, exact) or vpmaddubsw + vpmaddwd gives 4 int32 lanes per block; one FMA by
// the lanes' d per unit, one by scale_g per group. A group's last 1-3 blocks go as a pair in
// column order (vshufi64x2 to [b | b | b+1 | b+1], vpsrlvw by (0, 4, 0, 4), & 0x0F) and a single.
// 4 weight rows per pass, each prefetching its line LOWBIT_PF_BYTES ahead. Without VNNI, 8-bit
// codes are biased to signed as in kern_avx2.cpp (vpmaddubsw's int16 pair sums would saturate on
// u8 x s8).
#include <immintrin.h>

#include "lowbit_kern.h"
#include "kern_q8_units.h"

#include <utility>

#ifndef LOWBIT_VNNI
#define LOWBIT_VNNI 0
#endif

namespace lowbit {
namespace {

constexpr int64_t kRun = 32;
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m512 folded_lut(const float* lut, float z, float s) {
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(lut), _mm512_set1_ps(z)), _mm512_set1_ps(s));
}

void gemv_q4(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* lut, const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rb = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        const __m512 lg = folded_lut(lut, zero ? zero[n * G + g] : 0.f, scale[n * G + g]);
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + LOWBIT_PF_BYTES), _MM_HINT_T0);
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2)));
          a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, lg), _mm512_loadu_ps(xr + k), a0);
          a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lg), _mm512_loadu_ps(xr + k + 16), a1);
        }
      }
      y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

inline __m512 u8x16_ps(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// 8-bit codes, fp32 activations: per group acc = sum x * (code - zero), total += scale * acc.
// 4 weight rows per pass share the activation loads; each prefetches its line LOWBIT_PF_BYTES
// ahead (as q8_rows below; the hardware prefetcher alone left the Qwen2.5 lm_head at 16 GB/s).
// Each row sums in the same order as one row alone.
template <int R>
inline void u8_rows(const uint8_t* codes, const float* xr, int64_t K, int64_t gs,
                    const float* scale, const float* zero, int64_t G, float* yr, int64_t n) {
  const int64_t pf = pf_rows_ahead(K, R);
  const uint8_t* p[R];
  __m512 t0[R], t1[R];
  for (int r = 0; r < R; ++r) p[r] = codes + (n + r) * K, t0[r] = t1[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    __m512 zv[R], a0[R], a1[R];
    for (int r = 0; r < R; ++r)
      zv[r] = _mm512_set1_ps(zero ? zero[(n + r) * G + g] : 0.f), a0[r] = a1[r] = _mm512_setzero_ps();
    const int64_t k1 = imin(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kRun) {
      const __m512 x0 = _mm512_loadu_ps(xr + k), x1 = _mm512_loadu_ps(xr + k + 16);
      for (int r = 0; r < R; ++r) {
        if (!(k & 63)) _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + k), _MM_HINT_T0);
        a0[r] = _mm512_fmadd_ps(_mm512_sub_ps(u8x16_ps(p[r] + k), zv[r]), x0, a0[r]);
        a1[r] = _mm512_fmadd_ps(_mm512_sub_ps(u8x16_ps(p[r] + k + 16), zv[r]), x1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(scale[(n + r) * G + g]);
      t0[r] = _mm512_fmadd_ps(sv, a0[r], t0[r]);
      t1[r] = _mm512_fmadd_ps(sv, a1[r], t1[r]);
    }
  }
  for (int r = 0; r < R; ++r) yr[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(t0[r], t1[r]));
}

void gemv_u8(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (int64_t m = 0; m < M; ++m) u8_rows<4>(codes, x + m * K, K, gs, scale, zero, G, y + m * N, n);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) u8_rows<1>(codes, x + m * K, K, gs, scale, zero, G, y + m * N, n);
}

void dequant_q4(const uint8_t* codes, int64_t K, int64_t gs, const float* lut, const float* scale,
                const float* zero, int64_t G, int64_t n0, int64_t n1,
                int64_t kbeg, int64_t kend, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * (K / 2);
    float* o = out + (n - n0) * (kend - kbeg);  // o[k - kbeg]: column k
    for (int64_t g = kbeg / gs, k0 = g * gs; k0 < kend; k0 += gs, ++g) {
      const __m512 lg = folded_lut(lut, zero ? zero[n * G + g] : 0.f, scale[n * G + g]);
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); k += kRun) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2)));
        _mm512_storeu_ps(o + (k - kbeg), _mm512_permutexvar_ps(b, lg));
        _mm512_storeu_ps(o + (k - kbeg) + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lg));
      }
    }
  }
}

void dequant_u8(const uint8_t* codes, int64_t K, int64_t gs, const float* scale, const float* zero,
                int64_t G, int64_t n0, int64_t n1,
                int64_t kbeg, int64_t kend, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * K;
    float* o = out + (n - n0) * (kend - kbeg);  // o[k - kbeg]: column k
    for (int64_t g = kbeg / gs, k0 = g * gs; k0 < kend; k0 += gs, ++g) {
      const __m512 zv = _mm512_set1_ps(zero ? zero[n * G + g] : 0.f), sv = _mm512_set1_ps(scale[n * G + g]);
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); k += 16)
        _mm512_storeu_ps(o + (k - kbeg), _mm512_mul_ps(_mm512_sub_ps(u8x16_ps(p + k), zv), sv));
    }
  }
}

void quant_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* d, int32_t* qsum) {
  const int64_t nb = K / kRun;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kRun;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      // x * 0 is NaN exactly where x is NaN or inf
      const float poison = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(v0, _mm512_setzero_ps()),
                                                              _mm512_mul_ps(v1, _mm512_setzero_ps())));
      const float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
      const __m512 iv = _mm512_set1_ps(id);
      // cvtps rounds to nearest even (default MXCSR), as the portable nearbyint does
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, iv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * kRun), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * kRun + 16), _mm512_cvtsepi32_epi8(q1));
      d[m * nb + b] = poison == 0.f ? db : __builtin_nanf("");
      qsum[m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

inline __m512i dot_u8s8(__m512i c, __m512i q) {
#if LOWBIT_VNNI
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, q);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(c, q), _mm512_set1_epi16(1));
#endif
}

// 8-bit codes: sum c q exactly. VNNI takes u8 directly; otherwise (c - 128) is signed, multiplied
// as |c - 128| x (q with c's sign), and the caller's correction adds back 128 * sum q.
inline __m512i dot_codes_u8(__m512i c, __m512i q) {
#if LOWBIT_VNNI
  return dot_u8s8(c, q);
#else
  const __m512i cs = _mm512_xor_si512(c, _mm512_set1_epi8(static_cast<char>(0x80)));
  const __mmask64 neg = _mm512_movepi8_mask(cs);
  const __m512i qs = _mm512_mask_sub_epi8(q, neg, _mm512_setzero_si512(), q);
  return dot_u8s8(_mm512_abs_epi8(cs), qs);
#endif
}

inline __m512i unpack_q4_pair(const uint8_t* p) {
  const __m512i r = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i dup = _mm512_shuffle_i64x2(r, r, 0x50);                 // lanes (0, 0, 1, 1)
  const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 0x40004, 0x40004, 0x40004, 0x40004,
                                       0, 0, 0, 0, 0x40004, 0x40004, 0x40004, 0x40004);
  return _mm512_and_si512(_mm512_srlv_epi16(dup, sh), _mm512_set1_epi8(0x0F));
}

inline __m512i unpack_q4_one(const uint8_t* p) {  // one block, upper 256 bits zero
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                            _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
  return _mm512_zextsi256_si512(c);
}

// 4 runs of 4-bit codes (64 bytes, kern_q8_units.h's interleaved unit): low nibbles = columns
// 0-15 of the 4 blocks, high = 16-31, against 128 interleaved activations -> 16 int32 lanes,
// 4 per block. Pair sums of one block's two planes add up in int16 exactly (2 * 2 * 15 * 127).
inline __m512i dot_q4_quad(const uint8_t* p, const int8_t* q) {
  const __m512i v = _mm512_loadu_si512(p), m = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(v, m), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
#if LOWBIT_VNNI
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q)),
                             hi, _mm512_loadu_si512(q + 64));
#else
  return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, _mm512_loadu_si512(q)),
                                            _mm512_maddubs_epi16(hi, _mm512_loadu_si512(q + 64))),
                           _mm512_set1_epi16(1));
#endif
}

// sum_g scale[g] * (zero[g] - zoff) * xs[g]: the zero-point term of one output, 16 groups a step
inline float zero_term(const float* s, const float* z, const float* xs, int64_t G, float zoff) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
    const __m512 zz = z ? _mm512_maskz_loadu_ps(k, z + g) : _mm512_setzero_ps();
    a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + g), _mm512_sub_ps(zz, _mm512_set1_ps(zoff))),
                        _mm512_maskz_loadu_ps(k, xs + g), a);
  }
  return _mm512_reduce_add_ps(a);
}

// q8 decode GEMV: per group, units of kern_q8_units.h (q4: 4-block interleaved, then a pair and
// a single in column order; u8: pairs, then a single), each unit's int32 lanes converted and
// multiplied by its lanes' d (dv) into a group accumulator, which the group scale then weighs.
// R weight rows per pass share the activation and dv loads and give R independent chains.
template <bool Q4, int R>
inline void q8_rows(const uint8_t* codes, const Q8Units& u, int64_t m, const float* xs, int64_t K,
                    const float* scale, const float* zero, int64_t G, float zoff, float* y, int64_t N,
                    int64_t n) {
  const int64_t rb = Q4 ? K / 2 : K;
  const int8_t* q = u.xp.data() + m * K;
  const float* v = u.dv.data() + m * u.units * 16;
  const int64_t pf = pf_rows_ahead(rb, R);
  const uint8_t* p[R];
  __m512 t[R];
  for (int r = 0; r < R; ++r) p[r] = codes + (n + r) * rb, t[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < u.groups; ++g) {
    int64_t b = u.gb[g];
    const int64_t b1 = u.gb[g + 1];
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    if (Q4) {
      for (; b + 4 <= b1; b += 4, v += 16) {
        const __m512 dq = _mm512_loadu_ps(v);
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + b * 16), _MM_HINT_T0);
          a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_q4_quad(p[r] + b * 16, q + b * kRun)), dq, a[r]);
        }
      }
      if (b + 2 <= b1) {
        const __m512 dq = _mm512_loadu_ps(v);
        const __m512i qv = _mm512_loadu_si512(q + b * kRun);
        for (int r = 0; r < R; ++r)
          a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(unpack_q4_pair(p[r] + b * 16), qv)), dq, a[r]);
        b += 2, v += 16;
      }
    } else {
      for (; b + 2 <= b1; b += 2, v += 16) {
        const __m512 dq = _mm512_loadu_ps(v);
        const __m512i qv = _mm512_loadu_si512(q + b * kRun);
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + b * kRun), _MM_HINT_T0);
          a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_codes_u8(_mm512_loadu_si512(p[r] + b * kRun), qv)), dq, a[r]);
        }
      }
    }
    if (b < b1) {  // one block, upper 256 bits zero
      const __m512 dq = _mm512_loadu_ps(v);
      const __m512i qv = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kRun)));
      for (int r = 0; r < R; ++r) {
        const __m512i c = Q4 ? unpack_q4_one(p[r] + b * 16)
                             : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r] + b * kRun)));
        a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Q4 ? dot_u8s8(c, qv) : dot_codes_u8(c, qv)), dq, a[r]);
      }
      v += 16;
    }
    for (int r = 0; r < R; ++r) t[r] = _mm512_fmadd_ps(a[r], _mm512_set1_ps(scale[(n + r) * G + g]), t[r]);
  }
  for (int r = 0; r < R; ++r) {
    float acc = _mm512_reduce_add_ps(t[r]);
    if (zero || zoff != 0.f)
      acc -= zero_term(scale + (n + r) * G, zero ? zero + (n + r) * G : nullptr, xs + m * G, G, zoff);
    y[m * N + n + r] = acc;
  }
}

template <bool Q4>
void gemv_q8(const uint8_t* codes, const int8_t* xq, const float* d, const float* xs,
             const int32_t* bgrp, int64_t M, int64_t K, const float* scale, const float* zero,
             int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  const float zoff = (Q4 || LOWBIT_VNNI) ? 0.f : 128.f;
  static constexpr int kq4[3] = {4, 2, 1}, ku8[3] = {2, 1, 0};
  const Q8Units u(xq, d, bgrp, M, K, 16, Q4 ? kq4 : ku8, Q4 ? 4 : 0);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (int64_t m = 0; m < M; ++m) q8_rows<Q4, 4>(codes, u, m, xs, K, scale, zero, G, zoff, y, N, n);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) q8_rows<Q4, 1>(codes, u, m, xs, K, scale, zero, G, zoff, y, N, n);
}

// (the int8 prefill GEMM is kern_gemm_q8.h, included below)

// ternary t2x64 on per-token int8 activations, R tokens per pass over a weight row. One 16-byte
// run broadcast to the 4 lanes and shifted by (0, 2, 4, 6) per lane, masked: its 64 codes in
// column order. VNNI: vpdpbusd into int32. Without: vpmaddubsw pair sums (<= 512) add up in
// int16 over 32 runs exactly (32 * 512 < 32767), then one vpmaddwd to int32.
template <int R>
inline void t2_rows(const uint8_t* p, const int8_t* xq, const float* xs, const int32_t* qsum,
                    int64_t m0, int64_t K, int64_t gs, const float* s, int64_t G,
                    float* y, int64_t N, int64_t n) {
  const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i m3 = _mm512_set1_epi8(3);
  float tot[R];
  for (int r = 0; r < R; ++r) tot[r] = 0.f;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const int64_t k1 = imin(K, k0 + gs);
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
#if LOWBIT_VNNI
    for (int64_t k = k0; k < k1; k += 64) {
      const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 4)));
      const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(b, sh), m3);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbusd_epi32(acc[r], c, _mm512_loadu_si512(xq + (m0 + r) * K + k));
    }
#else
    const __m512i ones = _mm512_set1_epi16(1);
    for (int64_t kc = k0; kc < k1; kc += 32 * 64) {
      const int64_t ke = imin(k1, kc + 32 * 64);
      __m512i a16[R];
      for (int r = 0; r < R; ++r) a16[r] = _mm512_setzero_si512();
      for (int64_t k = kc; k < ke; k += 64) {
        const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 4)));
        const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(b, sh), m3);
        for (int r = 0; r < R; ++r)
          a16[r] = _mm512_add_epi16(a16[r], _mm512_maddubs_epi16(c, _mm512_loadu_si512(xq + (m0 + r) * K + k)));
      }
      for (int r = 0; r < R; ++r) acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(a16[r], ones));
    }
#endif
    for (int r = 0; r < R; ++r)
      tot[r] += s[g] * static_cast<float>(_mm512_reduce_add_epi32(acc[r]) - qsum[(m0 + r) * G + g]);
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = xs[m0 + r] * tot[r];
}

void gemv_t2q8(const uint8_t* codes, const int8_t* xq, const float* xs, const int32_t* qsum,
               int64_t M, int64_t K, int64_t gs, const float* scale, int64_t G,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * (K / 4);
    const float* s = scale + n * G;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) t2_rows<4>(p, xq, xs, qsum, m, K, gs, s, G, y, N, n);
    switch (M - m) {
      case 3: t2_rows<3>(p, xq, xs, qsum, m, K, gs, s, G, y, N, n); break;
      case 2: t2_rows<2>(p, xq, xs, qsum, m, K, gs, s, G, y, N, n); break;
      case 1: t2_rows<1>(p, xq, xs, qsum, m, K, gs, s, G, y, N, n); break;
      default: break;
    }
  }
}


// W8A8 input rounding (lowbit_kern.h quant_w8): vdivps (IEEE, as torch's division), clamp,
// vcvtps2dq (round half to even under the default MXCSR), the tail through masked loads.
void quant_w8(const float* x, int64_t K, int64_t Kp, const float* s_in, int64_t m0, int64_t m1,
              int8_t* xq, float* sx, int32_t* qsum) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float sc;
    if (s_in) {
      sc = *s_in;
    } else {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
        a = _mm512_max_ps(a, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + k)));   // (a NaN row is NaN anyway)
      }
      const float amax = _mm512_reduce_max_ps(a);
      sc = amax > 0.f ? amax / 127.f : 1.f;
    }
    const __m512 sv = _mm512_set1_ps(sc), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
    __m512i qs = _mm512_setzero_si512();
    __mmask16 nan = 0;
    int8_t* qr = xq + m * Kp;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      const __m512 dv = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), sv);
      nan |= _mm512_cmp_ps_mask(dv, dv, _CMP_UNORD_Q);
      const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(dv, lo), hi));
      qs = _mm512_add_epi32(qs, _mm512_maskz_mov_epi32(mk, q));
      _mm_mask_storeu_epi8(qr + k, mk, _mm512_cvtsepi32_epi8(q));
    }
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
    // an inf x under a dynamic scale: amax = inf (the abs max skips NaN only), inf / inf = NaN
    if (!s_in && !(sc <= 3.4028234663852886e38f)) nan = 1;
    qsum[m] = _mm512_reduce_add_epi32(qs);
    sx[m] = nan ? __builtin_nanf("") : sc;
  }
}

// W8A8 int32 sums (lowbit_kern.h dot_u8s8): an R-row x C-token register tile over the whole row.
// VNNI: vpdpbusd takes the u8 codes and s8 activations as they are (4 products per int32 lane,
// exact). Without VNNI, both widen to int16 (vpmovzxbw / vpmovsxbw) for vpmaddwd: exact for every
// code and activation, -128 included (vpmaddubsw's int16 pair sums would saturate on u8 x s8).
// The first token tile of a row panel prefetches the rows LOWBIT_PF_BYTES ahead; later tiles find
// the panel in L1.
template <int R, int C, bool PF>
inline void w8_tile(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                    int64_t n, int64_t m, int64_t pf) {
  const uint8_t* p[R];
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r) {
    p[r] = codes + (n + r) * K;
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
#if LOWBIT_VNNI
    __m512i w[R];
    for (int r = 0; r < R; ++r) {
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + k), _MM_HINT_T0);
      w[r] = _mm512_loadu_si512(p[r] + k);
    }
    for (int c = 0; c < C; ++c) {
      const __m512i q = _mm512_loadu_si512(xq + (m + c) * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], w[r], q);
    }
#else
    for (int h = 0; h < 64; h += 32) {
      __m512i w[R];
      for (int r = 0; r < R; ++r) {
        if (PF && !h) _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + k), _MM_HINT_T0);
        w[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r] + k + h)));
      }
      for (int c = 0; c < C; ++c) {
        const __m512i q = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m + c) * K + k + h)));
        for (int r = 0; r < R; ++r) acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(w[r], q));
      }
    }
#endif
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[(m + c) * N + n + r] = _mm512_reduce_add_epi32(acc[r][c]);
}

#if LOWBIT_VNNI
// acc += u8 w . s8 x in place. GCC 12 compiles _mm512_dpbusd_epi32(acc, w, x) on a register tile
// into a copy of every accumulator each step (the tied operand); the asm keeps them in place.
#define LOWBIT_DPBUSD(acc, w, x) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))

// sums of 4 vectors of 16 int32 -> one 128-bit lane each: [sum a, sum b, sum c, sum d]
inline __m128i hsum4_i32(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// the 4-row x 4-token tile, accumulators named (16 zmm) so they stay in registers
template <bool PF>
inline void w8_tile44(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                      int64_t n, int64_t m, int64_t pf) {
  const uint8_t *p0 = codes + n * K, *p1 = p0 + K, *p2 = p1 + K, *p3 = p2 + K;
  const int8_t *q0 = xq + m * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
          a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  for (int64_t k = 0; k < K; k += 64) {
    if (PF) {
      _mm_prefetch(reinterpret_cast<const char*>(p0 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p2 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p3 + pf + k), _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_loadu_si512(p0 + k), w1 = _mm512_loadu_si512(p1 + k),
                  w2 = _mm512_loadu_si512(p2 + k), w3 = _mm512_loadu_si512(p3 + k);
    __m512i x = _mm512_loadu_si512(q0 + k);
    LOWBIT_DPBUSD(a00, w0, x); LOWBIT_DPBUSD(a10, w1, x); LOWBIT_DPBUSD(a20, w2, x); LOWBIT_DPBUSD(a30, w3, x);
    x = _mm512_loadu_si512(q1 + k);
    LOWBIT_DPBUSD(a01, w0, x); LOWBIT_DPBUSD(a11, w1, x); LOWBIT_DPBUSD(a21, w2, x); LOWBIT_DPBUSD(a31, w3, x);
    x = _mm512_loadu_si512(q2 + k);
    LOWBIT_DPBUSD(a02, w0, x); LOWBIT_DPBUSD(a12, w1, x); LOWBIT_DPBUSD(a22, w2, x); LOWBIT_DPBUSD(a32, w3, x);
    x = _mm512_loadu_si512(q3 + k);
    LOWBIT_DPBUSD(a03, w0, x); LOWBIT_DPBUSD(a13, w1, x); LOWBIT_DPBUSD(a23, w2, x); LOWBIT_DPBUSD(a33, w3, x);
  }
  // token c's 4 outputs (rows n..n+3) are contiguous in out
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (m + 0) * N + n), hsum4_i32(a00, a10, a20, a30));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (m + 1) * N + n), hsum4_i32(a01, a11, a21, a31));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (m + 2) * N + n), hsum4_i32(a02, a12, a22, a32));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (m + 3) * N + n), hsum4_i32(a03, a13, a23, a33));
}

// the 4-row x 1-token tile of decode, 2 accumulators per row (two 64-column halves of 128)
template <bool PF>
inline void w8_tile41(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                      int64_t n, int64_t m, int64_t pf) {
  const uint8_t *p0 = codes + n * K, *p1 = p0 + K, *p2 = p1 + K, *p3 = p2 + K;
  const int8_t* q0 = xq + m * K;
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    if (PF) {
      _mm_prefetch(reinterpret_cast<const char*>(p0 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p2 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p3 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p0 + pf + k + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + pf + k + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p2 + pf + k + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p3 + pf + k + 64), _MM_HINT_T0);
    }
    const __m512i x = _mm512_loadu_si512(q0 + k), y = _mm512_loadu_si512(q0 + k + 64);
    const __m512i w0 = _mm512_loadu_si512(p0 + k), w1 = _mm512_loadu_si512(p1 + k),
                  w2 = _mm512_loadu_si512(p2 + k), w3 = _mm512_loadu_si512(p3 + k);
    LOWBIT_DPBUSD(a0, w0, x); LOWBIT_DPBUSD(a1, w1, x); LOWBIT_DPBUSD(a2, w2, x); LOWBIT_DPBUSD(a3, w3, x);
    const __m512i v0 = _mm512_loadu_si512(p0 + k + 64), v1 = _mm512_loadu_si512(p1 + k + 64),
                  v2 = _mm512_loadu_si512(p2 + k + 64), v3 = _mm512_loadu_si512(p3 + k + 64);
    LOWBIT_DPBUSD(b0, v0, y); LOWBIT_DPBUSD(b1, v1, y); LOWBIT_DPBUSD(b2, v2, y); LOWBIT_DPBUSD(b3, v3, y);
  }
  if (k < K) {   // K % 128 == 64
    if (PF) {
      _mm_prefetch(reinterpret_cast<const char*>(p0 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p2 + pf + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p3 + pf + k), _MM_HINT_T0);
    }
    const __m512i x = _mm512_loadu_si512(q0 + k);
    const __m512i w0 = _mm512_loadu_si512(p0 + k), w1 = _mm512_loadu_si512(p1 + k),
                  w2 = _mm512_loadu_si512(p2 + k), w3 = _mm512_loadu_si512(p3 + k);
    LOWBIT_DPBUSD(a0, w0, x); LOWBIT_DPBUSD(a1, w1, x); LOWBIT_DPBUSD(a2, w2, x); LOWBIT_DPBUSD(a3, w3, x);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + m * N + n),
                   hsum4_i32(_mm512_add_epi32(a0, b0), _mm512_add_epi32(a1, b1), _mm512_add_epi32(a2, b2),
                             _mm512_add_epi32(a3, b3)));
}
#undef LOWBIT_DPBUSD
#endif

// 4-row panels: the named-register tiles where there is one (VNNI, 4 or 1 tokens)
template <int C, bool PF>
inline void w8_tile4(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                     int64_t n, int64_t m, int64_t pf) {
#if LOWBIT_VNNI
  if (C == 4) return w8_tile44<PF>(codes, xq, K, out, N, n, m, pf);
  if (C == 1) return w8_tile41<PF>(codes, xq, K, out, N, n, m, pf);
#endif
  w8_tile<4, C, PF>(codes, xq, K, out, N, n, m, pf);
}

// rows [nb, ne) against tokens [m, m + C): 4-row panels, then single rows
template <int C>
inline void w8_cols(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                    int64_t nb, int64_t ne, int64_t m, int64_t pf) {
  int64_t n = nb;
  // (the prefetch a template flag: a run-time test in the loop cost GCC its register allocation)
  if (pf) {
    for (; n + 4 <= ne; n += 4) w8_tile4<C, true>(codes, xq, K, out, N, n, m, pf);
    for (; n < ne; ++n) w8_tile<1, C, true>(codes, xq, K, out, N, n, m, pf);
  } else {
    for (; n + 4 <= ne; n += 4) w8_tile4<C, false>(codes, xq, K, out, N, n, m, 0);
    for (; n < ne; ++n) w8_tile<1, C, false>(codes, xq, K, out, N, n, m, 0);
  }
}

// Blocks of 16 weight rows (16 K bytes: L1-resident while every token tile passes over them), so
// the activations are read from L2 once per 16 rows, not once per 4-row panel.
void w8_dot(const uint8_t* codes, const int8_t* xq, int64_t M, int64_t K, int32_t* out,
            int64_t N, int64_t n0, int64_t n1) {
  const int64_t pf = pf_rows_ahead(K, 4);
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t ne = imin(n1, nb + 16);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) w8_cols<4>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf);
    switch (M - m) {
      case 3: w8_cols<3>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf); break;
      case 2: w8_cols<2>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf); break;
      case 1: w8_cols<1>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf); break;
      default: break;
    }
  }
}

#include "kern_attn_q8.h"
#include "kern_vq.h"

}  // namespace
}  // namespace lowbit

#include "kern_gemm_f32.h"   // needs dequant_q4 / dequant_u8 above
#include "kern_gemm_q8.h"    // needs gf32_tr8

namespace lowbit {

#if LOWBIT_VNNI
const KernTable kern_avx512vnni = {"avx512vnni", gemv_q4, gemv_u8, dequant_q4, dequant_u8, quant_q8,
                                   gemv_q8<true>, gemv_q8<false>, gemm_q4q8c_blk,
                                   kGemmMR, kGemmNR, gemm_pack_x, gemm_f32_q4, gemm_f32_u8, gemv_t2q8,
                                   w8_dot, quant_w8, kv_scores, kv_mix, vq_table, vq_gemv, LOWBIT_VQ_I16};
#else
const KernTable kern_avx512 = {"avx512", gemv_q4, gemv_u8, dequant_q4, dequant_u8, quant_q8,
                               gemv_q8<true>, gemv_q8<false>, gemm_q4q8c_blk,
                                   kGemmMR, kGemmNR, gemm_pack_x, gemm_f32_q4, gemm_f32_u8, gemv_t2q8,
                                   w8_dot, quant_w8, kv_scores, kv_mix, vq_table, vq_gemv, LOWBIT_VQ_I16};
#endif

}  // namespace lowbit
