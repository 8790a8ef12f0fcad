"""The ``torch.ops.fusedloss`` ops on the Python side, in one place.

Importing this module loads the compiled extension (``_extension``: prebuilt
``fusedloss._C`` or the JIT build), which defines the ops and their CPU / CUDA
kernels, and registers what torch needs besides: a fake (meta) kernel per op
for ``torch.compile`` and ``opcheck``, and the autograd formula of each forward
op (its backward is the matching ``*_backward`` op, which recomputes the chunks
or tiles against the saved statistics). The family modules (``linear_ce``,
``sampled``, ``contrastive``, ``distributed``) call the ops through ``ops``.
"""
import torch

from . import _common
from ._extension import C

ops = torch.ops.fusedloss

# The sampled op's enums, defined once in csrc/include/fusedloss/sampled.h.
SOFTMAX, NCE = C.SAMPLED_MODES["softmax"], C.SAMPLED_MODES["nce"]
HIT_NONE, HIT_ALL_COPIES, HIT_LAST_COPY = (C.HIT_MASKS[k] for k in ("none", "all_copies", "last_copy"))


def is_traced(t):
    """True under torch.compile / AOT autograd tracing (fake or functional tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t) or torch._is_functional_tensor(t)


def forbid_double_backward(fn, grad):
    """Raise from a backward asked to build a graph (``create_graph=True``, e.g.
    a gradient penalty): the fused backwards are not differentiable, and
    returning a gradient without a graph would silently drop the second-order
    term. Not while tracing (torch.compile reports double backward itself)."""
    if torch.is_grad_enabled() and not is_traced(grad):
        raise RuntimeError(
            f"fusedloss.{fn}: double backward (create_graph=True) is not supported; the fused backward is "
            "not differentiable. Differentiate the plain-PyTorch twin in fusedloss.reference instead."
        )


def _fake_grads(output_mask, input, weight, bias, weight_format=torch.preserve_format):
    """Fake (input, weight, bias) gradients of a backward op: an empty [0]
    tensor for each one not asked for (or a missing bias)."""
    grad_input = torch.empty_like(input) if output_mask[0] else input.new_empty(0)
    grad_weight = torch.empty_like(weight, memory_format=weight_format) if output_mask[1] else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if output_mask[2] and bias is not None else input.new_empty(0)
    return grad_input, grad_weight, grad_bias


def _register_recompute_autograd(op, backward_op, fn, num_tensors, grad_inputs, num_statistics=None,
                                  num_options=None):
    """Autograd of a forward op ``op(*tensors, *options) -> (loss, *statistics)``
    whose backward op takes ``(grad_loss, *tensors, *statistics, *options,
    output_mask)`` and returns the gradients of the inputs at positions
    ``grad_inputs`` (an empty tensor where the mask is False). The backward
    gets the first ``num_statistics`` statistics and ``num_options`` options
    (default: all); outputs besides the loss are not differentiable."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*inputs[:num_tensors], *output[1:][:num_statistics])
        ctx.options = inputs[num_tensors:][:num_options]

    def backward(ctx, grad_loss, *_grad_statistics):
        forbid_double_backward(fn, grad_loss)
        saved = ctx.saved_tensors
        mask = [ctx.needs_input_grad[i] and saved[i] is not None for i in grad_inputs]
        grads = backward_op(grad_loss, *saved, *ctx.options, mask)
        out = [None] * len(ctx.needs_input_grad)
        for i, wanted, grad in zip(grad_inputs, mask, grads):
            out[i] = grad if wanted else None
        return tuple(out)

    torch.library.register_autograd(f"fusedloss::{op}", backward, setup_context=setup_context)


def _is_unit(factor):
    """Whether an eager CPU upstream gradient is exactly 1 (``loss.backward()``),
    so scaling by it can be skipped: a pass over a weight-sized gradient (the
    value costs nothing to read on the CPU; on CUDA it would be a host sync)."""
    return factor.device.type == "cpu" and not is_traced(factor) and factor.numel() == 1 and bool(factor == 1)


