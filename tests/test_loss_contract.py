"""The one training contract of cfcd.losses: ``loss, stats = objective.objective(outputs, labels, layout)``.

Each objective's result is compared with the loss's own low-level call (the one the fidelity tests
compare with the references) on inputs built the way the trainer used to build them by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cfcd.losses as L
from cfcd.train.config import load_config
from cfcd.errors import InputError
from cfcd.train.trainer import TrainModule


def _batch(b=16, d=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g)
    labels = torch.arange(b) % classes
    return emb, labels


def test_every_registered_loss_is_an_objective():
    for name in L.list_losses():
        cls = L._lookup(name)
        assert issubclass(cls, L.Objective), name
        assert cls.log_name.startswith("loss_"), name
    with pytest.raises(TypeError, match="Objective"):
        L.register_loss("not_an_objective", nn.Linear)


def test_classification_heads_objective_is_their_ce_and_reports_top1():
    emb, labels = _batch()
    for name in ("madacos", "arcface", "cosface", "curricularface"):
        torch.manual_seed(0)
        head = L.create_from_recipe(name, {}, embedding_dim=12, num_classes=4)
        twins = []
        for _ in range(2):  # CurricularFace updates its buffer t on every call: one twin per call
            torch.manual_seed(0)
            twins.append(L.create(name, embedding_dim=12, num_classes=4))
        loss, stats = head.objective({"global": emb}, labels, L.BatchLayout())
        torch.testing.assert_close(loss, twins[0](emb, labels), rtol=0, atol=0)
        logits = twins[1].logits(emb, labels)
        assert float(stats["top1"]) == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
        assert set(head.last_stats) <= set(stats) and all(torch.is_tensor(v) for v in stats.values())
    with pytest.raises(InputError, match="num_classes"):
        L.create_from_recipe("madacos", {}, embedding_dim=12, num_classes=None)


def test_madacos_window_statistics_are_the_statistics_of_the_whole_window():
    torch.manual_seed(1)
    head = L.MadaCos(12, 4)
    _, labels = _batch(b=24)
    # close to their class weights, the first micro-batch closer than the rest: its own median
    # target cosine (so its s and m) differs from the window's
    g = torch.Generator().manual_seed(3)
    noise = torch.cat([torch.full((8, 1), 0.05), torch.full((16, 1), 0.3)])
    emb = F.normalize(head.weight.detach(), dim=1)[labels] + noise * torch.randn(24, 12, generator=g)
    parts = [{"global": emb[:8]}, {"global": emb[8:]}]
    (scale, margin), report = head.window_statistics(parts, [labels[:8], labels[8:]])
    whole = head.statistics(head.cosine(emb), labels)
    assert float(scale) == float(whole.scale.float()) and float(margin) == float(whole.margin.float())
    assert float(report["median_cos"]) == float(whole.median_cos)
    # the training forward of one micro-batch uses the window's s and m, not its own
    loss, stats = head.objective({"global": emb[:8]}, labels[:8], L.BatchLayout(), (scale, margin))
    cos = head.cosine(emb[:8])
    onehot = F.one_hot(labels[:8], 4).float()
    torch.testing.assert_close(loss, F.cross_entropy(scale * (cos - margin * onehot), labels[:8]))
    assert float(stats["scale"]) == float(scale)
    own = L.MadaCos(12, 4)
    own.load_state_dict(head.state_dict())
    assert float(own(emb[:8], labels[:8]).detach()) != pytest.approx(float(loss.detach()), rel=1e-3)
    assert float(own.stats["scale"]) > float(scale) > 32.0


def test_ap_objective_ranks_every_image_against_the_rest_of_the_batch():
    emb, labels = _batch(b=10, classes=3)
    ap = L.APLoss(nq=10, min=-1.0, max=1.0)
    loss, _ = ap.objective({"global": emb}, labels, L.BatchLayout())
    d = F.normalize(emb, dim=1)
    rows = [[j for j in range(10) if j != i] for i in range(10)]
    scores = torch.stack([torch.stack([d[i] @ d[j] for j in r]) for i, r in enumerate(rows)])
    same = torch.tensor([[float(labels[i] == labels[j]) for j in r] for i, r in enumerate(rows)])
    torch.testing.assert_close(loss, ap(scores, same), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["triplet", "contrastive"])
def test_tuple_objectives_take_the_tuple_size_from_the_layout(name):
    emb, labels = _batch(b=16)
    loss_fn = L.create(name)
    loss, _ = loss_fn.objective({"global": emb * 3.0}, labels, L.BatchLayout(tuple_size=8))
    torch.testing.assert_close(loss, loss_fn(F.normalize(emb, dim=1), 8))
    with pytest.raises(ValueError, match="data.sampler: tuple"):
        loss_fn.objective({"global": emb}, labels, L.BatchLayout())


def test_local_triplet_objective_leaves_channels_last_maps_untouched():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(8, 16, 5, 5, generator=g).relu()
    cl = maps.contiguous(memory_format=torch.channels_last)
    before = cl.clone()
    loss_fn = L.LocalTripletLoss()
    loss, stats = loss_fn.objective({"local": cl}, torch.zeros(8, dtype=torch.long), L.BatchLayout(tuple_size=8))
    assert torch.equal(cl, before)  # the selection normalises a copy, never the features
    torch.testing.assert_close(loss, loss_fn(maps, tuple_size=8))
    assert set(stats) == {"matches", "active"}
    assert L.LocalTripletLoss.inputs == ("local",)


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 12)

    def forward_features(self, x):
        return {"global": self.fc(x), "local": x[:, :4, None, None].expand(-1, 4, 2, 2).relu()}


class _MeanNorm(L.Objective):
    """A new loss, as docs/extending.md writes it: no trainer edit."""

    log_name = "loss_norm"

    def __init__(self, target: float = 1.0):
        super().__init__()
        self.target = target

    def objective(self, outputs, labels, layout, batch_stats=None):
        norms = outputs["global"].float().norm(dim=1)
        self.stats = {"mean_norm": norms.detach().mean()}
        return L.LossOutput((norms - self.target).pow(2).mean(), self.reported_stats())


L.register_loss("test_mean_norm", _MeanNorm)


def test_train_module_sums_any_registered_objectives():
    torch.manual_seed(0)
    model = _TwoOutputs()
    head = L.create_from_recipe("test_mean_norm", {"target": 2.0}, embedding_dim=12)
    local = L.create("local_triplet")
    module = TrainModule(model, head, local, layout=L.BatchLayout(tuple_size=8), local_weight=0.5, micro_batch=8)
    x, labels = torch.randn(8, 6), torch.zeros(8, dtype=torch.long)
    loss, aux = module(x, labels)
    feats = model.forward_features(x)
    expected_norm = (feats["global"].norm(dim=1) - 2.0).pow(2).mean()
    expected_local = local(feats["local"].float(), tuple_size=8) * 0.5 * 16 / 8
    torch.testing.assert_close(loss, expected_norm + expected_local)
    assert {"loss", "loss_norm", "loss_local", "mean_norm", "matches", "active"} <= set(aux)
    loss.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_recipe_key_batch_stats_keeps_its_old_name():
    assert load_config(None, {"loss": {"madacos_stats": "micro"}}).loss.batch_stats == "micro"
    assert load_config("cfcd_r50_s1", ["loss.madacos_stats=micro"]).loss.batch_stats == "micro"
    assert load_config("cfcd_r50_s1", ["loss.batch_stats=micro"]).loss.batch_stats == "micro"
    with pytest.raises(InputError, match="disagree"):
        load_config(None, {"loss": {"madacos_stats": "micro", "batch_stats": "exact"}})
