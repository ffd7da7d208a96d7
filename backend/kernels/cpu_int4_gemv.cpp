// INT4 weight-only matmul for a few rows on x86 CPUs with AVX-512 BF16 (Sapphire Rapids, Zen 4 and later):
// the decode step's matmuls, one to a few sequences. Registered as torch.ops.kvtriton.int4_gemv and built at
// first use by kernels/cpu_int4.py, which also packs the weights; models/int4.py calls it.
//
// Numbers: the weight is tinygemm's, w = (q - 8) * s + z with s and z in bf16 (the same operands as PyTorch's
// _weight_int4pack_mm_for_cpu), the activations are rounded to bf16, products are exact and sums fp32, and the
// result stays fp32 (PyTorch's kernel rounds it to bf16).
//
// Why it is faster than PyTorch's kernel at one row: that kernel converts each code to fp32 and subtracts and
// scales it before a multiply. Here a code becomes a bf16 number in one logic op: OR-ed under the exponent of
// 128.0 (0x4300), whose last mantissa bit is worth 1, it reads 128 + q exactly. vdpbf16ps then multiplies two
// codes by two inputs in each fp32 lane, and the per-group epilogue removes the 128 and applies the scale:
//     sum_k x_k w_k = s * sum_k x_k (128 + q_k) + (z - 136 s) * sum_k x_k      (over one group of inputs)
// so the inner loop is a load, three shifts, four logic ops and four dot instructions per 128 weights.
//
// Two forms of that loop compute the same bits. vdpbf16ps is defined as two fp32 FMAs a lane (the odd pair's
// product, then the even one's, each exact, each sum rounded once, inputs below fp32's normal range read as 0),
// so the FMA form widens each code pair and each input to fp32 and issues those two FMAs itself. Where the CPU
// runs vdpbf16ps at a fraction of its FMA rate (a 2-core "Intel Xeon Processor" VM: 1.75 G against 7.1 G
// instructions a second on one core, 2026-12-05), the FMA form multiplies 3+ rows faster; on Sapphire Rapids the
// dot form does. Which serves 3+ rows is timed once, at the first call (rows_form); one and two rows take the dot
// form (they wait on memory more than on the multiplies). Because the bits are the same, the choice never changes a
// result.
//
// Layouts (kernels/cpu_int4.py packs them):
//   packed       uint8 (N16/16, K/8, 64): per tile of 16 output rows and "oct" j of 8 inputs, 32 16-bit words;
//                word w is row 16t + w/2, slot s = w%2, and its nibble i holds the code of input 8j + 2i + s
//                (the pair that one fp32 lane of vdpbf16ps multiplies).
//   scale_zeros  bf16 (N16/16, G, 2, 16): per tile and group, the 16 rows' scales, then their zeros.
#include "cpu_int4_gemv.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int kTileRows = 16;
constexpr int kBlockTiles = 2;  // tiles a task multiplies together (measured: 2 beats 1 and 4 at one row)
constexpr int kMaxBlockRows = 4;  // input rows a pass multiplies at once (more spill the accumulators)
// The FMA form's: a tile a task and 8 rows a pass, its 16 accumulators and the two widened code vectors in
// registers (on the VM above, 8-16 rows of the default model's shapes took it 1.2-1.6x less time than the dot
// form; 4 rows of two tiles 1.0-1.4x, 12 rows spilled).
constexpr int kFmaBlockTiles = 1;
constexpr int kMaxFmaRows = 8;
// Fewer rows take the dot form wherever the FMA form is timed faster. A step's matmuls from memory (the default
// model's 30 layers' shapes, distinct weights) on that VM, dot against FMA: 2 rows 3.58-3.70 against 3.73-3.80 ms,
// 3 rows 4.81-5.12 against 4.58-4.74, 8 rows 10.8-11.9 against 8.7-9.5.
constexpr int kFmaMinRows = 3;

enum class Form { kDot, kFma };
// Each load of a block's codes, and each group's scales and zeros, first prefetches the same place kPrefetchBlocks
// blocks ahead. The hardware prefetchers alone left a step's matmuls at about half the memory bandwidth (each
// task reads two 4.6 KB tiles and a sparse stream of scales, short streams that keep crossing pages): the default
// model's one-sequence step went 7.3 -> 4.3 ms (2-core Sapphire Rapids; a block ahead measured the same).
constexpr int kPrefetchBlocks = 2;

