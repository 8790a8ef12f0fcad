"""Integrations of fusedloss with other libraries.

Each integration is a submodule that imports its library only when it is
itself imported, so ``import fusedloss`` (and ``import fusedloss.integrations``)
never pulls in an optional dependency:

- :mod:`fusedloss.integrations.transformers` -- ``patch(model)`` makes a
  Hugging Face causal LM compute its training loss with
  :func:`fusedloss.linear_cross_entropy`, without the ``[B, T, V]`` logits
  (needs the ``transformers`` package).
"""
