"""The package's structure, read from its source: no import circle, the task registry is the
only list of fine-tuning task names, no ``task == "..."`` dispatch outside the tasks'
own modules, no module or public name that records build order instead of meaning."""
import ast
import os
import re

import pytest

from uniter_fast.tasks import TASKS, task_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "uniter_fast")
#: names that end in a digit for a reason (NLVR2 is the dataset's name; powers of two)
DIGIT_NAMES = re.compile(r"nlvr2|pow2|log2|exp2", re.IGNORECASE)


def _modules():
    """{module name: (path, is_package)} of uniter_fast (kernels/ installs as uniter_fast.kernels)."""
    out = {}
    for base, prefix in ((PKG, "uniter_fast"), (os.path.join(ROOT, "kernels"),
                                                 "uniter_fast.kernels")):
        for d, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), base)[:-3].split(os.sep)
                is_pkg = rel[-1] == "__init__"
                if is_pkg:
                    rel = rel[:-1]
                out[".".join([prefix] + rel)] = (os.path.join(d, f), is_pkg)
    return out


MODULES = _modules()


def _imports(name, path, is_pkg):
    """Modules of the package that ``name`` imports anywhere (function bodies included)."""
    tree = ast.parse(open(path).read(), path)
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph():
    return {m: _imports(m, p, ip) for m, (p, ip) in MODULES.items()}


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_own_package(graph):
    """Edges from a module to a package that contains it are Python's normal
    ``from . import x`` / ``from ..pkg import name`` within one package tree (the package's
    ``__init__`` runs first, then the submodule): they are not layering, so left out."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_the_import_reader_sees_a_circle():
    # the checker itself can fail: a made-up two-module circle is found
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert "uniter_fast.tasks.answer" in _graph()["uniter_fast.tasks.vqa"]


def test_no_import_circle():
    assert _cycles(_without_own_package(_graph())) == []


def test_layers_point_down():
    """The lower layers never import the upper ones: ops/kernels/reference/model/data/detector
    know no training, tasks or drivers (extract, prepro and predict included); training knows no
    tasks; export knows no tasks or training; the prepro library knows no tasks (its
    command line looks the task up in the registry)."""
    graph = _graph()
    upper = {"uniter_fast.training", "uniter_fast.tasks", "uniter_fast.finetune",
             "uniter_fast.infer", "uniter_fast.train", "uniter_fast.extract",
             "uniter_fast.prepro", "uniter_fast.predict"}
    rules = {
        ("uniter_fast.ops", "uniter_fast.kernels", "uniter_fast.reference", "uniter_fast.model",
         "uniter_fast.data", "uniter_fast.detector"): upper | {"uniter_fast.export"},
        ("uniter_fast.training",): {"uniter_fast.tasks", "uniter_fast.finetune",
                                    "uniter_fast.infer"},
        ("uniter_fast.export",): {"uniter_fast.tasks", "uniter_fast.training"},
        ("uniter_fast.prepro",): {"uniter_fast.tasks", "uniter_fast.training",
                                  "uniter_fast.finetune", "uniter_fast.infer"},
    }
    bad = []
    for lows, banned in rules.items():
        for m, targets in graph.items():
            if m in ("uniter_fast.export.__main__", "uniter_fast.prepro.__main__") \
                    or not m.startswith(lows):
                continue
            for t in targets:
                if any(t == b or t.startswith(b + ".") for b in banned):
                    bad.append((m, t))
    assert bad == []


def test_registry_is_the_only_list_of_task_names():
    names = set(task_names())
    assert len(names) >= 7 and all(TASKS[n]().name == n for n in names)
    registry = os.path.join(PKG, "tasks", "__init__.py")
    found = []
    for m, (path, _) in MODULES.items():
        if path == registry:
            continue
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elts = node.elts
            elif isinstance(node, ast.Dict):
                elts = [k for k in node.keys if k is not None]
            else:
                continue
            listed = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
            if len(listed) >= 2:
                found.append((m, node.lineno, sorted(listed)))
    assert found == []


def test_no_task_name_dispatch_outside_the_tasks():
    """No comparison with a task name outside the task's own module (the drivers, the
    trainer and the shared task code ask the task object instead)."""
    names = set(task_names())
    own = {os.path.join(PKG, "tasks", f"{t.__module__.rsplit('.', 1)[1]}.py")
           for t in TASKS.values()}
    # pretraining's objectives (mlm, mrfr, ..., itm) are another namespace: "itm" there is
    # UNITER's image-text matching objective, not the retrieval task
    pretraining = ("uniter_fast.training.pretrain", "uniter_fast.training.pretrain_eval")
    found = []
    for m, (path, _) in MODULES.items():
        if path in own or m in pretraining or not m.startswith(("uniter_fast.tasks", "uniter_fast.training",
                                             "uniter_fast.export", "uniter_fast.finetune",
                                             "uniter_fast.infer", "uniter_fast.train",
                                             "uniter_fast.prepro", "uniter_fast.predict")):
            continue
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for c in [node.left] + node.comparators:
                    if isinstance(c, ast.Constant) and c.value in names:
                        found.append((m, node.lineno, c.value))
    assert found == []


def test_no_build_order_names():
    bad = []
    for m, (path, _) in MODULES.items():
        stem = m.rsplit(".", 1)[-1]
        if re.search(r"\d$", DIGIT_NAMES.sub("", stem)) or "part" in stem.split("_"):
            bad.append(m)
        tree = ast.parse(open(path).read(), path)
        for node in tree.body:
            targets = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for n in targets:
                plain = DIGIT_NAMES.sub("", n)
                if re.search(r"[A-Za-z_]2$", plain) or re.search(r"part_?\d", plain, re.I):
                    bad.append(f"{m}.{n}")
    for f in os.listdir(os.path.join(ROOT, "tests")):
        if re.search(r"\d\.py$", DIGIT_NAMES.sub("", f)):
            bad.append(f"tests/{f}")
    assert bad == []


@pytest.mark.parametrize("name", task_names())
def test_every_task_implements_the_interface(name):
    task = TASKS[name]()
    # abstract methods left unimplemented would have made instantiation fail; the class
    # attributes the drivers read are set
    assert task.name == name and task.known_keys and task.infer_batch_help
    assert isinstance(task.head_prefixes, tuple) and task.head_prefixes
