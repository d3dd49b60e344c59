"""Exact per-sample gradient norms over a model's parameters, from one ordinary backward.

The gradient of sample ``i``'s loss with respect to a layer's parameters depends only on
that sample's input to the layer (``a_i``) and the gradient with respect to that sample's
output of the layer (``g_i``), so its norm follows from those two, caught by hooks,
without a per-sample backward pass and mostly without materialising per-sample gradients:

- ``Linear``, input ``[B, d]``: ``||dW_i|| = ||a_i|| ||g_i||``, ``||db_i|| = ||g_i||``.
  With a sequence dimension (``[B, T, d]``), ``||dW_i||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s)``
  (the Gram form, ``B T^2 (d + p)`` operations) or ``||G_i^T A_i||^2`` materialised
  (``B T d p``), whichever costs fewer operations.
- ``Conv1d/2d/3d``: the same over the unfolded input patches, the output positions playing
  the sequence role, per group.
- ``Embedding``: the rows of a sample's gradient are sums of the output gradients of its
  equal tokens; their norms come from segment sums over (sample, token) pairs.
- ``LayerNorm``, ``GroupNorm``: the affine gradients are sums over one sample's positions
  of ``g * x_hat`` (weight) and ``g`` (bias).

A module called several times in one forward pass is handled exactly (its calls are
concatenated along the sequence dimension). Excluded, and counted as not covered:
parameters of other layers (BatchNorm, whose per-sample gradient in train mode depends on
the whole batch; attention modules that use their weights functionally; custom
parameters), weights shared by several modules, and embeddings with
``scale_grad_by_freq``. Frozen parameters (``requires_grad=False``) are not part of the
norm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GRAD_NORM_MODES",
    "GradNormMode",
    "LayerTaps",
    "ce_logits_grad",
    "per_sample_grad_norms",
    "per_sample_losses",
]

GradNormMode = Literal["logits", "last_layer", "full"]
GRAD_NORM_MODES: tuple[str, ...] = ("logits", "last_layer", "full")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (nn.Linear, *_CONV, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    mode: GradNormMode = "logits",
    strict: bool = False,
) -> Tensor:
    """Norm of the gradient of each sample's own loss, for a batch, in one backward pass.

    Sample ``i``'s own loss is ``loss_fn`` applied to that sample alone, so the result does
    not depend on the reduction ``loss_fn`` applies (``mean``, ``sum`` or ``none``) nor on
    the batch size. The model's ``.grad`` fields are left untouched.

    Args:
        model: Maps ``inputs`` to logits ``[batch, ...]``.
        loss_fn: ``loss_fn(logits, targets)``, e.g. ``F.cross_entropy`` or
            ``nn.CrossEntropyLoss(reduction="sum")``.
        inputs: The batch's inputs (a tensor, or whatever ``model`` takes).
        targets: The batch's targets, ``[batch, ...]``.
        mode: ``"logits"``: norm over the logits; ``"last_layer"``: exact norm over the
            weight and bias of the ``nn.Linear`` that produces the logits; ``"full"``:
            exact norm over every trainable parameter of supported layers (see the module
            docstring; :attr:`LayerTaps.coverage` tells the covered fraction).
        strict: In ``"full"`` mode, raise instead of leaving parameters out.

    Returns:
        A float ``[batch]`` tensor on the logits' device.

    Raises:
        ValueError: For an unknown mode; for ``"last_layer"`` when the logits are not the
            output of an ``nn.Linear``; with ``strict=True``, when a trainable parameter
            cannot be covered (the message names it).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> per_sample_grad_norms(net, F.cross_entropy, x, y, mode="full").shape
        torch.Size([5])
    """
    check_mode(mode)
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "per_sample_grad_norms needs autograd: call it outside torch.no_grad() / "
            "torch.inference_mode()."
        )
    if mode == "logits":
        logits = model(inputs)
        (grad,) = torch.autograd.grad(per_sample_losses(loss_fn, logits, targets).sum(), logits)
        return _float(grad.detach()).flatten(1).norm(dim=1)
    taps = LayerTaps(model, mode, strict=strict)
    with taps.recording():
        logits = model(inputs)
        total = per_sample_losses(loss_fn, logits, targets).sum()
        if mode == "last_layer":
            (grad,) = torch.autograd.grad(total, logits)
            return taps.last_layer_sq(logits, grad.detach()).sqrt()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        taps.check_functional_use(p for p, g in zip(params, grads, strict=True) if g is not None)
        if taps.excluded:
            warnings.warn(
                f"per_sample_grad_norms(mode='full') covers {taps.coverage:.1%} of the "
                f"trainable parameters; left out: {_listing(taps.excluded)}. Pass strict=True "
                "to refuse instead.",
                stacklevel=2,
            )
        return taps.full_sq().sqrt()


def _listing(excluded: dict[str, str], limit: int = 6) -> str:
    names = list(excluded)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(f"{n} ({excluded[n]})" for n in names[:limit]) + more


def per_sample_losses(
    loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, targets: Tensor
) -> Tensor:
    """``[batch]`` losses, each ``loss_fn`` applied to one sample alone (so any reduction
    gives the same values); vectorised with ``torch.func.vmap`` where the loss allows."""

    def one(z: Tensor, y: Tensor) -> Tensor:
        return loss_fn(z.unsqueeze(0), y.unsqueeze(0)).sum()

    try:
        return torch.func.vmap(one)(logits, targets)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([one(z, y) for z, y in zip(logits, targets, strict=True)])


def ce_logits_grad(logits: Tensor, targets: Tensor) -> Tensor:
    """``softmax(z) - onehot(y)`` in float32: each row's cross-entropy gradient."""
    grad = torch.softmax(logits.detach().float(), dim=1)
    return grad.scatter_add(1, targets.long().unsqueeze(1), torch.full_like(grad[:, :1], -1.0))


