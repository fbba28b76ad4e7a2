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
//   t2x64  (N, K/4) uint8, ternary codes 0..2 (value code - 1), K padded to a multiple of 64:
//          4 codes per byte, see lowbit_kern.h; read only by t2_linear below, which also rounds
//          x per token to int8 (BitNet b1.58's activations) and sums codes x q exactly in int32
//
// Paths:
//   gemv (M <= gemv_max_m, decode): per output row, stream the packed codes once and
//        accumulate in fp32; per group acc is scaled and summed. Memory-bound, so reading
//        4 or 8 bits instead of 32 is the speed-up.
//   gemv on q8 activations (act_q8=1, integer codes only): x is rounded per 32-column block
//        to int8 (x ~= d_b * q, d_b = max|x_b| / 127, ggml's Q8_0), codes x q summed exactly in
//        int32 (maddubs / VNNI), then y = sum_b d_b scale_g(b) dot_b - sum_g scale_g zero_g xs_g
//        with xs_g = sum_{b in g} d_b sum(q_b). The only error added is the activation rounding.
//   gemm (larger M, prefill; AVX2 / AVX-512 variants): our fp32 GEMM (kern_gemm_f32.h), x
//        packed once per call, the weight dequantized into L1-sized k-major panels of 16 / 32
//        rows, an MR x NR register tile; the full float W never exists.
//   gemm on q8 activations (act_q8 bit 1, q4 integer codes, opt-in): x rounded per chunk of
//        <= 256 columns inside a group, exact int32 sums (kern_gemm_q8.h, the same register-
//        blocked form: vpdpbusd on VNNI, vpmaddubsw on AVX2).
//   tile (prefill on the portable variant, or act_q8 bit 2): each thread dequantizes a tile of
//        rows into its own L2-sized fp32 buffer, then at::mm_out on it (MKL, single-threaded
//        inside the region) while it is hot.
// Parallelism: at::parallel_for (torch's own OpenMP pool, so torch.set_num_threads rules), except
// the decode GEMVs, which run on our own spinning pool of as many threads (decode_pool.h).
//
// ISA: the arithmetic lives in kern_*.cpp (lowbit_kern.h), each compiled for its own target
// (AVX-512 + VNNI, AVX-512, AVX2 + FMA, portable); this file is compiled for the baseline ISA
// and picks a table when the library loads from what the CPU reports, best first. set_isa()
// forces one (refusing what this CPU cannot run), so every variant can be tested on one box.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <functional>
#include <vector>

#include "lowbit_kern.h"
#include "decode_pool.h"

namespace {

using lowbit::KernTable;
constexpr int64_t kChunk = 32;  // columns per packed run and per q8 block

// ---- ISA selection ------------------------------------------------------------------------------
// The names, best first. __builtin_cpu_supports checks the CPUID bits and (for AVX / AVX-512)
// that the OS saves the wider registers (XCR0), so a listed variant really runs here.
const char* const kIsaNames[] = {"avx512vnni", "avx512", "avx2", "portable"};

const KernTable* table_named(const std::string& name) {
#if defined(__x86_64__)
  if (name == "avx512vnni") return &lowbit::kern_avx512vnni;
  if (name == "avx512") return &lowbit::kern_avx512;
  if (name == "avx2") return &lowbit::kern_avx2;
#endif
  if (name == "portable") return &lowbit::kern_portable;
  return nullptr;
}

bool cpu_runs(const std::string& name) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512vnni") return avx512 && __builtin_cpu_supports("avx512vnni");
  if (name == "avx512") return avx512;
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "portable";
}

const KernTable* best_table() {
  for (const char* n : kIsaNames)
    if (table_named(n) && cpu_runs(n)) return table_named(n);
  return &lowbit::kern_portable;
}

const KernTable* g_kern = best_table();

std::string set_isa(const std::string& name) {
  if (name == "auto") {
    g_kern = best_table();
    return g_kern->name;
  }
  const KernTable* t = table_named(name);
  TORCH_CHECK(t != nullptr, "lowbit kernel: unknown ISA variant '", name,
              "' (expected auto, avx512vnni, avx512, avx2 or portable; x86 variants exist on x86-64 only)");
  TORCH_CHECK(cpu_runs(name), "lowbit kernel: this CPU cannot run the '", name,
              "' variant (its CPUID / OS lacks the instructions it needs)");
  g_kern = t;
  return g_kern->name;
}

std::string current_isa() { return g_kern->name; }

bool isa_supported(const std::string& name) { return table_named(name) != nullptr && cpu_runs(name); }

