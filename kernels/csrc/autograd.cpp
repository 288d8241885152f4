// The autograd of soft_target_ce, registered in C++ (Autograd dispatch key) rather than from Python:
// the Python register_autograd path cost ~30 us of host time per forward + backward of an 80 x 1000
// loss, as much as the kernels. The forward already wrote d loss / d logits (kernels/csrc/soft_target_ce.cpp),
// so the backward is one multiply by the upstream gradient. The forward goes through the dispatcher,
// so fake tensors (torch.compile, the meta device) reach the fake implementation registered in Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace semivit_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& logits, const at::Tensor& label_a,
                                                const at::Tensor& label_b, const at::Tensor& lam,
                                                const std::optional<at::Tensor>& mask, double smoothing,
                                                bool with_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("semivit_native::soft_target_ce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, double, bool)>();
  return op.call(logits, label_a, label_b, lam, mask, smoothing, with_grad);
}

class SoftTargetCE : public torch::autograd::Function<SoftTargetCE> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& label_a,
                               const at::Tensor& label_b, const at::Tensor& lam,
                               const std::optional<at::Tensor>& mask, double smoothing) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad] = call_forward(logits, label_a, label_b, lam, mask, smoothing, /*with_grad=*/true);
    ctx->save_for_backward({grad});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    ctx->mark_non_differentiable({grad});  // saved for the backward, not a differentiable output
    // no (B, C) zeros for the never-used gradient of `grad`: the backward only reads the loss's
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  // Gradient w.r.t. the logits only (labels, lam, mask and smoothing are data); first order only.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    at::Tensor grad = at::mul(ctx->get_saved_variables()[0], grads[0]);
    if (grad.scalar_type() != dtype) grad = grad.to(dtype);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// with_grad = false asks for the loss alone; it cannot be differentiated, so asking for it while
// the logits need a gradient is an error rather than a silently missing gradient.
std::tuple<at::Tensor, at::Tensor> soft_target_ce_autograd(const at::Tensor& logits, const at::Tensor& label_a,
                                                           const at::Tensor& label_b, const at::Tensor& lam,
                                                           const std::optional<at::Tensor>& mask, double smoothing,
                                                           bool with_grad) {
  const bool needs_grad = torch::autograd::GradMode::is_enabled() && logits.requires_grad();
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(logits, label_a, label_b, lam, mask, smoothing, with_grad);
  }
  TORCH_CHECK(with_grad, "semivit_native::soft_target_ce: the logits require a gradient; call it with with_grad=True");
  auto out = SoftTargetCE::apply(logits, label_a, label_b, lam, mask, smoothing);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace semivit_native

TORCH_LIBRARY_IMPL(semivit_native, Autograd, m) {
  m.impl("soft_target_ce", &semivit_native::soft_target_ce_autograd);
}
