// Blockwise (flash) attention for XLA:CPU, float32, forward and backward, as XLA FFI custom calls.
//
// The contract is the one of wings_jax.attention's blockwise kernel, in its layout: the query heads
// that share a key/value head are folded into the rows, a row r of batch b is query r / group, and a
// key j is visible to it when kv_valid[b, j] and, if causal, kv_index[b, j] <= q_index[b, r / group].
// A row that sees no key gets a zero output and a log-sum-exp of 0.
//
// Why a kernel of its own: XLA:CPU runs each tile of the pure-JAX kernel as separate ops (matmuls with
// 64-wide contractions, then passes over the tile for the mask and the softmax) and cannot skip the
// hidden part of a tile. Here every tile stays in cache from its first product to its last, and
// tiles are small enough (64 keys) that a causal mask wastes little.
//
// Every tile is computed keys-first, (keys, rows), so that the softmax runs down the columns with
// whole vectors of rows, and every product is C (+)= A B with row-major operands; the kernel makes the
// transposes this needs (Q^T, K^T, V^T, dO^T) itself: XLA:CPU fused them into their producers and
// ran those at a fraction of memory speed.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kPanelVectors = 4;  // 6 x 64 accumulators: 24 of the 32 vector registers
#else
constexpr int kLanes = 8;
constexpr int kPanelVectors = 2;  // 6 x 16 accumulators: 12 of the 16 vector registers
#endif
constexpr int kPanelRows = 6;
// Row counts and row widths of the products' right operands must be multiples of this (the callers pad).
constexpr int kAlign = 16;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

// exp over a vector (Cody-Waite reduction, Cephes' expf polynomial, about 1 ulp), exactly 0 below
// -87 so that a hidden entry's exp(-1e30 - m) is 0 as in the XLA kernels.
inline Vec vexp(Vec x) {
  const Vec clamped = vmax(x, splat(-87.0f)) < splat(88.0f) ? vmax(x, splat(-87.0f)) : splat(88.0f);
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (clamped * splat(1.44269504088896341f) + magic) - magic;
  Vec r = clamped - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  const Vec r2 = r * r;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r2 + r + splat(1.0f);
  const IVec exponent = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return x < splat(-87.0f) ? splat(0.0f) : p * scale;
}

// C (rows x width) = [C +] A (rows x depth) B (depth x width) for kPanelRows x NV vectors of C at once.
template <int Rows, int NV>
inline void panel(int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  bool accumulate) {
  Vec acc[Rows][NV];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const Vec ar = splat(a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int NV>
void column_panel(int64_t rows, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + kPanelRows <= rows; r += kPanelRows)
    panel<kPanelRows, NV>(depth, a + r * lda, lda, b, ldb, c + r * ldc, ldc, accumulate);
  const float* ar = a + r * lda;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 1: panel<1, NV>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 2: panel<2, NV>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 3: panel<3, NV>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 4: panel<4, NV>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 5: panel<5, NV>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    default: break;
  }
}

