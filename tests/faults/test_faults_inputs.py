"""Fault injection, in process (seconds): malformed batches (issue 13 items 7, 10),
malformed configs and unknown keys (items 10, 11), a db rebuilt under a live
reader (item 6)."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from batches import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(ROOT, "ds.json")
VOCAB, IMG_DIM, LABEL_DIM = 128, 2048, 11

# top-level keys of the original UNITER's config/pretrain-*.json (all five files), transcribed
UNITER_PRETRAIN_KEYS = (
    "betas", "checkpoint", "conf_th", "dropout", "fp16", "grad_norm",
    "gradient_accumulation_steps", "itm_neg_prob", "itm_ot_lambda", "learning_rate", "max_bb",
    "max_txt_len", "min_bb", "model_config", "mrm_prob", "n_workers", "num_bb",
    "num_train_steps", "optim", "output_dir", "pin_mem", "rank", "seed", "train_batch_size",
    "train_datasets", "val_batch_size", "val_datasets", "valid_steps", "warmup_steps",
    "weight_decay")
# and the command-line options of its pretrain.py that are not in those files
UNITER_PRETRAIN_OPTIONS = ("compressed_db",)


@pytest.fixture(scope="module")
def model():
    from uniter_fast import UniterConfig, UniterForPretraining, config_path
    torch.manual_seed(0)
    return UniterForPretraining(UniterConfig(config_path("uniter-tiny")), IMG_DIM, LABEL_DIM).eval()


def _batch(task):
    return make_batch(task, VOCAB, IMG_DIM, LABEL_DIM, [5, 3, 7], [4, 6, 2])


# ----------------------------------------------------------------------------- item 7

def test_img_masks_broadcast_shape_is_refused(model):
    b = _batch("mrfr")
    model(b, "mrfr")                                   # the well-formed batch runs
    b["img_masks"] = b["img_masks"][:, :1]             # [B, 1] would mask every region
    with pytest.raises(ValueError, match=r"img_masks must have shape \(3, 6\).*got \(3, 1\)"):
        model(b, "mrfr")


@pytest.mark.parametrize("task,key,bad,pattern", [
    ("mrc-kl", "img_mask_tgt", lambda t: t[:, :-1], "img_mask_tgt must have shape"),
    ("mlm", "txt_labels", lambda t: t[:1], "txt_labels must have shape"),
    ("itm", "targets", lambda t: t[:, None], "targets must have shape"),
    ("mrfr", "feat_targets", lambda t: t[:, :10], r"feat_targets must be \[masked regions, 2048\]"),
    ("mrc-kl", "label_targets", lambda t: t[:, :5], r"label_targets must be \[masked regions, 11\]"),
])
def test_task_tensor_shapes_checked(model, task, key, bad, pattern):
    b = _batch(task)
    b[key] = bad(b[key])
    with pytest.raises(ValueError, match=pattern):
        model(b, task)


@pytest.mark.parametrize("task", ["mrc-kl", "mrc"])
def test_nan_label_targets_refused(model, task):
    b = _batch(task)
    model(b, task)
    b["label_targets"][0, 3] = float("nan")
    with pytest.raises(ValueError, match="label_targets contains NaN or inf"):
        model(b, task)


def test_inf_feat_targets_and_label_ranges_refused(model):
    b = _batch("mrfr")
    b["feat_targets"][1, 0] = float("inf")
    with pytest.raises(ValueError, match="feat_targets contains NaN or inf"):
        model(b, "mrfr")
    b = _batch("mlm")
    b["txt_labels"][0, 0] = VOCAB + 5
    with pytest.raises(ValueError, match=r"txt_labels out of range"):
        model(b, "mlm")
    b = _batch("itm")
    b["targets"][0] = 2
    with pytest.raises(ValueError, match="targets must be 0 or 1"):
        model(b, "itm")


# ----------------------------------------------------------------------------- item 10

def test_position_ids_out_of_range_and_shape(model):
    b = _batch("mlm")
    b["position_ids"] = b["position_ids"].clone()
    b["position_ids"][0, -1] = 10_000
    with pytest.raises(ValueError, match=r"position_ids out of range \[0, max_position_embed"):
        model(b, "mlm")
    b["position_ids"][0, -1] = -1
    with pytest.raises(ValueError, match="position_ids out of range"):
        model(b, "mlm")
    b = _batch("mlm")
    b["position_ids"] = b["position_ids"][:, :-1]
    with pytest.raises(ValueError, match=r"position_ids must be \[1 or B=3, text length 7\]"):
        model(b, "mlm")
    b = _batch("mlm")       # [B, L] position ids (per-example) are accepted
    b["position_ids"] = b["position_ids"].expand(3, -1).contiguous()
    model(b, "mlm")


@pytest.mark.parametrize("drop", ["txt_pad", "img_pad", "ot_scatter", "scatter_max"])
def test_missing_ot_inputs_key_named(model, drop):
    b = _batch("itm")
    model(b, "itm")
    del b["ot_inputs"][drop]
    with pytest.raises(ValueError, match=rf"ot_inputs is missing \['{drop}'\]"):
        model(b, "itm")


def test_ot_inputs_wrong_shape_named(model):
    b = _batch("itm")
    b["ot_inputs"]["img_pad"] = b["ot_inputs"]["img_pad"][:, :-1]
    with pytest.raises(ValueError, match=r"ot_inputs\['img_pad'\] must have shape \(3, 6\)"):
        model(b, "itm")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_layer_norm_and_gelu_name_a_non_floating_input(backend):
    """An int tensor (token ids) into layer_norm said "mixed dtype (CPU)"; now the op names
    the argument and the dtype, on every backend (the model's LayerNorm goes through it)."""
    from uniter_fast import ops
    from uniter_fast.model.layer import LayerNorm
    x = torch.randint(0, 5, (2, 8))
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    with pytest.raises(TypeError, match=r"layer_norm input must be a floating tensor, got "
                                        r"torch\.int64 \(token ids\?"):
        ops.layer_norm(x, w, b, 1e-12, backend=backend)
    with pytest.raises(TypeError, match=r"layer_norm weight must be a floating tensor, got "
                                        r"torch\.int32"):
        ops.layer_norm(x.float(), w.int(), b, 1e-12, backend=backend)
    with pytest.raises(TypeError, match="layer_norm input must be a floating tensor"):
        LayerNorm(8)(x)
    with pytest.raises(TypeError, match=r"gelu input must be a floating tensor, got torch\.int64"):
        ops.gelu(x, backend=backend)
    # floating input still goes through, equal to the formula
    xf = torch.randn(3, 8, dtype=torch.float64)
    ref = (xf - xf.mean(-1, keepdim=True)) / torch.sqrt(xf.var(-1, unbiased=False, keepdim=True)
                                                       + 1e-12) * w.double() + b.double()
    out = ops.layer_norm(xf.float(), w, b, 1e-12, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _args(cfg, ds=DS, *extra):
    from uniter_fast.training.config import build_arg_parser
    return build_arg_parser().parse_args(["--config", cfg, "--deepspeed_config", ds, *extra])


def test_malformed_json_configs_name_the_file(tmp_path):
    from uniter_fast.training.config import load_configs
    good = _write(tmp_path, "good.json", json.dumps(
        {"output_dir": "x", "num_train_steps": 2, "train_batch_size": 64,
         "train_datasets": [{}], "model_config": "uniter-tiny"}))
    bad = _write(tmp_path, "bad.json", '{"output_dir": "x",\n "num_train_steps": 2,,}')
    with pytest.raises(ValueError, match=r"training config .*bad\.json is not valid JSON: "
                                         r".* at line 2 column"):
        load_configs(_args(bad))
    badds = _write(tmp_path, "ds_bad.json", '{"bf16": {"enabled": true}')
    with pytest.raises(ValueError, match=r"DeepSpeed config .*ds_bad\.json is not valid JSON"):
        load_configs(_args(good, badds))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"training config .*bin\.json is not a UTF-8 text"):
        load_configs(_args(str(binary)))
    arr = _write(tmp_path, "arr.json", "[1, 2]")
    with pytest.raises(ValueError, match=r"arr\.json must hold a JSON object, got list"):
        load_configs(_args(arr))
    with pytest.raises(ValueError, match=r"nothere\.json not found"):
        load_configs(_args(str(tmp_path / "nothere.json")))


# ----------------------------------------------------------------------------- item 11

def test_unknown_keys_warn_with_nearest_and_strict_raises(tmp_path):
    from uniter_fast.training.config import check_unknown_keys, load_configs
    from uniter_fast.training.pretrain import PretrainTask
    known = PretrainTask.known_keys
    with open(os.path.join(ROOT, "uniter_fast", "configs", "pretrain-synthetic-tiny.json")) as f:
        cfg = json.load(f)
    cfg["num_train_step"] = 5                # typo of num_train_steps
    cfg["totally_new"] = 1
    path = _write(tmp_path, "typo.json", json.dumps(cfg))
    with pytest.warns(UserWarning) as rec:
        load_configs(_args(path), known_keys=known)
    msg = " ".join(str(w.message) for w in rec)
    assert "typo.json" in msg and "'num_train_step' (did you mean 'num_train_steps'?)" in msg
    assert "'totally_new'" in msg and "--strict_config" in msg
    with pytest.raises(ValueError, match=r"unknown keys 'num_train_step' \(did you mean "
                                         r"'num_train_steps'\?\), 'totally_new'"):
        load_configs(_args(path, DS, "--strict_config"), known_keys=known)
    # the DeepSpeed config too, against DeepSpeed's own keys
    with open(DS) as f:
        ds = json.load(f)
    ds["gradient_clip"] = 1.0
    dpath = _write(tmp_path, "ds_typo.json", json.dumps(ds))
    del cfg["num_train_step"], cfg["totally_new"]
    path = _write(tmp_path, "ok.json", json.dumps(cfg))
    with pytest.raises(ValueError, match=r"DeepSpeed config .*ds_typo\.json: unknown key "
                                         r"'gradient_clip' \(did you mean 'gradient_clipping'"):
        load_configs(_args(path, dpath, "--strict_config"), known_keys=known)
    assert check_unknown_keys({"a": 1}, {"a"}, "x") == []


def test_shipped_and_original_configs_give_no_false_warnings():
    from uniter_fast.training.config import DEEPSPEED_KEYS, load_configs
    from uniter_fast.training.pretrain import DEFAULT_CONFIG, PretrainTask
    known = PretrainTask.known_keys
    missing = set(UNITER_PRETRAIN_KEYS + UNITER_PRETRAIN_OPTIONS) - set(known)
    assert not missing, f"keys of UNITER's pretrain configs reported as unknown: {missing}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_configs(_args(DEFAULT_CONFIG, DS, "--strict_config"), known_keys=known)
    with open(DS) as f:
        assert set(json.load(f)) <= DEEPSPEED_KEYS


# ----------------------------------------------------------------------------- item 6

_WRITER = """
import sys, numpy as np
from uniter_fast.data.db import write_img_db
v, n = float(sys.argv[2]), int(sys.argv[3])
write_img_db(sys.argv[1], {"a.npz": {"features": np.full((n, 16), v, np.float32),
    "norm_bb": np.zeros((n, 6), np.float32), "conf": np.ones(n, np.float32),
    "soft_labels": np.full((n, 3), 1 / 3, np.float32)}}, conf_th=0.2, max_bb=6, min_bb=1)
"""


def _write_db(path, value, n, in_process=True):
    if in_process:
        from uniter_fast.data.db import write_img_db
        write_img_db(path, {"a.npz": {
            "features": np.full((n, 16), value, np.float32),
            "norm_bb": np.zeros((n, 6), np.float32), "conf": np.ones(n, np.float32),
            "soft_labels": np.full((n, 3), 1 / 3, np.float32)}}, conf_th=0.2, max_bb=6, min_bb=1)
    else:   # another process rewrites it in place (a live reader here keeps its env open)
        subprocess.run([sys.executable, "-c", _WRITER, path, str(value), str(n)], check=True,
                       cwd=ROOT)


def test_image_db_rebuilt_under_live_reader_is_read_afresh(tmp_path):
    from uniter_fast.data.db import DetectFeatLmdb
    path = str(tmp_path / "img")
    _write_db(path, 1.0, 4)
    live = DetectFeatLmdb(path, 0.2, 6, 1)
    feat, _ = live["a.npz"]
    assert feat.shape == (4, 16) and feat[0, 0] == 1.0
    # rebuilt at the same path (deleted, written again): new inode
    shutil.rmtree(path)
    _write_db(path, 2.0, 3)
    feat, _ = live["a.npz"]
    assert feat.shape == (3, 16) and feat[0, 0] == 2.0, "stale record from the old db"
    fresh = DetectFeatLmdb(path, 0.2, 6, 1)
    assert fresh["a.npz"][0][0, 0] == 2.0 and fresh.nbb("a.npz") == 3
    # rewritten in place by another process (same inode, new mtime)
    _write_db(path, 5.0, 5, in_process=False)
    feat, _ = live["a.npz"]
    assert feat.shape == (5, 16) and feat[0, 0] == 5.0
    assert live.nbb("a.npz") == 5 and fresh["a.npz"][0][0, 0] == 5.0
    # unchanged db: served from the cache (same arrays)
    assert live["a.npz"][0] is live["a.npz"][0]
