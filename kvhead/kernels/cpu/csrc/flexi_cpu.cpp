// FlexiCache decode step of one layer on the CPU, in one call per job instead of dozens of torch
// ops: page scoring from int8 boxes, top-K, sparse attention over vLLM-layout caches (keys
// transposed [D][P], then values [P][D], per block and head), cache writes and the page-bound
// update of decode tokens. The Python side (kvhead/vllm_plugin/native.py) owns the rules that
// change rarely (reranks of stable heads, hot-pool promotion); these loops run every step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

constexpr float kMasked = -1.0e30f;  // finite "minus infinity" (built with -ffast-math)
constexpr double kQmax = 127.0;
constexpr double kScalePad = 1.0 + 1.0 / 1048576.0;  // bounds_compact._SCALE_PAD

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }

template <typename T> inline T from_float(float x) { return static_cast<T>(x); }

// Geometry shared by every call of one layer.
struct Shape {
  int64_t batch, kv_heads, group, dim, page, width;
};

// The `budget` best of n scored pages, the first `sink` and the last `recent` always among them
// (they count inside the budget; the spec keeps just the newest: sink 0, recent 1); ascending
// ids into `out` (`slots` entries, -1 padded). Returns how many ids were written.
int64_t top_pages(const float* scores, int64_t n, int64_t budget, int64_t sink, int64_t recent,
                  std::vector<int32_t>& order, int64_t* out, int64_t slots) {
  const int64_t first = std::min(sink, n), last = std::max(n - recent, first);
  int64_t taken = 0;
  for (int64_t p = 0; p < first; ++p) out[taken++] = p;
  for (int64_t p = last; p < n; ++p) out[taken++] = p;
  const int64_t room = std::min(std::max<int64_t>(budget - taken, 0), last - first);
  if (room > 0) {
    order.resize(last - first);
    std::iota(order.begin(), order.end(), static_cast<int32_t>(first));
    auto better = [scores](int32_t a, int32_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    };
    std::nth_element(order.begin(), order.begin() + (room - 1), order.end(), better);
    for (int64_t i = 0; i < room; ++i) out[taken++] = order[i];
  }
  std::sort(out, out + taken);
  for (int64_t i = taken; i < slots; ++i) out[i] = -1;
  return taken;
}

// Online-softmax attention of `group` query rows over a list of pages of one head.
// `page_ptr(i)` gives page i's block base (keys [D][P] then values [P][D]); `page_len(i)` its
// written tokens. `lse` (group floats) receives each row's log-sum-exp of its logits.
template <typename T, typename PagePtr, typename PageLen>
void attend(const float* q, int64_t group, int64_t dim, int64_t page, int64_t count,
            PagePtr page_ptr, PageLen page_len, float* acc, float* kbuf, float* vbuf,
            float* sbuf, float* lse) {
  std::vector<float> m(group, kMasked), l(group, 0.f);
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t i = 0; i < count; ++i) {
    const T* base = page_ptr(i);
    const int64_t len = page_len(i);
#pragma omp simd
    for (int64_t e = 0; e < dim * page; ++e) kbuf[e] = to_float(base[e]);
#pragma omp simd
    for (int64_t e = 0; e < len * dim; ++e) vbuf[e] = to_float(base[dim * page + e]);
    for (int64_t g = 0; g < group; ++g) {
      float* s = sbuf;
      const float* qg = q + g * dim;
      for (int64_t t = 0; t < page; ++t) s[t] = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float qd = qg[d];
        const float* kd = kbuf + d * page;
#pragma omp simd
        for (int64_t t = 0; t < page; ++t) s[t] += qd * kd[t];
      }
      float mx = m[g];
      for (int64_t t = 0; t < len; ++t) mx = s[t] > mx ? s[t] : mx;
      const float corr = std::exp(m[g] - mx);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < len; ++t) {
        s[t] = std::exp(s[t] - mx);
        sum += s[t];
      }
      float* ag = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ag[d] *= corr;
      for (int64_t t = 0; t < len; ++t) {
        const float w = s[t];
        const float* vt = vbuf + t * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) ag[d] += w * vt[d];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mx;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] *= inv;
    lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : kMasked;
  }
}

template <typename T>
void load_query(const T* src, int64_t rows, int64_t dim, float mul, float* dst) {
  for (int64_t e = 0; e < rows * dim; ++e) dst[e] = to_float(src[e]) * mul;
}

void check_int(const torch::Tensor& t, c10::ScalarType type, const char* name) {
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous(), "kvhead native: ", name,
              " must be a contiguous ", c10::toString(type), " tensor");
}

void check_means(const torch::Tensor& means, const torch::Tensor& cache, int64_t num_stable,
                 int64_t dim) {
  TORCH_CHECK(means.scalar_type() == cache.scalar_type() && means.is_contiguous() &&
                  means.dim() == 3 && means.size(1) == num_stable && means.size(2) == dim,
              "kvhead native: value means must be contiguous [blocks, stable heads, D] in the "
              "caches' dtype");
}

