"""``python -m uniter_fast.prepro``: annotation files to UNITER's text db.

Against independent transcriptions, written here, of what the original ran:
pytorch_pretrained_bert's ``BertTokenizer(do_lower_case=False)`` (the basic tokenizer and
greedy WordPiece) and UNITER's ``prepro.py`` (``bert_tokenize``, ``process_nlvr2``,
``process_referring_expressions``, its db writer and json files).  The NLVR2 and RE dbs
must hold the same msgpack bytes and the same json files; VQA soft scores and the answer
normaliser against hand-worked examples; every kind of bad input reported with its file
and line (or record index) and counted; the restricted unpickler refuses code; the command
line end to end.  Everything is generated here: no download.
"""
import collections
import json
import os
import pickle
import random
import subprocess
import sys
import unicodedata

import msgpack
import numpy as np
import pytest
from lz4.frame import decompress

import uniter_fast.prepro as pp
from uniter_fast.data import (
    VE_ENT2IDX,
    DetectFeatLmdb,
    Nlvr2PairedEvalDataset,
    TxtTokLmdb,
    VeEvalDataset,
    VqaEvalDataset,
    write_img_db,
)
from uniter_fast.data.re import ReDataset, ReEvalDataset, ReTxtTokLmdb
from uniter_fast.tasks import TASKS, get_task
from uniter_fast.tasks import base as pp_base

pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ transcriptions
# pytorch_pretrained_bert/tokenization.py (0.6.x), BertTokenizer(vocab, do_lower_case=False):
# never_split ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"), max_input_chars_per_word 100.

def orig_load_vocab(path):
    vocab = collections.OrderedDict()
    index = 0
    with open(path, "r", encoding="utf-8") as reader:
        while True:
            token = reader.readline()
            if not token:
                break
            token = token.strip()
            vocab[token] = index
            index += 1
    return vocab


def orig_whitespace_tokenize(text):
    text = text.strip()
    if not text:
        return []
    return text.split()


class OrigBasicTokenizer:
    def __init__(self, do_lower_case=True,
                 never_split=("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")):
        self.do_lower_case = do_lower_case
        self.never_split = never_split

    def tokenize(self, text):
        text = self._clean_text(text)
        text = self._tokenize_chinese_chars(text)
        orig_tokens = orig_whitespace_tokenize(text)
        split_tokens = []
        for token in orig_tokens:
            if self.do_lower_case and token not in self.never_split:
                token = token.lower()
                token = self._run_strip_accents(token)
            split_tokens.extend(self._run_split_on_punc(token))
        return orig_whitespace_tokenize(" ".join(split_tokens))

    def _run_strip_accents(self, text):
        text = unicodedata.normalize("NFD", text)
        return "".join(c for c in text if unicodedata.category(c) != "Mn")

    def _run_split_on_punc(self, text):
        if text in self.never_split:
            return [text]
        chars = list(text)
        i = 0
        start_new_word = True
        output = []
        while i < len(chars):
            char = chars[i]
            if _orig_is_punctuation(char):
                output.append([char])
                start_new_word = True
            else:
                if start_new_word:
                    output.append([])
                start_new_word = False
                output[-1].append(char)
            i += 1
        return ["".join(x) for x in output]

    def _tokenize_chinese_chars(self, text):
        output = []
        for char in text:
            cp = ord(char)
            if self._is_chinese_char(cp):
                output.append(" ")
                output.append(char)
                output.append(" ")
            else:
                output.append(char)
        return "".join(output)

    def _is_chinese_char(self, cp):
        if ((cp >= 0x4E00 and cp <= 0x9FFF) or (cp >= 0x3400 and cp <= 0x4DBF)
                or (cp >= 0x20000 and cp <= 0x2A6DF) or (cp >= 0x2A700 and cp <= 0x2B73F)
                or (cp >= 0x2B740 and cp <= 0x2B81F) or (cp >= 0x2B820 and cp <= 0x2CEAF)
                or (cp >= 0xF900 and cp <= 0xFAFF) or (cp >= 0x2F800 and cp <= 0x2FA1F)):
            return True
        return False

    def _clean_text(self, text):
        output = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xfffd or _orig_is_control(char):
                continue
            if _orig_is_whitespace(char):
                output.append(" ")
            else:
                output.append(char)
        return "".join(output)


class OrigWordpieceTokenizer:
    def __init__(self, vocab, unk_token="[UNK]", max_input_chars_per_word=100):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text):
        output_tokens = []
        for token in orig_whitespace_tokenize(text):
            chars = list(token)
            if len(chars) > self.max_input_chars_per_word:
                output_tokens.append(self.unk_token)
                continue
            is_bad = False
            start = 0
            sub_tokens = []
            while start < len(chars):
                end = len(chars)
                cur_substr = None
                while start < end:
                    substr = "".join(chars[start:end])
                    if start > 0:
                        substr = "##" + substr
                    if substr in self.vocab:
                        cur_substr = substr
                        break
                    end -= 1
                if cur_substr is None:
                    is_bad = True
                    break
                sub_tokens.append(cur_substr)
                start = end
            if is_bad:
                output_tokens.append(self.unk_token)
            else:
                output_tokens.extend(sub_tokens)
        return output_tokens


def _orig_is_whitespace(char):
    if char == " " or char == "\t" or char == "\n" or char == "\r":
        return True
    cat = unicodedata.category(char)
    if cat == "Zs":
        return True
    return False


def _orig_is_control(char):
    if char == "\t" or char == "\n" or char == "\r":
        return False
    cat = unicodedata.category(char)
    if cat.startswith("C"):
        return True
    return False


def _orig_is_punctuation(char):
    cp = ord(char)
    if ((cp >= 33 and cp <= 47) or (cp >= 58 and cp <= 64) or (cp >= 91 and cp <= 96)
            or (cp >= 123 and cp <= 126)):
        return True
    cat = unicodedata.category(char)
    if cat.startswith("P"):
        return True
    return False


class OrigBertTokenizer:
    def __init__(self, vocab_file, do_lower_case=False):
        self.vocab = orig_load_vocab(vocab_file)
        self.basic_tokenizer = OrigBasicTokenizer(do_lower_case=do_lower_case)
        self.wordpiece_tokenizer = OrigWordpieceTokenizer(vocab=self.vocab)

    def tokenize(self, text):
        split_tokens = []
        for token in self.basic_tokenizer.tokenize(text):
            for sub_token in self.wordpiece_tokenizer.tokenize(token):
                split_tokens.append(sub_token)
        return split_tokens

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[token] for token in tokens]


