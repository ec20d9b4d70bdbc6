// Our own matrix-vector products for decoding on a CPU: int8 and int4 weights times an activation row that is
// rounded to int8 inside the call, and bfloat16 weights widened in registers. speedups/native.py compiles this
// file on first use and documents the Python API; tests/test_native_kernels.py compares every variant with a
// plain PyTorch computation of the same math.
//
// Why integers. A decoding step multiplies each weight once (one input row), so a kernel is as fast as it reads
// weights. Stock kernels widen each 8- or 4-bit weight to a float and use one float multiply-add per weight;
// with few cores that arithmetic, not memory, is the limit. Here the activation row is rounded to 8-bit codes
// once per call, and the CPU's integer dot-product instructions multiply 4 byte pairs per 32-bit lane at once
// (VNNI `vpdpbusd`; AVX2 needs two instructions, `vpmaddubsw` then `vpmaddwd`).
//
// Blocks. Everything works on blocks of 32 consecutive inputs (kBlock). A row of `in` inputs has
// ceil(in / 32) blocks; when `in` is not a multiple of 32 the last block is shorter (a "tail"), and the code
// treats it as a whole block whose missing entries are zero.
//
// The activation row, quantised once per call (all variants round identically: one IEEE division, round
// half to even, as PyTorch's `(x / d).round()` does):
//
//     x (float32; bfloat16 and float16 are widened first)
//     | x[0] .. x[31] | x[32] .. x[63] | ... | x[32b] .. x[in-1] |     blocks of 32, the last one maybe short
//     for each block b:  d[b] = max(max_j |x[j]| / 127, FLT_MIN)       one float32 scale per block
//                        q[j] = round(x[j] / d[b])                    codes in -127 .. 127
//                        s[b] = sum_j q[j]                            (the int4 product's offset term needs it)
//
// Codes stay within -127 .. 127 so that |q| * |w| pairs cannot saturate AVX2's 16-bit sums (2 * 127 * 127 <
// 32767).
//
// int8 weights: PyTorch's stock layout (speedups' quantize_int8), shared with its int8 kernels.
//
//     codes  (out, in)  int8 in -127 .. 127, row n:  | w[n][0] .. w[n][31] | w[n][32] .. | ... tail |
//     scales (out,)     float32, one per output row
//
//     y[n] = scales[n] * sum_b d[b] * (sum_j q[32b + j] * w[n][32b + j])       the inner sum in int32, exact
//
// int4 weights: our own layout; the same codes as speedups' quantize_int4 (native.py's pack_int4 builds it).
// The rows go in tiles of 16, and a tile's 16 rows side by side, one per 32-bit lane of a 512-bit register: a
// kernel multiplies 16 rows at once by x's codes broadcast to every lane, with no sum across lanes at the end.
// A tile holds ceil(in / 32) blocks of 320 bytes each, one after the other, so it is read as one stream:
//
//     tiles (ceil(out / 16), blocks, 320) uint8        block b of tile t (rows 16t .. 16t + 15):
//         bytes   0 ..  31:   scale[16t + j][b], j = 0 .. 15     float16
//         bytes  32 ..  63:   low[16t + j][b]                    float16
//         bytes  64 .. 319:   4 chunks of 64 bytes; in chunk i (i = 0 .. 3), the 4 bytes of row j (a lane):
//                                 byte k (k = 0 .. 3):  low nibble  c[j][32b + 4i + k]
//                                                       high nibble c[j][32b + 16 + 4i + k]
//     codes c in 0 .. 15 (0 past the end of a short tail, and in the rows past `out` that fill the last tile):
//     weight[32b + m] ~= c[m] * scale[b] + low[b]
//
//     y[n] = sum_b d[b] * (scale[n][b] * sum_j c[j] * q[32b + j]  +  low[n][b] * s[b])
//
// The layout of each row in a piece of its own made the kernel compute-bound: per 32 weights, a row's sum
// needed its scale widened and moved to its lane, and the lanes summed at the end. Here those steps serve 16
// rows (benchmarks/README.md, "int4 in tiles of 16 rows").

// bfloat16 weights, (out, in) as stored: each weight is widened to float32 in a register (a bfloat16 is the top
// half of a float32, so a 16-bit shift does it) and multiplied in float32; AVX512-BF16's `vdpbf16ps` multiplies
// bfloat16 pairs directly where x is bfloat16 too.
//
// Variants. Each kernel has a scalar loop, the reference a reader starts from, then one variant per instruction
// set, written as the same loop over wider registers. All are compiled into this one file (each function gets
// the instructions it may use with __attribute__((target))) and the caller picks one by name; `variants(kernel)`
// lists those this CPU runs, fastest first:
//     int8, int4:  avx512vnni  (512-bit vpdpbusd: 64 byte pairs per instruction)
//                  avxvnni     (256-bit vpdpbusd: 32; VEX-encoded on CPUs with AVX-VNNI, EVEX-encoded on CPUs with
//                               AVX512-VNNI, which run the same instruction on 256 bits)
//                  avx2        (vpmaddubsw + vpmaddwd: 32 byte pairs in two instructions)
//                  scalar
//     bf16:        avx512bf16  (vdpbf16ps where x is bfloat16, else as avx512), avx512, avx2, scalar
//
// Rows. A call takes any number of input rows (beam search runs a few). Each weight block is read once for up
// to kMaxRows rows, so a few rows cost little more than one; more rows go kMaxRows at a time over a tile of
// weight rows small enough to stay in the core's cache.
//
// Threads: at::parallel_for splits the output rows (int4: whole tiles) into one contiguous range per thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor in and out of Python (torch/extension.h would cost 4x the compile)

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define X86_KERNELS 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;       // inputs per block: one activation scale, one int4 scale and low
constexpr int64_t kInt8Max = 127;    // activation codes are in -127 .. 127
constexpr int64_t kMaxRows = 8;      // input rows multiplied per pass over a weight block

// Reading ahead. A decoding step reads every weight once, so nothing a kernel reads is read again soon; yet the
// CPU keeps each line it loads in its caches, pushing out what the rest of the step reuses (the activations, the
// KV cache, Python's and PyTorch's own data). So the SIMD loops ask for the weight `read_ahead` bytes ahead of
// where they read, as non-temporal prefetches (prefetchnta): the line arrives before it is needed and is not
// kept in the outer caches after it is used. Rule: on by default at kReadAhead; `set_read_ahead(0)` turns it off.
// python benchmarks/bench_kernels.py measures decode steps with it on and off, taking turns.
constexpr int64_t kReadAhead = 5120;  // bytes: 16 int4 blocks of a tile, 80 cache lines
int64_t read_ahead = kReadAhead;      // set_read_ahead's value, read once per call

int64_t set_read_ahead(int64_t bytes) {  // returns the value it replaces
  TORCH_CHECK(bytes >= 0, "read_ahead must be 0 (off) or a number of bytes, not ", bytes);
  const int64_t was = read_ahead;
  read_ahead = bytes;
  return was;
}
constexpr int64_t kTaskBytes = 1 << 16;   // the least weight bytes worth a thread of their own
constexpr int64_t kTileBytes = 1 << 18;   // with more than kMaxRows rows: weight bytes reread from the cache

// ---------------------------------------------------------------------------------------------------------
// Variants and what this CPU runs.
// ---------------------------------------------------------------------------------------------------------
enum class Variant { scalar, avx2, avxvnni, avx512vnni, avx512, avx512bf16 };

struct VariantName {
  Variant variant;
  const char* name;
};
const VariantName kVariantNames[] = {{Variant::avx512bf16, "avx512bf16"}, {Variant::avx512vnni, "avx512vnni"},
                                     {Variant::avx512, "avx512"},         {Variant::avxvnni, "avxvnni"},
                                     {Variant::avx2, "avx2"},             {Variant::scalar, "scalar"}};

struct Cpu {
  bool avx2 = false, avxvnni = false, avx512 = false, avx512vnni = false, avx512bf16 = false;
  Cpu() {
#ifdef X86_KERNELS
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    avxvnni = avx2 && __builtin_cpu_supports("avxvnni");
    avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    avx512vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    avx512bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  }
};
const Cpu& cpu() {
  static const Cpu detected;
  return detected;
}