// Decode GEMVs over rows [0, N) in up to torch's thread count of parts of >= grain rows: on our
// spinning pool (decode_pool.h) unless LOWBIT_SPIN_US=0, another thread holds it or we are inside
// a parallel region already; then at::parallel_for as before.
template <class F>
void gemv_parallel(int64_t N, int64_t grain, const F& f) {
  const int64_t nth = std::max(1, at::get_num_threads());
  const int64_t parts = std::min<int64_t>(nth, (N + grain - 1) / grain);
  if (parts <= 1 || at::in_parallel_region()) {
    f(int64_t(0), N);
    return;
  }
  if (lowbit_pool::spin_ns() > 0) {
    // 4 parts per thread (of >= grain rows where N allows): the caller takes over what a worker
    // the OS has not scheduled leaves unclaimed
    const int64_t np = std::min<int64_t>(4 * nth, (N + grain - 1) / grain);
    const std::function<void(int)> task = [&](int i) { f(N * i / np, N * (i + 1) / np); };
    if (lowbit_pool::pool().run(static_cast<int>(np), static_cast<int>(nth), task)) return;
  }
  at::parallel_for(0, N, grain, f);
}

// ---- the ops ------------------------------------------------------------------------------------
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

// int8 prefill (act_q8 bit 1, q4 integer codes): x rounded to int8 per chunk of <= 8 blocks
// inside one weight group (kern_gemm_q8.h), then the variant's integer GEMM. NaN / inf in a
// chunk makes its scale NaN, so those outputs are NaN (never silently finite).
at::Tensor gemm_q8_prefill(const KernTable* kt, const at::Tensor& x, const at::Tensor& codes,
                           const at::Tensor& scale, const c10::optional<at::Tensor>& zero, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = scale.size(1), nb = K / kChunk;
  std::vector<int32_t> cblk, cgrp;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b0 = g * gs / kChunk, b1 = std::min(nb, (g + 1) * gs / kChunk);
    for (int64_t b = b0; b < b1; b += 8) {
      cblk.push_back(static_cast<int32_t>(b));
      cgrp.push_back(static_cast<int32_t>(g));
    }
  }
  const int64_t C = static_cast<int64_t>(cgrp.size());
  cblk.push_back(static_cast<int32_t>(nb));
  std::vector<int8_t> xq(M * K);
  std::vector<float> dc(M * C), xs(M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k0 = cblk[c] * kChunk, k1 = cblk[c + 1] * kChunk;
        const float* xr = xp + m * K;
        float amax = 0.f;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          const float a = std::fabs(xr[k]);
          finite = finite && a <= std::numeric_limits<float>::max();
          amax = std::max(amax, a);
        }
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;   // Q8_0's rounding rule
        int32_t qs = 0;
        for (int64_t k = k0; k < k1; ++k) {
          // round half to even as cvtps / nearbyint do: |x * id| <= 127 < 2^22, so adding and
          // subtracting 1.5 * 2^23 rounds in the FPU's default mode (and vectorises, unlike nearbyint)
          const float v = (xr[k] * id + 12582912.f) - 12582912.f;
          const int32_t q = static_cast<int32_t>(std::min(127.f, std::max(-127.f, finite ? v : 0.f)));
          xq[m * K + k] = static_cast<int8_t>(q);
          qs += q;
        }
        dc[m * C + c] = finite ? d : std::numeric_limits<float>::quiet_NaN();
        xs[m * G + cgrp[c]] += dc[m * C + c] * float(qs);
      }
  });
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.has_value() ? zero->data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    kt->gemm_q4q8c(cp, xq.data(), dc.data(), xs.data(), cgrp.data(), cblk.data(), C, M, K, sp, zp, G,
                   yp, N, n0, n1);
  });
  return y;
}

