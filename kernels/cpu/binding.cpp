// Thin ATen / pybind11 binding of the torch-free core (cwic_cpu.h), plus `Decoder`: a whole greedy
// decode step of a Llama-family model in C++ (embedding -> RMSNorm -> q/k/v -> RoPE + KV cache (in the
// weights' precision) -> attention -> o -> RMSNorm -> FFN -> ... -> head -> argmax), so that Python
// overhead does not hide the kernels' gain. Every matrix is a `Lin` of one of three kinds, and only the matrix products differ
// between a dense and a CWIC model:
//   kind 0  dense, our kernel (input-major Wᵀ, every pair on: the same streaming code as CWIC)
//   kind 1  CWIC granular sparse GEMV (input-major Wᵀ, thresholds, mean, folded bias)
//   kind 2  dense, ATen `at::linear` on (m, n) weights in the weights' dtype (what F.linear runs)
// lighter than <torch/extension.h> (a third faster to compile): ATen + the pybind11 tensor casters
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cwic_cpu.h"

namespace {

using cwic_cpu::GemvArgs;

int wdtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return cwic_cpu::W_BF16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "cwic_cpu: weights must be float32 or bfloat16, got ",
              t.scalar_type());
  return cwic_cpu::W_F32;
}

int act_id(const std::string& a) {
  if (a == "silu" || a == "swish") return cwic_cpu::ACT_SILU;
  if (a == "gelu") return cwic_cpu::ACT_GELU;
  if (a == "gelu_pytorch_tanh" || a == "gelu_tanh" || a == "gelu_new") return cwic_cpu::ACT_GELU_TANH;
  if (a == "relu") return cwic_cpu::ACT_RELU;
  TORCH_CHECK(false, "cwic_cpu: unsupported activation ", a);
}

int threads(int64_t nthreads) { return nthreads > 0 ? (int)nthreads : at::get_num_threads(); }

at::Tensor f32c(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

const float* opt_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = f32c(*t);
  return keep.data_ptr<float>();
}

// mean (n,) or (k, n) and thr (k, n) ((n,) when k == 1), either undefined: checked by shape, not by element count (a
// transposed thr of the same size used to pass, and was read as if right)
void check_mean_thr(const at::Tensor& mean, const at::Tensor& thr, int64_t k, int64_t n, const char* what) {
  if (mean.defined())
    TORCH_CHECK((mean.dim() == 1 && mean.size(0) == n) || (mean.dim() == 2 && mean.size(0) == k && mean.size(1) == n),
                "cwic_cpu: ", what, "'s mean must be (n,) or (k, n) with n = ", n, ", k = ", k, ", got ", mean.sizes());
  if (thr.defined())
    TORCH_CHECK((thr.dim() == 2 && thr.size(0) == k && thr.size(1) == n) || (k == 1 && thr.dim() == 1 && thr.size(0) == n),
                "cwic_cpu: ", what, "'s thr must be (k, n) with k = ", k, ", n = ", n, ", got ", thr.sizes());
}

GemvArgs gemv_args(const at::Tensor& x32, const at::Tensor& wt, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& thr, const std::optional<at::Tensor>& bias, int64_t stripe,
                   std::vector<at::Tensor>& keep) {
  TORCH_CHECK(x32.dim() == 2 && wt.dim() == 2 && x32.size(1) == wt.size(0), "cwic_cpu: x (B, n) and wt (n, m)");
  TORCH_CHECK(wt.is_contiguous(), "cwic_cpu: wt must be contiguous");
  TORCH_CHECK(wt.size(1) >= 1, "cwic_cpu: the matrix has no outputs (wt is (n, 0))");   // k = m / stripe below
  GemvArgs a;
  a.x = x32.data_ptr<float>();
  a.B = (int)x32.size(0);
  a.n = (int)wt.size(0);
  a.m = (int)wt.size(1);
  a.wt = wt.data_ptr();
  a.wdtype = wdtype_of(wt);
  a.stripe = stripe > 0 ? (int)std::min<int64_t>(stripe, a.m) : a.m;
  const int k = (a.m + a.stripe - 1) / a.stripe;
  keep.resize(3);
  a.mean = opt_ptr(mean, keep[0]);
  a.thr = opt_ptr(thr, keep[1]);
  check_mean_thr(keep[0], keep[1], k, a.n, "the GEMV");
  if (a.mean) a.mean_rows = keep[0].dim() == 1 ? 1 : k;
  a.bias = opt_ptr(bias, keep[2]);
  if (a.bias) TORCH_CHECK(keep[2].dim() == 1 && keep[2].numel() == a.m, "cwic_cpu: bias must be (m,), m = ", a.m);
  return a;
}

