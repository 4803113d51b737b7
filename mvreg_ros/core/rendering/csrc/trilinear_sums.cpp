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
// The lanes of one SIMD vector are consecutive rays (neighbouring pixels), which step through their
// samples together: at each step the lanes read neighbouring voxels, so one block's gathers share cache
// lines (the volume of a full-resolution CT is far larger than the caches; with the lanes on consecutive
// samples of one ray, each lane read its own lines, and the kernel waited on memory). Each lane's sums
// are its ray's: no horizontal reduction. Volume reads are hardware gathers (AVX-512: one 64-bit load
// per pair of x-neighbours; AVX2 with F16C), with a scalar build for other CPUs. The volume may be float32
// or float16 (IEEE half; one 32-bit load per pair of x-neighbours, converted to float32 for the
// arithmetic, which is float32 either way: half the bytes of a volume far larger than the caches). A float16
// volume may also come bricked (BrickedVolume: 4 x 4 x 2 voxels per cache line, a cell's corners in about half
// the lines; the same values), the layout the renderer gives a volume larger than the caches.
// Blocks of rays run in parallel on ATen's intra-op threads (torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include <c10/util/Half.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
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
// the same from a float16 volume: one 32-bit load per lane holds both neighbours
inline void gather_pair(const uint16_t* base, I idx, F& lo, F& hi) {
  const I v = _mm512_i32gather_epi32(idx, base, 2);
  lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
  hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
}
inline F inside(F x, F lo, F hi) {  // 1 where lo <= x <= hi, else 0
  const __mmask16 m = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, hi, _CMP_LE_OQ);
  return _mm512_maskz_mov_ps(m, set1(1.0f));
}
inline I andi(I a, I b) { return _mm512_and_si512(a, b); }
inline I srli(I a, int n) { return _mm512_srli_epi32(a, n); }
inline I slli(I a, int n) { return _mm512_slli_epi32(a, n); }
inline I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
inline F load(const float* p) { return _mm512_load_ps(p); }
inline void store(float* p, F x) { _mm512_store_ps(p, x); }
inline void storei(int* p, I x) { _mm512_storeu_si512(p, x); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
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
inline void gather_pair(const uint16_t* base, I idx, F& lo, F& hi) {
  const I v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 2);
  // the low and the high half of each lane, packed into 8 halves each (within 128-bit lanes, then across)
  const I pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,  //
                                  0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const I w = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0xD8);  // (lo0, lo1, hi0, hi1)
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(w));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
}
inline F inside(F x, F lo, F hi) {
  const F m = _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LE_OQ));
  return _mm256_and_ps(m, set1(1.0f));
}
inline I andi(I a, I b) { return _mm256_and_si256(a, b); }
inline I srli(I a, int n) { return _mm256_srli_epi32(a, n); }
inline I slli(I a, int n) { return _mm256_slli_epi32(a, n); }
inline I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
inline F load(const float* p) { return _mm256_load_ps(p); }
inline void store(float* p, F x) { _mm256_store_ps(p, x); }
inline void storei(int* p, I x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
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
inline void gather_pair(const uint16_t* base, I idx, F& lo, F& hi) {
  lo = c10::detail::fp16_ieee_to_fp32_value(base[idx]);
  hi = c10::detail::fp16_ieee_to_fp32_value(base[idx + 1]);
}
inline I andi(I a, I b) { return a & b; }
inline I srli(I a, int n) { return static_cast<I>(static_cast<uint32_t>(a) >> n); }
inline I slli(I a, int n) { return a << n; }
inline I sub_i(I a, I b) { return a - b; }
inline F inside(F x, F lo, F hi) { return (x >= lo && x <= hi) ? 1.0f : 0.0f; }
inline F load(const float* p) { return *p; }
inline void store(float* p, F x) { *p = x; }
inline void storei(int* p, I x) { *p = x; }
#endif
}  // namespace simd

