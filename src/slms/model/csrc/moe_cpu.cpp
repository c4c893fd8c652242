#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>
#include <algorithm>
#include <optional>
#include <vector>
#include <tuple>

using at::Tensor;

namespace {

// The experts' activation, as slms.model.moe_kernels.NATIVE_ACTIVATIONS numbers it.
enum Act : int64_t { RELU = 0, GELU = 1, RELU2 = 2 };

void check_act(int64_t act) {
  TORCH_CHECK(act == RELU || act == GELU || act == RELU2,
              "slms MoE kernels: activation 0 (relu), 1 (gelu) or 2 (relu2) expected");
}

struct Group { int64_t e, a, b; };

// Contiguous runs of experts per thread, balanced by estimated cost (rows + a per-expert
// constant: a matmul of a few rows costs about what one of `fixed` rows does). When whole
// experts cannot be balanced (fewer experts with rows than threads, or a few large ones), one
// part: then the calling thread runs the loop and each op uses every thread.
std::vector<std::vector<Group>> partition(at::IntArrayRef counts, int64_t parts, int64_t fixed) {
  std::vector<Group> groups;
  int64_t start = 0, total = 0;
  for (int64_t e = 0; e < (int64_t)counts.size(); ++e) {
    if (counts[e]) { groups.push_back({e, start, start + counts[e]}); total += counts[e] + fixed; }
    start += counts[e];
  }
  std::vector<std::vector<Group>> out(std::max<int64_t>(parts, 1));
  int64_t acc = 0;
  for (auto& g : groups) {
    int64_t c = g.b - g.a + fixed;
    int64_t p = total ? std::min<int64_t>(parts - 1, (2 * acc + c) * parts / (2 * total)) : 0;
    out[p].push_back(g);
    acc += c;
  }
  int64_t worst = 0;
  for (auto& part : out) {
    int64_t c = 0;
    for (auto& g : part) c += g.b - g.a + fixed;
    worst = std::max(worst, c);
  }
  if (parts > 1 && worst * parts > total * 5 / 4) return {groups};
  return out;
}

// body(p) for every part p: one thread per part, each with the caller's thread-local state
// (grad mode, inference mode: OpenMP workers start without it) and autograd skipped (the ops'
// outputs are written in place); a single part runs on the calling thread, its ops threaded.
template <typename F>
void run_parts(int64_t parts, const F& body) {
  if (parts == 1) {
    at::AutoDispatchBelowAutograd no_autograd;
    body(0);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(state);
    at::AutoDispatchBelowAutograd no_autograd;
    for (int64_t p = p0; p < p1; ++p) body(p);
  });
}

int64_t max_rows(const std::vector<Group>& gs) {
  int64_t m = 0;
  for (auto& g : gs) m = std::max(m, g.b - g.a);
  return m;
}

