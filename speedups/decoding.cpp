// The small steps of a decoding step, each as one call: RMSNorm, and RoPE with the write into the KV cache.
// speedups/native.py compiles this file together with quantized.cpp (one library) and documents the Python
// API; tests/test_native_kernels.py compares each function with llama-models' own code.
//
// Why. With one token per step, each of these steps touches a few thousand numbers, less than a microsecond
// of work, but written in PyTorch it is several operations (llama-models' RMSNorm is six: widen, square,
// mean, add, rsqrt, multiply, then round and multiply by the weight; RoPE widens, views as complex, multiplies,
// views as real and rounds, for queries and keys; the cache takes two more), and each PyTorch operation costs
// a few microseconds to dispatch and allocate, and a step of the 1B model runs 33 norms and 16 attention
// layers (`python benchmarks/bench_decode.py` measures whole steps; benchmarks/README.md, "One call each").
// Here each is one loop over the numbers.
//
// Same math, same roundings, as llama-models computes them:
//
//     RMSNorm (llama_models.llama3.model.RMSNorm), per row x of `dim` numbers, in float32:
//         r = 1 / sqrt(sum_i x[i]^2 / dim + eps)
//         y[i] = round(round(x[i] * r) * weight[i])      each round: to x's dtype (identity in float32)
//     Only the order of the float32 sum differs from PyTorch's (16 partial sums here).
//
//     RoPE (apply_rotary_emb): the pairs (x[2i], x[2i+1]) of every query and key head, as a complex number
//     times the position's rotation (cos, sin) of frequency i, in float32, rounded to the dtype:
//         (x[2i] * cos - x[2i+1] * sin,  x[2i] * sin + x[2i+1] * cos)
//
// Numbers are float32, bfloat16 or float16 (T below); a bfloat16 or float16 is widened to float32 to compute,
// and rounded back to nearest even, as PyTorch rounds.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kPartialSums = 16;  // independent sums: the compiler turns them into SIMD lanes
constexpr int64_t kTaskNumbers = 1 << 14;  // the least numbers worth a thread of their own

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return float(x); }
inline float widen(c10::Half x) { return float(x); }
template <class T>
inline T narrow(float x) { return T(x); }  // c10's constructors round to nearest even

// RMSNorm of `rows` rows of `dim` numbers.
template <class T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t rows, int64_t dim, float eps) {
  const int64_t grain = std::max<int64_t>(1, kTaskNumbers / std::max<int64_t>(1, dim));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const T* row = x + r * dim;
      float partial[kPartialSums] = {};
      int64_t i = 0;
      for (; i + kPartialSums <= dim; i += kPartialSums)
        for (int64_t k = 0; k < kPartialSums; k++) partial[k] += widen(row[i + k]) * widen(row[i + k]);
      for (; i < dim; i++) partial[i % kPartialSums] += widen(row[i]) * widen(row[i]);
      float squares = 0.0f;
      for (int64_t k = 0; k < kPartialSums; k++) squares += partial[k];
      const float r_inv = 1.0f / std::sqrt(squares / float(dim) + eps);
      T* out = y + r * dim;
      for (int64_t j = 0; j < dim; j++) out[j] = narrow<T>(widen(narrow<T>(widen(row[j]) * r_inv)) * widen(weight[j]));
    }
  });
}

// x (..., dim) and weight (dim,) of one dtype -> (..., dim).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim, "weight must be (", dim, ",)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  const at::Tensor rows = x.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(rows.sizes(), rows.options());
  const int64_t count = dim ? rows.numel() / dim : 0;
  switch (x.scalar_type()) {
    case at::kFloat:
      rms_norm_rows(rows.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), count, dim, float(eps));
      break;
    case at::kBFloat16:
      rms_norm_rows(rows.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), count,
                    dim, float(eps));
      break;
    case at::kHalf:
      rms_norm_rows(rows.data_ptr<c10::Half>(), w.data_ptr<c10::Half>(), y.data_ptr<c10::Half>(), count, dim,
                    float(eps));
      break;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return y;
}

// One head's numbers rotated: pairs (2i, 2i + 1) by rotation i (cos, sin).
template <class T>
inline void rotate_head(const T* x, const float* rotation, T* out, int64_t head_dim) {
  for (int64_t i = 0; i < head_dim / 2; i++) {
    const float a = widen(x[2 * i]), b = widen(x[2 * i + 1]);
    const float c = rotation[2 * i], s = rotation[2 * i + 1];
    out[2 * i] = narrow<T>(a * c - b * s);
    out[2 * i + 1] = narrow<T>(a * s + b * c);
  }
}

