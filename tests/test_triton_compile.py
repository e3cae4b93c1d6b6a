"""Every Triton kernel compiles for an NVIDIA GPU (sm_90; no GPU needed) at the specialisations its
launcher launches. The rest of the suite runs the kernels only under the interpreter, which is laxer
than the compiler (it lets a kernel read a plain Python global, for one).

This file is also the script the test runs, in fresh Pythons:

1. ``record`` (TRITON_INTERPRET=1; the families in two processes at once): the launchers in
   ``diffcore.kernels`` run small calls over what changes a launch's specialisation (every dtype a
   launcher takes, each optional operand given and not, given / seeded / no noise, seed words and
   offsets past 2^31, the smallest and largest blocks, ints equal to 1, column-major operands); a
   patch on the interpreter's launch records each launch: the kernel, tensors as dtype and
   alignment, other ints as a value of the same specialisation class, constexprs as they are.
2. ``compile`` (TRITON_INTERPRET=0: ``triton.jit`` gives JITFunctions): each launch is bound by the
   JIT's own binder for the NVIDIA backend (signature, constexprs, ``tt.divisibility``, ints equal to
   1 as constexprs, ``do_not_specialize``), as a launch on a GPU binds it; the unique
   specialisations are cut to a greedy cover (per kernel: every argument type, constexpr value,
   divisibility and option that any launch shows, and each constexpr value with float32 operands
   and again with float64 ones), and those are compiled with ``triton.compile`` for
   ``GPUTarget("cuda", 90, 32)`` in a fresh cache (about 120 compiles, 50 s on two cores). Every
   failure is reported, as is a kernel needing more shared memory than sm_90 has, or spilling
   more than SPILL_LIMIT bytes of registers per thread (from ptxas's own report, ``-v``): a spill
   of a few words stays in L1, but the BPR and InfoNCE tiles of 128 features spilled 250-1900
   bytes, reloaded in every loop iteration, before their chunks were cut to 32.

``DIFFCORE_COMPILE_EVERY_LAUNCH=1`` also records the slow-to-compile variants (the largest blocks in
float16, seeded sphere steps of 4096 elements a program) and compiles every unique specialisation
(about 380; a few minutes).

The test also checks that the recording saw every ``@triton.jit`` kernel that a launcher in
kernels/*.py launches (found in the sources), so a new kernel cannot go uncompiled.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGET = ("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)
SPILL_LIMIT = 64  # bytes of spill stores or loads per thread that a specialisation may have
KERNELS_PACKAGE = "diffcore.kernels"
FAMILIES = ("diffusion", "linalg", "random", "retrieval", "sde", "sparse", "sphere", "training")
RECORD_GROUPS = (("retrieval", "sparse", "linalg", "random"), ("sphere", "sde", "diffusion", "training"))
FLOAT_POINTERS = ("*fp16", "*bf16", "*fp32", "*fp64")
TIMEOUT = 400  # seconds per subprocess


# --- the kernels a launcher launches, from the sources ------------------------------------------
def _is_jit(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(node, ast.Attribute) and node.attr == "jit" and getattr(node.value, "id", None) == "triton"


def launched_kernels(kernels_dir: Path) -> set[str]:
    """``module:name`` of every ``@triton.jit`` function that a plain (not jit) function of its
    module names: launched there (``kernel[grid](...)``, or handed to a helper that launches it).
    Device functions are named only inside jit functions."""
    found = set()
    for path in sorted(kernels_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        jit = {f.name for f in functions if any(_is_jit(d) for d in f.decorator_list)}
        for f in functions:
            if f.name not in jit:
                found |= {f"{KERNELS_PACKAGE}.{path.stem}:{node.id}" for node in ast.walk(f)
                          if isinstance(node, ast.Name) and node.id in jit}
    return found


# --- recording (TRITON_INTERPRET=1) -------------------------------------------------------------
def _int_class(v: int) -> int:
    """A value specialised as ``v`` is: 1 (a constexpr), else i32 / i64 / u64 by range, and whether
    it is a multiple of 16."""
    if v == 1:
        return 1
    aligned = v % 16 == 0
    if -(2**31) <= v < 2**31:
        return 16 if aligned else 17
    if -(2**63) <= v < 2**63:
        return 2**32 if aligned else 2**32 + 1
    return 2**63 if aligned else 2**63 + 1


def _encode(v, constexpr: bool):
    import torch
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "ptr16": v.data_ptr() % 16}
    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    if isinstance(v, tl.constexpr):
        return {"constexpr": _encode(v.value, True)}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if constexpr else _int_class(v)
    if isinstance(v, float):
        return v if constexpr else 0.5  # typed by the parameter's annotation: fp32, or tl.float64
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}")


def _record(families: list[str]) -> list[dict]:
    """The unique launches the drivers of ``families`` make (each launch also runs)."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        launch = {
            "kernel": f"{self.fn.__module__}:{self.fn.__name__}",
            "args": {k: _encode(v, "constexpr" in str(params[k].annotation)) for k, v in bound.arguments.items()},
            "options": {k: v for k, v in kwargs.items() if k not in params},
        }
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        drivers = _Drivers()
        for family in families:
            getattr(drivers, family)()
    finally:
        InterpretedFunction.run = original
    return [launches[k] for k in sorted(launches)]