def _scaled(grad, factor, in_place):
    """grad * factor; a sparse gradient keeps its coalesced flag (its values are
    scaled, the indices stay as they are)."""
    if in_place and _is_unit(factor):
        return grad
    if grad.is_sparse:
        grad._values().mul_(factor)
        return grad
    return grad.mul_(factor) if in_place else grad * factor


def _register_single_pass_autograd(op, fn, num_tensors, grad_inputs):
    """Autograd of a single-pass op ``op(*tensors, *options, output_mask) ->
    (loss_sum, *gradients, *statistics)`` that forms the gradients of the
    inputs at positions ``grad_inputs`` in its forward: the backward only
    scales them by the upstream gradient. Statistics (if any) are not
    differentiated."""
    num_grads = len(grad_inputs)

    def setup_context(ctx, inputs, output):
        grads = output[1:1 + num_grads]
        # The gradients are op outputs that only this node consumes; marking
        # them non-differentiable keeps them out of the graph (no reference cycle).
        ctx.mark_non_differentiable(*output[1:])
        # Otherwise autograd would hand backward zero-filled "gradients" of
        # those outputs: a transient buffer the size of the weight.
        ctx.set_materialize_grads(False)
        ctx.grads = grads
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.options = inputs[num_tensors:]

    def backward(ctx, grad_sum, *_unused):
        mask = ctx.options[-1]
        out = [None] * (num_tensors + len(ctx.options))
        if grad_sum is None:  # the loss itself was not differentiated
            return tuple(out)
        forbid_double_backward(fn, grad_sum)
        if ctx.grads is not None:
            # First backward: scale the forward's gradients in place and hand
            # them over, so no second copy exists (out of place when traced:
            # AOT autograd cannot partition a mutation of a forward output).
            grads, ctx.grads = ctx.grads, None
            in_place = not is_traced(grad_sum)
            grads = [_scaled(g, grad_sum, in_place) for g in grads]
        else:
            # A retained graph differentiated again: rerun the same single
            # pass, so that every backward is bit-identical (gradcheck's
            # reentrancy test).
            grads = getattr(ops, op)(*ctx.saved_tensors, *ctx.options)[1:1 + num_grads]
            grads = [_scaled(g, grad_sum, True) for g in grads]
        for i, wanted, grad in zip(grad_inputs, mask, grads):
            out[i] = grad if wanted else None
        return tuple(out)

    torch.library.register_autograd(f"fusedloss::{op}", backward, setup_context=setup_context)


# ------------------------------------------------------------ linear cross-entropy


def _linear_ce_statistics_fake(input, stats):
    """Fake lse [N], argmax [N] (int64) and entropy [N] ([0] without stats)."""
    rows = input.shape[0] if stats else 0
    acc = _common.acc_dtype(input.dtype)
    return input.new_empty(rows, dtype=acc), input.new_empty(rows, dtype=torch.int64), input.new_empty(rows, dtype=acc)


@torch.library.register_fake("fusedloss::linear_ce_forward")
def _linear_ce_forward_fake(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss,
                            softcap, chunk_size, stats=False):
    rows = input.shape[0]
    acc = _common.acc_dtype(input.dtype)
    _, argmax, entropy = _linear_ce_statistics_fake(input, stats)
    return input.new_empty(rows, dtype=acc), input.new_empty(2, rows, dtype=acc), argmax, entropy


@torch.library.register_fake("fusedloss::linear_ce_backward")
def _linear_ce_backward_fake(grad_loss, input, weight, target, bias, class_weight, lse, ignore_index,
                             label_smoothing, z_loss, softcap, chunk_size, output_mask, vocab_start=0,
                             num_classes=None):
    return _fake_grads(output_mask, input, weight, bias)


# (input, weight, target, bias, class_weight, *options, stats) -> (loss, lse, argmax, entropy); the backward
# takes lse and the options but stats; gradients of input, weight, bias.
_register_recompute_autograd("linear_ce_forward", ops.linear_ce_backward, "linear_cross_entropy", 5, (0, 1, 3),
                             num_statistics=1, num_options=5)