inline __m512 bf16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Rows [m0, m0 + M) of x times tiles [t0, t0 + T), added up over all groups, written to out (fp32, ld N16).
// x_pairs: the rows as bf16 pairs (the dot form's); x_floats: the same numbers in fp32 (the FMA form's).
template <Form F, int T, int M>
void multiply_block(const uint8_t* packed, const uint16_t* scale_zeros, const uint32_t* x_pairs,
                    const float* x_floats, const float* x_sums, float* out, int64_t K, int64_t G, int64_t group_size,
                    int64_t t0, int64_t N16) {
  const __m512i low_nibble = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t octs = K / 8, octs_per_group = group_size / 8, pairs = K / 2;
  // The tiles kPrefetchBlocks blocks ahead that exist (none past the weight's last).
  const int ahead = static_cast<int>(std::clamp<int64_t>(N16 / kTileRows - (t0 + T * kPrefetchBlocks), 0, T));
  __m512 y[T][M];
  for (int t = 0; t < T; t++)
    for (int m = 0; m < M; m++) y[t][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    // Two accumulators per (tile, row): even and odd nibbles, so consecutive dot instructions do not wait
    // on each other.
    __m512 acc[T][M][2];
    for (int t = 0; t < T; t++)
      for (int m = 0; m < M; m++) acc[t][m][0] = acc[t][m][1] = _mm512_setzero_ps();
    for (int t = 0; t < ahead; t++)
      _mm_prefetch(
          reinterpret_cast<const char*>(scale_zeros + ((t0 + T * kPrefetchBlocks + t) * G + g) * 2 * kTileRows),
          _MM_HINT_T0);
    for (int64_t j = g * octs_per_group; j < (g + 1) * octs_per_group; j++) {
      __m512i w[T][4];
      for (int t = 0; t < T; t++) {
        if (t < ahead)
          _mm_prefetch(reinterpret_cast<const char*>(packed + ((t0 + T * kPrefetchBlocks + t) * octs + j) * 64),
                       _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(packed + ((t0 + t) * octs + j) * 64);
        // 0xEA: (a & b) | c
        w[t][0] = _mm512_ternarylogic_epi32(v, low_nibble, bf16_128, 0xEA);
        w[t][1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low_nibble, bf16_128, 0xEA);
        w[t][2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low_nibble, bf16_128, 0xEA);
        w[t][3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 12), low_nibble, bf16_128, 0xEA);
      }
      if constexpr (F == Form::kDot) {
        for (int m = 0; m < M; m++) {
          const uint32_t* xr = x_pairs + m * pairs + 4 * j;
          for (int i = 0; i < 4; i++) {
            const __m512bh xi = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[i]));
            for (int t = 0; t < T; t++) acc[t][m][i & 1] = _mm512_dpbf16_ps(acc[t][m][i & 1], (__m512bh)w[t][i], xi);
          }
        }
      } else {
        for (int i = 0; i < 4; i++) {
          __m512 odd[T], even[T];  // each lane's two codes (128 + q) in fp32: the high bf16, then the low one
          for (int t = 0; t < T; t++) {
            odd[t] = _mm512_castsi512_ps(_mm512_and_si512(w[t][i], high_halves));
            even[t] = _mm512_castsi512_ps(_mm512_slli_epi32(w[t][i], 16));
          }
          for (int m = 0; m < M; m++) {
            const float* xr = x_floats + m * K + 8 * j + 2 * i;
            const __m512 x_odd = _mm512_set1_ps(xr[1]), x_even = _mm512_set1_ps(xr[0]);
            for (int t = 0; t < T; t++) {
              acc[t][m][i & 1] = _mm512_fmadd_ps(odd[t], x_odd, acc[t][m][i & 1]);
              acc[t][m][i & 1] = _mm512_fmadd_ps(even[t], x_even, acc[t][m][i & 1]);
            }
          }
        }
      }
    }
    for (int t = 0; t < T; t++) {
      const uint16_t* sz = scale_zeros + ((t0 + t) * G + g) * 2 * kTileRows;
      const __m512 scale = bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz)));
      const __m512 zero = bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + kTileRows)));
      const __m512 bias = _mm512_fnmadd_ps(scale, _mm512_set1_ps(136.0f), zero);  // z - 8 s - 128 s
      for (int m = 0; m < M; m++) {
        y[t][m] = _mm512_fmadd_ps(_mm512_add_ps(acc[t][m][0], acc[t][m][1]), scale, y[t][m]);
        y[t][m] = _mm512_fmadd_ps(bias, _mm512_set1_ps(x_sums[m * G + g]), y[t][m]);
      }
    }
  }
  for (int t = 0; t < T; t++)
    for (int m = 0; m < M; m++) _mm512_storeu_ps(out + m * N16 + (t0 + t) * kTileRows, y[t][m]);
}