template <bool Q4>
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                         const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                         int64_t gs, int64_t gemv_max_m, int64_t act_q8) {
  check_args(x, codes, scale, zero, gs);
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  const int64_t row_bytes = Q4 ? K / 2 : K;
  TORCH_CHECK(codes.size(1) == row_bytes, "lowbit kernel: codes must be (N, ", row_bytes, ") for K=", K,
              ", got ", codes.sizes());
  const float* lp = nullptr;
  if (Q4) {
    TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
                "lowbit kernel: lut must be 16 contiguous float32 values");
    lp = lut.data_ptr<float>();
    if (act_q8) {
      for (int j = 0; j < 16; ++j)
        TORCH_CHECK(lp[j] == float(j), "lowbit kernel: int8 activations need integer codes (lut = 0..15)");
    }
  }
  const KernTable* kt = g_kern;
  const int64_t G = scale.size(1);
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.has_value() ? zero->data_ptr<float>() : nullptr;

  if (M <= gemv_max_m) {
    at::Tensor y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    // grain: at least ~128K weights per thread. Waking the pool costs 5-50 us (more on a busy
    // box), so a k/v projection of 192x576 (~5 us of work) runs on the calling thread alone.
    const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 17) / (K * M));
    if (act_q8 & 1) {
      const int64_t nb = K / kChunk;
      std::vector<int8_t> xq(M * K);
      std::vector<float> d(M * nb), xs(M * G, 0.f);
      std::vector<int32_t> qsum(M * nb), bgrp(nb);
      kt->quant_q8(xp, M, K, xq.data(), d.data(), qsum.data());
      for (int64_t b = 0; b < nb; ++b) bgrp[b] = static_cast<int32_t>(b * kChunk / gs);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < nb; ++b) xs[m * G + bgrp[b]] += d[m * nb + b] * float(qsum[m * nb + b]);
      auto fn = Q4 ? kt->gemv_q4q8 : kt->gemv_u8q8;
      gemv_parallel(N, grain, [&](int64_t n0, int64_t n1) {
        fn(cp, xq.data(), d.data(), xs.data(), bgrp.data(), M, K, sp, zp, G, yp, N, n0, n1);
      });
      return y;
    }
    gemv_parallel(N, grain, [&](int64_t n0, int64_t n1) {
      if (Q4) kt->gemv_q4(cp, xp, M, K, gs, lp, sp, zp, G, yp, N, n0, n1);
      else    kt->gemv_u8(cp, xp, M, K, gs, sp, zp, G, yp, N, n0, n1);
    });
    return y;
  }
  if (Q4 && (act_q8 & 2) && kt->gemm_q4q8c != nullptr) return gemm_q8_prefill(kt, x, codes, scale, zero, gs);
  if (!(act_q8 & 4) && (Q4 ? kt->gemm_f32_q4 != nullptr : kt->gemm_f32_u8 != nullptr)) {
    // our own fp32 GEMM (kern_gemm_f32.h): x packed once, the weight dequantized panel by panel
    const int64_t MR = kt->gemm_mr, NR = kt->gemm_nr;
    const int64_t nmb = (M + MR - 1) / MR;
    // a buffer kept per calling thread: a fresh multi-MB allocation per call costs its page faults
    static thread_local std::vector<float> xpk;
    if (xpk.size() < static_cast<size_t>(nmb * MR * K)) xpk.resize(nmb * MR * K);
    float* pk = xpk.data();
    at::parallel_for(0, nmb, std::max<int64_t>(1, (int64_t(1) << 15) / (MR * K)), [&](int64_t b0, int64_t b1) {
      kt->gemm_pack_x(xp, M, K, b0, b1, pk);
    });
    at::Tensor y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    const int64_t npan = (N + NR - 1) / NR;
    at::parallel_for(0, npan, 1, [&](int64_t p0, int64_t p1) {
      const int64_t n0 = p0 * NR, n1 = std::min(N, p1 * NR);
      if (Q4) kt->gemm_f32_q4(cp, pk, M, K, gs, lp, sp, zp, G, yp, N, n0, n1);
      else    kt->gemm_f32_u8(cp, pk, M, K, gs, sp, zp, G, yp, N, n0, n1);
    });
    return y;
  }
  // tile path: one parallel region; each thread dequantizes its own row tiles into a private,
  // L2-sized fp32 buffer and multiplies each tile while it is hot (MKL single-threaded inside the
  // region), writing y[:, n0:n1] in place. One pool barrier per call, as F.linear's own GEMM pays
  // (the earlier loop over shared 2 MiB tiles paid two per tile).
  at::Tensor y = at::empty({M, N}, x.options());
  const int nth = std::max(1, at::get_num_threads());
  // ~256 KiB of fp32 per tile (half a 512 KiB L2; 128 KiB gave 16-row tiles at K = 1536, where
  // MKL ran ~20% below its speed on the whole weight), at least one tile per thread
  int64_t tile = std::max<int64_t>(16, ((int64_t(1) << 16) / K) / 16 * 16);
  tile = std::min(tile, std::max<int64_t>(16, ((N + nth - 1) / nth + 15) / 16 * 16));
  const int64_t ntiles = (N + tile - 1) / tile;
  // the workers run ATen ops (empty, narrow, mm_out): give them the caller's thread-local state
  // (inference mode, grad mode), as at::launch does, or y (an inference tensor) refuses mm_out
  const at::ThreadLocalState tls;
  at::parallel_for(0, ntiles, 1, [&](int64_t i0, int64_t i1) {
    at::ThreadLocalStateGuard guard(tls);
    at::Tensor w = at::empty({std::min(tile, N), K}, x.options());
    float* wp = w.data_ptr<float>();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * tile, tn = std::min(tile, N - n0);
      if (Q4) kt->dequant_q4(cp, K, gs, lp, sp, zp, G, n0, n0 + tn, 0, K, wp);
      else    kt->dequant_u8(cp, K, gs, sp, zp, G, n0, n0 + tn, 0, K, wp);
      at::Tensor out = y.narrow(1, n0, tn);   // strided (row stride N): BLAS writes it in place
      at::mm_out(out, x, w.narrow(0, 0, tn).t());
    }
  });
  return y;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& lut,
                     const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                     int64_t group_size, int64_t gemv_max_m, int64_t act_q8) {
  return lowbit_linear<true>(x, packed, lut, scale, zero, group_size, gemv_max_m, act_q8);
}

at::Tensor u8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zero, int64_t group_size, int64_t gemv_max_m,
                     int64_t act_q8) {
  return lowbit_linear<false>(x, codes, at::Tensor(), scale, zero, group_size, gemv_max_m, act_q8);
}

