"""Compile a PyTorch model into a program that runs on CrypTen shares, without ONNX.

The model is traced with ``torch.fx`` (after the model owner folds BatchNorm into
the preceding convolution), and every node is mapped to one CrypTen operation.
Supported: Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
Flatten, residual add, and BatchNorm directly after a convolution (folded).
Anything else is an error naming the layer. Every party compiles the same
architecture; only the model owner's copy has the real weights.
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from medmpc.mpc import bounds, comparison, crypten_compat


class UnsupportedLayer(ValueError):
    """A layer the encrypted executor cannot run; the message names it."""


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (eval mode) with every BatchNorm after a Conv2d folded into it."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(modules[prev.target], nn.Conv2d)):
            raise UnsupportedLayer(f"layer {node.target!r} (BatchNorm) does not follow a Conv2d and cannot be folded")
        if len(prev.users) != 1:
            raise UnsupportedLayer(f"conv {prev.target!r} feeds more than its BatchNorm {node.target!r}")
        conv, bn = modules[prev.target], modules[node.target]
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        fused = torch.nn.utils.skip_init(
            nn.Conv2d,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=True,
        )  # no initialisation: both tensors are set below, and parties draw only from their CSPRNG
        fused.weight.data = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
        fused.bias.data = (bias - bn.running_mean) * scale + bn.bias.detach()
        parent, _, name = str(prev.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def relu_after_maxpool(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``maxpool(relu(x))`` as ``relu(maxpool(x))``: equal (both are monotone), and the
    secure comparisons of the ReLU then run on the pooled, 4x smaller tensor."""
    modules = dict(gm.named_modules())
    for relu in list(gm.graph.nodes):
        if not bounds.is_relu(relu, modules) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if not (pool.op == "call_module" and isinstance(modules[pool.target], nn.MaxPool2d)):
            continue
        pool_users = list(pool.users)
        pool.args = (relu.args[0], *pool.args[1:])
        relu.args = (pool, *relu.args[1:])
        pool.append(relu)  # keep the graph in execution order
        for user in pool_users:
            user.replace_input_with(pool, relu)
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare(model: nn.Module) -> fx.GraphModule:
    """What the model owner does before sharing: fold BatchNorm, move ReLU after max-pooling."""
    return relu_after_maxpool(fold_batchnorm(model))


@dataclass
class Step:
    """One node of the compiled program: ``out = fn(*inputs)``."""

    name: str
    fn: Callable[..., Any]
    inputs: list[str]


# max-pooling's padding where no bound is known: below the activations of the models here
DEFAULT_POOL_PAD = -(2.0**20)


@dataclass
class ComparisonSite:
    """One place the program compares shared values: the ring it compares them on (public), and for
    max-pooling the padding value, below every value there (used by the model owner, party 0, only)."""

    node: str
    pools: bool = False  # max-pooling, which compares differences of two values
    bits: int = comparison.FULL_RING
    pad: float = DEFAULT_POOL_PAD


@dataclass(frozen=True)
class Precision:
    """Fractional bits of fixed point: weights are ``round(w 2^weights) / 2^weights``,
    activations (the input, biases and every value a layer computes) multiples of ``2^-activations``.

    Weights finer than activations: a weight's rounding error is multiplied by every activation it
    meets and carried through every layer after it, while an activation's is a fresh, unbiased
    last place (the parties' local truncation rounds up or down at random). The comparisons'
    rings are sized in activation units, so each activation bit fewer is one bit fewer opened
    per comparison. A product is ``2^(weights + activations)`` times its value before the truncation,
    whose probability of wrapping grows with that scale."""

    weights: int = 16
    activations: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.activations <= self.weights or self.weights + self.activations > MAX_PRODUCT_BITS:
            raise ValueError(
                f"fixed point needs 1 <= activation bits <= weight bits and their sum at most {MAX_PRODUCT_BITS}, "
                f"got {self.activations} and {self.weights}"
            )

    def of(self, parameter: str) -> int:
        """The fractional bits of a parameter: a layer's ``.weight`` or its ``.bias``."""
        return self.weights if parameter.endswith(".weight") else self.activations


