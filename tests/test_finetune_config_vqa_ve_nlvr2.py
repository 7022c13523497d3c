"""Fine-tuning configs and parameter groups (fast, no training): the original UNITER's
training configs load unchanged but for paths, unknown keys are reported, ``optim`` maps
onto DeepSpeed, ``lr_mul`` makes head parameter groups whose learning rate DeepSpeed's
scheduler multiplies, and the task metrics equal an independent statement of the
original's formulas (``compute_score_with_logits``, ``eval_nlvr2.py``)."""
import copy
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

from uniter_fast.evaluation import answer_scores, nlvr2_consistency
from uniter_fast.finetune import build_parser
from uniter_fast.tasks import FinetuneTask, get_task
from uniter_fast.training.config import load_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS = os.path.join(ROOT, "ds.json")

# The original repository's config/train-*.json, as published (paths as there).
ORIGINAL = {
    "vqa": {
        "train_txt_dbs": ["/txt/vqa_train.db", "/txt/vqa_trainval.db", "/txt/vqa_vg.db"],
        "train_img_dbs": ["/img/coco_train2014/", "/img/coco_val2014", "/img/vg/"],
        "val_txt_db": "/txt/vqa_devval.db", "val_img_db": "/img/coco_val2014/",
        "checkpoint": "/pretrain/uniter-base.pt", "model_config": "/src/config/uniter-base.json",
        "output_dir": "/storage/vqa/default", "max_txt_len": 60, "conf_th": 0.2, "max_bb": 100,
        "min_bb": 10, "num_bb": 36, "train_batch_size": 5120, "val_batch_size": 10240,
        "gradient_accumulation_steps": 5, "learning_rate": 8e-05, "lr_mul": 10.0,
        "valid_steps": 500, "num_train_steps": 6000, "optim": "adamw", "betas": [0.9, 0.98],
        "dropout": 0.1, "weight_decay": 0.01, "grad_norm": 2.0, "warmup_steps": 600, "seed": 42,
        "fp16": True, "n_workers": 4, "pin_mem": True},
    "ve": {
        "train_txt_db": "/txt/ve_train.db/", "train_img_db": "/img/flickr30k/",
        "val_txt_db": "/txt/ve_dev.db/", "val_img_db": "/img/flickr30k/",
        "test_txt_db": "/txt/ve_test.db/", "test_img_db": "/img/flickr30k/",
        "compressed_db": False, "model_config": "/src/config/uniter-base.json",
        "checkpoint": "/pretrain/uniter-base.pt", "output_dir": "/storage/ve/default",
        "max_txt_len": 60, "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36,
        "train_batch_size": 4096, "val_batch_size": 4096, "gradient_accumulation_steps": 4,
        "learning_rate": 8e-05, "valid_steps": 500, "num_train_steps": 4000, "optim": "adamw",
        "betas": [0.9, 0.98], "dropout": 0.1, "weight_decay": 0.01, "grad_norm": 2.0,
        "warmup_steps": 400, "seed": 42, "fp16": True, "n_workers": 4, "pin_mem": False},
    "nlvr2": {
        "train_txt_db": "/txt/nlvr2_train.db", "train_img_db": "/img/nlvr2_train/",
        "val_txt_db": "/txt/nlvr2_dev.db", "val_img_db": "/img/nlvr2_dev/",
        "test_txt_db": "/txt/nlvr2_test1.db", "test_img_db": "/img/nlvr2_test/",
        "checkpoint": "/pretrain/uniter-base.pt", "model_config": "/src/config/uniter-base.json",
        "model": "paired-attn", "use_img_type": True, "output_dir": "/storage/nlvr2/default",
        "max_txt_len": 60, "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36,
        "train_batch_size": 10240, "val_batch_size": 10240, "gradient_accumulation_steps": 1,
        "learning_rate": 3e-05, "valid_steps": 500, "num_train_steps": 8000, "optim": "adamw",
        "betas": [0.9, 0.98], "dropout": 0.1, "weight_decay": 0.01, "grad_norm": 2.0,
        "warmup_steps": 800, "seed": 77, "fp16": True, "n_workers": 4, "pin_mem": True},
}


