"""Pretraining validation metrics and the grounded synthetic data they rely on.

The metrics are checked with oracle / constant predictors whose values are known
from an independent count over the same batches, and the WRA alignment metric
with a stub encoder whose embeddings make the transport plan's argmax known.
Joint masking (the ablation) leaves the conditional (default) masks unchanged.
"""
import os
from collections import Counter

import numpy as np
import pytest
import torch

from uniter_fast.data import DetectFeatLmdb, MlmDataset, MrcDataset, MrfrDataset, TxtTokLmdb
from uniter_fast.data.build import create_val_loaders
from uniter_fast.data.synthetic import (
    CELL_NAMES,
    CLASS_NAMES,
    SyntheticSpec,
    build_vocab,
    class_prototypes,
    describe,
    draw_scene,
    ensure_synthetic,
)
from uniter_fast.training.pretrain_eval import (
    format_summary,
    summary_rows,
    validate_pretrain,
    wra_loader,
)
from uniter_fast.training.task import RunContext

SPEC = SyntheticSpec(seed=7, num_classes=6, num_train_images=30, num_val_images=24, feat_dim=64,
                     min_objects=2, max_objects=4, regions_per_image=6, min_bb=6, max_bb=6)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return ensure_synthetic(SPEC, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _cfg(syn, tasks=("itm", "mlm", "mrfr", "mrckl")):
    return {"synthetic": {**SPEC.__dict__}, "conf_th": SPEC.conf_th, "max_bb": SPEC.max_bb,
            "min_bb": SPEC.min_bb, "img_dim": SPEC.feat_dim, "train_batch_size": 512,
            "val_batch_size": 512, "seed": 3, "itm_ot_lambda": 0.1,
            "val_datasets": [{"name": "syn", "db": ["synthetic:val"], "img": ["synthetic:img"],
                              "tasks": list(tasks)}]}


@pytest.fixture
def loaders(syn, monkeypatch):
    monkeypatch.setenv("UNITER_FAST_CACHE", os.path.dirname(syn["root"]))
    cfg = _cfg(syn)
    vl = create_val_loaders(cfg)
    vl["wra_syn"] = wra_loader(vl["itm_syn"], cfg)
    return cfg, vl


CTX = RunContext(torch.device("cpu"), 0, 1, 0, "", {"img_dim": SPEC.feat_dim})


def _meta(syn):
    return TxtTokLmdb(syn["val"], -1).meta


# ----------------------------------------------------------------------------- data
def test_captions_name_each_object_with_the_cell_of_its_box(syn):
    txt = TxtTokLmdb(syn["val"], -1)
    img = DetectFeatLmdb(syn["img"], SPEC.conf_th, SPEC.max_bb, SPEC.min_bb)
    vocab = txt.meta["vocab"]
    lo, hi = txt.meta["obj_token_range"]
    assert vocab[lo:hi] == CLASS_NAMES[:SPEC.num_classes]
    for id_ in txt.id2len:
        ex = txt[id_]
        words = [vocab[i] for i in ex["input_ids"]]
        d = img.get_dump(ex["img_fname"])
        assert d["features"].shape[0] == SPEC.regions_per_image, "every image has R boxes"
        assert sorted(lo + c - 1 for c in ex["classes"]) == sorted(
            ex["input_ids"][t] for t in ex["obj_tokens"])
        assert len(set(ex["obj_regions"])) == len(ex["obj_regions"])
        assert ex["obj_phrases"] == [[t, t + 1] for t in ex["obj_tokens"]]
        for t, r in zip(ex["obj_tokens"], ex["obj_regions"]):
            cls = CLASS_NAMES.index(words[t]) + 1
            assert d["soft_labels"][r].argmax() == cls, "the word's region has its class"
            cell = CELL_NAMES[SPEC.grid].index(words[t + 1])     # "cat top-left"
            x1, y1, x2, y2 = d["norm_bb"][r, :4].astype(np.float64)
            row, col = divmod(cell, SPEC.grid)
            cx, cy = (x1 + x2) / 2 * SPEC.grid, (y1 + y2) / 2 * SPEC.grid
            assert int(cx) == col and int(cy) == row, "the box sits in the named cell"
        # clutter (the other boxes) sits in cells no word names
        obj_cells = {CELL_NAMES[SPEC.grid].index(words[t + 1]) for t in ex["obj_tokens"]}
        for r in set(range(SPEC.regions_per_image)) - set(ex["obj_regions"]):
            assert d["soft_labels"][r].argmax() == 0
            x1, y1, x2, y2 = d["norm_bb"][r, :4].astype(np.float64)
            cell = int((y1 + y2) / 2 * SPEC.grid) * SPEC.grid + int((x1 + x2) / 2 * SPEC.grid)
            assert cell not in obj_cells


def test_scene_api_fixed_objects_and_vocab_extras():
    rng = np.random.default_rng(0)
    protos = class_prototypes(SPEC, rng)
    scene = draw_scene(SPEC, rng, protos, classes=[3, 1], cells=[8, 0])
    assert [o.cls for o in scene.objects] == [3, 1] and [o.cell for o in scene.objects] == [8, 0]
    assert scene.features.shape == (SPEC.regions_per_image, SPEC.feat_dim)
    for i, r in enumerate(scene.object_region):
        assert scene.region_object[r] == i and scene.soft_labels[r].argmax() == scene.objects[i].cls
    assert np.all(np.diff(scene.conf) <= 0), "regions are stored by confidence"
    vocab = build_vocab(SPEC.num_classes, SPEC.grid, extra=["yes", "no"])
    assert vocab[:len(build_vocab(SPEC.num_classes, SPEC.grid))] == build_vocab(SPEC.num_classes)
    tok = {w: i for i, w in enumerate(vocab)}
    cap = describe(scene, rng, tok)
    words = cap.text.split()
    assert [words[t] for t in cap.obj_tokens] == [scene.objects[scene.region_object[r]].name
                                                  for r in cap.obj_regions]
    with pytest.raises(ValueError, match="extra words"):
        build_vocab(SPEC.num_classes, SPEC.grid, extra=["cat"])
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticSpec(grid=2, max_objects=5).validate()


# ----------------------------------------------------------------------------- metrics
class OracleEngine:
    """Predicts from the batch's own targets (``mode="oracle"``) or a constant."""

    def __init__(self, mode, mean_feat=None, const_label=None):
        self.mode, self.mean_feat, self.const_label = mode, mean_feat, const_label

    def __call__(self, batch, task, compute_loss=False):
        if task == "mlm":
            labels = batch["txt_labels"][batch["txt_labels"] != -1]
            out = torch.zeros(labels.numel(), 64)
            idx = labels if self.mode == "oracle" else torch.full_like(labels, self.const_label)
            return out.scatter(1, idx[:, None], 10.0)
        if task == "itm":
            t = batch["targets"]
            return torch.nn.functional.one_hot(t, 2).float() * 10, None
        if task == "mrfr":
            tgt = batch["feat_targets"]
            return tgt.clone() if self.mode == "oracle" else self.mean_feat.expand_as(tgt)
        tgt = batch["label_targets"]
        return torch.log(tgt + 1e-9) if self.mode == "oracle" else torch.zeros_like(tgt)


def _epoch(loader):
    return list(loader.epoch_batches(0))


def test_oracle_and_constant_predictors_give_known_metrics(syn, loaders):
    cfg, vl = loaders
    vl = {k: v for k, v in vl.items() if not k.startswith("wra")}
    meta = _meta(syn)
    lo, hi = meta["obj_token_range"]
    logs = validate_pretrain(OracleEngine("oracle"), vl, CTX, meta)
    assert logs["itm_syn/acc"] == 1.0 and logs["mlm_syn/acc"] == 1.0
    assert logs["mlm_syn/obj_acc"] == 1.0 and logs["mrckl_syn/obj_acc"] == 1.0
    assert logs["mrfr_syn/loss"] == pytest.approx(0.0, abs=1e-6)
    assert logs["mlm_syn/obj_acc_chance"] == pytest.approx(1 / SPEC.num_classes)
    assert logs["mrckl_syn/obj_acc_chance"] == pytest.approx(1 / SPEC.num_classes)

    # independent counts over the same batches
    labels = torch.cat([b["txt_labels"][b["txt_labels"] != -1] for b in _epoch(vl["mlm_syn"])])
    obj = labels[(labels >= lo) & (labels < hi)]
    cnt = Counter(obj.tolist())
    top = cnt.most_common(1)[0][0]
    assert logs["mlm_syn/obj_acc_majority"] == pytest.approx(cnt[top] / obj.numel())
    itm_t = torch.cat([b["targets"] for b in _epoch(vl["itm_syn"])])
    assert logs["itm_syn/acc_majority"] == pytest.approx(
        max(itm_t.float().mean().item(), 1 - itm_t.float().mean().item()))
    feats = torch.cat([b["feat_targets"].float() for b in _epoch(vl["mrfr_syn"])]).double()
    mean = feats.mean(0)
    base = ((feats - mean) ** 2).mean().item()
    assert logs["mrfr_syn/mean_baseline"] == pytest.approx(base, rel=1e-6)
    soft = torch.cat([b["label_targets"] for b in _epoch(vl["mrckl_syn"])])
    is_obj = soft.argmax(-1) != 0
    assert 0 < is_obj.sum() < len(soft), "masked regions include objects and clutter"
    cls = Counter(soft[is_obj].argmax(-1).tolist())
    assert logs["mrckl_syn/obj_acc_majority"] == pytest.approx(
        cls.most_common(1)[0][1] / int(is_obj.sum()))

    # constants: the mean feature scores exactly the baseline; one class word scores its share
    const = validate_pretrain(OracleEngine("const", mean_feat=mean.float(), const_label=top),
                              vl, CTX, meta)
    assert const["mrfr_syn/loss_vs_mean"] == pytest.approx(1.0, rel=1e-4)
    assert const["mlm_syn/obj_acc"] == pytest.approx(logs["mlm_syn/obj_acc_majority"])


class StubUniter(torch.nn.Module):
    """Text token -> one-hot of its class (class words) or of a spare dim; region -> one-hot
    of the class of its feature's nearest prototype (shifted by ``shift`` classes)."""

    def __init__(self, protos, obj_range, shift=0, on_cell_word=False):
        super().__init__()
        self.protos, self.lo, self.hi, self.shift = torch.tensor(protos), *obj_range, shift
        self.k = obj_range[1] - obj_range[0]
        self.on_cell_word = on_cell_word    # the class one-hot on the word after a class word

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attn_masks, gather_index,
                output_all_encoded_layers=False):
        h = self.k + 2
        is_cls = (input_ids >= self.lo) & (input_ids < self.hi)
        t_idx = torch.where(is_cls, input_ids - self.lo, torch.full_like(input_ids, self.k))
        if self.on_cell_word:
            t_idx = torch.cat([torch.full_like(t_idx[:, :1], self.k), t_idx[:, :-1]], dim=1)
        txt = torch.nn.functional.one_hot(t_idx, h).float()
        d = torch.cdist(img_feat.float(), self.protos[None].float())        # [B, N, K+1]
        c = d.argmin(-1)
        r_idx = torch.where(c > 0, (c - 1 + self.shift) % self.k, torch.full_like(c, self.k + 1))
        img = torch.nn.functional.one_hot(r_idx, h).float()
        seq = torch.cat([txt, img], dim=1)
        return seq.gather(1, gather_index.unsqueeze(-1).expand(-1, -1, h))


