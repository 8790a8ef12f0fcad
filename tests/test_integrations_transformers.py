"""fusedloss.integrations.transformers: patched Hugging Face causal LMs give the
unpatched model's loss and gradients without the [B, T, V] logits.

Every model is built from a tiny config with random weights (no downloads):
vocab 257, hidden 32, 2 layers, 4 heads, fp32, eager attention.
"""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedloss.integrations.transformers import SUPPORTED_MODEL_TYPES, patch, unpatch  # noqa: E402

V, H, B, T = 257, 32, 4, 12
RTOL, ATOL = 1e-5, 1e-6

_DECODER = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
# A soft cap small enough to bend the tiny model's logits (|z| ~ 1), so the test sees it.
_SOFTCAP = 1.5
_CONFIGS = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER),
    "qwen2": dict(_DECODER),
    "qwen3": dict(_DECODER, head_dim=8),
    "gemma": dict(_DECODER, head_dim=8),
    "gemma2": dict(_DECODER, head_dim=8, final_logit_softcapping=_SOFTCAP, query_pre_attn_scalar=8),
    "gemma3_text": dict(_DECODER, head_dim=8, final_logit_softcapping=_SOFTCAP, query_pre_attn_scalar=8),
    "gemma3": dict(text_config=dict(_DECODER, head_dim=8, query_pre_attn_scalar=8),
                   vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14),
                   mm_tokens_per_image=4, image_token_id=V - 1, boi_token_id=V - 2, eoi_token_id=V - 3,
                   initializer_range=0.2),
    "phi3": dict(_DECODER),
    "phi": dict(_DECODER),
    "gpt2": dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def make_model(model_type, seed=0):
    config = transformers.AutoConfig.for_model(model_type, **_CONFIGS[model_type])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.train()


def make_batch(batch=B, seq=T, seed=0):
    """input_ids, attention_mask (one row left-padded, one right-padded) and
    labels (-100 on padding and on a few real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 3, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0          # left padding
    mask[1, -4:] = 0         # right padding
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[-2, 5] = -100
    labels[-1, -1] = -100
    return ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_supported_model_types():
    assert set(_CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
def test_loss_and_grads_match_unpatched(model_type):
    ref = make_model(model_type)
    model = patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()

    def boom(*_):
        raise AssertionError("the patched training forward called lm_head")

    hook = model.lm_head.register_forward_hook(boom)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    hook.remove()
    assert out.logits is None
    out.loss.backward()

    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(model), grads(ref))


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
def test_gradient_accumulation_with_num_items_in_batch(model_type):
    """2 micro-batches of B/2 with num_items_in_batch = the full batch's label
    count give the 1×B mean loss and gradients (Hugging Face's fix)."""
    ref = make_model(model_type)
    model = patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    num_items = (labels[:, 1:] != -100).sum()

    total = 0.0
    for part in (slice(0, B // 2), slice(B // 2, B)):
        loss = model(input_ids=ids[part], attention_mask=mask[part], labels=labels[part],
                     num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()

    want = ref(input_ids=ids, attention_mask=mask, labels=labels)     # plain mean over the whole batch
    want.loss.backward()
    torch.testing.assert_close(total, want.loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(model), grads(ref))


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
def test_generate_and_inference_unchanged(model_type):
    model = make_model(model_type).eval()
    ids, mask, _ = make_batch(batch=2, seq=8, seed=1)
    mask[1] = 1                       # one left-padded row, one full row
    ids[1] = torch.randint(3, V - 3, (8,))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(input_ids=ids, attention_mask=mask, **kw)
        logits_before = model(input_ids=ids, attention_mask=mask).logits
        patch(model)
        after = model.generate(input_ids=ids, attention_mask=mask, **kw)
        logits_after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert torch.equal(logits_before, logits_after)


def test_patch_is_idempotent_and_unpatch_restores():
    model = make_model("llama")
    assert patch(model) is model
    forward = model.forward
    assert patch(model) is model and model.forward == forward
    ids, mask, labels = make_batch()
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    assert unpatch(model) is model
    assert "forward" not in model.__dict__
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and out.logits.shape == (B, T, V)
    assert unpatch(model) is model       # no-op when not patched


def test_deepcopy_of_a_patched_model_trains_its_own_weights():
    ref = make_model("phi")
    model = copy.deepcopy(patch(make_model("phi")))
    ids, mask, labels = make_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert_same_grads(grads(model), grads(ref))


def test_bf16():
    ref = make_model("llama").to(torch.bfloat16)
    model = patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.dtype == torch.float32
    # the unpatched loss rounds the logits to bf16 before its fp32 softmax; the fused op does not
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_only_the_instance_is_patched():
    patched, other = make_model("llama"), make_model("llama")
    patch(patched)
    ids, mask, labels = make_batch()
    assert other(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_signature_is_kept():
    """Trainer passes num_items_in_batch only to a forward with **kwargs;
    generate() looks for logits_to_keep."""
    import inspect

    model = patch(make_model("llama"))
    params = inspect.signature(model.forward).parameters
    assert "logits_to_keep" in params and "labels" in params
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_positional_args_return_dict_and_shift_labels():
    ref = make_model("qwen2")
    model = patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    # positional input_ids / attention_mask, tuple output
    got = model(ids, mask, labels=labels, return_dict=False)
    want = ref(ids, mask, labels=labels, return_dict=False)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL)
    # pre-shifted labels (padding-free collators) and a custom ignore_index
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shifted[shifted == -100] = -1
    got = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted, ignore_index=-1).loss
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted, ignore_index=-1).loss
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # logits_to_keep with labels: the loss over the kept positions against
    # shift_labels of that shape (Hugging Face's own loss fails on the sliced logits' view)
    kept = shifted[:, -5:]
    got = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=kept, ignore_index=-1,
                logits_to_keep=5).loss
    logits = ref(input_ids=ids, attention_mask=mask, logits_to_keep=5).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), kept.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_all_labels_ignored_gives_zero_not_nan():
    model = patch(make_model("llama"))
    ids, mask, labels = make_batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(labels, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads(model).values())