// The variants of each kernel ("int8", "int4" or "bf16") that this CPU runs, fastest first.
std::vector<std::string> variants(const std::string& kernel) {
  const Cpu& c = cpu();
  const bool integer = kernel == "int8" || kernel == "int4";
  TORCH_CHECK(integer || kernel == "bf16", "unknown kernel ", kernel, ": int8, int4 or bf16");
  std::vector<std::string> names;
  for (const VariantName& v : kVariantNames) {
    bool runs = false;
    switch (v.variant) {
      case Variant::scalar: runs = true; break;
      case Variant::avx2: runs = c.avx2; break;
      case Variant::avxvnni: runs = integer && (c.avxvnni || c.avx512vnni); break;
      case Variant::avx512vnni: runs = integer && c.avx512vnni; break;
      case Variant::avx512: runs = !integer && c.avx512; break;
      case Variant::avx512bf16: runs = !integer && c.avx512bf16; break;
    }
    if (runs) names.push_back(v.name);
  }
  return names;
}

// The variant named `name` ("" for the fastest), checked against what this CPU runs.
Variant parse_variant(const std::string& kernel, const std::string& name) {
  static const std::vector<std::string> integer = variants("int8"), bf16 = variants("bf16");  // once: every call asks
  const std::vector<std::string>& runs = kernel == "bf16" ? bf16 : integer;
  const std::string& chosen = name.empty() ? runs.front() : name;
  TORCH_CHECK(std::find(runs.begin(), runs.end(), chosen) != runs.end(), "the ", kernel, " kernel has no variant ",
              chosen, " on this CPU (it runs: ", c10::Join(", ", runs), ")");
  for (const VariantName& v : kVariantNames)
    if (chosen == v.name) return v.variant;
  return Variant::scalar;  // not reached
}

// Calls f(std::integral_constant<int, R>) for R = rows (1 .. kMaxRows): kernels unroll their loops over rows.
template <class F>
void with_rows(int64_t rows, F&& f) {
  static_assert(kMaxRows == 8, "one case per row count");
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Inputs and outputs.
// ---------------------------------------------------------------------------------------------------------
// x (rows, in) as float32: x's own memory when it is float32, else a widened copy.
struct FloatRows {
  const float* data;
  std::vector<float> copy;
  explicit FloatRows(const at::Tensor& x) {
    if (x.scalar_type() == at::kFloat) {
      data = x.data_ptr<float>();
      return;
    }
    copy.resize(x.numel());
    if (x.scalar_type() == at::kBFloat16) {  // a bfloat16 is the top 16 bits of a float32
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
      for (int64_t i = 0; i < x.numel(); i++) {
        const uint32_t wide = uint32_t(bits[i]) << 16;
        std::memcpy(&copy[i], &wide, sizeof(float));
      }
    } else {
      const at::Half* half = x.data_ptr<at::Half>();
      for (int64_t i = 0; i < x.numel(); i++) copy[i] = float(half[i]);
    }
    data = copy.data();
  }
};

// y (rows, out) in x's dtype, written one float32 result at a time.
struct Output {
  at::Tensor tensor;
  void* data;
  at::ScalarType type;
  int64_t out;
  explicit Output(const at::Tensor& like, int64_t rows, int64_t out_)
      : tensor(at::empty({rows, out_}, like.options())), data(tensor.data_ptr()), type(like.scalar_type()),
        out(out_) {}
  void store(int64_t row, int64_t n, float value) const {
    const int64_t i = row * out + n;
    switch (type) {
      case at::kFloat: static_cast<float*>(data)[i] = value; break;
      case at::kBFloat16: static_cast<at::BFloat16*>(data)[i] = at::BFloat16(value); break;
      default: static_cast<at::Half*>(data)[i] = at::Half(value); break;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// The activation row, quantised once per call.
// ---------------------------------------------------------------------------------------------------------
// One block of n <= 32 inputs: 32 codes (0 past n) and their sum; returns the block's scale d.
float quantize_block_scalar(const float* x, int64_t n, int8_t* codes, int32_t* sum) {
  float amax = 0.0f;
  for (int64_t j = 0; j < n; j++) amax = std::max(amax, std::fabs(x[j]));
  const float d = std::max(amax / float(kInt8Max), FLT_MIN);  // FLT_MIN: an all-zero block gets codes 0
  int32_t total = 0;
  for (int64_t j = 0; j < kBlock; j++) {
    const int32_t q = j < n ? int32_t(std::nearbyint(x[j] / d)) : 0;  // half to even, as torch.round
    codes[j] = int8_t(q);
    total += q;
  }
  *sum = total;
  return d;
}

#ifdef X86_KERNELS
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define TARGET_AVX512VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define TARGET_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Non-temporal prefetches of the 64-byte lines of bytes p .. p + bytes - 1, `ahead` bytes further on (0: none).
inline __attribute__((always_inline)) void read_ahead_of(const void* p, int64_t bytes, int64_t ahead) {
  if (ahead == 0) return;
  const char* from = static_cast<const char*>(p) + ahead;
  for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(from + k, _MM_HINT_NTA);
}

TARGET_AVX2 inline float max_of(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

TARGET_AVX2 inline float sum_of(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

TARGET_AVX2 inline int32_t sum_of(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// The same block with AVX2 (every SIMD variant uses it): the same division and rounding, 8 inputs at a time.
TARGET_AVX2 float quantize_block_avx2(const float* x, int64_t n, int8_t* codes, int32_t* sum) {
  if (n < kBlock) return quantize_block_scalar(x, n, codes, sum);  // a short tail
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 v[4], magnitude = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    magnitude = _mm256_max_ps(magnitude, _mm256_andnot_ps(sign_bit, v[i]));
  }
  const float d = std::max(max_of(magnitude) / float(kInt8Max), FLT_MIN);
  const __m256 scale = _mm256_set1_ps(d);
  __m256i q[4];  // _mm256_cvtps_epi32 rounds half to even (the default MXCSR mode)
  for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], scale));
  *sum = sum_of(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  // 32-bit -> 8-bit: the packs work within 128-bit lanes, so the 4-byte groups come out as q0 q1 q2 q3 of the
  // low lane, then of the high lane; the permutation puts them back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return d;
}
#endif

// x (rows, in) quantised per block. Buffers are padded with codes 0 and scales 0 to a whole number of groups of
// kGroup blocks, so that a SIMD loop may read a few blocks at a time.
constexpr int64_t kGroup = 4;

struct Activations {
  int64_t rows, in, blocks, padded_blocks;
  std::vector<int8_t> codes;    // (rows, padded_blocks * 32)
  std::vector<float> scales;    // (rows, padded_blocks): d
  std::vector<int32_t> sums;    // (rows, padded_blocks): s
  std::vector<float> offsets;   // (rows, padded_blocks): d * s, the factor of an int4 block's low

  Activations(const float* x, int64_t rows_, int64_t in_, Variant variant)
      : rows(rows_), in(in_), blocks((in_ + kBlock - 1) / kBlock),
        padded_blocks((blocks + kGroup - 1) / kGroup * kGroup), codes(rows * padded_blocks * kBlock, 0),
        scales(rows * padded_blocks, 0.0f), sums(rows * padded_blocks, 0), offsets(rows * padded_blocks, 0.0f) {
    for (int64_t r = 0; r < rows; r++) {
      for (int64_t b = 0; b < blocks; b++) {
        const float* block = x + r * in + b * kBlock;
        const int64_t n = std::min(kBlock, in - b * kBlock);
        const int64_t i = r * padded_blocks + b;
#ifdef X86_KERNELS
        if (variant != Variant::scalar) {
          scales[i] = quantize_block_avx2(block, n, &codes[i * kBlock], &sums[i]);
          continue;
        }
#endif
        scales[i] = quantize_block_scalar(block, n, &codes[i * kBlock], &sums[i]);
      }
    }
    for (size_t i = 0; i < offsets.size(); i++) offsets[i] = scales[i] * float(sums[i]);
  }
  int64_t row_bytes() const { return padded_blocks * kBlock; }
  const int8_t* codes_of(int64_t r) const { return codes.data() + r * row_bytes(); }
  const float* scales_of(int64_t r) const { return scales.data() + r * padded_blocks; }
  const int32_t* sums_of(int64_t r) const { return sums.data() + r * padded_blocks; }
  const float* offsets_of(int64_t r) const { return offsets.data() + r * padded_blocks; }
};

// The codes recoded or rearranged as a SIMD variant reads them (same size and row stride as the codes).
// q + 128 as unsigned bytes (1 .. 255; 128 in the padding): avxvnni's unsigned operand for int8.
std::vector<int8_t> biased(const Activations& a) {
  std::vector<int8_t> out(a.codes.size());
  for (size_t i = 0; i < out.size(); i++) out[i] = int8_t(uint8_t(a.codes[i]) ^ 0x80);
  return out;
}

// The rows r0 .. r0 + R - 1 of a variant's codes, and their block scales, looked up once per kernel call.
template <int R>
struct RowsOf {
  const int8_t* codes[R];
  const float* scales[R];
  RowsOf(const Activations& a, int64_t r0, const int8_t* codes_) {
    for (int r = 0; r < R; r++) {
      codes[r] = codes_ + (r0 + r) * a.row_bytes();
      scales[r] = a.scales_of(r0 + r);
    }
  }
};

// A sum of products is a chain of dependent multiply-adds, each waiting for the one before (4 cycles or so).
// Several input rows give the CPU independent chains; with one or two, the SIMD kernels keep kChains<R>
// partial sums per row, each taking every kChains-th step, and add them up at the end.
template <int R>
constexpr int kChains = R == 1 ? 4 : R == 2 ? 2 : 1;

// Runs kernel(first_row, rows, n0, n1) over every output row, threaded, kMaxRows input rows at a time; with
// more input rows, over tiles of weight rows that stay in the cache while each group of input rows reads them.
template <class Kernel>
void for_rows(int64_t rows, int64_t out, int64_t row_bytes, const Kernel& kernel) {
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, row_bytes));
  const int64_t tile = rows <= kMaxRows ? out : std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += tile) {
      const int64_t n1 = std::min(end, n0 + tile);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) kernel(r0, std::min(kMaxRows, rows - r0), n0, n1);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// int8 weights x int8 activations.
// ---------------------------------------------------------------------------------------------------------
// The reference: y[r][n] = scales[n] * sum_b d[b] * (sum_j q[j] * w[j]).
void int8_scalar(const int8_t* weight, const float* weight_scales, const Activations& a, int64_t r0, int64_t rows,
                 int64_t n0, int64_t n1, const Output& y) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* w = weight + n * a.in;
    for (int64_t r = r0; r < r0 + rows; r++) {
      const int8_t* q = a.codes_of(r);
      const float* d = a.scales_of(r);
      float sum = 0.0f;
      for (int64_t b = 0; b < a.blocks; b++) {
        int32_t dot = 0;  // at most 32 * 127 * 127: exact
        for (int64_t j = b * kBlock; j < std::min(a.in, (b + 1) * kBlock); j++) dot += int32_t(q[j]) * int32_t(w[j]);
        sum += float(dot) * d[b];
      }
      y.store(r, n, sum * weight_scales[n]);
    }
  }
}

