// The LoRA adapters' addition to one projection on the CPU (models/lora.py's StackedLoRA layout), registered as
// torch.ops.kvtriton.lora_delta; the decode step's C++ layers (cpu_decode_layers.cpp) call the same function, so a
// token's numbers do not depend on whether an eager or a one-call step decoded it.
//
// Why: in eager PyTorch the two products cost about ten small ops a projection, each a few microseconds of
// dispatch, for a few thousand multiply-adds a token; and the one-call decode step (which the default model's
// adapted requests otherwise left for the eager path) needs them in C++.
//
// Layout: a (S*W, in) and b_t (S*W, out), adapter s (1-based) owning rows (s-1)*W .. s*W - 1; columns (S*W, 2)
// holds each row's [first, last) output columns (its fused part's; empty for a row of padding or of a part the
// adapter leaves alone, which is skipped), b_t being zero outside them. Per token t of adapter s > 0:
//   h[r] = x_t . a[(s-1)W + r]                        (fp32, one fixed order of sums per row)
//   delta_t[c] = sum over r in order of h[r] * b_t[(s-1)W + r, c]   (from zero, one fused multiply-add a term)
// and delta_t = 0 for a base-model token. Every token's numbers come from its own row alone, so they do not
// depend on the batch or on how the loops are split between threads.
#include "cpu_lora.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kColumns = 256;        // output columns a task of the second product takes
constexpr int64_t kWorkPerTask = 16384;  // multiply-adds below which a loop runs on the calling thread

constexpr int kTile = 4;                 // tokens of one adapter that share each load of A and B

// Each of K rows xs[j] . y over n values (any n: the tail is a masked vector): per row four interleaved partial
// sums, then their sum, one fixed order for a given n whatever K is. The K rows share each load of y.
template <int K>
void dots(const float* const* xs, const float* y, int64_t n, float* out) {
  Vec acc[K][4];
  for (int j = 0; j < K; j++)
    for (int p = 0; p < 4; p++) acc[j][p] = Vec(0.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t count = std::min(kLanes, n - i);
    const Vec yv = Vec::loadu(y + i, count);
    const int p = (i / kLanes) % 4;
    for (int j = 0; j < K; j++) acc[j][p] = at::vec::fmadd(Vec::loadu(xs[j] + i, count), yv, acc[j][p]);
  }
  for (int j = 0; j < K; j++) {
    const Vec total = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
    out[j] = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, total);
  }
}

// For K tokens of one adapter, hs[j] their x A^T: outs[j][c .. c + count) = sum over the adapter's rows r, in
// order, of hs[j][r] * rows[r][c ..], from zero, one fused multiply-add a term. A row whose columns miss these is
// skipped; one that overlaps them partly is taken whole, its B being zero outside its columns (a term h * 0 adds
// exactly nothing), so the sums are the same either way. The K tokens share each load of B.
template <int K>
void products(const float* const* hs, const float* rows, const int64_t* cols, int64_t block, int64_t out, int64_t c,
              int64_t count, float* const* outs) {
  Vec acc[K];
  for (int j = 0; j < K; j++) acc[j] = Vec(0.0f);
  for (int64_t r = 0; r < block; r++) {
    if (cols[2 * r] >= c + count || c >= cols[2 * r + 1]) continue;
    const Vec b = Vec::loadu(rows + r * out + c, count);
    for (int j = 0; j < K; j++) acc[j] = at::vec::fmadd(Vec(hs[j][r]), b, acc[j]);
  }
  for (int j = 0; j < K; j++) acc[j].store(outs[j] + c, count);
}

