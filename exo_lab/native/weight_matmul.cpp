// x @ W.T with compact weights (16-bit, or MLX's 8/4-bit affine quantization) and fp32 activations, as MLX
// primitives (a Python extension module).
//
// MLX's CPU matmul takes both operands in one dtype: bf16 or fp16 weights either compute with 16-bit
// activations in MLX's own kernels (on an AVX2 CPU ~0.07 of what memory bandwidth allows) or are cast to
// fp32 first, which writes and reads 4 bytes per weight. Here the weights stay 2 bytes in memory and are
// widened in registers: `weight_matmul(x, w)` (x float32 [..., K], w bfloat16 or float16 [N, K]) returns
// float32 [..., N].
//
// - up to SMALL_M rows (decode): W is streamed once; each output element is one dot product in a fixed
//   order (8 lanes over k, summed, then the tail), the same for every number of rows and threads, so a
//   row's result does not depend on the batch it is in (batch-invariant, deterministic);
// - more rows (prefill): blocks of W are widened to fp32 and multiplied with the BLAS's cblas_sgemm.
//
// `quant_matmul(x, w, scales, biases, group_size, bits)` is `mx.quantized_matmul(x, w, scales, biases,
// transpose=True)` for fp32 x, scales and biases, 8 or 4 bits, each group's dot product scaled once
// (scale * sum(x q) + bias * sum(x)). Where the CPU has AVX-512 VNNI or AVX2 (groups of a multiple of 64) x is
// rounded to 16-bit integers per group and multiplied with the codes in integers (`vpdpwssd`; `vpmaddwd` and
// an add), for any number of rows, each output element the same operations whatever the batch
// (`int16_quant_matmul`). Elsewhere, up to SMALL_M rows
// (decode) the codes are widened to fp32 in registers (4-bit codes as even/odd nibbles against a rearranged
// x), each output element in a fixed order whatever the batch; more rows (prefill) dequantize blocks of W and
// call the BLAS. MLX's own CPU kernel is single-threaded and compute-bound (~0.06 of what memory bandwidth
// allows on an AVX2 CPU).
//
// Products over PARALLEL_WEIGHTS weights are split over threads by output columns: a decode product's rows in
// chunks that the calling thread and helper threads claim as they come (`RowPool`), prompts over OpenMP.
#include <immintrin.h>
#include <dlfcn.h>
#include <omp.h>
#include <type_traits>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

constexpr int SMALL_M = 16;
constexpr int64_t PARALLEL_WEIGHTS = int64_t(1) << 22;
constexpr int PREFILL_BLOCK = 256;  // weight rows widened at a time for the BLAS

// A decode product's weight rows, split over a machine's cores, as chunks that the calling thread and the
// helpers claim as they come. Under OpenMP each thread got a fixed half and the caller waited at the end for
// the helper's: on a VM, a helper that had gone to sleep between two products (a step has ~113, with norms,
// rotations and attention between them) woke tens of microseconds late, and one whose vCPU the host stopped
// held its half for as long. Here the caller starts at once and takes whatever is left; a helper that wakes
// late finds less, or nothing, and the caller waits only for chunks a helper is already computing. Each
// output element is computed by one thread in the same order whichever claims it, so results do not change.
class RowPool {
 public:
  // the pool of this process: one thread fewer helpers than OpenMP's threads (the caller is one of them)
  static RowPool& get() {
    static RowPool* pool = new RowPool(omp_get_max_threads() - 1);  // never destroyed: helpers are detached
    return *pool;
  }

  // EXO_LAB_ROW_POOL=0 (read once): OpenMP's fixed halves instead, the split this replaced (for benchmarks)
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("EXO_LAB_ROW_POOL");
      return v == nullptr || *v == 0 || std::string(v) != "0";
    }();
    return on;
  }

  int threads() const { return int(helpers_) + 1; }

  // fn(i) for every chunk i in [0, chunks), over the caller and the helpers; returns when every chunk is done.
  // A call while another runs (two streams at once) computes its chunks on the calling thread alone.
  template <class F>
  void run(int chunks, F&& fn) {
    std::unique_lock lock(busy_, std::try_to_lock);
    if (helpers_ == 0 || chunks <= 1 || !lock.owns_lock()) {
      for (int i = 0; i < chunks; i++) fn(i);
      return;
    }
    auto call = [](void* f, int i) { (*static_cast<std::remove_reference_t<F>*>(f))(i); };
    fn_ = &fn;
    call_ = call;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (gen_ = (gen_ + 1) & GEN_MASK);
    word_.store(gen << 40 | uint64_t(chunks) << 20, std::memory_order_release);
    signal_.store(uint32_t(gen), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) signal_.notify_all();
    const int mine = claim(gen);
    done_.fetch_add(mine, std::memory_order_acq_rel);
    wait_done(chunks);
  }

 private:
  static constexpr uint64_t GEN_MASK = (uint64_t(1) << 24) - 1;  // word: generation 24 bits, chunks 20, next 20
  static constexpr uint64_t FIELD = (uint64_t(1) << 20) - 1;
  static constexpr std::chrono::microseconds SPIN{50};  // a helper waits this long for the next product, then sleeps

  explicit RowPool(int helpers) : helpers_(helpers < 0 ? 0 : unsigned(helpers)) {
    for (unsigned h = 0; h < helpers_; h++) std::thread([this] { serve(); }).detach();
  }

  // until every chunk is done: spin while a helper finishes its last chunks, then yield the core (ranks sharing a
  // machine's cores: a helper preempted in a chunk may be waiting for this one)
  void wait_done(int chunks) {
    const auto until = std::chrono::steady_clock::now() + SPIN;
    while (done_.load(std::memory_order_acquire) < chunks) {
      for (int i = 0; i < 64 && done_.load(std::memory_order_acquire) < chunks; i++) _mm_pause();
      if (std::chrono::steady_clock::now() >= until) std::this_thread::yield();
    }
  }

  // claim and compute chunks of generation gen until none is left; how many this thread computed
  int claim(uint64_t gen) {
    int count = 0;
    uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> 40) != gen || (w & FIELD) >= ((w >> 20) & FIELD)) return count;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      call_(fn_, int(w & FIELD));  // valid: the caller waits for this chunk before it sets the next product
      count++;
      w = word_.load(std::memory_order_acquire);
    }
  }

  void serve() {
    uint32_t seen = signal_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t now = signal_.load(std::memory_order_acquire);
      for (auto until = std::chrono::steady_clock::now() + SPIN; now == seen;) {
        for (int i = 0; i < 64 && now == seen; i++) {
          _mm_pause();
          now = signal_.load(std::memory_order_acquire);
        }
        if (std::chrono::steady_clock::now() >= until) break;
      }
      if (now == seen) {
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        if (signal_.load(std::memory_order_seq_cst) == seen) signal_.wait(seen, std::memory_order_seq_cst);
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        continue;
      }
      seen = now;
      const int mine = claim(now);
      if (mine) done_.fetch_add(mine, std::memory_order_acq_rel);
    }
  }

  const unsigned helpers_;
  std::mutex busy_;
  uint64_t gen_ = 0;
  void* fn_ = nullptr;
  void (*call_)(void*, int) = nullptr;
  std::atomic<uint64_t> word_{0};
  std::atomic<int> done_{0};
  std::atomic<uint32_t> signal_{0};
  std::atomic<int> sleeping_{0};
};

// A decode product's chunks for the pool: EXO_LAB_POOL_CHUNKS (default 3) to a thread's even share, of at
// least CHUNK_BYTES. A thread's streams of weights restart from memory at each new chunk: with chunks of 128 KB
// alone (EXO_LAB_POOL_CHUNKS=0, the split before) a llama-1b q4 decode step on two cores took ~12% longer than
// with 2-4 to a share (6 a share: ~3%). Three still leave most of a share to the caller when a helper wakes late.
constexpr int64_t CHUNK_BYTES = int64_t(1) << 17;
inline int chunks_per_thread() {
  static const int n = [] {
    const char* v = std::getenv("EXO_LAB_POOL_CHUNKS");
    return v == nullptr || *v == 0 ? 3 : std::max(0, std::atoi(v));
  }();
  return n;
}

// items (weight rows or blocks of rows, item_bytes each) a chunk of a product of `items` holds: a multiple of
// `multiple`, at least min_items
inline int chunk_items(int items, int64_t item_bytes, int multiple, int min_items) {
  const int64_t shares = int64_t(RowPool::get().threads()) * chunks_per_thread();
  const int64_t even = shares > 0 ? (int64_t(items) + shares - 1) / shares : 0;
  const int64_t least = CHUNK_BYTES / (item_bytes > 0 ? item_bytes : 1);
  int64_t n = even > least ? even : least;
  n = n < min_items ? min_items : n;
  return int((n + multiple - 1) / multiple * multiple);
}

// run(b) for every block b in [0, blocks) of about block_bytes of weights each, over the machine's cores: the
// pool's chunks (chunk_items; or, with EXO_LAB_ROW_POOL=0, OpenMP's fixed shares)
template <class F>
void parallel_blocks(int blocks, int64_t block_bytes, F&& run) {
  if (!RowPool::enabled()) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) run(b);
    return;
  }
  const int per = chunk_items(blocks, block_bytes, 1, 1);
  RowPool::get().run((blocks + per - 1) / per, [&](int c) {
    for (int b = c * per, end = (c + 1) * per < blocks ? (c + 1) * per : blocks; b < end; b++) run(b);
  });
}

