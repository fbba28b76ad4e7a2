// Portable kernels: plain C++ the compiler vectorises (SSE2 on baseline x86-64, NEON on aarch64),
// no intrinsics. Same arithmetic as the AVX paths (per-group folded table for q4, per-group
// partial sums for u8, exact int32 block sums for q8), so results differ only in fp32 sum order.
// Inner loops run over fixed 16 / 32 lanes into small accumulator arrays, which gcc and clang
// turn into vector code at -O3.
#include <cmath>

#include "lowbit_kern.h"

namespace lowbit {
namespace {

constexpr int64_t kRun = 32;
// __builtin_prefetch (gcc / clang, every target; never faults) LOWBIT_PF_BYTES ahead (lowbit_kern.h)
constexpr int64_t kPf = LOWBIT_PF_BYTES;
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// int codes (lut = 0..15): per group sum x * (code - zero), then * scale (as gemv_u8): no table
// lookup, so the loop vectorises (a table lookup per weight does not)
void gemv_q4_int(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
                 const float* scale, const float* zero, int64_t G,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rb = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float tot[16] = {0};
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        const float z = zero ? zero[n * G + g] : 0.f, s = scale[n * G + g];
        float acc[16] = {0};
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          const uint8_t* b = p + k / 2;
          __builtin_prefetch(b + kPf);
          for (int j = 0; j < 16; ++j)
            acc[j] += (static_cast<float>(b[j] & 0x0F) - z) * xr[k + j] +
                      (static_cast<float>(b[j] >> 4) - z) * xr[k + 16 + j];
        }
        for (int j = 0; j < 16; ++j) tot[j] += s * acc[j];
      }
      float t = 0.f;
      for (int j = 0; j < 16; ++j) t += tot[j];
      y[m * N + n] = t;
    }
  }
}

void gemv_q4(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* lut, const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  bool int_lut = true;
  for (int j = 0; j < 16; ++j) int_lut = int_lut && lut[j] == float(j);
  if (int_lut) return gemv_q4_int(codes, x, M, K, gs, scale, zero, G, y, N, n0, n1);
  const int64_t rb = K / 2;
  float lg[16];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[16] = {0};
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        // lg[c] = (lut[c] - zero) * scale: the reference's dequantized value of code c
        const float z = zero ? zero[n * G + g] : 0.f, s = scale[n * G + g];
        for (int j = 0; j < 16; ++j) lg[j] = (lut[j] - z) * s;
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          const uint8_t* b = p + k / 2;
          __builtin_prefetch(b + kPf);
          for (int j = 0; j < 16; ++j) acc[j] += lg[b[j] & 0x0F] * xr[k + j] + lg[b[j] >> 4] * xr[k + 16 + j];
        }
      }
      float t = 0.f;
      for (int j = 0; j < 16; ++j) t += acc[j];
      y[m * N + n] = t;
    }
  }
}

void gemv_u8(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
             const float* scale, const float* zero, int64_t G,
             float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float tot[kRun] = {0};
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        const float z = zero ? zero[n * G + g] : 0.f, s = scale[n * G + g];
        float acc[kRun] = {0};
        const int64_t k1 = imin(K, k0 + gs);
        for (int64_t k = k0; k < k1; k += kRun) {
          __builtin_prefetch(p + k + kPf);
          for (int j = 0; j < kRun; ++j) acc[j] += (static_cast<float>(p[k + j]) - z) * xr[k + j];
        }
        for (int j = 0; j < kRun; ++j) tot[j] += s * acc[j];
      }
      float t = 0.f;
      for (int j = 0; j < kRun; ++j) t += tot[j];
      y[m * N + n] = t;
    }
  }
}

void dequant_q4(const uint8_t* codes, int64_t K, int64_t gs, const float* lut, const float* scale,
                const float* zero, int64_t G, int64_t n0, int64_t n1,
                int64_t kbeg, int64_t kend, float* out) {
  float lg[16];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * (K / 2);
    float* o = out + (n - n0) * (kend - kbeg);  // o[k - kbeg]: column k
    for (int64_t g = kbeg / gs, k0 = g * gs; k0 < kend; k0 += gs, ++g) {
      const float z = zero ? zero[n * G + g] : 0.f, s = scale[n * G + g];
      for (int j = 0; j < 16; ++j) lg[j] = (lut[j] - z) * s;
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); k += kRun)
        for (int j = 0; j < 16; ++j) {
          o[k - kbeg + j] = lg[p[k / 2 + j] & 0x0F];
          o[k - kbeg + 16 + j] = lg[p[k / 2 + j] >> 4];
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
      const float z = zero ? zero[n * G + g] : 0.f, s = scale[n * G + g];
      for (int64_t k = k0 < kbeg ? kbeg : k0; k < imin(kend, k0 + gs); ++k) o[k - kbeg] = (static_cast<float>(p[k]) - z) * s;
    }
  }
}

void quant_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* d, int32_t* qsum) {
  const int64_t nb = K / kRun;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kRun;
      float amax = 0.f, poison = 0.f;
      for (int j = 0; j < kRun; ++j) {
        amax = std::fmax(amax, std::fabs(xb[j]));
        poison += xb[j] * 0.f;                      // NaN iff the block holds NaN or inf
      }
      const float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
      int32_t s = 0;
      for (int j = 0; j < kRun; ++j) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(xb[j] * id));  // ties to even
        xq[m * K + b * kRun + j] = static_cast<int8_t>(q);
        s += q;
      }
      d[m * nb + b] = poison == 0.f ? db : NAN;
      qsum[m * nb + b] = s;
    }
}

