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

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int kVqLanes = 16;
using VqVec = __m512;
inline VqVec vq_zero() { return _mm512_setzero_ps(); }
inline VqVec vq_load(const float* p) { return _mm512_loadu_ps(p); }
inline void vq_store(float* p, VqVec v) { _mm512_storeu_ps(p, v); }
inline VqVec vq_fma(VqVec a, VqVec b, VqVec c) { return _mm512_fmadd_ps(a, b, c); }
inline VqVec vq_gather_add(VqVec acc, const float* t, const uint8_t* idx) {   // 16 rows' entries
  const __m512i o = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)));
  return _mm512_add_ps(acc, _mm512_i32gather_ps(o, t, 4));
}
#else
constexpr int kVqLanes = 8;
using VqVec = __m256;
inline VqVec vq_zero() { return _mm256_setzero_ps(); }
inline VqVec vq_load(const float* p) { return _mm256_loadu_ps(p); }
inline void vq_store(float* p, VqVec v) { _mm256_storeu_ps(p, v); }
inline VqVec vq_fma(VqVec a, VqVec b, VqVec c) { return _mm256_fmadd_ps(a, b, c); }
inline VqVec vq_gather_add(VqVec acc, const float* t, const uint8_t* idx) {   // 8 rows' entries
  const __m256i o = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx)));
  return _mm256_add_ps(acc, _mm256_i32gather_ps(t, o, 4));
}
#endif

// R row blocks of kVqLanes rows at once (R gathers in flight per vector), groups [g0, g1)
template <int R>
void vq_rows(const float* T, const uint8_t* idxT, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
             const float* scaleT, float* y, int64_t n, int64_t g0, int64_t g1) {
  VqVec acc[R], ag[R];
  for (int r = 0; r < R; ++r) acc[r] = vq_load(y + n + r * kVqLanes);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < R; ++r) ag[r] = vq_zero();
    const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    for (int64_t v = g * vpg; v < ve; ++v)
      for (int r = 0; r < R; ++r) ag[r] = vq_gather_add(ag[r], T + v * Kc, idxT + v * N + n + r * kVqLanes);
    for (int r = 0; r < R; ++r) acc[r] = vq_fma(ag[r], vq_load(scaleT + g * N + n + r * kVqLanes), acc[r]);
  }
  for (int r = 0; r < R; ++r) vq_store(y + n + r * kVqLanes, acc[r]);
}
#endif

void vq_gemv(const float* T, const uint8_t* idxT, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
             const float* scaleT, float* y, int64_t n0, int64_t n1) {
  const int64_t G = (V + vpg - 1) / vpg;
  int64_t gpc = (32768 / (4 * Kc)) / vpg;
  if (gpc < 1) gpc = 1;
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += gpc) {
    const int64_t g1 = g0 + gpc < G ? g0 + gpc : G;
    int64_t n = n0;
#if defined(__AVX512F__) || defined(__AVX2__)
    for (; n + 2 * kVqLanes <= n1; n += 2 * kVqLanes) vq_rows<2>(T, idxT, V, N, Kc, vpg, scaleT, y, n, g0, g1);
    for (; n + kVqLanes <= n1; n += kVqLanes) vq_rows<1>(T, idxT, V, N, Kc, vpg, scaleT, y, n, g0, g1);
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
