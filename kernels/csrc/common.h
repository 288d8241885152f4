// Shared helpers of the semivit_native CPU ops: input checks, dtype helpers, a vectorisable exp and
// the blocked one-pass (online) max / sum-of-exp over a row.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Hot loops are compiled three times (AVX-512, AVX2, baseline x86-64-v2) so one portable .so runs with
// the widest vectors the CPU has. SEMIVIT_CLONES: the dynamic loader picks the copy (GCC ifunc) from the
// CPU alone. SEMIVIT_AVX2 / SEMIVIT_AVX512 mark the entry points of run_for_isa (below), which picks
// the copy on each call and honours SEMIVIT_NATIVE_ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SEMIVIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SEMIVIT_ISA_COPIES 1
#define SEMIVIT_AVX512 __attribute__((target("arch=x86-64-v4")))
#define SEMIVIT_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define SEMIVIT_CLONES
#define SEMIVIT_ISA_COPIES 0
#define SEMIVIT_AVX512
#define SEMIVIT_AVX2
#endif
#define SEMIVIT_INLINE inline __attribute__((always_inline))
#define SEMIVIT_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list

namespace semivit_native {

// Lanes of the explicit partial accumulators: the compiler vectorises lane-wise updates without
// reassociating floating-point sums (no -ffast-math), so results are the same on every CPU.
constexpr int kLanes = 16;
// Row block kept in L1 between its max and its exp-sum: the row is read once from memory.
constexpr int64_t kBlock = 512;

// Threads to use: torch's setting (torch.set_num_threads), one when the work is small.
inline int num_threads_for(int64_t work, int64_t grain = 32768) {
  return work < grain ? 1 : std::max(1, at::get_num_threads());
}

// Runs f(r0, r1) on contiguous, equal shares of [0, rows) in one OpenMP parallel region.
// f must not throw (inputs are checked before).
template <class F>
void parallel_rows(int64_t rows, int64_t cost_per_row, const F& f) {
  const int nt = num_threads_for(rows * cost_per_row);
  if (nt == 1 || rows < 2) {
    if (rows > 0) f(int64_t{0}, rows);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = (rows + nth - 1) / nth;
    const int64_t r0 = std::min(rows, tid * per), r1 = std::min(rows, r0 + per);
    if (r0 < r1) f(r0, r1);
  }
}

// ------------------------------------------------------------------- instruction set of the hot loops

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // ordered: each runs the ones below it

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The widest copy this CPU runs (the one SEMIVIT_CLONES functions get).
inline Isa cpu_isa() {
  static const Isa isa = [] {
#if SEMIVIT_ISA_COPIES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

constexpr const char* kIsaEnv = "SEMIVIT_NATIVE_ISA";

// cpu_isa(), or the narrower copy $SEMIVIT_NATIVE_ISA names (avx512 | avx2 | baseline), read on every
// call, so one machine can measure each copy it runs. Call it outside OpenMP regions: it throws for an
// unknown name or a copy this CPU cannot run.
inline Isa chosen_isa() {
  const Isa cpu = cpu_isa();
  const char* env = std::getenv(kIsaEnv);
  if (env == nullptr || *env == '\0') return cpu;
  const std::string_view want(env);
  for (const Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (want != isa_name(isa)) continue;
    TORCH_CHECK(isa <= cpu, kIsaEnv, "=", want, ": this CPU runs at most the ", isa_name(cpu),
                " copy of the native ops; unset ", kIsaEnv, " or name a narrower one");
    return isa;
  }
  TORCH_CHECK(false, kIsaEnv, "=", want, " is not an instruction set of the native ops: set avx512, avx2 or baseline, ",
              "or unset it (the widest this CPU runs)");
}

template <class F>
SEMIVIT_AVX512 void run_avx512(const F& f) { f(); }
template <class F>
SEMIVIT_AVX2 void run_avx2(const F& f) { f(); }
template <class F>
void run_baseline(const F& f) { f(); }

// Runs f compiled for `isa`: f must be an always-inline lambda (SEMIVIT_INLINE_LAMBDA) calling only
// always-inline code, so that its whole body is compiled into each of the three copies.
template <class F>
void run_for_isa(Isa isa, const F& f) {
  switch (isa) {
    case Isa::kAvx512: run_avx512(f); return;
    case Isa::kAvx2: run_avx2(f); return;
    default: run_baseline(f); return;
  }
}

// float for fp32 / bf16 / fp16 inputs, double for fp64 inputs.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// cond ? a : b on the bits. GCC if-converts a float ternary into a vector blend only with AVX-512's
// mask registers (or -fno-trapping-math): written as a ternary, the AVX2 and baseline copies of a loop
// keep the branch and run scalar. The same value on every copy.
template <class A>
SEMIVIT_INLINE A select_bits(bool cond, A a, A b) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  const U m = U{0} - static_cast<U>(cond);
  return std::bit_cast<A>((std::bit_cast<U>(a) & m) | (std::bit_cast<U>(b) & ~m));
}

// exp: Cephes' expf polynomial (|rel err| ~ 2 ulp) on [-87.3, 88] (x clamped at 88; 0 below -87.3, so
// exp(-inf) = 0); NaN stays NaN (both comparisons are false for it).
// Branch-free (select_bits) so loops over it vectorise on every instruction set.
SEMIVIT_INLINE float vexp(float x) {
  constexpr float lo = -87.33654f, hi = 88.0f;
  const bool below = x < lo;
  const float xc = select_bits(below, lo, select_bits(x > hi, hi, x));
  // Explicit fused multiply-adds: std::fma is exactly rounded everywhere, so the AVX-512 / AVX2 clones
  // (one vfmadd each) and the baseline clone (a library call) give identical results.
  const float t = std::fma(xc, 1.44269504088896341f, 12582912.0f);  // round(x/ln2): the 1.5*2^23 trick
  const int32_t n = std::bit_cast<int32_t>(t) - 0x4B400000;
  const float fx = t - 12582912.0f;
  float r = std::fma(fx, -0.693359375f, xc);
  r = std::fma(fx, 2.12194440e-4f, r);
  const float r2 = r * r;
  float y = 1.9875691500E-4f;
  y = std::fma(y, r, 1.3981999507E-3f);
  y = std::fma(y, r, 8.3334519073E-3f);
  y = std::fma(y, r, 4.1665795894E-2f);
  y = std::fma(y, r, 1.6666665459E-1f);
  y = std::fma(y, r, 5.0000001201E-1f);
  y = std::fma(y, r2, r) + 1.0f;
  const float res = y * std::bit_cast<float>((n + 127) << 23);
  return select_bits(below, 0.0f, res);
}
SEMIVIT_INLINE double vexp(double x) { return std::exp(x); }

// Converts n elements of src to the compute type; returns src itself when no conversion is needed.
template <class A, class T>
SEMIVIT_INLINE const A* as_acc(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<A, T>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<A>(src[k]);
    return buf;
  }
}

// Lanes of block_max. Above 16 on purpose: GCC fully unrolls a 16-lane loop and then fails to vectorise
// the 16 separate max-selects on AVX2 (they stay scalar); a 32-lane loop is vectorised as a loop. The
// max does not depend on the lane layout, so this changes no result.
constexpr int kMaxLanes = 32;

// Max of x[0, n), lane-wise so it vectorises. NaNs are skipped (they still make the exp-sum NaN).
template <class A>
SEMIVIT_INLINE A block_max(const A* x, int64_t n) {
  A acc[kMaxLanes];
  for (int k = 0; k < kMaxLanes; ++k) acc[k] = -std::numeric_limits<A>::infinity();
  int64_t c = 0;
  for (; c + kMaxLanes <= n; c += kMaxLanes) {
#pragma GCC unroll 1
    for (int k = 0; k < kMaxLanes; ++k) acc[k] = select_bits(x[c + k] > acc[k], x[c + k], acc[k]);
  }
  A m = -std::numeric_limits<A>::infinity();
  for (; c < n; ++c) m = select_bits(x[c] > m, x[c], m);
  for (int k = 0; k < kMaxLanes; ++k) m = select_bits(acc[k] > m, acc[k], m);
  return m;
}

// Index of the first element equal to v (0 if none): a scan that stops there, run only for blocks
// that raise the row's running max.
template <class A>
SEMIVIT_INLINE int64_t first_index_of(const A* x, int64_t n, A v) {
  int64_t k = 0;
  while (k < n && !(x[k] == v)) ++k;
  return k == n ? 0 : k;
}

template <class A>
SEMIVIT_INLINE A block_expsum(const A* x, int64_t n, A m) {
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += vexp(x[c + k] - m);
  A s = 0;
  for (; c < n; ++c) s += vexp(x[c] - m);
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

template <class A>
SEMIVIT_INLINE A block_sum(const A* x, int64_t n) {
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[c + k];
  A s = 0;
  for (; c < n; ++c) s += x[c];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// One pass over a row of C logits, block by block: running max m, sum of exp(z - m) and, when asked,
// the index of the first maximum and the plain sum of z. A block's max and exp-sum read it from L1.
template <class A>
struct RowStats {
  A max = -std::numeric_limits<A>::infinity();
  A expsum = 0;
  A sum = 0;
  int64_t argmax = 0;
};

template <bool WithArgmax, bool WithSum, class T, class A = acc_t<T>>
SEMIVIT_INLINE RowStats<A> row_stats(const T* z, int64_t C) {
  RowStats<A> st;
  A buf[kBlock];
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    const A* x = as_acc<A>(z + c0, n, buf);
    const A bm = block_max(x, n);
    if (bm > st.max) {  // strictly greater: ties keep the earlier (first) index
      if constexpr (WithArgmax) st.argmax = c0 + first_index_of(x, n, bm);
      st.expsum *= vexp(st.max - bm);  // exp(-inf) = 0 on the first block
      st.max = bm;
    }
    st.expsum += block_expsum(x, n, st.max);
    if constexpr (WithSum) st.sum += block_sum(x, n);
  }
  return st;
}

// A large fresh output (mixed images: 48 MB at 80x3x224x224 float32) is a new mmap on every call, and
// first-touch page faults cost more than the kernel itself (4 KiB pages: ~12k faults, 20-40 ms on the
// reference VM). Asking for transparent huge pages on the 2 MiB-aligned interior before the first
// write turns them into a few dozen faults. Only advice on our own output: the memory still comes
// from (and returns to) torch's allocator, nothing is cached across calls.
inline void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)ptr;
  (void)nbytes;
#endif
}

// ------------------------------------------------------------------------------------------ checks

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Logits `shape` = "(B, C)" or "(N, C)" (rows, classes) of any float dtype, contiguous on the CPU, with at least one class.
inline void check_logits(const at::Tensor& logits, const char* op, const char* shape) {
  check_cpu_contig(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be ", shape, ", got shape ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op, ": logits must be float32/float64/bfloat16/float16, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, op, ": logits must have at least one class, got shape ",
              logits.sizes());
}

inline void check_vec(const at::Tensor& t, int64_t B, at::ScalarType dtype, const char* op, const char* name) {
  check_cpu_contig(t, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape (", B, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Every index in [0, hi): checked serially before the parallel loop (no exception inside OpenMP).
inline void check_index_range(const at::Tensor& t, int64_t hi, const char* op, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < hi, op, ": ", name, "[", i, "] = ", p[i], " is outside [0, ", hi, ")");
}

}  // namespace semivit_native