// Ternary (BitNet b1.58) linear on t2x64 codes: x rounded per token to int8 exactly as
// numerics/activation.quantize_act does for ActScheme(int8, dynamic, token):
//     s = max|x| / 127 (1 for an all-zero token),  q = clamp(round_half_even(x / s), -128, 127)
// then y = s * sum_g scale_g * (sum code * q - sum q) in exact int32 sums (code - 1 = the weight).
// The columns past x's width (K up to the codes' K_pad, a multiple of 64) read x = 0. A token
// holding NaN / inf gets NaN outputs (the torch rounding gives arbitrary codes there).
at::Tensor t2_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t gs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit ternary kernel: x must be a contiguous 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2,
              "lowbit ternary kernel: codes must be contiguous 2-D uint8 (t2x64)");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), Kp = codes.size(1) * 4;
  TORCH_CHECK(Kp % 64 == 0 && K <= Kp && Kp - K < 64, "lowbit ternary kernel: codes (N, ", codes.size(1),
              ") hold ", Kp, " columns, expected x's ", K, " rounded up to a multiple of 64");
  TORCH_CHECK(gs > 0 && gs % 64 == 0, "lowbit ternary kernel: group size must be a positive multiple of 64, got ", gs);
  const int64_t G = (Kp + gs - 1) / gs;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
              scale.size(0) == N && scale.size(1) == G,
              "lowbit ternary kernel: scale must be contiguous float32 (", N, ", ", G, "), got ", scale.sizes());
  std::vector<int8_t> xq(M * Kp, 0);
  std::vector<float> xs(M);
  std::vector<int32_t> qsum(M * G, 0);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * K;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(xr[k]);
        finite = finite && a <= std::numeric_limits<float>::max();
        amax = std::max(amax, a);
      }
      const float sc = amax > 0.f ? amax / 127.f : 1.f;
      int8_t* qr = xq.data() + m * Kp;
      for (int64_t k = 0; k < K; ++k) {
        // x / s (a division, as torch's), rounded half to even: |x / s| <= 127 + 1 ulp, so the
        // 1.5 * 2^23 trick rounds in the FPU's default mode
        const float v = (xr[k] / sc + 12582912.f) - 12582912.f;
        qr[k] = static_cast<int8_t>(finite ? std::min(127.f, std::max(-128.f, v)) : 0.f);
      }
      for (int64_t k = 0; k < K; ++k) qsum[m * G + k / gs] += qr[k];
      xs[m] = finite ? sc : std::numeric_limits<float>::quiet_NaN();
    }
  });
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const KernTable* kt = g_kern;
  // grain as the other GEMVs: ~128K weights per thread at least
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 17) / (Kp * std::min<int64_t>(M, 4)));
  // (M <= 4: the decode pool; prefill-sized M keeps torch's pool)
  auto t2 = [&](int64_t n0, int64_t n1) {
    kt->gemv_t2q8(cp, xq.data(), xs.data(), qsum.data(), M, Kp, gs, sp, G, yp, N, n0, n1);
  };
  if (M <= 4) gemv_parallel(N, grain, t2);
  else at::parallel_for(0, N, grain, t2);
  return y;
}

