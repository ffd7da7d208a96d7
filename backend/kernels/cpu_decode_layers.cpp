// The CPU decode step's decoder layers in one call, for a model whose every projection runs the int4 GEMV
// (cpu_int4_gemv.cpp), and the decode attention they share with the eager steps. Registered as
// torch.ops.kvtriton.decode_layers and torch.ops.kvtriton.decode_attention; built into the GEMV's library by
// kernels/cpu_int4.py; runners/cpu_native_decode.py and attention/cpu_decode.py call them.
//
// Why: at one sequence the default model's compiled step spent about half its time in its matmuls, which are
// bound by memory, and most of the rest in Python between them: dynamo's guards and inductor's wrapper calling
// ~240 kernels and ops a step at a few microseconds each, while the second core waited (perf, 2-core Sapphire
// Rapids). Here all layers are one call: the same GEMV for every matmul, the work around them in C++.
//
// Numbers: the work around the matmuls computes what models/llama.py's eager ops compute, op for op in fp32,
// compiled with -ffp-contract=off as inductor compiles (no product and sum fused into one rounding): RMSNorm
// sums its squares in fp64 in the compiled graph's loop order (models/llama.py mean_square says why that keeps
// the eager bits), RoPE is rotate-half in fp32, silu is x / (exp(-x) + 1) with ATen's vectorized exp, as aten's
// and inductor's. Attention is this file's own loops; the eager steps' decode rows and the compiled graphs of
// larger batches call the same function, so a token does not depend on which kind of step decoded it.
//
// Layouts: x (B, hidden) fp32; cos/sin (B, 1, D/2) fp32; the pools (blocks, block_size, kv_heads, D) fp32 or fp8
// e4m3fn, a slot s being row s of their (blocks * block_size, kv_heads, D) view; tables (B, W) int64; mask (B, W *
// block_size) bool, true where a sequence attends (attention/paged.py decode_mask).
#include "cpu_int4_gemv.h"
#include "cpu_lora.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// out = w * (x * (1 / sqrt(mean(x^2) + eps))) over one row of H values (H a multiple of kLanes).
void rms_norm_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  at::vec::VectorizedN<double, 2> acc(0);
  for (int64_t i = 0; i < H; i += kLanes) {
    const auto d = at::vec::convert<double, 2, float, 1>(Vec::loadu(x + i));
    acc = acc + d * d;
  }
  const double sum = at::vec::vec_reduce_all<double, 2>(
      [](at::vec::Vectorized<double>& a, at::vec::Vectorized<double>& b) { return a + b; }, acc);
  const float mean = static_cast<float>(sum / static_cast<double>(H));
  const Vec rstd(1 / std::sqrt(static_cast<float>(mean + eps)));
  for (int64_t i = 0; i < H; i += kLanes) (Vec::loadu(w + i) * (Vec::loadu(x + i) * rstd)).store(out + i);
}

// HF rotate-half of one head: (x1 cos - x2 sin, x2 cos + x1 sin) with x1, x2 its halves (half a multiple of kLanes).
void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t half) {
  for (int64_t i = 0; i < half; i += kLanes) {
    const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + half + i);
    const Vec c = Vec::loadu(cos + i), s = Vec::loadu(sin + i);
    (x1 * c - x2 * s).store(out + i);
    (x2 * c + x1 * s).store(out + half + i);
  }
}

// 16 values of a KV pool as fp32. fp32 pools are read as they are; fp8 e4m3fn pools (kv_cache_dtype fp8)
// exactly: a byte s eeee mmm placed as the fp16 number s 0eeee mmm0000000 (the same mantissa; exponent bias 15
// against 7, so subnormals too), widened and times 2^8. Every e4m3fn value is an fp32 one: Tensor.to(float32)'s.
// (Widened where they are used: a chunk's rows widened once into a buffer for the group's heads measured slower,
// 16.6 against 11.3 ms a step at 3,900 tokens of context.)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
  const __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7);
  return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(sign, magnitude)), _mm512_set1_ps(256.0f));
}

