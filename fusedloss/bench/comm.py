"""Count the torch.distributed collectives a piece of code issues and their
sizes (the distributed benchmark and tests/test_distributed.py).

``with count_collectives() as log:`` replaces the collectives of
``torch.distributed`` that fusedloss calls by wrappers that append one
:class:`Collective` per call to ``log``, then restores them. The payload is
this rank's tensor: the input of an all-reduce, broadcast, all-gather and
reduce-scatter. :func:`ring_bytes_sent` turns it into the bytes a rank sends
under the usual ring / tree algorithms."""
import contextlib
import dataclasses

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str        # "all_reduce", "broadcast", "all_gather", "reduce_scatter"
    function: str  # the torch.distributed function called (the list all_gather only checks arguments here)
    numel: int     # elements of this rank's payload
    nbytes: int
    world: int

    def ring_bytes_sent(self, rank_is_root=True):
        """Bytes this rank sends: all-reduce 2(W-1)/W of the payload (ring),
        all-gather (W-1) x its own part, reduce-scatter (W-1)/W of its input,
        broadcast the payload (root of a tree/ring: at most once per peer link)."""
        w = self.world
        if self.op == "all_reduce":
            return 2 * (w - 1) * self.nbytes // w
        if self.op == "all_gather":
            return (w - 1) * self.nbytes
        if self.op == "reduce_scatter":
            return (w - 1) * self.nbytes // w
        return self.nbytes if rank_is_root else 0


def _payload(op, args):
    # all_gather(list_out, tensor) and the flat (out, in) forms take the input second.
    return args[1] if op in ("all_gather", "reduce_scatter") else args[0]


_WRAPPED = {
    "all_reduce": "all_reduce", "broadcast": "broadcast", "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
}


@contextlib.contextmanager
def count_collectives():
    log = []
    originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}

    def wrap(name, original):
        op = _WRAPPED[name]

        def wrapper(*args, **kwargs):
            tensor = _payload(op, args)
            log.append(Collective(op, name, tensor.numel(), tensor.numel() * tensor.element_size(),
                                  dist.get_world_size(kwargs.get("group"))))
            return original(*args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