# UNITER's prepro.py


def orig_bert_tokenize(tokenizer, text):
    ids = []
    for word in text.strip().split():
        ws = tokenizer.tokenize(word)
        if not ws:
            continue
        ids.extend(tokenizer.convert_tokens_to_ids(ws))
    return ids


def orig_process_nlvr2(jsonl, db, tokenizer, missing=None):
    id2len = {}
    txt2img = {}
    for line in jsonl:
        example = json.loads(line)
        id_ = example['identifier']
        img_id = '-'.join(id_.split('-')[:-1])
        img_fname = (f'nlvr2_{img_id}-img0.npz', f'nlvr2_{img_id}-img1.npz')
        if missing and (img_fname[0] in missing or img_fname[1] in missing):
            continue
        input_ids = tokenizer(example['sentence'])
        if 'label' in example:
            target = 1 if example['label'] == 'True' else 0
        else:
            target = None
        txt2img[id_] = img_fname
        id2len[id_] = len(input_ids)
        example['input_ids'] = input_ids
        example['img_fname'] = img_fname
        example['target'] = target
        db[id_] = example
    return id2len, txt2img


def orig_process_referring_expressions(refs, instances, iid_to_ann_ids, db, tokenizer, split):
    image_set = set([ref['image_id'] for ref in refs if ref['split'] == split])
    images = []
    for img in instances['images']:
        if img['id'] in image_set:
            images.append({
                'id': img['id'], 'file_name': img['file_name'],
                'ann_ids': iid_to_ann_ids[str(img['id'])],
                'height': img['height'], 'width': img['width']})
    annotations = []
    for ann in instances['annotations']:
        if ann['image_id'] in image_set:
            annotations.append({
                'id': ann['id'], 'area': ann['area'], 'bbox': ann['bbox'],
                'image_id': ann['image_id'],
                'category_id': ann['category_id'],
                'iscrowd': ann['iscrowd']
            })
    Anns = {ann['id']: ann for ann in annotations}
    categories = instances['categories']
    refs = [ref for ref in refs if ref['split'] == split]
    id2len = {}
    for ref in refs:
        ref_id = ref['ref_id']
        ann_id = ref['ann_id']
        image_id = ref['image_id']
        img_fname = f"visual_grounding_coco_gt_{int(image_id):012}.npz"
        for sent in ref['sentences']:
            sent_id = sent['sent_id']
            input_ids = tokenizer(sent['sent'])
            id2len[str(sent_id)] = len(input_ids)
            db[str(sent_id)] = {
                'sent_id': sent_id, 'sent': sent['sent'],
                'ref_id': ref_id, 'ann_id': ann_id,
                'image_id': image_id, 'bbox': Anns[ann_id]['bbox'],
                'input_ids': input_ids,
                'img_fname': img_fname
            }
    return id2len, images, annotations, categories, refs


class OrigDb(dict):
    """The original TxtLmdb's values: msgpack.dumps(value, use_bin_type=True) per key."""

    def __setitem__(self, key, value):
        super().__setitem__(key, msgpack.dumps(value, use_bin_type=True))


def orig_meta(toker):
    return {"UNK": toker.convert_tokens_to_ids(['[UNK]'])[0],
            "CLS": toker.convert_tokens_to_ids(['[CLS]'])[0],
            "SEP": toker.convert_tokens_to_ids(['[SEP]'])[0],
            "MASK": toker.convert_tokens_to_ids(['[MASK]'])[0],
            "v_range": [toker.convert_tokens_to_ids('!')[0], len(toker.vocab)]}


# ============================================================================ generated data

WORDS = ["the", "dog", "dogs", "cat", "man", "woman", "is", "are", "on", "left", "right",
         "image", "two", "three", "red", "What", "color", "There", "play", "un", "a",
         "café", "naïve", "über", "日本", "2019", "MASK", "CLS", "Hello", "world"]
PIECES = ["##s", "##ing", "##ed", "##able", "##believ", "##5", "##é", "##ü", "##a", "##b",
          "##e", "##o", "##r", "##n", "##t", "##1", "##9", "##0"]
SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(8)] + ["[UNK]", "[CLS]", "[SEP]",
                                                             "[MASK]"]


def make_vocab():
    toks = list(SPECIAL)
    toks += [chr(c) for c in range(33, 127)]                    # ASCII printable, '!' first
    toks += ["é", "ü", "ï", "ß", "中", "文", "日", "本", "😀", "€", "—", "…", "¿"]
    toks += WORDS + PIECES
    return list(dict.fromkeys(toks))


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(make_vocab()) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def orig_toker(vocab_file):
    return OrigBertTokenizer(vocab_file, do_lower_case=False)


@pytest.fixture(scope="module")
def toker(vocab_file):
    return pp.BertTokenizer.from_vocab(vocab_file)


AWKWARD = [
    "", " ", "\n\t ", "Hello, world!", "The dog's ball (red) -- isn't it?", "a.b,c;d:e",
    "café naïve über Straße", "cafe\u0301", "日本語のテキスト中文", "中a文b", "2019 3.14 1,000 #1",
    "😀 👍🏽 👩‍👩‍👧 😀😀", "emoji😀inside", "[MASK]", "a[MASK] [MASK]. [CLS][SEP]",
    "[MA\x00SK]", "[UNK] [PAD] [unused0]", "x" * 100, "x" * 101, "ab" * 51,
    "tab\tnew\nline\rret", "nul\x00in\x07side\x7fdel", "zero\u200bwidth\ufeffbom",
    "nbsp\xa0ideo\u3000sp\u2028ls\u2029ps\x0bvt\x0cff\x1cfs\x85nel", "unassigned\u0378x",
    "new\u2e43punct\u061dend", "fffd\ufffdrep", "combining\u0301 \u0301alone",
    "¿Qué? ¡Sí! — «quote» …", "€100 £5 ¥3", "  leading and trailing  ", "UPPER lower MiXeD",
    "play playing played unbelievable", "don't won't y'all", "http://x.y/z?q=1&r=2",
    "\U0002A700\U0002B740 ext CJK \uf900 compat", "Ａ full-width ＡＢＣ", "a\u0009b",
]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    pool = (WORDS + ["".join(rng.choice("abcdefxyzé中😀!?.,'-") for _ in range(rng.randint(1, 8)))
                     for _ in range(40)] + ["x" * 120, "[MASK]", "(", ")", "\x00", "\u200b"])
    seps = [" ", "  ", "\t", "\n", "", "\u3000", "\xa0"]
    return ["".join(rng.choice(pool) + rng.choice(seps) for _ in range(rng.randint(0, 12)))
            for _ in range(n)]


