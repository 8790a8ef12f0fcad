"""Hugging Face ``transformers`` causal LMs that train through fusedloss.

``patch(model)`` makes the model's training forward (the one that gets
``labels``) compute the next-token loss with
:func:`fusedloss.linear_cross_entropy` straight from the decoder's last hidden
states and ``lm_head.weight``, so the ``[B, T, V]`` logits are never built --
neither in the forward nor in the backward::

    from fusedloss.integrations.transformers import patch
    model = patch(AutoModelForCausalLM.from_pretrained(...))
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss   # logits is None

What the patched forward does when ``labels`` is given:

- runs the decoder (``model.model`` / ``model.transformer``) with every
  argument the model's own forward would pass it;
- shifts the *labels* by one (``labels[..., 1:]`` padded with ``ignore_index``
  at the end, as Hugging Face's ``ForCausalLMLoss``; a pre-shifted
  ``shift_labels=`` is used as given), never copies the hidden states;
- ignores ``-100`` labels (``ignore_index=`` if passed): padding costs nothing;
- applies the final-logit soft-capping the model's own forward applies
  (Gemma 2/3: ``config.final_logit_softcapping``) inside the fused op;
- normalises by ``num_items_in_batch`` when it is passed (the ``Trainer``
  passes it under gradient accumulation): ``loss = sum / num_items_in_batch``;
  otherwise the loss is the mean over non-ignored labels (0, not NaN, when
  every label is ignored);
- returns the model's usual output class with ``loss`` set and
  ``logits=None`` (the other fields -- cache, hidden states, attentions --
  are the decoder's, as usual; ``return_dict=False`` gives the tuple).

Without ``labels`` (inference, evaluation without labels, ``generate()``) the
original forward runs unchanged, so outputs are bit-identical to the
unpatched model's.

The patch wraps the ``forward`` of this one model instance (no transformers
class is modified); ``unpatch(model)`` removes it. It finds the causal LM
inside PEFT wrappers (``PeftModel``), ``torch.compile``'s ``OptimizedModule``
and DDP/FSDP-style ``.module`` wrappers. Patch before ``torch.compile``.
Importing this module needs ``transformers``; ``import fusedloss`` never
imports it.
"""
import dataclasses
import functools
import importlib
import inspect
import types

import torch
from torch import nn
from torch.nn import functional as F

try:
    import transformers as _hf  # noqa: F401  (the integration needs it; fail here with a clear message)
except ImportError as exc:  # pragma: no cover - exercised only where transformers is absent
    raise ImportError("fusedloss.integrations.transformers needs the `transformers` package "
                      "(pip install transformers)") from exc

from ..linear_ce import linear_cross_entropy

__all__ = ["patch", "unpatch", "SUPPORTED_MODEL_TYPES"]

_STATE = "_fusedloss_patch_state"
_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str
    base: str = "model"                        # attribute holding the decoder
    output: str = "CausalLMOutputWithPast"     # output class (model's module first, then modeling_outputs)
    softcap: bool = False                      # applies config.final_logit_softcapping (if the source can't tell)
    base_takes_labels: bool = False            # the original forward passes labels= to the decoder


# Keyed by the causal-LM class name; the class must come from transformers itself.
_FAMILIES = {
    "LlamaForCausalLM": _Family("llama"),
    "MistralForCausalLM": _Family("mistral"),
    "Qwen2ForCausalLM": _Family("qwen2"),
    "Qwen3ForCausalLM": _Family("qwen3"),
    "GemmaForCausalLM": _Family("gemma"),
    "Gemma2ForCausalLM": _Family("gemma2", softcap=True),
    "Gemma3ForCausalLM": _Family("gemma3_text", softcap=True),
    "Gemma3ForConditionalGeneration": _Family("gemma3", output="Gemma3CausalLMOutputWithPast",
                                              base_takes_labels=True),
    "Phi3ForCausalLM": _Family("phi3"),
    "PhiForCausalLM": _Family("phi"),
    "GPT2LMHeadModel": _Family("gpt2", base="transformer", output="CausalLMOutputWithCrossAttentions"),
}

SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in _FAMILIES.values())


