"""Writing ONNX models: what the export and the scope guard's fit both do to save one."""

from __future__ import annotations

from pathlib import Path

from pneumoscan.files import atomic_path


def save_checked(model, out: Path) -> None:
    """Check the graph, then replace `out` atomically."""
    import onnx

    onnx.checker.check_model(model)
    with atomic_path(out, mode=0o644) as partial:
        onnx.save(model, str(partial))
