"""Flat parameter and gradient buffers: one long vector per kernel launch.

The fused kernels make two passes over every parameter per step. Over a flat buffer each
pass is one launch with long, aligned, vectorisable loops instead of one launch per
parameter tensor. For every (param group, device, dtype) bucket we allocate one
contiguous buffer for the parameters and one for their gradients, then make
``param.data`` and ``param.grad`` views into them. Autograd accumulates gradients in
place into an existing ``.grad`` (and so does a ``torch.compile``-d model), so after
``backward()`` the gradient buffer already holds every gradient: no copy is needed.

What can break the aliasing, and what we do:

* ``zero_grad(set_to_none=True)`` elsewhere (e.g. ``model.zero_grad()``) sets ``.grad`` to
  None; backward then allocates a fresh tensor. :meth:`FlatBuffer.gather_grads` copies such
  a gradient into the buffer and re-points ``.grad`` at the view (a slow path, correct),
  after checking it (a sparse one, from ``nn.Embedding(sparse=True)``, is a clear error);
  ``ELRA.zero_grad`` instead zeroes the buffer in one fill and keeps the views (and puts
  them back where ``.grad`` is None or such a tensor).
* A parameter without gradient this step (unused branch): its slice of the gradient buffer
  is zeroed so the kernels see G = 0, and it is reported so the optimizer can keep its
  value (the reference optimizer skips such parameters). "Without gradient" is torch's
  ``.grad is None``; since ``ELRA.zero_grad()`` keeps the views, a buffer whose group
  decays (wd != 1, the only case where the two differ) also tracks which parameters
  backward touched since the last ``zero_grad(set_to_none=True)``
  (:meth:`FlatBuffer.track_touched`: one post-accumulate-grad hook per parameter, which
  sets a byte); an untouched one counts as grad None although its view stayed.
* A parameter moved or re-allocated after the optimizer was built (``model.to(...)``,
  ``model.half()``, ``load_state_dict(..., assign=True)``): it no longer lives in the
  buffer, so updating the buffer would silently train a copy. :meth:`FlatBuffer.check`
  raises instead.

Frozen parameters (``requires_grad=False``) are left out of the buffers entirely.

Each view keeps its parameter's memory format: a dense tensor with permuted strides (a
``channels_last`` conv weight) gets a view with the same strides over its slice (its
elements in memory order), so ``is_contiguous(memory_format=torch.channels_last)`` still
holds and autograd's gradients, which follow the parameter's strides, land in place.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .checks import ParameterMovedError, check_grad, is_dense

__all__ = ["FlatBuffer", "ParameterMovedError", "build_flat_buffers", "check_gradient"]


@dataclass
class FlatBuffer:
    """Parameters of one (group, device, dtype) bucket laid end to end.

    Attributes:
        group_index: index of the param group (its ``wd`` applies to the whole buffer).
        params: the parameters, in order.
        offsets: element offset of each parameter in ``data`` / ``grad``.
        data: 1-D buffer; ``params[i].data`` is a view of it.
        grad: 1-D buffer; ``params[i].grad`` is (normally) a view of it.
        names: how errors name each parameter.
        strides: each parameter's strides within its slice (:func:`dense_strides`).
        touched: per parameter, 1 if it has a gradient in torch's sense (``.grad`` not
            None): whether it had one when the buffer was built, then, once
            :meth:`track_touched` runs, whether backward reached it since the last
            ``zero_grad(set_to_none=True)``. Only read while tracking.
        hooks: the post-accumulate-grad hooks that keep ``touched`` (empty: not tracking).
    """

    group_index: int
    params: list[torch.Tensor]
    offsets: list[int]
    data: torch.Tensor
    grad: torch.Tensor
    names: list[str] = field(default_factory=list)
    strides: list[tuple[int, ...]] = field(default_factory=list)
    touched: bytearray = field(default_factory=bytearray)
    hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.touched) != len(self.params):
            self.touched = bytearray(b"\x01" * len(self.params))

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def tracking(self) -> bool:
        """Whether :attr:`touched` follows backward (:meth:`track_touched`)."""
        return bool(self.hooks)

    def track_touched(self, assume_touched: bool) -> None:
        """From now on, record which parameters backward reaches: one
        post-accumulate-grad hook per parameter (it runs after autograd wrote ``.grad``
        and sets the parameter's byte in :attr:`touched`; ~1 us per parameter and
        backward). ``assume_touched``: what is known of the time before (True: nothing,
        so every parameter counts as having a gradient until the next
        ``zero_grad(set_to_none=True)``; False: :attr:`touched` is still as built). The
        hooks are removed when the buffer is released."""
        if self.hooks:
            return
        touched = self.touched
        if assume_touched:
            touched[:] = b"\x01" * len(touched)

        def hook_for(index: int) -> Callable[[torch.Tensor], None]:
            def mark(_param: torch.Tensor) -> None:
                touched[index] = 1

            return mark

        self.hooks = [
            param.register_post_accumulate_grad_hook(hook_for(index))
            for index, param in enumerate(self.params)
        ]
        weakref.finalize(self, _remove_hooks, self.hooks)

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """The slice of ``flat`` that belongs to ``params[index]``, shaped (and strided)
        like it."""
        param = self.params[index]
        start = self.offsets[index]
        return flat.as_strided(param.shape, self.strides[index], flat.storage_offset() + start)

    def check(self) -> None:
        """Raise :class:`ParameterMovedError` if a parameter left the buffer."""
        base = self.data.data_ptr()
        itemsize = self.data.element_size()
        for index, param in enumerate(self.params):
            expected = base + self.offsets[index] * itemsize
            if (
                param.device != self.data.device
                or param.dtype != self.data.dtype
                or (param.data_ptr() != expected and param.numel() > 0)  # empty: no address
            ):
                raise ParameterMovedError(
                    f"ELRA: {self.names[index]} was moved or re-allocated after the optimizer "
                    f"was built (now {param.dtype} on {param.device}); its updates would be "
                    "lost. Move or cast the model first, then build the optimizer (or load "
                    "state without assign=True)."
                )

    def gather_grads(self) -> list[int]:
        """Make every gradient live in ``self.grad``; return indices without a gradient.

        Gradients that are already views of the buffer cost nothing. A gradient that
        autograd allocated elsewhere is copied in and ``.grad`` re-pointed at the view.
        A missing gradient becomes zeros in the buffer (G = 0 for that parameter). While
        :attr:`tracking`, a view that backward did not reach since the last
        ``zero_grad(set_to_none=True)`` is reported too, and left as it is (zero after
        that fill; a gradient written into it by hand stays, for the caller to judge).

        Every gradient allocated elsewhere is checked (:func:`check_gradient`) before the
        buffer changes: a sparse one (``nn.Embedding(sparse=True)`` after
        ``model.zero_grad()``) has no data pointer to compare, and copying a complex or
        misshapen one would fail half way or broadcast.
        """
        missing: list[int] = []
        absent: list[int] = []  # .grad is None: zeroed below
        elsewhere: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # copied in below
        base = self.grad.data_ptr()
        itemsize = self.grad.element_size()
        touched = self.touched if self.hooks else None
        strided = torch.strided
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                absent.append(index)
                missing.append(index)
                continue
            # The layout first: only a strided tensor has a data pointer to compare.
            if grad.layout == strided and (
                grad.data_ptr() == base + self.offsets[index] * itemsize or param.numel() == 0
            ):
                if touched is not None and not touched[index] and param.numel() > 0:
                    missing.append(index)
                continue
            check_gradient(self.names[index], param, grad)
            elsewhere.append((index, param, grad))
        for index in absent:
            self.view(self.grad, index).zero_()
        for index, param, grad in elsewhere:
            target = self.view(self.grad, index)
            target.copy_(grad)
            param.grad = target
        return missing

    def zero_grad(self, set_to_none: bool = False) -> None:
        """One fill over the whole gradient buffer; the ``.grad`` views stay valid.
        ``set_to_none``: the parameters count as having no gradient until backward
        reaches them (:attr:`touched`, read while :attr:`tracking`).

        Every ``.grad`` is a view of the buffer afterwards: one that is None, and one
        autograd allocated elsewhere (``model.zero_grad()`` set it to None before a
        backward) or a sparse one that :meth:`gather_grads` refused. Left in place, such
        a gradient would keep its values, and the next backward would add to them.
        """
        flat = self.grad
        flat.zero_()
        for index, param in enumerate(self.params):
            grad = param.grad
            # Every view this buffer hands out (here, in gather_grads, a swapping store's)
            # is cut from ``self.grad`` itself; the test is half the cost of comparing
            # data pointers, and sparse tensors have none.
            if grad is None or grad._base is not flat:
                param.grad = self.view(flat, index)
        if set_to_none and self.hooks:
            self.touched[:] = bytes(len(self.touched))


def check_gradient(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Whether a flat buffer can take ``grad`` (allocated outside it) as ``param``'s
    gradient, else the clear error that names the parameter; changes nothing.

    The checks every layout shares (:func:`elra_fused.checks.check_grad`: layout,
    complex, shape, device), then what copying into the buffer needs: a floating dtype
    (another one is cast by the copy, as the per-parameter layout does).
    """
    check_grad(name, param, grad)
    if not grad.is_floating_point():
        raise ValueError(
            f"ELRA: {name} has a gradient of dtype {grad.dtype}; ELRA needs floating-point "
            "gradients"
        )


