// Vector-codebook GEMV by table lookup (nn/vq.py VQLinear, numerics/vq.py VQWeight), included by
// every ISA file (kern_*.cpp) inside its own namespace, so each gets the loops for its target:
// AVX-512 and AVX2 gather 16 / 8 table entries at a time (one per output row), the portable
// variant adds one by one.
//
// A weight row n is V indices into a codebook of Kc codewords of d floats (uint8, Kc <= 256),
// vector v in scale group v / vpg:  W[n, v d + k] = scale[n, v / vpg] * cb[cbv(v), idx[n, v], k].
// The kernel reads the indices in blocks of 64 rows, idxB (ceil(N / 64), V, 64) (lowbit_kern.h
// vq_idx), and the scales transposed, scaleT (G, N), so that the lanes of one gather are 16 / 8
// consecutive rows at the same vector v, a row block's indices are one contiguous stream, and the
// table slice of v (Kc floats) stays in L1 while every row block reads it.
//
//   vq_table:  T[v Kc + c] = sum_k cbT[(v / vpc) d Kc + k Kc + c] * x[v d + k]   for v in [v0, v1)
//              (cbT: the codebooks transposed to (n, d, Kc), so the sum over c is contiguous)
//   vq_gemv:   y[n] = sum_g scaleT[g, n] * sum_{v in g} T[v Kc + idx[n, v]]      for n in [n0, n1)
//              groups taken in chunks of ~16 vectors (vq_chunk_groups), y accumulated per chunk
//
// The float weight is never formed: per d weights, one byte is read and one table entry added.
// Summation order: per group, then over groups in order; the variants agree to float rounding.

// one vector's table row, the d products of each codeword summed in registers (one pass over t)
template <int D>
inline void vq_table_row(const float* c, const float* xv, int64_t Kc, float* t) {
  float xs[D];
  for (int k = 0; k < D; ++k) xs[k] = xv[k];
  for (int64_t j = 0; j < Kc; ++j) {
    float a = c[j] * xs[0];
    for (int k = 1; k < D; ++k) a += c[k * Kc + j] * xs[k];
    t[j] = a;
  }
}

#if defined(__AVX512F__)
constexpr int64_t kVqRowStep = 16;
template <int D>   // the same, 16 codewords per step, fused multiply-adds (Kc a multiple of 16)
inline void vq_table_rowv(const float* c, const float* xv, int64_t Kc, float* t) {
  __m512 xs[D];
  for (int k = 0; k < D; ++k) xs[k] = _mm512_set1_ps(xv[k]);
  for (int64_t j = 0; j < Kc; j += 16) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(c + j), xs[0]);
    for (int k = 1; k < D; ++k) a = _mm512_fmadd_ps(_mm512_loadu_ps(c + k * Kc + j), xs[k], a);
    _mm512_storeu_ps(t + j, a);
  }
}
#elif defined(__AVX2__)
constexpr int64_t kVqRowStep = 8;
template <int D>   // the same, 8 codewords per step (Kc a multiple of 8)
inline void vq_table_rowv(const float* c, const float* xv, int64_t Kc, float* t) {
  __m256 xs[D];
  for (int k = 0; k < D; ++k) xs[k] = _mm256_set1_ps(xv[k]);
  for (int64_t j = 0; j < Kc; j += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(c + j), xs[0]);
    for (int k = 1; k < D; ++k) a = _mm256_fmadd_ps(_mm256_loadu_ps(c + k * Kc + j), xs[k], a);
    _mm256_storeu_ps(t + j, a);
  }
}
#endif

void vq_table(const float* x, const float* cbT, int64_t Kc, int64_t d, int64_t vpc, int64_t v0, int64_t v1,
              float* T) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* xv = x + v * d;
    const float* c = cbT + (v / vpc) * d * Kc;
    float* t = T + v * Kc;
#if defined(__AVX512F__) || defined(__AVX2__)
    if (Kc % kVqRowStep == 0) {
      switch (d) {
        case 2: vq_table_rowv<2>(c, xv, Kc, t); continue;
        case 4: vq_table_rowv<4>(c, xv, Kc, t); continue;
        case 8: vq_table_rowv<8>(c, xv, Kc, t); continue;
        default: break;
      }
    }