template <typename F>
void by_tile_size(int k, F&& f) {  // f(std::integral_constant<int, k>) for k in 1 .. kTile
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace

namespace kvtriton {

void lora_delta_rows(const float* x, int64_t ldx, int64_t tokens, int64_t in, const float* a, const float* b_t,
                     int64_t out, const int64_t* columns, const int64_t* adapters, int64_t block, float* delta) {
  // Tiles of up to kTile tokens of one adapter (base-model tokens in none: their delta stays zero). A token's
  // numbers do not depend on its tile (dots and products say why), so neither on its batch.
  std::vector<int64_t> order;
  for (int64_t t = 0; t < tokens; t++)
    if (adapters[t] > 0) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return adapters[p] < adapters[q]; });
  std::vector<std::pair<int64_t, int>> tiles;  // (first index into order, tokens)
  for (size_t i = 0; i < order.size();) {
    int k = 1;
    while (k < kTile && i + k < order.size() && adapters[order[i + k]] == adapters[order[i]]) k++;
    tiles.emplace_back(static_cast<int64_t>(i), k);
    i += k;
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  // x A^T, each tile over its adapter's rows only (h[t * block + r]; rows of no columns skipped, left zero).
  std::vector<float> h(tokens * block, 0.0f);
  at::parallel_for(0, num_tiles * block, std::max<int64_t>(1, kWorkPerTask / (kTile * std::max<int64_t>(in, 1))),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; task++) {
      const auto [first, k] = tiles[task / block];
      const int64_t r = task % block, row = (adapters[order[first]] - 1) * block + r;
      if (columns[2 * row] >= columns[2 * row + 1]) continue;
      const float* xs[kTile];
      float dot[kTile];
      for (int j = 0; j < k; j++) xs[j] = x + order[first + j] * ldx;
      by_tile_size(k, [&](auto size) { dots<decltype(size)::value>(xs, a + row * in, in, dot); });
      for (int j = 0; j < k; j++) h[order[first + j] * block + r] = dot[j];
    }
  });
  // (x A^T) B^T over column chunks.
  const int64_t chunks = (out + kColumns - 1) / kColumns;
  const int64_t work = std::max<int64_t>(1, static_cast<int64_t>(order.size()) * block * kColumns);
  at::parallel_for(0, chunks, std::max<int64_t>(1, kWorkPerTask / work), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; chunk++)
      for (const auto& [first, k] : tiles) {
        const int64_t s = adapters[order[first]];
        const float* hs[kTile];
        float* outs[kTile];
        for (int j = 0; j < k; j++) {
          hs[j] = h.data() + order[first + j] * block;
          outs[j] = delta + order[first + j] * out;
        }
        for (int64_t c = chunk * kColumns; c < std::min(out, (chunk + 1) * kColumns); c += kLanes)
          by_tile_size(k, [&](auto size) {
            products<decltype(size)::value>(hs, b_t + (s - 1) * block * out, columns + 2 * (s - 1) * block, block, out,
                                            c, std::min(kLanes, out - c), outs);
          });
      }
  });
}

void check_lora_operands(const at::Tensor& a, const at::Tensor& b_t, const at::Tensor& columns, int64_t block,
                         int64_t in) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(1) == in,
              "lora_delta: a must be contiguous fp32 (adapters * block, in)");
  TORCH_CHECK(b_t.dim() == 2 && b_t.scalar_type() == at::kFloat && b_t.is_contiguous() && b_t.size(0) == a.size(0),
              "lora_delta: b_t must be contiguous fp32 (adapters * block, out)");
  TORCH_CHECK(columns.scalar_type() == at::kLong && columns.is_contiguous() && columns.numel() == 2 * a.size(0),
              "lora_delta: columns must be contiguous int64 (adapters * block, 2)");
  TORCH_CHECK(block > 0 && a.size(0) % block == 0, "lora_delta: block must divide a's rows");
}

void check_token_adapters(const at::Tensor& token_adapters, int64_t tokens, int64_t adapters) {
  TORCH_CHECK(token_adapters.scalar_type() == at::kLong && token_adapters.is_contiguous() &&
                  token_adapters.numel() == tokens,
              "lora_delta: token_adapters must be contiguous int64, one a token");
  const int64_t* s = token_adapters.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(s, s + tokens, [&](int64_t v) { return 0 <= v && v <= adapters; }),
              "lora_delta: a token's adapter is outside 0 .. ", adapters);
}

// x (N, in) fp32, token_adapters (N,) int64 in 0 .. S -> delta (N, out) fp32.
at::Tensor lora_delta(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b_t, const at::Tensor& columns,
                      const at::Tensor& token_adapters, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lora_delta: x must be fp32 (tokens, in)");
  check_lora_operands(a, b_t, columns, block, x.size(1));
  check_token_adapters(token_adapters, x.size(0), a.size(0) / block);
  const at::Tensor xc = x.contiguous();
  at::Tensor delta = at::zeros({x.size(0), b_t.size(1)}, x.options());
  lora_delta_rows(xc.data_ptr<float>(), xc.size(1), xc.size(0), xc.size(1), a.data_ptr<float>(),
                  b_t.data_ptr<float>(), b_t.size(1), columns.data_ptr<int64_t>(), token_adapters.data_ptr<int64_t>(),
                  block, delta.data_ptr<float>());
  return delta;
}

}  // namespace kvtriton

TORCH_LIBRARY_FRAGMENT(kvtriton, m) {
  m.def("lora_delta(Tensor x, Tensor a, Tensor b_t, Tensor columns, Tensor token_adapters, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvtriton, CPU, m) { m.impl("lora_delta", &kvtriton::lora_delta); }
