"""GradCache (Gao et al. 2021): a contrastive batch far larger than the
encoders' activation memory allows, with exactly the gradients of the whole
batch in one go.

``cached_loss(loss_fn, towers, mini_batch_size=m)`` embeds each tower's batch
in mini-batches of m rows *without* autograd (only the [B, D] embeddings are
kept), and evaluates ``loss_fn`` on them as detached leaves. Its ``backward()``
then (1) backpropagates the loss to those leaves (and to the loss's own
parameters, e.g. a learnable logit scale), caching the [B, D] embedding
gradients, and (2) re-runs each mini-batch through its encoder with autograd
and backpropagates the cached rows of the gradient into the encoder's
parameters. Each re-run restores the CPU and CUDA random state captured before
that mini-batch's first forward (and the autocast state), so dropout draws the
same masks; the replay leaves the global random state as it found it.

Peak activation memory is that of one mini-batch; the cost is one extra
forward per mini-batch. The loss is any callable of the embeddings (e.g.
:func:`fusedloss.info_nce_loss`, :func:`fusedloss.clip_loss`,
:func:`fusedloss.siglip_loss`, whose fused ops keep the loss itself O(B·D)).

Exact equivalence needs an encoder whose mini-batch outputs do not depend on
the other rows of the batch: BatchNorm in training mode (batch statistics, and
running statistics updated twice) breaks it.
"""
import contextlib

import torch

from . import _validate

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _cuda_devices():
    """CUDA devices whose random state must be captured (none before CUDA is initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


class _RandomState:
    """The CPU and CUDA generators' states at one point."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices()]

    def restore(self):
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


def _autocast_state():
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in _AUTOCAST_DEVICES if d == "cpu" or torch.cuda.is_available()}


def _autocast(state):
    stack = contextlib.ExitStack()
    for device, (enabled, dtype) in state.items():
        stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return stack


def _is_rows(value):
    """A tensor split along dim 0 (0-dim tensors, like other values, reach every mini-batch as they are)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _batch_size(batch, index):
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    rows = {t.shape[0] for t in values if _is_rows(t)}
    if not rows:
        raise TypeError(f"towers[{index}]: the batch must be a tensor, or a tuple / list / dict holding tensors "
                        f"with a batch dimension; got {type(batch).__name__}")
    if len(rows) != 1:
        raise ValueError(f"towers[{index}]: every tensor of the batch must have the same number of rows (dim 0), "
                         f"got {sorted(rows)}")
    rows = rows.pop()
    if rows == 0:
        raise ValueError(f"towers[{index}]: the batch has no rows")
    return rows


def _rows(batch, start, stop):
    """Rows [start, stop) of every tensor of the batch (other values as they are)."""
    pick = lambda v: v[start:stop] if _is_rows(v) else v  # noqa: E731
    if isinstance(batch, dict):
        return {k: pick(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pick(v) for v in batch)
    return pick(batch)


def _encode(encoder, batch, rows, index):
    if isinstance(batch, dict):
        out = encoder(**batch)
    elif isinstance(batch, (tuple, list)):
        out = encoder(*batch)
    else:
        out = encoder(batch)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != rows:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"towers[{index}]: the encoder must return a tensor of embeddings with one row per input "
                         f"row ({rows}), got {got}")
    return out


class _Tower:
    """One encoder and its batch, split into mini-batches whose random state
    is recorded by the first (no-grad) forward."""

    def __init__(self, encoder, batch, mini_batch_size, index):
        if not callable(encoder):
            raise TypeError(f"towers[{index}]: the encoder must be an nn.Module or a callable, got "
                            f"{type(encoder).__name__}")
        self.encoder, self.batch, self.index = encoder, batch, index
        rows = _batch_size(batch, index)
        self.spans = [(start, min(start + mini_batch_size, rows)) for start in range(0, rows, mini_batch_size)]
        self.states = []

    def embed(self):
        """The batch's embeddings, mini-batch by mini-batch, without autograd."""
        outs = []
        with torch.no_grad():
            for start, stop in self.spans:
                self.states.append(_RandomState())
                outs.append(_encode(self.encoder, _rows(self.batch, start, stop), stop - start, self.index))
        return torch.cat(outs)

    def replay(self, grad):
        """Each mini-batch again, with autograd, backpropagating its rows of ``grad``."""
        for (start, stop), state in zip(self.spans, self.states):
            state.restore()
            out = _encode(self.encoder, _rows(self.batch, start, stop), stop - start, self.index)
            torch.autograd.backward(out, grad[start:stop])


