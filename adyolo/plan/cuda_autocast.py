"""CUDA's autocast policy applied to a CPU trace: the dtypes a bf16 step takes on a GPU, traced without one.

Autocast decides per operator in which dtype it runs, and CUDA and CPU decide differently: in a bf16
region CUDA runs softmax, upsampling, layer and group norm, exp, pow and sum in fp32 (and autograd
saves those fp32 results for backward), where CPU autocast leaves them in bf16; CPU autocast copies the
inputs of `cat` and `stack` to a common dtype, CUDA concatenates mixed dtypes as they are. A trace under
CPU autocast then misstates a GPU step: for `full/explicit`, whose softmax over 6,400 x 6,400 scores
CUDA keeps in fp32 plus a bf16 copy for the next matmul, by nearly half. A trace on fake CUDA tensors is
not possible for a whole step (backward needs a CUDA context, `_fused_sgd_` has no fake kernel, SDPA
takes its math path).

So the step is traced on the CPU device with CUDA's rules installed as CPU autocast's kernels
(`cuda_autocast_policy`), at the autocast layer, above autograd, where CUDA's autocast casts: autograd
then saves and frees the same tensors in forward and backward as on a GPU. The tables below are CUDA
autocast's own rules (ATen's `autocast_mode.cpp`) for the operators where CPU autocast's differ; an
operator both register and no table names has the same rule on both (convolutions and matmuls in
bf16, the losses in fp32). `tests/plan/test_cuda_autocast.py` checks them against CUDA's policy itself:
every operator CUDA autocast has a rule for is accounted for, each named operator takes the dtype and
copies fake CUDA tensors take under CUDA autocast (which needs no GPU), and so does every operator of
each model variant's forward and loss.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.library import Library
from torch.utils._pytree import tree_leaves, tree_map

# CUDA: floating inputs of lower precision are cast to fp32 first ("fp32").
CUDA_FP32 = (
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "group_norm",
    "rms_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "dist",
    "pdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
# CUDA: the result is asked for in fp32, `dtype=torch.float32` unless the call gives one
# ("fp32_set_opt_dtype"); CPU autocast runs `prod` on an fp32 copy instead.
CUDA_FP32_OUTPUT = (
    "softmax.int",
    "log_softmax.int",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
    "prod",
    "prod.dim_int",
)
# CUDA: `norm` is called with an fp32 dtype appended, i.e. its `_dtype` overload ("fp32_append_dtype").
CUDA_NORM_WITH_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
# CUDA: fp32 inputs are cast to the autocast dtype ("lower_precision_fp"), beyond the operators both
# devices cast (conv1d/2d/3d, linear, matmul, mm, bmm, baddbmm, addmm, SDPA, ...).
CUDA_LOWER_PRECISION = (
    "_convolution",
    "convolution",
    "cudnn_convolution",
    "cudnn_convolution_transpose",
    "addmv",
    "addr",
    "mv",
    "dot",
    "vdot",
    "einsum",
    "chain_matmul",
    "linalg_multi_dot",
    "_scaled_dot_product_flash_attention",
    "_cudnn_rnn",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
)
# CUDA: floating inputs are cast to the widest floating dtype among them ("promote").
CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "index_put", "scatter_add", "tensordot")
_AUTOCAST_CPU = torch._C.DispatchKey.AutocastCPU
_LOWER = (torch.bfloat16, torch.half)


def registered(dispatch_key: str) -> set[str]:
    """ATen operators with a kernel for `dispatch_key` ("AutocastCPU", "AutocastCUDA"), as "name" or
    "name.overload" (the tables' form)."""
    ops = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
    return {op.removeprefix("aten::") for op in ops if op.startswith("aten::")}


def cuda_rules() -> dict[str, Callable]:
    """Operator name -> CUDA's rule as a CPU autocast kernel factory, for every operator where CPU
    autocast's rule differs: the tables, and as they are (no cast) the operators only CPU autocast has
    a rule for (`cat`, `stack`, `index_copy`, the fp32 linear algebra and FFTs...)."""
    rules: dict[str, Callable] = {name: _as_is for name in registered("AutocastCPU") - registered("AutocastCUDA")}
    rules.update({name: _in_fp32 for name in CUDA_FP32})
    rules.update({name: _with_fp32_output for name in CUDA_FP32_OUTPUT})
    rules.update({name: _norm_with_dtype(with_dtype) for name, with_dtype in CUDA_NORM_WITH_DTYPE.items()})
    rules.update({name: _in_lower_precision for name in CUDA_LOWER_PRECISION})
    rules.update({name: _promoted for name in CUDA_PROMOTE})
    return rules


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[list[str]]:
    """Within: CPU autocast applies CUDA autocast's rules (`cuda_rules`); with autocast off nothing
    changes. Yields the operators it installed rules for (those this torch has). On exit CPU
    autocast's own rules are back."""
    library = Library("aten", "IMPL")
    installed = []
    try:
        for name, rule in cuda_rules().items():
            op = overload(name)
            if op is not None:
                library.impl(op, rule(op), "AutocastCPU")
                installed.append(name)
        yield installed
    finally:
        library._destroy()


def overload(name: str):
    """`torch.ops.aten.<op>.<overload>` ("default" when none is named), or None where this torch has none."""
    packet, _, name_of_overload = name.partition(".")
    try:
        return getattr(getattr(torch.ops.aten, packet), name_of_overload or "default")
    except AttributeError:
        return None


def _below_autocast():
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_AUTOCAST_CPU))


