"""Every diffcore op, defined once: schema, fake kernel, autograd, backends and registry entries.

This is the file to open first. Each op is declared with ``torch.library`` here (so it exists, and
``torch.compile`` traces it, even when the C++ extension was not built); the C++ kernels add their
CPU implementations from ``csrc/cpu/<family>.cpp`` when ``diffcore._C`` loads; CUDA tensors go to
the Triton launchers in ``diffcore.kernels`` (or to the CUDA C++ kernel where one was built).
Without ``_C``, CPU tensors fall back to the PyTorch reference with one warning.

Ops (``torch.ops.diffcore.<name>``):

``random_normal_(Tensor(a!) out, int seed, int offset) -> ()``
    Fill ``out`` with the Philox normal stream (element i in row-major order; DESIGN.md "Noise").
``random_normal(SymInt[] size, int seed, int offset, ScalarType dtype, Device device) -> Tensor``
    A new tensor so filled: a C++ CompositeExplicitAutograd kernel (no tensor argument to dispatch
    on) that takes a CPU output from the block pool and calls ``random_normal_``; only with ``_C``.

``diffusion_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t) -> Tensor``
    (plus ``diffusion_step_``, in place on ``x``, and ``diffusion_step_out``). The fused affine
    step behind ``q_sample``, ``p_step`` and ``ddim_step``::

        f        = (1 + guidance) f - guidance f_uncond     (f_uncond optional)
        out[r]   = a_r x[r] + b_r f[r] + c_r z[r]
        a, b, c  = float32(table[t[r]])                      (t: (B,) or (1,); None: table[r])
        z        = noise, or the Philox stream (seed, offset) over the (B, N) output

    ``x``, ``f``, ``f_uncond``, ``noise``: (B, N), one float dtype; ``table``: (K, 3) float64 or
    float32. ``t`` outside ``[0, K)`` raises (``clamp_t``: ``t >= K`` uses row ``K - 1``).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from diffcore import _registry
from diffcore.reference import diffusion as _ref_diffusion
from diffcore.reference import random as _ref_random

_lib = torch.library.Library("diffcore", "DEF")

# op name -> (backward, setup_context): each op's autograd formula, also used by run_forced.
_AUTOGRAD: dict[str, tuple] = {}


def _register_autograd(op: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` for ``diffcore::<op>``, the formula kept for run_forced."""
    _AUTOGRAD[op] = (backward, setup_context)
    torch.library.register_autograd(f"diffcore::{op}", backward, setup_context=setup_context)


class _OpCtx:
    """The autograd ctx as an op's formula sees it: ``needs_input_grad`` of the op's arguments
    (run_forced's Function has three arguments of its own before them); the rest is the ctx's."""

    def __init__(self, ctx) -> None:
        object.__setattr__(self, "_ctx", ctx)

    @property
    def needs_input_grad(self) -> tuple:
        return self._ctx.needs_input_grad[3:]

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._ctx, name, value)


class _Forced(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, impl, outputs, *args):
        outs = outputs()
        impl(*args, *outs)
        backward, setup_context = _AUTOGRAD[op]
        ctx.forced = impl.name
        ctx.op_ctx = _OpCtx(ctx)
        ctx.backward = backward
        setup_context(ctx.op_ctx, args, outs[0] if len(outs) == 1 else outs)
        return outs[0] if len(outs) == 1 else outs

    @staticmethod
    def backward(ctx, *grads):
        grads_in = ctx.backward(ctx.op_ctx, *grads)
        return (None, None, None, *(grads_in if isinstance(grads_in, tuple) else (grads_in,)))


def run_forced(op: str, impl, args: tuple, outputs) -> torch.Tensor | tuple:
    """The implementation ``impl`` that ``diffcore.use`` forces, run as the op ``op`` with its
    arguments ``args`` into the tensors ``outputs()`` makes, with the op's autograd formula when an
    argument requires grad under grad mode. The formula's own op calls go through the dispatcher,
    except where it reads ``ctx.forced`` (the forced implementation's name, absent otherwise): the
    training losses run their backward op through the same implementation as the forward.
    Returns the output, or the tuple of outputs."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _Forced.apply(op, impl, outputs, *args)
    outs = outputs()
    impl(*args, *outs)
    return outs[0] if len(outs) == 1 else outs

_STEP_ARGS = (
    "Tensor? f, Tensor? f_uncond, float guidance, Tensor? t, Tensor table, Tensor? noise, "
    "int? seed, int offset, bool clamp_t"
)
_lib.define("random_normal_(Tensor(a!) out, int seed, int offset) -> ()")
_lib.define("random_normal(SymInt[] size, int seed, int offset, ScalarType dtype, Device device) -> Tensor")
_lib.define(f"diffusion_step(Tensor x, {_STEP_ARGS}) -> Tensor")
_lib.define(f"diffusion_step_(Tensor(a!) x, {_STEP_ARGS}) -> ()")
_lib.define(f"diffusion_step_out(Tensor x, {_STEP_ARGS}, *, Tensor(a!) out) -> ()")

STEP_OPS = ("diffusion_step", "diffusion_step_", "diffusion_step_out")


# --- fake kernels -------------------------------------------------------------------------------
@torch.library.register_fake("diffcore::random_normal_")
def _(out, seed, offset):
    return None


@torch.library.register_fake("diffcore::random_normal")
def _(size, seed, offset, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake("diffcore::diffusion_step")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("diffcore::diffusion_step_")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
    return None


@torch.library.register_fake("diffcore::diffusion_step_out")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, *, out):
    return None


# --- autograd: out = a x + b ((1 + w) f - w u) + c z is linear in every tensor input -----------
def _step_setup_context(ctx, inputs, output):
    x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t = inputs
    ctx.save_for_backward(t, table)
    ctx.guidance, ctx.clamp_t = guidance, clamp_t
    ctx.rows = x.shape[0]
    ctx.present = (f is not None, f_uncond is not None, noise is not None)


def _step_backward(ctx, grad):
    t, table = ctx.saved_tensors
    if t is None:
        coef = table.float().expand(ctx.rows, 3)
    else:
        t = t.expand(ctx.rows)
        coef = table[t.clamp(max=table.shape[0] - 1) if ctx.clamp_t else t].float()
    a, b, c = (coef[:, k : k + 1] for k in range(3))
    has_f, has_u, has_noise = ctx.present
    w = ctx.guidance
    grad_x = (a * grad).to(grad.dtype)
    grad_f = ((b * (1 + w) if has_u else b) * grad).to(grad.dtype) if has_f else None
    grad_u = (-(b * w) * grad).to(grad.dtype) if has_u else None
    grad_noise = (c * grad).to(grad.dtype) if has_noise else None
    return grad_x, grad_f, grad_u, None, None, None, grad_noise, None, None, None


_register_autograd("diffusion_step", _step_backward, _step_setup_context)


# --- the C++ extension --------------------------------------------------------------------------
def no_ext_requested() -> bool:
    """Whether ``DIFFCORE_NO_EXT`` asks for a pure-Python diffcore (set, and neither empty nor 0)."""
    return os.environ.get("DIFFCORE_NO_EXT", "") not in ("", "0")


def _load_extension() -> tuple[object | None, str | None]:
    """``diffcore._C``, or the build at ``DIFFCORE_EXT_PATH`` (a .so: a development build tried
    without reinstalling), or None and the reason."""
    if no_ext_requested():
        return None, "DIFFCORE_NO_EXT is set"
    path = os.environ.get("DIFFCORE_EXT_PATH")
    try:
        if path:
            import importlib.util

            spec = importlib.util.spec_from_file_location("diffcore._C", path)
            if spec is None or spec.loader is None:
                return None, f"DIFFCORE_EXT_PATH={path} is not a loadable extension"
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, None
        from diffcore import _C
    except ImportError as exc:
        return None, f"diffcore._C did not load ({exc})"
    return _C, None


_C, EXTENSION_MISSING = _load_extension()
HAS_CUDA_BINDING = bool(_C is not None and _C.has_cuda())


def cpu_isa() -> str | None:
    """The instruction-set build the C++ CPU kernels run (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    return None if _C is None else _C.cpu_isa()


# --- implementations ----------------------------------------------------------------------------
def _extension_reason(device: torch.device) -> str | None:
    return EXTENSION_MISSING


@functools.cache
def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _triton_unavailable(device: torch.device) -> str | None:
    return _triton_reason(device.type)


def _cuda_unavailable(device: torch.device) -> str | None:
    if not HAS_CUDA_BINDING:
        return "the CUDA binding is built only against a CUDA build of torch"
    return None if torch.cuda.is_available() else "no CUDA device"


def _kernels(name: str):
    import importlib

    return importlib.import_module(f"diffcore.kernels.{name}")


def _check_t(t, table, clamp_t=False):
    """The reference's twin of the kernels' timestep check (tensor values: raises RuntimeError;
    negative timesteps too, which indexing would wrap)."""
    k = t.clamp(max=table.shape[0] - 1) if clamp_t else t
    outside = (k < 0) | (k >= table.shape[0])
    if bool(outside.any()):
        i = int(outside.reshape(-1).nonzero()[0, 0])
        raise RuntimeError(f"t: every timestep must lie in [0, {table.shape[0]}), got t[{i}] = {int(t.reshape(-1)[i])}")


def _reference_step_out(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out):
    if t is not None:
        _check_t(t, table, clamp_t)
    out.copy_(_ref_diffusion.step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t))


