// The refinement's pose chain in C++, float64: each iteration turns its twist into the poses the
// renderer reads, and the gradient back, through a few 4 x 4 products. As ATen operations these were
// about forty calls on tiny tensors (0.8 ms per iteration forward and backward on the 2-core VM, a
// seventh of a refinement); here each direction is one call. The references are
// geometry/twist.py's pose_about_reference and renderer.py's index_from_cam_reference (tests compare
// values and gradients, including zero and 180 degrees); the formulas are theirs in the same order,
// so the values agree to rounding (the compiler may fuse multiply-adds, ATen may sum in another order),
// and exactly at a zero twist (the start of every level, and every Newton step's gradient).
//
// pose_about:     T = T0 @ Tc @ [exp(w) | t] @ Tc^-1, Tc the translation to c (geometry/twist.py)
// index_from_cam: (T_index_from_ct @ invert(T_cam_from_ct))[:3]  (renderer.py; invert as R^T, -R^T t)
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

constexpr double kSmall2 = 1e-12;        // transforms.so3_exp: below this squared angle, its series
constexpr double kSeriesTheta2 = 1e-4;  // twist.so3_exp_vjp: below this squared angle, its series

void check_f64(const torch::Tensor& x, const char* name, std::vector<int64_t> tail) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == torch::kFloat64 && x.is_contiguous(), name,
                    " must be a contiguous float64 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const auto n = static_cast<int64_t>(tail.size());
  TORCH_CHECK_VALUE(x.dim() == n + 1, name, " must have ", n + 1, " dimensions, got ", x.sizes());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(x.size(i + 1) == tail[i], name, " must be (B, ", c10::IntArrayRef(tail), "), got ", x.sizes());
  }
}

// C = A @ B for 4 x 4 row-major matrices, each entry summed k = 0..3 in turn
inline void matmul4(const double* A, const double* B, double* C) {
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      double acc = 0.0;
      for (int k = 0; k < 4; ++k) acc += A[i * 4 + k] * B[k * 4 + j];
      C[i * 4 + j] = acc;
    }
  }
}

inline void cross(const double* a, const double* b, double* out) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}

// transforms.so3_exp: R = I + a W + b W^2, W = skew(w)
inline void so3_exp(const double* w, double* R) {
  const double theta2 = w[0] * w[0] + w[1] * w[1] + w[2] * w[2];
  const bool small = theta2 < kSmall2;
  const double safe = small ? 1.0 : theta2, theta = std::sqrt(safe);
  const double a = small ? 1 - theta2 / 6 : std::sin(theta) / theta;
  const double b = small ? 0.5 - theta2 / 24 : (1 - std::cos(theta)) / safe;
  const double W[9] = {0.0, -w[2], w[1], w[2], 0.0, -w[0], -w[1], w[0], 0.0};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      double ww = 0.0;
      for (int k = 0; k < 3; ++k) ww += W[i * 3 + k] * W[k * 3 + j];
      R[i * 3 + j] = ((i == j ? 1.0 : 0.0) + a * W[i * 3 + j]) + b * ww;
    }
  }
}

// twist.so3_exp_vjp: J_l(w)^T m, m the axial vector of grad_R R^T
inline void so3_exp_vjp(const double* w, const double* R, const double* gR, double* out) {
  double M[9];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      double acc = 0.0;
      for (int k = 0; k < 3; ++k) acc += gR[i * 3 + k] * R[j * 3 + k];
      M[i * 3 + j] = acc;
    }
  }
  const double m[3] = {M[7] - M[5], M[2] - M[6], M[3] - M[1]};
  const double theta2 = w[0] * w[0] + w[1] * w[1] + w[2] * w[2];
  const bool series = theta2 < kSeriesTheta2;
  const double safe = series ? 1.0 : theta2, theta = std::sqrt(safe);
  const double b = series ? 0.5 - theta2 / 24 + theta2 * theta2 / 720 : (1 - std::cos(theta)) / safe;
  const double c = series ? 1.0 / 6 - theta2 / 120 + theta2 * theta2 / 5040 : (theta - std::sin(theta)) / (safe * theta);
  double wm[3], wwm[3];
  cross(w, m, wm);
  cross(w, wm, wwm);
  for (int i = 0; i < 3; ++i) out[i] = (m[i] - b * wm[i]) + c * wwm[i];
}