def _remove_hooks(hooks: list) -> None:
    for handle in hooks:
        handle.remove()


def dense_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s strides if it is dense (:func:`elra_fused.checks.is_dense`: contiguous,
    channels_last or any other permutation of the dimensions), else the contiguous
    strides of its shape (an overlapping or gapped view is laid out anew)."""
    if is_dense(tensor):
        return tensor.stride()
    return torch.empty(tensor.shape, device="meta").stride()


def build_flat_buffers(
    param_groups: list[dict],
    describe: Callable[[int, int, torch.Tensor], str] | None = None,
    group_offset: int = 0,
) -> list[FlatBuffer]:
    """Move the trainable parameters of each group into flat buffers.

    Parameters are bucketed by (group, device, dtype), keeping their order; existing
    values and gradients are copied in. ``describe(group_index, param_index, param)``
    names a parameter in error messages; ``group_offset`` is the index of the first
    group in the optimizer's list.
    """
    buffers: list[FlatBuffer] = []
    for group_index, group in enumerate(param_groups, start=group_offset):
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
        for param_index, param in enumerate(group["params"]):
            if not param.requires_grad:
                continue
            buckets.setdefault((param.device, param.dtype), []).append((param_index, param))
        for (device, dtype), members in buckets.items():
            offsets: list[int] = []
            total = 0
            for _, param in members:
                offsets.append(total)
                total += param.numel()
            data = torch.empty(total, dtype=dtype, device=device)
            grad = torch.zeros(total, dtype=dtype, device=device)
            names = []
            params = []
            strides = []
            had_grad = bytearray()
            for (param_index, param), start in zip(members, offsets, strict=True):
                had_grad.append(param.grad is not None)
                stride = dense_strides(param)
                data_view = data.as_strided(param.shape, stride, start)
                grad_view = grad.as_strided(param.shape, stride, start)
                with torch.no_grad():
                    data_view.copy_(param.detach())
                    if param.grad is not None and not param.grad.is_sparse:
                        grad_view.copy_(param.grad.detach())
                param.data = data_view
                param.grad = grad_view
                params.append(param)
                strides.append(stride)
                names.append(
                    describe(group_index, param_index, param)
                    if describe
                    else f"parameter {param_index} of param group {group_index}"
                )
            buffers.append(
                FlatBuffer(group_index, params, offsets, data, grad, names, strides, had_grad)
            )
    return buffers