# ============================================================================ tokenizer

def test_tokenizer_equals_the_original_word_by_word(toker, orig_toker):
    texts = AWKWARD + random_texts(400)
    fresh = pp.BertTokenizer(toker.vocab)
    for t in texts:
        want = orig_bert_tokenize(orig_toker, t)
        assert toker.tokenize(t) == want, repr(t)
        assert pp.BertTokenizer(toker.vocab).tokenize(t) == want      # uncached
    words = {w for t in texts for w in t.split()}
    fast = sum(w.isascii() and "[" not in w for w in words)
    assert fast > 50 and len(words) - fast > 50   # both of the tokenizer's paths compared
    old, pp.WORD_CACHE = pp.WORD_CACHE, 5             # a full cache starts over
    try:
        assert [fresh.tokenize(t) for t in texts] == [toker.tokenize(t) for t in texts]
        assert len(fresh._cache) <= 5
    finally:
        pp.WORD_CACHE = old


def test_tokenizer_hits_every_case(toker, orig_toker):
    """The awkward texts do exercise [UNK], ## pieces, never-split tokens and dropped words."""
    v = orig_toker.vocab
    ids = toker.tokenize("playing unbelievable " + "x" * 101 + " [MASK] Ωmega")
    assert v["##ing"] in ids and v["##believ"] in ids and v["[MASK]"] in ids
    assert ids.count(v["[UNK]"]) == 2        # the 101-char word and the unknown Ω word
    assert toker.tokenize("a" + "b" * 99) == [v["a"]] + [v["##b"]] * 99   # 100 chars: tried
    assert toker.tokenize("a" + "b" * 100) == [v["[UNK]"]]                  # 101: [UNK]
    assert toker.tokenize("\x00\u200b \x07") == []           # words with no token: skipped
    assert toker.tokenize("a[MASK]") == [v["a"], v["["], v["MASK"], v["]"]]


def test_tokenizer_meta_and_sources(tmp_path, vocab_file, orig_toker, toker):
    assert toker.meta() == orig_meta(orig_toker)
    # a tokenizer directory: vocab.txt, or tokenizer.json (cased only)
    d = tmp_path / "tok"
    d.mkdir()
    (d / "vocab.txt").write_text(open(vocab_file, encoding="utf-8").read(), encoding="utf-8")
    assert pp.BertTokenizer.from_dir(str(d)).vocab == toker.vocab
    from tokenizers import BertWordPieceTokenizer
    j = tmp_path / "tokj"
    j.mkdir()
    BertWordPieceTokenizer(dict(toker.vocab), lowercase=False).save(str(j / "tokenizer.json"))
    tj = pp.BertTokenizer.from_dir(str(j))
    for t in AWKWARD:
        assert tj.tokenize(t) == toker.tokenize(t)
    u = tmp_path / "uncased"
    u.mkdir()
    BertWordPieceTokenizer(dict(toker.vocab), lowercase=True).save(str(u / "tokenizer.json"))
    with pytest.raises(pp.PreproError, match="uncased"):
        pp.BertTokenizer.from_dir(str(u))
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\nhello\n[UNK]\n", encoding="utf-8")
    with pytest.raises(pp.PreproError, match="lacks"):
        pp.BertTokenizer.from_vocab(str(bad))
    bad.write_text("[UNK]\n[CLS]\n[SEP]\n[MASK]\n!\n!\n", encoding="utf-8")
    with pytest.raises(pp.PreproError, match="lines 5 and 6"):
        pp.BertTokenizer.from_vocab(str(bad))
    with pytest.raises(pp.PreproError, match="neither vocab.txt"):
        pp.BertTokenizer.from_dir(str(tmp_path / "uncased" / ".."))


# ============================================================================ helpers

def task_args(task, out, argv=()):
    """The task's own prepro options (as the command line parses them) plus ``out``."""
    import argparse
    p = argparse.ArgumentParser()
    task.add_prepro_args(p)
    a = p.parse_args(list(argv))
    a.out = out
    return a


def run(task_name, files, out, toker, argv=(), **kw):
    task = get_task(task_name)
    kw.setdefault("progress", False)
    return pp.prepro(task, files, str(out), toker, args=task_args(task, str(out), argv), **kw)


def raw_records(db_dir):
    """key -> msgpack bytes of every record of a text db."""
    import lmdb
    env = lmdb.open(str(db_dir), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): decompress(v) for k, v in txn.cursor()}
    env.close()
    return out


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def make_img_db(path, boxes, conf_th=0.2, num_bb=36):
    """An image db with ``boxes[key]`` boxes per image (random features)."""
    rng = np.random.default_rng(0)
    dumps = {}
    for key, n in boxes.items():
        xy = rng.random((n, 2)) * 0.5
        wh = rng.random((n, 2)) * 0.4 + 0.05
        bb = np.concatenate([xy, xy + wh, wh], 1).astype(np.float32)
        dumps[key] = {"features": rng.standard_normal((n, 8)).astype(np.float32),
                      "norm_bb": bb, "conf": np.full(n, 0.9, np.float32),
                      "soft_labels": np.full((n, 3), 1 / 3, np.float32)}
    if conf_th == -1:
        write_img_db(str(path), dumps, conf_th=-1, num_bb=num_bb)
    else:
        write_img_db(str(path), dumps, conf_th=conf_th, max_bb=100, min_bb=1)
    return str(path)


def good_texts(orig_toker, n, seed):
    """Texts that give tokens (the original would write an empty one; we report it)."""
    return [t for t in AWKWARD + random_texts(n, seed)
            if orig_bert_tokenize(orig_toker, t)]


# ============================================================================ NLVR2