def _cpu_step_out(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out):
    args = (f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t)
    if out is x:
        torch.ops.diffcore.diffusion_step_(x, *args)
    else:
        torch.ops.diffcore.diffusion_step_out(x, *args, out=out)


def _triton_step_out(*args):
    _kernels("diffusion").diffusion_step_out(*args)


def _triton_random_normal(out, seed, offset):
    _kernels("random").random_normal_(out, seed, offset)


def _cuda_random_normal(out, seed, offset):
    torch.ops.diffcore.random_normal_(out, seed, offset)


_registry.register("random_normal", "reference", _ref_random.random_normal_, devices=("cpu", "cuda"))
_registry.register(
    "random_normal", "cpu", torch.ops.diffcore.random_normal_, devices=("cpu",), unavailable=_extension_reason
)
_registry.register(
    "random_normal", "triton", _triton_random_normal, devices=("cpu", "cuda"), unavailable=_triton_unavailable
)
_registry.register(
    "random_normal", "cuda", _cuda_random_normal, devices=("cuda",), unavailable=_cuda_unavailable
)
_registry.register("diffusion_step", "reference", _reference_step_out, devices=("cpu", "cuda"))
_registry.register(
    "diffusion_step", "cpu", _cpu_step_out, devices=("cpu",), unavailable=_extension_reason
)
_registry.register(
    "diffusion_step", "triton", _triton_step_out, devices=("cpu", "cuda"), unavailable=_triton_unavailable
)


# --- dispatch of the ops to Python backends -----------------------------------------------------
def impl_python(op: str, fn, *, cpu_fallback, cuda) -> None:
    """Registers the Python backends of ``op``: ``cpu_fallback`` for CPU tensors when ``_C`` is
    missing (the reference), ``cuda`` (a Triton launcher) for CUDA tensors unless the CUDA C++
    binding registered one."""
    if _C is None and cpu_fallback is not None:
        _lib.impl(op, fn(cpu_fallback), "CPU")
    if cuda is not None:
        _lib.impl(op, fn(cuda), "CUDA")


