import torch

import gyrodrop


def test_import_and_forward_gives_scaled_group_masks():
    # 4 rows, 2 subnetworks at once: rows 0-1 share one mask, rows 2-3 another; kept
    # values are exactly 1/(1-p), dropped ones 0, and eval() is the identity.
    drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=3)
    y = drop(torch.ones(4, 64))
    assert y.shape == (4, 64)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])
    assert not torch.equal(y[0], y[2])
    assert 16 <= int((y == 0).sum(1)[0]) <= 48  # Binomial(64, 1/2): 8 sd either side
    assert int(drop.step) == 1
    x = torch.randn(4, 64)
    assert torch.equal(drop.eval()(x), x)