namespace {

using namespace simd;

inline F lerp(F a, F b, F t) { return madd(sub(b, a), t, a); }

template <typename T>  // float, or uint16_t: the bits of float16 values
struct Volume {
  const T* data;
  int stride_y, stride_z;
  float max_x, max_y, max_z;  // largest coordinate: N - 1
  int cell_x, cell_y, cell_z;  // largest cell index: N - 2
};

// A float16 volume stored in bricks of 4 x 4 x 2 voxels (x, y, z; x fastest in a brick, then y, then z), one
// brick per 64-byte cache line, the bricks overlapping by one voxel along x: brick b holds x = 3b .. 3b + 3, so
// the cells x = 3b .. 3b + 2 find both x-neighbours in it (one 32-bit load per pair, as the plain layout). A
// cell's 8 corners then lie in 1.9 cache lines on average instead of 4 (the rows of the plain layout are a
// line each), and a volume far larger than the caches is read from memory about half as often, for a third
// more memory. native.py's bricked() makes it; the values read are the plain layout's.
struct BrickedVolume {
  const uint16_t* data;
  int brick_row, brick_slab;  // elements between bricks along y, and along z
  float max_x, max_y, max_z;
  int cell_x, cell_y, cell_z;
};

// the 8 corners of each lane's cell (xi, yi, zi): a_zyx
template <typename T>
inline void corners(const Volume<T>& vol, I xi, I yi, I zi, F a[8]) {
  const I sy = set1i(vol.stride_y), sz = set1i(vol.stride_z);
  const I i000 = addi(addi(muli(zi, sz), muli(yi, sy)), xi);
  const I i010 = addi(i000, sy), i100 = addi(i000, sz), i110 = addi(i100, sy);
  gather_pair(vol.data, i000, a[0], a[1]);
  gather_pair(vol.data, i010, a[2], a[3]);
  gather_pair(vol.data, i100, a[4], a[5]);
  gather_pair(vol.data, i110, a[6], a[7]);
}

// each axis's part of an element's offset in a BrickedVolume: x -> (x / 3) * 32 + x % 3 (x / 3 as
// (x * 43691) >> 17, exact for x < 2^17, and x * 43691 < 2^31 for x < 49152: volume_dims limits the width),
// y -> (y / 4) * brick_row + (y % 4) * 4, z -> (z / 2) * brick_slab + (z % 2) * 16
inline I brick_x(I xi) {
  const I bx = srli(muli(xi, set1i(43691)), 17);
  return addi(slli(bx, 5), sub_i(xi, muli(bx, set1i(3))));
}
inline I brick_y(const BrickedVolume& vol, I yi) {
  return addi(muli(srli(yi, 2), set1i(vol.brick_row)), slli(andi(yi, set1i(3)), 2));
}
inline I brick_z(const BrickedVolume& vol, I zi) {
  return addi(muli(srli(zi, 1), set1i(vol.brick_slab)), slli(andi(zi, set1i(1)), 4));
}

inline void corners(const BrickedVolume& vol, I xi, I yi, I zi, F a[8]) {
  const I one = set1i(1), x0 = brick_x(xi);
  const I y0 = brick_y(vol, yi), y1 = brick_y(vol, addi(yi, one));
  const I z0 = brick_z(vol, zi), z1 = brick_z(vol, addi(zi, one));
  gather_pair(vol.data, addi(addi(z0, y0), x0), a[0], a[1]);
  gather_pair(vol.data, addi(addi(z0, y1), x0), a[2], a[3]);
  gather_pair(vol.data, addi(addi(z1, y0), x0), a[4], a[5]);
  gather_pair(vol.data, addi(addi(z1, y1), x0), a[6], a[7]);
}

// Software prefetch of the sample kPrefetchAhead steps ahead: the cache line of each lane's cell corner
// (x0, y0, z0). In a bricked volume far larger than the caches (the finest level's unpooled CT) a sample's
// lines come from memory, and the gathers would wait on them; the hardware prefetchers cannot guess a ray's
// next line. A prefetch is a hint: it changes no value (the same sums bit for bit). Measured on a 2-core Zen 4
// VM (README *Speed*): one 2-view render at 128 px 15 to 25 % faster; 1 to 3 steps ahead alike, the line of
// the opposite corner as well no better. A plain volume (the pooled levels, cache-resident) is not prefetched.
// render_rays(prefetch=false) leaves it out (the reference, and for A/B timings).
constexpr int kPrefetchAhead = 2;

template <typename T>
inline void prefetch_cell(const Volume<T>&, I, I, I) {}

inline void prefetch_cell(const BrickedVolume& vol, I xi, I yi, I zi) {
  alignas(64) int offset[kWidth];
  storei(offset, addi(addi(brick_z(vol, zi), brick_y(vol, yi)), brick_x(xi)));
  for (int l = 0; l < kWidth; ++l) __builtin_prefetch(vol.data + offset[l]);
}

// kWidth consecutive rays (n <= kWidth of them; the other lanes compute on zeros and are not stored), one
// per lane, all their samples in turn: at each step the lanes read neighbouring voxels (neighbouring
// pixels' rays), so the gathers of a block share cache lines; each lane's sums are its ray's.
struct Strides {  // of a (rays, 3) array: between rays, between coordinates
  int64_t ray, coord;
};

template <bool kGrad, typename Vol>
void ray_block(const Vol& vol, const float* p0, Strides sp, const float* q, Strides sq, int n, int S,
               float* out_f, float* out_g, float* out_h, int64_t out_coord, bool prefetch) {
  alignas(64) float buf[6][kWidth];  // p0 and q of the block's rays, one array per coordinate
  for (int c = 0; c < 6; ++c) {
    const float* src = c < 3 ? p0 + c * sp.coord : q + (c - 3) * sq.coord;
    const int64_t step = c < 3 ? sp.ray : sq.ray;
    for (int l = 0; l < kWidth; ++l) buf[c][l] = l < n ? src[l * step] : 0.0f;
  }
  const F zero = set1(0.0f);
  const F max_x = set1(vol.max_x), max_y = set1(vol.max_y), max_z = set1(vol.max_z);
  const I cell_x = set1i(vol.cell_x), cell_y = set1i(vol.cell_y), cell_z = set1i(vol.cell_z);
  const F ox = load(buf[0]), oy = load(buf[1]), oz = load(buf[2]);
  const F qx = load(buf[3]), qy = load(buf[4]), qz = load(buf[5]);
  F acc = zero, gx = zero, gy = zero, gz = zero, hx = zero, hy = zero, hz = zero;
  // floor (coordinates are >= 0), at most the last cell: at x = N - 1, fx = 1
  auto cell = [](F x, I last) { return mini(to_index(x), last); };
  for (int s = 0; s < S; ++s) {
    const F k = set1(static_cast<float>(s));
    if (prefetch && s + kPrefetchAhead < S) {
      const F kp = set1(static_cast<float>(s + kPrefetchAhead));
      prefetch_cell(vol, cell(clamp(madd(kp, qx, ox), zero, max_x), cell_x),
                    cell(clamp(madd(kp, qy, oy), zero, max_y), cell_y), cell(clamp(madd(kp, qz, oz), zero, max_z), cell_z));
    }
    const F rx = madd(k, qx, ox), ry = madd(k, qy, oy), rz = madd(k, qz, oz);
    const F x = clamp(rx, zero, max_x), y = clamp(ry, zero, max_y), z = clamp(rz, zero, max_z);
    const I xi = cell(x, cell_x), yi = cell(y, cell_y), zi = cell(z, cell_z);
    const F fx = sub(x, to_float(xi)), fy = sub(y, to_float(yi)), fz = sub(z, to_float(zi));
    F a[8];  // a_zyx: the cell's corners
    corners(vol, xi, yi, zi, a);
    const F a000 = a[0], a001 = a[1], a010 = a[2], a011 = a[3], a100 = a[4], a101 = a[5], a110 = a[6], a111 = a[7];
    const F e00 = lerp(a000, a001, fx), e01 = lerp(a010, a011, fx);  // along x, at (z, y) = (0,0), (0,1)
    const F e10 = lerp(a100, a101, fx), e11 = lerp(a110, a111, fx);
    const F c0 = lerp(e00, e01, fy), c1 = lerp(e10, e11, fy);
    acc = add(acc, lerp(c0, c1, fz));
    if constexpr (kGrad) {
      const F dx0 = lerp(sub(a001, a000), sub(a011, a010), fy), dx1 = lerp(sub(a101, a100), sub(a111, a110), fy);
      const F dfx = mul(lerp(dx0, dx1, fz), inside(rx, zero, max_x));
      const F dfy = mul(lerp(sub(e01, e00), sub(e11, e10), fz), inside(ry, zero, max_y));
      const F dfz = mul(sub(c1, c0), inside(rz, zero, max_z));
      gx = add(gx, dfx), gy = add(gy, dfy), gz = add(gz, dfz);
      hx = madd(dfx, k, hx), hy = madd(dfy, k, hy), hz = madd(dfz, k, hz);
    }
  }
  alignas(64) float res[7][kWidth];
  store(res[0], acc);
  for (int l = 0; l < n; ++l) out_f[l] = res[0][l];
  if constexpr (kGrad) {
    store(res[1], gx), store(res[2], gy), store(res[3], gz), store(res[4], hx), store(res[5], hy), store(res[6], hz);
    for (int c = 0; c < 3; ++c) {  // planar: coordinate c of ray l at c * out_coord + l
      for (int l = 0; l < n; ++l) out_g[c * out_coord + l] = res[1 + c][l], out_h[c * out_coord + l] = res[4 + c][l];
    }
  }
}

}  // namespace