enum { RowMajor = 101 };
enum { NoTrans = 111, Trans = 112 };
using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                          float*, int);

sgemm_fn blas_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

template <bool FP16>
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (FP16) {
    return _mm256_cvtph_ps(h);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <bool FP16>
inline float widen(uint16_t v) {
  if constexpr (FP16) {
    return _cvtsh_ss(v);
  } else {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// bf16 weights are widened without shuffles: 16 weights (one 256-bit load) give the even ones (shifted
// left by 16 bits) and the odd ones (masked) as two fp32 vectors; x is rearranged to match once per call
// (`split_even_odd`), so each 16-wide chunk of a row of x is [its 8 even elements, its 8 odd ones].
// fp16 weights are widened 8 at a time (F16C) against x as it is. Either way every output element is
// the same sequence of operations whatever the number of rows and threads.
constexpr int CHUNK_BF16 = 16;
constexpr int CHUNK_FP16 = 8;
#ifndef NR_ONE
#define NR_ONE 8
#endif

std::vector<float> split_even_odd(const float* x, int M, int K) {
  std::vector<float> out(size_t(M) * K);
  const int K16 = K & ~15;
  for (int m = 0; m < M; m++) {
    const float* src = x + int64_t(m) * K;
    float* dst = out.data() + int64_t(m) * K;
    for (int k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; i++) {
        dst[k + i] = src[k + 2 * i];
        dst[k + 8 + i] = src[k + 2 * i + 1];
      }
    for (int k = K16; k < K; k++) dst[k] = src[k];
  }
  return out;
}

// Rows [m0, m0 + mr) of x (mr <= 2) times weight rows [n0, n0 + nr) (nr <= 4) into out.
template <bool FP16, int MR, int NR>
inline void block(const float* x, const uint16_t* w, float* out, int m0, int mr, int n0, int nr, int K, int ldo) {
  constexpr int C = FP16 ? CHUNK_FP16 : CHUNK_BF16;
  const __m256i odd_mask = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
  const int KC = K - K % C;
  for (int k = 0; k < KC; k += C) {
    if constexpr (FP16) {
      __m256 wv[NR];
      for (int j = 0; j < nr; j++) wv[j] = load8<true>(w + int64_t(n0 + j) * K + k);
      for (int i = 0; i < mr; i++) {
        __m256 xv = _mm256_loadu_ps(x + int64_t(m0 + i) * K + k);
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    } else {
      if (mr == 1) {  // one row: each weight vector used once, straight into its accumulator
        __m256 xe = _mm256_loadu_ps(x + int64_t(m0) * K + k);
        __m256 xo = _mm256_loadu_ps(x + int64_t(m0) * K + k + 8);
        for (int j = 0; j < nr; j++) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + int64_t(n0 + j) * K + k));
          __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
          acc[0][j] = _mm256_fmadd_ps(xo, wo, _mm256_fmadd_ps(xe, we, acc[0][j]));
        }
        continue;
      }
      // several rows: each weight vector widened once and used by every row (x read from L1)
      for (int j = 0; j < nr; j++) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + int64_t(n0 + j) * K + k));
        __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
        for (int i = 0; i < mr; i++) {
          const float* xr = x + int64_t(m0 + i) * K + k;
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), wo, _mm256_fmadd_ps(_mm256_loadu_ps(xr), we, acc[i][j]));
        }
      }
    }
  }
  for (int i = 0; i < mr; i++) {
    for (int j = 0; j < nr; j++) {
      float s = hsum(acc[i][j]);
      const uint16_t* wr = w + int64_t(n0 + j) * K;
      const float* xr = x + int64_t(m0 + i) * K;
      for (int k = KC; k < K; k++) s = __builtin_fmaf(xr[k], widen<FP16>(wr[k]), s);
      out[int64_t(m0 + i) * ldo + n0 + j] = s;
    }
  }
}

template <bool FP16>
void small_rows(const float* x_in, const uint16_t* w, float* out, int M, int N, int K) {
  std::vector<float> split;
  const float* x = x_in;
  if constexpr (!FP16) {
    split = split_even_odd(x_in, M, K);
    x = split.data();
  }
  // one row: 8 weight rows at a time (more accumulators in flight); more rows: blocks of 4 rows x 3 weight
  // rows (bf16: 12 accumulators, each widened weight vector used 4 times) or 2 x 4 (fp16)
  constexpr int MB = FP16 ? 2 : 4, NB = FP16 ? 4 : 3;
  const int nb = M == 1 ? NR_ONE : NB;
  const int blocks = (N + nb - 1) / nb;
  auto run = [&](int b) {
    int n0 = b * nb, nr = N - n0 < nb ? N - n0 : nb;
    if (M == 1) {
      block<FP16, 1, NR_ONE>(x, w, out, 0, 1, n0, nr, K, N);
      return;
    }
    for (int m0 = 0; m0 < M; m0 += MB) block<FP16, MB, NB>(x, w, out, m0, M - m0 < MB ? M - m0 : MB, n0, nr, K, N);
  };
  if (int64_t(N) * K >= PARALLEL_WEIGHTS) {
    parallel_blocks(blocks, int64_t(nb) * K * 2, run);
  } else {
    for (int b = 0; b < blocks; b++) run(b);
  }
}

template <bool FP16>
void many_rows(const float* x, const uint16_t* w, float* out, int M, int N, int K) {
  sgemm_fn sgemm = blas_sgemm();
  if (sgemm == nullptr) throw std::runtime_error("weight_matmul: no cblas_sgemm in this process");
  std::vector<float> wide(size_t(PREFILL_BLOCK) * K);
  for (int n0 = 0; n0 < N; n0 += PREFILL_BLOCK) {
    int nr = N - n0 < PREFILL_BLOCK ? N - n0 : PREFILL_BLOCK;
    const uint16_t* src = w + int64_t(n0) * K;
    int64_t count = int64_t(nr) * K, c8 = count & ~int64_t(7);
    for (int64_t i = 0; i < c8; i += 8) _mm256_storeu_ps(wide.data() + i, load8<FP16>(src + i));
    for (int64_t i = c8; i < count; i++) wide[i] = widen<FP16>(src[i]);
    sgemm(RowMajor, NoTrans, Trans, M, nr, K, 1.0f, x, K, wide.data(), K, 0.0f, out + n0, N);
  }
}


// x's elements in row-major order: x itself when row-contiguous (every activation a layer gives a product), else
// gathered through its strides into ``copy`` (in the task: a graph needs no Contiguous operation before each
// product, ~110 of a llama-1b decode step's operations)
struct Layout {
  bool packed;
  std::vector<int64_t> shape, strides;

  explicit Layout(const mx::array& a) : packed(a.flags().row_contiguous) {
    if (packed) return;
    for (int d = 0; d < a.ndim(); d++) {
      shape.push_back(a.shape(d));
      strides.push_back(a.strides(d));
    }
  }

  const float* rows(const float* x, int64_t size, std::vector<float>& copy) const {
    if (packed) return x;
    copy.resize(size_t(size));
    for (int64_t i = 0; i < size; i++) {
      int64_t at = 0, rest = i;
      for (int d = int(shape.size()) - 1; d >= 0; d--) {
        at += (rest % shape[d]) * strides[d];
        rest /= shape[d];
      }
      copy[size_t(i)] = x[at];
    }
    return copy.data();
  }
};

