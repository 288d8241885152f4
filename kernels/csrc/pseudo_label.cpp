// pseudo_label: per row, prob = 1 / sum_c exp(z_c - max z), label = first argmax, mask = prob >= thr;
// one blocked pass over each row (online max and sum of exponentials), rows in parallel.
#include "common.h"
#include "ops.h"

namespace semivit_native {
namespace {

template <class T>
SEMIVIT_CLONES void pseudo_label_rows(const T* z, int64_t C, int64_t r0, int64_t r1, float thr, float* prob,
                                      int64_t* label, float* mask) {
  using A = acc_t<T>;
  for (int64_t i = r0; i < r1; ++i) {
    const RowStats<A> st = row_stats</*WithArgmax=*/true, /*WithSum=*/false>(z + i * C, C);
    const float p = static_cast<float>(A(1) / st.expsum);
    prob[i] = p;
    label[i] = st.argmax;
    mask[i] = p >= thr ? 1.0f : 0.0f;  // compared in float32, like torch's (prob >= threshold)
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_label(const at::Tensor& logits, double threshold) {
  constexpr const char* op = "semivit_native::pseudo_label";
  check_logits(logits, op, "(N, C)");
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor prob = at::empty({N}, f32), mask = at::empty({N}, f32);
  at::Tensor label = at::empty({N}, logits.options().dtype(at::kLong));
  float* pp = prob.data_ptr<float>();
  float* mp = mask.data_ptr<float>();
  int64_t* lp = label.data_ptr<int64_t>();
  const float thr = static_cast<float>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "pseudo_label", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    parallel_rows(N, C, [&](int64_t r0, int64_t r1) { pseudo_label_rows<scalar_t>(z, C, r0, r1, thr, pp, lp, mp); });
  });
  return {prob, label, mask};
}

}  // namespace semivit_native