class _Drivers:
    """One method per family: small calls of its launchers, over what changes a specialisation."""

    def __init__(self):
        import importlib

        import torch

        self.torch = torch
        self.k = {name: importlib.import_module(f"{KERNELS_PACKAGE}.{name}") for name in FAMILIES}
        self.gen = torch.Generator().manual_seed(0)
        self.small_seed, self.big_seed = (7, 3), (2**64 - 1, 2**40)  # (seed, offset): int32 words, and not
        self.table3 = torch.rand(10, 3, generator=self.gen, dtype=torch.float64)
        # the slow-to-compile variants too (largest blocks in float16, seeded sphere steps of 4096
        # elements a program): DIFFCORE_COMPILE_EVERY_LAUNCH=1
        self.every = os.environ.get("DIFFCORE_COMPILE_EVERY_LAUNCH") == "1"
        self.wide = (torch.float32, torch.bfloat16, torch.float16) if self.every else (torch.float32, torch.bfloat16)

    def randn(self, *shape, dtype=None):
        return self.torch.randn(*shape, generator=self.gen).to(dtype or self.torch.float32)

    def randint(self, high, n):
        return self.torch.randint(0, high, (n,), generator=self.gen)

    @staticmethod
    def col_major(t):
        return t.t().contiguous().t()

    def noise(self, mode, x):
        """(noise, seed, offset) for: given, seeded, big (seeded past 2^31), none."""
        if mode == "given":
            return self.randn(*x.shape, dtype=x.dtype), None, 0
        if mode in ("seeded", "big"):
            return (None, *(self.small_seed if mode == "seeded" else self.big_seed))
        return None, None, 0

    def random(self):
        torch = self.torch
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for seed, offset in (self.small_seed, self.big_seed):
                self.k["random"].random_normal_(torch.empty(5, 7, dtype=dtype), seed, offset)
        self.k["random"].random_normal_(torch.empty(1), *self.small_seed)

    def diffusion(self):
        torch = self.torch
        f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

        def step(shape, dtype, guided, noise):
            x = self.randn(*shape, dtype=dtype)
            f = self.randn(*shape, dtype=dtype) if guided != "none" else None
            u = self.randn(*shape, dtype=dtype) if guided == "cfg" else None
            self.k["diffusion"].diffusion_step_out(x, f, u, 0.0 if u is None else 1.5, self.randint(10, shape[0]),
                                                   self.table3, *self.noise(noise, x), False, torch.empty_like(x))

        for dtype in (f32, bf16):
            for guided in ("none", "model", "cfg"):
                for noise in ("given", "seeded", "none"):
                    step((3, 5), dtype, guided, noise)
        for dtype in (f32, f16, bf16):
            step((3, 5), dtype, "cfg", "big")
        for dtype in self.wide:
            step((2, 2100), dtype, "cfg", "seeded")  # BLOCK 2048, num_warps 8
        step((1, 1), f32, "cfg", "given")
        x = self.randn(3, 5)  # in place, one timestep for every row
        self.k["diffusion"].diffusion_step_out(x, self.randn(3, 5), None, 0.0, torch.tensor([4]), self.table3, None,
                                               7, 0, True, x)

    def sde(self):
        torch = self.torch
        f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

        def step(shape, dtype, noise, snr, mean, coef_rows=None):
            x, score = self.randn(*shape, dtype=dtype), self.randn(*shape, dtype=dtype)
            coef = torch.rand(coef_rows or shape[0], 4, generator=self.gen, dtype=torch.float64) + 0.5
            self.k["sde"].sde_step_out(x, score, coef, *self.noise(noise, x), snr, torch.empty_like(x),
                                       torch.empty_like(x) if mean else None)

        for dtype in (f32, bf16):
            for noise in ("given", "seeded", "none"):
                for snr in (None, 0.16):
                    for mean in (False, True):
                        step((3, 5), dtype, noise, snr, mean)
        for dtype in (f32, f16, bf16):
            step((3, 5), dtype, "big", 0.16, True)
        for dtype in self.wide:
            step((2, 2100), dtype, "seeded", 0.16, True)  # BLOCK 2048, num_warps 8
        step((3, 5), f32, "given", 0.16, False, coef_rows=1)
        step((1, 1), f32, "given", 0.16, True)

    def sphere(self):
        torch = self.torch
        sphere = self.k["sphere"]
        table1 = torch.rand(10, generator=self.gen, dtype=torch.float64)

        def calls(shape, dtype, noises=("given", "seeded", "none")):
            x, v, y = (self.randn(*shape, dtype=dtype) for _ in range(3))
            for eps in (0.0, 1e-3):
                sphere.sphere_normalize_out(x, eps, torch.empty_like(x))
            sphere.sphere_project_out(x, v, torch.empty_like(x))
            sphere.sphere_expmap_out(x, v, torch.empty_like(x))
            sphere.sphere_logmap_out(x, y, torch.empty_like(x))
            sphere.sphere_geodesic_distance_out(x, y, torch.empty(shape[0], dtype=dtype))
            t = self.randint(10, shape[0])
            for noise in noises:
                if noise != "none":
                    sphere.sphere_q_sample_out(x, t, table1, *self.noise(noise, x), torch.empty_like(x))
                for u in (None, y):
                    sphere.sphere_p_step_out(x, v, u, 0.0 if u is None else 1.5, t, self.table3,
                                             *self.noise(noise, x), False, torch.empty_like(x))

        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            calls((6, 3), dtype)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            calls((6, 3), dtype, noises=("big",))
            if self.every or dtype != torch.float16:  # BLOCK 512, ROWS 8 (the largest)
                calls((3, 1100), dtype, noises=("given", "seeded") if self.every else ("given",))
        calls((1, 1), torch.float32, noises=("given",))

    def _graph(self):
        """(crow, col, values, row_scale, col_scale) of a 5-node graph with a hub and an empty row."""
        torch = self.torch
        n = 5
        dense = (torch.rand(n, n, generator=self.gen) < 0.4).float()
        dense[0], dense[3] = 1.0, 0.0
        crow = torch.zeros(n + 1, dtype=torch.int64)
        crow[1:] = dense.sum(1).cumsum(0).long()
        col = dense.nonzero()[:, 1].contiguous()
        return crow, col, *(torch.rand(m, generator=self.gen) for m in (col.numel(), n, n))

    def sparse(self):
        torch = self.torch
        sparse = self.k["sparse"]
        crow, col, vals, rs, cs = self._graph()
        n = crow.numel() - 1

        def csr(col, values, row_scale, col_scale):
            return crow, col, values, row_scale, col_scale, crow, col, values

        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for values in (None, vals):
                for row_scale in (None, rs):
                    for col_scale in (None, cs):
                        x = self.randn(n, 5, dtype=dtype)
                        sparse.sparse_spmm_out(*csr(col, values, row_scale, col_scale), x, torch.empty_like(x))
            # which of next / x0 / sum / out a layer gets, by the number of layers and zero weights
            for layers, weights in ((1, [0.5, 0.5]), (1, [0.0, 1.0]), (2, [1 / 3] * 3), (3, [0.25] * 4),
                                    (3, [0.0, 0.0, 0.5, 0.5]), (3, [0.5, 0.0, 0.0, 0.5])):
                x = self.randn(n, 5, dtype=dtype)
                sparse.sparse_propagate_out(*csr(col, vals, rs, cs), x, layers, weights, torch.empty_like(x))
            x = self.randn(n, 5, dtype=dtype)
            sparse.sparse_propagate_out(*csr(col, None, None, None), x, 2, [1 / 3] * 3, torch.empty_like(x))
        for dtype in (torch.float64, *self.wide):
            x = self.randn(n, 200, dtype=dtype)  # BLOCK_D 128, int32 column indices
            sparse.sparse_spmm_out(*csr(col.int(), vals, rs, cs), x, torch.empty_like(x))
            sparse.sparse_propagate_out(*csr(col.int(), vals, rs, cs), x, 3, [0.25] * 4, torch.empty_like(x))
        x = self.randn(n, 5, dtype=torch.float16)
        sparse.sparse_spmm_out(*csr(col, vals, rs, cs), x, torch.empty_like(x))
        sparse.sparse_propagate_out(*csr(col, vals, rs, cs), x, 3, [0.25] * 4, torch.empty_like(x))
        x = self.randn(n, 1)
        sparse.sparse_spmm_out(*csr(col, vals, rs, cs), x, torch.empty_like(x))

    def linalg(self):
        torch = self.torch
        linalg = self.k["linalg"]
        crow, col, vals, rs, cs = self._graph()
        n = crow.numel() - 1
        for dtype in (torch.float32, torch.float64):
            for kind in ("gaussian", "rademacher", "sparse"):
                for a, width, (seed, offset) in ((self.randn(7, 9, dtype=dtype), 5, self.small_seed),
                                                 (self.col_major(self.randn(7, 9, dtype=dtype)), 100, self.big_seed)):
                    linalg.linalg_sketch_out(a, width, kind, 0.3, 1.0, seed, offset,
                                             torch.empty(7, width, dtype=dtype))
                for ops in ((col, None, None, None), (col.int(), vals.to(dtype), rs, cs)):
                    for width, (seed, offset) in ((5, self.small_seed), (64, self.big_seed)):
                        linalg.linalg_sketch_csr_out(crow, *ops, n, width, kind, 0.3, 2.0, seed, offset, dtype,
                                                     torch.empty(n, width, dtype=dtype))
        linalg.linalg_sketch_out(self.randn(1, 1), 1, "gaussian", 1.0, 1.0, *self.small_seed, torch.empty(1, 1))

    def retrieval(self):
        torch = self.torch

        def topk(x, items, k, history, block_n=None):
            rows = x.shape[0]
            n_items = x.shape[1] if items is None else items.shape[0]
            crow = col = None
            if history:
                crow, col = torch.arange(rows + 1) * 2, self.randint(n_items, 2 * rows)
            self.k["retrieval"].retrieval_topk_out(x, items, k, crow, col, torch.empty(rows, k, dtype=x.dtype),
                                                   torch.empty(rows, k, dtype=torch.int64), block_n=block_n)

        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for history in (False, True):
                topk(self.randn(5, 40, dtype=dtype), None, 3, history)  # scores
                topk(self.randn(5, 6, dtype=dtype), self.randn(40, 6, dtype=dtype), 3, history)  # queries
                topk(self.randn(5, 6, dtype=dtype), self.randn(40, 6, dtype=dtype), 3, history, block_n=8)
            topk(self.randn(3, 1500, dtype=dtype), None, 10, False)  # BLOCK_N 1024
            if dtype == torch.float64:  # the largest blocks: 8 rows x 128 items x 8 columns, no dot
                topk(self.col_major(self.randn(9, 9, dtype=dtype)), self.col_major(self.randn(200, 9, dtype=dtype)),
                     5, True)
            elif dtype in self.wide:  # 16 rows x 512 items x 32 columns, num_warps 8
                topk(self.col_major(self.randn(18, 70, dtype=dtype)),
                     self.col_major(self.randn(600, 70, dtype=dtype)), 64, True)
        topk(self.randn(1, 1), None, 1, False)
        topk(self.randn(1, 1), self.randn(1, 1), 1, False)

    def training(self):
        torch = self.torch
        training = self.k["training"]
        f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
        table5 = torch.rand(10, 5, generator=self.gen, dtype=f64) + 0.1

        def loss(shape, dtype, eps):
            m, x0, z = (self.randn(*shape, dtype=dtype) for _ in range(3))
            t = self.randint(10, shape[0])
            t[0] = 0
            z = z if eps else None
            training.training_diffusion_loss_out(m, x0, z, t, table5, None, eps, True, torch.empty(shape[0], dtype=f64))
            training.training_diffusion_loss_backward_out(torch.rand(shape[0], generator=self.gen, dtype=f64), m, x0,
                                                          z, t, table5, None, eps, True, torch.empty_like(m))

        for dtype in (f32, f64, f16, bf16):
            for eps in (False, True):
                loss((3, 5), dtype, eps)
        for dtype in (f64, *self.wide):
            loss((2, 2100), dtype, True)  # BLOCK 2048
        loss((1, 1), f32, True)

        for T, H, batch in ((10, 5, 7), (3, 1500, 1200), (1, 1, 1)):  # blocks up to 1024 x 1024
            history, count = torch.zeros(T, H, dtype=f64), torch.zeros(T, dtype=torch.int64)
            training.training_history_update_out(history, count, self.randint(T, batch),
                                                 torch.rand(batch, generator=self.gen, dtype=f64))
        history, count = self.col_major(torch.zeros(5, 10, dtype=f64)), torch.zeros(5, dtype=torch.int64)
        training.training_history_update_out(history, count, self.randint(5, 7), torch.rand(7, generator=self.gen))

        def bpr(dtype, d, index_dtype, ego, batch=20, wd=1e-4):
            users, items = self.randn(13, d, dtype=dtype), self.randn(17, d, dtype=dtype)
            ue, ie = (self.randn(13, d, dtype=dtype), self.randn(17, d, dtype=dtype)) if ego else (None, None)
            idx = [self.randint(hi, batch).to(index_dtype) for hi in (13, 17, 17)]
            training.training_bpr_loss_out(users, items, *idx, ue, ie, wd, "mean", torch.empty((), dtype=dtype))
            g_ego = (torch.empty_like(ue), torch.empty_like(ie)) if ego else (torch.empty(0), torch.empty(0))
            training.training_bpr_loss_backward_out(torch.ones((), dtype=dtype), users, items, *idx, ue, ie, wd,
                                                    "mean", torch.empty_like(users), torch.empty_like(items), *g_ego)

        for dtype in (f32, f64, bf16):
            for ego in (False, True):
                bpr(dtype, 8, torch.int64, ego)
        bpr(f16, 8, torch.int64, True)
        for dtype in (f64, *self.wide):
            bpr(dtype, 200, torch.int32, True)  # BLOCK_D 32, seven chunks
        bpr(f32, 1, torch.int64, False, batch=1, wd=0.0)

        for dtype in (f32, f64, f16, bf16):  # float16 / bfloat16 operands run in float32
            for shape in ((5, 6), (40, 200)):  # blocks 16 x 16 x 16 (tile 16) and 32 x 32 x 32 (tile 64)
                a, b = self.randn(*shape, dtype=dtype), self.randn(*shape, dtype=dtype)
                training.training_info_nce_out(a, b, 0.2, True, "none", torch.empty(shape[0], dtype=dtype))
                training.training_info_nce_backward_out(torch.ones(shape[0], dtype=dtype), a, b, 0.2, False, "none",
                                                        torch.empty_like(a), torch.empty_like(b))
        a, b = self.randn(1, 1), self.randn(1, 1)
        training.training_info_nce_out(a, b, 0.2, False, "mean", torch.empty(()))
        training.training_info_nce_backward_out(torch.ones(()), a, b, 0.2, False, "mean", torch.empty_like(a),
                                                torch.empty_like(b))


