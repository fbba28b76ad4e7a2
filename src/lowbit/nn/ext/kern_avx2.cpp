// AVX2 + FMA kernels (compiled -mavx2 -mfma only: runs on every x86-64 since Haswell / Zen 1).
//
// q4 fp32 GEMV, integer codes (lut = 0..15, the int formats): weights as (code - zero) in fp32,
// scaled once per group (gemv_q4_int below). Any other 16-entry table (NF4 / FP4 / ternary):
// a group's 16-entry folded table lg[c] = (lut[c] - zero) * scale lives in two
// ymm (entries 0-7, 8-15). vpermps looks up the low 3 bits of each int32 lane in both halves
// and vblendvps picks the half by bit 3 (shifted up into the sign bit):
//
//     codes (8 x int32)  ->  perm(lo, c), perm(hi, c), blend by (c << 28)  ->  8 weights
//
// q8 integer paths (ggml-style): 32 codes and 32 int8 activations per block,
//     vpmaddubsw (u8 x s8 -> 16 x int16 pair sums) then vpmaddwd by 1 (-> 8 x int32),
// exact in int32. The decode GEMV (gemv_q8) takes kern_q8_units.h's units: 4-bit codes two blocks
// per ymm (low nibbles = columns 0-15 of both, high = 16-31, activations stored to match), one
// FMA by the lanes' d per unit and one by scale_g per group, 4 weight rows per pass. 4-bit codes (<= 15) never
// saturate the int16 pair sums (2 * 15 * 127); 8-bit codes could (2 * 255 * 127), so they are
// biased to signed (c - 128) and multiplied with vpsignb's |c - 128| x sign-adjusted q
// (<= 2 * 128 * 127 = 32512), the 128 * sum(q) term moving into the per-group zero correction.
#include <immintrin.h>

#include "lowbit_kern.h"
#include "kern_q8_units.h"

#include <utility>

#ifndef LOWBIT_AVX2_ROWS
#define LOWBIT_AVX2_ROWS 4
#endif

namespace lowbit {
namespace {

constexpr int64_t kRun = 32;
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 packed bytes -> four 8-lane int32 code vectors, columns 0-7, 8-15, 16-23, 24-31
inline void unpack_q4_i32(const uint8_t* p, __m256i c[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  c[0] = _mm256_cvtepu8_epi32(lo);
  c[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
  c[2] = _mm256_cvtepu8_epi32(hi);
  c[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

inline __m256 lookup16(__m256 lo, __m256 hi, __m256i c) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

inline void folded_lut(const float* lut, float z, float s, __m256* lo, __m256* hi) {
  const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s);
  *lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut), zv), sv);
  *hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut + 8), zv), sv);
}

inline bool integer_lut(const float* lut) {
  for (int j = 0; j < 16; ++j)
    if (lut[j] != float(j)) return false;
  return true;
}

// int codes (lut = 0..15): per group acc = sum x * (code - zero), total += scale * acc, as the
// u8 kernel does. code - zero is exactly the reference's (lut[c] - zero); no table lookup, so
// 4 ops per 8 weights (vpmovzxbd, vcvtdq2ps, vsubps, vfmadd) with one on the shuffle port,
// against 7 (3 shuffles) for the table.
void gemv_q4_int(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
                 const float* scale, const float* zero, int64_t G,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rb = K / 2;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        const __m256 zv = _mm256_set1_ps(zero ? zero[n * G + g] : 0.f);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + LOWBIT_PF_BYTES), _MM_HINT_T0);
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2));
          const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
          const __m256 w0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), zv);
          const __m256 w1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), zv);
          const __m256 w2 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), zv);
          const __m256 w3 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), zv);
          a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + k), a0);
          a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + k + 8), a1);
          a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + k + 16), a0);
          a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + k + 24), a1);
        }
        const __m256 sv = _mm256_set1_ps(scale[n * G + g]);
        t0 = _mm256_fmadd_ps(sv, a0, t0);
        t1 = _mm256_fmadd_ps(sv, a1, t1);
      }
      y[m * N + n] = hsum(_mm256_add_ps(t0, t1));
    }
  }
}

