"""``python -m uniter_fast.predict``: image files and text to a fine-tuned UNITER's answer.

    python -m uniter_fast.predict --task vqa --checkpoint RUN_DIR_OR_MODEL.pt \\
        --detector faster_rcnn_from_caffe_attr.pkl --vocab vocab.txt \\
        --image kitchen.jpg --question "what is on the table?" [--draw kitchen.png]

    python -m uniter_fast.predict --task itm ... --image a.jpg --text "a dog on a sofa" --text "a cat"
    python -m uniter_fast.predict --task re ... --image a.jpg --text "the man on the left"
    python -m uniter_fast.predict --task ve ... --image a.jpg --hypothesis "two people are outside"
    python -m uniter_fast.predict --task nlvr2 ... --image left.jpg --image right.jpg --statement "..."
    python -m uniter_fast.predict --task vcr ... --image a.jpg --question "..." --answer A0 \\
        --answer A1 --answer A2 --answer A3 [--rationale R0 ... --rationale R3]

    python -m uniter_fast.predict --task vqa ... --requests questions.jsonl --output answers.jsonl \\
        [--draw_dir pictures/]

One request from the command line (``--image`` and the task's fields: ``--task TASK --help``
lists them) prints its answer as one JSON object; ``--requests FILE`` (JSON lines, one
request each: ``{"image": PATH}`` or ``{"images": [PATHS]}``, the task's fields, an optional
``id``; image paths relative to the file's folder) writes one JSON line per request to
``--output`` (default: standard output).  ``--checkpoint``, ``--config`` and ``--compile`` as
``python -m uniter_fast.infer``'s (the run's training config supplies the model config, the box rule,
the task's settings); ``--detector``, ``--preset``, the box rule and ``--precision`` as
``python -m uniter_fast.extract``'s (the box rule defaults to the run's); ``--vocab`` /
``--tokenizer`` as ``python -m uniter_fast.prepro``'s.  ``--cache_dir`` keeps each image's
features on disk (by content), so a second question about an image does not run the detector.
``--draw OUT.png`` (``--draw_dir DIR`` for a requests file) draws the detected regions, the
answer and the word-region alignment (docs/predict.md).

Exit status: 0 when every request was answered; 1 when some failed under ``--keep_going``;
2 for bad options, inputs or requests (the message names the option or the file and line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

from ..detector.config import PRESETS
from ..detector.extractor import PRECISIONS
from ..model.compile import add_compile_arguments
from ..tasks import FinetuneTask, task_from_argv, task_names
from ..tasks.inference import claim_outputs
from . import (
    CHUNK_REQUESTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOP_K,
    PredictError,
    Predictor,
    Result,
    read_requests,
)


def parser(task: Optional[FinetuneTask] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uniter_fast.predict",
                                description="Image files and text to a fine-tuned UNITER's "
                                            "answer (detector and model in one process).",
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=task_names())
    m = p.add_argument_group("model (as python -m uniter_fast.infer)")
    m.add_argument("--checkpoint", required=True,
                   help="fine-tuning run dir / its ckpt/ / a tag dir, or a plain .pt state dict")
    m.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    m.add_argument("--config", default=None,
                   help="training config (default: the run's train_config.json)")
    m.add_argument("--model_config", default=None)
    m.add_argument("--img_dim", type=int, default=None)
    m.add_argument("--trust_checkpoint", action="store_true",
                   help="load a DeepSpeed checkpoint's files without the safe check "
                        "(docs/reliability.md)")
    add_compile_arguments(m)
    d = p.add_argument_group("detector (as python -m uniter_fast.extract)")
    d.add_argument("--detector", required=True,
                   help="detector weights: faster_rcnn_from_caffe_attr.pkl or the Hugging Face "
                        "pytorch_model.bin, or a folder holding one")
    d.add_argument("--preset", choices=sorted(PRESETS), default="uniter",
                   help="image sizes: uniter 600/1000, lxmert 800/1333")
    d.add_argument("--conf_th", type=float, default=None,
                   help="box rule (default: the run's config): confidence threshold")
    d.add_argument("--max_bb", type=int, default=None, help="box rule: at most this many boxes")
    d.add_argument("--min_bb", type=int, default=None, help="box rule: at least this many boxes")
    d.add_argument("--num_bb", type=int, default=None,
                   help="a fixed number of boxes per image instead")
    d.add_argument("--detector_batch_size", type=int, default=2,
                   help="images per detector forward (default 2)")
    d.add_argument("--min_size", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--max_size", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--cache_dir", default=None,
                   help="keep each image's features here (by content hash and detector "
                        "settings); default: in memory only")
    t = p.add_argument_group("tokenizer (as python -m uniter_fast.prepro)")
    tok = t.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab", help="BERT base cased vocab.txt (the text dbs' vocabulary)")
    tok.add_argument("--tokenizer", dest="tokenizer_dir",
                     help="a tokenizer directory holding vocab.txt or tokenizer.json")
    r = p.add_argument_group("requests")
    r.add_argument("--image", action="append", default=None,
                   help="an image file of the request (NLVR2: give it twice, left then right)")
    r.add_argument("--requests", default=None,
                   help="JSON lines, one request each (instead of --image and the fields)")
    r.add_argument("--output", default=None,
                   help="answers as JSON lines (default: standard output)")
    r.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                   help=f"answers / regions listed per request (default {DEFAULT_TOP_K})")
    r.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"requests per model batch (default {DEFAULT_BATCH_SIZE})")
    r.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="the detector's convolutions and the model's autocast (default fp32)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    r.add_argument("--alignment", action="store_true",
                   help="add each request's word-region alignment (words, regions, WRA plan) "
                        "to its JSON answer")
    r.add_argument("--keep_going", action="store_true",
                   help="a request that fails gets an {\"error\"} line; the others are answered")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --draw picture")
    g = p.add_argument_group("pictures")
    g.add_argument("--draw", default=None, help="the picture of the (one) request: OUT.png")
    g.add_argument("--draw_dir", default=None,
                   help="a picture per request of --requests: DIR/<number>.png")
    g.add_argument("--labels", default=None,
                   help="a folder with Visual Genome's objects_vocab.txt / attributes_vocab.txt "
                        "(region labels; default: ids)")
    g.add_argument("--no_alignment", action="store_true",
                   help="pictures without the word-region alignment")
    g.add_argument("--image_size", type=int, default=480,
                   help="pixels of an image's longer side in a picture (default 480)")
    g.add_argument("--max_boxes", type=int, default=10,
                   help="detected regions outlined per image (default 10, the most confident)")
    if task is not None:
        task.add_predict_args(p.add_argument_group(f"{task.name} request and options"))
    return p


def _predictor(task: FinetuneTask, args: argparse.Namespace) -> Predictor:
    options = {k: getattr(args, k) for k in vars(args) if k in _task_options(task)}
    return Predictor(task, args.checkpoint, args.detector, vocab=args.vocab,
                     tokenizer_dir=args.tokenizer_dir, tag=args.tag, config=args.config,
                     model_config=args.model_config, img_dim=args.img_dim,
                     conf_th=args.conf_th, max_bb=args.max_bb, min_bb=args.min_bb,
                     num_bb=args.num_bb, preset=args.preset, min_size=args.min_size,
                     max_size=args.max_size, precision=args.precision, device=args.device,
                     cache_dir=args.cache_dir, batch_size=args.batch_size,
                     detector_batch_size=args.detector_batch_size, top_k=args.top_k,
                     options=options, labels=args.labels,
                     trust_checkpoint=args.trust_checkpoint, compile=args.compile,
                     compile_backend=args.compile_backend)


def _task_options(task: FinetuneTask) -> List[str]:
    """The task's own options (not its request fields)."""
    p = argparse.ArgumentParser(add_help=False)
    task.add_predict_args(p)
    return [k for k in vars(p.parse_args([])) if k not in task.predict_fields]


