"""Partial VRAM loading: a model larger than the VRAM budget runs with part of its blocks resident
and the rest streamed from pinned host memory, block by block, during the forward pass.

The rule this module keeps: outside a block's own forward, every weight of the model points where
it lives (resident ones at their device copy, streamed ones at their host copy); inside it, the
block's weights are device copies that are complete before any of its kernels run.

- Blocks are the children of the model's top-level ``nn.ModuleList``/``nn.Sequential`` stacks
  (FLUX's ``transformer_blocks`` and ``single_transformer_blocks``, a UNet's down/up blocks), as
  diffusers' block-level group offloading cuts them. Everything else (embedders, norms, a UNet's
  mid block) stays resident, and so do as many blocks as the budget leaves room for, spread evenly
  through the stack: the copy of the next streamed block then overlaps the compute of resident ones.
- Streamed blocks cycle through ``SLOTS`` device staging buffers, each the size of the largest
  streamed block. While block *k* runs, the copies of the next ones go on a side stream into the
  slots of blocks already finished (each slot waits for an event recorded after its last user's
  kernels); the compute stream waits for a block's copy event before the block runs. The prefetch
  wraps from the last block to the first, so the next forward pass starts with its first blocks
  already on the device.
- Blocks entered in another order than the stack's (a model that skips one) are still right: the
  stream drains and the block is copied there and then.
- For inference: weights inside a streamed block are reused buffers, so autograd must not keep them.

``attach`` returns a :class:`Streamed` handle; ``detach`` puts every weight back at its host copy
and frees the device memory. Without CUDA the same code runs with plain copies (for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modelbus.services.load.tensors import ALIGN, Slot, tensor_slots

SLOTS = 2


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    n = like.numel() * like.element_size()
    return buffer[offset:offset + n].view(like.dtype).view(like.shape)


def find_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's blocks in definition order (children of its top-level module stacks)."""
    blocks: list[torch.nn.Module] = []
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks.extend(child.children())
    return blocks


def _key(t: torch.Tensor) -> tuple[int, int, str]:
    return t.data_ptr(), t.numel() * t.element_size(), str(t.device)


@dataclass
class _Block:
    module: torch.nn.Module
    slots: list[Slot]
    nbytes: int
    offsets: list[int] = field(default_factory=list)   # each tensor's place in a staging slot
    host: list[torch.Tensor] = field(default_factory=list)
    views: list[list[torch.Tensor]] = field(default_factory=list)  # per staging slot
    index: int = -1  # position among the streamed blocks; -1: resident

    def bind(self, tensors: list[torch.Tensor]) -> None:
        for slot, t in zip(self.slots, tensors, strict=True):
            for set_ in slot.setters:
                set_(t)


def _slot_size(b: _Block) -> int:
    return sum(_align(s.nbytes) for s in b.slots)


def plan_resident(sizes: list[int], room: int) -> list[bool]:
    """Which blocks stay resident within ``room`` bytes, spread evenly through the stack."""
    total = sum(sizes)
    if total <= 0 or room >= total:
        return [True] * len(sizes)
    share = max(room, 0) / total
    chosen, credit, left = [], 0.0, room
    for size in sizes:
        credit += size * share
        keep = credit >= size * 0.999 and size <= left
        if keep:
            credit -= size
            left -= size
        chosen.append(keep)
    return chosen


