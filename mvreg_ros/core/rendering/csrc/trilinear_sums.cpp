// Sums of trilinear samples along rays, with their gradients, for the CPU renderer backend "native".
//
// For each ray r with first sample p0[r] and sample step q[r] (padded-volume index units,
// x = fastest axis), samples p_k = p0 + k q, k = 0..S-1, it returns
//   F[r] = sum_k f(p_k)                 (f = trilinear interpolation of the volume)
// and, when asked, in the same pass over the samples
//   G[r] = sum_k grad f(p_k),   H[r] = sum_k k grad f(p_k)
// so that dF/dp0 = G and dF/dq = H: the backward pass needs no per-sample memory.
// Positions are clamped to [0, N - 1] per axis (the padded volume replicates its border, so this
// is grid_sample's "border" padding; NaN goes to 0); a clamped coordinate has zero gradient. The
// cell index is at most N - 2, so every neighbour read lies inside the volume.
// The lanes of one SIMD vector are consecutive samples of one ray; volume reads are hardware
// gathers (AVX-512: one 64-bit load per pair of x-neighbours; AVX2), with a scalar build for other CPUs. Rays run in parallel on
// ATen's intra-op threads (torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace simd {
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr const char* kIsa = "avx512";
using F = __m512;
using I = __m512i;
inline F set1(float x) { return _mm512_set1_ps(x); }
inline I set1i(int x) { return _mm512_set1_epi32(x); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F madd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F clamp(F x, F lo, F hi) { return _mm512_min_ps(_mm512_max_ps(x, lo), hi); }  // max_ps(NaN, lo) = lo
inline I to_index(F x) { return _mm512_cvttps_epi32(x); }
inline I mini(I a, I b) { return _mm512_min_epi32(a, b); }
inline F to_float(I x) { return _mm512_cvtepi32_ps(x); }
inline I addi(I a, I b) { return _mm512_add_epi32(a, b); }
inline I muli(I a, I b) { return _mm512_mullo_epi32(a, b); }
// base[idx] and base[idx + 1] with one 64-bit load per lane (half the gathered elements of two
// 32-bit gathers), de-interleaved into two vectors
inline void gather_pair(const float* base, I idx, F& lo, F& hi) {
  const F a = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(idx), base, 4));
  const F b = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_extracti64x4_epi64(idx, 1), base, 4));
  const I even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const I odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  lo = _mm512_permutex2var_ps(a, even, b);
  hi = _mm512_permutex2var_ps(a, odd, b);
}
inline F inside(F x, F lo, F hi) {  // 1 where lo <= x <= hi, else 0
  const __mmask16 m = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, hi, _CMP_LE_OQ);
  return _mm512_maskz_mov_ps(m, set1(1.0f));
}
inline F ramp() { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
inline float total(F x) { return _mm512_reduce_add_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kWidth = 8;
constexpr const char* kIsa = "avx2";
using F = __m256;
using I = __m256i;
inline F set1(float x) { return _mm256_set1_ps(x); }
inline I set1i(int x) { return _mm256_set1_epi32(x); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F madd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F clamp(F x, F lo, F hi) { return _mm256_min_ps(_mm256_max_ps(x, lo), hi); }  // max_ps(NaN, lo) = lo
inline I to_index(F x) { return _mm256_cvttps_epi32(x); }
inline I mini(I a, I b) { return _mm256_min_epi32(a, b); }
inline F to_float(I x) { return _mm256_cvtepi32_ps(x); }
inline I addi(I a, I b) { return _mm256_add_epi32(a, b); }
inline I muli(I a, I b) { return _mm256_mullo_epi32(a, b); }
inline void gather_pair(const float* base, I idx, F& lo, F& hi) {
  lo = _mm256_i32gather_ps(base, idx, 4);
  hi = _mm256_i32gather_ps(base + 1, idx, 4);
}
inline F inside(F x, F lo, F hi) {
  const F m = _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LE_OQ));
  return _mm256_and_ps(m, set1(1.0f));
}
inline F ramp() { return _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0); }
inline float total(F x) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#else
constexpr int kWidth = 1;
constexpr const char* kIsa = "scalar";
using F = float;
using I = int32_t;
inline F set1(float x) { return x; }
inline I set1i(int x) { return x; }
inline F add(F a, F b) { return a + b; }
inline F sub(F a, F b) { return a - b; }
inline F mul(F a, F b) { return a * b; }
inline F madd(F a, F b, F c) { return a * b + c; }
inline F clamp(F x, F lo, F hi) { return !(x >= lo) ? lo : (x > hi ? hi : x); }  // NaN -> lo
inline I to_index(F x) { return static_cast<I>(x); }
inline I mini(I a, I b) { return a < b ? a : b; }
inline F to_float(I x) { return static_cast<F>(x); }
inline I addi(I a, I b) { return a + b; }
inline I muli(I a, I b) { return a * b; }
inline void gather_pair(const float* base, I idx, F& lo, F& hi) {
  lo = base[idx];
  hi = base[idx + 1];
}
inline F inside(F x, F lo, F hi) { return (x >= lo && x <= hi) ? 1.0f : 0.0f; }
inline F ramp() { return 0.0f; }
inline float total(F x) { return x; }
#endif
}  // namespace simd