void gemv_q4(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* lut, const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  if (integer_lut(lut)) return gemv_q4_int(codes, x, M, K, gs, scale, zero, G, y, N, n0, n1);
  const int64_t rb = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        __m256 lo, hi;
        folded_lut(lut, zero ? zero[n * G + g] : 0.f, scale[n * G + g], &lo, &hi);
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + LOWBIT_PF_BYTES), _MM_HINT_T0);
          __m256i c[4];
          unpack_q4_i32(p + k / 2, c);
          a0 = _mm256_fmadd_ps(lookup16(lo, hi, c[0]), _mm256_loadu_ps(xr + k), a0);
          a1 = _mm256_fmadd_ps(lookup16(lo, hi, c[1]), _mm256_loadu_ps(xr + k + 8), a1);
          a0 = _mm256_fmadd_ps(lookup16(lo, hi, c[2]), _mm256_loadu_ps(xr + k + 16), a0);
          a1 = _mm256_fmadd_ps(lookup16(lo, hi, c[3]), _mm256_loadu_ps(xr + k + 24), a1);
        }
      }
      y[m * N + n] = hsum(_mm256_add_ps(a0, a1));
    }
  }
}

inline __m256 u8x8_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 8-bit codes, fp32 activations: per group acc = sum x * (code - zero), total += scale * acc.
// R weight rows per pass share the activation loads and give 2R independent FMA chains; each
// row's line LOWBIT_PF_BYTES ahead (whole passes of R rows) is prefetched as its current one is
// read: with the hardware prefetcher alone the 151936 x 1536 lm_head streamed at 8 GB/s. Each
// row's sums run in the same order as one row alone (a0: columns k..k+7, a1: k+8..k+15, per 16).
template <int R>
inline void u8_rows(const uint8_t* codes, const float* xr, int64_t K, int64_t gs,
                    const float* scale, const float* zero, int64_t G, float* yr, int64_t n) {
  const int64_t pf = pf_rows_ahead(K, R);
  const uint8_t* p[R];
  __m256 t0[R], t1[R];
  for (int r = 0; r < R; ++r) p[r] = codes + (n + r) * K, t0[r] = t1[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    __m256 zv[R], a0[R], a1[R];
    for (int r = 0; r < R; ++r)
      zv[r] = _mm256_set1_ps(zero ? zero[(n + r) * G + g] : 0.f), a0[r] = a1[r] = _mm256_setzero_ps();
    const int64_t k1 = imin(K, k0 + gs);
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {   // by 32: one prefetch per 32 code bytes, no branch
      const __m256 x0 = _mm256_loadu_ps(xr + k), x1 = _mm256_loadu_ps(xr + k + 8);
      const __m256 x2 = _mm256_loadu_ps(xr + k + 16), x3 = _mm256_loadu_ps(xr + k + 24);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + k), _MM_HINT_T0);
        a0[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k), zv[r]), x0, a0[r]);
        a1[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k + 8), zv[r]), x1, a1[r]);
        a0[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k + 16), zv[r]), x2, a0[r]);
        a1[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k + 24), zv[r]), x3, a1[r]);
      }
    }
    for (; k < k1; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(xr + k), x1 = _mm256_loadu_ps(xr + k + 8);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k), zv[r]), x0, a0[r]);
        a1[r] = _mm256_fmadd_ps(_mm256_sub_ps(u8x8_ps(p[r] + k + 8), zv[r]), x1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(scale[(n + r) * G + g]);
      t0[r] = _mm256_fmadd_ps(sv, a0[r], t0[r]);
      t1[r] = _mm256_fmadd_ps(sv, a1[r], t1[r]);
    }
  }
  for (int r = 0; r < R; ++r) yr[n + r] = hsum(_mm256_add_ps(t0[r], t1[r]));
}

void gemv_u8(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = LOWBIT_AVX2_ROWS;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    for (int64_t m = 0; m < M; ++m) u8_rows<R>(codes, x + m * K, K, gs, scale, zero, G, y + m * N, n);
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
      __m256 lo, hi;
      folded_lut(lut, zero ? zero[n * G + g] : 0.f, scale[n * G + g], &lo, &hi);
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); k += kRun) {
        __m256i c[4];
        unpack_q4_i32(p + k / 2, c);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + (k - kbeg) + 8 * i, lookup16(lo, hi, c[i]));
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
      const __m256 zv = _mm256_set1_ps(zero ? zero[n * G + g] : 0.f), sv = _mm256_set1_ps(scale[n * G + g]);
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); k += 8)
        _mm256_storeu_ps(o + (k - kbeg), _mm256_mul_ps(_mm256_sub_ps(u8x8_ps(p + k), zv), sv));
    }
  }
}

