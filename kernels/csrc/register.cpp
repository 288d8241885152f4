// Operator schemas and their CPU kernels. The schemas must equal the table in kernels/contract.py
// (tests/test_kernel_contract.py checks it); semantics: docs/kernels.md.
#include <torch/library.h>

#include <string>

#include "common.h"
#include "ops.h"

TORCH_LIBRARY(semivit_native, m) {
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float decay) -> ()");
  m.def("pseudo_label(Tensor logits, float threshold) -> (Tensor prob, Tensor label, Tensor mask)");
  m.def(
      "pseudo_mixup(Tensor images, Tensor prob, Tensor use_cutmix, Tensor cy, Tensor cx, Tensor partner, "
      "float threshold) -> (Tensor mixed, Tensor lam, Tensor mask)");
  m.def(
      "mix_batch(Tensor images, Tensor lam, Tensor use_cutmix, Tensor cy, Tensor cx, Tensor partner) "
      "-> (Tensor mixed, Tensor lam)");
  m.def(
      "pseudo_mixup_(Tensor(a!) images, Tensor prob, Tensor use_cutmix, Tensor cy, Tensor cx, Tensor partner, "
      "float threshold) -> (Tensor lam, Tensor mask)");
  m.def(
      "mix_batch_(Tensor(a!) images, Tensor lam, Tensor use_cutmix, Tensor cy, Tensor cx, Tensor partner) "
      "-> Tensor lam");
  m.def(
      "soft_target_ce(Tensor logits, Tensor label_a, Tensor label_b, Tensor lam, Tensor? mask, float smoothing, "
      "bool with_grad) -> (Tensor loss, Tensor grad)");
  // Not a kernel (no tensors, not in the contract): which copy of the per-call dispatched loops runs
  // now (common.h: run_for_isa), for benchmark records.
  m.def("instruction_set() -> str", [] { return std::string(semivit_native::isa_name(semivit_native::chosen_isa())); });
}

TORCH_LIBRARY_IMPL(semivit_native, CPU, m) {
  m.impl("ema_update_", &semivit_native::ema_update_);
  m.impl("pseudo_label", &semivit_native::pseudo_label);
  m.impl("pseudo_mixup", &semivit_native::pseudo_mixup);
  m.impl("mix_batch", &semivit_native::mix_batch);
  m.impl("pseudo_mixup_", &semivit_native::pseudo_mixup_);
  m.impl("mix_batch_", &semivit_native::mix_batch_);
  m.impl("soft_target_ce", &semivit_native::soft_target_ce);
}