def _step_functional(impl):
    def run(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        impl(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out)
        return out

    return run


def _step_inplace(impl):
    def run(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
        impl(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, x)

    return run


def _step_out(impl):
    def run(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, *, out):
        impl(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out)

    return run


def _as_is(impl):
    return impl


for _op, _wrap in zip(STEP_OPS, (_step_functional, _step_inplace, _step_out)):
    impl_python(_op, _wrap, cpu_fallback=_reference_step_out, cuda=_triton_step_out)
impl_python(
    "random_normal_", _as_is, cpu_fallback=_ref_random.random_normal_,
    cuda=None if HAS_CUDA_BINDING else _triton_random_normal,
)

if _C is None:
    warnings.warn(
        f"diffcore: {EXTENSION_MISSING}; CPU ops run the PyTorch reference (slow). "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

# Families append their section below: schemas (_lib.define), fake kernels, autograd, registry
# entries (_registry.register) and Python backends (impl_python), in that order.


# --- sphere family (diffcore.sphere) ------------------------------------------------------------
# Ops (``torch.ops.diffcore.<name>``), row-wise over (B, d); float32/float16/bfloat16 rows compute
# in float32, float64 rows in float64; x^ = x / |x| (off-sphere points are projected; a zero point
# row raises ValueError). The meaning is diffcore.reference.sphere:
#
# ``sphere_normalize(x, eps) -> Tensor``               x / max(|x|, eps); eps = 0 and a zero row raise
# ``sphere_project(x, v) -> Tensor``                   v - <x^, v> x^
# ``sphere_expmap(x, v) -> Tensor``                    cos|u| x^ + sinc|u| u,  u = project(x, v)
# ``sphere_logmap(x, y) -> Tensor``                    theta / sin(theta) (y^ - cos(theta) x^)
# ``sphere_geodesic_distance(x, y) -> Tensor``         (B,) theta = 2 atan2(|y^ - x^|, |y^ + x^|)
# ``sphere_q_sample(x0, t, table, noise, seed, offset) -> Tensor``  (and ``_``, ``_out``)
#     expmap(x0, s z), s = float32(table[t]) (table: (K,) sqrt(1 - ab)), z = noise or the Philox
#     stream (seed, offset) over the (B, d) output; exactly one of noise and seed.
# ``sphere_p_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t) -> Tensor``
#     (and ``_``, ``_out``): y / max(|y|, 1e-12), y = the ``diffusion_step`` of the same arguments.
#
# Autograd (the functional ops): the vector-Jacobian products of diffcore.reference.sphere, in
# torch ops; finite at v = 0, y = x and y = -x. Seeded noise is redrawn for the backward.
from diffcore.reference import sphere as _ref_sphere  # noqa: E402

_SPHERE_Q_ARGS = "Tensor t, Tensor table, Tensor? noise, int? seed, int offset"
_SPHERE_P_ARGS = (
    "Tensor f, Tensor? f_uncond, float guidance, Tensor t, Tensor table, Tensor? noise, int? seed, "
    "int offset, bool clamp_t"
)
_lib.define("sphere_normalize(Tensor x, float eps) -> Tensor")
_lib.define("sphere_project(Tensor x, Tensor v) -> Tensor")
_lib.define("sphere_expmap(Tensor x, Tensor v) -> Tensor")
_lib.define("sphere_logmap(Tensor x, Tensor y) -> Tensor")
_lib.define("sphere_geodesic_distance(Tensor x, Tensor y) -> Tensor")
_lib.define(f"sphere_q_sample(Tensor x0, {_SPHERE_Q_ARGS}) -> Tensor")
_lib.define(f"sphere_q_sample_(Tensor(a!) x0, {_SPHERE_Q_ARGS}) -> ()")
_lib.define(f"sphere_q_sample_out(Tensor x0, {_SPHERE_Q_ARGS}, *, Tensor(a!) out) -> ()")
_lib.define(f"sphere_p_step(Tensor x, {_SPHERE_P_ARGS}) -> Tensor")
_lib.define(f"sphere_p_step_(Tensor(a!) x, {_SPHERE_P_ARGS}) -> ()")
_lib.define(f"sphere_p_step_out(Tensor x, {_SPHERE_P_ARGS}, *, Tensor(a!) out) -> ()")

SPHERE_MAP_OPS = ("sphere_normalize", "sphere_project", "sphere_expmap", "sphere_logmap", "sphere_geodesic_distance")
SPHERE_Q_OPS = ("sphere_q_sample", "sphere_q_sample_", "sphere_q_sample_out")
SPHERE_P_OPS = ("sphere_p_step", "sphere_p_step_", "sphere_p_step_out")


# --- fake kernels -------------------------------------------------------------------------------
def _sphere_rows_like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


torch.library.register_fake("diffcore::sphere_normalize")(lambda x, eps: _sphere_rows_like(x))
for _op in ("sphere_project", "sphere_expmap", "sphere_logmap"):
    torch.library.register_fake(f"diffcore::{_op}")(lambda x, v: _sphere_rows_like(x))
torch.library.register_fake("diffcore::sphere_geodesic_distance")(lambda x, y: x.new_empty(x.shape[0]))


@torch.library.register_fake("diffcore::sphere_q_sample")
def _(x0, t, table, noise, seed, offset):
    return _sphere_rows_like(x0)


@torch.library.register_fake("diffcore::sphere_q_sample_")
def _(x0, t, table, noise, seed, offset):
    return None


@torch.library.register_fake("diffcore::sphere_q_sample_out")
def _(x0, t, table, noise, seed, offset, *, out):
    return None


@torch.library.register_fake("diffcore::sphere_p_step")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
    return _sphere_rows_like(x)


@torch.library.register_fake("diffcore::sphere_p_step_")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t):
    return None


@torch.library.register_fake("diffcore::sphere_p_step_out")
def _(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, *, out):
    return None


# --- autograd -----------------------------------------------------------------------------------
def _sphere_save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(i for i in inputs if isinstance(i, torch.Tensor)))


def _sphere_normalize_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.eps = inputs[1]


_register_autograd(
    "sphere_normalize",
    lambda ctx, grad: (_ref_sphere.normalize_backward(ctx.saved_tensors[0], ctx.eps, grad), None),
    setup_context=_sphere_normalize_setup,
)
for _op, _vjp in (
    ("sphere_project", _ref_sphere.project_backward),
    ("sphere_expmap", _ref_sphere.expmap_backward),
    ("sphere_logmap", _ref_sphere.logmap_backward),
    ("sphere_geodesic_distance", _ref_sphere.geodesic_distance_backward),
):
    _register_autograd(
        _op,
        lambda ctx, grad, _vjp=_vjp: _vjp(*ctx.saved_tensors, grad),
        setup_context=_sphere_save_inputs,
    )


def _sphere_noise(x, noise, seed, offset):
    """The noise an op added: the given tensor, or the Philox stream redrawn (float32, (B, d))."""
    if noise is not None or seed is None:
        return noise
    z = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.ops.diffcore.random_normal_(z, seed, offset)
    return z


def _sphere_q_setup(ctx, inputs, output):
    x0, t, table, noise, seed, offset = inputs
    ctx.save_for_backward(x0, t, table, noise)
    ctx.seed, ctx.offset = seed, offset


def _sphere_q_backward(ctx, grad):
    x0, t, table, noise = ctx.saved_tensors
    given = noise is not None
    z = _sphere_noise(x0, noise, ctx.seed, ctx.offset)
    grad_x, grad_z = _ref_sphere.q_sample_backward(x0, t, table, z, grad)
    return grad_x, None, None, grad_z if given else None, None, None


def _sphere_p_setup(ctx, inputs, output):
    x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t = inputs
    ctx.save_for_backward(x, f, f_uncond, t, table, noise)
    ctx.guidance, ctx.seed, ctx.offset, ctx.clamp_t = guidance, seed, offset, clamp_t


def _sphere_p_backward(ctx, grad):
    x, f, f_uncond, t, table, noise = ctx.saved_tensors
    given = noise is not None
    z = _sphere_noise(x, noise, ctx.seed, ctx.offset)
    grads = _ref_sphere.p_step_backward(x, f, f_uncond, ctx.guidance, t, table, z, ctx.clamp_t, grad)
    grad_x, grad_f, grad_u, grad_z = grads
    return grad_x, grad_f, grad_u, None, None, None, grad_z if given else None, None, None, None


_register_autograd("sphere_q_sample", _sphere_q_backward, _sphere_q_setup)
_register_autograd("sphere_p_step", _sphere_p_backward, _sphere_p_setup)


# --- implementations (out form: the op's arguments, then out) -----------------------------------
def _reference_sphere_normalize(x, eps, out):
    out.copy_(_ref_sphere.normalize(x, eps))


def _reference_sphere_points(fn, second):
    def run(x, y, out):
        _ref_sphere.check_points("x", x)
        if second is not None:
            _ref_sphere.check_points(second, y)
        out.copy_(fn(x, y))

    return run


def _reference_sphere_q_sample(x0, t, table, noise, seed, offset, out):
    _ref_sphere.check_points("x0", x0)
    _check_t(t, table)
    out.copy_(_ref_sphere.q_sample_op(x0, t, table, noise, seed, offset))


def _reference_sphere_p_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out):
    _check_t(t, table, clamp_t)
    out.copy_(_ref_sphere.p_step_op(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t))


def _cpu_sphere_map(op):
    def run(*args):
        *inputs, out = args
        out.copy_(getattr(torch.ops.diffcore, op)(*inputs))

    return run


def _cpu_sphere_mutating(op):
    def run(x, *args):
        *args, out = args
        if out is x:
            getattr(torch.ops.diffcore, f"{op}_")(x, *args)
        else:
            getattr(torch.ops.diffcore, f"{op}_out")(x, *args, out=out)

    return run


def _triton_sphere(name):
    def run(*args):
        getattr(_kernels("sphere"), name)(*args)

    return run


_SPHERE_REFERENCES = {
    "sphere_normalize": _reference_sphere_normalize,
    "sphere_project": _reference_sphere_points(_ref_sphere.project, None),
    "sphere_expmap": _reference_sphere_points(_ref_sphere.expmap, None),
    "sphere_logmap": _reference_sphere_points(_ref_sphere.logmap, "y"),
    "sphere_geodesic_distance": _reference_sphere_points(_ref_sphere.geodesic_distance, "y"),
    "sphere_q_sample": _reference_sphere_q_sample,
    "sphere_p_step": _reference_sphere_p_step,
}
for _op, _ref_impl in _SPHERE_REFERENCES.items():
    _cpu_impl = _cpu_sphere_mutating(_op) if _op in ("sphere_q_sample", "sphere_p_step") else _cpu_sphere_map(_op)
    _registry.register(_op, "reference", _ref_impl, devices=("cpu", "cuda"))
    _registry.register(_op, "cpu", _cpu_impl, devices=("cpu",), unavailable=_extension_reason)
    _registry.register(
        _op, "triton", _triton_sphere(f"{_op}_out"), devices=("cpu", "cuda"), unavailable=_triton_unavailable
    )


# --- dispatch of the ops to Python backends -----------------------------------------------------
def _sphere_functional(impl, rows_out=True):
    def run(x, *args):
        out = _sphere_rows_like(x) if rows_out else x.new_empty(x.shape[0])
        impl(x, *args, out)
        return out

    return run


def _sphere_inplace(impl):
    def run(x, *args):
        impl(x, *args, x)

    return run


def _sphere_out(impl):
    def run(x, *args, out):
        impl(x, *args, out)

    return run


for _op in SPHERE_MAP_OPS:
    impl_python(
        _op, functools.partial(_sphere_functional, rows_out=_op != "sphere_geodesic_distance"),
        cpu_fallback=_SPHERE_REFERENCES[_op], cuda=_triton_sphere(f"{_op}_out"),
    )
