// Fused CPU rasterizer for 2D Gaussian splats (accumulated sum, no opacity, no sorting).
//
//   I[b, c, y, x] = sum_i valid[b, i] * colours[b, i, c] * w_i(x + 0.5, y + 0.5)
//   w_i(p) = exp(-d^2 / 2) if d^2 <= cutoff^2 else 0,  d^2 = |L_i^{-1} (p - mu_i)|^2
//
// Same definition as kernels/rasterize_torch.rasterize_dense_torch, its twin and the oracle it is
// tested against (tests/kernels/test_rasterize_cpu.py, forward and backward).
// Every splat is evaluated only on the pixels of its cutoff ellipse: for each pixel row the ellipse's
// column span is solved in closed form (padded by one pixel), and the exact d^2 <= cutoff^2 test is
// applied per pixel. Inner loops run 8 pixels at a time with AVX2 + FMA and an inline exp polynomial
// (relative error ~2e-7), with a scalar fallback when the build has no AVX2.
//
// Plain C ABI, no torch headers: it compiles in about a second with g++ and is loaded through ctypes
// (kernels/rasterize_cpu.py allocates every output and passes raw float32 / bool pointers of
// contiguous CPU tensors). Threads: OpenMP, `threads` per call.
//
// Determinism: every output value is summed by one thread in a fixed order, whatever the number of
// threads. The forward pass gives each (image, band of rows) to one task; the backward pass gives
// each splat to one task (a splat's gradient is a sum over its own pixels).
//
// Layouts: positions [B,N,2], cholesky [B,N,3], colours [B,N,C], valid [B,N] (bool bytes),
// images [B,C,H,W], all contiguous.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPLAT_AVX2 1
#else
#define SPLAT_AVX2 0
#endif