#if defined(__AVX512F__)
// AVX-512 path for 16-token pages: one zmm holds a page's 16 scores of one query row (keys are
// stored transposed, [D][16]), and G x D/16 accumulators stay in registers across pages.
// Lanes 0..n-1 of a 16-lane register (all 16 from n >= 16).
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial, 2^n by scalef).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

template <typename T, int G, int C, typename PagePtr, typename PageLen>
void attend16(const float* q, int64_t count, PagePtr page_ptr, PageLen page_len, float* out,
              float* lse) {
  constexpr int D = 16 * C;
  __m512 acc[G][C];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    m[g] = kMasked;
    l[g] = 0.f;
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  }
  alignas(64) float w[G][16];
  for (int64_t i = 0; i < count; ++i) {
    const T* base = page_ptr(i);
    const int64_t len = page_len(i);
    const __mmask16 valid = lanes(len);
    __m512 s[G];
    for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m512 kd = load16(base + d * 16);
      for (int g = 0; g < G; ++g) s[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + d]), kd, s[g]);
    }
    for (int g = 0; g < G; ++g) {
      const __m512 sg = _mm512_mask_mov_ps(_mm512_set1_ps(kMasked), valid, s[g]);
      const float mx = std::max(m[g], _mm512_reduce_max_ps(sg));
      const float corr = std::exp(m[g] - mx);
      const __m512 pg = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sg, _mm512_set1_ps(mx))));
      l[g] = l[g] * corr + _mm512_reduce_add_ps(pg);
      m[g] = mx;
      _mm512_store_ps(w[g], pg);
      const __m512 cv = _mm512_set1_ps(corr);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], cv);
    }
    const T* values = base + 16 * D;
    for (int64_t t = 0; t < len; ++t) {
      for (int c = 0; c < C; ++c) {
        const __m512 v = load16(values + t * D + c * 16);
        for (int g = 0; g < G; ++g)
          acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[g][t]), v, acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], inv));
    lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : kMasked;
  }
}

// Quest bounds of n pages from int8 rows (qmax then qmin, D each): relu(q).hi + min(q,0).lo.
template <int G, int C>
void score16(const float* q, const int8_t* box_rows, const float* scale_row, const int32_t* table,
             int64_t n, float* scores) {
  constexpr int D = 16 * C;
  __m512 qp[G][C], qn[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      const __m512 v = _mm512_loadu_ps(q + g * D + c * 16);
      qp[g][c] = _mm512_max_ps(v, _mm512_setzero_ps());
      qn[g][c] = _mm512_min_ps(v, _mm512_setzero_ps());
    }
  for (int64_t p = 0; p < n; ++p) {
    const int8_t* row = box_rows + static_cast<int64_t>(table[p]) * 2 * D;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) {
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16))));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + D + c * 16))));
      for (int g = 0; g < G; ++g)
        acc[g] = _mm512_fmadd_ps(qp[g][c], hi, _mm512_fmadd_ps(qn[g][c], lo, acc[g]));
    }
    float best = kMasked;
    for (int g = 0; g < G; ++g) best = std::max(best, _mm512_reduce_add_ps(acc[g]));
    scores[p] = best * scale_row[table[p]];
  }
}
#endif

// The (group, D/16) shapes with a specialised AVX-512 path; others run the portable loops.
#define KVHEAD_SHAPES(X) X(1, 4) X(2, 2) X(2, 4) X(3, 4) X(4, 4) X(4, 8) X(8, 8) X(2, 8) X(1, 8)

template <typename T, typename PagePtr, typename PageLen>
void attend_any(const float* q, int64_t group, int64_t dim, int64_t page, int64_t count,
                PagePtr page_ptr, PageLen page_len, float* acc, float* kbuf, float* vbuf,
                float* sbuf, float* lse) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
   if (page == 16) {
#define KVHEAD_ATTEND(G, C)                                              \
    if (group == G && dim == 16 * C) {                                   \
      attend16<T, G, C>(q, count, page_ptr, page_len, acc, lse);         \
      return;                                                            \
    }
    KVHEAD_SHAPES(KVHEAD_ATTEND)
#undef KVHEAD_ATTEND
   }
  }
#endif
  attend<T>(q, group, dim, page, count, page_ptr, page_len, acc, kbuf, vbuf, sbuf, lse);
}

// Summary tokens (kvhead.summaries): every page 0..n-1 not among a stable head's attended
// pages enters its attention as one token whose key is the page's int8 box centre and value its
// mean value (kept in the cache's dtype by write_tokens), with log(tokens) added to its logit;
// the result is folded into the attention's normalised rows and LSE. Three passes over the
// skipped pages (logits, one vectorised exp per query row, values), so each box and each mean
// is read once for the whole group and no running rescale touches the accumulators.

// The pages 0..n-1 not among the ascending ids[0..count), into `spage`; returns how many.
int64_t skipped_pages(int64_t n, const int64_t* ids, int64_t count, int64_t* spage) {
  int64_t skipped = 0, next = 0;  // `next` walks the attended list alongside p
  for (int64_t p = 0; p < n; ++p) {
    if (next < count && ids[next] == p) {
      ++next;
      continue;
    }
    spage[skipped++] = p;
  }
  return skipped;
}