class WeightMatmul : public mx::Primitive {
 public:
  explicit WeightMatmul(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    const int K = int(w.shape(1)), N = int(w.shape(0)), M = int(x.size() / K);
    const bool fp16 = w.dtype() == mx::float16;
    encoder.dispatch([x0 = x.data<float>(), layout = Layout(x), wp = w.data<uint16_t>(), op = out.data<float>(), M, N,
                      K, fp16]() {
      std::vector<float> copy;
      const float* xp = layout.rows(x0, int64_t(M) * K, copy);
      if (M <= SMALL_M) {
        fp16 ? small_rows<true>(xp, wp, op, M, N, K) : small_rows<false>(xp, wp, op, M, N, K);
      } else {
        fp16 ? many_rows<true>(xp, wp, op, M, N, K) : many_rows<false>(xp, wp, op, M, N, K);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("weight_matmul runs on the CPU only");
  }

  const char* name() const override {
    return "ExoWeightMatmul";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
};

// ``a`` row-major for a kernel: an evaluated row-contiguous array (the weights) as it is, else through
// mx::contiguous (a no-op copy when it turns out contiguous, but one more operation for MLX to dispatch per
// product; x, not yet evaluated when the graph is built, is read through its Layout instead)
mx::array row_major(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, s);
}

mx::array weight_matmul(const mx::array& x, const mx::array& w) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("weight_matmul: x must be float32");
  if (w.dtype() != mx::bfloat16 && w.dtype() != mx::float16)
    throw std::invalid_argument("weight_matmul: w must be bfloat16 or float16");
  if (w.ndim() != 2 || x.ndim() < 1 || x.shape(-1) != w.shape(1))
    throw std::invalid_argument("weight_matmul: x [..., K] and w [N, K] expected");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<WeightMatmul>(s), {x, row_major(w, s)});
}

// ---- 8/4-bit affine-quantized weights (MLX's packing: code i of a uint32 at bits [i * BITS, (i + 1) * BITS)) ----

constexpr int QNR = 4;  // weight rows per block: 4 group sums and 4 totals in registers

// 8 codes, widened to fp32, starting at byte p (8 bytes for 8 bits, 4 for 4 bits)
template <int BITS>
inline __m256 codes8(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    uint32_t word;
    __builtin_memcpy(&word, p, 4);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
}

// one row of x (its group sums in xsum) times weight rows [n0, n0 + NR) into out[n0 ...]; every output element
// is the same sequence of operations whatever NR
template <int BITS, int NR>
inline void qblock(const float* x, const float* xsum, const uint8_t* w, const float* scales, const float* biases,
                   float* out, int n0, int K, int gs) {
  const int G = K / gs;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  __m256 acc[NR];
  float bsum[NR];
  const uint8_t* wr[NR];
  for (int j = 0; j < NR; j++) {
    acc[j] = _mm256_setzero_ps();
    bsum[j] = 0.0f;
    wr[j] = w + int64_t(n0 + j) * row_bytes;
  }
  for (int g = 0; g < G; g++) {
    __m256 gacc[NR];
    for (int j = 0; j < NR; j++) gacc[j] = _mm256_setzero_ps();
    for (int k = g * gs; k < (g + 1) * gs; k += 8) {
      __m256 xv = _mm256_loadu_ps(x + k);
      for (int j = 0; j < NR; j++) gacc[j] = _mm256_fmadd_ps(xv, codes8<BITS>(wr[j] + k * BITS / 8), gacc[j]);
    }
    for (int j = 0; j < NR; j++) {
      int64_t at = int64_t(n0 + j) * G + g;
      acc[j] = _mm256_fmadd_ps(gacc[j], _mm256_set1_ps(scales[at]), acc[j]);
      bsum[j] = __builtin_fmaf(biases[at], xsum[g], bsum[j]);
    }
  }
  for (int j = 0; j < NR; j++) out[n0 + j] = hsum(acc[j]) + bsum[j];
}

// 4 bits, groups of a multiple of 16: one byte holds an even code (low nibble) and the odd one after it (high
// nibble), so 8 bytes widen to 16 codes with one zero-extension, a mask and a shift (no per-lane shifts), against
// x rearranged once per call as for bf16 (`split_even_odd`): ~1.5x the codes per cycle of `codes8<4>`
template <int NR>
inline void qblock4_even_odd(const float* xeo, const float* xsum, const uint8_t* w, const float* scales,
                             const float* biases, float* out, int n0, int K, int gs) {
  const int G = K / gs;
  const int64_t row_bytes = int64_t(K) / 2;
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[NR];
  float bsum[NR];
  const uint8_t* wr[NR];
  for (int j = 0; j < NR; j++) {
    acc[j] = _mm256_setzero_ps();
    bsum[j] = 0.0f;
    wr[j] = w + int64_t(n0 + j) * row_bytes;
  }
  for (int g = 0; g < G; g++) {
    __m256 even[NR], odd[NR];
    for (int j = 0; j < NR; j++) even[j] = odd[j] = _mm256_setzero_ps();
    for (int k = g * gs; k < (g + 1) * gs; k += 16) {
      const __m256 xe = _mm256_loadu_ps(xeo + k), xo = _mm256_loadu_ps(xeo + k + 8);
      for (int j = 0; j < NR; j++) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[j] + k / 2)));
        even[j] = _mm256_fmadd_ps(xe, _mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), even[j]);
        odd[j] = _mm256_fmadd_ps(xo, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), odd[j]);
      }
    }
    for (int j = 0; j < NR; j++) {
      int64_t at = int64_t(n0 + j) * G + g;
      acc[j] = _mm256_fmadd_ps(_mm256_add_ps(even[j], odd[j]), _mm256_set1_ps(scales[at]), acc[j]);
      bsum[j] = __builtin_fmaf(biases[at], xsum[g], bsum[j]);
    }
  }
  for (int j = 0; j < NR; j++) out[n0 + j] = hsum(acc[j]) + bsum[j];
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// With AVX-512 VNNI: x is rounded to 16-bit integers per group of gs (each group scaled so its largest
// magnitude is 32767, round half to even), and `vpdpwssd` sums 2 code x x products a lane per instruction,
// exactly in integers; each group's integer sums are then scaled once (code scale x x's step) in fp32, and the
// biases times x's exact fp32 group sums are added. Decode reads one weight row at a time (its codes stream
// through in order, prefetched PREFETCH_AHEAD bytes ahead); prompts take 4 rows of x at a time through the same
// operations for each output element, so a row gives the same bits whatever its batch. 4-bit codes in groups of
// 64 go two groups at a time (`int16_block_paired`), 8-bit ones one (`int16_block`), neither widened by a shuffle.
constexpr bool INTEGER_ACTIVATIONS = true;

// ~15 bits of x: its rounding stays far below the codes' own, and the tiny float differences between two
// splits of a model (a prompt chunked otherwise, a tensor all-reduce's order) stay tiny instead of flipping a
// rounding of 1/127 of the group's largest |x|, as one 8-bit part did: a 2-rank pipeline's tokens on a 520-token
// prompt differed from one process's (tests/cluster/test_weight_formats.py).
constexpr float X_TOP = 32767.0f;
constexpr int X16_TILE = 16;  // weight rows a prompt's blocks of 4 rows of x go through before the next ones
// q4 weight rows decoded side by side (`int16_block_paired`'s NR). One row of x: 4 (one core, q4 matrices from
// memory: 1 row at a time 12-19 GB/s, falling as K grew; 2 rows 18 GB/s whatever K; 4 rows 20-21.5; a llama-1b
// step 48 -> 40 ms; 3 rows no better than 2). 2-4 rows of x: 2 (4 weight rows spill registers: 10% slower).
constexpr int DECODE_ROWS_TOGETHER = 4;
constexpr int BATCH_ROWS_TOGETHER = 2;
#ifndef PREFETCH_AHEAD_BYTES
#define PREFETCH_AHEAD_BYTES 2048
#endif
// How far ahead of the codes being multiplied their cache lines are prefetched (rows are contiguous, so past
// a row's end this is the next rows'). The hardware prefetcher alone left a decoding core waiting on memory:
// one thread multiplied codes streamed from memory at ~0.5 of both its in-cache rate and a plain read's;
// fetching the next row at a row's start did not help; 1-8 KB ahead took it to ~0.85 (a C++ harness, q4,
// 128 MB of codes).
constexpr int64_t PREFETCH_AHEAD = PREFETCH_AHEAD_BYTES;
// 16 32-bit lanes: no group of a quantized checkpoint overflows them
constexpr int MAX_INT16_GROUP = 1 << 20;

// How x's int16 elements are ordered for the codes they meet (`x16_rows`, `codes64`, `int16_block_paired`):
// EVEN_ODD: each 64-wide chunk's even elements, then its odd ones (a 16-bit lane of the weights holds codes
// 2L and 2L + 1: 8 bits as they are, 4 bits widened to one byte each). PAIRED (4 bits, groups of 64, an even
// number of groups): two groups' 128 codes are 64 bytes, 32 16-bit lanes of 4 codes each (lane L: codes
// 4L .. 4L + 3, the first group in lanes 0-15); its four nibbles give four registers, and x is ordered to match:
// register j holds elements 4L + j of the first group in lanes 0-15, of the second in lanes 16-31. (LANES is
// the AVX2 kernel's; not built here.)
enum class XOrder { EvenOdd, Paired, Lanes };
constexpr int LANE_GROUPS = 0;  // no lane layout (`lane_order`) here: 16 32-bit lanes
template <int MB, int NR, bool PREFETCH>
void int16_block_lanes(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale, const float* xsum,
                       const float* const (&scales)[NR], const float* const (&biases)[NR], float* const (&out)[NR],
                       int64_t ldo, int K);

// x rounded to int16 per group of gs in `order`; each group's step (its largest |x| / X_TOP) and exact fp32 sum
template <XOrder ORDER>
void x16_rows(const float* x, int M, int K, int gs, int16_t* xq, float* xscale, float* xsum) {
  const int G = K / gs;
  alignas(64) int16_t e[32], o[32], paired[4][32];
  for (int i = 0; i < 32; i++) e[i] = int16_t(2 * i), o[i] = int16_t(2 * i + 1);
  for (int j = 0; j < 4; j++)  // of the two groups' 128 elements (two pairs of registers lo/hi: 0-63, 64-127)
    for (int i = 0; i < 32; i++) paired[j][i] = int16_t((i < 16 ? 0 : 64) + 4 * (i % 16) + j);
  const __m512i even = _mm512_load_si512(e), odd = _mm512_load_si512(o);
  for (int m = 0; m < M; m++) {
    alignas(64) int16_t q[128];  // a group (or two, PAIRED) rounded, in x's own order
    for (int g = 0; g < G; g++) {
      const float* src = x + int64_t(m) * K + int64_t(g) * gs;
      __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int k = 0; k < gs; k += 16) {
        const __m512 v = _mm512_loadu_ps(src + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
      }
      const float top = _mm512_reduce_max_ps(amax);
      xsum[int64_t(m) * G + g] = _mm512_reduce_add_ps(sum);
      xscale[int64_t(m) * G + g] = top / X_TOP;
      const __m512 inv = _mm512_set1_ps(top > 0.0f ? X_TOP / top : 0.0f);
      int16_t* dst = xq + int64_t(m) * K + int64_t(g) * gs;
      for (int c = 0; c < gs; c += 64) {
        __m256i r[4];  // round half to even
        for (int i = 0; i < 4; i++) r[i] = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + c + 16 * i), inv)));
        const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1);
        const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(r[2]), r[3], 1);
        if constexpr (ORDER == XOrder::EvenOdd) {
          _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(lo, even, hi));
          _mm512_storeu_si512(dst + c + 32, _mm512_permutex2var_epi16(lo, odd, hi));
        } else {  // gs == 64: the pair's first group waits in q, the second completes it
          _mm512_store_si512(q + (g % 2) * 64, lo);
          _mm512_store_si512(q + (g % 2) * 64 + 32, hi);
        }
      }
      if constexpr (ORDER == XOrder::Paired) {
        if (g % 2 == 1) {
          const __m512i a = _mm512_load_si512(q), b = _mm512_load_si512(q + 32);  // first group: 0-63
          const __m512i c2 = _mm512_load_si512(q + 64), d = _mm512_load_si512(q + 96);  // second: 64-127
          int16_t* pair = dst - gs;
          for (int j = 0; j < 4; j++) {
            // lanes 0-15 from the first group (indices 4L + j < 64: a/b), 16-31 from the second (c2/d)
            const __m512i idx = _mm512_load_si512(paired[j]);
            const __m512i first = _mm512_permutex2var_epi16(a, idx, b);  // valid in lanes 0-15
            const __m512i second = _mm512_permutex2var_epi16(c2, _mm512_sub_epi16(idx, _mm512_set1_epi16(64)), d);
            _mm512_storeu_si512(pair + 32 * j, _mm512_mask_blend_epi16(0xFFFF0000u, first, second));
          }
        }
      }
    }
  }
}

