// Small fused ops for lowbit.nn.step's decoder block: each replaces 4-12 ATen ops (and their
// Python dispatch) per block and token. fp32, contiguous, single-threaded (decode sizes: a few
// thousand floats); nn/step.py calls them only for fp32 models and uses plain torch otherwise.
//
//   add_rms_norm(x, r, w, eps)   x += r (in place, r optional), returns w * x / sqrt(mean(x^2) + eps)
//                                per row: the residual add and LlamaRMSNorm in one pass
//   rope_kv(qkv, cos, sin, kc, vc, pos, H, G)
//                                qkv (M, (H+2G) hd) -> q (H, M, hd) rotated; the rotated k and the v
//                                rows are written into kc / vc (G, T, hd) at positions pos..pos+M-1
//                                rotation as HF's apply_rotary_pos_emb: x*cos + rotate_half(x)*sin
//   silu_mul(gu)                 gu (M, 2I) = [gate | up] -> silu(gate) * up (M, I)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cmath>
#include <cstdint>

namespace {

void check_f32(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "lowbit step op: ", what, " must be a contiguous ", dim, "-D float32 tensor, got ",
              t.sizes(), " ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
}

at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& r, const at::Tensor& w, double eps) {
  check_f32(x, "x", 2);
  check_f32(w, "weight", 1);
  const int64_t M = x.size(0), D = x.size(1);
  TORCH_CHECK(w.size(0) == D, "lowbit step op: norm weight has ", w.size(0), " values for rows of ", D);
  float* xp = x.data_ptr<float>();
  if (r.has_value()) {
    check_f32(*r, "residual", 2);
    TORCH_CHECK(r->sizes() == x.sizes(), "lowbit step op: residual ", r->sizes(), " vs x ", x.sizes());
    const float* rp = r->data_ptr<float>();
    for (int64_t i = 0; i < M * D; ++i) xp[i] += rp[i];
  }
  at::Tensor y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * D;
    double ss = 0.0;  // double accumulation: within fp32 rounding of the exact mean
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * xr[d];
    const float inv = 1.0f / std::sqrt(float(ss / double(D)) + float(eps));
    for (int64_t d = 0; d < D; ++d) yp[m * D + d] = wp[d] * (xr[d] * inv);
  }
  return y;
}

at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kc,
                   at::Tensor vc, int64_t pos, int64_t H, int64_t G) {
  check_f32(qkv, "qkv", 2);
  check_f32(cos, "cos", 2);
  check_f32(sin, "sin", 2);
  check_f32(kc, "key cache", 3);
  check_f32(vc, "value cache", 3);
  const int64_t M = qkv.size(0), hd = cos.size(1), T = kc.size(1);
  TORCH_CHECK(hd % 2 == 0 && qkv.size(1) == (H + 2 * G) * hd, "lowbit step op: qkv width ", qkv.size(1),
              " is not (", H, " + 2 x ", G, ") heads x ", hd);
  TORCH_CHECK(cos.size(0) == M && sin.sizes() == cos.sizes(), "lowbit step op: cos/sin must be (", M, ", ", hd, ")");
  TORCH_CHECK(kc.size(0) == G && kc.size(2) == hd && vc.sizes() == kc.sizes() && pos >= 0 && pos + M <= T,
              "lowbit step op: caches ", kc.sizes(), " cannot take positions ", pos, "..", pos + M);
  at::Tensor q = at::empty({H, M, hd}, qkv.options());
  const int64_t W = qkv.size(1), half = hd / 2;
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  auto rotate = [&](const float* x, const float* c, const float* s, float* out) {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j] * c[j], b = (-x[j + half]) * s[j];
      out[j] = a + b;
    }
    for (int64_t j = half; j < hd; ++j) {
      const float a = x[j] * c[j], b = x[j - half] * s[j];
      out[j] = a + b;
    }
  };
  for (int64_t m = 0; m < M; ++m) {
    const float* row = src + m * W;
    const float *c = cp + m * hd, *s = sp + m * hd;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * hd, c, s, qp + (h * M + m) * hd);
    for (int64_t g = 0; g < G; ++g) {
      rotate(row + (H + g) * hd, c, s, kp + (g * T + pos + m) * hd);
      const float* v = row + (H + G + g) * hd;
      float* vo = vp + (g * T + pos + m) * hd;
      for (int64_t j = 0; j < hd; ++j) vo[j] = v[j];
    }
  }
  return q;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_f32(gu, "gate|up", 2);
  TORCH_CHECK(gu.size(1) % 2 == 0, "lowbit step op: gate|up width ", gu.size(1), " is odd");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  at::Tensor y = at::empty({M, I}, gu.options());
  const float* p = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) {
      const float g = p[m * 2 * I + i];
      yp[m * I + i] = (g / (1.0f + std::exp(-g))) * p[m * 2 * I + I + i];
    }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? r, Tensor w, float eps) -> Tensor");
  m.def("rope_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kc, Tensor(b!) vc, int pos, int H, int G) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_kv", &rope_kv);
  m.impl("silu_mul", &silu_mul);
}
