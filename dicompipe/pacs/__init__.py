"""PACS front ends: ``pull`` (DICOMweb QIDO-RS / WADO-RS / STOW-RS) and ``listen`` (a DICOM
C-STORE receiver). Both hand each case to :func:`dicompipe.pipeline.run_case` and present
its :class:`~dicompipe.types.CaseResult`; they need ``pip install dicompipe[pacs]``
(dicomweb-client, pynetdicom).

Example::

    >>> from dicompipe.pacs import dicomweb
    >>> res = dicomweb.pull("https://pacs.example/dicom-web", "1.2.3", organ="lung",
    ...                     out="runs", push=True)
    >>> res.case.run_dir, res.pushed
"""
#: the environment variable holding a DICOMweb credential (here, so that the CLI's help
#: text names it without importing the PACS modules)
AUTH_ENV = "DICOMPIPE_DICOMWEB_AUTH"