// W8A8 linear: int8 inputs x u8 weight codes -> exact int32 sums, one float rescale per output.
//   codes (N, Kp) uint8, W[n, k] = w_scale[n] * (codes[n, k] - zero), Kp = x's K rounded up to a
//   multiple of 64 (pad columns: any code; x reads 0 there), Kp <= 65536 (int32 stays exact)
//   mode 0: dynamic per token   s[m] = max_k |x[m, k]| / 127   (1 for an all-zero token)
//   mode 1: dynamic per tensor  s    = max |x| / 127
//   mode 2: static              s    = x_scale (calibrated)
//   xq = clamp(round_half_even(x / s), -128, 127)    (nn/w8a8.py's torch ops, float op for op)
//   y[m, n] = float(sum_k codes xq - zero * sum_k xq) * (s[m] * w_scale[n]) + bias[n]
// which is what torch._int_mm(xq, (codes - zero)^T).float() * (s * w_scale) + bias gives, bit for
// bit (this file is compiled without FMA contraction on x86; the bias is added in its own pass).
// A token holding NaN (or, dynamic, inf: its scale is then inf) gets NaN outputs; a static scale
// clamps inf to +-127 as the torch ops do.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, int64_t zero, int64_t mode, double x_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit w8a8 kernel: x must be a contiguous 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "lowbit w8a8 kernel: codes must be contiguous 2-D uint8, got ", codes.sizes(), " ", codes.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), Kp = codes.size(1);
  TORCH_CHECK(Kp % 64 == 0 && K <= Kp && Kp - K < 64 && Kp <= 65536, "lowbit w8a8 kernel: codes (", N, ", ", Kp,
              ") must hold x's ", K, " columns rounded up to a multiple of 64 (at most 65536)");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == N,
              "lowbit w8a8 kernel: w_scale must be ", N, " contiguous float32 values, got ", w_scale.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "lowbit w8a8 kernel: bias must be ", N, " contiguous float32 values, got ", bias->sizes());
  TORCH_CHECK(zero >= 0 && zero <= 255, "lowbit w8a8 kernel: zero must be in [0, 255], got ", zero);
  TORCH_CHECK(mode >= 0 && mode <= 2, "lowbit w8a8 kernel: mode must be 0 (dynamic per token), 1 (dynamic "
              "per tensor) or 2 (static), got ", mode);
  const float xs_static = static_cast<float>(x_scale);
  TORCH_CHECK(mode != 2 || (std::isfinite(xs_static) && xs_static > 0.f),
              "lowbit w8a8 kernel: a static input scale must be finite and > 0, got ", x_scale);
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  constexpr float kMax = std::numeric_limits<float>::max();
  const float* xp = x.data_ptr<float>();
  float tensor_s = 1.f;
  bool tensor_ok = true;
  if (mode == 1) {
    float amax = 0.f;
    for (int64_t i = 0; i < M * K; ++i) {
      const float a = std::fabs(xp[i]);
      tensor_ok = tensor_ok && a <= kMax;
      amax = std::max(amax, a);
    }
    tensor_s = amax > 0.f ? amax / 127.f : 1.f;
  }
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M);
  std::vector<int32_t> qsum(M);
  const KernTable* kt = g_kern;
  const float* s_in = mode == 0 ? nullptr : (mode == 1 ? &tensor_s : &xs_static);
  auto quant = [&](int64_t m0, int64_t m1) { kt->quant_w8(xp, K, Kp, s_in, m0, m1, xq.data(), sx.data(), qsum.data()); };
  if (M * K < (int64_t(1) << 16)) quant(0, M);
  else at::parallel_for(0, M, 16, quant);
  if (!tensor_ok)
    for (int64_t m = 0; m < M; ++m) sx[m] = kNaN;
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  int32_t* yi = reinterpret_cast<int32_t*>(yp);   // the int32 sums land in y, then become floats in place
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int32_t z = static_cast<int32_t>(zero);
  // in 4-row panels (the kernels' tile); each worker rescales its own columns of every token
  auto work = [&](int64_t p0, int64_t p1) {
    const int64_t n0 = 4 * p0, n1 = std::min(N, 4 * p1);
    kt->dot_u8s8(cp, xq.data(), M, Kp, yi, N, n0, n1);
    for (int64_t m = 0; m < M; ++m) {
      const float s = sx[m];
      const int32_t zq = z * qsum[m];
      for (int64_t n = n0; n < n1; ++n) {
        int32_t acc;
        std::memcpy(&acc, yp + m * N + n, sizeof acc);
        const float t = static_cast<float>(acc - zq) * (s * wsp[n]);
        std::memcpy(yp + m * N + n, &t, sizeof t);
      }
    }
    if (bp)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += bp[n];
  };
  const int64_t panels = (N + 3) / 4;
  // grain as the other GEMVs: >= ~128K weights per thread (waking threads costs more below)
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 15) / (Kp * std::min<int64_t>(M, 4)));
  if (M <= 4) gemv_parallel(panels, grain, work);
  else at::parallel_for(0, panels, grain, work);
  return y;
}

// Decode attention read from a quantized KV cache (nn/step.py KVCache, kern_attn_q8.h):
//   q (H, hd) fp32; kc, vc (G, T, hd) uint8 (int8 codes, or float8 e4m3 bits decoded by lut (256
//   floats)); ks, vs (G, T) fp32 row scales; the first `end` positions -> (H, hd)
//   = softmax(scaling * q K^T) V with K, V the dequantized rows, never built in memory.
// Positions go in fixed blocks of kAttnBlock (scores written per block; value sums per block
// added in block order), so the result does not depend on the thread count.
constexpr int64_t kAttnBlock = 512;