// The padded volume's (D, H, W): its sizes, or, for a bricked volume (1-D float16, native.py's bricked()),
// ``shape``; checks the volume's dtype, layout and size.
std::array<int64_t, 3> volume_dims(const torch::Tensor& padded, const std::vector<int64_t>& shape) {
  TORCH_CHECK_VALUE(padded.is_contiguous() && padded.device().is_cpu(), "padded must be a contiguous CPU tensor");
  std::array<int64_t, 3> dims;
  if (padded.dim() == 1) {
    TORCH_CHECK_VALUE(padded.scalar_type() == torch::kHalf && shape.size() == 3,
                      "a bricked volume must be float16 with its shape (D, H, W), got ", padded.scalar_type(),
                      " and a shape of ", shape.size(), " numbers");
    dims = {shape[0], shape[1], shape[2]};
    for (const int64_t n : dims) TORCH_CHECK_VALUE(n >= 2 && n < (int64_t(1) << 31), "bad bricked shape entry ", n);
    TORCH_CHECK_VALUE(shape[2] <= 49152, "a bricked volume is at most 49152 voxels wide, got ", shape[2]);
    const int64_t bricks = ((dims[0] + 1) / 2) * ((dims[1] + 3) / 4) * ((dims[2] + 1) / 3);
    TORCH_CHECK_VALUE(padded.numel() >= bricks * 32 + 2, "a bricked volume of shape (", dims[0], ", ", dims[1], ", ",
                      dims[2], ") needs at least ", bricks * 32 + 2, " elements, got ", padded.numel());
  } else {
    TORCH_CHECK_VALUE(padded.dim() == 3 &&
                          (padded.scalar_type() == torch::kFloat32 || padded.scalar_type() == torch::kHalf),
                      "padded must be a contiguous float32 or float16 CPU tensor (D, H, W), got ", padded.sizes(), " ",
                      padded.scalar_type());
    TORCH_CHECK_VALUE(shape.empty() || shape == padded.sizes().vec(), "shape ", c10::IntArrayRef(shape),
                      " given for a plain volume of sizes ", padded.sizes());
    dims = {padded.size(0), padded.size(1), padded.size(2)};
  }
  TORCH_CHECK_VALUE(dims[0] >= 2 && dims[1] >= 2 && dims[2] >= 2, "padded must be at least 2 voxels along every axis, got (",
                    dims[0], ", ", dims[1], ", ", dims[2], ")");
  TORCH_CHECK_VALUE(padded.numel() < (int64_t(1) << 31), "volume too large for 32-bit indices: ", padded.numel(),
                    " elements");
  return dims;
}

