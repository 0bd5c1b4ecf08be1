"""MadaCos and the local triplet loss under real torch.distributed (2 gloo processes on CPU).

One spawn runs every scenario (process start-up dominates the cost); each rank writes its
results with torch.save and the test compares them with one process on the same global batch.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import cfcd.losses as L

WORLD = 2
DIM, CLASSES, IN = 8, 20, 12
STAT_KEYS = ("scale", "margin", "median_cos", "log_b_median", "raw_margin")


class Embedder(nn.Module):
    """A tiny model + MadaCos head whose forward returns the loss, as a training step would."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, DIM)
        self.head = L.MadaCos(DIM, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x), y)


class LocalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.loss = L.LocalTripletLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(self.conv(x).relu(), tuple_size=4)


def make_problem(seed: int = 0):
    """A model and a global batch of 16 whose embeddings sit near their class weights (m > 0)."""
    torch.manual_seed(seed)
    net = Embedder()
    x = torch.randn(16, IN)
    y = torch.randint(0, CLASSES, (16,))
    with torch.no_grad():
        net.head.weight[y] = F.normalize(net.fc(x), dim=1) + 0.4 * torch.randn(16, DIM)
    return net, x, y


def make_local_problem(seed: int = 1):
    """Rank 0's 2 tuples have planted matches; rank 1's images are constant (no match at all)."""
    torch.manual_seed(seed)
    net = LocalNet()
    with torch.no_grad():
        net.conv.bias.fill_(0.1)
    img = torch.rand(8, 3, 6, 6)
    for t in (0, 4):
        img[t + 1] = img[t].flip(-1) + 0.02 * torch.rand(3, 6, 6)
    flat = torch.full((8, 3, 6, 6), 0.5)
    return net, torch.cat([img, flat])


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        out: dict[str, torch.Tensor] = {}
        # 1. real DDP, equal local batches of 8
        net, x, y = make_problem()
        ddp = nn.parallel.DistributedDataParallel(net)
        lo, hi = rank * 8, rank * 8 + 8
        ddp(x[lo:hi], y[lo:hi]).backward()
        out.update({f"ddp.grad.{k}": v for k, v in grads(net).items()})
        out.update({f"ddp.stat.{k}": torch.tensor(v) for k, v in net.head.last_stats.items()})

        # 2. unequal local batches (7 + 9), head only, gradient w.r.t. the embeddings; the batch is
        # rolled so that the median sample (index 2 before) lives on rank 1 this time
        net, x, y = make_problem()
        x, y = x.roll(8, 0), y.roll(8, 0)
        split = 7
        lo, hi = (0, split) if rank == 0 else (split, 16)
        emb = net.fc(x).detach()[lo:hi].requires_grad_()
        net.head(emb, y[lo:hi]).backward()
        out["uneq.emb_grad"] = emb.grad
        out["uneq.weight_grad"] = net.head.weight.grad
        out.update({f"uneq.stat.{k}": torch.tensor(v) for k, v in net.head.last_stats.items()})

        # 3. eval mode: adaptive scale from the global batch, zero margin
        net.head.eval()
        with torch.no_grad():
            net.head(net.fc(x)[rank * 8 : rank * 8 + 8], y[rank * 8 : rank * 8 + 8])
        out.update({f"eval.stat.{k}": torch.tensor(v) for k, v in net.head.last_stats.items()})

        # 4. an empty local batch on rank 0 (statistics only; CE of an empty batch is undefined)
        net, x, y = make_problem()
        lo, hi = (0, 0) if rank == 0 else (0, 16)
        st = L.madacos_statistics(net.head.cosine(net.fc(x[lo:hi])), y[lo:hi], alpha=0.02)
        out.update({f"empty.stat.{k}": v.detach().clone() for k, v in st.as_dict().items()})

        # 5. DDP with the local triplet loss; rank 1 has no match but its graph stays connected
        lnet, imgs = make_local_problem()
        lddp = nn.parallel.DistributedDataParallel(lnet)
        loss = lddp(imgs[rank * 8 : rank * 8 + 8])
        loss.backward()
        out["local.loss"] = loss.detach()
        out["local.matches"] = torch.tensor(lnet.loss.last_stats["matches"])
        out.update({f"local.grad.{k}": v for k, v in grads(lnet).items()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # the DDP reducers hold the group: release them, and let no rank close its sockets while
        # the other still talks, before the group goes
        del ddp, lddp
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown once the results are on disk: gloo threads still alive
    # there can abort the process (SIGABRT, seen once on CI; pytorch/pytorch PR 179291).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("the 2-process gloo run did not finish in 180 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_statistics_equal_single_process(ranks):
    net, x, y = make_problem()
    net(x, y)
    single = net.head.last_stats
    assert single["margin"] > 0  # the margin branch is exercised
    # the median sample sits on rank 0 in the DDP run and on rank 1 in the unequal (rolled) run,
    # so each rank has received log B from the other once
    idx = int(L.madacos_statistics(net.head.cosine(net.fc(x)), y, alpha=0.02).median_index)
    assert idx < 7 and idx + 8 >= 7
    for r in ranks:
        for k in STAT_KEYS:
            assert float(r[f"ddp.stat.{k}"]) == pytest.approx(single[k], rel=1e-6, abs=1e-7), k
            assert float(r[f"uneq.stat.{k}"]) == pytest.approx(single[k], rel=1e-6, abs=1e-7), k


def test_ddp_gradients_equal_single_process(ranks):
    net, x, y = make_problem()
    net(x, y).backward()  # mean over the global 16 = average over ranks of the local means
    single = grads(net)
    for r in ranks:  # DDP already averaged: both ranks hold the same gradient
        for k, g in single.items():
            torch.testing.assert_close(r[f"ddp.grad.{k}"], g, atol=1e-6, rtol=1e-5)


def test_unequal_local_batches_gradients(ranks):
    net, x, y = make_problem()
    x, y = x.roll(8, 0), y.roll(8, 0)
    emb = net.fc(x).detach().requires_grad_()
    net.head(emb, y).backward()
    # each rank's loss is its local mean: weight its gradient by n_r / N to get the global mean
    n0, n1 = 7, 9
    torch.testing.assert_close(ranks[0]["uneq.emb_grad"] * n0 / 16, emb.grad[:n0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[1]["uneq.emb_grad"] * n1 / 16, emb.grad[n0:], atol=1e-6, rtol=1e-5)
    combined = (ranks[0]["uneq.weight_grad"] * n0 + ranks[1]["uneq.weight_grad"] * n1) / 16
    torch.testing.assert_close(combined, net.head.weight.grad, atol=1e-6, rtol=1e-5)


def test_empty_local_batch_statistics(ranks):
    net, x, y = make_problem()
    single = L.madacos_statistics(net.head.cosine(net.fc(x)), y, alpha=0.02).as_dict()
    for r in ranks:
        for k in STAT_KEYS:
            assert float(r[f"empty.stat.{k}"]) == pytest.approx(float(single[k]), rel=1e-6, abs=1e-7), k


def test_eval_mode_statistics_are_global(ranks):
    net, x, y = make_problem()
    net.head.eval()
    with torch.no_grad():
        net(x, y)
    single = net.head.last_stats
    for r in ranks:
        assert float(r["eval.stat.scale"]) == pytest.approx(single["scale"], rel=1e-6)
        assert float(r["eval.stat.margin"]) == 0.0
        assert float(r["eval.stat.median_cos"]) == pytest.approx(single["median_cos"], abs=1e-7)


def test_local_triplet_ddp_graph_stays_connected(ranks):
    assert float(ranks[0]["local.matches"]) > 0 and float(ranks[0]["local.loss"]) > 0
    assert float(ranks[1]["local.matches"]) == 0 and float(ranks[1]["local.loss"]) == 0
    lnet, imgs = make_local_problem()
    lnet(imgs[:8]).backward()  # rank 1 contributes zero gradients; DDP averages over 2 ranks
    for k, g in grads(lnet).items():
        assert g.abs().sum() > 0
        for r in ranks:
            torch.testing.assert_close(r[f"local.grad.{k}"], g / WORLD, atol=1e-6, rtol=1e-5)
