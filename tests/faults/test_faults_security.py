"""A checkpoint never runs code (issue 19 items 2, 3): a pickle payload planted in a real
checkpoint's model states or ZeRO optimizer states (the manifest's checksum rewritten to
match) is refused by ``export to-pt``, ``infer --checkpoint RUN_DIR`` and ``--resume``,
naming the file and the global, and never runs; ``--trust_checkpoint`` loads it (the
payload's only effect: an empty marker file in tmp_path).  Files that are no checkpoint
give a message without PyTorch's advice to load them with ``weights_only=False``.

One 2-step ZeRO-2 bf16 run is shared by the module; each test works on a copy of it.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from faultutil import copy_run, latest, records, run, train_cmd

from uniter_fast import checkpoint as ckpt_lib
from uniter_fast import export

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
TAG = "global_step2"
ADVICE = "weights_only=False"


class Payload:
    """Unpickled, it creates (empties) the file ``marker``: a harmless stand-in for
    ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(run_dir, rel, marker, tag=TAG):
    """Add a payload to one file of ``tag`` and rewrite the manifest entry so that the
    manifest check passes (as an attacker would)."""
    tag_dir = os.path.join(run_dir, "ckpt", tag)
    path = os.path.join(tag_dir, rel)
    state = torch.load(path, map_location="cpu", weights_only=False)   # our own clean file
    state["payload"] = Payload(str(marker))
    torch.save(state, path)
    man = ckpt_lib.read_manifest(tag_dir)
    size, crc = ckpt_lib.checksum_file(path)
    man["files"][rel] = {"size": size, ckpt_lib.CHECKSUM: crc}
    with open(os.path.join(tag_dir, ckpt_lib.MANIFEST), "w") as f:
        json.dump(man, f)
    assert ckpt_lib.verify_tag(tag_dir) == []


@pytest.fixture(scope="module")
def base(env, config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sec_base") / "run")
    run(train_cmd(config, out, steps=2, save=2), env)
    assert sorted(os.listdir(os.path.join(out, "ckpt", TAG))) == sorted(
        [MODEL, OPTIM, ckpt_lib.MANIFEST])
    return out


def _refused(p, rel, marker):
    err = p.stdout + p.stderr
    assert f"{rel} holds io.open" in err, err[-3000:]
    assert "not on the allow-list" in err and "--trust_checkpoint" in err
    assert ADVICE not in err
    assert not os.path.exists(marker), "the payload ran"


# ----------------------------------------------------------------------------- the allow-list

def test_fresh_checkpoint_needs_only_the_allow_list(base, tmp_path):
    tag_dir = os.path.join(base, "ckpt", TAG)
    assert ckpt_lib.check_tag_safe(tag_dir) == []
    for rel in (MODEL, OPTIM):
        found = torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(tag_dir, rel))
        assert set(found) <= set(ckpt_lib.SAFE_GLOBALS), (rel, found)
    # the model states hold nothing beyond tensors and containers: the RNG state is plain
    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        os.path.join(tag_dir, MODEL)) == []
    state = ckpt_lib.safe_load(os.path.join(tag_dir, MODEL))
    assert isinstance(state["rng"]["numpy"][1], list)
    # a checkpoint of an older version (NumPy's RNG state as its uint32 array) still loads
    state["rng"]["numpy"] = np.random.get_state()
    old = str(tmp_path / "old_model_states.pt")
    torch.save(state, old)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    back = ckpt_lib.safe_load(old)
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])


# ----------------------------------------------------------------------------- payloads