// Log-sum-exp merge of the summary attention into `acc` / `lse`: row g's summary weights are
// relative to e^top[g] and sum to sum[g]; sacc holds their unnormalised weighted values.
void merge_summaries(int64_t group, int64_t dim, const float* top, const float* sum,
                     const float* sacc, float* acc, float* lse) {
  for (int64_t g = 0; g < group; ++g) {
    const float extra = top[g] + std::log(sum[g]);
    const float both = std::max(lse[g], extra);
    const float a = std::exp(lse[g] - both), b = std::exp(extra - both);
    const float inv = 1.f / (a + b), bs = b / sum[g];
    float* ag = acc + g * dim;
    const float* sg = sacc + g * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) ag[d] = (ag[d] * a + sg[d] * bs) * inv;
    lse[g] = both + std::log(a + b);
  }
}

// log(tokens) of skipped page p: skipped pages are full but for a finished request's partial
// page, so the log is a constant almost always (a log per page was a fifth of the fold's time).
template <typename PageLen>
inline float log_tokens(PageLen page_len, int64_t p, float full, float log_full) {
  const float tokens = static_cast<float>(page_len(p));
  return tokens == full ? log_full : std::log(tokens);
}

// Portable passes over `skipped` pages spage[..]; `q` is already scaled by the softmax scale.
template <typename T, typename PageLen, typename ValueMean>
void fold_summaries(const float* q, int64_t group, int64_t dim, const int8_t* box_rows,
                    const float* scale_row, const int32_t* table, const int64_t* spage,
                    int64_t skipped, PageLen page_len, ValueMean vmean, float* acc, float* lse,
                    float* centre, float* sacc, float* slog) {
  const float full = static_cast<float>(page_len(0) > 0 ? page_len(0) : 1);
  const float log_full = std::log(full);
  // pass 1: logits as [group][skipped] rows
  for (int64_t i = 0; i < skipped; ++i) {
    const int64_t p = spage[i];
    const int8_t* row = box_rows + static_cast<int64_t>(table[p]) * 2 * dim;
    const float half = 0.5f * scale_row[table[p]];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d)
      centre[d] = (static_cast<float>(row[d]) + static_cast<float>(row[dim + d])) * half;
    const float extra = log_tokens(page_len, p, full, log_full);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * centre[d];
      slog[g * skipped + i] = dot + extra;
    }
  }
  // pass 2: per query row, weights relative to the row's largest logit
  std::vector<float> top(group, kMasked), sum(group, 0.f);
  for (int64_t g = 0; g < group; ++g) {
    float* w = slog + g * skipped;
    for (int64_t i = 0; i < skipped; ++i) top[g] = std::max(top[g], w[i]);
    const float mx = top[g];
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < skipped; ++i) {
      w[i] = std::exp(w[i] - mx);
      total += w[i];
    }
    sum[g] = total;
  }
  // pass 3: weighted mean values, each page's mean read once for the whole group
  std::fill(sacc, sacc + group * dim, 0.f);
  for (int64_t i = 0; i < skipped; ++i) {
    const T* v = vmean(spage[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float wv = slog[g * skipped + i];
      float* sg = sacc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) sg[d] += wv * to_float(v[d]);
    }
  }
  merge_summaries(group, dim, top.data(), sum.data(), sacc, acc, lse);
}

