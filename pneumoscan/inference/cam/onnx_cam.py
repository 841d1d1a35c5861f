"""CAMs from the exported model's own `cams` output, computed by ONNX Runtime in the same
run as the classification (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.inference.cam.base import CamModel, Predictions
from pneumoscan.inference.model import open_session, read_model_info
from pneumoscan.workers import available_cores

OUTPUTS = ["logits", "cams"]  # `features` is not needed on the run path
SCOPE_OUTPUT = "scope_score"  # models with a scope guard (modelling/scope_guard.py)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# Batches run at once on CPU at most: each holds its own activation memory in ONNX Runtime's
# arena (about 340 MB for EfficientNet-Lite0, batch 32, 224 px).
MAX_CONCURRENT_BATCHES = 4


class OnnxCamModel(CamModel):
    """`threads`: ONNX Runtime's intra-op threads for one batch; by default the cores
    shared among up to MAX_CONCURRENT_BATCHES batches (one thread a batch on 2 cores).
    On CPU the pipeline runs that many batches at once (`concurrent_batches`): the cores
    stay busy with whole batches and the decoding threads' files instead of waiting for
    each other inside one batch (`pneumoscan run --json` 9% faster on 2 cores, docs/
    BENCHMARKS.md). A caller that runs one batch at a time and wants it soon asks for
    every core."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        cores = available_cores()
        per_batch = threads or max(1, cores // min(cores, MAX_CONCURRENT_BATCHES))
        self.session, self.provider = open_session(path, device, per_batch)
        self.concurrent_batches = (
            1 if self.provider == "CUDAExecutionProvider"
            else max(1, min(MAX_CONCURRENT_BATCHES, cores // per_batch)))
        self.info = read_model_info(Path(path), self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        has_scope = any(o.name == SCOPE_OUTPUT for o in self.session.get_outputs())
        self.outputs = OUTPUTS + [SCOPE_OUTPUT] * has_scope

    def predict(self, batch: np.ndarray) -> Predictions:
        if self.provider == "CUDAExecutionProvider":
            logits, cams, *scope = self.run_bound(batch, "cuda")
        else:
            logits, cams, *scope = self.session.run(self.outputs, {self.input_name: batch})
        return Predictions(softmax(logits), cams, scope[0] if scope else None)

    def run_bound(self, batch: np.ndarray, device: str) -> list[np.ndarray]:
        """One run through ORT's IO binding: the batch is copied to the session's device
        once, the network and its CAMs are computed there into outputs bound on `device`,
        and only `logits`, `cams` (and `scope_score`) are copied back (the large `features`
        maps never are)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        for name in self.outputs:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