def check_mode(mode: str) -> None:
    if mode not in GRAD_NORM_MODES:
        raise ValueError(f"grad_norm mode must be one of {GRAD_NORM_MODES}, got {mode!r}.")


@dataclass
class _Call:
    """One forward call of a tapped module: its first input, its output, and later the
    gradient with respect to that output (put in ``caught`` by a hook on the output; the
    hook holds only that list, as a hook holding the output would keep it alive)."""

    module: nn.Module | None
    input: Tensor
    output: Tensor
    caught: list[Tensor] = field(default_factory=list)

    @property
    def grad(self) -> Tensor | None:
        return self.caught[0] if self.caught else None


@dataclass
class _Layer:
    """A tapped module and the names of its direct parameters that count in the norm."""

    name: str
    covered: tuple[str, ...]
    shared: list[str] = field(default_factory=list)  # tied with another module's
    calls: list[_Call] = field(default_factory=list)


class LayerTaps:
    """Forward hooks (and gradient hooks on layer outputs) that collect what the norms need.

    ``mode="last_layer"`` taps every ``nn.Linear`` and keeps their inputs; the one whose
    output is the logits gives the norm. ``mode="full"`` taps every supported layer and
    also catches the gradients with respect to their outputs during the backward pass.

    Args:
        model: The model (any ``nn.Module``; a LightningModule in the callback).
        mode: ``"last_layer"`` or ``"full"``.
        strict: Raise at construction (and on a functional use found later) instead of
            excluding parameters.

    Attributes:
        coverage: Fraction of the trainable parameters (by count) inside the norm.
        excluded: Names of trainable parameters left out, with the reason. Both are
            final after the first backward pass: weights that a parent module uses without
            calling their module (``nn.MultiheadAttention``'s ``out_proj``) are found then.
    """

    def __init__(self, model: nn.Module, mode: GradNormMode, strict: bool = False) -> None:
        if mode not in ("last_layer", "full"):
            raise ValueError(f"LayerTaps serves 'last_layer' and 'full', got {mode!r}.")
        self.mode = mode
        self.strict = strict
        self._handles: list[Any] = []
        self._armed = False
        self._watched: list[_Call] = []
        self._kept: list[_Call] = []
        self._checked = False
        self.raw_sq: Tensor | None = None
        self._layers: dict[nn.Module, _Layer] = {}
        self.excluded: dict[str, str] = {}
        self._numel: dict[str, int] = {}
        self._scan(model)

    @property
    def coverage(self) -> float:
        total = sum(self._numel.values())
        left_out = sum(self._numel[name] for name in self.excluded)
        return 1.0 if total == 0 else (total - left_out) / total

    def attach(self) -> None:
        for module in self._layers:
            self._handles.append(module.register_forward_hook(self._on_forward))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.arm(False)

    @contextmanager
    def recording(self) -> Iterator[LayerTaps]:
        """Hooks attached and armed inside the block."""
        self.attach()
        self.arm()
        try:
            yield self
        finally:
            self.detach()

    def arm(self, on: bool = True) -> None:
        """Starts (or stops) collecting, forgetting what the last step collected."""
        self._armed = on
        self._kept, self.raw_sq = [], None
        self._drop_activations()

    def _drop_activations(self) -> None:
        self._watched = []
        for layer in self._layers.values():
            layer.calls = []

    def watch(self, output: Tensor) -> None:
        """Also catch the gradient with respect to ``output`` (a candidate for the logits)."""
        if self._armed and self.mode == "full" and output.requires_grad:
            call = _Call(None, output, output)
            self._watched.append(call)
            output.register_hook(_keeper(call.caught))

    def output_grad(self, output: Tensor) -> Tensor | None:
        """The gradient caught for ``output`` (a layer's output or a watched tensor)."""
        calls = [c for layer in self._layers.values() for c in layer.calls] + self._watched
        calls += self._kept
        return next((c.grad for c in calls if c.output is output and c.grad is not None), None)

    def finish_backward(self) -> None:
        """After the step's backward: sums the squared norms into :attr:`raw_sq` and lets
        the activations go, keeping only ``[batch, k]`` outputs and their gradients (one
        of them is the logits)."""
        if self.mode != "full" or self.raw_sq is not None:
            return
        calls = [c for layer in self._layers.values() for c in layer.calls] + self._watched
        if not any(c.grad is not None for c in calls):
            return  # no backward yet (or none reached the tapped layers)
        if not self._checked:  # once: weights a parent uses without calling their module
            self._checked = True
            self.check_functional_use(
                p for m in self._layers for p in m.parameters(recurse=False) if p.grad is not None
            )
        self.raw_sq = self.full_sq()
        self._kept = [c for c in calls if c.grad is not None and c.output.dim() == 2]
        self._drop_activations()

    def last_layer_sq(self, logits: Tensor, logits_grad: Tensor) -> Tensor:
        """Squared norms over the final ``nn.Linear``, given the gradient of each sample's
        loss with respect to the logits."""
        for module, layer in self._layers.items():
            for call in layer.calls:
                if call.output is logits and isinstance(module, nn.Linear) and layer.covered:
                    if layer.shared:
                        raise ValueError(
                            f"grad_norm 'last_layer': the final layer's {layer.shared} is "
                            "shared with another module (tied weights), so its per-sample "
                            "gradient has terms from elsewhere. Use 'full', which leaves "
                            "shared weights out, or 'logits'."
                        )
                    return _layer_sq(module, layer.covered, [call], logits_grad)
        raise ValueError(
            "grad_norm 'last_layer' needs the logits to be the output of an nn.Linear with "
            "trainable parameters, called in the forward pass; use 'full' or 'logits'."
        )

    def full_sq(self) -> Tensor:
        """Squared norms over every covered parameter, summed over layers; ``[batch]``."""
        total: Tensor | None = None
        for module, layer in self._layers.items():
            calls = [c for c in layer.calls if c.grad is not None]
            if not calls or not layer.covered:
                continue
            part = _layer_sq(module, layer.covered, calls)
            total = part if total is None else total + part
        if total is None:
            raise ValueError(
                "grad_norm 'full' caught no layer gradients: no supported layer with "
                "trainable parameters was used in the forward pass, or no backward ran."
            )
        return total

    def check_functional_use(self, used: Iterator[nn.Parameter]) -> None:
        """Excludes tapped layers whose parameters got gradients without a module call
        (a parent using the weights functionally, as ``nn.MultiheadAttention`` does)."""
        used_ids = {id(p) for p in used}
        for module, layer in self._layers.items():
            if layer.calls or not layer.covered:
                continue
            params = dict(module.named_parameters(recurse=False))
            hit = [n for n in layer.covered if id(params[n]) in used_ids]
            if hit:
                reason = "its parent uses the weights without calling the module"
                self._exclude(layer, [f"{layer.name}.{n}" for n in hit], reason)

    def _scan(self, model: nn.Module) -> None:
        owners: dict[int, int] = {}
        for _, module in model.named_modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            prefix = f"{name}." if name else ""
            self._numel.update({prefix + n: p.numel() for n, p in own})
            shared = [n for n, p in own if owners[id(p)] > 1]
            if self.mode == "last_layer":
                if isinstance(module, nn.Linear):
                    self._layers[module] = _Layer(name, tuple(n for n, _ in own), shared)
                continue
            reason = _unsupported_reason(module)
            covered = tuple(n for n, _ in own if reason is None and n not in shared)
            if reason is not None:
                self._note(module, [prefix + n for n, _ in own], reason)
            if shared:
                self._note(module, [prefix + n for n in shared], "shared with another module")
            if covered:
                self._layers[module] = _Layer(name, covered)
        if self.mode == "last_layer":
            self.excluded = {}  # the norm is over the final layer by definition

    def _note(self, module: nn.Module, names: list[str], reason: str) -> None:
        if self.strict:
            raise ValueError(
                f"grad_norm='full' with strict=True cannot cover {', '.join(names)} "
                f"({type(module).__name__}: {reason}). Use strict=False to leave them out "
                "(the covered fraction is reported), or replace the layer (e.g. BatchNorm "
                "by GroupNorm)."
            )
        self.excluded.update({n: reason for n in names})

    def _exclude(self, layer: _Layer, names: list[str], reason: str) -> None:
        module = next(m for m, lay in self._layers.items() if lay is layer)
        self._note(module, names, reason)
        layer.covered = tuple(n for n in layer.covered if f"{layer.name}.{n}" not in names)

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._armed or not args or not isinstance(output, Tensor):
            return
        call = _Call(module, args[0], output)
        self._layers[module].calls.append(call)
        if self.mode == "full" and output.requires_grad:
            output.register_hook(_keeper(call.caught))