#if defined(__AVX512F__)
// The same three passes for G query rows of D = 16 C: the query rows and the G x C value
// accumulators live in registers, a box centre is summed in int32 and converted once, and the
// next pages' boxes and means are prefetched (they sit at random blocks of a large table).
template <typename T, int G, int C, typename PageLen, typename ValueMean>
void fold16(const float* q, const int8_t* box_rows, const float* scale_row, const int32_t* table,
            const int64_t* spage, int64_t skipped, PageLen page_len, ValueMean vmean, float* acc,
            float* lse, float* sacc, float* slog) {
  constexpr int D = 16 * C;
  constexpr int64_t kAhead = 8;
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * D + c * 16);
  const float full = static_cast<float>(page_len(0) > 0 ? page_len(0) : 1);
  const float log_full = std::log(full);
  for (int64_t i = 0; i < skipped; ++i) {
    if (i + kAhead < skipped) {
      const int8_t* ahead = box_rows + static_cast<int64_t>(table[spage[i + kAhead]]) * 2 * D;
      for (int off = 0; off < 2 * D; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    }
    const int64_t p = spage[i];
    const int8_t* row = box_rows + static_cast<int64_t>(table[p]) * 2 * D;
    __m512 centre[C];
    for (int c = 0; c < C; ++c) {
      const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
      const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + D + c * 16)));
      centre[c] = _mm512_cvtepi32_ps(_mm512_add_epi32(hi, lo));
    }
    const float half = 0.5f * scale_row[table[p]];
    const float extra = log_tokens(page_len, p, full, log_full);
    for (int g = 0; g < G; ++g) {
      __m512 dot = _mm512_mul_ps(qv[g][0], centre[0]);
      for (int c = 1; c < C; ++c) dot = _mm512_fmadd_ps(qv[g][c], centre[c], dot);
      slog[g * skipped + i] = _mm512_reduce_add_ps(dot) * half + extra;
    }
  }
  float top[G], sum[G];
  for (int g = 0; g < G; ++g) {
    float* w = slog + g * skipped;
    __m512 mx = _mm512_set1_ps(kMasked);
    for (int64_t i = 0; i < skipped; i += 16) {
      const __mmask16 m = lanes(skipped - i);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, w + i));
    }
    top[g] = _mm512_reduce_max_ps(mx);
    const __m512 shift = _mm512_set1_ps(top[g]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < skipped; i += 16) {
      const __mmask16 m = lanes(skipped - i);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + i), shift)));
      _mm512_mask_storeu_ps(w + i, m, e);
      total = _mm512_add_ps(total, e);
    }
    sum[g] = _mm512_reduce_add_ps(total);
  }
  __m512 s[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) s[g][c] = _mm512_setzero_ps();
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t i = 0; i < skipped; ++i) {
    if (i + kAhead < skipped) {
      const T* ahead = vmean(spage[i + kAhead]);
      for (int64_t off = 0; off < D; off += kLine) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    }
    const T* v = vmean(spage[i]);
    __m512 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(v + c * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(slog[g * skipped + i]);
      for (int c = 0; c < C; ++c) s[g][c] = _mm512_fmadd_ps(w, vc[c], s[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(sacc + g * D + c * 16, s[g][c]);
  merge_summaries(G, D, top, sum, sacc, acc, lse);
}
#endif

// The summary tokens of the pages a stable head skipped (not among ascending ids[0..count)),
// folded into `acc` / `lse`; nothing when every page was attended.
template <typename T, typename PageLen, typename ValueMean>
void fold_any(const float* q, int64_t group, int64_t dim, const int8_t* box_rows,
              const float* scale_row, const int32_t* table, int64_t n, const int64_t* ids,
              int64_t count, PageLen page_len, ValueMean vmean, float* acc, float* lse,
              float* centre, float* sacc, float* slog, int64_t* spage) {
  const int64_t skipped = skipped_pages(n, ids, count, spage);
  if (skipped == 0) return;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
#define KVHEAD_FOLD(G, C)                                                                   \
    if (group == G && dim == 16 * C) {                                                      \
      fold16<T, G, C>(q, box_rows, scale_row, table, spage, skipped, page_len, vmean, acc, \
                      lse, sacc, slog);                                                     \
      return;                                                                               \
    }
    KVHEAD_SHAPES(KVHEAD_FOLD)
#undef KVHEAD_FOLD
  }
#endif
  fold_summaries<T>(q, group, dim, box_rows, scale_row, table, spage, skipped, page_len, vmean,
                    acc, lse, centre, sacc, slog);
}

// Page scores of one (sequence, kv head) under the flexicache+ ranking (kvhead.pages.score_pages
// on int8 boxes): each query row's bound logit keeps `w` of the box's spread, written as one
// product, kmax.(q + w|q|)/2 + kmin.(q - w|q|)/2; the group's score is their max, or the sum of
// the rows' softmaxes over the pages (scaled by 1/sqrt(D)). `raw` holds group x n floats.
void score_pages_plus(const float* q, int64_t group, int64_t dim, const int8_t* box_rows,
                      const float* scale_row, const int32_t* table, int64_t n, double bound_weight,
                      bool softmax_group, float* qab, float* raw, float* scores) {
  const float w = static_cast<float>(bound_weight);
  for (int64_t e = 0; e < group * dim; ++e) {
    const float spread = w * std::fabs(q[e]);
    qab[2 * dim * (e / dim) + e % dim] = 0.5f * (q[e] + spread);
    qab[2 * dim * (e / dim) + dim + e % dim] = 0.5f * (q[e] - spread);
  }
  for (int64_t p = 0; p < n; ++p) {
    const int8_t* row = box_rows + static_cast<int64_t>(table[p]) * 2 * dim;
    const float sc = scale_row[table[p]];
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qab + g * 2 * dim;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < 2 * dim; ++d) acc += qg[d] * static_cast<float>(row[d]);
      raw[g * n + p] = acc * sc;
    }
  }
  if (!softmax_group) {
    for (int64_t p = 0; p < n; ++p) {
      float best = kMasked;
      for (int64_t g = 0; g < group; ++g) best = std::max(best, raw[g * n + p]);
      scores[p] = best;
    }
    return;
  }
  const float inv_sqrt = 1.f / std::sqrt(static_cast<float>(dim));
  std::fill(scores, scores + n, 0.f);
  for (int64_t g = 0; g < group; ++g) {
    float* r = raw + g * n;
    float mx = kMasked;
    for (int64_t p = 0; p < n; ++p) {
      r[p] *= inv_sqrt;
      mx = std::max(mx, r[p]);
    }
    float total = 0.f;
    for (int64_t p = 0; p < n; ++p) {
      r[p] = std::exp(r[p] - mx);
      total += r[p];
    }
    const float inv = 1.f / total;
    for (int64_t p = 0; p < n; ++p) scores[p] += r[p] * inv;
  }
}