for _family, _ops in (("sphere_q_sample", SPHERE_Q_OPS), ("sphere_p_step", SPHERE_P_OPS)):
    for _op, _wrap in zip(_ops, (_sphere_functional, _sphere_inplace, _sphere_out)):
        impl_python(_op, _wrap, cpu_fallback=_SPHERE_REFERENCES[_family], cuda=_triton_sphere(f"{_family}_out"))


# --- sparse family (diffcore.sparse) ------------------------------------------------------------
# Ops (``torch.ops.diffcore.<name>``); the meaning is diffcore.reference.sparse:
#
# ``sparse_spmm(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x) -> Tensor``
#     ``out[r] = row_scale[r] * sum_e values[e] * col_scale[col[e]] * x[col[e]]`` over row r's
#     nonzeros: A_hat X with the normalisation applied on the fly. crow: (n + 1,) int64; col:
#     (nnz,) int32 or int64; values: (nnz,) float32; row_scale: (n,), col_scale: (m,) float32
#     (absent: ones); x: (m, d) float32/float16/bfloat16 (float32 accumulation) or float64.
#     ``t_*`` are the transpose's CSR arrays: the backward is the same op on them, with the two
#     scalings swapped (``grad_x = A_hat^T grad``), never a scatter-add.
# ``sparse_propagate(<the same CSR arrays>, x, int num_layers, float[] weights) -> Tensor``
#     ``sum_k weights[k] A_hat^k x`` for k = 0 .. num_layers (A_hat square), without stacking the
#     layers; the backward is the same op over the transpose with the same weights.
from diffcore.reference import sparse as _ref_sparse  # noqa: E402

_CSR_ARGS = (
    "Tensor crow, Tensor col, Tensor? values, Tensor? row_scale, Tensor? col_scale, "
    "Tensor t_crow, Tensor t_col, Tensor? t_values"
)
_lib.define(f"sparse_spmm({_CSR_ARGS}, Tensor x) -> Tensor")
_lib.define(f"sparse_propagate({_CSR_ARGS}, Tensor x, int num_layers, float[] weights) -> Tensor")


@torch.library.register_fake("diffcore::sparse_spmm")
def _(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x):
    return x.new_empty((crow.shape[0] - 1, x.shape[1]))


@torch.library.register_fake("diffcore::sparse_propagate")
def _(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x, num_layers, weights):
    return x.new_empty(x.shape)


# --- autograd: both ops are linear in x; the gradient runs the same op over the transpose -------
def _csr_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.layer_args = tuple(inputs[9:])  # (num_layers, weights) for propagate


def _transposed(ctx) -> tuple:
    crow, col, values, row_scale, col_scale, t_crow, t_col, t_values = ctx.saved_tensors
    return t_crow, t_col, t_values, col_scale, row_scale, crow, col, values


def _spmm_backward(ctx, grad):
    return (None,) * 8 + (torch.ops.diffcore.sparse_spmm(*_transposed(ctx), grad),)


def _propagate_backward(ctx, grad):
    grad_x = torch.ops.diffcore.sparse_propagate(*_transposed(ctx), grad, *ctx.layer_args)
    return (None,) * 8 + (grad_x, None, None)


_register_autograd("sparse_spmm", _spmm_backward, _csr_setup_context)
_register_autograd("sparse_propagate", _propagate_backward, _csr_setup_context)


# --- implementations (out form: the op's arguments, then out) -----------------------------------
def _reference_spmm_out(*args):
    *args, out = args
    out.copy_(_ref_sparse.spmm_op(*args))


def _cpu_spmm_out(*args):
    *args, out = args
    out.copy_(torch.ops.diffcore.sparse_spmm(*args))


def _triton_spmm_out(*args):
    _kernels("sparse").sparse_spmm_out(*args)


def _reference_propagate_out(*args):
    *args, out = args
    out.copy_(_ref_sparse.propagate_op(*args))


def _cpu_propagate_out(*args):
    *args, out = args
    out.copy_(torch.ops.diffcore.sparse_propagate(*args))


def _triton_propagate_out(*args):
    _kernels("sparse").sparse_propagate_out(*args)


for _sparse_op, _ref_impl, _cpu_impl, _triton_impl in (
    ("sparse_spmm", _reference_spmm_out, _cpu_spmm_out, _triton_spmm_out),
    ("sparse_propagate", _reference_propagate_out, _cpu_propagate_out, _triton_propagate_out),
):
    _registry.register(_sparse_op, "reference", _ref_impl, devices=("cpu", "cuda"))
    _registry.register(_sparse_op, "cpu", _cpu_impl, devices=("cpu",), unavailable=_extension_reason)
    _registry.register(
        _sparse_op, "triton", _triton_impl, devices=("cpu", "cuda"), unavailable=_triton_unavailable
    )


# --- Python backends: the reference without _C, Triton for CUDA tensors -------------------------
def _sparse_functional(impl):
    def run(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x, *layer_args):
        rows = x.shape[0] if layer_args else crow.shape[0] - 1
        out = x.new_empty((rows, x.shape[1]))
        impl(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x, *layer_args, out)
        return out

    return run


impl_python("sparse_spmm", _sparse_functional, cpu_fallback=_reference_spmm_out, cuda=_triton_spmm_out)
impl_python(
    "sparse_propagate", _sparse_functional, cpu_fallback=_reference_propagate_out, cuda=_triton_propagate_out
)


# --- sde family (diffcore.sde) ------------------------------------------------------------------
# ``sde_step(x, score, coef, noise, seed, offset, snr) -> (Tensor, Tensor)`` (plus ``sde_step_``, in
# place on ``x`` with ``x_mean`` into ``mean_out`` when given, and ``sde_step_out``). The fused step
# behind the score-SDE predictors that return ``x_mean`` and the Langevin corrector::
#
#     (a, b, c, k) = float64 coef[r] (coef: (B, 4), or (1, 4) for every row)
#     s            = k score                       (k = 1, or -1 / std for a noise prediction)
#     g            = 1, or with snr: snr * mean_r ||z_r|| / mean_r ||s_r||   (reduced inside)
#     x_mean       = a x + b g^2 s,    out = x_mean + c g z
#     z            = noise, or the Philox stream (seed, offset) over the (B, N) output, or none
#
# Returns ``(out, x_mean)``. Steps that return only x (sde_forward, probability_flow_step and the
# loop's predictor) run ``diffusion_step`` with one coefficient row per batch row instead.
# Autograd (the functional op): linear in x, score and noise without snr; with snr, through the
# batch-mean norms too (diffcore.reference.sde.step_backward). Seeded noise is redrawn.
from diffcore.reference import sde as _ref_sde  # noqa: E402

_SDE_ARGS = "Tensor score, Tensor coef, Tensor? noise, int? seed, int offset, float? snr"
_lib.define(f"sde_step(Tensor x, {_SDE_ARGS}) -> (Tensor, Tensor)")
_lib.define(f"sde_step_(Tensor(a!) x, {_SDE_ARGS}, Tensor(b!)? mean_out) -> ()")
_lib.define(f"sde_step_out(Tensor x, {_SDE_ARGS}, *, Tensor(a!) out, Tensor(b!)? mean_out) -> ()")

SDE_STEP_OPS = ("sde_step", "sde_step_", "sde_step_out")


# --- fake kernels -------------------------------------------------------------------------------
@torch.library.register_fake("diffcore::sde_step")
def _(x, score, coef, noise, seed, offset, snr):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("diffcore::sde_step_")
def _(x, score, coef, noise, seed, offset, snr, mean_out):
    return None


@torch.library.register_fake("diffcore::sde_step_out")
def _(x, score, coef, noise, seed, offset, snr, *, out, mean_out):
    return None


# --- autograd -----------------------------------------------------------------------------------
def _sde_step_setup(ctx, inputs, output):
    x, score, coef, noise, seed, offset, snr = inputs
    ctx.save_for_backward(score, coef, noise)
    ctx.seed, ctx.offset, ctx.snr = seed, offset, snr
    ctx.dtypes = (x.dtype, score.dtype, None if noise is None else noise.dtype)


