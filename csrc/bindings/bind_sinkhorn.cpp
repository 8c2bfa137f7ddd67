// Bindings of the Sinkhorn family: checks, then one core call with the GIL released.
// Python (diffkern/ot.py) validates the user's arguments, allocates every array with torch
// (outputs and the workspace) and passes the current stream.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>

#include "bindings/array_arg.h"
#include "bindings/core_call.h"
#include "sinkhorn/sinkhorn.h"

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
namespace {

constexpr const char* kFn = "sinkhorn_solve";

// The shared shape check, with the expected shape written inline.
void require_shape_is(const ArrayInfo& a, std::initializer_list<int64_t> shape,
                      const char* why) {
  require_shape(a, shape.begin(), static_cast<int>(shape.size()), why, kFn);
}

void require_dtype(const ArrayInfo& a, nb::dlpack::dtype_code code, int bits, const char* what) {
  if (a.dtype.code != static_cast<uint8_t>(code) || a.dtype.bits != bits || a.dtype.lanes != 1) {
    throw nb::type_error((std::string(kFn) + ": " + a.name + ": expected dtype " + what +
                          ", got " + describe_dtype(a))
                             .c_str());
  }
}

SinkhornOptions make_options(int method, double tol, int64_t max_iter, int64_t check_every,
                             bool fixed, int64_t warmup, bool warm_start, int64_t cg_max_iter,
                             int verbose) {
  // Only what the core cannot survive: an out-of-range enum. User-facing values (eps, tol,
  // iteration counts) are checked once, in diffkern/ot.py, in the user's terms.
  if (method != 0 && method != 1)
    throw nb::value_error("sinkhorn_solve: method: expected 0 (sinkhorn) or 1 (sns)");
  SinkhornOptions o;
  o.method = static_cast<SinkhornMethod>(method);
  o.tol = tol;
  o.max_iter = max_iter;
  o.check_every = check_every;
  o.fixed_iterations = fixed;
  o.newton_warmup = warmup;
  o.warm_start = warm_start;
  o.cg_max_iter = cg_max_iter;
  o.verbose = verbose;
  return o;
}

int64_t workspace_bytes(int64_t batch, int64_t n, int64_t m, int method) {
  SinkhornProblem p;
  p.batch = batch;
  p.n = n;
  p.m = m;
  SinkhornOptions o;
  o.method = static_cast<SinkhornMethod>(method);
  return static_cast<int64_t>(sinkhorn_workspace_bytes(p, o));
}

// Returns how many batch elements were still above tol (or NaN) at the solver's last check,
// or -1 in fixed-iteration mode (no check ran).
int64_t solve(nb::handle cost_o, nb::handle cost_t_o, nb::handle a_o, nb::handle b_o, nb::handle f_o,
           nb::handle g_o, nb::handle err_o, nb::handle iters_o, nb::handle newton_o,
           nb::handle ws_o, double eps, int method, double tol, int64_t max_iter,
           int64_t check_every, bool fixed, int64_t warmup, bool warm_start, int64_t cg_max_iter,
           int verbose, int num_threads, uintptr_t stream) {
  const ArrayInfo cost = array_arg(cost_o, "cost", kFn), cost_t = array_arg(cost_t_o, "cost_t", kFn),
                  a = array_arg(a_o, "a", kFn), b = array_arg(b_o, "b", kFn),
                  f = array_arg(f_o, "f", kFn, Access::write),
                  g = array_arg(g_o, "g", kFn, Access::write),
                  err = array_arg(err_o, "marginal_error", kFn, Access::write),
                  iters = array_arg(iters_o, "iterations", kFn, Access::write),
                  newton = array_arg(newton_o, "newton_steps", kFn, Access::write),
                  ws = array_arg(ws_o, "workspace", kFn, Access::write);

  if (cost.ndim != 3)
    throw nb::value_error((std::string(kFn) + ": cost: expected 3 dimensions (batch, n, m), got " +
                           describe_shape(cost)).c_str());
  const DType dtype = require_float_dtype(cost, kFn);
  const int64_t B = cost.shape[0], n = cost.shape[1], m = cost.shape[2];
  require_same_dtype(cost, cost_t, kFn);
  require_shape_is(cost_t, {B, m, n}, "(batch, m, n): cost transposed");
  require_shape_is(a, {B, n}, "(batch, n)");
  require_shape_is(b, {B, m}, "(batch, m)");
  require_shape_is(f, {B, n}, "(batch, n)");
  require_shape_is(g, {B, m}, "(batch, m)");
  require_shape_is(err, {B}, "(batch,)");
  require_shape_is(iters, {B}, "(batch,)");
  require_shape_is(newton, {B}, "(batch,)");
  for (const ArrayInfo* x : {&a, &b, &f, &g, &err})
    require_dtype(*x, nb::dlpack::dtype_code::Float, 64, "float64");
  for (const ArrayInfo* x : {&iters, &newton})
    require_dtype(*x, nb::dlpack::dtype_code::Int, 64, "int64");
  require_dtype(ws, nb::dlpack::dtype_code::UInt, 8, "uint8");
  for (const ArrayInfo* x : {&cost, &cost_t, &a, &b, &f, &g, &err, &iters, &newton, &ws}) {
    require_same_device(cost, *x, kFn);
    require_c_contiguous(*x, kFn);
  }
  if (B < 1 || n < 1 || m < 1)
    throw nb::value_error((std::string(kFn) + ": cost: expected non-empty dimensions, got " +
                           describe_shape(cost)).c_str());
  // The sparse Hessian stores column indices as int32.
  if (n > INT32_MAX || m > INT32_MAX || B > INT32_MAX)
    throw nb::value_error((std::string(kFn) + ": cost: expected each dimension < 2^31, got " +
                           describe_shape(cost)).c_str());

  SinkhornProblem p;
  p.batch = B;
  p.n = n;
  p.m = m;
  p.cost_dtype = dtype;
  p.cost = cost.data;
  p.cost_t = cost_t.data;
  p.a = static_cast<const double*>(a.data);
  p.b = static_cast<const double*>(b.data);
  p.eps = eps;
  const SinkhornOptions o =
      make_options(method, tol, max_iter, check_every, fixed, warmup, warm_start, cg_max_iter,
                   verbose);
  const size_t need = sinkhorn_workspace_bytes(p, o);
  if (ws.numel() < static_cast<int64_t>(need)) {
    throw nb::value_error((std::string(kFn) + ": workspace: expected at least " +
                           std::to_string(need) + " bytes, got " + std::to_string(ws.numel()))
                              .c_str());
  }
  SinkhornState s;
  s.f = static_cast<double*>(f.data);
  s.g = static_cast<double*>(g.data);
  s.marginal_error = static_cast<double*>(err.data);
  s.iterations = static_cast<int64_t*>(iters.data);
  s.newton_steps = static_cast<int64_t*>(newton.data);
  int64_t unconverged = -1;
  s.unconverged = &unconverged;

  call_core([] { return kFn; }, cost, num_threads, stream, kReleaseGilWork,
            [&](int threads) { return sinkhorn_solve_cpu(p, o, s, ws.data, threads); },
            [&](void* st) { return sinkhorn_solve_cuda(p, o, s, ws.data, st); });
  return unconverged;
}

}  // namespace

