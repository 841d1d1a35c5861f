"""Everything that needs PyTorch: networks, checkpoints, ONNX export and quantisation, the
forward-hook CAM. Imported lazily, only by the commands that need it (`export-onnx`, `run
--cam-backend torch`) and by `training/`."""