def _as_is(op):
    def kernel(*args, **kwargs):
        with _below_autocast():
            return op(*args, **kwargs)

    return kernel


def _cast(to: torch.dtype, which: tuple[torch.dtype, ...]):
    return lambda v: v.to(to) if isinstance(v, torch.Tensor) and v.dtype in which else v


def _in_fp32(op):
    def kernel(*args, **kwargs):
        with _below_autocast():
            to_fp32 = _cast(torch.float32, _LOWER)
            return op(*tree_map(to_fp32, args), **tree_map(to_fp32, kwargs))

    return kernel


def _in_lower_precision(op):
    def kernel(*args, **kwargs):
        with _below_autocast():
            lower = _cast(torch.get_autocast_dtype("cpu"), (torch.float32,))
            return op(*tree_map(lower, args), **tree_map(lower, kwargs))

    return kernel


def _promoted(op):
    def kernel(*args, **kwargs):
        with _below_autocast():
            tensors = [v for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
            floats = [t.dtype for t in tensors if t.is_floating_point()]
            if floats:
                widest = functools.reduce(torch.promote_types, floats)
                to_widest = _cast(widest, tuple(d for d in floats if d != widest))
                args, kwargs = tree_map(to_widest, args), tree_map(to_widest, kwargs)
            return op(*args, **kwargs)

    return kernel


def _eligible(value) -> bool:
    """CUDA autocast's test of a first argument: a floating tensor that is not fp64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _with_fp32_output(op):
    names = [argument.name for argument in op._schema.arguments]
    if "dtype" not in names:  # no way to ask for the result's dtype: the nearest rule
        return _in_fp32(op)
    dtype_at = names.index("dtype")

    def kernel(*args, **kwargs):
        with _below_autocast():
            if _eligible(args[0]):
                if len(args) > dtype_at:
                    if args[dtype_at] is None:
                        args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1 :])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


def _norm_with_dtype(with_dtype: str):
    def rule(op):
        target = overload(with_dtype)

        positional = [a for a in op._schema.arguments if not a.kwarg_only]

        def kernel(*args, **kwargs):
            with _below_autocast():
                if _eligible(args[0]):
                    # The dtype overload takes every argument: the ones left out at their defaults.
                    args = (*args, *(kwargs.pop(a.name, a.default_value) for a in positional[len(args) :]))
                    return target(*args, **kwargs, dtype=torch.float32)
                return op(*args, **kwargs)

        return kernel

    return rule
