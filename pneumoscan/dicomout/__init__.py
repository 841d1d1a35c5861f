"""DICOM outputs of a run, for a PACS: per study an Encapsulated PDF of its report, per
classified image a Structured Report of the result and a Secondary Capture of the CAM
overlay, each in a new series of the source study (highdicom; `pip install .[pacs]`)."""
