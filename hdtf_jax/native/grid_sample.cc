// CPU grid_sample (PyTorch semantics, NHWC) for hdtf_jax.warp, as XLA FFI handlers.
//
// Why native: XLA:CPU emits one scalar load per gathered element and runs
// scatters on one thread, so for a few channels (RGB warps) its grid_sample
// is several times slower than a plain loop. These loops read each point's
// four corners as whole C-vectors, and split the work over XLA's intra-op
// thread pool; the image gradient (a scatter) is split by batch element,
// with per-part private buffers when there are fewer images than threads:
// no buffer is ever written by two threads at once.
//
// Formulas match hdtf_jax/warp.py (its module docstring): unnormalise,
// clamp for "border" (zero derivative where clamped, ends included), zeros
// outside for "zeros", four bilinear corners or round-half-to-even nearest.
// Arrays: image (..., H, W, C), grid (..., Ho, Wo, 2); the leading dimensions
// (batch, and vmap's) are flattened into one batch axis.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c, ho, wo;
  int64_t points() const { return n * ho * wo; }
};

struct Options {
  bool nearest, border, align_corners;
};

// Runs fn(0..items-1) on the calling thread and up to threads-1 pool tasks,
// which claim items from a shared counter. The caller only waits for items
// already claimed (running), so it never waits on a task the pool has not
// started: no deadlock even when the caller is itself a pool thread.
template <typename F>
void ParallelFor(ffi::ThreadPool* pool, int64_t threads, int64_t items, const F& fn) {
  threads = std::min(threads, items);
  if (threads <= 1 || pool == nullptr) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [items](State* s, const F* f) {
    for (int64_t i; (i = s->next.fetch_add(1)) < items;) {
      (*f)(i);
      if (s->done.fetch_add(1) + 1 == items) {
        { std::lock_guard<std::mutex> lock(s->mu); }
        s->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    // A late task finds no items left and returns without touching fn.
    pool->Schedule([state, run, f = &fn] { run(state.get(), f); });
  }
  run(state.get(), &fn);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == items; });
}

// Points whose taps are computed together: the coordinate arithmetic runs
// as branch-free loops over a block, which the compiler vectorises; the
// gathers then read whole C-vectors per corner.
constexpr int kBlock = 128;

// Taps of a block of points: corner k of point i reads the C-vector at
// offset[k][i] of its image with weight[k][i]. Like the XLA path, corners
// outside the image read a clamped pixel with weight 0 (inside[k][i] = 0).
template <typename T>
struct BlockTaps {
  int32_t offset[4][kBlock];
  T weight[4][kBlock];
  T inside[4][kBlock];
  T fx[kBlock], fy[kBlock], dpx[kBlock], dpy[kBlock];
};

// Axis constants: pixel p = ((g + 1) * a - b) * half, the formulas of
// warp.py's _unnormalize ((g + 1) * (S - 1) / 2, or ((g + 1) * S - 1) / 2).
template <typename T>
struct Axis {
  T a, b, half, dp, size;
  int32_t n;
  Axis(int64_t size_, bool align_corners)
      : a(align_corners ? static_cast<T>((size_ - 1) / 2.0) : static_cast<T>(size_)),
        b(align_corners ? T(0) : T(1)),
        half(align_corners ? T(1) : T(0.5)),
        dp(static_cast<T>(align_corners ? (size_ - 1) / 2.0 : size_ / 2.0)),
        size(static_cast<T>(size_)),
        n(static_cast<int32_t>(size_)) {}
};

