import torch

import gyrodrop


def test_import_and_forward_keeps_shape():
    drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
    assert drop(torch.ones(4, 3)).shape == (4, 3)