// A = Tc @ [R | t] @ Tc^-1 = [R | (t + c) - R c], its last column summed as the two products compute it
inline void about_point(const double* R, const double* t, const double* c, double* A) {
  for (int i = 0; i < 3; ++i) {
    double acc = 0.0;
    for (int k = 0; k < 3; ++k) {
      A[i * 4 + k] = R[i * 3 + k];
      acc += R[i * 3 + k] * -c[k];
    }
    A[i * 4 + 3] = acc + (t[i] + c[i]);
  }
  A[12] = A[13] = A[14] = 0.0;
  A[15] = 1.0;
}

}  // namespace

// T0 (B0, 4, 4) with B0 = 1 or B, c (1, 3), w and t (B, 3) -> [T (B, 4, 4), R (B, 3, 3)]
std::vector<torch::Tensor> pose_about_forward(torch::Tensor T0, torch::Tensor c, torch::Tensor w, torch::Tensor t) {
  check_f64(w, "w", {3});
  check_f64(t, "t", {3});
  check_f64(T0, "T0", {4, 4});
  check_f64(c, "c", {3});
  const int64_t B = w.size(0);
  TORCH_CHECK_VALUE(t.size(0) == B && (T0.size(0) == 1 || T0.size(0) == B) && c.size(0) == 1,
                    "pose_about: T0 ", T0.sizes(), ", c ", c.sizes(), ", w ", w.sizes(), " and t ", t.sizes(),
                    " do not match (T0 (1 or B, 4, 4), c (1, 3), w and t (B, 3))");
  auto T = torch::empty({B, 4, 4}, w.options());
  auto R = torch::empty({B, 3, 3}, w.options());
  const double *pT0 = T0.data_ptr<double>(), *pc = c.data_ptr<double>(), *pw = w.data_ptr<double>();
  const double* pt = t.data_ptr<double>();
  double *pT = T.data_ptr<double>(), *pR = R.data_ptr<double>();
  const int64_t step0 = T0.size(0) == 1 ? 0 : 16;
  for (int64_t b = 0; b < B; ++b) {
    double A[16];
    so3_exp(pw + 3 * b, pR + 9 * b);
    about_point(pR + 9 * b, pt + 3 * b, pc, A);
    matmul4(pT0 + step0 * b, A, pT + 16 * b);
  }
  return {T, R};
}

// the gradients of w and t (B, 3) from that of T (B, 4, 4): twist._PoseAbout.backward
std::vector<torch::Tensor> pose_about_backward(torch::Tensor T0, torch::Tensor c, torch::Tensor w, torch::Tensor R,
                                               torch::Tensor grad_T) {
  check_f64(w, "w", {3});
  check_f64(R, "R", {3, 3});
  check_f64(T0, "T0", {4, 4});
  check_f64(c, "c", {3});
  check_f64(grad_T, "grad_T", {4, 4});
  const int64_t B = w.size(0);
  TORCH_CHECK_VALUE(R.size(0) == B && grad_T.size(0) == B && (T0.size(0) == 1 || T0.size(0) == B) && c.size(0) == 1,
                    "pose_about_backward: shapes do not match");
  auto gw = torch::empty({B, 3}, w.options());
  auto gt = torch::empty({B, 3}, w.options());
  const double *pT0 = T0.data_ptr<double>(), *pc = c.data_ptr<double>(), *pw = w.data_ptr<double>();
  const double *pR = R.data_ptr<double>(), *pg = grad_T.data_ptr<double>();
  double *pgw = gw.data_ptr<double>(), *pgt = gt.data_ptr<double>();
  const int64_t step0 = T0.size(0) == 1 ? 0 : 16;
  for (int64_t b = 0; b < B; ++b) {
    const double* T0b = pT0 + step0 * b;
    const double* g = pg + 16 * b;
    double gA[16];  // T0^T @ grad_T
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        double acc = 0.0;
        for (int k = 0; k < 4; ++k) acc += T0b[k * 4 + i] * g[k * 4 + j];
        gA[i * 4 + j] = acc;
      }
    }
    double gR[9];
    for (int i = 0; i < 3; ++i) {
      pgt[3 * b + i] = gA[i * 4 + 3];
      for (int j = 0; j < 3; ++j) gR[i * 3 + j] = gA[i * 4 + j] - gA[i * 4 + 3] * pc[j];
    }
    so3_exp_vjp(pw + 3 * b, pR + 9 * b, gR, pgw + 3 * b);
  }
  return {gw, gt};
}

