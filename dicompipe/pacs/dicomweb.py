"""``dicompipe pull``: find a study on a DICOMweb server (QIDO-RS), retrieve its CT series
(WADO-RS) into a temporary folder of bounded size, analyse it with
:func:`dicompipe.pipeline.run_case`, and with ``push`` store the DICOM SR and the Secondary
Capture series back into the same study (STOW-RS). The temporary folder is removed
afterwards (and a later pull removes one left by a killed run).

Credentials never come from the command line: ``auth="bearer"`` reads a token,
``auth="basic"`` a ``user:password`` line, from the file ``auth_file`` or else from
``$DICOMPIPE_DICOMWEB_AUTH``. TLS certificates are checked (``ca_bundle``: a PEM file of
the CA that signed the server's certificate).

Example::

    >>> res = pull("https://pacs.example/dicom-web", "1.2.826.0.1.3680043.8.498.1",
    ...            organ="lung", out="runs", formats="json", push=True, auth="bearer")
    >>> res.case.run_dir, res.pushed, res.timings
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dicompipe.errors import PacsError
from dicompipe.pacs import AUTH_ENV
from dicompipe.pacs.common import is_uid, result_files, short_uid, with_dicom
from dicompipe.types import CaseResult

log = logging.getLogger("dicompipe.pacs")

AUTH_KINDS = ("none", "bearer", "basic")
#: largest download a pull accepts unless told otherwise (bytes)
MAX_DOWNLOAD = 4 * 1024 ** 3
PREFIX = "dicompipe-pull-"
CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                  "1.2.840.10008.5.1.4.1.1.2.2"}
_SERIES_UID, _MODALITY, _N = "0020000E", "00080060", "00201209"
_FAILED_SOPS, _STORED_SOPS, _SOP_UID = "00081198", "00081199", "00081155"


@dataclass(frozen=True)
class Credentials:
    """A bearer token or a basic-auth pair; ``repr`` never shows the secret."""
    kind: str
    secret: str = field(repr=False)

    def apply(self, session) -> None:
        """Set the session's Authorization (requests drops it on a redirect to another host)."""
        if self.kind == "basic":
            user, _, password = self.secret.partition(":")
            session.auth = (user, password)
        else:
            session.headers["Authorization"] = f"Bearer {self.secret}"


def read_credentials(kind: str = "none", auth_file=None, env=None) -> Credentials | None:
    """The credential for ``kind`` ("none", "bearer", "basic") from ``auth_file`` (first
    non-empty, non-# line) or ``$DICOMPIPE_DICOMWEB_AUTH``.

    >>> read_credentials("basic", env={"DICOMPIPE_DICOMWEB_AUTH": "alice:s3cret"})
    Credentials(kind='basic')
    """
    if kind not in AUTH_KINDS:
        raise PacsError(f"Unknown --auth {kind!r}: choose from {', '.join(AUTH_KINDS)}.")
    if kind == "none":
        return None
    env = os.environ if env is None else env
    if auth_file:
        try:
            mode = os.stat(auth_file).st_mode
            lines = Path(auth_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PacsError(f"Cannot read the credential file {auth_file}: "
                            f"{getattr(e, 'strerror', None) or e}.") from e
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("the credential file %s is readable by other users: chmod 600 it",
                        auth_file)
        secret = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")), "")
        where = f"the file {auth_file}"
    else:
        secret, where = env.get(AUTH_ENV, "").strip(), f"${AUTH_ENV}"
    if not secret:
        raise PacsError(f"--auth {kind} needs the credential in ${AUTH_ENV} or in a file given "
                        "with --auth-file (never on the command line); found none in "
                        f"{where}.")
    if kind == "basic" and (":" not in secret or not secret.partition(":")[0]):
        raise PacsError(f"The basic-auth credential in {where} is not a user:password line.")
    return Credentials(kind, secret)


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL without credentials in it, else :class:`PacsError`."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"--dicomweb {url!r} is not an http(s) URL "
                        "(e.g. https://pacs.example/dicom-web).")
    if parts.username or parts.password:
        raise PacsError("The DICOMweb URL holds a user name or password: remove it and use "
                        f"--auth basic with ${AUTH_ENV} or --auth-file instead.")
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def client(url: str, credentials: Credentials | None = None, ca_bundle=None,
           timeout: float = 60.0):
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with TLS verification on (against
    ``ca_bundle`` when given) and the credentials set on its session."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError as e:
        raise PacsError("dicompipe pull needs the pacs extra: pip install 'dicompipe[pacs]' "
                        f"({e.name} is missing).") from e
    url = check_url(url)
    host = urlsplit(url).hostname or ""
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise PacsError(f"--ca-bundle {ca_bundle} is not a file (a PEM file of CA certificates).")
    session = requests.Session()
    session.verify = str(ca_bundle) if ca_bundle else True
    if credentials is not None:
        if urlsplit(url).scheme == "http" and not _is_loopback(host):
            log.warning("sending credentials to %s over plain HTTP: use https", host)
        credentials.apply(session)
    dw = DICOMwebClient(url, session=session, timeout=(10.0, timeout))
    # dicomweb-client retries failed connections 5 times over ~30 s; 3 tries over ~3 s
    # keep a flaky network covered and a wrong URL quick to report
    dw.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)
    return dw