// A K row (D a multiple of kLanes) against q in fp32: two interleaved partial sums, one fixed order.
template <typename T>
float dot_k(const float* q, const T* k, int64_t D) {
  __m512 even = _mm512_mul_ps(_mm512_loadu_ps(q), load16(k)), odd = _mm512_setzero_ps();
  for (int64_t d = kLanes; d < D; d += 2 * kLanes) {
    odd = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), odd);
    if (d + kLanes < D) even = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + kLanes), load16(k + d + kLanes), even);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
}

// dst[b, :n] += src[b, :n] for B rows, rows `dst_ld` and `src_ld` floats apart (src_ld 0: one row for all), one
// fp32 add an element, as Tensor.add: a residual, a bias, a LoRA addition.
void add_to_rows(float* dst, int64_t dst_ld, const float* src, int64_t src_ld, int64_t n, int64_t B) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t c = 0; c < n; c += kLanes) {
      const int64_t count = std::min(kLanes, n - c);
      (Vec::loadu(dst + b * dst_ld + c, count) + Vec::loadu(src + b * src_ld + c, count))
          .store(dst + b * dst_ld + c, count);
    }
}

// A value as an fp8 pool stores it (attention/kv_cache.py to_pool): saturated at +-448, then rounded to nearest even by
// c10's conversion, the one Tensor.to(float8_e4m3fn) makes.
inline uint8_t to_fp8(float v) { return c10::Float8_e4m3fn(std::min(std::max(v, -448.0f), 448.0f)).x; }

constexpr int64_t kChunk = 64;  // positions a task attends; fixed, so that a row's sums never depend on its batch

// Each sequence's query heads over the slots its mask row allows (flash-decoding): a task takes one chunk of
// kChunk positions of one (sequence, KV head), for the GROUP query heads that share it (each K/V row read once
// for all of them), and leaves its chunk's max, sum of exp and unnormalised output; a second pass merges the
// chunks in order. Softmax in fp32. A chunk the mask leaves empty (past a short context in a wide table)
// merges as nothing, so the result does not depend on the table's width either.
template <typename T>
void attend(const float* q, const T* k_pool, const T* v_pool, const int64_t* tables, const bool* mask,
            float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size, int64_t W, float scale) {
  const int64_t group = H / Hkv, L = W * block_size, chunks = (L + kChunk - 1) / kChunk;
  std::vector<float> part_max(B * H * chunks), part_sum(B * H * chunks), part_out(B * H * chunks * D);
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    int64_t rows[kChunk];
    float scores[kChunk];
    for (int64_t task = begin; task < end; task++) {
      const int64_t b = task / (Hkv * chunks), h = task / chunks % Hkv, c = task % chunks;
      int64_t n = 0;
      for (int64_t t = c * kChunk; t < std::min(L, (c + 1) * kChunk); t++)
        if (mask[b * L + t]) rows[n++] = ((tables[b * W + t / block_size] * block_size + t % block_size) * Hkv + h) * D;
      for (int64_t g = 0; g < group; g++) {
        const int64_t head = b * H + h * group + g, part = head * chunks + c;
        const float* qh = q + head * D;
        float top = -std::numeric_limits<float>::infinity(), total = 0.0f;
        for (int64_t i = 0; i < n; i++) {
          scores[i] = dot_k(qh, k_pool + rows[i], D) * scale;
          top = std::max(top, scores[i]);
        }
        for (int64_t i = 0; i < n; i += kLanes) {
          const int64_t count = std::min(kLanes, n - i);
          const Vec p = (Vec::loadu(scores + i, count) - Vec(top)).exp();
          p.store(scores + i, count);
          total += at::vec::vec_reduce_all<float>([](Vec& a, Vec& x) { return a + x; }, Vec::set(Vec(0.0f), p, count));
        }
        for (int64_t d = 0; d < D; d += kLanes) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < n; i++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[i]), load16(v_pool + rows[i] + d), acc);
          _mm512_storeu_ps(part_out.data() + part * D + d, acc);
        }
        part_max[part] = top;
        part_sum[part] = total;
      }
    }
  });
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; head++) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; c++) top = std::max(top, part_max[head * chunks + c]);
      float total = 0.0f;
      __m512 acc[256 / kLanes];
      for (int64_t d = 0; d < D; d += kLanes) acc[d / kLanes] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t part = head * chunks + c;
        if (part_sum[part] == 0.0f) continue;  // an empty chunk
        const float weight = std::exp(part_max[part] - top);
        total += part_sum[part] * weight;
        for (int64_t d = 0; d < D; d += kLanes)
          acc[d / kLanes] = _mm512_fmadd_ps(_mm512_set1_ps(weight), _mm512_loadu_ps(part_out.data() + part * D + d),
                                            acc[d / kLanes]);
      }
      const __m512 inverse = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
      for (int64_t d = 0; d < D; d += kLanes)
        _mm512_storeu_ps(out + head * D + d, _mm512_mul_ps(acc[d / kLanes], inverse));
    }
  });
}

