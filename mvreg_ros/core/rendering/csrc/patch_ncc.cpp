// The refinement's image similarity against fixed targets, fused: PreparedSimilarity's value per
// render and, when asked, its gradient with respect to the render, in one pass per render and with
// no full-size temporaries (the ATen path allocates about thirty images per channel and call).
//
// For render m (target t = m % N) and channel c (c = j * K + k: weighting j, image channel k of
// K = 1 (intensity) or 3 (intensity, horizontal and vertical Sobel / 8, replicated border)):
//   z = (x_k - mean) / sqrt(var + 1e-12)             mean, var weighted by w[t, c] over the image
//   per full patch P (p x p, rows and columns beyond the last full patch unused):
//     mx = sum_P w z / swc, sxx = max(sum_P w z^2 / swc - mx^2, 0), sxy = sum_P wy z / swc - mx my
//     r = clamp(sxy / sqrt((sxx + 1e-6) (syy + 1e-6)), -1, 1)
//   out[m] = sum_c sum_P coef[t, c, P] r
// where swc, my, syy (the target's patch moments) and coef (the patch's weight times the channel's
// weight over the channel's normaliser) come precomputed from Python, and wy = w * the standardised
// target channel. The same arithmetic as PreparedSimilarity's ATen path (the reference), in float64.
// The gradient follows clamp's and clamp_min's conventions (passed at the bounds). Renders run in
// parallel on ATen's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Target {
  const double* w;    // (N, C, H, W)
  const double* wy;   // (N, C, H, W)
  const double* swi;  // (N, C)
  const double* swc;  // (N, C, h, w)
  const double* my;
  const double* syy;
  const double* coef;
};

// the K image channels of one render, into ch (K x H x W)
template <typename T>
void channels(const T* x, int H, int W, int K, double* ch) {
  const int64_t HW = int64_t(H) * W;
  for (int64_t i = 0; i < HW; ++i) ch[i] = static_cast<double>(x[i]);
  if (K == 1) return;
  double* gx = ch + HW;
  double* gy = ch + 2 * HW;
  const double* v = ch;
  for (int i = 0; i < H; ++i) {
    const double* a = v + int64_t(std::max(i - 1, 0)) * W;  // row above (replicated)
    const double* b = v + int64_t(i) * W;
    const double* c = v + int64_t(std::min(i + 1, H - 1)) * W;  // row below
    for (int j = 0; j < W; ++j) {
      const int l = std::max(j - 1, 0), r = std::min(j + 1, W - 1);
      gx[int64_t(i) * W + j] = ((a[r] - a[l]) + 2 * (b[r] - b[l]) + (c[r] - c[l])) / 8;
      gy[int64_t(i) * W + j] = ((c[l] - a[l]) + 2 * (c[j] - a[j]) + (c[r] - a[r])) / 8;
    }
  }
}

// adds the gradient with respect to the render of the channels' gradients dch (K x H x W) to dx
void channels_backward(const double* dch, int H, int W, int K, double* dx) {
  const int64_t HW = int64_t(H) * W;
  for (int64_t i = 0; i < HW; ++i) dx[i] += dch[i];
  if (K == 1) return;
  const double* dgx = dch + HW;
  const double* dgy = dch + 2 * HW;
  for (int i = 0; i < H; ++i) {
    double* a = dx + int64_t(std::max(i - 1, 0)) * W;
    double* b = dx + int64_t(i) * W;
    double* c = dx + int64_t(std::min(i + 1, H - 1)) * W;
    for (int j = 0; j < W; ++j) {
      const int l = std::max(j - 1, 0), r = std::min(j + 1, W - 1);
      const double u = dgx[int64_t(i) * W + j] / 8, v = dgy[int64_t(i) * W + j] / 8;
      a[r] += u;
      a[l] -= u;
      b[r] += 2 * u;
      b[l] -= 2 * u;
      c[r] += u;
      c[l] -= u;
      c[l] += v;
      a[l] -= v;
      c[j] += 2 * v;
      a[j] -= 2 * v;
      c[r] += v;
      a[r] -= v;
    }
  }
}