#endif
    switch (d) {
      case 1: vq_table_row<1>(c, xv, Kc, t); continue;
      case 2: vq_table_row<2>(c, xv, Kc, t); continue;
      case 4: vq_table_row<4>(c, xv, Kc, t); continue;
      case 8: vq_table_row<8>(c, xv, Kc, t); continue;
      default: break;
    }
    for (int64_t j = 0; j < Kc; ++j) t[j] = c[j] * xv[0];
    for (int64_t k = 1; k < d; ++k) {
      const float xk = xv[k];
      const float* ck = c + k * Kc;
      for (int64_t j = 0; j < Kc; ++j) t[j] += ck[j] * xk;
    }
  }
}

// Scale groups per chunk of the row loops (every path): ~16 vectors, at least one group. With
// the transposed (V, N) index layout of before, a chunk of c vectors walked c strided streams, and
// the ~32 KB table chunks (128-256 vectors) made a layer not in cache (decode: every layer) take
// 1.5-2.5x its in-cache time; 16 vectors fixed most of it (SmolLM2's 3-bit gate projection: 170 ->
// 80 us on AVX2's shuffles). With the blocked layout (vq_idx) a chunk is one stream per row block,
// and 16 vectors still measured best on decode (64, 256 and all groups: 2-10% slower on AVX2).
inline int64_t vq_chunk_groups(int64_t vpg) { return 16 / vpg > 1 ? 16 / vpg : 1; }

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
void vq_rows(const float* T, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
             const float* scaleT, float* y, int64_t n, int64_t g0, int64_t g1) {
  VqVec acc[R], ag[R];
  for (int r = 0; r < R; ++r) acc[r] = vq_load(y + n + r * kVqLanes);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < R; ++r) ag[r] = vq_zero();
    const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    for (int64_t v = g * vpg; v < ve; ++v)
      for (int r = 0; r < R; ++r) ag[r] = vq_gather_add(ag[r], T + v * Kc, vq_idx(idxB, V, v, n + r * kVqLanes));
    for (int r = 0; r < R; ++r) acc[r] = vq_fma(ag[r], vq_load(scaleT + g * N + n + r * kVqLanes), acc[r]);
  }
  for (int r = 0; r < R; ++r) vq_store(y + n + r * kVqLanes, acc[r]);
}
#endif

void vq_gemv(const float* T, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
             const float* scaleT, float* y, int64_t n0, int64_t n1) {
  const int64_t G = (V + vpg - 1) / vpg;
  const int64_t gpc = vq_chunk_groups(vpg);
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += gpc) {
    const int64_t g1 = g0 + gpc < G ? g0 + gpc : G;
    int64_t n = n0;
#if defined(__AVX512F__) || defined(__AVX2__)
    for (; n + 2 * kVqLanes <= n1; n += 2 * kVqLanes) vq_rows<2>(T, idxB, V, N, Kc, vpg, scaleT, y, n, g0, g1);
    for (; n + kVqLanes <= n1; n += kVqLanes) vq_rows<1>(T, idxB, V, N, Kc, vpg, scaleT, y, n, g0, g1);
#endif
    for (; n < n1; ++n) {
      float acc = y[n];
      for (int64_t g = g0; g < g1; ++g) {
        float ag = 0.f;
        const int64_t ve = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t v = g * vpg; v < ve; ++v) ag += T[v * Kc + *vq_idx(idxB, V, v, n)];
        acc += ag * scaleT[g * N + n];
      }
      y[n] = acc;
    }
  }
}

// vq_qtable's shared steps (every variant that has one). The step of a group of max|T| = m:
// returns inv = 32767 / m capped at FLT_MAX (max|T| below ~1e-34 would make it inf, and every q 0),
// and sets *ts = 1 / inv, so q ts stays within ts / 2 of T whichever step is taken; |T inv| <= 32767,
// so q fits 16 bits without a clamp.
inline float vq_inv_step(float m, float* ts) {
  const float iv = m > 0.f ? (32767.f / m < 3.4028235e38f ? 32767.f / m : 3.4028235e38f) : 0.f;
  *ts = m > 0.f ? 1.f / iv : 1.f;
  return iv;
}