#ifdef X86_KERNELS
// The weight's last, shorter block copied into a zeroed block, so that the SIMD loops read whole blocks without
// reading past the end of the weight. Returns the block to read.
template <class T>
inline const T* whole_block(const T* w, int64_t in, int64_t start, int64_t width, T* spare) {
  if (start + width <= in) return w + start;
  std::memset(spare, 0, width * sizeof(T));
  std::memcpy(spare, w + start, (in - start) * sizeof(T));
  return spare;
}

// AVX2, one block of 32 at a time. vpmaddubsw multiplies unsigned by signed bytes, so the sign moves from q to w
// (|q| * (w * sign(q)) = q * w), then adds pairs in 16 bits (no saturation: |q|, |w| <= 127); vpmaddwd adds
// pairs again into 32 bits: 8 partial sums per block, scaled by d[b] in float32.
template <int R>
TARGET_AVX2 inline void int8_block_avx2(const int8_t* w, const RowsOf<R>& x, int64_t b, __m256* sum) {
  const __m256i wb = _mm256_loadu_si256((const __m256i*)w);
  for (int r = 0; r < R; r++) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)(x.codes[r] + b * kBlock));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(wb, q));
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    sum[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(x.scales[r][b]), sum[r]);
  }
}

// Prompt chunks (more than kMaxRows input rows) with AVX2: a tile of N = 2 weight rows times R <= 4 input rows,
// so that each activation block loaded serves two weight rows and each weight block R input rows. The sign moves
// the other way, from w to q (|w| * (q * sign(w)) = q * w): |w| is taken once per weight block for all R rows,
// and each (row, weight row) pair costs a sign, vpmaddubsw, vpmaddwd, a conversion and a multiply-add.
// python benchmarks/bench_kernels.py --rows 256 times it against widening to float32.
template <int R, int N>
TARGET_AVX2 void int8_tile_avx2(const int8_t* weight, const float* weight_scales, const RowsOf<R>& x, int64_t in,
                                int64_t r0, int64_t n, const Output& y) {
  const int64_t blocks = (in + kBlock - 1) / kBlock;
  alignas(32) int8_t spare[N][kBlock];
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 sum[N][R];
  for (int k = 0; k < N; k++)
    for (int r = 0; r < R; r++) sum[k][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m256i w[N], magnitude[N];
    for (int k = 0; k < N; k++) {
      w[k] = _mm256_loadu_si256((const __m256i*)whole_block(weight + (n + k) * in, in, b * kBlock, kBlock, spare[k]));
      magnitude[k] = _mm256_abs_epi8(w[k]);
    }
    for (int r = 0; r < R; r++) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(x.codes[r] + b * kBlock));
      const __m256 d = _mm256_set1_ps(x.scales[r][b]);
      for (int k = 0; k < N; k++) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude[k], _mm256_sign_epi8(q, w[k]));
        sum[k][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d, sum[k][r]);
      }
    }
  }
  for (int k = 0; k < N; k++)
    for (int r = 0; r < R; r++) y.store(r0 + r, n + k, sum_of(sum[k][r]) * weight_scales[n + k]);
}

// The tiles over weight rows n0 .. n1 - 1 for input rows r0 .. r0 + rows - 1, four at a time.
TARGET_AVX2 void int8_chunk_avx2(const int8_t* weight, const float* weight_scales, const Activations& a,
                                 int64_t r0, int64_t rows, int64_t n0, int64_t n1, const Output& y) {
  for (int64_t r = r0; r < r0 + rows; r += 4) {
    const auto tiles = [&](auto R) {
      constexpr int kR = decltype(R)::value;
      const RowsOf<kR> x(a, r, a.codes.data());
      int64_t n = n0;
      for (; n + 2 <= n1; n += 2) int8_tile_avx2<kR, 2>(weight, weight_scales, x, a.in, r, n, y);
      if (n < n1) int8_tile_avx2<kR, 1>(weight, weight_scales, x, a.in, r, n, y);
    };
    switch (std::min<int64_t>(4, r0 + rows - r)) {
      case 1: tiles(std::integral_constant<int, 1>{}); break;
      case 2: tiles(std::integral_constant<int, 2>{}); break;
      case 3: tiles(std::integral_constant<int, 3>{}); break;
      default: tiles(std::integral_constant<int, 4>{}); break;
    }
  }
}

// 256-bit vpdpbusd: sum plus the four byte products of each 32-bit lane, in one instruction. Written as assembly
// so that one function serves both encodings: VEX on CPUs with AVX-VNNI (no AVX-512), EVEX on CPUs with
// AVX512-VNNI; the compiler only sees AVX2 here, so it keeps to registers both encodings reach.
template <bool kVex>
TARGET_AVX2 inline __m256i dot_bytes(__m256i sum, __m256i unsigned_bytes, __m256i signed_bytes) {
  if (kVex)
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(sum) : "x"(unsigned_bytes), "x"(signed_bytes));
  else
    asm("vpdpbusd %2, %1, %0" : "+x"(sum) : "x"(unsigned_bytes), "x"(signed_bytes));
  return sum;
}