namespace {

void check_inputs(const torch::Tensor& p0, const torch::Tensor& q, int64_t S) {
  for (const auto* t : {&p0, &q}) {
    TORCH_CHECK_VALUE(t->dim() >= 1 && t->size(-1) == 3 && t->scalar_type() == torch::kFloat32 &&
                          t->device().is_cpu(),
                      "p0 and q must be float32 CPU tensors (..., 3), got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(p0.sizes() == q.sizes(), "p0 and q must have the same shape, got ", p0.sizes(), " and ", q.sizes());
  TORCH_CHECK_VALUE(S >= 1 && S < (int64_t(1) << 24), "n_samples must be in [1, 2^24), got ", S);
}

}  // namespace

// (rays, 3) with the rays' leading axes flattened: a view where the strides allow (contiguous, or planar
// as the renderer's set-up makes them: the coordinates of all rays in turn), else a copy
torch::Tensor rays_by_coord(const torch::Tensor& t) { return t.reshape({-1, 3}); }

// Returns [F] or, with with_grad, [F, G, H]; F has p0's shape without its last axis. p0 and q may be
// contiguous or planar (``x.movedim(0, -1)`` of a contiguous (3, ...)); G and H are planar.
// poses > 1: p0 is (poses * views, R, 3), render k * views + v being view v seen from pose k, and the
// poses lie close together (a curvature's finite differences): the blocks of rays go in the order (view,
// block of R, pose), so that one block's rays from every pose run in turn and share the cache lines they
// read (a volume far larger than the caches is read from memory about once instead of once per pose). Each
// lane's sums are its own ray's, so the order changes no value.
std::vector<torch::Tensor> sample_sums_ordered(torch::Tensor padded, torch::Tensor p0, torch::Tensor q,
                                               int64_t n_samples, bool with_grad, int64_t poses,
                                               const std::vector<int64_t>& shape, bool prefetch) {
  const auto dims = volume_dims(padded, shape);
  check_inputs(p0, q, n_samples);
  TORCH_CHECK_VALUE(poses >= 1, "poses must be >= 1, got ", poses);
  TORCH_CHECK_VALUE(poses == 1 || (p0.dim() == 3 && p0.size(0) % poses == 0),
                    "poses > 1 needs p0 of shape (poses * views, R, 3), got ", p0.sizes(), " for ", poses,
                    " poses");
  const auto batch = p0.sizes().slice(0, p0.dim() - 1);
  const torch::Tensor p = rays_by_coord(p0), d = rays_by_coord(q);
  const int64_t n = p.size(0);
  const Strides sp{p.stride(0), p.stride(1)}, sq{d.stride(0), d.stride(1)};
  auto f = torch::empty(batch, p0.options());
  torch::Tensor g, h;
  if (with_grad) {
    std::vector<int64_t> planar{3};
    planar.insert(planar.end(), batch.begin(), batch.end());
    g = torch::empty(planar, p0.options()).movedim(0, -1);
    h = torch::empty(planar, p0.options()).movedim(0, -1);
  }
  const float* pp = p.data_ptr<float>();
  const float* qq = d.data_ptr<float>();
  float* ff = f.data_ptr<float>();
  float* gg = with_grad ? g.data_ptr<float>() : nullptr;
  float* hh = with_grad ? h.data_ptr<float>() : nullptr;
  const int S = static_cast<int>(n_samples);
  // poses == 1: blocks of kWidth consecutive rays of all of them; else of one render's rays, in the
  // order (view, block, pose)
  const int64_t R = poses == 1 ? n : p0.size(1), per_render = (R + kWidth - 1) / kWidth;
  const int64_t views = poses == 1 ? 1 : p0.size(0) / poses;
  const int64_t blocks = poses == 1 ? (n + kWidth - 1) / kWidth : views * per_render * poses;
  auto run = [&](const auto& vol) {
    at::parallel_for(0, blocks, (64 + kWidth - 1) / kWidth, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t r, left;  // the block's first ray, and the rays from there to the end of its render
        if (poses == 1) {
          r = b * kWidth, left = n - r;
        } else {
          const int64_t k = b % poses, j = (b / poses) % per_render, v = b / (poses * per_render);
          r = (k * views + v) * R + j * kWidth, left = R - j * kWidth;
        }
        const int m = static_cast<int>(std::min<int64_t>(kWidth, left));
        const float* pr = pp + r * sp.ray;
        const float* qr = qq + r * sq.ray;
        if (with_grad) {
          ray_block<true>(vol, pr, sp, qr, sq, m, S, ff + r, gg + r, hh + r, n, prefetch);
        } else {
          ray_block<false>(vol, pr, sp, qr, sq, m, S, ff + r, nullptr, nullptr, n, prefetch);
        }
      }
    });
  };
  const int D = static_cast<int>(dims[0]), H = static_cast<int>(dims[1]), W = static_cast<int>(dims[2]);
  const float max_x = static_cast<float>(W - 1), max_y = static_cast<float>(H - 1), max_z = static_cast<float>(D - 1);
  if (padded.dim() == 1) {  // bricked float16
    const auto* bits = reinterpret_cast<const uint16_t*>(padded.data_ptr<at::Half>());
    const int row = ((W + 1) / 3) * 32;  // bricks along x: the cells 0 .. W - 2, three per brick
    run(BrickedVolume{bits, row, ((H + 3) / 4) * row, max_x, max_y, max_z, W - 2, H - 2, D - 2});
  } else if (padded.scalar_type() == torch::kHalf) {  // half the bytes per read: a big volume waits less on memory
    const auto* bits = reinterpret_cast<const uint16_t*>(padded.data_ptr<at::Half>());
    run(Volume<uint16_t>{bits, W, W * H, max_x, max_y, max_z, W - 2, H - 2, D - 2});
  } else {
    run(Volume<float>{padded.data_ptr<float>(), W, W * H, max_x, max_y, max_z, W - 2, H - 2, D - 2});
  }
  if (with_grad) return {f, g, h};
  return {f};
}