def nlvr2_lines(texts, seed=1):
    rng = random.Random(seed)
    lines = []
    for i, t in enumerate(texts):
        ex = {"validation": {"w1": "True", "w2": 0.5}, "sentence": t,
              "left_url": f"http://x/{i}.png", "writer": "w3",
              "label": rng.choice(["True", "False"]),
              "identifier": f"dev-{i}-{i % 3}-{i % 4}", "n": i, "f": i / 7,
              "synset": ["a", 1, None, True, {"k": []}]}
        if i % 7 == 3:
            del ex["label"]                    # test1: no label
        lines.append(json.dumps(ex, ensure_ascii=i % 2 == 0))
    return lines


def test_nlvr2_db_equals_the_original_byte_for_byte(tmp_path, toker, orig_toker):
    lines = nlvr2_lines(good_texts(orig_toker, 60, 2))
    ann = tmp_path / "dev.json"
    ann.write_text("\n".join(lines) + "\n", encoding="utf-8")
    missing = ["nlvr2_dev-5-2-img1.npz", "nlvr2_dev-9-0-img0.npz"]
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    out = tmp_path / "nlvr2_dev.db"
    s = run("nlvr2", [str(ann)], out, toker, ["--missing_imgs", str(tmp_path / "missing.json")])

    db = OrigDb()
    id2len, txt2img = orig_process_nlvr2(lines, db, lambda t: orig_bert_tokenize(orig_toker, t),
                                         set(missing))
    assert raw_records(out) == dict(db)                       # the same msgpack bytes
    assert read(out / "id2len.json") == json.dumps(id2len)    # the same json files
    assert read(out / "txt2img.json") == json.dumps(txt2img)
    meta = json.loads(read(out / "meta.json"))
    assert {k: meta[k] for k in orig_meta(orig_toker)} == orig_meta(orig_toker)
    assert meta["task"] == "nlvr2" and meta["missing_imgs"].endswith("missing.json")
    assert s.written == len(db) == len(lines) - 2 and s.skipped == {pp.MISSING_IMAGE: 2}
    rep = read(out / pp.REPORT_FILE)
    assert f"{ann}:6: missing image: nlvr2_dev-5-2-img1.npz" in rep
    assert f"{ann}:10: missing image: nlvr2_dev-9-0-img0.npz" in rep

    # read back through the task's dataset, over an image db with every pair
    keys = {f for pair in txt2img.values() for f in pair}
    img = make_img_db(tmp_path / "img", {k: 3 for k in keys})
    txt = TxtTokLmdb(str(out), -1)
    ds = Nlvr2PairedEvalDataset(txt, DetectFeatLmdb(img, 0.2, 100, 1), use_img_type=True)
    for i, id_ in enumerate(ds.ids):
        rec = msgpack.loads(db[id_], raw=False)
        item = ds[i]
        want = [txt.cls_] + rec["input_ids"] + [txt.sep]
        assert item["inputs"][0]["input_ids"].tolist() == want
        assert item["targets"] == rec["target"] and item["qid"] == id_


# ============================================================================ RE

def re_annotations(texts, seed=3):
    rng = random.Random(seed)
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"}]
    images, anns, iid, refs = [], [], {}, []
    texts = iter(texts)
    ref_id = sent_id = 0
    for img_id in range(11, 20):
        images.append({"id": img_id, "file_name": f"COCO_train2014_{img_id:012}.jpg",
                       "height": 480, "width": 640, "license": 3, "coco_url": "u"})
        ids = [img_id * 100 + k for k in range(rng.randint(2, 4))]
        for a in ids:
            anns.append({"id": a, "image_id": img_id, "category_id": rng.choice([1, 18]),
                         "bbox": [rng.uniform(0, 300), rng.uniform(0, 200),
                                  rng.uniform(10, 200), rng.uniform(10, 200)],
                         "area": rng.uniform(100, 4e4), "iscrowd": 0,
                         "segmentation": [[1.0, 2.0, 3.0, 4.0]]})
        rng.shuffle(ids)
        iid[str(img_id)] = ids                     # the gt db's box order
        split = ["train", "val", "testA"][img_id % 3]
        for a in ids[:rng.randint(1, len(ids))]:
            sents = []
            for _ in range(rng.randint(1, 3)):
                t = next(texts)
                sents.append({"tokens": t.split(), "raw": t + " ", "sent_id": sent_id,
                              "sent": t})
                sent_id += 1
            refs.append({"sent_ids": [x["sent_id"] for x in sents], "file_name": "x.jpg",
                         "ann_id": a, "ref_id": ref_id, "image_id": img_id, "split": split,
                         "sentences": sents, "category_id": 1})
            ref_id += 1
    images.append({"id": 99, "file_name": "other.jpg", "height": 1, "width": 1})
    return refs, {"images": images, "annotations": anns, "categories": cats}, iid


def write_re_files(tmp_path, refs, instances, iid):
    files = [tmp_path / "refs(unc).p", tmp_path / "instances.json",
             tmp_path / "iid_to_ann_ids.json"]
    files[0].write_bytes(pickle.dumps(refs, protocol=2))
    files[1].write_text(json.dumps(instances))
    files[2].write_text(json.dumps({"iid_to_ann_ids": iid}))
    return [str(f) for f in files]


