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
                      max_upload_mb: int = MAX_UPLOAD_MB) -> list[str]:
    """The ``streamlit run`` command line for the app (headless, no telemetry, themed)."""
    flags = {
        "server.port": port,
        "server.address": host,
        "server.headless": "true",
        "server.maxUploadSize": max_upload_mb,
        "server.fileWatcherType": "none",
        "server.runOnSave": "false",
        "browser.gatherUsageStats": "false",
        "client.toolbarMode": "minimal",
        "client.showErrorDetails": "type",
        **THEME,
    }
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH)]
    cmd += [f"--{k}={v}" for k, v in flags.items()]
    return cmd


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
    cmd = streamlit_command(port=port, host=host)
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
