// CWIC CPU kernels: dispatch across the scalar / AVX2 / AVX-512 builds of cwic_cpu_impl.inc, and the
// decode glue (RMSNorm, RoPE, attention, activations). Torch-free: C++17 + OpenMP.
#include "cwic_cpu.h"

#include <omp.h>
#if defined(__unix__)
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define CWIC_X86 1
#include <immintrin.h>
#else
#define CWIC_X86 0
#endif

namespace cwic_cpu {

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Software prefetches of weight rows use locality hint 1 (prefetcht2: kept in the outer caches) rather than
// 0 (prefetchnta). On the 2-core AMD EPYC benchmark host (python -m experiments.bench.cpu_ab --old <nta build>,
// SmolLM2 at 3x APR, 10 interleaved rounds; three runs, the host quieter in the first) it made our dense decode
// 1.16-1.28x and the CWIC decode 1.09-1.20x faster; the FFN's up-projection loop went from ~36 to ~25 us a layer.
#define CWIC_PF_LOCALITY 1

// rows of the active list prefetched ahead of the one being streamed ($CWIC_CPU_PREFETCH, default 16). cpu_ab
// against 8 (both with hint 1, SmolLM2 3x APR, 8 rounds): dense 1.087x, CWIC 1.014x; 4 rows: 0.896x / 0.982x
static int g_prefetch_rows = [] {
  const char* e = std::getenv("CWIC_CPU_PREFETCH");
  int v = e ? std::atoi(e) : 16;
  return v > 0 ? v : 16;
}();

// A register tile is 256 outputs (AVX-512, batch 1), half of a 512-wide stripe, and a walk went over its list once
// for every 256 of a thread's outputs, so a CWIC walk used to read each active row in scattered 512 B pieces, one a
// pass over the list (the FFN's down product no longer walks this way: ffn_run). Now a thread's first tile of a
// stripe (sparse walks only: the dense walks, rows in order, are unchanged) prefetches each row's whole segment of
// that stripe, all the thread's
// tiles of it: the segment comes from memory once, contiguously, and the later tiles read it from the L2, or from
// the L3 to which the L2 spills. Only while the later segments, list length × bytes, fit in g_pf_stripe_budget
// (default 8 MiB: a quarter of the 32 MiB L3 of the benchmark host). On the 2-core AMD EPYC host (Zen 4, 1 MiB L2),
// 1B-shaped model at 3x APR: see experiments/results/cpu_amd_epyc_2026-12-03_pm/. CWIC_CPU_PF_STRIPE=0 turns it
// off; CWIC_CPU_PF_STRIPE_BUDGET sets the budget in bytes.
// Default: on, except on Intel CPUs. On a 2-core Intel Xeon host (family 6 model 207, 2 MiB L2), turning it off (and
// with it the group prefetch below) made the CWIC decode at 3x APR 1.08-1.12x faster for SmolLM2 and 1.04-1.06x for
// the 1B shape, paired round by round in one process; the decode tables at 3x went from 2.34x / 2.60x over dense to
// 2.59x / 2.68x and, with this default, 2.44x / 2.78x (experiments/results/cpu_xeon_2026-12-05/). On the AMD EPYC
// host they paid in its slower regime and cost 4-8 % in its faster one (cpu_amd_epyc_2026-12-04_late_night/,
// section 4), so they stay on there.
static int default_pf_stripe() {
#if CWIC_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return 0;
#endif
  return 1;
}
static int g_pf_stripe = [] {
  const char* e = std::getenv("CWIC_CPU_PF_STRIPE");
  return e ? std::atoi(e) : default_pf_stripe();
}();
static int64_t g_pf_stripe_budget = [] {
  const char* e = std::getenv("CWIC_CPU_PF_STRIPE_BUDGET");
  return e ? (int64_t)std::atoll(e) : (int64_t)8 << 20;
}();

// Groups of stripes (input-major sparse walks). In the input-major layout a row's outputs of all stripes are
// contiguous, yet a thread walks its stripes one after the other, so with small stripes (SmolLM2: 192 outputs, 384 B
// of bf16) it read each active row in separate 384 B pieces, one a pass; two cores read such pieces at about half the
// rate of 2304 B ones (experiments/results/cpu_amd_epyc_2026-12-03_updown/probes/seg.cpp). Now the first pass of a
// group of the thread's stripes prefetches each of its rows' whole span over the group, and the group takes as many
// whole stripes as keep list length x span within g_pf_group_budget (default a quarter of the L2), so the later
// passes find the rows that are on in them too (mostly the same rows) in the L2. Where not even one stripe fits (the
// 1B shapes' 512-wide stripes) the stripe prefetch above applies. On the 2-core AMD EPYC host, SmolLM2 at 3x APR:
// see experiments/results/cpu_amd_epyc_2026-12-03_updown/. CWIC_CPU_PF_GROUP_BUDGET sets the budget in bytes (0:
// off); CWIC_CPU_PF_STRIPE=0 turns off both.
static int64_t g_pf_group_budget = [] {
  const char* e = std::getenv("CWIC_CPU_PF_GROUP_BUDGET");
  if (e) return (int64_t)std::atoll(e);
  long l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
  l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return (int64_t)(l2 > 0 ? l2 : 1L << 20) / 4;
}();

// The walk tunables above, read and set while running: a probe compares settings in one process, round by round,
// where the host's drift between processes would be larger than their differences. A value < 0 keeps the setting.
// Not to be called while a kernel runs on another thread.
std::vector<int64_t> tuning() {
  return {g_prefetch_rows, g_pf_stripe, g_pf_stripe_budget, g_pf_group_budget};
}

void set_tuning(int64_t prefetch_rows, int64_t pf_stripe, int64_t stripe_budget, int64_t group_budget) {
  if (prefetch_rows > 0) g_prefetch_rows = (int)prefetch_rows;
  if (pf_stripe >= 0) g_pf_stripe = (int)pf_stripe;
  if (stripe_budget >= 0) g_pf_stripe_budget = stripe_budget;
  if (group_budget >= 0) g_pf_group_budget = group_budget;
}

float round_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {       // inf / nan: keep (quiet the nan)
    if (u & 0x007fffffu) u |= 0x00400000u;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
  }
  u &= 0xffff0000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float act_scalar(float v, int act) {
  switch (act) {
    case ACT_SILU: return v / (1.0f + std::exp(-v));
    case ACT_GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case ACT_GELU_TANH: {
      const float c = 0.79788456080286536f;   // sqrt(2 / pi)
      return 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
    case ACT_RELU: return (v > 0.0f || v != v) ? v : 0.0f;   // a NaN stays NaN, as F.relu has it
    default: return v;
  }
}

}  // namespace cwic_cpu

// ---- the three builds ------------------------------------------------------------------------
namespace cwic_cpu {
#define CWIC_ISA 0
#define CWIC_NS isa_scalar
#include "cwic_cpu_impl.inc"
#undef CWIC_NS
#undef CWIC_ISA
}  // namespace cwic_cpu

#if CWIC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace cwic_cpu {
#define CWIC_ISA 1
#define CWIC_NS isa_avx2
#include "cwic_cpu_impl.inc"
#undef CWIC_NS
#undef CWIC_ISA
}  // namespace cwic_cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace cwic_cpu {
#define CWIC_ISA 2
#define CWIC_NS isa_avx512
#include "cwic_cpu_impl.inc"
#undef CWIC_NS
#undef CWIC_ISA
}  // namespace cwic_cpu
#pragma GCC pop_options
#endif