// C (rows x width) = [C +] A (rows x depth) B (depth x width), all row-major; width % kLanes == 0.
void matmul(int64_t rows, int64_t width, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
            float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kPanelWidth = kPanelVectors * kLanes;
  int64_t j = 0;
  for (; j + kPanelWidth <= width; j += kPanelWidth)
    column_panel<kPanelVectors>(rows, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
  for (; j < width; j += kLanes) column_panel<1>(rows, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
}

// Runs task(index) for index in [0, count) on the caller and up to max_workers - 1 pool threads.
template <typename Task>
void parallel_for(ffi::ThreadPool& pool, int64_t count, int64_t max_workers, const Task& task) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, count, &task] {
    for (int64_t i; (i = progress->next.fetch_add(1)) < count;) {
      task(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A pool thread that starts after every task is taken returns at once, so the caller waits for the
  // tasks, not the threads (``task`` is only touched while one is left).
  const int64_t workers = std::max<int64_t>(1, std::min(count, max_workers));
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

struct Problem {
  int64_t batch, heads, rows, queries, keys, head_dim, value_dim, group;
  bool causal;
  float scale;
  int64_t block_rows, block_keys;
  const int32_t* q_index;   // (batch, queries)
  const int32_t* kv_index;  // (batch, keys)
  const int32_t* kv_valid;  // (batch, keys)
};

// Which rows of a row block may see which keys of a key block.
struct TileMask {
  const Problem& p;
  int64_t b;
  std::vector<int32_t> row_query;  // q_index of each row of the current row block, padded to whole vectors
  int32_t first_query = 0, last_query = 0;

  TileMask(const Problem& problem, int64_t batch_index) : p(problem), b(batch_index) {}

  void set_rows(int64_t r0, int64_t count) {
    row_query.resize(count);
    for (int64_t r = 0; r < count; ++r) row_query[r] = p.q_index[b * p.queries + (r0 + r) / p.group];
    first_query = *std::min_element(row_query.begin(), row_query.end());
    last_query = *std::max_element(row_query.begin(), row_query.end());
  }

  // 0: no row sees any key of [k0, k0 + count); 2: every row sees every key; 1: partly visible.
  int coverage(int64_t k0, int64_t count) const {
    const int32_t* index = p.kv_index + b * p.keys + k0;
    const int32_t* valid = p.kv_valid + b * p.keys + k0;
    bool any = false, all = true;
    int32_t first_key = INT32_MAX, last_key = INT32_MIN;
    for (int64_t k = 0; k < count; ++k) {
      if (!valid[k]) {
        all = false;
        continue;
      }
      any = true;
      first_key = std::min(first_key, index[k]);
      last_key = std::max(last_key, index[k]);
    }
    if (!any || (p.causal && first_key > last_query)) return 0;
    return all && (!p.causal || last_key <= first_query) ? 2 : 1;
  }

  // Scores (count keys x width rows, keys-first) of hidden pairs set to -1e30.
  void hide(float* scores, int64_t k0, int64_t count, int64_t width) const {
    const int32_t* index = p.kv_index + b * p.keys + k0;
    const int32_t* valid = p.kv_valid + b * p.keys + k0;
    for (int64_t k = 0; k < count; ++k) {
      float* row = scores + k * width;
      if (!valid[k]) {
        std::fill(row, row + width, -1e30f);
        continue;
      }
      if (!p.causal) continue;
      const IVec key = IVec{} + index[k];
      for (int64_t r = 0; r < width; r += kLanes) {
        IVec query;
        std::memcpy(&query, row_query.data() + r, sizeof query);
        store(row + r, key <= query ? load(row + r) : splat(-1e30f));
      }
    }
  }
};

// dst (cols x rows) = factor * src (rows x cols, row stride ld)^T, with dst's rows ld_dst apart.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ld_dst,
               float factor = 1.0f) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
      for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * ld_dst + r] = factor * src[r * ld + c];
}

// src (rows x cols) transposed block by block: the block of rows [r0, r0 + w) becomes a contiguous
// (cols x w) matrix at dst + r0 * cols. Transposed whole, a block's rows would lie a multiple of 4 KiB
// apart and evict each other from the L1 cache in the products.
void transpose_blocks(const float* src, int64_t rows, int64_t cols, int64_t block, float* dst,
                      float factor = 1.0f) {
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t w = std::min(block, rows - r0);
    transpose(src + r0 * cols, w, cols, cols, dst + r0 * cols, w, factor);
  }
}

// One row block of the forward pass: out rows [r0, r0 + width) and their log-sum-exp. values_t is the
// head's values transposed by key blocks (transpose_blocks).
void forward_rows(const Problem& p, int64_t b, int64_t h, int64_t r0, const float* q, const float* k,
                  const float* values_t, float* out, float* lse) {
  const int64_t width = std::min(p.block_rows, p.rows - r0);
  const int64_t head = b * p.heads + h;
  const float* keys = k + head * p.keys * p.head_dim;
  std::vector<float> q_cols(p.head_dim * width);  // the block's Q^T, scaled: the products give scaled scores
  transpose(q + (head * p.rows + r0) * p.head_dim, width, p.head_dim, p.head_dim, q_cols.data(), width, p.scale);
  TileMask mask(p, b);
  mask.set_rows(r0, width);
  std::vector<float> scores(p.block_keys * width), acc(p.value_dim * width, 0.0f);
  std::vector<float> row_max(width, -1e20f), denom(width, 0.0f), rescale(width);
  for (int64_t k0 = 0; k0 < p.keys; k0 += p.block_keys) {
    const int64_t count = std::min(p.block_keys, p.keys - k0);
    const int coverage = mask.coverage(k0, count);
    if (coverage == 0) continue;
    matmul(count, width, p.head_dim, keys + k0 * p.head_dim, p.head_dim, q_cols.data(), width, scores.data(), width,
           false);
    if (coverage == 1) mask.hide(scores.data(), k0, count, width);
    for (int64_t r = 0; r < width; r += kLanes) {
      const Vec old_max = load(&row_max[r]);
      Vec new_max = old_max;
      for (int64_t kk = 0; kk < count; ++kk) new_max = vmax(new_max, load(&scores[kk * width + r]));
      Vec sum = Vec{};
      for (int64_t kk = 0; kk < count; ++kk) {
        const Vec prob = vexp(load(&scores[kk * width + r]) - new_max);
        store(&scores[kk * width + r], prob);
        sum += prob;
      }
      const Vec factor = vexp(old_max - new_max);
      store(&rescale[r], factor);
      store(&denom[r], load(&denom[r]) * factor + sum);
      store(&row_max[r], new_max);
    }
    for (int64_t c = 0; c < p.value_dim; ++c)
      for (int64_t r = 0; r < width; r += kLanes)
        store(&acc[c * width + r], load(&acc[c * width + r]) * load(&rescale[r]));
    matmul(p.value_dim, width, count, values_t + k0 * p.value_dim, count, scores.data(), width, acc.data(), width,
           true);
  }
  float* out_rows = out + (head * p.rows + r0) * p.value_dim;
  float* lse_rows = lse + head * p.rows + r0;
  for (int64_t r = 0; r < width; ++r) {
    const bool seen = denom[r] > 0.0f;
    const float inverse = seen ? 1.0f / denom[r] : 0.0f;
    for (int64_t c = 0; c < p.value_dim; ++c) out_rows[r * p.value_dim + c] = acc[c * width + r] * inverse;
    lse_rows[r] = seen ? row_max[r] + std::log(denom[r]) : 0.0f;
  }
}