// Pixel coordinate and its derivative for `count` normalised coordinates
// g[2 * i] (stride 2: x and y interleaved in the grid).
template <typename T>
inline void Unnormalize(const T* g, int count, const Axis<T>& ax, bool border, T* p, T* dp) {
  const T last = ax.size - 1, hi = ax.size + 1;
  for (int i = 0; i < count; ++i) {
    T v = ((g[2 * i] + 1) * ax.a - ax.b) * ax.half;
    T d = ax.dp;
    if (border) {  // clamp to [0, S-1]; derivative 0 where clamped, ends included
      const bool inside = v > 0 && v < last;
      d = inside ? d : T(0);
      v = inside ? v : (v <= 0 ? T(0) : last);
    } else {  // far outside reads zeros anyway; bounds keep the int casts safe (NaN too)
      v = v >= -2 ? v : T(-2);
      v = v <= hi ? v : hi;
    }
    p[i] = v;
    dp[i] = d;
  }
}

// floor of a bounded coordinate: a truncating cast and a fix-up, which
// vectorise (without SSE4.1, std::floor is a libm call per element).
template <typename T>
inline int32_t Floor(T p) {
  const int32_t i = static_cast<int32_t>(p);
  return i - (static_cast<T>(i) > p);
}

template <typename T>
void ComputeTaps(const T* grid, int count, const Shape& s, const Options& o, BlockTaps<T>* t) {
  const Axis<T> ax(s.w, o.align_corners), ay(s.h, o.align_corners);
  T px[kBlock], py[kBlock];
  Unnormalize(grid, count, ax, o.border, px, t->dpx);
  Unnormalize(grid + 1, count, ay, o.border, py, t->dpy);
  const int32_t w = ax.n, h = ay.n, c = static_cast<int32_t>(s.c);
  if (o.nearest) {
    for (int i = 0; i < count; ++i) {
      // Round half to even (PyTorch's nearbyint): floor, then up if above
      // .5, or at .5 from an odd integer.
      const int32_t fx0 = Floor(px[i]), fy0 = Floor(py[i]);
      const T dx = px[i] - static_cast<T>(fx0), dy = py[i] - static_cast<T>(fy0);
      const int32_t ix = fx0 + (dx > T(0.5) || (dx == T(0.5) && (fx0 & 1)));
      const int32_t iy = fy0 + (dy > T(0.5) || (dy == T(0.5) && (fy0 & 1)));
      const bool in = static_cast<uint32_t>(ix) < static_cast<uint32_t>(w) &&
                      static_cast<uint32_t>(iy) < static_cast<uint32_t>(h);
      t->inside[0][i] = in ? T(1) : T(0);
      t->weight[0][i] = in ? T(1) : T(0);
      const int32_t cx = ix < 0 ? 0 : (ix > w - 1 ? w - 1 : ix);
      const int32_t cy = iy < 0 ? 0 : (iy > h - 1 ? h - 1 : iy);
      t->offset[0][i] = (cy * w + cx) * c;
      t->fx[i] = t->fy[i] = 0;
    }
    return;
  }
  for (int i = 0; i < count; ++i) {
    const int32_t x0 = Floor(px[i]), y0 = Floor(py[i]);
    const T fx = px[i] - static_cast<T>(x0), fy = py[i] - static_cast<T>(y0);
    const int32_t x1 = x0 + 1, y1 = y0 + 1;
    // Branch-free (vectorised): 0/1 masks and clamped indices.
    const T mx0 = static_cast<T>(static_cast<uint32_t>(x0) < static_cast<uint32_t>(w));
    const T mx1 = static_cast<T>(static_cast<uint32_t>(x1) < static_cast<uint32_t>(w));
    const T my0 = static_cast<T>(static_cast<uint32_t>(y0) < static_cast<uint32_t>(h));
    const T my1 = static_cast<T>(static_cast<uint32_t>(y1) < static_cast<uint32_t>(h));
    const int32_t cx0 = std::min(std::max(x0, 0), w - 1), cx1 = std::min(std::max(x1, 0), w - 1);
    const int32_t r0 = std::min(std::max(y0, 0), h - 1) * w;
    const int32_t r1 = std::min(std::max(y1, 0), h - 1) * w;
    const T in0 = mx0 * my0, in1 = mx1 * my0, in2 = mx0 * my1, in3 = mx1 * my1;
    const T wx0 = 1 - fx, wy0 = 1 - fy;
    // Corner order as warp.py: (x0, y0), (x1, y0), (x0, y1), (x1, y1).
    t->offset[0][i] = (r0 + cx0) * c;
    t->offset[1][i] = (r0 + cx1) * c;
    t->offset[2][i] = (r1 + cx0) * c;
    t->offset[3][i] = (r1 + cx1) * c;
    t->inside[0][i] = in0;
    t->inside[1][i] = in1;
    t->inside[2][i] = in2;
    t->inside[3][i] = in3;
    t->weight[0][i] = (wx0 * wy0) * in0;
    t->weight[1][i] = (fx * wy0) * in1;
    t->weight[2][i] = (wx0 * fy) * in2;
    t->weight[3][i] = (fx * fy) * in3;
    t->fx[i] = fx;
    t->fy[i] = fy;
  }
}