@pytest.mark.parametrize("rel", [MODEL, OPTIM])
def test_payload_is_refused_by_export_infer_and_resume(env, config, base, tmp_path, rel):
    out = copy_run(base, tmp_path / "run")
    marker = tmp_path / "PWNED"
    plant(out, rel, marker)
    before = open(os.path.join(out, "metrics.jsonl")).read()

    with pytest.raises(ckpt_lib.UnsafeCheckpointError, match=rf"{rel} holds io\.open"):
        export.consolidate(os.path.join(out, "ckpt"))
    assert not marker.exists()

    pt = str(tmp_path / "x.pt")
    p = run([sys.executable, "-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"),
             pt], env, ok=False)
    _refused(p, rel, marker)
    assert not os.path.exists(pt)

    # infer --task itm takes a pretraining run; the weights are read before the dbs
    p = run([sys.executable, "-m", "uniter_fast.infer", "--task", "itm", "--checkpoint", out,
             "--txt_db", str(tmp_path / "no.db"), "--img_db", str(tmp_path / "no_img"),
             "--no_progress"], env, ok=False)
    _refused(p, rel, marker)

    p = run(train_cmd(config, out, "--resume", steps=4), env, ok=False)
    _refused(p, rel, marker)
    # refused before the run directory changed
    assert latest(out) == TAG
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_trust_checkpoint_loads_a_run_of_ones_own(env, config, base, tmp_path):
    """The opt-in unpickles as DeepSpeed does (here the payload's marker appears: proof
    that the refusal above was the check, not a broken file)."""
    out = copy_run(base, tmp_path / "run")
    m_optim, m_model = tmp_path / "optim_marker", tmp_path / "model_marker"
    plant(out, OPTIM, m_optim)
    pt = str(tmp_path / "x.pt")
    run([sys.executable, "-m", "uniter_fast.export", "to-pt", os.path.join(out, "ckpt"), pt,
         "--trust_checkpoint"], env)
    assert m_optim.exists() and os.path.exists(pt)
    sd = torch.load(pt, weights_only=True)
    assert "uniter.embeddings.word_embeddings.weight" in sd

    os.remove(m_optim)
    plant(out, MODEL, m_model)
    run(train_cmd(config, out, "--resume", "--trust_checkpoint", steps=3), env)
    assert m_model.exists()
    assert [r["step"] for r in records(os.path.join(out, "metrics.jsonl"))
            if "event" not in r] == [1, 2, 3]


# ----------------------------------------------------------------------------- not checkpoints

def _garbage(tmp_path):
    import pickle
    import zipfile
    files = {}
    files["text"] = tmp_path / "notes.pt"
    files["text"].write_text("hello, not a checkpoint\n")
    files["pickle"] = tmp_path / "plain_pickle.pt"
    files["pickle"].write_bytes(pickle.dumps({"a": 1}, protocol=2))
    files["zip"] = tmp_path / "other.pt"
    with zipfile.ZipFile(files["zip"], "w") as z:
        z.writestr("x.txt", "hi")
    files["payload"] = tmp_path / "payload.pt"
    torch.save({"w": torch.ones(2), "p": Payload(str(tmp_path / "PWNED"))}, files["payload"])
    files["list"] = tmp_path / "list.pt"
    torch.save([torch.ones(2)], files["list"])
    return files


def test_files_that_are_no_state_dict_name_themselves_without_torch_advice(tmp_path):
    for kind, path in _garbage(tmp_path).items():
        with pytest.raises(ckpt_lib.UnsafeCheckpointError) as e:
            export.load_state_dict_file(str(path))
        msg = str(e.value)
        assert str(path) in msg and ADVICE not in msg and "weights_only" not in msg, msg
        if kind == "payload":
            assert "holds io.open" in msg
        else:
            assert "is not a plain state dict" in msg, msg
    assert not (tmp_path / "PWNED").exists()


def test_infer_with_a_non_checkpoint_file(env, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, not a checkpoint\n")
    p = run([sys.executable, "-m", "uniter_fast.infer", "--task", "itm", "--checkpoint", str(bad),
             "--model_config", "uniter-tiny", "--txt_db", str(tmp_path / "no.db"),
             "--img_db", str(tmp_path / "no_img"), "--no_progress"], env, ok=False)
    err = p.stdout + p.stderr
    assert f"{bad} is not a plain state dict" in err, err[-3000:]
    assert ADVICE not in err


def test_trust_flag_on_every_command_line():
    from uniter_fast.infer import build_parser
    from uniter_fast.training.config import build_arg_parser
    assert build_arg_parser().parse_args(["--trust_checkpoint"]).trust_checkpoint
    assert not build_arg_parser().parse_args([]).trust_checkpoint
    assert "--trust_checkpoint" in build_parser().format_help()
    with ckpt_lib.trusting(True):
        assert ckpt_lib.trusted()
    assert not ckpt_lib.trusted()