// a group whose table holds NaN or inf: its planes zero, and its step NaN (returned), so its rows'
// outputs are NaN
inline float vq_bad_group(int8_t* Tq, int64_t KP, int64_t va, int64_t vb) {
  for (int64_t i = va * 2 * KP; i < vb * 2 * KP; ++i) Tq[i] = 0;
  return __builtin_nanf("");
}

// ---- 16-bit tables on byte permutes (AVX-512 VBMI + VNNI) -----------------------------------------
// The table of each scale group g is rounded to int16 with one step ts[g] = max|T over g| / 32767
// (at least 1 / FLT_MAX)
// and split into two byte planes, q = 256 hi + lo (hi signed, lo unsigned), each looked up by a
// byte permute of 64 rows' indices at once (vpermb: 64 entries, vpermi2b: 128, two of them and a
// blend on the top index bit: 256), where the float path gathers 16 entries per instruction. The
// planes' partial sums over at most 256 vectors and their recombination are exact in int32:
//
//   Tq[v 2KP + c] = hi, Tq[v 2KP + KP + c] = lo of round(T[v Kc + c] / ts[g]) for c < Kc,
//                   0 up to KP = vq_table_width(Kc) (64 | 128 | 256 >= Kc)
//   y[n]          = sum_g scaleT[g, n] ts[g] sum_{v in g} q[v, idx[n, v]]
//
// so |y - y_f32| <= sum_g |scaleT[g, n]| ts[g] / 2 per vector of g (plus float rounding): 15 bits
// of the table's range, where int8 tables (7 bits) moved the bundled model's decode by KL 2e-2.
// A group whose table holds NaN or inf gets ts = NaN: its rows' outputs are NaN, never a number.
#if defined(__AVX512F__)
void vq_qtable(const float* T, int64_t V, int64_t Kc, int64_t vpg, int64_t g0, int64_t g1, int8_t* Tq,
               float* ts) {
  const int64_t KP = vq_table_width(Kc);
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t va = g * vpg, vb = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    const float* t = T + va * Kc;
    const int64_t n = (vb - va) * Kc;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(t + i));
      bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);            // NaN or inf
      mx = _mm512_max_ps(mx, a);
    }
    if (i < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, t + i));
      bad |= _mm512_mask_cmp_ps_mask(k, a, inf, _CMP_NLT_UQ);
      mx = _mm512_max_ps(mx, a);
    }
    const float m = _mm512_reduce_max_ps(mx);
    if (bad) {
      ts[g] = vq_bad_group(Tq, KP, va, vb);
      continue;
    }
    const float iv = vq_inv_step(m, ts + g);
    const __m512 inv = _mm512_set1_ps(iv);
    for (int64_t v = va; v < vb; ++v) {
      const float* tv = T + v * Kc;
      int8_t* hi = Tq + v * 2 * KP;
      int8_t* lo = hi + KP;
      // |T| <= m, so |T 32767 / m| rounds to at most 32767: q fits 16 bits without a clamp;
      // vpmovdb truncates, keeping the low byte (lo) and the in-range hi
      int64_t c = 0;
      for (; c + 16 <= Kc; c += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(tv + c), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + c), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + c), _mm512_cvtepi32_epi8(q));
      }
      if (c < Kc) {
        const __mmask16 k = static_cast<__mmask16>((1u << (Kc - c)) - 1);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, tv + c), inv));
        _mm512_mask_cvtepi32_storeu_epi8(hi + c, k, _mm512_srai_epi32(q, 8));
        _mm512_mask_cvtepi32_storeu_epi8(lo + c, k, q);
      }
      for (int64_t c = Kc; c < KP; ++c) hi[c] = lo[c] = 0;
    }
  }
}

#define LOWBIT_VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi,avx512vnni")))

template <int KP>
LOWBIT_VBMI inline __m512i vq_look(const int8_t* tv, __m512i idx) {   // 64 rows' bytes of one plane
  const __m512i t0 = _mm512_loadu_si512(tv);
  if constexpr (KP == 64) {
    return _mm512_permutexvar_epi8(idx, t0);
  } else if constexpr (KP == 128) {
    return _mm512_permutex2var_epi8(t0, idx, _mm512_loadu_si512(tv + 64));
  } else {
    const __m512i lo = _mm512_permutex2var_epi8(t0, idx, _mm512_loadu_si512(tv + 64));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(tv + 128), idx, _mm512_loadu_si512(tv + 192));
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
  }
}

