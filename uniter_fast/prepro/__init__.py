"""Annotation files to UNITER's text db: the pieces every task's preprocessing shares.

``python -m uniter_fast.prepro --task TASK --annotations FILE ... --out TXT_DB --vocab
vocab.txt`` (:mod:`uniter_fast.prepro.__main__`) looks the task up in the registry and calls
its :meth:`~uniter_fast.tasks.base.FinetuneTask.prepro`, which reads the task's own
annotation formats with the helpers here and yields text-db examples; :func:`prepro` writes
them (:func:`uniter_fast.data.db.write_txt_db`).  Shared here:

* :class:`BertTokenizer`: BERT base *cased* WordPiece from a user's ``vocab.txt`` (or a
  tokenizer directory), applied as UNITER's ``prepro.py`` does (``bert_tokenize``: the
  text split on whitespace, each word tokenized, words that give no token skipped, the ids
  concatenated).  Nothing is downloaded.
* readers: :func:`load_json`, :func:`read_jsonl`, :func:`read_annotation` (a JSON
  document or JSON lines), :func:`load_pickle` (a restricted unpickler: plain
  containers, strings and numbers only; a pickle that names any global is refused
  before anything of it runs);
* the VQA answer normaliser of the official VQA evaluation (:func:`normalize_answer`) and
  the soft score (:func:`soft_score`);
* bad input (:class:`Reporter`): every record that cannot be written is reported with its
  file and line (or its index in a JSON array), counted by reason, and skipped; with
  ``strict`` the first one is an error;
* :class:`ImageDb`: the keys of an image db (``--img_db``), to refuse texts whose image
  is not in it;
* the writer: never over an existing db without ``overwrite``; the db is built beside the
  output and moved into place when complete.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from tqdm import tqdm

from ..data.db import DbError, DetectFeatLmdb, _atomic_json, write_txt_db

__all__ = ["PreproError", "BertTokenizer", "NEVER_SPLIT", "load_vocab", "Reporter",
           "ImageDb", "PreproContext", "Prepared", "Summary", "load_json", "read_jsonl",
           "read_annotation", "records", "require", "at_line", "at_index", "load_pickle",
           "RestrictedUnpickler", "normalize_answer", "soft_score", "prepro", "check_out",
           "MALFORMED", "MISSING_FIELD", "EMPTY_TEXT", "MISSING_IMAGE", "UNKNOWN_ANSWER",
           "DUPLICATE_ID", "BAD_VALUE", "UNKNOWN_REFERENCE"]


class PreproError(ValueError):
    """Input that stops the whole preprocessing (a file that cannot be read, a vocabulary
    without BERT's special tokens, an existing output, bad input under ``strict``)."""


# ----------------------------------------------------------------------------- bad input

#: the reasons a record is skipped (the summary counts each)
MALFORMED = "malformed JSON line"
MISSING_FIELD = "missing field"
EMPTY_TEXT = "empty text"
MISSING_IMAGE = "missing image"
UNKNOWN_ANSWER = "answer outside ans2label"
DUPLICATE_ID = "duplicate id"
BAD_VALUE = "bad value"
UNKNOWN_REFERENCE = "unknown reference"


def at_line(path: str, line: int) -> str:
    """Where a JSON line is: ``FILE:LINE`` (1-based)."""
    return f"{path}:{line}"


def at_index(path: str, array: Optional[str], index: int) -> str:
    """Where a record of a JSON array is: ``FILE: ARRAY[INDEX]`` (0-based; ``FILE: [INDEX]``
    for a top-level array)."""
    return f"{path}: {array or ''}[{index}]"


class Reporter:
    """Counts and reports bad input.  :meth:`bad` reports one (``where``: file and line or
    record index, ``reason``: one of the module's reason constants, ``detail``); the first
    ``max_shown`` of each reason are printed (to stderr, above a progress bar), every one
    is kept in :attr:`lines`.  With ``strict`` the first raises :class:`PreproError`."""

    def __init__(self, strict: bool = False, max_shown: int = 20,
                 stream: Any = None):
        self.strict = bool(strict)
        self.max_shown = int(max_shown)
        self.stream = stream
        self.counts: Dict[str, int] = {}
        self.lines: List[str] = []

    def bad(self, where: str, reason: str, detail: str = "", action: str = "skipped") -> None:
        msg = f"{where}: {reason}" + (f": {detail}" if detail else "")
        if self.strict:
            raise PreproError(f"{msg} (--strict: bad input is an error)")
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        self.lines.append(f"{msg} ({action})")
        if n <= self.max_shown:
            tqdm.write(f"{msg} ({action})", file=self.stream or sys.stderr)
            if n == self.max_shown:
                tqdm.write(f"(further '{reason}' reports are counted, not printed)",
                           file=self.stream or sys.stderr)


# ----------------------------------------------------------------------------- readers

def _open_text(path: str, what: str, encoding: str = "utf-8-sig"):
    """A text file (UTF-8; a leading byte-order mark is skipped)."""
    try:
        return open(path, "r", encoding=encoding)
    except FileNotFoundError:
        raise PreproError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise PreproError(f"{what} {path}: is a directory, not a file") from None
    except OSError as e:
        raise PreproError(f"{what} {path}: cannot be read ({e.strerror or e})") from None


def _read_text(path: str, what: str) -> str:
    with _open_text(path, what) as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            raise PreproError(f"{what} {path}: not UTF-8 text ({e})") from None


def load_json(path: str, what: str = "annotation file") -> Any:
    """A whole JSON document; a malformed one raises :class:`PreproError` with its line and
    column."""
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PreproError(f"{what} {path}:{e.lineno}: not valid JSON (column {e.colno}: "
                          f"{e.msg})") from None


def read_jsonl(path: str, report: Reporter, what: str = "annotation file"
               ) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(where, object)`` of each non-blank line of a JSON-lines file; a line that is not
    a JSON object (malformed, not UTF-8, or another JSON value) is reported and skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PreproError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise PreproError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = at_line(path, n)
            try:
                obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                report.bad(where, MALFORMED, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                report.bad(where, MALFORMED, f"column {e.colno}: {e.msg}")
                continue
            if not isinstance(obj, dict):
                report.bad(where, MALFORMED, f"a JSON {type(obj).__name__}, not an object")
                continue
            yield where, obj


def read_annotation(path: str, what: str = "annotation file") -> Tuple[str, Any]:
    """Which of the two layouts a file has: ``("json", document)`` when the whole file is
    one JSON value, ``("jsonl", None)`` when it is JSON lines (read it with
    :func:`read_jsonl`).  A file with one line that is an object is a JSON document here:
    the task decides whether that object is a container or one record.  A file that is
    neither (no line of it parses alone either) raises with the JSON error."""
    text = _read_text(path, what)
    try:
        return "json", json.loads(text)
    except json.JSONDecodeError as e:
        first = e
    for line in text.splitlines()[:20]:
        try:
            if isinstance(json.loads(line), dict):
                return "jsonl", None
        except json.JSONDecodeError:
            continue
    raise PreproError(f"{what} {path}:{first.lineno}: neither a JSON document nor JSON lines "
                      f"(column {first.colno}: {first.msg})")


def records(path: str, report: Reporter, kind: str = "jsonl", doc: Any = None
            ) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(where, object)`` of the records of an annotation file: its lines (``kind``
    ``"jsonl"``), or, for a JSON document ``doc`` (``kind`` ``"json"``, from
    :func:`read_annotation`), its items when it is a list (an item that is not an object is
    reported) or itself when it is one object (a one-line JSON-lines file)."""
    if kind == "jsonl":
        yield from read_jsonl(path, report)
    elif isinstance(doc, dict):
        yield at_line(path, 1), doc
    elif isinstance(doc, list):
        for i, obj in enumerate(doc):
            if isinstance(obj, dict):
                yield at_index(path, None, i), obj
            else:
                report.bad(at_index(path, None, i), MALFORMED,
                           f"a JSON {type(obj).__name__}, not an object")
    else:
        raise PreproError(f"annotation file {path}: a JSON {type(doc).__name__}; expected "
                          "JSON lines, a list of objects or the task's JSON layout")


def require(obj: Dict[str, Any], fields: Sequence[str], where: str, report: Reporter,
            types: Optional[Dict[str, Any]] = None) -> bool:
    """Whether ``obj`` has every field in ``fields`` (each of ``types[name]``'s type when
    given); the first one missing or of the wrong type is reported."""
    for name in fields:
        if name not in obj or obj[name] is None:
            report.bad(where, MISSING_FIELD, f"no {name!r}")
            return False
        want = (types or {}).get(name)
        v = obj[name]
        if want is not None and (not isinstance(v, want) or isinstance(v, bool)):
            report.bad(where, BAD_VALUE, f"{name!r} is {v!r:.60}, not "
                       f"{' or '.join(t.__name__ for t in _as_tuple(want))}")
            return False
    return True


def _as_tuple(t: Any) -> Tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


# ----------------------------------------------------------------------------- pickles

#: the types a restricted pickle may hold
_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, bool,
          type(None))


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers, strings and numbers only: every global
    (class, function) a pickle names is refused in :meth:`find_class`, so no ``__reduce__``
    payload, no object construction and no persistent id runs; :func:`load_pickle` then
    checks the value holds nothing else."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused: the pickle names the global {module}.{name} "
                                     "(only plain containers, strings and numbers are read)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: the pickle holds a persistent id")


def _check_plain(obj: Any, path: str) -> None:
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if type(x) not in _PLAIN:
            raise PreproError(f"pickle {path}: holds a {type(x).__name__}; only plain "
                              "containers, strings and numbers are read")
        if isinstance(x, (dict, list, tuple, set, frozenset)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            stack.extend(x.keys() if isinstance(x, dict) else x)
            if isinstance(x, dict):
                stack.extend(x.values())


def load_pickle(path: str, what: str = "pickle") -> Any:
    """A pickle of plain data (refer's ``refs(unc).p``: Python 2 or 3, any protocol) read
    with :class:`RestrictedUnpickler`, never ``pickle.load``: a pickle that names a global
    raises :class:`PreproError` before anything of it runs.  Python 2 byte strings are
    decoded as UTF-8.  (Python 3 writes ``bytes`` below protocol 3 and sets below protocol
    4 through globals: such pickles are refused too.)"""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PreproError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise PreproError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    with f:
        try:
            obj = RestrictedUnpickler(f, encoding="utf-8").load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refused"):
                raise PreproError(f"{what} {path}: {e}") from None
            raise PreproError(f"{what} {path}: not a readable pickle ({e})") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                UnicodeDecodeError, MemoryError) as e:
            raise PreproError(f"{what} {path}: not a readable pickle ({type(e).__name__}: "
                              f"{e})") from None
    _check_plain(obj, path)
    return obj


# ----------------------------------------------------------------------------- VQA answers

# The official VQA evaluation's answer processing, from its documented rules: newlines and
# tabs become spaces; punctuation (these characters) is removed where a space is beside it
# or the answer has a comma between digits, else replaced by a space; a period is removed
# unless a digit follows it (a decimal point); then, lower-cased word by word: number words
# become digits, the articles a/an/the are dropped, and a contraction written without its
# apostrophe gets it back.
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                 "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
#: contractions as they are written; each spelling with some or all of its apostrophes left
#: out maps to it, except spellings that are words of their own (its, ill, well, were, ...)
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's",
    "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
    "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all",
    "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've")
#: spellings without apostrophes that are words themselves: left as they are
_WORDS = frozenset({"its", "ill", "id", "well", "were", "wed", "hell", "shell", "shed", "lets",
                    "whore"})


def _apostrophe_variants(word: str) -> Iterator[str]:
    """``word`` with each non-empty subset of its apostrophes left out."""
    pos = [i for i, c in enumerate(word) if c == "'"]
    for mask in range(1, 1 << len(pos)):
        drop = {p for k, p in enumerate(pos) if mask >> k & 1}
        yield "".join(c for i, c in enumerate(word) if i not in drop)


_CONTRACTION_OF = {v: w for w in _CONTRACTIONS for v in _apostrophe_variants(w)
                   if v not in _WORDS}


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares answers (see the rules above):
    ``"Two dogs."`` -> ``"2 dogs"``, ``"dont know"`` -> ``"don't know"``,
    ``"1,000"`` -> ``"1000"``, ``"black/white"`` -> ``"black white"``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    remove_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        if remove_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTION_OF.get(w, w))
    return " ".join(words)


def soft_score(count: int) -> float:
    """VQA's soft score of an answer ``count`` annotators gave: min(count / 3, 1)."""
    return min(count / 3.0, 1.0)


# ----------------------------------------------------------------------------- tokenizer

#: the tokens BERT's basic tokenizer never splits (pytorch_pretrained_bert's ``never_split``)
NEVER_SPLIT = frozenset({"[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"})
#: words longer than this many characters become [UNK] (BERT's ``max_input_chars_per_word``)
MAX_WORD_CHARS = 100
#: words whose ids a tokenizer keeps (the cache starts over when full)
WORD_CACHE = 300_000


def load_vocab(path: str) -> Dict[str, int]:
    """token -> id of a BERT ``vocab.txt`` (one token per line, id = line number, each line
    stripped of surrounding whitespace, as BERT's ``load_vocab``); a token on two lines is
    refused (BERT would silently keep the later id)."""
    vocab: Dict[str, int] = {}
    with _open_text(path, "vocabulary", "utf-8") as f:
        try:
            for i, line in enumerate(f):
                tok = line.strip()
                if tok in vocab:
                    raise PreproError(f"vocabulary {path}: token {tok!r} is on lines "
                                      f"{vocab[tok] + 1} and {i + 1}")
                vocab[tok] = i
        except UnicodeDecodeError as e:
            raise PreproError(f"vocabulary {path}: not UTF-8 text ({e})") from None
    if not vocab:
        raise PreproError(f"vocabulary {path}: empty")
    return vocab


def _tokenizer_json_vocab(path: str) -> Dict[str, int]:
    """The WordPiece vocabulary of a ``tokenizer.json`` (a cased BERT one)."""
    data = load_json(path, "tokenizer")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece" \
            or not isinstance(model.get("vocab"), dict):
        raise PreproError(f"tokenizer {path}: not a WordPiece (BERT) tokenizer")
    norm = data.get("normalizer") or {}
    if norm.get("lowercase") or norm.get("strip_accents"):
        raise PreproError(f"tokenizer {path}: lower-cases or strips accents (an uncased "
                          "BERT); UNITER's text dbs use BERT base cased")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise PreproError(f"tokenizer {path}: subword prefix "
                          f"{model['continuing_subword_prefix']!r}, BERT's is '##'")
    vocab = model["vocab"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()) \
            or len(set(vocab.values())) != len(vocab):
        raise PreproError(f"tokenizer {path}: the vocabulary's ids are not distinct ints")
    return dict(vocab)


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _basic_pieces(word: str) -> List[str]:
    """BERT's basic tokenizer (cased) on one word, with Python's ``unicodedata``: control
    characters dropped, whitespace to spaces, CJK characters apart, then every token that
    is not one of :data:`NEVER_SPLIT` split at punctuation."""
    chars = []
    for c in word:
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or _is_control(c):
            continue
        if _is_whitespace(c):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.extend((" ", c, " "))
        else:
            chars.append(c)
    pieces: List[str] = []
    for tok in "".join(chars).split():
        if tok in NEVER_SPLIT:
            pieces.append(tok)
            continue
        cur: List[str] = []
        for c in tok:
            if _is_punctuation(c):
                if cur:
                    pieces.append("".join(cur))
                    cur = []
                pieces.append(c)
            else:
                cur.append(c)
        if cur:
            pieces.append("".join(cur))
    return pieces


class BertTokenizer:
    """BERT base cased WordPiece as UNITER's ``prepro.py`` applies it
    (``pytorch_pretrained_bert.BertTokenizer(do_lower_case=False)`` word by word), on the
    ``tokenizers`` package: BERT's normaliser (clean text, CJK characters apart, no
    lower-casing, no accent stripping), its pre-tokenizer (whitespace, punctuation) and
    WordPiece (``##`` continuations, ``[UNK]`` for a word it cannot cover or one longer
    than 100 characters).

    A word in ASCII takes that pipeline whole.  A word with other characters, or with a
    ``[`` (BERT never splits ``[CLS]``, ``[MASK]``, ... written as a word), is pre-tokenized
    in Python with ``unicodedata``, as BERT's own basic tokenizer, and only the WordPiece
    step runs in ``tokenizers``: its Unicode tables are not Python's (it keeps unassigned
    code points BERT drops, and misses punctuation of recent Unicode versions).
    """

    def __init__(self, vocab: Dict[str, int], name: str = "bert-base-cased"):
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece
        missing = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]", "!") if t not in vocab]
        if missing:
            raise PreproError(f"vocabulary ({name}) lacks {missing}: not a BERT vocabulary")
        self.vocab = dict(vocab)
        self.name = name

        def wordpiece():
            return WordPiece(self.vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                             max_input_chars_per_word=MAX_WORD_CHARS)
        self._full = Tokenizer(wordpiece())
        self._full.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
        self._full.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._pieces = Tokenizer(wordpiece())          # WordPiece alone, on Python's pieces
        self._cache: Dict[str, List[int]] = {}

    @classmethod
    def from_vocab(cls, path: str, name: str = "bert-base-cased") -> "BertTokenizer":
        """From a ``vocab.txt``."""
        return cls(load_vocab(path), name)

    @classmethod
    def from_dir(cls, path: str, name: str = "bert-base-cased") -> "BertTokenizer":
        """From a tokenizer directory holding ``vocab.txt`` or ``tokenizer.json``."""
        if not os.path.isdir(path):
            raise PreproError(f"tokenizer {path}: not a directory (give --vocab for a "
                              "vocab.txt file)")
        txt, js = os.path.join(path, "vocab.txt"), os.path.join(path, "tokenizer.json")
        if os.path.exists(txt):
            return cls.from_vocab(txt, name)
        if os.path.exists(js):
            return cls(_tokenizer_json_vocab(js), name)
        raise PreproError(f"tokenizer {path}: holds neither vocab.txt nor tokenizer.json")

    def tokenize(self, text: str) -> List[int]:
        """The ids of ``text`` as UNITER's ``bert_tokenize``: the concatenated ids of its
        whitespace-separated words (each word's ids are cached: texts repeat words)."""
        ids: List[int] = []
        cache = self._cache
        for word in text.split():
            got = cache.get(word)
            if got is None:
                if len(cache) >= WORD_CACHE:
                    cache.clear()
                got = cache[word] = self._word(word)
            ids.extend(got)
        return ids

    def _word(self, word: str) -> List[int]:
        if word.isascii() and "[" not in word:
            return self._full.encode(word, add_special_tokens=False).ids
        pieces = _basic_pieces(word)
        if not pieces:
            return []
        return self._pieces.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids

    def meta(self) -> Dict[str, Any]:
        """UNITER's ``meta.json`` token fields: ``UNK``, ``CLS``, ``SEP``, ``MASK`` and
        ``v_range`` = [id of ``!``, vocabulary size] (the ids a masked token is drawn
        from)."""
        v = self.vocab
        return {"UNK": v["[UNK]"], "CLS": v["[CLS]"], "SEP": v["[SEP]"], "MASK": v["[MASK]"],
                "v_range": [v["!"], len(v)]}


# ----------------------------------------------------------------------------- image db

_FEAT_TH = re.compile(r"^feat_th(?P<th>[0-9.eE+-]+)_max(?P<max>\d+)_min(?P<min>\d+)"
                      r"(?P<c>_compressed)?$")
_FEAT_NUM = re.compile(r"^feat_numbb(?P<num>\d+)(?P<c>_compressed)?$")


class ImageDb:
    """The image keys of an image db directory (``--img_db``): every ``feat_*`` LMDB in it,
    read with :class:`~uniter_fast.data.db.DetectFeatLmdb` (the ``nbb_*.json`` box counts,
    or ``__keys__`` for a fixed box count)."""

    def __init__(self, img_dir: str):
        self.img_dir = os.path.normpath(img_dir)
        if not os.path.isdir(self.img_dir):
            raise PreproError(f"--img_db {img_dir}: not a directory")
        self.dbs: List[DetectFeatLmdb] = []
        for name in sorted(os.listdir(self.img_dir)):
            if not os.path.isdir(os.path.join(self.img_dir, name)):
                continue
            m, n = _FEAT_TH.match(name), _FEAT_NUM.match(name)
            if m:
                args = (float(m["th"]), int(m["max"]), int(m["min"]), 36, bool(m["c"]))
            elif n:
                args = (-1, 100, 10, int(n["num"]), bool(n["c"]))
            else:
                continue
            try:
                self.dbs.append(DetectFeatLmdb(self.img_dir, *args))
            except DbError as e:
                raise PreproError(f"--img_db {img_dir}: {e}") from None
        if not self.dbs:
            raise PreproError(f"--img_db {img_dir}: no image db in it (no feat_th*_max*_min* "
                              "or feat_numbb* LMDB directory)")
        self._names: List[Set[str]] = []
        for db in self.dbs:
            try:
                self._names.append(set(db.names()))
            except DbError as e:
                raise PreproError(f"--img_db {img_dir}: {e}") from None
        self.keys: Set[str] = set().union(*self._names)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def boxes(self, key: str) -> int:
        """How many boxes the db gives image ``key`` (the rows training reads)."""
        for db, names in zip(self.dbs, self._names):
            if key in names:
                try:
                    return int(db.get_dump(key, with_soft_labels=False)["norm_bb"].shape[0])
                except DbError as e:
                    raise PreproError(f"--img_db {self.img_dir}: {e}") from None
        raise KeyError(key)


# ----------------------------------------------------------------------------- context

@dataclass
class PreproContext:
    """What a task's :meth:`~uniter_fast.tasks.base.FinetuneTask.prepro` uses: the tokenizer,
    the bad-input reporter, the image db (``None``: not checked), the image key prefix the
    user gave (``None``: the task's default) and the progress bar."""

    tokenizer: BertTokenizer
    report: Reporter
    images: Optional[ImageDb] = None
    img_prefix: Optional[str] = None
    progress: bool = True

    def bad(self, where: str, reason: str, detail: str = "", action: str = "skipped") -> None:
        self.report.bad(where, reason, detail, action)

    def tokens(self, text: Any, where: str, name: str = "text") -> Optional[List[int]]:
        """The ids of ``text``; None (reported) when it is not a string or gives no token."""
        if not isinstance(text, str):
            self.bad(where, BAD_VALUE, f"{name} is {text!r:.60}, not a string")
            return None
        ids = self.tokenizer.tokenize(text)
        if not ids:
            self.bad(where, EMPTY_TEXT, f"{name} {text!r:.60} gives no token")
            return None
        return ids

    def image(self, key: str, where: str) -> bool:
        """Whether image ``key`` may be used: in the image db (when one was given), else
        reported as missing."""
        if self.images is None or key in self.images:
            return True
        self.bad(where, MISSING_IMAGE, f"{key} is not in the image db {self.images.img_dir}")
        return False

    def image_key(self, path: str, where: str, default_prefix: str = "") -> Optional[str]:
        """The image db key of an image file (:func:`~uniter_fast.data.image_keys.image_key`
        with the user's prefix, else ``default_prefix``), None (reported) when it has none."""
        # imported here: the image module brings the detector's image code (PIL), which the
        # tasks that import this package for their preprocessing do not need otherwise
        from ..data.image_keys import ImageListError, image_key
        prefix = default_prefix if self.img_prefix is None else self.img_prefix
        try:
            return image_key(path, prefix)
        except ImageListError as e:
            self.bad(where, BAD_VALUE, str(e))
            return None

    def bar(self, iterable: Iterable[Any], desc: str, total: Optional[int] = None,
            unit: str = "rec") -> Iterable[Any]:
        """``iterable`` under a tqdm bar (none with ``progress`` off)."""
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not self.progress,
                    dynamic_ncols=True, mininterval=0.5)


#: one text-db example: (where it comes from, its id, its record)
Example = Tuple[str, str, Dict[str, Any]]


@dataclass
class Prepared:
    """What a task's preprocessing gives: ``examples`` (streamed; each ``(where, id,
    record)``), ``files`` (more JSON files written beside the db, name -> object: RE's
    ``refs.json``, VQA's ``ans2label.json``; read after ``examples`` is consumed, so a
    generator may fill it) and ``meta`` (fields added to ``meta.json``)."""

    examples: Iterable[Example]
    files: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    """How a preprocessing run went."""

    out: str
    task: str
    written: int
    skipped: Dict[str, int]
    files: List[str]
    seconds: float
    report_file: Optional[str] = None

    def describe(self) -> str:
        lines = [f"{self.out}: {self.written} {self.task} records written in "
                 f"{self.seconds:.1f}s (files: {', '.join(self.files)})"]
        if self.skipped:
            lines.append("bad input: " + ", ".join(f"{r} {n}" for r, n in
                                                   sorted(self.skipped.items())))
            if self.report_file:
                lines.append(f"every report: {self.report_file}")
        else:
            lines.append("bad input: none")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- writer

#: every report, written beside the db when there was bad input
REPORT_FILE = "prepro_report.txt"


#: files of which one marks a directory as a text db (what ``overwrite`` may replace)
_DB_FILES = ("data.mdb", "meta.json", "id2len.json")


def check_out(out: str, overwrite: bool) -> None:
    """``out`` may be written: absent, or ``overwrite`` and a text db (or an empty
    directory): another directory is never removed."""
    if os.path.lexists(out):
        if not overwrite:
            raise PreproError(f"--out {out} exists; give --overwrite to replace it, or "
                              "another --out")
        if os.path.islink(out) or not os.path.isdir(out):
            raise PreproError(f"--out {out} exists and is not a directory (a text db is one)")
        if os.listdir(out) and not any(os.path.exists(os.path.join(out, f))
                                        for f in _DB_FILES):
            raise PreproError(f"--out {out} is a directory but not a text db (none of "
                              f"{', '.join(_DB_FILES)} in it): not replaced, even with "
                              "--overwrite")


def _unique(examples: Iterable[Example], report: Reporter, count: List[int]
            ) -> Iterator[Tuple[str, Dict[str, Any]]]:
    seen: Dict[str, str] = {}
    for where, id_, rec in examples:
        if id_ in seen:
            report.bad(where, DUPLICATE_ID, f"{id_!r} was first at {seen[id_]}; the first "
                       "is kept")
            continue
        seen[id_] = where
        count[0] += 1
        yield id_, rec


def prepro(task: Any, annotations: Sequence[str], out: str, tokenizer: BertTokenizer, *,
           fmt: Optional[str] = None, args: Any = None, img_db: Optional[str] = None,
           img_prefix: Optional[str] = None, strict: bool = False, overwrite: bool = False,
           progress: bool = True, max_reports: int = 20,
           meta: Optional[Dict[str, Any]] = None) -> Summary:
    """Preprocess ``annotations`` for ``task`` (a registry task: its ``prepro_formats`` and
    ``prepro``) into the text db ``out``; returns the :class:`Summary`.  ``meta.json``
    holds the options (the task's ``args`` too), the tokenizer's name and ids
    (:meth:`BertTokenizer.meta`), the task's fields, the record count and the bad-input
    counts; ``meta`` adds fields.  The db is built in ``<out>.partial<pid>`` and moved to
    ``out`` when complete (an existing ``out`` is replaced only with ``overwrite``, and only
    when it is a text db)."""
    t0 = time.time()
    if not task.prepro_formats:
        raise PreproError(f"task {task.name} has no annotation preprocessing")
    if fmt is not None and fmt not in task.prepro_formats:
        raise PreproError(f"--format {fmt!r}: task {task.name} reads "
                          f"{sorted(task.prepro_formats)}")
    out = os.path.normpath(out)
    check_out(out, overwrite)
    report = Reporter(strict, max_reports)
    images = ImageDb(img_db) if img_db else None
    ctx = PreproContext(tokenizer, report, images, img_prefix, progress)
    prepared = task.prepro(list(annotations), fmt, args, ctx)
    tmp = f"{out}.partial{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    count = [0]
    # as the original's meta.json (its options, the tokenizer's name and ids), and ours
    name = tokenizer.name
    full_meta = {"annotations": list(annotations), "output": out, "task": task.name,
                 "format": fmt, "toker": name, "tokenizer": name, "bert": name,
                 "img_db": img_db, "img_prefix": img_prefix, "strict": bool(strict)}
    for k, v in sorted(vars(args).items()) if hasattr(args, "__dict__") else ():
        full_meta.setdefault(k, v)
    full_meta.update(meta or {})
    try:
        os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
        write_txt_db(tmp, _unique(prepared.examples, report, count), {})
        if count[0] == 0:
            raise PreproError(f"no record to write ({_counts(report)}): nothing written to "
                              f"{out}")
        full_meta.update(prepared.meta)
        full_meta.update(tokenizer.meta())
        full_meta["records"] = count[0]
        full_meta["bad_input"] = dict(report.counts)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=4)
        for fname, obj in prepared.files.items():
            try:
                _atomic_json(os.path.join(tmp, fname), obj)
            except (TypeError, ValueError) as e:
                raise PreproError(f"{fname}: cannot be written as JSON ({e})") from None
        report_file = None
        if report.lines:
            report_file = os.path.join(out, REPORT_FILE)
            with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
                f.write("\n".join(report.lines) + "\n")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(os.listdir(out))
    return Summary(out, task.name, count[0], dict(report.counts), files, time.time() - t0,
                   report_file)


def _counts(report: Reporter) -> str:
    if not report.counts:
        return "the annotations hold none"
    return "bad input: " + ", ".join(f"{r} {n}" for r, n in sorted(report.counts.items()))


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.lexists(out):
        check_out(out, overwrite)
        old = f"{out}.old{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
