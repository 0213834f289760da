"""The tensors of a cached object, its size, and whole-object moves between devices.

A cached object is an ``nn.Module`` (its parameters and buffers), a ``dict`` of tensors (a LoRA,
an embedding), or anything else (a tokenizer, a scheduler: no tensors, size 0).

Moves keep every tensor of an object as a view of ONE flat uint8 buffer. Moving then costs one
large copy instead of hundreds of small ones, and the host side of the copy can be a pinned
buffer kept from one move to the next (pinning memory is slow; copying from pinned memory runs
at the bus's speed). A move allocates the destination first and rebinds the tensors only after
the copy finished, so an out-of-memory error leaves the object whole where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelbus.services.load.pinned import PinnedPool

ALIGN = 64
_REPACK_BELOW = 0.75  # repack when less than this share of the old buffer is still in use

Setter = Callable[[torch.Tensor], None]


@dataclass
class Slot:
    """One distinct tensor of an object and every place that refers to it."""

    tensor: torch.Tensor
    setters: list[Setter] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _param_setter(param: torch.nn.Parameter) -> Setter:
    def set_(value: torch.Tensor) -> None:
        param.data = value  # keeps the Parameter object: tied weights follow

    return set_


def _buffer_setter(module: torch.nn.Module, name: str) -> Setter:
    def set_(value: torch.Tensor) -> None:
        module._buffers[name] = value

    return set_


def _item_setter(mapping: dict[Any, Any], key: Any) -> Setter:
    def set_(value: torch.Tensor) -> None:
        mapping[key] = value

    return set_


def tensor_slots(obj: Any) -> list[Slot]:
    """Every distinct tensor of ``obj`` (shared ones once, with all their setters)."""
    # keyed by the id of an object the module holds (a Parameter, a buffer): ``p.data`` is a fresh alias
    # at every access, whose id may be reused by the next one once it is freed (two slots merged)
    by_id: dict[int, Slot] = {}
    if isinstance(obj, torch.nn.Module):
        for module in obj.modules():
            for p in module._parameters.values():
                if p is not None and id(p) not in by_id:  # a tied weight is one Parameter in two modules
                    by_id[id(p)] = Slot(p.data, [_param_setter(p)])
            for name, b in module._buffers.items():
                if b is not None:
                    by_id.setdefault(id(b), Slot(b)).setters.append(_buffer_setter(module, name))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                by_id.setdefault(id(value), Slot(value)).setters.append(_item_setter(obj, key))
    return list(by_id.values())


def object_nbytes(obj: Any) -> int:
    """Bytes held by the object's parameters and buffers (or dict tensors)."""
    return sum(s.nbytes for s in tensor_slots(obj))


def object_device(obj: Any) -> torch.device | None:
    """The device of the object's first tensor; None when it has none."""
    slots = tensor_slots(obj)
    return slots[0].tensor.device if slots else None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    n = like.numel() * like.element_size()
    return buffer[offset:offset + n].view(like.dtype).view(like.shape)


def _offset_in(buffer: torch.Tensor | None, t: torch.Tensor) -> int | None:
    """Where ``t`` sits in ``buffer``, when it is a contiguous view of it."""
    if buffer is None or t.device != buffer.device or not t.is_contiguous():
        return None
    off = t.data_ptr() - buffer.data_ptr()
    if off < 0 or off + t.numel() * t.element_size() > buffer.numel():
        return None
    return off


@dataclass
class Layout:
    """Where each slot goes in the destination buffer, and whether the old buffer copies whole."""

    size: int
    copy_whole: bool
    places: list[tuple[Slot, int, bool]]  # slot, offset, inside the old buffer