def test_re_db_equals_the_original_byte_for_byte(tmp_path, toker, orig_toker):
    refs, instances, iid = re_annotations(good_texts(orig_toker, 80, 4))
    files = write_re_files(tmp_path, refs, instances, iid)
    val_images = {r["image_id"] for r in refs if r["split"] == "val"}
    gt = make_img_db(tmp_path / "re_coco_gt", {f"visual_grounding_coco_gt_{i:012}.npz":
                                               len(iid[str(i)]) for i in val_images},
                     conf_th=-1, num_bb=100)
    out = tmp_path / "refcoco_val.db"             # the split comes from the name
    s = run("re", files, out, toker, img_db=gt)

    db = OrigDb()
    outs = orig_process_referring_expressions(
        pickle.loads(pickle.dumps(refs)), instances, iid, db,
        lambda t: orig_bert_tokenize(orig_toker, t), "val")
    assert raw_records(out) == dict(db) and s.written == len(db) > 5 and not s.skipped
    for obj, name in zip(outs, ["id2len", "images", "annotations", "categories", "refs"]):
        assert read(out / f"{name}.json") == json.dumps(obj), name
    meta = json.loads(read(out / "meta.json"))
    assert {k: meta[k] for k in orig_meta(orig_toker)} == orig_meta(orig_toker)

    # read back: the training target is the referred box among the gt boxes
    txt = ReTxtTokLmdb(str(out), -1)
    img = DetectFeatLmdb(gt, conf_th=-1, num_bb=100)
    ds, ev = ReDataset(txt, img), ReEvalDataset(txt, img, use_gt_feat=True)
    for i, sid in enumerate(ds.ids):
        rec = msgpack.loads(db[sid], raw=False)
        assert int(ds[i]["target"]) == iid[str(rec["image_id"])].index(rec["ann_id"])
        assert ev[i]["tgt_box"].tolist() == rec["bbox"]
    # another split by --split; a box count the ann ids disagree with is reported
    bad = make_img_db(tmp_path / "bad_coco_gt", {f"visual_grounding_coco_gt_{i:012}.npz": 1
                                                 for i in range(11, 20)}, conf_th=-1,
                      num_bb=100)
    n = sum(len(r["sentences"]) for r in refs if r["split"] == "train")
    with pytest.raises(pp.PreproError, match=rf"no record to write \(bad input: bad value {n}\)"):
        run("re", files, tmp_path / "x.db", toker, ["--split", "train"], img_db=bad)
    assert not os.path.exists(tmp_path / "x.db")


# ============================================================================ VQA

NORMALISED = [  # answer -> what the official VQA evaluation compares (worked by hand)
    ("Two", "2"), ("the dog", "dog"), ("An apple.", "apple"), ("dont", "don't"),
    ("It's", "it's"), ("yes!", "yes"), ("1,000", "1000"), ("red, white and blue",
                                                         "red white and blue"),
    ("black/white", "black white"), ("t-shirt", "t shirt"), ("3.5", "3.5"),
    ("mr. smith", "mr smith"), ("none", "0"), ("10:30", "10:30"), ("ten\n", "10"),
    ("hes here", "he's here"), ("its", "its"), ("(left)", "left"),
    ("yes (maybe)", "yes maybe"), ("A  Man", "man"), ("isnt", "isn't"),
    ("couldnt've", "couldn't've"), ("youre", "you're"), ("one of the three", "1 of 3"),
    ("", ""), ("the", ""), ("U.S.A.", "usa"), ("50%", "50%"), ("\tYes\t", "yes"),
]


@pytest.mark.parametrize("answer,want", NORMALISED)
def test_vqa_answer_normaliser(answer, want):
    assert pp.normalize_answer(answer) == want


def test_vqa_soft_score():
    assert [pp.soft_score(n) for n in range(6)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]


VQA_QUESTIONS = [  # (image id, question, the ten annotators' answers)
    (1, "What color is the dog?", ["Red", "red", "red.", "dark red", "red", "Red ", "maroon",
                                   "red", "Red", "RED"]),
    (2, "How many dogs are on the left?", ["two", "2", "2", "three", "2 dogs", "Two", "2",
                                           "2", "3", "2"]),
    (1, "Is the cat red?", ["yes", "Yes", "no", "no", "No", "no.", "no", "no", "nope", "NO"]),
]
# by hand: q0 red x8 -> 1, dark red 1/3, maroon 1/3; q1 "2" x7 -> 1, "3" x2 -> 2/3,
# "2 dogs" 1/3; q2 yes x2 -> 2/3, no x7 -> 1, nope 1/3
GIVEN = {"red": 0, "2": 1, "3": 2, "yes": 3, "no": 4}
WANT_GIVEN = [([0], [1.0]), ([1, 2], [1.0, 2 / 3]), ([3, 4], [2 / 3, 1.0])]


def vqa_files(tmp_path, labelled=True, subtype="val2014"):
    qs = {"data_subtype": subtype, "data_type": "mscoco", "task_type": "Open-Ended",
          "questions": [{"image_id": img, "question": q, "question_id": img * 1000 + i}
                        for i, (img, q, _) in enumerate(VQA_QUESTIONS)]}
    anns = {"data_subtype": subtype, "annotations": [
        {"question_id": img * 1000 + i, "image_id": img, "answer_type": "other",
         "question_type": "what", "multiple_choice_answer": ["red", "2", "no"][i],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(ans)]}
        for i, (img, _, ans) in enumerate(VQA_QUESTIONS)]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    return [str(tmp_path / "a.json"), str(tmp_path / "q.json")][0 if labelled else 1:]


def test_vqa_targets_with_a_given_answer_vocabulary(tmp_path, toker, orig_toker):
    files = vqa_files(tmp_path)
    (tmp_path / "ans2label.json").write_text(json.dumps(GIVEN))
    out = tmp_path / "vqa_val.db"
    keys = {f"COCO_val2014_{i:012}.npz": 4 for i in (1, 2)}
    img = make_img_db(tmp_path / "img", keys)
    s = run("vqa", files, out, toker, ["--ans2label", str(tmp_path / "ans2label.json")],
            img_db=img)
    # answers outside the vocabulary: reported at their annotation, left out of the target
    assert s.written == 3 and s.skipped == {pp.UNKNOWN_ANSWER: 4}
    rep = read(out / pp.REPORT_FILE).splitlines()
    assert rep[0] == (f"{files[1]}: questions[0]: answer outside ans2label: 'dark red' "
                      "(question 1000) (left out of the target)")
    assert json.loads(read(out / "ans2label.json")) == GIVEN
    recs = {k: msgpack.loads(v, raw=False) for k, v in raw_records(out).items()}
    for i, ((img_id, q, _), (labels, scores)) in enumerate(zip(VQA_QUESTIONS, WANT_GIVEN)):
        rec = recs[str(img_id * 1000 + i)]
        assert rec["target"] == {"labels": labels, "scores": scores}
        assert rec["input_ids"] == orig_bert_tokenize(orig_toker, q)
        assert rec["img_fname"] == f"COCO_val2014_{img_id:012}.npz"
        assert rec["question_id"] == img_id * 1000 + i and rec["answer_type"] == "other"
    # read back through the task's dataset: the soft scores on the answer ids
    ds = VqaEvalDataset(len(GIVEN), TxtTokLmdb(str(out), -1), DetectFeatLmdb(img, 0.2, 100, 1))
    for i, qid in enumerate(ds.ids):
        t = recs[qid]["target"]
        want = np.zeros(len(GIVEN), np.float32)
        want[t["labels"]] = t["scores"]
        assert np.allclose(ds[i]["targets"].numpy(), want) and ds[i]["qid"] == qid
    assert json.loads(read(out / "txt2img.json")) == {k: r["img_fname"] for k, r in recs.items()}


