// pseudo_mixup and mix_batch: one core. Per sample i with partner j, a cutmix box copied from x_j or
// a mixup lerp(x_j, x_i, lam_i) (torch.lerp's two-sided form). Two ways to run it:
//  - into a new tensor: parallel over the (sample, channel, row) rows of the output, each written once;
//  - in place (pseudo_mixup_, mix_batch_): along the cycles of the partner permutation (below), so each
//    image is read from memory once and written once, and no output is allocated.
#include <algorithm>
#include <memory>
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

// One row of W pixels: dst = own outside the box, par inside it (cutmix), or lerp(par, own, lam).
// In place (dst == own) the own pixels are already there and are not copied.
template <class T>
SEMIVIT_INLINE void mix_row(const T* own, const T* par, T* dst, const Mix& m, int64_t y, int64_t W) {
  using A = acc_t<T>;
  if (m.cut) {  // plain copies, no arithmetic
    const bool in_box = y >= m.y0 && y < m.y1 && m.x1 > m.x0;
    if (dst != own) {
      if (in_box) {
        std::memcpy(dst, own, m.x0 * sizeof(T));
        std::memcpy(dst + m.x1, own + m.x1, (W - m.x1) * sizeof(T));
      } else {
        std::memcpy(dst, own, W * sizeof(T));
      }
    }
    if (in_box && par != dst) std::memcpy(dst + m.x0, par + m.x0, (m.x1 - m.x0) * sizeof(T));
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

template <class T>
SEMIVIT_CLONES void mix_rows(const T* img, T* out, const Mix* plan, const int64_t* partner, int64_t CH, int64_t H,
                             int64_t W, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = (i * C + c) * H + y
    const int64_t i = r / CH, rem = r - i * CH;
    mix_row<T>(img + r * W, img + (partner[i] * CH + rem) * W, out + r * W, plan[i], rem % H, W);
  }
}

// A whole image (C * H rows) mixed over itself with its partner's original pixels at `par`.
template <class T>
SEMIVIT_CLONES void mix_image_inplace(T* img, const T* par, const Mix& m, int64_t CH, int64_t H, int64_t W) {
  for (int64_t r = 0; r < CH; ++r) mix_row<T>(img + r * W, par + r * W, img + r * W, m, r % H, W);
}

// ------------------------------------------------------------------------------------------- in place
//
// Sample c_k of a cycle c_0 -> c_1 -> ... -> c_{L-1} -> c_0 (c_{k+1} = partner[c_k]) needs its partner's
// ORIGINAL pixels. Visiting a cycle in order, c_{k+1} is still untouched when c_k is mixed, and c_k was
// read just before as c_{k-1}'s partner, so it is still in cache: every image comes from memory once
// and goes back once. Two partners have been overwritten by the time they are needed, and their
// originals are copied aside first: the cycle's first image (needed by its last) and, when the
// visit order is split between threads, the first image of each thread's share (needed by the end of
// the previous share). A cycle of one image (a sample mixed with itself) needs no copy.
struct CycleOrder {
  std::vector<int64_t> order;     // every sample, cycle after cycle
  std::vector<int64_t> cycle_of;  // per position in `order`: the position where its cycle starts
  std::vector<int64_t> cycle_end; // per position: one past the position where its cycle ends
};

CycleOrder cycle_order(const int64_t* partner, int64_t B, const char* op) {
  CycleOrder c;
  c.order.reserve(B);
  c.cycle_of.reserve(B);
  c.cycle_end.resize(B);
  std::vector<char> seen(B, 0);
  for (int64_t i = 0; i < B; ++i) {
    if (seen[i]) continue;
    const int64_t start = static_cast<int64_t>(c.order.size());
    int64_t j = i;
    do {
      TORCH_CHECK(!seen[j], op, ": partner must be a permutation of 0..", B - 1, " (", j, " appears twice)");
      seen[j] = 1;
      c.order.push_back(j);
      c.cycle_of.push_back(start);
      j = partner[j];
    } while (j != i);
    for (int64_t k = start; k < static_cast<int64_t>(c.order.size()); ++k) c.cycle_end[k] = c.order.size();
  }
  return c;
}

template <class T>
void mix_inplace(T* img, const Mix* plan, const int64_t* partner, int64_t B, int64_t C, int64_t H, int64_t W,
                 const char* op) {
  const CycleOrder cyc = cycle_order(partner, B, op);
  const int64_t CH = C * H, N = CH * W;  // rows and elements per image
  const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(B * N), B));
  std::vector<int64_t> share(nt + 1);  // thread t visits positions [share[t], share[t + 1])
  for (int t = 0; t <= nt; ++t) share[t] = B * t / nt;
  auto share_of = [&](int64_t k) { return static_cast<int>(std::upper_bound(share.begin(), share.end(), k) - share.begin()) - 1; };
  // Originals copied aside before anyone writes: the first image of each share, and the first image
  // of each cycle that spans two shares. Cycles inside one share keep their first image in the
  // visiting thread's own scratch copy instead.
  std::vector<int64_t> slot(B, -1);  // per sample: its copy in `kept`, or -1
  std::vector<int64_t> kept_samples;
  for (int64_t k = 0; k < B; ++k) {
    const int64_t first = cyc.cycle_of[k], end = cyc.cycle_end[k];
    const bool long_cycle = end - first > 1;
    const bool share_start = k == share[share_of(k)];
    const bool spans = share_of(first) != share_of(end - 1);
    if (long_cycle && (share_start || (k == first && spans))) {
      slot[cyc.order[k]] = static_cast<int64_t>(kept_samples.size());
      kept_samples.push_back(cyc.order[k]);
    }
  }
  // uninitialised storage (no zeroing pass): every element is written before it is read
  std::unique_ptr<T[]> kept(new T[kept_samples.size() * N]);
  std::unique_ptr<T[]> scratch(new T[static_cast<size_t>(nt) * N]);