// Calls fn(first point, count, image index) for blocks of at most kBlock
// points of [begin, end) that do not cross an image boundary.
template <typename F>
inline void ForBlocks(const Shape& s, int64_t begin, int64_t end, const F& fn) {
  const int64_t per_image = s.ho * s.wo;
  for (int64_t p = begin; p < end;) {
    const int64_t b = p / per_image;
    const int64_t stop = std::min(end, (b + 1) * per_image);
    const int count = static_cast<int>(std::min<int64_t>(kBlock, stop - p));
    fn(p, count, b);
    p += count;
  }
}

// kC > 0: the channel count known at compile time (unrolled for RGB & co).
template <typename T, int kC>
void ForwardPoints(const T* image, const T* grid, T* out, const Shape& s, const Options& o,
                   int64_t begin, int64_t end) {
  const int64_t c = kC > 0 ? kC : s.c;
  BlockTaps<T> t;
  ForBlocks(s, begin, end, [&](int64_t p0, int count, int64_t b) {
    const T* img = image + b * s.h * s.w * c;
    ComputeTaps(grid + 2 * p0, count, s, o, &t);
    T* dst = out + p0 * c;
    if (o.nearest) {
      for (int i = 0; i < count; ++i, dst += c) {
        const T* a = img + t.offset[0][i];
        const T w0 = t.weight[0][i];
        for (int64_t j = 0; j < c; ++j) dst[j] = a[j] * w0;
      }
      return;
    }
    for (int i = 0; i < count; ++i, dst += c) {
      const T *a = img + t.offset[0][i], *bb = img + t.offset[1][i],
              *d = img + t.offset[2][i], *e = img + t.offset[3][i];
      const T w0 = t.weight[0][i], w1 = t.weight[1][i], w2 = t.weight[2][i],
              w3 = t.weight[3][i];
      for (int64_t j = 0; j < c; ++j) dst[j] = a[j] * w0 + bb[j] * w1 + d[j] * w2 + e[j] * w3;
    }
  });
}

// Grid gradient of a block's points from the four corners' dot products with
// the output gradient (corners outside the image contribute 0).
template <typename T>
void GridGradient(const BlockTaps<T>& t, const T (&dots)[4][kBlock], int count, T* dg) {
  for (int i = 0; i < count; ++i) {
    const T s0 = t.inside[0][i] != 0 ? dots[0][i] : T(0);
    const T s1 = t.inside[1][i] != 0 ? dots[1][i] : T(0);
    const T s2 = t.inside[2][i] != 0 ? dots[2][i] : T(0);
    const T s3 = t.inside[3][i] != 0 ? dots[3][i] : T(0);
    const T fx = t.fx[i], fy = t.fy[i];
    dg[2 * i] = ((1 - fy) * (s1 - s0) + fy * (s3 - s2)) * t.dpx[i];
    dg[2 * i + 1] = ((1 - fx) * (s2 - s0) + fx * (s3 - s1)) * t.dpy[i];
  }
}