std::vector<torch::Tensor> sample_sums(torch::Tensor padded, torch::Tensor p0, torch::Tensor q, int64_t n_samples,
                                       bool with_grad, std::vector<int64_t> shape) {
  return sample_sums_ordered(padded, p0, q, n_samples, with_grad, 1, shape, true);
}

// patch_ncc.cpp: the refinement's similarity, fused (built into the same extension)
std::vector<torch::Tensor> patch_ncc(torch::Tensor drr, torch::Tensor w, torch::Tensor wy, torch::Tensor swi,
                                     torch::Tensor swc, torch::Tensor my, torch::Tensor syy, torch::Tensor coef,
                                     int64_t image_channels, int64_t patch, bool with_grad);

// ray_setup.cpp: the native backend's ray set-up and its backward
std::vector<torch::Tensor> render_rays(torch::Tensor T, torch::Tensor d_cam, torch::Tensor padded, int64_t n_samples,
                                       bool with_grad, int64_t poses, std::vector<int64_t> shape, bool prefetch);
torch::Tensor render_rays_backward(torch::Tensor g, torch::Tensor T, torch::Tensor d_cam, torch::Tensor padded,
                                   torch::Tensor f, torch::Tensor G, torch::Tensor H, int64_t n_samples,
                                   c10::optional<torch::Tensor> ray_index, int64_t image_pixels,
                                   std::vector<int64_t> shape);

