"""``python -m uniter_fast.prepro``: annotation files to UNITER's text db.

    python -m uniter_fast.prepro --task TASK --annotations FILE [FILE ...] --out TXT_DB \\
        (--vocab vocab.txt | --tokenizer DIR) [--format FORMAT] [--img_db IMG_DB] \\
        [--img_prefix PREFIX] [--strict] [--overwrite] [--no_progress] [task options]

The task (``--task``, from the registry) reads its own annotation formats (``--format``;
default: told from the files) and the text is tokenized with BERT base cased WordPiece from
the vocabulary you bring (``--vocab`` or ``--tokenizer``; nothing is downloaded), word by
word as UNITER's ``prepro.py``.  Image names become image db keys as the extractor names
them (``--img_prefix`` + file stem + ``.npz``); with ``--img_db`` every image must be in
that db.

Bad input (a missing image, an empty text, an answer outside a given ``--ans2label``, a
malformed JSON line, a missing field, ...) is reported with its file and line (or record
index), skipped and counted; ``--strict`` stops at the first.  The summary says how many
records were written and how many were skipped for which reason; every report is in
``TXT_DB/prepro_report.txt``.

Exit status: 0 when the db is written; 2 for bad options or input that stops the run (an
unreadable file, an existing --out without --overwrite, bad input under --strict, no record
to write); 130 when interrupted (nothing is left at --out).
"""
from __future__ import annotations

import argparse
import sys

from ..data.db import DbError
from ..tasks import get_task, task_from_argv, task_names
from . import BertTokenizer, PreproError, prepro


def _formats(task) -> str:
    return "; ".join(f"{k}: {v}" for k, v in task.prepro_formats.items()) or "none"


def parser(task=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uniter_fast.prepro",
                                description="Annotation files to UNITER's text db.",
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=task_names(),
                   help="the fine-tuning task whose annotations these are")
    p.add_argument("--annotations", required=True, nargs="+", metavar="FILE",
                   help="annotation files" + (f" ({_formats(task)})" if task else ""))
    p.add_argument("--out", required=True, help="the text db directory to write")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab", help="BERT base cased vocab.txt")
    tok.add_argument("--tokenizer", dest="tokenizer_dir", help="a tokenizer directory holding vocab.txt or "
                                         "tokenizer.json (BERT base cased)")
    p.add_argument("--toker", default="bert-base-cased",
                   help="the tokenizer's name recorded in meta.json (default bert-base-cased)")
    p.add_argument("--format", default=None,
                   choices=sorted(task.prepro_formats) if task and task.prepro_formats else None,
                   help="the annotation format (default: told from the files)")
    p.add_argument("--img_db", default=None,
                   help="an image db: every image the texts refer to must be in it")
    p.add_argument("--img_prefix", default=None,
                   help="image key prefix (key = prefix + image file stem + .npz; default: "
                        "the task's, '' but nlvr2_ for NLVR2)")
    p.add_argument("--strict", action="store_true",
                   help="bad input is an error (default: reported, skipped and counted)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--max_reports", type=int, default=20,
                   help="reports printed per reason (all go to TXT_DB/prepro_report.txt)")
    if task is not None:
        task.add_prepro_args(p.add_argument_group(f"{task.name} options"))
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    task = task_from_argv(argv, parser)
    if not task.prepro_formats:
        print(f"error: task {task.name} has no annotation preprocessing; tasks with one: "
              f"{[n for n in task_names() if get_task(n).prepro_formats]}", file=sys.stderr)
        return 2
    args = parser(task).parse_args(argv)
    if "uncased" in args.toker:
        print(f"error: --toker {args.toker}: UNITER's text dbs are BERT base cased; this "
              "preprocessing never lower-cases", file=sys.stderr)
        return 2
    try:
        if args.vocab:
            tokenizer = BertTokenizer.from_vocab(args.vocab, args.toker)
        else:
            tokenizer = BertTokenizer.from_dir(args.tokenizer_dir, args.toker)
        summary = prepro(task, args.annotations, args.out, tokenizer, fmt=args.format,
                         args=args, img_db=args.img_db, img_prefix=args.img_prefix,
                         strict=args.strict, overwrite=args.overwrite,
                         progress=not args.no_progress, max_reports=args.max_reports)
    except (PreproError, DbError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(summary.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
