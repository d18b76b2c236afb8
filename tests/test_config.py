"""The config schema (cvt_train/config.py): every field refuses a value of the wrong type in one line naming the
key, before anything runs; stored checkpoint configs stay plain data, old ones (missing newer keys) still load."""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from omegaconf import OmegaConf

import cvt_train
from cvt_train import cli
from cvt_train import eval as eval_module
from cvt_train.config import SCHEMAS
from cvt_train.schema import _unwrap

STAGES = 3  # every model preset has three stages


def wrong_value(tp) -> str | None:
    """An override value of the wrong type for a field of type `tp` (None: nothing is wrong for it)."""
    inner, _ = _unwrap(tp)
    if inner is bool:
        return "maybe"
    if inner in (int, float):
        return "abc"
    if inner is str:
        return "[1,2]"
    if typing.get_origin(inner) is list:
        return "abc"
    return None  # Dict[str, Any] (ablation): free-form


def leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, wrong value) for every leaf field of a schema dataclass, list-of-dataclass items included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        inner = _unwrap(tp)[0]
        item = (typing.get_args(inner) or [None])[0] if typing.get_origin(inner) is list else None
        if dataclasses.is_dataclass(inner):
            out += leaf_keys(inner, key + ".")
            if prefix:  # (top-level mappings are config groups: `model=3` names an option, tested in test_cli)
                out.append((key, "3"))  # a scalar where a mapping belongs
        elif item is not None and dataclasses.is_dataclass(item):
            for i in range(STAGES):
                out += leaf_keys(item, f"{key}.{i}.")
            out.append((key, "abc"))
        elif wrong_value(tp) is not None:
            out.append((key, wrong_value(tp)))
    return out


CASES = [(app, key, value) for app, cls in SCHEMAS.items() for key, value in leaf_keys(cls)]


@pytest.mark.parametrize("app,key,value", CASES, ids=[f"{a}:{k}" for a, k, _ in CASES])
def test_every_field_refuses_a_wrong_type_in_one_line(app, key, value, monkeypatch, capsys):
    args = [f"{key}={value}"] + (["ckpt=x.pt"] if app == "eval" and key != "ckpt" else [])
    monkeypatch.setattr(sys, "argv", [f"cvt-{app}", *args])
    for name in ("HYDRA_FULL_ERROR", "CVT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.check_overrides(app)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {key}=") and ": expected " in err, err


def test_range_phrase_comes_from_the_field_metadata():
    from cvt_train.config import TrainConfig
    from cvt_train.schema import expected_text, lookup

    assert expected_text(*lookup(TrainConfig, "trainer.epochs")) == "an integer >= 1"
    assert expected_text(*lookup(TrainConfig, "optim.lr")) == "a number >= 0 or null"
    assert expected_text(*lookup(TrainConfig, "trainer.ema.decay")).startswith("a number in [0, 1) (e.g. 0.9998")
    assert expected_text(*lookup(TrainConfig, "model.stages[1].depth")) == "an integer >= 1"
    assert expected_text(*lookup(TrainConfig, "aug.hflip")) == "a number in [0, 1]"
    assert lookup(TrainConfig, "trainer.epoch") is None


def test_groups_are_values_over_the_schema():
    cfg = compose_train(["experiment=ablation_embed"])
    assert OmegaConf.get_type(cfg.trainer).__name__ == "TrainerConfig"
    assert cfg.model.stages[0].mlp_ratio == 4.0  # a key the recipe leaves out: StageConfig's default
    assert cfg.model.num_classes == cfg.data.num_classes == 10  # ${data.num_classes}
    assert compose_train(["debug=overfit"]).data.train_subset == 128  # ${data.batch_size}


def test_old_checkpoint_config_missing_newer_keys_still_evaluates(tmp_path, monkeypatch, capsys):
    """A checkpoint written before trainer.compile_mode / tf32 / dist_timeout_min (and data.cache_dir) existed:
    its stored config is read as plain data, never merged into the schema as a whole."""
    root = write_cifar10_python(tmp_path / "cifar", n_train=20, n_test=20)
    cfg = OmegaConf.to_container(
        compose_train(
            ["model=cvt_cifar_tiny", "data=cifar10", f"data.root={root}", "data.num_workers=0", "data.batch_size=10"]
        ),
        resolve=True,
    )
    for key in ("compile_mode", "tf32", "dist_timeout_min"):
        del cfg["trainer"][key]
    del cfg["data"]["cache_dir"]
    model = cvt_train.create_model(cfg["model"])
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 1}, tmp_path / "old.pt")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "cvt-eval",
            f"ckpt={tmp_path / 'old.pt'}",
            "eval.progress=false",
            "trainer.precision=fp32",
            "trainer.device=cpu",
            f"hydra.run.dir={tmp_path / 'e'}",
        ],
    )
    for name in ("HYDRA_FULL_ERROR", "CVT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    eval_module.main()
    result = json.loads(Path(tmp_path / "e" / "eval.json").read_text())
    assert result["images"] == 20 and result["model"] == "cvt_cifar_tiny"
    assert eval_module.load_model(tmp_path / "old.pt").cfg.name == "cvt_cifar_tiny"