def _http_error(e: Exception, what: str, url: str) -> PacsError:
    """A clear :class:`PacsError` for a requests exception (no header, no secret)."""
    import requests
    host = urlsplit(url).netloc
    if isinstance(e, requests.exceptions.SSLError):
        return PacsError(f"{what}: the TLS certificate of {host} could not be verified; pass "
                         "--ca-bundle FILE with the CA that signed it.")
    if isinstance(e, requests.exceptions.ConnectionError):
        return PacsError(f"{what}: cannot connect to {host} ({type(e).__name__}).")
    if isinstance(e, requests.exceptions.Timeout):
        return PacsError(f"{what}: {host} did not answer in time.")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return PacsError(f"{what}: {host} refused the request (HTTP {status}); check --auth "
                         f"and the credential in ${AUTH_ENV} or --auth-file.")
    if status is not None:
        return PacsError(f"{what}: {host} answered HTTP {status}.")
    return PacsError(f"{what}: {type(e).__name__}: {e}")


def _value(item: dict, tag: str):
    vals = (item.get(tag) or {}).get("Value") or [None]
    return vals[0]


def find_series(dw, study: str, series: str | None = None) -> list[str]:
    """QIDO-RS: the series UIDs of ``study`` to retrieve: ``series`` when given (it must be
    in the study), else every CT series. :class:`PacsError` when there is none."""
    import requests
    try:
        found = dw.search_for_series(study_instance_uid=study, get_remaining=True,
                                     fields=["Modality", "NumberOfSeriesRelatedInstances"])
    except requests.exceptions.RequestException as e:
        raise _http_error(e, f"QIDO-RS search of study {short_uid(study)}", dw.base_url) from e
    uids = {str(_value(s, _SERIES_UID)): str(_value(s, _MODALITY) or "") for s in found}
    if not uids:
        raise PacsError(f"Study {short_uid(study)} has no series on the server (check --study).")
    if series:
        if series not in uids:
            raise PacsError(f"Series {short_uid(series)} is not in study {short_uid(study)} "
                            f"({len(uids)} series found).")
        return [series]
    ct = [u for u, m in uids.items() if m.upper() == "CT"]
    if not ct:
        mods = ", ".join(sorted({m or "?" for m in uids.values()}))
        raise PacsError(f"Study {short_uid(study)} has no CT series (modalities: {mods}); "
                        "name one with --series.")
    return ct


def retrieve(dw, study: str, series_uids: list[str], folder: Path,
             max_bytes: int = MAX_DOWNLOAD) -> tuple[int, int]:
    """WADO-RS: write every instance of ``series_uids`` into ``folder`` as
    ``<k>/NNNNN.dcm`` (names carry no UID); returns (instances, bytes). Stops with
    :class:`PacsError` once more than ``max_bytes`` were written (the caller removes the
    folder)."""
    import requests
    n = total = 0
    for k, s in enumerate(series_uids):
        sub = folder / f"s{k}"
        sub.mkdir()
        try:
            for ds in dw.iter_series(study, s):
                path = sub / f"{n:05d}.dcm"
                try:
                    ds.save_as(path, enforce_file_format=True)
                except OSError as e:
                    raise PacsError(f"Cannot write the retrieved instances under {folder}: "
                                    f"{e.strerror or e}.") from e
                n += 1
                total += path.stat().st_size
                if total > max_bytes:
                    raise PacsError(f"Study {short_uid(study)} is larger than the download "
                                    f"limit ({max_bytes / 2**20:.0f} MiB after {n} instances); "
                                    "raise --max-download or name one series with --series.")
        except requests.exceptions.RequestException as e:
            raise _http_error(e, f"WADO-RS retrieve of series {short_uid(s)}", dw.base_url) from e
    if n == 0:
        raise PacsError(f"The server returned no instance for study {short_uid(study)}.")
    return n, total


