"""Plain-torch reference kernels: the oracle every fused backend is checked against.

The optimizer's per-step work is two vector passes over the parameters (DESIGN.md,
"Kernels"). These functions define those passes exactly, in float64 math, for one
(flat or not) tensor at a time; the tensor-list ops apply them per element
(:mod:`elra_fused.ops.lists`). Fused backends (``cpp``, ``triton``) implement every op of
:data:`elra_fused.ops.OP_NAMES` with the same arguments and must agree with these to dtype
tolerance.

Coefficient tensors are small float64 device tensors so that no Python float ever has
to be read back from the device (the control law writes them, the kernels read them).

``update`` coefficients, ``coeffs = [accept, decay, step, back]``:

* standard mode (``grad_prev`` kept):
    accept != 0:  x <- decay * x - step * grad ;  grad_prev <- grad
    accept == 0:  x <- x + back * grad_prev     ;  grad_prev unchanged
* recover mode (``x_prev`` kept instead of ``grad_prev``, paper section 3.6):
    accept != 0:  x_prev <- x ;  x <- decay * x - step * grad
    accept == 0:  x <- x + back * (decay * x_prev - x) ;  x_prev unchanged
    (formed from the nearer end: for back >= 1/2 as decay * x_prev - (1 - back) *
    (decay * x_prev - x), so that a full return, back = 1, gives decay * x_prev exactly:
    x_prev itself when decay = 1, even after a huge step)

* swap mode (standard mode whose caller swaps the roles of the ``grad`` and ``grad_prev``
  buffers after every step, so that G_t becomes G_{t-1} without being copied):
    accept != 0:  x <- decay * x - step * grad ;  grad, grad_prev unchanged
    accept == 0:  x <- x + back * grad_prev ;  grad <- grad_prev (G_{t-1} is kept)

``back`` is a length along G_{t-1} in standard mode (alpha_{t-1} - alpha_t) but a fraction
of the last step in recover mode (1 - alpha_t / alpha_{t-1}), since there the direction
is decay * x_prev - x = alpha_{t-1} G_{t-1}. The optimizer forms both from the control
law's ``Decision.back``.

On a retrace (accept == 0) ``grad`` is never read, so a non-finite gradient cannot leak
into the weights.

``dots_recover`` coefficients, ``coeffs = [decay, inv_alpha_prev]``: the previous
gradient is recovered per element as ``G_prev_i = (decay * x_prev_i - x_i) * inv_alpha_prev``
(paper section 3.6) -- never as a difference of two large dot products, which cancels
catastrophically in float32.
"""

from __future__ import annotations

import torch

#: Indices into the ``update`` coefficient vector.
COEF_ACCEPT, COEF_DECAY, COEF_STEP, COEF_BACK = 0, 1, 2, 3
UPDATE_COEFFS_LEN = 4
#: Indices into the ``dots_recover`` coefficient vector.
RCOEF_DECAY, RCOEF_INV_ALPHA_PREV = 0, 1
RECOVER_COEFFS_LEN = 2


def dots(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    """Return float64 ``[<G, G>, <G_prev, G>]`` computed in float64."""
    g = grad.detach().reshape(-1).double()
    gp = grad_prev.detach().reshape(-1).double()
    return torch.stack([torch.dot(g, g), torch.dot(gp, g)])


def dots_recover(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """Return float64 ``[<G, G>, <G_prev, G>]`` with ``G_prev`` recovered from points.

    ``G_prev_i = (coeffs[0] * x_prev_i - x_i) * coeffs[1]``.
    """
    c = coeffs.double()
    g = grad.detach().reshape(-1).double()
    gp = c[RCOEF_DECAY] * x_prev.detach().reshape(-1).double() - x.detach().reshape(-1).double()
    gp = gp * c[RCOEF_INV_ALPHA_PREV]
    return torch.stack([torch.dot(g, g), torch.dot(gp, g)])


def _stepped_x(
    c: torch.Tensor, xd: torch.Tensor, gd: torch.Tensor, retraced: torch.Tensor
) -> torch.Tensor:
    """x after an accept (decay x - step G) or a retrace (``retraced``), float64.

    torch.where keeps the unselected branch out of the result, so a NaN gradient on a
    retrace never reaches x; both branches are computed (no host sync to choose one).
    """
    accepted = c[COEF_DECAY] * xd - c[COEF_STEP] * gd
    return torch.where(c[COEF_ACCEPT] != 0, accepted, retraced)


def _write(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)


def _standard_update(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor, swap: bool
) -> None:
    """Standard and swap mode share x's update; they differ in the buffer that receives
    ``where(accept, G, G_prev)``: ``grad_prev`` (G becomes the new G_{t-1}, unchanged on a
    retrace) or, in swap mode, ``grad`` (unchanged on accept, G_{t-1} on a retrace)."""
    c = coeffs.double()
    xd, gd, gpd = (t.detach().double() for t in (x, grad, grad_prev))
    accept = c[COEF_ACCEPT] != 0
    kept = grad if swap else grad_prev
    retraced = xd + c[COEF_BACK] * gpd
    _write([(x, _stepped_x(c, xd, gd, retraced)), (kept, torch.where(accept, gd, gpd))])


def update_(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """In place: accept step or retrace, standard mode (see module docstring)."""
    _standard_update(x, grad, grad_prev, coeffs, swap=False)


def update_swap_(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """In place: accept step or retrace, swap mode (see module docstring).

    The accept pass reads x and G and writes only x (12 bytes per fp32 element instead of
    16): the caller then lets the gradient buffer serve as G_{t-1}. On a retrace G_{t-1}
    is copied into the gradient buffer, so after the caller's swap it is still G_{t-1}.
    """
    _standard_update(x, grad, grad_prev, coeffs, swap=True)


def update_recover_(
    x: torch.Tensor, grad: torch.Tensor, x_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """In place: accept step or retrace, recover mode (see module docstring)."""
    c = coeffs.double()
    xd, gd, xpd = (t.detach().double() for t in (x, grad, x_prev))
    accept = c[COEF_ACCEPT] != 0
    decayed_prev = c[COEF_DECAY] * xpd
    direction = decayed_prev - xd  # = alpha_{t-1} G_{t-1}
    back = c[COEF_BACK]
    retraced = torch.where(
        back < 0.5, xd + back * direction, decayed_prev - (1.0 - back) * direction
    )
    _write([(x, _stepped_x(c, xd, gd, retraced)), (x_prev, torch.where(accept, xd, xpd))])
