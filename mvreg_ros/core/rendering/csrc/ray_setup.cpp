// The native backend's ray set-up and its backward, in C++: what renderer.py's ray_samples computes
// (the reference; a test compares values and gradients), for every ray of every view, and the
// gradient of the rendered integrals with respect to each view's T_index_from_cam, reduced over
// the view's rays here. Before, torch.compile ran the set-up; its backward wrote a 12-number
// gradient per ray in float64 for ATen to sum (about a fifth of a refinement's time).
//
// Ray r of view v: T = T_index_from_cam[v] (3 x 4), d = d_cam[:, v, r] (unit, camera axes):
//   o = T[:, 3], dir = T[:, :3] d
//   per axis k: ou = (o_k + 0.5) / n_k, du = dir_k / n_k, s = du if |du| >= 1e-15 else 1e-15,
//               near_k = min(-ou / s, (1 - ou) / s), far_k = max(...)
//   t_near = max(max(max(near_0, near_1), near_2), 0), t_far = max(min(min(far_0, far_1), far_2), t_near)
//   h = (t_far - t_near) / S, p0 = o + (t_near + h / 2) dir + 1, q = h dir
//   out = sample_sums(p0, q) * h      (float32, as the reference's f * h.to(float32))
// float64 throughout, as the reference; torch's conventions at ties (max and min split the gradient
// in half; clamp_min passes it at the bound) so that the rays that miss the volume get none.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

std::vector<torch::Tensor> sample_sums_ordered(torch::Tensor padded, torch::Tensor p0, torch::Tensor q,
                                               int64_t n_samples, bool with_grad, int64_t poses,
                                               const std::vector<int64_t>& shape, bool prefetch);
std::array<int64_t, 3> volume_dims(const torch::Tensor& padded, const std::vector<int64_t>& shape);

namespace {

struct Ray {
  double o[3], dir[3], ou[3], s[3], t0[3], t1[3], near[3], far[3];
  bool free_du[3];
  double nmax01, nmax, t_near, fmin01, fmin, t_far, h, t_first;
};

inline Ray setup(const double* T, const double* d, int64_t stride, const double n[3], int S) {
  Ray r;
  const double d0 = d[0], d1 = d[stride], d2 = d[2 * stride];
  for (int c = 0; c < 3; ++c) {
    r.o[c] = T[c * 4 + 3];
    r.dir[c] = d0 * T[c * 4 + 0] + d1 * T[c * 4 + 1] + d2 * T[c * 4 + 2];
  }
  for (int k = 0; k < 3; ++k) {
    r.ou[k] = (r.o[k] + 0.5) / n[k];
    const double du = r.dir[k] / n[k];
    r.free_du[k] = !(std::abs(du) < 1e-15);
    r.s[k] = r.free_du[k] ? du : 1e-15;
    r.t0[k] = -r.ou[k] / r.s[k];
    r.t1[k] = (1 - r.ou[k]) / r.s[k];
    r.near[k] = std::min(r.t0[k], r.t1[k]);
    r.far[k] = std::max(r.t0[k], r.t1[k]);
  }
  r.nmax01 = std::max(r.near[0], r.near[1]);
  r.nmax = std::max(r.nmax01, r.near[2]);
  r.t_near = std::max(r.nmax, 0.0);
  r.fmin01 = std::min(r.far[0], r.far[1]);
  r.fmin = std::min(r.fmin01, r.far[2]);
  r.t_far = std::max(r.fmin, r.t_near);
  r.h = (r.t_far - r.t_near) / S;
  r.t_first = r.t_near + 0.5 * r.h;
  return r;
}

// torch.maximum's backward: the gradient to the larger input, half to each at a tie
inline void max_back(double a, double b, double g, double& ga, double& gb) {
  if (a > b) {
    ga += g;
  } else if (b > a) {
    gb += g;
  } else {
    ga += 0.5 * g;
    gb += 0.5 * g;
  }
}

// torch.minimum's backward
inline void min_back(double a, double b, double g, double& ga, double& gb) { max_back(-a, -b, g, ga, gb); }

void check_setup(const torch::Tensor& T, const torch::Tensor& d_cam) {
  TORCH_CHECK_VALUE(T.device().is_cpu() && d_cam.device().is_cpu(), "T and d_cam must be on the CPU");
  TORCH_CHECK_VALUE(T.scalar_type() == torch::kDouble && d_cam.scalar_type() == torch::kDouble,
                    "T and d_cam must be float64");
  TORCH_CHECK_VALUE(T.dim() == 3 && T.size(1) == 3 && T.size(2) == 4 && T.is_contiguous(),
                    "T must be a contiguous (V, 3, 4)");
  TORCH_CHECK_VALUE(d_cam.dim() == 3 && d_cam.size(0) == 3 && d_cam.size(1) == T.size(0) && d_cam.is_contiguous(),
                    "d_cam must be a contiguous (3, V, R)");
}

// the unpadded volume's voxels per index axis (i, j, k) = (x, y, z), from the padded (D + 2, H + 2, W + 2)
void unpadded_ijk(const std::array<int64_t, 3>& dims, double n[3]) {
  TORCH_CHECK_VALUE(dims[0] >= 3 && dims[1] >= 3 && dims[2] >= 3,
                    "padded must be (D + 2, H + 2, W + 2) with at least one voxel per axis");
  n[0] = static_cast<double>(dims[2] - 2);
  n[1] = static_cast<double>(dims[1] - 2);
  n[2] = static_cast<double>(dims[0] - 2);
}

constexpr int64_t kChunk = 2048;  // rays per partial sum of the backward (fixed: the sums do not depend on threads)

}  // namespace

