import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def requires_cuda(fn):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn)


def assert_close_to_oracle(actual, low_precision_ref, oracle, *, slack=2.0, atol=1e-6, what=""):
    """Low-precision check in the style of flash-attention / Cut Cross-Entropy:
    the fused result may be at most `slack` times as far from the fp64 oracle as
    the same-precision PyTorch reference is (plus a small absolute floor)."""
    actual, low_precision_ref, oracle = (t.double() for t in (actual, low_precision_ref, oracle))
    err = (actual - oracle).abs().max().item()
    ref_err = (low_precision_ref - oracle).abs().max().item()
    assert err <= slack * ref_err + atol, f"{what}: error {err:.3g} vs reference error {ref_err:.3g}"