class StubEngine:
    def __init__(self, uniter):
        self.module = torch.nn.Module()
        self.module.uniter = uniter


def test_wra_alignment_reads_the_transport_plan(syn, loaders):
    cfg, vl = loaders
    meta = _meta(syn)
    protos = class_prototypes(SPEC, np.random.default_rng(SPEC.seed))
    wra = {"wra_syn": vl["wra_syn"]}
    good = validate_pretrain(StubEngine(StubUniter(protos, meta["obj_token_range"])), wra, CTX,
                             meta)
    assert good["wra_syn/align_acc"] == 1.0 and good["wra_syn/phrase_align_acc"] == 1.0
    assert good["wra_syn/align_acc_chance"] == pytest.approx(1 / SPEC.regions_per_image)
    assert good["wra_syn/ot_pos"] < good["wra_syn/ot_neg"]
    assert good["wra_syn/ot_pair_acc"] >= 0.9
    # every word aligned to a region of the next class: never the right region
    bad = validate_pretrain(StubEngine(StubUniter(protos, meta["obj_token_range"], shift=1)),
                            wra, CTX, meta)
    assert bad["wra_syn/align_acc"] < good["wra_syn/align_acc_chance"]
    assert bad["wra_syn/phrase_align_acc"] < good["wra_syn/align_acc_chance"]
    # the class on the cell word: the phrase (class + cell word) finds the region, the word not
    cell = validate_pretrain(StubEngine(StubUniter(protos, meta["obj_token_range"],
                                                   on_cell_word=True)), wra, CTX, meta)
    assert cell["wra_syn/phrase_align_acc"] == 1.0
    assert cell["wra_syn/align_acc"] < 0.5
    n_pairs = sum(len(b["pair"]) for b in _epoch(vl["wra_syn"])) // 2
    assert n_pairs == SPEC.num_val_images * SPEC.captions_per_image


