"""Split a network at its first ReLU: ``Phi(x) = Omega(ReLU(Upsilon(x)))`` (paper Sec. 3.3).

The regularizer of the paper (Eq. 3 and 4) needs the network written as the
composition of an affine stem ``Upsilon`` (``theta_1 = {A, c1}``), the first ReLU and
the rest of the network ``Omega`` (``theta_2``). :func:`split_at_first_relu` finds
that split for

* ``nn.Sequential`` networks, nested ``nn.Sequential`` containers included (the
  containers are flattened, modules are shared, not copied), and
* ordinary ``nn.Module`` networks, through ``torch.fx`` symbolic tracing. A ReLU is an
  ``nn.ReLU`` module, a ``torch.nn.functional.relu`` / ``torch.relu`` call (in-place
  forms included) or a ``tensor.relu()`` method call. After an in-place ReLU
  (``h.relu_()``, ``F.relu(h, inplace=True)``, ``nn.ReLU(inplace=True)``) a later use
  of ``h`` is a use of the ReLU's output, not a skip connection.

The stem must be: an optional elementwise input normalization
(:class:`momentkit.affine.Normalize`), an optional ``nn.Flatten`` (``torch.flatten``
in a traced graph) that keeps the batch dimension, and exactly one ``nn.Linear`` or
``nn.Conv2d``, followed directly by the ReLU; and the input must reach ``Omega`` only
through that ReLU (no skip connection from the input, the normalized input or the
pre-activation). Anything else raises :class:`MomentInputError` saying why.

Both halves share the parameters of the original network: training through them
trains the network.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from momentkit._validate import as_spread, check_result
from momentkit.affine import Normalize, _affine_moments
from momentkit.errors import MomentInputError

__all__ = ["Upsilon", "split_at_first_relu"]

_AFFINE_TYPES = (nn.Linear, nn.Conv2d)
_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
_STEM_FORM = (
    "[Normalize] [Flatten] then exactly one nn.Linear or nn.Conv2d, followed directly "
    "by the first ReLU"
)


class Upsilon(nn.Module):
    """The affine stem ``Upsilon(x) = A x + c1`` before the first ReLU.

    ``forward(x) = affine(flatten(normalize(x)))`` where ``normalize`` (a
    :class:`~momentkit.affine.Normalize` or ``None``) and ``flatten`` (an
    ``nn.Flatten`` or ``None``) are optional and ``affine`` is the ``nn.Linear`` or
    ``nn.Conv2d`` layer. The modules are those of the split network (shared, not
    copied).
    """

    def __init__(
        self,
        affine: nn.Linear | nn.Conv2d,
        normalize: Normalize | None = None,
        flatten: nn.Flatten | None = None,
    ) -> None:
        """Raises :class:`MomentInputError` for a wrong module type or a batch-merging flatten."""
        super().__init__()
        if not isinstance(affine, _AFFINE_TYPES):
            raise MomentInputError(
                f"Upsilon: affine: expected nn.Linear or nn.Conv2d, got {type(affine).__name__}"
            )
        if normalize is not None and not isinstance(normalize, Normalize):
            raise MomentInputError(
                f"Upsilon: normalize: expected momentkit.affine.Normalize or None, "
                f"got {type(normalize).__name__}"
            )
        if flatten is not None and not isinstance(flatten, nn.Flatten):
            raise MomentInputError(
                f"Upsilon: flatten: expected nn.Flatten or None, got {type(flatten).__name__}"
            )
        if flatten is not None and not _keeps_batch_dim(flatten.start_dim):
            raise MomentInputError(
                f"Upsilon: flatten: start_dim={flatten.start_dim} may merge the batch dimension; "
                "it must be at least 1"
            )
        self.normalize = normalize
        self.flatten = flatten
        self.affine = affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``affine(flatten(normalize(x)))``, skipping the parts that are ``None``."""
        if self.normalize is not None:
            x = self.normalize(x)
        if self.flatten is not None:
            x = self.flatten(x)
        return self.affine(x)

    def variance(self, input_var: torch.Tensor) -> torch.Tensor:
        """Variance of the pre-activation for independent input noise (Eq. 5).

        ``input_var`` holds the variances ``sigma_x^2`` of independent Gaussian noise
        on the input, shaped like the input with a batch dimension that may be 1 (one
        variance image broadcast over the batch). Through the normalization it becomes
        ``sigma_x^2 / std_c^2``, through the affine layer ``(A * A) v``: for
        ``nn.Conv2d`` the same convolution with squared weights and no bias, for
        ``nn.Linear`` the product with the squared weight matrix
        (:func:`momentkit.affine.affine_moments`). The result has the batch size of
        ``input_var`` and the shape of ``Upsilon``'s output otherwise; it is exact up
        to rounding and differentiable with respect to the weights. Raises
        :class:`MomentInputError` for NaN, infinite or negative ``input_var``, or a
        result that overflows.
        """
        fn = "Upsilon.variance"
        as_spread(input_var, "input_var", fn)
        return check_result(self._variance(input_var), "the variance", fn)

    def _variance(self, input_var: torch.Tensor) -> torch.Tensor:
        """:meth:`variance` without checks (for callers that check themselves)."""
        var = input_var
        if self.normalize is not None:
            var = self.normalize.scale_variance(var)
        if self.flatten is not None:
            var = self.flatten(var)
        _, out_var = _affine_moments(
            self.affine, torch.zeros_like(var), var, None, True, "Upsilon.variance"
        )
        return out_var