// Page scores of one (sequence, kv head) under a ranking (w, max or softmax group): Quest's
// bound (w = 1, max) on score16 where the shape has an AVX-512 path, everything else on the
// portable score_pages_plus (`qab` and `raw` are its scratch).
void score_any(const float* q, int64_t group, int64_t dim, const int8_t* box_rows,
               const float* scale_row, const int32_t* table, int64_t n, double bound_weight,
               bool softmax_group, float* qab, float* raw, float* scores) {
#if defined(__AVX512F__)
#define KVHEAD_SCORE(G, C)                                               \
  if (group == G && dim == 16 * C) {                                     \
    score16<G, C>(q, box_rows, scale_row, table, n, scores);             \
    return;                                                              \
  }
  if (bound_weight == 1.0 && !softmax_group) {
    KVHEAD_SHAPES(KVHEAD_SCORE)
  }
#undef KVHEAD_SCORE
#endif
  score_pages_plus(q, group, dim, box_rows, scale_row, table, n, bound_weight, softmax_group, qab,
                   raw, scores);
}

}  // namespace

// Reranks of the kv heads in `heads` (kvhead.pages.score_pages + select_top_k on the int8
// boxes, as DeviceBounds.select computes them in torch): out [B, Hkv, W] gets each head's
// budgets[h] best pages (sink and recent pages forced), ascending, -1 padded; rows of other
// heads are left as they are. q: [B, Hkv*G, D]; box: [Hkv, blocks, 2D] int8 (qmax then qmin);
// scale: [Hkv, blocks]; table: [B, W] int32; num_pages: [B] int64. The spec's ranking (Quest's
// bound, max over the group, the newest page forced) is the case w = 1, max, sink 0, recent 1,
// and scores on the AVX-512 path.
void select_pages(torch::Tensor q, torch::Tensor box, torch::Tensor scale, torch::Tensor table,
                  torch::Tensor num_pages, torch::Tensor heads, torch::Tensor budgets,
                  int64_t sink_pages, int64_t recent_pages, bool softmax_group,
                  double bound_weight, torch::Tensor out) {
  check_int(box, torch::kInt8, "box");
  check_int(table, torch::kInt32, "block table");
  check_int(num_pages, torch::kInt64, "num_pages");
  check_int(heads, torch::kInt64, "heads");
  check_int(budgets, torch::kInt64, "budgets");
  check_int(out, torch::kInt64, "out");
  TORCH_CHECK(recent_pages >= 1 && sink_pages >= 0, "kvhead native: need recent_pages >= 1");
  const int64_t batch = q.size(0), kv = box.size(0), dim = q.size(2);
  const int64_t group = q.size(1) / kv, blocks = box.size(1), width = table.size(1);
  const int64_t slots = out.size(2), nheads = heads.numel();
  auto qf = q.to(torch::kFloat32).contiguous();
  const float* qp = qf.data_ptr<float>();
  const int8_t* bp = box.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t* np = num_pages.data_ptr<int64_t>();
  const int64_t* hp = heads.data_ptr<int64_t>();
  const int64_t* kp = budgets.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, batch * nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qab(group * 2 * dim), raw(group * width), scores(width);
    std::vector<int32_t> order;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nheads, h = hp[task % nheads];
      const int64_t n = std::min(np[b], width);
      const float* qh = qp + (b * kv + h) * group * dim;
      score_any(qh, group, dim, bp + h * blocks * 2 * dim, sp + h * blocks, tp + b * width, n,
                bound_weight, softmax_group, qab.data(), raw.data(), scores.data());
      top_pages(scores.data(), n, std::min(kp[h], slots), sink_pages, recent_pages, order,
                op + (b * kv + h) * slots, slots);
    }
  });
}