// Four vectors' looked-up bytes e[0..3] (64 rows each) summed into int32 by vpdpbusd: interleaved
// so that each dword holds one row's four bytes (dword j of 128-bit lane L of acc[k]: row
// 16 L + 4 k + j); signed bytes against ones (hi plane), unsigned against ones (lo plane).
template <bool Signed>
LOWBIT_VBMI inline void vq_dot4(__m512i acc[4], const __m512i e[4]) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i u01l = _mm512_unpacklo_epi8(e[0], e[1]), u01h = _mm512_unpackhi_epi8(e[0], e[1]);
  const __m512i u23l = _mm512_unpacklo_epi8(e[2], e[3]), u23h = _mm512_unpackhi_epi8(e[2], e[3]);
  const __m512i w[4] = {_mm512_unpacklo_epi16(u01l, u23l), _mm512_unpackhi_epi16(u01l, u23l),
                        _mm512_unpacklo_epi16(u01h, u23h), _mm512_unpackhi_epi16(u01h, u23h)};
  for (int k = 0; k < 4; ++k)
    acc[k] = Signed ? _mm512_dpbusd_epi32(acc[k], ones, w[k]) : _mm512_dpbusd_epi32(acc[k], w[k], ones);
}

// vq_dot4's row order back to rows 16 L .. 16 L + 15 in out[L]: a 4 x 4 transpose of 128-bit lanes
LOWBIT_VBMI inline void vq_unshuffle(const __m512i a[4], __m512i out[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_i32x4(a[0], a[1], 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(a[2], a[3], 0x44), t3 = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
  out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

// R blocks of 64 rows from row n (rows of them in all, the last block possibly short: masked),
// scale groups [g0, g1), accumulated onto y. Partial sums over <= 256 vectors: |256 hi + lo| <=
// 256 * 32767 < 2^24, exact in int32 and in float.
template <int KP, int R>
LOWBIT_VBMI void vq_rows_i16(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N,
                             int64_t vpg, const float* scaleT, float* y, int64_t n, int64_t rows, int64_t g0,
                             int64_t g1) {
  constexpr int64_t kPf = 16;                 // vectors ahead for the index prefetch
  __mmask64 bm[R];
  __mmask16 fm[R][4];
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    int64_t cnt = rows - 64 * r;
    cnt = cnt < 0 ? 0 : (cnt > 64 ? 64 : cnt);
    bm[r] = cnt == 64 ? ~__mmask64(0) : ((__mmask64(1) << cnt) - 1);
    for (int q = 0; q < 4; ++q) {
      int64_t c = cnt - 16 * q;
      c = c < 0 ? 0 : (c > 16 ? 16 : c);
      fm[r][q] = static_cast<__mmask16>((1u << c) - 1);
      acc[r][q] = _mm512_maskz_loadu_ps(fm[r][q], y + n + 64 * r + 16 * q);
    }
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t va = g * vpg, vb = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    const __m512 tsg = _mm512_set1_ps(ts[g]);
    for (int64_t c0 = va; c0 < vb; c0 += 256) {
      const int64_t c1 = c0 + 256 < vb ? c0 + 256 : vb;
      __m512i sh[R][4], sl[R][4];   // int32 sums of the hi and lo planes, vq_dot4's row order
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 4; ++k) sh[r][k] = sl[r][k] = _mm512_setzero_si512();
      for (int64_t v = c0; v < c1; v += 4) {
        __m512i eh[R][4], el[R][4];
        for (int j = 0; j < 4; ++j) {
          if (v + j >= c1) {           // past the chunk: zeros add nothing
            for (int r = 0; r < R; ++r) eh[r][j] = el[r][j] = _mm512_setzero_si512();
            continue;
          }
          if (v + j + kPf < V)
            for (int r = 0; r < R; ++r)
              _mm_prefetch(reinterpret_cast<const char*>(vq_idx(idxB, V, v + j + kPf, n + 64 * r)), _MM_HINT_T0);
          const int8_t* tv = Tq + (v + j) * 2 * KP;
          for (int r = 0; r < R; ++r) {
            const __m512i idx = _mm512_maskz_loadu_epi8(bm[r], vq_idx(idxB, V, v + j, n + 64 * r));
            eh[r][j] = vq_look<KP>(tv, idx);
            el[r][j] = vq_look<KP>(tv + KP, idx);
          }
        }
        for (int r = 0; r < R; ++r) {
          vq_dot4<true>(sh[r], eh[r]);
          vq_dot4<false>(sl[r], el[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        __m512i s32[4], rows32[4];
        for (int k = 0; k < 4; ++k) s32[k] = _mm512_add_epi32(_mm512_slli_epi32(sh[r][k], 8), sl[r][k]);
        vq_unshuffle(s32, rows32);
        for (int q = 0; q < 4; ++q) {
          const __m512 sc = _mm512_mul_ps(_mm512_maskz_loadu_ps(fm[r][q], scaleT + g * N + n + 64 * r + 16 * q), tsg);
          acc[r][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rows32[q]), sc, acc[r][q]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(y + n + 64 * r + 16 * q, fm[r][q], acc[r][q]);
}

template <int KP>
LOWBIT_VBMI void vq_gemv_i16_kp(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N,
                                int64_t vpg, const float* scaleT, float* y, int64_t n0, int64_t n1) {
  const int64_t G = (V + vpg - 1) / vpg;
  const int64_t gpc = vq_chunk_groups(vpg);
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += gpc) {
    const int64_t g1 = g0 + gpc < G ? g0 + gpc : G;
    int64_t n = n0;
    for (; n + 128 <= n1; n += 128) vq_rows_i16<KP, 2>(Tq, ts, idxB, V, N, vpg, scaleT, y, n, 128, g0, g1);
    for (; n < n1; n += 64) vq_rows_i16<KP, 1>(Tq, ts, idxB, V, N, vpg, scaleT, y, n, n1 - n, g0, g1);
  }
}

// y[n] for n in [n0, n1) from vq_qtable's Tq / ts; the caller checks the CPU has VBMI and VNNI
void vq_gemv_i16(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc,
                 int64_t vpg, const float* scaleT, float* y, int64_t n0, int64_t n1) {
  switch (vq_table_width(Kc)) {
    case 64: vq_gemv_i16_kp<64>(Tq, ts, idxB, V, N, vpg, scaleT, y, n0, n1); break;
    case 128: vq_gemv_i16_kp<128>(Tq, ts, idxB, V, N, vpg, scaleT, y, n0, n1); break;
    default: vq_gemv_i16_kp<256>(Tq, ts, idxB, V, N, vpg, scaleT, y, n0, n1); break;
  }
}
#undef LOWBIT_VBMI
#endif

// ---- the same 16-bit tables on in-lane byte shuffles (AVX2 vpshufb), for CPUs without VBMI ------
// vq_qtable's planes (below for AVX2; the AVX-512 one above runs on any AVX-512F CPU) for codebooks
// of at most 64 entries, each 64-byte plane's 16-byte slices differenced (vq_diff_slices: slice k
// holds D_k = T_k - T_(k-1) mod 256), looked up 32 rows at a time: slice k is broadcast to both
// lanes and indexed by vpshufb with idx - 16 k, which is negative (bit 7 set: the shuffle gives 0)
// for an index in an earlier slice, and has idx's low 4 bits otherwise; so the byte sum over k is
// D_0 + .. + D_j = T_j at idx's slice j: 4 shuffles, 3 adds (mod 256) and 3 subtractions, shared
// by the two planes, per 32 lookups (for 128 or 256 entries, 8 or 16 shuffles per plane cost more
// than the float gathers' 4 instructions). The planes' bytes are summed as int16 halves (even rows,
// odd rows), exact over a chunk of <= 128 vectors (lo <= 255 x 128 = 32640, |hi| <= 128 x 128), and
// each chunk's 256 hi + lo (|.| <= 128 x 32767 < 2^24) goes to float exactly: the same arithmetic as
// the VBMI path, so the same bound.
#if defined(__AVX2__)
#if !defined(__AVX512F__)
void vq_qtable(const float* T, int64_t V, int64_t Kc, int64_t vpg, int64_t g0, int64_t g1, int8_t* Tq,
               float* ts) {
  const int64_t KP = vq_table_width(Kc);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  const __m128i lomask = _mm_set1_epi16(0x00FF);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t va = g * vpg, vb = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    const float* t = T + va * Kc;
    const int64_t n = (vb - va) * Kc;
    __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(t + i), absm);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));   // NaN or inf
      mx = _mm256_max_ps(mx, a);
    }
    float lane[8];
    _mm256_storeu_ps(lane, mx);
    float m = 0.f;
    for (int k = 0; k < 8; ++k) m = lane[k] > m ? lane[k] : m;
    bool isbad = _mm256_movemask_ps(bad) != 0;
    for (; i < n; ++i) {
      const float a = __builtin_fabsf(t[i]);
      isbad |= !(a < __builtin_inff());
      m = a > m ? a : m;
    }
    if (isbad) {
      ts[g] = vq_bad_group(Tq, KP, va, vb);
      continue;
    }
    const float iv = vq_inv_step(m, ts + g);
    const __m256 inv = _mm256_set1_ps(iv);
    for (int64_t v = va; v < vb; ++v) {
      const float* tv = T + v * Kc;
      int8_t* hi = Tq + v * 2 * KP;
      int8_t* lo = hi + KP;
      int64_t c = 0;
      for (; c + 8 <= Kc; c += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tv + c), inv));
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(hi + c), _mm_packs_epi16(_mm_srai_epi16(q16, 8), q16));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(lo + c), _mm_packus_epi16(_mm_and_si128(q16, lomask), q16));
      }
      for (; c < Kc; ++c) {             // the same rounding (to nearest even, as cvtps) one by one
        const int32_t q = static_cast<int32_t>(__builtin_nearbyintf(tv[c] * iv));
        hi[c] = static_cast<int8_t>(q >> 8);
        lo[c] = static_cast<int8_t>(q & 0xFF);
      }
      for (int64_t c = Kc; c < KP; ++c) hi[c] = lo[c] = 0;
    }
  }
}
#endif

