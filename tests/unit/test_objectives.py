"""The learner's objectives on a one-layer policy: draws are the batch seed's, micro-batches accumulate to
the whole batch's gradient, NFT's old policy enters, and incomplete batches fail naming what is missing."""

from __future__ import annotations

import pytest
import torch

from actors.objectives import OBJECTIVES, Drawn, accumulate, draws
from actors.records import TrainBatch
from policy import losses as L


class _Conv:
    """Policies over a 1x1 convolution that ignores σ and the text; slots are frozen copies of it."""

    def __init__(self, slots: dict[str, torch.nn.Conv2d] | None = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 3, 1)
        self.slots = slots or {}
        self.device = torch.device("cpu")

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.net(x)

    def slot_velocity(
        self, slot: str, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        if slot not in self.slots:
            return None
        with torch.no_grad():
            return self.slots[slot](x)

    def grads(self) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in self.net.parameters() if p.grad is not None])


def _batch(kind: str = "fm", b: int = 8, **kw: object) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    return TrainBatch(
        kind=kind,  # type: ignore[arg-type]
        policy_version=0,
        x0=torch.randn(b, 3, 4, 4, generator=g),
        text=torch.randn(b, 2, 5, generator=g),
        text_mask=torch.ones(b, 2, dtype=torch.bool),
        seed=7,
        **kw,  # type: ignore[arg-type]
    )


def _run(pol: _Conv, cfg: L.LossConfig, batch: TrainBatch, micro: int) -> L.Metrics:
    drawn_all = draws(batch, cfg)
    total: L.Metrics = {}
    n = len(batch)
    for start in range(0, n, micro):
        sl = slice(start, min(start + micro, n))
        weight = (sl.stop - sl.start) / n
        drawn: Drawn = {k: v[:, sl] for k, v in drawn_all.items()}
        accumulate(total, OBJECTIVES[batch.kind](pol, cfg, batch, sl, drawn, weight), weight)
    return total


def test_draws_come_from_the_batch_seed_with_k_noise_levels_for_nft() -> None:
    cfg = L.LossConfig(nft=L.NFTConfig(num_sigmas=3))
    nft = draws(_batch("nft", advantages=torch.zeros(8)), cfg)
    assert nft["sigma"].shape == (3, 8) and nft["noise"].shape == (3, 8, 3, 4, 4)
    assert bool(((nft["sigma"] > 0) & (nft["sigma"] < 1)).all())
    again = draws(_batch("nft", advantages=torch.zeros(8)), cfg)
    assert torch.equal(nft["noise"], again["noise"]) and torch.equal(nft["sigma"], again["sigma"])
    other = _batch("nft", advantages=torch.zeros(8))
    other.seed = 8
    assert not torch.equal(draws(other, cfg)["noise"], nft["noise"])
    assert draws(_batch(), cfg)["sigma"].shape == (1, 8)
    assert draws(_batch("grpo"), cfg) == {}


@pytest.mark.parametrize("kind", ["fm", "nft"])
def test_micro_batches_accumulate_to_the_whole_batch_gradient(kind: str) -> None:
    cfg = L.LossConfig(nft=L.NFTConfig(num_sigmas=2, kl_weight=0.0))
    adv = torch.linspace(-1, 1, 8)
    batch = _batch(kind, advantages=adv) if kind == "nft" else _batch(kind)
    whole, parts = _Conv(), _Conv()
    for pol in (whole, parts):  # NFT's old policy: a frozen copy, as the learner keeps it
        pol.slots["old"] = torch.nn.Conv2d(3, 3, 1).requires_grad_(False)
        pol.slots["old"].load_state_dict(pol.net.state_dict())
    m_whole = _run(whole, cfg, batch, micro=8)
    m_parts = _run(parts, cfg, batch, micro=3)  # 3 + 3 + 2: unequal micro-batches weighted by size
    torch.testing.assert_close(parts.grads(), whole.grads(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_parts["loss"], m_whole["loss"], rtol=1e-5, atol=1e-6)
    assert float(whole.grads().abs().sum()) > 0


def test_fm_gradient_is_the_velocity_mse_gradient() -> None:
    cfg, batch, pol = L.LossConfig(), _batch(), _Conv()
    _run(pol, cfg, batch, micro=8)
    d = draws(batch, cfg)
    ref = _Conv()
    sigma, noise = d["sigma"][0], d["noise"][0]
    loss = ((ref.net(L.noised(batch.x0, noise, sigma)) - (noise - batch.x0)) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(pol.grads(), ref.grads(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "missing"),
    [("nft", "advantages"), ("grpo", "trajectory"), ("dpo", "x0_rejected")],
)
def test_a_batch_without_its_kinds_fields_fails_naming_them(kind: str, missing: str) -> None:
    cfg, batch = L.LossConfig(), _batch(kind)
    drawn = {k: v[:, :4] for k, v in draws(batch, cfg).items()}
    with pytest.raises(ValueError, match=missing):
        OBJECTIVES[kind](_Conv(), cfg, batch, slice(0, 4), drawn, 1.0)