// y (B, m) fp32 and the number of weights read
std::tuple<at::Tensor, int64_t> gemv(const at::Tensor& x, const at::Tensor& wt, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& thr, const std::optional<at::Tensor>& bias,
                                     int64_t stripe, int64_t isa, int64_t nthreads) {
  at::Tensor x32 = f32c(x);
  std::vector<at::Tensor> keep;
  GemvArgs a = gemv_args(x32, wt, mean, thr, bias, stripe, keep);
  at::Tensor y = at::empty({a.B, a.m}, x32.options());
  a.y = y.data_ptr<float>();
  int64_t reads;
  {
    pybind11::gil_scoped_release nogil;
    reads = cwic_cpu::gemv(a, threads(nthreads), (int)isa);
  }
  return {y, reads};
}

// one query position: q (n_heads, hd), caches (T, n_kv, hd) of one dtype (bf16 read as is, others as fp32)
// -> (n_heads, hd) fp32
at::Tensor attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, double scaling, int64_t isa,
                     int64_t nthreads) {
  TORCH_CHECK(q.dim() == 2 && kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.size(2) == q.size(1),
              "q (n_heads, hd), kc and vc (T, n_kv, hd)");
  TORCH_CHECK(kc.size(1) >= 1 && q.size(0) % kc.size(1) == 0, "n_heads must be a multiple of n_kv >= 1");
  TORCH_CHECK(vc.scalar_type() == kc.scalar_type(), "kc and vc must share one dtype");
  const bool bf = kc.scalar_type() == at::kBFloat16;   // bf16 read as is; any other dtype as fp32
  const int kvt = bf ? cwic_cpu::W_BF16 : cwic_cpu::W_F32;
  at::Tensor q32 = f32c(q), k = bf ? kc.contiguous() : f32c(kc), v = bf ? vc.contiguous() : f32c(vc);
  const int64_t T = kc.size(0), nh = q.size(0);
  at::Tensor out = at::empty_like(q32), scratch = at::empty({nh * std::max<int64_t>(T, 1)}, q32.options());
  pybind11::gil_scoped_release nogil;
  cwic_cpu::attention(q32.data_ptr<float>(), k.data_ptr(), v.data_ptr(), kvt, (int)T, (int)nh, (int)kc.size(1),
                      (int)q.size(1), (float)scaling, out.data_ptr<float>(), scratch.data_ptr<float>(),
                      threads(nthreads), (int)isa);
  return out;
}

// act(g) as the kernels compute it (fp32 out)
at::Tensor act(const at::Tensor& g, const std::string& a, int64_t isa) {
  at::Tensor o = g.to(at::kFloat).contiguous().clone();
  cwic_cpu::act(o.data_ptr<float>(), (int)o.numel(), act_id(a), (int)isa);
  return o;
}

// greedy decoding's choice over a 1-D fp32 tensor (cwic_cpu::argmax)
int64_t argmax(const at::Tensor& x, int64_t isa) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat, "cwic_cpu: argmax takes a 1-D fp32 tensor");
  at::Tensor c = x.contiguous();
  return cwic_cpu::argmax(c.data_ptr<float>(), c.numel(), (int)isa);
}

// the same with an explicit weight layout: (i, o) of stripe r at w + r * block_stride + i * row_stride + o - r * stripe
std::tuple<at::Tensor, int64_t> gemv_layout(const at::Tensor& x, const at::Tensor& w, int64_t m,
                                            const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& thr,
                                            const std::optional<at::Tensor>& bias, int64_t stripe, int64_t row_stride,
                                            int64_t block_stride, int64_t isa, int64_t nthreads) {
  at::Tensor x32 = f32c(x);
  TORCH_CHECK(w.is_contiguous(), "cwic_cpu: w must be contiguous");
  const int64_t n = x32.size(1);
  TORCH_CHECK(m >= 1 && n >= 1, "cwic_cpu: gemv_layout needs m >= 1 outputs and n >= 1 inputs");
  const int64_t s = stripe > 0 ? std::min<int64_t>(stripe, m) : m;
  const int64_t k = (m + s - 1) / s;
  TORCH_CHECK(row_stride > 0 && block_stride > 0, "cwic_cpu: row_stride and block_stride must be > 0");
  for (int64_t r = 0; r < k; ++r)   // each stripe's last element (its width: s, or what the last one has left)
    TORCH_CHECK(r * block_stride + (n - 1) * row_stride + std::min(s, m - r * s) <= w.numel(),
                "cwic_cpu: layout does not fit in w (stripe ", r, ")");
  std::vector<at::Tensor> keep;
  at::Tensor view = at::from_blob(w.data_ptr(), {n, m}, w.options());   // shape for the checks only
  GemvArgs a = gemv_args(x32, view, mean, thr, bias, stripe, keep);
  a.row_stride = row_stride;
  a.block_stride = block_stride;
  at::Tensor y = at::empty({a.B, a.m}, x32.options());
  a.y = y.data_ptr<float>();
  int64_t reads;
  {
    pybind11::gil_scoped_release nogil;
    reads = cwic_cpu::gemv(a, threads(nthreads), (int)isa);
  }
  return {y, reads};
}