void quant_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* d, int32_t* qsum) {
  const int64_t nb = K / kRun;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kRun;
      __m256 v[4], mx = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
        poison = _mm256_add_ps(poison, _mm256_mul_ps(v[i], _mm256_setzero_ps()));  // NaN iff NaN/inf
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
      const __m256 iv = _mm256_set1_ps(id);
      __m256i q[4];  // cvtps rounds to nearest even (default MXCSR), as nearbyint does
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
      // qsum from the int32 lanes (before packing)
      const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      // pack 32 x int32 -> 32 x int8; packs work per 128-bit lane, vpermd restores column order
      const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      const __m256i ord = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kRun), ord);
      float pz[8];
      _mm256_storeu_ps(pz, poison);
      float pt = 0.f;
      for (int i = 0; i < 8; ++i) pt += pz[i];
      d[m * nb + b] = pt == 0.f ? db : __builtin_nanf("");
      qsum[m * nb + b] = _mm_cvtsi128_si32(s);
    }
}

// 16 packed bytes -> 32 u8 codes in column order (low nibbles = cols 0-15, high = 16-31)
inline __m256i unpack_q4_u8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                 _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
}

// 2 runs of 4-bit codes (32 bytes, kern_q8_units.h's interleaved unit): low nibbles = columns
// 0-15 of both blocks, high = 16-31, against 64 interleaved activations -> 8 int32 lanes, 4 per
// block. The two planes' pair sums add up in int16 exactly (2 * 2 * 15 * 127).
inline __m256i dot_q4_pair(const uint8_t* p, const int8_t* q) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, q0), _mm256_maddubs_epi16(hi, q1)),
                           _mm256_set1_epi16(1));
}

// one block in column order -> 8 int32 lanes (q4, or 8-bit codes biased to signed, see above)
template <bool Q4>
inline __m256i dot_block(const uint8_t* p, const int8_t* q) {
  const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  __m256i p16;
  if (Q4) {
    p16 = _mm256_maddubs_epi16(unpack_q4_u8(p), qv);
  } else {
    const __m256i c = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                       _mm256_set1_epi8(static_cast<char>(0x80)));
    p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(qv, c));
  }
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// q8 decode GEMV: per group, units of kern_q8_units.h (q4: interleaved pairs, then a single;
// u8: single blocks), each unit's int32 lanes converted and multiplied by its lanes' d (dv)
// into a group accumulator, which the group scale then weighs. R weight rows per pass share the
// activation and dv loads and give R independent chains; each row's next-R-rows line is
// prefetched as its current one is read (a row of 1536 4-bit codes is 12 lines: the hardware
// prefetcher alone left the loop at a third of the bandwidth).
template <bool Q4, int R>
inline void q8_rows(const uint8_t* codes, const Q8Units& u, int64_t m, const float* xs, int64_t K,
                    const float* scale, const float* zero, int64_t G, float zoff, float* y, int64_t N,
                    int64_t n) {
  const int64_t rb = Q4 ? K / 2 : K, step = Q4 ? 2 : 1;
  const int8_t* q = u.xp.data() + m * K;
  const float* v = u.dv.data() + m * u.units * 8;
  const int64_t pf = pf_rows_ahead(rb, R);
  const uint8_t* p[R];
  __m256 t[R];
  for (int r = 0; r < R; ++r) p[r] = codes + (n + r) * rb, t[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < u.groups; ++g) {
    int64_t b = u.gb[g];
    const int64_t b1 = u.gb[g + 1];
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    for (; b + step <= b1; b += step, v += 8) {
      const __m256 dq = _mm256_loadu_ps(v);
      for (int r = 0; r < R; ++r) {
        const uint8_t* c = p[r] + b * (Q4 ? 16 : kRun);
        _mm_prefetch(reinterpret_cast<const char*>(c + pf), _MM_HINT_T0);
        const __m256i pi = Q4 ? dot_q4_pair(c, q + b * kRun) : dot_block<false>(c, q + b * kRun);
        a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi), dq, a[r]);
      }
    }
    if (b < b1) {  // q4: the group's odd block, in column order
      const __m256 dq = _mm256_loadu_ps(v);
      for (int r = 0; r < R; ++r)
        a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block<true>(p[r] + b * 16, q + b * kRun)), dq, a[r]);
      v += 8;
    }
    for (int r = 0; r < R; ++r) t[r] = _mm256_fmadd_ps(a[r], _mm256_set1_ps(scale[(n + r) * G + g]), t[r]);
  }
  for (int r = 0; r < R; ++r) {
    float acc = hsum(t[r]);
    if (zero || zoff != 0.f) {
      const float* s = scale + (n + r) * G;
      const float* z = zero ? zero + (n + r) * G : nullptr;
      __m256 za = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= G; g += 8) {
        const __m256 zz = z ? _mm256_loadu_ps(z + g) : _mm256_setzero_ps();
        za = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_sub_ps(zz, _mm256_set1_ps(zoff))),
                             _mm256_loadu_ps(xs + m * G + g), za);
      }
      acc -= hsum(za);
      for (; g < G; ++g) acc -= s[g] * ((z ? z[g] : 0.f) - zoff) * xs[m * G + g];
    }
    y[m * N + n + r] = acc;
  }
}