// b1, b2 absent: experts without biases (model.moe.bias = false).
std::tuple<Tensor, Tensor> experts_fwd(const Tensor& x, const Tensor& token, const Tensor& w1,
                                       const std::optional<Tensor>& b1, const Tensor& w2,
                                       const std::optional<Tensor>& b2, at::IntArrayRef counts,
                                       int64_t act_kind) {
  check_act(act_kind);
  const int64_t N = token.numel(), H = w1.size(2), D = x.size(1), Do = w2.size(2);
  Tensor pre = at::empty({N, H}, x.options());
  Tensor y = at::empty({N, Do}, x.options());
  auto parts = partition(counts, at::get_num_threads(), 16);
  run_parts((int64_t)parts.size(), [&](int64_t p) {
    int64_t rows = max_rows(parts[p]);
    if (!rows) return;
    Tensor xbuf = at::empty({rows, D}, x.options());
    Tensor hbuf = act_kind != RELU ? at::empty({rows, H}, x.options()) : Tensor();
    for (auto& g : parts[p]) {
      int64_t n = g.b - g.a;
      Tensor xs = xbuf.narrow(0, 0, n);
      at::index_select_out(xs, x, 0, token.narrow(0, g.a, n));
      Tensor h = pre.narrow(0, g.a, n);
      if (b1) at::addmm_out(h, (*b1)[g.e], xs, w1[g.e]);
      else at::mm_out(h, xs, w1[g.e]);
      // pre keeps what the backward needs: relu(h) for relu and relu2, h for gelu
      Tensor act = h;
      if (act_kind == GELU) {
        act = hbuf.narrow(0, 0, n);
        at::gelu_out(act, h);
      } else {
        h.relu_();
        if (act_kind == RELU2) { act = hbuf.narrow(0, 0, n); at::mul_out(act, h, h); }
      }
      Tensor ys = y.narrow(0, g.a, n);
      if (b2) at::addmm_out(ys, (*b2)[g.e], act, w2[g.e]);
      else at::mm_out(ys, act, w2[g.e]);
    }
  });
  return {pre, y};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> experts_bwd(
    const Tensor& g, const Tensor& x, const Tensor& token, const Tensor& w_N, const Tensor& pre,
    Tensor& y, const Tensor& w1, const Tensor& w2, at::IntArrayRef counts, int64_t act_kind,
    bool need_gx) {
  check_act(act_kind);
  const int64_t D = x.size(1), H = w1.size(2), Do = w2.size(2);
  Tensor gw_N = at::empty_like(w_N);
  Tensor gw1 = at::empty_like(w1), gw2 = at::empty_like(w2);
  Tensor gb1 = at::empty({w1.size(0), H}, w1.options());
  Tensor gb2 = at::empty({w2.size(0), Do}, w2.options());
  for (int64_t e = 0; e < (int64_t)counts.size(); ++e) {
    if (!counts[e]) { gw1[e].zero_(); gb1[e].zero_(); gw2[e].zero_(); gb2[e].zero_(); }
  }
  auto parts = partition(counts, at::get_num_threads(), 16);
  run_parts((int64_t)parts.size(), [&](int64_t p) {
    int64_t rows = max_rows(parts[p]);
    if (!rows) return;
    Tensor gbuf = at::empty({rows, Do}, g.options());
    Tensor xbuf = at::empty({rows, D}, x.options());
    Tensor abuf = at::empty({rows, H}, x.options());
    Tensor pbuf = at::empty({rows, H}, x.options());
    Tensor actbuf = act_kind != RELU ? at::empty({rows, H}, x.options()) : Tensor();
    for (auto& gr : parts[p]) {
      int64_t n = gr.b - gr.a, e = gr.e;
      Tensor ys = y.narrow(0, gr.a, n), pr = pre.narrow(0, gr.a, n);
      Tensor gy = gbuf.narrow(0, 0, n);
      at::index_select_out(gy, g, 0, token.narrow(0, gr.a, n));
      Tensor gwn = gw_N.narrow(0, gr.a, n);
      at::linalg_vecdot_out(gwn, gy, ys);
      gy.mul_(w_N.narrow(0, gr.a, n).unsqueeze(1));
      Tensor xs = xbuf.narrow(0, 0, n);
      at::index_select_out(xs, x, 0, token.narrow(0, gr.a, n));
      Tensor ga = abuf.narrow(0, 0, n);
      at::mm_out(ga, gy, w2[e].t());
      Tensor gp = pbuf.narrow(0, 0, n), act = pr;
      if (act_kind == GELU) {
        act = actbuf.narrow(0, 0, n);
        at::gelu_out(act, pr);
        at::gelu_backward_out(gp, ga, pr);
      } else if (act_kind == RELU2) {  // pr = relu(h): act = pr^2, gp = ga * 2 * pr
        act = actbuf.narrow(0, 0, n);
        at::mul_out(act, pr, pr);
        at::mul_out(gp, ga, pr);
        gp.mul_(2);
      } else {
        at::threshold_backward_out(gp, ga, pr, 0);
      }
      Tensor gw2e = gw2[e], gb2e = gb2[e], gw1e = gw1[e], gb1e = gb1[e];
      at::mm_out(gw2e, act.t(), gy);
      at::sum_out(gb2e, gy, 0);
      at::mm_out(gw1e, xs.t(), gp);
      at::sum_out(gb1e, gp, 0);
      if (need_gx) at::mm_out(ys, gp, w1[e].t());
    }
  });
  return {gw_N, gw1, gb1, gw2, gb2};
}


// ---------------------------------------------------------------------------------------------
// Decoding: a few tokens, no autograd, fp32. Each chosen expert's weights are streamed once
// from memory by hand-written loops (y = sum_k w_k * expert_k(x)); BLAS spends as long on a
// matmul of 1-8 rows as on one of dozens, and would run 2*K*T of them. Work items are
// (expert, hidden chunk) pairs, so that two threads share even a single expert; each thread
// sums into its own (T, D) buffer, added up at the end.

using v8 = float __attribute__((vector_size(32)));  // 8 floats: one AVX2 register
// The same, unaligned in memory, and allowed to alias the floats it is read from.
using v8u = float __attribute__((vector_size(32), aligned(4), may_alias));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }

