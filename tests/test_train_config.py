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


def _leaves(d, prefix=()):
    """(key path, value) of every leaf of a nested dict from a yaml file."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(obj, path):
    for k in path:
        obj = obj[k] if isinstance(obj, dict) else getattr(obj, k)
    return obj


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a == {} and b == {})


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds(name, tiny_checkpoint):
    """Each experiment composes with Hydra, converts to the typed config with every value its yaml (and its model
    group's yaml) sets, and builds the model that config describes."""
    path = os.path.join(CONF, "experiment", f"{name}.yaml")
    header = open(path).read().split("\n# Expect")[0]
    assert f"python -m train experiment={name}" in header  # each header states its command and expectation
    over = [f"experiment={name}"]
    if name == "ocr_finetune":
        over += [f"model.path={tiny_checkpoint}", "data.train=/nonexistent.jsonl"]
    cfg = _compose(over)
    assert isinstance(cfg, Config) and cfg.name == name
    yaml = OmegaConf.load(path)
    groups = [d["override /model"] for d in yaml.get("defaults", []) if "override /model" in d]
    expected = OmegaConf.merge(*({"model": OmegaConf.load(os.path.join(CONF, "model", f"{g}.yaml"))} for g in groups),
                               {k: v for k, v in yaml.items() if k != "defaults"})
    on_command_line = {o.split("=")[0] for o in over[1:]}
    for key, value in _leaves(OmegaConf.to_container(expected, resolve=True)):
        if ".".join(key) not in on_command_line:
            assert _same(_get(cfg, key), value), (name, key, _get(cfg, key), value)
    m = build_model(cfg.model)
    assert m.training
    built = m.config.replace(attn_backend=model_config(cfg.model).attn_backend)
    if cfg.model.path:  # the checkpoint's own config, whatever the preset says
        from model import Qwen3VLConfig

        assert built == Qwen3VLConfig.from_file(tiny_checkpoint)
    else:
        assert built == model_config(cfg.model)
        for part in ("text", "vision"):
            for key, value in _leaves(getattr(cfg.model, part)):
                assert _same(_get(getattr(m.config, part), key), value), (part, key)


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


LATE_FAILURES = [
    ("train.log_every=0", "train.log_every"),
    ("train.eval_max_new_tokens=-1", "train.eval_max_new_tokens"),
    ("train.eval_max_new_tokens=0", "train.eval_max_new_tokens"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("train.save_every=-2", "train.save_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.eval_samples=-1", "train.eval_samples"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.max_time_s=-5", "train.max_time_s"),
    ("train.stop_after_steps=-1", "train.stop_after_steps"),
    ("train.num_threads=-1", "train.num_threads"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.eps=0", "optim.eps"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("train.lora.dropout=1.0", "train.lora.dropout"),
    ("train.lora.alpha=0", "train.lora.alpha"),
    ("data.max_seq_len=0", "data.max_seq_len"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.prefetch_factor=0", "data.prefetch_factor"),
    ("data.group_size=0", "data.group_size"),
    ("data.max_samples_per_batch=-1", "data.max_samples_per_batch"),
    ("data.image_min_pixels=0", "data.image_min_pixels"),
    ("data.image_max_pixels=100", "data.image_max_pixels"),
    ("data.video_fps=0", "data.video_fps"),
    ("data.video_max_frames=0", "data.video_max_frames"),
    ("train.eval_metric=map", "train.eval_metric"),
    ("data.grounding.objects=[3,16]", "data.grounding.objects"),   # a 4 x 4 grid has no free cell left
    ("data.grounding.prompt=where", "data.grounding.prompt"),
]


@pytest.mark.parametrize("override, key", LATE_FAILURES, ids=[o for o, _ in LATE_FAILURES])
def test_values_that_would_fail_late_fail_at_startup(override, key):
    """A value that crashes after step 1, after all the training, or silently does nothing fails when the config
    is built, naming its key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose([override])