// qkv (batch, seqlen, (heads + 2 * kv_heads) * head_dim): each position's queries, keys and values, one after
// the other (GroupedQueryAttention's wqkv product). The queries rotated into q (batch, heads, seqlen, head_dim);
// the keys rotated and the values as they are into the caches (max_batch, kv_heads, max_seq, head_dim) at
// positions start .. start + seqlen - 1.
template <class T>
void rotate_rows(const T* qkv, const float* rotations, T* q, T* cache_k, T* cache_v, int64_t batch, int64_t seqlen,
                 int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_seq, int64_t start) {
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  const int64_t grain = std::max<int64_t>(1, kTaskNumbers / width);
  at::parallel_for(0, batch * seqlen, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / seqlen, s = i % seqlen;
      const T* row = qkv + i * width;
      const float* rotation = rotations + s * head_dim;  // (cos, sin) pairs of this position
      for (int64_t h = 0; h < heads; h++)
        rotate_head(row + h * head_dim, rotation, q + ((b * heads + h) * seqlen + s) * head_dim, head_dim);
      for (int64_t h = 0; h < kv_heads; h++) {
        const int64_t at = ((b * kv_heads + h) * max_seq + start + s) * head_dim;
        rotate_head(row + (heads + h) * head_dim, rotation, cache_k + at, head_dim);
        const T* value = row + (heads + kv_heads + h) * head_dim;
        std::copy(value, value + head_dim, cache_v + at);
      }
    }
  });
}

at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& rotations, at::Tensor& cache_k,
                             at::Tensor& cache_v, int64_t start, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "qkv must be a contiguous (batch, seqlen, width) tensor");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.sizes() == cache_k.sizes() &&
                  cache_v.is_contiguous(), "the caches must be contiguous (max_batch, kv_heads, max_seq, head_dim)");
  const int64_t batch = qkv.size(0), seqlen = qkv.size(1), head_dim = cache_k.size(3), max_seq = cache_k.size(2);
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * head_dim && cache_k.size(1) == kv_heads &&
                  batch <= cache_k.size(0) && head_dim % 2 == 0, "qkv, the heads and the caches disagree");
  TORCH_CHECK(start >= 0 && start + seqlen <= max_seq, "positions ", start, " .. ", start + seqlen - 1,
              " are past the cache's ", max_seq);
  TORCH_CHECK(rotations.scalar_type() == at::kFloat && rotations.is_contiguous() &&
                  rotations.numel() == seqlen * head_dim,
              "rotations must be float32 (seqlen, head_dim / 2, 2), contiguous");
  TORCH_CHECK(cache_k.scalar_type() == qkv.scalar_type() && cache_v.scalar_type() == qkv.scalar_type(),
              "qkv and the caches must have one dtype");
  at::Tensor q = at::empty({batch, heads, seqlen, head_dim}, qkv.options());
  const float* r = rotations.data_ptr<float>();
  switch (qkv.scalar_type()) {
    case at::kFloat:
      rotate_rows(qkv.data_ptr<float>(), r, q.data_ptr<float>(), cache_k.data_ptr<float>(), cache_v.data_ptr<float>(),
                  batch, seqlen, heads, kv_heads, head_dim, max_seq, start);
      break;
    case at::kBFloat16:
      rotate_rows(qkv.data_ptr<c10::BFloat16>(), r, q.data_ptr<c10::BFloat16>(), cache_k.data_ptr<c10::BFloat16>(),
                  cache_v.data_ptr<c10::BFloat16>(), batch, seqlen, heads, kv_heads, head_dim, max_seq, start);
      break;
    case at::kHalf:
      rotate_rows(qkv.data_ptr<c10::Half>(), r, q.data_ptr<c10::Half>(), cache_k.data_ptr<c10::Half>(),
                  cache_v.data_ptr<c10::Half>(), batch, seqlen, heads, kv_heads, head_dim, max_seq, start);
      break;
    default:
      TORCH_CHECK(false, "qkv must be float32, bfloat16 or float16");
  }
  return q;
}

}  // namespace

// Called by quantized.cpp's module definition: one library holds both files' functions.
void add_decoding_functions(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rotate_into_cache", &rotate_into_cache, py::arg("qkv"), py::arg("rotations"), py::arg("cache_k"),
        py::arg("cache_v"), py::arg("start"), py::arg("heads"), py::arg("kv_heads"));
}
