"""Partial VRAM loading: a model streamed block by block gives the fully resident model's output.

The streaming code runs the same on the CPU (plain copies instead of a side stream), so these tests
check its correctness here: outputs equal to the resident model's at several budgets, over several
forward passes, blocks run out of order, weights back at their host copies outside a forward.
Its speed is measured on a GPU by tests/bench/bench_partial.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from modelbus.services.load.streaming import attach, find_blocks, plan_resident
from modelbus.services.load.tensors import move_object, tensor_slots


def _flux() -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=3, num_single_layers=5,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8)).eval()
    model.requires_grad_(False)
    move_object(model, None, torch.device("cpu"))  # one flat host buffer, as the cache holds it
    tokens, text = 12, 5
    inputs = {"hidden_states": torch.randn(1, tokens, 16), "encoder_hidden_states": torch.randn(1, text, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": torch.randn(tokens, 3), "txt_ids": torch.zeros(text, 3), "guidance": torch.tensor([3.5])}
    return model, inputs


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75])
def test_streamed_output_equals_the_resident_output(share: float) -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    size = sum(s.nbytes for s in tensor_slots(model))
    blocks = find_blocks(model)
    assert len(blocks) == 8
    largest = max(sum(s.nbytes for s in tensor_slots(b)) for b in blocks)
    rest = size - sum(sum(s.nbytes for s in tensor_slots(b)) for b in blocks)
    host = {id(p): p.data.data_ptr() for p in model.parameters()}
    handle = attach(model, torch.device("cpu"), rest + 2 * (largest + 4096) + int(share * (size - rest)))
    assert handle.streamed, "some blocks must stream"
    assert handle.resident_bytes + handle.streamed_bytes == size
    assert handle.resident_bytes <= rest + share * (size - rest) + 1
    for _ in range(3):  # the prefetch ring wraps from one pass into the next
        assert torch.equal(_run(model, inputs), expected)
    streamed_params = {id(p) for b in handle.streamed for p in b.module.parameters()}
    assert all(p.data.data_ptr() == host[id(p)] for p in model.parameters() if id(p) in streamed_params)
    handle.detach()
    assert all(p.data.data_ptr() == host[id(p)] for p in model.parameters())
    assert torch.equal(_run(model, inputs), expected)
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)


class _Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))
        self.order = list(range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for i in self.order:
            x = torch.tanh(self.blocks[i](x))
        return x


def test_blocks_run_out_of_order_or_skipped_still_get_their_own_weights() -> None:
    model = _Stack().eval()
    move_object(model, None, torch.device("cpu"))
    x = torch.randn(3, 8)
    orders = [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 2, 4], [1, 1, 3, 3, 0], [0, 1, 2, 3, 4, 5]]
    expected = []
    for order in orders:
        model.order = order
        expected.append(_run_plain(model, x))
    one = sum(s.nbytes for s in tensor_slots(model.blocks[0]))
    handle = attach(model, torch.device("cpu"), sum(s.nbytes for s in tensor_slots(model.inp)) + 2 * (one + 64))
    assert len(handle.streamed) >= 4
    for order, want in zip(orders, expected, strict=True):
        model.order = order
        assert torch.equal(_run_plain(model, x), want), order
    handle.detach()


def _run_plain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)  # type: ignore[no-any-return]


def test_plan_spreads_resident_blocks_and_keeps_within_room() -> None:
    sizes = [10] * 8
    keep = plan_resident(sizes, 40)
    assert sum(keep) == 4 and keep != [True] * 4 + [False] * 4  # interleaved, not the first half
    assert plan_resident(sizes, 1000) == [True] * 8
    assert plan_resident(sizes, 0) == [False] * 8
    assert sum(s for s, k in zip([30, 10, 10, 30], plan_resident([30, 10, 10, 30], 45), strict=True) if k) <= 45


def test_a_budget_without_room_for_the_staging_is_refused() -> None:
    model, _ = _flux()
    with pytest.raises(MemoryError, match="VRAM budget"):
        attach(model, torch.device("cpu"), 1024)