namespace {

constexpr int kLanes = 8;        // pixels per vector step
constexpr int kBandRows = 16;    // forward pass: rows of one image rendered by one task
constexpr float kExpFloor = -87.0f;  // exp below this underflows anyway; keeps 2^n representable

// Everything the inner loops need about one splat, with its pixel footprint clipped to the image.
struct SplatGeometry {
  float mx, my;               // centre, pixels
  float l11, l21, l22;        // Cholesky factor
  float inv_l11, inv_l22;
  // Row spans: on the row at offset dy the ellipse d^2 <= cutoff^2 is centred at
  // mx + dy * shear and spans +- half_width_scale * sqrt(cutoff^2 - dy^2 * inv_syy), with
  // Sigma = L L^T, syy = l21^2 + l22^2, shear = Sigma_xy / syy, half_width_scale = |l11| l22 / sqrt(syy).
  float shear, inv_syy, half_width_scale;
  int row_begin, row_end;     // rows [row_begin, row_end) that may hold a pixel of the ellipse
  bool empty;
};

inline SplatGeometry make_geometry(const float* mu, const float* chol, int height, int width,
                                   float cutoff) {
  SplatGeometry g;
  g.mx = mu[0];
  g.my = mu[1];
  g.l11 = chol[0];
  g.l21 = chol[1];
  g.l22 = chol[2];
  g.inv_l11 = 1.0f / g.l11;
  g.inv_l22 = 1.0f / g.l22;
  const float syy = g.l21 * g.l21 + g.l22 * g.l22;
  g.inv_syy = 1.0f / syy;
  g.shear = g.l11 * g.l21 * g.inv_syy;
  g.half_width_scale = std::fabs(g.l11) * std::fabs(g.l22) / std::sqrt(syy);
  if (std::isfinite(cutoff)) {
    // Pixel centres y + 0.5 within half_y of my, padded by one row against rounding.
    const double half_y = double(cutoff) * std::sqrt(double(g.l21) * g.l21 + double(g.l22) * g.l22);
    const double lo = std::ceil(double(g.my) - half_y - 0.5) - 1.0;
    const double hi = std::floor(double(g.my) + half_y - 0.5) + 2.0;  // exclusive
    g.row_begin = int(std::max(0.0, std::min(double(height), lo)));
    g.row_end = int(std::max(0.0, std::min(double(height), hi)));
    if (!(half_y == half_y)) g.row_begin = g.row_end = 0;  // NaN factor: nothing
  } else {
    g.row_begin = 0;
    g.row_end = height;
  }
  g.empty = g.row_begin >= g.row_end;
  return g;
}

// Columns [begin, end) of one row that may hold pixels of the ellipse (padded by one pixel; the
// exact per-pixel test decides). With an infinite cutoff the whole row.
inline void row_span(const SplatGeometry& g, float dy, float cutoff_sq, int width, int* begin,
                     int* end) {
  if (!std::isfinite(cutoff_sq)) {
    *begin = 0;
    *end = width;
    return;
  }
  const float centre = g.mx + dy * g.shear;
  const float half = g.half_width_scale * std::sqrt(std::max(0.0f, cutoff_sq - dy * dy * g.inv_syy));
  // Pixel centres x + 0.5 in [centre - half, centre + half], padded by one pixel against rounding.
  const float lo = std::ceil(centre - half - 0.5f) - 1.0f;
  const float hi = std::floor(centre + half - 0.5f) + 2.0f;
  const float w = float(width);
  *begin = int(std::max(0.0f, std::min(w, lo)));
  *end = int(std::max(0.0f, std::min(w, hi)));
  if (!(half == half) || !(centre == centre)) *begin = *end = 0;  // NaN geometry: nothing
}

inline float exp_scalar(float x) { return std::exp(std::max(x, kExpFloor)); }

#if SPLAT_AVX2
// exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (the classic
// minimax coefficients of single-precision expf), 2^n built in the exponent bits.
inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weights, z1 and z2 of 8 consecutive pixels starting at column x of a row (dy fixed); lanes at or
// beyond column `end` and pixels outside the cutoff get weight 0.
struct Lanes {
  __m256 w, z1, z2;
};

inline Lanes eval_lanes(const SplatGeometry& g, int x, int end, __m256 dy, float cutoff_sq) {
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const __m256 dx = _mm256_add_ps(_mm256_set1_ps(float(x) + 0.5f - g.mx), lane);
  Lanes out;
  out.z1 = _mm256_mul_ps(dx, _mm256_set1_ps(g.inv_l11));
  out.z2 = _mm256_mul_ps(_mm256_fnmadd_ps(_mm256_set1_ps(g.l21), out.z1, dy), _mm256_set1_ps(g.inv_l22));
  const __m256 d_sq = _mm256_fmadd_ps(out.z1, out.z1, _mm256_mul_ps(out.z2, out.z2));
  const __m256 inside = _mm256_and_ps(
      _mm256_cmp_ps(d_sq, _mm256_set1_ps(cutoff_sq), _CMP_LE_OQ),
      _mm256_cmp_ps(lane, _mm256_set1_ps(float(end - x)), _CMP_LT_OQ));
  out.w = _mm256_and_ps(inside, exp_avx2(_mm256_mul_ps(d_sq, _mm256_set1_ps(-0.5f))));
  return out;
}
#endif

// Scalar twin of eval_lanes for one pixel.
inline float eval_pixel(const SplatGeometry& g, int x, float dy, float cutoff_sq, float* z1,
                        float* z2) {
  const float dx = float(x) + 0.5f - g.mx;
  *z1 = dx * g.inv_l11;
  *z2 = (dy - g.l21 * *z1) * g.inv_l22;
  const float d_sq = *z1 * *z1 + *z2 * *z2;
  return d_sq <= cutoff_sq ? exp_scalar(-0.5f * d_sq) : 0.0f;
}

// sum_k a[k] * b[k] over n floats (n a multiple of kLanes), in a fixed order.
inline float dot(const float* a, const float* b, int n) {
#if SPLAT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + kLanes), _mm256_loadu_ps(b + k + kLanes), acc1);
  }
  for (; k < n; k += kLanes) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
  return horizontal_sum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.0f;
  for (int k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
#endif
}

// Row stride of the padded per-task buffers: room for a full vector past the last column.
inline int padded_width(int width) { return ((width + kLanes - 1) / kLanes) * kLanes + kLanes; }

// Splat s of the batch, by flat index b * N + i.
struct Batch {
  const float* pos;
  const float* chol;
  const float* col;  // may be null when colours are not needed
  const bool* valid;
  int64_t batch, num, channels, height, width;
  float cutoff, cutoff_sq;
  SplatGeometry geometry(int64_t s) const {
    return make_geometry(pos + 2 * s, chol + 3 * s, int(height), int(width), cutoff);
  }
};

Batch make_batch(const float* pos, const float* chol, const float* col, const bool* valid,
                 int64_t batch, int64_t num, int64_t channels, int64_t height, int64_t width,
                 float cutoff) {
  return Batch{pos, chol, col, valid, batch, num, channels, height, width, cutoff,
               std::isfinite(cutoff) ? cutoff * cutoff : INFINITY};
}

// The image-side tensor [B, C, H, W] (an output gradient or a target image) copied into rows of
// padded_width, zeros in the padding, so that full vectors may read past the last column.
std::vector<float> pad_rows(const float* image, int64_t planes, int64_t height, int64_t width,
                            int threads) {
  const int stride = padded_width(int(width));
  std::vector<float> padded(size_t(planes) * height * stride, 0.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t y = 0; y < height; ++y)
      std::copy_n(image + (p * height + y) * width, width, padded.data() + (p * height + y) * stride);
  return padded;
}

}  // namespace

