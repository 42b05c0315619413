// The numba backend's eager fast lane: one PyTorch op, groupnorm_native::group_norm, whose
// autograd node is C++ and whose forward and backward call the numba kernels through C entry
// points (numba cfuncs, see native.py). Python pays for one op call per forward; the backward
// runs without Python at all. Everything about the math lives in the numba kernels; this file
// only allocates, converts dtypes and layouts, and keeps the autograd bookkeeping.
//
// Same contract as the numba backend object (groupnorm/backends/cpu.py): float32 and float64
// kernels (float16/bfloat16 run through float32), contiguous or channels-last dense input read
// in place (other strides are made contiguous), outputs with exactly torch.empty_like(x)'s
// strides, statistics (N, G, 3) = (mean_hi, mean_lo, rstd) saved for the backward.
// With create_graph=True the backward calls groupnorm::differentiable_grads (defined in Python),
// a composite recomputation that autograd can differentiate again.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// C signatures of the numba entry points (one pair per kernel dtype).
template <typename T>
using ForwardFn = void (*)(T* x, T* y, T* w, T* b, T* stats, int64_t N, int64_t C, int64_t S,
                           int64_t G, double eps, int64_t act, int64_t channels_last);
template <typename T>
using BackwardFn = void (*)(T* dy, T* x, T* dx, T* dw, T* db, T* w, T* b, T* stats, int64_t N,
                            int64_t C, int64_t S, int64_t G, int64_t act, int64_t channels_last);

// [0]: float32, [1]: float64; 0 until native.py has compiled and handed them over.
std::atomic<int64_t> g_forward[2] = {0, 0};
std::atomic<int64_t> g_backward[2] = {0, 0};

void set_kernels(int64_t dtype_index, int64_t forward, int64_t backward) {
  TORCH_CHECK(dtype_index == 0 || dtype_index == 1, "groupnorm_native.set_kernels: dtype index must be 0 or 1");
  g_forward[dtype_index].store(forward);
  g_backward[dtype_index].store(backward);
}

bool kernels_ready(int idx) { return g_forward[idx].load() != 0 && g_backward[idx].load() != 0; }

at::ScalarType kernel_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t.movedim(1, -1).is_contiguous() without making the view: dims from the innermost of the
// (N, *spatial, C) order outwards, size-1 dims ignored as is_contiguous() ignores them.
bool channels_inner_dense(const at::Tensor& t) {
  const int64_t d = t.dim();
  int64_t expected = 1;
  auto check = [&](int64_t dim) {
    const int64_t n = t.size(dim);
    if (n == 1) return true;
    if (t.stride(dim) != expected) return false;
    expected *= n;
    return true;
  };
  if (!check(1)) return false;
  for (int64_t dim = d - 1; dim >= 2; --dim)
    if (!check(dim)) return false;
  return check(0);
}

bool is_channels_last_dense(const at::Tensor& t) {
  return !t.is_contiguous() && channels_inner_dense(t);
}

// x in the kernel dtype, contiguous or channels-last dense (read in place when it already is).
at::Tensor kernel_input(const at::Tensor& x, at::ScalarType kdt) {
  at::Tensor t = x.scalar_type() == kdt ? x : x.to(kdt);
  if (t.is_contiguous() || channels_inner_dense(t)) return t;
  return t.contiguous();
}

at::Tensor param_or(const at::Tensor& p, int64_t C, double fill, at::ScalarType kdt) {
  if (!p.defined()) return at::full({C}, fill, at::TensorOptions().dtype(kdt));
  at::Tensor q = p.scalar_type() == kdt ? p : p.to(kdt);
  return q.is_contiguous() ? q : q.contiguous();
}

// t (computed in the kernel dtype, layout of the kernel input) with x's dtype and exactly
// torch.empty_like(x)'s strides.
at::Tensor like_input(at::Tensor t, const at::Tensor& x) {
  if (t.scalar_type() != x.scalar_type()) t = t.to(x.scalar_type());
  if (t.numel() == 0 || t.strides() == x.strides()) return t;
  at::Tensor out = at::empty_like(x);
  if (out.strides() == t.strides()) return t;
  out.copy_(t);
  return out;
}

struct Shape {
  int64_t N, C, S;
};

Shape shape_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, x.numel() / (N * C)};
}

template <typename T>
void run_forward(const at::Tensor& x, at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                 at::Tensor& stats, Shape s, int64_t G, double eps, int64_t act, bool cl, int idx) {
  auto fn = reinterpret_cast<ForwardFn<T>>(g_forward[idx].load());
  TORCH_CHECK(fn != nullptr, "groupnorm_native: the numba kernels for this dtype are not loaded");
  fn(x.data_ptr<T>(), y.data_ptr<T>(), w.data_ptr<T>(), b.data_ptr<T>(), stats.data_ptr<T>(), s.N, s.C,
     s.S, G, eps, act, cl ? 1 : 0);
}