namespace {

using namespace simd;

inline F lerp(F a, F b, F t) { return madd(sub(b, a), t, a); }

struct Volume {
  const float* data;
  int stride_y, stride_z;
  float max_x, max_y, max_z;  // largest coordinate: N - 1
  int cell_x, cell_y, cell_z;  // largest cell index: N - 2
};

template <bool kGrad>
void ray_sums(const Volume& vol, const float* p0, const float* q, int S, float* out_f, float* out_g, float* out_h) {
  const F zero = set1(0.0f), last = set1(static_cast<float>(S - 1));
  const F max_x = set1(vol.max_x), max_y = set1(vol.max_y), max_z = set1(vol.max_z);
  const I sy = set1i(vol.stride_y), sz = set1i(vol.stride_z);
  const I cell_x = set1i(vol.cell_x), cell_y = set1i(vol.cell_y), cell_z = set1i(vol.cell_z);
  const F ox = set1(p0[0]), oy = set1(p0[1]), oz = set1(p0[2]);
  const F qx = set1(q[0]), qy = set1(q[1]), qz = set1(q[2]);
  F acc = zero, gx = zero, gy = zero, gz = zero, hx = zero, hy = zero, hz = zero;
  for (int s = 0; s < S; s += kWidth) {
    const F k = add(ramp(), set1(static_cast<float>(s)));
    const F w = inside(k, zero, last);  // tail lanes beyond the last sample weigh nothing
    const F rx = madd(k, qx, ox), ry = madd(k, qy, oy), rz = madd(k, qz, oz);
    const F x = clamp(rx, zero, max_x), y = clamp(ry, zero, max_y), z = clamp(rz, zero, max_z);
    // floor (coordinates are >= 0), at most the last cell: at x = N - 1, fx = 1
    const I xi = mini(to_index(x), cell_x), yi = mini(to_index(y), cell_y), zi = mini(to_index(z), cell_z);
    const F fx = sub(x, to_float(xi)), fy = sub(y, to_float(yi)), fz = sub(z, to_float(zi));
    const I i000 = addi(addi(muli(zi, sz), muli(yi, sy)), xi);
    const I i010 = addi(i000, sy), i100 = addi(i000, sz), i110 = addi(i100, sy);
    F a000, a001, a010, a011, a100, a101, a110, a111;  // a_zyx: the cell's corners
    gather_pair(vol.data, i000, a000, a001);
    gather_pair(vol.data, i010, a010, a011);
    gather_pair(vol.data, i100, a100, a101);
    gather_pair(vol.data, i110, a110, a111);
    const F e00 = lerp(a000, a001, fx), e01 = lerp(a010, a011, fx);  // along x, at (z, y) = (0,0), (0,1)
    const F e10 = lerp(a100, a101, fx), e11 = lerp(a110, a111, fx);
    const F c0 = lerp(e00, e01, fy), c1 = lerp(e10, e11, fy);
    acc = madd(lerp(c0, c1, fz), w, acc);
    if constexpr (kGrad) {
      const F dx0 = lerp(sub(a001, a000), sub(a011, a010), fy), dx1 = lerp(sub(a101, a100), sub(a111, a110), fy);
      const F dfx = mul(mul(lerp(dx0, dx1, fz), inside(rx, zero, max_x)), w);
      const F dfy = mul(mul(lerp(sub(e01, e00), sub(e11, e10), fz), inside(ry, zero, max_y)), w);
      const F dfz = mul(mul(sub(c1, c0), inside(rz, zero, max_z)), w);
      gx = add(gx, dfx), gy = add(gy, dfy), gz = add(gz, dfz);
      hx = madd(dfx, k, hx), hy = madd(dfy, k, hy), hz = madd(dfz, k, hz);
    }
  }
  *out_f = total(acc);
  if constexpr (kGrad) {
    out_g[0] = total(gx), out_g[1] = total(gy), out_g[2] = total(gz);
    out_h[0] = total(hx), out_h[1] = total(hy), out_h[2] = total(hz);
  }
}

void check_inputs(const torch::Tensor& padded, const torch::Tensor& p0, const torch::Tensor& q, int64_t S) {
  TORCH_CHECK_VALUE(padded.dim() == 3 && padded.scalar_type() == torch::kFloat32 && padded.is_contiguous() &&
                        padded.device().is_cpu(),
                    "padded must be a contiguous float32 CPU tensor (D, H, W), got ", padded.sizes(), " ",
                    padded.scalar_type());
  TORCH_CHECK_VALUE(padded.size(0) >= 2 && padded.size(1) >= 2 && padded.size(2) >= 2,
                    "padded must be at least 2 voxels along every axis, got ", padded.sizes());
  TORCH_CHECK_VALUE(padded.numel() < (int64_t(1) << 31), "volume too large for 32-bit indices: ", padded.sizes());
  for (const auto* t : {&p0, &q}) {
    TORCH_CHECK_VALUE(t->size(-1) == 3 && t->scalar_type() == torch::kFloat32 && t->is_contiguous() &&
                          t->device().is_cpu(),
                      "p0 and q must be contiguous float32 CPU tensors (..., 3), got ", t->sizes(), " ",
                      t->scalar_type());
  }
  TORCH_CHECK_VALUE(p0.sizes() == q.sizes(), "p0 and q must have the same shape, got ", p0.sizes(), " and ", q.sizes());
  TORCH_CHECK_VALUE(S >= 1 && S < (int64_t(1) << 24), "n_samples must be in [1, 2^24), got ", S);
}

}  // namespace

