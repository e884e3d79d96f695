"""``network_moments``: Gaussian moments of a whole network's output under input noise.

The network is traced with ``torch.fx`` and its graph walked node by node, each
activation kept as a moment-matched Gaussian
(:class:`momentkit.network.layers.State`): affine layers are exact, ReLU and LeakyReLU
exact for Gaussian input, max-pooling by chained Clark maxima
(:mod:`momentkit.network.pooling`). The moments are those of the network in eval mode
(BatchNorm with its running statistics, Dropout the identity), whatever
``model.training`` says.
"""

from __future__ import annotations

import operator
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from momentkit._validate import check_finite
from momentkit.affine import Normalize
from momentkit.errors import MomentInputError
from momentkit.network import layers as L
from momentkit.network.pooling import max_pool2d
from momentkit.regularizer import _nonfinite_error, input_variance

__all__ = [
    "FACTOR_MAX_BYTES", "FULL_MAX_UNITS", "NetworkMoments", "network_mode", "network_moments",
]

_FN = "network_moments"
MODES = ("auto", "diagonal", "factor", "full")
#: ``"full"`` keeps ``(N, D, D)`` covariances; refused when a layer has more units.
FULL_MAX_UNITS = 2048
#: ``"factor"`` keeps ``N x K x D`` numbers per layer (``K`` input elements, ``D`` units
#: of the widest layer); refused above this many bytes.
FACTOR_MAX_BYTES = 2**31
#: ``"auto"`` picks ``"full"`` up to this many units per layer, else ``"factor"`` if it
#: fits, else ``"diagonal"``.
AUTO_FULL_UNITS = 256


class NetworkMoments(NamedTuple):
    """``mean`` and ``var`` of the output ``(N, *out_shape)``; ``cov`` ``(N, D, D)`` over
    the flattened output (``None`` in ``"diagonal"``); ``mode`` the mode used."""

    mean: torch.Tensor
    var: torch.Tensor
    cov: torch.Tensor | None
    mode: str


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace(model: nn.Module) -> fx.GraphModule:
    key = tuple(model.modules())
    entry = _GRAPHS.get(model)
    if entry is not None and len(entry[0]) == len(key) and all(
        a is b for a, b in zip(entry[0], key, strict=True)
    ):
        return entry[1]
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # tracing errors have many types
        raise MomentInputError(
            f"{_FN}: model could not be traced by torch.fx ({type(exc).__name__}: {exc})"
        ) from exc
    gm = fx.GraphModule(model, graph)
    _GRAPHS[model] = (key, gm)
    return gm


_RELU_FNS = {torch.relu, torch.relu_, F.relu, F.relu_}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_SUB_FNS = {operator.sub, operator.isub, torch.sub}
_MUL_FNS = {operator.mul, operator.imul, torch.mul}
_SHAPE_METHODS = {"view", "reshape", "flatten"}


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"operation {getattr(node.target, '__name__', node.target)!r}"


def _module_rule(
    module: nn.Module, state: L.State, node: fx.Node, mode: str, relu: bool = False
) -> L.State:
    shape = tuple(state.mean.shape[1:])
    if isinstance(module, nn.ReLU):
        return L.leaky_relu(state, 0.0)
    if isinstance(module, nn.LeakyReLU):
        return L.leaky_relu(state, float(module.negative_slope))
    if isinstance(module, nn.Identity | nn.Dropout | nn.Dropout2d):
        return state
    if isinstance(module, nn.Linear):
        return L.linear(module)(state)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise MomentInputError(
                f"{_FN}: layer {node.target!r} (Conv2d) has padding_mode="
                f"{module.padding_mode!r}; only zero padding keeps the map affine in x"
            )
        return L.conv2d(module)(state)
    if isinstance(module, Normalize):
        return L.channel_scale(module, 1.0 / module.std)(state)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if module.running_var is None:
            raise MomentInputError(
                f"{_FN}: layer {node.target!r} (BatchNorm) keeps no running statistics"
            )
        return L.batch_norm(module)(state)
    if isinstance(module, nn.AvgPool2d):
        return L.avg_pool2d(module, shape, state.mean)(state)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return L.adaptive_avg_pool2d(module, shape, state.mean)(state)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise MomentInputError(f"{_FN}: layer {node.target!r} returns indices")
        return max_pool2d(module, state, relu)
    if isinstance(module, nn.Flatten):
        out = torch.flatten(state.mean[:1], module.start_dim, module.end_dim)
        if module.start_dim == 0:
            raise MomentInputError(f"{_FN}: layer {node.target!r} flattens the batch")
        return L.reshape(state, tuple(out.shape[1:]))
    raise MomentInputError(
        f"{_FN}: unsupported layer {node.target!r} ({type(module).__name__}); supported: "
        "Normalize, Linear, Conv2d, BatchNorm1d/2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, "
        "AdaptiveAvgPool2d, Flatten, Dropout, Identity"
    )


