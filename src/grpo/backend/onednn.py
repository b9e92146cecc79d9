"""oneDNN's Linear kernel on CPU, forward and backward, swapped in for a model's nn.Linear layers.

PyTorch sends float32 `F.linear` and the matmuls of its backward to MKL's sgemm, which on this
project's AMD CPUs runs the model's matmuls at less than half of what oneDNN's kernel reaches:

    rows x in -> out          forward   grad input   grad weight   (GFLOP/s, 2 threads, fp32)
    600 x 576 -> 1536  MKL       198        197          196
                       oneDNN    443        436          454
    16 x 576 -> 1536   MKL       ~60      oneDNN ~100  (in a decode step, weights streamed from memory)

(`benchmarks/bench_train.py` shows what it gives a whole step.) On an Intel CPU, for which MKL is tuned, MKL is
the faster one for training: on this project's Intel Xeon (2 threads, ms, oneDNN / MKL) as fast in the forward and
faster in both gradients, the weight's by 15-35%:

    rows x in -> out          forward       grad input    grad weight
    700 x 576 -> 1536         3.97 / 3.57   4.30 / 3.76   5.11 / 3.91
    700 x 576 -> 576          1.54 / 1.42   1.49 / 1.38   1.90 / 1.39

so a float32 training step takes oneDNN's kernel where `float32_training_kernel` says so (not on an Intel CPU
with MKL); a decode step's few rows, on weights `reordered` for them, run faster through oneDNN on both. The
trainer reaches it through `grpo.backend.cpu_fast`; the fast rollout engine and its fused decoder call it
directly. For bfloat16, PyTorch copies the whole weight when the input is a strided slice; oneDNN reads strides.
Results agree with PyTorch's to float rounding (a different summation order), not bit for bit.

`use_in(model)` gives each nn.Linear of the model an instance `forward` for as long as it
is active (the weights are the layers' own); under autograd the forward is a
`torch.autograd.Function` whose backward runs its two matmuls through the same kernel. Under a CPU
bfloat16 autocast each layer keeps a bfloat16 copy of its weight while the weight is unchanged
(`weight_in`), where autocast would cast the weight at every forward: a step's many forwards over
weights that change once, at the optimizer step.
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager

import torch


def available() -> bool:
    """Whether this torch build has oneDNN's linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 matmuls on this CPU (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; on an
    AVX2-only CPU it refuses them)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return available() and check is not None and bool(check())


@functools.cache
def bf16_matmul_hardware() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later) or
    AMX (Sapphire Rapids and later), by torch's CPU check, else Linux's /proc/cpuinfo flags. Without them oneDNN
    emulates bfloat16 (AVX512-BW) or refuses it (AVX2): slower than float32, not a reason to lose precision."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_vendor(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's vendor as Linux reports it (GenuineIntel, AuthenticAMD, ...), "" where it does not say."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def float32_training_kernel() -> str:
    """The kernel of a float32 training step's matmuls on this CPU: "mkl" (PyTorch's own, MKL's sgemm) on an
    Intel CPU where this torch has MKL, else "onednn" (see the module docstring). A rule by vendor, not a timing:
    a run takes the same kernel, and so the same float rounding, in every process on a machine (a resumed run
    continues the numbers of the one that stopped)."""
    intel_mkl = cpu_vendor() == "GenuineIntel" and torch.backends.mkl.is_available()
    return "mkl" if intel_mkl or not available() else "onednn"


def autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """bfloat16 inside a CPU bfloat16 autocast that oneDNN can serve, else None. Autocast casts the operands of
    `F.linear`, not of oneDNN's op: the oneDNN matmuls cast them themselves, as autocast would."""
    if (weight.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16 or not bf16_supported()):
        return None
    return torch.bfloat16


def _serves(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and bf16_supported())


def usable(model) -> bool:
    """Whether `model`'s Linear layers can run through oneDNN: float32 (or, where the CPU supports it,
    bfloat16) weights on a CPU."""
    p = next(model.parameters(), None)
    return p is not None and _serves(p)


def _matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias (+ residual, added inside the same oneDNN call): [..., in] x [out, in] -> [..., out];
    strided operands are read as they are, `weight` may be one `reordered` returned."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def reordered(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A copy of `weight` [out, in] in oneDNN's blocked layout for inputs of about `rows` rows (only `matmul_for`'s
    oneDNN kernel reads it), or `weight` itself where this torch build or CPU cannot reorder it."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _serves(weight) else None
    return weight if reorder is None else reorder(weight, max(1, rows))