def _relocate(cfg, root):
    """Only the paths change (as a user does): every absolute path under ``root``."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, str) and v.startswith("/"):
            v = os.path.join(root, v.lstrip("/"))
        elif isinstance(v, list) and v and isinstance(v[0], str):
            v = [os.path.join(root, x.lstrip("/")) for x in v]
        out[k] = v
    out["model_config"] = "uniter-base"      # the shipped copy of config/uniter-base.json
    return out


def _load(task, cfg, tmp_path, *extra):
    path = str(tmp_path / f"{task}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    args = build_parser(task).parse_args(["--task", task, "--config", path,
                                          "--deepspeed_config", DS, *extra])
    t = get_task(task)
    cfg, ds = load_configs(args, required=t.required_keys, known_keys=t.known_keys)
    t.configure(cfg, ds, args)
    return t, cfg, ds


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2"])
def test_original_config_loads_without_unknown_keys(task, tmp_path):
    cfg = _relocate(ORIGINAL[task], str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # an unknown-key report would be a warning
        t, cfg, ds = _load(task, cfg, tmp_path)
    assert isinstance(t, FinetuneTask) and t.name == task
    n_train = 3 if task == "vqa" else 1
    assert len(cfg["train_txt_dbs"]) == len(cfg["train_img_dbs"]) == n_train
    assert "train_txt_db" not in cfg and "train_img_db" not in cfg
    assert cfg["lr_mul"] == (10.0 if task == "vqa" else 1.0)
    # UNITER's optimizer keys landed in the DeepSpeed config
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["adam_w_mode"]
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert ds["optimizer"]["params"]["lr"] == ORIGINAL[task]["learning_rate"]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["gradient_clipping"] == 2.0
    assert ds["gradient_accumulation_steps"] == ORIGINAL[task]["gradient_accumulation_steps"]
    sp = ds["scheduler"]["params"]
    assert sp["total_num_steps"] == ORIGINAL[task]["num_train_steps"]
    assert sp["warmup_num_steps"] == ORIGINAL[task]["warmup_steps"]
    assert sp["warmup_max_lr"] == ORIGINAL[task]["learning_rate"]
    if task == "nlvr2":
        assert cfg["model"] == "paired-attn" and cfg["use_img_type"] is True


def test_unknown_keys_are_reported_with_the_nearest_known_one(tmp_path):
    cfg = _relocate(ORIGINAL["vqa"], str(tmp_path))
    cfg["lr_mull"] = 5.0
    cfg["totally_new"] = 1
    with pytest.warns(UserWarning) as rec:
        _load("vqa", cfg, tmp_path)
    msg = " ".join(str(w.message) for w in rec)
    assert "'lr_mull'" in msg and "'lr_mul'" in msg and "'totally_new'" in msg
    with pytest.raises(ValueError, match="lr_mull"):
        _load("vqa", cfg, tmp_path, "--strict_config")


def test_bad_original_configs_raise_naming_the_keys(tmp_path):
    base = _relocate(ORIGINAL["vqa"], str(tmp_path))
    bad = dict(base, train_img_dbs=base["train_img_dbs"][:2])
    with pytest.raises(ValueError, match="3 train text dbs but 2 image dbs"):
        get_task("vqa").normalize(bad)
    with pytest.raises(ValueError, match="not both"):
        get_task("vqa").normalize(dict(base, train_txt_db="x"))
    with pytest.raises(ValueError, match="optim"):
        get_task("vqa").normalize(dict(base, optim="adamax"))
    with pytest.raises(ValueError, match="'model'"):
        get_task("vqa").normalize(dict(base, model="paired"))
    nl = _relocate(ORIGINAL["nlvr2"], str(tmp_path))
    with pytest.raises(ValueError, match="paired, triplet|'paired', 'triplet'"):
        get_task("nlvr2").normalize(dict(nl, model="pairs"))
    with pytest.raises(ValueError, match="val_txt_db and val_img_db"):
        get_task("nlvr2").normalize({k: v for k, v in nl.items() if k != "val_img_db"})
    # the original's argparse defaults
    c = {k: v for k, v in nl.items() if k not in ("model", "use_img_type")}
    get_task("nlvr2").normalize(c)
    assert c["model"] == "paired" and c["use_img_type"] is False


def test_optim_adam_maps_to_deepspeed_adam_with_l2(tmp_path):
    cfg = dict(_relocate(ORIGINAL["ve"], str(tmp_path)), optim="adam")
    _, _, ds = _load("ve", cfg, tmp_path)
    assert ds["optimizer"]["type"] == "Adam" and ds["optimizer"]["params"]["adam_w_mode"] is False


def _tiny_cfg(task, **kw):
    cfg = {"model_config": "uniter-tiny", "img_dim": 2048, "learning_rate": 1e-3,
           "train_txt_dbs": ["t"], "train_img_dbs": ["i"]}
    cfg.update(kw)
    get_task(task).normalize(cfg)
    return cfg


def _ds(lr=1e-3):
    with open(DS) as f:
        ds = json.load(f)
    ds["optimizer"]["params"]["lr"] = lr
    ds["scheduler"]["params"]["warmup_max_lr"] = lr
    return ds


@pytest.mark.parametrize("task,model,heads", [
    ("vqa", None, ("vqa_output.",)),
    ("ve", None, ("vqa_output.",)),
    ("nlvr2", "paired-attn", ("nlvr2_output.", "attn1.", "attn2.", "fc.", "attn_pool.")),
    ("nlvr2", "triplet", ("nlvr2_output.",))])
def test_lr_mul_head_groups(task, model, heads):
    kw = {"model": model} if model else {}
    cfg = _tiny_cfg(task, lr_mul=7.0, **kw)
    t = get_task(task)
    if task == "vqa":
        t.use_answers({f"a{i}": i for i in range(13)})
    m = t.make_model(cfg)
    ds = _ds()
    groups = t.param_groups(m, cfg, ds)
    names = {id(p): n for n, p in m.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            is_head = n.startswith(heads)
            assert g["lr_mul"] == (7.0 if is_head else 1.0), n
            assert g["lr"] == pytest.approx(1e-3 * g["lr_mul"])
            # UNITER's rule (train_vqa.py): no decay when a name contains one of these
            no_decay = any(nd in n for nd in ("bias", "LayerNorm.bias", "LayerNorm.weight"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), n
    assert seen == set(names.values()), "every parameter is in exactly one group"
    assert sum(len(g["params"]) for g in groups) == len(names)
    # DeepSpeed's WarmupDecayLR gets one peak / floor per group: lr_mul times for the head
    sp = ds["scheduler"]["params"]
    assert sp["warmup_max_lr"] == pytest.approx([1e-3 * g["lr_mul"] for g in groups])
    assert sp["warmup_min_lr"] == pytest.approx([0.0] * len(groups))
    assert any(g["lr_mul"] == 7.0 for g in groups) and any(g["lr_mul"] == 1.0 for g in groups)


def test_lr_mul_one_keeps_the_original_two_groups():
    cfg = _tiny_cfg("ve")
    m = get_task("ve").make_model(cfg)
    ds = _ds()
    groups = get_task("ve").param_groups(m, cfg, ds)
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx([1e-3, 1e-3])


_ENGINE_SCRIPT = r"""
import json, sys, torch
from uniter_fast.training import init_distributed
from uniter_fast.training.engine import create_engine
from uniter_fast.tasks import get_task
cfg = {"model_config": "uniter-tiny", "img_dim": 2048, "learning_rate": 1e-3, "lr_mul": 10.0,
       "train_txt_dbs": ["t"], "train_img_dbs": ["i"]}
