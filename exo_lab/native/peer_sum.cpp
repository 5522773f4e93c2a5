// A pair of ranks' messages over one TCP socket, as MLX primitives: a tensor pair's all-reduce and gather, and
// the hidden states a pipeline's stage hands to the next.
//
// MLX's ring backend hands each message from the stream's thread to a pool thread and on to a socket thread
// that polls without sleeping, and back: on this project's 2-core machine a 2-rank `all_sum` of 8 KB took
// ~150-180 us where a plain socket exchange of the same bytes took ~20 us, and a llama-1b decode step has 32.
// And while a pipeline stage waits for the other's hidden states, the ring's socket thread spins on `recv()`
// for the whole wait: one core each, two busy cores where one computes. Where cores are metered (this
// project's VM is throttled for 100 ms at a time once both of its cores run flat out), the spinning costs the
// computing rank its time too.
//
// Here the stream's thread does the socket work itself, sleeping in poll() while the socket cannot move:
// - `peer_sum(x, fd)` writes x's bytes to the socket and reads the peer's (both at once, non-blocking, so a
//   message of any size passes however small the socket buffers), then adds them. Addition commutes exactly,
//   so both ranks hold the same bits, and they are the bits of MLX's ring for two ranks (float32 added as
//   float32; bfloat16 and float16 through float32 and rounded back, as MLX's own types add; int32 exactly).
// - `peer_gather(x, fd, first)` writes x's bytes and reads the peer's the same way, into the two halves of one
//   array in rank order: the bytes of MLX's ring's `all_gather` for two ranks (a tensor pair's logits).
// - `peer_send(x, fd)` writes x's bytes (an array sharing x's data, as MLX's `send` returns);
//   `peer_recv(shape, dtype, fd, after)` reads the bytes of one such array (evaluated after the arrays in
//   `after`: a receive has no inputs, and one ordered before a send it waits for would wait forever).
//
// Both ranks must evaluate the same messages in the same order, as with any collective. A socket that fails or
// closes (the peer is gone) ends the process with a message on stderr, as MLX's ring does: the partial sums
// cannot be recovered, and the instance's supervisor sees the rank exit.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

[[noreturn]] void fail(const char* what, int err) {
  std::fprintf(stderr, "exo_lab peer_sum: %s%s%s: the pair's messages cannot go on\n", what,
               err ? ": " : "", err ? std::strerror(err) : "");
  std::fflush(stderr);
  std::_Exit(70);
}

bool transient(int err) {
  return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

// Writes n_out bytes of `out` and reads n_in bytes into `in`, whichever can move, until both are done.
void exchange(int fd, const char* out, size_t n_out, char* in, size_t n_in) {
  size_t sent = 0, got = 0;
  while (sent < n_out || got < n_in) {
    bool moved = false;
    if (sent < n_out) {
      ssize_t k = ::send(fd, out + sent, n_out - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (k > 0) {
        sent += size_t(k);
        moved = true;
      } else if (k < 0 && !transient(errno)) {
        fail("send", errno);
      }
    }
    if (got < n_in) {
      ssize_t k = ::recv(fd, in + got, n_in - got, MSG_DONTWAIT);
      if (k > 0) {
        got += size_t(k);
        moved = true;
      } else if (k == 0) {
        fail("the peer closed the socket", 0);
      } else if (!transient(errno)) {
        fail("recv", errno);
      }
    }
    if (moved) continue;
    pollfd p{fd, short((sent < n_out ? POLLOUT : 0) | (got < n_in ? POLLIN : 0)), 0};
    if (::poll(&p, 1, -1) < 0 && errno != EINTR) fail("poll", errno);
  }
}

template <typename T>
void add(const T* mine, T* theirs_then_sum, size_t count) {
  for (size_t i = 0; i < count; i++) theirs_then_sum[i] = T(mine[i] + theirs_then_sum[i]);
}

// An array's elements through its strides, copied out in row order.
struct Strided {
  mx::Shape shape;
  mx::Strides strides;  // in elements
  size_t item;

  void gather(const char* base, char* dst) const {
    const int nd = int(shape.size());
    std::vector<int64_t> index(nd, 0);
    size_t count = 1;
    for (auto d : shape) count *= size_t(d);
    for (size_t i = 0; i < count; i++) {
      int64_t at = 0;
      for (int d = 0; d < nd; d++) at += index[d] * strides[d];
      std::memcpy(dst + i * item, base + at * int64_t(item), item);
      for (int d = nd - 1; d >= 0 && ++index[d] == shape[d]; d--) index[d] = 0;
    }
  }
};

// A primitive that is one message of its own: two of the same array must not be merged into one.
class Message : public mx::Primitive {
 public:
  Message(mx::Stream stream, int fd) : mx::Primitive(stream), fd_(fd) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("the pair's messages run on the CPU only");
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return this == &other;
  }

 protected:
  // out allocated, x and out registered with the stream's encoder (returned); view: x's strides where x is a
  // view, whose bytes go in row order
  mx::cpu::CommandEncoder& begin(const mx::array& x, mx::array& out, std::optional<Strided>& view) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    if (!x.flags().row_contiguous) view = Strided{x.shape(), x.strides(), x.itemsize()};
    return encoder;
  }

  int fd_;
};