// AVX-VNNI. vpdpbusd wants unsigned bytes too, but adds 32-bit sums (nothing saturates), so x.codes holds q + 128
// instead: sum_j (q + 128) w = sum_j q w + 128 sum_j w, and the second sum, computed once for all rows, is where
// each row's sum starts, negated.
template <int R, bool kVex>
TARGET_AVX2 inline void int8_block_avxvnni(const int8_t* w, const RowsOf<R>& x, int64_t b, __m256* sum) {
  const __m256i wb = _mm256_loadu_si256((const __m256i*)w);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i start = _mm256_sub_epi32(zero, dot_bytes<kVex>(zero, _mm256_set1_epi8(-128), wb));
  for (int r = 0; r < R; r++) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)(x.codes[r] + b * kBlock));
    const __m256 dot = _mm256_cvtepi32_ps(dot_bytes<kVex>(start, q, wb));
    sum[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(x.scales[r][b]), sum[r]);
  }
}

// The 256-bit loop over a weight row's blocks (Block: one of the two above), kChains<R> sums per row.
template <int R, void (*Block)(const int8_t*, const RowsOf<R>&, int64_t, __m256*)>
TARGET_AVX2 void int8_rows_256(const int8_t* weight, const float* weight_scales, const RowsOf<R>& x, int64_t in,
                               int64_t r0, int64_t n0, int64_t n1, const Output& y) {
  constexpr int kC = kChains<R>;
  const int64_t blocks = (in + kBlock - 1) / kBlock, whole = in / kBlock;
  alignas(32) int8_t spare[kBlock];
  const int64_t ahead = read_ahead;
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* w = weight + n * in;
    __m256 sum[kC][R];
    for (int c = 0; c < kC; c++)
      for (int r = 0; r < R; r++) sum[c][r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + kC <= whole; b += kC) {
      read_ahead_of(w + b * kBlock, kC * kBlock, ahead);
      for (int c = 0; c < kC; c++) Block(w + (b + c) * kBlock, x, b + c, sum[c]);
    }
    for (; b < blocks; b++) Block(whole_block(w, in, b * kBlock, kBlock, spare), x, b, sum[0]);
    for (int r = 0; r < R; r++) {
      for (int c = 1; c < kC; c++) sum[0][r] = _mm256_add_ps(sum[0][r], sum[c][r]);
      y.store(r0 + r, n, sum_of(sum[0][r]) * weight_scales[n]);
    }
  }
}

// [d0 x 8, d1 x 8]: the scales of two blocks, lined up with the 16 partial sums vpdpbusd leaves over them.
TARGET_AVX512 inline __m512 pair_scales(const float* d) {
  return _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1);
}

// AVX512-VNNI: two blocks (64 bytes) per instruction. With several rows,
// x.codes holds q + 128 as with AVX-VNNI. With one, vpdpbusd is the limit, so x.codes holds q and the sign moves
// instead, as with AVX2 but from w to q (|w| * (q * sign(w)) = q * w): AVX-512 has no byte sign instruction, but
// a mask of w's negative bytes negates q where w < 0.
template <int R>
TARGET_AVX512VNNI inline void int8_pair_avx512vnni(const int8_t* w, const RowsOf<R>& x, int64_t b, __m512* sum) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i wb = _mm512_loadu_si512(w);
  if (R == 1) {
    const __m512i q = _mm512_loadu_si512(x.codes[0] + b * kBlock);
    const __m512i signed_q = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(wb), zero, q);
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wb), signed_q));
    sum[0] = _mm512_fmadd_ps(dot, pair_scales(x.scales[0] + b), sum[0]);
    return;
  }
  const __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), wb));
  for (int r = 0; r < R; r++) {
    const __m512i q = _mm512_loadu_si512(x.codes[r] + b * kBlock);
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, q, wb));
    sum[r] = _mm512_fmadd_ps(dot, pair_scales(x.scales[r] + b), sum[r]);
  }
}

template <int R>
TARGET_AVX512VNNI void int8_avx512vnni(const int8_t* weight, const float* weight_scales, const RowsOf<R>& x,
                                       int64_t in, int64_t r0, int64_t n0, int64_t n1, const Output& y) {
  constexpr int kC = kChains<R>;
  const int64_t blocks = (in + kBlock - 1) / kBlock, whole = in / (2 * kBlock) * 2;  // blocks in whole pairs
  alignas(64) int8_t spare[2 * kBlock];
  const int64_t ahead = read_ahead;
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* w = weight + n * in;
    __m512 sum[kC][R];
    for (int c = 0; c < kC; c++)
      for (int r = 0; r < R; r++) sum[c][r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 * kC <= whole; b += 2 * kC) {
      read_ahead_of(w + b * kBlock, 2 * kC * kBlock, ahead);
      for (int c = 0; c < kC; c++) int8_pair_avx512vnni<R>(w + (b + 2 * c) * kBlock, x, b + 2 * c, sum[c]);
    }
    for (; b < blocks; b += 2)
      int8_pair_avx512vnni<R>(whole_block(w, in, b * kBlock, 2 * kBlock, spare), x, b, sum[0]);
    for (int r = 0; r < R; r++) {
      for (int c = 1; c < kC; c++) sum[0][r] = _mm512_add_ps(sum[0][r], sum[c][r]);
      y.store(r0 + r, n, _mm512_reduce_add_ps(sum[0][r]) * weight_scales[n]);
    }
  }
}
#endif

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const std::string& variant_name) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "int8 codes must be a contiguous int8 (out, in) tensor");
  const int64_t out = codes.size(0), in = codes.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == out,
              "int8 scales must be float32, one per output row");
  TORCH_CHECK(x.size(-1) == in, "x has ", x.size(-1), " inputs, the weight ", in);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const Variant variant = parse_variant("int8", variant_name);
  const at::Tensor rows_in = x.reshape({-1, in}).contiguous();
  const int64_t rows = rows_in.size(0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  const Output y(x, rows, out);
  if (rows == 0 || out == 0) return y.tensor.view(shape);
  const FloatRows xf(rows_in);
  const Activations a(xf.data, rows, in, variant);
  const int8_t* w = codes.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
#ifdef X86_KERNELS
  const bool biasing = variant == Variant::avxvnni || (variant == Variant::avx512vnni && rows > 1);
  const std::vector<int8_t> unsigned_codes = biasing ? biased(a) : std::vector<int8_t>();
#endif
  for_rows(rows, out, in, [&](int64_t r0, int64_t count, int64_t n0, int64_t n1) {
#ifdef X86_KERNELS
    if (variant != Variant::scalar)
      return with_rows(count, [&](auto R) {
        constexpr int kR = decltype(R)::value;
        if (variant == Variant::avx2) {
          if (rows > kMaxRows) return int8_chunk_avx2(w, s, a, r0, count, n0, n1, y);
          return int8_rows_256<kR, int8_block_avx2<kR>>(w, s, RowsOf<kR>(a, r0, a.codes.data()), in, r0, n0, n1, y);
        }
        if (variant == Variant::avx512vnni) {
          const int8_t* q = kR == 1 ? a.codes.data() : unsigned_codes.data();
          return int8_avx512vnni<kR>(w, s, RowsOf<kR>(a, r0, q), in, r0, n0, n1, y);
        }
        const RowsOf<kR> x(a, r0, unsigned_codes.data());
        if (cpu().avxvnni) return int8_rows_256<kR, int8_block_avxvnni<kR, true>>(w, s, x, in, r0, n0, n1, y);
        int8_rows_256<kR, int8_block_avxvnni<kR, false>>(w, s, x, in, r0, n0, n1, y);
      });
#endif
    int8_scalar(w, s, a, r0, count, n0, n1, y);
  });
  return y.tensor.view(shape);
}


