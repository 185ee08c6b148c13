"""MIL heads: registry, shapes, padding/mask/permutation invariance, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch

from models.mil import MILOutput, create_mil, get_mil_spec, list_mil, masked_softmax
from models.mil.clam import smooth_top1_svm_loss

ALL = ["abmil", "clam-mb", "clam-sb", "dsmil", "gated-abmil", "max", "mean", "transmil"]
D, C = 12, 3
TINY = {  # small widths so every head runs in milliseconds
    "transmil": {"dim": 16, "heads": 2, "landmarks": 4},
    "clam-sb": {"hidden": 16, "attn_dim": 8, "k_sample": 3},
    "clam-mb": {"hidden": 16, "attn_dim": 8, "k_sample": 3},
    "dsmil": {"hidden": 16, "query_dim": 8},
}
SOFTMAX_ATTENTION = {"abmil", "gated-abmil", "clam-sb", "clam-mb", "dsmil", "mean"}
SUMS_TO_ONE = SOFTMAX_ATTENTION | {"max"}


def make(name: str, n_classes: int = C) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mil(name, D, n_classes, **TINY.get(name, {"hidden": 16})).eval()


def test_registry_lists_every_head_and_names_choices():
    assert list_mil() == ALL
    with pytest.raises(ValueError, match="choose one of: abmil"):
        create_mil("nope", D, C)
    with pytest.raises(TypeError, match="unknown option.*'hidden'"):
        create_mil("abmil", D, C, hiden=3)
    m = create_mil("abmil", D, C, hidden=8)
    assert m.mil_config == {"name": "abmil", "in_dim": D, "n_classes": C, "kwargs": {"hidden": 8}}
    assert get_mil_spec("abmil").defaults["hidden"] == 256


def test_masked_softmax_gives_exact_zero_and_handles_empty_rows():
    s = torch.tensor([[1.0, 2.0, 1e30], [3.0, -1.0, 0.0]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    a = masked_softmax(s, m)
    assert a[0, 2] == 0.0 and torch.allclose(a[0].sum(), torch.tensor(1.0))
    assert torch.equal(a[1], torch.zeros(3))


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_attention_on_real_instances(name):
    model = make(name)
    x = torch.randn(3, 40, D)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mask[2, ::3] = False  # holes anywhere, not just a padded tail
    out = model(x, mask)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (3, C) and torch.isfinite(out.logits).all()
    assert out.attention is not None and out.attention.shape == (3, 40)
    assert torch.all(out.attention[~mask] == 0)
    if name in SUMS_TO_ONE:
        assert torch.allclose(out.attention.sum(1), torch.ones(3), atol=1e-5)
    if name in SOFTMAX_ATTENTION:
        assert torch.all(out.attention[mask] > 0)


@pytest.mark.parametrize("name", ALL)
def test_padded_bag_equals_unpadded_bag(name):
    model = make(name)
    g = torch.Generator().manual_seed(1)
    bags = [torch.randn(n, D, generator=g) for n in (30, 17, 9)]
    n_max = 35
    x = 1e3 * torch.randn(len(bags), n_max, D, generator=g)  # garbage in the padding
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    batched = model(x, mask)
    for i, b in enumerate(bags):
        alone = model(b[None])
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            batched.attention[i, : len(b)], alone.attention[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", [n for n in ALL if get_mil_spec(n).permutation_invariant])
def test_permutation_invariance(name):
    model = make(name)
    x = torch.randn(2, 25, D)
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(3))
    a, b = model(x), model(x[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention[:, perm], b.attention, atol=1e-5, rtol=1e-5)


def test_transmil_is_declared_order_dependent():
    assert get_mil_spec("transmil").permutation_invariant is False


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    model = make(name, n_classes=2).train()
    x = torch.randn(4, 20, D, requires_grad=True)
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[2, 12:] = False
    labels = torch.tensor([0, 1, 1, 0])
    out = model(x, mask, labels=labels)
    loss = torch.nn.functional.cross_entropy(out.logits, labels)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert x.grad[2, 12:].abs().sum() == 0  # padding gets no gradient
    assert x.grad[2, :12].abs().sum() > 0


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    d, h, a, c = 768, 256, 128, 2
    embed, attn_v, attn_w, clf = d * h + h, h * a + a, a + 1, h * c + c
    assert _n_params(create_mil("abmil", d, c)) == embed + attn_v + attn_w + clf == 230403
    assert _n_params(create_mil("gated-abmil", d, c)) == 230403 + attn_v
    assert _n_params(create_mil("mean", d, c)) == embed + clf
    assert _n_params(create_mil("max", d, c)) == embed + clf
    h2, a2 = 512, 256  # CLAM "small": 768 -> 512 -> 256, gated attention
    clam_common = d * h2 + h2 + 2 * (h2 * a2 + a2) + c * (h2 * 2 + 2)
    assert _n_params(create_mil("clam-sb", d, c)) == clam_common + (a2 + 1) + h2 * c + c
    assert _n_params(create_mil("clam-mb", d, c)) == clam_common + c * (a2 + 1) + c * (h2 + 1)
    # TransMIL at its published width (512, 8 heads) has about 2.67 M parameters on 1024-d input
    assert 2.5e6 < _n_params(create_mil("transmil", 1024, c)) < 2.8e6


def test_clam_instance_loss():
    model = make("clam-sb", n_classes=2).train()
    x = torch.randn(2, 5, D)  # fewer than 2 * k_sample real instances: k shrinks, no crash
    out = model(x, labels=torch.tensor([1, 0]))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert model(x).aux_loss is None
    one = torch.ones(1, 1, dtype=torch.bool)
    assert model(x[:1, :1], one, labels=torch.tensor([1])).aux_loss.item() == 0.0


def test_smooth_top1_svm_tends_to_hinge():
    s = torch.tensor([[2.0, 0.5], [0.2, 0.9]])
    y = torch.tensor([0, 0])
    hinge = torch.clamp(1 + s[:, 1] - s[:, 0], min=0).mean()
    torch.testing.assert_close(smooth_top1_svm_loss(s, y, tau=1e-3), hinge, atol=1e-3, rtol=0)
    assert smooth_top1_svm_loss(s, y, tau=1.0) > hinge


def test_dsmil_logits_average_both_streams():
    model = make("dsmil")
    x = torch.randn(1, 10, D)
    h = model.embed(x)[0]
    c = model.instance_classifier(h)  # (N, C)
    q, q_crit = model.q(h), model.q(h[c.argmax(0)])  # critical instance of each class
    a = torch.softmax(q @ q_crit.T / 8**0.5, dim=0)  # (N, C)
    bag = model.bag_classifier((a.T @ h)[None]).squeeze(-1)[0]
    out = model(x)
    torch.testing.assert_close(out.logits[0], 0.5 * (c.amax(0) + bag))
    torch.testing.assert_close(out.attention[0], a[:, out.logits[0].argmax()])


def test_bad_inputs_are_named():
    model = make("abmil")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, N, 12\)"):
        model(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(2, 5, D), torch.ones(2, 4, dtype=torch.bool))