# --- compiling (TRITON_INTERPRET=0) -------------------------------------------------------------
class _Pointer:
    """A tensor argument as the binder reads it: dtype and data_ptr (its alignment)."""

    def __init__(self, dtype, ptr16: int):
        self.dtype = dtype
        self._ptr = ptr16

    def data_ptr(self) -> int:
        return self._ptr


def _decode(v):
    import torch
    import triton.language as tl

    if isinstance(v, dict):
        if "tensor" in v:
            return _Pointer(getattr(torch, v["tensor"]), v["ptr16"])
        if "tl_dtype" in v:
            return tl.dtype(v["tl_dtype"])
        if "constexpr" in v:
            return tl.constexpr(_decode(v["constexpr"]))
    return v


def _shown(v) -> str:
    if isinstance(v, dict):
        return v.get("tensor") or v.get("tl_dtype") or _shown(v["constexpr"])
    return str(v)


def describe(launch: dict, signature: dict | None = None) -> str:
    """``kernel(arg:type, ..., CONST=value, ..., num_warps=...)``, types from the bound signature
    when there is one."""
    parts = []
    for arg, v in launch["args"].items():
        if signature is not None and signature.get(arg, "constexpr") != "constexpr":
            parts.append(f"{arg}:{signature[arg]}")
        else:
            parts.append(f"{arg}={_shown(v)}")
    parts += [f"{k}={v}" for k, v in launch["options"].items()]
    return f"{launch['kernel'].split(':')[1]}({', '.join(parts)})"


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*TARGET)