// ---------------------------------------------------------------------------------------------------------
// int4 weights x int8 activations.
// ---------------------------------------------------------------------------------------------------------
// The weight in tiles of kTile rows (the layout's picture is at the top of this file). Tile t, block b:
constexpr int64_t kTile = 16;                                  // weight rows per tile: one per 32-bit lane of 512 bits
constexpr int64_t kTileScales = 0;                             // 16 float16 scales, one per row
constexpr int64_t kTileLows = 2 * kTile;                       // then 16 float16 lows
constexpr int64_t kTileCodes = 4 * kTile;                      // then the codes: 4 chunks of 64 bytes
constexpr int64_t kTileBlockBytes = kTileCodes + kTile * kBlock / 2;  // 320

struct Int4Weight {
  const uint8_t* tiles;  // (tiles, blocks, 320), contiguous
  int64_t out, blocks;
  const uint8_t* block(int64_t t, int64_t b) const { return tiles + (t * blocks + b) * kTileBlockBytes; }
  int64_t rows_in_tile(int64_t t) const { return std::min(kTile, out - t * kTile); }
};

// Row j's scale and low in a tile's block, and the byte that holds its codes of inputs i and i + 16 (i < 16).
inline float tile_scale(const uint8_t* block, int64_t j) {
  return float(reinterpret_cast<const at::Half*>(block + kTileScales)[j]);
}
inline float tile_low(const uint8_t* block, int64_t j) {
  return float(reinterpret_cast<const at::Half*>(block + kTileLows)[j]);
}
inline uint8_t tile_byte(const uint8_t* block, int64_t j, int64_t i) {
  return block[kTileCodes + (i / 4) * 4 * kTile + 4 * j + i % 4];
}

// The int4 weight of a layer with `out` rows and `in` inputs, checked: (ceil(out / 16), blocks, 320) uint8,
// contiguous (a slice of whole tiles of a larger weight is: wq of wqkv).
Int4Weight int4_weight(const at::Tensor& tiles, int64_t out, int64_t in) {
  const int64_t blocks = (in + kBlock - 1) / kBlock;
  TORCH_CHECK(tiles.dim() == 3 && tiles.scalar_type() == at::kByte && tiles.size(1) == blocks &&
                  tiles.size(2) == kTileBlockBytes && tiles.is_contiguous(),
              "int4 tiles for ", in, " inputs must be a contiguous uint8 (tiles, ", blocks, ", ", kTileBlockBytes,
              ") tensor");
  TORCH_CHECK(out >= 0 && (out + kTile - 1) / kTile == tiles.size(0), out, " rows need ", (out + kTile - 1) / kTile,
              " int4 tiles of ", kTile, ", not ", tiles.size(0));
  return Int4Weight{tiles.data_ptr<uint8_t>(), out, blocks};
}

// The reference: y[r][n] = sum_b d[b] * (scale[b] * sum_j c[j] * q[j] + low[b] * s[b]), row n = tile t, lane j.
void int4_scalar(const Int4Weight& weight, const Activations& a, int64_t r0, int64_t rows, int64_t t0, int64_t t1,
                 const Output& y) {
  constexpr int64_t half = kBlock / 2;
  for (int64_t t = t0; t < t1; t++)
    for (int64_t j = 0; j < weight.rows_in_tile(t); j++)
      for (int64_t r = r0; r < r0 + rows; r++) {
        const int8_t* q = a.codes_of(r);
        float sum = 0.0f;
        for (int64_t b = 0; b < a.blocks; b++) {
          const uint8_t* block = weight.block(t, b);
          int32_t dot = 0;  // codes past the end of a short block are 0 on both sides
          for (int64_t i = 0; i < half; i++)
            dot += int32_t(tile_byte(block, j, i) & 0x0F) * q[b * kBlock + i] +
                   int32_t(tile_byte(block, j, i) >> 4) * q[b * kBlock + half + i];
          sum += float(dot) * (tile_scale(block, j) * a.scales_of(r)[b]);
          sum += tile_low(block, j) * a.offsets_of(r)[b];
        }
        y.store(r, t * kTile + j, sum);
      }
}

#ifdef X86_KERNELS
// x's codes four at a time: the 32-bit word k of block b (inputs 32b + 4k .. 32b + 4k + 3), in every lane.
inline const int32_t* code_words(const Activations& a, int64_t r) {
  return reinterpret_cast<const int32_t*>(a.codes_of(r));
}

// One tile's 16 (or 8) sums, per input row, stored for the rows of the tile that exist.
inline void store_lanes(const Output& y, int64_t r, int64_t n0, const float* lanes, int64_t count) {
  for (int64_t j = 0; j < count; j++) y.store(r, n0 + j, lanes[j]);
}

// AVX512-VNNI: a tile's 16 rows in the 16 lanes. Per block, each 64-byte chunk of codes gives its low nibbles
// (inputs 4i .. 4i + 3 of every row) and its high nibbles (inputs 16 + 4i ..); vpdpbusd multiplies them by x's
// four codes, broadcast, so each lane gathers its own row's dot product. Per input row, per block, eight
// vpdpbusd and two multiply-adds serve 16 weight rows.
template <int R>
TARGET_AVX512VNNI void int4_avx512vnni(const Int4Weight& weight, const Activations& a, int64_t r0, int64_t t0,
                                       int64_t t1, const Output& y) {
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const int64_t ahead = read_ahead;
  const int32_t* q[R];
  for (int r = 0; r < R; r++) q[r] = code_words(a, r0 + r);
  for (int64_t t = t0; t < t1; t++) {
    __m512 sum[R], offset[R];
    for (int r = 0; r < R; r++) sum[r] = offset[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < weight.blocks; b++) {
      const uint8_t* block = weight.block(t, b);
      read_ahead_of(block, kTileBlockBytes, ahead);
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + kTileScales)));
      const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + kTileLows)));
      __m512i first[4], last[4];  // chunk i's codes of inputs 4i .. 4i + 3, and of 16 + 4i .. 16 + 4i + 3
      for (int i = 0; i < 4; i++) {
        const __m512i bytes = _mm512_loadu_si512(block + kTileCodes + 64 * i);
        first[i] = _mm512_and_si512(bytes, low_nibble);
        last[i] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibble);
      }
      for (int r = 0; r < R; r++) {
        const int32_t* x = q[r] + b * (kBlock / 4);
        __m512i dot_first = _mm512_setzero_si512(), dot_last = _mm512_setzero_si512();  // two chains
        for (int i = 0; i < 4; i++) {
          dot_first = _mm512_dpbusd_epi32(dot_first, first[i], _mm512_set1_epi32(x[i]));
          dot_last = _mm512_dpbusd_epi32(dot_last, last[i], _mm512_set1_epi32(x[4 + i]));
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot_first, dot_last));
        sum[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(a.scales_of(r0 + r)[b])), sum[r]);
        offset[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(a.offsets_of(r0 + r)[b]), offset[r]);
      }
    }
    for (int r = 0; r < R; r++) {
      alignas(64) float lanes[kTile];
      _mm512_store_ps(lanes, _mm512_add_ps(sum[r], offset[r]));
      store_lanes(y, r0 + r, t * kTile, lanes, weight.rows_in_tile(t));
    }
  }
}

