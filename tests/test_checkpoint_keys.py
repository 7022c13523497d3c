"""Loading checkpoints whose keys do not match the model's exactly (issue 13, item 2):
``module.`` (DDP/DeepSpeed) prefixes, DeepSpeed's nested ``{"module": ...}``, BERT's
``bert.``, encoder-only and task state dicts with or without ``uniter.``, TF names, fp16 /
bf16 values; what is logged; and the error when the encoder itself is not loaded."""
import logging

import pytest
import torch

import uniter_fast
from uniter_fast import UniterConfig, UniterForPretraining, UniterModel
from uniter_fast.model import (
    UniterForNlvr2PairedAttn,
    UniterForVisualQuestionAnswering,
    load_checkpoint,
)
from uniter_fast.model.model import adapt_state_dict

IMG_DIM, LABEL_DIM, NUM_ANSWER = 24, 7, 9
LOGGER = "uniter_fast.model.model"


def cfg():
    return UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))


def random_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pretrained():
    """A pretraining state dict with distinct values in every tensor (tied pairs equal)."""
    torch.manual_seed(0)
    model = UniterForPretraining(cfg(), IMG_DIM, LABEL_DIM)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def encoder_equal(model, sd, prefix="uniter."):
    """Every ``uniter.*`` tensor of ``sd`` is in ``model`` under ``prefix``."""
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith("uniter."):
            mine = own[prefix + k[len("uniter."):]]
            assert torch.equal(mine, v.to(mine.dtype)), k


@pytest.mark.parametrize("wrap", ["plain", "module.", "module.module.", "nested", "nested+module."])
def test_pretraining_checkpoint_with_wrapper_prefixes(pretrained, wrap, caplog):
    sd = dict(pretrained)
    if "module." in wrap:
        p = "module.module." if wrap == "module.module." else "module."
        sd = {p + k: v for k, v in sd.items()}
    if wrap.startswith("nested"):
        sd = {"module": sd, "global_step": 3, "ds_version": "0.19"}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = UniterForPretraining.from_pretrained(cfg(), sd, IMG_DIM, LABEL_DIM)
    for k, v in model.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    n = len(pretrained)
    assert f"loaded {n} of {n} tensors" in caplog.text
    assert "not initialized" not in caplog.text


def test_report_and_tied_weights(pretrained):
    model = UniterForPretraining(cfg(), IMG_DIM, LABEL_DIM)
    sd = {k: v for k, v in pretrained.items()
          if k not in ("cls.predictions.decoder.weight", "feat_regress.weight")}
    rep = load_checkpoint(model, {"module." + k: v for k, v in sd.items()})
    assert rep.missing == [] and rep.unexpected == []   # tied twins count as loaded
    assert len(rep.loaded) == len(pretrained)
    assert rep.renamed["module.itm_output.bias"] == "itm_output.bias"
    assert torch.equal(model.cls.predictions.decoder.weight,
                       pretrained["uniter.embeddings.word_embeddings.weight"])