def test_vqa_built_vocabulary_unlabelled_split_and_jsonl(tmp_path, toker):
    files = vqa_files(tmp_path)
    s = run("vqa", files, tmp_path / "built.db", toker, ["--min_answer_count", "1"])
    # the most common answer of each question, in order: red, 2, no
    assert json.loads(read(tmp_path / "built.db" / "ans2label.json")) == \
        {"red": 0, "2": 1, "no": 2}
    recs = {k: msgpack.loads(v, raw=False) for k, v in raw_records(tmp_path / "built.db").items()}
    assert recs["1002"]["target"] == {"labels": [2], "scores": [1.0]} and not s.skipped
    with pytest.raises(pp.PreproError, match="min_answer_count"):
        run("vqa", files, tmp_path / "none.db", toker, ["--min_answer_count", "2"])
    # questions only: an unlabelled split (no target), the shipped vocabulary
    s = run("vqa", vqa_files(tmp_path, labelled=False, subtype="test2015"),
            tmp_path / "test.db", toker, ["--ans2label", os.path.join(
                ROOT, "uniter_fast", "data", "ans2label.json")], img_prefix="coco_")
    recs = [msgpack.loads(v, raw=False) for v in raw_records(tmp_path / "test.db").values()]
    assert s.written == 3 and all("target" not in r for r in recs)
    assert {r["img_fname"] for r in recs} == {f"coco_COCO_test2015_{i:012}.npz" for i in (1, 2)}
    # JSON lines: the same targets
    lines = [json.dumps({"image": f"imgs/COCO_val2014_{img:012}.jpg", "question": q,
                         "answers": ans, "question_id": img * 1000 + i})
             for i, (img, q, ans) in enumerate(VQA_QUESTIONS)]
    (tmp_path / "v.jsonl").write_text("\n".join(lines + ['{"image": "x.jpg", "question": '
                                                         '"Unlabelled?"}']))
    (tmp_path / "ans2label.json").write_text(json.dumps(GIVEN))
    s = run("vqa", [str(tmp_path / "v.jsonl")], tmp_path / "jl.db", toker,
            ["--ans2label", str(tmp_path / "ans2label.json")])
    recs = {k: msgpack.loads(v, raw=False) for k, v in raw_records(tmp_path / "jl.db").items()}
    for i, ((img, _, _), (labels, scores)) in enumerate(zip(VQA_QUESTIONS, WANT_GIVEN)):
        assert recs[str(img * 1000 + i)]["target"] == {"labels": labels, "scores": scores}
        assert recs[str(img * 1000 + i)]["img_fname"] == f"COCO_val2014_{img:012}.npz"
    assert "target" not in recs["3"] and recs["3"]["img_fname"] == "x.npz"   # its line number


# ============================================================================ VE, ITM

def test_ve_records(tmp_path, toker, orig_toker):
    rows = [("entailment", "A dog is on the left."), ("neutral", "Two dogs play."),
            ("contradiction", "There is a cat."), (None, "The man is red.")]
    lines = []
    for i, (label, text) in enumerate(rows):
        ex = {"Flikr30kID": f"{1000 + i}.jpg", "sentence1": "premise", "sentence2": text,
              "pairID": f"{1000 + i}.jpg#0r1{i}", "captionID": f"{1000 + i}.jpg#0",
              "sentence1_parse": "(ROOT (S ...))", "gold_label": label}
        if label is None:
            del ex["gold_label"]
        lines.append(json.dumps(ex))
    lines.append(json.dumps({"Flikr30kID": "5.jpg", "sentence2": "x", "pairID": "p5",
                             "gold_label": "-"}))                # SNLI's no-consensus label
    (tmp_path / "ve.jsonl").write_text("\n".join(lines))
    img = make_img_db(tmp_path / "img", {f"flickr_{1000 + i}.npz": 2 for i in range(4)})
    s = run("ve", [str(tmp_path / "ve.jsonl")], tmp_path / "ve.db", toker, img_db=img,
            img_prefix="flickr_")
    assert s.written == 4 and s.skipped == {pp.BAD_VALUE: 1}
    recs = {k: msgpack.loads(v, raw=False) for k, v in raw_records(tmp_path / "ve.db").items()}
    for i, (label, text) in enumerate(rows):
        rec = recs[f"{1000 + i}.jpg#0r1{i}"]
        assert rec["input_ids"] == orig_bert_tokenize(orig_toker, text)
        assert rec["img_fname"] == f"flickr_{1000 + i}.npz" and "sentence1_parse" not in rec
        if label is None:
            assert "target" not in rec
        else:
            assert rec["target"] == {"labels": [VE_ENT2IDX[label]], "scores": [1.0]}
    ds = VeEvalDataset(TxtTokLmdb(str(tmp_path / "ve.db"), -1), DetectFeatLmdb(img, 0.2, 100, 1))
    got = {ds.ids[i]: ds[i]["targets"] for i in range(len(ds))}
    assert got["1002.jpg#0r12"].tolist() == [1.0, 0.0, 0.0] and got["1003.jpg#0r13"] is None