// (T_index_from_ct (1, 4, 4) @ invert(T_cam_from_ct (N, 4, 4)))[:, :3] -> (N, 3, 4)
torch::Tensor index_from_cam_forward(torch::Tensor T_index_from_ct, torch::Tensor T_cam_from_ct) {
  check_f64(T_index_from_ct, "T_index_from_ct", {4, 4});
  check_f64(T_cam_from_ct, "T_cam_from_ct", {4, 4});
  TORCH_CHECK_VALUE(T_index_from_ct.size(0) == 1, "T_index_from_ct must be (1, 4, 4), got ", T_index_from_ct.sizes());
  const int64_t N = T_cam_from_ct.size(0);
  auto out = torch::empty({N, 3, 4}, T_cam_from_ct.options());
  const double *A = T_index_from_ct.data_ptr<double>(), *pT = T_cam_from_ct.data_ptr<double>();
  double* po = out.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) {
    const double* T = pT + 16 * n;
    double inv[16];  // [R^T | -(R^T t)]
    for (int i = 0; i < 3; ++i) {
      double acc = 0.0;
      for (int k = 0; k < 3; ++k) {
        inv[i * 4 + k] = T[k * 4 + i];
        acc += T[k * 4 + i] * T[k * 4 + 3];
      }
      inv[i * 4 + 3] = -acc;
    }
    inv[12] = inv[13] = inv[14] = 0.0;
    inv[15] = 1.0;
    double M[16];
    matmul4(A, inv, M);
    for (int e = 0; e < 12; ++e) po[12 * n + e] = M[e];
  }
  return out;
}

// the gradient of T_cam_from_ct (N, 4, 4) from that of index_from_cam_forward's output (N, 3, 4)
torch::Tensor index_from_cam_backward(torch::Tensor T_index_from_ct, torch::Tensor T_cam_from_ct, torch::Tensor grad) {
  check_f64(T_index_from_ct, "T_index_from_ct", {4, 4});
  check_f64(T_cam_from_ct, "T_cam_from_ct", {4, 4});
  check_f64(grad, "grad", {3, 4});
  const int64_t N = T_cam_from_ct.size(0);
  TORCH_CHECK_VALUE(T_index_from_ct.size(0) == 1 && grad.size(0) == N, "index_from_cam_backward: shapes do not match");
  auto out = torch::zeros({N, 4, 4}, T_cam_from_ct.options());
  const double *A = T_index_from_ct.data_ptr<double>(), *pT = T_cam_from_ct.data_ptr<double>();
  const double* pg = grad.data_ptr<double>();
  double* po = out.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) {
    const double *T = pT + 16 * n, *g = pg + 12 * n;
    double gInv[12];  // rows 0..2 of A^T @ [g; 0]: the gradient of invert(T)'s [R^T | u]
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 4; ++j) {
        double acc = 0.0;
        for (int k = 0; k < 3; ++k) acc += A[k * 4 + i] * g[k * 4 + j];
        gInv[i * 4 + j] = acc;
      }
    }
    // u = -(R^T t): d/dR^T_ik = -gu_i t_k; d/dt_k = -sum_i R^T_ik gu_i = -(R gu)_k
    double* o = po + 16 * n;
    for (int i = 0; i < 3; ++i) {
      for (int k = 0; k < 3; ++k) o[k * 4 + i] = gInv[i * 4 + k] - gInv[i * 4 + 3] * T[k * 4 + 3];  // (R^T)^T
    }
    for (int k = 0; k < 3; ++k) {
      double acc = 0.0;
      for (int i = 0; i < 3; ++i) acc += T[k * 4 + i] * gInv[i * 4 + 3];
      o[k * 4 + 3] = -acc;
    }
  }
  return out;
}
