"""VCR (``train_vcr.py``, ``inf_vcr.py``): Q->A and QA->R.

The Q->A and QA->R datasets of every train db concatenated, token batches,
``train_img_dbs`` entries ``"gt_db;det_db"`` (``gt`` in the directory name: the
ground-truth boxes, read with ``conf_th=-1, num_bb=100``), the model's
``init_type_embedding()`` and ``init_word_embedding(81)``, ``checkpoint_from``
``pretrain`` (load, then grow the embeddings) or ``vcr_pretrain`` (grow, then load the
matching keys); loss ``mean()``; validation ``{split}/acc_qa``, ``acc_qar``, ``acc`` (and
the two losses), scores to ``results_{split}/results_{step}_all.json`` and, for a split
without labels, the leaderboard CSV ``results_{split}/results_{step}_all.csv``.
Inference writes ``results_{name}_all.json`` (qid -> scores) and, for a test db (no
labels), the leaderboard CSV; accuracies printed when the db has labels.  Synthetic
data: :mod:`uniter_fast.data.synthetic_tasks.vcr`.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from ..constants import BUCKET_SIZE, IMG_DIM
from ..data.db import open_img_db
from ..data.loader import TaskLoader, move_to_device
from ..data.sampler import ExampleSampler, TokenBucketSampler, config_seed, rank_seed
from ..data.synthetic_tasks import vcr as synthetic_vcr
from ..data.vcr import (
    ANSWER_TYPE,
    QUESTION_TYPE,
    RATIONALE_TYPE,
    VcrDataset,
    VcrEvalDataset,
    VcrTxtTokLmdb,
    vcr_collate,
    vcr_eval_collate,
)
from ..eval.vcr import VcrEvaluator, write_vcr_submission
from ..model.build import model_config_path, set_dropout
from ..model.vcr import VCR_NUM_SPECIAL_TOKENS, UniterForVisualCommonsenseReasoning, vcr_train_loss
from ..training.validation import reduce_sums, val_batches
from .base import (
    ORIGINAL_KEYS,
    OWN_KEYS,
    FinetuneTask,
    example_loader,
    gather_lists,
    is_gt_db,
    result_dir,
)
from .inference import (
    Progress,
    autocast,
    claim_outputs,
    db_name,
    default_output_dir,
    load_strict,
    load_weights,
    write_json,
)

#: the original train_vcr.py's keys beyond the shared ones
VCR_KEYS = frozenset({"checkpoint_from"})
#: VCR's ``checkpoint_from`` values
CHECKPOINT_FROM = ("pretrain", "vcr_pretrain")
#: VCR texts are longer (question + answer + rationale): train_vcr.py's default
DEFAULT_MAX_TXT_LEN = 120
#: questions per batch at validation and inference (inf_vcr.py's default)
DEFAULT_EVAL_BATCH = 10
#: ground-truth-box dbs are read with every box
GT_NUM_BB = 100


def vcr_img_dbs(spec: str, cfg):
    """(gt db or None, detected db or None) of a ``"gt;det"`` entry (the original's
    ``load_img_feat``)."""
    parts = spec.split(";")
    if len(parts) > 2:
        raise ValueError(f"VCR image db entry {spec!r}: more than two image dbs")
    gt = [p for p in parts if is_gt_db(p)]
    det = [p for p in parts if not is_gt_db(p)]
    if len(gt) > 1 or len(det) > 1:
        raise ValueError(f"VCR image db entry {spec!r}: expected one ground-truth db (name "
                         "with 'gt') and/or one detected db")
    return (open_img_db(gt[0], cfg, conf_th=-1, num_bb=GT_NUM_BB) if gt else None,
            open_img_db(det[0], cfg) if det else None)


def _eval_dataset(txt_db: str, img_spec: str, cfg, rank: int = 0, world_size: int = 1):
    txt = VcrTxtTokLmdb(txt_db, -1, "qa,qar")
    if not txt.id2len:
        raise ValueError(f"VCR text db {txt_db} holds no question")
    first = txt[next(iter(txt.id2len))]
    layout = "val" if first["qa_target"] >= 0 else "test"
    gt, det = vcr_img_dbs(img_spec, cfg)
    return VcrEvalDataset(layout, txt, img_db_gt=gt, img_db=det, rank=rank,
                          world_size=world_size)


class VcrTask(FinetuneTask):
    name = "vcr"
    head_prefixes = ("vcr_output",)
    known_keys = ORIGINAL_KEYS | OWN_KEYS | VCR_KEYS
    synthetic_data = synthetic_vcr
    infer_batch_help = f"questions per batch (default {DEFAULT_EVAL_BATCH})"

    def check_config(self, cfg):
        super().check_config(cfg)
        cfg.setdefault("checkpoint_from", "pretrain")
        if cfg["checkpoint_from"] not in CHECKPOINT_FROM:
            raise ValueError(f"training config checkpoint_from must be one of {CHECKPOINT_FROM}"
                             f", got {cfg['checkpoint_from']!r}")

    def text_meta(self, txt_db):
        return VcrTxtTokLmdb(txt_db, -1, "qa").meta

    def longest_eval_text(self, txt_db):
        """The longest row validation builds: [CLS] q [SEP] a [SEP] (every answer) and
        [CLS] q [SEP] a [SEP] r [SEP] (the right answer's, or every answer's on a test db)."""
        txt = VcrTxtTokLmdb(txt_db, -1, "qa,qar")
        ids = list(txt.id2len)
        if not ids:
            return None
        test = txt[ids[0]]["qa_target"] < 0
        longest = 0
        for id_ in ids:
            ex = txt[id_]
            q, ans = len(ex["input_ids"]), [len(a) for a in ex["input_ids_as"]]
            with_r = ans if test else [ans[int(ex["qa_target"])]]
            longest = max(longest, q + max(ans) + 3,
                          q + max(with_r) + max(len(r) for r in ex["input_ids_rs"]) + 4)
        return longest

    def make_model(self, cfg, state=None):
        from_vcr = cfg.get("checkpoint_from", "pretrain") == "vcr_pretrain"
        model = UniterForVisualCommonsenseReasoning.from_pretrained(
            model_config_path(cfg), None if from_vcr else state,
            img_dim=int(cfg.get("img_dim") or IMG_DIM))
        model.init_type_embedding()
        model.init_word_embedding(VCR_NUM_SPECIAL_TOKENS)
        if from_vcr and state is not None:
            own = dict(model.named_parameters())
            matched = {k: v for k, v in state.items() if k in own}
            if not matched:
                raise ValueError(f"checkpoint {cfg.get('checkpoint')}: no key matches "
                                 f"{type(model).__name__} (checkpoint_from vcr_pretrain)")
            model.load_state_dict(matched, strict=False)
        set_dropout(model, cfg.get("dropout"))
        return model

    # ---------------------------------------------------------------- data
    def train_loader(self, cfg, rank, world_size, accum_steps):
        parts = []
        max_len = int(cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN))
        for t, i in zip(cfg["train_txt_dbs"], cfg["train_img_dbs"]):
            gt, det = vcr_img_dbs(i, cfg)
            for task in ("qa", "qar"):
                parts.append(VcrDataset(VcrTxtTokLmdb(t, max_len, task), img_db_gt=gt,
                                        img_db=det, rank=rank, world_size=world_size,
                                        seed=config_seed(cfg)))
        sampler = TokenBucketSampler(int(cfg.get("bucket_size", BUCKET_SIZE)),
                                     int(cfg["train_batch_size"]), droplast=True,
                                     seed=rank_seed(cfg, rank))
        return example_loader(self.name, cfg, parts, vcr_collate, sampler, accum_steps)

    def val_loaders(self, cfg, rank, world_size):
        out = {}
        for split in self.splits(cfg):
            ds = _eval_dataset(cfg[f"{split}_txt_db"], cfg[f"{split}_img_db"], cfg, rank,
                               world_size)
            bs = int(cfg.get("val_batch_size") or DEFAULT_EVAL_BATCH)
            out[split] = TaskLoader(ds, vcr_eval_collate, ExampleSampler(bs, shuffle=False))
        return out

    # ---------------------------------------------------------------- training
    def compute_loss(self, engine, name, batch, cfg):
        return vcr_train_loss(engine(batch, compute_loss=True)), {}

    def batch_size(self, batch):
        return int(batch["attn_masks"].sum()), int(batch["attn_masks"].size(0)) // 4

    def validate(self, engine, val_loaders, ctx):
        logs: Dict[str, float] = {}
        for split, loader in val_loaders.items():
            ev = VcrEvaluator()
            labelled = loader.dataset.split == "val"
            for b, real in val_batches(loader, ctx):
                scores = engine(b, compute_loss=False)
                if real:
                    ev.update(scores, b)
            tot = reduce_sums(dict(zip(ev.KEYS, ev.totals())), ev.KEYS, ctx.world_size)
            results = dict(gather_lists(list(ev.results.items()), ctx.world_size))
            if labelled:
                logs.update({f"{split}/{k}": v
                             for k, v in ev.metrics([tot[k] for k in ev.KEYS]).items()})
            if ctx.rank == 0:
                d = result_dir(ctx, split)
                write_json(os.path.join(d, f"results_{ctx.step}_all.json"), results)
                if not labelled:
                    write_vcr_submission(results, os.path.join(d, f"results_{ctx.step}_all.csv"))
        return logs

    # ---------------------------------------------------------------- inference
    def add_infer_args(self, parser):
        parser.add_argument("--output_dir", default=None,
                            help="where the result files go (default: RUN_DIR/results_vcr_<txt db>)")

    def infer(self, args, cfg, source, device):
        out_dir = args.output_dir or default_output_dir(
            source, f"results_{self.name}_{db_name(args.txt_db)}")
        ds = _eval_dataset(args.txt_db, args.img_db, cfg)
        labelled = ds.split == "val"
        name = f"results_{source.name}_all"            # inf_vcr.py's names
        out = {"output": os.path.join(out_dir, f"{name}.json")}
        if not labelled:
            out["csv"] = os.path.join(out_dir, f"{name}.csv")
        claim_outputs([out["output"]] + ([out["csv"]] if "csv" in out else []), args.overwrite)
        model = load_strict(self.blank_model(dict(cfg, checkpoint_from="pretrain")),
                            load_weights(source), source.where, cfg)
        model.to(device).eval()
        loader = TaskLoader(ds, vcr_eval_collate,
                            ExampleSampler(int(args.batch_size or DEFAULT_EVAL_BATCH),
                                           shuffle=False))
        ev = VcrEvaluator()
        bar = Progress(len(ds), not args.no_progress, "question")
        with torch.no_grad(), autocast(device, args.precision):
            for b in loader.epoch_batches(0):
                b = move_to_device(b, device)
                ev.update(model(b, compute_loss=False), b)
                bar(len(b["qids"]))
        bar.close()
        write_json(out["output"], ev.results)
        if labelled:
            out["metrics"] = ev.metrics(ev.totals())
            print(", ".join(f"{k}: {v:.4f}" for k, v in out["metrics"].items()))
        else:
            write_vcr_submission(ev.results, out["csv"])
        return out

    # ---------------------------------------------------------------- predict
    predict_fields = {
        "question": ("text", True, "VCR: the question"),
        "answer": ("texts", True, "VCR: an answer choice (repeat the option for each)"),
        "rationale": ("texts", False, "VCR: a rationale choice (repeat for each; optional: "
                                      "without them only Q->A)")}

    def predict_model(self, args, cfg, source):
        return load_strict(self.blank_model(dict(cfg, checkpoint_from="pretrain")),
                           load_weights(source), source.where, cfg)

    def _predict_rows(self, request, ctx):
        """The rows of ``VcrEvalDataset``'s test layout: [CLS] q [SEP] a [SEP] for every
        answer, then [CLS] q [SEP] a [SEP] r [SEP] for every answer and rationale (token
        types 0 question, 2 answer, 3 rationale), each checked to fit; and the words of
        each Q->A row."""
        where = request["where"]
        qw = ctx.words(request["question"], where, "question")
        q = [t for _, ids in qw for t in ids]
        tq = [QUESTION_TYPE] * len(q)
        answers = [ctx.tokens(a, where, f"answer {k}") for k, a in enumerate(request["answer"])]
        rats = [ctx.tokens(r, where, f"rationale {k}")
                for k, r in enumerate(request.get("rationale") or [])]
        rows, types, words = [], [], []
        for k, a in enumerate(answers):
            rows.append([ctx.cls_] + q + [ctx.sep] + a + [ctx.sep])
            types.append([QUESTION_TYPE] + tq + [ANSWER_TYPE] * (len(a) + 2))
            ctx.fit(len(rows[-1]), where, f"question + answer {k}")
            spans, pos = [], 1
            for w, ids in qw:
                spans.append((w, pos, pos + len(ids)))
                pos += len(ids)
            pos += 1
            for w, ids in ctx.words(request["answer"][k], where, f"answer {k}"):
                spans.append((w, pos, pos + len(ids)))
                pos += len(ids)
            words.append(spans)
        for k, a in enumerate(answers):
            qa = [ctx.cls_] + q + [ctx.sep] + a + [ctx.sep]
            tqa = [QUESTION_TYPE] + tq + [ANSWER_TYPE] * (len(a) + 1)
            for j, r in enumerate(rats):
                rows.append(qa + r + [ctx.sep])
                types.append(tqa + [RATIONALE_TYPE] * (len(r) + 2))
                ctx.fit(len(rows[-1]), where, f"question + answer {k} + rationale {j}")
        return rows, types, words

    def _predict_item(self, request, ctx, only=None):
        rows, types, _ = self._predict_rows(request, ctx)
        if only is not None:
            rows, types = [rows[only]], [types[only]]
        feat, pos = ctx.image_inputs(request["images"][0])
        outs = [VcrEvalDataset._row(r, t, feat, pos) for r, t in zip(rows, types)]
        return outs, request["id"], torch.tensor([-1]), torch.tensor([-1])

    def predict_requests(self, model, requests, ctx):
        """Every row scored as inference does (``vcr_eval_collate`` batches; requests with as
        many choices together); the answer is the best Q->A row, the rationale the best
        QA->R row of that answer; ``score``: softmax over the choices; ``scores``: every
        row's score (``infer``'s results)."""
        groups: Dict[tuple, list] = {}
        for i, r in enumerate(requests):
            groups.setdefault((len(r["answer"]), len(r.get("rationale") or [])), []).append(i)
        scores: Dict[int, torch.Tensor] = {}
        for idx in groups.values():
            for chunk in ctx.chunks(idx):
                batch = vcr_eval_collate([self._predict_item(requests[i], ctx) for i in chunk])
                out = ctx.run(model, batch).reshape(len(chunk), -1)
                for i, row in zip(chunk, out):
                    scores[i] = row
        return [self._vcr_answer(requests[i], scores[i], ctx) for i in range(len(requests))]

    @staticmethod
    def _vcr_answer(request, row, ctx):
        n_a, n_r = len(request["answer"]), len(request.get("rationale") or [])
        qa = row[:n_a]
        probs = torch.softmax(qa, -1)
        best = int(qa.argmax())
        top = [{"answer": request["answer"][k], "index": k, "score": float(probs[k]),
                "logit": float(qa[k])} for k in probs.argsort(descending=True).tolist()]
        out = {"answer": request["answer"][best], "answer_index": best,
               "score": float(probs[best]), "top": top, "scores": row.tolist()}
        if n_r:
            qar = row[n_a + best * n_r:n_a + (best + 1) * n_r]
            rp = torch.softmax(qar, -1)
            rb = int(qar.argmax())
            out.update(rationale=request["rationale"][rb], rationale_index=rb,
                       rationale_score=float(rp[rb]),
                       rationales=[{"rationale": request["rationale"][k], "index": k,
                                    "score": float(rp[k]), "logit": float(qar[k])}
                                   for k in rp.argsort(descending=True).tolist()])
        return out

    def predict_alignment(self, request, answer, ctx):
        """The question and the chosen answer (its Q->A row) and the image."""
        k = answer["answer_index"]
        _, _, words = self._predict_rows(request, ctx)
        batch = vcr_eval_collate([self._predict_item(request, ctx, only=k)])
        n = request["images"][0].num_boxes
        return batch, words[k], [[(0, r) for r in range(n)]]

    def predict_picture(self, request, answer):
        title = [f"Q: {request['question']}", f"A: {answer['answer']}"]
        if "rationale" in answer:
            title.append(f"because: {answer['rationale']}")
        return {"title": title, "ranked": [(t["answer"], t["score"]) for t in answer["top"]],
                "highlight": []}
