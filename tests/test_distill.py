"""Distillation levels and TGI on constructed outputs: zero on identity, matching, anchors, adapters."""
import pytest
import torch
from torch import nn

from training import matcher
from training.distill import (
    DistillConfig,
    Distiller,
    distillation_loss,
    encoder_alignment_loss,
    sample_anchors,
)
from training.tgi import freeze_teacher, teacher_guided_init


def fake_outputs(seed, batch=2, queries=12, refines=(1, 4), dims=8, channels=6, classes=11):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for r in refines:
        points = torch.rand(batch, queries, r, 3, generator=g)
        layers.append({"points": points, "logits": torch.randn(batch, queries, r, classes, generator=g),
                       "centers": points.mean(2), "query_features": torch.randn(batch, queries, dims, generator=g)})
    feats = [torch.randn(batch, channels, 8 // 2**i, 8 // 2**i, generator=g) for i in range(2)]
    return {"features": feats, "layers": layers}


def permute(out, perm):
    layers = [{k: v[:, perm] for k, v in layer.items()} for layer in out["layers"]]
    return {"features": out["features"], "layers": layers}


def full_inputs(student, teacher, student_prior=None):
    s = dict(student, prior_layers=(student_prior or student)["layers"], anchor_layers=student["layers"])
    t = dict(teacher, anchor_layers=teacher["layers"])
    return s, t


def make_distiller(cfg=None, sc=6, tc=6, sd=8, td=8):
    return Distiller(cfg or DistillConfig(), sc, tc, 2, sd, td)


def test_identical_teacher_and_student_give_zero_distillation_loss():
    out = fake_outputs(0)
    for variant in ("cfd", "fld"):
        terms = make_distiller(DistillConfig(query_variant=variant))(*full_inputs(out, out))
        assert set(terms) == {"efa", "query", "prior", "anchor", "distill"}
        for name, value in terms.items():
            assert value.abs().item() < 1e-6, (variant, name, value)


def test_permuted_student_gives_zero_query_level_loss_after_matching():
    teacher = fake_outputs(1)
    student = permute(teacher, torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    d = make_distiller()
    assert d.query_level_loss(student["layers"], teacher["layers"]).item() < 1e-6
    # without matching (index by index, as the prior level does) the same pair is far from zero
    assert d.prior_level_loss(student["layers"], teacher["layers"]).item() > 0.1
    fld = make_distiller(DistillConfig(query_variant="fld"))
    assert fld.query_level_loss(student["layers"], teacher["layers"]).item() < 1e-6


def test_hungarian_match_recovers_permutation_and_counts_time():
    c = torch.rand(30, 3)
    perm = torch.randperm(30)
    matcher.stats.reset()
    si, ti = matcher.hungarian_match(c[perm], c)
    assert torch.equal(perm[si], ti) and matcher.stats.calls == 1


def test_distance_grows_query_loss_and_gradients_flow():
    teacher = fake_outputs(4)
    student = fake_outputs(5)
    for layer in student["layers"]:
        layer["centers"].requires_grad_()
        layer["query_features"].requires_grad_()
    terms = make_distiller()(*full_inputs(student, teacher))
    assert all(v.item() > 0 for v in terms.values())
    terms["distill"].backward()
    assert student["layers"][0]["centers"].grad.abs().sum() > 0


def test_lambdas_and_switches_combine_by_eq10():
    terms = {"efa": torch.tensor(1.0), "query": torch.tensor(2.0), "prior": torch.tensor(3.0), "anchor": torch.tensor(4.0)}
    assert distillation_loss(terms, [1, 0.2, 0.2, 0.5]).item() == pytest.approx(1 + 0.4 + 0.6 + 2.0)
    teacher, student = fake_outputs(6), fake_outputs(7)
    only_prior = make_distiller(DistillConfig(efa=False, query=False, anchor=False))(*full_inputs(student, teacher))
    assert set(only_prior) == {"prior", "distill"}
    assert only_prior["distill"].item() == pytest.approx(0.2 * only_prior["prior"].item())
    with pytest.raises(ValueError, match="lambdas"):
        DistillConfig(lambdas=[1, 2]).validate()


def test_efa_adapter_and_projection_for_different_widths():
    teacher = fake_outputs(8, dims=16, channels=10)
    student = fake_outputs(9, dims=8, channels=6)
    d = make_distiller(sc=6, tc=10, sd=8, td=16)
    assert d.adapters is not None and isinstance(d.project, nn.Linear)
    terms = d(*full_inputs(student, teacher))
    terms["distill"].backward()
    assert d.adapters[0].weight.grad is not None and d.project.weight.grad is not None
    with pytest.raises(ValueError, match="channels"):
        encoder_alignment_loss(student["features"], teacher["features"])
    # a teacher map of another spatial size is resized; identical content gives zero
    big = [torch.nn.functional.interpolate(f, scale_factor=2, mode="nearest") for f in student["features"]]
    assert encoder_alignment_loss(student["features"], big).item() < 1e-10


def test_anchor_sampling_respects_class_weights():
    grid = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    grid[0, :5] = 2   # 500 voxels of class 2
    grid[0, 5:, :5] = 7  # 250 voxels of class 7
    weights = torch.ones(11)
    weights[6] = 4.0  # class 7 four times heavier per voxel
    anchors, keep = sample_anchors(grid, 20000, weights, torch.Generator().manual_seed(0))
    assert keep.tolist() == [0] and anchors.shape == (1, 20000, 3)
    idx = (anchors[0] * 10 - 0.5).round().long()
    labels = grid[0][idx[:, 0], idx[:, 1], idx[:, 2]]
    share7 = (labels == 7).float().mean().item()
    assert share7 == pytest.approx(250 * 4 / (250 * 4 + 500), abs=0.02)  # 2/3
    assert set(labels.unique().tolist()) == {2, 7}


def test_anchor_sampling_small_and_empty_scenes():
    grid = torch.zeros(3, 6, 6, 6, dtype=torch.uint8)
    grid[0, 1, 1, 1] = 3  # one voxel: sampled with replacement
    grid[2, 0, 0, :] = 255  # only unknown: skipped like an empty scene
    anchors, keep = sample_anchors(grid, 50, torch.ones(11), torch.Generator().manual_seed(0))
    assert keep.tolist() == [0] and anchors.shape == (1, 50, 3)
    assert torch.allclose(anchors[0], torch.full((50, 3), 1.5 / 6))
    none, keep = sample_anchors(torch.zeros(2, 6, 6, 6), 5, torch.ones(11))
    assert none is None and keep.numel() == 0
    teacher = fake_outputs(10)
    s = dict(teacher, prior_layers=teacher["layers"], anchor_layers=None)
    terms = make_distiller()(s, dict(teacher, anchor_layers=None))
    assert "anchor" not in terms and torch.isfinite(terms["distill"])


class TinyNet(nn.Module):
    def __init__(self, width=4, dec=3):
        super().__init__()
        self.backbone = nn.Linear(3, width)
        self.query_init = nn.Embedding(5, 3)
        self.decoder = nn.Sequential(nn.Linear(dec, dec), nn.LayerNorm(dec))


def test_tgi_copies_decoder_exactly_and_nothing_else():
    teacher, student = TinyNet(width=8), TinyNet(width=4)
    before_backbone = student.backbone.weight.clone()
    before_init = student.query_init.weight.clone()
    assert teacher_guided_init(student, teacher) == 4
    for k, v in teacher.decoder.state_dict().items():
        assert torch.equal(student.decoder.state_dict()[k], v)
    assert torch.equal(student.backbone.weight, before_backbone)
    assert torch.equal(student.query_init.weight, before_init)
    student.decoder[0].weight.data.add_(1.0)  # a copy, not shared storage
    assert not torch.equal(student.decoder[0].weight, teacher.decoder[0].weight)


def test_tgi_rejects_mismatch_with_key_names():
    with pytest.raises(ValueError, match=r"0\.weight.*\(3, 3\).*\(5, 5\)"):
        teacher_guided_init(TinyNet(dec=3), TinyNet(dec=5))
    other = TinyNet()
    other.decoder = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="only in the student decoder.*1.weight"):
        teacher_guided_init(TinyNet(), other)


def test_freeze_teacher():
    t = freeze_teacher(TinyNet().train())
    assert not t.training and not any(p.requires_grad for p in t.parameters())