def test_summary_rows_name_baselines_and_targets():
    logs = {"itm_syn/acc": 0.95, "itm_syn/acc_majority": 0.5, "mlm_syn/obj_acc": 0.7,
            "mlm_syn/obj_acc_chance": 0.1, "mrc-kl_syn/obj_acc": 0.65,
            "mrc-kl_syn/obj_acc_chance": 0.1, "mrfr_syn/loss": 0.1,
            "mrfr_syn/mean_baseline": 0.25, "wra_syn/align_acc": 0.8,
            "wra_syn/align_acc_chance": 0.17, "wra_syn/ot_pair_acc": 0.95,
            "wra_syn/ot_pair_acc_chance": 0.5, "wra_syn/phrase_align_acc": 0.3,
            "wra_syn/ot_pos": 0.2, "wra_syn/ot_neg": 0.4}
    rows = {r["metric"]: r for r in summary_rows(logs)}
    assert set(rows) == {"itm/acc", "mlm/obj_acc", "mrckl/obj_acc", "mrfr/loss",
                         "wra/align_acc", "wra/phrase_align_acc", "wra/ot_pair_acc"}
    assert rows["itm/acc"]["ok"] and not rows["mlm/obj_acc"]["ok"]
    assert rows["wra/ot_pair_acc"]["ok"] and rows["wra/ot_pair_acc"]["baseline"] == 0.5
    assert "ok" not in rows["wra/align_acc"] and rows["wra/phrase_align_acc"]["baseline"] == 0.17
    assert rows["mrfr/loss"]["ok"] and rows["mrfr/loss"]["baseline"] == 0.25
    logs["mrfr_syn/loss"] = 0.2
    assert not {r["metric"]: r for r in summary_rows(logs)}["mrfr/loss"]["ok"]
    text = format_summary(summary_rows(logs))
    assert "MISSED" in text and "matched 0.2000 vs mismatched 0.4000" in text
    assert all("target" not in r for r in summary_rows(logs, with_targets=False))