def _bind(launch: dict):
    """(kernel, signature, constexprs, attrs, options): ``launch`` bound as ``JITFunction.run``
    binds it on the target."""
    import importlib

    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    module, name = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    assert isinstance(kernel, JITFunction), f"{launch['kernel']} is a {type(kernel).__name__}, not a JITFunction"
    backend = make_backend(_target())
    kwargs = {k: _decode(v) for k, v in launch["args"].items()}
    kwargs.update(launch["options"])
    kwargs.setdefault("debug", kernel.debug or knobs.runtime.debug)
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, signature, constexprs, attrs, options


def _features(launch: dict, signature: dict, constexprs: dict, attrs: dict, options) -> set:
    """What one bound launch exercises: each argument's type, constexpr value and divisibility, the
    options; and each constexpr value with float32 operands, and again with float64 ones (not with
    float16 / bfloat16 ones, which change little beyond the loads and the rounding)."""
    names = list(launch["args"])
    feats = {("type", k, v) for k, v in signature.items()}
    feats |= {("constexpr", names[i], repr(v)) for (i, *_), v in constexprs.items()}
    feats |= {("attr", names[i], repr(v)) for (i, *_), v in attrs.items()}
    feats |= {("option", k, repr(v)) for k, v in options.__dict__.items()}
    types = set(signature.values())
    if not {"*fp16", "*bf16"} & types and {"*fp32", "*fp64"} & types:  # float32 or float64 operands
        precision = "*fp64" if "*fp64" in types else "*fp32"
        feats |= {(precision,) + f for f in feats if f[0] == "constexpr"}
    return feats


