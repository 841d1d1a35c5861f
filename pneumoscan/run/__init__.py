"""The run path behind `pneumoscan.api`, by concern: options.py (what a run is asked to do),
scan.py (a folder scanned: discover, plan against the state, classify), dicomweb.py (a
DICOMweb server scanned, the same way), outputs.py (JSON, reports, DICOM outputs and push),
runner.py (a whole run: lock, model, scan, outputs, run log) and exits.py (exit codes)."""