// (F, d) with each row contiguous, rows any stride >= d apart (an (F, 2d) block's halves, say)
static bool rows_ok(const at::Tensor& t, int64_t F, int64_t d) {
  return t.dim() == 2 && t.size(0) == F && t.size(1) == d && (d <= 1 || t.stride(1) == 1) &&
         (F <= 1 || t.stride(0) >= d);
}

std::tuple<at::Tensor, int64_t> ffn(const at::Tensor& x, const at::Tensor& gate_wt,
                                    const std::optional<at::Tensor>& gate_mean,
                                    const std::optional<at::Tensor>& gate_thr,
                                    const std::optional<at::Tensor>& gate_bias, int64_t stripe,
                                    const at::Tensor& up_w, const at::Tensor& down_wt,
                                    const std::optional<at::Tensor>& unit_thr, const std::string& act, int64_t isa,
                                    int64_t nthreads) {
  at::Tensor x32 = f32c(x);
  std::vector<at::Tensor> keep;
  cwic_cpu::FfnArgs a;
  a.gate = gemv_args(x32, gate_wt, gate_mean, gate_thr, gate_bias, stripe, keep);
  const int F = a.gate.m, d = a.gate.n;
  TORCH_CHECK(rows_ok(up_w, F, d) && rows_ok(down_wt, F, d),
              "cwic_cpu: up_w and down_wt must be (F, d) with contiguous rows (a row stride >= d)");
  TORCH_CHECK(up_w.scalar_type() == gate_wt.scalar_type() && down_wt.scalar_type() == gate_wt.scalar_type(),
              "cwic_cpu: FFN weights must share one dtype");
  a.up_w = up_w.data_ptr();
  a.down_wt = down_wt.data_ptr();
  a.up_ld = up_w.stride(0);
  a.down_ld = down_wt.stride(0);
  at::Tensor ut;
  a.unit_thr = opt_ptr(unit_thr, ut);
  if (a.unit_thr) TORCH_CHECK(ut.dim() == 1 && ut.numel() == F, "cwic_cpu: unit_thr must be (F,), F = ", F);
  a.act = act_id(act);
  a.round_act_bf16 = x.scalar_type() == at::kBFloat16;   // the reference rounds g and act(g) to x's dtype
  at::Tensor y = at::empty({a.gate.B, d}, x32.options());
  a.y = y.data_ptr<float>();
  int64_t reads;
  {
    pybind11::gil_scoped_release nogil;
    reads = cwic_cpu::ffn(a, threads(nthreads), (int)isa);
  }
  return {y, reads};
}

// ------------------------------------------------------------------------------------ decoder

struct Lin {
  int64_t kind = 0;      // 0 dense (our kernel, wt (n, m)), 1 cwic (wt (n, m)), 2 dense ATen (w (m, n))
  int64_t stripe = 0;
  at::Tensor w, mean, thr, bias;   // mean/thr/bias fp32 (bias: for kind 2 in w's dtype), may be undefined
  int64_t m() const { return kind == 2 ? w.size(0) : w.size(1); }
  int64_t n() const { return kind == 2 ? w.size(1) : w.size(0); }
};

struct Ffn {
  bool cwic = false;
  std::string act = "silu";
  Lin gate;                         // cwic: gate GMM (d -> F)
  at::Tensor up_w, down_wt, unit_thr;  // cwic
  Lin gate_up, down;                // dense: (d -> 2F) and (F -> d), kind 0 or 2
};

class Decoder {
 public:
  Decoder(at::Tensor embed, at::Tensor norm, double eps, int64_t n_heads, int64_t n_kv, int64_t head_dim,
          double scaling, at::Tensor cos, at::Tensor sin, int64_t max_len, int64_t isa, int64_t nthreads)
      : embed_(embed.contiguous()), norm_(norm.contiguous()), eps_((float)eps), nh_((int)n_heads),
        nkv_((int)n_kv), hd_((int)head_dim), scaling_((float)scaling), cos_(f32c(cos)), sin_(f32c(sin)),
        max_len_(max_len), isa_((int)isa), nthreads_(threads(nthreads)) {
    TORCH_CHECK(cos_.size(0) >= max_len && cos_.size(1) == head_dim / 2, "cos/sin must be (max_len, head_dim/2)");
    TORCH_CHECK(n_kv >= 1 && n_heads >= 1 && n_heads % n_kv == 0 && head_dim >= 1,
                "cwic_cpu: n_heads must be a multiple of n_kv >= 1, and head_dim >= 1");
    d_ = embed_.size(1);
  }