// one render: returns its similarity; with grad (dch), adds d similarity / d channel to dch (K x H x W)
double one_render(const double* ch, const Target& tg, int t, int C, int K, int H, int W, int p, double* dch,
                  std::vector<double>& dpatch, std::vector<double>& dz) {
  const int64_t HW = int64_t(H) * W;
  const int ph = H / p, pw = W / p;
  double out = 0;
  for (int c = 0; c < C; ++c) {
    const int k = c % K;
    const double* x = ch + k * HW;
    const int64_t tc = int64_t(t) * C + c;
    const double* w = tg.w + tc * HW;
    const double* wy = tg.wy + tc * HW;
    const double sw = tg.swi[tc];
    double s1 = 0;
    for (int64_t i = 0; i < HW; ++i) s1 += w[i] * x[i];
    const double mean = s1 / sw;
    double s2 = 0;
    for (int64_t i = 0; i < HW; ++i) {
      const double d = x[i] - mean;
      s2 += w[i] * d * d;
    }
    const double s = std::sqrt(s2 / sw + 1e-12);
    const int64_t P0 = tc * ph * pw;
    bool any = false;
    for (int P = 0; P < ph * pw; ++P) {
      double* dp = dpatch.data() + 3 * P;
      dp[0] = dp[1] = dp[2] = 0;
      const double coef = tg.coef[P0 + P];
      if (coef == 0) continue;
      const int r0 = (P / pw) * p, c0 = (P % pw) * p;
      double a = 0, b = 0, cc = 0;
      for (int i = r0; i < r0 + p; ++i) {
        const int64_t o = int64_t(i) * W + c0;
        for (int j = 0; j < p; ++j) {
          const double z = (x[o + j] - mean) / s;
          a += w[o + j] * z;
          b += w[o + j] * z * z;
          cc += wy[o + j] * z;
        }
      }
      const double swc = tg.swc[P0 + P], my = tg.my[P0 + P], syy = tg.syy[P0 + P];
      const double mx = a / swc;
      const double sxx_raw = b / swc - mx * mx;
      const double sxx = std::max(sxx_raw, 0.0);
      const double sxy = cc / swc - mx * my;
      const double den = std::sqrt((sxx + 1e-6) * (syy + 1e-6));
      const double r_raw = sxy / den;
      out += coef * std::min(std::max(r_raw, -1.0), 1.0);
      if (dch == nullptr || r_raw < -1 || r_raw > 1) continue;
      const double dsxy = coef / den;
      const double dsxx = sxx_raw >= 0 ? -0.5 * r_raw / (sxx + 1e-6) * coef : 0.0;
      const double dmx = -my * dsxy - 2 * mx * dsxx;
      dp[0] = dmx / swc;   // d / d sum_P w z
      dp[1] = dsxx / swc;  // d / d sum_P w z^2
      dp[2] = dsxy / swc;  // d / d sum_P wy z
      any = true;
    }
    if (!any) continue;
    // dz per pixel, then back through the standardisation: z = (x - mean) / s
    double g_xc = 0;  // sum_i dz_i (x_i - mean)
    std::fill(dz.begin(), dz.end(), 0.0);
    for (int P = 0; P < ph * pw; ++P) {
      const double* dp = dpatch.data() + 3 * P;
      if (dp[0] == 0 && dp[1] == 0 && dp[2] == 0) continue;
      const int r0 = (P / pw) * p, c0 = (P % pw) * p;
      for (int i = r0; i < r0 + p; ++i) {
        const int64_t o = int64_t(i) * W + c0;
        for (int j = 0; j < p; ++j) {
          const double xc = x[o + j] - mean;
          const double g = w[o + j] * (dp[0] + 2 * (xc / s) * dp[1]) + wy[o + j] * dp[2];
          dz[o + j] = g;
          g_xc += g * xc;
        }
      }
    }
    double sum_dxc = 0;
    const double f = g_xc / (s * s * s * sw);
    for (int64_t i = 0; i < HW; ++i) {
      dz[i] = dz[i] / s - w[i] * (x[i] - mean) * f;  // now d / d (x - mean)
      sum_dxc += dz[i];
    }
    double* dk = dch + k * HW;
    for (int64_t i = 0; i < HW; ++i) dk[i] += dz[i] - w[i] / sw * sum_dxc;
  }
  return out;
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_double(const torch::Tensor& t, const char* name, int64_t dim) {
  check(t, name, dim);
  TORCH_CHECK_VALUE(t.scalar_type() == torch::kDouble, name, " must be float64");
}

}  // namespace

