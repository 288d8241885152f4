// The semivit_native operators (schemas: kernels/contract.py, defined in register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace semivit_native {

void ema_update_(at::TensorList teacher, at::TensorList student, double decay);

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_label(const at::Tensor& logits, double threshold);

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_mixup(const at::Tensor& images, const at::Tensor& prob,
                                                            const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                            const at::Tensor& cx, const at::Tensor& partner,
                                                            double threshold);

// In place: the mixed batch is written over `images` (every backend's contract: docs/kernels.md).
std::tuple<at::Tensor, at::Tensor> pseudo_mixup_(at::Tensor& images, const at::Tensor& prob,
                                                 const at::Tensor& use_cutmix, const at::Tensor& cy,
                                                 const at::Tensor& cx, const at::Tensor& partner, double threshold);

at::Tensor mix_batch_(at::Tensor& images, const at::Tensor& lam, const at::Tensor& use_cutmix, const at::Tensor& cy,
                      const at::Tensor& cx, const at::Tensor& partner);

std::tuple<at::Tensor, at::Tensor> mix_batch(const at::Tensor& images, const at::Tensor& lam,
                                             const at::Tensor& use_cutmix, const at::Tensor& cy,
                                             const at::Tensor& cx, const at::Tensor& partner);

// loss = masked mean soft-target CE (0-d); grad = d loss / d logits (B, C) when with_grad, else (0,).
std::tuple<at::Tensor, at::Tensor> soft_target_ce(const at::Tensor& logits, const at::Tensor& label_a,
                                                  const at::Tensor& label_b, const at::Tensor& lam,
                                                  const std::optional<at::Tensor>& mask, double smoothing,
                                                  bool with_grad);

}  // namespace semivit_native