// Rows of x times tiles [t0, t0 + T), up to kPassRows rows of the form at once.
template <Form F, int T>
void multiply_rows(int64_t M, const uint8_t* packed, const uint16_t* scale_zeros, const uint32_t* x_pairs,
                   const float* x_floats, const float* x_sums, float* out, int64_t K, int64_t G, int64_t group_size,
                   int64_t t0, int64_t N16) {
  constexpr int kPassRows = F == Form::kDot ? kMaxBlockRows : kMaxFmaRows;
  for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kPassRows, M - m0));
    const uint32_t* xp = x_pairs + m0 * (K / 2);
    const float* xf = x_floats + m0 * K;
    const float* xs = x_sums + m0 * G;
    float* o = out + m0 * N16;
    [&]<int... R>(std::integer_sequence<int, R...>) {  // the instance for `rows` (1 .. kPassRows)
      ((rows == R + 1 ? multiply_block<F, T, R + 1>(packed, scale_zeros, xp, xf, xs, o, K, G, group_size, t0, N16)
                      : void()), ...);
    }(std::make_integer_sequence<int, kPassRows>{});
  }
}

// Tiles a task of each form.
template <Form F>
constexpr int kTiles = F == Form::kDot ? kBlockTiles : kFmaBlockTiles;

// M rows of x times the tiles of blocks [begin, end) (kTiles tiles a block; the last may have fewer).
template <Form F>
void multiply_blocks(int64_t M, const uint8_t* packed, const uint16_t* scale_zeros, const uint32_t* x_pairs,
                     const float* x_floats, const float* x_sums, float* out, int64_t K, int64_t G, int64_t group_size,
                     int64_t tiles, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; b++) {
    const int64_t t0 = b * kTiles<F>;
    if (t0 + kTiles<F> <= tiles) {
      multiply_rows<F, kTiles<F>>(M, packed, scale_zeros, x_pairs, x_floats, x_sums, out, K, G, group_size, t0,
                                  tiles * kTileRows);
    } else {
      for (int64_t t = t0; t < tiles; t++)
        multiply_rows<F, 1>(M, packed, scale_zeros, x_pairs, x_floats, x_sums, out, K, G, group_size, t,
                            tiles * kTileRows);
    }
  }
}

// M rows of x times all tiles, on torch's thread team.
template <Form F>
void multiply(int64_t M, const uint8_t* packed, const uint16_t* scale_zeros, const uint32_t* x_pairs,
              const float* x_floats, const float* x_sums, float* out, int64_t K, int64_t G, int64_t group_size,
              int64_t tiles) {
  at::parallel_for(0, (tiles + kTiles<F> - 1) / kTiles<F>, 1, [&](int64_t begin, int64_t end) {
    multiply_blocks<F>(M, packed, scale_zeros, x_pairs, x_floats, x_sums, out, K, G, group_size, tiles, begin, end);
  });
}

// The bf16 inputs widened to fp32 as vdpbf16ps reads them: below fp32's normal range, a zero of the same sign.
std::vector<float> widened(const std::vector<uint16_t>& x_bf16) {
  std::vector<float> out(x_bf16.size());
  for (size_t i = 0; i < x_bf16.size(); i++) {
    const uint16_t v = (x_bf16[i] & 0x7F80) ? x_bf16[i] : (x_bf16[i] & 0x8000);
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    std::memcpy(&out[i], &bits, sizeof(float));
  }
  return out;
}

// Which form multiplies 3+ rows here: both timed once on one thread, kTimedRows rows through a made-up weight
// that stays in the L2 (their instruction rates, not the memory's, differ), best of kTimedRounds alternated.
struct RowsForm {
  Form form;
  double dot_us, fma_us;
};

