"""Invariants of the Hungarian matcher and the set criterion."""

import pytest
import torch
from torchvision.ops import box_convert

import cdetr


def random_outputs(B=3, Q=12, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(B, Q, C, generator=g),
            "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}


def random_targets(sizes, C=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        xy0 = torch.rand(n, 2, generator=g) * 0.6
        xy1 = xy0 + 0.05 + torch.rand(n, 2, generator=g) * 0.3
        targets.append({"labels": torch.randint(0, C, (n,), generator=g),
                        "boxes": box_convert(torch.cat([xy0, xy1], 1), "xyxy", "cxcywh")})
    return targets


def as_pairs(indices):
    return [sorted(zip(q.tolist(), t.tolist())) for q, t in indices]


def test_batched_equals_per_image():
    matcher = cdetr.HungarianMatcher()
    outputs, targets = random_outputs(), random_targets([4, 0, 7])
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])
        assert as_pairs(single) == as_pairs([batched[i]])


def test_permuting_targets_permutes_the_matching():
    matcher = cdetr.HungarianMatcher()
    outputs, targets = random_outputs(), random_targets([5, 3, 6])
    perms = [torch.randperm(len(t["labels"]), generator=torch.Generator().manual_seed(i)) for i, t in enumerate(targets)]
    permuted = [{k: v[p] for k, v in t.items()} for t, p in zip(targets, perms)]
    for (q, t), (q_p, t_p), p in zip(matcher(outputs, targets), matcher(outputs, permuted), perms):
        # permuted target j is original target p[j]
        assert sorted(zip(q.tolist(), t.tolist())) == sorted(zip(q_p.tolist(), p[t_p].tolist()))


def test_matching_is_one_to_one_and_complete():
    outputs, targets = random_outputs(Q=12), random_targets([12, 1, 5])
    for (q, t), target in zip(cdetr.HungarianMatcher()(outputs, targets), targets):
        assert len(q) == len(t) == len(target["labels"])
        assert len(set(q.tolist())) == len(q) and sorted(t.tolist()) == list(range(len(t)))
        assert q.tolist() == sorted(q.tolist())


def test_matcher_prefers_the_obvious_prediction():
    outputs = random_outputs(B=1, Q=6)
    target = random_targets([1])[0]
    outputs["pred_boxes"][0, 4] = target["boxes"][0]
    outputs["pred_logits"][0, 4, target["labels"][0]] = 8.0
    (q, t), = cdetr.HungarianMatcher()(outputs, [target])
    assert q.tolist() == [4] and t.tolist() == [0]


@pytest.mark.parametrize("sizes", [[0, 0, 0], [0, 2, 0]])
def test_empty_targets(sizes):
    cfg = cdetr.Config(num_classes=5, dec_layers=2)
    outputs = random_outputs()
    outputs["aux_outputs"] = [random_outputs(seed=3)]
    losses = cdetr.SetCriterion(cfg)(outputs, random_targets(sizes))
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
    if sum(sizes) == 0:
        assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_ce"] > 0
    assert [len(q) for q, _ in cdetr.HungarianMatcher()(outputs, random_targets(sizes))] == sizes


def test_label_out_of_range_is_a_clear_error():
    targets = random_targets([2, 1])
    targets[1]["labels"][0] = 5
    with pytest.raises(ValueError, match=r"target 1 has labels \[5\] outside \[0, 5\)"):
        cdetr.SetCriterion(cdetr.Config(num_classes=5))(random_outputs(), targets)


def test_loss_weights_and_aux_switch():
    cfg = cdetr.Config(num_classes=5)
    outputs = random_outputs()
    outputs["aux_outputs"] = [random_outputs(seed=s) for s in (3, 4)]
    targets = random_targets([3, 1, 2])
    losses = cdetr.SetCriterion(cfg)(outputs, targets)
    weighted = sum(w * losses[f"{k}{suffix}"] for k, w in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2))
                   for suffix in ("", "_0", "_1"))
    assert losses["loss"].item() == pytest.approx(weighted.item(), rel=1e-6)
    no_aux = cdetr.SetCriterion(cdetr.Config(num_classes=5, aux_loss=False))(outputs, targets)
    assert "loss_ce_0" not in no_aux
    assert no_aux["loss"].item() == pytest.approx(2 * losses["loss_ce"].item() + 5 * losses["loss_bbox"].item()
                                                  + 2 * losses["loss_giou"].item(), rel=1e-6)


def test_bfloat16_outputs_give_float32_losses():
    """Under --amp the model's outputs are bfloat16; matching and losses still run in float32."""
    cfg = cdetr.Config(num_classes=5)
    outputs = random_outputs()
    outputs["aux_outputs"] = [random_outputs(seed=3)]
    targets = random_targets([3, 0, 2])
    half = {"pred_logits": outputs["pred_logits"].bfloat16(), "pred_boxes": outputs["pred_boxes"].bfloat16(),
            "aux_outputs": [{k: v.bfloat16() for k, v in outputs["aux_outputs"][0].items()}]}
    exact, low = cdetr.SetCriterion(cfg)(outputs, targets), cdetr.SetCriterion(cfg)(half, targets)
    assert low["loss"].dtype == torch.float32
    assert low["loss"].item() == pytest.approx(exact["loss"].item(), rel=2e-2)
