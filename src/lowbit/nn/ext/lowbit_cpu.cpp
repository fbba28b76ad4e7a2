// lowbit CPU kernels: y = x @ W^T where W (N x K) is held as low-bit codes with per-group
// scale and zero, and never exists as a float matrix at decode time.
//
// One formula serves every format the nibble / byte containers hold:
//
//     W[n, k] = scale[n, g] * (lut[code[n, k]] - zero[n, g])      g = k / group_size
//
//   int (<= 4 bits)  lut = [0, 1, ..., 15]  zero = integer zero point  (lowbit affine, GPTQ-style)
//   nf4 / fp4        lut = the 16 codebook values, zero = 0
//   ternary          lut = [-1, 0, 1, ...], zero = 0
//   int (5..8 bits)  byte container, lut unused (value = code)
//
// Containers (row n, K padded to a multiple of 32 with code 0 and x padded with 0.0):
//
//   q4x32  (N, K/2) uint8: each run of 32 columns is 16 bytes; byte j holds
//          column j in its low nibble and column j+16 in its high nibble
//              byte j:  HHHH LLLL      L = col (32c + j), H = col (32c + 16 + j)
//          (ggml's Q4_0 uses the same split, so one 128-bit load unpacks to two
//          contiguous 16-float vectors without a shuffle)
//   u8     (N, K) uint8: one code per byte
//
// Two paths:
//   gemv (M <= gemv_max_m, decode): per output row, stream the packed codes once and
//        accumulate in fp32; per group acc is scaled and summed. Memory-bound, so reading
//        4 or 8 bits instead of 32 is the speed-up.
//   tile (larger M, prefill): dequantize a tile of rows into a small fp32 buffer, then
//        at::mm_out on it (MKL / oneDNN); the full float W never exists.
// Parallelism: at::parallel_for (torch's own OpenMP pool, so torch.set_num_threads rules).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 32;  // columns per packed run

// ---- one output value: sum_k x[k] * W[n, k] over a whole row --------------------------------
// q4: the group's scale and zero are folded into its 16-entry table once per group,
//     lut_g[c] = (lut[c] - zero) * scale, which is exactly the reference's dequantized value,
//     so only the order of the fp32 sum differs from dequantize-then-matmul.
//     Unpack (AVX-512): one vpmovzxbd spreads 16 packed bytes over 16 int32 lanes; vpermps reads
//     only the low 4 bits of each index, so permuting by the lanes looks up the low nibble
//     directly and, after a 4-bit shift, the high one. 6 zmm ops per 32 weights.
inline float row_q4(const uint8_t* p, const float* x, int64_t K, int64_t gs, const float* lut,
                    const float* scale, const float* zero) {
#if defined(__AVX512F__)
  const __m512 lutv = _mm512_loadu_ps(lut);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const __m512 zv = _mm512_set1_ps(zero ? zero[g] : 0.f);
    const __m512 lg = _mm512_mul_ps(_mm512_sub_ps(lutv, zv), _mm512_set1_ps(scale[g]));
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kChunk) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2)));
      a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, lg), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lg), _mm512_loadu_ps(x + k + 16), a1);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  float acc[16] = {0};
  float lg[16];
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const float z = zero ? zero[g] : 0.f;
    for (int j = 0; j < 16; ++j) lg[j] = (lut[j] - z) * scale[g];
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kChunk) {
      const uint8_t* b = p + k / 2;
      for (int j = 0; j < 16; ++j) acc[j] += lg[b[j] & 0x0F] * x[k + j] + lg[b[j] >> 4] * x[k + 16 + j];
    }
  }
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
#endif
}

// u8: per group, acc_g = sum x * (code - zero), then total += scale * acc_g (vector-wide, one
// horizontal sum per row).
inline float row_u8(const uint8_t* p, const float* x, int64_t K, int64_t gs, const float* scale,
                    const float* zero) {
#if defined(__AVX512F__)
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const __m512 zv = _mm512_set1_ps(zero ? zero[g] : 0.f);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kChunk) {
      const __m512 w0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)))), zv);
      const __m512 w1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k + 16)))), zv);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    const __m512 sv = _mm512_set1_ps(scale[g]);
    t0 = _mm512_fmadd_ps(sv, a0, t0);
    t1 = _mm512_fmadd_ps(sv, a1, t1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
#else
  float total = 0.f;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const float z = zero ? zero[g] : 0.f;
    float acc[32] = {0};
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kChunk)
      for (int j = 0; j < 32; ++j) acc[j] += (static_cast<float>(p[k + j]) - z) * x[k + j];
    float s = 0.f;
    for (int j = 0; j < 32; ++j) s += acc[j];
    total += scale[g] * s;
  }
  return total;
#endif
}

// ---- dequantize one row into fp32 (tile path) --------------------------------------------------
inline void dequant_q4_row(const uint8_t* p, int64_t K, const float* lut, const float* scale,
                           const float* zero, int64_t gs, float* out) {
#if defined(__AVX512F__)
  const __m512 lutv = _mm512_loadu_ps(lut);
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    // same folded table as row_q4: values equal the reference's (lut[c] - zero) * scale
    const __m512 lg = _mm512_mul_ps(_mm512_sub_ps(lutv, _mm512_set1_ps(zero ? zero[g] : 0.f)),
                                    _mm512_set1_ps(scale[g]));
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += kChunk) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2)));
      _mm512_storeu_ps(out + k, _mm512_permutexvar_ps(b, lg));
      _mm512_storeu_ps(out + k + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lg));
    }
  }
