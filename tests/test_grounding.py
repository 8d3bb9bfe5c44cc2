"""Referring-expression grounding: the metrics against hand-computed tables (eval/grounding_metrics.py), the synthetic
set (train/grounding_data.py: seeded, boxes on the drawn item, official answer format), `python -m eval
task=grounding` on an exported tiny checkpoint (real generation, then oracle and shifted-box answers scored by hand),
and a two-step `python -m train experiment=grounding_demo` with the grounding validation metric."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import eval.grounding as grounding_eval
from eval.__main__ import CONF_DIR
from eval.grounding import GroundingConfig
from eval.grounding_metrics import box_iou, grounding_metrics, point_in_box, score_sample
from eval.run import EvalConfig, run
from model.build import config_from_dict
from model.config import ConfigError
from model.processing.responses import parse_response
from train.config import GroundingGenConfig
from train.grounding_data import COLORS, generate_grounding_dataset
from train.step import first_box_token_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def _answer(box, label="x"):
    return f'```json\n[\n\t{{"bbox_2d": {json.dumps(box)}, "label": "{label}"}}\n]\n```'


# ----------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("a, b, iou", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),           # half-width shift: 50 shared of 150
    ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),           # diagonal shift: a 5x5 corner
    ([0, 0, 10, 10], [2, 2, 8, 8], 36 / 100),             # contained
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),               # touching edges share no area
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),              # disjoint
    ([0, 0, 4, 10], [0, 0, 10, 4], 16 / (40 + 40 - 16)),  # a cross
    ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),                    # zero area: no union to divide by
], ids=["same", "half-shift", "diagonal", "contained", "touching", "disjoint", "cross", "degenerate"])
def test_box_iou(a, b, iou):
    assert math.isclose(box_iou(a, b), iou, rel_tol=1e-12) and math.isclose(box_iou(b, a), iou, rel_tol=1e-12)


def test_point_in_box_includes_edges():
    box = [10, 20, 30, 40]
    assert point_in_box([10, 20], box) and point_in_box([30, 40], box) and point_in_box([15, 33], box)
    assert not point_in_box([9.9, 30], box) and not point_in_box([20, 40.1], box)


def test_corpus_metrics_on_a_hand_made_table():
    gold = _answer([100, 100, 300, 300])  # 200 x 200
    preds = [
        _answer([100, 100, 300, 300]),                    # exact: IoU 1, hit, centre inside
        _answer([200, 100, 400, 300]),                    # shifted 100: 20000 / 60000, miss; centre x=300 on the edge
        _answer([150, 100, 350, 300]),                    # shifted 50: 30000 / 50000 = 0.6, hit
        "I cannot see it.",                               # no box: 0, miss, miss
        '```json\n[{"point_2d": [150, 150], "label": "x"}]\n```',  # a point: no IoU, but inside the gold box
    ]
    m = grounding_metrics(preds, [gold] * 5)
    assert m["n"] == 5
    assert m["acc50"] == pytest.approx(2 / 5)
    assert m["miou"] == pytest.approx((1 + 1 / 3 + 0.6) / 5)
    assert m["point_acc"] == pytest.approx(4 / 5)
    assert m["parsed"] == pytest.approx(4 / 5)
    # the first box counts; a cut-off answer keeps what was readable
    s = score_sample(_answer([0, 0, 10, 10]) + _answer([100, 100, 300, 300]), gold)
    assert s.iou == 0.0 and s.pred_box == [0, 0, 10, 10]
    s = score_sample('```json\n[\n\t{"bbox_2d": [100, 100, 300, 300], "label": "x"},\n\t{"bbox_2d": [1', gold)
    assert s.hit and s.iou == 1.0
    with pytest.raises(ValueError, match="reference holds no readable bbox_2d"):
        score_sample(gold, "no box here")
    with pytest.raises(ValueError, match="2 predictions vs 1 references"):
        grounding_metrics([gold, gold], [gold])


# ----------------------------------------------------------------------------------------------- the synthetic set
def _small_set(root, n_train=6, n_val=8, seed=0, workers=None, **kw):
    cfg = GroundingGenConfig(enabled=True, n_train=n_train, n_val=n_val, seed=seed, **kw)
    return generate_grounding_dataset(cfg, out_dir=os.path.join(str(root), f"g_{n_train}_{n_val}_{seed}"),
                                      workers=workers)


def test_synthetic_set_is_seeded_in_the_official_format_and_boxes_the_named_item(tmp_path):
    paths = _small_set(tmp_path, n_train=24, n_val=4, seed=3, workers=3)  # three forked processes
    again = generate_grounding_dataset(GroundingGenConfig(enabled=True, n_train=24, n_val=4, seed=3),
                                       out_dir=str(tmp_path / "again"), workers=1)  # in this process
    # the same set for any number of workers: records and every image
    for split in ("train", "val"):
        assert open(paths[split]).read() == open(again[split]).read()
    images = sorted(p.name for p in (tmp_path / "g_24_4_3" / "images").iterdir())
    assert len(images) == 28 and images == sorted(p.name for p in (tmp_path / "again" / "images").iterdir())
    for name in images:
        assert (np.asarray(Image.open(tmp_path / "g_24_4_3" / "images" / name))
                == np.asarray(Image.open(tmp_path / "again" / "images" / name))).all(), name
    other = _small_set(tmp_path, n_train=24, n_val=4, seed=4)
    assert open(paths["train"]).read() != open(other["train"]).read()
    kinds = set()
    for line in open(paths["train"]):
        rec = json.loads(line)
        user, assistant = rec["messages"]
        prompt, answer = user["content"][1]["text"], assistant["content"][0]["text"]
        kinds.add(rec["meta"]["kind"])
        # Qwen3-VL's grounding format: a ```json fenced list of one {"bbox_2d", "label"} (docs/responses.md)
        assert answer.startswith("```json\n[\n\t{\"bbox_2d\": [") and answer.endswith("}\n]\n```")
        box = parse_response(answer, strict=True)["boxes"]
        assert len(box) == 1 and prompt.startswith(f"Locate the {box[0]['label']} in the image")
        # 0..1000 coordinates of the 128 x 128 canvas: x / 1000 * 128 is the drawn pixel box, to rounding
        x1, y1, x2, y2 = rec["meta"]["box_px"]
        assert [round(c * 128 / 1000) for c in box[0]["bbox_2d"]] == [x1, y1, x2, y2]
        assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
        # the named item is drawn there: the centre pixel of a shape has its colour (+-20 jitter, noise)
        img = np.asarray(Image.open(tmp_path / "g_24_4_3" / user["content"][0]["image"]).convert("RGB"), int)
        words = box[0]["label"].split()
        if words[0] in COLORS:
            centre = img[(y1 + y2) // 2, (x1 + x2) // 2]
            assert np.abs(centre - np.array(COLORS[words[0]])).max() <= 40, (box, centre)
        else:  # a digit or a shape named by relation: something darker than the light background is in the box
            assert img[y1:y2, x1:x2].sum(-1).min() < 600
        if rec["meta"]["kind"] == "relation":
            assert rec["meta"]["relation"] in box[0]["label"] and f"the {rec['meta']['anchor']}" in box[0]["label"]
        # the layout (what the grounding vision warm-up labels patches by) holds the target with its box, and
        # an attribute or digit expression names the target's class
        items = rec["meta"]["items"]
        target = [it for it in items if it["box_px"] == [x1, y1, x2, y2]]
        assert len(target) == 1 and 3 <= len(items) <= 6, items
        if rec["meta"]["kind"] != "relation":
            assert target[0]["class"] == box[0]["label"]
        for it in items:
            assert 0 <= it["box_px"][0] < it["box_px"][2] <= 128 and 0 <= it["box_px"][1] < it["box_px"][3] <= 128
    assert kinds == {"attribute", "relation", "digit"}


def test_question_first_puts_the_prompt_before_the_image_and_regenerates(tmp_path):
    """data.grounding.question_first: the same scenes, boxes and answers, the user turn's text item first; the
    setting is part of meta.json, so flipping it regenerates the set; and the processor's tokens follow that order
    (the prompt's tokens before the image pads)."""
    cfg = GroundingGenConfig(enabled=True, n_train=4, n_val=2, seed=5)
    base = generate_grounding_dataset(cfg, out_dir=str(tmp_path / "g"), workers=1)
    first_lines = open(base["train"]).read().splitlines()
    qf = generate_grounding_dataset(dataclasses.replace(cfg, question_first=True), out_dir=str(tmp_path / "g"),
                                    workers=1)  # same folder: a different setting must rewrite it
    for a, b in zip(first_lines, open(qf["train"]).read().splitlines()):
        a, b = json.loads(a), json.loads(b)
        assert [c["type"] for c in a["messages"][0]["content"]] == ["image", "text"]
        assert b["messages"][0]["content"] == a["messages"][0]["content"][::-1]
        assert b["messages"][1] == a["messages"][1] and b["meta"] == a["meta"]
    from model import load_processor

    proc = load_processor(None)
    rec = json.loads(open(qf["train"]).readline())
    msgs = [{"role": "user", "content": [dict(c, image=str(tmp_path / "g" / c["image"])) if c["type"] == "image"
                                         else c for c in rec["messages"][0]["content"]]}]
    ids = proc.process_conversation(msgs)["input_ids"].tolist()
    pad = proc.image_token_id
    locate = proc.tokenizer.encode("Locate")
    first_pad = ids.index(pad)
    assert any(ids[i:i + len(locate)] == locate for i in range(first_pad)), "the prompt must precede the image"


def test_detect_all_lists_every_item_in_reading_order_in_training_scenes_only(tmp_path):
    """data.grounding.detect_all: that share of the training scenes asks for every item; the answer parses to one
    box per drawn item, in reading order (rows of the grid top to bottom, then left to right), each the item's pixel
    box in 0..1000 coordinates with its class as the label; the val split and the images are those of the
    referring set with the same seed."""
    cfg = GroundingGenConfig(enabled=True, n_train=40, n_val=12, seed=2)
    ref = generate_grounding_dataset(cfg, out_dir=str(tmp_path / "ref"), workers=1)
    det = generate_grounding_dataset(dataclasses.replace(cfg, detect_all=0.5), out_dir=str(tmp_path / "det"),
                                     workers=1)
    assert open(det["val"]).read() == open(ref["val"]).read()
    cell = 128 / 4
    n_detect = 0
    for a, b in zip(open(ref["train"]), open(det["train"])):
        a, b = json.loads(a), json.loads(b)
        assert b["meta"]["items"] == a["meta"]["items"]            # the same scene
        if b["meta"]["kind"] != "detect":
            assert b == a
            continue
        n_detect += 1
        assert b["messages"][0]["content"][1]["text"] == cfg.prompt_all
        boxes = parse_response(b["messages"][1]["content"][0]["text"], strict=True)["boxes"]
        items = a["meta"]["items"]
        assert len(boxes) == len(items)
        # every item once, labelled with its class, its box to rounding
        got = sorted((bx["label"], tuple(round(c * 128 / 1000) for c in bx["bbox_2d"])) for bx in boxes)
        assert got == sorted((it["class"], tuple(it["box_px"])) for it in items)
        centres = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in
                   ([round(c * 128 / 1000) for c in bx["bbox_2d"]] for bx in boxes)]
        rows = [int(cy // cell) for _, cy in centres]
        assert rows == sorted(rows)
        for (x0, _), (x1, _), r0, r1 in zip(centres, centres[1:], rows, rows[1:]):
            assert r0 < r1 or x0 < x1
        assert b["meta"]["box_px"] == [round(c * 128 / 1000) for c in boxes[0]["bbox_2d"]]
    assert 10 <= n_detect <= 30, n_detect
    with pytest.raises(ConfigError, match="data.grounding.detect_all"):
        GroundingGenConfig(detect_all=1.5)


def _make_set(args):
    cfg, out = args
    return generate_grounding_dataset(cfg, out_dir=out, workers=1)


def test_variant_sets_share_one_drawing_of_their_scenes(tmp_path):
    """question_first / detect_all sets naming one scenes_dir reuse the plain set there: their images are its files
    (nothing redrawn), their records are its records rewritten; three processes starting together (the plain set
    and two variants) give the same sets as one after the other."""
    import multiprocessing

    cfg = GroundingGenConfig(enabled=True, n_train=12, n_val=3, seed=7, scenes_dir=str(tmp_path / "plain"))
    variants = {"plain": cfg, "q": dataclasses.replace(cfg, question_first=True),
                "qd": dataclasses.replace(cfg, question_first=True, detect_all=0.5)}
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_make_set, [(c, str(tmp_path / name)) for name, c in variants.items()])
    plain_images = sorted((tmp_path / "plain" / "images").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in plain_images}
    assert len(plain_images) == 15
    for name in ("q", "qd"):
        assert (tmp_path / name / "images").resolve() == (tmp_path / "plain" / "images").resolve()
        assert not (tmp_path / name / "scenes").exists()
    plain = [json.loads(x) for x in open(tmp_path / "plain" / "train.jsonl")]
    for a, b in zip(plain, (json.loads(x) for x in open(tmp_path / "q" / "train.jsonl"))):
        assert b["messages"][0]["content"] == a["messages"][0]["content"][::-1] and b["meta"] == a["meta"]
    qd = [json.loads(x) for x in open(tmp_path / "qd" / "train.jsonl")]
    assert 0 < sum(r["meta"]["kind"] == "detect" for r in qd) < 12
    assert all(r["messages"][0]["content"][0]["type"] == "text" for r in qd)
    # one after the other, in fresh folders: the same records; the shared images were not drawn again
    for name, c in variants.items():
        if name != "plain":
            again = generate_grounding_dataset(c, out_dir=str(tmp_path / f"{name}_again"), workers=1)
            assert open(again["train"]).read() == open(tmp_path / name / "train.jsonl").read()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plain" / "images").iterdir()} == stamps
    with pytest.raises(ValueError, match="scenes_dir"):
        generate_grounding_dataset(dataclasses.replace(cfg, question_first=True), out_dir=str(tmp_path / "plain"))


def test_generator_settings_are_validated():
    with pytest.raises(ConfigError, match="data.grounding.objects"):
        GroundingGenConfig(grid=(2, 2), objects=(3, 4))
    with pytest.raises(ConfigError, match="data.grounding.kinds"):
        GroundingGenConfig(kinds=("colour",))
    with pytest.raises(ConfigError, match="data.grounding.prompt"):
        GroundingGenConfig(prompt="Where is it?")
    from train.config import DataConfig, OCRGenConfig

    with pytest.raises(ConfigError, match="data.grounding.enabled"):
        DataConfig(ocr=OCRGenConfig(enabled=True), grounding=GroundingGenConfig(enabled=True))


# ----------------------------------------------------------------------------------------------- python -m eval
def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return config_from_dict(OmegaConf.to_container(compose("eval", overrides=overrides), resolve=True),
                                EvalConfig)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A grounding set and a tiny random checkpoint exported as the trainer exports (budgets included)."""
    import torch

    from train.export import export

    from .test_train_common import small_config

    root = tmp_path_factory.mktemp("grounding")
    data = _small_set(root)
    cfg = small_config(data, root / "run", data={"max_seq_len": 160, "token_budget": 320})
    from model.build import build_model

    torch.manual_seed(0)
    return data, str(export(build_model(cfg.model), root / "ckpt" / "final", cfg))


def test_task_grounding_runs_on_a_checkpoint_and_scores_oracles_by_hand(exported, tmp_path, monkeypatch):
    data, ckpt = exported
    assert _compose([]).grounding is None                 # the needle tasks are untouched
    with pytest.raises(ConfigError, match="grounding.checkpoints"):
        _compose(["task=grounding", "grounding.data=set.jsonl"])
    base = ["task=grounding", f"grounding.checkpoints=[{ckpt}]", f"grounding.data={data['val']}",
            "grounding.n_boot=50", "device=cpu"]
    # a real tiny random model: it runs, writes the JSON and the table, and its garbage scores nothing
    out = tmp_path / "random"
    result = run(_compose(base + ["grounding.max_new_tokens=3", "grounding.draw=2", f"grounding.out_dir={out}"]))
    col = result["checkpoints"][0]
    assert result["n"] == 8 and len(col["predictions"]) == 8
    assert col["metrics"]["acc50"] == 0.0 and col["metrics"]["parsed"] == 0.0
    saved = json.loads((out / "results.json").read_text())
    refs = [json.loads(line)["messages"][1]["content"][0]["text"] for line in open(data["val"])]
    assert saved["references"] == refs
    assert saved["kinds"] == [json.loads(line)["meta"]["kind"] for line in open(data["val"])]
    assert "| Acc@0.5 |" in (out / "results.md").read_text() and len(list((out / "draw").glob("*.png"))) == 2

    # an oracle that answers the gold box scores 1.0 everywhere
    gold = [parse_response(r)["boxes"][0]["bbox_2d"] for r in refs]
    monkeypatch.setattr(grounding_eval, "predict", lambda model, ds, tok, cfg, dev: list(refs))
    m = run(_compose(base + [f"grounding.out_dir={tmp_path / 'oracle'}"]))["checkpoints"][0]["metrics"]
    assert (m["acc50"], m["miou"], m["point_acc"], m["parsed"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["ci"]["acc50"] == [1.0, 1.0]

    # shifted oracles: even samples move right by a quarter of their width, IoU (w - d) / (w + d) >= 0.6 (hit,
    # centre inside); odd ones move down by their full height, IoU 0 and centre outside
    def shifted(i, b):
        x1, y1, x2, y2 = b
        if i % 2 == 0:
            d = (x2 - x1) // 4
            return [x1 + d, y1, x2 + d, y2]
        return [x1, y2, x2, y2 + (y2 - y1)]

    preds = [_answer(shifted(i, b)) for i, b in enumerate(gold)]
    expected_iou = [((b[2] - b[0]) - (b[2] - b[0]) // 4) / ((b[2] - b[0]) + (b[2] - b[0]) // 4) if i % 2 == 0 else 0.0
                    for i, b in enumerate(gold)]
    monkeypatch.setattr(grounding_eval, "predict", lambda model, ds, tok, cfg, dev: list(preds))
    res = run(_compose(base + [f"grounding.out_dir={tmp_path / 'shifted'}"]))
    m = res["checkpoints"][0]["metrics"]
    assert m["acc50"] == 0.5 and m["point_acc"] == 0.5
    assert m["miou"] == pytest.approx(sum(expected_iou) / 8)
    assert [s["iou"] for s in res["checkpoints"][0]["samples"]] == pytest.approx(expected_iou)


def test_grounding_config_rejects_mismatched_names():
    with pytest.raises(ConfigError, match="grounding.names has 1 entries for 2"):
        GroundingConfig(checkpoints=("a", "b"), names=("x",), data="d.jsonl")


# ----------------------------------------------------------------------------------------------- python -m train
def test_grounding_demo_trains_two_steps_with_the_grounding_metric(tmp_path):
    """`python -m train experiment=grounding_demo train.steps=2` (composed in-process, a tiny set): the set is
    generated by the data hook, validation reports Acc@0.5 / mean IoU / point-in-box, result.json holds them."""
    from train.config import config_from_dict as train_config
    from train.trainer import train

    conf = os.path.join(os.path.dirname(CONF_DIR), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        composed = compose("config", overrides=[
            "experiment=grounding_demo", "train.steps=2", "train.eval_every=0", "train.eval_samples=2",
            "train.eval_max_new_tokens=4", "train.export=false", "train.save_every=0", f"train.out_dir={tmp_path}/run",
            f"data.grounding.out_dir={tmp_path}/data", "data.grounding.n_train=4", "data.grounding.n_val=2",
            "data.token_budget=256", "data.max_seq_len=256", "logging.wandb_mode=disabled",
            "logging.progress_bar=false", "train.num_threads=1", "train.vision_warmup.steps=2",
            "train.vision_warmup.batch_size=2"])
    cfg = train_config(OmegaConf.to_container(composed, resolve=True))
    assert cfg.train.eval_metric == "grounding" and cfg.data.grounding.enabled
    assert cfg.train.vision_warmup.kind == "grounding"  # the demo warms the tower up on the scenes' layouts
    res = train(cfg)
    assert res["steps"] == 2 and os.path.isfile(tmp_path / "data" / "train.jsonl")
    assert res["vision_warmup"]["kind"] == "grounding" and len(res["vision_warmup"]["history"]) == 2
    ev = json.loads((tmp_path / "run" / "result.json").read_text())["evals"][-1]
    assert ev["step"] == 2 and {"acc50", "miou", "point_acc", "parsed"} <= set(ev)
    assert ev["acc50"] == 0.0  # four-token answers hold no box
    # box_loss: the teacher-forced loss on the first box's coordinate digits, recomputed here sample by sample
    # from the model's full logits (the evaluation takes it from packed batches and chunked hidden states)
    import torch
    import torch.nn.functional as F

    from model import load_processor
    from train.data import ChatEncoder, SFTDataset

    model, proc = res["model"].eval(), load_processor(None)
    val = SFTDataset(str(tmp_path / "data" / "val.jsonl"), ChatEncoder(proc, model.config, cfg.data),
                     str(tmp_path / "data"), cfg.data.max_seq_len)
    losses, blind = [], []
    for i in range(len(val)):
        enc, other = val[i], val[i - 1]    # box_loss_blind: each sample with the previous sample's image
        targets = torch.cat([enc.labels[1:], enc.labels.new_full((1,), -100)])
        sup = (targets != -100).nonzero().flatten()
        mask = first_box_token_mask(targets[sup].tolist(), proc.tokenizer.decode)
        box = parse_response(val.answer(i), strict=True)["boxes"][0]["bbox_2d"]
        assert "".join(proc.tokenizer.decode([int(t)]) for t, m in zip(targets[sup], mask) if m) == \
            "".join(str(v) for v in box)
        pos = sup[torch.tensor(mask)]
        for pixels, out in ((enc.pixel_values, losses), (other.pixel_values, blind)):
            with torch.no_grad():
                logits = model(enc.input_ids[None], pixel_values=pixels, image_grid_thw=enc.image_grid_thw,
                               position_ids=enc.position_ids[:, None]).logits[0]
            out.append(F.cross_entropy(logits[pos].float(), targets[pos], reduction="none"))
    assert ev["box_loss"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-4)
    assert ev["box_loss_blind"] == pytest.approx(float(torch.cat(blind).mean()), rel=1e-4)
    assert ev["box_loss_blind"] != ev["box_loss"]


@pytest.mark.parametrize("answer, digits", [
    ('```json\n[\n\t{"bbox_2d": [516, 297, 711, 492], "label": "the 7 left of the 3"}\n]\n```', "516297711492"),
    ('```json\n[\n\t{"bbox_2d": [5, 0, 1000, 12], "label": "a"},\n\t{"bbox_2d": [1, 2, 3, 4], "label": "b"}\n]\n```',
     "50100012"),                                                     # the first box only
    ('[{"bbox_2d":[10,20,30,40]}]', "10203040"),                     # no fence, no spaces
    ('```json\n[\n\t{"point_2d": [516, 297], "label": "7"}\n]\n```', ""),   # no box
    ('```json\n[\n\t{"bbox_2d": [516, 297, 7', ""),                  # cut off: no closed list
])
def test_first_box_token_mask_picks_the_coordinate_digits(answer, digits):
    from model import load_processor

    tok = load_processor(None).tokenizer
    ids = tok.encode(answer)
    mask = first_box_token_mask(ids, tok.decode)
    assert "".join(tok.decode([i]) for i, m in zip(ids, mask) if m) == digits
