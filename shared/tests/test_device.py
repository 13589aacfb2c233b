"""Device placement: the frozen classifier and the metrics' tensor maths run on "meta".

The meta device stands in for CUDA: see shared/testing.py (META, on_meta).
"""

import pytest
import torch
import torch.nn.functional as F

from shared.classifier import MNISTClassifier
from shared.metrics import knn_radii, parzen_log_likelihood, precision_recall
from shared.testing import META, on_meta

ITEM_ON_META = r"item\(\) cannot be called on meta tensors"  # the error of the first .item(), not of a device mix


@pytest.fixture
def features():
    return torch.empty(6, 128, device=META), torch.empty(5, 128, device=META)  # real, fake


def test_classifier_trains_and_predicts_on_meta():
    model = MNISTClassifier().to(META)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.empty(4, 1, 28, 28, device=META), torch.zeros(4, dtype=torch.long, device=META)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert on_meta(loss, *(p.grad for p in model.parameters()), *model.buffers())  # batch norm's statistics too
    assert on_meta(model.eval().features(x), model(x))


def test_knn_radii_on_meta(features):
    assert on_meta(knn_radii(features[0], k=3, chunk=4))  # two chunks


def test_precision_recall_runs_on_meta_up_to_its_item(features):
    real, fake = features
    with pytest.raises(RuntimeError, match=ITEM_ON_META):  # everything before the final .item() ran on meta
        precision_recall(real, fake, k=3, chunk=4)


def test_parzen_log_likelihood_runs_on_meta_up_to_its_item():
    samples, test, validation = (torch.empty(n, 1, 28, 28, device=META) for n in (5, 4, 3))
    with pytest.raises(RuntimeError, match=ITEM_ON_META):  # the validation scores of each sigma, then .item()
        parzen_log_likelihood(samples, test, validation, sigmas=(0.1, 0.2), chunk=2)