# a product's scale: 2^40 leaves 2^23 of headroom for values, and the truncation wraps with
# probability |value| 2^-24
MAX_PRODUCT_BITS = 40


@dataclass
class Program:
    steps: list[Step]
    input_name: str
    output_name: str
    parameters: dict[str, torch.Tensor]  # plaintext on the model owner, zeros of the same shape elsewhere
    sites: list[ComparisonSite]
    # the input's valid range, clamped to inside MPC before anything else (None: not clamped)
    input_range: tuple[float, float] | None = None
    bounds_proven: bool = False  # every comparison's values provably fit its ring
    owner: int = 0  # the model owner's rank: ``parameters`` are plaintext there
    precision: Precision = Precision()

    def publish_bounds(self, *, src: int) -> None:
        """Party ``src`` (the model owner, who derived them from the weights) tells the others the
        input range, each comparison's ring, whether the bounds are proven and the fixed-point
        precision: all public."""
        crypten = crypten_compat.patched()
        self.owner = src
        mine = {
            "input_range": self.input_range,
            "bits": [s.bits for s in self.sites],
            "proven": self.bounds_proven,
            "precision": [self.precision.weights, self.precision.activations],
        }
        public = crypten.communicator.get().broadcast_obj(mine, src)
        try:
            precision = Precision(*public["precision"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"party {src} sent no valid fixed-point precision: {e}") from None
        if len(public["bits"]) != len(self.sites):
            raise ValueError(f"party {src} compiled {len(public['bits'])} comparisons, this party {len(self.sites)}")
        if any(not 2 <= bits <= comparison.FULL_RING for bits in public["bits"]):
            raise ValueError(f"party {src} sent comparison rings outside 2..64 bits: {public['bits']}")
        if public["input_range"] is None or not public["input_range"][0] <= 0 <= public["input_range"][1]:
            raise ValueError(f"party {src} sent no valid input range to clamp to: {public['input_range']}")
        self.input_range, self.bounds_proven, self.precision = public["input_range"], public["proven"], precision
        for site, bits in zip(self.sites, public["bits"]):
            site.bits = bits

    def share_parameters(self, *, src: int, device: str = "cpu") -> dict[str, Any]:
        """Secret-share the parameters from party ``src`` (the model owner; the others' are
        placeholders), each at its precision; every party calls it after :meth:`publish_bounds`."""
        return {
            name: crypten_compat.encrypt(value.to(device), src=src, precision=self.precision.of(name))
            for name, value in sorted(self.parameters.items())
        }

    def share_input(self, x: torch.Tensor, *, src: int) -> Any:
        """Secret-share the input from party ``src`` (the others pass a placeholder of its shape)."""
        return crypten_compat.encrypt(x, src=src, precision=self.precision.activations)

    def run(self, x: Any, encrypted_params: dict[str, Any]) -> Any:
        if self.input_range is not None:
            x = comparison.clamp(x, *self.input_range)
        values: dict[str, Any] = {self.input_name: x}
        for step in self.steps:
            values[step.name] = step.fn(*[values[i] for i in step.inputs], params=encrypted_params)
        return values[self.output_name]

    @property
    def prepared_runs(self) -> int:
        """How many convolutions ran online on masks prepared offline."""
        return sum(s.fn.prepared_runs for s in self.steps if isinstance(s.fn, Conv))

    def discard_prepared(self) -> None:
        """Drop every run :meth:`trace` prepared and no run has used: the convolutions' masks and the
        dealer material CrypTen's provider caches."""
        crypten = crypten_compat.patched()
        crypten.mpc.get_default_provider().tuple_cache = {}
        for step in self.steps:
            if isinstance(step.fn, Conv):
                step.fn.masks = []

    def trace(self, x: Any, encrypted_params: dict[str, Any]) -> None:
        """Offline, on a placeholder input of the real shape: CrypTen's provider records the
        randomness every step will need, and each convolution prepares its input mask. Each call
        prepares one more run of that shape (the material of earlier calls stays until used)."""
        crypten = crypten_compat.patched()
        provider = crypten.mpc.get_default_provider()
        convs = [s.fn for s in self.steps if isinstance(s.fn, Conv)] if not x._tensor.share.is_cuda else []
        for conv in convs:
            conv.recording = True
        provider.request_cache = []  # CrypTen keeps every request it traced, and would refill them all
        provider.trace(True)
        try:
            self.run(x, encrypted_params)
        finally:
            provider.trace(False)
            for conv in convs:
                conv.recording = False
        provider.fill_cache()
        comparison.warm_up()
        owner = crypten.communicator.get().get_rank() == self.owner
        pending = [
            p
            for conv in convs
            for p in conv.prepare(
                encrypted_params[f"{conv.key}.weight"],
                owner=self.owner,
                plain_weight=self.parameters[f"{conv.key}.weight"] if owner else None,
            )
        ]
        if pending:  # every weight mask (and every shared input's mask offset) opened in one round
            flat = [masked for opening, _ in pending for masked in opening]
            opened = crypten.communicator.get().all_reduce(flat, batched=True)
            start = 0
            for opening, keep in pending:
                keep(opened[start : start + len(opening)])
                start += len(opening)


@dataclass
class _Mask:
    """One online run's prepared input mask: ``a``, this party's share of ``a*W``, and for a
    convolution that shares its input with an earlier one, the public ``a - a_earlier``."""

    shape: torch.Size
    a: torch.Tensor
    aw: torch.Tensor
    offset: torch.Tensor | None


class Conv:
    """A convolution on shares whose input mask can be prepared before the input exists.

    Beaver's protocol opens ``eps = x - a`` and ``delta = W - b`` and computes
    ``c + eps*b + a*delta + eps*delta``. With the weights fixed, everything but ``eps``
    is known before the image: offline, the parties open ``delta`` and keep shares of
    ``a*W = c + a*delta``. Online, ``eps*W + a*W`` needs ``eps`` only where ``W`` is known:
    the model owner holds it in the clear, so the other party sends its part of ``eps``
    (``x_1 - a_1``, masked by its share of ``a``, which the owner never sees) to the owner
    alone, and the owner's share is ``eps*W + (a*W)_0``, the other's ``(a*W)_1``. One message
    one way, and one local product at one party (CrypTen: two openings both ways, including
    the weights, and three products at each). A convolution on the same input as an earlier
    one (a ResNet shortcut's) opens nothing online: offline the parties open
    ``a - a_earlier``, and its ``eps`` is the earlier one's less that (``x`` is masked once,
    by ``a_earlier``). Without prepared masks (or on CUDA) it is CrypTen's convolution.
    """

    def __init__(self, mod: nn.Conv2d, key: str, *, shares_input_with: Conv | None = None) -> None:
        if isinstance(mod.padding, str):
            raise UnsupportedLayer(f"conv {key!r} uses string padding {mod.padding!r}")
        if mod.padding_mode != "zeros":
            raise UnsupportedLayer(f"conv {key!r} pads with {mod.padding_mode!r}: only zeros are supported")
        self.key = key
        self.kwargs: dict[str, Any] = {
            "stride": mod.stride,
            "padding": mod.padding,
            "dilation": mod.dilation,
            "groups": mod.groups,
        }
        self.earlier = shares_input_with
        self.recording = False
        self.shapes: list[torch.Size] = []  # input shapes seen while recording
        self.drawn: list[torch.Tensor] = []  # the input masks drawn by the last prepare, for later convs
        self.masks: list[_Mask] = []  # each used once
        self.opened = False  # whether this run opened eps, for later convs on the same input
        self.eps: torch.Tensor | None = None  # that eps, at the model owner only
        self.owner = 0  # the model owner's rank
        self.plain_weight: torch.Tensor | None = None  # W, fixed-point encoded, at the model owner only
        self.prepared_runs = 0

    def __call__(self, x: Any, params: dict[str, Any]) -> Any:
        weight = params[f"{self.key}.weight"]
        self.opened, self.eps = False, None
        if self.recording:  # shape only: a placeholder, so that no randomness is spent
            self.shapes.append(x.size())
            shape = torch.nn.functional.conv2d(torch.zeros(x.size()), torch.zeros(weight.size()), **self.kwargs).shape
            # at the input's precision: adding a bias of another would re-encode the bias in place
            out = crypten_compat.encrypt(torch.zeros(shape), src=0, precision=x.encoder._precision_bits)
        elif self.masks and self.masks[0].shape == x.size():
            out = self._online(x, weight.encoder.scale)
        else:
            out = _rescaled(x.conv2d(weight, **self.kwargs), x, weight)
        if f"{self.key}.bias" in params:
            out = out + params[f"{self.key}.bias"].reshape(1, -1, 1, 1)
        return out

    def prepare(
        self, weight: Any, *, owner: int, plain_weight: torch.Tensor | None
    ) -> list[tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], None]]]:
        """Offline: draw a triple per recorded shape; returns what to open (``W - b``, and
        ``a - a_earlier`` for a shared input), each with what to do with the opened values (the
        caller opens them all in one round). ``plain_weight``: ``W`` at the model owner (rank
        ``owner``), None elsewhere; encoded exactly as its shares (``weight``) encode it."""
        crypten = crypten_compat.patched()
        provider = crypten.mpc.get_default_provider()
        self.owner = owner
        if plain_weight is not None and self.plain_weight is None:
            self.plain_weight = weight.encoder.encode(plain_weight)
        pending: list[tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], None]]] = []
        self.drawn = []
        for i, shape in enumerate(self.shapes):
            a, b, c = provider.generate_additive_triple(shape, weight.size(), "conv2d", **self.kwargs)
            self.drawn.append(a.share)
            opening = [weight._tensor.share - b.share]
            if self.earlier is not None:
                opening.append(a.share - self.earlier.drawn[i])
            pending.append((opening, functools.partial(self._keep, shape, a.share, c.share)))
        self.shapes = []
        return pending

    def _keep(self, shape: torch.Size, a: torch.Tensor, c: torch.Tensor, opened: list[torch.Tensor]) -> None:
        """With the opened ``delta = W - b``: store ``a`` and this party's share of ``a*W = c + a*delta``."""
        offset = opened[1] if self.earlier is not None else None
        self.masks.append(_Mask(shape, a, c + torch.conv2d(a, opened[0], **self.kwargs), offset))

    def _online(self, x: Any, weight_scale: int) -> Any:
        crypten = crypten_compat.patched()
        comm = crypten.communicator.get()
        mask = self.masks.pop(0)
        self.prepared_runs += 1
        if mask.offset is None:
            product = self._open_and_convolve(comm, x._tensor.share - mask.a, mask.aw)
        elif self.earlier is None or not self.earlier.opened:
            raise RuntimeError(f"conv {self.key!r} shares its input, but the convolution before it opened none")
        elif comm.get_rank() != self.owner:
            product = mask.aw
        elif self.earlier.eps is None:
            raise RuntimeError(f"conv {self.key!r}: the model owner has no eps from the convolution before it")
        else:
            self.eps = self.earlier.eps - mask.offset  # x - a = (x - a_earlier) - (a - a_earlier)
            product = torch.conv2d(self.eps, self._owner_weight(), **self.kwargs) + mask.aw
        self.opened = True
        out = crypten.mpc.MPCTensor.from_shares(product, precision=x.encoder._precision_bits)
        return out.div(weight_scale)  # CrypTen's truncation, as after its own products

    def _owner_weight(self) -> torch.Tensor:
        if self.plain_weight is None:
            raise RuntimeError(f"conv {self.key!r}: the model owner has no plaintext weight")
        return self.plain_weight

    def _open_and_convolve(self, comm: Any, masked: torch.Tensor, aw: torch.Tensor) -> torch.Tensor:
        """Send ``x - a`` to the model owner in parts of a few input channels; the owner adds up
        ``eps * W`` part by part as they arrive, so that its convolution runs while the rest is on
        the wire. Returns this party's share of ``x * W`` (the owner keeps ``eps`` for a later
        convolution on the same input)."""
        channels = masked.shape[1]
        count = min(_CONV_PARTS, channels) if self.kwargs["groups"] == 1 else 1  # a group's channels stay together
        bounds = [channels * k // count for k in range(count + 1)]
        parts = [masked[:, lo:hi].contiguous() for lo, hi in itertools.pairwise(bounds)]
        if comm.get_rank() != self.owner:
            comm.reduce_parts(parts, self.owner, arrived=None)
            return aw
        weight, product, eps = self._owner_weight(), aw.clone(), []

        def arrived(k: int, part: torch.Tensor) -> None:
            eps.append(part)
            product.add_(torch.conv2d(part, weight[:, bounds[k] : bounds[k + 1]], **self.kwargs))

        comm.reduce_parts(parts, self.owner, arrived=arrived)
        self.eps = torch.cat(eps, dim=1)
        return product


# input-channel parts a prepared convolution's opening travels in
_CONV_PARTS = 8


def _rescaled(product: Any, x: Any, weight: Any) -> Any:
    """CrypTen's product of activations ``x`` and a weight truncates by the activations' scale
    (it assumes both alike); this truncates by the rest of the weight's (a second last place)."""
    rest = weight.encoder.scale // x.encoder.scale
    return product.div(rest) if rest > 1 else product


def _linear(key: str, has_bias: bool) -> Callable[..., Any]:
    def fn(x: Any, params: dict[str, Any]) -> Any:
        weight = params[f"{key}.weight"]
        out = _rescaled(x.matmul(weight.t()), x, weight)
        return out + params[f"{key}.bias"] if has_bias else out

    return fn


def _module_step(
    key: str, mod: nn.Module, site: ComparisonSite, *, then_relu: bool = False, earlier: Conv | None = None
) -> Callable[..., Any]:
    if isinstance(mod, nn.Conv2d):
        return Conv(mod, key, shares_input_with=earlier)
    if isinstance(mod, nn.Linear):
        return _linear(key, mod.bias is not None)
    if isinstance(mod, nn.ReLU):
        return lambda x, params: comparison.relu(x, bits=site.bits)
    if isinstance(mod, nn.MaxPool2d):
        if mod.dilation not in (1, (1, 1)) or mod.ceil_mode:
            raise UnsupportedLayer(f"layer {key!r}: MaxPool2d with dilation or ceil_mode")
        k, s, p = (_pair(v) for v in (mod.kernel_size, mod.stride or mod.kernel_size, mod.padding))
        return lambda x, params: max_pool2d(x, k, s, p, bits=site.bits, pad=site.pad, then_relu=then_relu)
    if isinstance(mod, nn.AvgPool2d):
        if mod.ceil_mode or mod.divisor_override is not None or (mod.padding and not mod.count_include_pad):
            raise UnsupportedLayer(
                f"layer {key!r}: AvgPool2d with ceil_mode, divisor_override or count_include_pad=False"
            )
        kernel, stride, padding = mod.kernel_size, mod.stride, mod.padding
        return lambda x, params: x.avg_pool2d(kernel, stride=stride, padding=padding)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size, mod.output_size)
        if None in size:
            raise UnsupportedLayer(f"layer {key!r}: AdaptiveAvgPool2d with output size {mod.output_size}")
        return lambda x, params: x.adaptive_avg_pool2d(size)
    if isinstance(mod, nn.Flatten):
        start = mod.start_dim
        return lambda x, params: x.flatten(start)
    if isinstance(mod, nn.Identity):
        return lambda x, params: x
    raise UnsupportedLayer(
        f"layer {key!r} ({type(mod).__name__}) is not supported by the encrypted executor; supported: "
        "Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, BatchNorm after Conv2d"
    )


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def max_pool2d(
    x: Any,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    *,
    bits: int = comparison.FULL_RING,
    pad: float = DEFAULT_POOL_PAD,
    then_relu: bool = False,
) -> Any:
    """Max pooling on shares, separably: over each window's columns, then over its rows; with
    ``then_relu``, ``relu(maxpool(x))``: zero joins every row window, at no extra level.

    CrypTen's max_pool2d also computes the one-hot argmax of every window (pairwise, k^2 (k^2-1)
    comparisons for a k x k window, for the backward pass) and was 73 % of ResNet-18's online
    bytes at 224 px. Here a 3x3, stride-2 window costs 2 comparisons per column-pass output and
    2 per output, each ``max(a, b) = b + relu(a - b)`` (mpc.comparison), batched level by level.
    Padding takes the value ``pad``, which must lie below every value of ``x``, and every
    difference of two values must fit the ``bits``-bit comparison ring.
    """
    if x._tensor.share.is_cuda:  # the GPU path keeps CrypTen's, as measured on the H100
        pooled = x.max_pool2d(kernel, padding=padding, stride=stride)
        return comparison.relu(pooled, bits=bits) if then_relu else pooled
    if any(padding):
        x = x.pad((padding[1], padding[1], padding[0], padding[0]), value=pad)
    columns = _window_max(x, 3, kernel[1], stride[1], bits)
    return _window_max(columns, 2, kernel[0], stride[0], bits, with_zero=then_relu)