def _sde_step_backward(ctx, grad_out, grad_mean):
    score, coef, noise = ctx.saved_tensors
    z = noise
    if noise is None and ctx.seed is not None:
        z = torch.empty(score.shape, dtype=torch.float32, device=score.device)
        torch.ops.diffcore.random_normal_(z, ctx.seed, ctx.offset)
    grad_x, grad_s, grad_z = _ref_sde.step_backward(score, coef, z, ctx.snr, grad_out, grad_mean)
    x_dtype, s_dtype, z_dtype = ctx.dtypes
    grad_z = None if noise is None else grad_z.to(z_dtype)
    return grad_x.to(x_dtype), grad_s.to(s_dtype), None, grad_z, None, None, None


_register_autograd("sde_step", _sde_step_backward, _sde_step_setup)


# --- implementations (out form: the op's arguments, then out and mean_out) ----------------------
def _reference_sde_step_out(x, score, coef, noise, seed, offset, snr, out, mean_out):
    result, mean = _ref_sde.step(x, score, coef, noise, seed, offset, snr)
    if mean_out is not None:
        mean_out.copy_(mean)
    out.copy_(result)


def _cpu_sde_step_out(x, score, coef, noise, seed, offset, snr, out, mean_out):
    args = (score, coef, noise, seed, offset, snr)
    if out is x:
        torch.ops.diffcore.sde_step_(x, *args, mean_out)
    else:
        torch.ops.diffcore.sde_step_out(x, *args, out=out, mean_out=mean_out)


def _triton_sde_step_out(*args):
    _kernels("sde").sde_step_out(*args)


_registry.register("sde_step", "reference", _reference_sde_step_out, devices=("cpu", "cuda"))
_registry.register("sde_step", "cpu", _cpu_sde_step_out, devices=("cpu",), unavailable=_extension_reason)
_registry.register(
    "sde_step", "triton", _triton_sde_step_out, devices=("cpu", "cuda"), unavailable=_triton_unavailable
)


# --- Python backends: the reference without _C, Triton for CUDA tensors -------------------------
def _sde_functional(impl):
    def run(x, score, coef, noise, seed, offset, snr):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        mean = torch.empty_like(x, memory_format=torch.contiguous_format)
        impl(x, score, coef, noise, seed, offset, snr, out, mean)
        return out, mean

    return run


def _sde_inplace(impl):
    def run(x, score, coef, noise, seed, offset, snr, mean_out):
        impl(x, score, coef, noise, seed, offset, snr, x, mean_out)

    return run


def _sde_out(impl):
    def run(x, score, coef, noise, seed, offset, snr, *, out, mean_out):
        impl(x, score, coef, noise, seed, offset, snr, out, mean_out)

    return run


for _op, _wrap in zip(SDE_STEP_OPS, (_sde_functional, _sde_inplace, _sde_out)):
    impl_python(_op, _wrap, cpu_fallback=_reference_sde_step_out, cuda=_triton_sde_step_out)


# --- training family (diffcore.training) --------------------------------------------------------
# Ops (``torch.ops.diffcore.<name>``); the meaning is diffcore.reference.training:
#
# ``training_diffusion_loss(model_out, x0, noise, t, table, pt, eps, reweight) -> Tensor``
#     (B,) float64: DiffRec's per-row loss ``w[t] term / pt`` in one pass over (B, N) rows::
#         term = mean_j (target - model_out)^2               target = x0, or noise when eps
#         eps and reweight at t = 0: mean_j (x0 - x0_hat)^2 / 2,
#             x0_hat = c3 x_t - c4 model_out, x_t = c1 x0 + c2 noise    (float32 c = table[0, 1:])
#         w = table[t, 0] (reweight), else 1;  pt (B,) optional, every value > 0
#     ``table``: (T, 5) float64 rows (w, sqrt_ab, sqrt_1mab, sqrt_recip_ab, sqrt_recipm1_ab);
#     operands float32/float16/bfloat16 (float32 math) or float64. t outside [0, T) raises.
# ``training_diffusion_loss_backward(grad, <the same>) -> Tensor``   d loss / d model_out, (B, N)
# ``training_history_update_(Tensor(a!) history, Tensor(b!) count, t, losses) -> ()``
#     DiffRec's Lt_history update, row by row in batch order: a full history (count == H) drops
#     its oldest value and appends the loss; else the loss goes to position count, count += 1.
#     history (T, H) float64, count (T,) int64, t (B,) int64, losses (B,) float.
# ``training_bpr_loss(user_table, item_table, users, pos, neg, user_ego, item_ego, weight_decay,
#     reduction) -> Tensor``: per row ``softplus(<u, n> - <u, p>) + weight_decay * 0.5 (|u0|^2 +
#     |p0|^2 + |n0|^2)``, u = user_table[users[b]], p/n = item_table[pos[b]/neg[b]], the ego rows
#     from user_ego/item_ego (None: the score tables); reduction "mean" (LightGCN), "sum", "none".
# ``training_bpr_loss_backward(grad, <the same>) -> (Tensor, Tensor, Tensor, Tensor)``
#     dense gradients of user_table, item_table, user_ego, item_ego (the last two (0,) when no ego
#     tables are given: their term then lands in the score tables), rows scattered, never gathered.
# ``training_info_nce(a, b, temperature, cosine, reduction) -> Tensor``: per row
#     ``logsumexp_j(s_ij / tau) - s_ii / tau``, s = <a^_i, b^_j> (rows L2-normalised when cosine),
#     without forming the (B, B) matrix; reduction as above.
# ``training_info_nce_backward(grad, a, b, temperature, cosine, reduction) -> (Tensor, Tensor)``
#
# Autograd (the functional ops): the loss ops run their ``_backward`` op (so each backend also
# owns its backward); pt and t get no gradient. The registry also lists every backward op, and
# diffcore.training runs both halves of the implementation ``diffcore.use`` forces.
from diffcore.reference import training as _ref_training  # noqa: E402

