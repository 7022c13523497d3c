"""Test setup: on a machine without CUDA, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tag tests gated by ``requires_cuda`` with the ``cuda`` marker, so that
    ``pytest tests -m cuda`` selects exactly the GPU subset (used by
    benchmarks/device_check.sh); a test marked ``cuda`` directly is skipped
    without a GPU."""
    for item in items:
        if any(m == requires_cuda.mark for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
        elif item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One ``UNITER_FAST_CACHE`` for the whole session, shared by the training tests
    (synthetic dbs and the one-time synthetic pretraining run);
    ``UNITER_FAST_TEST_CACHE`` reuses one across sessions."""
    return (os.environ.get("UNITER_FAST_TEST_CACHE")
            or str(tmp_path_factory.getbasetemp() / "uf_finetune_cache"))


@pytest.fixture(scope="session")
def training_env(shared_cache):
    """The environment of the slow tests' training subprocesses: the shared cache,
    unbuffered output, none of an outer launcher's rank variables (copy it per module)."""
    e = dict(os.environ, UNITER_FAST_CACHE=shared_cache, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="session")
def default_pretrain_run(shared_cache):
    """The default pretraining run (the packaged default config and ds.json, as the main
    command runs them) in fp32 on every CPU, made once per session as fine-tuning's
    ``synthetic:pretrain`` checkpoint (the fine-tuning tests pass ``--precision fp32`` too)
    and cached: its directory, standard output and metrics records.  fp32 everywhere, so
    that the convergence targets do not depend on which CPU the suite lands on (in bf16
    the fine-tuning targets were not all met: docs/tasks/vqa-ve-nlvr2.md)."""
    import json

    from uniter_fast.training.synthetic_pretrain import TRAIN_LOG_FILE, ensure_synthetic_pretrain
    ds = os.path.join(ROOT, "ds.json")
    precision = "fp32"
    pt = ensure_synthetic_pretrain({}, ds, precision, cache_dir=shared_cache, progress=False)
    run = os.path.dirname(pt)
    with open(os.path.join(run, TRAIN_LOG_FILE)) as f:
        stdout = f.read()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {"dir": run, "stdout": stdout, "records": records, "precision": precision}
