"""The dicompipe web app (``dicompipe ui``): upload a CT, see the verdict, scroll the slices
with Grad-CAM, keep the case history. Research use only.

Needs the optional extra ``pip install 'dicompipe[ui]'`` (Streamlit). Everything shown is
computed by the library (:func:`dicompipe.analyze`, :mod:`dicompipe.report`,
:mod:`dicompipe.history`); the app only arranges it.

Example::

    $ dicompipe ui --port 8501 --host localhost
    >>> from dicompipe.ui import streamlit_command
    >>> streamlit_command(port=8600)[:4]          # the command launch() runs
    ['...python', '-m', 'streamlit', 'run']
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from dicompipe.errors import DicompipeError
from dicompipe.ui import access

APP_PATH = Path(__file__).resolve().parent / "app.py"

#: largest single upload the server accepts, in MB (the app also bounds the total)
MAX_UPLOAD_MB = int(os.environ.get("DICOMPIPE_UI_MAX_UPLOAD_MB", "1024"))

#: calm, clinical theme (passed as flags so no config file has to be found on disk)
THEME = {
    "theme.base": "light",
    "theme.primaryColor": "#0f6e7a",
    "theme.backgroundColor": "#ffffff",
    "theme.secondaryBackgroundColor": "#f2f5f7",
    "theme.textColor": "#1f2a37",
    "theme.font": "sans serif",
}


def streamlit_command(port: int = 8501, host: str = "localhost",
                      max_upload_mb: int = MAX_UPLOAD_MB, error_details: str = "type") -> list[str]:
    """The ``streamlit run`` command line for the app (headless, no telemetry, themed).

    ``error_details``: what an unexpected error shows in the page ("type", or "none").
    """
    flags = {
        "server.port": port,
        "server.address": host,
        "server.headless": "true",
        "server.maxUploadSize": max_upload_mb,
        "server.fileWatcherType": "none",
        "server.runOnSave": "false",
        "browser.gatherUsageStats": "false",
        "client.toolbarMode": "minimal",
        "client.showErrorDetails": error_details,
        **THEME,
    }
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH)]
    cmd += [f"--{k}={v}" for k, v in flags.items()]
    return cmd


def configure(args, host: str, env=None):
    """Check the team settings of ``dicompipe ui`` (roots, sign-in) and put them into
    ``env`` (``os.environ``) for the app; returns ``(Settings, warnings)``.

    Raises :class:`DicompipeError` when the app would serve others without sign-in.
    Example: ``configure(Namespace(data_root=["/data/ct"]), "0.0.0.0")`` raises without
    ``$DICOMPIPE_UI_TOKEN``.
    """
    env = os.environ if env is None else env
    roots = access.parse_roots(getattr(args, "data_root", None) or ())
    if roots:
        env[access.ROOTS_ENV] = os.pathsep.join(map(str, roots))
    else:
        env.pop(access.ROOTS_ENV, None)
    token_file = getattr(args, "token_file", None)
    if token_file:
        env[access.TOKEN_FILE_ENV] = str(Path(token_file).expanduser().resolve())
    env.pop(access.AUTH_ENV, None)
    if getattr(args, "oidc", False):
        problem = access.oidc_problem()
        if problem:
            raise DicompipeError(f"--oidc: Streamlit's sign-in cannot be used: {problem}.")
        env[access.AUTH_ENV] = "oidc"
    env.pop(access.INSECURE_ENV, None)
    if getattr(args, "insecure_no_auth", False) and not access.is_loopback(host):
        env[access.INSECURE_ENV] = "1"
    if getattr(args, "max_jobs", None):
        from dicompipe.ui.queue import MAX_JOBS_ENV
        env[MAX_JOBS_ENV] = str(max(1, int(args.max_jobs)))
    from dicompipe.ui.services import BACKEND_ENV
    backend = getattr(args, "backend", None)
    if backend and backend != "auto":
        env[BACKEND_ENV] = backend
    else:
        env.pop(BACKEND_ENV, None)
    settings = access.from_env(env)
    warnings = access.check_launch(host, settings)
    if env.get(access.TOKEN_FILE_ENV) and (w := access.token_file_warning(env[access.TOKEN_FILE_ENV])):
        warnings.append(w)
    return settings, warnings


def check_backend(name: str) -> None:
    """Build backend ``name`` for each organ's bundle once, so that one the bundles cannot use
    (int8 without a validated calibration, bf16 without native support, a missing extra)
    stops the launch instead of failing every analysis; it also fills the compiled-model
    cache. Raises :class:`DicompipeError`.

    >>> check_backend("openvino-int8")      # both built-in bundles ship a validated int8
    """
    from dicompipe import organs
    from dicompipe.model.backends import get_backend
    from dicompipe.ui import services
    for organ in organs.names():
        try:
            get_backend(services.load_bundle(organ), name)
        except DicompipeError as e:
            raise DicompipeError(f"--backend {name} cannot be used for the {organ} model: {e}") from e


def launch(args) -> int:
    """Run the app with ``streamlit run`` on ``args.host``:``args.port`` until interrupted.

    Raises :class:`DicompipeError` with the install command when Streamlit is missing.
    """
    if importlib.util.find_spec("streamlit") is None:
        raise DicompipeError(
            "The web app needs Streamlit, which is not installed: "
            "pip install 'dicompipe[ui]' (or pip install streamlit), then run dicompipe ui again.")
    port = int(getattr(args, "port", 8501) or 8501)
    host = getattr(args, "host", "localhost") or "localhost"
    settings, warnings = configure(args, host)        # may refuse to start
    backend = getattr(args, "backend", None)
    if backend and backend != "auto":
        print(f"dicompipe ui: preparing --backend {backend} for every organ's model…", file=sys.stderr)
        check_backend(backend)
    cmd = streamlit_command(port=port, host=host,
                            error_details="none" if settings.hide_paths else "type")
    for w in warnings:
        if w == access.INSECURE_BANNER:                   # loud: framed
            print("!" * 78, f"dicompipe ui: {w}", "!" * 78, sep="\n", file=sys.stderr)
        else:
            print(f"dicompipe ui: WARNING: {w}", file=sys.stderr)
    print(f"dicompipe ui: serving on http://{host}:{port}  (Ctrl+C to stop)", file=sys.stderr)
    sys.stderr.flush()
    if os.name == "posix":
        # become the server: a signal to this process (Ctrl+C, kill, a test's terminate())
        # then reaches Streamlit itself and no orphan server is left behind
        os.execv(cmd[0], cmd)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