def split_at_first_relu(model: nn.Module) -> tuple[Upsilon, nn.Module]:
    """Split ``model`` as ``model(x) == omega(relu(upsilon(x)))``.

    Returns ``(upsilon, omega)``: ``upsilon`` is an :class:`Upsilon` (its parts are
    ``upsilon.normalize``, ``upsilon.flatten`` and ``upsilon.affine``); ``omega`` is an
    ``nn.Module`` mapping the output of the first ReLU to the network output (an
    ``nn.Sequential`` for sequential networks, an ``fx.GraphModule`` otherwise). Both
    share the modules and parameters of ``model``. The identity holds exactly (same
    operations in the same order).

    A traced network is specialized at trace time like any ``torch.fx`` trace: Python
    control flow and ``self.training`` read inside ``forward`` are frozen at the
    values they had when this function ran.

    Raises:
        MomentInputError: ``model`` is not an ``nn.Module``; it has no ReLU; the
            layers before the first ReLU are not ``[Normalize] [Flatten] Linear|Conv2d``;
            the input, the normalized input or the pre-activation reaches the rest of
            the network other than through the first ReLU; the network takes more than
            one input; or ``torch.fx`` cannot trace it.
    """
    return _split(model, "split_at_first_relu")


def _split(model: nn.Module, fn: str) -> tuple[Upsilon, nn.Module]:
    """:func:`split_at_first_relu` with errors naming ``fn``, the function called."""
    if not isinstance(model, nn.Module):
        raise MomentInputError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential):
        modules = list(_flatten_sequential(model))
        relu_at = next((i for i, m in enumerate(modules) if isinstance(m, nn.ReLU)), None)
        before = modules if relu_at is None else modules[:relu_at]
        # A custom module before the first nn.ReLU may hide the ReLU or the stem inside
        # its forward: let torch.fx look inside it.
        if not any(_is_custom(m) for m in before):
            return _split_sequential(modules, relu_at, fn)
    return _split_traced(model, fn)


def _flatten_sequential(seq: nn.Sequential) -> Iterator[nn.Module]:
    for module in seq:
        if isinstance(module, nn.Sequential):
            yield from _flatten_sequential(module)
        else:
            yield module


def _is_custom(module: nn.Module) -> bool:
    """True for a module that is neither from ``torch.nn`` nor a Normalize."""
    return not isinstance(module, Normalize) and not type(module).__module__.startswith(
        "torch.nn"
    )


def _keeps_batch_dim(start_dim: int) -> bool:
    """Whether flattening from ``start_dim`` surely keeps dim 0 (negative: rank-dependent)."""
    return start_dim >= 1


def _stem_error(found: str, fn: str) -> MomentInputError:
    return MomentInputError(
        f"{fn}: model: the layers before the first ReLU must be {_STEM_FORM}; found {found}"
    )


def _split_sequential(
    modules: list[nn.Module], relu_at: int | None, fn: str
) -> tuple[Upsilon, nn.Module]:
    if relu_at is None:
        raise MomentInputError(f"{fn}: model: no nn.ReLU found in the nn.Sequential network")
    stem = modules[:relu_at]
    names = ", ".join(type(m).__name__ for m in stem) or "nothing"
    normalize = flatten = None
    rest = list(stem)
    if rest and isinstance(rest[0], Normalize):
        normalize = rest.pop(0)
    if rest and isinstance(rest[0], nn.Flatten):
        flatten = rest.pop(0)
        if not _keeps_batch_dim(flatten.start_dim):
            raise _stem_error(f"nn.Flatten(start_dim={flatten.start_dim}), which may merge "
                              "the batch dimension", fn)
    if len(rest) != 1 or not isinstance(rest[0], _AFFINE_TYPES):
        raise _stem_error(f"[{names}]", fn)
    upsilon = Upsilon(rest[0], normalize=normalize, flatten=flatten)
    omega = nn.Sequential(*modules[relu_at + 1 :])
    return upsilon, omega


