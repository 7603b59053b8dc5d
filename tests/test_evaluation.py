"""The one prediction rule and the one evaluation loop: training's accuracy, validation, test, ``evaluate`` and
``predict`` all name the same class for the same output, and the evaluation's numbers agree with each other and with
the data-parallel reduction."""

from __future__ import annotations

import pytest
import torch

from nnbackprop.evaluation import class_probabilities, evaluate, num_correct, predicted_classes
from nnbackprop.layers import Dropout, Flatten, Linear, ReLU
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss
from nnbackprop.model import Sequential


@pytest.mark.parametrize("shape", [(64, 5), (64, 2), (64, 1), (64,)], ids=["5-logits", "2-logits", "one-logit-N1",
                                                                            "one-logit-N"])
def test_the_predicted_class_is_the_most_probable_one(shape):
    g = torch.Generator().manual_seed(0)
    output = torch.randn(shape, generator=g).round()  # many exact ties and zeros among the logits
    output[:4] = 0  # all logits equal; one logit of 0: p = 1/2 for each class
    predicted = predicted_classes(output)
    assert predicted.dtype == torch.int64 and predicted.shape == (shape[0],)
    assert torch.equal(predicted, class_probabilities(output).argmax(1))
    assert torch.equal(predicted, class_probabilities(output.double()).argmax(1))
    assert int(num_correct(output, predicted)) == shape[0]
    if len(shape) == 1 or shape[1] == 1:
        assert torch.equal(predicted[:4], torch.zeros(4, dtype=torch.int64))  # a logit of 0 is class 0
        assert torch.equal(predicted, (output.reshape(-1) > 0).long())


def test_one_logit_at_zero_is_class_0_everywhere():
    output = torch.zeros(3, 1)
    assert predicted_classes(output).tolist() == [0, 0, 0]
    assert class_probabilities(output).tolist() == [[0.5, 0.5]] * 3
    assert int(num_correct(output, torch.tensor([0, 0, 1]))) == 2
    assert int(num_correct(output, torch.tensor([[0.0], [0.4], [0.6]]))) == 2  # float targets: above 1/2 is class 1


def _model(outputs: int = 4) -> Sequential:
    g = torch.Generator().manual_seed(0)
    return Sequential(Flatten(), Linear(12, 16, generator=g, dtype=torch.float64), ReLU(), Dropout(0.5),
                      Linear(16, outputs, generator=g, dtype=torch.float64))


def _batches(n: int, size: int, classes: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(size), y.split(size)))


def test_evaluate_counts_loss_accuracy_and_confusion_in_evaluation_mode():
    model = _model()
    batches = _batches(50, 16)
    scores = evaluate(model, CrossEntropyLoss(), batches, num_classes=4)
    assert model.training  # its mode is put back
    with pytest.raises(RuntimeError, match="without a forward"):  # under no_grad: nothing kept for a backward
        model.backward(torch.zeros(2, 4, dtype=torch.float64))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        output = model.eval()(x)
    model.train()
    predicted = predicted_classes(output)
    assert scores.num_examples == 50
    assert scores.accuracy == (predicted == y).double().mean().item()
    assert scores.loss == pytest.approx(CrossEntropyLoss()(output, y).item(), rel=1e-12)
    confusion = scores.confusion
    assert confusion.shape == (4, 4) and confusion.dtype == torch.int64 and confusion.device.type == "cpu"
    assert int(confusion.sum()) == scores.num_examples
    assert confusion.trace().item() / confusion.sum().item() == scores.accuracy
    assert confusion.sum(1).tolist() == torch.bincount(y, minlength=4).tolist()  # rows: the true classes
    assert confusion.sum(0).tolist() == torch.bincount(predicted, minlength=4).tolist()  # columns: the predicted
    for true, guess in [(0, 0), (1, 2), (3, 1)]:
        assert confusion[true, guess].item() == int(((y == true) & (predicted == guess)).sum())


def test_evaluate_with_one_logit_uses_the_same_rule():
    model = _model(outputs=1)
    batches = _batches(40, 16, classes=2)
    scores = evaluate(model, BCEWithLogitsLoss(), batches, num_classes=2)
    with torch.no_grad():
        predicted = predicted_classes(model.eval()(torch.cat([b[0] for b in batches])))
    y = torch.cat([b[1] for b in batches])
    assert scores.accuracy == (predicted == y).double().mean().item()
    assert scores.confusion.trace().item() == int((predicted == y).sum())


def test_evaluate_reduced_over_ranks_gives_the_whole_split():
    """Two ranks, each with its shard: the reduction sums the loss, the correct and the example counts, so each rank
    gets the scores of the whole split."""
    model = _model()
    batches = _batches(50, 10)
    whole = evaluate(model, CrossEntropyLoss(), batches)
    rank1 = []

    def keep(*sums):  # rank 1's sums, as it would send them
        rank1.extend(sums)
        return sums

    evaluate(model, CrossEntropyLoss(), batches[3:], reduce=keep)
    reduced = evaluate(model, CrossEntropyLoss(), batches[:3],
                       reduce=lambda *sums: tuple(mine + theirs for mine, theirs in zip(sums, rank1)))
    assert reduced.num_examples == whole.num_examples == 50
    assert reduced.accuracy == whole.accuracy
    assert reduced.loss == pytest.approx(whole.loss, rel=1e-12)
    with pytest.raises(ValueError, match="pass num_classes or reduce"):
        evaluate(model, CrossEntropyLoss(), batches, num_classes=4, reduce=keep)
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, CrossEntropyLoss(), [])