def push(dw, run_dir, study: str) -> list[str]:
    """STOW-RS: store ``run_dir``'s ``sr.dcm`` and ``sc/*.dcm`` into ``study``; returns the
    SOP Instance UIDs the server stored. :class:`PacsError` when it refused any."""
    import pydicom
    import requests
    files = result_files(run_dir)
    if not files:
        raise PacsError(f"{run_dir} holds no sr.dcm or sc/*.dcm to push (write the dicom format).")
    datasets = [pydicom.dcmread(f) for f in files]
    for f, ds in zip(files, datasets):
        if ds.get("StudyInstanceUID") != study:
            raise PacsError(f"{f.name} belongs to another study than {short_uid(study)}; "
                            "not pushed.")
    try:
        resp = dw.store_instances(datasets, study_instance_uid=study)
    except requests.exceptions.RequestException as e:
        raise _http_error(e, f"STOW-RS store into study {short_uid(study)}", dw.base_url) from e
    failed = [it.get("ReferencedSOPInstanceUID") for it in resp.get("FailedSOPSequence", [])]
    stored = [str(it.ReferencedSOPInstanceUID) for it in resp.get("ReferencedSOPSequence", [])]
    if failed:
        raise PacsError(f"The server refused {len(failed)} of {len(datasets)} instances "
                        f"pushed into study {short_uid(study)}.")
    return stored


@dataclass
class PullResult:
    """What :func:`pull` did: the case, how much it fetched, what it pushed, the time per
    step in seconds ("qido", "wado", "analyze", "stow")."""
    case: CaseResult
    series: list[str]
    instances: int
    bytes: int
    pushed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def pull(url: str, study: str, *, series: str | None = None, organ: str = "auto",
         out="runs", formats=None, push_results: bool = False, auth: str = "none",
         auth_file=None, ca_bundle=None, max_download: int = MAX_DOWNLOAD, tmp_dir=None,
         env=None, say: Callable[[str], None] | None = None, **case_options) -> PullResult:
    """Pull ``study`` from the DICOMweb server at ``url``, run :func:`run_case` on it and,
    with ``push_results``, store the SR and SC back into the study. ``case_options`` go to
    ``run_case`` (history, include_phi, deidentify, model, backend, ...). ``say``: one line
    per step (the CLI prints them).

    A report that could not be written is raised (after the temporary folder is removed);
    a history error is left in ``result.case.history_error`` for the caller.
    """
    from dicompipe.pipeline import run_case
    from dicompipe.util import remove_stale

    say = say or (lambda msg: None)
    for what, uid in (("--study", study), ("--series", series)):
        if uid is not None and not is_uid(uid):
            raise PacsError(f"{what} {uid!r} is not a DICOM UID (digits and dots).")
    fmts = with_dicom(formats) if push_results else formats
    dw = client(url, read_credentials(auth, auth_file, env), ca_bundle)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    uids = find_series(dw, study, series)
    timings["qido"] = round(time.perf_counter() - t, 3)
    say(f"QIDO-RS: {len(uids)} series to retrieve from study {short_uid(study)} "
        f"({timings['qido']:.2f} s)")
    base = Path(tmp_dir) if tmp_dir else Path(tempfile.gettempdir())
    remove_stale(base, PREFIX)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    try:
        t = time.perf_counter()
        n, size = retrieve(dw, study, uids, folder, max_download)
        timings["wado"] = round(time.perf_counter() - t, 3)
        say(f"WADO-RS: {n} instances, {size / 2**20:.1f} MiB ({timings['wado']:.2f} s)")
        t = time.perf_counter()
        case = run_case(folder, organ=organ, out=out, formats=fmts, **case_options)
        timings["analyze"] = round(time.perf_counter() - t, 3)
        say(f"analysis and reports: {timings['analyze']:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res = PullResult(case, uids, n, size, timings=timings)
    if case.report_error is not None:
        raise case.report_error
    if push_results:
        t = time.perf_counter()
        res.pushed = push(dw, case.run_dir, study)
        timings["stow"] = round(time.perf_counter() - t, 3)
        say(f"STOW-RS: {len(res.pushed)} instances stored in study {short_uid(study)} "
            f"({timings['stow']:.2f} s)")
    return res