// Returns [F] or, with with_grad, [F, G, H]; F has p0's shape without its last axis.
std::vector<torch::Tensor> sample_sums(torch::Tensor padded, torch::Tensor p0, torch::Tensor q, int64_t n_samples,
                                       bool with_grad) {
  check_inputs(padded, p0, q, n_samples);
  const auto batch = p0.sizes().slice(0, p0.dim() - 1);
  const int64_t n = p0.numel() / 3;
  auto f = torch::empty(batch, p0.options());
  torch::Tensor g, h;
  if (with_grad) {
    g = torch::empty_like(p0);
    h = torch::empty_like(p0);
  }
  const int D = static_cast<int>(padded.size(0)), H = static_cast<int>(padded.size(1)),
            W = static_cast<int>(padded.size(2));
  const Volume vol{padded.data_ptr<float>(), W, W * H, static_cast<float>(W - 1), static_cast<float>(H - 1),
                   static_cast<float>(D - 1), W - 2, H - 2, D - 2};
  const float* pp = p0.data_ptr<float>();
  const float* qq = q.data_ptr<float>();
  float* ff = f.data_ptr<float>();
  float* gg = with_grad ? g.data_ptr<float>() : nullptr;
  float* hh = with_grad ? h.data_ptr<float>() : nullptr;
  const int S = static_cast<int>(n_samples);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (with_grad) {
        ray_sums<true>(vol, pp + 3 * r, qq + 3 * r, S, ff + r, gg + 3 * r, hh + 3 * r);
      } else {
        ray_sums<false>(vol, pp + 3 * r, qq + 3 * r, S, ff + r, nullptr, nullptr);
      }
    }
  });
  if (with_grad) return {f, g, h};
  return {f};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_sums", &sample_sums, "Sums of trilinear samples along rays (and their gradients)");
  m.attr("isa") = simd::kIsa;
  m.attr("width") = simd::kWidth;
}