def _keeper(caught: list[Tensor]) -> Callable[[Tensor], None]:
    def keep(grad: Tensor) -> None:
        if caught:  # a second backward through the same graph adds up
            caught[0] = caught[0] + grad.detach()
        else:
            caught.append(grad.detach())

    return keep


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "scale_grad_by_freq makes a sample's gradient depend on the batch"
    if isinstance(module, _SUPPORTED):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "in train mode a sample's gradient depends on the whole batch"
    return "layer type not supported"


def _layer_sq(
    module: nn.Module, covered: tuple[str, ...], calls: list[_Call], grad: Tensor | None = None
) -> Tensor:
    """Per-sample squared norm over ``covered`` parameters of one module, over its calls.

    ``grad`` overrides the caught output gradient (one call only)."""
    grads = [grad] if grad is not None else [c.grad for c in calls]
    inputs = [c.input for c in calls]
    if isinstance(module, nn.Embedding):
        return _embedding_sq(module, inputs, grads)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return _norm_layer_sq(module, covered, inputs, grads)
    if isinstance(module, _CONV):
        pairs = [_conv_columns(module, x, g) for x, g in zip(inputs, grads, strict=True)]
    else:
        pairs = [_linear_columns(x, g) for x, g in zip(inputs, grads, strict=True)]
    a = _cat_positions([p[0] for p in pairs])
    g = _cat_positions([p[1] for p in pairs])
    total = _weight_sq(a, g) if "weight" in covered else g.new_zeros(g.shape[0])
    if "bias" in covered:
        total = total + g.sum(dim=3).square().sum(dim=(1, 2))
    return total