def test_itm_coco_captions_and_jsonl(tmp_path, toker, orig_toker):
    coco = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
                       {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"}],
            "annotations": [{"image_id": 1, "id": 10, "caption": "A dog on the left."},
                            {"image_id": 1, "id": 11, "caption": "Two dogs."},
                            {"image_id": 2, "id": 12, "caption": "a cat"},
                            {"image_id": 3, "id": 13, "caption": "no such image"},
                            {"image_id": 2, "id": 14}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco, indent=1))
    s = run("itm", [str(tmp_path / "captions.json")], tmp_path / "itm.db", toker,
            img_prefix="coco_")
    assert s.written == 3 and s.skipped == {pp.UNKNOWN_REFERENCE: 1, pp.MISSING_FIELD: 1}
    rep = read(tmp_path / "itm.db" / pp.REPORT_FILE)
    assert f"{tmp_path / 'captions.json'}: annotations[3]: unknown reference" in rep
    assert f"{tmp_path / 'captions.json'}: annotations[4]: missing field: no 'caption'" in rep
    txt = TxtTokLmdb(str(tmp_path / "itm.db"), -1)
    k1, k2 = "coco_COCO_train2014_000000000001.npz", "coco_COCO_train2014_000000000002.npz"
    assert txt.txt2img == {"10": k1, "11": k1, "12": k2}
    assert txt.img2txts == {k1: ["10", "11"], k2: ["12"]}
    assert txt["11"]["input_ids"] == orig_bert_tokenize(orig_toker, "Two dogs.")
    assert txt["11"]["image_id"] == 1 and txt["11"]["caption"] == "Two dogs."
    # JSON lines (with a byte-order mark), ids by number; itm-hn reads the same
    (tmp_path / "c.jsonl").write_text("\ufeff" + "\n".join(json.dumps(x) for x in [
        {"image": "a/x.jpg", "caption": "a dog"}, {"image": "b/y.png", "caption": "a cat"},
        {"image": "a/x.jpg", "caption": "two cats", "id": "mine"}]))
    run("itm-hn", [str(tmp_path / "c.jsonl")], tmp_path / "hn.db", toker)
    txt = TxtTokLmdb(str(tmp_path / "hn.db"), -1)
    assert txt.txt2img == {"0": "x.npz", "1": "y.npz", "mine": "x.npz"}


# ============================================================================ bad input

def test_every_bad_input_is_reported_with_its_place_and_counted(tmp_path, toker, capsys):
    lines = nlvr2_lines(["A dog.", "Two dogs.", "A cat.", "The man.", "The woman."])
    bad = [
        lines[0],
        '{"identifier": "dev-9-0-0", "sentence": "x" ',              # 2: malformed line
        json.dumps({"identifier": "dev-8-0-0"}),                     # 3: missing field
        json.dumps({"identifier": "dev-7-0-0", "sentence": " \x00 ", "label": "True"}),  # 4
        json.dumps({"identifier": "dev-6-0-0", "sentence": "A dog.", "label": "True"}),  # 5
        lines[0],                                                    # 6: duplicate id
        "[1, 2]",                                                    # 7: not an object
        json.dumps({"identifier": "dev-5-0-0", "sentence": "A dog.", "label": "yes"}),   # 8
        "",
        lines[1],                                                    # 10
    ]
    ann = tmp_path / "dev.json"
    ann.write_text("\n".join(bad) + "\n")
    keys = {f"nlvr2_dev-{i}-{i % 3}-img{k}.npz": 2 for i in range(2) for k in (0, 1)}
    for i in (5, 7):
        keys[f"nlvr2_dev-{i}-0-img0.npz"] = keys[f"nlvr2_dev-{i}-0-img1.npz"] = 2
    img = make_img_db(tmp_path / "img", keys)           # dev-6's images are not in it
    s = run("nlvr2", [str(ann)], tmp_path / "out.db", toker, img_db=img)
    assert s.written == 2
    assert s.skipped == {pp.MALFORMED: 2, pp.MISSING_FIELD: 1, pp.EMPTY_TEXT: 1,
                         pp.MISSING_IMAGE: 1, pp.DUPLICATE_ID: 1, pp.BAD_VALUE: 1}
    rep = read(tmp_path / "out.db" / pp.REPORT_FILE)
    for line, reason in [(2, pp.MALFORMED), (3, pp.MISSING_FIELD), (4, pp.EMPTY_TEXT),
                         (5, pp.MISSING_IMAGE), (6, pp.DUPLICATE_ID), (7, pp.MALFORMED),
                         (8, pp.BAD_VALUE)]:
        assert f"{ann}:{line}: {reason}" in rep
    err = capsys.readouterr().err
    assert f"{ann}:5: missing image: nlvr2_dev-6-0-img0.npz is not in the image db" in err
    meta = json.loads(read(tmp_path / "out.db" / "meta.json"))
    assert meta["bad_input"] == s.skipped and meta["records"] == 2
    assert "bad input: bad value 1, duplicate id 1, empty text 1" in s.describe()
    # --strict: the first bad input is an error, nothing is written
    with pytest.raises(pp.PreproError, match=rf"{ann}:2: malformed JSON line.*--strict"):
        run("nlvr2", [str(ann)], tmp_path / "strict.db", toker, strict=True)
    assert not os.path.exists(tmp_path / "strict.db")
    # an existing --out is never replaced without overwrite
    with pytest.raises(pp.PreproError, match="exists; give --overwrite"):
        run("nlvr2", [str(ann)], tmp_path / "out.db", toker)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old").write_text("x")
    with pytest.raises(pp.PreproError, match="not a text db .* not replaced"):
        run("nlvr2", [str(ann)], tmp_path / "keep", toker, overwrite=True)
    (tmp_path / "keep" / "meta.json").write_text("{}")       # an old text db: replaced
    s = run("nlvr2", [str(ann)], tmp_path / "keep", toker, overwrite=True)
    assert not os.path.exists(tmp_path / "keep" / "old") and s.written == 3
    s = run("nlvr2", [str(ann)], tmp_path / "out.db", toker, overwrite=True)
    assert s.written == 3
    assert [p for p in os.listdir(tmp_path) if "partial" in p or ".old" in p] == []