// out[r][c:c + 8 * NV] += sum_{i0 <= i < i1} a[r][i] * w[i * ldw + c + ...], for R rows: the
// R x 8NV sums in registers, each weight loaded once for the R rows.
template <int R, int NV>
inline void gemm_block(float* const* out, const float* const* a, const float* w, int64_t ldw,
                       int64_t i0, int64_t i1, int64_t c) {
  v8 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load8(out[r] + c + 8 * v);
  for (int64_t i = i0; i < i1; ++i) {
    const float* wr = w + i * ldw + c;
    v8 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load8(wr + 8 * v);
    for (int r = 0; r < R; ++r) {
      const v8 av = v8{} + a[r][i];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store8(out[r] + c + 8 * v, acc[r][v]);
}

// out[r][0:n] += sum_i a[r][i] * w[i * ldw + 0:n], for R rows (R <= 4) and i < L: 64 columns at
// a time over tiles of 16 rows of w, whose 16 rows are then 16 sequential streams (a walk down
// one column block would touch a new page every row: no prefetching). (Measured here: 64
// columns 5-12% faster than 32; tiles of 8 or 32 rows, or software prefetching, no faster.)
template <int R>
void gemm_rows(float* const* out, const float* const* a, const float* w, int64_t ldw, int64_t L,
               int64_t n) {
  constexpr int64_t TI = 16;
  for (int64_t i0 = 0; i0 < L; i0 += TI) {
    const int64_t i1 = std::min(L, i0 + TI);
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) gemm_block<R, 8>(out, a, w, ldw, i0, i1, c);
    for (; c + 8 <= n; c += 8) gemm_block<R, 1>(out, a, w, ldw, i0, i1, c);
    for (; c < n; ++c)  // the last n % 8 columns
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int64_t i = i0; i < i1; ++i) sum += a[r][i] * w[i * ldw + c];
        out[r][c] += sum;
      }
  }
}

// gemm_rows over any number of rows, four at a time.
void gemm_rows_any(float* const* out, const float* const* a, int64_t M, const float* w,
                   int64_t ldw, int64_t L, int64_t n) {
  for (int64_t m = 0; m < M; m += 4) {
    switch (std::min<int64_t>(4, M - m)) {
      case 4: gemm_rows<4>(out + m, a + m, w, ldw, L, n); break;
      case 3: gemm_rows<3>(out + m, a + m, w, ldw, L, n); break;
      case 2: gemm_rows<2>(out + m, a + m, w, ldw, L, n); break;
      default: gemm_rows<1>(out + m, a + m, w, ldw, L, n);
    }
  }
}

