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
// Every product is C (+)= A B with row-major B, and A read as stored or transposed. Forward tiles are
// keys-first, (keys, rows), so that the online softmax runs down the columns with whole vectors of
// rows. Backward tiles are rows-first, (rows, keys): the products that need a tile transposed read it
// as it is, and only the key side (K^T, V^T) is transposed, once per head. The kernel makes its
// transposes itself: XLA:CPU fused them into their producers and ran those at a fraction of memory speed.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
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
// The products' output widths must be whole vectors; buffers are padded to multiples of this.
constexpr int kAlign = 16;
// At most this many floats (256 MiB) of per-chunk dQ buffers in the backward pass.
constexpr int64_t kMaxChunkFloats = int64_t{1} << 26;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// x - 0 is x for every float (0 + x is not, for x = -0), so the compiler makes this one broadcast from
// memory; ``Vec{} + x`` cost an add and a register broadcast on the FMA port per use (products 1.5x slower).
inline Vec splat(float x) { return x - Vec{}; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

// sum of a[i] b[i] for i < n, in vector partial sums: a scalar sum waits on each add in turn.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec partial = Vec{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) partial += load(a + i) * load(b + i);
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

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

// C (rows x width) = [C +] A (rows x depth) B (depth x width) for Rows x NV vectors of C at once. A's
// element (r, k) is a[r * lda + k], or a[k * lda + r] when TransA (A stored as its transpose): either
// way it is broadcast from memory, so the transpose costs nothing.
template <int Rows, int NV, bool TransA>
inline void panel(int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  bool accumulate) {
  Vec acc[Rows][NV];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const Vec ar = splat(TransA ? a[k * lda + r] : a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int NV, bool TransA>
void column_panel(int64_t rows, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  const int64_t row_step = TransA ? 1 : lda;  // from one row of A to the next
  int64_t r = 0;
  for (; r + kPanelRows <= rows; r += kPanelRows)
    panel<kPanelRows, NV, TransA>(depth, a + r * row_step, lda, b, ldb, c + r * ldc, ldc, accumulate);
  const float* ar = a + r * row_step;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 1: panel<1, NV, TransA>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 2: panel<2, NV, TransA>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 3: panel<3, NV, TransA>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 4: panel<4, NV, TransA>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    case 5: panel<5, NV, TransA>(depth, ar, lda, b, ldb, cr, ldc, accumulate); break;
    default: break;
  }
}

// C (rows x width) = [C +] A (rows x depth) B (depth x width), row-major, A stored transposed (depth x
// rows) when TransA; width % kLanes == 0.
template <bool TransA = false>
void matmul(int64_t rows, int64_t width, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
            float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kPanelWidth = kPanelVectors * kLanes;
  int64_t j = 0;
  for (; j + kPanelWidth <= width; j += kPanelWidth)
    column_panel<kPanelVectors, TransA>(rows, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
  for (; j < width; j += kLanes) column_panel<1, TransA>(rows, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
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

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// A thread's scratch buffer, kept between calls: allocated afresh, a call's few MB were page faults
// on every step.
struct Scratch {
  std::vector<float> data;
  float* get(size_t n) {
    if (data.size() < n) data.resize(n);
    return data.data();
  }
  float* get(size_t n, float value) { return std::fill_n(get(n), n, value) - n; }
};

// The arrays in the model's layouts: q and out (batch, queries, kv_heads * group, head_dim); k and v
// (batch, keys, kv_heads, head_dim); extra value channels (batch, keys, channels), shared by every head.
// A "head" below is one (batch, key/value head) pair, and its rows are (query, group member) pairs:
// row r is query r / group of query head kv_head * group + r % group.
struct Problem {
  int64_t batch, kv_heads, group, queries, keys, head_dim, channels;
  bool causal;
  float scale;
  int64_t block_rows, block_keys;
  const int32_t* q_index;   // (batch, queries)
  const int32_t* kv_index;  // (batch, keys)
  const int32_t* kv_valid;  // (batch, keys)

  int64_t heads() const { return batch * kv_heads; }
  int64_t key_blocks() const { return (keys + block_keys - 1) / block_keys; }
  int64_t rows() const { return queries * group; }
  int64_t value_dim() const { return head_dim + channels; }
  // Offset of row r of head (b, h) in q, out, d_out or d_q.
  int64_t row_offset(int64_t head, int64_t r) const {
    const int64_t b = head / kv_heads, h = head % kv_heads;
    return ((b * queries + r / group) * kv_heads * group + h * group + r % group) * head_dim;
  }
  // Offset of key j of head (b, h) in k or v, and in the extra channels.
  int64_t key_offset(int64_t head, int64_t j) const {
    const int64_t b = head / kv_heads, h = head % kv_heads;
    return ((b * keys + j) * kv_heads + h) * head_dim;
  }
  int64_t channel_offset(int64_t head, int64_t j) const { return ((head / kv_heads) * keys + j) * channels; }
};

// What the mask says of one key block of one batch row: whether any or all of its keys are valid, and
// the smallest and largest index of its valid keys.
struct KeyBlock {
  bool any = false, all = true;
  int32_t first_key = INT32_MAX, last_key = INT32_MIN;
};

// Every key block of every batch row, (batch, key blocks), summarised once per call rather than at each
// of its tiles.
std::vector<KeyBlock> summarize_key_blocks(const Problem& p) {
  const int64_t blocks = p.key_blocks();
  std::vector<KeyBlock> summary(p.batch * blocks);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < p.keys; ++j) {
      KeyBlock& block = summary[b * blocks + j / p.block_keys];
      if (!p.kv_valid[b * p.keys + j]) {
        block.all = false;
        continue;
      }
      const int32_t index = p.kv_index[b * p.keys + j];
      block.any = true;
      block.first_key = std::min(block.first_key, index);
      block.last_key = std::max(block.last_key, index);
    }
  return summary;
}

// Calls visit(k0, count) for each key block [k0, k0 + count) of head's batch row that holds a valid key:
// no tile reads the others, so their operands need not be prepared.
template <typename Visit>
void for_live_key_blocks(const Problem& p, const std::vector<KeyBlock>& summary, int64_t head, Visit visit) {
  const KeyBlock* blocks = summary.data() + head / p.kv_heads * p.key_blocks();
  for (int64_t k0 = 0; k0 < p.keys; k0 += p.block_keys)
    if (blocks[k0 / p.block_keys].any) visit(k0, std::min(p.block_keys, p.keys - k0));
}

// Which rows of a row block may see which keys of a key block.
struct TileMask {
  const Problem& p;
  int64_t b;
  const KeyBlock* key_blocks;  // this batch row's
  std::vector<int32_t> row_query;  // q_index of each row of the current row block, padded to whole vectors
  int32_t first_query = 0, last_query = 0;

  TileMask(const Problem& problem, const std::vector<KeyBlock>& summary, int64_t head)
      : p(problem), b(head / problem.kv_heads),
        key_blocks(summary.data() + b * problem.key_blocks()) {}

  // Rows [r0, r0 + count); the padding rows up to a whole vector see no key of a causal mask.
  void set_rows(int64_t r0, int64_t count) {
    row_query.assign(round_up(count, kLanes), INT32_MIN);
    for (int64_t r = 0; r < count; ++r) row_query[r] = p.q_index[b * p.queries + (r0 + r) / p.group];
    first_query = *std::min_element(row_query.begin(), row_query.begin() + count);
    last_query = *std::max_element(row_query.begin(), row_query.begin() + count);
  }

  // 0: no row sees any key of the block starting at k0; 2: every row sees every key; 1: partly visible.
  int coverage(int64_t k0) const {
    const KeyBlock& block = key_blocks[k0 / p.block_keys];
    if (!block.any || (p.causal && block.first_key > last_query)) return 0;
    return block.all && (!p.causal || block.last_key <= first_query) ? 2 : 1;
  }

  // Does any row see any key? (Not the textual learner's rows in and before the image.)
  bool sees_any() const {
    for (int64_t k0 = 0; k0 < p.keys; k0 += p.block_keys)
      if (coverage(k0)) return true;
    return false;
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

  // Scores (n rows x width keys, rows-first) of hidden pairs set to -1e30, and of the padding keys from
  // count to width.
  void hide_rows(float* scores, int64_t n, int64_t k0, int64_t count, int64_t width) const {
    thread_local std::vector<int32_t> key_index, key_valid;  // the block's, padded with hidden keys
    key_index.assign(width, INT32_MAX);
    key_valid.assign(width, 0);
    for (int64_t k = 0; k < count; ++k) {
      key_index[k] = p.causal ? p.kv_index[b * p.keys + k0 + k] : INT32_MIN;
      key_valid[k] = p.kv_valid[b * p.keys + k0 + k] ? -1 : 0;
    }
    for (int64_t k = 0; k < width; k += kLanes) {
      IVec index, valid;
      std::memcpy(&index, &key_index[k], sizeof index);
      std::memcpy(&valid, &key_valid[k], sizeof valid);
      for (int64_t r = 0; r < n; ++r) {
        float* score = scores + r * width + k;
        store(score, (valid & (index <= row_query[r])) ? load(score) : splat(-1e30f));
      }
    }
  }
};

// A head's keys-first operand: for each block of rows [r0, r0 + n) of a (rows x cols) matrix whose
// row r starts at row(r), the contiguous (cols x round_up(n, 16)) transpose at dst + r0 * cols, times
// factor, zero in the padding columns. Transposed whole, a block's rows would lie a multiple of 4 KiB
// apart and evict each other from the L1 cache in the products.
template <typename RowStart>
void transpose_blocks(RowStart row, int64_t rows, int64_t cols, int64_t block, float* dst, float factor = 1.0f) {
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t n = std::min(block, rows - r0), width = round_up(n, kLanes);
    float* out = dst + r0 * cols;
    for (int64_t r = 0; r < n; ++r) {
      const float* src = row(r0 + r);
      for (int64_t c = 0; c < cols; ++c) out[c * width + r] = factor * src[c];
    }
    for (int64_t c = 0; c < cols; ++c) std::fill(out + c * width + n, out + (c + 1) * width, 0.0f);
  }
}

// A head's value rows with the extra channels appended (value_dim wide) for keys [begin, end), through
// ``emit(j)(column, x)`` for ``column`` in [0, value_dim) of key j; the columns of a key are emitted in order.
template <typename Emit>
void for_each_value(const Problem& p, const float* v, const float* extra, int64_t head, int64_t begin, int64_t end,
                    Emit emit) {
  for (int64_t j = begin; j < end; ++j) {
    const float* value = v + p.key_offset(head, j);
    const float* channel = extra + p.channel_offset(head, j);
    auto column = emit(j);
    for (int64_t c = 0; c < p.head_dim; ++c) column(c, value[c]);
    for (int64_t c = 0; c < p.channels; ++c) column(p.head_dim + c, channel[c]);
  }
}

struct Inputs {
  const float* q;
  const float* k;
  const float* v;
  const float* extra;
};

// One row block of the forward pass: outputs, the rows' extra channels and log-sum-exp for rows
// [r0, r0 + n). keys holds the head's keys contiguously, values_t its values transposed by key blocks.
void forward_rows(const Problem& p, const std::vector<KeyBlock>& key_blocks, const Inputs& in, int64_t head,
                  int64_t r0, const float* keys, const float* values_t, float* out, float* routed, float* lse) {
  const int64_t n = std::min(p.block_rows, p.rows() - r0), width = round_up(n, kLanes);
  const int64_t hd = p.head_dim, vd = p.value_dim();
  thread_local Scratch q_cols_buffer, scores_buffer, acc_buffer, rows_buffer;
  TileMask mask(p, key_blocks, head);
  mask.set_rows(r0, n);
  float* acc = acc_buffer.get(vd * width, 0.0f);
  float* row_max = rows_buffer.get(3 * width, -1e20f);  // the rows' running maximum, denominator, rescale
  float* denom = std::fill_n(row_max + width, width, 0.0f) - width;
  float* rescale = denom + width;
  float* scores = scores_buffer.get(p.block_keys * width);
  float* q_cols = q_cols_buffer.get(hd * width);  // the block's Q^T, scaled: the products give scaled scores
  if (mask.sees_any())  // else the rows keep their zeros
    transpose_blocks([&](int64_t r) { return in.q + p.row_offset(head, r0 + r); }, n, hd, width, q_cols, p.scale);
  for (int64_t k0 = 0; k0 < p.keys; k0 += p.block_keys) {
    const int64_t count = std::min(p.block_keys, p.keys - k0);
    const int coverage = mask.coverage(k0);
    if (coverage == 0) continue;
    matmul(count, width, hd, keys + k0 * hd, hd, q_cols, width, scores, width, false);
    if (coverage == 1) mask.hide(scores, k0, count, width);
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
    for (int64_t c = 0; c < vd; ++c)
      for (int64_t r = 0; r < width; r += kLanes)
        store(&acc[c * width + r], load(&acc[c * width + r]) * load(&rescale[r]));
    matmul(vd, width, count, values_t + k0 * vd, count, scores, width, acc, width, true);
  }
  for (int64_t r = 0; r < n; ++r) {
    const bool seen = denom[r] > 0.0f;
    const float inverse = seen ? 1.0f / denom[r] : 0.0f;
    float* out_row = out + p.row_offset(head, r0 + r);
    for (int64_t c = 0; c < hd; ++c) out_row[c] = acc[c * width + r] * inverse;
    float* routed_row = routed + (head * p.rows() + r0 + r) * p.channels;
    for (int64_t c = 0; c < p.channels; ++c) routed_row[c] = acc[(hd + c) * width + r] * inverse;
    lse[head * p.rows() + r0 + r] = seen ? row_max[r] + std::log(denom[r]) : 0.0f;
  }
}

struct Cotangents {
  const float* out;       // (B, Lq, H, head_dim)
  const float* routed;    // (B, KV, rows, channels): each head's weighted channel sums
  const float* lse;       // (B, KV, rows)
  const float* d_out;     // like out
  const float* d_routed;  // like routed
  float* d_q;             // like q
  float* d_k;             // like k
  float* d_v;             // like v
  float* d_extra;         // (B, KV, keys, channels): each head's share
};

// The sizes of one head's backward operands; widths that a product reads as B padded to whole vectors.
struct BackwardShape {
  int64_t hd, vd, rows, keys, hd_pad, vd_pad, keys_pad;
  explicit BackwardShape(const Problem& p)
      : hd(p.head_dim), vd(p.value_dim()), rows(p.rows()), keys(p.keys), hd_pad(round_up(hd, kLanes)),
        vd_pad(round_up(vd, kLanes)), keys_pad(round_up(keys, kLanes)) {}
  int64_t floats() const { return rows * (hd_pad + vd_pad + 2) + keys_pad * (hd + vd + hd_pad); }
};

// One head's operands of the backward pass, made once and shared by the tasks of its key blocks. Row
// side, row-major: Q (hd_pad wide), dO with the channels' cotangents (vd_pad wide), each row's lse and
// delta. Key side: K^T and (V with the channels)^T by key blocks (transpose_blocks), and K (hd_pad wide).
// Tiles are rows-first and the products read a transposed tile as it is (matmul<true>), so nothing on
// the row side is ever transposed: dQ comes out in rows.
struct HeadOperands {
  float *q_rows, *d_out, *lse, *delta, *kt, *vt, *k_rows;
  const std::vector<KeyBlock>& key_blocks;
  std::vector<TileMask> row_masks;  // one per row block

  HeadOperands(const Problem& p, const std::vector<KeyBlock>& summary, const BackwardShape& s, float* base,
               int64_t head)
      : key_blocks(summary) {
    q_rows = base;
    d_out = q_rows + s.rows * s.hd_pad;
    lse = d_out + s.rows * s.vd_pad;
    delta = lse + s.rows;
    kt = delta + s.rows;
    vt = kt + s.hd * s.keys_pad;
    k_rows = vt + s.vd * s.keys_pad;
    for (int64_t r0 = 0; r0 < s.rows; r0 += p.block_rows) {
      row_masks.emplace_back(p, key_blocks, head);
      row_masks.back().set_rows(r0, std::min(p.block_rows, s.rows - r0));
    }
  }
};

void prepare_head(const Problem& p, const BackwardShape& s, const Inputs& in, const Cotangents& g, int64_t head,
                  const HeadOperands& ops) {
  for (int64_t r = 0; r < s.rows; ++r) {
    if (r % p.block_rows == 0 && !ops.row_masks[r / p.block_rows].sees_any()) {  // no tile reads these rows
      r += std::min(p.block_rows, s.rows - r) - 1;
      continue;
    }
    const float* q_row = in.q + p.row_offset(head, r);
    const float* d_row = g.d_out + p.row_offset(head, r);
    const float* out_row = g.out + p.row_offset(head, r);
    const float* d_routed = g.d_routed + (head * s.rows + r) * p.channels;
    const float* routed = g.routed + (head * s.rows + r) * p.channels;
    float* q_copy = &ops.q_rows[r * s.hd_pad];
    float* d_copy = &ops.d_out[r * s.vd_pad];
    std::fill(std::copy_n(q_row, s.hd, q_copy), q_copy + s.hd_pad, 0.0f);
    std::fill(std::copy_n(d_routed, p.channels, std::copy_n(d_row, s.hd, d_copy)), d_copy + s.vd_pad, 0.0f);
    // softmax backward: delta = rowsum(dO * O), channels included
    ops.delta[r] = dot(d_row, out_row, s.hd) + dot(d_routed, routed, p.channels);
    ops.lse[r] = g.lse[head * s.rows + r];
  }
  auto key = [&](int64_t j) { return in.k + p.key_offset(head, j); };
  std::fill_n(ops.k_rows, s.keys_pad * s.hd_pad, 0.0f);
  for_live_key_blocks(p, ops.key_blocks, head, [&](int64_t k0, int64_t count) {
    const int64_t width = round_up(count, kLanes);
    transpose_blocks([&](int64_t j) { return key(k0 + j); }, count, s.hd, p.block_keys, ops.kt + k0 * s.hd);
    float* block = ops.vt + k0 * s.vd;
    for (int64_t c = 0; c < s.vd; ++c)  // padding keys: zero, not uninitialised (0 * NaN)
      std::fill(block + c * width + count, block + (c + 1) * width, 0.0f);
    for_each_value(p, in.v, in.extra, head, k0, k0 + count, [&](int64_t j) {
      return [column = block + (j - k0), width](int64_t c, float x) { column[c * width] = x; };
    });
    for (int64_t j = k0; j < k0 + count; ++j) std::copy_n(key(j), s.hd, &ops.k_rows[j * s.hd_pad]);
  });
}

// The key blocks [k_begin, k_end) of one head against every row block they can see: their dK and dV,
// and their part of dQ / scale added into d_q (rows x hd_pad).
void backward_keys(const Problem& p, const BackwardShape& s, const Cotangents& g, const HeadOperands& ops,
                   int64_t head, int64_t k_begin, int64_t k_end, float* d_q) {
  const int64_t hd = s.hd, vd = s.vd, hd_pad = s.hd_pad, vd_pad = s.vd_pad, channels = p.channels;
  const int64_t bk = p.block_keys, br = p.block_rows;
  const Vec scale = splat(p.scale);
  thread_local Scratch probs_buffer, d_scores_buffer, d_k_buffer, d_v_buffer, d_channels_buffer;
  float* probs = probs_buffer.get(br * round_up(bk, kLanes));
  float* d_scores = d_scores_buffer.get(br * round_up(bk, kLanes));
  for (int64_t k0 = k_begin; k0 < k_end; k0 += bk) {
    const int64_t count = std::min(bk, p.keys - k0), width = round_up(count, kLanes);
    float* d_k = d_k_buffer.get(count * hd_pad, 0.0f);
    float* d_v = d_v_buffer.get(count * hd_pad, 0.0f);
    float* d_channels = d_channels_buffer.get(channels * width, 0.0f);  // (channels x keys)
    const float* kt = ops.kt + k0 * hd;
    const float* vt = ops.vt + k0 * vd;
    for (int64_t r0 = 0; r0 < s.rows; r0 += br) {
      const int64_t n = std::min(br, s.rows - r0);
      const TileMask& mask = ops.row_masks[r0 / br];
      const int coverage = mask.coverage(k0);
      if (coverage == 0) continue;
      const float* q_rows = &ops.q_rows[r0 * hd_pad];
      const float* d_out = &ops.d_out[r0 * vd_pad];
      // P = exp(scale Q K^T - lse)
      matmul(n, width, hd, q_rows, hd_pad, kt, width, probs, width, false);
      if (coverage == 1 || count < width) mask.hide_rows(probs, n, k0, count, width);
      for (int64_t r = 0; r < n; ++r) {
        const Vec lse = splat(ops.lse[r0 + r]);
        float* row = &probs[r * width];
        for (int64_t k = 0; k < width; k += kLanes) store(row + k, vexp(scale * load(row + k) - lse));
      }
      // dV += P^T dO, the channels' part of it as a few vector sums (in the product they were a whole
      // vector of columns: 16 for 2 channels)
      matmul<true>(count, hd_pad, n, probs, width, d_out, vd_pad, d_v, hd_pad, true);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < channels; ++c) {
          const Vec d_channel = splat(d_out[r * vd_pad + hd + c]);
          float* sums = &d_channels[c * width];
          for (int64_t k = 0; k < width; k += kLanes)
            store(sums + k, load(sums + k) + load(&probs[r * width + k]) * d_channel);
        }
      // dS / scale = P (dO V^T - delta)
      matmul(n, width, vd, d_out, vd_pad, vt, width, d_scores, width, false);
      for (int64_t r = 0; r < n; ++r) {
        const Vec delta = splat(ops.delta[r0 + r]);
        for (int64_t k = 0; k < width; k += kLanes) {
          const int64_t i = r * width + k;
          store(&d_scores[i], load(&probs[i]) * (load(&d_scores[i]) - delta));
        }
      }
      // dK / scale += dS^T Q;  dQ / scale += dS K
      matmul<true>(count, hd_pad, n, d_scores, width, q_rows, hd_pad, d_k, hd_pad, true);
      matmul(n, hd_pad, width, d_scores, width, ops.k_rows + k0 * hd_pad, hd_pad, d_q + r0 * hd_pad, hd_pad, true);
    }
    for (int64_t kk = 0; kk < count; ++kk) {
      float* d_key = g.d_k + p.key_offset(head, k0 + kk);
      float* d_value = g.d_v + p.key_offset(head, k0 + kk);
      float* d_channel = g.d_extra + (head * p.keys + k0 + kk) * channels;
      for (int64_t c = 0; c < hd; ++c) d_key[c] = p.scale * d_k[kk * hd_pad + c];
      std::copy_n(&d_v[kk * hd_pad], hd, d_value);
      for (int64_t c = 0; c < channels; ++c) d_channel[c] = d_channels[c * width + kk];
    }
  }
}

// dQ of one head: scale times the sum of the chunks' dQ / scale, in the model's layout.
void finish_head(const Problem& p, const BackwardShape& s, const Cotangents& g, int64_t head, const float* d_q_chunks,
                 int64_t chunks, int64_t chunk_stride) {
  for (int64_t r = 0; r < s.rows; ++r) {
    float* d_row = g.d_q + p.row_offset(head, r);
    for (int64_t c = 0; c < s.hd; ++c) {
      float sum = 0.0f;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += d_q_chunks[chunk * chunk_stride + r * s.hd_pad + c];
      d_row[c] = p.scale * sum;
    }
  }
}

// The forward pass of every head: out, each head's weighted channel sums and its rows' log-sum-exp.
// ``parallel(count, task)`` runs task(i) for i in [0, count) on the available threads.
template <typename Parallel>
void forward(const Problem& p, const Inputs& in, float* out, float* routed, float* lse, Parallel parallel) {
  const int64_t head_keys = p.keys * p.head_dim, head_values = p.keys * p.value_dim();
  thread_local Scratch keys_buffer, values_buffer;
  float* keys = keys_buffer.get(p.heads() * head_keys);  // each head's keys, contiguous
  float* values_t = values_buffer.get(p.heads() * head_values);  // each head's values transposed by key blocks
  const std::vector<KeyBlock> key_blocks = summarize_key_blocks(p);
  parallel(p.heads(), [&](int64_t head) {
    for_live_key_blocks(p, key_blocks, head, [&](int64_t k0, int64_t count) {
      for (int64_t j = k0; j < k0 + count; ++j)
        std::copy_n(in.k + p.key_offset(head, j), p.head_dim, keys + head * head_keys + j * p.head_dim);
      float* block = values_t + head * head_values + k0 * p.value_dim();
      for_each_value(p, in.v, in.extra, head, k0, k0 + count, [&](int64_t j) {
        return [column = block + (j - k0), count](int64_t c, float x) { column[c * count] = x; };
      });
    });
  });
  const int64_t row_blocks = (p.rows() + p.block_rows - 1) / p.block_rows;
  // the last row blocks first: under a causal mask they see the most keys, and a long task left for
  // the end would leave the other threads idle
  parallel(p.heads() * row_blocks, [&](int64_t task) {
    const int64_t head = task % p.heads(), row_block = row_blocks - 1 - task / p.heads();
    forward_rows(p, key_blocks, in, head, row_block * p.block_rows, keys + head * head_keys,
                 values_t + head * head_values, out, routed, lse);
  });
}

// The backward pass of every head. Tasks are (head, chunk of its key blocks). With fewer than two heads
// per thread, each head is split so that no thread idles, and each chunk adds its part of dQ into a
// buffer of its own, summed at the end (on bench_small's 2 cores, splitting 4 heads in 2 was 8 % slower:
// it is a fallback). With enough heads a task is a whole head, prepared right before its tiles (still in
// cache).
template <typename Parallel>
void backward(const Problem& p, const Inputs& in, const Cotangents& g, int64_t threads, Parallel parallel) {
  const BackwardShape shape(p);
  const int64_t heads = p.heads(), key_blocks = p.key_blocks();
  const int64_t head_dq = shape.rows * shape.hd_pad;
  int64_t chunks = std::clamp<int64_t>((2 * threads + heads - 1) / heads, 1, key_blocks);
  chunks = std::min(chunks, std::max<int64_t>(1, kMaxChunkFloats / (heads * head_dq)));
  thread_local Scratch operands_buffer, d_q_buffer;
  float* operands = operands_buffer.get(heads * shape.floats());
  float* d_q = d_q_buffer.get(chunks * heads * head_dq);
  std::vector<HeadOperands> ops;
  const std::vector<KeyBlock> summary = summarize_key_blocks(p);
  for (int64_t head = 0; head < heads; ++head)
    ops.emplace_back(p, summary, shape, operands + head * shape.floats(), head);
  auto prepare = [&](int64_t head) {
    prepare_head(p, shape, in, g, head, ops[head]);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) std::fill_n(d_q + (chunk * heads + head) * head_dq, head_dq, 0.0f);
  };
  auto finish = [&](int64_t head) { finish_head(p, shape, g, head, d_q + head * head_dq, chunks, heads * head_dq); };
  if (chunks == 1) {
    parallel(heads, [&](int64_t head) {
      prepare(head);
      backward_keys(p, shape, g, ops[head], head, 0, p.keys, d_q + head * head_dq);
      finish(head);
    });
    return;
  }
  parallel(heads, prepare);
  parallel(heads * chunks, [&](int64_t task) {
    const int64_t head = task / chunks, chunk = task % chunks;
    const int64_t k_begin = chunk * key_blocks / chunks * p.block_keys;
    const int64_t k_end = std::min(p.keys, (chunk + 1) * key_blocks / chunks * p.block_keys);
    backward_keys(p, shape, g, ops[head], head, k_begin, k_end, d_q + (chunk * heads + head) * head_dq);
  });
  parallel(heads, finish);
}

Problem make_problem(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& extra,
                     ffi::Buffer<ffi::S32>& q_index, ffi::Buffer<ffi::S32>& kv_index, ffi::Buffer<ffi::S32>& kv_valid,
                     int64_t group, bool causal, float scale, int64_t block_rows, int64_t block_keys) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions();  // (B, Lq, H, hd), (B, Lk, KV, hd)
  return Problem{q_dims[0], k_dims[2], group, q_dims[1], k_dims[1], q_dims[3], extra.dimensions()[2], causal, scale,
                 block_rows, block_keys, q_index.typed_data(), kv_index.typed_data(), kv_valid.typed_data()};
}

ffi::Error check_problem(const Problem& p) {
  if (p.block_rows % kAlign || p.block_keys % kAlign)
    return ffi::Error::InvalidArgument("wings flash attention (CPU): row and key blocks must be multiples of 16");
  return ffi::Error::Success();
}

int64_t workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

ffi::Error flash_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> extra, ffi::Buffer<ffi::S32> q_index,
                         ffi::Buffer<ffi::S32> kv_index, ffi::Buffer<ffi::S32> kv_valid,
                         ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> routed,
                         ffi::ResultBuffer<ffi::F32> lse, int64_t group, bool causal, float scale, int64_t block_rows,
                         int64_t block_keys) {
  const Problem p = make_problem(q, k, extra, q_index, kv_index, kv_valid, group, causal, scale, block_rows,
                                 block_keys);
  if (auto error = check_problem(p); error.failure()) return error;
  const Inputs in{q.typed_data(), k.typed_data(), v.typed_data(), extra.typed_data()};
  forward(p, in, out->typed_data(), routed->typed_data(), lse->typed_data(),
          [&](int64_t count, const auto& task) { parallel_for(pool, count, workers(pool), task); });
  return ffi::Error::Success();
}