def _select(features: list[tuple[str, set]]) -> list[int]:
    """A greedy cover, per kernel: the launches that together show every feature any launch of the
    kernel shows, each pick the one showing the most not yet shown (ties: the first)."""
    chosen, by_kernel = [], {}
    for i, (kernel, feats) in enumerate(features):
        by_kernel.setdefault(kernel, []).append((i, feats))
    for items in by_kernel.values():
        left = set().union(*(f for _, f in items))
        while left:
            i, feats = max(items, key=lambda item: (len(item[1] & left), -item[0]))
            chosen.append(i)
            left -= feats
    return sorted(chosen)


def _error(exc: BaseException) -> str:
    import traceback

    lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return "\n".join(lines[-25:])


def _compile_one(launch: dict) -> dict:
    """Compiles one launch for the target: {"ok", "spec", and "error" or "spill" (the most bytes
    of spill stores or loads per thread, from ptxas's report)}."""
    import contextlib
    import io
    import re

    import triton
    from triton.compiler import ASTSource

    signature = None
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed
    log = io.StringIO()
    try:
        kernel, signature, constexprs, attrs, options = _bind(launch)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=_target(),
                                      options=options.__dict__)
    except Exception as exc:  # every failure is reported
        return {"ok": False, "spec": describe(launch, signature), "error": _error(exc)}
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
    if not spills:
        return {"ok": False, "spec": describe(launch, signature), "error": "ptxas reported no spill counts"}
    if compiled.metadata.shared > SHARED_LIMIT:
        return {"ok": False, "spec": describe(launch, signature),
                "error": f"needs {compiled.metadata.shared} bytes of shared memory; sm_90 has {SHARED_LIMIT}"}
    if max(spills) > SPILL_LIMIT:
        return {"ok": False, "spec": describe(launch, signature),
                "error": f"spills registers: {max(spills)} bytes per thread (ptxas -v); the limit is {SPILL_LIMIT}"}
    return {"ok": True, "spec": describe(launch, signature), "spill": max(spills)}


