"""The dicompipe Streamlit app (start it with ``dicompipe ui``). Research use only.

Flow: input (upload or server folder) -> discovered series, the chosen one and why ->
organ -> Analyse (progress per stage) -> verdict card, class chart, per-slice curve,
slice viewer with Grad-CAM, downloads; a second tab holds the case history.
Everything shown comes from the library through :mod:`dicompipe.ui.services`.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
import uuid

import streamlit as st

from dicompipe import organs
from dicompipe.errors import DicompipeError
from dicompipe.types import RESEARCH_USE
from dicompipe.ui import access, inputs, services, signin, views
from dicompipe.ui import queue as jobs

log = logging.getLogger("dicompipe.ui")

STAGES = {"discover": "Reading headers", "load": "Loading the series",
          "preprocess": "Preparing slices", "predict": "Classifying slices",
          "explain": "Grad-CAM", "report": "Writing reports", "history": "Recording the case",
          "done": "Done"}
ORGAN_NAMES = {"auto": "Auto (from headers / content)",
               **{o.name: o.title for o in organs.all_organs()}}

st.set_page_config(page_title="dicompipe · CT analysis", page_icon=":material/radiology:",
                   layout="wide", initial_sidebar_state="expanded")
st.markdown(views.CSS, unsafe_allow_html=True)
ss = st.session_state


# --------------------------------------------------------------------------- helpers
def _error_text(e: BaseException) -> str:
    if isinstance(e, DicompipeError):
        return _shown(str(e))
    log.error("unexpected error in the app", exc_info=e)
    if SETTINGS.hide_paths:                      # the message itself may name server paths
        return (f"Something went wrong ({type(e).__name__}). The server log has the details; "
                "please report it with the input type you used.")
    return (f"Something went wrong ({type(e).__name__}: {e}). The server log has the details; "
            "please report it with the input type you used.")


def _shown(text) -> str:
    """``text`` as the page may show it: server paths outside the data roots cut when the
    app serves a team (:func:`dicompipe.ui.access.scrub`)."""
    return access.scrub(str(text), SETTINGS.roots) if SETTINGS.hide_paths else str(text)


def _who() -> dict:
    """``{"user": id}`` for the library calls when someone is signed in, else ``{}``."""
    return {"user": USER} if USER else {}


def _queued(note, fn, *args) -> None:
    """Run ``fn(*args)`` in this user's slot of the server's job queue, showing the place in
    line in ``note`` (an ``st.empty``) while waiting; the slot is given back however ``fn``
    ends (page closed included)."""
    def waiting(pos: int):
        running, _ = jobs.limiter().counts()
        note.info(f"Waiting for a free slot: position {pos} in the queue ({running} "
                  "analysis(es) running on this server).", icon=":material/hourglass_top:")
    try:
        with jobs.limiter().slot(USER or ss.setdefault("_sid", uuid.uuid4().hex), on_wait=waiting):
            note.empty()
            fn(*args)
    except jobs.Busy as e:
        ss.run_error = str(e)


@st.cache_resource(show_spinner="Loading the model (once per server process)…")
def _bundle(organ: str, override: str | None, allow: bool):
    return services.load_bundle(organ)


def _preloaded(organ: str):
    """Bundles kept in memory across runs and sessions; None lets analyze() load/complain."""
    def one(o):
        try:
            return _bundle(o, services.model_override(), services.allow_untrained())
        except DicompipeError:
            return None                          # analyze() raises the clear message itself
    if organ != "auto":
        return one(organ)
    got = {o: b for o in organs.names() if (b := one(o)) is not None}
    return got or None


def _series_label(s) -> str:
    what = s.series_description or " ".join(filter(None, [s.modality, s.orientation])) or s.key
    bits = ([f"series {s.series_number}"] if s.series_number is not None else []) + [what]
    if s.kind != "images":
        bits.append(f"{s.n_instances} images")
    if s.slice_thickness:
        bits.append(f"{s.slice_thickness:g} mm")
    return " · ".join(bits)


def _series_table(candidates, chosen, include_phi: bool):
    import pandas as pd
    return pd.DataFrame(views.series_rows(candidates, chosen, include_phi))


# --------------------------------------------------------------------------- input
def _stage_input(source: str):
    """Stage the current upload / folder once per change; discover its series."""
    if source == "upload":
        files = ss.get("upload") or []
        sig = tuple((f.name, f.size) for f in files)
        if not files:
            _drop_input()
            return
        if ss.get("input_sig") == sig:
            return
        _drop_input()
        ss.input_sig = sig
        try:
            staged = inputs.stage_uploads((f.name, f.getvalue()) for f in files)
        except DicompipeError as e:
            ss.input_error = str(e)
            return
        ss.staged = staged
        ss.input_path, ss.input_label = str(staged.path), staged.label
    else:
        folder = (ss.get("folder") or "").strip()
        if not folder:
            _drop_input()
            return
        sig = ("folder", folder)
        if ss.get("input_sig") == sig:
            return
        _drop_input()
        ss.input_sig = sig
        ss.input_path, ss.input_label = folder, folder
        try:
            ss.input_path = str(access.resolve_in_roots(folder, SETTINGS.roots))
        except access.AccessDenied as e:
            ss.input_error = str(e)
            return
    try:
        ss.candidates, ss.chosen = services.discover(ss.input_path)
    except Exception as e:  # noqa: BLE001 - shown as one message
        ss.input_error = _error_text(e)
    if source != "upload" and access.escaping_files(ss.get("candidates") or (), SETTINGS.roots):
        ss.pop("candidates", None)
        ss.pop("chosen", None)
        ss.input_error = str(access.refused(folder, SETTINGS.roots))   # a link leaving the roots


def _drop_input():
    staged = ss.pop("staged", None)
    if staged is not None:
        staged.cleanup()
    for k in ("input_sig", "input_path", "input_label", "candidates", "chosen", "input_error",
              "result", "run_error", "series_key"):
        ss.pop(k, None)


# --------------------------------------------------------------------------- analysis
def _run(organ: str, include_phi: bool, all_slices: bool):
    ss.pop("result", None)
    ss.pop("run_error", None)
    chosen = ss.get("chosen")
    key = ss.get("series_key")
    series = None
    if key and chosen is not None and key != chosen.key:
        picked = next((s for s in ss.candidates if s.key == key), None)
        series = (picked.series_instance_uid if picked is not None and picked.series_instance_uid
                  else key)
    staged = ss.get("staged")
    if staged is not None and not staged.alive:   # analysed before: stage the upload again
        try:
            staged = inputs.stage_uploads((f.name, f.getvalue()) for f in ss.get("upload") or [])
        except DicompipeError as e:
            ss.run_error = str(e)
            return
        ss.staged, ss.input_path = staged, str(staged.path)
    t0 = time.perf_counter()
    slot = st.empty()
    with slot.status("Analysing…", expanded=True) as status:
        bar = st.progress(0.0, text="Starting")
        done = st.empty()
        seen: list[str] = []

        def progress(stage: str, fraction: float, message: str):
            if stage not in seen:
                seen.append(stage)
                done.markdown("  \n".join(
                    ("✓ " if i < len(seen) - 1 else "… ") + STAGES.get(s, s.title())
                    for i, s in enumerate(seen)))
            bar.progress(min(max(float(fraction), 0.0), 1.0),
                         text=f"{STAGES.get(stage, stage.title())} — {message}")

        try:
            case = services.run_case(ss.input_path, organ=organ, series=series,
                                     include_phi=include_phi, select_slices=not all_slices,
                                     progress=progress, model=_preloaded(organ), **_who())
        except Exception as e:  # noqa: BLE001 - one clear message, no traceback
            status.update(label="Analysis stopped", state="error", expanded=False)
            ss.run_error = _error_text(e)
            return
        a, run_dir = case.analysis, case.run_dir
        report_error = _error_text(case.report_error) if case.report_error else None
        history_error = _error_text(case.history_error) if case.history_error else None
        bar.progress(1.0, text="Done")
        status.update(label="Analysis complete", state="complete", expanded=False)
    slot.empty()
    dl = {}
    if run_dir is not None:
        try:
            dl = services.downloads(run_dir)
        except OSError as e:
            report_error = _shown(f"Cannot read the report folder {run_dir}: {e}")
    ss.result = {"a": a, "run_dir": run_dir, "dl": dl, "report_error": report_error,
                 "history_error": history_error, "id": uuid.uuid4().hex[:8],
                 "seconds": time.perf_counter() - t0,
                 "input_label": ss.get("input_label", "")}
    ss.pop("slice", None)
    ss.pop("last_pick", None)
    if staged is not None:                       # the upload is no longer needed on disk
        staged.cleanup()


# --------------------------------------------------------------------------- result views
def _verdict(res, include_phi: bool):
    a = res["a"]
    left, right = st.columns([1.05, 1], gap="medium")
    with left:
        st.markdown(views.verdict_card_html(a), unsafe_allow_html=True)
    with right:
        st.markdown('<div class="dp-h">Probability per class</div>', unsafe_allow_html=True)
        st.altair_chart(views.prob_chart(a), width="stretch")
        s = a.series
        who = ""
        if include_phi and a.include_phi and (s.patient_name or s.patient_id):
            who = f" · patient {s.patient_name or ''} {s.patient_id or ''}".rstrip()
        took = f" · analysed in {res['seconds']:.1f} s" if res.get("seconds") else ""
        st.markdown(f'<div class="dp-caption">{res["input_label"]} · {_series_label(s)}{who}'
                    f'{took}</div>', unsafe_allow_html=True)
    if a.warnings:
        st.markdown(views.notes_small_html(a.warnings), unsafe_allow_html=True)


def _jump_to_key():
    pick = ss.get("key_jump")
    if pick:
        ss.slice = int(pick)
    ss.key_jump = None


def _viewer(res):
    a = res["a"]
    slices = a.batch.slices
    n = len(slices)
    if n == 0:
        st.info("No slices to show.")
        return
    keys = {k.z: k for k in a.verdict.key_slices}
    by_z = {s.z: s for s in slices}                  # slices are counted from 0 (z), as in
    z0, z1 = min(by_z), max(by_z)                     # report.txt and the report images
    if ss.get("slice") not in by_z:
        first = a.verdict.key_slices[0].z if a.verdict.key_slices else None
        ss.slice = first if first in by_z else z0

    img_col, ctl_col = st.columns([0.95, 1.1], gap="medium")
    with ctl_col:
        st.markdown('<div class="dp-h">Probability along the slices</div>', unsafe_allow_html=True)
        ev = st.altair_chart(views.z_curve(a, int(ss.slice), (z0, z1)), width="stretch",
                             height=170, on_select="rerun", selection_mode="pick",
                             key=f"zc-{res['id']}")
        picked = None
        try:
            pts = (ev.selection.get("pick") if ev is not None else None) or []
            picked = int(pts[0]["slice"]) if pts else None
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            picked = None
        if picked is not None and picked != ss.get("last_pick") and picked in by_z:
            ss.last_pick = picked
            ss.slice = picked
            st.rerun()
        if picked is None:
            ss.last_pick = None
        st.markdown('<div class="dp-caption" style="margin-top:-10px">Click a point to open that '
                    'slice · ◇ key slices behind the verdict</div>', unsafe_allow_html=True)
        s1, s2 = st.columns([1.25, 1])
        with s1:
            st.slider("Slice z (from 0)", z0, max(z1, z0), key="slice", disabled=z1 == z0)
        with s2:
            rank = {k.z: i for i, k in enumerate(a.verdict.key_slices, 1)}
            opts = [z for z in rank if z in by_z]            # in the order that ranked them
            st.selectbox("Jump to a key slice", [None] + opts, key="key_jump",
                         on_change=_jump_to_key, disabled=not opts,
                         format_func=lambda z: "—" if z is None else views.key_label(keys[z], rank[z]),
                         help=f"The key slices in rank order: P({a.verdict.evidence}) and, when the "
                              "slices were ranked inside the lung fields, the share of the slice's "
                              "Grad-CAM there.")
        if a.volume.windowed:
            win_name = None
            st.caption("PNG/JPG slices are already windowed; window presets do not apply.")
        else:
            win_name = st.segmented_control(
                "Window", list(views.WINDOWS), key="window",
                default=views.DEFAULT_WINDOW.get(a.organ, "Lung"))
        cams = a.cams
        label = a.verdict.evidence
        opacity = 0.5
        c2, c3, c4 = st.columns([1, 1.1, 1])
        with c2:
            st.markdown('<div style="height:1.9rem"></div>', unsafe_allow_html=True)
            show_cam = st.toggle("Grad-CAM", value=True, key="cam_on", disabled=cams is None)
        if cams is not None:
            with c3:
                labels = list(cams.labels)
                label = st.selectbox("Class to explain", labels, key=f"cam_label-{res['id']}",
                                     index=labels.index(a.verdict.evidence)
                                     if a.verdict.evidence in labels else 0)
            with c4:
                opacity = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="cam_opacity",
                                    disabled=not show_cam)
        else:
            st.caption("Grad-CAM was not computed for this analysis.")

    ms = by_z[int(ss.slice)]
    vz = ms.volume_z[len(ms.volume_z) // 2] if ms.volume_z else None
    with img_col:
        if vz is None:
            st.info("This model slice has no source image.")
            return
        window = None if a.volume.windowed else views.WINDOWS.get(
            win_name or views.DEFAULT_WINDOW.get(a.organ, "Lung"))
        cam = None
        if cams is not None and show_cam and ms.included and cams.scale.get(label, 0.0) > 0:
            cam = services.cam_display(a, label, vz)      # drawn as in the report images
        sx, sy = a.volume.image.GetSpacing()[:2]
        rgb = views.slice_rgb(a.volume.array[vz], window, cam, opacity, (sx, sy),
                              edges=views.orientation(a))
        st.image(rgb, width="stretch", output_format="PNG")
        inst = [i.instance_number for i in ms.sources if i.instance_number is not None]
        desc = [f"Slice z {ms.z} of {z0}–{z1} (counted from 0, as in the reports)"]
        if vz != ms.z:
            desc.append(f"CT slice z {vz}")
        if inst:
            desc.append("instance #" + ", ".join(map(str, inst[:3])) + ("…" if len(inst) > 3 else ""))
        if ms.included and ms.row is not None:
            table = _slice_probs(a, res["id"])
            p = table.get(ms.z, {})
            if p:
                desc.append(" · ".join(f"{l} {views.pct(v)}" for l, v in p.items()))
            if ms.z in keys:
                desc.append(f"key slice (evidence for {a.verdict.evidence})")
            ood = a.verdict.ood
            if ood is not None and ood.available and ms.row < len(ood.scores):
                out = ms.row in ood.out_rows
                desc.append(f"OOD score {ood.scores[ms.row]:.3g}"
                            + (" · out of distribution, left out of the verdict" if out else ""))
        st.markdown(f'<div class="dp-caption" data-testid="slice-caption">{" · ".join(desc)}</div>',
                    unsafe_allow_html=True)
        if not ms.included:
            st.markdown(views.notes_html(
                [ms.skip_reason or "skipped by slice selection"],
                "Not analysed: no prediction or Grad-CAM for this slice"), unsafe_allow_html=True)
        elif cam is not None:
            st.markdown(views.colorbar_html(label, cams.scale[label]), unsafe_allow_html=True)


def _slice_probs(a, rid: str) -> dict:
    """Calibrated per-slice probabilities by grid z (Analysis.slice_table), once per result."""
    if ss.get("_probs_id") != rid:
        ss._probs = {r["z"]: r.get("probabilities", {}) for r in a.slice_table()}
        ss._probs_id = rid
    return ss._probs


def _downloads(res, include_phi: bool):
    st.markdown("#### Report and downloads")
    if res.get("report_error"):
        st.error(f"The reports could not be written: {res['report_error']}")
    dl = res.get("dl") or {}
    cols = st.columns(4)
    specs = [("txt", "Report (TXT)"), ("json", "Analysis (JSON)"),
             ("png", "Annotated images (zip)"), ("zip", "Everything (zip)")]
    for col, (k, label) in zip(cols, specs):
        with col:
            if k in dl:
                name, data, mime = dl[k]
                st.download_button(label, data, file_name=name, mime=mime, key=f"dl-{k}",
                                   on_click="ignore", width="stretch", icon=":material/download:")
            else:
                st.button(label, disabled=True, key=f"dl-{k}-off", width="stretch")
    a = res["a"]
    bits = []
    if res.get("run_dir"):
        bits.append(f"Saved in {_shown(res['run_dir'])}")
    bits.append("patient identifiers included" if a.include_phi
                else "patient identifiers left out (turn on “Show patient identifiers” and "
                     "analyse again to include them)")
    if res.get("history_error"):
        bits.append(f"not recorded in the case history: {res['history_error']}")
    st.markdown(f'<div class="dp-caption">{" · ".join(bits)}</div>', unsafe_allow_html=True)
    if "txt" in dl:
        with st.expander("Read the report here"):
            st.code(dl["txt"][1].decode("utf-8", "replace"), language=None)


def _details(res, include_phi: bool):
    a = res["a"]
    with st.expander("Series, model and timings"):
        st.markdown(f"**Series found** — the chosen one is marked ●. Chosen because: "
                    f"{a.series.reason or '—'}")
        st.dataframe(_series_table(a.candidates, a.series, include_phi and a.include_phi),
                     hide_index=True, width="stretch")
        m = a.model
        st.markdown(f"**Model** {m.get('name', '?')} {m.get('version', '')} · "
                    f"sha256 `{str(m.get('sha256', ''))[:16]}…` · "
                    f"{'trained' if m.get('trained', True) else 'UNTRAINED (test weights)'}  \n"
                    f"Intended use: {m.get('intended_use', RESEARCH_USE)}")
        if a.timings:
            st.markdown("**Timings** " + " · ".join(f"{k} {v:.2f} s" for k, v in a.timings.items()))


# --------------------------------------------------------------------------- history
def _history_frame(rows: list[dict], include_phi: bool):
    """The history records as a readable table (the raw record stays in ``rows``)."""
    from pathlib import PurePath

    import pandas as pd

    out = []
    for r in rows:
        probs = r.get("probabilities") or {}
        label = r.get("label")
        when = pd.to_datetime(r.get("recorded"), errors="coerce", utc=True)
        d = {"id": r.get("id"),
             "recorded (UTC)": when.strftime("%Y-%m-%d %H:%M") if not pd.isna(when) else "—",
             "organ": r.get("organ"), "verdict": label,
             "probability": probs.get(label) if label else None,
             "uncertain": "yes" if r.get("uncertain") else "",
             "slices": r.get("n_slices"),
             "status": r.get("status") if r.get("status") != "done" else "",
             "patient": r.get("patient") or "—",
             "input": PurePath(str(r.get("input_path") or "")).name,
             "model": " ".join(str(x) for x in (r.get("model_name"), r.get("model_version")) if x)}
        if include_phi:
            d["patient_id"] = r.get("patient_id")
            d["patient_name"] = r.get("patient_name")
        out.append(d)
    return pd.DataFrame(out)


def _history_tab(include_phi: bool):
    from pathlib import Path

    import pandas as pd

    c1, c2, c3 = st.columns([1.2, 1, 1.4])
    with c1:
        today = _dt.date.today()
        rng = st.date_input("Analysed between", (today - _dt.timedelta(days=30), today),
                            key="h_dates", max_value=today)
    with c2:
        organ = st.selectbox("Organ", ["any", *organs.names()], key="h_organ")
    since = rng[0] if isinstance(rng, (tuple, list)) and rng else None
    until = rng[1] if isinstance(rng, (tuple, list)) and len(rng) == 2 else None
    try:
        rows = services.history_rows(since=since, organ=None if organ == "any" else organ,
                                     **_who())
    except Exception as e:  # noqa: BLE001
        st.error(f"The case history cannot be read: {_error_text(e)}")
        return
    if until is not None:
        end = pd.Timestamp(until + _dt.timedelta(days=1), tz="UTC")
        rows = [r for r in rows if not (pd.to_datetime(r.get("recorded"), errors="coerce",
                                                       utc=True) >= end)]
    with c3:
        verdicts = sorted({r.get("label") for r in rows if r.get("label")})
        chosen_v = st.multiselect("Verdict", verdicts, key="h_verdict", placeholder="any")
    if chosen_v:
        rows = [r for r in rows if r.get("label") in chosen_v]
    if not rows:
        st.markdown('<div class="dp-empty">No recorded cases match these filters.</div>',
                    unsafe_allow_html=True)
        return
    df = _history_frame(rows, include_phi)
    for col, empty in (("status", ""), ("uncertain", ""), ("patient", "—")):
        if not (df[col] != empty).any():          # say nothing rather than show empty columns
            df = df.drop(columns=col)
    ev = st.dataframe(
        df, hide_index=True, width="stretch", key="h_table", on_select="rerun",
        selection_mode="single-row",
        column_config={"probability": st.column_config.ProgressColumn(
                           "probability", format="percent", min_value=0.0, max_value=1.0),
                       "id": st.column_config.NumberColumn("#", width="small")})
    sel = list(getattr(getattr(ev, "selection", None), "rows", []) or [])
    if not sel:
        st.caption(f"{len(rows)} case(s). Select a row to open its report.")
        return
    row = rows[sel[0]]
    rd = row.get("report_dir")
    txt = Path(rd) / "report.txt" if rd else None
    if row.get("status") == "failed":
        st.info(f"Case {row.get('id')} failed: {row.get('reason') or 'no reason recorded'}")
    if txt is None or not txt.is_file():
        st.info(f"Case {row.get('id')} has no report on disk"
                + (f" (looked in {_shown(rd)})." if rd else "."))
        return
    data = txt.read_bytes()
    st.markdown(f"**Report of case {row.get('id')}** · {_shown(rd)}")
    st.download_button("Download this report (TXT)", data,
                       file_name=f"report-{row.get('id', '')}.txt", mime="text/plain",
                       on_click="ignore", key="h_dl", icon=":material/download:")
    st.code(data.decode("utf-8", "replace"), language=None)


# --------------------------------------------------------------------------- page
try:
    SETTINGS = access.from_env()
except DicompipeError:
    log.exception("the sign-in / data-root settings cannot be read")
    st.error("This server's access settings cannot be read; the server log has the details.")
    st.stop()
USER = signin.gate(SETTINGS)                     # the sign-in page stops here

with st.sidebar:
    st.markdown('<p class="dp-brand">dicompipe</p><p class="dp-sub">CT analysis with Grad-CAM · '
                'research use only</p>', unsafe_allow_html=True)
    source = (st.radio("Input", ["upload", "folder"], horizontal=True, key="source",
                       format_func={"upload": "Upload", "folder": "Folder on server"}.get)
              if SETTINGS.roots else "upload")   # no data root: uploads only
    if source == "upload":
        st.file_uploader("DICOM files, one zip of a DICOM folder, or PNG/JPG slices",
                         accept_multiple_files=True, key="upload",
                         help=f"Up to {inputs.MAX_TOTAL_BYTES // 2**20} MB in all. Files are "
                              "kept in a private temporary folder and removed after the analysis.")
    else:
        st.text_input("Folder or file on the server", key="folder",
                      placeholder=str(SETTINGS.roots[0] / "case-001"),
                      help="A DICOM folder (any layout), a zip, a DICOMDIR, PNG/JPG slices or NIfTI. "
                           "Read only; nothing is written there. Allowed folders: "
                           + ", ".join(map(str, SETTINGS.roots)))
    _stage_input(source)
    if ss.get("input_error"):
        st.error(ss.input_error)
    # what is needed to press Analyse comes first, so that the button stays above the fold
    # (1280x800) after an upload; the reason for the series and the options follow it
    chosen = ss.get("chosen")
    usable = []
    if chosen is not None:
        usable = [s for s in ss.candidates if s.usable] or [chosen]
        keys = [s.key for s in usable]
        by_key = {s.key: s for s in usable}
        if ss.get("series_key") not in keys:
            ss.series_key = chosen.key
        st.selectbox("Series", keys, key="series_key",
                     format_func=lambda k: _series_label(by_key[k]) + (" (chosen)" if k == chosen.key else ""))
    images_input = chosen is not None and chosen.kind == "images"
    organ = st.selectbox("Organ", list(ORGAN_NAMES), key="organ", format_func=ORGAN_NAMES.get)
    need_organ = images_input and organ == "auto"
    if need_organ:
        st.caption(f"PNG/JPG slices carry no headers: choose {' or '.join(organs.names())}.")
    run = st.button("Analyse", type="primary", width="stretch", key="run",
                    disabled=chosen is None or need_organ)
    if chosen is not None:
        st.caption(f"Series chosen automatically: {chosen.reason or '—'}"
                   + (f" · {len(ss.candidates) - len(usable)} other(s) not usable"
                      if len(ss.candidates) > len(usable) else ""))
    with st.expander("Options"):
        include_phi = st.toggle("Show patient identifiers", value=False, key="phi",
                                help="Off by default: names, IDs and dates stay out of the "
                                     "screen, the reports and the case history.")
        all_slices = st.toggle("Analyse every slice", value=False, key="all_slices",
                               help="Turn off slice selection (slices without the organ are "
                                    "normally skipped, each with its reason).")
    st.markdown(f'<div class="dp-disclaimer">{RESEARCH_USE}</div>', unsafe_allow_html=True)

tab_a, tab_h = st.tabs(["Analysis", "Case history"])
with tab_a:
    queue_note = st.empty()                      # always here, so the layout does not shift
    if run and chosen is not None and not need_organ:
        _queued(queue_note, _run, organ, include_phi, all_slices)
    if ss.get("run_error"):
        st.error(ss.run_error)
    res = ss.get("result")
    if res is not None:
        _verdict(res, include_phi)
        _viewer(res)
        _downloads(res, include_phi)
        _details(res, include_phi)
    elif chosen is not None and not ss.get("run_error"):
        st.markdown("#### Series found")
        st.dataframe(_series_table(ss.candidates, chosen, include_phi), hide_index=True,
                     width="stretch")
        st.markdown(f'<div class="dp-caption">Chosen (●): {chosen.reason or "—"}. Pick another '
                    'in the sidebar, choose the organ, then press <b>Analyse</b>.</div>',
                    unsafe_allow_html=True)
    elif not ss.get("input_error") and not ss.get("run_error"):
        st.markdown(
            '<div class="dp-empty"><b>Start with a CT</b><br>Upload DICOM files, a zip of a DICOM '
            'folder or PNG/JPG slices in the sidebar — or give a folder on this server. '
            'dicompipe picks the series, classifies every relevant slice, and shows the verdict '
            'with a calibrated probability and Grad-CAM explanations.</div>',
            unsafe_allow_html=True)
with tab_h:
    _history_tab(include_phi)
