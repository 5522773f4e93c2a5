// MLX's CPU fallbacks for rotary position embedding, RMS normalization and a decode step's attention, and its CPU
// softmax, as one MLX primitive each.
//
// On the CPU MLX has no kernel for `mx.fast.rope` or `mx.fast.rms_norm`: each call builds its fallback from
// plain operations, ~25 for a rotation (positions, angles, cos, sin, two slices, four products, a difference,
// a sum, a concatenation and their broadcasts), twice per attention layer per step, and ~9 for a norm. Each
// operation costs the rank's Python thread its dispatch, which on a one-core host the computation waits for.
// Both functions here give the fallback's result bit for bit (built with -ffp-contract=off: each product and
// sum rounded, as MLX's separate operations round them).
//
// `table_rope(x, cos, sin, offset, dims, traditional)`: x float32 [B, H, T, D] (any strides), cos and sin
// float32 [P, dims / 2] (row p: position p, as MLX's own rope computes them: exo_lab.models.fused builds the
// table by rotating an identity through `mx.fast.rope`), offset int32 [] or [B]. Position (b, t) is
// offset[b] + t; a negative one (a left-padded row) reads |position|'s row with the sine negated, as MLX's
// sine and cosine are odd and even; one past the table gets NaNs (the caller sizes it). Each output element
// is the fallback's arithmetic in its order, `x1 * cos - x2 * sin` and `x1 * sin + x2 * cos`. Returns
// float32 [B, H, T, D], row-contiguous.
//
// `rms_norm(x, w, eps)`: x float32 [..., N], w float32 [N]: `x * rsqrt(mean(x * x) + eps) * w` as the
// fallback computes it: the squares summed in order, times 1 / N, plus eps, one over the square root.
//
// `softmax(x)`: x float32 [..., N] softmaxed over its last axis as MLX's CPU Softmax computes it for float32
// (mlx/backend/cpu/softmax.cpp): MLX's Linux wheel runs its exp one element at a time, each of the polynomial's
// six fmas a call to libm's software fma (~12 ns an element; a 2000-token llama-1b decode step spent ~10 ms in
// it). Here the same exp in 8 lanes with the CPU's fma (one rounding each, as libm's), the sum in order.
//
// `swiglu(gate, x)`: mlx_lm's `swiglu` (a gated MLP's activation, `silu(gate) * x`, `silu(g) = g * sigmoid(g)`)
// as MLX's CPU computes it for float32: MLX's sigmoid (mlx/backend/cpu/unary_ops.h: `y = 1 / (1 + exp(|g|))`,
// `g < 0 ? y : 1 - y`) with the exp above. MLX's Linux wheel runs it one element at a time with libm's software
// fma (~100 us of the 8192 elements of each llama-1b layer's decode step); here 8 lanes at once.
//
// `decode_attention(q, k, v, scale, mask)`: one query position's attention (a decode step), q float32 [B, Hq, 1,
// D], k and v float32 [B, Hkv, T, D] (Hq a multiple of Hkv, all through their strides), mask None or bool /
// float32 [B, Hq, 1, T]: the result of MLX's fallback (scale, scores, mask, softmax, values) with exo_lab's
// small_gemm.c in front of OpenBLAS, bit for bit, as one operation.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Geometry {
  int B, H, T, D, half, P, offsets;
  int64_t so;  // the offsets' stride
  int64_t sb, sh, st, sd;  // x's strides, in elements
  bool traditional;
};