extern "C" {

int splat_built_with_avx2() { return SPLAT_AVX2; }

// out [B, C, H, W] (overwritten) = the render.
void splat_forward(const float* pos, const float* chol, const float* col, const bool* valid,
                   int64_t batch, int64_t num, int64_t channels, int64_t height, int64_t width,
                   float cutoff, float* out, int threads) {
  const Batch in = make_batch(pos, chol, col, valid, batch, num, channels, height, width, cutoff);
  const int stride = padded_width(int(width));
  const int64_t bands = (height + kBandRows - 1) / kBandRows;
  // Every splat's geometry once, shared by all bands of its image.
  std::vector<SplatGeometry> geometry(size_t(batch * num));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < batch * num; ++s)
    if (valid[s]) geometry[s] = in.geometry(s);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buffer(size_t(channels) * kBandRows * stride);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < batch * bands; ++task) {
      const int64_t b = task / bands;
      const int band_begin = int((task % bands) * kBandRows);
      const int band_end = int(std::min<int64_t>(height, band_begin + kBandRows));
      std::fill(buffer.begin(), buffer.end(), 0.0f);
      for (int64_t i = 0; i < num; ++i) {
        const int64_t s = b * num + i;
        if (!valid[s]) continue;
        const SplatGeometry& g = geometry[s];
        const int r0 = std::max(g.row_begin, band_begin), r1 = std::min(g.row_end, band_end);
        if (r0 >= r1) continue;
        const float* c = col + channels * s;
        for (int y = r0; y < r1; ++y) {
          const float dy = float(y) + 0.5f - g.my;
          int x0, x1;
          row_span(g, dy, in.cutoff_sq, int(width), &x0, &x1);
          float* row = buffer.data() + size_t(y - band_begin) * stride;
          int x = x0;
#if SPLAT_AVX2
          const __m256 vdy = _mm256_set1_ps(dy);
          for (; x < x1; x += kLanes) {
            const Lanes l = eval_lanes(g, x, x1, vdy, in.cutoff_sq);
            for (int64_t ch = 0; ch < channels; ++ch) {
              float* dst = row + size_t(ch) * kBandRows * stride + x;
              _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(c[ch]), l.w, _mm256_loadu_ps(dst)));
            }
          }
#endif
          for (; x < x1; ++x) {
            float z1, z2;
            const float w = eval_pixel(g, x, dy, in.cutoff_sq, &z1, &z2);
            for (int64_t ch = 0; ch < channels; ++ch) row[size_t(ch) * kBandRows * stride + x] += c[ch] * w;
          }
        }
      }
      for (int64_t ch = 0; ch < channels; ++ch)
        for (int y = band_begin; y < band_end; ++y)
          std::copy_n(buffer.data() + (size_t(ch) * kBandRows + (y - band_begin)) * stride, width,
                      out + ((b * channels + ch) * height + y) * width);
    }
  }
}