// One decode step of every (sequence, kv head) of a layer, written into out [B, Hkv*G, D].
//  * resident heads (res_index[h] >= 0): pages of vLLM's cache [blocks, R, P, 2D]; every page
//    when `resident_dense`, else their top-k scored now from the int8 boxes;
//  * stable heads (stable_index[h] >= 0): pages sel[b, h, :] (their last rerank's top-k) and
//    every page from anchor[b, h] - 1 on, read from the hot pool [slots, 1, P, 2D] at
//    slot_of[block, stable_index]. A missing pool page is an error (returned count > 0).
//    With value_means (the caches' dtype, [blocks, stable heads, D]; empty: off) every page a
//    stable head skips enters as one summary token (fold_any).
// page_steps [2] (float64) accumulates resident and total (sequence, head) pages of the step.
// Returns the number of stable pages that were not in the pool (0 when all is well).
int64_t decode_step(torch::Tensor q, torch::Tensor out, torch::Tensor cache, torch::Tensor res_index,
                    torch::Tensor pool, torch::Tensor slot_of, torch::Tensor stable_index,
                    torch::Tensor table, torch::Tensor seq_lens, torch::Tensor box,
                    torch::Tensor scale, torch::Tensor sel, torch::Tensor anchor, int64_t top_k,
                    bool resident_dense, double softmax_scale, torch::Tensor page_steps,
                    torch::Tensor value_means) {
  check_int(table, torch::kInt32, "block table");
  check_int(seq_lens, torch::kInt64, "seq_lens");
  check_int(res_index, torch::kInt64, "res_index");
  check_int(stable_index, torch::kInt64, "stable_index");
  check_int(slot_of, torch::kInt64, "slot_of");
  check_int(sel, torch::kInt64, "sel");
  check_int(anchor, torch::kInt64, "anchor");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && cache.is_contiguous() &&
                  pool.is_contiguous(), "kvhead native: q, out and caches must be contiguous");
  TORCH_CHECK(cache.scalar_type() == pool.scalar_type() && q.scalar_type() == cache.scalar_type(),
              "kvhead native: query and caches must share a dtype");
  const int64_t batch = q.size(0), kv = box.size(0), dim = q.size(2), group = q.size(1) / kv;
  const int64_t page = pool.size(2), width = table.size(1), blocks = box.size(1);
  const int64_t res_heads = cache.size(1), num_stable = slot_of.size(1), k = sel.size(2);
  const int64_t* rp = res_index.data_ptr<int64_t>();
  const int64_t* stp = stable_index.data_ptr<int64_t>();
  const int64_t* sop = slot_of.data_ptr<int64_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int8_t* bp = box.data_ptr<int8_t>();
  const float* scp = scale.data_ptr<float>();
  const int64_t* selp = sel.data_ptr<int64_t>();
  const int64_t* ap = anchor.data_ptr<int64_t>();
  const bool summaries = value_means.numel() > 0;
  if (summaries) check_means(value_means, cache, num_stable, dim);
  std::vector<double> resident(batch * kv, 0.0), total(batch * kv, 0.0);
  std::vector<int64_t> missing(batch * kv, 0);
  const int64_t block_elems = page * 2 * dim;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_step", [&] {
    using T = scalar_t;
    const T* qp = q.data_ptr<T>();
    T* outp = out.data_ptr<T>();
    const T* cp = res_heads ? cache.data_ptr<T>() : nullptr;
    const T* pp = pool.numel() ? pool.data_ptr<T>() : nullptr;
    const T* vmp = summaries ? value_means.data_ptr<T>() : nullptr;
    at::parallel_for(0, batch * kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * dim), acc(group * dim), kbuf(dim * page), vbuf(page * dim);
      std::vector<float> sbuf(page), scores(width), lse(group), centre(dim), sacc(group * dim);
      std::vector<float> qab(resident_dense ? 0 : group * 2 * dim);
      std::vector<float> raw(resident_dense ? 0 : group * width);
      std::vector<float> slog(summaries ? width * group : 0);
      std::vector<int64_t> spage(summaries ? width : 0);
      std::vector<int32_t> order;
      std::vector<int64_t> ids(std::max(width, k));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kv, h = task % kv;
        const int64_t len = lp[b];
        const int64_t n = std::min((len + page - 1) / page, width);
        const int32_t* row = tp + b * width;
        load_query(qp + (b * kv + h) * group * dim, group, dim,
                   static_cast<float>(softmax_scale), qf.data());
        auto page_len = [&](int64_t p) { return std::min(page, len - p * page); };
        int64_t count = 0;
        if (rp[h] >= 0) {
          if (resident_dense) {
            for (int64_t p = 0; p < n; ++p) ids[p] = p;
            count = n;
          } else {
            score_any(qf.data(), group, dim, bp + h * blocks * 2 * dim, scp + h * blocks, row,
                      n, 1.0, false, qab.data(), raw.data(), scores.data());
            const int64_t k_res = std::min(top_k, width);
            count = top_pages(scores.data(), n, k_res, 0, 1, order, ids.data(), k_res);
          }
          const int64_t ri = rp[h];
          attend_any<T>(qf.data(), group, dim, page, count,
                    [&](int64_t i) { return cp + (row[ids[i]] * res_heads + ri) * block_elems; },
                    [&](int64_t i) { return page_len(ids[i]); }, acc.data(), kbuf.data(),
                    vbuf.data(), sbuf.data(), lse.data());
          resident[task] = static_cast<double>(n);
        } else {
          const int64_t si = stp[h];
          const int64_t* chosen = selp + (b * kv + h) * k;
          // the tail: pages written since the rerank, from the one that was partial then
          const int64_t from = std::max<int64_t>(ap[b * kv + h] - 1, 0);
          for (int64_t i = 0; i < k && chosen[i] >= 0 && chosen[i] < from; ++i) ids[count++] = chosen[i];
          for (int64_t p = from; p < n; ++p) ids[count++] = p;
          int64_t lost = 0;
          for (int64_t i = 0; i < count; ++i)
            if (sop[static_cast<int64_t>(row[ids[i]]) * num_stable + si] < 0) ++lost;
          missing[task] = lost;
          if (lost == 0) {
            attend_any<T>(qf.data(), group, dim, page, count,
                      [&](int64_t i) {
                        return pp + sop[static_cast<int64_t>(row[ids[i]]) * num_stable + si] *
                                        block_elems;
                      },
                      [&](int64_t i) { return page_len(ids[i]); }, acc.data(), kbuf.data(),
                      vbuf.data(), sbuf.data(), lse.data());
            if (summaries)
              fold_any<T>(qf.data(), group, dim, bp + h * blocks * 2 * dim, scp + h * blocks,
                             row, n, ids.data(), count, page_len,
                             [&](int64_t p) {
                               return vmp + (static_cast<int64_t>(row[p]) * num_stable + si) * dim;
                             },
                             acc.data(), lse.data(), centre.data(), sacc.data(), slog.data(),
                             spage.data());
          }
          resident[task] = static_cast<double>(count);
        }
        total[task] = static_cast<double>(n);
        T* og = outp + (b * kv + h) * group * dim;
        for (int64_t e = 0; e < group * dim; ++e) og[e] = from_float<T>(acc[e]);
      }
    });
  });
  double* ps = page_steps.data_ptr<double>();
  for (int64_t t = 0; t < batch * kv; ++t) {
    ps[0] += resident[t];
    ps[1] += total[t];
  }
  return std::accumulate(missing.begin(), missing.end(), int64_t{0});
}