// 256 bits: a tile's rows in two halves of 8 lanes, each 64-byte chunk read as its two 32-byte halves in
// the same pass (one stream). AVX2 has no vpdpbusd: vpmaddubsw gives 16-bit sums of byte pairs, added up over
// the block's eight products (at most 16 * 15 * 127 = 30480: no saturation), then vpmaddwd by 1 sums pairs
// into 32 bits.
template <int R, int kKind>  // kKind: 0 AVX2, 1 AVX-VNNI (VEX), 2 AVX512-VNNI at 256 bits (EVEX)
TARGET_AVX2 void int4_tiles_256(const Int4Weight& weight, const Activations& a, int64_t r0, int64_t t0, int64_t t1,
                                const Output& y) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  const int64_t ahead = read_ahead;
  const int32_t* q[R];
  for (int r = 0; r < R; r++) q[r] = code_words(a, r0 + r);
  for (int64_t t = t0; t < t1; t++) {
    __m256 sum[2][R], offset[2][R];
    for (int h = 0; h < 2; h++)
      for (int r = 0; r < R; r++) sum[h][r] = offset[h][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < weight.blocks; b++) {
      const uint8_t* block = weight.block(t, b);
      read_ahead_of(block, kTileBlockBytes, ahead);
      for (int h = 0; h < 2; h++) {  // rows 8h .. 8h + 7 of the tile
        __m256i dot[R];
        for (int r = 0; r < R; r++) dot[r] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
          const __m256i bytes = _mm256_loadu_si256((const __m256i*)(block + kTileCodes + 64 * i + 32 * h));
          const __m256i first = _mm256_and_si256(bytes, low_nibble);
          const __m256i last = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble);
          for (int r = 0; r < R; r++) {
            const int32_t* x = q[r] + b * (kBlock / 4);
            if (kKind == 0) {  // 16-bit pair sums, widened once per block below
              dot[r] = _mm256_add_epi16(dot[r], _mm256_maddubs_epi16(first, _mm256_set1_epi32(x[i])));
              dot[r] = _mm256_add_epi16(dot[r], _mm256_maddubs_epi16(last, _mm256_set1_epi32(x[4 + i])));
            } else {
              dot[r] = dot_bytes<kKind == 1>(dot[r], first, _mm256_set1_epi32(x[i]));
              dot[r] = dot_bytes<kKind == 1>(dot[r], last, _mm256_set1_epi32(x[4 + i]));
            }
          }
        }
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block + kTileScales + 16 * h)));
        const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block + kTileLows + 16 * h)));
        for (int r = 0; r < R; r++) {
          const __m256i dots = kKind == 0 ? _mm256_madd_epi16(dot[r], _mm256_set1_epi16(1)) : dot[r];
          sum[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots),
                                      _mm256_mul_ps(scale, _mm256_set1_ps(a.scales_of(r0 + r)[b])), sum[h][r]);
          offset[h][r] = _mm256_fmadd_ps(low, _mm256_set1_ps(a.offsets_of(r0 + r)[b]), offset[h][r]);
        }
      }
    }
    for (int h = 0; h < 2; h++) {
      const int64_t lanes_here = std::min<int64_t>(8, weight.rows_in_tile(t) - 8 * h);
      for (int r = 0; r < R && lanes_here > 0; r++) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, _mm256_add_ps(sum[h][r], offset[h][r]));
        store_lanes(y, r0 + r, t * kTile + 8 * h, lanes, lanes_here);
      }
    }
  }
}
#endif

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& tiles, int64_t out, const std::string& variant_name) {
  const int64_t in = x.size(-1);
  const Int4Weight w = int4_weight(tiles, out, in);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const Variant variant = parse_variant("int4", variant_name);
  const at::Tensor rows_in = x.reshape({-1, in}).contiguous();
  const int64_t rows = rows_in.size(0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  const Output y(x, rows, out);
  if (rows == 0 || out == 0) return y.tensor.view(shape);
  const FloatRows xf(rows_in);
  const Activations a(xf.data, rows, in, variant);
  // Threads and cache tiles over whole tiles of 16 weight rows.
  for_rows(rows, tiles.size(0), w.blocks * kTileBlockBytes, [&](int64_t r0, int64_t count, int64_t t0, int64_t t1) {
#ifdef X86_KERNELS
    if (variant != Variant::scalar)
      return with_rows(count, [&](auto R) {
        constexpr int kR = decltype(R)::value;
        if (variant == Variant::avx512vnni) return int4_avx512vnni<kR>(w, a, r0, t0, t1, y);
        if (variant == Variant::avx2) return int4_tiles_256<kR, 0>(w, a, r0, t0, t1, y);
        if (cpu().avxvnni) return int4_tiles_256<kR, 1>(w, a, r0, t0, t1, y);
        int4_tiles_256<kR, 2>(w, a, r0, t0, t1, y);
      });
#endif
    int4_scalar(w, a, r0, count, t0, t1, y);
  });
  return y.tensor.view(shape);
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16 weights x float32 (or bfloat16) activations.
// ---------------------------------------------------------------------------------------------------------
// The reference: y[r][n] = sum_j float(w[j]) * x[j], in float32.
void bf16_scalar(const at::BFloat16* weight, const float* x, int64_t in, int64_t r0, int64_t rows, int64_t n0,
                 int64_t n1, const Output& y) {
  for (int64_t n = n0; n < n1; n++) {
    const at::BFloat16* w = weight + n * in;
    for (int64_t r = r0; r < r0 + rows; r++) {
      float sum = 0.0f;
      for (int64_t j = 0; j < in; j++) sum += float(w[j]) * x[r * in + j];
      y.store(r, n, sum);
    }
  }
}

#ifdef X86_KERNELS
// x for the SIMD variants, in chunks of `width` inputs (16 for AVX2, 32 for AVX-512), each chunk's even-numbered
// inputs first, then its odd-numbered ones, and zeros past the end. Why: a register of `width` bfloat16 weights,
// read as 32-bit lanes, holds weight 2i in the low half of lane i and weight 2i + 1 in the high half; shifting
// each lane left by 16 bits gives the even weights as float32, clearing the low halves gives the odd ones.
std::vector<float> even_then_odd(const float* x, int64_t rows, int64_t in, int64_t width) {
  const int64_t chunks = (in + width - 1) / width;
  std::vector<float> spread(rows * chunks * width, 0.0f);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < chunks; c++) {
      const float* from = x + r * in + c * width;
      float* to = spread.data() + (r * chunks + c) * width;
      for (int64_t i = 0; i < std::min(width, in - c * width); i++) to[(i % 2) * (width / 2) + i / 2] = from[i];
    }
  return spread;
}

// AVX2, 16 weights (a chunk) at a time: the even weights times x's even inputs, the odd times the odd. x is
// either spread (float32, even_then_odd) or, where it is bfloat16, as it is: then its register is split into even
// and odd inputs like the weights' (half the bytes to read; with 8192 inputs a float32 row fills the L1 cache).
template <int R, class X>
TARGET_AVX2 inline void bf16_chunk_avx2(const uint16_t* w, const X* const* x, int64_t c, __m256* sum) {
  constexpr int64_t kWidth = 16;
  const __m256i high_halves = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  const __m256i wc = _mm256_loadu_si256((const __m256i*)w);
  const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(wc, 16));
  const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(wc, high_halves));
  for (int r = 0; r < R; r++) {
    __m256 x_even, x_odd;
    if constexpr (std::is_same_v<X, float>) {
      x_even = _mm256_loadu_ps(x[r] + c * kWidth);
      x_odd = _mm256_loadu_ps(x[r] + c * kWidth + kWidth / 2);
    } else {
      const __m256i xc = _mm256_loadu_si256((const __m256i*)(x[r] + c * kWidth));
      x_even = _mm256_castsi256_ps(_mm256_slli_epi32(xc, 16));
      x_odd = _mm256_castsi256_ps(_mm256_and_si256(xc, high_halves));
    }
    sum[r] = _mm256_fmadd_ps(even, x_even, sum[r]);
    sum[r] = _mm256_fmadd_ps(odd, x_odd, sum[r]);
  }
}

template <int R, class X>
TARGET_AVX2 void bf16_avx2(const at::BFloat16* weight, const X* xs, int64_t stride, int64_t in, int64_t r0,
                           int64_t n0, int64_t n1, const Output& y) {
  constexpr int64_t kWidth = 16;
  constexpr int kC = kChains<R>;
  const int64_t chunks = (in + kWidth - 1) / kWidth, whole = in / kWidth;
  const X* x[R];  // x's rows, `stride` elements apart
  for (int r = 0; r < R; r++) x[r] = xs + (r0 + r) * stride;
  alignas(32) uint16_t spare[kWidth];
  const int64_t ahead = read_ahead;
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight + n * in);
    __m256 sum[kC][R];
    for (int c = 0; c < kC; c++)
      for (int r = 0; r < R; r++) sum[c][r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + kC <= whole; c += kC) {
      read_ahead_of(w + c * kWidth, kC * kWidth * 2, ahead);
      for (int k = 0; k < kC; k++) bf16_chunk_avx2<R, X>(w + (c + k) * kWidth, x, c + k, sum[k]);
    }
    for (; c < chunks; c++) bf16_chunk_avx2<R, X>(whole_block(w, in, c * kWidth, kWidth, spare), x, c, sum[0]);
    for (int r = 0; r < R; r++) {
      for (int k = 1; k < kC; k++) sum[0][r] = _mm256_add_ps(sum[0][r], sum[k][r]);
      y.store(r0 + r, n, sum_of(sum[0][r]));
    }
  }
}