// Image gradient of points [begin, end) added into d_image (images
// first_image, first_image + 1, ... of the batch's gradient, or a private
// buffer standing for them), grid gradient written for those points.
//
// Per block of points: the grid gradient's dot products (reads only), as
// loops over the block's points one corner at a time, which vectorise; then
// the scatter, one corner at a time: with all four corners point by point,
// neighbouring points' read-modify-writes of a shared corner came back to
// back, and on jittered grids the CPU mispredicts which loads depend on which
// stores (2x slower). With the channel count known at compile time
// (bilinear), dot products and scatter go together, one pass per image row
// of the corners (~15% less CPU on 2x512x512x3).
// Holding a row's sums in registers while consecutive points hit the same or
// the next pixel was tried: ~40% slower (the branches mispredict on jittered grids).
template <typename T, int kC>
void BackwardPoints(const T* image, const T* grid, const T* gout, T* d_image,
                    int64_t first_image, T* d_grid, const Shape& s, const Options& o,
                    int64_t begin, int64_t end) {
  const int64_t c = kC > 0 ? kC : s.c;
  const int taps = o.nearest ? 1 : 4;
  BlockTaps<T> t;
  T dots[4][kBlock];
  ForBlocks(s, begin, end, [&](int64_t p0, int count, int64_t b) {
    const T* img = image + b * s.h * s.w * c;
    T* d_img = d_image + (b - first_image) * s.h * s.w * c;
    const T* g = gout + p0 * c;
    T* dg = d_grid + 2 * p0;
    ComputeTaps(grid + 2 * p0, count, s, o, &t);
    // A few channels, bilinear: one pass per image row of the corners does
    // the dot products and the scatter together (the image and its gradient
    // are read at the same offsets, so the gathers are paid once per row).
    if (kC > 0 && !o.nearest) {
      constexpr int kC2 = 2 * (kC > 0 ? kC : 1);
      for (int r = 0; r < 2; ++r) {
        const int32_t *off0 = t.offset[2 * r], *off1 = t.offset[2 * r + 1];
        const T *w0 = t.weight[2 * r], *w1 = t.weight[2 * r + 1];
        T *dot0 = dots[2 * r], *dot1 = dots[2 * r + 1];
        for (int i = 0; i < count; ++i) {
          const T* __restrict__ v0 = img + off0[i];
          const T* __restrict__ v1 = img + off1[i];
          T* __restrict__ d0 = d_img + off0[i];
          T* d1 = d_img + off1[i];
          const T* __restrict__ gi = g + i * kC;
          T s0 = 0, s1 = 0;
          for (int j = 0; j < kC; ++j) {
            s0 += v0[j] * gi[j];
            s1 += v1[j] * gi[j];
          }
          dot0[i] = s0;
          dot1[i] = s1;
          if (d1 == d0 + kC) {
            T add[kC2];
            for (int j = 0; j < kC; ++j) {
              add[j] = w0[i] * gi[j];
              add[kC + j] = w1[i] * gi[j];
            }
            for (int j = 0; j < kC2; ++j) d0[j] += add[j];
          } else {  // clamped at the left or right edge: the same pixel twice
            for (int j = 0; j < kC; ++j) d0[j] += w0[i] * gi[j];
            for (int j = 0; j < kC; ++j) d1[j] += w1[i] * gi[j];
          }
        }
      }
      GridGradient(t, dots, count, dg);
      return;
    }
    if (o.nearest) {
      std::fill(dg, dg + 2 * count, T(0));
    } else {
      for (int k = 0; k < 4; ++k) {
        T* dk = dots[k];
        const int32_t* off = t.offset[k];
        for (int i = 0; i < count; ++i) {
          const T* v = img + off[i];
          const T* gi = g + i * c;
          T dot = 0;
          for (int64_t j = 0; j < c; ++j) dot += v[j] * gi[j];
          dk[i] = dot;
        }
      }
      GridGradient(t, dots, count, dg);
    }
    // Like the XLA path's scatter: outside corners add weight 0 to a clamped pixel.
    for (int k = 0; k < taps; ++k) {
      const int32_t* off = t.offset[k];
      const T* wk = t.weight[k];
      for (int i = 0; i < count; ++i) {
        T* dst = d_img + off[i];
        const T* gi = g + i * c;
        const T w = wk[i];
        for (int64_t j = 0; j < c; ++j) dst[j] += w * gi[j];
      }
    }
  });
}