void rotate(const float* x, const float* cs, const float* sn, const int32_t* off, float* out, const Geometry& g) {
  for (int b = 0; b < g.B; b++) {
    const int32_t base = off[g.offsets == 1 ? 0 : b * g.so];
    for (int h = 0; h < g.H; h++) {
      for (int t = 0; t < g.T; t++) {
        const int64_t pos = int64_t(base) + t;
        const int64_t row = pos < 0 ? -pos : pos;
        float* o = out + ((int64_t(b) * g.H + h) * g.T + t) * g.D;
        if (row >= g.P) {  // the caller sizes the table; a position past it gets NaNs, never another's angles
          for (int i = 0; i < g.D; i++) o[i] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        const float* c = cs + row * g.half;
        const float* s = sn + row * g.half;
        const float sign = pos < 0 ? -1.0f : 1.0f;
        const float* xr = x + b * g.sb + h * g.sh + t * g.st;
        for (int i = 0; i < g.half; i++) {
          const int64_t i1 = g.traditional ? 2 * i : i, i2 = g.traditional ? 2 * i + 1 : i + g.half;
          const float x1 = xr[i1 * g.sd], x2 = xr[i2 * g.sd], ci = c[i], si = sign * s[i];
          const float a = x1 * ci, bb = x2 * si;
          o[i1] = a - bb;
          const float e = x1 * si, f = x2 * ci;
          o[i2] = e + f;
        }
        for (int i = 2 * g.half; i < g.D; i++) o[i] = xr[i * g.sd];
      }
    }
  }
}

class TableRope : public mx::Primitive {
 public:
  TableRope(mx::Stream stream, int dims, bool traditional)
      : mx::Primitive(stream), dims_(dims), traditional_(traditional) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &cs = inputs[1], &sn = inputs[2], &off = inputs[3];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    Geometry g{int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), int(x.shape(3)), dims_ / 2, int(cs.shape(0)),
               int(off.size()), off.ndim() ? off.strides(0) : 0, x.strides(0), x.strides(1), x.strides(2), x.strides(3), traditional_};
    encoder.dispatch([xp = x.data<float>(), cp = cs.data<float>(), sp = sn.data<float>(), op = off.data<int32_t>(),
                      outp = out.data<float>(), g]() { rotate(xp, cp, sp, op, outp, g); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("table_rope runs on the CPU only");
  }

  const char* name() const override {
    return "ExoTableRope";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const TableRope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int dims_;
  bool traditional_;
};


// x's rows through its strides (a norm's input is usually row-contiguous: then row r starts at r * N)
struct Rows {
  std::vector<int64_t> shape, strides;  // all but the last axis
  int64_t step;                         // the last axis's stride

  int64_t start(int64_t r) const {
    int64_t at = 0;
    for (int a = int(shape.size()) - 1; a >= 0; a--) {
      at += (r % shape[a]) * strides[a];
      r /= shape[a];
    }
    return at;
  }
};

// x's layout as rows of its last axis
Rows rows_of(const mx::array& x) {
  Rows layout{{}, {}, x.strides().back()};
  for (int a = 0; a + 1 < x.ndim(); a++) {
    layout.shape.push_back(x.shape(a));
    layout.strides.push_back(x.strides(a));
  }
  return layout;
}

void normalize(const float* x, const Rows& layout, const float* w, float* out, int64_t rows, int N, float eps) {
  const float inv_n = float(1.0 / double(N));
  const int64_t d = layout.step;
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + layout.start(r);
    float* o = out + r * N;
    float sum = 0.0f;
    for (int i = 0; i < N; i++) {
      const float sq = xr[i * d] * xr[i * d];
      sum = sum + sq;
    }
    const float mean = sum * inv_n;
    const float v = mean + eps;
    const float scale = 1.0f / std::sqrt(v);
    for (int i = 0; i < N; i++) {
      const float y = xr[i * d] * scale;
      o[i] = y * w[i];
    }
  }
}

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &w = inputs[1];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const int N = int(x.shape(-1));
    const int64_t rows = int64_t(x.size()) / N;
    encoder.dispatch([xp = x.data<float>(), layout = rows_of(x), wp = w.data<float>(), op = out.data<float>(),
                      rows, N, eps = eps_]() { normalize(xp, layout, wp, op, rows, N, eps); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("rms_norm runs on the CPU only");
  }

  const char* name() const override {
    return "ExoRmsNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
};

// MLX's CPU exp for one float (mlx/backend/cpu/simd/math.h, as its Linux wheel runs it: one element at a time):
// 2**(x / ln 2) as 2**round-half-up(y) (an exponent's bits) times a degree-6 polynomial in the rest, each fma
// rounded once; NaN stays, above 88 is inf, below -88 is 0. Written so that GCC vectorizes it: every lane does
// the same roundings as MLX's scalar loop.
inline float mlx_exp(float in) {
  const float x = in * 1.442695f;
  const float ipart = float(std::floor(double(x) + 0.5));  // MLX adds a double 0.5: exact, then floors
  const float fpart = x - ipart;
  float p = 1.535336188319500e-4f;
  p = std::fma(p, fpart, 1.339887440266574e-3f);
  p = std::fma(p, fpart, 9.618437357674640e-3f);
  p = std::fma(p, fpart, 5.550332471162809e-2f);
  p = std::fma(p, fpart, 2.402264791363012e-1f);
  p = std::fma(p, fpart, 6.931472028550421e-1f);
  p = std::fma(p, fpart, 1.000000000000000f);
  const float clamped = std::fmin(std::fmax(ipart, -255.0f), 255.0f);  // out of range: selected away below
  const int32_t bits = (int32_t(clamped) + 127) * (1 << 23);
  float two;
  __builtin_memcpy(&two, &bits, 4);
  float r = std::isnan(in) ? in : two * p;
  r = in > 88.0f ? std::numeric_limits<float>::infinity() : r;
  return in < -88.0f ? 0.0f : r;
}

#if defined(__AVX2__) && defined(__FMA__)
// mlx_exp for 8 floats at once, each lane the same roundings (round-half-up as floor plus the exact fraction's
// comparison with 0.5, which is what the double sum and floor give)
inline __m256 mlx_exp8(__m256 in) {
  const __m256 x = _mm256_mul_ps(in, _mm256_set1_ps(1.442695f));
  const __m256 fl = _mm256_floor_ps(x);
  const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(x, fl), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 ipart = _mm256_add_ps(fl, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
  const __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(1.000000000000000f));
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(ipart, _mm256_set1_ps(-255.0f)), _mm256_set1_ps(255.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(clamped), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(bits), p);
  r = _mm256_blendv_ps(r, in, _mm256_cmp_ps(in, in, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _mm256_cmp_ps(in, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(in, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}
#endif

// One row of N scores (xr, d apart) softmaxed into o as MLX's CPU Softmax does for float32: the running maximum
// (a NaN wins), exp(x - max) per element, their sum in order, its reciprocal, each exp times it. o may be xr.
void softmax_row(const float* xr, int64_t d, float* o, int N) {
  float top = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < N; i++) {
    const float v = xr[i * d];
    top = std::isnan(v) ? v : (v > top ? v : top);
  }
  int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (d == 1)
    for (; i + 8 <= N; i += 8)
      _mm256_storeu_ps(o + i, mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(xr + i), _mm256_set1_ps(top))));
#endif
  for (; i < N; i++) o[i] = mlx_exp(xr[i * d] - top);
  float sum = 0.0f;
  for (int i = 0; i < N; i++) sum = sum + o[i];
  const float scale = 1 / sum;
  for (int i = 0; i < N; i++) o[i] = o[i] * scale;
}

// Rows of x (through its strides) softmaxed into out.
void softmax_rows(const float* x, const Rows& layout, float* out, int64_t rows, int N) {
  for (int64_t r = 0; r < rows; r++) softmax_row(x + layout.start(r), layout.step, out + r * N, N);
}

// MLX's CPU sigmoid of one float, and silu(g) * x as mlx_lm's swiglu rounds it: each product and sum rounded.
inline float mlx_swiglu(float g, float x) {
  const float y = 1.0f / (1.0f + mlx_exp(std::fabs(g)));
  const float sig = g < 0.0f ? y : 1.0f - y;
  return (g * sig) * x;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 mlx_swiglu8(__m256 g, __m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
  const __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, mlx_exp8(magnitude)));
  const __m256 sig = _mm256_blendv_ps(_mm256_sub_ps(one, y), y, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(_mm256_mul_ps(g, sig), x);
}
#endif

// Rows of gate and x (through their strides) into out, row-contiguous.
void swiglu_rows(const float* g, const Rows& gl, const float* x, const Rows& xl, float* out, int64_t rows, int N) {
  for (int64_t r = 0; r < rows; r++) {
    const float *gr = g + gl.start(r), *xr = x + xl.start(r);
    float* o = out + r * N;
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (gl.step == 1 && xl.step == 1)
      for (; i + 8 <= N; i += 8)
        _mm256_storeu_ps(o + i, mlx_swiglu8(_mm256_loadu_ps(gr + i), _mm256_loadu_ps(xr + i)));
#endif
    for (; i < N; i++) o[i] = mlx_swiglu(gr[i * gl.step], xr[i * xl.step]);
  }
}

class Swiglu : public mx::Primitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &g = inputs[0], &x = inputs[1];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const int N = int(g.shape(-1));
    const int64_t rows = int64_t(g.size()) / N;
    encoder.dispatch([gp = g.data<float>(), gl = rows_of(g), xp = x.data<float>(), xl = rows_of(x),
                      op = out.data<float>(), rows, N]() { swiglu_rows(gp, gl, xp, xl, op, rows, N); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("swiglu runs on the CPU only");
  }

  const char* name() const override {
    return "ExoSwiglu";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

class Softmax : public mx::Primitive {
 public:
  explicit Softmax(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    const int N = int(x.shape(-1));
    const int64_t rows = int64_t(x.size()) / N;
    encoder.dispatch([xp = x.data<float>(), layout = rows_of(x), op = out.data<float>(), rows, N]() {
      softmax_rows(xp, layout, op, rows, N);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("softmax runs on the CPU only");
  }

  const char* name() const override {
    return "ExoSoftmax";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// One decode step's attention (one query position a row), everything MLX's CPU fallback does in one task per
// (row, key/value head): the query heads of a group scaled, their scores against each key, the mask, the softmax
// and the probabilities times the values. Each number is computed as the fallback computes it with exo_lab's
// small_gemm.c in front of OpenBLAS: a score is small_gemm's dot (8 lanes of fmas over the head, summed
// ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then the last D % 8 products added in order), an output element one
// fma chain over the keys in order. The group's query heads share each key's loads, and the fallback's ~10
// operations (scale, reshapes, broadcasts, two batched products of one-row matmuls, softmax) are one.
enum MaskKind { NoMask = 0, BoolMask = 1, AddedMask = 2 };

struct Attend {
  int Hq, Hkv, T, D;
  float scale;
  MaskKind mask_kind;
  const float *q, *k, *v;
  const void* mask;
  int64_t qs[4], ks[4], vs[4], ms[4];  // strides, in elements: q, mask [B, Hq, 1, *]; k, v [B, Hkv, T, D]
  float* out;                          // [B, Hq, 1, D]
  // Which order MLX's matmul gives the scores and the outputs, by the layouts it sees (its check_transpose): a
  // transposed operand goes to small_gemm's dot (x @ W.T), a row-major one, or one MLX copies first, to its
  // fma chain (x @ W). A cache's keys and values (rows of D contiguous) give dots for the scores, chains for
  // the values.
  bool keys_dot, values_dot;
};

inline float dot_in_order(const float* q, const float* k, int64_t kd, int D) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; j++) lane[j] = std::fma(q[d + j], k[(d + j) * kd], lane[j]);
  float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
  for (; d < D; d++) s += q[d] * k[d * kd];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
// hsum8 of four accumulators at once, [hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)] bit for bit (small_gemm.c's)
inline __m128 hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 p01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
  const __m256 p23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
  const __m256 q = _mm256_add_ps(_mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(q, q, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(q, q, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
}

// Four query rows (D apart from q0) against keys k0 and k1: 8 fma chains at once, into p[(r + i) * T + t].
inline void score_4x2(const float* q0, const float* k0, const float* k1, int D, int64_t T, int64_t t, float* p) {
  const float *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  const int D8 = D - D % 8;
  for (int d = 0; d < D8; d += 8) {
    const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d), x2 = _mm256_loadu_ps(q2 + d),
                 x3 = _mm256_loadu_ps(q3 + d), u = _mm256_loadu_ps(k0 + d), w = _mm256_loadu_ps(k1 + d);
    a0 = _mm256_fmadd_ps(x0, u, a0);
    a1 = _mm256_fmadd_ps(x1, u, a1);
    a2 = _mm256_fmadd_ps(x2, u, a2);
    a3 = _mm256_fmadd_ps(x3, u, a3);
    b0 = _mm256_fmadd_ps(x0, w, b0);
    b1 = _mm256_fmadd_ps(x1, w, b1);
    b2 = _mm256_fmadd_ps(x2, w, b2);
    b3 = _mm256_fmadd_ps(x3, w, b3);
  }
  float s[2][4];
  _mm_storeu_ps(s[0], hsum8x4(a0, a1, a2, a3));
  _mm_storeu_ps(s[1], hsum8x4(b0, b1, b2, b3));
  const float* qs[4] = {q0, q1, q2, q3};
  for (int i = 0; i < 4; i++) {
    for (int d = D8; d < D; d++) {
      s[0][i] += qs[i][d] * k0[d];
      s[1][i] += qs[i][d] * k1[d];
    }
    p[i * T + t] = s[0][i];
    p[i * T + t + 1] = s[1][i];
  }
}
#endif

// Scores of the group's `rep` scaled query rows (qsc, D apart) against every key (rows of D contiguous floats,
// kt apart from kb), into p[r * T + t]: each small_gemm's dot.
void score_keys(const float* qsc, int rep, const float* kb, int64_t kt, int D, int T, float* p) {
  int r = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; r + 4 <= rep; r += 4) {
    const float* q0 = qsc + int64_t(r) * D;
    float* pr = p + int64_t(r) * T;
    int t = 0;
    for (; t + 2 <= T; t += 2) score_4x2(q0, kb + t * kt, kb + (t + 1) * kt, D, T, t, pr);
    for (; t < T; t++)
      for (int i = 0; i < 4; i++) pr[i * int64_t(T) + t] = dot_in_order(q0 + i * D, kb + t * kt, 1, D);
  }
#endif
  for (; r < rep; r++)
    for (int t = 0; t < T; t++) p[int64_t(r) * T + t] = dot_in_order(qsc + int64_t(r) * D, kb + t * kt, 1, D);
}

// o[d] = sum over t of p[t] * v[t, d], one fma chain per d in key order.
inline void weigh_values(const float* p, const float* vb, int64_t vt, int64_t vd, int T, int D, float* o) {
  int d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (vd == 1) {
    for (; d + 64 <= D; d += 64) {
      __m256 acc[8];
      for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
      for (int t = 0; t < T; t++) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const float* row = vb + t * vt + d;
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row + 8 * j), acc[j]);
      }
      for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + d + 8 * j, acc[j]);
    }
    for (; d + 8 <= D; d += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int t = 0; t < T; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vb + t * vt + d), acc);
      _mm256_storeu_ps(o + d, acc);
    }
  }
#endif
  for (; d < D; d++) {
    float acc = 0.0f;
    for (int t = 0; t < T; t++) acc = std::fma(p[t], vb[t * vt + d * vd], acc);
    o[d] = acc;
  }
}

void attend_group(const Attend& a, int b, int g) {
  const int rep = a.Hq / a.Hkv, D = a.D, T = a.T;
  std::vector<float> qsc(size_t(rep) * D), p(size_t(rep) * T);
  for (int r = 0; r < rep; r++) {
    const float* qr = a.q + b * a.qs[0] + int64_t(g * rep + r) * a.qs[1];
    for (int d = 0; d < D; d++) qsc[size_t(r) * D + d] = a.scale * qr[d * a.qs[3]];
  }
  const float* kb = a.k + b * a.ks[0] + g * a.ks[1];
  if (a.keys_dot) {
    score_keys(qsc.data(), rep, kb, a.ks[2], D, T, p.data());
  } else {
    for (int t = 0; t < T; t++)
      for (int r = 0; r < rep; r++) {
        float s = 0.0f;
        for (int d = 0; d < D; d++) s = std::fma(qsc[size_t(r) * D + d], kb[t * a.ks[2] + d * a.ks[3]], s);
        p[int64_t(r) * T + t] = s;
      }
  }
  const float* vb = a.v + b * a.vs[0] + g * a.vs[1];
  for (int r = 0; r < rep; r++) {
    const int h = g * rep + r;
    float* pr = p.data() + int64_t(r) * T;
    if (a.mask_kind == BoolMask) {
      const bool* m = static_cast<const bool*>(a.mask) + b * a.ms[0] + h * a.ms[1];
      for (int t = 0; t < T; t++) pr[t] = m[t * a.ms[3]] ? pr[t] : std::numeric_limits<float>::lowest();
    } else if (a.mask_kind == AddedMask) {
      const float* m = static_cast<const float*>(a.mask) + b * a.ms[0] + h * a.ms[1];
      for (int t = 0; t < T; t++) pr[t] = pr[t] + m[t * a.ms[3]];
    }
    softmax_row(pr, 1, pr, T);
    float* o = a.out + (int64_t(b) * a.Hq + h) * D;
    if (a.values_dot)
      for (int d = 0; d < D; d++) o[d] = dot_in_order(pr, vb + d * a.vs[3], a.vs[2], T);
    else
      weigh_values(pr, vb, a.vs[2], a.vs[3], T, D, o);
  }
}

constexpr int64_t PARALLEL_ATTENTION = int64_t(1) << 20;  // both threads from this many query-key products

void attend(const Attend& a, int B) {
  const int tasks = B * a.Hkv;
#pragma omp parallel for schedule(static) if (int64_t(B) * a.Hq * a.T * a.D >= PARALLEL_ATTENTION)
  for (int i = 0; i < tasks; i++) attend_group(a, i / a.Hkv, i % a.Hkv);
}

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale, MaskKind mask_kind)
      : mx::Primitive(stream), scale_(scale), mask_kind_(mask_kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    Attend a{int(q.shape(1)), int(k.shape(1)), int(k.shape(2)), int(k.shape(3)), scale_, mask_kind_,
             q.data<float>(), k.data<float>(), v.data<float>(), nullptr, {}, {}, {}, {}, out.data<float>(), false, false};
    for (int i = 0; i < 4; i++) {
      a.qs[i] = q.strides(i);
      a.ks[i] = k.strides(i);
      a.vs[i] = v.strides(i);
    }
    const int64_t T = a.T, D = a.D;
    // k.T is [D, T] with strides (ks[3], ks[2]); v is [T, D] with (vs[2], vs[3])
    a.keys_dot = !(a.ks[3] == T && a.ks[2] == 1) && a.ks[3] == 1 && a.ks[2] == D;
    a.values_dot = !(a.vs[2] == D && a.vs[3] == 1) && a.vs[2] == 1 && a.vs[3] == T;
    if (mask_kind_ != NoMask) {
      const mx::array& m = inputs[3];
      a.mask = mask_kind_ == BoolMask ? static_cast<const void*>(m.data<bool>()) : m.data<float>();
      for (int i = 0; i < 4; i++) a.ms[i] = m.strides(i);
    }
    encoder.dispatch([a, B = int(q.shape(0))]() { attend(a, B); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("decode_attention runs on the CPU only");
  }

  const char* name() const override {
    return "ExoDecodeAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && mask_kind_ == o.mask_kind_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  MaskKind mask_kind_;
};

mx::array row_major(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, s);
}

mx::array table_rope(const mx::array& x, const mx::array& cs, const mx::array& sn, const mx::array& offset, int dims,
                     bool traditional) {
  if (x.dtype() != mx::float32 || cs.dtype() != mx::float32 || sn.dtype() != mx::float32)
    throw std::invalid_argument("table_rope: x, cos and sin must be float32");
  if (x.ndim() != 4) throw std::invalid_argument("table_rope: x must be [B, H, T, D]");
  if (dims <= 0 || dims % 2 || dims > x.shape(3)) throw std::invalid_argument("table_rope: dims must be even, <= D");
  if (cs.ndim() != 2 || cs.shape(1) != dims / 2 || sn.shape() != cs.shape())
    throw std::invalid_argument("table_rope: cos and sin must be [P, dims / 2]");
  if (offset.dtype() != mx::int32 || offset.ndim() > 1 || (offset.size() != 1 && int(offset.size()) != x.shape(0)))
    throw std::invalid_argument("table_rope: offset must be int32 [] or [B]");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  // x and the offsets are read through their strides (the attention's transposed heads need no copy)
  std::vector<mx::array> in = {x, row_major(cs, s), row_major(sn, s), offset};
  return mx::array(x.shape(), mx::float32, std::make_shared<TableRope>(s, dims, traditional), std::move(in));
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32) throw std::invalid_argument("rms_norm: x and w must be float32");
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1) || x.shape(-1) == 0)
    throw std::invalid_argument("rms_norm: x [..., N] and w [N] expected");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(s, eps), {x, row_major(w, s)});
}