# ----------------------------------------------------------------------------- masking
def test_joint_masking_adds_the_other_modality_and_keeps_the_conditional_masks(syn):
    txt = TxtTokLmdb(syn["train"], -1)
    img = DetectFeatLmdb(syn["img"], SPEC.conf_th, SPEC.max_bb, SPEC.min_bb)
    kw = dict(seed=5)
    default, cond = MlmDataset(txt, img, **kw), MlmDataset(txt, img, masking="conditional", **kw)
    joint = MlmDataset(txt, img, masking="joint", other_prob=0.3, **kw)
    n_reg = n_zero = 0
    for i in range(len(default)):
        a, b, j = default[i], cond[i], joint[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["img_feat"],
                                                                          b["img_feat"])
        assert torch.equal(a["input_ids"], j["input_ids"]), "same text mask"
        zero = (j["img_feat"] == 0).all(-1)
        assert torch.equal(j["img_feat"][~zero], a["img_feat"][~zero])
        n_reg += zero.numel()
        n_zero += int(zero.sum())
    assert 0.15 < n_zero / n_reg < 0.45
    for cls in (MrfrDataset, MrcDataset):
        default = cls(txt, img, **kw)
        joint = cls(txt, img, masking="joint", other_prob=0.3, **kw)
        n_tok = n_changed = 0
        for i in range(len(default)):
            a, j = default[i], joint[i]
            assert torch.equal(a["img_mask"], j["img_mask"]), "same region mask"
            assert torch.equal(a["img_feat"], j["img_feat"])
            n_tok += a["input_ids"].numel() - 2
            n_changed += int((a["input_ids"] != j["input_ids"]).sum())
        assert 0.12 < n_changed / n_tok < 0.4     # 0.3 selected, 90% of them changed
    with pytest.raises(ValueError, match="masking must be one of"):
        MlmDataset(txt, img, masking="both")