def _compile(launches: list[dict], every: bool) -> tuple[list[dict], dict]:
    """Binds every launch, keeps the unique specialisations (a greedy cover of them unless
    ``every``) and compiles those in two processes."""
    results, unique, features, seen = [], [], [], set()
    for launch in launches:
        try:
            kernel, signature, constexprs, attrs, options = _bind(launch)
        except Exception as exc:
            results.append({"ok": False, "kernel": launch["kernel"], "spec": describe(launch), "error": _error(exc)})
            continue
        key = repr((launch["kernel"], signature, constexprs, attrs, options.__dict__))
        if key not in seen:
            seen.add(key)
            unique.append(launch)
            features.append((launch["kernel"], _features(launch, signature, constexprs, attrs, options)))
    todo = unique if every else [unique[i] for i in _select(features)]
    workers = min(2, os.cpu_count() or 1)
    if workers == 1:
        outcomes = [_compile_one(launch) for launch in todo]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_compile_one, todo))
    results += [{"kernel": launch["kernel"], **outcome} for launch, outcome in zip(todo, outcomes)]
    return results, {"launches": len(launches), "unique": len(unique), "compiled": len(todo),
                     "kernels": len({launch["kernel"] for launch in todo})}


def main(argv: list[str]) -> int:
    mode, path = argv[1], Path(argv[2])
    if mode == "record":
        path.write_text(json.dumps(_record(argv[3:])))
        return 0
    import triton
    import triton.runtime.jit as jit
    from triton.backends import backends

    if "nvidia" not in backends:
        print("skip: this Triton has no NVIDIA backend")
        return 0
    if not (hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")
            and hasattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "dump_ptxas_log")):
        print(f"skip: Triton {triton.__version__} lacks the JIT binder this test binds launches with, or "
              "the ptxas log knob it reads spills from (3.9 has both)")
        return 0
    launches = json.loads(path.read_text())
    results, counts = _compile(launches, every=os.environ.get("DIFFCORE_COMPILE_EVERY_LAUNCH") == "1")
    path.with_suffix(".out.json").write_text(json.dumps({"results": results, "counts": counts}))
    worst = max((r for r in results if r["ok"]), key=lambda r: r["spill"], default=None)
    print(f"compiled {sum(r['ok'] for r in results)} of {len(results)}: {counts}; the largest spill: "
          + (f"{worst['spill']} bytes, {worst['spec']}" if worst else "none"))
    return 0


