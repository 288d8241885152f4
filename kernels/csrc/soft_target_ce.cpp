// soft_target_ce: the masked mean soft-target cross-entropy of a batch, in closed form per row (the
// (B, C) soft target is never built), and, when asked, its gradient in the same pass:
//   lse_i = log sum_c exp(z_ic);  ce_i = lse_i - (1 - s)(lam_i z_ia + (1 - lam_i) z_ib) - (s / C) sum_c z_ic
//   loss  = (1 / B) sum_i mask_i ce_i
//   dloss / dz_ic = (mask_i / B)(softmax(z_i)_c - s / C - (1 - s)(lam_i [c = a_i] + (1 - lam_i) [c = b_i]))
// The gradient costs no exponential of its own: the forward writes exp(z - max) into it while summing,
// then scales it in place (the row is still in cache); the backward is one multiply by the upstream
// gradient (kernels/csrc/autograd.cpp). Computed in float32 (float64 for float64 logits).
#include <vector>

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

template <class A>
SEMIVIT_INLINE A label_term(CeConst<A> k, A w, A za, A zb) {
  return k.keep * (w * za + (A(1) - w) * zb);
}

// exp(x - m) of a block into dst, returning their sum (lane-wise partial sums, as block_expsum).
template <class A>
SEMIVIT_INLINE A block_exp_store(const A* x, int64_t n, A m, A* __restrict dst) {
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const A e = vexp(x[c + k] - m);
      dst[c + k] = e;
      acc[k] += e;
    }
  A s = 0;
  for (; c < n; ++c) {
    const A e = vexp(x[c] - m);
    dst[c] = e;
    s += e;
  }
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// Loss only (no gradient wanted): one online pass per row.
template <class T>
SEMIVIT_INLINE void ce_rows(const T* z, int64_t C, const int64_t* la, const int64_t* lb, const float* lam,
                            CeConst<acc_t<T>> k, acc_t<T>* ce, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = z + i * C;
    const RowStats<A> st = row_stats</*WithArgmax=*/false, /*WithSum=*/true>(row, C);
    const A w = static_cast<A>(lam[i]);
    ce[i] = st.max + std::log(st.expsum) -
            label_term(k, w, static_cast<A>(row[la[i]]), static_cast<A>(row[lb[i]])) - k.s_by_c * st.sum;
  }
}

// Loss and gradient: per row a max / sum pass, an exp pass that writes exp(z - max) into the gradient
// row, and a scaling pass over it (rows of up to ~100k classes stay in L2 between passes).
template <class T>
SEMIVIT_INLINE void ce_grad_rows(const T* z, int64_t C, const int64_t* la, const int64_t* lb, const float* lam,
                                 const float* mask, double inv_b, CeConst<acc_t<T>> k, acc_t<T>* ce,
                                 acc_t<T>* grad, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  A buf[kBlock];
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = z + i * C;
    A* __restrict g = grad + i * C;
    A m = -std::numeric_limits<A>::infinity(), zsum = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t n = std::min(kBlock, C - c0);
      const A* x = as_acc<A>(row + c0, n, buf);
      m = std::max(m, block_max(x, n));
      zsum += block_sum(x, n);
    }
    A s = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t n = std::min(kBlock, C - c0);
      s += block_exp_store(as_acc<A>(row + c0, n, buf), n, m, g + c0);
    }
    const int64_t a = la[i], b = lb[i];
    const A w = static_cast<A>(lam[i]), za = static_cast<A>(row[a]), zb = static_cast<A>(row[b]);
    ce[i] = m + std::log(s) - label_term(k, w, za, zb) - k.s_by_c * zsum;
    const A f = static_cast<A>((mask ? static_cast<double>(mask[i]) : 1.0) * inv_b);  // d loss / d ce_i
    const A inv_s = A(1) / s;
    const A ea = g[a], eb = g[b];  // exp(z - max) of the two target classes, before scaling
    for (int64_t c = 0; c < C; ++c) g[c] = f * (g[c] * inv_s - k.s_by_c);
    // the two target classes from their unscaled values, so each element is rounded once
    g[a] = f * (ea * inv_s - k.s_by_c - k.keep * (a == b ? A(1) : w));
    if (a != b) g[b] = f * (eb * inv_s - k.s_by_c - k.keep * (A(1) - w));
  }
}

at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_target_ce(const at::Tensor& logits, const at::Tensor& label_a,
                                                  const at::Tensor& label_b, const at::Tensor& lam,
                                                  const std::optional<at::Tensor>& mask, double smoothing,
                                                  bool with_grad) {
  constexpr const char* op = "semivit_native::soft_target_ce";
  check_logits(logits, op, "(B, C)");
  const int64_t B = logits.size(0), C = logits.size(1);
  check_vec(label_a, B, at::kLong, op, "label_a");
  check_vec(label_b, B, at::kLong, op, "label_b");
  check_vec(lam, B, at::kFloat, op, "lam");
  if (mask) check_vec(*mask, B, at::kFloat, op, "mask");
  check_index_range(label_a, C, op, "label_a");
  check_index_range(label_b, C, op, "label_b");
  const auto opts = logits.options().dtype(compute_dtype(logits));
  at::Tensor grad = with_grad ? at::empty({B, C}, opts) : at::empty({0}, opts);
  at::Tensor loss = at::empty({}, opts);
  const int64_t* la = label_a.const_data_ptr<int64_t>();
  const int64_t* lb = label_b.const_data_ptr<int64_t>();
  const float* lp = lam.const_data_ptr<float>();
  const float* mp = mask ? mask->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "soft_target_ce", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const CeConst<A> k = ce_const<A>(smoothing, C);
    const Isa isa = chosen_isa();
    std::vector<A> ce(B);
    if (with_grad) {
      A* gp = grad.data_ptr<A>();
      const double inv_b = B ? 1.0 / static_cast<double>(B) : 0.0;
      parallel_rows(B, 3 * C, [&](int64_t r0, int64_t r1) {
        run_for_isa(isa, [&]() SEMIVIT_INLINE_LAMBDA {
          ce_grad_rows<scalar_t>(z, C, la, lb, lp, mp, inv_b, k, ce.data(), gp, r0, r1);
        });
      });
    } else {
      parallel_rows(B, C, [&](int64_t r0, int64_t r1) {
        run_for_isa(isa, [&]() SEMIVIT_INLINE_LAMBDA { ce_rows<scalar_t>(z, C, la, lb, lp, k, ce.data(), r0, r1); });
      });
    }
    // the masked mean, summed in row order in float64: the same bits for any thread count
    double total = 0.0;
    for (int64_t i = 0; i < B; ++i) total += (mp ? static_cast<double>(mp[i]) : 1.0) * static_cast<double>(ce[i]);
    *loss.data_ptr<A>() = static_cast<A>(B ? total / static_cast<double>(B) : std::numeric_limits<double>::quiet_NaN());
  });
  return {loss, grad};
}

}  // namespace semivit_native