at::Tensor kv_attend(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& ks, const at::Tensor& vc,
                     const at::Tensor& vs, const at::Tensor& lut, bool i8, int64_t end, double scaling) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "lowbit kv_attend: q must be a contiguous (H, hd) float32 tensor, got ", q.sizes(), " ", q.scalar_type());
  const int64_t H = q.size(0), hd = q.size(1);
  TORCH_CHECK(kc.dim() == 3 && kc.scalar_type() == at::kByte && kc.is_contiguous() && kc.size(2) == hd &&
                  vc.sizes() == kc.sizes() && vc.scalar_type() == at::kByte && vc.is_contiguous(),
              "lowbit kv_attend: codes must be contiguous (G, T, ", hd, ") uint8, got ", kc.sizes(), " / ", vc.sizes());
  const int64_t G = kc.size(0), T = kc.size(1);
  TORCH_CHECK(G > 0 && H % G == 0 && H / G <= 16 && hd % 16 == 0 && hd <= 256,
              "lowbit kv_attend: needs H a multiple of G with H / G <= 16, and hd a multiple of 16 up to 256; got H ",
              H, ", G ", G, ", hd ", hd);
  TORCH_CHECK(end >= 1 && end <= T, "lowbit kv_attend: end ", end, " outside the cache's 1..", T, " positions");
  for (const at::Tensor* t : {&ks, &vs})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == G * T,
                "lowbit kv_attend: scales must be ", G * T, " contiguous float32 values, got ", t->sizes());
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 256,
              "lowbit kv_attend: lut must be 256 contiguous float32 values");
  const KernTable* kt = g_kern;
  const int64_t nb = (end + kAttnBlock - 1) / kAttnBlock, rep = H / G;
  const float* qp = q.data_ptr<float>();
  const uint8_t *kp = kc.data_ptr<uint8_t>(), *vp = vc.data_ptr<uint8_t>();
  const float *ksp = ks.data_ptr<float>(), *vsp = vs.data_ptr<float>(), *lp = lut.data_ptr<float>();
  at::Tensor sc = at::empty({H, end}, q.options());
  float* scp = sc.data_ptr<float>();
  const float sf = static_cast<float>(scaling);
  at::parallel_for(0, G * nb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / nb, t0 = (u % nb) * kAttnBlock;
      kt->kv_scores(qp, H, G, kp, ksp, T, hd, lp, i8, sf, g, t0, std::min(end, t0 + kAttnBlock), scp, end);
    }
  });
  at::Tensor p = at::softmax(sc, 1);
  const float* pp = p.data_ptr<float>();
  at::Tensor parts = at::empty({G, nb, rep, hd}, q.options());
  float* partp = parts.data_ptr<float>();
  at::parallel_for(0, G * nb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / nb, t0 = (u % nb) * kAttnBlock;
      kt->kv_mix(pp, H, G, vp, vsp, T, hd, lp, i8, g, t0, std::min(end, t0 + kAttnBlock), end,
                 partp + u * rep * hd);
    }
  });
  at::Tensor out = at::empty({H, hd}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < rep * hd; ++i) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) acc += partp[(g * nb + b) * rep * hd + i];
      op[g * rep * hd + i] = acc;
    }
  return out;
}

// The 16-bit tables (kern_vq.h) run where the variant has them, unless turned off (LOWBIT_VQ_I16=0
// in the environment at load, or set_vq_i16(false)): the VBMI byte permutes where the CPU has VBMI
// and VNNI (read once: vq_linear asks on every call) and set_vq_vbmi(false) does not forbid them,
// else the AVX2 byte shuffles for codebooks of at most the variant's vq_i16s_max_kc entries, else
// the float tables.
bool g_vq_i16 = [] {
  const char* e = std::getenv("LOWBIT_VQ_I16");
  return !(e && std::string(e) == "0");
}();
bool g_vq_vbmi = true;

const bool kCpuVbmiVnni = [] {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}();

enum class VqPath { kF32, kVbmi, kShuffle };

VqPath vq_path(const KernTable* kt, int64_t Kc) {
  if (!g_vq_i16 || kt->vq_qtable == nullptr) return VqPath::kF32;
  if (g_vq_vbmi && kt->vq_gemv_i16 != nullptr && kCpuVbmiVnni) return VqPath::kVbmi;
  if (kt->vq_gemv_i16s != nullptr && Kc <= kt->vq_i16s_max_kc) return VqPath::kShuffle;
  return VqPath::kF32;
}

// which table-lookup kernel vq_linear runs now for codebooks of kc entries: "i16-vbmi" (16-bit
// tables, byte permutes), "i16-shuffle" (16-bit tables, AVX2 byte shuffles) or "f32" (float tables)
std::string vq_kernel(int64_t kc) {
  switch (vq_path(g_kern, kc)) {
    case VqPath::kVbmi: return "i16-vbmi";
    case VqPath::kShuffle: return "i16-shuffle";
    default: return "f32";
  }
}

// allow (true) or forbid (false) the 16-bit tables; returns the previous setting
bool set_vq_i16(bool on) {
  const bool prev = g_vq_i16;
  g_vq_i16 = on;
  return prev;
}

// allow (true) or forbid (false) the VBMI permutes (forbidden: the shuffles serve as on a CPU
// without VBMI); returns the previous setting
bool set_vq_vbmi(bool on) {
  const bool prev = g_vq_vbmi;
  g_vq_vbmi = on;
  return prev;
}