// AVX-512: the same, 32 weights at a time.
template <int R, class X>
TARGET_AVX512 inline void bf16_chunk_avx512(const uint16_t* w, const X* const* x, int64_t c, __m512* sum) {
  constexpr int64_t kWidth = 32;
  const __m512i high_halves = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const __m512i wc = _mm512_loadu_si512(w);
  const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(wc, 16));
  const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(wc, high_halves));
  for (int r = 0; r < R; r++) {
    __m512 x_even, x_odd;
    if constexpr (std::is_same_v<X, float>) {
      x_even = _mm512_loadu_ps(x[r] + c * kWidth);
      x_odd = _mm512_loadu_ps(x[r] + c * kWidth + kWidth / 2);
    } else {
      const __m512i xc = _mm512_loadu_si512(x[r] + c * kWidth);
      x_even = _mm512_castsi512_ps(_mm512_slli_epi32(xc, 16));
      x_odd = _mm512_castsi512_ps(_mm512_and_si512(xc, high_halves));
    }
    sum[r] = _mm512_fmadd_ps(even, x_even, sum[r]);
    sum[r] = _mm512_fmadd_ps(odd, x_odd, sum[r]);
  }
}

template <int R, class X>
TARGET_AVX512 void bf16_avx512(const at::BFloat16* weight, const X* xs, int64_t stride, int64_t in, int64_t r0,
                               int64_t n0, int64_t n1, const Output& y) {
  constexpr int64_t kWidth = 32;
  constexpr int kC = kChains<R>;
  const int64_t chunks = (in + kWidth - 1) / kWidth, whole = in / kWidth;
  const X* x[R];  // x's rows, `stride` elements apart
  for (int r = 0; r < R; r++) x[r] = xs + (r0 + r) * stride;
  alignas(64) uint16_t spare[kWidth];
  const int64_t ahead = read_ahead;
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight + n * in);
    __m512 sum[kC][R];
    for (int c = 0; c < kC; c++)
      for (int r = 0; r < R; r++) sum[c][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + kC <= whole; c += kC) {
      read_ahead_of(w + c * kWidth, kC * kWidth * 2, ahead);
      for (int k = 0; k < kC; k++) bf16_chunk_avx512<R, X>(w + (c + k) * kWidth, x, c + k, sum[k]);
    }
    for (; c < chunks; c++) bf16_chunk_avx512<R, X>(whole_block(w, in, c * kWidth, kWidth, spare), x, c, sum[0]);
    for (int r = 0; r < R; r++) {
      for (int k = 1; k < kC; k++) sum[0][r] = _mm512_add_ps(sum[0][r], sum[k][r]);
      y.store(r0 + r, n, _mm512_reduce_add_ps(sum[0][r]));
    }
  }
}

// AVX512-BF16, x in bfloat16 too: vdpbf16ps multiplies 32 bfloat16 pairs and adds each two neighbours' products
// into a float32 lane. x is padded with zeros to whole chunks of 32.
template <int R>
TARGET_AVX512BF16 inline void bf16_chunk_avx512bf16(const uint16_t* w, const uint16_t* const* x, int64_t c,
                                                    __m512* sum) {
  constexpr int64_t kWidth = 32;
  const __m512i wc = _mm512_loadu_si512(w);
  for (int r = 0; r < R; r++)
    sum[r] = _mm512_dpbf16_ps(sum[r], (__m512bh)_mm512_loadu_si512(x[r] + c * kWidth), (__m512bh)wc);
}

template <int R>
TARGET_AVX512BF16 void bf16_avx512bf16(const at::BFloat16* weight, const uint16_t* padded, int64_t in, int64_t r0,
                                       int64_t n0, int64_t n1, const Output& y) {
  constexpr int64_t kWidth = 32;
  constexpr int kC = kChains<R>;
  const int64_t chunks = (in + kWidth - 1) / kWidth, whole = in / kWidth;
  const uint16_t* x[R];  // x's rows
  for (int r = 0; r < R; r++) x[r] = padded + (r0 + r) * chunks * kWidth;
  alignas(64) uint16_t spare[kWidth];
  const int64_t ahead = read_ahead;
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight + n * in);
    __m512 sum[kC][R];
    for (int c = 0; c < kC; c++)
      for (int r = 0; r < R; r++) sum[c][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + kC <= whole; c += kC) {
      read_ahead_of(w + c * kWidth, kC * kWidth * 2, ahead);
      for (int k = 0; k < kC; k++) bf16_chunk_avx512bf16<R>(w + (c + k) * kWidth, x, c + k, sum[k]);
    }
    for (; c < chunks; c++) bf16_chunk_avx512bf16<R>(whole_block(w, in, c * kWidth, kWidth, spare), x, c, sum[0]);
    for (int r = 0; r < R; r++) {
      for (int k = 1; k < kC; k++) sum[0][r] = _mm512_add_ps(sum[0][r], sum[k][r]);
      y.store(r0 + r, n, _mm512_reduce_add_ps(sum[0][r]));
    }
  }
}
#endif

at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight, const std::string& variant_name) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "the weight must be a contiguous bfloat16 (out, in) tensor");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.size(-1) == in, "x has ", x.size(-1), " inputs, the weight ", in);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  Variant variant = parse_variant("bf16", variant_name);
  if (variant == Variant::avx512bf16 && x.scalar_type() != at::kBFloat16) variant = Variant::avx512;
  const at::Tensor rows_in = x.reshape({-1, in}).contiguous();
  const int64_t rows = rows_in.size(0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  const Output y(x, rows, out);
  if (rows == 0 || out == 0) return y.tensor.view(shape);
  const at::BFloat16* w = weight.data_ptr<at::BFloat16>();
#ifdef X86_KERNELS
  if (variant != Variant::scalar && x.scalar_type() == at::kBFloat16) {  // x read as it is, padded to whole chunks
    constexpr int64_t kWidth = 32;  // a whole number of either variant's chunks
    const int64_t stride = (in + kWidth - 1) / kWidth * kWidth;
    std::vector<uint16_t> padded(rows * stride, 0);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(rows_in.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < rows; r++) std::memcpy(&padded[r * stride], bits + r * in, in * sizeof(uint16_t));
    for_rows(rows, out, 2 * in, [&](int64_t r0, int64_t count, int64_t n0, int64_t n1) {
      with_rows(count, [&](auto R) {
        constexpr int kR = decltype(R)::value;
        if (variant == Variant::avx512bf16) return bf16_avx512bf16<kR>(w, padded.data(), in, r0, n0, n1, y);
        if (variant == Variant::avx512) return bf16_avx512<kR, uint16_t>(w, padded.data(), stride, in, r0, n0, n1, y);
        bf16_avx2<kR, uint16_t>(w, padded.data(), stride, in, r0, n0, n1, y);
      });
    });
    return y.tensor.view(shape);
  }
#endif
  const FloatRows xf(rows_in);
#ifdef X86_KERNELS
  if (variant != Variant::scalar) {
    const int64_t width = variant == Variant::avx2 ? 16 : 32, stride = (in + width - 1) / width * width;
    const std::vector<float> spread = even_then_odd(xf.data, rows, in, width);
    for_rows(rows, out, 2 * in, [&](int64_t r0, int64_t count, int64_t n0, int64_t n1) {
      with_rows(count, [&](auto R) {
        constexpr int kR = decltype(R)::value;
        if (variant == Variant::avx2) return bf16_avx2<kR, float>(w, spread.data(), stride, in, r0, n0, n1, y);
        bf16_avx512<kR, float>(w, spread.data(), stride, in, r0, n0, n1, y);
      });
    });
    return y.tensor.view(shape);
  }
#endif
  for_rows(rows, out, 2 * in, [&](int64_t r0, int64_t count, int64_t n0, int64_t n1) {
    bf16_scalar(w, xf.data, in, r0, count, n0, n1, y);
  });
  return y.tensor.view(shape);
}