const RowsForm& rows_form() {
  static const RowsForm chosen = [] {
    constexpr int kTimedRows = 8, kTimedRounds = 5;
    constexpr int64_t kTimedTiles = 32, K = 2048, group = 32, G = K / group;
    std::vector<uint8_t> packed(kTimedTiles * (K / 8) * 64);
    uint32_t seed = 12345;
    for (auto& byte : packed) byte = static_cast<uint8_t>((seed = seed * 1664525u + 1013904223u) >> 24);
    std::vector<uint16_t> scale_zeros(kTimedTiles * G * 2 * kTileRows, 0x3C00);  // bf16 0.0078125
    std::vector<uint16_t> x_bf16(kTimedRows * K, 0x3F80);  // bf16 1.0
    const std::vector<float> x_floats = widened(x_bf16), x_sums(kTimedRows * G, group);
    std::vector<float> out(kTimedRows * kTimedTiles * kTileRows);
    const auto* xp = reinterpret_cast<const uint32_t*>(x_bf16.data());
    auto timed = [&]<Form F>() {  // one thread: the forms' instruction rates, not the team's
      const auto start = std::chrono::steady_clock::now();
      multiply_blocks<F>(kTimedRows, packed.data(), scale_zeros.data(), xp, x_floats.data(), x_sums.data(),
                         out.data(), K, G, group, kTimedTiles, 0, (kTimedTiles + kTiles<F> - 1) / kTiles<F>);
      return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    };
    double dot = 1e30, fma = 1e30;
    for (int round = 0; round <= kTimedRounds; round++) {  // round 0 warms up
      const double d = timed.template operator()<Form::kDot>(), f = timed.template operator()<Form::kFma>();
      if (round) dot = std::min(dot, d), fma = std::min(fma, f);
    }
    return RowsForm{fma < dot ? Form::kFma : Form::kDot, dot, fma};
  }();
  return chosen;
}

}  // namespace

namespace kvtriton {

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zeros,
                     int64_t group_size, int64_t form) {
  TORCH_CHECK(form >= 0 && form <= 2, "int4_gemv: form must be 0 (timed), 1 (vdpbf16ps) or 2 (FMA)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_gemv: x must be a contiguous (rows, inputs) matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_gemv: x must be fp32 or bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "int4_gemv: packed must be contiguous uint8 (tiles, inputs / 8, 64)");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(group_size % 8 == 0 && K % group_size == 0 && packed.size(1) == K / 8,
              "int4_gemv: inputs ", K, " do not match the packed weight or the group size ", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous() &&
                  scale_zeros.numel() == tiles * G * 2 * kTileRows,
              "int4_gemv: scale_zeros must be contiguous bf16 (tiles, groups, 2, 16)");

  // The inputs as bf16 pairs (round to nearest even, as Tensor.to(bfloat16)), and each group's sum of them.
  std::vector<uint16_t> x_bf16(M * K);
  std::vector<float> x_sums(M * G);
  if (x.scalar_type() == at::kBFloat16) {
    std::memcpy(x_bf16.data(), x.data_ptr(), M * K * sizeof(uint16_t));
  } else {
    const float* xf = x.data_ptr<float>();
    int64_t i = 0;
    for (; i + 16 <= M * K; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_bf16.data() + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + i)));
    for (; i < M * K; i++) x_bf16[i] = at::BFloat16(xf[i]).x;
  }
  for (int64_t r = 0; r < M * G; r++) {
    float sum = 0.0f;
    for (int64_t k = r * group_size; k < (r + 1) * group_size; k++) {
      const uint32_t bits = static_cast<uint32_t>(x_bf16[k]) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      sum += value;
    }
    x_sums[r] = sum;
  }

  at::Tensor out = at::empty({M, tiles * kTileRows}, x.options().dtype(at::kFloat));
  const auto* w = packed.data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scale_zeros.data_ptr());
  const auto* xp = reinterpret_cast<const uint32_t*>(x_bf16.data());
  // form 0: few rows the dot form, more the timed one (rows_form times only when first asked)
  const Form chosen = form == 1 ? Form::kDot
                      : form == 2 ? Form::kFma
                      : M < kFmaMinRows ? Form::kDot : rows_form().form;
  if (chosen == Form::kDot) {
    multiply<Form::kDot>(M, w, sz, xp, nullptr, x_sums.data(), out.data_ptr<float>(), K, G, group_size, tiles);
  } else {
    const std::vector<float> x_floats = widened(x_bf16);
    multiply<Form::kFma>(M, w, sz, xp, x_floats.data(), x_sums.data(), out.data_ptr<float>(), K, G, group_size,
                         tiles);
  }
  return out;
}

std::string int4_gemv_rows_form() {
  const RowsForm& chosen = rows_form();
  char said[160];
  std::snprintf(said, sizeof(said), "%s (timed on this CPU at 8 rows: vdpbf16ps %.0f us, FMA %.0f us)",
                chosen.form == Form::kFma ? "fp32 FMAs" : "vdpbf16ps", chosen.dot_us, chosen.fma_us);
  return said;
}

}  // namespace kvtriton

TORCH_LIBRARY_FRAGMENT(kvtriton, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale_zeros, int group_size, int form=0) -> Tensor");
  m.def("int4_gemv_rows_form() -> str", &kvtriton::int4_gemv_rows_form);
}

TORCH_LIBRARY_IMPL(kvtriton, CPU, m) { m.impl("int4_gemv", &kvtriton::int4_gemv); }
