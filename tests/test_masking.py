"""Conditional masking helpers: rates, at-least-one rule, labels, never-both."""
import math
import random

import pytest
import torch

from uniter_fast.masking import (
    conditional_mask,
    img_mask_target,
    mask_img_feat,
    random_word,
    region_mask,
    soft_label_targets,
)

MASK = 103
V_RANGE = (1000, 29000)


def _binom_tol(p, n, sigmas=5.0):
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_mlm_rates_on_many_tokens():
    rng = random.Random(1234)
    src_rng = random.Random(99)
    n_sel = n_tok = n_mask = n_rand = n_keep = 0
    for _ in range(200):
        toks = [src_rng.randrange(*V_RANGE) for _ in range(1000)]
        out, labels = random_word(toks, V_RANGE, MASK, rng)
        assert len(out) == len(labels) == len(toks)
        for t, o, lab in zip(toks, out, labels):
            n_tok += 1
            if lab == -1:
                assert o == t, "unselected tokens must be unchanged"
                continue
            assert lab == t, "label must be the original token"
            n_sel += 1
            if o == MASK:
                n_mask += 1
            elif o == t:
                n_keep += 1
            else:
                assert V_RANGE[0] <= o < V_RANGE[1]
                n_rand += 1
    rate = n_sel / n_tok
    assert abs(rate - 0.15) < _binom_tol(0.15, n_tok)
    assert abs(n_mask / n_sel - 0.8) < _binom_tol(0.8, n_sel)
    # a random replacement equal to the original (p = 1/28000) counts as "kept"
    assert abs(n_rand / n_sel - 0.1) < _binom_tol(0.1, n_sel)
    assert abs(n_keep / n_sel - 0.1) < _binom_tol(0.1, n_sel)


def test_mlm_custom_prob_and_input_untouched():
    rng = random.Random(0)
    toks = [random.Random(5).randrange(*V_RANGE) for _ in range(20000)]
    copy = list(toks)
    _, labels = random_word(toks, V_RANGE, MASK, rng, mask_prob=0.4)
    assert toks == copy
    rate = sum(lab != -1 for lab in labels) / len(labels)
    assert abs(rate - 0.4) < _binom_tol(0.4, len(labels))


def test_mlm_at_least_one_and_length_one():
    # with prob 0 nothing is selected by chance, so the first token must be forced
    for n in (1, 2, 7):
        toks = list(range(2000, 2000 + n))
        out, labels = random_word(toks, V_RANGE, MASK, random.Random(3), mask_prob=0.0)
        assert labels[0] == toks[0] and out[0] == MASK
        assert all(lab == -1 for lab in labels[1:]) and out[1:] == toks[1:]
    # length 1 with default prob: always exactly one masked position
    rng = random.Random(11)
    for _ in range(500):
        out, labels = random_word([4242], V_RANGE, MASK, rng)
        assert labels == [4242]
    # every short caption has >= 1 label
    for _ in range(2000):
        n = rng.randrange(1, 6)
        _, labels = random_word([1500] * n, V_RANGE, MASK, rng)
        assert any(lab != -1 for lab in labels)


def test_mlm_reproducible_by_seed():
    toks = [random.Random(1).randrange(*V_RANGE) for _ in range(300)]
    a = random_word(toks, V_RANGE, MASK, random.Random(77))
    b = random_word(toks, V_RANGE, MASK, random.Random(77))
    c = random_word(toks, V_RANGE, MASK, random.Random(78))
    assert a == b and a != c


def test_mlm_bad_input():
    with pytest.raises(ValueError, match="empty"):
        random_word([], V_RANGE, MASK, random.Random(0))
    with pytest.raises(ValueError, match="rng"):
        random_word([1], V_RANGE, MASK, 0)
    with pytest.raises(ValueError, match="v_range"):
        random_word([1], (5, 5), MASK, random.Random(0))
    with pytest.raises(ValueError, match="mask_prob"):
        random_word([1], V_RANGE, MASK, random.Random(0), mask_prob=1.5)