// pose_chain.cpp: the refinement's pose chain (twist to pose, pose to T_index_from_cam) and its backward
std::vector<torch::Tensor> pose_about_forward(torch::Tensor T0, torch::Tensor c, torch::Tensor w, torch::Tensor t);
std::vector<torch::Tensor> pose_about_backward(torch::Tensor T0, torch::Tensor c, torch::Tensor w, torch::Tensor R,
                                               torch::Tensor grad_T);
torch::Tensor index_from_cam_forward(torch::Tensor T_index_from_ct, torch::Tensor T_cam_from_ct);
torch::Tensor index_from_cam_backward(torch::Tensor T_index_from_ct, torch::Tensor T_cam_from_ct, torch::Tensor grad);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("render_rays", &render_rays, "Ray set-up and sums: the native backend's render of (V, R) rays",
        py::arg("T"), py::arg("d_cam"), py::arg("padded"), py::arg("n_samples"), py::arg("with_grad"),
        py::arg("poses") = 1, py::arg("shape") = std::vector<int64_t>{}, py::arg("prefetch") = true);
  m.def("render_rays_backward", &render_rays_backward, "d loss / d T_index_from_cam of render_rays", py::arg("g"),
        py::arg("T"), py::arg("d_cam"), py::arg("padded"), py::arg("f"), py::arg("G"), py::arg("H"),
        py::arg("n_samples"), py::arg("ray_index") = py::none(), py::arg("image_pixels") = 0,
        py::arg("shape") = std::vector<int64_t>{});
  m.def("sample_sums", &sample_sums, "Sums of trilinear samples along rays (and their gradients)", py::arg("padded"),
        py::arg("p0"), py::arg("q"), py::arg("n_samples"), py::arg("with_grad"),
        py::arg("shape") = std::vector<int64_t>{});
  m.def("patch_ncc", &patch_ncc, "PreparedSimilarity's value per render (and its gradient), fused");
  m.def("pose_about_forward", &pose_about_forward, "twist.pose_about's pose and rotation (float64, CPU)");
  m.def("pose_about_backward", &pose_about_backward, "twist.pose_about's gradients of w and t");
  m.def("index_from_cam_forward", &index_from_cam_forward, "renderer.index_from_cam (float64, CPU)");
  m.def("index_from_cam_backward", &index_from_cam_backward, "renderer.index_from_cam's gradient of T_cam_from_ct");
  m.attr("isa") = simd::kIsa;
  m.attr("width") = simd::kWidth;
}