// ``v`` kept in a register: GCC otherwise folds a load of the 4-bit codes into each of the instructions that
// take them apart, reading the same 64 bytes up to four times, and loads, not arithmetic, paced the q4 kernel
// (one core, codes in cache: 17.8 -> 26.2 GB/s with x's rows 64-byte aligned as well)
inline __m512i loaded_once(__m512i v) {
  __asm__("" : "+v"(v));
  return v;
}

// 64 codes of a weight row starting at code k as two registers of 32 16-bit codes, in x's EvenOdd order: a
// 16-bit lane holds 2 codes (8 bits: two bytes; 4 bits: one byte, widened)
template <int BITS>
inline void codes64(const uint8_t* w, int k, __m512i& first, __m512i& second) {
  if constexpr (BITS == 8) {
    const __m512i v = _mm512_loadu_si512(w + k);
    first = _mm512_and_si512(v, _mm512_set1_epi16(0xFF));
    second = _mm512_srli_epi16(v, 8);
  } else {
    const __m512i b = loaded_once(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 2))));
    first = _mm512_and_si512(b, _mm512_set1_epi16(15));
    second = _mm512_srli_epi16(b, 4);
  }
}

// A weight row's last step for MB rows of x: the biases times x's group sums (16 groups at a time) added to the
// two chains of scaled group sums, into out[i * ldo]
template <int MB>
inline void finish(const __m512 (&acc)[MB][2], const float* biases, const float* xsum, float* out, int64_t ldo, int G) {
  __m512 bsum[MB];
  for (int i = 0; i < MB; i++) bsum[i] = _mm512_setzero_ps();
  for (int g = 0; g < G; g += 16) {
    const __mmask16 live = __mmask16(G - g >= 16 ? 0xFFFF : (1u << (G - g)) - 1);
    const __m512 b = _mm512_maskz_loadu_ps(live, biases + g);
    for (int i = 0; i < MB; i++)
      bsum[i] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(live, xsum + int64_t(i) * G + g), bsum[i]);
  }
  for (int i = 0; i < MB; i++)
    out[i * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) + _mm512_reduce_add_ps(bsum[i]);
}

// MB rows of int16 x (row i at xq + i * K, its group steps and exact group sums at xscale / xsum + i * G) times
// one weight row, into out[i * ldo]. Each output element is the same sequence of operations whatever MB: exact
// integer dot products, each group's scaled once in fp32 into one of two chains (even and odd groups, so one
// fma's latency does not pace a row), then the biases times x's group sums, 16 groups at a time.
template <int BITS, int MB, int GS, int NR = 1>
inline void int16_block(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale, const float* xsum,
                        const float* const (&scales)[NR], const float* const (&biases)[NR], float* const (&out)[NR],
                        int64_t ldo, int K, int group_size, bool prefetch) {
  const int gs = GS ? GS : group_size;
  const int G = K / gs;
  const int groups_ahead = int(PREFETCH_AHEAD / (int64_t(gs) * BITS / 8));
  __m512 acc[NR][MB][2];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < MB; i++) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  auto group = [&](int g, auto chain) {
    constexpr int J = decltype(chain)::value;
    __m512i dot[NR][MB];
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++) dot[r][i] = _mm512_setzero_si512();
    if (prefetch && g % 16 == 0) {  // the scales and biases as far ahead as the codes
      for (int r = 0; r < NR; r++) {
        _mm_prefetch(reinterpret_cast<const char*>(scales[r] + g + groups_ahead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(biases[r] + g + groups_ahead), _MM_HINT_T0);
      }
    }
    for (int k = g * gs; k < (g + 1) * gs; k += 64) {
      __m512i c[NR][2];
      for (int r = 0; r < NR; r++) {
        if (prefetch && (BITS == 8 || k % 128 == 0))  // one cache line of codes, PREFETCH_AHEAD bytes on (side
          _mm_prefetch(reinterpret_cast<const char*>(rows[r] + int64_t(k) * BITS / 8) + PREFETCH_AHEAD,  // by side:
                       NR > 1 ? _MM_HINT_T1 : _MM_HINT_T0);  // into L2 only, as in int16_block_paired)
        codes64<BITS>(rows[r], k, c[r][0], c[r][1]);
      }
      for (int i = 0; i < MB; i++) {
        const __m512i x0 = _mm512_loadu_si512(xq + int64_t(i) * K + k), x1 = _mm512_loadu_si512(xq + int64_t(i) * K + k + 32);
        for (int r = 0; r < NR; r++) {
          dot[r][i] = _mm512_dpwssd_epi32(dot[r][i], c[r][0], x0);
          dot[r][i] = _mm512_dpwssd_epi32(dot[r][i], c[r][1], x1);
        }
      }
    }
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++)
        acc[r][i][J] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][i]), _mm512_set1_ps(scales[r][g] * xscale[int64_t(i) * G + g]), acc[r][i][J]);
  };
  int g = 0;
  for (; g + 1 < G; g += 2) {
    group(g, std::integral_constant<int, 0>());
    group(g + 1, std::integral_constant<int, 1>());
  }
  if (g < G) group(g, std::integral_constant<int, 0>());
  for (int r = 0; r < NR; r++) finish<MB>(acc[r], biases[r], xsum, out[r], ldo, G);
}

// int16_block for 4-bit codes in groups of 64, an even number of them, x in PAIRED order, NR weight rows at once
// (rows[r], its scales / biases at scales[r] / biases[r], out at out[r] + i * ldo): each 64 bytes (two groups)
// of a row is one load, four nibble registers (a mask and a shift each, no widening shuffle) and four
// `vpdpwssd`; the pair's integer sums (the first group's in lanes 0-7, the second's in 8-15) are scaled in one
// fma by their two groups' scales (x's step included). The NR rows share each load of x: with x from cache at
// 4 loads for every 64 bytes of codes, one row at a time slowed as K grew (x no longer in L1: 8192 x 2048 at
// 19.6 GB/s on one core, 2048 x 8192 at 12.3). The same sequence of operations for every output element
// whatever MB and NR.
template <int MB, int NR, bool PREFETCH>
inline void int16_block_paired(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale,
                               const float* xsum, const float* const (&scales)[NR], const float* const (&biases)[NR],
                               float* const (&out)[NR], int64_t ldo, int K) {
  const int G = K / 64;
  constexpr int GROUPS_AHEAD = int(PREFETCH_AHEAD / 32);
  const __m512i low4 = _mm512_set1_epi16(15);
  __m512 acc[NR][MB][2], step[NR][MB];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < MB; i++) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  auto pair = [&](int g, int p, auto chain) {  // groups g and g + 1 (pair p of their 16) into chain J: the pairs
    constexpr int J = decltype(chain)::value;  // alternate, so one fma's latency does not pace a row
    __m512i c[NR][4];
    for (int r = 0; r < NR; r++) {
      const uint8_t* at = rows[r] + int64_t(g) * 32;
      // rows side by side: into L2 only (with L1 as well, x was evicted from it: 2 rows 15 -> 19 GB/s at K 8192)
      if constexpr (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(at) + PREFETCH_AHEAD, NR > 1 ? _MM_HINT_T1 : _MM_HINT_T0);
      const __m512i v = loaded_once(_mm512_loadu_si512(at));
      c[r][0] = _mm512_and_si512(v, low4), c[r][1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      c[r][2] = _mm512_and_si512(_mm512_srli_epi16(v, 8), low4), c[r][3] = _mm512_srli_epi16(v, 12);
    }
    const __m512i pick = _mm512_inserti64x4(_mm512_set1_epi32(2 * p), _mm256_set1_epi32(2 * p + 1), 1);
    for (int i = 0; i < MB; i++) {
      const int16_t* xp = xq + int64_t(i) * K + int64_t(g) * 64;
      __m512i dot[NR];
      for (int j = 0; j < 4; j++) {
        const __m512i xj = _mm512_loadu_si512(xp + 32 * j);
        for (int r = 0; r < NR; r++)
          dot[r] = j == 0 ? _mm512_dpwssd_epi32(_mm512_setzero_si512(), c[r][0], xj) : _mm512_dpwssd_epi32(dot[r], c[r][j], xj);
      }
      for (int r = 0; r < NR; r++)
        acc[r][i][J] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_permutexvar_ps(pick, step[r][i]), acc[r][i][J]);
    }
  };
  for (int g0 = 0; g0 < G; g0 += 16) {  // 16 groups: their scales times x's steps once, then 8 pairs
    const __mmask16 live = __mmask16(G - g0 >= 16 ? 0xFFFF : (1u << (G - g0)) - 1);
    for (int r = 0; r < NR; r++) {
      const __m512 sc = _mm512_maskz_loadu_ps(live, scales[r] + g0);
      for (int i = 0; i < MB; i++) step[r][i] = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(live, xscale + int64_t(i) * G + g0));
      if constexpr (PREFETCH) {
        _mm_prefetch(reinterpret_cast<const char*>(scales[r] + g0 + GROUPS_AHEAD), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(biases[r] + g0 + GROUPS_AHEAD), _MM_HINT_T0);
      }
    }
    if (G - g0 >= 16) {
#pragma GCC unroll 4
      for (int p = 0; p < 8; p += 2) {
        pair(g0 + 2 * p, p, std::integral_constant<int, 0>());
        pair(g0 + 2 * p + 2, p + 1, std::integral_constant<int, 1>());
      }
    } else {
      for (int p = 0; 2 * p < G - g0; p++) {
        if (p % 2 == 0) {
          pair(g0 + 2 * p, p, std::integral_constant<int, 0>());
        } else {
          pair(g0 + 2 * p, p, std::integral_constant<int, 1>());
        }
      }
    }
  }
  for (int r = 0; r < NR; r++) finish<MB>(acc[r], biases[r], xsum, out[r], ldo, G);
}

