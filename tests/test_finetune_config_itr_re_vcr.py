"""Retrieval, RE and VCR fine-tuning configs: the original configs' keys are known, the
shipped synthetic configs only use known keys, a typo is reported with the nearest key, and
the tasks are reachable from finetune.py / infer.py."""
import json

import pytest

from uniter_fast.config import CONFIG_DIR
from uniter_fast.tasks import get_task, task_names
from uniter_fast.tasks.base import default_config
from uniter_fast.training.config import OVERRIDES, TRAINER_KEYS, check_unknown_keys

ITR_RE_VCR = ("itm", "itm-hn", "re", "vcr")

# top-level keys of the original UNITER configs (config/*.json of ChenRocks/UNITER), as data
ORIGINAL_CONFIG_KEYS = {
    "itm": ["compressed_db", "checkpoint", "output_dir", "max_txt_len", "conf_th", "max_bb",
            "min_bb", "num_bb", "train_batch_size", "negative_size", "inf_minibatch_size",
            "margin", "gradient_accumulation_steps", "learning_rate", "valid_steps",
            "num_train_steps", "optim", "betas", "dropout", "weight_decay", "grad_norm",
            "warmup_steps", "seed", "full_val", "fp16", "n_workers", "pin_mem",
            "train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db", "test_txt_db",
            "test_img_db", "model_config"],
    "itm-hn": ["compressed_db", "checkpoint", "output_dir", "max_txt_len", "conf_th", "max_bb",
               "min_bb", "num_bb", "train_batch_size", "negative_size", "hard_neg_size",
               "inf_minibatch_size", "margin", "learning_rate", "valid_steps",
               "num_train_steps", "optim", "betas", "dropout", "weight_decay", "grad_norm",
               "warmup_steps", "seed", "full_val", "fp16", "n_workers", "pin_mem",
               "train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db", "test_txt_db",
               "test_img_db", "model_config"],
    "re": ["train_txt_db", "train_img_db", "val_txt_db", "val_img_db", "compressed_db",
           "model_config", "checkpoint", "output_dir", "max_txt_len", "conf_th", "num_bb",
           "train_batch_size", "val_batch_size", "learning_rate", "lr_mul", "optim", "betas",
           "weight_decay", "dropout", "grad_norm", "decay", "num_train_steps", "warmup_steps",
           "gradient_accumulation_steps", "seed", "fp16", "n_workers", "pin_mem"],
    "vcr": ["train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db", "checkpoint",
            "checkpoint_from", "model_config", "output_dir", "max_txt_len", "conf_th", "max_bb",
            "min_bb", "num_bb", "train_batch_size", "val_batch_size",
            "gradient_accumulation_steps", "learning_rate", "lr_mul", "valid_steps",
            "num_train_steps", "optim", "betas", "dropout", "weight_decay", "grad_norm",
            "warmup_steps", "seed", "fp16", "n_workers", "pin_mem"],
}
# argparse-only options of the original scripts (train_re.py, ...) a config may carry
ORIGINAL_ARGS = {"re": ["train_loss", "margin", "hard_ratio", "mlp"], "itm": [], "itm-hn": [],
                 "vcr": []}


def _known(task):
    return set(get_task(task).known_keys) | TRAINER_KEYS | {o[0] for o in OVERRIDES}


def test_itr_re_vcr_tasks_are_registered():
    assert set(ITR_RE_VCR) <= set(task_names())
    for t in ITR_RE_VCR:
        assert get_task(t).name == t


@pytest.mark.parametrize("task", ITR_RE_VCR)
def test_original_keys_known(task):
    cfg = dict.fromkeys(ORIGINAL_CONFIG_KEYS[task] + ORIGINAL_ARGS[task], 0)
    assert check_unknown_keys(cfg, _known(task), "cfg", strict=True) == []


@pytest.mark.parametrize("task", ITR_RE_VCR)
def test_shipped_config_keys_known(task):
    path = default_config(task)
    assert path.startswith(CONFIG_DIR)
    cfg = json.load(open(path))
    assert check_unknown_keys(cfg, _known(task), path, strict=True) == []


def test_typo_named_with_nearest_key():
    with pytest.raises(ValueError, match="'negativ_size' \\(did you mean 'negative_size'\\?\\)"):
        check_unknown_keys({"negativ_size": 1}, _known("itm"), "cfg", strict=True)
    with pytest.raises(ValueError, match="did you mean 'checkpoint_from'"):
        check_unknown_keys({"checkpoint_frm": 1}, _known("vcr"), "cfg", strict=True)


def test_bad_values_named():
    import argparse
    ns = argparse.Namespace(deepspeed_config="ds.json", precision="fp32", no_progress=True)
    base = {"output_dir": "x", "num_train_steps": 1, "train_batch_size": 4,
            "model_config": "uniter-tiny", "train_txt_dbs": ["a"], "train_img_dbs": ["b"]}
    with pytest.raises(ValueError, match="train_loss"):
        get_task("re").configure(dict(base, train_loss="hinge"), {}, ns)
    with pytest.raises(ValueError, match="checkpoint_from"):
        get_task("vcr").configure(dict(base, checkpoint_from="x"), {}, ns)
    with pytest.raises(ValueError, match="negative_size"):
        get_task("itm").configure(dict(base, negative_size=0), {}, ns)
    with pytest.raises(ValueError, match="hard_neg_size"):
        get_task("itm-hn").configure(dict(base, negative_size=3, hard_neg_size=4), {}, ns)
    ds = {}
    get_task("itm-hn").configure(dict(base, negative_size=3, hard_neg_size=2), ds, ns)
    assert ds["gradient_accumulation_steps"] == 4     # train_batch_size texts per step


def test_gt_db_rule_reads_the_directory_name():
    from uniter_fast.tasks.base import is_gt_db
    assert is_gt_db("/img/re_coco_gt/", "coco_gt") and not is_gt_db("/img/re_coco_det", "coco_gt")
    assert is_gt_db("/img/vcr_gt_val/") and not is_gt_db("/gtdata/img/vcr_val/")


@pytest.mark.parametrize("task", ITR_RE_VCR)
def test_infer_has_the_task_options(capsys, task):
    from uniter_fast import infer
    with pytest.raises(SystemExit):
        infer.main(["--task", task, "--help"])
    out = capsys.readouterr().out
    assert "--output_dir" in out and "--save_logits" not in out