// ---------------------------------------------------------------------------------------------------------
// Dequantising into a float32 buffer (for prompt chunks: one float32 matrix product per weight). The loops are
// plain C++; the compiler vectorises the int8 one for the instruction set its caller names; int4 has its own.
// ---------------------------------------------------------------------------------------------------------
inline __attribute__((always_inline)) void dequantize_int8_rows(const int8_t* codes, const float* scales,
                                                                float* out, int64_t in, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++)
    for (int64_t j = 0; j < in; j++) out[n * in + j] = float(codes[n * in + j]) * scales[n];
}

// A tile's rows, codes * scale + low (row t * 16 + j of the weight is row t * 16 + j of out), from block
// first_block on.
inline __attribute__((always_inline)) void dequantize_int4_tiles(const Int4Weight& weight, float* out, int64_t in,
                                                                 int64_t t0, int64_t t1, int64_t first_block = 0) {
  constexpr int64_t half = kBlock / 2;
  for (int64_t t = t0; t < t1; t++)
    for (int64_t j = 0; j < weight.rows_in_tile(t); j++)
      for (int64_t b = first_block; b < weight.blocks; b++) {
        const uint8_t* block = weight.block(t, b);
        const float scale = tile_scale(block, j), low = tile_low(block, j);
        float* o = out + (t * kTile + j) * in + b * kBlock;
        for (int64_t i = 0; i < std::min(kBlock, in - b * kBlock); i++) {
          const uint8_t byte = tile_byte(block, j, i % half);
          o[i] = float(i < half ? byte & 0x0F : byte >> 4) * scale + low;
        }
      }
}

#ifdef X86_KERNELS
TARGET_AVX512 void dequantize_int8_avx512(const int8_t* c, const float* s, float* o, int64_t in, int64_t n0,
                                          int64_t n1) {
  dequantize_int8_rows(c, s, o, in, n0, n1);
}
TARGET_AVX2 void dequantize_int8_avx2(const int8_t* c, const float* s, float* o, int64_t in, int64_t n0, int64_t n1) {
  dequantize_int8_rows(c, s, o, in, n0, n1);
}
// int4 with AVX2 (the compiler does not vectorise the loop above): row j's 16 code bytes of a block, gathered
// from the four chunks (4 bytes each: inputs 4i .. 4i + 3 and 16 + 4i ..), widened 8 codes at a time.
TARGET_AVX2 void dequantize_int4_avx2(const Int4Weight& weight, float* out, int64_t in, int64_t t0, int64_t t1) {
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  const int64_t whole = in / kBlock;
  for (int64_t t = t0; t < t1; t++) {
    for (int64_t j = 0; j < weight.rows_in_tile(t); j++)
      for (int64_t b = 0; b < whole; b++) {
        const uint8_t* block = weight.block(t, b);
        int32_t words[4];
        for (int i = 0; i < 4; i++) std::memcpy(&words[i], block + kTileCodes + i * 4 * kTile + 4 * j, 4);
        const __m128i bytes = _mm_loadu_si128((const __m128i*)words);
        const __m128i halves[2] = {_mm_and_si128(bytes, low_nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble)};
        const __m256 scale = _mm256_set1_ps(tile_scale(block, j)), low = _mm256_set1_ps(tile_low(block, j));
        float* o = out + (t * kTile + j) * in + b * kBlock;
        for (int h = 0; h < 2; h++)
          for (int e = 0; e < 2; e++) {
            const __m256i codes = _mm256_cvtepu8_epi32(e ? _mm_srli_si128(halves[h], 8) : halves[h]);
            _mm256_storeu_ps(o + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), scale, low));
          }
      }
    if (whole * kBlock < in) dequantize_int4_tiles(weight, out, in, t, t + 1, whole);  // the short last block
  }
}
#endif

void check_buffer(const at::Tensor& out, int64_t rows, int64_t in) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == in, "the buffer must be a contiguous float32 (", rows, ", ", in, ") tensor");
}

void dequantize_int8(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "int8 codes must be a contiguous int8 (out, in) tensor");
  const int64_t rows = codes.size(0), in = codes.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == rows,
              "int8 scales must be float32, one per output row");
  check_buffer(out, rows, in);
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, in)), [&](int64_t n0, int64_t n1) {
#ifdef X86_KERNELS
    if (cpu().avx512) return dequantize_int8_avx512(c, s, o, in, n0, n1);
    if (cpu().avx2) return dequantize_int8_avx2(c, s, o, in, n0, n1);
#endif
    dequantize_int8_rows(c, s, o, in, n0, n1);
  });
}

// out (rows, in): the weight's first `rows` rows, from tiles (ceil(rows / 16), blocks, 320).
void dequantize_int4(const at::Tensor& tiles, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2, "the buffer must be a (rows, in) float32 tensor");
  const int64_t rows = out.size(0), in = out.size(1);
  const Int4Weight w = int4_weight(tiles, rows, in);
  check_buffer(out, rows, in);
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, kTile * in));
  at::parallel_for(0, tiles.size(0), grain, [&](int64_t t0, int64_t t1) {
#ifdef X86_KERNELS
    if (cpu().avx2) return dequantize_int4_avx2(w, o, in, t0, t1);
#endif
    dequantize_int4_tiles(w, o, in, t0, t1);
  });
}

// The activation quantisation on its own, for the tests: (codes (rows, blocks * 32) int8, scales (rows, blocks)
// float32, sums (rows, blocks) int32), as the int8 and int4 kernels' variant `variant` computes them.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x, const std::string& variant_name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const int64_t in = x.size(-1);
  const at::Tensor rows_in = x.reshape({-1, in}).contiguous();
  const int64_t rows = rows_in.size(0);
  const FloatRows xf(rows_in);
  const Activations a(xf.data, rows, in, parse_variant("int8", variant_name));
  at::Tensor codes = at::empty({rows, a.blocks * kBlock}, at::kChar);
  at::Tensor scales = at::empty({rows, a.blocks}, at::kFloat);
  at::Tensor sums = at::empty({rows, a.blocks}, at::kInt);
  for (int64_t r = 0; r < rows; r++) {
    std::memcpy(codes.data_ptr<int8_t>() + r * a.blocks * kBlock, a.codes_of(r), a.blocks * kBlock);
    std::memcpy(scales.data_ptr<float>() + r * a.blocks, a.scales_of(r), a.blocks * sizeof(float));
    std::memcpy(sums.data_ptr<int32_t>() + r * a.blocks, a.sums_of(r), a.blocks * sizeof(int32_t));
  }
  return {codes, scales, sums};
}

}  // namespace

void add_decoding_functions(pybind11::module_& m);  // decoding.cpp: RMSNorm, RoPE into the KV cache

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "speedups' own CPU kernels: see speedups/native.py";
  m.def("variants", &variants, "the variants of kernel 'int8', 'int4' or 'bf16' that this CPU runs, fastest first",
        py::arg("kernel"));
  m.def("quantize_activations", &quantize_activations, py::arg("x"), py::arg("variant") = "");
  m.def("int8_matvec", &int8_matvec, py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("variant") = "");
  m.def("int4_matvec", &int4_matvec, py::arg("x"), py::arg("tiles"), py::arg("out"), py::arg("variant") = "");
  m.def("bf16_matvec", &bf16_matvec, py::arg("x"), py::arg("weight"), py::arg("variant") = "");
  m.def("set_read_ahead", &set_read_ahead, "bytes ahead the SIMD matvec loops prefetch the weight (0: off); "
        "returns the previous value", py::arg("bytes"));
  m.def("dequantize_int8", &dequantize_int8, py::arg("codes"), py::arg("scales"), py::arg("out"));
  m.def("dequantize_int4", &dequantize_int4, py::arg("tiles"), py::arg("out"));
  add_decoding_functions(m);
}
