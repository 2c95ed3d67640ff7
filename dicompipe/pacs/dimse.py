"""C-STORE SCU: send a run folder's SR and Secondary Capture files to a DICOM peer.

Example::

    >>> from dicompipe.pacs.common import parse_peer
    >>> send(["run/sr.dcm", "run/sc/key_01.dcm"], parse_peer("PACS@10.0.0.5:104"), "DICOMPIPE")
    2
"""
from __future__ import annotations

from collections.abc import Sequence

from dicompipe.errors import PacsError
from dicompipe.pacs.common import Peer

#: C-STORE statuses that mean "stored" (success and the three warnings)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def send(files: Sequence, peer: Peer, calling_aet: str, timeout: float = 30.0) -> int:
    """Send ``files`` to ``peer`` in one association; returns how many were stored.
    :class:`PacsError` when the association fails or any instance is refused (the message
    names the peer and the statuses, never a UID or a patient attribute)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    if not files:
        return 0
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for cls in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        syntaxes = dict.fromkeys([*(str(ds.file_meta.TransferSyntaxUID) for ds in datasets
                                    if str(ds.SOPClassUID) == cls),
                                  ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(cls, list(syntaxes))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet)
    if not assoc.is_established:
        raise PacsError(f"{peer} did not accept an association from {calling_aet} "
                        "(rejected, aborted or not reachable).")
    bad: list[str] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code not in STORED:
                bad.append("no answer" if code is None else f"0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    if bad:
        raise PacsError(f"{peer} refused {len(bad)} of {len(datasets)} instances "
                        f"(status {', '.join(dict.fromkeys(bad))}).")
    return len(datasets)