#else
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t g = k0 / gs;
    const float s = scale[g], z = zero ? zero[g] : 0.f;
    const uint8_t* b = p + k0 / 2;
    for (int j = 0; j < 16; ++j) {
      out[k0 + j] = (lut[b[j] & 0x0F] - z) * s;
      out[k0 + 16 + j] = (lut[b[j] >> 4] - z) * s;
    }
  }
#endif
}

inline void dequant_u8_row(const uint8_t* p, int64_t K, const float* scale, const float* zero,
                           int64_t gs, float* out) {
#if defined(__AVX512F__)
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const __m512 zv = _mm512_set1_ps(zero ? zero[g] : 0.f), sv = _mm512_set1_ps(scale[g]);
    const int64_t k1 = std::min(K, k0 + gs);
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))));
      _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_sub_ps(c, zv), sv));
    }
  }
#else
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t g = k0 / gs;
    const float s = scale[g], z = zero ? zero[g] : 0.f;
    for (int j = 0; j < 32; ++j) out[k0 + j] = (static_cast<float>(p[k0 + j]) - z) * s;
  }
#endif
}

void check_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                const c10::optional<at::Tensor>& zero, int64_t gs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit kernel: x must be a contiguous 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(1) % kChunk == 0, "lowbit kernel: K must be padded to a multiple of 32, got ", x.size(1));
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2,
              "lowbit kernel: codes must be contiguous 2-D uint8");
  TORCH_CHECK(gs > 0 && gs % kChunk == 0, "lowbit kernel: group size must be a positive multiple of 32, got ", gs);
  const int64_t G = (x.size(1) + gs - 1) / gs;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
              scale.size(0) == codes.size(0) && scale.size(1) == G,
              "lowbit kernel: scale must be contiguous float32 (N, ", G, "), got ", scale.sizes());
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == at::kFloat && zero->is_contiguous() && zero->sizes() == scale.sizes(),
                "lowbit kernel: zero must be contiguous float32 shaped like scale, got ", zero->sizes());
  }
}

template <bool Q4>
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                         const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                         int64_t gs, int64_t gemv_max_m) {
  check_args(x, codes, scale, zero, gs);
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  const int64_t row_bytes = Q4 ? K / 2 : K;
  TORCH_CHECK(codes.size(1) == row_bytes, "lowbit kernel: codes must be (N, ", row_bytes, ") for K=", K,
              ", got ", codes.sizes());
  if (Q4) {
    TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
                "lowbit kernel: lut must be 16 contiguous float32 values");
  }
  const int64_t G = scale.size(1);
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* lp = Q4 ? lut.data_ptr<float>() : nullptr;
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.has_value() ? zero->data_ptr<float>() : nullptr;

  if (M <= gemv_max_m) {
    at::Tensor y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    // grain: at least ~128K weights per thread. Waking the pool costs 5-50 us (more on a busy
    // box), so a k/v projection of 192x576 (~5 us of work) runs on the calling thread alone.
    const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 17) / (K * M));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = cp + n * row_bytes;
        const float* srow = sp + n * G;
        const float* zrow = zp ? zp + n * G : nullptr;
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = xp + m * K;
          const float total = Q4 ? row_q4(row, xr, K, gs, lp, srow, zrow) : row_u8(row, xr, K, gs, srow, zrow);
          yp[m * N + n] = total;
        }
      }
    });
    return y;
  }
  // tile path: yT (N, M) so each tile's output rows are contiguous; returned as (M, N)
  at::Tensor yT = at::empty({N, M}, x.options());
  const int64_t tile = std::max<int64_t>(16, ((int64_t(1) << 17) / K) / 16 * 16);  // ~512 KiB of fp32
  at::Tensor w = at::empty({std::min(tile, N), K}, x.options());
  const at::Tensor xT = x.t();
  for (int64_t t0 = 0; t0 < N; t0 += tile) {
    const int64_t tn = std::min(tile, N - t0);
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, tn, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = t0 + r;
        if (Q4) dequant_q4_row(cp + n * row_bytes, K, lp, sp + n * G, zp ? zp + n * G : nullptr, gs, wp + r * K);
        else    dequant_u8_row(cp + n * row_bytes, K, sp + n * G, zp ? zp + n * G : nullptr, gs, wp + r * K);
      }
    });
    at::Tensor out = yT.narrow(0, t0, tn);
    at::mm_out(out, w.narrow(0, 0, tn), xT);
  }
  return yT.t().contiguous();
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& lut,
                     const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                     int64_t group_size, int64_t gemv_max_m) {
  return lowbit_linear<true>(x, packed, lut, scale, zero, group_size, gemv_max_m);
}

at::Tensor u8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zero, int64_t group_size, int64_t gemv_max_m) {
  return lowbit_linear<false>(x, codes, at::Tensor(), scale, zero, group_size, gemv_max_m);
}

}  // namespace

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor lut, Tensor scale, Tensor? zero, int group_size, int gemv_max_m) -> Tensor");
  m.def("u8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int group_size, int gemv_max_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("u8_linear", &u8_linear);
}