def _float(t: Tensor) -> Tensor:
    """float32 for half types, float64 kept: the norms are summed in full precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _cat_positions(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)


def _linear_columns(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input and output gradient of a Linear as ``[B, 1, d, T]`` and ``[B, 1, p, T]``
    (views: no copy)."""
    b = x.shape[0]
    a = _float(x.detach()).reshape(b, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)
    return a, _float(g).reshape(b, -1, g.shape[-1]).transpose(1, 2).unsqueeze(1)


def _weight_sq(a: Tensor, g: Tensor) -> Tensor:
    """``sum_groups ||G_i A_i^T||^2`` for ``a [B, G, d, T]`` and ``g [B, G, p, T]``, by
    the cheapest exact route."""
    dtype = torch.promote_types(a.dtype, g.dtype)
    a, g = a.to(dtype), g.to(dtype)
    d, p, t = a.shape[2], g.shape[2], a.shape[3]
    if t == 1:
        return (a.square().sum(2) * g.square().sum(2)).sum(dim=(1, 2))
    if t * (d + p) < d * p:  # Gram form: B G T^2 (d + p) against materialising: B G T d p
        gram_a = a.transpose(2, 3) @ a
        gram_g = g.transpose(2, 3) @ g
        return (gram_a * gram_g).sum(dim=(1, 2, 3))
    return (g @ a.transpose(2, 3)).square().sum(dim=(1, 2, 3))