// Returns [out (V, R) float32] or, with with_grad, [out, f, G, H]: the sums f and their gradients (planar),
// which render_rays_backward takes. poses > 1: the V renders are (poses, V / poses) flattened, from poses
// close together; the kernel runs one block of rays of every pose in turn (the same values, fewer reads
// from memory: trilinear_sums.cpp, sample_sums_ordered). prefetch: trilinear_sums.cpp's software prefetch in
// bricked volumes (the same values either way).
std::vector<torch::Tensor> render_rays(torch::Tensor T, torch::Tensor d_cam, torch::Tensor padded, int64_t n_samples,
                                       bool with_grad, int64_t poses, std::vector<int64_t> shape, bool prefetch) {
  check_setup(T, d_cam);
  const auto dims = volume_dims(padded, shape);
  TORCH_CHECK_VALUE(n_samples >= 1, "n_samples must be >= 1, got ", n_samples);
  TORCH_CHECK_VALUE(poses >= 1 && T.size(0) % poses == 0, "poses must be >= 1 and divide the ", T.size(0),
                    " renders, got ", poses);
  const int64_t V = T.size(0), R = d_cam.size(2), N = V * R;
  double n[3];
  unpadded_ijk(dims, n);
  const int S = static_cast<int>(n_samples);
  auto opts = torch::TensorOptions().dtype(torch::kFloat);
  auto p0 = torch::empty({3, V, R}, opts), q = torch::empty({3, V, R}, opts), h = torch::empty({V, R}, opts);
  float* pp = p0.data_ptr<float>();
  float* qq = q.data_ptr<float>();
  float* hh = h.data_ptr<float>();
  const double* TT = T.data_ptr<double>();
  const double* dd = d_cam.data_ptr<double>();
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Ray r = setup(TT + (i / R) * 12, dd + i, N, n, S);
      for (int c = 0; c < 3; ++c) {
        pp[c * N + i] = static_cast<float>(r.o[c] + r.t_first * r.dir[c] + 1);
        qq[c * N + i] = static_cast<float>(r.h * r.dir[c]);
      }
      hh[i] = static_cast<float>(r.h);
    }
  });
  auto sums =
      sample_sums_ordered(padded, p0.movedim(0, -1), q.movedim(0, -1), n_samples, with_grad, poses, shape, prefetch);
  auto out = sums[0] * h;
  if (!with_grad) return {out};
  return {out, sums[0], sums[1], sums[2]};
}