_LOSS_ARGS = "Tensor model_out, Tensor x0, Tensor? noise, Tensor t, Tensor table, Tensor? pt, bool eps, bool reweight"
_BPR_ARGS = (
    "Tensor user_table, Tensor item_table, Tensor users, Tensor pos, Tensor neg, Tensor? user_ego, "
    "Tensor? item_ego, float weight_decay, str reduction"
)
_NCE_ARGS = "Tensor a, Tensor b, float temperature, bool cosine, str reduction"
_lib.define(f"training_diffusion_loss({_LOSS_ARGS}) -> Tensor")
_lib.define(f"training_diffusion_loss_backward(Tensor grad, {_LOSS_ARGS}) -> Tensor")
_lib.define("training_history_update_(Tensor(a!) history, Tensor(b!) count, Tensor t, Tensor losses) -> ()")
_lib.define(f"training_bpr_loss({_BPR_ARGS}) -> Tensor")
_lib.define(f"training_bpr_loss_backward(Tensor grad, {_BPR_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define(f"training_info_nce({_NCE_ARGS}) -> Tensor")
_lib.define(f"training_info_nce_backward(Tensor grad, {_NCE_ARGS}) -> (Tensor, Tensor)")

TRAINING_LOSS_OPS = ("training_diffusion_loss", "training_bpr_loss", "training_info_nce")
TRAINING_OPS = TRAINING_LOSS_OPS + tuple(f"{op}_backward" for op in TRAINING_LOSS_OPS) + ("training_history_update",)


# --- output allocation (fake kernels and Python backends share it) ------------------------------
def _training_reduced(rows: int, reduction: str, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((rows,) if reduction == "none" else ())


def _training_bpr_grads_like(user_table, item_table, user_ego, item_ego) -> tuple[torch.Tensor, ...]:
    def like(t, fallback):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else fallback.new_empty((0,))

    return like(user_table, None), like(item_table, None), like(user_ego, user_table), like(item_ego, item_table)


def training_outputs(op: str, args: tuple) -> tuple[torch.Tensor, ...]:
    """The tensors the out form of ``op`` writes, allocated for its (functional) arguments."""
    if op == "training_diffusion_loss":
        return (args[0].new_empty((args[0].shape[0],), dtype=torch.float64),)
    if op == "training_diffusion_loss_backward":
        return (torch.empty_like(args[1], memory_format=torch.contiguous_format),)
    if op == "training_bpr_loss":
        return (_training_reduced(args[2].shape[0], args[8], args[0]),)
    if op == "training_bpr_loss_backward":
        return _training_bpr_grads_like(args[1], args[2], args[6], args[7])
    if op == "training_info_nce":
        return (_training_reduced(args[0].shape[0], args[4], args[0]),)
    if op == "training_info_nce_backward":
        return tuple(torch.empty_like(v, memory_format=torch.contiguous_format) for v in args[1:3])
    raise KeyError(op)


for _op in TRAINING_OPS:
    if _op != "training_history_update":
        torch.library.register_fake(f"diffcore::{_op}")(
            lambda *args, _op=_op: (lambda outs: outs[0] if len(outs) == 1 else outs)(training_outputs(_op, args))
        )
torch.library.register_fake("diffcore::training_history_update_")(lambda history, count, t, losses: None)


# --- autograd: the formulas both the dispatcher and a forced implementation use -----------------
def _training_loss_grads(args, grads, needs, backward):
    """Gradients of ``training_diffusion_loss`` for its 8 arguments: ``backward(grad, *args)``
    gives d/d model_out; x0 and noise follow from it row by row (float32 coefficients)::

        target rows:        d/d target = -d/d model_out
        likelihood rows:    d/d x0 = (1 - c3 c1) / c4 * g,   d/d noise = -c3 c2 / c4 * g
    """
    model_out, x0, noise, t, table, pt, eps, reweight = args
    (grad,) = grads
    if not any(needs[:3]):
        return (None,) * 8
    grad_m = backward(grad, *args)
    grad_x0 = grad_noise = None
    if needs[1] or (needs[2] and noise is not None and eps):
        t = t.expand(model_out.shape[0])
        c = table[t].float()  # the float32 coefficients the forward used
        c = c.double() if grad_m.dtype == torch.float64 else c
        g = grad_m.to(c.dtype)
        if eps:
            likelihood = (t == 0) & reweight
            safe_c4 = torch.where(likelihood, c[:, 4], 1.0)
            scale_x0 = torch.where(likelihood, (1 - c[:, 3] * c[:, 1]) / safe_c4, 0.0)
            scale_noise = torch.where(likelihood, -c[:, 3] * c[:, 2] / safe_c4, -1.0)
        else:
            scale_x0, scale_noise = torch.full_like(c[:, 0], -1.0), torch.zeros_like(c[:, 0])
        if needs[1]:
            grad_x0 = (g * scale_x0[:, None]).to(x0.dtype)
        if needs[2] and noise is not None and eps:
            grad_noise = (g * scale_noise[:, None]).to(noise.dtype)
    return grad_m if needs[0] else None, grad_x0, grad_noise, None, None, None, None, None


def _training_bpr_grads(args, grads, needs, backward):
    """Gradients of ``training_bpr_loss`` for its 9 arguments (tables and ego tables)."""
    (grad,) = grads
    if not any(needs[i] for i in (0, 1, 5, 6)):
        return (None,) * 9
    g_user, g_item, g_user_ego, g_item_ego = backward(grad, *args)
    user_ego, item_ego = args[5], args[6]
    return (
        g_user if needs[0] else None, g_item if needs[1] else None, None, None, None,
        g_user_ego if needs[5] and user_ego is not None else None,
        g_item_ego if needs[6] and item_ego is not None else None, None, None,
    )


def _training_nce_grads(args, grads, needs, backward):
    """Gradients of ``training_info_nce`` for its 5 arguments."""
    (grad,) = grads
    if not (needs[0] or needs[1]):
        return (None,) * 5
    g_a, g_b = backward(grad, *args)
    return g_a if needs[0] else None, g_b if needs[1] else None, None, None, None


TRAINING_GRADS = {
    "training_diffusion_loss": _training_loss_grads,
    "training_bpr_loss": _training_bpr_grads,
    "training_info_nce": _training_nce_grads,
}


def once_differentiable(backward):
    """``backward(ctx, *grads)`` run without recording it. The loss ops' backward ops have no
    derivatives of their own, so a backward with ``create_graph=True`` (grad mode on) through
    inputs that require grad raises RuntimeError there and then: its gradients would otherwise count
    as constants when differentiated again, a silently wrong second derivative."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(
                isinstance(v, torch.Tensor) and v.requires_grad for v in (*grads, *ctx.saved_tensors)):
            raise RuntimeError(f"{ctx.op}: double backward (create_graph=True) is not supported: its gradient comes "
                               "from a fused kernel without derivatives of its own")
        with torch.no_grad():
            return backward(ctx, *grads)

    return wrapper


def _training_backward_op(op: str, forced: str | None):
    """``op``'s backward op: through the dispatcher, or through the implementation ``forced``
    (``diffcore.use``) into the outputs ``training_outputs`` allocates (run_forced; the backward
    runs without grad, see once_differentiable)."""
    backward_op = f"{op}_backward"
    if forced is None:
        return getattr(torch.ops.diffcore, backward_op)
    impl = _registry.get(backward_op, forced)
    return lambda *args: run_forced(backward_op, impl, args, lambda: training_outputs(backward_op, args))


def _training_register_autograd(op: str) -> None:
    def setup_context(ctx, inputs, output):
        ctx.op = op
        ctx.tensor_slots = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
        ctx.inputs = [None if isinstance(v, torch.Tensor) else v for v in inputs]

    @once_differentiable
    def backward(ctx, *grads):
        args = list(ctx.inputs)
        for i, v in zip(ctx.tensor_slots, ctx.saved_tensors):
            args[i] = v
        return TRAINING_GRADS[op](tuple(args), grads, ctx.needs_input_grad,
                                  _training_backward_op(op, getattr(ctx, "forced", None)))

    _register_autograd(op, backward, setup_context)


for _op in TRAINING_LOSS_OPS:
    _training_register_autograd(_op)


# --- implementations (out form: the op's arguments, then its outputs) ---------------------------
def _training_check_range(name: str, index: torch.Tensor, n: int, what: str = "index") -> None:
    """The reference's twin of the kernels' value checks (raises RuntimeError)."""
    flat = index.reshape(-1)
    outside = (flat < 0) | (flat >= n)
    if bool(outside.any()):
        i = int(outside.nonzero()[0, 0])
        raise RuntimeError(f"{name}: every {what} must lie in [0, {n}), got {name}[{i}] = {int(flat[i])}")


def _training_check_pt(pt: torch.Tensor | None) -> None:
    if pt is not None:
        bad = ~(pt.reshape(-1) > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise RuntimeError(f"pt: every probability must be positive, got pt[{i}] = {float(pt.reshape(-1)[i])}")


def _training_check_bpr(user_table, item_table, users, pos, neg, user_ego, item_ego):
    _training_check_range("users", users, user_table.shape[0])
    _training_check_range("pos", pos, item_table.shape[0])
    _training_check_range("neg", neg, item_table.shape[0])
    if user_ego is not None:
        _training_check_range("users", users, user_ego.shape[0], "index of user_ego")
    if item_ego is not None:
        _training_check_range("pos", pos, item_ego.shape[0], "index of item_ego")
        _training_check_range("neg", neg, item_ego.shape[0], "index of item_ego")


def _reference_training_loss(model_out, x0, noise, t, table, pt, eps, reweight, out):
    _training_check_range("t", t, table.shape[0], "timestep")
    _training_check_pt(pt)
    out.copy_(_ref_training.diffusion_loss_op(model_out, x0, noise, t, table, pt, eps, reweight))


def _reference_training_loss_backward(grad, model_out, x0, noise, t, table, pt, eps, reweight, out):
    _training_check_range("t", t, table.shape[0], "timestep")
    _training_check_pt(pt)
    with torch.enable_grad():
        m = model_out.detach().requires_grad_()
        loss = _ref_training.diffusion_loss_op(m, x0, noise, t, table, pt, eps, reweight)
        (g,) = torch.autograd.grad(loss, m, grad)
    out.copy_(g)


def _reference_training_history_update(history, count, t, losses):
    _training_check_range("t", t, history.shape[0], "timestep")
    _ref_training.update_lt_history(history, count, t, losses)


def _reference_training_bpr(user_table, item_table, users, pos, neg, user_ego, item_ego, weight_decay, reduction, out):
    _training_check_bpr(user_table, item_table, users, pos, neg, user_ego, item_ego)
    out.copy_(_ref_training.bpr_loss_op(user_table, item_table, users, pos, neg, user_ego, item_ego, weight_decay,
                                        reduction))


def _reference_training_bpr_backward(grad, user_table, item_table, users, pos, neg, user_ego, item_ego, weight_decay,
                                     reduction, g_user, g_item, g_user_ego, g_item_ego):
    _training_check_bpr(user_table, item_table, users, pos, neg, user_ego, item_ego)
    tables = [None if v is None else v.detach().requires_grad_() for v in (user_table, item_table, user_ego, item_ego)]
    with torch.enable_grad():
        loss = _ref_training.bpr_loss_op(tables[0], tables[1], users, pos, neg, tables[2], tables[3], weight_decay,
                                         reduction)
        wanted = [v for v in tables if v is not None]
        grads = iter(torch.autograd.grad(loss, wanted, grad, allow_unused=True))
    for table, out in zip(tables, (g_user, g_item, g_user_ego, g_item_ego)):
        if table is not None:
            g = next(grads)
            out.copy_(torch.zeros_like(table) if g is None else g)


def _reference_training_nce(a, b, temperature, cosine, reduction, out):
    out.copy_(_ref_training.info_nce_op(a, b, temperature, cosine, reduction))


def _reference_training_nce_backward(grad, a, b, temperature, cosine, reduction, g_a, g_b):
    with torch.enable_grad():
        a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss = _ref_training.info_nce_op(a2, b2, temperature, cosine, reduction)
        ga, gb = torch.autograd.grad(loss, (a2, b2), grad)
    g_a.copy_(ga)
    g_b.copy_(gb)


_TRAINING_OUTPUTS = {  # how many out tensors each op's out form takes
    "training_diffusion_loss": 1, "training_diffusion_loss_backward": 1, "training_history_update": 0,
    "training_bpr_loss": 1, "training_bpr_loss_backward": 4, "training_info_nce": 1, "training_info_nce_backward": 2,
}


def _cpu_training(op):
    """The C++ kernel through the dispatcher, its outputs copied into the out tensors."""
    n_out = _TRAINING_OUTPUTS[op]

    def run(*args):
        if op == "training_history_update":
            torch.ops.diffcore.training_history_update_(*args)
            return
        inputs, outs = args[: len(args) - n_out], args[len(args) - n_out :]
        result = getattr(torch.ops.diffcore, op)(*inputs)
        for out, value in zip(outs, result if isinstance(result, tuple) else (result,)):
            out.copy_(value)

    return run


def _triton_training(op):
    def run(*args):
        getattr(_kernels("training"), f"{op}_out")(*args)

    return run


_TRAINING_REFERENCES = {
    "training_diffusion_loss": _reference_training_loss,
    "training_diffusion_loss_backward": _reference_training_loss_backward,
    "training_history_update": _reference_training_history_update,
    "training_bpr_loss": _reference_training_bpr,
    "training_bpr_loss_backward": _reference_training_bpr_backward,
    "training_info_nce": _reference_training_nce,
    "training_info_nce_backward": _reference_training_nce_backward,
}
for _op, _ref_impl in _TRAINING_REFERENCES.items():
    _registry.register(_op, "reference", _ref_impl, devices=("cpu", "cuda"))
    _registry.register(_op, "cpu", _cpu_training(_op), devices=("cpu",), unavailable=_extension_reason)
    _registry.register(_op, "triton", _triton_training(_op), devices=("cpu", "cuda"), unavailable=_triton_unavailable)


# --- Python backends: the reference without _C, Triton for CUDA tensors -------------------------
def _training_functional(op):
    def wrap(impl):
        def run(*args):
            outs = training_outputs(op, args)
            impl(*args, *outs)
            return outs[0] if len(outs) == 1 else outs

        return run

    return wrap


for _op, _ref_impl in _TRAINING_REFERENCES.items():
    if _op == "training_history_update":
        impl_python("training_history_update_", _as_is, cpu_fallback=_ref_impl, cuda=_triton_training(_op))
    else:
        impl_python(_op, _training_functional(_op), cpu_fallback=_ref_impl, cuda=_triton_training(_op))


# --- linalg family (diffcore.linalg) ------------------------------------------------------------
# Ops (``torch.ops.diffcore.<name>``); the meaning is diffcore.reference.linalg. Omega (n x k) is
# never stored: its element (i, j) is element i * k + j of the Philox stream (seed, offset) as
# ``kind`` reads it: "gaussian" the normal z, "rademacher" 1 - 2 bit31(w) of the word w, "sparse"
# that sign where bits 7..30 of w are below floor(density 2^24), else 0.
#
# ``linalg_sketch(a, k, kind, density, scale, seed, offset) -> Tensor``
#     ``scale * (a @ Omega)``: a (m, n) float32/float64, any strides -> (m, k) in a's dtype.
#     NaN/Inf in a raise (in the kernel). Autograd: grad_a = scale * grad @ Omega^T (Omega made,
#     for the backward only, by ``linalg_sketch_csr`` of the identity).
# ``linalg_sketch_csr(crow, col, values, row_scale, col_scale, n_cols, k, kind, density, scale,
#                     seed, offset, dtype) -> Tensor``
#     ``scale * (A_hat @ Omega)`` with ``A_hat[r, c] = row_scale[r] * values[e] * col_scale[c]``
#     (sparse_spmm's CSR arrays: crow (rows + 1,) int64, col (nnz,) int32/int64 sorted within each
#     row, values (nnz,) float32/float64 or None, scalings float32 or None) -> (rows, k) ``dtype``
#     (float32/float64). No autograd (the matrix is a constant).
from diffcore.reference import linalg as _ref_linalg  # noqa: E402

_OMEGA_ARGS = "int k, str kind, float density, float scale, int seed, int offset"
_lib.define(f"linalg_sketch(Tensor a, {_OMEGA_ARGS}) -> Tensor")
_lib.define(
    "linalg_sketch_csr(Tensor crow, Tensor col, Tensor? values, Tensor? row_scale, Tensor? col_scale, int n_cols, "
    f"{_OMEGA_ARGS}, ScalarType dtype) -> Tensor"
)

LINALG_OPS = ("linalg_sketch", "linalg_sketch_csr")


@torch.library.register_fake("diffcore::linalg_sketch")
def _(a, k, kind, density, scale, seed, offset):
    return a.new_empty((a.shape[0], k))


@torch.library.register_fake("diffcore::linalg_sketch_csr")
def _(crow, col, values, row_scale, col_scale, n_cols, k, kind, density, scale, seed, offset, dtype):
    return crow.new_empty((crow.shape[0] - 1, k), dtype=dtype)


# --- autograd: the sketch is linear in a; its backward regenerates Omega ------------------------
def _sketch_setup_context(ctx, inputs, output):
    a, *omega_args = inputs
    ctx.omega_args = tuple(omega_args)
    ctx.n = a.shape[1]


def _sketch_backward(ctx, grad):
    n = ctx.n
    eye_crow = torch.arange(n + 1, device=grad.device)
    eye_col = torch.arange(n, device=grad.device)
    scaled_omega = torch.ops.diffcore.linalg_sketch_csr(
        eye_crow, eye_col, None, None, None, n, *ctx.omega_args, grad.dtype
    )
    return (grad @ scaled_omega.mT,) + (None,) * 6


_register_autograd("linalg_sketch", _sketch_backward, _sketch_setup_context)


# --- implementations (out form: the op's arguments, then out) -----------------------------------
def _reference_sketch_out(a, k, kind, density, scale, seed, offset, out):
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise RuntimeError("A: expected finite values, found NaN or Inf")
    out.copy_(_ref_linalg.sketch_op(a, k, kind, density, scale, seed, offset))


def _cpu_sketch_out(*args):
    *args, out = args
    out.copy_(torch.ops.diffcore.linalg_sketch(*args))


def _triton_sketch_out(*args):
    _kernels("linalg").linalg_sketch_out(*args)


def _reference_sketch_csr_out(*args):
    *args, out = args
    values = args[2]
    if values is not None and values.numel() and not bool(torch.isfinite(values).all()):
        raise RuntimeError("values: expected finite values, found NaN or Inf")
    out.copy_(_ref_linalg.sketch_csr_op(*args))


def _cpu_sketch_csr_out(*args):
    *args, out = args
    out.copy_(torch.ops.diffcore.linalg_sketch_csr(*args))


def _triton_sketch_csr_out(*args):
    _kernels("linalg").linalg_sketch_csr_out(*args)


def _stale_extension_reason(family: str, op: str):
    """A diffcore._C built before ``csrc/cpu/<family>.cpp`` existed has no CPU kernel for ``op``:
    the family's ops then run the reference on CPU, as without _C, and the registry says why "cpu"
    is not live. Returns the registry's ``unavailable`` callback and whether the build is stale."""
    stale = _C is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(f"diffcore::{op}", "CPU")

    def reason(device: torch.device) -> str | None:
        if stale:
            return f"the loaded diffcore._C was built without csrc/cpu/{family}.cpp (rebuild it)"
        return _extension_reason(device)

    return reason, stale


def _warn_stale(family: str, reason) -> None:
    warnings.warn(f"diffcore: {reason(torch.device('cpu'))}; {family} ops run the PyTorch reference on CPU (slow).",
                  RuntimeWarning, stacklevel=2)


_linalg_extension_reason, _LINALG_STALE_EXTENSION = _stale_extension_reason("linalg", "linalg_sketch")


for _linalg_op, _ref_impl, _cpu_impl, _triton_impl in (
    ("linalg_sketch", _reference_sketch_out, _cpu_sketch_out, _triton_sketch_out),
    ("linalg_sketch_csr", _reference_sketch_csr_out, _cpu_sketch_csr_out, _triton_sketch_csr_out),
):
    _registry.register(_linalg_op, "reference", _ref_impl, devices=("cpu", "cuda"))
    _registry.register(_linalg_op, "cpu", _cpu_impl, devices=("cpu",), unavailable=_linalg_extension_reason)
    _registry.register(
        _linalg_op, "triton", _triton_impl, devices=("cpu", "cuda"), unavailable=_triton_unavailable
    )


# --- Python backends: the reference without _C, Triton for CUDA tensors -------------------------
def _sketch_functional(impl):
    def run(a, k, kind, density, scale, seed, offset):
        out = a.new_empty((a.shape[0], k))
        impl(a, k, kind, density, scale, seed, offset, out)
        return out

    return run


def _sketch_csr_functional(impl):
    def run(crow, col, values, row_scale, col_scale, n_cols, k, kind, density, scale, seed, offset, dtype):
        out = torch.empty((crow.shape[0] - 1, k), dtype=dtype, device=crow.device)
        impl(crow, col, values, row_scale, col_scale, n_cols, k, kind, density, scale, seed, offset, dtype, out)
        return out

    return run


impl_python("linalg_sketch", _sketch_functional, cpu_fallback=_reference_sketch_out, cuda=_triton_sketch_out)
impl_python(
    "linalg_sketch_csr", _sketch_csr_functional, cpu_fallback=_reference_sketch_csr_out, cuda=_triton_sketch_csr_out
)
if _LINALG_STALE_EXTENSION:
    _lib.impl("linalg_sketch", _sketch_functional(_reference_sketch_out), "CPU")
    _lib.impl("linalg_sketch_csr", _sketch_csr_functional(_reference_sketch_csr_out), "CPU")
    _warn_stale("linalg", _linalg_extension_reason)


# --- retrieval family (diffcore.retrieval) ------------------------------------------------------
# ``retrieval_topk(x, items, k, crow, col) -> (Tensor values, Tensor ids)``
#     The k best items of each row; the meaning is diffcore.reference.retrieval. ``x`` (B, n_items)
#     scores when ``items`` is None, else (B, d) queries scored against items (n_items, d) blockwise
#     (the (B, n_items) scores are never stored whole); float32/float64/float16/bfloat16, any
#     strides. ``crow`` (B + 1,) int64 and ``col`` (nnz,) int64: each row's history, masked to
#     -inf (both or neither). -> values (B, k) in x's dtype, ids (B, k) int64; ties to the lower id.
#     NaN scores raise (in the kernel). Not differentiable.
from diffcore.reference import retrieval as _ref_retrieval  # noqa: E402

_lib.define("retrieval_topk(Tensor x, Tensor? items, int k, Tensor? crow, Tensor? col) -> (Tensor, Tensor)")


def _topk_outputs(x, k):
    return x.new_empty((x.shape[0], k)), torch.empty((x.shape[0], k), dtype=torch.long, device=x.device)


@torch.library.register_fake("diffcore::retrieval_topk")
def _(x, items, k, crow, col):
    return _topk_outputs(x, k)


# --- implementations (out form: the op's arguments, then values and ids) ------------------------
def _reference_topk_out(x, items, k, crow, col, values, ids):
    v, i = _ref_retrieval.topk(x, items, k, crow, col)
    values.copy_(v)
    ids.copy_(i)


def _cpu_topk_out(x, items, k, crow, col, values, ids):
    v, i = torch.ops.diffcore.retrieval_topk(x, items, k, crow, col)
    values.copy_(v)
    ids.copy_(i)


def _triton_topk_out(*args):
    _kernels("retrieval").retrieval_topk_out(*args)


_retrieval_extension_reason, _RETRIEVAL_STALE_EXTENSION = _stale_extension_reason("retrieval", "retrieval_topk")
_registry.register("retrieval_topk", "reference", _reference_topk_out, devices=("cpu", "cuda"))
_registry.register("retrieval_topk", "cpu", _cpu_topk_out, devices=("cpu",), unavailable=_retrieval_extension_reason)
_registry.register("retrieval_topk", "triton", _triton_topk_out, devices=("cpu", "cuda"),
                   unavailable=_triton_unavailable)


# --- Python backends: the reference without _C, Triton for CUDA tensors -------------------------
def _topk_functional(impl):
    def run(x, items, k, crow, col):
        values, ids = _topk_outputs(x, k)
        impl(x, items, k, crow, col, values, ids)
        return values, ids

    return run


impl_python("retrieval_topk", _topk_functional, cpu_fallback=_reference_topk_out, cuda=_triton_topk_out)
if _RETRIEVAL_STALE_EXTENSION:
    _lib.impl("retrieval_topk", _topk_functional(_reference_topk_out), "CPU")
    _warn_stale("retrieval", _retrieval_extension_reason)