# --- the test -----------------------------------------------------------------------------------
def _start(args: list[str], **env: str) -> subprocess.Popen:
    """This file run as a script with ``args``; TRITON_ALLOW_NON_CONSTEXPR_GLOBALS removed (it
    would let a compiled kernel read a plain global, as the interpreter does)."""
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"}
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{proc.args[2:]} failed:\n{out[-2000:]}\n{err[-6000:]}"
    return out


def test_every_triton_kernel_compiles_for_a_gpu(tmp_path):
    """Every launched kernel is recorded, and its launches' specialisations compile for sm_90."""
    pytest.importorskip("triton")
    import diffcore.kernels

    files = [tmp_path / f"launches{i}.json" for i in range(len(RECORD_GROUPS))]
    procs = [_start(["record", str(f), *group], TRITON_INTERPRET="1") for f, group in zip(files, RECORD_GROUPS)]
    for proc in procs:
        _finish(proc)
    launches = [launch for f in files for launch in json.loads(f.read_text())]

    expected = launched_kernels(Path(diffcore.kernels.__path__[0]))
    assert {k.split(":")[0].rsplit(".", 1)[1] for k in expected} == set(FAMILIES) == set(sum(RECORD_GROUPS, ()))
    seen = {launch["kernel"] for launch in launches}
    assert not expected - seen, f"launched in kernels/*.py but never recorded: {sorted(expected - seen)}"
    assert not seen - expected, f"recorded but not found launched in kernels/*.py: {sorted(seen - expected)}"

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    # a fresh cache: every kernel is compiled here, and nothing is written to ~/.triton
    out = _finish(_start(["compile", str(path)], TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
                         TRITON_CACHE_DIR=str(tmp_path / "cache")))
    if out.startswith("skip"):
        pytest.skip(out.strip())
    report = json.loads(path.with_suffix(".out.json").read_text())
    results, counts = report["results"], report["counts"]
    failures = [f"{r['spec']}\n    " + r["error"].replace("\n", "\n    ") for r in results if not r["ok"]]
    assert not failures, f"{len(failures)} of {len(results)} specialisations fail for sm_90 ({counts}):\n" + \
        "\n".join(failures)
    assert counts["kernels"] == len(expected), counts
    print(out.strip())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