struct Gradients {
  const float* q;      // (B, H, rows, head_dim)
  const float* k;      // (B, H, keys, head_dim)
  const float* v;      // (B, H, keys, value_dim)
  const float* d_out;  // (B, H, rows, value_dim)
  const float* lse;    // (B, H, rows)
  const float* delta;  // (B, H, rows): rowsum(dO * O)
  float* d_q;          // (B, H, rows, head_dim)
  float* d_k;          // (B, H, keys, head_dim)
  float* d_v;          // (B, H, keys, value_dim)
};

// The backward pass of one (batch, head): every key block against every row block it can see.
void backward_head(const Problem& p, const Gradients& g, int64_t b, int64_t h) {
  const int64_t head = b * p.heads + h;
  const int64_t hd = p.head_dim, vd = p.value_dim;
  const float* q = g.q + head * p.rows * hd;
  const float* k = g.k + head * p.keys * hd;
  const float* v = g.v + head * p.keys * vd;
  const float* d_out = g.d_out + head * p.rows * vd;
  const float* lse = g.lse + head * p.rows;
  const float* delta = g.delta + head * p.rows;
  // Q^T, dO^T and dQ^T by row blocks, K^T by key blocks (transpose_blocks)
  std::vector<float> qt(hd * p.rows), kt(hd * p.keys), d_out_t(vd * p.rows), d_qt(hd * p.rows, 0.0f);
  const int64_t bk = p.block_keys, br = p.block_rows;
  transpose_blocks(q, p.rows, hd, br, qt.data(), p.scale);  // scaled scores from the products
  transpose_blocks(k, p.keys, hd, bk, kt.data());
  transpose_blocks(d_out, p.rows, vd, br, d_out_t.data());
  TileMask mask(p, b);
  std::vector<float> probs(bk * br), d_scores(bk * br);
  for (int64_t k0 = 0; k0 < p.keys; k0 += bk) {
    const int64_t count = std::min(bk, p.keys - k0);
    float* d_k = g.d_k + (head * p.keys + k0) * hd;
    float* d_v = g.d_v + (head * p.keys + k0) * vd;
    std::fill(d_k, d_k + count * hd, 0.0f);
    std::fill(d_v, d_v + count * vd, 0.0f);
    for (int64_t r0 = 0; r0 < p.rows; r0 += br) {
      const int64_t width = std::min(br, p.rows - r0);
      mask.set_rows(r0, width);
      const int coverage = mask.coverage(k0, count);
      if (coverage == 0) continue;
      // P^T = exp(S^T - lse), S^T = K (scale Q)^T
      matmul(count, width, hd, k + k0 * hd, hd, qt.data() + r0 * hd, width, probs.data(), width, false);
      if (coverage == 1) mask.hide(probs.data(), k0, count, width);
      for (int64_t kk = 0; kk < count; ++kk)
        for (int64_t r = 0; r < width; r += kLanes)
          store(&probs[kk * width + r], vexp(load(&probs[kk * width + r]) - load(lse + r0 + r)));
      // dV += P^T dO;  dP^T = V dO^T;  dS^T / scale = P^T (dP^T - delta)
      matmul(count, vd, width, probs.data(), width, d_out + r0 * vd, vd, d_v, vd, true);
      matmul(count, width, vd, v + k0 * vd, vd, d_out_t.data() + r0 * vd, width, d_scores.data(), width, false);
      for (int64_t kk = 0; kk < count; ++kk)
        for (int64_t r = 0; r < width; r += kLanes) {
          const int64_t i = kk * width + r;
          store(&d_scores[i], load(&probs[i]) * (load(&d_scores[i]) - load(delta + r0 + r)));
        }
      // dK / scale += (dS^T / scale) Q;  dQ^T / scale += K^T (dS^T / scale)
      matmul(count, hd, width, d_scores.data(), width, q + r0 * hd, hd, d_k, hd, true);
      matmul(hd, width, count, kt.data() + k0 * hd, count, d_scores.data(), width, d_qt.data() + r0 * hd, width,
             true);
    }
    for (int64_t i = 0; i < count * hd; ++i) d_k[i] *= p.scale;
  }
  for (int64_t r0 = 0; r0 < p.rows; r0 += br) {
    const int64_t width = std::min(br, p.rows - r0);
    transpose(d_qt.data() + r0 * hd, hd, width, width, g.d_q + (head * p.rows + r0) * hd, hd, p.scale);
  }
}

