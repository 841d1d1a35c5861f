"""`pneumoscan run` / `eval` / `info` end to end through the CLI on real files."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from conftest import CLI_CWD, CLI_ENV, SAMPLES, pneumoscan_command, run_pneumoscan
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


def test_run_json_accounts_for_every_file(scans, shipped_model, tmp_path):
    out = tmp_path / "results.json"
    result = invoke("run", scans, "--model", shipped_model, "--json", out, "--device", "cpu")
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
    assert (by_name["empty.png"]["status"], by_name["empty.png"]["reason"]) == (
        "skipped", "empty file (0 bytes)")
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


def test_transfer_syntaxes_of_one_scan_agree(shipped_model, tmp_path):
    """One scan stored three ways. JPEG 2000 is decoded from its wavelet levels at twice
    the model's size and uncompressed data box-averaged to that, so even the lossless pair
    differs a little (the wavelet's low band is not a box filter); the decision does not."""
    out = tmp_path / "r.json"
    invoke("run", SAMPLES / "dicom", "--model", shipped_model, "--json", out)
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
    result = invoke("run", SAMPLES, "--model", tmp_path / "nope.onnx",
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "model file not found" in result.output


def test_device_cuda_fails_clearly_without_cuda(shipped_model, tmp_path):
    session = ort.InferenceSession(str(shipped_model), providers=["CUDAExecutionProvider",
                                                               "CPUExecutionProvider"])
    if session.get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("this machine has a working CUDA provider")
    result = invoke("run", SAMPLES, "--model", shipped_model, "--device", "cuda",
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "CUDA execution provider could not be loaded" in result.output
    assert not list(tmp_path.iterdir())  # no state, no log: the run never started


def test_failed_starts_create_nothing_and_usage_errors_exit_2(shipped_model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    torch_alone = invoke("run", SAMPLES, "--cam-backend", "torch", "--json", tmp_path / "r.json")
    assert torch_alone.exit_code == 2 and "--checkpoint" in torch_alone.stderr
    unwritable = invoke("run", SAMPLES, "--model", shipped_model, "--out",
                        tmp_path / "file" / "r.pdf")
    assert unwritable.exit_code == 1
    assert unwritable.stderr == (f"pneumoscan: error: cannot write the report "
                                 f"{tmp_path / 'file' / 'r.pdf'}: {tmp_path / 'file'} is not a "
                                 "folder\n")  # before any work: not even the model line
    assert sorted(tmp_path.iterdir()) == [tmp_path / "file"]


def test_stdout_names_every_output_and_stderr_tells_the_rest(shipped_model, tmp_path):
    outputs = {"report": tmp_path / "r.html", "json": tmp_path / "r.json",
               "per-study": tmp_path / "studies"}
    result = invoke("run", SAMPLES / "study-normal-1", "--model", shipped_model,
                    "--out", outputs["report"], "--json", outputs["json"],
                    "--per-study", outputs["per-study"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{what}: {path}" for what, path in (
        *outputs.items(), ("state", tmp_path / "r.pneumoscan.sqlite"),
        ("log", tmp_path / "r.pneumoscan.log.jsonl"))]
    for what, path in outputs.items():
        assert path.exists(), what
    assert "4 files (0 unchanged since the last run)" in result.stderr


def test_dash_v_logs_pneumoscan_and_dash_vv_the_libraries_too(shipped_model, tmp_path):
    def stderr(*verbose: str) -> str:  # in a process of its own: logging as a user sees it
        out = tmp_path / f"r{''.join(verbose)}.pdf"
        done = run_pneumoscan("run", SAMPLES / "study-normal-1", "--model", shipped_model,
                              "--out", out, *verbose)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "INFO" not in stderr()
    once = stderr("-v")
    assert "INFO pneumoscan: writing the report" in once and "NORMAL2-IM-1427" in once
    assert "weasyprint" not in once.lower()
    assert "INFO weasyprint.progress: Step 5 - Creating layout" in stderr("-vv")


def test_files_of_unknown_type_count_as_unchanged_on_the_next_run(shipped_model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(next(SAMPLES.glob("study-normal-1/*.jpeg")), scans)
    shutil.copy(SAMPLES / "README.md", scans)
    args = ("run", scans, "--model", shipped_model, "--json", tmp_path / "r.json")
    assert "2 files (0 unchanged" in invoke(*args).stderr
    assert "2 files (2 unchanged" in invoke(*args).stderr
    log = [json.loads(line) for line in (tmp_path / "r.pneumoscan.log.jsonl").open()]
    assert [line["path"] for line in log if line["event"] == "file"] == sorted(
        str(p) for p in scans.iterdir())  # each file logged once, by the first run


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_with_its_exit_code_and_a_log_record(shipped_model, tmp_path,
                                                                     signum, code):
    scans = tmp_path / "scans"
    scans.mkdir()
    image = next(SAMPLES.glob("study-normal-1/*.jpeg"))
    for n in range(300):
        (scans / f"{n:03d}.jpeg").symlink_to(image)
    log = tmp_path / "r.pneumoscan.log.jsonl"
    process = subprocess.Popen(pneumoscan_command(
        "run", scans, "--model", shipped_model, "--json", tmp_path / "r.json", "-v"),
        env=CLI_ENV, cwd=CLI_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # classifying has begun
        if ": ok " in line:
            break
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and stdout == ""
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["event"], last["signal"], last["exit_code"]) == (
        "interrupted", signal.Signals(signum).name, code)
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


def test_eval_prints_metrics_with_confidence_intervals(shipped_model, val_images, tmp_path):
    result = invoke("eval", val_images, "--model", shipped_model, "--json", tmp_path / "e.json",
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
    assert "Preprocessing(" not in result.output  # readable, not a repr
    assert not re.search(r"\d\.\d{6,}", result.output)  # no 16-digit floats
    assert re.search(r"^input: +128 x 128, 3 channels", result.output, re.MULTILINE)
    assert re.search(r"^scope guard: +5 layers through a JPEG quality 75 round trip at 1/4 size, "
                     r"threshold \d\.\d{3} \(\d\.\d% of \d+ validation", result.output,
                     re.MULTILINE)
    assert re.search(r"^calibration: +Platt scaling, T \d\.\d{3}", result.output, re.MULTILINE)
    described = json.loads(invoke("info", "--model", small_onnx, "--json").output)
    assert described["sha256"] in result.output and described["preprocessing"]["height"] == 128
    assert "at_threshold" in described["validation_metrics"]


def test_info_on_a_model_exported_without_calibration(small_onnx, tmp_path):
    from pneumoscan.inference.model import META_PREFIX

    for calibration, shown in (
            ({"method": "none", "temperature": 1.0}, "none"),  # what export writes then
            ({"method": "temperature scaling", "temperature": 0.8, "ece_before": 0.1,
              "ece_after": 0.02}, r"temperature scaling, T 0\.800: ECE 0\.100 -> 0\.0200")):
        model = onnx.load(str(small_onnx))
        for entry in model.metadata_props:
            if entry.key == META_PREFIX + "calibration":
                entry.value = json.dumps(calibration)
        onnx.save(model, str(tmp_path / "older.onnx"))
        result = invoke("info", "--model", tmp_path / "older.onnx")
        assert result.exit_code == 0, result.output
        assert re.search(r"^calibration: +" + shown, result.output, re.MULTILINE)


def test_help_names_every_input_type():
    for command in ((), ("run",)):
        assert "TIFF" in invoke(*command, "--help").output


def test_scores_do_not_depend_on_rendering_a_report(shipped_model, tmp_path):
    plain, rendered = tmp_path / "plain.json", tmp_path / "rendered.json"
    invoke("run", SAMPLES / "study-normal-2", "--model", shipped_model, "--json", plain)
    invoke("run", SAMPLES / "study-normal-2", "--model", shipped_model, "--json", rendered,
           "--out", tmp_path / "r.html")
    a, b = (json.loads(p.read_text())["results"] for p in (plain, rendered))
    assert [r["probability"] for r in a] == [r["probability"] for r in b]


@pytest.mark.parametrize("seconds, shown", [
    (-3, "0 s"), (12.4, "12 s"), (59.6, "1 min"), (185, "3 min 05 s"), (1800, "30 min"),
    (7620, "2 h 07 min"), (21720, "6 h 02 min")])
def test_durations_read_as_people_read_them(seconds, shown):
    """One formatting for every duration shown: the time left, a lock holder's age, the
    training ETA."""
    from pneumoscan.text import format_duration

    assert format_duration(seconds) == shown
