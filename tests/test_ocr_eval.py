"""The OCR evaluation (eval/ocr.py, `python -m eval task=ocr`): on a checkpoint exported by a short CPU training run it
reproduces the CER the trainer logged on the same validation set, and with a base and a fine-tuned checkpoint it
writes the side-by-side table, the HTML report and the JSON results."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from eval.__main__ import CONF_DIR
from eval.ocr import OCRConfig, run_ocr
from eval.run import EvalConfig, run
from model.build import build_model, config_from_dict
from model.config import ConfigError
from train.export import export
from train.trainer import train

from .test_train_common import chatty_model, ocr_set, small_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        from omegaconf import OmegaConf

        return config_from_dict(OmegaConf.to_container(compose("eval", overrides=overrides), resolve=True),
                                EvalConfig)


def test_task_ocr_selects_the_ocr_evaluation():
    cfg = _compose(["task=ocr", "ocr.checkpoints=[a,b]", "ocr.data=set.jsonl", "ocr.out_dir=o"])
    assert cfg.ocr == OCRConfig(checkpoints=("a", "b"), data="set.jsonl", out_dir="o")
    assert _compose([]).ocr is None                      # the needle tasks are untouched
    with pytest.raises(ConfigError, match="ocr.checkpoints"):
        _compose(["task=ocr", "ocr.data=set.jsonl"])


def test_ocr_eval_reproduces_training_cer_and_compares_checkpoints(tmp_path):
    data = ocr_set(tmp_path, n_train=48, n_val=6, seed=1)
    n_new = 4
    cfg = small_config(data, tmp_path / "run", train={"steps": 40, "export": True, "eval_samples": 6,
                                                      "eval_max_new_tokens": n_new}, optim={"lr": 1e-2})
    res = train(cfg)
    logged = res["evals"][-1]["cer"]
    assert res["evals"][-1]["step"] == 40 and logged is not None
    # a "base" checkpoint: the same architecture untrained, exported the same way (same budgets)
    torch.manual_seed(5)
    base_dir = export(build_model(cfg.model), tmp_path / "base" / "final", cfg)
    out = tmp_path / "ocr_out"
    result = run(_compose(["task=ocr", f"ocr.checkpoints=[{base_dir},{res['final_dir']}]", "ocr.names=[base,tuned]",
                           f"ocr.data={data['val']}", f"ocr.max_new_tokens={n_new}", f"ocr.out_dir={out}",
                           "ocr.n_boot=50", "ocr.worst=3", "device=cpu"]))
    base, tuned = result["checkpoints"]
    # the trainer's number, to the last bit: same prompts, budgets, batches of 32, greedy, answer budget
    assert tuned["metrics"]["raw"]["cer_codepoints"] == logged
    assert tuned["budgets"]["image_min_pixels"] == cfg.data.image_min_pixels
    assert tuned["metrics"]["raw"]["cer"] < base["metrics"]["raw"]["cer"], (tuned["predictions"], base["predictions"])
    # results.json round-trips; the table has one column per checkpoint and the per-script rows
    saved = json.loads((out / "results.json").read_text())
    assert saved["references"] == [json.loads(line)["messages"][1]["content"][0]["text"]
                                   for line in open(data["val"])]
    md = (out / "results.md").read_text()
    assert "| metric | base | tuned |" in md and "| Common | 6 |" in md
    assert f"{logged:.4f}" in md
    # the report: the 3 worst samples of the last checkpoint, each with its image embedded and the reference
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    worst = sorted(range(6), key=lambda i: (-tuned["samples"][i]["raw"]["cer"], i))[:3]
    for i in worst:
        assert f"<h3>#{i} " in page and saved["references"][i] in page
    ci = tuned["metrics"]["raw"]["ci"]["cer"]
    assert ci[0] <= tuned["metrics"]["raw"]["cer"] <= ci[1]


def test_ocr_eval_equals_the_trainers_validation_on_nonempty_answers(tmp_path):
    """A short CPU run answers "" to everything (CER 1.0 in both, above), so the exact match is also checked where the
    answers are non-trivial: a model with large random weights, scored by the trainer's own `evaluate`, exported,
    then evaluated by eval/ocr.py with the same answer budget."""
    from model import load_processor
    from train.data import ChatEncoder, SFTDataset
    from train.step import evaluate

    data = ocr_set(tmp_path, n_train=4, n_val=5, seed=2)
    cfg = small_config(data, tmp_path / "run", train={"eval_samples": 5, "eval_max_new_tokens": 6})
    model = chatty_model(cfg)
    proc = load_processor(None)
    val = SFTDataset(data["val"], ChatEncoder(proc, model.config, cfg.data))
    want = evaluate(model, val, cfg, "cpu", proc.tokenizer)
    ckpt = export(model, tmp_path / "final", cfg)
    got = run_ocr(OCRConfig(checkpoints=(str(ckpt),), data=data["val"], max_new_tokens=6, n_boot=0,
                            out_dir=str(tmp_path / "o")))["checkpoints"][0]
    assert any(p for p, _ in want["examples"])              # non-empty answers
    assert got["metrics"]["raw"]["cer_codepoints"] == want["cer"] and 0 < want["cer"]
    # the grapheme CER differs here: the random answers hold Thai vowel signs (2 code points, 1 grapheme each)
    assert got["metrics"]["raw"]["cer"] < want["cer"]
    assert list(zip(got["predictions"][:4], [r for _, r in want["examples"]])) == want["examples"]


def test_ocr_config_rejects_mismatched_names():
    with pytest.raises(ConfigError, match="names"):
        OCRConfig(checkpoints=("a", "b"), names=("x",), data="d.jsonl")