void check_attention_operands(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                              const at::Tensor& tables, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "decode_attention: q must be contiguous fp32 (sequences, heads, head_dim)");
  const bool pool_type = k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(k_pool.dim() == 4 && pool_type && k_pool.is_contiguous() && v_pool.sizes() == k_pool.sizes() &&
                  v_pool.scalar_type() == k_pool.scalar_type() && v_pool.is_contiguous(),
              "decode_attention: the pools must be contiguous fp32 (blocks, block_size, kv_heads, head_dim)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && D % kLanes == 0 && D <= 256 && Hkv > 0 && H % Hkv == 0,
              "decode_attention: q's heads and head_dim do not match the pools'");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kLong && tables.is_contiguous(),
              "decode_attention: tables must be contiguous int64 (sequences, width)");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                  mask.numel() == B * tables.size(1) * k_pool.size(1),
              "decode_attention: mask must be contiguous bool with width * block_size entries a sequence");
}

// How a projection multiplies (runners/cpu_native_decode.py names the same kinds).
constexpr int64_t kGemv = 0;         // int4: the GEMV over x (weights: its packed codes, scales: scale_zeros)
constexpr int64_t kTwoPlanes = 1;    // int8 groups as two 4-bit planes: the GEMV over [x, x] (models/int8.py)
constexpr int64_t kInt8Channel = 2;  // int8 per channel: ATen's _weight_int8pack_mm in bf16 (scales: bf16 (N,))

void check_projection(const at::Tensor& weight, const at::Tensor& scales, int64_t kind, const at::Tensor& bias,
                      int64_t in) {
  if (kind == kInt8Channel) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == in &&
                    scales.scalar_type() == at::kBFloat16 && scales.numel() == weight.size(0),
                "decode_layers: an int8 per-channel projection needs int8 (N, ", in, ") codes and bf16 (N,) scales");
  } else {
    TORCH_CHECK(kind == kGemv || kind == kTwoPlanes, "decode_layers: unknown projection kind ", kind);
    TORCH_CHECK(weight.dim() == 3, "decode_layers: a GEMV projection needs the GEMV's packed (3-D) weight");
  }
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 1),
              "decode_layers: a bias must be contiguous fp32 (N,)");
}

void run_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                   const at::Tensor& tables, const at::Tensor& mask, float scale, float* out) {
  if (k_pool.scalar_type() == at::kFloat8_e4m3fn) {
    attend(q.data_ptr<float>(), static_cast<const uint8_t*>(k_pool.data_ptr()),
           static_cast<const uint8_t*>(v_pool.data_ptr()), tables.data_ptr<int64_t>(), mask.data_ptr<bool>(), out,
           q.size(0), q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), tables.size(1), scale);
    return;
  }
  attend(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), tables.data_ptr<int64_t>(),
         mask.data_ptr<bool>(), out, q.size(0), q.size(1), k_pool.size(2), q.size(2), k_pool.size(1),
         tables.size(1), scale);
}

}  // namespace