def _command_line_request(task: FinetuneTask, args: argparse.Namespace) -> Dict[str, Any]:
    req: Dict[str, Any] = {"image": args.image}
    for name, (kind, _, _) in task.predict_fields.items():
        v = getattr(args, name, None)
        if v is not None:
            req[name] = v
    return req


def _check_options(task: FinetuneTask, args: argparse.Namespace) -> None:
    given = [f"--{n}" for n in task.predict_fields if getattr(args, n, None) is not None]
    if args.requests is not None:
        if args.image or given:
            raise PredictError(f"--requests {args.requests} excludes --image and the request "
                               f"fields ({', '.join((['--image'] if args.image else []) + given)})"
                               ": put them in the file")
        if args.draw is not None:
            raise PredictError("--draw draws one request; with --requests give --draw_dir DIR")
    else:
        if not args.image:
            raise PredictError(f"give --image (and the fields of task {task.name}: "
                               f"{', '.join('--' + n for n in task.predict_fields)}) or "
                               "--requests FILE")
        if args.draw_dir is not None:
            raise PredictError("--draw_dir is for --requests; one request takes --draw OUT.png")
    if args.num_bb is not None:
        given_rule = [f"--{n}" for n in ("conf_th", "max_bb", "min_bb")
                      if getattr(args, n) is not None]
        if given_rule:
            raise PredictError(f"--num_bb (a fixed box count) excludes {', '.join(given_rule)}")
    for name in ("image_size", "max_boxes"):
        if getattr(args, name) < 1:
            raise PredictError(f"--{name} must be >= 1, got {getattr(args, name)}")


def _claim(paths: List[str], overwrite: bool) -> None:
    try:
        claim_outputs(paths, overwrite)
    except ValueError as e:
        raise PredictError(str(e).replace("--output_dir", "--draw / --draw_dir")) from None