def test_vqa_and_re_bad_input(tmp_path, toker, orig_toker):
    files = vqa_files(tmp_path)
    qs = json.loads(read(files[1]))
    qs["questions"].append({"image_id": 7, "question": "Orphan?", "question_id": 7000})
    qs["questions"].append({"image_id": 1, "question_id": 1001})
    qs["questions"][2]["image_id"] = "1"                 # its annotation is not reported again
    (tmp_path / "q.json").write_text(json.dumps(qs))
    s = run("vqa", files, tmp_path / "v.db", toker, ["--min_answer_count", "1"])
    assert s.skipped == {pp.MISSING_FIELD: 2, pp.BAD_VALUE: 1} and s.written == 2
    rep = read(tmp_path / "v.db" / pp.REPORT_FILE)
    assert f"{files[1]}: questions[3]: missing field: question 7000 has no annotation" in rep
    assert f"{files[1]}: questions[4]: missing field: no 'question'" in rep
    assert f"{files[1]}: questions[2]: bad value: 'image_id' is '1', not int" in rep
    # RE: a ref whose annotation is not in instances.json, an empty sentence, a bad ref
    refs, instances, iid = re_annotations(good_texts(orig_toker, 80, 4))
    val = [r for r in refs if r["split"] == "val"]
    val[0]["ann_id"] = 424242
    val[1]["sentences"][0]["sent"] = "\u200b"
    refs.append({"ref_id": 1})
    files = write_re_files(tmp_path, refs, instances, iid)
    s = run("re", files, tmp_path / "refcoco_val.db", toker)
    assert s.skipped == {pp.UNKNOWN_REFERENCE: len(val[0]["sentences"]), pp.EMPTY_TEXT: 1,
                         pp.MISSING_FIELD: 1}
    rep = read(tmp_path / "refcoco_val.db" / pp.REPORT_FILE)
    i = refs.index(val[0])
    assert f"{files[0]}: [{i}].sentences[0]: unknown reference: ann_id 424242" in rep
    assert f"{files[0]}: [{len(refs) - 1}]: missing field: no 'ann_id'" in rep


# ============================================================================ pickles

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_refuses_code_and_reads_plain_data(tmp_path, protocol):
    marker = str(tmp_path / "ran")
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _Payload(marker)], protocol=protocol))
    with pytest.raises(pp.PreproError, match="refused: the pickle names the global "
                                             r"(__builtin__|builtins)\.exec"):
        pp.load_pickle(str(path))
    assert not os.path.exists(marker)
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=protocol))
    with pytest.raises(pp.PreproError, match="refused"):
        pp.load_pickle(str(path))
    plain = {"a": [1, 2.5, "x", ("t", None), True, {"n": -3}, "é中"], 3: 1e300, "l": 2 ** 70}
    if protocol >= 3:
        plain["b"] = b"bytes"             # below protocol 3 bytes come through _codecs.encode
    if protocol >= 4:
        plain["s"] = {1, frozenset({2})}  # below protocol 4 sets come through builtins.set
    path.write_bytes(pickle.dumps(plain, protocol=protocol))
    assert pp.load_pickle(str(path)) == plain
    if protocol < 4:                      # no global is admitted, not even those
        path.write_bytes(pickle.dumps({1, 2}, protocol=protocol))
        with pytest.raises(pp.PreproError, match="refused: .* global (__builtin__|builtins).set"):
            pp.load_pickle(str(path))


def test_restricted_unpickler_python2_pickles_and_junk(tmp_path):
    path = tmp_path / "py2.p"
    # Python 2's cPickle, protocol 2: {'sent': 'a dog', u'raw': u'\xe9'} (str and unicode)
    path.write_bytes(b"\x80\x02}q\x00(U\x04sentq\x01U\x05a dogq\x02X\x03\x00\x00\x00rawq\x03"
                     b"X\x02\x00\x00\x00\xc3\xa9q\x04u.")
    assert pp.load_pickle(str(path)) == {"sent": "a dog", "raw": "\xe9"}
    path.write_bytes(b"not a pickle")
    with pytest.raises(pp.PreproError, match="not a readable pickle"):
        pp.load_pickle(str(path))
    with pytest.raises(pp.PreproError, match="no such file"):
        pp.load_pickle(str(tmp_path / "absent.p"))


# ============================================================================ interface, CLI

def test_every_task_says_whether_it_preprocesses(tmp_path, toker):
    for name in TASKS:
        task = get_task(name)
        if task.prepro_formats:
            assert type(task).prepro is not pp_base.FinetuneTask.prepro
        else:
            with pytest.raises(ValueError, match="no annotation preprocessing"):
                task.prepro([], None, None, None)
            with pytest.raises(pp.PreproError, match="no annotation preprocessing"):
                pp.prepro(task, [], str(tmp_path / "x"), toker)


def _cli(*argv, check=None):
    p = subprocess.run([sys.executable, "-m", "uniter_fast.prepro", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    if check is not None:
        assert p.returncode == check, p.stdout + p.stderr
    return p


def test_command_line_end_to_end(tmp_path, vocab_file):
    ann = tmp_path / "c.jsonl"
    ann.write_text("\n".join([json.dumps({"image": "x.jpg", "caption": "A dog."}),
                              "{oops", json.dumps({"image": "y.jpg", "caption": "Two cats"})]))
    out = tmp_path / "itm_x.db"
    args = ["--task", "itm", "--annotations", str(ann), "--out", str(out), "--vocab",
            vocab_file, "--no_progress"]
    p = _cli(*args, check=0)
    assert "2 itm records written" in p.stdout and "malformed JSON line 1" in p.stdout
    assert f"{ann}:2: malformed JSON line" in p.stderr
    assert TxtTokLmdb(str(out), -1).txt2img == {"0": "x.npz", "1": "y.npz"}
    p = _cli(*args, check=2)
    assert "exists; give --overwrite" in p.stderr
    _cli(*args, "--overwrite", "--img_prefix", "p_", check=0)
    assert TxtTokLmdb(str(out), -1).txt2img == {"0": "p_x.npz", "1": "p_y.npz"}
    p = _cli(*args[:5], str(tmp_path / "s.db"), *args[6:], "--strict", check=2)
    assert f"{ann}:2: malformed JSON line" in p.stderr and not os.path.exists(tmp_path / "s.db")
    d = tmp_path / "tokdir"
    d.mkdir()
    (d / "vocab.txt").write_text(read(vocab_file))
    _cli("--task", "itm", "--annotations", str(ann), "--out", str(tmp_path / "t.db"),
         "--tokenizer", str(d), "--format", "jsonl", "--no_progress", check=0)
    meta = json.loads(read(tmp_path / "t.db" / "meta.json"))
    assert meta["tokenizer"] == meta["bert"] == "bert-base-cased" and meta["format"] == "jsonl"
    p = _cli("--task", "vcr", "--annotations", str(ann), "--out", str(tmp_path / "v.db"),
             "--vocab", vocab_file, check=2)
    assert "task vcr has no annotation preprocessing" in p.stderr
    p = _cli("--task", "vqa", "--help", check=0)
    assert "--ans2label" in p.stdout and "--min_answer_count" in p.stdout
