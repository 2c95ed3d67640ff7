"""``dicompipe listen``: a DICOM receiver (C-STORE SCP and Verification) that analyses
every series it is sent.

How a series goes through:

1. each instance is written as received (no re-encoding) into a spool folder of its series,
   ``<spool>/series-<hash>-*/<hash of SOP UID>.dcm`` (names carry no UID);
2. a series is complete once ``settle_s`` seconds pass without a new instance of it;
3. complete series wait in a bounded queue (``queue_size``) for one worker, which calls
   :func:`dicompipe.pipeline.run_case` (report folder under ``out``), sends the SR and SC
   to ``forward`` (C-STORE SCU) when set, and removes the spooled instances; a series whose
   analysis fails is moved to ``<spool>/failed/`` and the worker goes on.

Refusals are DICOM failure statuses, never silent drops: 0xA700 (out of resources) for the
first instance of a new series while the queue is full, when the spool is over
``max_spool_bytes``, when an instance cannot be written, or while stopping; 0xC000
(cannot understand) for an instance that cannot be decoded or lacks valid UIDs. Calling AE
titles can be restricted (``allow_aet``). Logs name series by :func:`short_uid` labels and
AE titles only, never a patient attribute or a UID. :meth:`Listener.stop` (SIGTERM in the
CLI) stops accepting, lets the worker finish its case and leaves every other series in the
spool, where the next start picks it up again.

Example::

    >>> lst = Listener(aet="DICOMPIPE", port=11112, out="runs", organ="auto",
    ...                case_options={"formats": "json,dicom", "history": False})
    >>> lst.start(); ...; lst.stop()
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicompipe.errors import PacsError
from dicompipe.pacs.common import Peer, check_aet, is_uid, result_files, short_uid, with_dicom

if TYPE_CHECKING:
    from dicompipe.pipeline import Analyzer

log = logging.getLogger("dicompipe.pacs")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SERIES_PREFIX = "series-"
FAILED = "failed"
#: seconds during which the same refusal is counted but not logged again
QUIET_S = 30.0
#: attributes whose values are kept (in memory) to cut them out of error messages
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber",
                "SeriesDescription", "StudyDescription", "InstitutionName",
                "ReferringPhysicianName", "StudyID")


@dataclass
class HeldSeries:
    """One series the listener holds: where its instances are, how many, when the last came.
    ``label`` is what logs say (hashed UIDs); ``texts`` are identifying values to redact."""
    study: str
    series: str
    folder: Path
    calling_aet: str = "?"
    sops: set[str] = field(default_factory=set)
    bytes: int = 0
    busy: int = 0
    last: float = field(default_factory=time.monotonic)
    texts: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"series {short_uid(self.series)} of study {short_uid(self.study)}"


@dataclass
class Outcome:
    """What the worker did with one series: ``run_dir`` (None on failure), the verdict
    label, ``error`` (redacted text), seconds from its last instance to the result, and the
    number of instances forwarded."""
    label: str
    run_dir: Path | None = None
    verdict: str | None = None
    error: str | None = None
    latency_s: float = 0.0
    forwarded: int = 0


def _texts(ds) -> set[str]:
    out = set()
    for k in _IDENTIFYING:
        try:
            v = ds.get(k)
        except Exception:  # noqa: BLE001 - an undecodable value is simply not kept
            continue
        for t in (v if isinstance(v, Sequence) and not isinstance(v, str) else [v]):
            if t is not None and len(str(t).strip()) >= 3:
                out.add(str(t).strip())
    return out


def _hash_name(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:20]


class Listener:
    """The receiver, its spool, its queue and its worker (see the module doc).

    ``case_options`` go to :func:`run_case` (formats, history, include_phi, deidentify,
    model, backend, ...); with ``forward`` the "dicom" format is always written. A failed
    forward is tried again ``forward_retries`` times, ``forward_wait_s`` apart, doubling
    (a PACS restarting or briefly busy); after that the results stay in the run folder.
    """

    def __init__(self, *, aet: str = "DICOMPIPE", host: str = "127.0.0.1", port: int = 11112,
                 out="runs", organ: str = "auto", spool=None, forward: Peer | None = None,
                 allow_aet=None, settle_s: float = 10.0, queue_size: int = 4,
                 max_spool_bytes: int = 8 * 1024 ** 3, case_options: dict | None = None,
                 forward_retries: int = 2, forward_wait_s: float = 5.0):
        self.aet = check_aet(aet)
        self.host, self.port = host, int(port)
        self.out = Path(out)
        self.organ = organ
        self.spool = Path(spool) if spool else self.out / ".dicompipe-spool"
        self.forward = forward
        self.forward_retries, self.forward_wait_s = max(0, int(forward_retries)), float(forward_wait_s)
        self.allow_aet = [check_aet(a, "--allow-aet") for a in (allow_aet or [])]
        if settle_s <= 0 or queue_size < 1:
            raise PacsError("--settle must be > 0 seconds and --queue at least 1.")
        self.settle_s = float(settle_s)
        self.max_spool_bytes = int(max_spool_bytes)
        self.case_options = dict(case_options or {})
        self._analyzer: Analyzer | None = None
        if forward is not None:
            self.case_options["formats"] = with_dicom(self.case_options.get("formats"))
        self.outcomes: list[Outcome] = []
        self.refused = {"queue_full": 0, "spool_full": 0, "malformed": 0, "stopping": 0,
                        "write_error": 0}
        self._queue: queue.Queue[HeldSeries] = queue.Queue(maxsize=queue_size)
        self._receiving: dict[tuple[str, str], HeldSeries] = {}
        self._waiting: list[HeldSeries] = []       # complete, not yet in the queue
        self._spool_bytes = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._stopping = False
        self._current: HeldSeries | None = None
        self._server: Any = None          # pynetdicom's ThreadedAssociationServer
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._full_logged = False
        self._quiet: dict[str, tuple[float, int]] = {}

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> Listener:
        """Resume what the spool holds, start the worker, the watcher and the server."""
        try:
            from pynetdicom import AE, evt
        except ImportError as e:
            raise PacsError("dicompipe listen needs the pacs extra: pip install "
                            f"'dicompipe[pacs]' ({e.name} is missing).") from e
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            (self.spool / FAILED).mkdir(exist_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PacsError(f"Cannot create the spool or output folder: {e.strerror or e} "
                            f"({e.filename}).") from e
        self._resume()
        ae = AE(ae_title=self.aet)
        ae.maximum_associations = 16
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 60, 60
        if self.allow_aet:
            ae.require_calling_aet = self.allow_aet
        self._add_contexts(ae)
        handlers: list = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted)]
        self._start_worker()
        self._watcher = threading.Thread(target=self._watch, name="dicompipe-watch", daemon=True)
        self._watcher.start()
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=handlers)
        except OSError as e:
            self._stop.set()
            raise PacsError(f"Cannot listen on {self.host}:{self.port}: {e.strerror or e}.") from e
        log.info("listening as %s on %s:%d (settle %.1f s, queue %d%s%s)", self.aet,
                 *self.address, self.settle_s, self._queue.maxsize,
                 f", forward to {self.forward}" if self.forward else "",
                 f", calling AEs {', '.join(self.allow_aet)}" if self.allow_aet else "")
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on (port 0 asks the system for a free one)."""
        return self._server.server_address[:2] if self._server else (self.host, self.port)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let the worker finish its case, keep the rest in the spool."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        log.info("stopping: no new associations; finishing the case in progress")
        if self._server is not None:
            self._server.shutdown()
            for assoc in list(getattr(self._server, "active_associations", [])):
                assoc.abort()
        self._stop.set()
        for t in (self._watcher, self._worker):
            if t is not None:
                t.join(timeout)
        with self._lock:
            kept = len(self._receiving) + len(self._waiting) + self._queue.qsize()
        refused = ", ".join(f"{k} {v}" for k, v in self.refused.items() if v)
        log.info("stopped: %d case(s) done; %d series kept in the spool for the next start%s",
                 len(self.outcomes), kept, f"; instances refused: {refused}" if refused else "")

    def wait(self, n: int, timeout: float) -> list[Outcome]:
        """Block until ``n`` outcomes exist (or ``timeout`` s pass); returns them."""
        end = time.monotonic() + timeout
        with self._changed:
            while len(self.outcomes) < n and time.monotonic() < end:
                self._changed.wait(max(0.0, min(0.5, end - time.monotonic())))
            return list(self.outcomes)

    def serve_forever(self, stop_event: threading.Event) -> None:
        """Start, wait until ``stop_event`` is set (the CLI's SIGTERM/SIGINT), then stop."""
        self.start()
        try:
            while not stop_event.wait(0.5):
                pass
        finally:
            self.stop()

    # -- association events (pynetdicom threads) -----------------------------------------

    def _add_contexts(self, ae) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        for ctx in StoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)

    @staticmethod
    def _calling(event) -> str:
        try:
            return str(event.assoc.requestor.ae_title).strip() or "?"
        except Exception:  # noqa: BLE001
            return "?"

    def _on_accepted(self, event) -> None:
        log.info("association from %s (%s) accepted", self._calling(event),
                 event.assoc.requestor.address)

    def _on_rejected(self, event) -> None:
        log.warning("association from %s (%s) rejected%s", self._calling(event),
                    event.assoc.requestor.address,
                    " (calling AE not in --allow-aet)" if self.allow_aet else "")

    def _on_aborted(self, event) -> None:
        log.warning("association from %s aborted", self._calling(event))

    def _on_store(self, event) -> int:
        """C-STORE: spool the instance, or refuse it with a failure status (and a log line)."""
        calling = self._calling(event)
        try:
            ds = event.dataset
            study, series, sop = (str(ds.get(k) or "") for k in
                                  ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            texts = _texts(ds)
        except Exception as e:  # noqa: BLE001 - any decoding error is the sender's file
            return self._refuse("malformed", CANNOT_UNDERSTAND, "a malformed instance from %s: "
                                "cannot decode it (%s)", calling, type(e).__name__)
        if not (is_uid(study) and is_uid(series) and is_uid(sop)):
            return self._refuse("malformed", CANNOT_UNDERSTAND, "an instance from %s without "
                                "valid Study/Series/SOP Instance UIDs", calling)
        with self._lock:
            if self._stopping:
                return self._refuse("stopping", OUT_OF_RESOURCES, "an instance from %s: "
                                    "stopping", calling)
            held = self._receiving.get((study, series))
            if held is None and (self._queue.full() or self._waiting):
                return self._refuse("queue_full", OUT_OF_RESOURCES, "series %s from %s: the "
                                    "queue is full (%d waiting); out of resources",
                                    short_uid(series), calling,
                                    self._queue.qsize() + len(self._waiting))
            if self._spool_bytes > self.max_spool_bytes:
                return self._refuse("spool_full", OUT_OF_RESOURCES, "an instance from %s: the "
                                    "spool holds more than %d MiB; out of resources", calling,
                                    self.max_spool_bytes >> 20)
            if held is None:
                try:
                    folder = Path(tempfile.mkdtemp(prefix=f"{SERIES_PREFIX}{_hash_name(series)}-",
                                                   dir=self.spool))
                except OSError as e:
                    return self._refuse("write_error", OUT_OF_RESOURCES, "series %s: cannot "
                                        "create its spool folder (%s)", short_uid(series),
                                        e.strerror or e)
                held = HeldSeries(study, series, folder, calling)
                self._receiving[(study, series)] = held
                log.info("receiving %s from %s", held.label, calling)
            held.busy += 1
            held.last = time.monotonic()
            held.texts |= texts
        try:
            size = self._write(held.folder / f"{_hash_name(sop)}.dcm", event.encoded_dataset())
        except OSError as e:
            return self._refuse("write_error", OUT_OF_RESOURCES, "an instance of %s: cannot "
                                "write it to the spool (%s)", held.label, e.strerror or e)
        finally:
            with self._lock:
                held.busy -= 1
                held.last = time.monotonic()
        with self._lock:
            if sop not in held.sops:
                held.sops.add(sop)
                held.bytes += size
                self._spool_bytes += size
        return SUCCESS

    def _refuse(self, why: str, status: int, msg: str, *args) -> int:
        """Count a refusal and log it; the same line is logged at most once every
        :data:`QUIET_S` seconds (a refused series is refused instance by instance)."""
        text = f"refused {msg % args} -> status 0x{status:04X}"
        now = time.monotonic()
        with self._lock:
            self.refused[why] += 1
            last, skipped = self._quiet.get(text, (-QUIET_S, 0))
            if now - last < QUIET_S:
                self._quiet[text] = (last, skipped + 1)
                return status
            self._quiet[text] = (now, 0)
        log.warning(text + (f" ({skipped} more like it before)" if skipped else ""))
        return status

    @staticmethod
    def _write(path: Path, data: bytes) -> int:
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return len(data)

    # -- completion and the worker -------------------------------------------------------

    def _watch(self) -> None:
        tick = min(0.5, self.settle_s / 4)
        while not self._stop.wait(tick):
            self._complete_idle()
            if self._worker is not None and not self._worker.is_alive() and not self._stopping:
                log.error("the worker stopped unexpectedly; starting a new one")
                self._start_worker()

    def _complete_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for key, held in list(self._receiving.items()):
                if held.busy == 0 and now - held.last >= self.settle_s:
                    del self._receiving[key]
                    self._waiting.append(held)
                    log.info("%s complete: %d instance(s) from %s", held.label, len(held.sops),
                             held.calling_aet)
            while self._waiting:
                try:
                    self._queue.put_nowait(self._waiting[0])
                except queue.Full:
                    if not self._full_logged:
                        log.warning("queue full: %d complete series wait; new series are "
                                    "refused (0xA700) until the worker catches up",
                                    len(self._waiting))
                        self._full_logged = True
                    break
                self._waiting.pop(0)
                self._full_logged = False

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="dicompipe-worker", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                held = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._current, handled = held, False
            try:
                self._process(held)
                handled = True
            finally:
                if not handled:          # the thread is dying (BaseException): keep the series
                    self._failed(held, "the worker crashed")
                self._current = None

    def _process(self, held: HeldSeries) -> None:
        from dicompipe.phi import Redactor
        from dicompipe.pipeline import Analyzer

        scrub = Redactor(roots=[held.folder], texts=sorted(held.texts)).text
        log.info("analysing %s (%d instances)", held.label, len(held.sops))
        try:
            if self._analyzer is None:      # bundles and compiled models kept across cases
                self._analyzer = Analyzer(**self.case_options)
            res = self._analyzer.run_case(held.folder, organ=self.organ, out=self.out)
            if res.report_error is not None:
                raise res.report_error
            if res.run_dir is None:
                raise PacsError("run_case wrote no report folder")
        except Exception as e:  # noqa: BLE001 - one bad series never stops the listener
            self._failed(held, f"{type(e).__name__}: {scrub(str(e))}")
            return
        run_dir = res.run_dir
        outcome = Outcome(held.label, run_dir, res.analysis.verdict.label)
        if res.history_error is not None:
            log.warning("%s: the case history was not written (%s)", held.label,
                        type(res.history_error).__name__)
        if self.forward is not None:
            try:
                outcome.forwarded = self._send_results(run_dir, held.label, scrub)
                log.info("%s: sent %d result instance(s) to %s", held.label, outcome.forwarded,
                         self.forward)
            except Exception as e:  # noqa: BLE001 - the results stay in the run folder
                outcome.error = f"forwarding failed: {scrub(str(e))}"
                log.error("%s: forwarding to %s failed (%s); the results stay in %s",
                          held.label, self.forward, scrub(str(e)), run_dir.name)
        outcome.latency_s = round(time.monotonic() - held.last, 2)
        shutil.rmtree(held.folder, ignore_errors=True)
        self._release(held)
        log.info("%s done: %s %s -> %s (%.1f s after its last instance)", held.label,
                 res.analysis.organ, outcome.verdict, run_dir.name, outcome.latency_s)
        self._record(outcome)

    def _send_results(self, run_dir: Path, label: str, scrub) -> int:
        """Send the run's DICOM results to ``forward``, with the retries; the last error
        is raised. A stopping listener does not wait for another try."""
        from dicompipe.pacs import dimse

        peer = self.forward
        assert peer is not None
        wait, tries = self.forward_wait_s, 0
        while True:
            try:
                return dimse.send(result_files(run_dir), peer, self.aet)
            except Exception as e:  # noqa: BLE001 - tried again, then raised
                tries += 1
                if tries > self.forward_retries or self._stop.is_set():
                    raise
                log.warning("%s: forwarding to %s failed (%s); trying again in %.0f s "
                            "(%d of %d)", label, peer, scrub(str(e)), wait, tries,
                            self.forward_retries)
                if self._stop.wait(wait):
                    raise
                wait *= 2

    def _failed(self, held: HeldSeries, why: str) -> None:
        target = self.spool / FAILED / held.folder.name
        try:
            os.replace(held.folder, target)
        except OSError:
            target = held.folder
        self._release(held)
        log.error("%s failed: %s; its instances are kept in %s/%s", held.label, why,
                  FAILED, target.name)
        self._record(Outcome(held.label, error=why,
                             latency_s=round(time.monotonic() - held.last, 2)))

    def _release(self, held: HeldSeries) -> None:
        with self._lock:
            self._spool_bytes = max(0, self._spool_bytes - held.bytes)

    def _record(self, outcome: Outcome) -> None:
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    def _resume(self) -> None:
        """Series left in the spool by an earlier run go to the queue as complete."""
        from pydicom import dcmread
        for part in self.spool.glob(f"{SERIES_PREFIX}*/*.part"):
            part.unlink(missing_ok=True)
        for folder in sorted(p for p in self.spool.glob(f"{SERIES_PREFIX}*") if p.is_dir()):
            files = sorted(folder.glob("*.dcm"))
            if not files:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                ds = dcmread(files[0], stop_before_pixels=True)
                held = HeldSeries(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder,
                                  "spool", {f.stem for f in files},
                                  sum(f.stat().st_size for f in files), texts=_texts(ds))
            except Exception:  # noqa: BLE001 - keep it for a person to look at
                os.replace(folder, self.spool / FAILED / folder.name)
                log.error("a spooled series could not be read; moved to %s/%s", FAILED,
                          folder.name)
                continue
            self._spool_bytes += held.bytes
            self._waiting.append(held)
            log.info("resuming %s from the spool (%d instances)", held.label, len(files))