mx::array softmax(const mx::array& x) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("softmax: x must be float32");
  if (x.ndim() < 1 || x.shape(-1) == 0) throw std::invalid_argument("softmax: x [..., N] with N > 0 expected");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<Softmax>(s), {x});
}

mx::array swiglu(const mx::array& g, const mx::array& x) {
  if (g.dtype() != mx::float32 || x.dtype() != mx::float32) throw std::invalid_argument("swiglu: gate and x must be float32");
  if (g.shape() != x.shape() || g.ndim() < 1 || g.shape(-1) == 0)
    throw std::invalid_argument("swiglu: gate and x of one shape [..., N] with N > 0 expected");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(g.shape(), mx::float32, std::make_shared<Swiglu>(s), {g, x});
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           std::optional<mx::array> mask) {
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32)
    throw std::invalid_argument("decode_attention: q, k and v must be float32");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention: q [B, Hq, 1, D] and k, v [B, Hkv, T, D] expected");
  if (k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) || k.shape(1) == 0 || q.shape(1) % k.shape(1) ||
      k.shape(2) == 0 || q.shape(3) == 0)
    throw std::invalid_argument("decode_attention: k and v must match q's rows and head size, Hq a multiple of Hkv, T > 0");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> in = {q, k, v};  // all read through their strides: a cache's keys sliced from its buffer
  MaskKind kind = NoMask;
  if (mask) {
    if (mask->shape() != mx::Shape{q.shape(0), q.shape(1), 1, k.shape(2)})
      throw std::invalid_argument("decode_attention: the mask must be [B, Hq, 1, T] (broadcast it)");
    if (mask->dtype() == mx::bool_) kind = BoolMask;
    else if (mask->dtype() == mx::float32) kind = AddedMask;
    else throw std::invalid_argument("decode_attention: the mask must be bool or float32");
    in.push_back(*mask);
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(s, scale, kind), std::move(in));
}

}  // namespace

