"""The strict recipe loader: errors name the dotted path; overrides are typed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from orchestrator.schema import ConfigError, from_dict, set_path, to_dict


@dataclass(kw_only=True, slots=True)
class Optim:
    lr: float = field(default=1e-4, metadata={"gt": 0.0})
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(kw_only=True, slots=True)
class Learner:
    optim: Optim = field(default_factory=Optim)
    kind: Literal["adamw", "came"] = "adamw"
    ranks: int = field(default=1, metadata={"ge": 1})
    lora_rank: int | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class Root:
    name: str
    learner: Learner = field(default_factory=Learner)
    extra: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.name == "bad":
            raise ValueError("name: may not be 'bad'")


def test_round_trip_and_defaults() -> None:
    cfg = from_dict(Root, {"name": "x", "learner": {"optim": {"lr": 1}, "lora_rank": 4, "tags": ["a"]}})
    assert cfg.learner.optim.lr == 1.0 and isinstance(cfg.learner.optim.lr, float)
    assert cfg.learner.lora_rank == 4 and cfg.learner.kind == "adamw"
    assert from_dict(Root, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "learner": {"optim": {"lr": "fast"}}}, "learner.optim.lr: expected float, got 'fast'"),
        ({"name": "x", "learner": {"optimm": {}}}, "learner.optimm: unknown key"),
        ({"name": "x", "learner": {"kind": "sgd"}}, "learner.kind: expected one of 'adamw' | 'came'"),
        ({"name": "x", "learner": {"ranks": 0}}, "learner.ranks: must be >= 1"),
        ({"name": "x", "learner": {"optim": {"lr": -1.0}}}, "learner.optim.lr: must be > 0.0"),
        ({"name": "x", "learner": {"ranks": True}}, "learner.ranks: expected int"),
        ({"name": "x", "learner": {"tags": ["a", 3]}}, "learner.tags[1]: expected str"),
        ({"name": "x", "learner": {"optim": {"betas": [0.9]}}}, "learner.optim.betas"),
        ({"name": "bad"}, "name: may not be 'bad'"),
        ({}, "missing 1 required keyword-only argument: 'name'"),
    ],
)
def test_errors_name_the_dotted_path(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Root, data)
    assert message in str(err.value)


def test_overrides_are_parsed_as_yaml_then_type_checked() -> None:
    data: dict[str, object] = {"name": "x"}
    set_path(data, "learner.optim.lr", "3e-5")
    set_path(data, "learner.lora_rank", "null")
    cfg = from_dict(Root, data)
    assert cfg.learner.optim.lr == pytest.approx(3e-5) and cfg.learner.lora_rank is None
    set_path(data, "learner.ranks", "two")
    with pytest.raises(ConfigError, match=r"learner\.ranks: expected int, got 'two'"):
        from_dict(Root, data)