def _window_max(x: Any, dim: int, k: int, s: int, bits: int, *, with_zero: bool = False) -> Any:
    n = (x.size(dim) - k) // s + 1
    index: list[slice] = [slice(None)] * x.dim()
    views = []
    for i in range(k):
        index[dim] = slice(i, i + s * (n - 1) + 1, s)
        views.append(x[tuple(index)])
    if with_zero:  # max(0, window): the same tree depth for k = 3 (4 leaves), one round less than a ReLU after
        views.append(views[0] * 0)
    crypten = crypten_compat.patched()
    while len(views) > 1:  # a tree: one batched comparison per level
        half = len(views) // 2
        a, b = crypten.stack(views[:half]), crypten.stack(views[half : 2 * half])
        pairs = b + comparison.relu(a - b, bits=bits)
        views = [pairs[i] for i in range(half)] + views[2 * half :]
    return views[0]


def _function_step(node: fx.Node, site: ComparisonSite) -> Callable[..., Any]:
    target = node.target
    if target in (torch.relu, torch.nn.functional.relu):
        return lambda x, params: comparison.relu(x, bits=site.bits)
    if target in (operator.add, torch.add):
        return lambda a, b, params: a + b
    if target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return lambda x, params: x.flatten(start)
    raise UnsupportedLayer(f"operation {getattr(target, '__name__', target)!r} (node {node.name}) is not supported")