def test_task_model_from_pretraining_checkpoint_logs_head(pretrained, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = UniterForVisualQuestionAnswering.from_pretrained(
            cfg(), {"module." + k: v for k, v in pretrained.items()}, IMG_DIM, NUM_ANSWER)
    encoder_equal(model, pretrained)
    rep = load_checkpoint(model, pretrained)
    assert sorted(rep.missing) == sorted(k for k in model.state_dict() if k.startswith("vqa_output"))
    assert "cls.predictions.bias" in rep.unexpected and "itm_output.weight" in rep.unexpected
    assert "not initialized from pretrained model" in caplog.text and "vqa_output.3.weight" in caplog.text
    assert "not used in UniterForVisualQuestionAnswering" in caplog.text


def test_encoder_only_and_bare_encoder_directions(pretrained):
    # UniterModel's own state dict (no "uniter." prefix) into a task model
    torch.manual_seed(1)
    enc = UniterModel(cfg(), IMG_DIM)
    enc_sd = random_like(enc, 3)
    m = UniterForNlvr2PairedAttn.from_pretrained(cfg(), enc_sd, IMG_DIM)
    encoder_equal(m, {"uniter." + k: v for k, v in enc_sd.items()})
    # a task model's state dict (with "uniter.") into a bare UniterModel
    bare = UniterModel.from_pretrained(cfg(), pretrained, IMG_DIM)
    encoder_equal(bare, pretrained, prefix="")
    rep = load_checkpoint(bare, pretrained)
    assert rep.missing == [] and "itm_output.weight" in rep.unexpected


def test_bert_checkpoint(pretrained, caplog):
    """A BERT state dict (``bert.`` prefix, TF gamma/beta) has no image embeddings:
    those start random (and are reported), everything else loads."""
    bert = {}
    for k, v in pretrained.items():
        if k.startswith("uniter.img_embeddings."):
            continue
        k = k.replace("uniter.", "bert.", 1)
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        bert[k] = v
    bert["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = UniterForPretraining.from_pretrained(cfg(), bert, IMG_DIM, LABEL_DIM)
    own = model.state_dict()
    for k, v in pretrained.items():
        if not k.startswith("uniter.img_embeddings.") and k != "feat_regress.weight":
            assert torch.equal(own[k], v), k
    rep = load_checkpoint(model, bert)
    assert rep.exempt and all(k.startswith("uniter.img_embeddings.") for k in rep.exempt)
    assert rep.unexpected == ["cls.seq_relationship.weight"]
    assert "BERT checkpoint has no image embeddings" in caplog.text
    # and into a task model
    vqa = UniterForVisualQuestionAnswering.from_pretrained(cfg(), bert, IMG_DIM, NUM_ANSWER)
    assert torch.equal(vqa.uniter.encoder.layer[1].output.dense.weight,
                       pretrained["uniter.encoder.layer.1.output.dense.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint(pretrained, dtype):
    half = {k: v.to(dtype) for k, v in pretrained.items()}
    model = UniterForVisualQuestionAnswering.from_pretrained(cfg(), half, IMG_DIM, NUM_ANSWER)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    encoder_equal(model, {k: v.float() for k, v in half.items()})


def test_encoder_missing_is_an_error(pretrained):
    c = cfg()
    with pytest.raises(ValueError, match="empty state dict; pass state_dict=None"):
        UniterForVisualQuestionAnswering.from_pretrained(c, {}, IMG_DIM, NUM_ANSWER)
    # only heads
    heads = {k: v for k, v in pretrained.items() if not k.startswith("uniter.")}
    with pytest.raises(ValueError, match=r"does not provide the UNITER encoder: \d+ of \d+ encoder "
                                         r"tensors are missing: \['uniter.embeddings"):
        UniterForPretraining.from_pretrained(c, heads, IMG_DIM, LABEL_DIM)
    # an unknown prefix: nothing of the encoder matches
    foo = {"net." + k: v for k, v in pretrained.items()}
    with pytest.raises(ValueError, match=r"Checkpoint keys look like \['net.uniter.embeddings"):
        UniterForVisualQuestionAnswering.from_pretrained(c, foo, IMG_DIM, NUM_ANSWER)
    # one encoder tensor missing: named exactly
    one = dict(pretrained)
    del one["uniter.encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match=r"1 of \d+ encoder tensors are missing: "
                                         r"\['uniter.encoder.layer.1.attention.self.key.bias'\]"):
        UniterForVisualQuestionAnswering.from_pretrained(c, one, IMG_DIM, NUM_ANSWER)
    # opt out (e.g. a deliberate partial load) still loads what there is
    m = UniterForVisualQuestionAnswering(c, IMG_DIM, NUM_ANSWER)
    rep = load_checkpoint(m, one, require_encoder=False)
    assert rep.missing[:1] == ["uniter.encoder.layer.1.attention.self.key.bias"]


def test_random_start_is_explicit(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = UniterForVisualQuestionAnswering.from_pretrained(cfg(), None, IMG_DIM, NUM_ANSWER)
    assert isinstance(m, UniterForVisualQuestionAnswering)
    assert "no checkpoint given" in caplog.text


def test_malformed_checkpoints(pretrained):
    c = cfg()
    both = dict(pretrained)
    both["module.itm_output.bias"] = both["itm_output.bias"]
    with pytest.raises(ValueError, match="'itm_output.bias' and 'module.itm_output.bias' both map"):
        UniterForPretraining.from_pretrained(c, both, IMG_DIM, LABEL_DIM)
    with pytest.raises(ValueError, match="key 'step' holds a int, not a tensor"):
        UniterForPretraining.from_pretrained(c, {**pretrained, "step": 3}, IMG_DIM, LABEL_DIM)
    with pytest.raises(ValueError, match="must be a state dict"):
        UniterForPretraining.from_pretrained(c, [1, 2], IMG_DIM, LABEL_DIM)
    bad = dict(pretrained)
    bad["uniter.pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"size mismatch for uniter.pooler.dense.weight: copying "
                                           r"a param with shape \(3, 3\)"):
        UniterForPretraining.from_pretrained(c, bad, IMG_DIM, LABEL_DIM)


def test_finetuned_nlvr2_checkpoint_hint():
    c = cfg()
    ft = UniterForNlvr2PairedAttn(c, IMG_DIM)
    ft.init_type_embedding()
    sd = ft.state_dict()
    with pytest.raises(RuntimeError, match="call init_type_embedding"):
        UniterForNlvr2PairedAttn.from_pretrained(c, sd, IMG_DIM)
    fresh = UniterForNlvr2PairedAttn(c, IMG_DIM)
    fresh.init_type_embedding()
    rep = load_checkpoint(fresh, {"module." + k: v for k, v in sd.items()})
    assert rep.missing == [] and rep.unexpected == []


def test_adapt_state_dict_keeps_head_keys():
    m = UniterForVisualQuestionAnswering(cfg(), IMG_DIM, NUM_ANSWER)
    sd = {"module.vqa_output.0.weight": torch.zeros(1), "bert.pooler.dense.bias": torch.zeros(1),
          "encoder.layer.0.output.dense.bias": torch.zeros(1), "other.thing": torch.zeros(1)}
    adapted, renamed, from_bert = adapt_state_dict(sd, m)
    assert list(adapted) == ["vqa_output.0.weight", "uniter.pooler.dense.bias",
                             "uniter.encoder.layer.0.output.dense.bias", "other.thing"]
    assert from_bert and "other.thing" not in renamed