#define EXO_INT16_ACTIVATIONS 1
#elif defined(__AVX2__) && defined(__FMA__)
// With AVX2: the same 16-bit x as with VNNI (the same rounding, so the same integers), its exact integer dot
// products with the codes by `vpmaddwd` (2 products a 32-bit lane) and a 32-bit add, 8 lanes; each group's sum
// then scaled once in fp32 into one chain per output element, and the biases times x's group sums. Where codes
// are widened to fp32 instead (`qblock4_even_odd`) a thread multiplies ~3 weights a cycle whatever their bytes,
// so q8 and q4 stay compute-bound far below what memory allows; the integers take ~half the instructions.
constexpr bool INTEGER_ACTIVATIONS = true;
constexpr float X_TOP = 32767.0f;
constexpr int X16_TILE = 16;  // weight rows a prompt's blocks of 4 rows of x go through before the next ones
// q4 weight rows decoded side by side (several streams of codes from memory at once; the rows share each load
// of x): one row of x (llama-1b's 112 layer products, one core: 1 row 15.4 GB/s, 2 rows 17.7, 3 16.5, 4 15.5:
// 16 registers spill), then 2-4 rows and prompts (one: 4 rows of x against 2 weight rows spill too; a 64-row
// prompt through the 112 products on two cores 1.01-1.23 s with 2, 0.91 with 1)
#ifndef DECODE_ROWS_TOGETHER_AVX2
#define DECODE_ROWS_TOGETHER_AVX2 2
#endif
constexpr int DECODE_ROWS_TOGETHER = DECODE_ROWS_TOGETHER_AVX2;
#ifndef BATCH_ROWS_TOGETHER_AVX2
#define BATCH_ROWS_TOGETHER_AVX2 1
#endif
constexpr int BATCH_ROWS_TOGETHER = BATCH_ROWS_TOGETHER_AVX2;
#ifndef PREFETCH_AHEAD_BYTES
#define PREFETCH_AHEAD_BYTES 2048
#endif
constexpr int64_t PREFETCH_AHEAD = PREFETCH_AHEAD_BYTES;
// the longest group whose 32-bit lanes cannot overflow: a lane sums gs / 4 products of up to 255 x 32768
constexpr int MAX_INT16_GROUP = 1024;

// How x's int16 elements are ordered for the codes they meet: EVEN_ODD: each 32-wide chunk's 16 even
// elements, then its 16 odd ones (a 16-bit lane of codes holds codes 2L and 2L + 1: 8 bits as they are, 4 bits
// widened to one byte each). PAIRED (4 bits, groups of 64): a group's 64 codes are 32 bytes, 16 16-bit lanes of
// 4 codes each (lane L: codes 4L .. 4L + 3), four registers by a mask and a shift; x's element 4L + j of the
// group at 16 j + L. (With VNNI two groups go at a time, hence the name; here one group is one register.)
// LANES (4 bits, groups of 64, weights in lane order: `int16_block_lanes`): each block of 8 groups is 32 registers
// of x, register 4w + n holding, in its 16-bit lanes 2j and 2j + 1, elements 8w + n and 8w + 4 + n of group j.
enum class XOrder { EvenOdd, Paired, Lanes };
// groups a block of the lane layout holds side by side (one a 32-bit lane)
constexpr int LANE_GROUPS = 8;

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// x rounded to int16 per group of gs in `order`; each group's step (its largest |x| / X_TOP) and exact fp32 sum
template <XOrder ORDER>
void x16_rows(const float* x, int M, int K, int gs, int16_t* xq, float* xscale, float* xsum) {
  const int G = K / gs;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  alignas(32) int32_t r[64];  // 64 elements rounded (round half to even), in x's own order
  for (int m = 0; m < M; m++) {
    for (int g = 0; g < G; g++) {
      const float* src = x + int64_t(m) * K + int64_t(g) * gs;
      __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int k = 0; k < gs; k += 8) {
        const __m256 v = _mm256_loadu_ps(src + k);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v, magnitude));
        sum = _mm256_add_ps(sum, v);
      }
      const float top = hmax(amax);
      xsum[int64_t(m) * G + g] = hsum(sum);
      xscale[int64_t(m) * G + g] = top / X_TOP;
      const __m256 inv = _mm256_set1_ps(top > 0.0f ? X_TOP / top : 0.0f);
      int16_t* dst = xq + int64_t(m) * K + int64_t(g) * gs;
      for (int c = 0; c < gs; c += 64) {
        for (int i = 0; i < 8; i++)
          _mm256_store_si256(reinterpret_cast<__m256i*>(r + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + c + 8 * i), inv)));
        auto at = [&](int i) { return int16_t(r[i] < -32768 ? -32768 : r[i] > 32767 ? 32767 : r[i]); };  // saturated
        if constexpr (ORDER == XOrder::EvenOdd) {
          for (int h = 0; h < 64; h += 32)
            for (int i = 0; i < 16; i++) dst[c + h + i] = at(h + 2 * i), dst[c + h + 16 + i] = at(h + 2 * i + 1);
        } else if constexpr (ORDER == XOrder::Lanes) {  // gs 64: the group is lane j of its block of 8
          int16_t* block = xq + int64_t(m) * K + int64_t(g / LANE_GROUPS) * LANE_GROUPS * 64;
          const int j = g % LANE_GROUPS;
          for (int e = 0; e < 64; e++) block[16 * (4 * (e >> 3) + (e & 3)) + 2 * j + ((e >> 2) & 1)] = at(e);
        } else {
          for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) dst[c + 16 * j + l] = at(4 * l + j);
        }
      }
    }
  }
}

// ``v`` kept in a register: GCC otherwise folds a load of the codes into each of the instructions that take
// them apart, reading the same bytes several times
inline __m256i loaded_once(__m256i v) {
  __asm__("" : "+x"(v));
  return v;
}

// 32 codes of a weight row starting at code k as two registers of 16 16-bit codes, in x's EvenOdd order
template <int BITS>
inline void codes32(const uint8_t* w, int k, __m256i& first, __m256i& second) {
  if constexpr (BITS == 8) {
    const __m256i v = loaded_once(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    first = _mm256_and_si256(v, _mm256_set1_epi16(0xFF));
    second = _mm256_srli_epi16(v, 8);
  } else {
    const __m256i b = loaded_once(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2))));
    first = _mm256_and_si256(b, _mm256_set1_epi16(15));
    second = _mm256_srli_epi16(b, 4);
  }
}

// A weight row's biases times x's group sums, 8 groups at a time from group g (g + 8 <= G), added to bsum: the
// kernels call it inside their loop over the groups, where its loads overlap the codes' work (at the row's end,
// waiting on them took ~8% of a llama-1b q4 decode step on two cores)
template <int MB>
inline void bias_block(__m256 (&bsum)[MB], const float* biases, const float* xsum, int G, int g) {
  const __m256 b = _mm256_loadu_ps(biases + g);
  for (int i = 0; i < MB; i++) bsum[i] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xsum + int64_t(i) * G + g), bsum[i]);
}