// Points per work item: small enough to balance 2-16 threads, large enough
// that scheduling costs nothing next to the work.
int64_t Chunks(int64_t points, int64_t c, int64_t threads) {
  const int64_t min_points = std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1));
  return std::max<int64_t>(1, std::min<int64_t>(8 * threads, points / min_points));
}

template <typename T, int kC>
void Forward(ffi::ThreadPool* pool, int64_t threads, const T* image, const T* grid, T* out,
             const Shape& s, const Options& o) {
  const int64_t points = s.points();
  const int64_t chunks = Chunks(points, s.c, threads);
  ParallelFor(pool, threads, chunks, [&](int64_t i) {
    ForwardPoints<T, kC>(image, grid, out, s, o, points * i / chunks, points * (i + 1) / chunks);
  });
}

template <typename T, int kC>
void Backward(ffi::ThreadPool* pool, int64_t threads, const T* image, const T* grid,
              const T* gout, T* d_image, T* d_grid, const Shape& s, const Options& o) {
  const int64_t per_image = s.h * s.w * s.c, per_grid = s.ho * s.wo;
  // Each image's points are split into `parts` ranges, one work item each.
  // Part 0 scatters into the image's gradient, parts 1.. into private
  // zeroed buffers the size of one image, summed into it afterwards: with
  // fewer images than threads every thread still gets work, and no two
  // threads ever write the same buffer. Few parts: each costs a buffer's
  // zeroing and summing.
  const int64_t parts = s.n >= threads ? 1 : std::min<int64_t>(8, (threads + s.n - 1) / s.n);
  std::vector<std::unique_ptr<T[]>> partial(s.n * (parts - 1));
  ParallelFor(pool, threads, s.n * parts, [&](int64_t item) {
    const int64_t b = item / parts, q = item % parts;
    T* dst = d_image + b * per_image;
    if (q > 0) {
      partial[b * (parts - 1) + q - 1].reset(new T[per_image]);
      dst = partial[b * (parts - 1) + q - 1].get();
    }
    std::fill(dst, dst + per_image, T(0));
    BackwardPoints<T, kC>(image, grid, gout, dst, b, d_grid, s, o,
                          b * per_grid + per_grid * q / parts,
                          b * per_grid + per_grid * (q + 1) / parts);
  });
  if (parts == 1) return;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(8 * threads, per_image / 16384));
  ParallelFor(pool, threads, s.n * pieces, [&](int64_t item) {
    const int64_t b = item / pieces, i = item % pieces;
    const int64_t lo = per_image * i / pieces, hi = per_image * (i + 1) / pieces;
    T* dst = d_image + b * per_image;
    for (int64_t q = 1; q < parts; ++q) {
      const T* src = partial[b * (parts - 1) + q - 1].get();
      for (int64_t j = lo; j < hi; ++j) dst[j] += src[j];
    }
  });
}

ffi::Error ReadShape(const ffi::AnyBuffer& image, const ffi::AnyBuffer& grid, Shape* s) {
  const auto di = image.dimensions(), dg = grid.dimensions();
  if (di.size() < 3 || dg.size() != di.size() || dg.back() != 2) {
    return ffi::Error::InvalidArgument("hdtf_grid_sample: need image (..., H, W, C), grid (..., Ho, Wo, 2)");
  }
  const size_t r = di.size();
  int64_t n = 1;
  for (size_t k = 0; k + 3 < r; ++k) {
    if (di[k] != dg[k]) return ffi::Error::InvalidArgument("hdtf_grid_sample: batch dims differ");
    n *= di[k];
  }
  *s = Shape{n, di[r - 3], di[r - 2], di[r - 1], dg[r - 3], dg[r - 2]};
  if (s->h * s->w * s->c >= (int64_t{1} << 31) || s->h >= (1 << 22) || s->w >= (1 << 22)) {
    return ffi::Error::InvalidArgument("hdtf_grid_sample: image too large for 32-bit offsets");
  }
  if (image.element_type() != grid.element_type()) {
    return ffi::Error::InvalidArgument("hdtf_grid_sample: image and grid dtypes differ");
  }
  return ffi::Error::Success();
}

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

