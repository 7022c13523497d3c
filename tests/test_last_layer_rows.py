"""The encoder's last layer computes only the rows the heads read
(``UniterEncoder.prune_last_layer``): every pretraining and fine-tuning model gives the
same outputs and gradients with it on and off (off = UNITER's computation: the whole last
layer, then the selection), and with it on the last layer's feed-forward block really runs
on fewer rows."""
import pytest
import torch
from batches import make_batch
from test_compile import MODEL_CASES, _step

import uniter_fast
from uniter_fast import UniterConfig, UniterForPretraining
from uniter_fast.model.model import UniterEncoder


def _full(case):
    """MODEL_CASES builds one-layer encoders: the same case with two layers, so the
    pruned layer is not the first (its input rows come from a layer that ran on every
    position)."""
    model, args, kwargs = MODEL_CASES[case]()
    enc = model.uniter.encoder
    enc.layer.append(type(enc.layer[0])(model.uniter.config))
    enc.layer[-1].load_state_dict(enc.layer[0].state_dict())
    with torch.no_grad():
        for p in enc.layer[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc.layer[-1].train(model.training)
    for m in model.modules():     # no dropout: the pruned layer draws fewer random numbers
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model, args, kwargs


def _ffn_rows(model):
    """The number of rows the last layer's feed-forward block ran on, per forward."""
    seen = []
    hook = model.uniter.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].size(-1)).size(0)))
    return seen, hook


def _compare(model, args, kwargs, rtol, atol):
    torch.manual_seed(3)
    model.uniter.encoder.prune_last_layer = False
    seen_full, hook = _ffn_rows(model)
    ref_out, ref_grad = _step(model, args, kwargs)
    hook.remove()
    model.uniter.encoder.prune_last_layer = True
    seen, hook = _ffn_rows(model)
    out, grad = _step(model, args, kwargs)
    hook.remove()
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert grad.keys() == ref_grad.keys()
    for k in ref_grad:
        torch.testing.assert_close(grad[k], ref_grad[k], rtol=rtol, atol=atol, msg=k)
    return seen, seen_full


#: the models whose heads read every position of the last layer (nothing to prune)
READ_ALL = {"pretrain-itm", "answer-paired-attn", "re-cls", "re-rank"}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_pruned_last_layer_equals_the_whole_layer(case):
    model, args, kwargs = _full(case)
    seen, seen_full = _compare(model, args, kwargs, rtol=1e-5, atol=1e-6)
    assert len(seen) == len(seen_full) >= 1
    if case in READ_ALL:
        assert seen == seen_full
    else:
        # the pruned layer's feed-forward ran on the rows the heads read only
        assert sum(seen) < sum(seen_full), (seen, seen_full)


def _pretrain(task, txt, nbb, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    model = UniterForPretraining(cfg, 24, 7).eval()
    with torch.no_grad():   # non-zero biases: a zero-filled (masked) region is not a
        for p in model.parameters():   # constant row (whose LayerNorm backward overflows fp16)
            p.add_(0.02 * torch.randn_like(p))
    model = model.to(dtype)
    batch = make_batch(task, cfg.vocab_size, 24, 7, txt, nbb,
                       gen=torch.Generator().manual_seed(seed + 1))
    for k in ("img_feat", "img_pos_feat", "feat_targets", "label_targets"):
        if k in batch:
            batch[k] = batch[k].to(dtype)
    return model, batch


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc-kl", "mrc"])
@pytest.mark.parametrize("sizes", [([1], [1]), ([9], [13]), ([2, 17, 5], [30, 1, 7])])
def test_awkward_sizes(task, sizes):
    model, batch = _pretrain(task, *sizes)
    seen, full = _compare(model, (batch, task), {}, rtol=1e-5, atol=1e-6)
    rows = int((batch["txt_labels"] != -1).sum()) if task == "mlm" else \
        int(batch["img_mask_tgt"].bool().sum())
    assert seen == [rows] and full == [batch["attn_masks"].numel()]


def test_no_masked_rows():
    """A batch with nothing masked: zero rows through the pruned layer, empty losses,
    zero gradients for the last layer's feed-forward block (as the whole layer gives)."""
    model, batch = _pretrain("mlm", [4, 6], [3, 5])
    batch["txt_labels"].fill_(-1)
    torch.manual_seed(0)
    model.uniter.encoder.prune_last_layer = True
    loss = model(batch, "mlm")
    assert loss.shape == (0,)
    model.uniter.encoder.prune_last_layer = False
    assert model(batch, "mlm").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    for task in ("mlm", "mrfr"):
        model, batch = _pretrain(task, [3, 8, 5], [6, 2, 9], dtype=dtype)
        _compare(model, (batch, task), {}, rtol=2e-2, atol=2e-3)


def test_output_rows_needs_the_last_layer_only():
    model, batch = _pretrain("mlm", [3], [2])
    with pytest.raises(ValueError, match="output_all_encoded_layers=False"):
        model.uniter(batch["input_ids"], batch["position_ids"], batch["img_feat"],
                     batch["img_pos_feat"], batch["attn_masks"], batch["gather_index"],
                     output_all_encoded_layers=True, output_rows=torch.tensor([0]))


def test_default_is_on():
    assert UniterEncoder.prune_last_layer is True