namespace cwic_cpu {

int best_isa() {
#if CWIC_X86
  static int best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return (int)ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return (int)ISA_AVX2;
    return (int)ISA_SCALAR;
  }();
  return best;
#else
  return ISA_SCALAR;
#endif
}

int resolve_isa(int requested) {
  int b = best_isa();
  if (requested < 0 || requested > b) return b;
  return requested;
}

const char* isa_name(int isa) {
  switch (isa) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "scalar";
  }
}

static std::atomic<int64_t> g_isa_runs[3];

int64_t isa_runs(int isa) { return isa >= 0 && isa < 3 ? g_isa_runs[isa].load(std::memory_order_relaxed) : 0; }

static inline int counted(int isa) {   // one relaxed add a call, from the calling thread
  g_isa_runs[isa].fetch_add(1, std::memory_order_relaxed);
  return isa;
}

// the build of the resolved ISA runs `call` (a function of the included implementation and its arguments)
#if CWIC_X86
#define CWIC_DISPATCH(isa, call)                      \
  switch (counted(resolve_isa(isa))) {                 \
    case ISA_AVX512: return isa_avx512::call;          \
    case ISA_AVX2: return isa_avx2::call;              \
    default: return isa_scalar::call;                  \
  }
#else
#define CWIC_DISPATCH(isa, call) counted(ISA_SCALAR); return isa_scalar::call;
#endif

