"""Drop-in ports of other frameworks' loss APIs (``fusedloss.compat.tf``)."""
from . import tf

__all__ = ["tf"]