def test_no_vocab_sized_activation():
    """No op of the patched training step (forward and backward) produces a
    tensor with a [.., V] last dimension over the tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.numel() >= B * V:
                    Watch.big.append((str(func), tuple(t.shape)))
            return out

    model = patch(make_model("llama"))
    ids, mask, labels = make_batch()
    with Watch():
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert Watch.big == []


def test_unsupported_model_raises_listing_supported():
    config = transformers.AutoConfig.for_model("llama", **_CONFIGS["llama"])
    base = transformers.AutoModel.from_config(config)            # LlamaModel: no lm_head
    with pytest.raises(ValueError, match=r"unsupported model LlamaModel.*llama \(LlamaForCausalLM\).*gpt2"):
        patch(base)
    with pytest.raises(ValueError, match="unsupported model Linear"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        patch("llama")

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(ValueError, match="overrides forward"):
        patch(Custom(config))


def test_import_fusedloss_does_not_import_transformers():
    code = "import sys, fusedloss, fusedloss.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile():
    """The patched model compiles (dynamo + AOT autograd through the fused
    op's fake kernels) and gives the eager loss and gradients."""
    ref = make_model("llama")
    model = patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    compiled = torch.compile(model, backend="aot_eager")
    try:
        out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        out.loss.backward()
    finally:
        torch._dynamo.reset()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(model), grads(ref))


@pytest.mark.parametrize("when", ["after", "before"])
def test_peft_lora(when):
    """patch(peft_model) finds the causal LM inside; patching the model before
    get_peft_model works too."""
    peft = pytest.importorskip("peft")
    ref = make_model("llama")
    model = copy.deepcopy(ref)
    if when == "before":
        patch(model)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(ref, lora)
    model = peft.get_peft_model(model, lora)
    model.load_state_dict(ref.state_dict())
    assert patch(model) is model
    ids, mask, labels = make_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=RTOL, atol=ATOL)
    got_g, want_g = grads(model), grads(ref)
    assert got_g and all("lora_" in n for n in got_g)
    assert_same_grads(got_g, want_g)
    unpatch(model)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_peft_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        patch(model)
    # an adapter put on lm_head after the patch is refused at the training forward
    model = patch(make_model("llama"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    ids, mask, labels = make_batch()
    with pytest.raises(ValueError, match="lm_head"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (B, T, V)     # inference still works


def test_trainer_gradient_accumulation(tmp_path):
    """Trainer with gradient accumulation passes num_items_in_batch to the
    patched forward; one optimizer step moves the weights exactly as the
    unpatched model's step does."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = make_batch()
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(B)]
    seen = []

    def train(model):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B // 2,
                                 gradient_accumulation_steps=2, max_steps=1, learning_rate=0.5, lr_scheduler_type="constant",
                                 optim="sgd",
                                 warmup_steps=0, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, dataloader_drop_last=False, seed=0, data_seed=0,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    ref = make_model("llama")
    model = patch(copy.deepcopy(ref))
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("num_items_in_batch")), with_kwargs=True)
    want = train(ref)
    got = train(model)
    assert len(seen) == 2 and all(n is not None and int(n) == int((labels[:, 1:] != -100).sum()) for n in seen)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