// Vector-codebook linear by table lookup (kern_vq.h), for the few rows of decode: per row of x,
// the (V, Kc) table of its vectors against the codebooks, then each output row's indexed sum.
// idxB (ceil(N / 64), V, 64): the indices in blocks of 64 rows (lowbit_kern.h vq_idx); scaleT
// (G, N): the scales transposed (nn/vq.py keeps both so).
at::Tensor vq_linear(const at::Tensor& x, const at::Tensor& cb, const at::Tensor& idxB, const at::Tensor& scaleT,
                     int64_t gs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit vq_linear: x must be a contiguous 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(cb.dim() == 3 && cb.scalar_type() == at::kFloat,
              "lowbit vq_linear: codebook must be float32 (n, Kc, d), got ", cb.sizes());
  const int64_t M = x.size(0), Kin = x.size(1), ncb = cb.size(0), Kc = cb.size(1), d = cb.size(2);
  TORCH_CHECK(d >= 1 && Kin % d == 0 && Kc >= 1 && Kc <= 256,
              "lowbit vq_linear: codewords of d = ", d, " must divide in_features ", Kin, ", and at most 256 of them (got ",
              Kc, ")");
  const int64_t V = Kin / d;
  TORCH_CHECK(ncb >= 1 && V % ncb == 0, "lowbit vq_linear: ", ncb, " codebooks do not split ", V, " vectors evenly");
  TORCH_CHECK(scaleT.dim() == 2, "lowbit vq_linear: scale must be 2-D (groups, N) (transposed), got ", scaleT.sizes());
  const int64_t N = scaleT.size(1);
  const int64_t nblk = (N + lowbit::kVqIdxBlock - 1) / lowbit::kVqIdxBlock;
  TORCH_CHECK(idxB.dim() == 3 && idxB.scalar_type() == at::kByte && idxB.is_contiguous() && idxB.size(0) == nblk &&
                  idxB.size(1) == V && idxB.size(2) == lowbit::kVqIdxBlock,
              "lowbit vq_linear: indices must be contiguous uint8 in blocks of 64 rows (", nblk, ", ", V, ", 64), got ",
              idxB.sizes(), " ", idxB.scalar_type());
  TORCH_CHECK(gs > 0 && gs % d == 0, "lowbit vq_linear: group size ", gs, " must be a positive multiple of d = ", d);
  const int64_t G = (Kin + gs - 1) / gs;
  TORCH_CHECK(scaleT.scalar_type() == at::kFloat && scaleT.is_contiguous() && scaleT.dim() == 2 &&
                  scaleT.size(0) == G && scaleT.size(1) == N,
              "lowbit vq_linear: scale must be contiguous float32 (", G, ", ", N, ") (transposed), got ", scaleT.sizes());
  TORCH_CHECK(V * Kc < (int64_t(1) << 31), "lowbit vq_linear: the lookup table (", V, " x ", Kc, ") is too large");
  const KernTable* kt = g_kern;
  const int64_t vpc = V / ncb, vpg = gs / d;
  // (n, d, Kc): the codebooks transposed for the table loop, into a per-thread buffer (a torch
  // copy per call cost ~5 us of dispatch and allocation; this is n Kc d floats)
  thread_local std::vector<float> cb_buf;
  if (static_cast<int64_t>(cb_buf.size()) < ncb * Kc * d) cb_buf.resize(ncb * Kc * d);
  {
    const at::Tensor cbc = cb.contiguous();
    const float* src = cbc.data_ptr<float>();
    for (int64_t i = 0; i < ncb; ++i)
      for (int64_t c = 0; c < Kc; ++c)
        for (int64_t k = 0; k < d; ++k) cb_buf[(i * d + k) * Kc + c] = src[(i * Kc + c) * d + k];
  }
  // the tables live in per-thread buffers kept between calls: a fresh allocation of this size
  // (hundreds of KB) is a fresh mmap, whose page faults cost as much as the lookups
  thread_local std::vector<float> t_buf;
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<float> s_buf;
  if (static_cast<int64_t>(t_buf.size()) < V * Kc) t_buf.resize(V * Kc);
  at::Tensor y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cb_buf.data(), *sp = scaleT.data_ptr<float>();
  const uint8_t* ip = idxB.data_ptr<uint8_t>();
  float *tp = t_buf.data(), *yp = y.data_ptr<float>();
  const VqPath path = vq_path(kt, Kc);
  if (path != VqPath::kF32) {   // 16-bit tables in two byte planes, byte permutes or shuffles (kern_vq.h)
    const int64_t KP = lowbit::vq_table_width(Kc);
    if (static_cast<int64_t>(q_buf.size()) < V * 2 * KP) q_buf.resize(V * 2 * KP);
    if (static_cast<int64_t>(s_buf.size()) < G) s_buf.resize(G);
    int8_t* qp = q_buf.data();
    float* tsp = s_buf.data();
    for (int64_t m = 0; m < M; ++m) {
      at::parallel_for(0, G, std::max<int64_t>(1, 64 / vpg), [&](int64_t g0, int64_t g1) {
        kt->vq_table(xp + m * Kin, cp, Kc, d, vpc, g0 * vpg, std::min(V, g1 * vpg), tp);
        kt->vq_qtable(tp, V, Kc, vpg, g0, g1, qp, tsp);
        if (path == VqPath::kShuffle) {
          const int64_t va = g0 * vpg, vb = std::min(V, g1 * vpg);
          lowbit::vq_diff_slices(qp + va * 2 * KP, 2 * (vb - va));
        }
      });
      const int64_t nb = (N + 127) / 128;      // row ranges in multiples of 128 (two 64-row blocks)
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        (path == VqPath::kVbmi ? kt->vq_gemv_i16 : kt->vq_gemv_i16s)(qp, tsp, ip, V, N, Kc, vpg, sp, yp + m * N,
                                                                      b0 * 128, std::min(N, b1 * 128));
      });
    }
    return y;
  }
  for (int64_t m = 0; m < M; ++m) {
    at::parallel_for(0, V, 64, [&](int64_t v0, int64_t v1) { kt->vq_table(xp + m * Kin, cp, Kc, d, vpc, v0, v1, tp); });
    // row ranges in multiples of 32 (two AVX-512 gathers' lanes)
    const int64_t nb = (N + 31) / 32;
    at::parallel_for(0, nb, 2, [&](int64_t b0, int64_t b1) {
      kt->vq_gemv(tp, ip, V, N, Kc, vpg, sp, yp + m * N, b0 * 32, std::min(N, b1 * 32));
    });
  }
  return y;
}

}  // namespace

