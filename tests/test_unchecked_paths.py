"""What the kernels do with indices that were not range-checked (CUDA under
torch.compile or graph capture skips the host-syncing checks): they poison
the affected rows with NaN, never read out of bounds, never device-assert.
The row formulas are covered by tests/cpp/test_numerics.cpp; this file covers
the binding-layer parts reachable on the CPU."""
import math

import torch

import fusedloss  # noqa: F401  (loads the extension: registers torch.ops.fusedloss)

ops = torch.ops.fusedloss


def test_symmetric_backward_with_an_out_of_range_positive_poisons_instead_of_asserting():
    torch.manual_seed(0)
    rows, cols = torch.randn(4, 3), torch.randn(4, 3)
    scale = torch.tensor(2.0)
    good = torch.arange(4)
    loss, row_lse, col_lse = ops.contrastive_forward(rows, cols, good, scale, None, None, None, [], [], True, 0)
    bad = good.clone()
    bad[1] = 9  # what the forward would have made a NaN row on CUDA
    grads = ops.contrastive_backward(torch.ones(4), rows, cols, bad, scale, None, None, row_lse, col_lse, None, [], [], True, 0,
                                     [True, True, False])
    assert torch.isnan(grads[0]).any() and torch.isnan(grads[1]).any()
    clean = ops.contrastive_backward(torch.ones(4), rows, cols, good, scale, None, None, row_lse, col_lse, None, [], [], True, 0,
                                     [True, True, False])
    assert all(torch.isfinite(g).all() for g in clean[:2])
    assert not math.isnan(loss.sum().item())