// y = sum_b d_b * scale_g(b) * sum_j c_j q_j  -  sum_g scale_g * zero_g * xs_g
template <bool Q4>
void gemv_q8(const uint8_t* codes, const int8_t* xq, const float* d, const float* xs,
             const int32_t* bgrp, int64_t M, int64_t K, const float* scale, const float* zero,
             int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / kRun, rb = Q4 ? K / 2 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    const float* s = scale + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq + m * K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        __builtin_prefetch(p + b * (Q4 ? 16 : kRun) + kPf);
        if (Q4) {
          const uint8_t* c = p + b * 16;
          for (int j = 0; j < 16; ++j)
            dot += (c[j] & 0x0F) * int32_t(q[b * kRun + j]) + (c[j] >> 4) * int32_t(q[b * kRun + 16 + j]);
        } else {
          const uint8_t* c = p + b * kRun;
          for (int j = 0; j < kRun; ++j) dot += int32_t(c[j]) * int32_t(q[b * kRun + j]);
        }
        acc += static_cast<float>(dot) * (d[m * nb + b] * s[bgrp[b]]);
      }
      if (zero)
        for (int64_t g = 0; g < G; ++g) acc -= s[g] * zero[n * G + g] * xs[m * G + g];
      y[m * N + n] = acc;
    }
  }
}

// int8 prefill GEMM (the arithmetic of kern_gemm_q8.h): per chunk an exact int32 dot product of
// codes and int8 activations, scaled once per chunk; 4 activation rows per weight row pass
void gemm_q4q8c(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t M, int64_t K,
                const float* scale, const float* zero, int64_t G, float* y, int64_t N,
                int64_t n0, int64_t n1) {
  const int64_t rb = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq + m * K;
      float acc = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        int32_t dot = 0;
        for (int64_t b = cblk[c]; b < cblk[c + 1]; ++b) {
          const uint8_t* pb = p + b * 16;
          const int8_t* qb = q + b * kRun;
          for (int j = 0; j < 16; ++j) dot += int32_t(pb[j] & 0x0F) * qb[j] + int32_t(pb[j] >> 4) * qb[16 + j];
        }
        acc += float(dot) * (dc[m * C + c] * scale[n * G + cgrp[c]]);
      }
      if (zero)
        for (int64_t g = 0; g < G; ++g) acc -= scale[n * G + g] * zero[n * G + g] * xs[m * G + g];
      y[m * N + n] = acc;
    }
  }
}

// ternary t2x64 codes on per-token int8 activations: exact int32 sums per group of code x q
void gemv_t2q8(const uint8_t* codes, const int8_t* xq, const float* xs, const int32_t* qsum,
               int64_t M, int64_t K, int64_t gs, const float* scale, int64_t G,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rb = K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq + m * K;
      float acc = 0.f;
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
        int32_t dot[16] = {0};
        for (int64_t k = k0; k < imin(K, k0 + gs); k += 64) {
          const uint8_t* b = p + k / 4;
          const int8_t* qk = q + k;
          for (int j = 0; j < 16; ++j)
            dot[j] += int32_t(b[j] & 3) * qk[j] + int32_t((b[j] >> 2) & 3) * qk[16 + j] +
                      int32_t((b[j] >> 4) & 3) * qk[32 + j] + int32_t(b[j] >> 6) * qk[48 + j];
        }
        int32_t t = 0;
        for (int j = 0; j < 16; ++j) t += dot[j];
        acc += scale[n * G + g] * static_cast<float>(t - qsum[m * G + g]);
      }
      y[m * N + n] = xs[m] * acc;
    }
  }
}


void quant_w8(const float* x, int64_t K, int64_t Kp, const float* s_in, int64_t m0, int64_t m1,
              int8_t* xq, float* sx, int32_t* qsum) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    float sc;
    bool nan = false;
    if (s_in) {
      sc = *s_in;
    } else {
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float v = xr[k] < 0.f ? -xr[k] : xr[k];
        amax = v > amax ? v : amax;   // NaN compares false: skipped (caught by the division)
      }
      sc = amax > 0.f ? amax / 127.f : 1.f;
      nan = !(sc <= 3.4028234663852886e38f);
    }
    int8_t* qr = xq + m * Kp;
    int32_t qs = 0;
    for (int64_t k = 0; k < K; ++k) qs += (qr[k] = static_cast<int8_t>(w8_round1(xr[k], sc, &nan)));
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
    qsum[m] = qs;
    sx[m] = nan ? __builtin_nanf("") : sc;
  }
}

// W8A8 int32 sums (lowbit_kern.h dot_u8s8): plain loops, 64-column runs the compiler vectorises
void w8_dot(const uint8_t* codes, const int8_t* xq, int64_t M, int64_t K, int32_t* out,
            int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq + m * K;
      int32_t acc[64] = {0};
      for (int64_t k = 0; k < K; k += 64)
        for (int j = 0; j < 64; ++j) acc[j] += int32_t(p[k + j]) * int32_t(q[k + j]);
      int32_t t = 0;
      for (int j = 0; j < 64; ++j) t += acc[j];
      out[m * N + n] = t;
    }
  }
}

#include "kern_attn_q8.h"
#include "kern_vq.h"

}  // namespace

const KernTable kern_portable = {"portable", gemv_q4, gemv_u8, dequant_q4, dequant_u8, quant_q8,
                                 gemv_q8<true>, gemv_q8<false>, gemm_q4q8c,
                                 0, 0, nullptr, nullptr, nullptr, gemv_t2q8, w8_dot, quant_w8,
                                 kv_scores, kv_mix, vq_table, vq_gemv, LOWBIT_VQ_I16};

}  // namespace lowbit