@torch.library.register_fake("fusedloss::linear_ce_sum_and_grad")
def _linear_ce_sum_and_grad_fake(input, weight, target, bias, class_weight, normalizer, ignore_index,
                                 label_smoothing, z_loss, softcap, row_block, memory_budget, stats, output_mask):
    return (input.new_empty((), dtype=_common.acc_dtype(input.dtype)), *_fake_grads(output_mask, input, weight, bias),
            *_linear_ce_statistics_fake(input, stats))


# (input, weight, target, bias, class_weight, normalizer, *options, stats, output_mask) ->
# (loss_sum, grad_input, grad_weight, grad_bias, lse, argmax, entropy).
_register_single_pass_autograd("linear_ce_sum_and_grad", "linear_cross_entropy", 6, (0, 1, 3))


@torch.library.register_fake("fusedloss::linear_ce_shard_forward")
def _linear_ce_shard_forward_fake(input, weight, target, bias, class_weight, ignore_index, softcap, vocab_start,
                                  num_classes, chunk_size, stats=False):
    rows = input.shape[0]
    acc = _common.acc_dtype(input.dtype)
    _, argmax, shifted = _linear_ce_statistics_fake(input, stats)
    # lse parts [2, N] (max, log-sum), target logit [N], sum of logits [N], argmax and entropy term.
    return (input.new_empty(2, rows, dtype=acc), input.new_empty(rows, dtype=acc), input.new_empty(rows, dtype=acc),
            argmax, shifted)


# ---------------------------------------------------------------- sampled softmax / NCE


# The number of touched rows is data-dependent, and unbacked sizes inside
# sparse tensors are not supported by fake tensors.
_SPARSE_UNDER_COMPILE = ("sparse_grad=True is not supported under torch.compile (data-dependent number of rows); "
                         "use the dense weight gradient there")


@torch.library.register_fake("fusedloss::sampled_forward")
def _sampled_forward_fake(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, mode, hit_mask,
                          label_smoothing, true_label, chunk_size, sparse_grad):
    rows = input.shape[0]
    acc = _common.acc_dtype(input.dtype)
    return input.new_empty(rows, dtype=acc), input.new_empty(3, rows, dtype=acc)


@torch.library.register_fake("fusedloss::sampled_backward")
def _sampled_backward_fake(grad_loss, input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, stats,
                           mode, hit_mask, label_smoothing, true_label, chunk_size, sparse_grad, output_mask):
    if sparse_grad:
        raise NotImplementedError(_SPARSE_UNDER_COMPILE)
    return _fake_grads(output_mask, input, weight, bias, weight_format=torch.contiguous_format)


# (input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, *options) -> (loss, stats);
# gradients of input, weight, bias.
_register_recompute_autograd("sampled_forward", ops.sampled_backward, "sampled loss", 7, (0, 1, 2))


@torch.library.register_fake("fusedloss::sampled_sum_and_grad")
def _sampled_sum_and_grad_fake(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, normalizer,
                               mode, hit_mask, label_smoothing, true_label, sparse_grad, row_block, memory_budget,
                               output_mask):
    if sparse_grad:
        raise NotImplementedError(_SPARSE_UNDER_COMPILE)
    return (input.new_empty((), dtype=_common.acc_dtype(input.dtype)),
            *_fake_grads(output_mask, input, weight, bias, weight_format=torch.contiguous_format))


# (input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, normalizer, *options, output_mask)
# -> (loss_sum, *gradients).
_register_single_pass_autograd("sampled_sum_and_grad", "sampled loss", 8, (0, 1, 2))


# ------------------------------------------------------------------------- contrastive


def _fake_contrastive_grads(output_mask, rows, cols, scale):
    grad_rows = torch.empty_like(rows) if output_mask[0] else rows.new_empty(0)
    grad_cols = torch.empty_like(cols) if output_mask[1] else cols.new_empty(0)
    grad_scale = scale.new_empty(()) if output_mask[2] else rows.new_empty(0, dtype=_common.acc_dtype(rows.dtype))
    return grad_rows, grad_cols, grad_scale