void bind_sinkhorn(nb::module_& m) {
  m.def("sinkhorn_workspace_bytes", &workspace_bytes, nb::arg("batch"), nb::arg("n"), nb::arg("m"),
        nb::arg("method"), "Bytes of uint8 workspace sinkhorn_solve needs (method 0 or 1).");
  m.def("sinkhorn_solve", &solve, nb::arg("cost"), nb::arg("cost_t"), nb::arg("a"), nb::arg("b"),
        nb::arg("f"), nb::arg("g"), nb::arg("marginal_error"), nb::arg("iterations"),
        nb::arg("newton_steps"), nb::arg("workspace"), nb::arg("eps"), nb::arg("method"),
        nb::arg("tol"), nb::arg("max_iter"), nb::arg("check_every"), nb::arg("fixed_iterations"),
        nb::arg("newton_warmup"), nb::arg("warm_start"), nb::arg("cg_max_iter"),
        nb::arg("verbose") = 0,
        nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        "Batched entropic OT (see csrc/sinkhorn/sinkhorn.h). cost (B,n,m) and cost_t (B,m,n)\n"
        "float32/float64; a (B,n), b (B,m), f (B,n) in/out, g (B,m) in/out, marginal_error (B)\n"
        "float64; iterations, newton_steps (B) int64; workspace uint8; all C-contiguous on one\n"
        "device. method: 0 sinkhorn, 1 sns. stream: cudaStream_t as an integer.\n"
        "Returns the number of elements above tol at the last check (-1: fixed mode).");
}

}  // namespace bindings
}  // namespace diffkern