class Streamed:
    """A model attached for streaming (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, budget: int) -> None:
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        blocks = [_Block(m, s, sum(x.nbytes for x in s)) for m in find_blocks(model) for s in [tensor_slots(m)]]
        everywhere = {_key(s.tensor): len(s.setters) for s in tensor_slots(model)}
        blocks_of: dict[tuple[int, int, str], int] = {}
        setters_in_blocks: dict[tuple[int, int, str], int] = {}
        for b in blocks:
            for s in b.slots:
                k = _key(s.tensor)
                blocks_of[k] = blocks_of.get(k, 0) + 1
                setters_in_blocks[k] = setters_in_blocks.get(k, 0) + len(s.setters)
        # a weight that a block shares with another block or with the rest stays resident, block and all
        owned = {k for k, n in blocks_of.items() if n == 1 and setters_in_blocks[k] == everywhere.get(k)}
        candidates = [b for b in blocks if all(_key(s.tensor) in owned for s in b.slots)]
        streamable = {_key(s.tensor) for b in candidates for s in b.slots}
        rest = [s for s in tensor_slots(model) if _key(s.tensor) not in streamable]
        rest_bytes = sum(s.nbytes for s in rest)
        largest = max((_slot_size(b) for b in candidates), default=0)
        room = budget - rest_bytes - SLOTS * largest
        keep = plan_resident([b.nbytes for b in candidates], room)
        if not all(keep) and room < 0:
            raise MemoryError(f"the VRAM budget ({budget} bytes) holds neither the model's non-block weights "
                              f"({rest_bytes} bytes) nor {SLOTS} staging slots of its largest block ({largest} bytes)")
        self.streamed = [b for b, k in zip(candidates, keep, strict=True) if not k]
        self.order = blocks
        streamed_keys = {_key(s.tensor) for b in self.streamed for s in b.slots}
        unique = [s for s in tensor_slots(model) if _key(s.tensor) not in streamed_keys]
        self._resident_slots = unique
        self._resident_host = [s.tensor for s in unique]
        offsets, cursor = [], 0
        for s in unique:
            offsets.append(cursor)
            cursor = _align(cursor + s.nbytes)
        self.resident_buffer = torch.empty(max(cursor, 1), dtype=torch.uint8, device=self.device)
        for s, off in zip(unique, offsets, strict=True):
            view = _view(self.resident_buffer, off, s.tensor)
            view.copy_(s.tensor, non_blocking=True)
            for set_ in s.setters:
                set_(view)
        self.resident_bytes = sum(s.nbytes for s in unique)
        self.streamed_bytes = sum(b.nbytes for b in self.streamed)
        slot_bytes = max((_slot_size(b) for b in self.streamed), default=0)
        nslots = min(SLOTS, len(self.streamed))
        self.staging = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(nslots)]
        self.staging_bytes = slot_bytes * nslots
        for i, b in enumerate(self.streamed):
            b.index = i
            b.host = [s.tensor for s in b.slots]
            cursor = 0
            for s in b.slots:
                b.offsets.append(cursor)
                cursor = _align(cursor + s.nbytes)
            b.views = [[_view(buf, off, t) for off, t in zip(b.offsets, b.host, strict=True)] for buf in self.staging]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._copied: list[Any] = [None] * nslots   # event: the slot holds its block
        self._freed: list[Any] = [None] * nslots    # event: the slot's last user finished
        self._issued = 0     # virtual index (pass * blocks + block) of the next copy to queue
        self._consumed = 0   # streamed blocks run so far
        self._hooks = []
        position = {id(b.module): b for b in blocks}
        for b in blocks:
            self._hooks.append(b.module.register_forward_pre_hook(self._make_pre(position[id(b.module)])))
        for b in self.streamed:
            self._hooks.append(b.module.register_forward_hook(self._make_post(b)))
        self._prefetch()

    # ---- copies -------------------------------------------------------------------------------
    def _issue(self, virtual: int) -> None:
        b = self.streamed[virtual % len(self.streamed)]
        slot = virtual % len(self.staging)
        if self.copy_stream is None:
            for view, host in zip(b.views[slot], b.host, strict=True):
                view.copy_(host)
            return
        with torch.cuda.stream(self.copy_stream):
            if self._freed[slot] is not None:
                self.copy_stream.wait_event(self._freed[slot])
            for view, host in zip(b.views[slot], b.host, strict=True):
                view.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._copied[slot] = event

    def _prefetch(self) -> None:
        if not self.streamed:
            return
        while self._issued < self._consumed + len(self.staging):
            self._issue(self._issued)
            self._issued += 1

    # ---- hooks --------------------------------------------------------------------------------
    def _make_pre(self, block: _Block) -> Any:
        def pre(_module: torch.nn.Module, _args: Any) -> None:
            if block.index >= 0:
                self._enter(block)
            self._prefetch()
        return pre

    def _make_post(self, block: _Block) -> Any:
        def post(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            slot = self._consumed % len(self.staging)
            block.bind(block.host)
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self._freed[slot] = event
            self._consumed += 1
            self._prefetch()
        return post

    def _enter(self, block: _Block) -> None:
        if self._consumed % len(self.streamed) != block.index:
            self._resync(block.index)
        slot = self._consumed % len(self.staging)
        if self.cuda and self._copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        block.bind(block.views[slot])

    def _resync(self, index: int) -> None:
        """The model ran blocks out of the stack's order: drain, and restart the ring at ``index``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        rounds = self._consumed // len(self.streamed) + 1
        self._consumed = rounds * len(self.streamed) + index
        self._issued = self._consumed
        self._copied = [None] * len(self.staging)
        self._freed = [None] * len(self.staging)
        self._prefetch()

    # ---- end ----------------------------------------------------------------------------------
    def detach(self) -> None:
        """Every weight back at its host copy; hooks removed; device memory released."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for s, host in zip(self._resident_slots, self._resident_host, strict=True):
            for set_ in s.setters:
                set_(host)
        for b in self.streamed:
            b.bind(b.host)
            b.views = []
        self.staging = []
        self.resident_buffer = torch.empty(0, dtype=torch.uint8)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.staging_bytes


def attach(model: torch.nn.Module, device: torch.device, budget: int) -> Streamed:
    """Stream ``model`` on ``device`` within ``budget`` bytes of device memory (resident + staging)."""
    return Streamed(model, device, budget)