// d loss / d T (V, 3, 4) from the upstream gradient g (V, R) of render_rays' output, with its f, G and H.
// Each view's rays are summed in partial sums of kChunk rays. ray_index (V, R) int64, when given: the rays are a
// subset of each view's full image of image_pixels pixels (RaySubset), ray_index their indices there, ascending in
// each view (image_pixels itself: a padding ray, left out); the partial sums are then those of the full image's
// runs of kChunk pixels, so that, where the rays left out have a zero upstream gradient, the result is the full
// image's bit for bit.
torch::Tensor render_rays_backward(torch::Tensor g, torch::Tensor T, torch::Tensor d_cam, torch::Tensor padded,
                                   torch::Tensor f, torch::Tensor G, torch::Tensor H, int64_t n_samples,
                                   c10::optional<torch::Tensor> ray_index, int64_t image_pixels,
                                   std::vector<int64_t> shape) {
  check_setup(T, d_cam);
  const auto dims = volume_dims(padded, shape);
  const int64_t V = T.size(0), R = d_cam.size(2), N = V * R;
  TORCH_CHECK_VALUE(g.sizes() == f.sizes() && g.numel() == N, "g and f must be (V, R)");
  const int64_t* index = nullptr;
  int64_t span = R;  // the pixel indices a view's chunks cover
  if (ray_index.has_value()) {
    const auto& ri = *ray_index;
    TORCH_CHECK_VALUE(ri.device().is_cpu() && ri.scalar_type() == torch::kLong && ri.is_contiguous() &&
                          ri.dim() == 2 && ri.size(0) == V && ri.size(1) == R,
                      "ray_index must be a contiguous int64 CPU tensor (V, R) = (", V, ", ", R, "), got ", ri.sizes());
    TORCH_CHECK_VALUE(image_pixels >= 1, "ray_index needs image_pixels >= 1, got ", image_pixels);
    index = ri.data_ptr<int64_t>();
    span = image_pixels;
    for (int64_t v = 0; v < V; ++v) {
      const int64_t* row = index + v * R;
      for (int64_t r = 0; r < R; ++r) {
        TORCH_CHECK_VALUE(row[r] >= 0 && row[r] <= image_pixels && (r == 0 || row[r] >= row[r - 1]),
                          "ray_index must be in [0, image_pixels] and ascending in each view");
      }
    }
  }
  auto gc = g.to(torch::kFloat).contiguous();
  auto fc = f.contiguous();
  // G, H: (V, R, 3), planar from the kernel; read as (3, N)
  auto Gp = G.movedim(-1, 0).contiguous().reshape({3, N});
  auto Hp = H.movedim(-1, 0).contiguous().reshape({3, N});
  double n[3];
  unpadded_ijk(dims, n);
  const int S = static_cast<int>(n_samples);
  const int64_t chunks_per_view = (span + kChunk - 1) / kChunk;
  std::vector<double> partial(V * chunks_per_view * 12, 0.0);
  const double* TT = T.data_ptr<double>();
  const double* dd = d_cam.data_ptr<double>();
  const float* gg = gc.data_ptr<float>();
  const float* ff = fc.data_ptr<float>();
  const float* GG = Gp.data_ptr<float>();
  const float* HH = Hp.data_ptr<float>();
  at::parallel_for(0, V * chunks_per_view, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t v = chunk / chunks_per_view;
      int64_t r0 = (chunk % chunks_per_view) * kChunk, r1 = std::min(R, r0 + kChunk);
      if (index != nullptr) {  // the rays whose pixels lie in this run of the full image (not the padding)
        const int64_t* row = index + v * R;
        r1 = std::lower_bound(row, row + R, std::min(r0 + kChunk, span)) - row;
        r0 = std::lower_bound(row, row + R, r0) - row;
      }
      double* acc = partial.data() + chunk * 12;
      const double* Tv = TT + v * 12;
      for (int64_t rr = r0; rr < r1; ++rr) {
        const int64_t i = v * R + rr;
        const Ray r = setup(Tv, dd + i, N, n, S);
        const double hf = static_cast<float>(r.h);
        const double df = gg[i] * hf;              // d / d f
        double dh = double(gg[i]) * double(ff[i]);  // d / d h (the output's factor)
        double dp0[3], dq[3], ddir[3], d_o[3];
        double dt_first = 0;
        for (int c = 0; c < 3; ++c) {
          dp0[c] = df * GG[c * N + i];
          dq[c] = df * HH[c * N + i];
          d_o[c] = dp0[c];
          dt_first += dp0[c] * r.dir[c];
          ddir[c] = dp0[c] * r.t_first + dq[c] * r.h;
          dh += dq[c] * r.dir[c];
        }
        dh += 0.5 * dt_first;
        double dt_near = dt_first - dh / S, dt_far = dh / S;
        double dfmin = 0, dnmax = 0, dfmin01 = 0, dnmax01 = 0;
        max_back(r.fmin, r.t_near, dt_far, dfmin, dt_near);
        if (r.nmax >= 0) dnmax = dt_near;  // clamp_min(0)
        double dnear[3] = {0, 0, 0}, dfar[3] = {0, 0, 0};
        max_back(r.nmax01, r.near[2], dnmax, dnmax01, dnear[2]);
        max_back(r.near[0], r.near[1], dnmax01, dnear[0], dnear[1]);
        min_back(r.fmin01, r.far[2], dfmin, dfmin01, dfar[2]);
        min_back(r.far[0], r.far[1], dfmin01, dfar[0], dfar[1]);
        for (int k = 0; k < 3; ++k) {
          double dt0 = 0, dt1 = 0;
          min_back(r.t0[k], r.t1[k], dnear[k], dt0, dt1);
          max_back(r.t0[k], r.t1[k], dfar[k], dt0, dt1);
          const double s = r.s[k];
          const double dou = -(dt0 + dt1) / s;
          d_o[k] += dou / n[k];
          if (r.free_du[k]) ddir[k] += (dt0 * r.ou[k] - dt1 * (1 - r.ou[k])) / (s * s) / n[k];
        }
        const double dk[3] = {dd[i], dd[N + i], dd[2 * N + i]};
        for (int c = 0; c < 3; ++c) {
          acc[c * 4 + 0] += ddir[c] * dk[0];
          acc[c * 4 + 1] += ddir[c] * dk[1];
          acc[c * 4 + 2] += ddir[c] * dk[2];
          acc[c * 4 + 3] += d_o[c];
        }
      }
    }
  });
  auto dT = torch::zeros({V, 3, 4}, torch::dtype(torch::kDouble));
  double* out = dT.data_ptr<double>();
  for (int64_t v = 0; v < V; ++v)
    for (int64_t c = 0; c < chunks_per_view; ++c)
      for (int j = 0; j < 12; ++j) out[v * 12 + j] += partial[(v * chunks_per_view + c) * 12 + j];
  return dT;
}
