// Vector-codebook GEMV by table lookup (nn/vq.py VQLinear, numerics/vq.py VQWeight), included by
// every ISA file (kern_*.cpp) inside its own namespace, so each gets the loops for its target:
// AVX-512 and AVX2 gather 16 / 8 table entries at a time (one per output row), the portable
// variant adds one by one.
//
// A weight row n is V indices into a codebook of Kc codewords of d floats (uint8, Kc <= 256),
// vector v in scale group v / vpg:  W[n, v d + k] = scale[n, v / vpg] * cb[cbv(v), idx[n, v], k].
// The kernel reads the indices and scales transposed, idxT (V, N) and scaleT (G, N), so that the
// lanes of one gather are 16 / 8 consecutive rows at the same vector v, and the table slice of v
// (Kc floats) stays in L1 while every row block reads it.
//
//   vq_table:  T[v Kc + c] = sum_k cbT[(v / vpc) d Kc + k Kc + c] * x[v d + k]   for v in [v0, v1)
//              (cbT: the codebooks transposed to (n, d, Kc), so the sum over c is contiguous)
//   vq_gemv:   y[n] = sum_g scaleT[g, n] * sum_{v in g} T[v Kc + idxT[v, n]]     for n in [n0, n1)
//              groups taken in chunks whose table slices fit ~32 KB, y accumulated per chunk
//
// The float weight is never formed: per d weights, one byte is read and one table entry added.
// Summation order: per group, then over groups in order; the variants agree to float rounding.

void vq_table(const float* x, const float* cbT, int64_t Kc, int64_t d, int64_t vpc, int64_t v0, int64_t v1,
              float* T) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* xv = x + v * d;
    const float* c = cbT + (v / vpc) * d * Kc;
    float* t = T + v * Kc;
    for (int64_t j = 0; j < Kc; ++j) t[j] = c[j] * xv[0];
    for (int64_t k = 1; k < d; ++k) {
      const float xk = xv[k];
      const float* ck = c + k * Kc;
      for (int64_t j = 0; j < Kc; ++j) t[j] += ck[j] * xk;
    }
  }
}

void vq_gemv(const float* T, const uint8_t* idxT, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
             const float* scaleT, float* y, int64_t n0, int64_t n1) {
  const int64_t G = (V + vpg - 1) / vpg;
  int64_t gpc = (32768 / (4 * Kc)) / vpg;
  if (gpc < 1) gpc = 1;
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += gpc) {
    const int64_t g1 = g0 + gpc < G ? g0 + gpc : G;
    int64_t n = n0;
#if defined(__AVX512F__)
    for (; n + 32 <= n1; n += 32) {        // two row blocks: two gathers in flight per vector
      __m512 acc0 = _mm512_loadu_ps(y + n), acc1 = _mm512_loadu_ps(y + n + 16);
      for (int64_t g = g0; g < g1; ++g) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idxT + v * N + n));
          const __m512i o0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b));
          const __m512i o1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1));
          a0 = _mm512_add_ps(a0, _mm512_i32gather_ps(o0, T + v * Kc, 4));
          a1 = _mm512_add_ps(a1, _mm512_i32gather_ps(o1, T + v * Kc, 4));
        }
        acc0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(scaleT + g * N + n), acc0);
        acc1 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(scaleT + g * N + n + 16), acc1);
      }
      _mm512_storeu_ps(y + n, acc0);
      _mm512_storeu_ps(y + n + 16, acc1);
    }
    for (; n + 16 <= n1; n += 16) {
      __m512 acc = _mm512_loadu_ps(y + n);
      for (int64_t g = g0; g < g1; ++g) {
        __m512 ag = _mm512_setzero_ps();
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) {
          const __m512i o = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idxT + v * N + n)));
          ag = _mm512_add_ps(ag, _mm512_i32gather_ps(o, T + v * Kc, 4));
        }
        acc = _mm512_fmadd_ps(ag, _mm512_loadu_ps(scaleT + g * N + n), acc);
      }
      _mm512_storeu_ps(y + n, acc);
    }
#elif defined(__AVX2__)
    for (; n + 16 <= n1; n += 16) {        // two row blocks: two gathers in flight per vector
      __m256 acc0 = _mm256_loadu_ps(y + n), acc1 = _mm256_loadu_ps(y + n + 8);
      for (int64_t g = g0; g < g1; ++g) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idxT + v * N + n));
          a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(T + v * Kc, _mm256_cvtepu8_epi32(b), 4));
          a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(T + v * Kc, _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), 4));
        }
        acc0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(scaleT + g * N + n), acc0);
        acc1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(scaleT + g * N + n + 8), acc1);
      }
      _mm256_storeu_ps(y + n, acc0);
      _mm256_storeu_ps(y + n + 8, acc1);
    }
    for (; n + 8 <= n1; n += 8) {
      __m256 acc = _mm256_loadu_ps(y + n);
      for (int64_t g = g0; g < g1; ++g) {
        __m256 ag = _mm256_setzero_ps();
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) {
          const __m256i o = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idxT + v * N + n)));
          ag = _mm256_add_ps(ag, _mm256_i32gather_ps(T + v * Kc, o, 4));
        }
        acc = _mm256_fmadd_ps(ag, _mm256_loadu_ps(scaleT + g * N + n), acc);
      }
      _mm256_storeu_ps(y + n, acc);
    }
#endif
    for (; n < n1; ++n) {
      float acc = y[n];
      for (int64_t g = g0; g < g1; ++g) {
        float ag = 0.f;
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) ag += T[v * Kc + idxT[v * N + n]];
        acc += ag * scaleT[g * N + n];
      }
      y[n] = acc;
    }
  }
}