template <bool Q4>
void gemv_q8(const uint8_t* codes, const int8_t* xq, const float* d, const float* xs,
             const int32_t* bgrp, int64_t M, int64_t K, const float* scale, const float* zero,
             int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  // the u8 path computes sum (c - 128) q, so its zero correction uses zero - 128
  const float zoff = Q4 ? 0.f : 128.f;
  static constexpr int kq4[3] = {2, 1, 0}, ku8[3] = {1, 0, 0};
  const Q8Units u(xq, d, bgrp, M, K, 8, Q4 ? kq4 : ku8, Q4 ? 2 : 0);
  constexpr int R = LOWBIT_AVX2_ROWS;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    for (int64_t m = 0; m < M; ++m) q8_rows<Q4, R>(codes, u, m, xs, K, scale, zero, G, zoff, y, N, n);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) q8_rows<Q4, 1>(codes, u, m, xs, K, scale, zero, G, zoff, y, N, n);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ternary t2x64 on per-token int8 activations, R tokens per pass over a weight row. One 16-byte
// run broadcast to both lanes, shifted by (0 | 2) and (4 | 6) per 128-bit lane and masked: 2 x 32
// codes in column order. vpmaddubsw pair sums are <= 2 * 2 * 128 = 512, so 2 per run and 16 runs
// add up in int16 exactly (16 * 1024 < 32767) before one vpmaddwd to int32.
template <int R>
inline void t2_rows(const uint8_t* p, const int8_t* xq, const float* xs, const int32_t* qsum,
                    int64_t m0, int64_t K, int64_t gs, const float* s, int64_t G,
                    float* y, int64_t N, int64_t n) {
  const __m256i sh_lo = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), sh_hi = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
  const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  float tot[R];
  for (int r = 0; r < R; ++r) tot[r] = 0.f;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const int64_t k1 = imin(K, k0 + gs);
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t kc = k0; kc < k1; kc += 16 * 64) {
      const int64_t ke = imin(k1, kc + 16 * 64);
      __m256i a16[R];
      for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
      for (int64_t k = kc; k < ke; k += 64) {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 4)));
        const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(b, sh_lo), m3);
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(b, sh_hi), m3);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = xq + (m0 + r) * K + k;
          const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
          const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
          a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, q0), _mm256_maddubs_epi16(hi, q1)));
        }
      }
      for (int r = 0; r < R; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a16[r], ones));
    }
    for (int r = 0; r < R; ++r)
      tot[r] += s[g] * static_cast<float>(hsum_i32(acc[r]) - qsum[(m0 + r) * G + g]);
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
// vcvtps2dq (round half to even under the default MXCSR); the last K % 8 columns scalar.
void quant_w8(const float* x, int64_t K, int64_t Kp, const float* s_in, int64_t m0, int64_t m1,
              int8_t* xq, float* sx, int32_t* qsum) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t K8 = K / 8 * 8;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float sc;
    if (s_in) {
      sc = *s_in;
    } else {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) a = _mm256_max_ps(a, _mm256_and_ps(_mm256_loadu_ps(xr + k), absm));
      alignas(32) float t[8];
      _mm256_store_ps(t, a);
      float amax = 0.f;
      for (int j = 0; j < 8; ++j) amax = t[j] > amax ? t[j] : amax;
      for (int64_t k = K8; k < K; ++k) {
        const float v = xr[k] < 0.f ? -xr[k] : xr[k];
        amax = v > amax ? v : amax;
      }
      sc = amax > 0.f ? amax / 127.f : 1.f;
    }
    const __m256 sv = _mm256_set1_ps(sc), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
    __m256i qs = _mm256_setzero_si256();
    int nan = 0;
    int8_t* qr = xq + m * Kp;
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 dv = _mm256_div_ps(_mm256_loadu_ps(xr + k), sv);
      nan |= _mm256_movemask_ps(_mm256_cmp_ps(dv, dv, _CMP_UNORD_Q));
      const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(dv, lo), hi));
      qs = _mm256_add_epi32(qs, q);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), _mm_packs_epi16(w, w));
    }
    bool nan1 = false;
    int32_t tail = 0;
    for (int64_t k = K8; k < K; ++k) tail += (qr[k] = static_cast<int8_t>(w8_round1(xr[k], sc, &nan1)));
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
    if (!s_in && !(sc <= 3.4028234663852886e38f)) nan = 1;
    qsum[m] = hsum_i32(qs) + tail;
    sx[m] = (nan || nan1) ? __builtin_nanf("") : sc;
  }
}

