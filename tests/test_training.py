"""Training behaviour of the model and criterion: gradients reach every parameter (every
ablation too), a small model of either decoder overfits one batch, learned reference points train."""

import copy

import pytest
import torch
from torchvision.ops import box_convert, box_iou

import cdetr
from test_model import ABLATIONS, tiny_config


def two_synthetic_images(size=64):
    """Two images with bright rectangles on a dark noisy background, and their targets."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=g) * 0.2
    boxes_px = [torch.tensor([[8., 10, 30, 40], [36, 20, 60, 56]]), torch.tensor([[20., 16, 48, 44]])]
    targets = []
    for i, boxes in enumerate(boxes_px):
        for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            images[i, j % 3, y0:y1, x0:x1] = 1.0
        targets.append({"labels": torch.arange(1, len(boxes) + 1),
                        "boxes": box_convert(boxes / size, "xyxy", "cxcywh")})
    return images, torch.zeros(2, size, size, dtype=torch.bool), targets


@pytest.mark.parametrize("overrides", [dict(decoder="conditional"), dict(decoder="detr"), *ABLATIONS],
                         ids=lambda o: "-".join(o.values()))
def test_every_trainable_parameter_gets_a_gradient(overrides):
    """A parameter the forward pass never uses (say a stray ca_qpos_proj in a later
    conditional layer) would be left with grad None; so, for every ablation."""
    torch.manual_seed(0)
    cfg = tiny_config(dec_layers=3, **overrides)
    model = cdetr.ConditionalDETR(cfg)
    images, mask, targets = two_synthetic_images()
    cdetr.SetCriterion(cfg)(model(images, mask), targets)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_official_backbone_training_choice():
    model = cdetr.ConditionalDETR(cdetr.preset("r50"))
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


@pytest.mark.parametrize("decoder", ["conditional", "detr-offset", "detr"])
def test_small_model_overfits_one_batch(decoder):
    """Both decoders can fit two images: the DETR-style baseline's slow start on real data is
    not a broken model."""
    torch.manual_seed(0)
    cfg = tiny_config(hidden_dim=64, enc_layers=1, dim_feedforward=128, num_queries=10, decoder=decoder)
    model, criterion = cdetr.ConditionalDETR(cfg), cdetr.SetCriterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images, mask, targets = two_synthetic_images()
    for step in range(100):     # all three pass from step 60 on (loss / 20, IoU 0.91 and up)
        losses = criterion(model(images, mask), targets)
        if step == 0:
            first_loss = losses["loss"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    with torch.no_grad():   # still in train mode: BatchNorm uses this batch's statistics
        outputs = model(images, mask)
    assert criterion(outputs, targets)["loss"].item() < first_loss / 10
    for i, (q, t) in enumerate(criterion.matcher(outputs, targets)):
        predicted = box_convert(outputs["pred_boxes"][i, q], "cxcywh", "xyxy")
        expected = box_convert(targets[i]["boxes"][t], "cxcywh", "xyxy")
        assert (box_iou(predicted, expected).diag() > 0.9).all()
        assert (outputs["pred_logits"][i, q].argmax(-1) == targets[i]["labels"][t]).all()


def test_learned_reference_points_are_parameters_that_train():
    torch.manual_seed(0)
    cfg = tiny_config(reference_point="learned")
    model, criterion = cdetr.ConditionalDETR(cfg), cdetr.SetCriterion(cfg)
    before = model.decoder.ref_point.detach().clone()
    assert "decoder.ref_point" in dict(model.named_parameters()) and before.shape == (cfg.num_queries, 2)
    assert before.sigmoid().std() > 0.15                 # spread over the image, not all at one point
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, mask, targets = two_synthetic_images()
    for _ in range(3):
        optimizer.zero_grad()
        criterion(model(images, mask), targets)["loss"].backward()
        optimizer.step()
    assert (model.decoder.ref_point - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(images, mask)["reference_points"][1], model.decoder.ref_point.sigmoid())


def four_images_with_unequal_boxes(size=64):
    """Four images holding 1, 4, 2 and 3 boxes: micro-batches of two then hold 5 and 5 boxes
    in one order and 3 and 7 in another, so a per-batch normalisation weighs them wrongly."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, size, size, generator=g)
    targets = []
    for count in (1, 4, 2, 3):
        xy = torch.rand(count, 2, generator=g) * 0.5 + 0.1
        wh = torch.rand(count, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, 4, (count,), generator=g), "boxes": torch.cat([xy + wh / 2, wh], 1)})
    return images, torch.zeros(4, size, size, dtype=torch.bool), targets


def gradients_and_step(model, batches, how):
    """Gradients of one optimizer step over `batches`, and the weights after an AdamW step."""
    import train
    model = copy.deepcopy(model)
    criterion = cdetr.SetCriterion(model.cfg)
    if how == "train.py":
        train.forward_backward(model, criterion, batches, torch.device("cpu"))
    else:   # the naive way: each batch's loss divided by its own boxes, then averaged
        for images, mask, targets in batches:
            (criterion(model(images, mask), targets)["loss"] / len(batches)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4).step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 2, 1, 3]], ids=["5+5 boxes", "3+7 boxes"])
def test_gradient_accumulation_equals_one_big_batch(order):
    """--gradient-accumulation-steps 2 with batches of 2 images makes the step of one batch of
    4: gradients and updated weights (frozen BatchNorm, dropout 0, auxiliary losses on). A
    per-batch normalisation does not, once the two batches hold different numbers of boxes."""
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(tiny_config(frozen_batchnorm=True, dec_layers=3, aux_loss=True))
    images, mask, targets = four_images_with_unequal_boxes()
    whole = [(images, mask, targets)]
    halves = [(images[order[k:k + 2]], mask[order[k:k + 2]], [targets[i] for i in order[k:k + 2]]) for k in (0, 2)]
    big_grads, big_weights = gradients_and_step(model, whole, "train.py")
    grads, weights = gradients_and_step(model, halves, "train.py")
    assert big_grads.keys() == grads.keys() and len(grads) == sum(p.requires_grad for p in model.parameters())
    significant = []
    for name in grads:
        torch.testing.assert_close(grads[name], big_grads[name], rtol=1e-4, atol=1e-7)
        # Adam's first step is lr * g / (|g| + eps), about lr * sign(g) (lr 1e-4), whatever |g| is. Where a
        # gradient is zero in exact arithmetic (the self-attention key biases, which softmax ignores), its
        # sign is rounding noise, which differs between CPU kernels (AMX, AVX2): there the step may go either
        # way, by at most lr. Where the gradient is well above that noise, the steps must agree.
        signal = big_grads[name].abs() > 1e-5
        torch.testing.assert_close(weights[name][signal], big_weights[name][signal], rtol=1e-5, atol=5e-6)
        assert ((weights[name] - big_weights[name]).abs() <= 2e-4 + 1e-6).all()
        significant.append(signal.float().mean().item())
    assert sum(significant) / len(significant) > 0.5     # most of every update is judged, not skipped
    naive, _ = gradients_and_step(model, halves, "naive")
    if order == [0, 1, 2, 3]:     # equal box counts: the naive way is right by luck
        for name in grads:
            torch.testing.assert_close(naive[name], big_grads[name], rtol=1e-4, atol=1e-7)
    else:
        worst = max(((naive[n] - big_grads[n]).norm() / big_grads[n].norm()).item() for n in grads
                    if big_grads[n].norm() > 1e-6)
        assert worst > 0.05
