"""The sampled-token reverse KL (loss.kind=sampled_reverse_kl): its value and its gradient in
expectation, computed exactly by weighting every possible sampled token by q (pure math)."""
import pytest
import torch

from trainer.config import LossConfig
from trainer.losses import distillation_loss, sampled_reverse_kl

V = 12


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 2, torch.log_softmax(torch.randn(V, generator=g) * 2, -1)


def _expected_under_q(logits: torch.Tensor, teacher_logp: torch.Tensor, estimator: str):
    """E_{y~q}[loss(y)] and E_{y~q}[∇ loss(y)], summing over all V tokens weighted by q(y)."""
    logits = logits.clone().requires_grad_(True)
    tokens = torch.arange(V)
    per_token = sampled_reverse_kl(logits.expand(V, V), tokens, teacher_logp[tokens], torch.ones(V, dtype=torch.bool),
                                   estimator)
    q = torch.softmax(logits, -1).detach()
    (q * per_token).sum().backward()  # q detached: the expectation of the gradient, not the gradient of it
    return float((q * per_token).sum().detach()), logits.grad


def _exact_reverse_kl(logits: torch.Tensor, teacher_logp: torch.Tensor):
    logits = logits.clone().requires_grad_(True)
    log_q = torch.log_softmax(logits, -1)
    kl = (log_q.exp() * (log_q - teacher_logp)).sum()
    kl.backward()
    return float(kl), logits.grad


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_are_unbiased_for_the_reverse_kl(estimator, seed):
    logits, teacher_logp = _pair(seed)
    value, grad = _expected_under_q(logits, teacher_logp, estimator)
    kl, kl_grad = _exact_reverse_kl(logits, teacher_logp)
    assert value == pytest.approx(kl, rel=1e-5)
    torch.testing.assert_close(grad, kl_grad, rtol=1e-4, atol=1e-6)


def test_k3_is_never_negative_and_k1_can_be():
    logits, teacher_logp = _pair(3)
    tokens = torch.arange(V)
    every = torch.ones(V, dtype=torch.bool)
    k1 = sampled_reverse_kl(logits.expand(V, V), tokens, teacher_logp, every, "k1")
    k3 = sampled_reverse_kl(logits.expand(V, V), tokens, teacher_logp, every, "k3")
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_the_estimators_differ_per_sample():
    """Same expectation, different per-sample gradients: k1 carries an extra (1 · ∇log q) term."""
    logits, teacher_logp = _pair(4)
    grads = {}
    for estimator in ("k1", "k3"):
        x = logits.clone().requires_grad_(True)
        sampled_reverse_kl(x[None], torch.tensor([5]), teacher_logp[[5]], torch.tensor([True]), estimator).sum().backward()
        grads[estimator] = x.grad
    log_q_grad = torch.nn.functional.one_hot(torch.tensor(5), V).float() - torch.softmax(logits, -1)
    torch.testing.assert_close(grads["k1"] - grads["k3"], log_q_grad, rtol=1e-5, atol=1e-6)


def test_only_student_tokens_count_and_unknown_teacher_logprobs_elsewhere_are_harmless():
    logits, teacher_logp = _pair(5)
    x = logits.expand(1, 4, V).clone().requires_grad_(True)
    tokens = torch.tensor([[1, 2, 3, 4]])
    token_logp = torch.tensor([[teacher_logp[1], float("nan"), teacher_logp[3], float("nan")]])
    sampled = torch.tensor([[True, False, True, False]])  # the NaNs stand where the teacher wrote
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = LossConfig(kind="sampled_reverse_kl")
    loss = distillation_loss(x, torch.zeros(1, 4, 3, dtype=torch.long), torch.full((1, 4, 3), -1.0), mask, cfg,
                             tokens, token_logp, sampled)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[0, [1, 3]] == 0).all() and (x.grad[0, [0, 2]] != 0).any()
    per_token = sampled_reverse_kl(x[0].detach(), tokens[0], token_logp[0], sampled[0], "k3")
    assert float(loss) == pytest.approx(float(per_token.sum()) / 4)  # the mean over all response tokens


def test_forward_kl_weight_adds_the_top_k_forward_kl():
    logits, teacher_logp = _pair(6)
    x = logits.expand(1, 2, V)
    top = teacher_logp.topk(V)  # every id listed: the top-k forward KL is the exact one
    ids, lps = top.indices.expand(1, 2, V), top.values.expand(1, 2, V)
    tokens, mask, sampled = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[True, True]])
    args = (x, ids, lps, mask)
    plain = distillation_loss(*args, LossConfig(kind="sampled_reverse_kl"), tokens, teacher_logp[tokens], sampled)
    both = distillation_loss(*args, LossConfig(kind="sampled_reverse_kl", forward_kl_weight=0.5), tokens,
                             teacher_logp[tokens], sampled)
    forward = distillation_loss(*args, LossConfig(kind="forward_kl"))
    assert float(both) == pytest.approx(float(plain) + 0.5 * float(forward), rel=1e-5)


def test_forward_kl_weight_is_refused_where_nothing_reads_it():
    with pytest.raises(ValueError, match="forward_kl_weight"):
        LossConfig(kind="jsd", forward_kl_weight=0.5)