ffi::Error check_problem(const Problem& p) {
  if (p.rows % kAlign || p.head_dim % kAlign || p.value_dim % kAlign || p.block_rows % kAlign)
    return ffi::Error::InvalidArgument("wings flash attention (CPU): rows, head and value widths and the row block "
                                       "must be multiples of 16 (the JAX wrapper pads them)");
  if (p.group <= 0 || p.rows != p.queries * p.group)
    return ffi::Error::InvalidArgument("wings flash attention (CPU): rows must be queries * group");
  return ffi::Error::Success();
}

Problem make_problem(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                     ffi::Buffer<ffi::S32>& q_index, ffi::Buffer<ffi::S32>& kv_index, ffi::Buffer<ffi::S32>& kv_valid,
                     int64_t group, bool causal, float scale, int64_t block_rows, int64_t block_keys) {
  const auto dims = k.dimensions();  // (B, H, keys, head_dim)
  return Problem{dims[0], dims[1], q.dimensions()[2], q_index.dimensions()[1], dims[2], dims[3],
                 v.dimensions()[3], group, causal, scale, block_rows, block_keys, q_index.typed_data(),
                 kv_index.typed_data(), kv_valid.typed_data()};
}

int64_t workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

ffi::Error flash_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_index, ffi::Buffer<ffi::S32> kv_index,
                         ffi::Buffer<ffi::S32> kv_valid, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> lse, int64_t group, bool causal, float scale, int64_t block_rows,
                         int64_t block_keys) {
  const Problem p = make_problem(q, k, v, q_index, kv_index, kv_valid, group, causal, scale, block_rows, block_keys);
  if (auto error = check_problem(p); error.failure()) return error;
  const int64_t heads = p.batch * p.heads, head_values = p.keys * p.value_dim;
  std::vector<float> values_t(heads * head_values);
  parallel_for(pool, heads, workers(pool), [&](int64_t head) {
    transpose_blocks(v.typed_data() + head * head_values, p.keys, p.value_dim, p.block_keys,
                     values_t.data() + head * head_values);
  });
  const int64_t row_blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  parallel_for(pool, heads * row_blocks, workers(pool), [&](int64_t task) {
    const int64_t head = task / row_blocks, r0 = (task % row_blocks) * p.block_rows;
    forward_rows(p, head / p.heads, head % p.heads, r0, q.typed_data(), k.typed_data(),
                 values_t.data() + head * head_values, out->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error flash_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> lse,
                          ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_index, ffi::Buffer<ffi::S32> kv_index,
                          ffi::Buffer<ffi::S32> kv_valid, ffi::ResultBuffer<ffi::F32> d_q,
                          ffi::ResultBuffer<ffi::F32> d_k, ffi::ResultBuffer<ffi::F32> d_v, int64_t group, bool causal,
                          float scale, int64_t block_rows, int64_t block_keys) {
  const Problem p = make_problem(q, k, v, q_index, kv_index, kv_valid, group, causal, scale, block_rows, block_keys);
  if (auto error = check_problem(p); error.failure()) return error;
  const Gradients g{q.typed_data(), k.typed_data(), v.typed_data(), d_out.typed_data(), lse.typed_data(),
                    delta.typed_data(), d_q->typed_data(), d_k->typed_data(), d_v->typed_data()};
  parallel_for(pool, p.batch * p.heads, workers(pool), [&](int64_t head) {
    backward_head(p, g, head / p.heads, head % p.heads);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WingsFlashForward, flash_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (B, H, rows, head_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k (B, H, keys, head_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v (B, H, keys, value_dim)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_index (B, queries)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_index (B, keys)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_valid (B, keys)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out (B, H, rows, value_dim)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse (B, H, rows)
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_keys"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WingsFlashBackward, flash_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out (B, H, rows, value_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse (B, H, rows)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta (B, H, rows)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_valid
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q (B, H, rows, head_dim)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_v
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_keys"));