class PeerSum : public Message {
 public:
  using Message::Message;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    mx::array& out = outputs[0];
    std::optional<Strided> view;  // sent in row order: a view is gathered first (a matmul's output is: no copy)
    begin(x, out, view).dispatch([fd = fd_, xp = x.data<char>(), op = out.data<char>(), n = x.nbytes(), count = x.size(),
                      dtype = x.dtype(), view = std::move(view)]() {
      std::vector<char> rows;
      const char* mine = xp;
      if (view) {
        rows.resize(n);
        view->gather(xp, rows.data());
        mine = rows.data();
      }
      exchange(fd, mine, n, op, n);  // the peer's partial lands in the output, which then becomes the sum
      switch (dtype) {
        case mx::float32:
          add(reinterpret_cast<const float*>(mine), reinterpret_cast<float*>(op), count);
          break;
        case mx::bfloat16:
          add(reinterpret_cast<const mx::bfloat16_t*>(mine), reinterpret_cast<mx::bfloat16_t*>(op), count);
          break;
        case mx::float16:
          add(reinterpret_cast<const mx::float16_t*>(mine), reinterpret_cast<mx::float16_t*>(op), count);
          break;
        case mx::int32:  // wrapping, as two's complement adds
          add(reinterpret_cast<const uint32_t*>(mine), reinterpret_cast<uint32_t*>(op), count);
          break;
        default:
          break;  // refused when the operation was made
      }
    });
  }

  const char* name() const override {
    return "ExoPeerSum";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// The pair's x side by side along the first axis, in rank order: this rank's bytes copied into its slot, the
// peer's read into the other while this rank's are written (the bytes MLX's ring gathers for two ranks).
class PeerGather : public Message {
 public:
  PeerGather(mx::Stream stream, int fd, bool first) : Message(stream, fd), first_(first) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    mx::array& out = outputs[0];
    std::optional<Strided> view;
    begin(x, out, view).dispatch([fd = fd_, first = first_, xp = x.data<char>(), op = out.data<char>(), n = x.nbytes(),
                      view = std::move(view)]() {
      char* mine = first ? op : op + n;
      if (view) {
        view->gather(xp, mine);
      } else {
        std::memcpy(mine, xp, n);
      }
      exchange(fd, mine, n, first ? op + n : op, n);
    });
  }

  const char* name() const override {
    return "ExoPeerGather";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape[0] *= 2;
    return {shape};
  }

 private:
  bool first_;
};