def _supported_text():
    return ", ".join(f"{fam.model_type} ({name})" for name, fam in _FAMILIES.items())


class _PatchState:
    """What the patched forward needs, kept on the instance (deep-copies with it)."""

    def __init__(self, family, positional, softcap, output_cls, output_fields, instance_forward):
        self.family = family
        self.positional = positional            # forward's positional parameter names, self excluded
        self.softcap = softcap                  # whether to read text_config.final_logit_softcapping
        self.output_cls = output_cls
        self.output_fields = output_fields      # output fields copied from the decoder's output
        self.instance_forward = instance_forward  # a forward already set on the instance, if any


# ----------------------------------------------------------------- discovery


def _unwrap_once(model):
    """The model inside a PEFT / torch.compile / DDP-style wrapper, or None."""
    get_base = getattr(type(model), "get_base_model", None)
    if callable(get_base):                       # peft.PeftModel (and subclasses)
        return model.get_base_model()
    inner = model.__dict__.get("_modules", {}).get("_orig_mod")   # torch.compile's OptimizedModule
    if isinstance(inner, nn.Module):
        return inner
    inner = model.__dict__.get("_modules", {}).get("module")      # DDP, FSDP(1), DataParallel
    if isinstance(inner, nn.Module):
        return inner
    return None


def _family_of(model):
    """(family, class that defines the supported forward) or (None, None)."""
    for klass in type(model).__mro__:
        fam = _FAMILIES.get(klass.__name__)
        if fam is not None and klass.__module__.startswith("transformers."):
            return fam, klass
    return None, None


def _find_causal_lm(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    current, seen = model, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        fam, klass = _family_of(current)
        if fam is not None:
            if type(current).forward is not klass.forward:
                raise ValueError(
                    f"{fn}: {type(current).__name__} subclasses {klass.__name__} but overrides forward(); the patch "
                    f"replaces {klass.__name__}.forward's loss and would bypass the override")
            return current, fam, klass
        current = _unwrap_once(current)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    raise ValueError(
        f"{fn}: unsupported model {type(model).__name__} (model_type={model_type!r}); fusedloss patches the "
        f"causal-LM classes of transformers: {_supported_text()} (also inside PEFT, torch.compile or DDP wrappers; "
        "classes loaded with trust_remote_code are not supported)")


def _lm_head(model, fn):
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{fn}: {type(model).__name__}.lm_head is {type(head).__name__}, not a torch.nn.Linear; fusedloss "
            "reads lm_head.weight / lm_head.bias directly, so an adapter on the output layer (a PEFT LoRA or "
            "modules_to_save wrapper on lm_head) is not supported: leave lm_head out of target_modules / "
            "modules_to_save, or call unpatch(model) to train through the model's own loss")
    return head


def _applies_final_softcap(klass, family):
    """Whether the class's own forward soft-caps its logits (read from its source,
    which follows the installed transformers version; the family's default when
    the source is unavailable)."""
    try:
        return "final_logit_softcapping" in inspect.getsource(klass.forward)
    except (OSError, TypeError):
        return family.softcap


def _output_class(klass, family):
    module = importlib.import_module(klass.__module__)
    cls = getattr(module, family.output, None)
    if cls is None:
        cls = getattr(importlib.import_module("transformers.modeling_outputs"), family.output)
    return cls


def _positional_names(klass):
    params = list(inspect.signature(klass.forward).parameters.values())[1:]   # drop self
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


# ----------------------------------------------------------------- the forward


try:
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep
except ImportError:  # older transformers: the models slice inline
    def _slice_logits_to_keep(hidden_states, logits_to_keep):
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, index, :]


def _fused_forward(self, *args, **kwargs):
    """The patched forward: the model's own forward without ``labels``, the
    fused loss (``logits=None``) with them."""
    state = self.__dict__[_STATE]
    if args:  # map positional arguments to names only to look for labels
        if len(args) > len(state.positional):
            raise TypeError(f"{type(self).__name__}.forward() takes {len(state.positional)} positional arguments "
                            f"but {len(args)} were given")
        named = dict(zip(state.positional, args))
        for name in named:
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward() got multiple values for argument {name!r}")
        named.update(kwargs)
    else:
        named = kwargs
    if named.get("labels") is None:
        if state.instance_forward is not None:
            return state.instance_forward(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)
    return _training_forward(self, state, dict(named))