def test_region_mask_rate_and_at_least_one():
    rng = random.Random(21)
    tot = sel = 0
    for _ in range(400):
        m = region_mask(100, 0.15, rng)
        assert m.dtype == torch.bool and m.shape == (100,)
        tot += 100
        sel += int(m.sum())
    assert abs(sel / tot - 0.15) < _binom_tol(0.15, tot)
    for n in (1, 2, 3, 9):
        for _ in range(200):
            assert int(region_mask(n, 0.15, rng).sum()) >= 1
    # prob 0: exactly one, chosen uniformly
    counts = [0, 0, 0]
    for _ in range(3000):
        m = region_mask(3, 0.0, rng)
        assert int(m.sum()) == 1
        counts[int(m.nonzero())] += 1
    assert all(abs(c / 3000 - 1 / 3) < _binom_tol(1 / 3, 3000) for c in counts)
    assert region_mask(1, 0.15, rng).tolist() == [True]
    with pytest.raises(ValueError, match="num_bb"):
        region_mask(0, 0.15, rng)


def test_mask_img_feat_targets_before_zeroing():
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(3, 5, 7, generator=g) + 0.5       # never zero
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, 1] = masks[0, 4] = masks[2, 0] = True
    masked, targets = mask_img_feat(feat, masks)
    assert targets.shape == (3, 7)
    torch.testing.assert_close(targets, torch.stack([feat[0, 1], feat[0, 4], feat[2, 0]]))
    assert (masked[masks] == 0).all()
    torch.testing.assert_close(masked[~masks], feat[~masks])
    assert (feat[masks] != 0).all(), "input must not be modified"
    for dtype in (torch.float16, torch.float32):
        m2, t2 = mask_img_feat(feat.to(dtype), masks)
        assert m2.dtype == t2.dtype == dtype
    soft = torch.rand(3, 5, 4, generator=g)
    torch.testing.assert_close(soft_label_targets(soft, masks),
                               torch.stack([soft[0, 1], soft[0, 4], soft[2, 0]]))
    with pytest.raises(ValueError, match="shape"):
        mask_img_feat(feat, masks[:, :4])


def test_img_mask_target():
    m = torch.tensor([False, True, True])
    t = img_mask_target(m, 4)
    assert t.dtype == torch.bool
    assert t.tolist() == [False] * 4 + [False, True, True]


@pytest.mark.parametrize("modality", ["text", "image", "none", None])
def test_conditional_mask_never_both(modality):
    rng = random.Random(8)
    seen = set()
    for _ in range(400):
        n_tok, nbb = rng.randrange(1, 12), rng.randrange(1, 10)
        toks = [rng.randrange(*V_RANGE) for _ in range(n_tok)]
        out = conditional_mask(toks, nbb, rng, v_range=V_RANGE, mask_id=MASK, modality=modality)
        txt_masked = any(lab != -1 for lab in out["txt_labels"])
        img_masked = bool(out["img_mask"].any())
        assert not (txt_masked and img_masked)
        if out["modality"] == "text":
            assert txt_masked and not img_masked
        elif out["modality"] == "image":
            assert img_masked and out["input_ids"] == toks
        else:
            assert not txt_masked and not img_masked and out["input_ids"] == toks
        assert out["img_mask"].shape == (nbb,)
        seen.add(out["modality"])
    if modality is None:
        assert seen == {"text", "image"}
    else:
        assert seen == {modality}


def test_conditional_mask_random_modality_is_balanced_and_seeded():
    rng = random.Random(5)
    n_text = sum(conditional_mask([2000, 2001], 3, rng, v_range=V_RANGE, mask_id=MASK)["modality"]
                 == "text" for _ in range(4000))
    assert abs(n_text / 4000 - 0.5) < _binom_tol(0.5, 4000)
    a = conditional_mask(list(range(2000, 2030)), 20, random.Random(9), v_range=V_RANGE,
                         mask_id=MASK)
    b = conditional_mask(list(range(2000, 2030)), 20, random.Random(9), v_range=V_RANGE,
                         mask_id=MASK)
    assert a["modality"] == b["modality"] and a["txt_labels"] == b["txt_labels"]
    assert torch.equal(a["img_mask"], b["img_mask"])
    with pytest.raises(ValueError, match="modality"):
        conditional_mask([1], 1, rng, v_range=V_RANGE, mask_id=MASK, modality="both")
