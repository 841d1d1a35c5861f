"""`pneumoscan run` / `eval` / `info` end to end through the CLI on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from conftest import SAMPLES
from conftest import invoke_cli as invoke

from pneumoscan import __version__


@pytest.fixture
def scans(tmp_path) -> Path:
    """The committed samples plus a corrupt JPEG and a zero-byte file."""
    root = tmp_path / "scans"
    shutil.copytree(SAMPLES, root, ignore=shutil.ignore_patterns("README.md"))
    broken = root / "broken"
    broken.mkdir()
    good = next(SAMPLES.glob("study-normal-1/*.jpeg")).read_bytes()
    (broken / "corrupt.jpeg").write_bytes(good[: len(good) // 3])
    (broken / "empty.png").write_bytes(b"")
    return root


def test_version_and_help():
    assert __version__ in invoke("--version").output
    for command in ("run", "export-onnx", "eval", "info"):
        assert "Usage" in invoke(command, "--help").output


def test_run_json_accounts_for_every_file(scans, small_onnx, tmp_path):
    out = tmp_path / "results.json"
    result = invoke("run", scans, "--model", small_onnx, "--json", out, "--device", "cpu")
    assert result.exit_code == 3, result.output  # some files unreadable, run completed
    data = json.loads(out.read_text())
    files = sorted(str(p) for p in scans.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in data["results"]) == files
    by_name = {Path(r["path"]).name: r for r in data["results"]}
    for r in data["results"]:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "ok":
            assert r["label"] in ("NORMAL", "PNEUMONIA") and 0 <= r["probability"] <= 1
            assert r["threshold"] == data["run"]["threshold"]
            assert (r["probability"] >= r["threshold"]) == (r["label"] == "PNEUMONIA")
        else:
            assert r["reason"] and r["probability"] is None
    assert by_name["corrupt.jpeg"]["status"] == "error"
    assert by_name["empty.png"]["status"] in ("error", "skipped")
    assert "EXTREMITY" in by_name["RG3_J2KI.dcm"]["reason"]
    assert by_name["MR2_J2KI.dcm"]["status"] == "skipped"
    assert sum(r["status"] == "ok" for r in data["results"]) == 16 + 3
    # DICOM studies are grouped by StudyInstanceUID, plain images by folder.
    rg1 = {by_name[n]["study"] for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")}
    assert len(rg1) == 1 and not rg1.pop().endswith("dicom")
    assert by_name["NORMAL2-IM-1427-0001.jpeg"]["study"].endswith("study-normal-1")
    run = data["run"]
    assert run["provider"] == "CPUExecutionProvider" and run["version"] == __version__
    assert len(run["model"]["sha256"]) == 64 and run["started"] <= run["finished"]
    assert "sha256" not in run  # only under run.model (docs/RESULTS_JSON.md)
    assert "unreadable" in result.output and "corrupt.jpeg" in result.output


def test_transfer_syntaxes_of_one_scan_agree(small_onnx, tmp_path):
    """One scan stored three ways. JPEG 2000 is decoded from its wavelet levels at twice
    the model's size and uncompressed data box-averaged to that, so even the lossless pair
    differs a little (the wavelet's low band is not a box filter); the decision does not."""
    out = tmp_path / "r.json"
    invoke("run", SAMPLES / "dicom", "--model", small_onnx, "--json", out)
    by_name = {Path(r["path"]).name: r for r in json.loads(out.read_text())["results"]}
    uncr, j2kr, j2ki = (by_name[f"RG1_{s}.dcm"] for s in ("UNCR", "J2KR", "J2KI"))
    assert uncr["label"] == j2kr["label"] == j2ki["label"]
    assert abs(uncr["probability"] - j2kr["probability"]) < 0.03
    assert abs(uncr["probability"] - j2ki["probability"]) < 0.05


def test_run_needs_an_output():
    result = invoke("run", SAMPLES)
    assert result.exit_code == 2
    assert "--json" in result.output


def test_bad_report_suffix_is_a_usage_error(tmp_path):
    assert invoke("run", SAMPLES, "--out", tmp_path / "r.docx").exit_code == 2


def test_missing_model_is_fatal(tmp_path):
    result = invoke("run", SAMPLES, "--model", tmp_path / "nope.onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "model file not found" in result.output


def test_device_cuda_fails_clearly_without_cuda(small_onnx, tmp_path):
    session = ort.InferenceSession(str(small_onnx), providers=["CUDAExecutionProvider",
                                                               "CPUExecutionProvider"])
    if session.get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("this machine has a working CUDA provider")
    result = invoke("run", SAMPLES, "--model", small_onnx, "--device", "cuda",
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "CUDA execution provider could not be loaded" in result.output
    assert not (tmp_path / "r.json").exists()


def test_torch_cam_backend_runs_from_a_checkpoint(small_checkpoint, small_onnx, tmp_path):
    a, b = tmp_path / "onnx.json", tmp_path / "torch.json"
    invoke("run", SAMPLES / "study-pneumonia-1", "--model", small_onnx, "--json", a)
    result = invoke("run", SAMPLES / "study-pneumonia-1", "--cam-backend", "torch",
                    "--checkpoint", small_checkpoint, "--json", b)
    assert result.exit_code == 0, result.output
    ra, rb = (json.loads(p.read_text()) for p in (a, b))
    assert rb["run"]["provider"] == "torch-cpu"
    for x, y in zip(ra["results"], rb["results"]):
        assert x["label"] == y["label"]
        assert abs(x["probability"] - y["probability"]) < 1e-5


def test_eval_prints_metrics_with_confidence_intervals(small_onnx, val_images, tmp_path):
    result = invoke("eval", val_images, "--model", small_onnx, "--json", tmp_path / "e.json",
                    "--roc", tmp_path / "roc.png", "--bootstrap", "200")
    assert result.exit_code == 0, result.output
    for name in ("accuracy", "sensitivity", "specificity", "auc", "f1"):
        assert name in result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["n"] == 16 and report["n_pneumonia"] == 8
    for name, (lo, hi) in report["ci95"].items():
        value = report["metrics"][name]
        assert lo <= value <= hi or value != value  # NaN when undefined
    c = report["confusion"]
    assert c["tp"] + c["fn"] == 8 and c["tn"] + c["fp"] == 8
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_info_shows_model_metadata(small_onnx):
    result = invoke("info", "--model", small_onnx)
    assert result.exit_code == 0
    assert "efficientnet_lite0" in result.output and "threshold" in result.output


def test_scores_do_not_depend_on_rendering_a_report(small_onnx, tmp_path):
    plain, rendered = tmp_path / "plain.json", tmp_path / "rendered.json"
    invoke("run", SAMPLES / "study-normal-2", "--model", small_onnx, "--json", plain)
    invoke("run", SAMPLES / "study-normal-2", "--model", small_onnx, "--json", rendered,
           "--out", tmp_path / "r.html")
    a, b = (json.loads(p.read_text())["results"] for p in (plain, rendered))
    assert [r["probability"] for r in a] == [r["probability"] for r in b]
