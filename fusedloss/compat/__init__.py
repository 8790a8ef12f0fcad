"""Drop-in ports of other frameworks' loss APIs: ``fusedloss.compat.tf``
(TensorFlow's sampled losses) and ``fusedloss.compat.torch`` (torch's own
``F.linear_cross_entropy`` / ``nn.LinearCrossEntropyLoss``)."""
from . import tf, torch

__all__ = ["tf", "torch"]
