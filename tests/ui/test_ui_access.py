"""The web app on a shared server: data roots, refusal to serve others without sign-in,
the sign-in page, per-user history and report folders, the job queue (issue 20).

AppTest drives the app with the library replaced by fakes (tests/test_ui.py's
``fake_library``); the history is the real SQLite one where separation is tested.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import types
from pathlib import Path

import pytest

# looked up, not imported: importing streamlit at collection is slow
if importlib.util.find_spec("streamlit") is None:
    pytest.skip("the web app needs the [ui] extra (streamlit)", allow_module_level=True)

from analysis_factory import make_analysis  # noqa: E402
from test_ui import _app, _texts  # noqa: E402 - fake_library comes from conftest.py

from dicompipe import history, report  # noqa: E402
from dicompipe.cli import main as cli_main  # noqa: E402
from dicompipe.errors import DicompipeError  # noqa: E402
from dicompipe.ui import access, services  # noqa: E402
from dicompipe.ui import queue as jobs  # noqa: E402

TOKEN = "s3cret-token-for-tests-0123456789"
ENV_KEYS = (access.ROOTS_ENV, access.TOKEN_ENV, access.TOKEN_FILE_ENV, access.AUTH_ENV,
            access.INSECURE_ENV, jobs.MAX_JOBS_ENV, services.BACKEND_ENV)
REAL_RECORD, REAL_ROWS = history.record, services.history_rows


@pytest.fixture
def clean_env(monkeypatch):
    """No access settings from the machine; whatever a test or the launcher sets is undone."""
    for k in ENV_KEYS:
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    return monkeypatch


@pytest.fixture
def roots(tmp_path, clean_env):
    """A data root holding case/1.dcm, a folder outside it, and a link escaping it."""
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "case").mkdir(parents=True)
    (root / "case" / "1.dcm").write_bytes(b"x")
    outside.mkdir()
    (outside / "1.dcm").write_bytes(b"x")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    clean_env.setenv(access.ROOTS_ENV, str(root))
    return types.SimpleNamespace(root=root, outside=outside)


def _folder(at, text: str):
    at.radio(key="source").set_value("folder")
    at.run()
    at.text_input(key="folder").input(text)
    at.run()
    assert not at.exception, at.exception
    return [e.value for e in at.error]


# --------------------------------------------------------------------------- data roots
def test_folder_inside_the_root_is_analysed(fake_library, roots):
    at = _app()
    assert _folder(at, str(roots.root / "case")) == []
    assert at.selectbox(key="series_key").value == "s1"
    assert _folder(at, "case") == []                      # relative to the root
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    assert fake_library["analyze"][-1]["path"] == str((roots.root / "case").resolve())


@pytest.mark.parametrize("which", ["outside", "missing", "dotdot", "symlink", "relative-dotdot"])
def test_folder_outside_the_root_is_refused_without_saying_if_it_exists(fake_library, roots,
                                                                       which, monkeypatch):
    seen = []
    monkeypatch.setattr(services, "discover", lambda p: seen.append(p))
    text = {"outside": str(roots.outside), "missing": str(roots.outside / "no-such-case"),
            "dotdot": str(roots.root / ".." / "elsewhere"), "symlink": str(roots.root / "escape"),
            "relative-dotdot": "../elsewhere"}[which]
    at = _app()
    (msg,) = _folder(at, text)
    assert seen == []                                     # nothing outside was read
    assert msg == str(access.refused(text, (roots.root.resolve(),)))   # one message for all
    assert "not a folder or file inside the allowed data folders" in msg
    assert at.button(key="run").disabled


def test_a_link_inside_the_folder_leaving_the_root_is_refused(fake_library, roots, monkeypatch):
    leak = make_analysis()
    leak.series.instances[0].file = str(roots.outside / "1.dcm")     # read through a link
    monkeypatch.setattr(services, "discover", lambda p: ([leak.series], leak.series))
    at = _app()
    (msg,) = _folder(at, str(roots.root / "case"))
    assert "not a folder or file inside the allowed data folders" in msg
    assert at.button(key="run").disabled


def test_without_a_root_only_uploads_are_offered(fake_library, clean_env):
    at = _app()
    assert not [r for r in at.radio if r.key == "source"]             # no "Folder on server"
    assert not [t for t in at.text_input if t.key == "folder"]
    assert at.file_uploader(key="upload") is not None


def test_insecure_mode_says_so_on_every_page(fake_library, clean_env):
    clean_env.setenv(access.INSECURE_ENV, "1")
    at = _app()
    assert [e.value for e in at.error] == [access.INSECURE_BANNER]
    assert at.file_uploader(key="upload") is not None    # no sign-in asked


# --------------------------------------------------------------------------- refusing to start
@pytest.fixture
def no_server(monkeypatch):
    """os.execv / subprocess.call recorded instead of starting Streamlit."""
    started = []
    monkeypatch.setattr(os, "name", "posix")
    monkeypatch.setattr(os, "execv", lambda exe, cmd: started.append((list(cmd), dict(os.environ))))
    monkeypatch.setattr("subprocess.call", lambda cmd: 0)
    return started


def test_ui_refuses_0000_without_sign_in(clean_env, no_server, capsys):
    assert cli_main(["ui", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "Refusing to serve on '0.0.0.0' without sign-in" in err
    assert "DICOMPIPE_UI_TOKEN" in err and "--insecure-no-auth" in err
    assert no_server == []                                # Streamlit never started
    with pytest.raises(DicompipeError, match="Refusing"):
        access.check_launch("0.0.0.0", access.Settings())
    assert access.check_launch("localhost", access.Settings()) == []
    assert access.check_launch("127.0.0.1", access.Settings()) == []


def test_ui_on_0000_with_token_insecure_or_loopback(clean_env, no_server, capsys, tmp_path):
    clean_env.setenv(access.TOKEN_ENV, TOKEN)
    assert cli_main(["ui", "--host", "0.0.0.0", "--data-root", str(tmp_path)]) == 0
    (cmd, env), = no_server
    assert TOKEN not in " ".join(cmd)                     # never on a command line
    assert "--client.showErrorDetails=none" in cmd
    assert env[access.ROOTS_ENV] == str(tmp_path.resolve())
    err = capsys.readouterr().err
    assert "WARNING: listening on 0.0.0.0" in err and "TLS reverse proxy" in err
    assert TOKEN not in err
    clean_env.delenv(access.TOKEN_ENV)
    assert cli_main(["ui", "--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    err = capsys.readouterr().err
    assert "!" * 40 in err and "NO SIGN-IN" in err
    assert no_server[-1][1][access.INSECURE_ENV] == "1"
    assert cli_main(["ui"]) == 0                          # localhost: no warning, as before
    assert "WARNING" not in capsys.readouterr().err
    assert access.INSECURE_ENV not in no_server[-1][1]


def test_token_file_and_bad_settings(clean_env, no_server, tmp_path, capsys):
    tf = tmp_path / "tokens"
    tf.write_text(f"# team\nalice:{TOKEN}\nbob:{TOKEN[::-1]}\n")
    tf.chmod(0o600)
    assert cli_main(["ui", "--host", "0.0.0.0", "--token-file", str(tf)]) == 0
    assert no_server[-1][1][access.TOKEN_FILE_ENV] == str(tf)
    s = access.from_env(no_server[-1][1])
    assert s.mode == "token" and set(s.user_tokens) == {"alice", "bob"}
    assert access.check_sign_in(s, "alice", TOKEN) == "alice"
    assert access.check_sign_in(s, "bob", TOKEN) is None             # alice's token, bob's name
    assert access.check_sign_in(s, "alice", "wrong") is None
    tf.write_text("short\n")
    assert cli_main(["ui", "--host", "0.0.0.0", "--token-file", str(tf)]) == 2
    assert "shorter than" in capsys.readouterr().err
    assert cli_main(["ui", "--data-root", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert len(no_server) == 1


def test_backend_is_checked_for_every_organ_at_start_and_used_by_every_analysis(
        clean_env, no_server, capsys, tmp_path):
    from dicompipe.errors import ModelError
    built = []

    def fake_backend(bundle, name):
        if name == "onnx-int8":
            raise ModelError(f"Bundle {bundle!r} ships no int8 calibration")
        built.append((bundle, name))
    clean_env.setattr(services, "load_bundle", lambda organ: f"{organ}-bundle")
    clean_env.setattr("dicompipe.model.backends.get_backend", fake_backend)
    assert cli_main(["ui", "--backend", "openvino-int8"]) == 0
    assert built == [("lung-bundle", "openvino-int8"), ("pancreas-bundle", "openvino-int8")]
    assert no_server[-1][1][services.BACKEND_ENV] == "openvino-int8"
    assert cli_main(["ui", "--backend", "onnx-int8"]) == 2          # refused before serving
    assert "--backend onnx-int8 cannot be used for the lung model" in capsys.readouterr().err
    assert len(no_server) == 1
    assert cli_main(["ui"]) == 0 and services.BACKEND_ENV not in no_server[-1][1]

    got = {}
    clean_env.setattr("dicompipe.pipeline.run_case", lambda path, **kw: got.update(kw))
    clean_env.setenv("DICOMPIPE_UI_OUT", str(tmp_path))
    for env, want in ((None, "auto"), ("openvino-int8", "openvino-int8")):
        if env:
            clean_env.setenv(services.BACKEND_ENV, env)
        services.run_case(tmp_path, organ="lung", series=None, include_phi=False,
                          select_slices=True, progress=None)
        assert got["backend"] == want


# --------------------------------------------------------------------------- sign-in
def test_sign_in_with_a_token(fake_library, roots, capsys, monkeypatch):
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    asked = []
    monkeypatch.setattr(services, "history_rows",
                        lambda since=None, organ=None, user=None: asked.append(user) or [])
    at = _app()
    assert "Sign in" in _texts(at)
    assert not at.file_uploader and not at.sidebar.radio  # nothing else before signing in
    assert not at.tabs
    at.text_input(key="signin_user").input("alice")
    at.text_input(key="signin_token").input("not-the-token-at-all")
    at.button(key="signin_go").click()
    at.run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == ["Unknown user name or access token."]
    assert not at.tabs
    at.text_input(key="signin_user").input("alice")
    at.text_input(key="signin_token").input(TOKEN)
    at.button(key="signin_go").click()
    at.run()
    assert not at.exception, at.exception
    assert "Signed in as <b>alice</b>" in _texts(at)
    assert at.file_uploader(key="upload") is not None and at.tabs
    assert TOKEN not in _texts(at) and TOKEN not in capsys.readouterr().err
    assert TOKEN not in str(at.session_state.to_dict())   # not kept in the session
    assert asked and set(asked) == {"alice"}              # the history asked for alice's only
    assert _folder(at, "case") == [] and "chosen" in at.session_state.keys()
    at.button(key="signout").click()
    at.run()
    assert "Sign in" in _texts(at) and not at.tabs
    assert "chosen" not in at.session_state.keys()        # nothing left for the next user


def _signed_in(user: str) -> object:
    at = _app()
    at.text_input(key="signin_user").input(user)
    at.text_input(key="signin_token").input(TOKEN)
    at.button(key="signin_go").click()
    at.run()
    assert not at.exception, at.exception
    return at


def test_each_user_sees_only_their_cases_and_runs_under_their_folder(
        fake_library, roots, tmp_path, monkeypatch):
    db = tmp_path / "history.sqlite"
    monkeypatch.setenv("DICOMPIPE_HISTORY", str(db))
    monkeypatch.setenv("DICOMPIPE_UI_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    monkeypatch.setattr(history, "record", REAL_RECORD)
    monkeypatch.setattr(services, "history_rows", REAL_ROWS)
    written = []

    def write_reports(a, out, **kw):                   # report.write, behind run_case
        d = Path(out) / f"run-{len(written) + 1}"
        d.mkdir(parents=True)
        (d / "report.txt").write_text(f"report of {Path(out).name}\n")
        written.append(d)
        return d
    monkeypatch.setattr(report, "write", write_reports)
    bob_case = history.record(make_analysis(), report_dir=None, db=db, user="bob")
    cli_case = history.record(make_analysis(), report_dir=None, db=db)

    at = _signed_in("alice")
    assert _folder(at, str(roots.root / "case")) == []
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    assert written == [tmp_path / "runs" / "users" / "alice" / "run-1"]
    (mine,) = history.list_records(db, user="alice")
    assert mine["report_dir"] == str(written[0])
    ids = list(at.dataframe[-1].value["id"])               # the Case history tab
    assert ids == [mine["id"]] and bob_case not in ids and cli_case not in ids
    assert str(tmp_path / "runs") not in _texts(at)        # report folder shown by name only
    assert "Saved in …/run-1" in _texts(at)

    at = _signed_in("bob")
    assert list(at.dataframe[-1].value["id"]) == [bob_case]


# --------------------------------------------------------------------------- queue
def _run_in_thread(limiter, user, hold: threading.Event, events: list):
    def work():
        try:
            with limiter.slot(user, on_wait=lambda pos: events.append((user, pos)), poll=0.02):
                events.append((user, "run"))
                hold.wait(600)                  # the test sets it
        except jobs.Busy:
            events.append((user, "busy"))
    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def _until(cond, seconds=10.0):
    import time
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_limiter_one_job_per_user_a_few_at_once_first_come_first_served():
    lim = jobs.JobLimiter(max_running=1)
    go_a, go_b, go_c = threading.Event(), threading.Event(), threading.Event()
    ev: list = []
    ta = _run_in_thread(lim, "alice", go_a, ev)
    _until(lambda: ("alice", "run") in ev)
    tb = _run_in_thread(lim, "bob", go_b, ev)
    _until(lambda: ("bob", 1) in ev)                       # first in line
    tc = _run_in_thread(lim, "carol", go_c, ev)
    _until(lambda: ("carol", 2) in ev)                     # second in line
    with pytest.raises(jobs.Busy, match="already have an analysis"):
        with lim.slot("alice"):
            pass
    with pytest.raises(jobs.Busy):                         # waiting counts too
        with lim.slot("bob"):
            pass
    assert lim.counts() == (1, 2)
    go_a.set()
    ta.join(5)
    _until(lambda: ("bob", "run") in ev)
    assert ("carol", "run") not in ev
    _until(lambda: ("carol", 1) in ev)                     # moved up
    go_b.set(), go_c.set()
    tb.join(5), tc.join(5)
    assert ev.index(("bob", "run")) < ev.index(("carol", "run"))
    assert lim.counts() == (0, 0)


def test_limiter_gives_the_place_back_when_the_page_goes_away():
    class PageGone(BaseException):                         # like Streamlit's StopException
        pass

    lim = jobs.JobLimiter(max_running=1)
    with lim.slot("alice"):
        with pytest.raises(PageGone):
            with lim.slot("bob", on_wait=lambda pos: (_ for _ in ()).throw(PageGone())):
                pass
        assert lim.counts() == (1, 0)                       # bob's place is gone
    with pytest.raises(PageGone):
        with lim.slot("alice"):
            raise PageGone()                               # the page closed mid-analysis
    assert lim.counts() == (0, 0)
    with lim.slot("alice"):                                # alice may run again
        assert lim.counts() == (1, 0)
    two = jobs.JobLimiter(max_running=2)
    with two.slot("a"), two.slot("b"):
        assert two.counts() == (2, 0)


def test_the_app_says_the_place_in_the_queue(fake_library, roots, monkeypatch):
    lim = jobs.JobLimiter(max_running=1)
    monkeypatch.setattr(jobs, "_LIMITER", lim)
    shown = []
    real_slot = lim.slot

    def slot(user, on_wait=None, poll=1.0):
        def wait(pos):
            on_wait(pos)
            shown.append(pos)
            release.set()
        return real_slot(user, on_wait=wait, poll=0.05)
    monkeypatch.setattr(lim, "slot", slot)
    hold, release = threading.Event(), threading.Event()
    other = _run_in_thread(lim, "someone-else", hold, [])
    _until(lambda: lim.counts() == (1, 0))
    threading.Thread(target=lambda: (release.wait(600), hold.set()), daemon=True).start()
    at = _app()
    assert _folder(at, "case") == []
    at.button(key="run").click()
    at.run()
    other.join(5)
    assert not at.exception, at.exception
    assert shown and shown[0] == 1
    assert fake_library["analyze"], "the analysis ran once the slot was free"
    assert lim.counts() == (0, 0)