// grad_image [B, C, H, W] -> grad_pos [B, N, 2], grad_chol [B, N, 3], grad_col [B, N, C]
// (every entry written; invalid splats get zeros).
//
// Per splat, with gd = dLoss/dw * w (so dLoss/d(d^2) = -gd / 2) and z = L^{-1}(p - mu), collect
// t1 = sum gd z1, t2 = sum gd z2, t11 = sum gd z1^2, t12 = sum gd z1 z2, t22 = sum gd z2^2.
// The chain rule through z1 = dx / l11 and z2 = (dy - l21 z1) / l22 then gives (r = l21 / l22):
//   dL/dmu_x = (t1 - r t2) / l11     dL/dmu_y = t2 / l22
//   dL/dl11  = (t11 - r t12) / l11   dL/dl21  = t12 / l22     dL/dl22 = t22 / l22
void splat_backward(const float* grad_image, const float* pos, const float* chol, const float* col,
                    const bool* valid, int64_t batch, int64_t num, int64_t channels, int64_t height,
                    int64_t width, float cutoff, float* g_pos, float* g_chol, float* g_col,
                    int threads) {
  const Batch in = make_batch(pos, chol, col, valid, batch, num, channels, height, width, cutoff);
  const std::vector<float> grad_padded = pad_rows(grad_image, batch * channels, height, width, threads);
  const float* grad = grad_padded.data();
  const int stride = padded_width(int(width));
  const int64_t plane = height * stride;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
  for (int64_t s = 0; s < batch * num; ++s) {
    std::fill_n(g_pos + 2 * s, 2, 0.0f);
    std::fill_n(g_chol + 3 * s, 3, 0.0f);
    std::fill_n(g_col + channels * s, channels, 0.0f);
    if (!valid[s]) continue;
    const int64_t b = s / num;
    const SplatGeometry g = in.geometry(s);
    const float* c = col + channels * s;
    const float* grad_b = grad + b * channels * plane;
    double t1 = 0, t2 = 0, t11 = 0, t12 = 0, t22 = 0;
    double gc[16] = {0};  // colour gradients, channels <= 16 (checked in Python)
#if SPLAT_AVX2
    // Vector partial sums run over the splat's whole footprint (one horizontal sum per splat).
    __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(),
           a12 = _mm256_setzero_ps(), a22 = _mm256_setzero_ps();
    __m256 ac[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#endif
    for (int y = g.row_begin; y < g.row_end; ++y) {
      const float dy = float(y) + 0.5f - g.my;
      int x0, x1;
      row_span(g, dy, in.cutoff_sq, int(width), &x0, &x1);
      const float* grow = grad_b + size_t(y) * stride;
      int x = x0;
#if SPLAT_AVX2
      if (channels <= 4) {
        const __m256 vdy = _mm256_set1_ps(dy);
        for (; x < x1; x += kLanes) {
          const Lanes l = eval_lanes(g, x, x1, vdy, in.cutoff_sq);
          __m256 gw = _mm256_setzero_ps();  // dLoss/dw = sum_c colour_c * grad_c
          for (int64_t ch = 0; ch < channels; ++ch) {
            const __m256 gi = _mm256_loadu_ps(grow + ch * plane + x);
            gw = _mm256_fmadd_ps(_mm256_set1_ps(c[ch]), gi, gw);
            ac[ch] = _mm256_fmadd_ps(l.w, gi, ac[ch]);
          }
          const __m256 gd = _mm256_mul_ps(gw, l.w);
          const __m256 gd1 = _mm256_mul_ps(gd, l.z1), gd2 = _mm256_mul_ps(gd, l.z2);
          a1 = _mm256_add_ps(a1, gd1);
          a2 = _mm256_add_ps(a2, gd2);
          a11 = _mm256_fmadd_ps(gd1, l.z1, a11);
          a12 = _mm256_fmadd_ps(gd1, l.z2, a12);
          a22 = _mm256_fmadd_ps(gd2, l.z2, a22);
        }
      }
#endif
      for (; x < x1; ++x) {
        float z1, z2;
        const float w = eval_pixel(g, x, dy, in.cutoff_sq, &z1, &z2);
        float gw = 0.0f;
        for (int64_t ch = 0; ch < channels; ++ch) {
          const float gi = grow[ch * plane + x];
          gw += c[ch] * gi;
          gc[ch] += double(w) * gi;
        }
        const float gd = gw * w;
        t1 += gd * z1;
        t2 += gd * z2;
        t11 += gd * z1 * z1;
        t12 += gd * z1 * z2;
        t22 += gd * z2 * z2;
      }
    }
#if SPLAT_AVX2
    t1 += horizontal_sum(a1);
    t2 += horizontal_sum(a2);
    t11 += horizontal_sum(a11);
    t12 += horizontal_sum(a12);
    t22 += horizontal_sum(a22);
    for (int64_t ch = 0; ch < channels && channels <= 4; ++ch) gc[ch] += horizontal_sum(ac[ch]);
#endif
    const double ratio = double(g.l21) / g.l22;
    g_pos[2 * s + 0] = float((t1 - ratio * t2) / g.l11);
    g_pos[2 * s + 1] = float(t2 / g.l22);
    g_chol[3 * s + 0] = float((t11 - ratio * t12) / g.l11);
    g_chol[3 * s + 1] = float(t12 / g.l22);
    g_chol[3 * s + 2] = float(t22 / g.l22);
    for (int64_t ch = 0; ch < channels; ++ch) g_col[channels * s + ch] = float(gc[ch]);
  }
}

// The adjoint of the render in the colours: adjoint [B, N, C] = W^T image (per image and channel),
// and, when diag is not null, diag [B, N] = sum_p w_i(p)^2 (the diagonal of W^T W). Used by the
// conjugate-gradient colour solve together with splat_forward (which applies W).
void splat_colour_adjoint(const float* image, const float* pos, const float* chol, const bool* valid,
                          int64_t batch, int64_t num, int64_t channels, int64_t height, int64_t width,
                          float cutoff, float* adjoint, float* diag, int threads) {
  const Batch in = make_batch(pos, chol, nullptr, valid, batch, num, channels, height, width, cutoff);
  const std::vector<float> padded = pad_rows(image, batch * channels, height, width, threads);
  const int stride = padded_width(int(width));
  const int64_t plane = height * stride;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
  for (int64_t s = 0; s < batch * num; ++s) {
    double acc[16] = {0};  // channels <= 16 (checked in Python)
    double acc_diag = 0;
    if (valid[s]) {
      const SplatGeometry g = in.geometry(s);
      const float* img = padded.data() + (s / num) * channels * plane;
#if SPLAT_AVX2
      __m256 ac[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      __m256 ad = _mm256_setzero_ps();
#endif
      for (int y = g.row_begin; y < g.row_end; ++y) {
        const float dy = float(y) + 0.5f - g.my;
        int x0, x1;
        row_span(g, dy, in.cutoff_sq, int(width), &x0, &x1);
        const float* row = img + size_t(y) * stride;
        int x = x0;
#if SPLAT_AVX2
        if (channels <= 4) {
          const __m256 vdy = _mm256_set1_ps(dy);
          for (; x < x1; x += kLanes) {
            const __m256 w = eval_lanes(g, x, x1, vdy, in.cutoff_sq).w;
            for (int64_t ch = 0; ch < channels; ++ch)
              ac[ch] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + ch * plane + x), ac[ch]);
            ad = _mm256_fmadd_ps(w, w, ad);
          }
        }
#endif
        for (; x < x1; ++x) {
          float z1, z2;
          const float w = eval_pixel(g, x, dy, in.cutoff_sq, &z1, &z2);
          for (int64_t ch = 0; ch < channels; ++ch) acc[ch] += double(w) * row[ch * plane + x];
          acc_diag += double(w) * w;
        }
      }
#if SPLAT_AVX2
      for (int64_t ch = 0; ch < channels && channels <= 4; ++ch) acc[ch] += horizontal_sum(ac[ch]);
      acc_diag += horizontal_sum(ad);
#endif
    }
    for (int64_t ch = 0; ch < channels; ++ch) adjoint[s * channels + ch] = float(acc[ch]);
    if (diag) diag[s] = float(acc_diag);
  }
}

}  // extern "C"
