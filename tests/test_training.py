"""Training recipe: data split, pretrained weights, progressive unfreezing, early stopping,
and the two large torchvision backbones end to end (random init: no download in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.evaluation.datasets import (
    CLASS_NAMES,
    Sample,
    list_samples,
    patient_id,
    patient_order,
    split_by_patient,
)
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.modelling.architectures import (
    NORMALISATION,
    build_imagenet_network,
    build_network,
)
from training.train import (
    AugmentedImages,
    TrainConfig,
    consistency_loss,
    fit_calibration,
    main,
    open_stages_at,
    param_groups,
    parse_args,
    set_trainable,
    train,
)


def test_patient_ids_follow_kermany_names():
    assert patient_id(Path("person1000_bacteria_2931.jpeg")) == "person1000"
    assert patient_id(Path("person1000_virus_1681.jpeg")) == "person1000"
    assert patient_id(Path("IM-0115-0001.jpeg")) == "0115"
    assert patient_id(Path("NORMAL2-IM-0115-0001.jpeg")) == "NORMAL2-0115"


def kermany_shaped_listing() -> list[Sample]:
    """1000 patients named as in Kermany's TRAIN split: PNEUMONIA `personN_...`, NORMAL from
    two series numbered separately (`IM-N` and `NORMAL2-IM-N`), one to three images each."""
    def names(n: int) -> tuple[str, list[str]]:
        images = range(1 + n % 3 + n % 2)
        if n % 3:
            return "PNEUMONIA", [f"person{n}_bacteria_{k}.jpeg" for k in images]
        series = "NORMAL2-IM" if n % 2 else "IM"
        return "NORMAL", [f"{series}-{n // 2:04d}-000{k}.jpeg" for k in images]
    return [Sample(Path(f"{label}/{name}"), CLASS_NAMES.index(label), patient_id(Path(name)))
            for n in range(1000) for label, files in [names(n)] for name in files]


def test_split_is_by_patient_and_stratified(kermany224):
    committed = list_samples(kermany224)
    assert len(committed) == 16
    # The committed set's one patient with two images (person1946) stays on one side.
    train_part, val_part = split_by_patient(committed, 0.3, seed=42)
    assert len(train_part) + len(val_part) == 16 and train_part and val_part
    assert not {s.patient for s in train_part} & {s.patient for s in val_part}
    # Stratified on a listing shaped like Kermany's train split: the names alone make the
    # patients.
    listing = kermany_shaped_listing()
    train_part, val_part = split_by_patient(listing, 0.15, seed=42)
    assert len(train_part) + len(val_part) == len(listing)
    assert not {s.patient for s in train_part} & {s.patient for s in val_part}
    # Patients with several images exist, so splitting by image would have leaked.
    assert len({s.patient for s in listing}) == 1000 < len(listing)
    for label in (0, 1):
        patients = {s.patient for s in listing if s.label == label}
        held = {s.patient for s in val_part if s.label == label}
        assert 0.14 < len(held) / len(patients) < 0.16
    again = split_by_patient(listing, 0.15, seed=42)
    assert [s.path for s in again[1]] == [s.path for s in val_part]
    assert [s.path for s in split_by_patient(listing, 0.15, seed=7)[1]] != \
        [s.path for s in val_part]


def test_patient_level_folds_hold_every_patient_out_once():
    listing = kermany_shaped_listing()
    held = [split_by_patient(listing, 0.2, seed=42, fold=k)[1] for k in range(5)]
    patients = [{s.patient for s in part} for part in held]
    assert sum(len(p) for p in patients) == len({s.patient for s in listing}) == 1000
    assert set().union(*patients) == {s.patient for s in listing}  # each once: disjoint
    assert sum(len(part) for part in held) == len(listing)
    for part in held:  # stratified: a fifth of each class's patients
        for label in (0, 1):
            share = len({s.patient for s in part if s.label == label}) / \
                len({s.patient for s in listing if s.label == label})
            assert 0.19 < share < 0.21
    # Fold 0 is the split a run has always had.
    assert held[0] == split_by_patient(listing, 0.2, seed=42)[1]
    with pytest.raises(ValueError, match="fold 5 does not fit"):
        split_by_patient(listing, 0.2, seed=42, fold=5)


def test_latest_split_holds_out_the_last_patients_of_each_series():
    listing = kermany_shaped_listing()
    train_part, val_part = split_by_patient(listing, 0.15, seed=42, how="latest")
    assert len(train_part) + len(val_part) == len(listing)
    assert not {s.patient for s in train_part} & {s.patient for s in val_part}
    # Each series (person, IM, NORMAL2-IM) gives its own highest numbers, whatever the seed.
    for prefix in ("person", "", "NORMAL2-"):
        def numbers(part, prefix=prefix):
            return {patient_order(s.patient)[1] for s in part
                    if patient_order(s.patient)[0] == prefix}
        held, kept = numbers(val_part), numbers(train_part)
        assert held and min(held) > max(kept)
        assert 0.13 < len(held) / (len(held) + len(kept)) < 0.17
    assert split_by_patient(listing, 0.15, seed=7, how="latest")[1] == val_part
    assert patient_order("NORMAL2-1427") == ("NORMAL2-", 1427, "NORMAL2-1427")


CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def cat_probabilities(net: torch.nn.Module) -> tuple[str, float]:
    """The top ImageNet class of a real photo of a cat (scikit-image's chelsea), and the
    probability the network gives to the five cat classes together."""
    import skimage.data
    import torchvision.models as tvm
    from PIL import Image

    categories = tvm.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    mean, std = NORMALISATION["efficientnet_lite0"]
    img = Image.fromarray(skimage.data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        probabilities = net.eval()(x[None]).softmax(1)[0]
    cats = [categories.index(name) for name in CAT_CLASSES]
    return categories[probabilities.argmax().item()], float(probabilities[cats].sum())


def test_pretrained_efficientnet_lite0_knows_a_cat():
    top, cat = cat_probabilities(build_imagenet_network("efficientnet_lite0"))
    assert top in CAT_CLASSES and cat > 0.5


def test_random_init_is_not_a_cat_detector():
    """The check above can fail: the same network without the pretrained weights gives the
    cat classes no more than their share of 1000 (here 5 / 1000), whatever its top class."""
    torch.manual_seed(0)
    _, cat = cat_probabilities(build_imagenet_network("efficientnet_lite0", pretrained=False))
    assert cat < 0.05


def _step(net, x, y, lr=1e-2):
    opt = torch.optim.AdamW(param_groups(net, lr, 0.5, 0.0))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_progressive_unfreezing_freezes_exactly_the_closed_stages():
    torch.manual_seed(0)
    net = build_network("efficientnet_lite0").train()
    stages = net.stages
    assert len(stages) == 4
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 0, 1])
    for n_open in (0, 2, 4):
        net.train()
        set_trainable(net, n_open)
        before = {id(p): p.detach().clone() for p in net.parameters()}
        stats_before = [m.running_mean.clone() for m in stages[-1].modules()
                        if isinstance(m, torch.nn.BatchNorm2d)]
        _step(net, x, y)
        for i, stage in enumerate(stages):
            for p in stage.parameters():
                assert p.requires_grad == (i < n_open)
                changed = not torch.equal(before[id(p)], p)
                assert changed == (i < n_open), f"stage {i} with {n_open} open"
        assert all(not torch.equal(before[id(p)], p) for p in net.classifier.parameters())
        stats_after = [m.running_mean for m in stages[-1].modules()
                       if isinstance(m, torch.nn.BatchNorm2d)]
        frozen_stats = all(torch.equal(a, b) for a, b in zip(stats_before, stats_after))
        assert frozen_stats == (n_open < 4), "frozen BatchNorm statistics must not move"


def test_the_input_low_pass_keeps_shapes_and_removes_the_finest_detail():
    from pneumoscan.modelling.architectures import GaussianLowPass

    blur = GaussianLowPass(1.5)
    flat = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(blur(flat), flat)  # weights sum to 1, reflect padding
    checks = torch.ones(32, 32)
    checks[::2] *= -1
    checks[:, ::2] *= -1  # 0.5 cycles/pixel, the finest pattern an image holds
    assert blur(checks.expand(1, 3, 32, 32)).abs().max() < 1e-3
    slow = torch.cos(torch.arange(32.0) * 2 * torch.pi / 32).expand(1, 3, 32, 32)
    assert blur(slow).std() > 0.9 * slow.std()  # 1/32 cycles/pixel passes
    net = build_network("efficientnet_lite0", pretrained=False, low_pass_sigma=1.5)
    assert "features.low_pass.kernel" in net.state_dict()
    assert not any(p is net.features.low_pass.kernel for p in net.parameters())  # not trained


def test_a_low_pass_network_exports_with_its_filter(kermany224, val_images, tmp_path):
    """The low-pass is part of the network: in the checkpoint (rebuilt from its sigma), and
    in the ONNX graph, where ONNX Runtime matches PyTorch as for any export."""
    from pneumoscan.modelling.checkpoint import load_network
    from pneumoscan.modelling.export import PARITY_LIMITS, export_checkpoint

    # 128 px as the other export fixtures: at 64 px the 2x2 CAMs of two steps are near flat,
    # and min-max normalising near-flat maps amplifies float noise past any limit.
    cfg = _tiny_config(kermany224, tmp_path, low_pass_sigma=1.5, consistency=1.0, image_size=128)
    train(cfg, log=lambda m: None)
    network, payload = load_network(tmp_path / "best.pt")
    assert payload["low_pass_sigma"] == 1.5 and network.features.low_pass.sigma == 1.5
    diffs = export_checkpoint(tmp_path / "best.pt", tmp_path / "model.onnx",
                              check_images=val_images, log=lambda m: None, scope_guard=False)
    assert all(diffs[k] < PARITY_LIMITS[k] for k in ("probabilities", "normalised_cams")), diffs


def test_unfreezing_schedule_and_discriminative_learning_rates():
    assert [open_stages_at(e, (2, 3, 4, 5), 4) for e in range(1, 7)] == [0, 1, 2, 3, 4, 4]
    net = build_network("efficientnet_lite0", pretrained=False)
    groups = param_groups(net, 1e-3, 0.5, 1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters()))


def _tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), image_size=64, epochs=1, batch_size=4,
                limit_samples=10, max_steps_per_epoch=2, warmup_steps=1,
                unfreeze_epochs=(1,), val_fraction=0.4)
    base.update(kw)
    return TrainConfig(**base)


def test_early_stopping_stops(kermany224, tmp_path):
    # lr=0: only BatchNorm's running statistics move, so the validation AUC soon stops
    # improving, and patience 1 ends the run one epoch after its best.
    cfg = _tiny_config(kermany224, tmp_path, epochs=6, patience=1, lr=0.0)
    train(cfg, log=lambda m: None)
    history = json.loads((tmp_path / "history.json").read_text())
    aucs = [h["auc"] for h in history]
    best_epoch = aucs.index(max(aucs)) + 1
    assert [h["epoch"] for h in history] == list(range(1, best_epoch + 2))
    assert len(history) < cfg.epochs


def test_consistency_pairs_each_image_stored_two_ways(kermany224, tmp_path):
    """With --consistency each item is one image stored two different ways, the loss is
    the squared margin difference of each pair, and a fine-tune from a checkpoint trains
    on such pairs and starts from its weights, with the input low-pass its own options set."""
    cfg = _tiny_config(kermany224, tmp_path / "first", epochs=1)
    train(cfg, log=lambda m: None)
    images = np.stack([np.full((224, 224), 40, np.uint8), np.full((224, 224), 200, np.uint8)])
    images[:, 60:160, 60:160] = 120
    tuned = _tiny_config(kermany224, tmp_path / "tuned", epochs=1, consistency=1.0,
                         init_from=str(tmp_path / "first" / "best.pt"), lr=0.0,
                         low_pass_sigma=1.0)
    dataset = AugmentedImages(images, np.array([0, 1]), Preprocessing(
        224, 224, 3, (0.5,) * 3, (0.5,) * 3), tuned)
    pair, label = dataset[1]
    assert pair.shape == (2, 3, 224, 224) and label == 1
    assert (pair[0] - pair[1]).abs().mean() > 0.005
    logits = torch.tensor([[0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [1.0, 0.0]])
    assert consistency_loss(logits).item() == pytest.approx((4 + 0) / 2)
    train(tuned, log=lambda m: None)  # lr 0: the weights stay those of the first run
    first = torch.load(tmp_path / "first" / "best.pt", weights_only=False)["state_dict"]
    tuned_payload = torch.load(tmp_path / "tuned" / "best.pt", weights_only=False)
    after = tuned_payload["state_dict"]
    assert torch.equal(first["classifier.weight"], after["classifier.weight"])
    # The first run had no low-pass; the fine-tune's sigma 1 has 7 taps (radius 3 sigma).
    assert "features.low_pass.kernel" not in first
    assert tuned_payload["low_pass_sigma"] == 1.0
    assert after["features.low_pass.kernel"].shape == (3, 1, 1, 7)


def test_a_checkpoint_that_does_not_fit_the_network_is_refused_in_one_line(
        kermany224, tmp_path, capsys):
    """--init-from a checkpoint with weights the network lacks: one line, exit 1."""
    cfg = _tiny_config(kermany224, tmp_path / "first", epochs=1)
    train(cfg, log=lambda m: None)
    payload = torch.load(tmp_path / "first" / "best.pt", weights_only=False)
    payload["state_dict"]["classifier.extra"] = torch.zeros(1)
    torch.save(payload, tmp_path / "foreign.pt")
    code = main(["--data", str(kermany224), "--out", str(tmp_path / "tuned"),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "4",
                 "--limit-samples", "10", "--max-steps-per-epoch", "2",
                 "--val-fraction", "0.4", "--init-from", str(tmp_path / "foreign.pt")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("training: ") and "does not fit --arch efficientnet_lite0" in err
    assert "classifier.extra" in err and len(err.strip().splitlines()) == 1


def test_training_writes_everything_and_resumes(kermany224, tmp_path):
    cfg = _tiny_config(kermany224, tmp_path, epochs=2, unfreeze_epochs=(2,))
    summary = train(cfg, log=lambda m: None)
    for name in ("best.pt", "last.pt", "history.csv", "history.json", "summary.json",
                 "learning_curves.png", "roc.png", "confusion.png", "calibration.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert 0 <= best["threshold"] <= 1 and best["threshold"] == summary["threshold"]
    assert best["preprocessing"]["height"] == 64
    assert "ci95" in best["metrics"]
    # Calibration: fitted on the validation logits, folded into the head by load_network.
    from pneumoscan.modelling.checkpoint import load_network

    calibration = best["calibration"]
    preds = np.load(tmp_path / "val_predictions.npz")
    t, b = fit_calibration(preds["logits"], preds["labels"])
    assert (calibration["temperature"], calibration["bias"]) == pytest.approx((t, b))
    raw = build_network(cfg.arch, dropout=cfg.dropout, pretrained=False).eval()
    raw.load_state_dict(best["state_dict"])
    scaled, _ = load_network(tmp_path / "best.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        margin, raw_margin = (net(x) @ torch.tensor([-1.0, 1.0]) for net in (scaled, raw))
    torch.testing.assert_close(margin, raw_margin / t + b)
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "accuracy", "sensitivity", "specificity", "auc"} <= set(header)
    # Resuming from the last checkpoint continues at the next epoch.
    cfg3 = _tiny_config(kermany224, tmp_path, epochs=3, unfreeze_epochs=(2,))
    train(cfg3, resume=tmp_path / "last.pt", log=lambda m: None)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "densenet161"])
def test_large_backbones_train_and_export(arch, kermany224, val_images, tmp_path):
    from pneumoscan.modelling.export import PARITY_LIMITS, export_checkpoint

    cfg = _tiny_config(kermany224, tmp_path, arch=arch, pretrained=False,
                       limit_samples=6, batch_size=3)
    train(cfg, log=lambda m: None)
    diffs = export_checkpoint(tmp_path / "best.pt", tmp_path / "model.onnx",
                              check_images=val_images, log=lambda m: None)
    # What `run` consumes; the logits' own gate scales with the calibration temperature.
    assert all(diffs[k] < PARITY_LIMITS[k] for k in ("probabilities", "normalised_cams")), diffs


@pytest.mark.parametrize("arch", ["resnet50", "densenet161"])
def test_local_imagenet_weights_file_is_loaded(arch, tmp_path):
    """--pretrained-weights FILE: torchvision's published state dicts load offline
    (DenseNet's files use old-style keys such as 'norm.1', remapped on load)."""
    import re

    import torchvision.models as tvm

    torch.manual_seed(1)
    reference = getattr(tvm, arch)()
    state = reference.state_dict()
    if arch == "densenet161":
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in state.items()}
        assert any(".norm.1." in k for k in state)
    torch.save(state, tmp_path / "imagenet.pth")
    net = build_imagenet_network(arch, weights=tmp_path / "imagenet.pth")
    head = reference.fc if arch == "resnet50" else reference.classifier
    assert torch.equal(net.classifier.weight, head.weight)
    first_conv = reference.conv1 if arch == "resnet50" else reference.features.conv0
    assert torch.equal(next(net.features.parameters()), first_conv.weight)


def test_calibration_undoes_overconfidence_and_a_shifted_prior():
    """Logit margins made three times too confident and shifted by +2 (as class weights
    shift them): the fit finds temperature 3 and bias -2."""
    rng = np.random.default_rng(0)
    margin = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-margin))).astype(np.int64)
    logits = np.stack([np.zeros_like(margin), 3 * (margin + 2)], 1)
    temperature, bias = fit_calibration(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert bias == pytest.approx(-2.0, abs=0.2)


def test_command_line_is_built_from_the_config():
    """Every TrainConfig field is an option with the field's default, so the two cannot
    drift; lists, optional numbers and switches parse."""
    import dataclasses

    cfg, resume = parse_args(["--data", "d", "--out", "o"])
    assert cfg == TrainConfig(data="d", out="o") and resume is None
    cfg, _ = parse_args(["--data", "d", "--out", "o", "--unfreeze-epochs", "1,3",
                         "--ema-decay", "none", "--no-pretrained", "--jpeg-quality", "75"])
    assert cfg == dataclasses.replace(TrainConfig(data="d", out="o"), unfreeze_epochs=(1, 3),
                                      ema_decay=None, pretrained=False, jpeg_quality=75)
    cfg, _ = parse_args(["--data", "d", "--out", "o", "--val-split", "latest"])
    assert cfg.val_split == "latest"
    for bad in (["--val-split", "newest"], ["--val-fraction", "0.25", "--val-fold", "4"]):
        with pytest.raises(SystemExit):  # argparse's usage error, before any decoding
            parse_args(["--data", "d", "--out", "o", *bad])
