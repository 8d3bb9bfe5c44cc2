"""Hydra config tree (conf/) -> typed dataclasses (train/config.py): every experiment composes and builds,
command-line overrides reach the dataclasses, unknown keys and bad values fail loudly."""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model.build import build_model, model_config
from train.config import Config, ConfigError, config_from_dict

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return config_from_dict(OmegaConf.to_container(cfg, resolve=True))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from model import Qwen3VL, preset, save_pretrained

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    save_pretrained(Qwen3VL(preset("tiny")), d)
    return str(d)


def test_experiments_exist():
    assert {"ocr_demo", "ocr_finetune"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds(name, tiny_checkpoint):
    header = open(os.path.join(CONF, "experiment", f"{name}.yaml")).read().split("\n# Expect")[0]
    assert f"python -m train experiment={name}" in header  # each header states its command and expectation
    over = [f"experiment={name}"]
    if name == "ocr_finetune":
        over += [f"model.path={tiny_checkpoint}", "data.train=/nonexistent.jsonl"]
    cfg = _compose(over)
    assert isinstance(cfg, Config) and cfg.name == name
    m = build_model(cfg.model)
    assert m.training and sum(p.numel() for p in m.parameters()) > 0
    if name == "ocr_demo":
        assert cfg.data.ocr.enabled and m.config.text.hidden_size == cfg.model.text.get("hidden_size", 128)


def test_overrides_reach_the_dataclasses():
    cfg = _compose(["experiment=ocr_demo", "optim.lr=0.5", "train.freeze.vision=true", "data.token_budget=4096",
                    "model.text.num_hidden_layers=1", "parallel=fsdp", "train.lora.target_modules=[q_proj]"])
    assert cfg.optim.lr == 0.5 and cfg.train.freeze.vision and cfg.data.token_budget == 4096
    assert cfg.parallel.strategy == "fsdp" and cfg.train.lora.target_modules == ("q_proj",)
    assert model_config(cfg.model).text.num_hidden_layers == 1
    assert cfg.train.out_dir == "runs/ocr_demo"  # interpolated from name


def test_unknown_keys_and_bad_values_fail_loudly():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["train.stepz=3"])                       # Hydra: not in struct
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\] in train"):
        _compose(["+train.stepz=3"])                      # added anyway: the dataclass conversion rejects it
    with pytest.raises(ConfigError, match="train.steps must be an int"):
        _compose(["train.steps=many"])
    with pytest.raises(ConfigError, match="train.mode='qlora'"):
        _compose(["train.mode=qlora"])
    with pytest.raises(ConfigError, match="optim.module_lr"):
        _compose(["+optim.module_lr.visoin=1e-5"])
    with pytest.raises(ValueError, match="unknown field model.text.hidden"):
        model_config(config_from_dict({"model": {"text": {"hidden": 3}}}).model)