// A weight row's last step for MB rows of x: its bias sums (whole blocks of 8 groups already in bsum, by
// bias_block in order) completed with the last G % 8 groups and added to the chain of scaled group sums, into
// out[i * ldo]
template <int MB>
inline void finish(const __m256 (&acc)[MB], __m256 (&bsum)[MB], const float* biases, const float* xsum, float* out,
                   int64_t ldo, int G) {
  const int g = G / 8 * 8;  // whole blocks by plain loads: AMD's masked loads (vmaskmovps) cost a llama-1b q4
  if (g < G) {              // decode step on two cores ~5%; the last G % 8 groups masked, the same sums in order
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(G - g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 b = _mm256_maskload_ps(biases + g, live);
    for (int i = 0; i < MB; i++)
      bsum[i] = _mm256_fmadd_ps(b, _mm256_maskload_ps(xsum + int64_t(i) * G + g, live), bsum[i]);
  }
  for (int i = 0; i < MB; i++) out[i * ldo] = hsum(acc[i]) + hsum(bsum[i]);
}

// MB rows of int16 x (row i at xq + i * K, its group steps and exact group sums at xscale / xsum + i * G) times
// NR weight rows (rows[r], its scales / biases at scales[r] / biases[r], out at out[r] + i * ldo), x in EvenOdd
// order. Each output element is the same sequence of operations whatever MB and NR.
template <int BITS, int MB, int GS, int NR = 1>
inline void int16_block(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale, const float* xsum,
                        const float* const (&scales)[NR], const float* const (&biases)[NR], float* const (&out)[NR],
                        int64_t ldo, int K, int group_size, bool prefetch) {
  const int gs = GS ? GS : group_size;
  const int G = K / gs;
  const int groups_ahead = int(PREFETCH_AHEAD / (int64_t(gs) * BITS / 8));
  __m256 acc[NR][MB], bsum[NR][MB];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < MB; i++) acc[r][i] = bsum[r][i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    __m256i dot[NR][MB];
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++) dot[r][i] = _mm256_setzero_si256();
    if (prefetch && g % 16 == 0) {  // the scales and biases as far ahead as the codes
      for (int r = 0; r < NR; r++) {
        _mm_prefetch(reinterpret_cast<const char*>(scales[r] + g + groups_ahead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(biases[r] + g + groups_ahead), _MM_HINT_T0);
      }
    }
    if (g % 8 == 0 && g + 8 <= G)
      for (int r = 0; r < NR; r++) bias_block<MB>(bsum[r], biases[r], xsum, G, g);
    for (int k = g * gs; k < (g + 1) * gs; k += 32) {
      __m256i c[NR][2];
      for (int r = 0; r < NR; r++) {
        if (prefetch && k % (512 / BITS) == 0)  // one cache line of codes, PREFETCH_AHEAD bytes on
          _mm_prefetch(reinterpret_cast<const char*>(rows[r] + int64_t(k) * BITS / 8) + PREFETCH_AHEAD, NR > 1 ? _MM_HINT_T1 : _MM_HINT_T0);
        codes32<BITS>(rows[r], k, c[r][0], c[r][1]);
      }
      for (int i = 0; i < MB; i++) {
        const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq + int64_t(i) * K + k));
        const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq + int64_t(i) * K + k + 16));
        for (int r = 0; r < NR; r++)
          dot[r][i] = _mm256_add_epi32(dot[r][i], _mm256_add_epi32(_mm256_madd_epi16(c[r][0], x0), _mm256_madd_epi16(c[r][1], x1)));
      }
    }
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++)
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][i]), _mm256_set1_ps(scales[r][g] * xscale[int64_t(i) * G + g]), acc[r][i]);
  }
  for (int r = 0; r < NR; r++) finish<MB>(acc[r], bsum[r], biases[r], xsum, out[r], ldo, G);
}

// int16_block for 4-bit codes in groups of 64, x in PAIRED order: each group of a row is one 32-byte load and
// four nibble registers (a mask and a shift each, no widening shuffle) against four registers of x; the NR
// rows share each load of x. The same sequence of operations for every output element whatever MB and NR.
template <int MB, int NR, bool PREFETCH>
inline void int16_block_paired(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale,
                               const float* xsum, const float* const (&scales)[NR], const float* const (&biases)[NR],
                               float* const (&out)[NR], int64_t ldo, int K) {
  const int G = K / 64;
  constexpr int GROUPS_AHEAD = int(PREFETCH_AHEAD / 32);
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 acc[NR][MB], bsum[NR][MB];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < MB; i++) acc[r][i] = bsum[r][i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    if (g % 8 == 0 && g + 8 <= G)
      for (int r = 0; r < NR; r++) bias_block<MB>(bsum[r], biases[r], xsum, G, g);
    __m256i v[NR];
    for (int r = 0; r < NR; r++) {
      const uint8_t* at = rows[r] + int64_t(g) * 32;
      if constexpr (PREFETCH) {
        if (g % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + PREFETCH_AHEAD, NR > 1 ? _MM_HINT_T1 : _MM_HINT_T0);
        if (g % 16 == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales[r] + g + GROUPS_AHEAD), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(biases[r] + g + GROUPS_AHEAD), _MM_HINT_T0);
        }
      }
      v[r] = loaded_once(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
    }
    __m256i dot[NR][MB];
    for (int j = 0; j < 4; j++) {
      __m256i c[NR];
      for (int r = 0; r < NR; r++)
        c[r] = j == 3 ? _mm256_srli_epi16(v[r], 12) : _mm256_and_si256(j ? _mm256_srli_epi16(v[r], 4 * j) : v[r], low4);
      for (int i = 0; i < MB; i++) {
        const __m256i xj = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq + int64_t(i) * K + int64_t(g) * 64 + 16 * j));
        for (int r = 0; r < NR; r++) {
          const __m256i p = _mm256_madd_epi16(c[r], xj);
          dot[r][i] = j == 0 ? p : _mm256_add_epi32(dot[r][i], p);
        }
      }
    }
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++)
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][i]), _mm256_set1_ps(scales[r][g] * xscale[int64_t(i) * G + g]), acc[r][i]);
  }
  for (int r = 0; r < NR; r++) finish<MB>(acc[r], bsum[r], biases[r], xsum, out[r], ldo, G);
}

// int16_block_paired's products with the weights in lane order (`lane_order`: 4 bits, groups of 64, a multiple of
// 8 of them): a block of 8 groups is 8 loads of 32 bytes, load w holding word w (codes 8w .. 8w + 7) of each of
// the 8 groups, one a 32-bit lane. Its nibbles against x in LANES order sum each group's exact integer dot
// product in its own lane, so a block's 8 groups take one conversion and one fma (scales times x's steps, 8 at
// a time), where one group at a time took a conversion, a broadcast and an fma each: with 3 shifts, 3 masks, 4
// `vpmaddwd` and 4 additions per 64 codes, the loop is paced by the multiplies (the decode loop over 800 MB of
// codes on two threads: 39-41 GB/s against 32-36). Integer sums are exact, so how many chains add them
// (ACC) does not change a bit; each output element is the same operations whatever MB and NR.
template <int MB, int NR, bool PREFETCH>
inline void int16_block_lanes(const uint8_t* const (&rows)[NR], const int16_t* xq, const float* xscale,
                              const float* xsum, const float* const (&scales)[NR], const float* const (&biases)[NR],
                              float* const (&out)[NR], int64_t ldo, int K) {
  const int G = K / 64;
  constexpr int GROUPS_AHEAD = int(PREFETCH_AHEAD / 32);
  constexpr int ACC = MB == 1 ? 2 : 1;  // chains of integer sums (registers allowing)
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 acc[NR][MB], bsum[NR][MB];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < MB; i++) acc[r][i] = bsum[r][i] = _mm256_setzero_ps();
  for (int g0 = 0; g0 < G; g0 += LANE_GROUPS) {
    for (int r = 0; r < NR; r++) {
      bias_block<MB>(bsum[r], biases[r], xsum, G, g0);
      if constexpr (PREFETCH) {
        if (g0 % 16 == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales[r] + g0 + GROUPS_AHEAD), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(biases[r] + g0 + GROUPS_AHEAD), _MM_HINT_T0);
        }
      }
    }
    __m256i dot[NR][MB][ACC];
    for (int r = 0; r < NR; r++)
      for (int i = 0; i < MB; i++)
        for (int a = 0; a < ACC; a++) dot[r][i][a] = _mm256_setzero_si256();
    const int16_t* xb = xq + int64_t(g0) * 64;
#pragma GCC unroll 1  // unrolled, GCC hoists all 8 loads' nibbles and spills them (0.7x)
    for (int w = 0; w < 8; w++) {
      __m256i v[NR];
      for (int r = 0; r < NR; r++) {
        const uint8_t* at = rows[r] + int64_t(g0) * 32 + 32 * w;
        if constexpr (PREFETCH)
          if (w % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + PREFETCH_AHEAD, NR > 1 ? _MM_HINT_T1 : _MM_HINT_T0);
        v[r] = loaded_once(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
      }
#pragma GCC unroll 4  // whole, so that n % ACC is a constant and the sums stay in registers
      for (int n = 0; n < 4; n++) {
        __m256i c[NR];
        for (int r = 0; r < NR; r++)
          c[r] = n == 3 ? _mm256_srli_epi16(v[r], 12) : _mm256_and_si256(n ? _mm256_srli_epi16(v[r], 4 * n) : v[r], low4);
        for (int i = 0; i < MB; i++) {
          const __m256i xn = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + int64_t(i) * K + 16 * (4 * w + n)));
          for (int r = 0; r < NR; r++) dot[r][i][n % ACC] = _mm256_add_epi32(dot[r][i][n % ACC], _mm256_madd_epi16(c[r], xn));
        }
      }
    }
    for (int r = 0; r < NR; r++) {
      const __m256 sc = _mm256_loadu_ps(scales[r] + g0);
      for (int i = 0; i < MB; i++) {
        __m256i d = dot[r][i][0];
        for (int a = 1; a < ACC; a++) d = _mm256_add_epi32(d, dot[r][i][a]);
        const __m256 step = _mm256_mul_ps(sc, _mm256_loadu_ps(xscale + int64_t(i) * G + g0));
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), step, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; r++) finish<MB>(acc[r], bsum[r], biases[r], xsum, out[r], ldo, G);
}

