"""The shared training loop on the real bundled model: a few steps on real text lower the loss on
the windows trained on; bad settings and non-finite losses are refused with the option named."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.loop import TrainConfig, heldout_loss, lr_at, text_windows, train


@pytest.fixture(scope="module")
def small_model():
    from lowbit.models.load import load_model
    lm = load_model()
    return lm


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] >= 0.1


def test_bad_config_named():
    with pytest.raises(LowbitError, match="TrainConfig.steps"):
        TrainConfig(steps=0).check()
    with pytest.raises(LowbitError, match="TrainConfig.lr"):
        TrainConfig(lr=float("nan")).check()


def test_train_lowers_loss_on_its_windows(small_model):
    lm = small_model
    model = lm.model
    w = text_windows(lm.tokenizer, "wiki-calibration", 64, seed=0, max_windows=2)
    norm = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    saved = [p.detach().clone() for p in norm]
    try:
        for p in norm:
            p.requires_grad_(True)
        before = heldout_loss(model, w)
        res = train(model, w, TrainConfig(steps=4, lr=1e-2, batch_size=2, seq_len=64, grad_checkpointing=True))
        after = heldout_loss(model, w)
        assert len(res.losses) == 4 and all(torch.isfinite(torch.tensor(res.losses)))
        assert after < before
    finally:
        with torch.no_grad():
            for p, s in zip(norm, saved):
                p.copy_(s)
                p.requires_grad_(False)


def test_nothing_trainable_is_refused(small_model):
    w = text_windows(small_model.tokenizer, "wiki-calibration", 32, max_windows=1)
    with pytest.raises(LowbitError, match="requires_grad"):
        train(small_model.model, w, TrainConfig(steps=1, seq_len=32))