  // qkv: one fused matrix or several whose outputs concatenate to q | k | v
  void add_layer(at::Tensor ln1, at::Tensor ln2, std::vector<Lin> qkv, Lin o, Ffn ffn) {
    Claim busy = claim();
    const int64_t qkv_out = (int64_t)(nh_ + 2 * nkv_) * hd_, attn = (int64_t)nh_ * hd_;
    int64_t total = 0;
    for (auto& q : qkv) { q = check(q, d_, "qkv"); total += q.m(); }
    TORCH_CHECK(total == qkv_out, "qkv must have (n_heads + 2 n_kv) * head_dim outputs");
    TORCH_CHECK(ln1.numel() == d_ && ln2.numel() == d_, "cwic_cpu: the layer norms must have d = ", d_, " weights");
    o = check(o, attn, "o");
    TORCH_CHECK(o.m() == d_, "cwic_cpu: o must have d = ", d_, " outputs, got ", o.m());
    if (ffn.cwic) {
      ffn.gate = check(ffn.gate, d_, "gate");
      TORCH_CHECK(ffn.up_w.defined() && ffn.down_wt.defined() && rows_ok(ffn.up_w, ffn.gate.m(), d_) &&
                      rows_ok(ffn.down_wt, ffn.gate.m(), d_) &&
                      ffn.up_w.scalar_type() == ffn.gate.w.scalar_type() &&
                      ffn.down_wt.scalar_type() == ffn.gate.w.scalar_type(),
                  "cwic_cpu: the FFN's up_w and down_wt must be (F, d) in the gate's dtype with contiguous rows");
    }
    else {
      ffn.gate_up = check(ffn.gate_up, d_, "gate_up");
      TORCH_CHECK(ffn.gate_up.m() % 2 == 0, "cwic_cpu: gate_up must have 2 F outputs");
      ffn.down = check(ffn.down, ffn.gate_up.m() / 2, "down");
      TORCH_CHECK(ffn.down.m() == d_, "cwic_cpu: down must have d = ", d_, " outputs, got ", ffn.down.m());
    }
    if (ffn.unit_thr.defined()) {
      ffn.unit_thr = f32c(ffn.unit_thr);
      TORCH_CHECK(ffn.cwic && ffn.unit_thr.numel() == ffn.gate.m(), "cwic_cpu: unit_thr must be (F,)");
    }
    layers_.push_back({ln1.contiguous(), ln2.contiguous(), qkv, o, ffn});
    h_ = at::Tensor();   // ensure_buffers sizes them again (a wider FFN after a step overflowed the old ones)
    kc_ = at::zeros({(int64_t)layers_.size(), max_len_, nkv_, hd_}, kv_bf16() ? at::kBFloat16 : at::kFloat);
    vc_ = at::zeros_like(kc_);
  }

  void set_head(Lin head) {
    Claim busy = claim();
    head_ = check(head, d_, "head");
    h_ = at::Tensor();   // ensure_buffers sizes the logits again (a larger head after a step overflowed them)
  }

