// ema_update_: t <- t + (1 - decay)(s - t) over every (teacher, student) pair, in one OpenMP region
// whose threads split the concatenation of all tensors evenly (ViT-B has ~150 tensors, many tiny).
#include <vector>

#include "common.h"
#include "ops.h"

namespace semivit_native {
namespace {

template <class T, class S, class A>
SEMIVIT_CLONES void ema_range(T* t, const S* s, int64_t n, A w) {
  for (int64_t k = 0; k < n; ++k) {
    const A tv = static_cast<A>(t[k]);
    t[k] = static_cast<T>(tv + w * (static_cast<A>(s[k]) - tv));
  }
}

// Updates elements [lo, hi) of one pair; w = 1 - decay in float32 (float64 for float64 teachers).
using SegFn = void (*)(void*, const void*, int64_t, int64_t, double);

template <class T, class S>
void ema_seg(void* t, const void* s, int64_t lo, int64_t hi, double decay) {
  using A = acc_t<T>;
  ema_range<T, S, A>(static_cast<T*>(t) + lo, static_cast<const S*>(s) + lo, hi - lo, static_cast<A>(1.0 - decay));
}

template <class T>
SegFn pick_student(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return &ema_seg<T, float>;
    case at::kDouble: return &ema_seg<T, double>;
    case at::kBFloat16: return &ema_seg<T, at::BFloat16>;
    case at::kHalf: return &ema_seg<T, at::Half>;
    default: return nullptr;
  }
}

SegFn pick(at::ScalarType tt, at::ScalarType st) {
  switch (tt) {
    case at::kFloat: return pick_student<float>(st);
    case at::kDouble: return pick_student<double>(st);
    case at::kBFloat16: return pick_student<at::BFloat16>(st);
    case at::kHalf: return pick_student<at::Half>(st);
    default: return nullptr;
  }
}

struct Seg {
  void* t;
  const void* s;
  SegFn fn;
};

}  // namespace

void ema_update_(at::TensorList teacher, at::TensorList student, double decay) {
  constexpr const char* op = "semivit_native::ema_update_";
  TORCH_CHECK(teacher.size() == student.size(), op, ": teacher has ", teacher.size(), " tensors but student has ",
              student.size());
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ", decay);
  std::vector<Seg> segs;
  std::vector<int64_t> start;  // start[k]: offset of segs[k] in the concatenation of all tensors
  int64_t total = 0;
  for (size_t k = 0; k < teacher.size(); ++k) {
    const at::Tensor& t = teacher[k];
    const at::Tensor& s = student[k];
    check_cpu_contig(t, op, "teacher tensors");
    check_cpu_contig(s, op, "student tensors");
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": teacher[", k, "] must be float32/float64/bfloat16/float16, got ",
                t.scalar_type(), " (integer state is copied by the caller)");
    TORCH_CHECK(is_float_dtype(s.scalar_type()), op, ": student[", k, "] must be a floating tensor, got ",
                s.scalar_type());
    TORCH_CHECK(t.numel() == s.numel(), op, ": teacher[", k, "] has ", t.numel(), " elements but student[", k,
                "] has ", s.numel());
    if (t.numel() == 0) continue;
    segs.push_back({t.data_ptr(), s.data_ptr(), pick(t.scalar_type(), s.scalar_type())});
    start.push_back(total);
    total += t.numel();
  }
  if (total == 0) return;
  start.push_back(total);

  // Each thread takes one contiguous share of the concatenation (a multiple of 64 elements, so
  // neighbouring threads rarely share a cache line) and walks the tensors it overlaps.
  const int nt = num_threads_for(total, int64_t{1} << 16);
#pragma omp parallel num_threads(nt)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = ((total + nth - 1) / nth + 63) / 64 * 64;
    const int64_t lo = std::min(total, tid * per), hi = std::min(total, lo + per);
    if (lo < hi) {
      size_t k = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
      for (; k < segs.size() && start[k] < hi; ++k) {
        const int64_t a = std::max(lo, start[k]) - start[k], b = std::min(hi, start[k + 1]) - start[k];
        segs[k].fn(segs[k].t, segs[k].s, a, b, decay);
      }
    }
  }
}

}  // namespace semivit_native