class _CachedLoss(torch.autograd.Function):
    """The loss value; its backward runs the two GradCache backward stages. Its
    input is a bare anchor that requires grad, not the loss: the loss's graph
    is run by the first stage, so the engine must not walk it afterwards."""

    @staticmethod
    def forward(ctx, anchor, value, run):
        ctx.run = run
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        run, ctx.run = ctx.run, None
        if run is None:
            raise RuntimeError("fusedloss.gradcache: a cached loss can be backpropagated once (its backward re-runs "
                               "the encoders and frees the cache)")
        run(grad)
        return None, None, None


def cached_loss(loss_fn, towers, *, mini_batch_size):
    """A contrastive loss over batches embedded in mini-batches, GradCache style.

    Args:
        loss_fn: called as ``loss_fn(emb_1, ..., emb_n)`` with one [B_k, D]
            embedding tensor per tower (detached leaves); must return a 0-dim
            loss. Tensors it closes over (a learnable temperature, logit scale
            or bias) receive their gradients as usual.
        towers: a sequence of ``(encoder, batch)`` pairs, e.g. one query / doc
            pair per tower with a shared encoder, or ``[(image_encoder,
            images), (text_encoder, texts)]``. ``encoder`` is an ``nn.Module``
            (or any callable) returning [rows, D] embeddings; ``batch`` a
            tensor, or a tuple / list (passed positionally) or dict (passed as
            keywords) of tensors, split along dim 0 (0-dim tensors and
            non-tensor values are passed to every mini-batch as they are).
        mini_batch_size: rows per encoder call.

    Returns the loss (detached value). Call ``.backward()`` on it (once; the
    gradients accumulate into ``.grad`` as with any backward, scaled by the
    upstream gradient, e.g. a GradScaler's scale); ``torch.autograd.grad`` on it
    is not supported, since the replay accumulates into ``.grad``. With
    autograd disabled it is just ``loss_fn`` of the no-grad embeddings.
    """
    mini_batch_size = _validate.check_positive_int(mini_batch_size, "mini_batch_size")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(towers, (torch.Tensor, str)) or not hasattr(towers, "__iter__"):
        raise TypeError("towers must be a sequence of (encoder, batch) pairs")
    towers = list(towers)
    if not towers:
        raise ValueError("towers is empty: give at least one (encoder, batch) pair")
    for index, tower in enumerate(towers):
        if not isinstance(tower, (tuple, list)) or len(tower) != 2:
            raise TypeError(f"towers[{index}] must be an (encoder, batch) pair, got {type(tower).__name__}")
    towers = [_Tower(encoder, batch, mini_batch_size, index) for index, (encoder, batch) in enumerate(towers)]
    autocast = _autocast_state()
    leaves = [tower.embed().requires_grad_(torch.is_grad_enabled()) for tower in towers]
    loss = loss_fn(*leaves)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a 0-dim loss tensor, got {got}")
    if not loss.requires_grad:
        return loss

    def run(grad):
        # Stage 1: the loss's gradient with respect to the cached embeddings.
        torch.autograd.backward(loss, grad)
        # Stage 2: the encoders again, each mini-batch with its recorded random
        # and autocast state; the caller's random state is restored afterwards.
        with torch.random.fork_rng(devices=_cuda_devices()), torch.enable_grad(), _autocast(autocast):
            for tower, leaf in zip(towers, leaves):
                if leaf.grad is not None:
                    tower.replay(leaf.grad)

    return _CachedLoss.apply(torch.empty(0, requires_grad=True), loss.detach(), run)