def _conv_columns(conv: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input patches ``[B, G, C_in/G * prod(k), L]`` and output gradients
    ``[B, G, C_out/G, L]`` of an N-d convolution (any stride, dilation, padding, groups)."""
    n = x.dim() - 2
    b, groups = x.shape[0], conv.groups
    x = _float(x.detach())
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, list(conv._reversed_padding_repeated_twice), mode=mode)
    for i in range(n):  # strided views; the one copy is the reshape below
        k, stride, dilation = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, dilation * (k - 1) + 1, stride)
        if dilation > 1:
            x = x[..., ::dilation]
    order = [0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n)]
    patches = x.permute(order).reshape(b, -1, math.prod(x.shape[2 : 2 + n]))
    positions = patches.shape[-1]
    grad = _float(g).reshape(b, groups, -1, positions)
    return patches.reshape(b, groups, -1, positions), grad


def _embedding_sq(module: nn.Embedding, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Rows of a sample's gradient are sums over its equal tokens: segment sums over
    sorted (sample, token) keys, without a host synchronisation."""
    b = inputs[0].shape[0]
    idx = torch.cat([x.reshape(b, -1) for x in inputs], dim=1)
    g = torch.cat([_float(gr).reshape(b, idx.shape[1], -1) for gr in grads], dim=1)
    if module.padding_idx is not None:  # the padding row gets no gradient
        g = g * (idx != module.padding_idx).unsqueeze(-1)
    sample = torch.arange(b, device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    key = sample * module.num_embeddings + idx.reshape(-1).long()
    key, order = key.sort()
    run = torch.cat([key.new_zeros(1), (key[1:] != key[:-1]).long()]).cumsum(0)
    flat = g.reshape(-1, g.shape[-1])[order]
    sums = flat.new_zeros(flat.shape).index_add_(0, run, flat)
    run_sample = sample.new_zeros(sums.shape[0]).index_copy_(0, run, sample[order])
    return sums.new_zeros(b).index_add_(0, run_sample, sums.square().sum(1))


def _norm_layer_sq(
    module: nn.Module, covered: tuple[str, ...], inputs: list[Tensor], grads: list[Tensor]
) -> Tensor:
    """LayerNorm / GroupNorm affine parameters: per-sample ``sum g * x_hat`` and ``sum g``."""
    weight = bias = None
    for x, g in zip(inputs, grads, strict=True):
        x, g = _float(x.detach()), _float(g)
        b = x.shape[0]
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            width = math.prod(module.normalized_shape)
            gw, gb = (g * x_hat).reshape(b, -1, width).sum(1), g.reshape(b, -1, width).sum(1)
        else:
            x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
            channels = x.shape[1]
            gw = (g * x_hat).reshape(b, channels, -1).sum(2)
            gb = g.reshape(b, channels, -1).sum(2)
        weight = gw if weight is None else weight + gw
        bias = gb if bias is None else bias + gb
    assert weight is not None and bias is not None
    total = weight.new_zeros(weight.shape[0])
    if "weight" in covered:
        total = total + weight.square().sum(1)
    if "bias" in covered:
        total = total + bias.square().sum(1)
    return total
