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
// Three paths:
//   gemv (M <= gemv_max_m, decode): per output row, stream the packed codes once and
//        accumulate in fp32; per group acc is scaled and summed. Memory-bound, so reading
//        4 or 8 bits instead of 32 is the speed-up.
//   gemv on q8 activations (act_q8=1, integer codes only): x is rounded per 32-column block
//        to int8 (x ~= d_b * q, d_b = max|x_b| / 127, ggml's Q8_0), codes x q summed exactly in
//        int32 (maddubs / VNNI), then y = sum_b d_b scale_g(b) dot_b - sum_g scale_g zero_g xs_g
//        with xs_g = sum_{b in g} d_b sum(q_b). The only error added is the activation rounding.
//   tile (larger M, prefill): dequantize a tile of rows into a small fp32 buffer, then
//        at::mm_out on it (MKL / oneDNN); the full float W never exists.
// Parallelism: at::parallel_for (torch's own OpenMP pool, so torch.set_num_threads rules).
//
// ISA: the arithmetic lives in kern_*.cpp (lowbit_kern.h), each compiled for its own target
// (AVX-512 + VNNI, AVX-512, AVX2 + FMA, portable); this file is compiled for the baseline ISA
// and picks a table when the library loads from what the CPU reports, best first. set_isa()
// forces one (refusing what this CPU cannot run), so every variant can be tested on one box.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "lowbit_kern.h"

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
    if (act_q8) {
      const int64_t nb = K / kChunk;
      std::vector<int8_t> xq(M * K);
      std::vector<float> d(M * nb), xs(M * G, 0.f);
      std::vector<int32_t> qsum(M * nb), bgrp(nb);
      kt->quant_q8(xp, M, K, xq.data(), d.data(), qsum.data());
      for (int64_t b = 0; b < nb; ++b) bgrp[b] = static_cast<int32_t>(b * kChunk / gs);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < nb; ++b) xs[m * G + bgrp[b]] += d[m * nb + b] * float(qsum[m * nb + b]);
      auto fn = Q4 ? kt->gemv_q4q8 : kt->gemv_u8q8;
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        fn(cp, xq.data(), d.data(), xs.data(), bgrp.data(), M, K, sp, zp, G, yp, N, n0, n1);
      });
      return y;
    }
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (Q4) kt->gemv_q4(cp, xp, M, K, gs, lp, sp, zp, G, yp, N, n0, n1);
      else    kt->gemv_u8(cp, xp, M, K, gs, sp, zp, G, yp, N, n0, n1);
    });
    return y;
  }
  // tile path: yT (N, M) so each tile's output rows are contiguous; returned as (M, N)
  at::Tensor yT = at::empty({N, M}, x.options());
  // ~2 MiB of fp32 per tile (L3-resident): few tiles, so few pool barriers, which cost most on a
  // busy box (512 KiB tiles measured 1.2-3x slower than fp32 F.linear at M=128 under load)
  const int64_t tile = std::max<int64_t>(16, ((int64_t(1) << 19) / K) / 16 * 16);
  at::Tensor w = at::empty({std::min(tile, N), K}, x.options());
  const at::Tensor xT = x.t();
  for (int64_t t0 = 0; t0 < N; t0 += tile) {
    const int64_t tn = std::min(tile, N - t0);
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, tn, 8, [&](int64_t r0, int64_t r1) {
      // the kernels index rows from the start of codes / scale; out is this tile's row r0
      if (Q4) kt->dequant_q4(cp, K, gs, lp, sp, zp, G, t0 + r0, t0 + r1, wp + r0 * K);
      else    kt->dequant_u8(cp, K, gs, sp, zp, G, t0 + r0, t0 + r1, wp + r0 * K);
    });
    at::Tensor out = yT.narrow(0, t0, tn);
    at::mm_out(out, w.narrow(0, 0, tn), xT);
  }
  return yT.t().contiguous();
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

}  // namespace

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor lut, Tensor scale, Tensor? zero, int group_size, "
        "int gemv_max_m, int act_q8=0) -> Tensor");
  m.def("u8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int group_size, int gemv_max_m, "
        "int act_q8=0) -> Tensor");
  // not tensor ops: registered as plain functions (no dispatch key), called from Python
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("isa() -> str", &current_isa);
  m.def("isa_supported(str name) -> bool", &isa_supported);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("u8_linear", &u8_linear);
}