#pragma omp parallel num_threads(nt)
  {
    // the team may be smaller than asked for (OMP_DYNAMIC, thread limits): a thread then takes several shares
    const int team = omp_get_num_threads(), t = omp_get_thread_num();
    for (size_t s = t; s < kept_samples.size(); s += team)
      std::memcpy(kept.get() + s * N, img + kept_samples[s] * N, N * sizeof(T));
#pragma omp barrier
    for (int sh = t; sh < nt; sh += team) {
      T* mine = scratch.get() + static_cast<size_t>(sh) * N;
      for (int64_t k = share[sh]; k < share[sh + 1]; ++k) {
        const int64_t i = cyc.order[k], j = partner[i];
        const int64_t first = cyc.cycle_of[k];
        if (k == first && slot[i] < 0 && cyc.cycle_end[k] - first > 1)
          std::memcpy(mine, img + i * N, N * sizeof(T));  // a cycle inside this share: keep its first image
        const T* par;
        if (slot[j] >= 0)
          par = kept.get() + slot[j] * N;
        else if (j == cyc.order[first] && j != i)
          par = mine;  // the end of a cycle inside this share
        else
          par = img + j * N;  // untouched yet (or the sample itself)
        mix_image_inplace<T>(img + i * N, par, plan[i], CH, H, W);
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

// Plans every sample from its own-image weight lam (B,), writes the reported lam, then mixes into a
// new tensor, or over `images` itself when `inplace` (then returns `images`).
at::Tensor mix_core(const at::Tensor& images, const float* lam, const at::Tensor& use_cutmix, const at::Tensor& cy,
                    const at::Tensor& cx, const at::Tensor& partner, float* lam_out, bool inplace, const char* op) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  std::vector<Mix> plan(B);
  const bool* cut = use_cutmix.const_data_ptr<bool>();
  const int64_t* cyp = cy.const_data_ptr<int64_t>();
  const int64_t* cxp = cx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) lam_out[i] = plan_sample(lam[i], cut[i], cyp[i], cxp[i], H, W, plan[i]);
  const int64_t* pp = partner.const_data_ptr<int64_t>();
  if (inplace) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "mix_batch_", [&] {
      mix_inplace<scalar_t>(images.data_ptr<scalar_t>(), plan.data(), pp, B, C, H, W, op);
    });
    return images;
  }
  at::Tensor out = at::empty_like(images, at::MemoryFormat::Contiguous);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "mix_batch", [&] {
    const scalar_t* src = images.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_rows(B * C * H, W, [&](int64_t r0, int64_t r1) {
      mix_rows<scalar_t>(src, dst, plan.data(), pp, C * H, H, W, r0, r1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mix_batch_impl(const at::Tensor& images, const at::Tensor& lam,
                                                  const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                  const at::Tensor& cx, const at::Tensor& partner, bool inplace,
                                                  const char* op) {
  check_mix_inputs(op, images, use_cutmix, cy, cx, partner);
  check_vec(lam, images.size(0), at::kFloat, op, "lam");
  at::Tensor lam_out = at::empty_like(lam);
  at::Tensor out =
      mix_core(images, lam.const_data_ptr<float>(), use_cutmix, cy, cx, partner, lam_out.data_ptr<float>(), inplace, op);
  return {out, lam_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_mixup_impl(const at::Tensor& images, const at::Tensor& prob,
                                                                 const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                                 const at::Tensor& cx, const at::Tensor& partner,
                                                                 double threshold, bool inplace, const char* op) {
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
  at::Tensor out = mix_core(images, lam.data(), use_cutmix, cy, cx, partner, lam_out.data_ptr<float>(), inplace, op);
  return {out, lam_out, mask};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mix_batch(const at::Tensor& images, const at::Tensor& lam,
                                             const at::Tensor& use_cutmix, const at::Tensor& cy,
                                             const at::Tensor& cx, const at::Tensor& partner) {
  return mix_batch_impl(images, lam, use_cutmix, cy, cx, partner, false, "semivit_native::mix_batch");
}

at::Tensor mix_batch_(at::Tensor& images, const at::Tensor& lam, const at::Tensor& use_cutmix, const at::Tensor& cy,
                      const at::Tensor& cx, const at::Tensor& partner) {
  return std::get<1>(mix_batch_impl(images, lam, use_cutmix, cy, cx, partner, true, "semivit_native::mix_batch_"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_mixup(const at::Tensor& images, const at::Tensor& prob,
                                                            const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                            const at::Tensor& cx, const at::Tensor& partner,
                                                            double threshold) {
  return pseudo_mixup_impl(images, prob, use_cutmix, cy, cx, partner, threshold, false, "semivit_native::pseudo_mixup");
}

std::tuple<at::Tensor, at::Tensor> pseudo_mixup_(at::Tensor& images, const at::Tensor& prob,
                                                 const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                 const at::Tensor& cx, const at::Tensor& partner, double threshold) {
  auto [_, lam, mask] =
      pseudo_mixup_impl(images, prob, use_cutmix, cy, cx, partner, threshold, true, "semivit_native::pseudo_mixup_");
  return {lam, mask};
}

}  // namespace semivit_native