// Small channel counts get compile-time loops (RGB warps, flows, masks).
#define HDTF_DISPATCH_C(FN, T, ...)                          \
  switch (s.c) {                                             \
    case 1: FN<T, 1>(__VA_ARGS__); break;                    \
    case 2: FN<T, 2>(__VA_ARGS__); break;                    \
    case 3: FN<T, 3>(__VA_ARGS__); break;                    \
    case 4: FN<T, 4>(__VA_ARGS__); break;                    \
    default: FN<T, 0>(__VA_ARGS__); break;                   \
  }

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                       ffi::Result<ffi::AnyBuffer> out, int32_t nearest, int32_t border,
                       int32_t align_corners) {
  Shape s;
  if (auto e = ReadShape(image, grid, &s); e.failure()) return e;
  const Options o{nearest != 0, border != 0, align_corners != 0};
  const int64_t threads = Threads(pool);
  switch (image.element_type()) {
    case ffi::DataType::F32:
      HDTF_DISPATCH_C(Forward, float, &pool, threads, image.typed_data<float>(),
                      grid.typed_data<float>(), out->typed_data<float>(), s, o);
      break;
    case ffi::DataType::F64:
      HDTF_DISPATCH_C(Forward, double, &pool, threads, image.typed_data<double>(),
                      grid.typed_data<double>(), out->typed_data<double>(), s, o);
      break;
    default:
      return ffi::Error::InvalidArgument("hdtf_grid_sample: float32 or float64 only");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                        ffi::AnyBuffer gout, ffi::Result<ffi::AnyBuffer> d_image,
                        ffi::Result<ffi::AnyBuffer> d_grid, int32_t nearest, int32_t border,
                        int32_t align_corners) {
  Shape s;
  if (auto e = ReadShape(image, grid, &s); e.failure()) return e;
  const Options o{nearest != 0, border != 0, align_corners != 0};
  const int64_t threads = Threads(pool);
  switch (image.element_type()) {
    case ffi::DataType::F32:
      HDTF_DISPATCH_C(Backward, float, &pool, threads, image.typed_data<float>(),
                      grid.typed_data<float>(), gout.typed_data<float>(),
                      d_image->typed_data<float>(), d_grid->typed_data<float>(), s, o);
      break;
    case ffi::DataType::F64:
      HDTF_DISPATCH_C(Backward, double, &pool, threads, image.typed_data<double>(),
                      grid.typed_data<double>(), gout.typed_data<double>(),
                      d_image->typed_data<double>(), d_grid->typed_data<double>(), s, o);
      break;
    default:
      return ffi::Error::InvalidArgument("hdtf_grid_sample: float32 or float64 only");
  }
  return ffi::Error::Success();
}

}  // namespace

// Exported (the library is built with -fvisibility=hidden): ctypes looks these up.
#define HDTF_EXPORT extern "C" __attribute__((visibility("default")))
HDTF_EXPORT XLA_FFI_Error* HdtfGridSampleForward(XLA_FFI_CallFrame* call_frame);
HDTF_EXPORT XLA_FFI_Error* HdtfGridSampleBackward(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(HdtfGridSampleForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("nearest")
                                  .Attr<int32_t>("border")
                                  .Attr<int32_t>("align_corners"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HdtfGridSampleBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("nearest")
                                  .Attr<int32_t>("border")
                                  .Attr<int32_t>("align_corners"));