get_task("vqa").normalize(cfg)
ds = json.load(open(sys.argv[1]))
ds["bf16"] = {"enabled": False}
ds["optimizer"]["params"]["lr"] = 1e-3
ds["scheduler"]["params"].update(warmup_max_lr=1e-3, warmup_num_steps=4, total_num_steps=10)
init_distributed()
torch.manual_seed(0)
task = get_task("vqa")
task.use_answers({f"a{i}": i for i in range(5)})
m = task.make_model(cfg)
engine = create_engine(m, task.param_groups(m, cfg, ds), ds)
out = []
for step in range(6):
    loss = sum(p.float().pow(2).sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step()
    out.append([g["lr"] for g in engine.optimizer.param_groups])
print("LRS " + json.dumps(out))
"""


def test_lr_mul_through_deepspeed_scheduler(tmp_path):
    """Under a real DeepSpeed engine (ZeRO-2, WarmupDecayLR) the head groups' learning
    rate is lr_mul times the base one at every step (the original's
    ``lr_this_step * lr_mul``), and the base one follows the warmup/decay schedule."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, DS], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = json.loads(p.stdout.split("LRS ", 1)[1])
    # the groups in order: base decay, base no-decay, head decay, head no-decay
    assert all(len(g) == 4 for g in lrs)
    for step, (b1, b2, h1, h2) in enumerate(lrs, start=1):
        # DeepSpeed's WarmupDecayLR after update `step`: iteration i = step - 1, linear
        # warmup over 4 iterations, then linear decay to 0 at 10
        i = step - 1
        want = 1e-3 * (i / 4 if i < 4 else (10 - i) / (10 - 4))
        assert b1 == pytest.approx(want, abs=1e-12) and b2 == pytest.approx(want, abs=1e-12)
        assert h1 == pytest.approx(10 * want, abs=1e-12) and h2 == pytest.approx(10 * want,
                                                                                abs=1e-12)
    assert lrs[4][0] == pytest.approx(1e-3) and lrs[4][2] == pytest.approx(1e-2)


# ----------------------------------------------------------------------------- metrics

def _score_with_logits_original(logits, labels):
    """train_vqa.py's compute_score_with_logits, restated: one-hot of the arg-max times labels."""
    idx = torch.max(logits, 1)[1]
    one_hots = torch.zeros(*labels.size())
    one_hots.scatter_(1, idx.view(-1, 1), 1)
    return one_hots * labels


def test_vqa_score_matches_the_original_formula():
    g = torch.Generator().manual_seed(1)
    for b, n in ((1, 1), (7, 3129), (33, 5)):
        logits = torch.randn(b, n, generator=g)
        labels = torch.rand(b, n, generator=g) * (torch.rand(b, n, generator=g) < 0.3)
        ref = _score_with_logits_original(logits, labels).sum(1)
        torch.testing.assert_close(answer_scores(logits, labels), ref)
    with pytest.raises(ValueError):
        answer_scores(torch.zeros(2, 3), torch.zeros(2, 4))


def _eval_nlvr2_original(preds, labels):
    """scripts/eval_nlvr2.py's consistency, restated over dicts."""
    consistency = {}
    for ident, label in labels.items():
        anon = ident.split("-")
        anon[2] = ""
        anon = "-".join(anon)
        consistency.setdefault(anon, True)
        if preds[ident].lower() != label.lower():
            consistency[anon] = False
    return sum(consistency.values()) / len(consistency)


def test_nlvr2_consistency_matches_eval_script():
    rng = random.Random(0)
    labels, preds = {}, {}
    for s in range(40):
        for p in range(rng.randint(1, 5)):
            ident = f"dev-{s}-{p}-{rng.randint(0, 1)}"
            labels[ident] = rng.choice(["True", "False"])
            preds[ident] = labels[ident] if rng.random() < 0.8 else \
                ("False" if labels[ident] == "True" else "True")
    ids = sorted(labels)
    got = nlvr2_consistency(ids, [preds[i] == labels[i] for i in ids])
    assert got == pytest.approx(_eval_nlvr2_original(preds, labels))
    assert 0 < got < 1
    with pytest.raises(ValueError, match="split-set-pair-sentence"):
        nlvr2_consistency(["nodashes"], [True])


def test_configs_shipped_for_every_task_load(tmp_path):
    from uniter_fast.tasks.base import default_config
    for task in ("vqa", "ve", "nlvr2"):
        with open(default_config(task)) as f:
            cfg = json.load(f)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, c, _ = _load(task, copy.deepcopy(cfg), tmp_path)
        assert c["checkpoint"] == "synthetic:pretrain"
        assert all(p.startswith(f"synthetic-{task}:") for p in c["train_txt_dbs"])