constexpr int64_t kVqShuffleMaxKc = 64;

// 32 rows' bytes of one differenced 64-entry plane; xs[k] = idx - 16 k
inline __m256i vq_look32(const int8_t* tv, const __m256i* xs) {
  __m256i r = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tv))), xs[0]);
  for (int k = 1; k < 4; ++k)
    r = _mm256_add_epi8(r, _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tv + 16 * k))), xs[k]));
  return r;
}

// y[n .. n + 32) += the scaled sums of scale groups [g0, g1) (32 full rows; vq_gemv_i16s does tails)
void vq_rows32_i16s(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N, int64_t vpg,
                    const float* scaleT, float* y, int64_t n, int64_t g0, int64_t g1) {
  constexpr int64_t kPf = 16, KP = 64;
  const __m256i s16 = _mm256_set1_epi8(16), lom = _mm256_set1_epi16(0x00FF);
  __m256 acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_loadu_ps(y + n + 8 * q);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t va = g * vpg, vb = (g + 1) * vpg < V ? (g + 1) * vpg : V;
    const __m256 tsg = _mm256_set1_ps(ts[g]);
    for (int64_t c0 = va; c0 < vb; c0 += 128) {
      const int64_t c1 = c0 + 128 < vb ? c0 + 128 : vb;
      __m256i he = _mm256_setzero_si256(), ho = he, le = he, lo = he;   // int16 sums: even / odd rows
      for (int64_t v = c0; v < c1; ++v) {
        const uint8_t* iv = vq_idx(idxB, V, v, n);
        if (v + kPf < V) _mm_prefetch(reinterpret_cast<const char*>(iv + kPf * kVqIdxBlock), _MM_HINT_T0);
        const int8_t* tv = Tq + v * 2 * KP;
        __m256i xs[4];               // the index less 16 k: slice k's shuffle indices
        xs[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(iv));
        for (int k = 1; k < 4; ++k) xs[k] = _mm256_sub_epi8(xs[k - 1], s16);
        const __m256i h = vq_look32(tv, xs), l = vq_look32(tv + KP, xs);
        he = _mm256_add_epi16(he, _mm256_srai_epi16(_mm256_slli_epi16(h, 8), 8));
        ho = _mm256_add_epi16(ho, _mm256_srai_epi16(h, 8));
        le = _mm256_add_epi16(le, _mm256_and_si256(l, lom));
        lo = _mm256_add_epi16(lo, _mm256_srli_epi16(l, 8));
      }
      {
        // 256 hi + lo per row in int32, even and odd rows interleaved back: s32[q] = rows 8 q .. 8 q + 7
        __m256i s32[4];
        for (int hh = 0; hh < 2; ++hh) {
          const __m128i he128 = hh ? _mm256_extracti128_si256(he, 1) : _mm256_castsi256_si128(he);
          const __m128i ho128 = hh ? _mm256_extracti128_si256(ho, 1) : _mm256_castsi256_si128(ho);
          const __m128i le128 = hh ? _mm256_extracti128_si256(le, 1) : _mm256_castsi256_si128(le);
          const __m128i lo128 = hh ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo);
          const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(he128), 8), _mm256_cvtepi16_epi32(le128));
          const __m256i o = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(ho128), 8), _mm256_cvtepi16_epi32(lo128));
          // e: rows 16 hh + 0, 2, .., 14; o: rows 16 hh + 1, 3, .., 15
          const __m256i a = _mm256_unpacklo_epi32(e, o), b = _mm256_unpackhi_epi32(e, o);   // 0-3 | 8-11, 4-7 | 12-15
          s32[2 * hh] = _mm256_permute2x128_si256(a, b, 0x20);
          s32[2 * hh + 1] = _mm256_permute2x128_si256(a, b, 0x31);
        }
        for (int q = 0; q < 4; ++q) {
          const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(scaleT + g * N + n + 8 * q), tsg);
          acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[q]), sc, acc[q]);
        }
      }
    }
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(y + n + 8 * q, acc[q]);
}