// W8A8 int32 sums (lowbit_kern.h dot_u8s8): codes and activations widened to int16 (vpmovzxbw /
// vpmovsxbw) for vpmaddwd, exact for every u8 code and s8 activation (-128 included; vpmaddubsw's
// int16 pair sums would saturate on u8 x s8). An R-row x C-token register tile (4 x 2: 8
// accumulators, 4 weight vectors and one activation of the 16 ymm registers); the first token
// tile of a panel prefetches the rows LOWBIT_PF_BYTES ahead.
template <int R, int C, bool PF>
inline void w8_tile(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                    int64_t n, int64_t m, int64_t pf) {
  const uint8_t* p[R];
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r) {
    p[r] = codes + (n + r) * K;
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  }
  for (int64_t k = 0; k < K; k += 16) {
    __m256i w[R];
    for (int r = 0; r < R; ++r) {
      if (PF && !(k & 63)) _mm_prefetch(reinterpret_cast<const char*>(p[r] + pf + k), _MM_HINT_T0);
      w[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + k)));
    }
    for (int c = 0; c < C; ++c) {
      const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + (m + c) * K + k)));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(w[r], q));
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[(m + c) * N + n + r] = hsum_i32(acc[r][c]);
}

// rows [nb, ne) against tokens [m, m + C): 4-row panels, then single rows
template <int C>
inline void w8_cols(const uint8_t* codes, const int8_t* xq, int64_t K, int32_t* out, int64_t N,
                    int64_t nb, int64_t ne, int64_t m, int64_t pf) {
  int64_t n = nb;
  // (the prefetch a template flag: a run-time test in the loop cost GCC its register allocation)
  if (pf) {
    for (; n + 4 <= ne; n += 4) w8_tile<4, C, true>(codes, xq, K, out, N, n, m, pf);
    for (; n < ne; ++n) w8_tile<1, C, true>(codes, xq, K, out, N, n, m, pf);
  } else {
    for (; n + 4 <= ne; n += 4) w8_tile<4, C, false>(codes, xq, K, out, N, n, m, 0);
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
    for (; m + 2 <= M; m += 2) w8_cols<2>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf);
    if (m < M) w8_cols<1>(codes, xq, K, out, N, nb, ne, m, m ? 0 : pf);
  }
}

#include "kern_attn_q8.h"
#include "kern_vq.h"

}  // namespace
}  // namespace lowbit

#include "kern_gemm_f32.h"   // needs dequant_q4 / dequant_u8 above
#include "kern_gemm_q8.h"    // needs gf32_tr8

namespace lowbit {

const KernTable kern_avx2 = {"avx2", gemv_q4, gemv_u8, dequant_q4, dequant_u8, quant_q8,
                             gemv_q8<true>, gemv_q8<false>, gemm_q4q8c_blk,
                                   kGemmMR, kGemmNR, gemm_pack_x, gemm_f32_q4, gemm_f32_u8, gemv_t2q8,
                                   w8_dot, quant_w8, kv_scores, kv_mix, vq_table, vq_gemv, LOWBIT_VQ_I16};

}  // namespace lowbit