// 0: decode GEMVs on at::parallel_for; else our pool's spin time (decode_pool.h, LOWBIT_SPIN_US)
int64_t decode_pool_spin_us() { return lowbit_pool::spin_ns() / 1000; }

// The pool's contract, checked on the pool itself: `runs` back-to-back runs on `threads` threads,
// part counts alternating small and large (as a decode step's calls do: q/k/v, then the lm_head),
// each part bumping its own counter; a run that returns with any part not run exactly once
// counts as bad. Returns the bad runs (0 when the pool keeps its word), or -1 if the pool was busy.
int64_t decode_pool_check(int64_t runs, int64_t threads) {
  TORCH_CHECK(runs >= 0 && threads >= 2 && threads <= 256,
              "decode_pool_check: runs must be >= 0 and threads in [2, 256], got ", runs, ", ", threads);
  constexpr int kParts = 64;
  std::vector<std::atomic<int>> hits(kParts);
  int64_t bad = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const int parts = (r & 1) ? kParts : 2 + static_cast<int>(r % 3);
    for (int i = 0; i < kParts; ++i) hits[i].store(0, std::memory_order_relaxed);
    const std::function<void(int)> task = [&](int i) {
      if (i < 0 || i >= parts) { hits[0].fetch_add(1000, std::memory_order_relaxed); return; }
      hits[i].fetch_add(1, std::memory_order_relaxed);
    };
    if (!lowbit_pool::pool().run(parts, static_cast<int>(threads), task)) return -1;
    bool ok = true;
    for (int i = 0; i < kParts; ++i) ok &= hits[i].load(std::memory_order_relaxed) == (i < parts ? 1 : 0);
    bad += ok ? 0 : 1;
  }
  return bad;
}

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor lut, Tensor scale, Tensor? zero, int group_size, "
        "int gemv_max_m, int act_q8=0) -> Tensor");
  // act_q8: bit 0 = int8 decode activations (per 32-column block, M <= gemv_max_m), bit 1 = int8
  // prefill activations (per chunk, M > gemv_max_m, q4 integer codes; else fp32), bit 2 = fp32
  // prefill on the tile dequantization + at::mm_out path instead of our GEMM (for comparisons)
  m.def("u8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int group_size, int gemv_max_m, "
        "int act_q8=0) -> Tensor");
  // ternary codes (t2x64, 4 per byte) on per-token int8 activations (BitNet b1.58), any M
  m.def("t2_linear(Tensor x, Tensor codes, Tensor scale, int group_size) -> Tensor");
  // W8A8: u8 codes (N, K padded to 64) with one zero point, per-row weight scales, int8 inputs
  // rounded here (mode 0 dynamic per token, 1 dynamic per tensor, 2 static x_scale)
  m.def("w8a8_linear(Tensor x, Tensor codes, Tensor w_scale, Tensor? bias, int zero, int mode, "
        "float x_scale=1.0) -> Tensor");
  // not tensor ops: registered as plain functions (no dispatch key), called from Python
  m.def("kv_attend(Tensor q, Tensor kc, Tensor ks, Tensor vc, Tensor vs, Tensor lut, bool i8, int end, "
        "float scaling) -> Tensor");
  // vector codebooks (nn/vq.py): table-lookup GEMV for decode rows
  m.def("vq_linear(Tensor x, Tensor codebook, Tensor indices, Tensor scale, int group_size) -> Tensor");
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("isa() -> str", &current_isa);
  m.def("vq_kernel(int kc=256) -> str", &vq_kernel);
  m.def("set_vq_i16(bool on) -> bool", &set_vq_i16);
  m.def("set_vq_vbmi(bool on) -> bool", &set_vq_vbmi);
  m.def("isa_supported(str name) -> bool", &isa_supported);
  m.def("decode_pool_spin_us() -> int", &decode_pool_spin_us);
  m.def("decode_pool_check(int runs, int threads) -> int", &decode_pool_check);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("u8_linear", &u8_linear);
  m.impl("t2_linear", &t2_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("kv_attend", &kv_attend);
  m.impl("vq_linear", &vq_linear);
}