def _training_forward(self, state, kwargs):
    fn = "fusedloss.integrations.transformers"
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    labels = kwargs.pop("labels")
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    if state.family.base_takes_labels:
        kwargs["labels"] = labels
    head = _lm_head(self, fn)

    outputs = getattr(self, state.family.base)(**kwargs, return_dict=True)
    hidden = outputs[0]
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        hidden = _slice_logits_to_keep(hidden, logits_to_keep)
    if shift_labels is None:
        # Shift the labels, not the hidden states: position t predicts label t+1,
        # the last position has no target.
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    weight, bias = head.weight, head.bias
    if hidden.device != weight.device:
        hidden = hidden.to(weight.device)
    shift_labels = shift_labels.to(hidden.device)
    if tuple(hidden.shape[:-1]) != tuple(shift_labels.shape):
        # Hugging Face's loss flattens both (e.g. a boolean logits_to_keep with shift_labels).
        hidden, shift_labels = hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1)
    softcap = self.config.get_text_config().final_logit_softcapping if state.softcap else None

    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    # With num_items_in_batch, the summed loss divided by it inside the op (no host sync).
    loss = linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index, softcap=softcap,
                                reduction="mean" if num_items_in_batch is None else "sum",
                                normalizer=num_items_in_batch)

    fields = {name: getattr(outputs, name, None) for name in state.output_fields}
    out = state.output_cls(loss=loss, logits=None, **fields)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------- public API


def patch(model):
    """Make ``model`` compute its training loss with :func:`fusedloss.linear_cross_entropy`.

    ``model`` is a transformers causal LM of a supported family
    (``SUPPORTED_MODEL_TYPES``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2,
    Gemma 3 (text and multimodal), Phi, Phi-3, GPT-2), or a PEFT /
    ``torch.compile`` / DDP wrapper of one. The causal LM's ``forward`` is
    wrapped on that instance only: with ``labels`` it returns the fused loss
    and ``logits=None``; without, it is the original forward. Idempotent.
    Returns ``model`` (the object passed in).

    Raises ``ValueError`` for an unsupported model, and when ``lm_head`` is not
    a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``).
    """
    fn = "fusedloss.integrations.transformers.patch"
    lm, family, klass = _find_causal_lm(model, fn)
    _lm_head(lm, fn)
    if _STATE in lm.__dict__:
        return model
    output_cls = _output_class(klass, family)
    output_fields = tuple(f.name for f in dataclasses.fields(output_cls) if f.name not in ("loss", "logits"))
    state = _PatchState(family, _positional_names(klass), _applies_final_softcap(klass, family), output_cls,
                        output_fields, lm.__dict__.get("forward"))
    lm.__dict__[_STATE] = state
    lm.__dict__["forward"] = types.MethodType(_make_forward(klass), lm)
    return model


def _make_forward(klass):
    """A forward with ``klass.forward``'s name, docs and signature (Trainer and
    generate() inspect it: ``**kwargs`` means "accepts num_items_in_batch", and
    ``logits_to_keep`` is looked for), bound to the instance by ``patch``. A
    bound method deep-copies with its model."""

    @functools.wraps(klass.forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    forward._fusedloss_forward = True
    return forward


def unpatch(model):
    """Undo :func:`patch` (a no-op on a model that is not patched); returns ``model``."""
    fn = "fusedloss.integrations.transformers.unpatch"
    lm, _, _ = _find_causal_lm(model, fn)
    state = lm.__dict__.pop(_STATE, None)
    if state is None:
        return model
    current = lm.__dict__.get("forward")
    if not getattr(getattr(current, "__func__", None), "_fusedloss_forward", False):
        lm.__dict__[_STATE] = state
        raise RuntimeError(f"{fn}: {type(lm).__name__}.forward was wrapped again after patch(); remove that "
                           "wrapper first")
    if state.instance_forward is not None:
        lm.__dict__["forward"] = state.instance_forward
    else:
        del lm.__dict__["forward"]
    return model
