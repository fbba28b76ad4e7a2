// Vector-codebook GEMV by table lookup (nn/vq.py VQLinear, numerics/vq.py VQWeight), included by
// every ISA file (kern_*.cpp) inside its own namespace, so each gets the loops for its target:
// AVX-512 and AVX2 gather 16 / 8 table entries at a time, the portable variant adds one by one.
//
// A weight row n is V indices into a codebook of Kc codewords of d floats (idx uint8, Kc <= 256),
// vector v in scale group v / vpg:  W[n, v d + k] = scale[n, v / vpg] * cb[cbv(v), idx[n, v], k].
//
//   vq_table:  T[v Kc + c] = sum_k cb[(v / vpc) Kc d + c d + k] * x[v d + k]     for v in [v0, v1)
//   vq_gemv:   y[n] = sum_v scale[n, vgrp[v]] * T[voff[v] + idx[n, v]]           for n in [n0, n1)
//              (voff[v] = v Kc, vgrp[v] = v / vpg: precomputed by the caller, shared by all rows)
//
// The float weight is never formed: per d weights, one byte is read and one table entry added.
// Summation order: lanes of 16 (AVX-512) / 8 (AVX2) / 1 (portable) vectors, then the lanes;
// the variants agree to float rounding, not bit for bit.

void vq_table(const float* x, const float* cb, int64_t Kc, int64_t d, int64_t vpc, int64_t v0, int64_t v1,
              float* T) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* xv = x + v * d;
    const float* c = cb + (v / vpc) * Kc * d;
    float* t = T + v * Kc;
    if (d == 4) {
      const float x0 = xv[0], x1 = xv[1], x2 = xv[2], x3 = xv[3];
      for (int64_t j = 0; j < Kc; ++j)
        t[j] = c[4 * j] * x0 + c[4 * j + 1] * x1 + c[4 * j + 2] * x2 + c[4 * j + 3] * x3;
    } else {
      for (int64_t j = 0; j < Kc; ++j) {
        float acc = 0.f;
        for (int64_t k = 0; k < d; ++k) acc += c[j * d + k] * xv[k];
        t[j] = acc;
      }
    }
  }
}

void vq_gemv(const float* T, const uint8_t* idx, int64_t V, const int32_t* voff, const int32_t* vgrp,
             const float* scale, int64_t G, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* ir = idx + n * V;
    const float* sr = scale + n * G;
    int64_t v = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; v + 16 <= V; v += 16) {
      const __m512i o = _mm512_add_epi32(
          _mm512_loadu_si512(reinterpret_cast<const void*>(voff + v)),
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ir + v))));
      const __m512 t = _mm512_i32gather_ps(o, T, 4);
      const __m512 s = _mm512_i32gather_ps(_mm512_loadu_si512(reinterpret_cast<const void*>(vgrp + v)), sr, 4);
      acc = _mm512_fmadd_ps(t, s, acc);
    }
    float out = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; v + 8 <= V; v += 8) {
      const __m256i o = _mm256_add_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(voff + v)),
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ir + v))));
      const __m256 t = _mm256_i32gather_ps(T, o, 4);
      const __m256 s = _mm256_i32gather_ps(sr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vgrp + v)), 4);
      acc = _mm256_fmadd_ps(t, s, acc);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float out = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
#else
    float out = 0.f;
#endif
    for (; v < V; ++v) out += sr[vgrp[v]] * T[voff[v] + ir[v]];
    y[n] = out;
  }
}