def compile_model(
    model: nn.Module, *, input_range: tuple[float, float] | None = None, precision: Precision = Precision()
) -> Program:
    """Prepare (fold BatchNorm, reorder ReLU/max-pool), round the parameters to ``precision``'s
    nearest fixed-point values, trace, and map every node to a CrypTen operation.

    The model owner passes ``input_range`` (the preprocessed input's valid range): every
    comparison's ring is then sized from the bounds its weights prove (mpc.bounds) in that
    fixed point, and shared with the others by :meth:`Program.publish_bounds`.
    """
    gm = round_parameters(prepare(model), precision)
    modules = dict(gm.named_modules())
    steps: list[Step] = []
    sites: list[ComparisonSite] = []
    input_name = output_name = ""
    fused = _relus_after_pools(gm, modules)  # each ReLU's max-pooling computes it
    first_conv: dict[str, Conv] = {}  # by input node: the first convolution of it, which opens it
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if input_name:
                raise UnsupportedLayer("models with more than one input are not supported")
            input_name = node.name
        elif node.op == "output":
            output_name = node.args[0].name
        elif node.op in ("call_module", "call_function"):
            site = ComparisonSite(node.name, pools=_pools(node, modules))
            if node in fused:
                fn: Callable[..., Any] = lambda x, params: x
            elif node.op == "call_module":
                source = node.args[0].name if node.args and isinstance(node.args[0], fx.Node) else ""
                then_relu, earlier = node in fused.values(), first_conv.get(source)
                fn = _module_step(node.target, modules[node.target], site, then_relu=then_relu, earlier=earlier)
                if isinstance(fn, Conv) and earlier is None:
                    first_conv[source] = fn
            else:
                fn = _function_step(node, site)
            if site.pools or (bounds.is_relu(node, modules) and node not in fused):
                sites.append(site)
            steps.append(Step(node.name, fn, [a.name for a in node.args if isinstance(a, fx.Node)]))
        else:
            raise UnsupportedLayer(f"node {node.name} ({node.op} {node.target}) is not supported")
    params = {k: v.detach().clone() for k, v in gm.state_dict().items() if k.endswith((".weight", ".bias"))}
    program = Program(steps, input_name, output_name, params, sites, precision=precision)
    if input_range is not None:
        _size_comparisons(program, gm, input_range)
    return program