#define EXO_INT16_ACTIVATIONS 1
#else
constexpr bool INTEGER_ACTIVATIONS = false;
constexpr int LANE_GROUPS = 0;
#endif

#ifdef EXO_INT16_ACTIVATIONS
// x's int16 rows, 64-byte aligned so that no load of 32 of them spans two cache lines
struct AlignedX16 {
  explicit AlignedX16(size_t n) : data_(static_cast<int16_t*>(std::aligned_alloc(64, (n * 2 + 63) / 64 * 64))) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedX16() { std::free(data_); }
  AlignedX16(const AlignedX16&) = delete;
  AlignedX16& operator=(const AlignedX16&) = delete;
  int16_t* data() const { return data_; }

 private:
  int16_t* data_;
};

// x @ W.T with x rounded to 16 bits per group, for any number of rows: weight rows with their codes read once
// from memory, prefetched ahead, every row of x 4 at a time. q4 decode (up to 4 rows of x) takes a thread's
// weight rows as DECODE_ROWS_TOGETHER (one row of x) or BATCH_ROWS_TOGETHER (2-4) interleaved parts, a row of
// each through the kernel side by side: that many streams of codes come from memory at once (one stream left
// bandwidth unused), and the rows share each load of x. Prompts go over tiles of X16_TILE rows, which stay in
// cache while every 4 rows of x pass over them. ORDER: PAIRED and LANES are 4-bit groups of 64 (LANES: the
// weights in lane order), EVEN_ODD any other.
template <int BITS, int GS, XOrder ORDER = XOrder::EvenOdd>
void int16_quant_matmul(const float* x, const uint8_t* w, const float* scales, const float* biases, float* out, int M,
                       int N, int K, int gs) {
  constexpr bool PAIRED = ORDER == XOrder::Paired, LANES = ORDER == XOrder::Lanes;
  // weight rows side by side in a decode of 2-4 rows of x: lane order's 4 rows of x against 2 weight rows fit the
  // 16 registers (a block's integer sums need no scaled sums beside them). llama-1b's q4 products on two cores,
  // 1 -> 2 rows side by side: 2 rows of x 39.3 -> 28.0 ms, 3 rows 49.5 -> 42.6, 4 rows 57.3 -> 58.1; prompts'
  // tiles keep one (two: a 256-token prompt 0.95x)
  constexpr int BATCH_NR = LANES ? 2 : BATCH_ROWS_TOGETHER;
  const int G = K / gs;
  AlignedX16 xq(size_t(M) * K);
  std::vector<float> xscale(size_t(M) * G), xsum(size_t(M) * G);
  x16_rows<ORDER>(x, M, K, gs, xq.data(), xscale.data(), xsum.data());
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  // weight rows n[0 .. NR) times rows m0 .. m0 + 3 of x (fewer at the end)
  auto rows_at = [&](auto count, const int (&n)[decltype(count)::value], int m0) {
    constexpr int NR = decltype(count)::value;
    const int16_t* xm = xq.data() + int64_t(m0) * K;
    const float *sm = xscale.data() + int64_t(m0) * G, *um = xsum.data() + int64_t(m0) * G;
    const uint8_t* rs[NR];
    const float *ss[NR], *bs[NR];
    float* os[NR];
    for (int r = 0; r < NR; r++) {
      rs[r] = w + int64_t(n[r]) * row_bytes, os[r] = out + int64_t(m0) * N + n[r];
      ss[r] = scales + int64_t(n[r]) * G, bs[r] = biases + int64_t(n[r]) * G;
    }
    const bool first = m0 == 0;  // the first pass over a row reads it from memory: prefetch ahead
    const int mb = M - m0 < 4 ? M - m0 : 4;
    constexpr bool ONE_ROW = NR == DECODE_ROWS_TOGETHER && NR != BATCH_NR;  // only ever one row of x
    // kernel(MB, PREFETCH) for this pass's rows of x, as compile-time constants
    auto by_rows = [&](auto kernel) {
      using Yes = std::true_type;
      using No = std::false_type;
      switch (mb) {
        case 4: first ? kernel(std::integral_constant<int, 4>(), Yes()) : kernel(std::integral_constant<int, 4>(), No()); break;
        case 3: first ? kernel(std::integral_constant<int, 3>(), Yes()) : kernel(std::integral_constant<int, 3>(), No()); break;
        case 2: first ? kernel(std::integral_constant<int, 2>(), Yes()) : kernel(std::integral_constant<int, 2>(), No()); break;
        default: first ? kernel(std::integral_constant<int, 1>(), Yes()) : kernel(std::integral_constant<int, 1>(), No());
      }
    };
    if constexpr (LANES && ONE_ROW) {
      int16_block_lanes<1, NR, true>(rs, xm, sm, um, ss, bs, os, N, K);
    } else if constexpr (LANES) {
      by_rows([&](auto rows_of_x, auto prefetch) {
        int16_block_lanes<decltype(rows_of_x)::value, NR, decltype(prefetch)::value>(rs, xm, sm, um, ss, bs, os, N, K);
      });
    } else if constexpr (PAIRED && ONE_ROW) {
      int16_block_paired<1, NR, true>(rs, xm, sm, um, ss, bs, os, N, K);
    } else if constexpr (PAIRED) {
      by_rows([&](auto rows_of_x, auto prefetch) {
        int16_block_paired<decltype(rows_of_x)::value, NR, decltype(prefetch)::value>(rs, xm, sm, um, ss, bs, os, N, K);
      });
    } else if constexpr (ONE_ROW) {
      int16_block<BITS, 1, GS, NR>(rs, xm, sm, um, ss, bs, os, N, K, gs, first);
    } else {
      switch (mb) {
        case 4: int16_block<BITS, 4, GS, NR>(rs, xm, sm, um, ss, bs, os, N, K, gs, first); break;
        case 3: int16_block<BITS, 3, GS, NR>(rs, xm, sm, um, ss, bs, os, N, K, gs, first); break;
        case 2: int16_block<BITS, 2, GS, NR>(rs, xm, sm, um, ss, bs, os, N, K, gs, first); break;
        default: int16_block<BITS, 1, GS, NR>(rs, xm, sm, um, ss, bs, os, N, K, gs, first);
      }
    }
  };
  auto one = [&](int n, int m0) { rows_at(std::integral_constant<int, 1>(), {n}, m0); };
  const bool parallel = int64_t(N) * K * (M < 4 ? M : 4) >= PARALLEL_WEIGHTS;
  {  // decode: each weight row read once, a thread's rows as interleaved parts
    if (M <= 4) {
      auto parts = [&](auto count, int a, int b) {  // rows a .. b as NR interleaved parts, one row of each at a time
        constexpr int NR = decltype(count)::value;
        const int per = (b - a + NR - 1) / NR;
        for (int r = 0; r < per; r++) {
          int n[NR];
          bool all = true;
          for (int j = 0; j < NR; j++) n[j] = a + j * per + r, all = all && n[j] < b;
          if (all) {
            rows_at(count, n, 0);
          } else {
            for (int j = 0; j < NR; j++)
              if (n[j] < b) one(n[j], 0);
          }
        }
      };
      auto rows = [&](int a, int b) {
        if (M == 1) {
          parts(std::integral_constant<int, DECODE_ROWS_TOGETHER>(), a, b);
        } else {
          parts(std::integral_constant<int, BATCH_NR>(), a, b);
        }
      };
      if (parallel && !RowPool::enabled()) {
#pragma omp parallel
        {
          const int64_t T = omp_get_num_threads(), id = omp_get_thread_num();
          rows(int(N * id / T), int(N * (id + 1) / T));
        }
      } else if (parallel) {
        const int streams = M == 1 ? DECODE_ROWS_TOGETHER : BATCH_NR;  // a thread's rows side by side
        const int per = chunk_items(N, row_bytes, streams, 4 * streams);
        RowPool::get().run(int((N + per - 1) / per), [&](int c) { rows(c * per, (c + 1) * per < N ? (c + 1) * per : N); });
      } else {
        rows(0, N);
      }
      return;
    }
  }
  auto tile = [&](int t) {  // X16_TILE weight rows stay in cache while every 4 rows of x pass over them (4-bit
    const int n0 = t * X16_TILE, nt = N - n0 < X16_TILE ? N - n0 : X16_TILE;  // codes: two rows side by side
                                                                               // where BATCH_ROWS_TOGETHER is 2)
    for (int m0 = 0; m0 < M; m0 += 4) {
      int j = 0;
      if constexpr (PAIRED && BATCH_ROWS_TOGETHER == 2)
        for (; j + 1 < nt; j += 2) rows_at(std::integral_constant<int, 2>(), {n0 + j, n0 + j + 1}, m0);
      for (; j < nt; j++) one(n0 + j, m0);
    }
  };
  const int tiles = (N + X16_TILE - 1) / X16_TILE;
  if (parallel) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) tile(t);
  } else {
    for (int t = 0; t < tiles; t++) tile(t);
  }
}
#endif