template <typename T>
void run_backward(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, at::Tensor& dw, at::Tensor& db,
                  const at::Tensor& w, const at::Tensor& b, const at::Tensor& stats, Shape s, int64_t G,
                  int64_t act, bool cl, int idx) {
  auto fn = reinterpret_cast<BackwardFn<T>>(g_backward[idx].load());
  TORCH_CHECK(fn != nullptr, "groupnorm_native: the numba kernels for this dtype are not loaded");
  fn(dy.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), dw.data_ptr<T>(), db.data_ptr<T>(), w.data_ptr<T>(),
     b.data_ptr<T>(), stats.data_ptr<T>(), s.N, s.C, s.S, G, act, cl ? 1 : 0);
}

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight_opt,
                            const std::optional<at::Tensor>& bias_opt, int64_t G, double eps, int64_t act) {
    const at::Tensor weight = weight_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
    const at::ScalarType kdt = kernel_dtype(x);
    const int idx = kdt == at::kDouble ? 1 : 0;
    at::Tensor xk = kernel_input(x, kdt);
    const bool cl = is_channels_last_dense(xk);
    const Shape s = shape_of(xk);
    at::Tensor y = at::empty_like(xk);
    at::Tensor stats = at::empty({s.N, G, 3}, at::TensorOptions().dtype(kdt));
    at::Tensor w = param_or(weight, s.C, 1.0, kdt), b = param_or(bias, s.C, 0.0, kdt);
    if (idx == 1)
      run_forward<double>(xk, y, w, b, stats, s, G, eps, act, cl, idx);
    else
      run_forward<float>(xk, y, w, b, stats, s, G, eps, act, cl, idx);
    ctx->save_for_backward({x, weight, bias, stats});
    ctx->saved_data["G"] = G;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    return like_input(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &stats = saved[3];
    const int64_t G = ctx->saved_data["G"].toInt();
    const int64_t act = ctx->saved_data["act"].toInt();
    // needs_input_grad counts only the tensor arguments that were given (an absent
    // weight or bias takes no slot)
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dw = weight.defined() && ctx->needs_input_grad(1);
    const bool need_db = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    at::Tensor dy = grads[0];
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients autograd can differentiate
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("groupnorm::differentiable_grads", "")
                           .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&, int64_t, double,
                                                          int64_t, bool, bool, bool)>();
      auto g = op.call(dy, x, weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt,
                       bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, G,
                       ctx->saved_data["eps"].toDouble(), act, need_dx, need_dw, need_db);
      dx = g[0], dw = g[1], db = g[2];
    } else {
      const at::ScalarType kdt = kernel_dtype(x);
      const int idx = kdt == at::kDouble ? 1 : 0;
      at::Tensor xk = kernel_input(x, kdt);
      const bool cl = is_channels_last_dense(xk);
      const Shape s = shape_of(xk);
      at::Tensor dyk = dy.scalar_type() == kdt ? dy : dy.to(kdt);
      if (dyk.strides() != xk.strides()) dyk = at::empty_like(xk).copy_(dyk);
      at::Tensor st = stats.scalar_type() == kdt ? stats : stats.to(kdt);
      at::Tensor dxk = at::empty_like(xk);
      at::Tensor dwk = at::empty({s.C}, at::TensorOptions().dtype(kdt));
      at::Tensor dbk = at::empty({s.C}, at::TensorOptions().dtype(kdt));
      at::Tensor w = param_or(weight, s.C, 1.0, kdt), b = param_or(bias, s.C, 0.0, kdt);
      if (idx == 1)
        run_backward<double>(dyk, xk, dxk, dwk, dbk, w, b, st, s, G, act, cl, idx);
      else
        run_backward<float>(dyk, xk, dxk, dwk, dbk, w, b, st, s, G, act, cl, idx);
      if (need_dx) dx = like_input(dxk, x);
      if (need_dw) dw = dwk.to(weight.scalar_type());
      if (need_db) db = dbk.to(bias.scalar_type());
    }
    return {need_dx ? dx : at::Tensor(), need_dw ? dw : at::Tensor(), need_db ? db : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor group_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, int64_t act) {
  return GroupNormFunction::apply(x, weight, bias, num_groups, eps, act);
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

bool param_ok(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t C) {
  if (!p.has_value()) return true;
  const at::Tensor& t = *p;
  if (!t.defined() || t.dim() != 1 || t.size(0) != C || !t.device().is_cpu() || t.layout() != at::kStrided)
    return false;
  return t.scalar_type() == x.scalar_type() || (is_half(x.scalar_type()) && t.scalar_type() == at::kFloat);
}

// group_norm for group_norm()'s fast front (functional.py): the argument checks of
// functional.check_inputs in C++, and nullopt (the caller then takes the checked Python path,
// which raises the error that names the problem) for anything this lane does not take: bad
// arguments, empty or non-CPU input, kernels of this dtype not loaded yet.
std::optional<at::Tensor> try_group_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                         int64_t act) {
  if (!x.defined() || !x.device().is_cpu() || x.layout() != at::kStrided || x.dim() < 2 || x.numel() == 0)
    return std::nullopt;
  const at::ScalarType t = x.scalar_type();
  if (t != at::kFloat && t != at::kDouble && !is_half(t)) return std::nullopt;
  const int64_t C = x.size(1);
  if (num_groups <= 0 || num_groups > C || C % num_groups != 0) return std::nullopt;
  if (!(eps > 0.0 && eps < std::numeric_limits<double>::infinity())) return std::nullopt;
  if (act < 0 || act > 3 || !param_ok(weight, x, C) || !param_ok(bias, x, C)) return std::nullopt;
  if (!kernels_ready(t == at::kDouble ? 1 : 0)) return std::nullopt;
  return GroupNormFunction::apply(x, weight, bias, num_groups, eps, act);
}

}  // namespace

TORCH_LIBRARY(groupnorm_native, m) {
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, int activation) -> Tensor",
        &group_norm);
  m.def("try_group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, int activation) -> Tensor?",
        &try_group_norm);
  m.def("set_kernels(int dtype_index, int forward, int backward) -> ()", &set_kernels);
}