def round_parameters(gm: fx.GraphModule, precision: Precision) -> fx.GraphModule:
    """Every parameter rounded to the nearest multiple of ``2^-bits`` for its precision: CrypTen's
    encoder truncates toward zero, which shifts every weight the same way, an error that adds
    up over a layer's inputs instead of cancelling."""
    with torch.no_grad():
        for name, p in gm.named_parameters():
            scale = 2.0 ** precision.of(name)
            p.copy_(torch.round(p * scale) / scale)
    return gm


def _relus_after_pools(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> dict[fx.Node, fx.Node]:
    """Each ReLU whose input is a max-pooling used by nothing else, with that max-pooling."""
    fused = {}
    for node in gm.graph.nodes:
        pool = node.args[0] if bounds.is_relu(node, modules) else None
        if isinstance(pool, fx.Node) and _pools(pool, modules) and len(pool.users) == 1:
            fused[node] = pool
    return fused


def _pools(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[str(node.target)], nn.MaxPool2d)


def _size_comparisons(program: Program, gm: fx.GraphModule, input_range: tuple[float, float]) -> None:
    low, high = input_range
    fractional_bits = program.precision.activations
    node_bound = bounds.activation_bounds(
        gm, (low, high), fractional_bits=fractional_bits, weight_bits=program.precision.weights
    )
    inputs = {n.name: n.args[0].name for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    proven = True
    for site in program.sites:
        value = node_bound[inputs[site.node]]
        compared = value.magnitude
        if site.pools:
            # below every value there and the fused ReLU's 0, by a margin for truncation errors
            floor = min(float(value.lo.min()), 0.0) - 1.0
            site.pad = max(floor, -(2.0 ** (comparison.FULL_RING - fractional_bits - 3)))
            compared = max(float(value.hi.max()), 0.0) - floor  # a difference of two values there
            proven &= site.pad == floor  # a pad raised to fit the ring may not be below every value
        site.bits = bounds.ring_bits(compared, fractional_bits=fractional_bits)
        proven &= bounds.fits(compared, fractional_bits=fractional_bits)
    program.input_range, program.bounds_proven = (float(low), float(high)), proven