def plan_layout(slots: list[Slot], buffer: torch.Tensor | None) -> Layout:
    inside = [(s, _offset_in(buffer, s.tensor)) for s in slots]
    used = sum(s.nbytes for s, off in inside if off is not None)
    if buffer is not None and used >= _REPACK_BELOW * buffer.numel():
        cursor = buffer.numel()  # no growth when nothing is loose: a kept RAM copy stays reusable
        places: list[tuple[Slot, int, bool]] = []
        for s, off in inside:
            if off is not None:
                places.append((s, off, True))
            else:
                cursor = _align(cursor)
                places.append((s, cursor, False))
                cursor += s.nbytes
        return Layout(max(cursor, 1), True, places)
    cursor = 0
    places = []
    for s in slots:
        places.append((s, cursor, False))
        cursor = _align(cursor + s.nbytes)
    return Layout(max(cursor, 1), False, places)


def allocate(size: int, device: torch.device, pin: bool, pool: PinnedPool | None = None) -> torch.Tensor:
    """A uint8 buffer; pinned host memory when asked: a piece of ``pool`` when it has room, else
    freshly pinned (falls back to pageable if pinning fails)."""
    if device.type == "cpu" and pin:
        piece = pool.take(size) if pool is not None else None
        if piece is not None:
            return piece
        try:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass  # pinned memory is a speed-up, never a requirement
    return torch.empty(size, dtype=torch.uint8, device=device)


def _synchronize(*devices: torch.device) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.current_stream(d).synchronize()


def move_object(obj: Any, buffer: torch.Tensor | None, dst: torch.device, *,
                reuse: torch.Tensor | None = None, pin: bool = False,
                pool: PinnedPool | None = None) -> torch.Tensor | None:
    """Move every tensor of ``obj`` into one buffer on ``dst`` and return that buffer.

    ``buffer`` is the object's current flat buffer (None: unknown, pack it now). ``reuse`` is a
    buffer on ``dst`` to copy into when it has the right size (the kept pinned RAM copy); ``pool``
    gives pinned host memory for a new RAM buffer.
    Raises the allocator's error (e.g. ``torch.OutOfMemoryError``) before changing anything.

    When the object still lies whole in ``buffer`` (the usual case), the copy of the whole buffer
    is queued first and the walk over the object's tensors runs while the copy engine works.
    """
    early: torch.Tensor | None = None
    if buffer is not None and buffer.device != dst:
        early = reuse if reuse is not None and reuse.numel() == buffer.numel() and reuse.device == dst \
            else allocate(buffer.numel(), dst, pin, pool)
        early.copy_(buffer, non_blocking=True)
    slots = tensor_slots(obj)
    if not slots:
        return None
    layout = plan_layout(slots, buffer)
    if early is not None and layout.copy_whole and layout.size == early.numel():
        target = early
        todo = [(slot, off) for slot, off, inside in layout.places if not inside]
    else:
        if early is not None:
            _synchronize(dst, buffer.device if buffer is not None else dst)  # let the early copy finish
        if reuse is not None and reuse.numel() == layout.size and reuse.device == dst:
            target = reuse
        else:
            target = allocate(layout.size, dst, pin, pool)
        if layout.copy_whole and buffer is not None:
            target[:buffer.numel()].copy_(buffer, non_blocking=True)
        todo = [(slot, off) for slot, off, inside in layout.places if not inside]
    src_devices = {s.tensor.device for s in slots}
    for slot, off in todo:
        _view(target, off, slot.tensor).copy_(slot.tensor, non_blocking=True)
    views = [(slot, _view(target, off, slot.tensor)) for slot, off, _inside in layout.places]
    if dst.type == "cpu" or any(d.type != "cpu" for d in src_devices):
        # the host must see finished data before rebinding; a host -> device move needs no wait:
        # later work on the device's stream runs after the copy, and the host side stays alive (the
        # kept RAM copy; pinned pieces are reused only after the device drained)
        _synchronize(dst, *src_devices)
    for slot, view in views:
        for set_ in slot.setters:
            set_(view)
    return target


def flat_buffer_of(obj: Any, candidate: torch.Tensor | None) -> torch.Tensor | None:
    """``candidate`` when every tensor of ``obj`` lies inside it, else None."""
    if candidate is None:
        return None
    slots = tensor_slots(obj)
    return candidate if slots and all(_offset_in(candidate, s.tensor) is not None for s in slots) else None


def nbytes_of_shape(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
