// pseudo_mixup and mix_batch: one core. Per sample i with partner j, a cutmix box copied from x_j or
// a mixup lerp(x_j, x_i, lam_i) (torch.lerp's two-sided form); parallel over the (sample, channel, row) rows of the output, each
// output element written once.
#include <vector>

#include "common.h"
#include "ops.h"

namespace semivit_native {
namespace {

struct Mix {
  int64_t y0, y1, x0, x1;  // cutmix box [y0, y1) x [x0, x1) taken from the partner; empty for mixup
  bool cut;
  float lam;  // mixup weight of the own image
};

// The box arithmetic of docs/kernels.md, exactly: r = sqrt(max(1 - lam, 0)) in float64, truncation,
// floor halves, clamps; returns the lam reported for the sample.
float plan_sample(float lam, bool cut, int64_t cy, int64_t cx, int64_t H, int64_t W, Mix& m) {
  m = {0, 0, 0, 0, cut, lam};
  if (!cut) return lam;
  double r = 1.0 - static_cast<double>(lam);
  // max(., 0) as in the contract (a NaN lam counts as 0 area); r >= 2 already covers the whole
  // image for any centre, so capping there keeps the integer conversion defined.
  r = r > 0.0 ? std::sqrt(std::min(r, 4.0)) : 0.0;
  const int64_t half_h = static_cast<int64_t>(static_cast<double>(H) * r) / 2;
  const int64_t half_w = static_cast<int64_t>(static_cast<double>(W) * r) / 2;
  m.y0 = std::clamp<int64_t>(cy - half_h, 0, H);
  m.y1 = std::clamp<int64_t>(cy + half_h, 0, H);
  m.x0 = std::clamp<int64_t>(cx - half_w, 0, W);
  m.x1 = std::clamp<int64_t>(cx + half_w, 0, W);
  const double area = static_cast<double>((m.y1 - m.y0) * (m.x1 - m.x0));
  return static_cast<float>(1.0 - area / static_cast<double>(H * W));
}

template <class T>
SEMIVIT_CLONES void mix_rows(const T* img, T* out, const Mix* plan, const int64_t* partner, int64_t CH, int64_t H,
                             int64_t W, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {  // r = (i * C + c) * H + y
    const int64_t i = r / CH, rem = r - i * CH, y = rem % H;
    const Mix& m = plan[i];
    const T* own = img + r * W;
    const T* par = img + (partner[i] * CH + rem) * W;
    T* __restrict dst = out + r * W;
    if (m.cut) {  // plain copies, no arithmetic
      if (y >= m.y0 && y < m.y1 && m.x1 > m.x0) {
        std::memcpy(dst, own, m.x0 * sizeof(T));
        std::memcpy(dst + m.x0, par + m.x0, (m.x1 - m.x0) * sizeof(T));
        std::memcpy(dst + m.x1, own + m.x1, (W - m.x1) * sizeof(T));
      } else {
        std::memcpy(dst, own, W * sizeof(T));
      }
    } else if (m.lam < 0.5f) {  // lerp(x_j, x_i, lam) as torch.lerp evaluates it: exact at lam = 0 ...
      const A lam = static_cast<A>(m.lam);
      for (int64_t x = 0; x < W; ++x) {
        const A p = static_cast<A>(par[x]);
        dst[x] = static_cast<T>(p + lam * (static_cast<A>(own[x]) - p));
      }
    } else {  // ... and at lam = 1; rounded once to T
      const A rest = static_cast<A>(1) - static_cast<A>(m.lam);
      for (int64_t x = 0; x < W; ++x) {
        const A o = static_cast<A>(own[x]);
        dst[x] = static_cast<T>(o - (o - static_cast<A>(par[x])) * rest);
      }
    }
  }
}

void check_mix_inputs(const char* op, const at::Tensor& images, const at::Tensor& use_cutmix, const at::Tensor& cy,
                      const at::Tensor& cx, const at::Tensor& partner) {
  check_cpu_contig(images, op, "images");
  TORCH_CHECK(images.dim() == 4, op, ": images must be (B, C, H, W), got shape ", images.sizes());
  TORCH_CHECK(is_float_dtype(images.scalar_type()), op, ": images must be float32/float64/bfloat16/float16, got ",
              images.scalar_type());
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  check_vec(use_cutmix, B, at::kBool, op, "use_cutmix");
  check_vec(cy, B, at::kLong, op, "cy");
  check_vec(cx, B, at::kLong, op, "cx");
  check_vec(partner, B, at::kLong, op, "partner");
  check_index_range(cy, H, op, "cy");
  check_index_range(cx, W, op, "cx");
  check_index_range(partner, B, op, "partner");
}

// Plans every sample from its own-image weight lam (B,), writes the reported lam, then mixes.
at::Tensor mix_core(const at::Tensor& images, const float* lam, const at::Tensor& use_cutmix, const at::Tensor& cy,
                    const at::Tensor& cx, const at::Tensor& partner, float* lam_out) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  std::vector<Mix> plan(B);
  const bool* cut = use_cutmix.const_data_ptr<bool>();
  const int64_t* cyp = cy.const_data_ptr<int64_t>();
  const int64_t* cxp = cx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) lam_out[i] = plan_sample(lam[i], cut[i], cyp[i], cxp[i], H, W, plan[i]);
  at::Tensor out = at::empty_like(images, at::MemoryFormat::Contiguous);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const int64_t* pp = partner.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "mix_batch", [&] {
    const scalar_t* src = images.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_rows(B * C * H, W, [&](int64_t r0, int64_t r1) {
      mix_rows<scalar_t>(src, dst, plan.data(), pp, C * H, H, W, r0, r1);
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mix_batch(const at::Tensor& images, const at::Tensor& lam,
                                             const at::Tensor& use_cutmix, const at::Tensor& cy,
                                             const at::Tensor& cx, const at::Tensor& partner) {
  constexpr const char* op = "semivit_native::mix_batch";
  check_mix_inputs(op, images, use_cutmix, cy, cx, partner);
  check_vec(lam, images.size(0), at::kFloat, op, "lam");
  at::Tensor lam_out = at::empty_like(lam);
  at::Tensor out = mix_core(images, lam.const_data_ptr<float>(), use_cutmix, cy, cx, partner, lam_out.data_ptr<float>());
  return {out, lam_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_mixup(const at::Tensor& images, const at::Tensor& prob,
                                                            const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                            const at::Tensor& cx, const at::Tensor& partner,
                                                            double threshold) {
  constexpr const char* op = "semivit_native::pseudo_mixup";
  check_mix_inputs(op, images, use_cutmix, cy, cx, partner);
  const int64_t B = images.size(0);
  check_vec(prob, B, at::kFloat, op, "prob");
  const float* p = prob.const_data_ptr<float>();
  const int64_t* pp = partner.const_data_ptr<int64_t>();
  const float thr = static_cast<float>(threshold);
  std::vector<float> lam(B);
  at::Tensor mask = at::empty_like(prob), lam_out = at::empty_like(prob);
  float* mp = mask.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    const float pi = p[i], pj = p[pp[i]], sum = pi + pj;
    lam[i] = sum == 0.0f ? 0.5f : pi / sum;         // float32; 0.5 when both are 0 (no NaN)
    mp[i] = std::max(pi, pj) >= thr ? 1.0f : 0.0f;  // merged confidence, compared in float32
  }
  at::Tensor out = mix_core(images, lam.data(), use_cutmix, cy, cx, partner, lam_out.data_ptr<float>());
  return {out, lam_out, mask};
}

}  // namespace semivit_native