class PeerSend : public Message {
 public:
  using Message::Message;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    outputs[0].copy_shared_buffer(x);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    std::optional<Strided> view;
    if (!x.flags().row_contiguous) view = Strided{x.shape(), x.strides(), x.itemsize()};
    encoder.dispatch([fd = fd_, xp = x.data<char>(), n = x.nbytes(), view = std::move(view)]() {
      std::vector<char> rows;
      const char* bytes = xp;
      if (view) {
        rows.resize(n);
        view->gather(xp, rows.data());
        bytes = rows.data();
      }
      exchange(fd, bytes, n, nullptr, 0);
    });
  }

  const char* name() const override {
    return "ExoPeerSend";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

class PeerRecv : public Message {
 public:
  using Message::Message;

  void eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_output_array(out);
    encoder.dispatch([fd = fd_, op = out.data<char>(), n = out.nbytes()]() { exchange(fd, nullptr, 0, op, n); });
  }

  const char* name() const override {
    return "ExoPeerRecv";
  }
};

mx::Stream cpu_stream() {
  return mx::to_stream(std::monostate{}, mx::Device::cpu);
}

void check_fd(int fd, const char* op) {
  if (fd < 0) throw std::invalid_argument(std::string(op) + ": fd must be an open socket");
}

mx::array peer_send(const mx::array& x, int fd) {
  check_fd(fd, "peer_send");
  return mx::array(x.shape(), x.dtype(), std::make_shared<PeerSend>(cpu_stream(), fd), {x});
}

mx::array peer_recv(const std::vector<int>& dims, mx::Dtype dtype, int fd, const std::vector<mx::array>& after) {
  check_fd(fd, "peer_recv");
  for (auto d : dims)
    if (d < 0) throw std::invalid_argument("peer_recv: a dimension is negative");
  return mx::array(mx::Shape(dims.begin(), dims.end()), dtype, std::make_shared<PeerRecv>(cpu_stream(), fd), after);
}

mx::array peer_sum(const mx::array& x, int fd) {
  if (x.dtype() != mx::float32 && x.dtype() != mx::bfloat16 && x.dtype() != mx::float16 && x.dtype() != mx::int32)
    throw std::invalid_argument("peer_sum: x must be float32, bfloat16, float16 or int32");
  check_fd(fd, "peer_sum");
  return mx::array(x.shape(), x.dtype(), std::make_shared<PeerSum>(cpu_stream(), fd), {x});
}

mx::array peer_gather(const mx::array& x, int fd, bool first) {
  if (x.ndim() == 0) throw std::invalid_argument("peer_gather: x must have at least one dimension");
  check_fd(fd, "peer_gather");
  mx::Shape shape = x.shape();
  shape[0] *= 2;
  return mx::array(shape, x.dtype(), std::make_shared<PeerGather>(cpu_stream(), fd, first), {x});
}

}  // namespace

NB_MODULE(_peer_sum, m) {
  m.doc() = "A pair of ranks' messages over one TCP socket, as MLX primitives";
  m.def("peer_sum", &peer_sum, "x"_a, "fd"_a,
        "x plus the peer's x of the same shape and dtype, exchanged over the connected socket fd (both ranks\n"
        "get the same bits).");
  m.def("peer_gather", &peer_gather, "x"_a, "fd"_a, "first"_a,
        "The pair's x concatenated along the first axis in rank order (first: this rank's x comes first),\n"
        "exchanged over the connected socket fd (as MLX's all_gather of two ranks).");
  m.def("peer_send", &peer_send, "x"_a, "fd"_a,
        "x, its bytes written to the connected socket fd when evaluated (the peer reads them with peer_recv).");
  m.def("peer_recv", &peer_recv, "shape"_a, "dtype"_a, "fd"_a, "after"_a = std::vector<mx::array>{},
        "An array of shape and dtype read from the connected socket fd when evaluated (the peer's peer_send),\n"
        "after the arrays in after (its only inputs).");
}