@torch.library.register_fake("fusedloss::contrastive_forward")
def _contrastive_forward_fake(rows, cols, positives, scale, row_ids, col_ids, self_offset, id_columns, id_penalty,
                              symmetric, tile_size):
    acc = _common.acc_dtype(rows.dtype)
    num_rows = rows.shape[0]
    col_stats = cols.shape[0] if symmetric else 0
    # The lse outputs are LseParts [2, count] (max, log-sum), see numerics.h.
    return (rows.new_empty(num_rows, dtype=acc), rows.new_empty(2, num_rows, dtype=acc),
            rows.new_empty(2, col_stats, dtype=acc))


@torch.library.register_fake("fusedloss::contrastive_backward")
def _contrastive_backward_fake(grad_loss, rows, cols, positives, scale, row_ids, col_ids, row_lse, col_lse,
                               self_offset, id_columns, id_penalty, symmetric, tile_size, output_mask):
    return _fake_contrastive_grads(output_mask, rows, cols, scale)


# (rows, cols, positives, scale, row_ids, col_ids, *options) -> (loss, row_lse, col_lse); gradients of rows,
# cols, scale.
_register_recompute_autograd("contrastive_forward", ops.contrastive_backward, "contrastive loss", 6, (0, 1, 3))


@torch.library.register_fake("fusedloss::contrastive_sum_and_grad")
def _contrastive_sum_and_grad_fake(rows, cols, positives, scale, normalizer, row_ids, col_ids, self_offset,
                                   id_columns, id_penalty, symmetric, row_block, memory_budget, output_mask):
    return (rows.new_empty((), dtype=_common.acc_dtype(rows.dtype)),
            *_fake_contrastive_grads(output_mask, rows, cols, scale))


# (rows, cols, positives, scale, normalizer, row_ids, col_ids, *options, output_mask) -> (loss_sum, *gradients).
_register_single_pass_autograd("contrastive_sum_and_grad", "contrastive loss", 7, (0, 1, 3))


# ------------------------------------------------------------------------------ SigLIP


def _siglip_fake_grads(output_mask, image, text, scale, bias):
    grads = (torch.empty_like(image), torch.empty_like(text), scale.new_empty(()), bias.new_empty(()))
    return tuple(g if wanted else image.new_empty(0, dtype=_common.acc_dtype(image.dtype))
                 for g, wanted in zip(grads, output_mask))


@torch.library.register_fake("fusedloss::siglip_forward")
def _siglip_forward_fake(image, text, scale, bias, positive_offset, tile_size):
    return image.new_empty(image.shape[0], dtype=_common.acc_dtype(image.dtype))


@torch.library.register_fake("fusedloss::siglip_backward")
def _siglip_backward_fake(grad_loss, image, text, scale, bias, positive_offset, tile_size, output_mask):
    return _siglip_fake_grads(output_mask, image, text, scale, bias)


def _siglip_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _siglip_backward(ctx, grad_loss):
    forbid_double_backward("siglip_loss", grad_loss)
    mask = list(ctx.needs_input_grad[:4])
    grads = ops.siglip_backward(grad_loss, *ctx.saved_tensors, *ctx.options, mask)
    return (*(g if wanted else None for g, wanted in zip(grads, mask)), *([None] * len(ctx.options)))


# (image, text, scale, bias, positive_offset, tile_size) -> per-row loss; the backward recomputes the tiles.
torch.library.register_autograd("fusedloss::siglip_forward", _siglip_backward, setup_context=_siglip_setup_context)


@torch.library.register_fake("fusedloss::siglip_sum_and_grad")
def _siglip_sum_and_grad_fake(image, text, scale, bias, positive_offset, tile_size, output_mask):
    total = image.new_empty((), dtype=_common.acc_dtype(image.dtype))
    return (total, *_siglip_fake_grads(output_mask, image, text, scale, bias))


# (image, text, scale, bias, positive_offset, tile_size, output_mask) -> (loss_sum, *gradients).
_register_single_pass_autograd("siglip_sum_and_grad", "siglip_loss", 4, (0, 1, 2, 3))