// Decode tokens key/value [T, Hkv, D] at flat slots [T] (block * P + offset, >= 0): resident
// heads into vLLM's cache, stable heads into their hot-pool page where it has one. With
// value_means ([blocks, stable heads, D] in the caches' dtype; empty: off) every stable token
// also updates its page's running mean (tokens are written in order, a write at offset 0
// starting the page afresh): one rounding per token at the scale of the values themselves,
// where a sum kept in bf16 would round at up to 16x their scale.
void write_tokens(torch::Tensor key, torch::Tensor value, torch::Tensor slots, torch::Tensor cache,
                  torch::Tensor res_index, torch::Tensor pool, torch::Tensor slot_of,
                  torch::Tensor stable_index, torch::Tensor value_means) {
  check_int(slots, torch::kInt64, "slots");
  TORCH_CHECK(key.is_contiguous() && value.is_contiguous(), "kvhead native: key/value layout");
  const int64_t tokens = slots.numel(), kv = key.size(1), dim = key.size(2);
  const int64_t page = pool.size(2), res_heads = cache.size(1), num_stable = slot_of.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* rp = res_index.data_ptr<int64_t>();
  const int64_t* stp = stable_index.data_ptr<int64_t>();
  const int64_t* sop = slot_of.data_ptr<int64_t>();
  const int64_t block_elems = page * 2 * dim;
  const bool summaries = value_means.numel() > 0;
  if (summaries) check_means(value_means, cache, num_stable, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache.scalar_type(), "write_tokens", [&] {
    using T = scalar_t;
    auto kf = key.to(cache.scalar_type()).contiguous();
    auto vf = value.to(cache.scalar_type()).contiguous();
    const T* kp = kf.data_ptr<T>();
    const T* vp = vf.data_ptr<T>();
    T* cp = res_heads ? cache.data_ptr<T>() : nullptr;
    T* pp = pool.numel() ? pool.data_ptr<T>() : nullptr;
    T* vmp = summaries ? value_means.data_ptr<T>() : nullptr;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t block = sp[t] / page, off = sp[t] % page;
      for (int64_t h = 0; h < kv; ++h) {
        const T* kt = kp + (t * kv + h) * dim;
        const T* vt = vp + (t * kv + h) * dim;
        T* base = nullptr;
        if (rp[h] >= 0) {
          base = cp + (block * res_heads + rp[h]) * block_elems;
        } else {
          if (summaries) {
            T* mean = vmp + (block * num_stable + stp[h]) * dim;
            const float step = 1.f / static_cast<float>(off + 1);
            for (int64_t d = 0; d < dim; ++d) {
              const float m = off == 0 ? 0.f : to_float(mean[d]);
              mean[d] = from_float<T>(m + (to_float(vt[d]) - m) * step);
            }
          }
          const int64_t slot = sop[block * num_stable + stp[h]];
          if (slot < 0) continue;
          base = pp + slot * block_elems;
        }
        for (int64_t d = 0; d < dim; ++d) base[d * page + off] = kt[d];
        std::memcpy(base + dim * page + off * dim, vt, dim * sizeof(T));
      }
    }
  });
}