// b1, b2 absent: experts without biases (model.moe.bias = false).
Tensor experts_decode(const Tensor& x, const Tensor& experts, const Tensor& weights,
                      const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                      const std::optional<Tensor>& b2, int64_t act_kind) {
  check_act(act_kind);
  TORCH_CHECK(b1.has_value() == b2.has_value(), "experts_decode: both biases or neither");
  for (const Tensor* t : {&x, &weights, &w1, &w2}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "experts_decode: fp32 contiguous tensors expected");
  }
  for (const auto* b : {&b1, &b2}) {
    TORCH_CHECK(!*b || ((*b)->scalar_type() == at::kFloat && (*b)->is_contiguous()),
                "experts_decode: fp32 contiguous tensors expected");
  }
  TORCH_CHECK(experts.scalar_type() == at::kLong, "experts_decode: int64 expert ids expected");
  TORCH_CHECK(x.dim() == 2 && experts.dim() == 2 && experts.sizes() == weights.sizes() &&
                  experts.size(0) == x.size(0),
              "experts_decode: x (T, D), experts and weights (T, K) expected");
  const Tensor ex = experts.contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = ex.size(1);
  const int64_t E = w1.size(0), H = w1.size(2);
  TORCH_CHECK(w1.sizes() == at::IntArrayRef({E, D, H}) && w2.sizes() == at::IntArrayRef({E, H, D}) &&
                  (!b1 || (b1->sizes() == at::IntArrayRef({E, H}) &&
                           b2->sizes() == at::IntArrayRef({E, D}))),
              "experts_decode: expert weights (E, D, H), (E, H), (E, H, D), (E, D) expected");
  // The slots (t * K + k) of each expert.
  std::vector<std::vector<int64_t>> slots(E);
  const int64_t* ids = ex.data_ptr<int64_t>();
  for (int64_t s = 0; s < T * K; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, "experts_decode: expert id out of range");
    for (int64_t k = s - s % K; k < s; ++k)  // one output row per (expert, token) in gemm_rows
      TORCH_CHECK(ids[k] != ids[s], "experts_decode: a token chose the same expert twice");
    slots[ids[s]].push_back(s);
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) if (!slots[e].empty()) active.push_back(e);
  const int64_t P = at::get_num_threads();
  // Hidden chunks: enough items for every thread (several each, to balance), each a multiple
  // of 64 units wide.
  const int64_t want = std::max<int64_t>(1, (4 * P + (int64_t)active.size() - 1) /
                                                std::max<int64_t>(1, active.size()));
  const int64_t chunk = std::max<int64_t>(64, ((H + want - 1) / want + 63) / 64 * 64);
  const int64_t C = (H + chunk - 1) / chunk;
  const int64_t items = (int64_t)active.size() * C;
  Tensor acc = at::zeros({P, T, D}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = weights.data_ptr<float>();
  const float *w1p = w1.data_ptr<float>(), *b1p = b1 ? b1->data_ptr<float>() : nullptr;
  const float *w2p = w2.data_ptr<float>(), *b2p = b2 ? b2->data_ptr<float>() : nullptr;
  float* accp = acc.data_ptr<float>();
  // gelu_ is the only ATen call in the workers: only it needs the caller's state (run_parts).
  const std::optional<at::ThreadLocalState> state =
      act_kind == GELU ? std::make_optional<at::ThreadLocalState>() : std::nullopt;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::optional<at::ThreadLocalStateGuard> guard;
    if (state) guard.emplace(*state);
    at::AutoDispatchBelowAutograd no_autograd;
    // This thread's sums. (Run serially inside an enclosing parallel region, a call's items
    // all run on one thread, whose number may be any: clamped, its buffer is still its own.)
    float* y = accp + std::min<int64_t>(at::get_thread_num(), P - 1) * T * D;
    std::vector<float> hbuf;
    std::vector<const float*> xs, hs;
    std::vector<float*> hout, yout;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = active[i / C], j0 = (i % C) * chunk, n = std::min(chunk, H - j0);
      const auto& sl = slots[e];
      const int64_t M = sl.size();
      hbuf.resize(M * n);
      xs.resize(M), hs.resize(M), hout.resize(M), yout.resize(M);
      float* h = hbuf.data();
      for (int64_t m = 0; m < M; ++m) {
        if (b1p) std::copy(b1p + e * H + j0, b1p + e * H + j0 + n, h + m * n);
        else std::fill(h + m * n, h + (m + 1) * n, 0.0f);
        xs[m] = xp + (sl[m] / K) * D;
        hs[m] = hout[m] = h + m * n;
        yout[m] = y + (sl[m] / K) * D;
      }
      gemm_rows_any(hout.data(), xs.data(), M, w1p + e * D * H + j0, H, D, n);
      if (act_kind == GELU) {
        Tensor hb = at::from_blob(h, {M, n}, x.options());
        at::gelu_(hb);
      } else if (act_kind == RELU2) {
        for (int64_t j = 0; j < M * n; ++j) {
          const float r = std::max(h[j], 0.0f);
          h[j] = r * r;
        }
      } else {
        for (int64_t j = 0; j < M * n; ++j) h[j] = std::max(h[j], 0.0f);
      }
      for (int64_t m = 0; m < M; ++m) {  // gate weight; the output bias once per expert
        const float g = gp[sl[m]];
        for (int64_t j = 0; j < n; ++j) h[m * n + j] *= g;
        if (j0 == 0 && b2p)
          for (int64_t c = 0; c < D; ++c) yout[m][c] += g * b2p[e * D + c];
      }
      gemm_rows_any(yout.data(), hs.data(), M, w2p + (e * H + j0) * D, D, n, D);
    }
  });
  return P == 1 ? acc[0] : acc.sum(0);
}

}  // namespace

TORCH_LIBRARY(slms, m) {
  m.def("experts_fwd(Tensor x, Tensor token, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "int[] counts, int activation) -> (Tensor, Tensor)");
  m.def("experts_bwd(Tensor g, Tensor x, Tensor token, Tensor w_N, Tensor pre, Tensor(a!) y, "
        "Tensor w1, Tensor w2, int[] counts, int activation, bool need_gx) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("experts_decode(Tensor x, Tensor experts, Tensor weights, Tensor w1, Tensor? b1, "
        "Tensor w2, Tensor? b2, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(slms, CPU, m) {
  m.impl("experts_fwd", &experts_fwd);
  m.impl("experts_bwd", &experts_bwd);
  m.impl("experts_decode", &experts_decode);
}