  // one token at position pos: writes the cache, returns the argmax of the logits
  int64_t step(int64_t token, int64_t pos) {
    TORCH_CHECK(pos >= 0 && pos < max_len_, "position out of range");
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "step: token id ", token, " out of range [0, ",
                embed_.size(0), ")");
    pybind11::gil_scoped_release nogil;
    Claim busy = claim();
    return run(&token, 1, pos);
  }

  // tokens (B,) at positions pos .. pos + B - 1 in one pass (prompt prefill): every matrix product takes the B
  // tokens at once (the small-batch kernels: weights streamed once a call), the cache gets all B positions, each
  // token attends causally; returns the argmax of the last token's logits (the head runs on that token only)
  int64_t prefill(const at::Tensor& tokens, int64_t pos) {
    TORCH_CHECK(tokens.dim() == 1 && tokens.numel() > 0, "prefill: tokens must be a non-empty 1-D tensor");
    at::Tensor t = tokens.to(at::kLong).contiguous();
    const int64_t B = t.numel();
    TORCH_CHECK(pos >= 0 && pos + B <= max_len_, "prefill: positions out of range");
    const int64_t V = embed_.size(0);
    const int64_t* tp = t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(tp[b] >= 0 && tp[b] < V, "prefill: token id out of range");
    pybind11::gil_scoped_release nogil;
    Claim busy = claim();
    return run(tp, (int)B, pos);
  }

  at::Tensor logits() const { Lock lock(mu_); return logits_.clone(); }
  // cumulative weights read by [attention (q,k,v,o), FFN, head] and the number of steps
  std::vector<int64_t> reads() const { Lock lock(mu_); return {reads_[0], reads_[1], reads_[2], tokens_}; }
  // the same by matrix: {"qkv", "o", "ffn", "head"} (qkv + o = the attention's count above)
  std::map<std::string, int64_t> part_reads() const {
    Lock lock(mu_);
    return {{"qkv", reads_[0] - reads_o_}, {"o", reads_o_}, {"ffn", reads_[1]}, {"head", reads_[2]}};
  }
  void reset_reads() {
    Claim busy = claim();
    reads_[0] = reads_[1] = reads_[2] = reads_o_ = 0;
    tokens_ = 0;
    for (auto& p : prof_) p = 0.0;
  }
  // seconds spent in [glue (norms, RoPE, cache, embedding, argmax), q/k/v, attention, o, FFN, head]
  std::vector<double> profile() const { Lock lock(mu_); return std::vector<double>(prof_, prof_ + P_N); }
  void set_threads(int64_t n) { Claim busy = claim(); nthreads_ = threads(n); }
  void set_isa(int64_t isa) { Claim busy = claim(); isa_ = (int)isa; }

 private:
  struct Layer { at::Tensor ln1, ln2; std::vector<Lin> qkv; Lin o; Ffn ffn; };
  enum { P_GLUE = 0, P_QKV, P_ATTN, P_O, P_FFN, P_HEAD, P_N };
  struct Clock {
    double* acc;
    std::chrono::steady_clock::time_point t;
    explicit Clock(double* a) : acc(a), t(std::chrono::steady_clock::now()) {}
    void lap(int i) {
      auto n = std::chrono::steady_clock::now();
      acc[i] += std::chrono::duration<double>(n - t).count();
      t = n;
    }
  };

  // the KV cache is kept in the weights' precision: bf16 weights (embedding) -> bf16 cache, as a bf16
  // Hugging Face model keeps it; fp32 otherwise
  bool kv_bf16() const { return embed_.scalar_type() == at::kBFloat16; }
  static uint16_t to_bf16(float v) {
    const float r = cwic_cpu::round_bf16(v);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    return (uint16_t)(u >> 16);
  }

  // a matrix of `n_in` inputs, with mean (n,) or (k, n), thr (k, n) and bias (m,) when given
  static Lin check(Lin L, int64_t n_in, const char* what) {
    TORCH_CHECK(L.w.defined() && L.w.dim() == 2 && L.w.is_contiguous(), "Lin.w must be a contiguous matrix");
    TORCH_CHECK(L.kind >= 0 && L.kind <= 2, "Lin.kind must be 0, 1 or 2");
    TORCH_CHECK(L.n() == n_in, "cwic_cpu: ", what, " must have ", n_in, " inputs, got ", L.n(),
                L.kind == 2 ? " (kind 2: w is (m, n))" : " (kinds 0, 1: w is (n, m), input-major)");
    const int64_t m = L.m(), n = L.n();
    TORCH_CHECK(m >= 1, "cwic_cpu: ", what, " has no outputs");
    if (L.bias.defined()) TORCH_CHECK(L.bias.numel() == m, "cwic_cpu: ", what, "'s bias must be (m,), m = ", m);
    if (L.kind != 2) {
      wdtype_of(L.w);
      const int64_t s = L.stripe > 0 ? std::min<int64_t>(L.stripe, m) : m;
      if (L.mean.defined()) L.mean = f32c(L.mean);
      if (L.thr.defined()) L.thr = f32c(L.thr);
      check_mean_thr(L.mean, L.thr, (m + s - 1) / s, n, what);
      if (L.bias.defined()) L.bias = f32c(L.bias);
    }
    return L;
  }

  int64_t run(const int64_t* toks, int B, int64_t pos0) {
    TORCH_CHECK(head_.w.defined(), "set_head first");
    const int d = (int)d_;
    ensure_buffers(B);
    float* h = h_.data_ptr<float>();     // (B, d)
    float* xn = xn_.data_ptr<float>();   // (B, d)
    // embedding rows -> fp32
    for (int b = 0; b < B; ++b) {
      float* hb = h + (int64_t)b * d;
      if (embed_.scalar_type() == at::kBFloat16) {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(embed_.data_ptr()) + toks[b] * d;
        for (int i = 0; i < d; ++i) {
          uint32_t u = (uint32_t)e[i] << 16;
          std::memcpy(hb + i, &u, 4);
        }
      } else {
        std::memcpy(hb, embed_.data_ptr<float>() + toks[b] * d, sizeof(float) * d);
      }
    }
    const int64_t kv_row = (int64_t)nkv_ * hd_;
    const int64_t qkv_w = (int64_t)(nh_ + 2 * nkv_) * hd_;
    const int64_t att_w = (int64_t)nh_ * hd_;
    Clock tk(prof_);
    for (size_t li = 0; li < layers_.size(); ++li) {
      auto& L = layers_[li];
      cwic_cpu::rmsnorm(h, B, d, L.ln1.data_ptr(), wdtype_of(L.ln1), eps_, xn);
      tk.lap(P_GLUE);
      float* qkv = qkv_.data_ptr<float>();   // (B, qkv_w): q | k | v of each token
      if (L.qkv.size() == 1 || B == 1) {
        float* dst = qkv;
        for (auto& q : L.qkv) { reads_[0] += apply(q, xn, dst, nullptr, B); dst += q.m(); }
      } else {   // several matrices: each one's (B, m_i) block, then interleaved per token
        float* tmp = ffb_.data_ptr<float>();
        int64_t off = 0;
        for (auto& q : L.qkv) {
          const int64_t mi = q.m();
          reads_[0] += apply(q, xn, tmp, nullptr, B);
          for (int b = 0; b < B; ++b) std::memcpy(qkv + b * qkv_w + off, tmp + (int64_t)b * mi, sizeof(float) * mi);
          off += mi;
        }
      }
      tk.lap(P_QKV);
      const bool bf = kv_bf16();
      for (int b = 0; b < B; ++b) {
        const int64_t pos = pos0 + b;
        const float* cs = cos_.data_ptr<float>() + pos * (hd_ / 2);
        const float* sn = sin_.data_ptr<float>() + pos * (hd_ / 2);
        float* q = qkv + b * qkv_w;
        float* k = q + (int64_t)nh_ * hd_;
        float* v = k + kv_row;
        cwic_cpu::rope(q, nh_, hd_, cs, sn);
        cwic_cpu::rope(k, nkv_, hd_, cs, sn);
        const int64_t at_pos = ((int64_t)li * max_len_ + pos) * kv_row;   // this layer, this position
        if (bf) {
          uint16_t* kb = reinterpret_cast<uint16_t*>(kc_.data_ptr()) + at_pos;
          uint16_t* vb = reinterpret_cast<uint16_t*>(vc_.data_ptr()) + at_pos;
          for (int64_t i = 0; i < kv_row; ++i) {
            kb[i] = to_bf16(k[i]);
            vb[i] = to_bf16(v[i]);
          }
        } else {
          std::memcpy(kc_.data_ptr<float>() + at_pos, k, sizeof(float) * kv_row);
          std::memcpy(vc_.data_ptr<float>() + at_pos, v, sizeof(float) * kv_row);
        }
      }
      tk.lap(P_GLUE);
      float* att = att_.data_ptr<float>();   // (B, att_w)
      const int64_t layer0 = (int64_t)li * max_len_ * kv_row * kc_.element_size();
      for (int b = 0; b < B; ++b)   // causal: token b sees positions 0 .. pos0 + b (all written above)
        cwic_cpu::attention(qkv + b * qkv_w, static_cast<const char*>(kc_.data_ptr()) + layer0,
                            static_cast<const char*>(vc_.data_ptr()) + layer0, bf ? cwic_cpu::W_BF16 : cwic_cpu::W_F32,
                            (int)(pos0 + b) + 1, nh_, nkv_, hd_, scaling_, att + b * att_w,
                            scores_.data_ptr<float>(), nthreads_, isa_);
      tk.lap(P_ATTN);
      const int64_t ro = apply(L.o, att, h, h, B);
      reads_[0] += ro;
      reads_o_ += ro;
      tk.lap(P_O);
      cwic_cpu::rmsnorm(h, B, d, L.ln2.data_ptr(), wdtype_of(L.ln2), eps_, xn);
      tk.lap(P_GLUE);
      reads_[1] += apply_ffn(L.ffn, xn, h, B);
      tk.lap(P_FFN);
    }
    const float* hl = h + (int64_t)(B - 1) * d;   // the head: the last token only
    cwic_cpu::rmsnorm(hl, 1, d, norm_.data_ptr(), wdtype_of(norm_), eps_, xn);
    tk.lap(P_GLUE);
    float* lg = logits_.data_ptr<float>();
    reads_[2] += apply(head_, xn, lg, nullptr, 1);
    tk.lap(P_HEAD);
    tokens_ += B;
    const int64_t V = head_.m();
    const int64_t best = cwic_cpu::argmax(lg, V, isa_);
    tk.lap(P_GLUE);
    return best;
  }

  void ensure_buffers(int B) {   // work buffers for B tokens a pass
    if (h_.defined() && B <= bmax_) return;
    bmax_ = std::max(B, 1);
    int64_t mx = 0, ff = 0;
    for (auto& L : layers_) {
      int64_t t = 0;
      for (auto& q : L.qkv) t += q.m();
      mx = std::max({mx, t, L.o.m()});
      if (!L.ffn.cwic) ff = std::max(ff, L.ffn.gate_up.m());
      if (L.qkv.size() > 1) ff = std::max(ff, t);   // batch: each q/k/v block before interleaving
    }
    auto o = at::TensorOptions().dtype(at::kFloat);
    h_ = at::zeros({bmax_, d_}, o);
    xn_ = at::zeros({bmax_, d_}, o);
    qkv_ = at::zeros({bmax_, mx}, o);
    att_ = at::zeros({bmax_, (int64_t)nh_ * hd_}, o);
    ffb_ = at::zeros({bmax_, std::max<int64_t>(ff, 1)}, o);
    logits_ = at::zeros({head_.m()}, o);
    scores_ = at::zeros({(int64_t)nh_ * max_len_}, o);
  }

  // y (B, m) = L(x (B, n)) (+ resid; y may alias resid); returns the weights read
  int64_t apply(const Lin& L, const float* x, float* y, const float* resid, int B) {
    const int64_t m = L.m(), n = L.n();
    if (L.kind == 2) {
      at::Tensor xt = at::from_blob(const_cast<float*>(x), {B, n}, at::kFloat).to(L.w.scalar_type());
      at::Tensor out = at::linear(xt, L.w, L.bias.defined() ? std::optional<at::Tensor>(L.bias) : std::nullopt)
                           .to(at::kFloat).contiguous();
      const float* o = out.data_ptr<float>();
      if (resid) for (int64_t i = 0; i < B * m; ++i) y[i] = o[i] + resid[i];
      else std::memcpy(y, o, sizeof(float) * B * m);
      return m * n;
    }
    GemvArgs a;
    a.x = x; a.B = B; a.n = (int)n; a.m = (int)m;
    a.wt = L.w.data_ptr(); a.wdtype = wdtype_of(L.w);
    a.stripe = L.stripe > 0 ? (int)L.stripe : (int)m;
    if (L.kind == 1) {
      a.mean = L.mean.defined() ? L.mean.data_ptr<float>() : nullptr;
      a.mean_rows = (L.mean.defined() && L.mean.numel() != n) ? (int)(L.mean.numel() / n) : 1;
      a.thr = L.thr.defined() ? L.thr.data_ptr<float>() : nullptr;
    }
    a.bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
    a.residual = resid;
    a.y = y;
    return cwic_cpu::gemv(a, nthreads_, isa_);
  }

  int64_t apply_ffn(const Ffn& f, const float* x, float* h, int B) {
    const int d = (int)d_;
    if (f.cwic) {
      cwic_cpu::FfnArgs a;
      const Lin& g = f.gate;
      a.gate.x = x; a.gate.B = B; a.gate.n = d; a.gate.m = (int)g.m();
      a.gate.wt = g.w.data_ptr(); a.gate.wdtype = wdtype_of(g.w);
      a.gate.mean = g.mean.defined() ? g.mean.data_ptr<float>() : nullptr;
      a.gate.mean_rows = (g.mean.defined() && g.mean.numel() != d) ? (int)(g.mean.numel() / d) : 1;   // (k, n) too
      a.gate.thr = g.thr.defined() ? g.thr.data_ptr<float>() : nullptr;
      a.gate.bias = g.bias.defined() ? g.bias.data_ptr<float>() : nullptr;
      a.gate.stripe = g.stripe > 0 ? (int)g.stripe : a.gate.m;
      a.up_w = f.up_w.data_ptr();
      a.down_wt = f.down_wt.data_ptr();
      a.up_ld = f.up_w.stride(0);
      a.down_ld = f.down_wt.stride(0);
      a.unit_thr = f.unit_thr.defined() ? f.unit_thr.data_ptr<float>() : nullptr;
      a.act = act_id(f.act);
      a.residual = h;
      a.y = h;
      return cwic_cpu::ffn(a, nthreads_, isa_);
    }
    const int64_t F2 = f.gate_up.m(), F = F2 / 2;
    float* gu = ffb_.data_ptr<float>();   // (B, 2F): act(gate) * up into the first F of each row
    int64_t r = apply(f.gate_up, x, gu, nullptr, B);
    for (int b = 0; b < B; ++b) {
      float* row = gu + (int64_t)b * F2;
      cwic_cpu::act_mul(row, row + F, (int)F, act_id(f.act), row, isa_);
      if (b) std::memmove(gu + (int64_t)b * F, row, sizeof(float) * F);   // packed (B, F) for the down product
    }
    r += apply(f.down, gu, h, h, B);
    return r;
  }

  at::Tensor embed_, norm_;
  float eps_;
  int nh_, nkv_, hd_;
  float scaling_;
  at::Tensor cos_, sin_;
  int64_t max_len_;
  int isa_, nthreads_;
  // A decoder holds one sequence (its KV cache, its work buffers): step/prefill run without the GIL, and two
  // Python threads stepping one decoder overwrote each other's buffers mid-call. A call that changes it while
  // another such call runs is refused (interleaved sequences would be wrong even one call at a time); readers
  // (logits, reads, ...) and changers exclude each other through mu_, waiting for it. Every locking method runs
  // with the GIL released (call_guard below, or inside step/prefill): a thread in run() that needs the GIL (a Python
  // dispatch mode around at::linear) must not wait for a thread that holds the GIL while it waits for mu_.
  using Lock = std::lock_guard<std::mutex>;
  mutable std::mutex mu_;
  std::atomic<bool> busy_{false};
  class Claim {
   public:
    Claim(std::atomic<bool>& busy, std::mutex& mu) : busy_(busy), lock_(mu) {}
    ~Claim() {
      lock_.unlock();
      busy_.store(false);
    }
    Claim(const Claim&) = delete;
    Claim& operator=(const Claim&) = delete;

   private:
    std::atomic<bool>& busy_;
    std::unique_lock<std::mutex> lock_;
  };
  Claim claim() {
    bool idle = false;
    TORCH_CHECK(busy_.compare_exchange_strong(idle, true), "cwic_cpu: this Decoder is in use by another thread; a "
                "decoder holds one sequence (its cache and position): give each thread its own");
    return Claim(busy_, mu_);
  }
  int64_t d_ = 0;
  std::vector<Layer> layers_;
  Lin head_;
  at::Tensor kc_, vc_, h_, xn_, qkv_, att_, ffb_, logits_, scores_;
  int64_t reads_[3] = {0, 0, 0};
  int64_t reads_o_ = 0;
  double prof_[P_N] = {0, 0, 0, 0, 0, 0};
  int64_t tokens_ = 0;
  int64_t bmax_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CWIC CPU kernels (granular sparse GEMV, fused FFN, C++ decode step)";
  m.attr("ffn_row_strides") = true;   // up_w / down_wt may be an (F, 2d) block's halves (older builds: no)
  m.def("best_isa", &cwic_cpu::best_isa);
  m.def("resolve_isa", &cwic_cpu::resolve_isa);
  m.def("isa_runs", &cwic_cpu::isa_runs);
  m.def("tuning", &cwic_cpu::tuning, "the walk tunables: [prefetch rows, stripe prefetch on, its budget, group budget]");
  m.def("set_tuning", &cwic_cpu::set_tuning, "set the walk tunables (a value < 0 keeps it); not while a kernel runs",
        py::arg("prefetch_rows") = -1, py::arg("pf_stripe") = -1, py::arg("stripe_budget") = -1,
        py::arg("group_budget") = -1);
  m.def("isa_name", [](int64_t isa) { return std::string(cwic_cpu::isa_name((int)isa)); });
  m.def("gemv", &gemv, "granular sparse GEMV -> (y fp32 (B, m), weights read)", py::arg("x"), py::arg("wt"),
        py::arg("mean"), py::arg("thr"), py::arg("bias"), py::arg("stripe"), py::arg("isa") = -1,
        py::arg("nthreads") = 0);
  m.def("argmax", &argmax, "the decoder's greedy choice: the first index of the largest value, NaNs skipped unless at 0",
        py::arg("x"), py::arg("isa") = -1);
  m.def("gemv_layout", &gemv_layout, "granular sparse GEMV on an explicit weight layout (e.g. stripe-major)",
        py::arg("x"), py::arg("w"), py::arg("m"), py::arg("mean"), py::arg("thr"), py::arg("bias"), py::arg("stripe"),
        py::arg("row_stride"), py::arg("block_stride"), py::arg("isa") = -1, py::arg("nthreads") = 0);
  m.def("ffn", &ffn, "fused CWIC gated FFN -> (y fp32 (B, d), weights read)", py::arg("x"), py::arg("gate_wt"),
        py::arg("gate_mean"), py::arg("gate_thr"), py::arg("gate_bias"), py::arg("stripe"), py::arg("up_w"),
        py::arg("down_wt"), py::arg("unit_thr"), py::arg("act"), py::arg("isa") = -1, py::arg("nthreads") = 0);
  m.def("act", &act, "the activation as the kernels compute it -> fp32", py::arg("g"), py::arg("act"),
        py::arg("isa") = -1);
  m.def("attention", &attention, "one query position over a (T, n_kv, hd) fp32 or bf16 KV cache -> (n_heads, hd)",
        py::arg("q"), py::arg("kc"), py::arg("vc"), py::arg("scaling"), py::arg("isa") = -1, py::arg("nthreads") = 0);
  py::class_<Lin>(m, "Lin")
      .def(py::init<>())
      .def_readwrite("kind", &Lin::kind)
      .def_readwrite("stripe", &Lin::stripe)
      .def_readwrite("w", &Lin::w)
      .def_readwrite("mean", &Lin::mean)
      .def_readwrite("thr", &Lin::thr)
      .def_readwrite("bias", &Lin::bias);
  py::class_<Ffn>(m, "Ffn")
      .def(py::init<>())
      .def_readwrite("cwic", &Ffn::cwic)
      .def_readwrite("act", &Ffn::act)
      .def_readwrite("gate", &Ffn::gate)
      .def_readwrite("up_w", &Ffn::up_w)
      .def_readwrite("down_wt", &Ffn::down_wt)
      .def_readwrite("unit_thr", &Ffn::unit_thr)
      .def_readwrite("gate_up", &Ffn::gate_up)
      .def_readwrite("down", &Ffn::down);
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<at::Tensor, at::Tensor, double, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, int64_t,
                    int64_t, int64_t>())
      .def("add_layer", &Decoder::add_layer, py::call_guard<py::gil_scoped_release>())
      .def("set_head", &Decoder::set_head, py::call_guard<py::gil_scoped_release>())
      .def("step", &Decoder::step)
      .def("prefill", &Decoder::prefill)
      .def("logits", &Decoder::logits, py::call_guard<py::gil_scoped_release>())
      .def("reads", &Decoder::reads, py::call_guard<py::gil_scoped_release>())
      .def("part_reads", &Decoder::part_reads, py::call_guard<py::gil_scoped_release>())
      .def("reset_reads", &Decoder::reset_reads, py::call_guard<py::gil_scoped_release>())
      .def("profile", &Decoder::profile, py::call_guard<py::gil_scoped_release>())
      .def("set_threads", &Decoder::set_threads, py::call_guard<py::gil_scoped_release>())
      .def("set_isa", &Decoder::set_isa, py::call_guard<py::gil_scoped_release>());
}