template <int BITS>
void quant_rows(const float* x, const uint8_t* w, const float* scales, const float* biases, float* out, int M,
                int N, int K, int gs) {
  const int G = K / gs;
  std::vector<float> xsum(size_t(M) * G);  // each row's sum over each group (times the group's bias)
  for (int m = 0; m < M; m++)
    for (int g = 0; g < G; g++) {
      __m256 s = _mm256_setzero_ps();
      for (int k = g * gs; k < (g + 1) * gs; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + int64_t(m) * K + k));
      xsum[size_t(m) * G + g] = hsum(s);
    }
  const bool even_odd = BITS == 4 && gs % 16 == 0;
  const std::vector<float> xeo = even_odd ? split_even_odd(x, M, K) : std::vector<float>();
  const int blocks = (N + QNR - 1) / QNR;
  // a block's weight rows stay in L1/L2 while every row of x passes over them
  auto run = [&](int b) {
    int n0 = b * QNR, nr = N - n0 < QNR ? N - n0 : QNR;
    for (int m = 0; m < M; m++) {
      const float *xm = x + int64_t(m) * K, *sm = xsum.data() + size_t(m) * G;
      float* om = out + int64_t(m) * N;
      if (even_odd) {
        const float* xm_eo = xeo.data() + int64_t(m) * K;
        if (nr == QNR) {
          qblock4_even_odd<QNR>(xm_eo, sm, w, scales, biases, om, n0, K, gs);
        } else {
          for (int j = 0; j < nr; j++) qblock4_even_odd<1>(xm_eo, sm, w, scales, biases, om, n0 + j, K, gs);
        }
      } else if (nr == QNR) {
        qblock<BITS, QNR>(xm, sm, w, scales, biases, om, n0, K, gs);
      } else {
        for (int j = 0; j < nr; j++) qblock<BITS, 1>(xm, sm, w, scales, biases, om, n0 + j, K, gs);
      }
    }
  };
  if (int64_t(N) * K >= PARALLEL_WEIGHTS) {
    parallel_blocks(blocks, int64_t(QNR) * K * BITS / 8, run);
  } else {
    for (int b = 0; b < blocks; b++) run(b);
  }
}

// more rows: blocks of PREFILL_BLOCK weight rows dequantized to fp32 (scale * q + bias), then the BLAS
template <int BITS>
void quant_many_rows(const float* x, const uint8_t* w, const float* scales, const float* biases, float* out, int M,
                     int N, int K, int gs) {
  sgemm_fn sgemm = blas_sgemm();
  if (sgemm == nullptr) throw std::runtime_error("quant_matmul: no cblas_sgemm in this process");
  const int G = K / gs;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  std::vector<float> wide(size_t(PREFILL_BLOCK) * K);
  for (int n0 = 0; n0 < N; n0 += PREFILL_BLOCK) {
    int nr = N - n0 < PREFILL_BLOCK ? N - n0 : PREFILL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < nr; r++) {
      const uint8_t* src = w + int64_t(n0 + r) * row_bytes;
      float* dst = wide.data() + int64_t(r) * K;
      for (int g = 0; g < G; g++) {
        const __m256 scale = _mm256_set1_ps(scales[int64_t(n0 + r) * G + g]);
        const __m256 bias = _mm256_set1_ps(biases[int64_t(n0 + r) * G + g]);
        for (int k = g * gs; k < (g + 1) * gs; k += 8)
          _mm256_storeu_ps(dst + k, _mm256_fmadd_ps(codes8<BITS>(src + k * BITS / 8), scale, bias));
      }
    }
    sgemm(RowMajor, NoTrans, Trans, M, nr, K, 1.0f, x, K, wide.data(), K, 0.0f, out + n0, N);
  }
}

#ifdef EXO_INT16_ACTIVATIONS
// int16_quant_matmul in lane order where this CPU's kernels have it (LG > 0: instantiated only then)
template <int LG>
void lane_quant_matmul(const float* x, const uint8_t* w, const float* scales, const float* biases, float* out, int M,
                       int N, int K) {
  if constexpr (LG > 0) int16_quant_matmul<4, 64, XOrder::Lanes>(x, w, scales, biases, out, M, N, K, 64);
}
#endif

class QuantMatmul : public mx::Primitive {
 public:
  QuantMatmul(mx::Stream stream, int group_size, int bits, bool lanes)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits), lanes_(lanes) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &w = inputs[1], &scales = inputs[2], &biases = inputs[3];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const int N = int(w.shape(0)), K = int(x.shape(-1)), M = int(x.size() / K), gs = group_size_, bits = bits_;
    encoder.dispatch([x0 = x.data<float>(), layout = Layout(x), wp = w.data<uint8_t>(), sp = scales.data<float>(),
                      bp = biases.data<float>(), op = out.data<float>(), M, N, K, gs, bits, lanes = lanes_]() {
      std::vector<float> copy;
      const float* xp = layout.rows(x0, int64_t(M) * K, copy);
#ifdef EXO_INT16_ACTIVATIONS
      if (lanes) {  // checked by quant_matmul: 4 bits, groups of 64, a multiple of LANE_GROUPS of them
        lane_quant_matmul<LANE_GROUPS>(xp, wp, sp, bp, op, M, N, K);
        return;
      }
      if (gs % 64 == 0 && gs <= MAX_INT16_GROUP) {
        if (gs == 64 && bits == 4 && (K / gs) % 2 == 0) {  // the q4 format: two groups at a time
          int16_quant_matmul<4, 64, XOrder::Paired>(xp, wp, sp, bp, op, M, N, K, gs);
        } else if (gs == 64) {  // the q8 format's groups (or an odd number of 4-bit ones), one step each
          bits == 8 ? int16_quant_matmul<8, 64>(xp, wp, sp, bp, op, M, N, K, gs)
                    : int16_quant_matmul<4, 64>(xp, wp, sp, bp, op, M, N, K, gs);
        } else {
          bits == 8 ? int16_quant_matmul<8, 0>(xp, wp, sp, bp, op, M, N, K, gs)
                    : int16_quant_matmul<4, 0>(xp, wp, sp, bp, op, M, N, K, gs);
        }
        return;
      }
#endif
      if (M <= SMALL_M) {
        bits == 8 ? quant_rows<8>(xp, wp, sp, bp, op, M, N, K, gs) : quant_rows<4>(xp, wp, sp, bp, op, M, N, K, gs);
      } else {
        bits == 8 ? quant_many_rows<8>(xp, wp, sp, bp, op, M, N, K, gs)
                  : quant_many_rows<4>(xp, wp, sp, bp, op, M, N, K, gs);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("quant_matmul runs on the CPU only");
  }

  const char* name() const override {
    return "ExoQuantMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && lanes_ == o.lanes_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int group_size_, bits_;
  bool lanes_;
};

mx::array quant_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                       int group_size, int bits, bool lanes) {
  if (bits != 8 && bits != 4) throw std::invalid_argument("quant_matmul: bits must be 8 or 4");
  if (group_size <= 0 || group_size % 8) throw std::invalid_argument("quant_matmul: group_size must be a multiple of 8");
  if (x.dtype() != mx::float32 || scales.dtype() != mx::float32 || biases.dtype() != mx::float32)
    throw std::invalid_argument("quant_matmul: x, scales and biases must be float32");
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || x.ndim() < 1)
    throw std::invalid_argument("quant_matmul: w must be uint32 [N, K * bits / 32], x [..., K]");
  const int N = int(w.shape(0)), K = int(x.shape(-1));
  if (K % group_size || int64_t(w.shape(1)) * 32 != int64_t(K) * bits)
    throw std::invalid_argument("quant_matmul: w's rows do not hold K codes of this many bits in whole groups");
  const mx::Shape groups = {N, K / group_size};
  if (scales.shape() != groups || biases.shape() != groups)
    throw std::invalid_argument("quant_matmul: scales and biases must be [N, K / group_size]");
  if (lanes && !(LANE_GROUPS > 0 && bits == 4 && group_size == 64 && (K / 64) % LANE_GROUPS == 0))
    throw std::invalid_argument("quant_matmul: lane order needs this CPU's lane kernel (lane_groups() > 0), 4 bits, "
                                "groups of 64 and a multiple of lane_groups() groups a row");
  mx::Stream s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> in = {x};  // read through its layout (Layout)
  for (const auto* a : {&w, &scales, &biases}) in.push_back(row_major(*a, s));
  mx::Shape shape = x.shape();
  shape.back() = N;
  return mx::array(shape, mx::float32, std::make_shared<QuantMatmul>(s, group_size, bits, lanes), std::move(in));
}

}  // namespace

NB_MODULE(_weight_matmul, m) {
  m.doc() = "x @ W.T with 16-bit or 8/4-bit quantized weights and fp32 activations (exo_lab.native)";
  m.def("weight_matmul", &weight_matmul, "x"_a, "w"_a,
        "x float32 [..., K] times w bfloat16/float16 [N, K] transposed: float32 [..., N].");
  m.def("quant_matmul", &quant_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "lanes"_a = false,
        "x float32 [..., K] times MLX's affine-quantized w (uint32 [N, K * bits / 32], float32 scales and biases\n"
        "[N, K / group_size]) transposed: float32 [..., N]. lanes: w's rows are in lane order (each block of\n"
        "lane_groups() groups holding word i of each group side by side, for i in 0..7).");
  m.def("lane_groups", []() { return LANE_GROUPS; },
        "Groups of 64 4-bit codes a block of the lane order holds (0: quant_matmul has no lane kernel here).");
  m.def("threads", []() { return omp_get_max_threads(); });
  m.def("integer_activations", []() { return INTEGER_ACTIVATIONS; },
        "Whether quant_matmul rounds x to 16-bit integers per group (groups of a multiple of 64; AVX-512 VNNI).");
}