// Returns [similarity (M,)] or, with with_grad, [similarity, d similarity[m] / d render[m] (M, H, W)].
std::vector<torch::Tensor> patch_ncc(torch::Tensor drr, torch::Tensor w, torch::Tensor wy, torch::Tensor swi,
                                     torch::Tensor swc, torch::Tensor my, torch::Tensor syy, torch::Tensor coef,
                                     int64_t image_channels, int64_t patch, bool with_grad) {
  check(drr, "drr", 3);
  TORCH_CHECK_VALUE(drr.scalar_type() == torch::kFloat || drr.scalar_type() == torch::kDouble,
                    "drr must be float32 or float64");
  for (auto [t, name] : {std::pair{&w, "w"}, std::pair{&wy, "wy"}}) check_double(*t, name, 4);
  check_double(swi, "swi", 2);
  for (auto [t, name] : {std::pair{&swc, "swc"}, std::pair{&my, "my"}, std::pair{&syy, "syy"},
                         std::pair{&coef, "coef"}})
    check_double(*t, name, 4);
  const int K = static_cast<int>(image_channels), p = static_cast<int>(patch);
  TORCH_CHECK_VALUE(K == 1 || K == 3, "image_channels must be 1 or 3, got ", K);
  const int64_t M = drr.size(0), N = w.size(0), C = w.size(1);
  const int H = static_cast<int>(drr.size(1)), W = static_cast<int>(drr.size(2));
  TORCH_CHECK_VALUE(p >= 1 && p <= H && p <= W, "patch must be in [1, min(H, W)], got ", p);
  TORCH_CHECK_VALUE(N >= 1 && M % N == 0, "renders (", M, ") must tile the targets (", N, ")");
  TORCH_CHECK_VALUE(C % K == 0, "channels (", C, ") must be a multiple of image_channels (", K, ")");
  TORCH_CHECK_VALUE(w.size(2) == H && w.size(3) == W && wy.sizes() == w.sizes(), "weights must be (N, C, H, W)");
  TORCH_CHECK_VALUE(swi.size(0) == N && swi.size(1) == C, "swi must be (N, C)");
  const std::vector<int64_t> pshape{N, C, H / p, W / p};
  for (auto* t : {&swc, &my, &syy, &coef}) TORCH_CHECK_VALUE(t->sizes() == pshape, "patch moments must be (N, C, h, w)");
  const Target tg{w.data_ptr<double>(),   wy.data_ptr<double>(),  swi.data_ptr<double>(), swc.data_ptr<double>(),
                  my.data_ptr<double>(),  syy.data_ptr<double>(), coef.data_ptr<double>()};
  auto out = torch::empty({M}, torch::dtype(torch::kDouble));
  torch::Tensor grad = with_grad ? torch::empty({M, H, W}, torch::dtype(torch::kDouble)) : torch::Tensor();
  const torch::Tensor x = drr;
  double* oo = out.data_ptr<double>();
  double* gg = with_grad ? grad.data_ptr<double>() : nullptr;
  const int64_t HW = int64_t(H) * W;
  AT_DISPATCH_FLOATING_TYPES(drr.scalar_type(), "patch_ncc", [&] {
    const scalar_t* xx = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      // per-thread scratch: the channels, their gradients, the patches' and the pixels' (dz) gradients
      std::vector<double> ch(K * HW), dch(with_grad ? K * HW : 0), dpatch(3 * (H / p) * (W / p)),
          dz(with_grad ? HW : 0);
      for (int64_t m = begin; m < end; ++m) {
        channels(xx + m * HW, H, W, K, ch.data());
        if (with_grad) std::fill(dch.begin(), dch.end(), 0.0);
        oo[m] = one_render(ch.data(), tg, static_cast<int>(m % N), static_cast<int>(C), K, H, W, p,
                           with_grad ? dch.data() : nullptr, dpatch, dz);
        if (with_grad) {
          double* g = gg + m * HW;
          std::fill(g, g + HW, 0.0);
          channels_backward(dch.data(), H, W, K, g);
        }
      }
    });
  });
  if (with_grad) return {out.to(drr.scalar_type()), grad.to(drr.scalar_type())};
  return {out.to(drr.scalar_type())};
}
