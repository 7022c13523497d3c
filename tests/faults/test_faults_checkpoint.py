"""Fault injection on real training runs (issue 13 items 1, 3, 4, 9, 10, 12): an output
dir without ``latest``, flipped bytes and truncated files in a checkpoint, a tag
missing its optimizer file, resuming under other settings, a garbage ``latest``,
a disk that fills up during a save, metrics after a resume.

One 8-step run (checkpoints every 2 steps) is shared by the module; each test works
on a copy of it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from faultutil import ROOT, copy_run, latest, records, run, step_records, train_cmd

from uniter_fast import checkpoint as ckpt_lib

OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def base(env, config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fault_base") / "run")
    run(train_cmd(config, out, steps=8, save=2), env)
    return out


@pytest.fixture(scope="module")
def base_steps(base):
    return {r["step"]: r for r in step_records(base)}


def _resume(config, out, *extra, steps=8):
    return train_cmd(config, out, "--resume", *extra, steps=steps)


def _flip(path, offset, n):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# ----------------------------------------------------------------------------- item 3

def test_manifest_written_before_latest(base):
    ck = os.path.join(base, "ckpt")
    assert latest(base) == "global_step8"
    for s in (2, 4, 6, 8):
        man = ckpt_lib.read_manifest(os.path.join(ck, f"global_step{s}"))
        assert man["step"] == s and set(man["files"]) == {OPTIM, MODEL}
        assert man["settings"] == {"zero_stage": 2, "precision": "bf16", "world_size": 1}
        assert ckpt_lib.verify_tag(os.path.join(ck, f"global_step{s}")) == []
        for rel, e in man["files"].items():
            assert ckpt_lib.checksum_file(os.path.join(ck, f"global_step{s}", rel)) == \
                (e["size"], e["crc32"])


def test_verify_tag_finds_every_kind_of_damage(base, tmp_path):
    out = copy_run(base, tmp_path / "v")
    tag = os.path.join(out, "ckpt", "global_step4")
    _flip(os.path.join(tag, OPTIM), 200_000, 4000)        # 1000 floats overwritten
    assert any("does not match its crc32" in p and OPTIM in p for p in ckpt_lib.verify_tag(tag))
    with open(os.path.join(tag, MODEL), "r+b") as f:
        f.truncate(1000)
    assert any(f"{MODEL} has 1000 bytes" in p for p in ckpt_lib.verify_tag(tag))
    os.remove(os.path.join(tag, OPTIM))
    assert any(f"{OPTIM} is missing" in p for p in ckpt_lib.verify_tag(tag))
    with open(os.path.join(tag, ckpt_lib.MANIFEST), "w") as f:
        f.write('{"files": ')
    assert any("manifest.json is corrupt" in p for p in ckpt_lib.verify_tag(tag))
    os.remove(os.path.join(tag, ckpt_lib.MANIFEST))
    assert any("has no manifest.json" in p for p in ckpt_lib.verify_tag(tag))
    assert ckpt_lib.newest_intact_tag(os.path.join(out, "ckpt"), before_step=6) == "global_step2"


def test_damaged_checkpoint_is_not_trained_on_and_an_older_tag_resumes(env, config, base,
                                                                     base_steps, tmp_path):
    out = copy_run(base, tmp_path / "d")
    bad = os.path.join(out, "ckpt", "global_step8", OPTIM)
    _flip(bad, 300_000, 4000)
    p = run(_resume(config, out, steps=10), env, ok=False)
    assert f"global_step8 is damaged and was not loaded: file {bad} does not match" in p.stderr
    assert "newest intact checkpoint is global_step6" in p.stderr
    assert "--resume --resume_tag global_step6" in p.stderr
    # a truncated file in the newest tag: same refusal, naming that file
    with open(os.path.join(out, "ckpt", "global_step8", MODEL), "r+b") as f:
        f.truncate(4096)
    p = run(_resume(config, out, steps=10), env, ok=False)
    assert f"{MODEL} has 4096 bytes" in p.stderr and "--resume_tag global_step6" in p.stderr
    assert "miniz" not in p.stderr and "Errno 22" not in p.stderr
    assert not any(r.get("step", 0) > 8 for r in records(os.path.join(out, "metrics.jsonl")))

    # as told: resume from the intact tag; the run retraces the uninterrupted one
    run(_resume(config, out, "--resume_tag", "global_step6"), env)
    assert latest(out) == "global_step8"
    assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", "global_step8")) == []
    steps = step_records(out)
    # item 12: the file reads as one run -- every step once, in order
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps[6:]:
        assert r["task"] == base_steps[r["step"]]["task"]
        assert r["loss"] == pytest.approx(base_steps[r["step"]]["loss"], rel=1e-6, abs=1e-7)
    recs = records(os.path.join(out, "metrics.jsonl"))
    starts = [r for r in recs if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 6] and starts[1]["resumed_from"] == "global_step6"
    assert [r["step"] for r in recs if r.get("event") == "end"] == [8]
    dropped = records(os.path.join(out, "metrics.discarded.jsonl"))
    later = [r for r in records(os.path.join(base, "metrics.jsonl")) if r.get("step", 0) > 6]
    assert starts[1]["dropped_records"] == len(dropped) == len(later) >= 3   # 7, 8, the end
    assert dropped == later


# ----------------------------------------------------------------------------- item 1

def test_dir_without_latest_is_not_overwritten(env, config, base, tmp_path):
    out = copy_run(base, tmp_path / "nolatest")
    os.remove(os.path.join(out, "ckpt", "latest"))
    before = {t: ckpt_lib.read_manifest(os.path.join(out, "ckpt", t))
              for t in ckpt_lib.list_tags(os.path.join(out, "ckpt"))}
    p = run(train_cmd(config, out, steps=8), env, ok=False)
    assert "already holds a run" in p.stderr and "--resume" in p.stderr
    assert "global_step8" in p.stderr and "metrics.jsonl" in p.stderr
    p = run(_resume(config, out), env, ok=False)
    assert "no 'latest' file" in p.stderr and "--resume_tag global_step8" in p.stderr
    after = {t: ckpt_lib.read_manifest(os.path.join(out, "ckpt", t))
             for t in ckpt_lib.list_tags(os.path.join(out, "ckpt"))}
    assert after == before, "a checkpoint was rewritten"
    for t in before:
        assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", t)) == []


def test_output_dir_rules(tmp_path):
    """Every state of an output dir, without and with --resume (no training needed)."""
    check = ckpt_lib.check_output_dir
    empty = str(tmp_path / "new")
    assert check(empty, resume=False) is None
    with pytest.raises(ckpt_lib.CheckpointError, match="nothing to resume from"):
        check(empty, resume=True)
    m = tmp_path / "metrics_only"
    m.mkdir()
    (m / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(ckpt_lib.CheckpointError, match="already holds a run"):
        check(str(m), resume=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="stopped before its first checkpoint"):
        check(str(m), resume=True)
    (m / "metrics.jsonl").write_text("")          # an empty metrics file is no run
    assert check(str(m), resume=False) is None
    t = tmp_path / "tag_only"
    (t / "ckpt" / "global_step3").mkdir(parents=True)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint directories \['global_step3"):
        check(str(t), resume=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="No intact checkpoint"):
        check(str(t), resume=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="--resume_tag global_step9: no such"):
        check(str(t), resume=True, resume_tag="global_step9")
    assert check(str(t), resume=True, resume_tag="global_step3") == "global_step3"


# ----------------------------------------------------------------------------- item 10

def test_garbage_latest_names_the_file(env, config, base, tmp_path):
    out = copy_run(base, tmp_path / "garbage")
    path = os.path.join(out, "ckpt", "latest")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ckpt_lib.CheckpointError, match="is not a checkpoint tag name"):
        ckpt_lib.read_latest(os.path.join(out, "ckpt"))
    p = run(_resume(config, out), env, ok=False)
    assert f"{path} is not a checkpoint tag name" in p.stderr
    assert "UnicodeDecodeError" not in p.stderr
    assert "global_step8" in p.stderr and "--resume_tag TAG" in p.stderr
    with open(path, "w") as f:
        f.write("global_step99")
    with pytest.raises(ckpt_lib.CheckpointError, match="names 'global_step99', which is not"):
        ckpt_lib.read_latest(os.path.join(out, "ckpt"))


@pytest.mark.parametrize("mode", ["runtime", "oserror"])
def test_full_disk_during_save(env, config, tmp_path, mode):
    out = str(tmp_path / "full")
    e = dict(env, UF_FAULT_FULL_TAG="global_step4", UF_FAULT_MODE=mode)
    cmd = train_cmd(config, out, steps=6)
    cmd.insert(1, os.path.join(ROOT, "tests", "faults", "enospc_train.py"))
    p = run(cmd, e, ok=False)
    err = p.stderr
    assert f"saving checkpoint {os.path.join(out, 'ckpt', 'global_step4')} failed on rank 0" in err
    assert ("unexpected pos" in err) if mode == "runtime" else ("No space left" in err)
    assert "'latest' still names global_step2, which is intact" in err
    assert latest(out) == "global_step2"
    assert ckpt_lib.read_manifest(os.path.join(out, "ckpt", "global_step4")) is None
    if mode == "runtime":     # once there is room again, the run resumes from global_step2
        run(_resume(config, out, steps=6), env)
        assert latest(out) == "global_step6"
        assert [r["step"] for r in step_records(out)] == list(range(1, 7))


def _can_mount_tmpfs(path):
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path],
                       capture_output=True)
    if p.returncode != 0:
        return False
    subprocess.run(["umount", path], check=True)
    return True


@pytest.mark.parametrize("size_mb,first_save_fails", [(2, True), (6, False)])
def test_full_disk_real_tmpfs(env, config, tmp_path, size_mb, first_save_fails):
    """A real full filesystem (a small tmpfs; needs root, skipped otherwise): 2 MiB is
    less than one checkpoint (the write itself fails), 6 MiB holds one but not two
    (refused before writing, from the size of the previous checkpoint)."""
    mnt = str(tmp_path / "mnt")
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", mnt], check=True)
    try:
        out = os.path.join(mnt, "run")
        p = run(train_cmd(config, out, steps=4), env, ok=False)
        if first_save_fails:
            assert "saving checkpoint" in p.stderr and "failed on rank 0" in p.stderr
            assert "MiB free now" in p.stderr
            assert not os.path.exists(os.path.join(out, "ckpt", "latest"))
        else:
            assert "not enough disk space" in p.stderr and "(the size of global_step2)" in p.stderr
            assert latest(out) == "global_step2"
            assert ckpt_lib.verify_tag(os.path.join(out, "ckpt", "global_step2")) == []
            assert not os.path.exists(os.path.join(out, "ckpt", "global_step4"))
    finally:
        subprocess.run(["umount", mnt], check=True)


# ----------------------------------------------------------------------------- item 9

@pytest.mark.parametrize("flag,value,diff", [("--zero_stage", "3", "zero_stage"),
                                             ("--precision", "fp32", "precision")])
def test_resume_under_other_settings_refused_up_front(env, config, base, tmp_path, flag, value,
                                                      diff):
    out = copy_run(base, tmp_path / "settings")
    p = run(_resume(config, out, flag, value, steps=10), env, ok=False)
    assert "was saved with zero_stage=2, precision=bf16, world_size=1" in p.stderr
    assert f"(different: {diff})" in p.stderr and f"{flag} " in p.stderr
    assert "export to-pt" in p.stderr
    assert "NoneType" not in p.stderr and "AssertionError" not in p.stderr
    assert "lr_schedules" not in p.stderr, "refused before the engine was built"


def test_check_settings_world_size():
    stored = {"zero_stage": 2, "precision": "bf16", "world_size": 2}
    ckpt_lib.check_settings(stored, dict(stored), "ck", "global_step4")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"world_size=2; this run has .*world_size=1 \(different: "
                             r"world_size\).*on 2 processes"):
        ckpt_lib.check_settings(stored, dict(stored, world_size=1), "ck", "global_step4")


# ----------------------------------------------------------------------------- item 4

def test_export_refuses_tag_without_its_optimizer_file(env, base, tmp_path):
    from uniter_fast import export
    out = copy_run(base, tmp_path / "exp")
    ck = os.path.join(out, "ckpt")
    good = export.consolidate(ck, "global_step8")
    # the fp32 masters, not the bf16 module weights: some values are not bf16-representable
    w = good["uniter.embeddings.word_embeddings.weight"]
    assert not torch.equal(w, w.to(torch.bfloat16).float())
    # a kill between DeepSpeed's two writes: the model file, no optimizer file, no manifest
    tag = os.path.join(ck, "global_step8")
    os.remove(os.path.join(tag, OPTIM))
    os.remove(os.path.join(tag, ckpt_lib.MANIFEST))
    with pytest.raises(export.ExportError, match=r"lacks \['zero_pp_rank_0_mp_rank_00_optim_"
                                                 r"states.pt'\].*lose precision; refusing.*"
                                                 r"newest intact tag is global_step6"):
        export.consolidate(ck, "global_step8")
    pt = str(tmp_path / "x.pt")
    p = run([sys.executable, "-m", "uniter_fast.export", "to-pt", ck, pt, "--tag",
             "global_step8"], env, ok=False)
    assert "refusing" in p.stderr and not os.path.exists(pt)
    lossy = export.consolidate(ck, "global_step8", allow_module_weights=True)
    assert torch.equal(lossy["itm_output.weight"], lossy["itm_output.weight"].bfloat16().float())
    # the manifest still there: the missing file is named as damage
    tag6 = os.path.join(ck, "global_step6")
    os.remove(os.path.join(tag6, OPTIM))
    with pytest.raises(export.ExportError, match=rf"global_step6 is damaged: file .*{OPTIM} is "
                                                 r"missing.*newest intact tag is global_step4"):
        export.consolidate(ck, "global_step6")


@pytest.fixture(scope="module")
def zero0(env, config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fault_z0") / "run")
    run(train_cmd(config, out, "--zero_stage", "0", steps=3, save=3), env)
    return out


def test_export_zero0_bf16_gives_fp32_masters(zero0):
    from uniter_fast import export
    ck = os.path.join(zero0, "ckpt")
    state = torch.load(os.path.join(ck, "global_step3", MODEL), map_location="cpu",
                       weights_only=False)
    module = state["module"]
    assert next(iter(module.values())).dtype == torch.bfloat16
    sd = export.consolidate(ck)
    masters = [t for g in state["optimizer"]["fp32_groups"] for t in g]
    n_exact = 0
    names = [n for g in state["param_group_names"] for n in g]
    assert len(names) == len(masters) and len(set(names)) == len(names)
    for name, t in zip(names, masters):
        assert torch.equal(sd[name].to(torch.bfloat16), module[name]), name
        assert torch.equal(sd[name], t.float()), name
        n_exact += int(not torch.equal(t, t.to(torch.bfloat16).float()))
    assert n_exact > 0, "nothing finer than bf16: these are not the masters"
    # tied weights present and equal
    assert torch.equal(sd["cls.predictions.decoder.weight"],
                       sd["uniter.embeddings.word_embeddings.weight"])
    # a checkpoint without the group names (older version) is refused, not exported lossy
    del state["param_group_names"]
    with pytest.raises(export.ExportError, match="no parameter-group names stored"):
        export._zero0_masters(state, "old")


# ----------------------------------------------------------------------------- item 12

def test_rewind_metrics_drops_later_and_cut_records(tmp_path):
    from uniter_fast.training.metrics import rewind_jsonl
    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "start", "step": 0}] + [{"step": s, "loss": 1.0} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')
    n = rewind_jsonl(str(path), lambda r: r.get("step") is None or r["step"] <= 4)
    assert n == 3
    assert [r["step"] for r in records(path)] == [0, 1, 2, 3, 4]
    disc = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert len(disc) == 3 and disc[-1] == '{"step": 7, "lo'
    assert rewind_jsonl(str(path), lambda r: True) == 0
    assert rewind_jsonl(str(tmp_path / "none.jsonl"), lambda r: True) == 0