// an empty batch or matrix reads and writes nothing (the SIMD tiling assumes at least one token and output)
int64_t gemv(const GemvArgs& a, int nthreads, int isa) {
  if (a.B <= 0 || a.m <= 0) return 0;
  CWIC_DISPATCH(isa, gemv_run(a, nthreads))
}

int64_t ffn(const FfnArgs& a, int nthreads, int isa) {
  if (a.gate.B <= 0 || a.gate.n <= 0) return 0;
  CWIC_DISPATCH(isa, ffn_run(a, nthreads))
}

// ---- decode glue (small: plain loops, vectorised by the compiler) ------------------------------

void rmsnorm(const float* x, int B, int d, const void* w, int wdtype, float eps, float* out) {
  for (int b = 0; b < B; ++b) {
    const float* xb = x + (int64_t)b * d;
    float* ob = out + (int64_t)b * d;
    // 16 independent partial sums (one sum was a chain of d dependent adds, ~0.8 us for d = 576), then added
    // pairwise: the same order on every machine
    float acc[16] = {0.0f};
    int i0 = 0;
    for (; i0 + 16 <= d; i0 += 16)
      for (int j = 0; j < 16; ++j) acc[j] += xb[i0 + j] * xb[i0 + j];
    for (int i = i0; i < d; ++i) acc[i - i0] += xb[i] * xb[i];
    for (int w = 8; w > 0; w /= 2)
      for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
    const float ss = acc[0];
    const float r = 1.0f / std::sqrt(ss / (float)d + eps);
    if (wdtype == W_BF16) {
      const uint16_t* wb = static_cast<const uint16_t*>(w);
      for (int i = 0; i < d; ++i) ob[i] = xb[i] * r * bf16_to_f32(wb[i]);
    } else {
      const float* wf = static_cast<const float*>(w);
      for (int i = 0; i < d; ++i) ob[i] = xb[i] * r * wf[i];
    }
  }
}

void rope(float* v, int n_heads, int hd, const float* cos, const float* sin) {
  const int half = hd / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* p = v + (int64_t)h * hd;
    for (int i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

void attention(const float* q, const void* kc, const void* vc, int kv_dtype, int T, int n_heads, int n_kv, int hd,
               float scaling, float* out, float* scratch, int nthreads, int isa) {
  CWIC_DISPATCH(isa, attention_run(q, kc, vc, kv_dtype, T, n_heads, n_kv, hd, scaling, out, scratch, nthreads))
}

void act_mul(const float* g, const float* u, int n, int act, float* out, int isa) {
  CWIC_DISPATCH(isa, act_mul_run(g, u, n, act, out))
}

void act(float* g, int n, int act, int isa) { CWIC_DISPATCH(isa, act_inplace(g, n, act, false)) }

int64_t argmax(const float* x, int64_t n, int isa) { CWIC_DISPATCH(isa, argmax_run(x, n)) }

}  // namespace cwic_cpu
