"""The app's door: the sign-in page (access token or Streamlit's OIDC), the insecure banner.

:func:`gate` runs first on every page run; it returns the signed-in user id (None when the
app is local and open) or stops the page at the sign-in form. The token is compared with
``hmac.compare_digest`` (:func:`dicompipe.ui.access.check_sign_in`), never logged, never
shown, never kept in the session.

Example (in app.py)::

    >>> USER = signin.gate(settings)      # "alice", or None for a local, open app
"""
from __future__ import annotations

import logging
import time

import streamlit as st

from dicompipe.types import RESEARCH_USE
from dicompipe.ui import access

log = logging.getLogger("dicompipe.ui")


def gate(settings: access.Settings) -> str | None:
    """The user id, after the sign-in that ``settings`` asks for (stops the page before)."""
    ss = st.session_state
    mode = settings.mode
    if mode == "insecure":
        st.error(access.INSECURE_BANNER, icon=":material/warning:")
        return None
    if mode == "open":
        return None
    if mode == "oidc":
        if not st.user.is_logged_in:
            _page(lambda: st.button("Sign in", type="primary", on_click=st.login,
                                    key="signin_oidc", width="stretch"))
            st.stop()
        user = access.user_from_claims(st.user.to_dict())
        if not user:
            st.error("Your sign-in gave no e-mail or user id; ask the administrator.")
            st.stop()
        _signed_in(user, lambda: (ss.clear(), st.logout()))
        return user
    user = ss.get("_user")
    if user:
        _signed_in(user, ss.clear)           # nothing of this user's stays for the next one
        return user
    _page(lambda: _token_form(settings))
    st.stop()


def _page(body) -> None:
    _, mid, _ = st.columns([1, 1.2, 1])
    with mid:
        st.markdown('<p class="dp-brand">dicompipe</p><p class="dp-sub">CT analysis with '
                    'Grad-CAM · research use only</p>', unsafe_allow_html=True)
        st.markdown("#### Sign in")
        body()
        st.markdown(f'<div class="dp-disclaimer">{RESEARCH_USE}</div>', unsafe_allow_html=True)


def _token_form(settings: access.Settings) -> None:
    ss = st.session_state
    with st.form("signin", border=True, clear_on_submit=True):
        name = st.text_input("User name", key="signin_user", max_chars=64,
                             autocomplete="username")
        token = st.text_input("Access token", type="password", key="signin_token",
                              autocomplete="current-password")
        go = st.form_submit_button("Sign in", type="primary", width="stretch", key="signin_go")
    st.caption("Ask the person who runs this server for your access token.")
    if go:
        user = access.check_sign_in(settings, name, token)
        if user:
            log.info("signed in: %s", user)
            ss._user = user
            st.rerun()
        log.warning("failed sign-in for user name %r", (name or "")[:64])
        time.sleep(1.0)                                   # slows guessing down
        st.error("Unknown user name or access token.")


def _signed_in(user: str, sign_out) -> None:
    with st.sidebar:
        c1, c2 = st.columns([1.6, 1])
        c1.markdown(f'<div class="dp-caption" style="padding-top:.45rem">Signed in as '
                    f'<b>{_html(user)}</b></div>', unsafe_allow_html=True)
        c2.button("Sign out", key="signout", on_click=sign_out, width="stretch")


def _html(text: str) -> str:
    import html
    return html.escape(text, quote=True)
