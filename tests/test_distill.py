"""Distillation levels and TGI on constructed outputs: every term by hand with the reference's reductions
and weights, zero on identity, matching in metres, anchors, adapters, the one weight table."""
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import models
from training import matcher
from training.distill import (
    DistillConfig,
    Distiller,
    encoder_alignment_loss,
    sample_anchors,
)
from training.losses import TaskLoss
from training.tgi import freeze_teacher, teacher_guided_init
from training.trainer import loss_weights, weighted_terms

EXTENT = (4.8, 4.8, 2.88)
CFD_TERMS = {"efa", "query_center", "query_feature", "prior_center", "prior_feature", "anchor_center", "anchor_feature"}


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
    for variant, names in (("cfd", CFD_TERMS),
                           ("fld", CFD_TERMS - {"query_center", "query_feature"} | {"query_points", "query_logits"})):
        terms = make_distiller(DistillConfig(query_variant=variant))(*full_inputs(out, out))
        assert set(terms) == names
        for name, value in terms.items():
            assert value.abs().item() < 1e-6, (variant, name, value)


def test_weight_table_is_lambda_times_inner_weight_once():
    d = make_distiller()
    assert d.weight_dict() == pytest.approx({"efa": 1.0, "query_center": 0.6, "query_feature": 0.4,
                                             "prior_center": 0.6, "prior_feature": 0.4,
                                             "anchor_center": 1.5, "anchor_feature": 1.0})
    table = loss_weights(TaskLoss(), 2, d)
    assert table["chamfer_1"] == 0.5 and table["focal_0"] == 2.0 and table["anchor_center"] == pytest.approx(1.5)
    terms = {"efa": torch.tensor(2.0), "query_center": torch.tensor(10.0), "chamfer_init": torch.tensor(4.0)}
    weighted = weighted_terms(terms, table)
    assert {k: v.item() for k, v in weighted.items()} == pytest.approx({"efa": 2.0, "query_center": 6.0,
                                                                         "chamfer_init": 2.0})
    with pytest.raises(KeyError, match="query_extra"):
        weighted_terms({"query_extra": torch.tensor(1.0)}, table)


