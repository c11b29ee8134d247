// CWIC CPU kernels: torch-free core (C++17, OpenMP, AVX2 / AVX-512 with a scalar twin).
//
// Semantics (kernels/reference.py):
//   y[b, o] = bias[o] + sum_i [ |x[b,i] - mean[i]| >= thr[o / stripe, i] ] * (x[b,i] - mean[i]) * wt[i, o]
// (a NaN input counts as on: its pairs are read and the NaN reaches the outputs, as in the dense product)
// with wt (n, m) input-major (W^T, one contiguous row of m outputs per input), fp32 or bf16; every
// activation, mean, threshold, bias and accumulator is fp32. A (stripe, input) pair that is off is one
// skipped contiguous run of `stripe` weights: the kernels build, per stripe, the list of active inputs
// (union over the batch) and then stream only those rows.
//
// Gated FFN: g = gemv(x; gate), a = act(g), M = |a| >= unit_thr, y = down_wt^T ((up_w x) * a * M), with
// up_w (F, d) (row j = unit j's input weights) and down_wt (F, d) (row j = unit j's output weights).
//
// Every entry point takes `isa` (ISA_SCALAR / ISA_AVX2 / ISA_AVX512, or -1 for the best this CPU runs)
// and `nthreads` (<= 0: OpenMP's default). The scalar twin runs the same algorithm one lane wide; for
// the GEMV it adds the same products in the same order with fused multiply-adds, so it is bitwise equal
// to the SIMD versions.
#pragma once
#include <cstdint>
#include <vector>

namespace cwic_cpu {

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum WDtype : int { W_F32 = 0, W_BF16 = 1 };
enum Act : int { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

int best_isa();                 // highest ISA this CPU supports
int resolve_isa(int requested); // -1 -> best; a level above what the CPU has -> the best it has
const char* isa_name(int isa);
int64_t isa_runs(int isa);      // calls that ran the build of `isa` so far (tests check that a requested ISA ran)
std::vector<int64_t> tuning();  // {prefetch rows, stripe prefetch on, its budget, group budget (bytes)}
void set_tuning(int64_t prefetch_rows, int64_t pf_stripe, int64_t stripe_budget, int64_t group_budget);  // < 0: keep

struct GemvArgs {
  const float* x = nullptr;      // (B, n) fp32
  int B = 1, n = 0, m = 0;
  const void* wt = nullptr;      // (n, m), W_F32 or W_BF16
  int wdtype = W_F32;
  const float* mean = nullptr;   // (mean_rows, n) or null (= 0); mean_rows is 1 or k
  int mean_rows = 1;
  const float* thr = nullptr;    // (k, n) or null: dense (every pair on)
  const float* bias = nullptr;   // (m) or null
  int stripe = 0;                // rows per output stripe (<= 0: m)
  // Weight layout: (i, o) of stripe r = o / stripe at wt + r * block_stride + i * row_stride + o - r * stripe.
  // Defaults (0): row_stride = m, block_stride = stripe, i.e. wt (n, m) input-major. Stripe-major
  // blocks (k, n, stripe) (last stripe zero-padded): row_stride = stripe, block_stride = n * stripe.
  int64_t row_stride = 0;
  int64_t block_stride = 0;
  const float* residual = nullptr; // (B, m) or null: added to y
  float* y = nullptr;            // (B, m) fp32 out (may alias residual)
};

// y = granular GEMV. Returns the number of weights read: sum over stripes of rows x active inputs
// (union over the batch).
int64_t gemv(const GemvArgs& a, int nthreads, int isa);

struct FfnArgs {
  GemvArgs gate;                 // gate.y ignored; gate.m = F units
  const void* up_w = nullptr;    // (F, d) rows up_ld apart, same dtype as gate.wt
  const void* down_wt = nullptr; // (F, d) rows down_ld apart
  // Row strides in elements (0: d, i.e. contiguous). Where unit j's up row and down row lie side by side (one (F, 2d)
  // block: up_w = block, down_wt = block + d, both ld 2d), one token reads an active unit as one contiguous span of
  // 2d weights, up and down in one pass (ffn_units).
  int64_t up_ld = 0;
  int64_t down_ld = 0;
  const float* unit_thr = nullptr; // (F) or null: every unit on
  int act = ACT_SILU;
  bool round_act_bf16 = false;   // g rounded to bf16 before act, act(g) after (a bf16 model and the reference)
  const float* residual = nullptr; // (B, d) or null
  float* y = nullptr;            // (B, d) fp32
};

// Fused gated FFN. Returns the weights read: gate's count + 2 * d * (active units, union over batch).
int64_t ffn(const FfnArgs& a, int nthreads, int isa);

// ---- decode glue (fp32 activations) ----
// out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w   (w fp32 or bf16)
void rmsnorm(const float* x, int B, int d, const void* w, int wdtype, float eps, float* out);
// Rotary embedding (Hugging Face "rotate_half" convention) of n_heads heads of size hd, in place:
// cos/sin hold hd/2 values for this position.
void rope(float* v, int n_heads, int hd, const float* cos, const float* sin);
// One query position attending to positions 0..T-1 of a (T_max, n_kv, hd) cache, fp32 or bf16 (kv_dtype
// W_F32 / W_BF16): q (n_heads, hd) -> out (n_heads, hd); grouped-query heads share kv head h / (n_heads / n_kv).
void attention(const float* q, const void* kc, const void* vc, int kv_dtype, int T, int n_heads, int n_kv, int hd,
               float scaling, float* out, float* scratch /* n_heads * T floats */, int nthreads, int isa = -1);
// act(g) * u elementwise (dense FFN; out may alias g), and act(g) in place: SiLU is vector code with a
// polynomial exp that gives the same bits in every ISA (the CWIC FFN uses the same); the other
// activations run act_scalar
void act_mul(const float* g, const float* u, int n, int act, float* out, int isa = -1);
void act(float* g, int n, int act, int isa = -1);
float act_scalar(float v, int act);
// the first index of the largest of x[0..n), NaNs skipped unless x[0] is one (then 0): greedy decoding's choice
int64_t argmax(const float* x, int64_t n, int isa = -1);
float round_bf16(float v);  // round to nearest even bf16, returned as fp32

}  // namespace cwic_cpu