namespace {

// Round an exact box [Hkv, D] outwards onto block `block`'s int8 row (bounds_compact.quantize).
void settle(const float* lo, const float* hi, int64_t kv, int64_t dim, int64_t blocks,
            int64_t block, int8_t* box, float* scale) {
  for (int64_t h = 0; h < kv; ++h) {
    const float* l = lo + h * dim;
    const float* u = hi + h * dim;
    double amax = 0.0;
    for (int64_t d = 0; d < dim; ++d)
      amax = std::max(amax, std::max(std::fabs(double(l[d])), std::fabs(double(u[d]))));
    const float stored = static_cast<float>(amax / kQmax * kScalePad);
    const double s = std::max(static_cast<double>(stored), static_cast<double>(FLT_MIN));
    int8_t* row = box + (h * blocks + block) * 2 * dim;
    for (int64_t d = 0; d < dim; ++d) {
      double qmax = std::ceil(double(u[d]) / s), qmin = std::floor(double(l[d]) / s);
      if (qmax * s < double(u[d])) qmax += 1;
      if (qmin * s > double(l[d])) qmin -= 1;
      row[d] = static_cast<int8_t>(std::clamp(qmax, -kQmax, kQmax));
      row[dim + d] = static_cast<int8_t>(std::clamp(qmin, -kQmax, kQmax));
    }
    scale[h * blocks + block] = stored;
  }
}

}  // namespace

// Fold decode keys [T, Hkv, D] at slots [T] into the page bounds, token by token, with the same
// rules as DeviceBounds.update: a write at offset 0 starts the page afresh; an open page keeps an
// exact fp32 box in the LRU table (tag = block, used = clock; entries used at this `clock` are
// never taken); a page settles into its int8 row when its last slot is written or it finds no
// entry; a page without an entry folds into its int8 box.
void update_bounds(torch::Tensor keys, torch::Tensor slots, int64_t page, torch::Tensor box,
                   torch::Tensor scale, torch::Tensor open_min, torch::Tensor open_max,
                   torch::Tensor open_tag, torch::Tensor open_used, int64_t clock) {
  check_int(slots, torch::kInt64, "slots");
  check_int(open_tag, torch::kInt64, "open_tag");
  check_int(open_used, torch::kInt64, "open_used");
  auto kf = keys.to(torch::kFloat32).contiguous();
  const int64_t tokens = slots.numel(), kv = kf.size(1), dim = kf.size(2);
  const int64_t blocks = box.size(1), entries = open_tag.numel();
  const float* kp = kf.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  int8_t* bp = box.data_ptr<int8_t>();
  float* scp = scale.data_ptr<float>();
  float* mn = open_min.data_ptr<float>();
  float* mx = open_max.data_ptr<float>();
  int64_t* tag = open_tag.data_ptr<int64_t>();
  int64_t* used = open_used.data_ptr<int64_t>();
  std::vector<float> lo(kv * dim), hi(kv * dim);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t block = sp[t] / page, off = sp[t] % page;
    const float* key = kp + t * kv * dim;
    int64_t entry = -1;
    for (int64_t e = 0; e < entries; ++e)
      if (tag[e] == block) { entry = e; break; }
    if (off == 0) {
      std::copy(key, key + kv * dim, lo.begin());
      std::copy(key, key + kv * dim, hi.begin());
    } else if (entry >= 0) {
      for (int64_t i = 0; i < kv * dim; ++i) {
        lo[i] = std::min(mn[entry * kv * dim + i], key[i]);
        hi[i] = std::max(mx[entry * kv * dim + i], key[i]);
      }
    } else {
      for (int64_t h = 0; h < kv; ++h) {
        const int8_t* row = bp + (h * blocks + block) * 2 * dim;
        const float s = scp[h * blocks + block];
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t i = h * dim + d;
          hi[i] = std::max(static_cast<float>(row[d]) * s, key[i]);
          lo[i] = std::min(static_cast<float>(row[dim + d]) * s, key[i]);
        }
      }
    }
    if (off == page - 1) {
      settle(lo.data(), hi.data(), kv, dim, blocks, block, bp, scp);
      if (entry >= 0) { tag[entry] = -1; used[entry] = 0; }
      continue;
    }
    if (entry < 0) {
      for (int64_t e = 0; e < entries; ++e)
        if (used[e] < clock && (entry < 0 || used[e] < used[entry])) entry = e;
      if (entry >= 0 && tag[entry] >= 0)  // evict: its page settles with its exact box
        settle(mn + entry * kv * dim, mx + entry * kv * dim, kv, dim, blocks, tag[entry], bp, scp);
    }
    if (entry < 0) {
      settle(lo.data(), hi.data(), kv, dim, blocks, block, bp, scp);
      continue;
    }
    tag[entry] = block;
    used[entry] = clock;
    std::copy(lo.begin(), lo.end(), mn + entry * kv * dim);
    std::copy(hi.begin(), hi.end(), mx + entry * kv * dim);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_pages", &select_pages, "reranks of chosen kv heads from int8 boxes");
  m.def("decode_step", &decode_step, "sparse decode attention of one layer");
  m.def("write_tokens", &write_tokens, "decode tokens into vLLM's cache and the hot pool");
  m.def("update_bounds", &update_bounds, "fold decode keys into the page bounds");
}
