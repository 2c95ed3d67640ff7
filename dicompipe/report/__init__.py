"""Report stage: TXT, annotated PNGs, plots, JSON, NIfTI, DICOM SR and Secondary Capture.

Example::

    >>> from dicompipe import report
    >>> run_dir = report.write(analysis, "out/")
"""