namespace kvtriton {

// q (B, H, D), its new K/V already in the pools -> (B, H, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& tables, const at::Tensor& mask, double scale) {
  check_attention_operands(q, k_pool, v_pool, tables, mask);
  at::Tensor out = at::empty_like(q);
  run_attention(q, k_pool, v_pool, tables, mask, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

// x (B, hidden) through every layer; writes each layer's new K/V at `slots` of its pools; returns the new x.
// Per layer l: norms[2l], norms[2l + 1] (the two RMSNorm weights) and weights / scales / kinds / group_sizes /
// biases [4l .. 4l + 3] (qkv, o, gate_up, down), as models/llama.py's decoder layer reads them: each projection
// as its layer's matmul computes it (project below), plus its bias where it has one; qk_norms [2l], [2l + 1]
// the RMSNorm weights of each head of q and of k before RoPE (Qwen3's QK-norm), or empty without. LoRA
// (models/lora.py): with token_adapters (B,) not empty, lora_a / lora_b_t / lora_columns / lora_blocks
// [4l .. 4l + 3] are those projections' stacked adapters (empty tensors where none adapts it), each added to
// its projection's output as the eager step adds
// StackedLoRA.delta (cpu_lora.cpp's same function, then one fp32 add).
at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms,
                         at::TensorList qk_norms, at::TensorList weights, at::TensorList scales,
                         at::IntArrayRef kinds, at::IntArrayRef group_sizes, at::TensorList biases,
                         at::TensorList k_pools,
                         at::TensorList v_pools, const at::Tensor& slots, const at::Tensor& tables,
                         const at::Tensor& mask, int64_t inter, double eps, double scale, int64_t num_heads,
                         at::TensorList lora_a, at::TensorList lora_b_t, at::TensorList lora_columns,
                         at::IntArrayRef lora_blocks, const at::Tensor& token_adapters) {
  const int64_t layers = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) % kLanes == 0,
              "decode_layers: x must be fp32 (sequences, hidden) with hidden a multiple of ", kLanes);
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_pools.size()) == layers &&
                  static_cast<int64_t>(norms.size()) == 2 * layers &&
                  static_cast<int64_t>(weights.size()) == 4 * layers && scales.size() == weights.size() &&
                  kinds.size() == weights.size() && group_sizes.size() == weights.size() &&
                  biases.size() == weights.size(),
              "decode_layers: per layer 2 norms, 4 projections (weight, scales, kind, group size, bias) and a K and "
              "V pool");
  const int64_t B = x_in.size(0), hidden = x_in.size(1), D = k_pools[0].size(3), Hkv = k_pools[0].size(2);
  const int64_t half = D / 2, q_size = num_heads * D, kv_size = Hkv * D;
  TORCH_CHECK(half % kLanes == 0, "decode_layers: head_dim must be a multiple of ", 2 * kLanes);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == B * half &&
                  sin.scalar_type() == at::kFloat && sin.is_contiguous() && sin.numel() == B * half,
              "decode_layers: cos and sin must be contiguous fp32 (sequences, 1, head_dim / 2)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B,
              "decode_layers: slots must be contiguous int64, one a sequence");
  TORCH_CHECK(qk_norms.empty() || static_cast<int64_t>(qk_norms.size()) == 2 * layers,
              "decode_layers: qk_norms must be empty or 2 a layer");
  for (const at::Tensor& w : qk_norms)
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D,
                "decode_layers: each QK-norm weight must be contiguous fp32 (head_dim,)");
  const float eps_f = static_cast<float>(eps), scale_f = static_cast<float>(scale);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();

  at::Tensor x = x_in.contiguous().clone();
  at::Tensor normed = at::empty({B, hidden}, x.options());
  at::Tensor q = at::empty({B, num_heads, D}, x.options());
  at::Tensor attended = at::empty({B, q_size}, x.options());
  TORCH_CHECK(inter % kLanes == 0, "decode_layers: the MLP width must be a multiple of ", kLanes);
  const int64_t ins[4] = {hidden, q_size, hidden, inter};  // each projection's inputs: qkv, o, gate_up, down
  for (int64_t i = 0; i < 4 * layers; i++) check_projection(weights[i], scales[i], kinds[i], biases[i], ins[i % 4]);
  at::Tensor activated = at::empty({B, inter}, x.options());
  std::vector<float> rotated(D);  // a K head before an fp8 pool stores it
  float* xp = x.data_ptr<float>();
  float* np = normed.data_ptr<float>();
  float* qp = q.data_ptr<float>();

  const bool adapted = token_adapters.numel() > 0;
  if (adapted) {
    TORCH_CHECK(static_cast<int64_t>(lora_a.size()) == 4 * layers && lora_b_t.size() == lora_a.size() &&
                    lora_columns.size() == lora_a.size() && lora_blocks.size() == lora_a.size(),
                "decode_layers: with token_adapters, 4 LoRA operands a layer (empty where none adapts it)");
    int64_t adapters = -1;
    for (int64_t i = 0; i < 4 * layers; i++) {
      if (lora_a[i].numel() == 0) continue;
      check_lora_operands(lora_a[i], lora_b_t[i], lora_columns[i], lora_blocks[i], ins[i % 4]);
      TORCH_CHECK(adapters < 0 || adapters == lora_a[i].size(0) / lora_blocks[i],
                  "decode_layers: every projection must stack the same adapters");
      adapters = lora_a[i].size(0) / lora_blocks[i];
    }
    check_token_adapters(token_adapters, B, std::max<int64_t>(adapters, 0));
  }
  // y[:, :out] += the LoRA addition of projection i to inputs x (B, in): delta first, then one fp32 add, as the
  // eager step's `out + lora.delta(x)`.
  auto add_lora = [&](int64_t i, const float* x_rows, int64_t in, at::Tensor& y) {
    if (!adapted || lora_a[i].numel() == 0) return;
    const int64_t out = lora_b_t[i].size(1), ld = y.size(1);
    TORCH_CHECK(ld >= out, "decode_layers: a LoRA adapter has more outputs than its projection");
    at::Tensor delta = at::zeros({B, out}, x_in.options());
    float* dp = delta.data_ptr<float>();
    lora_delta_rows(x_rows, in, B, in, lora_a[i].data_ptr<float>(), lora_b_t[i].data_ptr<float>(), out,
                    lora_columns[i].data_ptr<int64_t>(), token_adapters.data_ptr<int64_t>(), lora_blocks[i], dp);
    add_to_rows(y.data_ptr<float>(), ld, dp, out, out, B);
  };
  // Projection i of inputs x (B, in) -> (B, >= its outputs) fp32, as the eager layer computes it, bias added.
  auto project = [&](int64_t i, const at::Tensor& x_rows) {
    at::Tensor y;
    switch (kinds[i]) {
      case kGemv: y = int4_gemv(x_rows, weights[i], scales[i], group_sizes[i]); break;
      case kTwoPlanes: y = int4_gemv(at::cat({x_rows, x_rows}, 1), weights[i], scales[i], group_sizes[i]); break;
      default: y = at::_weight_int8pack_mm(x_rows.to(at::kBFloat16), weights[i], scales[i]).to(at::kFloat); break;
    }
    if (biases[i].numel())  // every row the same bias: a source row stride of 0
      add_to_rows(y.data_ptr<float>(), y.size(1), biases[i].data_ptr<float>(), 0, biases[i].numel(), B);
    return y;
  };
  auto add_rows = [&](const at::Tensor& y) {  // x += y[:, :hidden]
    add_to_rows(xp, hidden, y.data_ptr<float>(), y.size(1), hidden, B);
  };
  auto norm_rows = [&](const at::Tensor& weight) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == hidden,
                "decode_layers: each norm weight must be contiguous fp32 (hidden,)");
    for (int64_t b = 0; b < B; b++)
      rms_norm_row(xp + b * hidden, weight.data_ptr<float>(), np + b * hidden, hidden, eps_f);
  };

  for (int64_t l = 0; l < layers; l++) {
    const at::Tensor& k_pool = k_pools[l];
    const at::Tensor& v_pool = v_pools[l];
    check_attention_operands(q, k_pool, v_pool, tables, mask);
    // Attention: RMSNorm, qkv, RoPE on q and k, the new k and v into the pools, attention, o_proj, residual.
    norm_rows(norms[2 * l]);
    at::Tensor qkv = project(4 * l, normed);
    add_lora(4 * l, np, hidden, qkv);
    TORCH_CHECK(qkv.size(1) >= q_size + 2 * kv_size, "decode_layers: the qkv weight has too few rows");
    const float* qkv_p = qkv.data_ptr<float>();
    const bool fp8 = k_pool.scalar_type() == at::kFloat8_e4m3fn;
    if (!qk_norms.empty()) {  // each head of q and k normalised in place, before RoPE (models/llama.py)
      const float* q_norm = qk_norms[2 * l].data_ptr<float>();
      const float* k_norm = qk_norms[2 * l + 1].data_ptr<float>();
      float* rows = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; b++) {
        float* row = rows + b * qkv.size(1);
        for (int64_t h = 0; h < num_heads; h++) rms_norm_row(row + h * D, q_norm, row + h * D, D, eps_f);
        for (int64_t h = 0; h < Hkv; h++) rms_norm_row(row + q_size + h * D, k_norm, row + q_size + h * D, D, eps_f);
      }
    }
    for (int64_t b = 0; b < B; b++) {
      const float* row = qkv_p + b * qkv.size(1);
      const float *c = cos_p + b * half, *s = sin_p + b * half;
      for (int64_t h = 0; h < num_heads; h++) rotate(row + h * D, c, s, qp + (b * num_heads + h) * D, half);
      if (!fp8) {
        float* k_row = k_pool.data_ptr<float>() + slot[b] * kv_size;
        for (int64_t h = 0; h < Hkv; h++) rotate(row + q_size + h * D, c, s, k_row + h * D, half);
        std::copy(row + q_size + kv_size, row + q_size + 2 * kv_size, v_pool.data_ptr<float>() + slot[b] * kv_size);
        continue;
      }
      uint8_t* k_row = static_cast<uint8_t*>(k_pool.data_ptr()) + slot[b] * kv_size;
      uint8_t* v_row = static_cast<uint8_t*>(v_pool.data_ptr()) + slot[b] * kv_size;
      for (int64_t h = 0; h < Hkv; h++) {
        rotate(row + q_size + h * D, c, s, rotated.data(), half);
        for (int64_t i = 0; i < D; i++) k_row[h * D + i] = to_fp8(rotated[i]);
      }
      for (int64_t i = 0; i < kv_size; i++) v_row[i] = to_fp8(row[q_size + kv_size + i]);
    }
    run_attention(q, k_pool, v_pool, tables, mask, scale_f, attended.data_ptr<float>());
    at::Tensor o = project(4 * l + 1, attended);
    add_lora(4 * l + 1, attended.data_ptr<float>(), q_size, o);
    add_rows(o);
    // MLP: RMSNorm, gate_up, silu(gate) * up, down, residual.
    norm_rows(norms[2 * l + 1]);
    at::Tensor gate_up = project(4 * l + 2, normed);
    add_lora(4 * l + 2, np, hidden, gate_up);
    TORCH_CHECK(gate_up.size(1) >= 2 * inter, "decode_layers: every layer's gate_up must have 2 x ", inter, " rows");
    const float* gu = gate_up.data_ptr<float>();
    float* ap = activated.data_ptr<float>();
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < inter; i += kLanes) {
        const Vec gate = Vec::loadu(gu + b * gate_up.size(1) + i);
        const Vec up = Vec::loadu(gu + b * gate_up.size(1) + inter + i);
        ((gate / (gate.neg().exp() + Vec(1.0f))) * up).store(ap + b * inter + i);
      }
    at::Tensor down = project(4 * l + 3, activated);
    add_lora(4 * l + 3, ap, inter, down);
    add_rows(down);
  }
  return x;
}

}  // namespace kvtriton

TORCH_LIBRARY_FRAGMENT(kvtriton, m) {
  m.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor mask, float scale) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor[] norms, Tensor[] qk_norms, Tensor[] weights, "
      "Tensor[] scales, "
      "int[] kinds, int[] group_sizes, Tensor[] biases, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor slots, "
      "Tensor tables, Tensor mask, int intermediate_size, "
      "float eps, float scale, int num_heads, Tensor[] lora_a, Tensor[] lora_b_t, Tensor[] lora_columns, "
      "int[] lora_blocks, Tensor token_adapters) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvtriton, CPU, m) {
  m.impl("decode_attention", &kvtriton::decode_attention);
  m.impl("decode_layers", &kvtriton::decode_layers);
}