ffi::Error flash_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> extra, ffi::Buffer<ffi::S32> q_index,
                          ffi::Buffer<ffi::S32> kv_index, ffi::Buffer<ffi::S32> kv_valid, ffi::Buffer<ffi::F32> out,
                          ffi::Buffer<ffi::F32> routed, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                          ffi::Buffer<ffi::F32> d_routed, ffi::ResultBuffer<ffi::F32> d_q,
                          ffi::ResultBuffer<ffi::F32> d_k, ffi::ResultBuffer<ffi::F32> d_v,
                          ffi::ResultBuffer<ffi::F32> d_extra, int64_t group, bool causal, float scale,
                          int64_t block_rows, int64_t block_keys) {
  const Problem p = make_problem(q, k, extra, q_index, kv_index, kv_valid, group, causal, scale, block_rows,
                                 block_keys);
  if (auto error = check_problem(p); error.failure()) return error;
  const Inputs in{q.typed_data(), k.typed_data(), v.typed_data(), extra.typed_data()};
  const Cotangents g{out.typed_data(),    routed.typed_data(), lse.typed_data(),   d_out.typed_data(),
                     d_routed.typed_data(), d_q->typed_data(), d_k->typed_data(), d_v->typed_data(),
                     d_extra->typed_data()};
  backward(p, in, g, workers(pool),
           [&](int64_t count, const auto& task) { parallel_for(pool, count, workers(pool), task); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WingsFlashForward, flash_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (B, Lq, H, head_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k (B, Lk, KV, head_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v (B, Lk, KV, head_dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // extra value channels (B, Lk, C)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_index (B, Lq)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_index (B, Lk)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_valid (B, Lk)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out (B, Lq, H, head_dim)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // routed (B, KV, Lq * G, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse (B, KV, Lq * G)
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // extra
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_valid
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // routed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_routed
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_extra (B, KV, Lk, C): per head
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_keys"));
