"""Everything the "Your own data" walk-through needs, generated: ``python -m uniter_fast.demo
--out demo/`` writes

* ``images/``: scenes of one to three coloured shapes (circle, square, triangle) on a noisy
  background, JPEG and PNG, of several sizes;
* ``train.jsonl`` / ``val.jsonl``: VQA questions about them in the plain JSON-lines format
  ``python -m uniter_fast.prepro --task vqa`` reads (``image``, ``question``, ``answers``: ten
  annotators' answers);
* ``vocab.txt``: a WordPiece vocabulary covering the questions (BERT's special tokens first),
  small enough for ``uniter-tiny``'s 128-token embedding;
* ``detector/pytorch_model.bin``: the bottom-up-attention detector's structure, small, with
  generated weights (:mod:`uniter_fast.detector.generated`);
* ``vqa.json``: a fine-tuning config for ``uniter-tiny`` over the dbs the next commands write.

The detector's weights are random, so the region features carry no meaning and the fine-tuned
model learns the questions' answer priors, not the pictures: this shows the mechanics of the
path from images to answers, on a laptop CPU in a few minutes.  The commands are printed at the
end (and are the README's "Your own data").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "COLOURS", "make_scene", "questions_for", "write_demo", "main"]

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40)}
NUMBERS = ("zero", "one", "two", "three")
#: BERT's special tokens, in the order prepro and the text db read them
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SIZES = ((240, 320), (320, 240), (300, 300), (200, 360))


def make_scene(rng: np.random.Generator, height: int, width: int
               ) -> Tuple[Image.Image, List[Tuple[str, str, Tuple[int, int, int, int]]]]:
    """A scene and its shapes: (shape, colour, box) each, boxes not overlapping."""
    bg = rng.integers(90, 200, 3)
    pix = np.clip(bg + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pix)
    draw = ImageDraw.Draw(img)
    objects: List[Tuple[str, str, Tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(50):
            s = int(rng.integers(min(height, width) // 6, min(height, width) // 3))
            x, y = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
            box = (x, y, x + s, y + s)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                   for _, _, b in objects):
                break
        else:
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
        objects.append((shape, colour, box))
    return img, objects


def questions_for(objects, rng: np.random.Generator) -> List[Tuple[str, str]]:
    """(question, answer) pairs a scene answers unambiguously."""
    out = [("how many shapes are there?", NUMBERS[len(objects)])]
    for shape in SHAPES:
        of = [c for s, c, _ in objects if s == shape]
        if len(of) == 1:
            out.append((f"what color is the {shape}?", of[0]))
    for colour in COLOURS:
        of = [s for s, c, _ in objects if c == colour]
        if len(of) == 1:
            out.append((f"what shape is {colour}?", of[0]))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    there = any(s == shape and c == colour for s, c, _ in objects)
    out.append((f"is there a {colour} {shape}?", "yes" if there else "no"))
    return out


def vocabulary() -> List[str]:
    words = {"how", "many", "shapes", "are", "there", "what", "color", "is", "the", "shape",
             "a", "?", "yes", "no"}
    words |= set(SHAPES) | set(COLOURS) | set(NUMBERS)
    # "!" first after the special tokens: BERT's vocabularies start the real tokens there and
    # prepro reads meta.json's v_range from it
    return list(SPECIAL) + ["!"] + sorted(words)


def finetune_config(out: str, steps: int) -> Dict[str, object]:
    db = lambda *p: os.path.join(out, *p)  # noqa: E731
    return {
        "train_txt_dbs": [db("txt_db", "train")], "train_img_dbs": [db("img_db")],
        "val_txt_db": db("txt_db", "val"), "val_img_db": db("img_db"),
        "ans2label": db("txt_db", "train", "ans2label.json"),
        "checkpoint": None, "model_config": "uniter-tiny", "img_dim": 2048,
        "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "max_txt_len": 60,
        "train_batch_size": 512, "val_batch_size": 4096, "gradient_accumulation_steps": 1,
        "learning_rate": 5e-4, "lr_mul": 10.0, "valid_steps": steps, "num_train_steps": steps,
        "warmup_steps": max(1, steps // 10), "optim": "adamw", "betas": [0.9, 0.98],
        "dropout": 0.1, "weight_decay": 0.01, "grad_norm": 2.0, "seed": 42, "n_workers": 0,
        "pin_mem": False, "save_steps": steps, "log_steps": max(1, steps // 10),
        "output_dir": db("run"),
    }


def write_demo(out: str, num_images: int = 24, seed: int = 0, steps: int = 500,
               detector: bool = True) -> Dict[str, str]:
    """Write the demo files into ``out`` (created; existing files are replaced only where
    they are this demo's own).  Returns the paths written."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    lines: Dict[str, List[str]] = {"train": [], "val": []}
    n_val = max(1, num_images // 5)
    for i in range(num_images):
        h, w = SIZES[i % len(SIZES)]
        img, objects = make_scene(rng, h, w)
        name = f"scene_{i:03d}." + ("png" if i % 4 == 3 else "jpg")
        img.save(os.path.join(out, "images", name), quality=92)
        split = "val" if i >= num_images - n_val else "train"
        for q, a in questions_for(objects, rng):
            lines[split].append(json.dumps({"image": name, "question": q, "answers": [a] * 10}))
    paths = {}
    for split, rows in lines.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.write("\n".join(rows) + "\n")
    paths["vocab"] = os.path.join(out, "vocab.txt")
    with open(paths["vocab"], "w") as f:
        f.write("\n".join(vocabulary()) + "\n")
    paths["config"] = os.path.join(out, "vqa.json")
    with open(paths["config"], "w") as f:
        json.dump(finetune_config(out, steps), f, indent=2)
    if detector:
        from .detector.generated import generated_detector, save_hf_layout
        paths["detector"] = save_hf_layout(generated_detector(seed),
                                           os.path.join(out, "detector"))
    return paths


def commands(out: str) -> str:
    return "\n".join([
        f"python -m uniter_fast.extract --detector {out}/detector --images {out}/images "
        f"--out {out}/img_db --preset small",
        f"python -m uniter_fast.prepro --task vqa --annotations {out}/train.jsonl "
        f"--out {out}/txt_db/train --vocab {out}/vocab.txt --img_db {out}/img_db "
        "--min_answer_count 1",
        f"python -m uniter_fast.prepro --task vqa --annotations {out}/val.jsonl "
        f"--out {out}/txt_db/val --vocab {out}/vocab.txt --img_db {out}/img_db "
        f"--ans2label {out}/txt_db/train/ans2label.json",
        f"deepspeed uniter_fast/finetune.py --task vqa --config {out}/vqa.json "
        "--deepspeed_config ds.json --precision fp32",
        f"python -m uniter_fast.predict --task vqa --checkpoint {out}/run --detector "
        f"{out}/detector --preset small --vocab {out}/vocab.txt --image "
        f"{out}/images/scene_000.jpg --question 'what color is the circle?' --draw "
        f"{out}/answer.png",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uniter_fast.demo",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write into")
    ap.add_argument("--num_images", type=int, default=24)
    ap.add_argument("--steps", type=int, default=500, help="fine-tuning steps in vqa.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a directory that already holds files")
    a = ap.parse_args(argv)
    if a.num_images < 2 or a.steps < 1:
        print("--num_images must be >= 2 and --steps >= 1", file=sys.stderr)
        return 2
    if os.path.isdir(a.out) and os.listdir(a.out) and not a.overwrite:
        print(f"{a.out} is not empty; --overwrite to write into it", file=sys.stderr)
        return 2
    paths = write_demo(a.out, a.num_images, a.seed, a.steps)
    print(f"wrote {a.num_images} images, {sum(1 for _ in open(paths['train']))} training and "
          f"{sum(1 for _ in open(paths['val']))} validation questions, a vocabulary, a "
          f"detector with generated weights and a fine-tuning config under {a.out}/\n"
          "next:\n" + commands(a.out.rstrip("/")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