def _is_state(v) -> bool:
    return isinstance(v, L.State)


def _feeds_max_pool_only(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``node``'s one user is an ``nn.MaxPool2d`` layer."""
    users = list(node.users)
    return (
        len(users) == 1
        and users[0].op == "call_module"
        and isinstance(modules.get(users[0].target), nn.MaxPool2d)
    )


def _relu_slope(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """The negative slope of a ReLU / LeakyReLU node, or None for other nodes."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.ReLU):
            return 0.0
        if isinstance(mod, nn.LeakyReLU) and mod.negative_slope >= 0:
            return float(mod.negative_slope)
    if node.op == "call_function" and node.target in _RELU_FNS:
        return 0.0
    return None


def _binary(node: fx.Node, a, b, mode: str):
    fn = node.target
    if fn in _MUL_FNS:
        if _is_state(a) and isinstance(b, int | float):
            return L.scale_state(a, float(b))
        if _is_state(b) and isinstance(a, int | float):
            return L.scale_state(b, float(a))
    elif fn in _ADD_FNS or fn in _SUB_FNS:
        sign = 1.0 if fn in _ADD_FNS else -1.0
        if _is_state(a) and _is_state(b):
            if a.mean.shape != b.mean.shape:
                raise MomentInputError(
                    f"{_FN}: {_describe(node)} adds tensors of shapes {tuple(a.mean.shape)} "
                    f"and {tuple(b.mean.shape)} (broadcasting between activations)"
                )
            return L.add(a, b, sign)
        if _is_state(a) and not _is_state(b):
            return L.State(a.mean + sign * b, a.var, a.factor, a.cov)
        if _is_state(b) and sign > 0:
            return L.State(b.mean + a, b.var, b.factor, b.cov)
    raise MomentInputError(f"{_FN}: unsupported {_describe(node)} on these arguments")


def _function_rule(node: fx.Node, args, kwargs, mode: str):
    fn = node.target
    if fn in _RELU_FNS:
        return L.leaky_relu(args[0], 0.0)
    if fn is F.leaky_relu:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return L.leaky_relu(args[0], float(slope))
    if fn is torch.flatten:
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
        if start == 0:
            raise MomentInputError(f"{_FN}: {_describe(node)} flattens the batch dimension")
        out = torch.flatten(args[0].mean[:1], start, end)
        return L.reshape(args[0], tuple(out.shape[1:]))
    if fn is torch.cat:
        tensors = args[0] if args else kwargs["tensors"]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        nd = tensors[0].mean.dim()
        dim = dim % nd
        if not all(_is_state(t) for t in tensors) or dim == 0 or (mode == "full" and dim != 1):
            raise MomentInputError(
                f"{_FN}: {_describe(node)} supported along dimension 1 of activations only "
                f"(got dim={dim})"
            )
        return L.concat(list(tensors), dim)
    if len(args) == 2 and not kwargs:
        return _binary(node, args[0], args[1], mode)
    raise MomentInputError(f"{_FN}: unsupported {_describe(node)}")


def _method_rule(node: fx.Node, args, kwargs):
    if node.target in _SHAPE_METHODS and _is_state(args[0]) and not kwargs:
        state = args[0]
        sizes = list(args[1:])
        if node.target != "flatten" and sizes and sizes[0] == state.mean.shape[0]:
            sizes[0] = 1  # x.view(x.size(0), -1)
        try:
            probe = getattr(state.mean[:1], node.target)(*sizes)
        except RuntimeError as exc:
            raise MomentInputError(f"{_FN}: {_describe(node)} failed: {exc}") from exc
        if node.target != "flatten" and probe.shape[0] != 1:
            raise MomentInputError(f"{_FN}: {_describe(node)} changes the batch dimension")
        if node.target == "flatten" and (args[1:2] or (0,))[0] == 0:
            raise MomentInputError(f"{_FN}: {_describe(node)} flattens the batch dimension")
        return L.reshape(state, tuple(probe.shape[1:]))
    if node.target == "relu" and _is_state(args[0]):
        return L.leaky_relu(args[0], 0.0)
    if node.target == "size" and _is_state(args[0]):
        return args[0].mean.size(*args[1:])
    raise MomentInputError(f"{_FN}: unsupported {_describe(node)}")


def _max_units(gm: fx.GraphModule, x: torch.Tensor) -> int:
    """Largest number of units per image over the graph's tensors (one shape pass)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(x[:1])
    units = 0
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            units = max(units, int(torch.Size(meta.shape[1:]).numel()))
    return units


def _choose_mode(covariance: str, gm: fx.GraphModule, x: torch.Tensor) -> str:
    if covariance not in MODES:
        raise MomentInputError(
            f"{_FN}: covariance must be one of {MODES}, got {covariance!r}"
        )
    if covariance == "diagonal":
        return covariance
    units = _max_units(gm, x)
    k = x[0].numel()
    factor_bytes = x.shape[0] * k * units * x.element_size()
    if covariance == "auto":
        if units <= AUTO_FULL_UNITS:
            return "full"
        return "factor" if factor_bytes <= FACTOR_MAX_BYTES else "diagonal"
    if covariance == "full" and units > FULL_MAX_UNITS:
        raise MomentInputError(
            f"{_FN}: covariance='full' keeps a (D, D) covariance per image, but a layer "
            f"has D = {units} units (limit FULL_MAX_UNITS = {FULL_MAX_UNITS}, "
            f"{FULL_MAX_UNITS**2 * 8 / 2**20:.0f} MiB per image in float64); use 'factor'"
        )
    if covariance == "factor" and factor_bytes > FACTOR_MAX_BYTES:
        raise MomentInputError(
            f"{_FN}: covariance='factor' needs N x K x D = {x.shape[0]} x {k} x {units} "
            f"numbers ({factor_bytes / 2**30:.1f} GiB, limit FACTOR_MAX_BYTES = "
            f"{FACTOR_MAX_BYTES / 2**30:.0f} GiB); pass a smaller batch or use 'diagonal'"
        )
    return covariance


def _input_state(x: torch.Tensor, var: torch.Tensor, mode: str) -> L.State:
    n = x.shape[0]
    if mode == "diagonal":
        return L.State(x, var.expand_as(x))
    # std without the infinite derivative of sqrt at 0 (outputs are even in sigma,
    # so their derivative in sigma is 0 there anyway).
    pos = var > 0
    std = torch.where(pos, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(), 0.0)
    b, k = std.shape[0], x[0].numel()
    factor = torch.diag_embed(std.reshape(b, k)).reshape(b, k, *x.shape[1:])
    if mode == "factor":
        return L.State(x, torch.zeros_like(x), factor)
    cov = torch.diag_embed(var.expand_as(x).reshape(n, k))
    return L.State(x, None, factor, cov)


def _output(state, mode: str, model: nn.Module) -> NetworkMoments:
    if not isinstance(state, L.State):
        raise MomentInputError(f"{_FN}: the model must return one tensor")
    n = state.mean.shape[0]
    var = L.total_var(state)
    if not bool(torch.isfinite(state.mean).all() & torch.isfinite(var).all()):
        raise _nonfinite_error(model, "the output's mean or variance", var.dtype, _FN)
    cov = state.cov
    if mode == "factor":
        f = state.factor.flatten(2).expand(n, -1, -1)
        cov = f.transpose(1, 2) @ f + torch.diag_embed(state.var.reshape(n, -1))
    return NetworkMoments(state.mean, var, cov, mode)


def network_mode(model: nn.Module, x: torch.Tensor, covariance: str = "auto") -> str:
    """The mode that ``network_moments(model, x, sigma, covariance=covariance)`` uses
    (``"diagonal"``, ``"factor"`` or ``"full"``), found without computing any moment: one
    forward pass of the first image for the layer sizes. ``"auto"`` resolves by the
    rule in :func:`network_moments`; an explicit mode is returned as is when it fits.

    Raises:
        MomentInputError: as :func:`network_moments` for a model that cannot be traced,
            an unknown ``covariance``, or a mode past its memory limit for this batch.
    """
    if not isinstance(model, nn.Module):
        raise MomentInputError(
            f"network_mode: model must be an nn.Module, got {type(model).__name__}"
        )
    return _choose_mode(covariance, _trace(model), x)


def network_moments(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    covariance: str = "auto",
) -> NetworkMoments:
    """Mean, variance (and covariance) of ``model(x + n)``, ``n ~ N(0, Diag(sigma^2))``.

    Every activation is moment-matched to a Gaussian and carried through the graph
    (``torch.fx``). ``covariance`` selects what is kept of its correlations:

    * ``"diagonal"``: independent units; cost two passes of the linear layers plus
      per-unit moment functions (float32 activations take the ReLU moments' float32
      fast path, :func:`momentkit.network.layers.relu_stats`; measured: 7.4 forward
      passes of the paper's LeNet at batch 64 with 1 thread, three quarters of it in
      the max-pooling, ``benchmarks/bench_network_moments.py``). The mean is good at
      small noise; the variance is not (units share the input noise, and the
      correlations carry most of the output variance).
    * ``"factor"``: the covariance with the input noise as a factor ``C`` ``(K, D)``
      per layer plus an independent remainder: exact through affine maps (a network
      without nonlinearity gets ``J Sigma J^T`` exactly), through ReLU and max by
      Stein's lemma. Cost about ``K + 1`` forward passes (``K`` input elements:
      784 for MNIST; measured 0.82 s for one image on the paper's LeNet, 1 thread)
      and ``N K D`` numbers of memory.
    * ``"full"``: full covariance per layer, ReLU covariance exact
      (:func:`momentkit.relu_covariance`); for layers of at most ``FULL_MAX_UNITS``
      units.
    * ``"auto"`` (default): ``"full"`` when no layer exceeds ``AUTO_FULL_UNITS`` units,
      else ``"factor"`` when it needs at most ``FACTOR_MAX_BYTES``, else ``"diagonal"``.

    Args:
        model: network of supported layers (Normalize, Linear, Conv2d, BatchNorm1d/2d,
            ReLU, LeakyReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten,
            Dropout, Identity; functional relu, flatten, additions, concatenation).
        x: input batch ``(N, ...)`` in pixel units.
        sigma: noise standard deviation in pixel units: scalar, per channel ``(C,)``,
            per element ``x.shape[1:]`` or ``x.shape`` (as
            :func:`momentkit.input_variance`); a model's own :class:`Normalize`
            rescales it.

    Returns:
        :class:`NetworkMoments`; with ``sigma = 0`` the mean is the forward pass and
        the variance 0. Differentiable in the parameters and in ``sigma``.

    Raises:
        MomentInputError: bad ``x`` or ``sigma`` (NaN or infinity in ``x`` included), an
            unknown ``covariance``, a mode past its memory limit, a layer or operation
            not supported (named), or an output mean or variance that is not finite
            (naming the model's non-finite parameter, if any).
    """
    if not isinstance(model, nn.Module):
        raise MomentInputError(f"{_FN}: model must be an nn.Module, got {type(model).__name__}")
    var = input_variance(sigma, x)
    check_finite(x, "x", _FN)
    gm = _trace(model)
    mode = _choose_mode(covariance, gm, x)
    modules = dict(gm.named_modules())
    env: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if env:
                raise MomentInputError(f"{_FN}: the model must take one input")
            env[node] = _input_state(x, var, mode)
            continue
        if node.op == "output":
            return _output(env[node.args[0]], mode, model)
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        slope = _relu_slope(node, modules)
        if slope is not None and _is_state(args[0]) and _feeds_max_pool_only(node, modules):
            # max_i f(X_i) = f(max_i X_i) for a nondecreasing f: the maximum is taken of
            # the (near-Gaussian) pre-activations and f applied after it.
            env[node] = (args[0], slope)
            continue
        if node.op == "call_module" and isinstance(args[0], tuple):
            pooled = _module_rule(modules[node.target], args[0][0], node, mode, args[0][1] == 0)
            env[node] = pooled if args[0][1] == 0 else L.leaky_relu(pooled, args[0][1])
        elif node.op == "call_module":
            if len(args) != 1 or not _is_state(args[0]):
                raise MomentInputError(f"{_FN}: {_describe(node)} must take one activation")
            env[node] = _module_rule(modules[node.target], args[0], node, mode)
        elif node.op == "call_function":
            env[node] = _function_rule(node, args, kwargs, mode)
        elif node.op == "call_method":
            env[node] = _method_rule(node, args, kwargs)
        else:
            raise MomentInputError(f"{_FN}: unsupported graph node {node.op} {node.target!r}")
    raise MomentInputError(f"{_FN}: the traced graph has no output")
