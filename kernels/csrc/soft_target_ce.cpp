// soft_target_ce and its backward, in closed form per row (the (B, C) soft target is never built):
//   lse = log sum_c exp(z_c);  ce = lse - (1 - s)(lam z_a + (1 - lam) z_b) - (s / C) sum_c z_c
//   grad_z_c = g (exp(z_c - lse) - s / C - (1 - s)(lam [c = a] + (1 - lam) [c = b]))
// Computed in float32 (float64 for float64 logits); bf16 / fp16 logits are read directly.
#include "common.h"
#include "ops.h"

namespace semivit_native {
namespace {

template <class A>
struct CeConst {
  A keep;    // 1 - s
  A s_by_c;  // s / C
};

template <class A>
CeConst<A> ce_const(double smoothing, int64_t C) {
  return {static_cast<A>(1.0 - smoothing), static_cast<A>(smoothing / static_cast<double>(C))};
}

template <class T>
SEMIVIT_CLONES void ce_rows(const T* z, int64_t C, const int64_t* la, const int64_t* lb, const float* lam,
                            CeConst<acc_t<T>> k, acc_t<T>* ce, acc_t<T>* lse, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = z + i * C;
    const RowStats<A> st = row_stats</*WithArgmax=*/false, /*WithSum=*/true>(row, C);
    const A l = st.max + std::log(st.expsum);
    const A w = static_cast<A>(lam[i]);
    const A za = static_cast<A>(row[la[i]]), zb = static_cast<A>(row[lb[i]]);
    lse[i] = l;
    ce[i] = l - k.keep * (w * za + (A(1) - w) * zb) - k.s_by_c * st.sum;
  }
}

template <class G, class T>
SEMIVIT_CLONES void ce_backward_rows(const G* grad, const T* z, const acc_t<T>* lse, int64_t C, const int64_t* la,
                                     const int64_t* lb, const float* lam, CeConst<acc_t<T>> k, T* out, int64_t r0,
                                     int64_t r1) {
  using A = acc_t<T>;
  A buf[kBlock];
  for (int64_t i = r0; i < r1; ++i) {
    const A g = static_cast<A>(grad[i]), l = lse[i];
    const T* row = z + i * C;
    T* __restrict dst = out + i * C;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t n = std::min(kBlock, C - c0);
      const A* x = as_acc<A>(row + c0, n, buf);
      for (int64_t c = 0; c < n; ++c) dst[c0 + c] = static_cast<T>(g * (vexp(x[c] - l) - k.s_by_c));
    }
    // the two target classes, recomputed so each element is rounded once
    const A w = static_cast<A>(lam[i]);
    const int64_t a = la[i], b = lb[i];
    for (const int64_t c : {a, b}) {
      const A t = k.keep * ((c == a ? w : A(0)) + (c == b ? A(1) - w : A(0)));
      dst[c] = static_cast<T>(g * (vexp(static_cast<A>(row[c]) - l) - k.s_by_c - t));
    }
  }
}

at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_ce_inputs(const char* op, const at::Tensor& logits, const at::Tensor& label_a, const at::Tensor& label_b,
                     const at::Tensor& lam) {
  check_logits(logits, op, "(B, C)");
  const int64_t B = logits.size(0), C = logits.size(1);
  check_vec(label_a, B, at::kLong, op, "label_a");
  check_vec(label_b, B, at::kLong, op, "label_b");
  check_vec(lam, B, at::kFloat, op, "lam");
  check_index_range(label_a, C, op, "label_a");
  check_index_range(label_b, C, op, "label_b");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_target_ce(const at::Tensor& logits, const at::Tensor& label_a,
                                                  const at::Tensor& label_b, const at::Tensor& lam,
                                                  double smoothing) {
  constexpr const char* op = "semivit_native::soft_target_ce";
  check_ce_inputs(op, logits, label_a, label_b, lam);
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto opts = logits.options().dtype(compute_dtype(logits));
  at::Tensor ce = at::empty({B}, opts), lse = at::empty({B}, opts);
  const int64_t* la = label_a.const_data_ptr<int64_t>();
  const int64_t* lb = label_b.const_data_ptr<int64_t>();
  const float* lp = lam.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "soft_target_ce", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    A* cp = ce.data_ptr<A>();
    A* sp = lse.data_ptr<A>();
    const CeConst<A> k = ce_const<A>(smoothing, C);
    parallel_rows(B, C, [&](int64_t r0, int64_t r1) { ce_rows<scalar_t>(z, C, la, lb, lp, k, cp, sp, r0, r1); });
  });
  return {ce, lse};
}

at::Tensor soft_target_ce_backward(const at::Tensor& grad_ce, const at::Tensor& logits, const at::Tensor& lse,
                                   const at::Tensor& label_a, const at::Tensor& label_b, const at::Tensor& lam,
                                   double smoothing) {
  constexpr const char* op = "semivit_native::soft_target_ce_backward";
  check_ce_inputs(op, logits, label_a, label_b, lam);
  const int64_t B = logits.size(0), C = logits.size(1);
  check_vec(lse, B, compute_dtype(logits), op, "lse");
  check_cpu_contig(grad_ce, op, "grad_ce");
  TORCH_CHECK(grad_ce.dim() == 1 && grad_ce.size(0) == B, op, ": grad_ce must have shape (", B, ",), got ",
              grad_ce.sizes());
  TORCH_CHECK(grad_ce.scalar_type() == at::kFloat || grad_ce.scalar_type() == at::kDouble, op,
              ": grad_ce must be float32 or float64, got ", grad_ce.scalar_type());
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t* la = label_a.const_data_ptr<int64_t>();
  const int64_t* lb = label_b.const_data_ptr<int64_t>();
  const float* lp = lam.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "soft_target_ce_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const A* sp = lse.const_data_ptr<A>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const CeConst<A> k = ce_const<A>(smoothing, C);
    auto run = [&](const auto* g) {
      using G = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
      parallel_rows(B, C, [&](int64_t r0, int64_t r1) {
        ce_backward_rows<G, scalar_t>(g, z, sp, C, la, lb, lp, k, dst, r0, r1);
      });
    };
    if (grad_ce.scalar_type() == at::kDouble)
      run(grad_ce.const_data_ptr<double>());
    else
      run(grad_ce.const_data_ptr<float>());
  });
  return out;
}

}  // namespace semivit_native