def matmul_for(weight: torch.Tensor):
    """`f(x, weight, bias)` = x @ weight.T + bias (no autograd) with the fastest kernel for `weight`:
    oneDNN's for float32 / bfloat16 on a CPU, `F.linear` elsewhere."""
    return _matmul if _serves(weight) else torch.nn.functional.linear


def weight_in(layer: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """`layer.weight` cast to `dtype` (no autograd): while `use_in` serves the layer, one cast per version of the
    weight, kept until the weight changes in place (an optimizer step) or the block ends, instead of one per
    forward. Changes made through `.data` bypass the version counter and are not seen: nothing in a step
    makes them."""
    weight = layer.weight
    if weight.dtype == dtype:
        return weight.detach()
    if getattr(layer.__dict__.get("forward"), "__func__", None) is not _forward:
        return weight.detach().to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    cached = layer.__dict__.get("_onednn_cast")
    if cached is None or cached[0] != key:
        cached = layer._onednn_cast = (key, weight.detach().to(dtype))  # a fresh tensor: saved ones stay intact
    return cached[1]


class _Linear(torch.autograd.Function):
    """x @ weight.T + bias through oneDNN, its two backward matmuls too. With `dtype` (bfloat16 under a CPU
    autocast) the operands are cast to it for all three matmuls (the weight's cast given as `cast`, or made
    here), and the gradients cast back to the inputs' dtypes: autocast's own semantics for `F.linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, cast=None):
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if dtype is not None:
            weight = cast if cast is not None else weight.to(dtype)
            x, bias = x.to(dtype), bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad: [..., out]
        x, weight = ctx.saved_tensors  # [..., in], [out, in], in the matmuls' dtype
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad, weight.t(), None).to(ctx.dtypes[0])  # [..., in]
        flat = grad.reshape(-1, grad.shape[-1])  # [M, out]
        if ctx.needs_input_grad[1]:
            grad_w = _matmul(flat.t(), x.reshape(-1, x.shape[-1]).t(), None).to(ctx.dtypes[1])  # [out, M] x [M, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(dim=0, dtype=torch.float32).to(ctx.dtypes[2])  # [out]
        return grad_x, grad_w, grad_b, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           cast: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` through oneDNN; differentiable in x, weight and bias. Inside a CPU bfloat16 autocast it
    computes in bfloat16 (see `autocast_dtype`), with `cast` as the weight's bfloat16 copy if given."""
    dtype = autocast_dtype(weight)
    cast = cast if dtype is not None else None
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _Linear.apply(x, weight, bias, dtype, cast)
    if dtype is not None:
        weight = cast if cast is not None else weight.to(dtype)
        x, bias = x.to(dtype), bias.to(dtype) if bias is not None else None
    return _matmul(x, weight, bias)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = self.__dict__.get("_onednn_packed")  # set by `packed`, for no-grad forwards only
    if packed is not None and not torch.is_grad_enabled() and autocast_dtype(packed) is None:
        return _matmul(x, packed, self.bias)
    dtype = autocast_dtype(self.weight)
    cast = weight_in(self, dtype) if dtype is not None and self.weight.dtype != dtype else None
    return linear(x, self.weight, self.bias, cast)


@contextmanager
def use_in(*models, enabled: bool = True):
    """While active, the nn.Linear layers of `models` compute with oneDNN; models it cannot serve
    (not `usable`) and None entries are skipped, and `enabled=False` changes nothing.

    Layers that already have an instance `forward` (an enclosing `use_in`, or the user's own)
    are left alone, so nested uses compose; exiting restores exactly the layers it changed.
    """
    layers = [m for model in models if model is not None and enabled and usable(model) for m in model.modules()
              if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
            m.__dict__.pop("_onednn_cast", None)


@contextmanager
def packed(model, rows: int, enabled: bool = True):
    """While active, the oneDNN forwards of `model`'s Linear layers (those an enclosing `use_in` serves)
    read a copy of their weights reordered into oneDNN's blocked layout for inputs of about `rows` rows.

    For a decode step (16-64 rows, SmolLM2-135M, 2 cores) the matmuls run ~1.4x faster and a whole
    generation 15-25% faster, for ~0.1 s of reordering and one more copy of the Linear weights while
    active. Only for no-grad forwards over weights that do not change meanwhile: a generation.
    """
    can_reorder = available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    served = [m for m in model.modules() if getattr(m.__dict__.get("forward"), "__func__", None) is _forward]
    layers = served if enabled and can_reorder else []  # only the layers `use_in` serves read it
    for m in layers:
        m._onednn_packed = reordered(m.weight.detach(), rows)
    try:
        yield
    finally:
        for m in layers:
            del m._onednn_packed