def normalised(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def sq_dist(a, b):
    return sum((x - y) ** 2 for x, y in zip(normalised(a), normalised(b), strict=True))


def test_efa_by_hand_sums_channels_and_averages_pixels():
    # two levels: (B=1, C=2, 1x2) and (B=1, C=2, 1x1)
    s0, t0 = [[3.0, 1.0], [4.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]
    s1, t1 = [[1.0], [0.0]], [[0.0], [2.0]]
    student = [torch.tensor(s0).view(1, 2, 1, 2), torch.tensor(s1).view(1, 2, 1, 1)]
    teacher = [torch.tensor(t0).view(1, 2, 1, 2), torch.tensor(t1).view(1, 2, 1, 1)]
    pixel = [sq_dist([s0[0][i], s0[1][i]], [t0[0][i], t0[1][i]]) for i in range(2)]
    expected = sum(pixel) / 2 + sq_dist([1.0, 0.0], [0.0, 2.0])  # (0.8 ...) / 2 + 2.0
    assert encoder_alignment_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def layer(centers, feats):
    c = torch.tensor(centers).unsqueeze(0)  # (1, Q, 3) normalised
    return {"centers": c, "points": c.unsqueeze(2), "logits": torch.zeros(1, c.shape[1], 1, 11),
            "query_features": torch.tensor(feats).unsqueeze(0)}


def metres(p):
    return [x * e for x, e in zip(p, EXTENT, strict=True)]


def l1(a, b):
    return sum(abs(x - y) for x, y in zip(metres(a), metres(b), strict=True))


# Hungarian matching in normalised units pairs (s0, t0), (s1, t1); in metres it pairs (s0, t1), (s1, t0).
S_C = [[0.7, 0.9, 0.9], [0.9, 0.6, 0.1]]
T_C = [[0.5, 0.2, 0.0], [0.9, 0.9, 0.0]]
S_F = [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]
T_F = [[2.0, 2.0, 0.0], [1.0, 0.0, 1.0]]


def test_query_level_by_hand_matches_in_metres():
    d = make_distiller(sd=3, td=3)
    center, feature = d.query_level_loss([layer(S_C, S_F)], [layer(T_C, T_F)])
    assert center.item() == pytest.approx((l1(S_C[0], T_C[1]) + l1(S_C[1], T_C[0])) / 2, rel=1e-5)
    assert feature.item() == pytest.approx((sq_dist(S_F[0], T_F[1]) + sq_dist(S_F[1], T_F[0])) / 2, rel=1e-5)
    by_index = (l1(S_C[0], T_C[0]) + l1(S_C[1], T_C[1])) / 2
    assert center.item() < by_index  # the normalised-unit matching would have kept this worse pairing


def test_prior_and_anchor_levels_by_hand_index_by_index_summed_over_layers():
    d = make_distiller(sd=3, td=3)
    student = [layer(S_C, S_F), layer(T_C, S_F)]
    teacher = [layer(T_C, T_F), layer(T_C, T_F)]
    center_0 = (l1(S_C[0], T_C[0]) + l1(S_C[1], T_C[1])) / 2  # layer 1 has equal centres
    feature_0 = (sq_dist(S_F[0], T_F[0]) + sq_dist(S_F[1], T_F[1])) / 2
    for level in (d.prior_level_loss, d.anchor_level_loss):
        center, feature = level(student, teacher)
        assert center.item() == pytest.approx(center_0, rel=1e-5)
        assert feature.item() == pytest.approx(2 * feature_0, rel=1e-5)


def test_permuted_student_gives_zero_query_level_loss_after_matching():
    teacher = fake_outputs(1)
    student = permute(teacher, torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    d = make_distiller()
    assert sum(d.query_level_loss(student["layers"], teacher["layers"])).item() < 1e-6
    # without matching (index by index, as the prior level does) the same pair is far from zero
    assert sum(d.prior_level_loss(student["layers"], teacher["layers"])).item() > 0.1
    fld = make_distiller(DistillConfig(query_variant="fld"))
    assert sum(fld.query_level_loss(student["layers"], teacher["layers"])).item() < 1e-6


def test_hungarian_match_recovers_permutation_and_counts_time():
    c = torch.rand(30, 3)
    perm = torch.randperm(30)
    matcher.stats.reset()
    si, ti = matcher.hungarian_match(c[perm], c)
    assert torch.equal(perm[si], ti) and matcher.stats.calls == 1


def test_match_batch_is_per_sample_matching_on_a_thread_pool():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.rand(5, 20, 3, generator=g), torch.rand(5, 16, 3, generator=g)
    matcher.stats.reset()
    pairs = matcher.match_batch(student, teacher)
    assert matcher.stats.calls == 5
    for (si, ti), s, t in zip(pairs, student, teacher, strict=True):
        ref_s, ref_t = linear_sum_assignment(torch.cdist(s, t).numpy())  # the sample on its own, by scipy
        assert si.tolist() == ref_s.tolist() and ti.tolist() == ref_t.tolist() and si.numel() == 16
    assert matcher.match_batch(student[:0], teacher[:0]) == []
    one = matcher.match_batch(student[:1], teacher[:1])
    assert torch.equal(one[0][1], pairs[0][1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        matcher.match_batch(student, teacher[:2])
    with pytest.raises(ValueError, match=r"\(B,N,D\)"):
        matcher.match_batch(student[0], teacher[0])


def test_query_level_loss_matches_every_layer_as_one_batch():
    """The layers' matchings are solved together; the loss equals matching layer by layer, sample by sample."""
    teacher, student = fake_outputs(11, batch=3), fake_outputs(12, batch=3)
    d = make_distiller()
    center, feature = d.query_level_loss(student["layers"], teacher["layers"])
    ref_c, ref_f = 0.0, 0.0
    for s, t in zip(student["layers"], teacher["layers"], strict=True):
        pairs = [matcher.hungarian_match(d.metres(a), d.metres(b)) for a, b in zip(s["centers"], t["centers"], strict=True)]
        b_s = torch.cat([torch.full_like(si, b) for b, (si, _) in enumerate(pairs)])
        c, f = d._pairs(s, t, (b_s, torch.cat([si for si, _ in pairs])), (b_s, torch.cat([ti for _, ti in pairs])))
        ref_c, ref_f = ref_c + c, ref_f + f
    torch.testing.assert_close(center, ref_c)
    torch.testing.assert_close(feature, ref_f)


def test_distance_grows_query_loss_and_gradients_flow():
    teacher = fake_outputs(4)
    student = fake_outputs(5)
    for out_layer in student["layers"]:
        out_layer["centers"].requires_grad_()
        out_layer["query_features"].requires_grad_()
    terms = make_distiller()(*full_inputs(student, teacher))
    assert all(v.item() > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert student["layers"][0]["centers"].grad.abs().sum() > 0


def test_switches_select_terms_and_lambdas_validate():
    teacher, student = fake_outputs(6), fake_outputs(7)
    only_prior = make_distiller(DistillConfig(efa=False, query=False, anchor=False))(*full_inputs(student, teacher))
    assert set(only_prior) == {"prior_center", "prior_feature"}
    with pytest.raises(ValueError, match="lambdas"):
        DistillConfig(lambdas=[1, 2]).validate()


def test_efa_adapter_and_projection_for_different_widths():
    teacher = fake_outputs(8, dims=16, channels=10)
    student = fake_outputs(9, dims=8, channels=6)
    d = make_distiller(sc=6, tc=10, sd=8, td=16)
    assert d.adapters is not None and isinstance(d.project, nn.Linear)
    terms = d(*full_inputs(student, teacher))
    sum(terms.values()).backward()
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
    assert "anchor_center" not in terms and all(torch.isfinite(v) for v in terms.values())


def test_anchor_sampling_draws_each_scene_from_its_own_voxels_in_one_batch():
    """Scenes with and without replacement in one batch; every anchor of a scene lies on an occupied voxel of it."""
    grid = torch.zeros(3, 8, 6, 4, dtype=torch.uint8)
    grid[0, :4] = 2                # 96 voxels: drawn without replacement
    grid[1, 7, 5, 3] = 5           # one voxel: with replacement
    grid[2, 4:, 3:, :2] = 9        # 24 voxels: with replacement (30 anchors)
    anchors, keep = sample_anchors(grid, 30, torch.ones(11), torch.Generator().manual_seed(1))
    assert keep.tolist() == [0, 1, 2] and anchors.shape == (3, 30, 3)
    ijk = (anchors * torch.tensor([8.0, 6.0, 4.0]) - 0.5).round().long()
    for b in range(3):
        labels = grid[b][ijk[b, :, 0], ijk[b, :, 1], ijk[b, :, 2]]
        assert (labels == grid[b].max()).all()
    assert len({tuple(v) for v in ijk[0].tolist()}) == 30  # without replacement: 30 distinct voxels
    again, _ = sample_anchors(grid, 30, torch.ones(11), torch.Generator().manual_seed(1))
    assert torch.equal(anchors, again)


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


def test_tgi_into_a_depth_student_copies_all_but_its_depth_branch():
    """The miniature DiScene-dagger: a lite student with a depth branch under the RGB lite teacher."""
    from training.train_config import load_train_config

    student = models.build_model(load_train_config("lite_student", ["model_overrides.use_depth=true"]).model_config())
    teacher = models.build_model(load_train_config("lite_teacher").model_config())
    depth_before = {k: v.clone() for k, v in student.decoder.state_dict().items() if "depth_branch." in k}
    with pytest.raises(ValueError, match="only in the student decoder.*depth_branch"):
        teacher_guided_init(student, teacher)  # strict unless asked
    assert teacher_guided_init(student, teacher, keep_student_depth=True) == len(teacher.decoder.state_dict())
    mine = student.decoder.state_dict()
    assert len(depth_before) == 12 and all(torch.equal(mine[k], v) for k, v in depth_before.items())
    assert all(torch.equal(mine[k], v) for k, v in teacher.decoder.state_dict().items())
    with pytest.raises(ValueError, match="only in the teacher decoder"):  # only the student's depth may be missing
        teacher_guided_init(teacher, student, keep_student_depth=True)


def test_freeze_teacher():
    t = freeze_teacher(TinyNet().train())
    assert not t.training and not any(p.requires_grad for p in t.parameters())