def _draw(pred: Predictor, res: Result, path: str, args: argparse.Namespace,
          written: Dict[str, int]) -> None:
    """Draw ``res`` to ``path``: never over a file that exists unless ``--overwrite`` or this
    run wrote it for the same request (``written``: path -> request number; a request
    retried alone after its chunk failed)."""
    if written.get(path) != res.request["number"]:
        _claim([path], args.overwrite)
    written[path] = res.request["number"]
    pred.draw(res, path, alignment=not args.no_alignment, image_size=args.image_size,
              max_boxes=args.max_boxes)


def _run(task: FinetuneTask, args: argparse.Namespace, stdout) -> int:
    _check_options(task, args)
    _claim([p for p in (args.output, args.draw) if p is not None], args.overwrite)
    pred = _predictor(task, args)
    if args.requests is None:
        [res] = pred.answer([("command line", _command_line_request(task, args))])
        if args.alignment:
            pred.align(res)
        if args.draw is not None:
            _draw(pred, res, args.draw, args, {})
        out = res.to_json()
        if not args.alignment:
            out.pop("alignment", None)
        _emit([out], args.output or stdout)
        if pred.compiled:
            print(f"{task.name} predict: {_compiled(pred)}", file=sys.stderr)
        return 0

    base = os.path.dirname(os.path.abspath(args.requests))
    failed = 0
    written: Dict[str, int] = {}
    sink = open(args.output + ".tmp", "w", encoding="utf-8") if args.output else stdout
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(unit="req", desc=f"{task.name} predict", file=sys.stderr, dynamic_ncols=True)
    try:
        chunk: List[Any] = []
        number = 0
        for where, raw in read_requests(args.requests):
            chunk.append((number, where, raw))
            number += 1
            if len(chunk) >= CHUNK_REQUESTS:
                failed += _answer_chunk(pred, chunk, base, args, sink, written)
                if bar is not None:
                    bar.update(len(chunk))
                chunk = []
        if chunk:
            failed += _answer_chunk(pred, chunk, base, args, sink, written)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if args.output:
            sink.close()
    if args.output:
        os.replace(args.output + ".tmp", args.output)
    stats = (f"{task.name} predict: {number} requests, {failed} failed; detector ran on "
             f"{pred.detector_images} images (cache hits: {pred.cache.hits['memory']} in "
             f"memory, {pred.cache.hits['disk']} on disk)")
    if pred.compiled:
        stats += f"; {_compiled(pred)}"
    print(stats, file=sys.stderr)
    return 1 if failed else 0


def _compiled(pred: Predictor) -> str:
    """What the summary says of a compiled model: ``compile {counts}`` (JSON, as infer's
    summary's ``compile``)."""
    return f"compile {json.dumps(pred.compile_counts())}"


def _answer_chunk(pred: Predictor, chunk, base: str, args, sink,
                  written: Dict[str, int]) -> int:
    """Answer one chunk of ``(number, where, request)``; returns how many failed."""
    def one(items):
        reqs = [pred.task_request(raw, where, n, base) for n, where, raw in items]
        results = pred.answer_checked(reqs, align=args.alignment)
        lines = []
        for res in results:
            if args.draw_dir:
                number = res.request["number"]
                path = os.path.join(args.draw_dir, f"{res.request['id']}.png")
                if not _safe(res.request["id"]) or written.get(path, number) != number:
                    path = os.path.join(args.draw_dir, f"request{number}.png")  # or a repeated id
                _draw(pred, res, path, args, written)
            out = res.to_json()
            if not args.alignment:
                out.pop("alignment", None)
            if args.draw_dir:
                out["picture"] = path
            lines.append(out)
        return lines

    try:
        _emit(one(chunk), sink)
        return 0
    except PredictError:
        if not args.keep_going:
            raise
    failed = 0
    for item in chunk:                       # one by one: which requests fail
        try:
            _emit(one([item]), sink)
        except PredictError as e:
            n, where, raw = item
            rid = raw.get("id", raw.get("question_id", n)) if isinstance(raw, dict) else n
            _emit([{"id": rid, "where": where, "error": str(e)}], sink)
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return failed


def _safe(rid: Any) -> bool:
    s = str(rid)
    return bool(s) and len(s) <= 120 and all(c.isalnum() or c in "-_." for c in s) \
        and not s.startswith(".")


def _emit(objs, sink) -> None:
    """JSON lines to ``sink``: a file object, or a path (written atomically)."""
    if isinstance(sink, str):
        with open(sink + ".tmp", "w", encoding="utf-8") as f:
            for o in objs:
                f.write(json.dumps(o) + "\n")
        os.replace(sink + ".tmp", sink)
        return
    for o in objs:
        sink.write(json.dumps(o) + "\n")
    sink.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    task = task_from_argv(argv, parser)
    if not task.predict_fields:
        print(f"error: task {task.name} has no predict", file=sys.stderr)
        return 2
    args = parser(task).parse_args(argv)
    stdout = sys.stdout
    try:
        # the answers alone on standard output: what the libraries print (DeepSpeed's
        # accelerator notice, ...) goes to standard error
        with contextlib.redirect_stdout(sys.stderr):
            return _run(task, args, stdout)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