class _Tracer(fx.Tracer):
    """Default torch.fx tracer that keeps :class:`Normalize` as one leaf call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the ReLU ``node`` rectifies its argument in place."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target == "relu_"
    if node.target in (F.relu_, torch.relu_):
        return True
    inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
    return inplace is True


def _only_input(node: fx.Node) -> fx.Node | None:
    """The single tensor argument of ``node`` when it has exactly one argument."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _flatten_call(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Flatten | None:
    """The ``nn.Flatten`` equivalent of a flatten node, or None if it is not one."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Flatten):
        return modules[node.target]
    is_function = node.op == "call_function" and node.target is torch.flatten
    is_method = node.op == "call_method" and node.target == "flatten"
    if not (is_function or is_method) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    params = dict(zip(("start_dim", "end_dim"), node.args[1:], strict=False))
    params.update(node.kwargs)
    if set(params) - {"start_dim", "end_dim"} or not all(
        isinstance(v, int) for v in params.values()
    ):
        return None
    return nn.Flatten(params.get("start_dim", 0), params.get("end_dim", -1))


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target)
    )
    return f"'{node.name}' ({node.op} {target})"


def _split_traced(model: nn.Module, fn: str) -> tuple[Upsilon, nn.Module]:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises many exception types while tracing
        raise MomentInputError(
            f"{fn}: model: not an nn.Sequential, and torch.fx cannot trace it to find the first "
            f"ReLU ({type(exc).__name__}: {exc})"
        ) from exc
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise MomentInputError(
            f"{fn}: model: forward must take exactly one input tensor, it takes {len(placeholders)}"
        )
    relu = next((n for n in nodes if _is_relu(n, modules)), None)
    if relu is None:
        raise MomentInputError(
            f"{fn}: model: no ReLU (nn.ReLU, F.relu, torch.relu or .relu()) found in the "
            "traced graph"
        )

    # Walk the stem backwards from the ReLU: affine, then optional flatten and normalize.
    pre = relu.args[0] if relu.args else relu.kwargs.get("input")
    if not (
        isinstance(pre, fx.Node)
        and pre.op == "call_module"
        and isinstance(modules[pre.target], _AFFINE_TYPES)
    ):
        found = _describe(pre) if isinstance(pre, fx.Node) else repr(pre)
        raise MomentInputError(
            f"{fn}: model: the first ReLU {_describe(relu)} is applied to {found}, not directly to "
            f"an nn.Linear or nn.Conv2d; the layers before the first ReLU must be {_STEM_FORM}"
        )
    if _is_inplace(relu, modules):
        # After an in-place ReLU the pre-activation's tensor holds the ReLU's output:
        # later uses of it are uses of the ReLU (``h.relu_(); return fc2(h)``).
        order = {n: i for i, n in enumerate(nodes)}
        for user in list(pre.users):
            if user is not relu and order[user] > order[relu]:
                user.replace_input_with(pre, relu)
    chain = [pre]
    affine = modules[pre.target]
    flatten = normalize = None
    node = _only_input(pre)
    if node is not None and (flat := _flatten_call(node, modules)) is not None:
        if not _keeps_batch_dim(flat.start_dim):
            raise _stem_error(f"{_describe(node)} with start_dim={flat.start_dim}", fn)
        flatten = flat
        chain.append(node)
        node = node.args[0]
    if (
        node is not None
        and node.op == "call_module"
        and isinstance(modules[node.target], Normalize)
    ):
        normalize = modules[node.target]
        chain.append(node)
        node = _only_input(node)
    if node is not placeholders[0]:
        found = _describe(node) if node is not None else "a call with several arguments"
        raise _stem_error(f"{found} between the input and {_describe(chain[-1])}", fn)
    chain.append(node)

    # The input must reach Omega only through the ReLU: every stem node feeds only the
    # next one (the affine node feeds only the ReLU).
    chain.reverse()  # input, [normalize], [flatten], affine
    roles = {id(chain[0]): "the input", id(pre): "the pre-activation"}
    if normalize is not None:
        roles[id(chain[1])] = "the normalized input"
    for here, after in zip(chain, [*chain[1:], relu], strict=True):
        others = [u for u in here.users if u is not after]
        if others:
            what = roles.get(id(here), "the flattened input")
            if here.op != "placeholder":
                what += f" {_describe(here)}"
            used = ", ".join(_describe(u) for u in others)
            raise MomentInputError(
                f"{fn}: model: {what} reaches the rest of the network other than through the "
                f"first ReLU: it is also used by {used} (a skip connection); the split "
                "Phi(x) = Omega(ReLU(Upsilon(x))) does not exist"
            )

    omega_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {relu: omega_graph.placeholder("relu_out")}
    skip = set(chain) | {relu}
    for node in nodes:
        if node not in skip:
            env[node] = omega_graph.node_copy(node, lambda n: env[n])
    omega = fx.GraphModule(model, omega_graph, class_name="Omega")
    return Upsilon(affine, normalize=normalize, flatten=flatten), omega