NB_MODULE(_cpu_fallbacks, m) {
  m.doc() = "MLX's CPU fallbacks for rotary position embedding and RMS normalization as one primitive each";
  m.def("rms_norm", &rms_norm, "x"_a, "w"_a, "eps"_a,
        "x float32 [..., N] normalized and scaled by w float32 [N]: mx.fast.rms_norm's result, bit for bit.");
  m.def("table_rope", &table_rope, "x"_a, "cos"_a, "sin"_a, "offset"_a, "dims"_a, "traditional"_a,
        "x float32 [B, H, T, D] rotated by positions offset + t: mx.fast.rope's result, bit for bit.");
  m.def("softmax", &softmax, "x"_a,
        "x float32 [..., N] softmaxed over its last axis: mx.softmax(x, axis=-1, precise=True)'s result on the CPU,\n"
        "bit for bit.");
  m.def("swiglu", &swiglu, "gate"_a, "x"_a,
        "silu(gate) * x for float32 gate and x of one shape: mlx_lm's swiglu's result on the CPU, bit for bit.");
  m.def("decode_attention", &decode_attention, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a = nb::none(),
        "One query position's attention: q float32 [B, Hq, 1, D] over k, v float32 [B, Hkv, T, D] (grouped heads),\n"
        "mask None or bool / float32 [B, Hq, 1, T]: MLX's CPU fallback's result with exo_lab's small_gemm, bit for bit.");
}