// y[n] for n in [n0, n1) from vq_qtable's Tq / ts, slices differenced (vq_diff_slices), by byte
// shuffles; Kc <= kVqShuffleMaxKc (planes of 64 bytes)
void vq_gemv_i16s(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc,
                  int64_t vpg, const float* scaleT, float* y, int64_t n0, int64_t n1) {
  (void)Kc;
  constexpr int64_t KP = 64;
  const int64_t G = (V + vpg - 1) / vpg;
  const int64_t gpc = vq_chunk_groups(vpg);
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += gpc) {
    const int64_t g1 = g0 + gpc < G ? g0 + gpc : G;
    int64_t n = n0;
    for (; n + 32 <= n1; n += 32) vq_rows32_i16s(Tq, ts, idxB, V, N, vpg, scaleT, y, n, g0, g1);
    for (; n < n1; ++n) {            // the last < 32 rows, one at a time, the same sums
      float acc = y[n];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t va = g * vpg, vb = (g + 1) * vpg < V ? (g + 1) * vpg : V;
        for (int64_t c0 = va; c0 < vb; c0 += 128) {
          const int64_t c1 = c0 + 128 < vb ? c0 + 128 : vb;
          int32_t s = 0;
          for (int64_t v = c0; v < c1; ++v) {
            const int8_t* tv = Tq + v * 2 * KP;
            const int c = *vq_idx(idxB, V, v, n);
            uint8_t hb = 0, lb = 0;          // the slices added back, as the shuffles do
            for (int k = 0; k <= (c >> 4); ++k) {
              hb = static_cast<uint8_t>(hb + static_cast<uint8_t>(tv[16 * k + (c & 15)]));
              lb = static_cast<uint8_t>(lb + static_cast<uint8_t>(tv[KP + 16 * k + (c & 15)]));
            }
            s += 256 * static_cast<int8_t>(hb) + lb;
          }
          acc += static_cast<float>(s) * (scaleT[g * N + n] * ts[g]);
        }
      }
      y[n] = acc;
    }
  }
}

#endif

// the KernTable entries: vq_qtable, vq_gemv_i16 (VBMI), vq_gemv_i16s (shuffles), its largest Kc
#if defined(__AVX512F__)
#define LOWBIT_VQ_I16 vq_qtable, vq_gemv_i16, vq_gemv_i16s, kVqShuffleMaxKc
#elif defined(__AVX2__)
#define LOWBIT_VQ_I16 vq_qtable, nullptr, vq_gemv_i16s, kVqShuffleMaxKc
#else
#define LOWBIT_VQ_I16 nullptr, nullptr, nullptr, 0
#endif
