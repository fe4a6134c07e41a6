"""Team mode: every page behind a sign-in, against password hashes kept in Streamlit secrets.

Team mode is on when the app's secrets (``.streamlit/secrets.toml``, or the files of Streamlit's
``secrets.files`` option) hold a ``[team.users]`` table of ``name = "<hash>"``; without it the app
is single-user and asks nothing. A hash is PBKDF2-HMAC-SHA256 (``hashlib``, 600,000 iterations,
a 16-byte random salt; OWASP's password storage cheat sheet), written
``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``; make one with ``python -m ui.auth NAME``
(asks the password twice, prints the line to paste). Passwords are never stored.

Until a session signs in, the app shows the sign-in form and nothing else: no page runs and the
navigation is not built. The signed-in name is what flags, assignment versions, trainings and
queued jobs record as their author (``current_user``).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import secrets
import sys

import streamlit as st

ALGORITHM = "pbkdf2_sha256"
ITERATIONS = 600_000
USER_KEY = "signed_in_user"


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The stored form of ``password``: ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{ALGORITHM}${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (``hash_password``'s form), in constant time; a
    malformed ``stored`` matches nothing."""
    try:
        algorithm, iterations, salt, digest = stored.split("$")
        if algorithm != ALGORITHM:
            return False
        ours = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
        return hmac.compare_digest(ours, bytes.fromhex(digest))
    except ValueError:
        return False


def team_users() -> dict[str, str]:
    """``{name: hash}`` of the secrets' ``[team.users]``; empty when there is none (single-user)."""
    try:
        users = st.secrets.get("team", {}).get("users", {})
    except FileNotFoundError:  # no secrets file at all
        return {}
    return {str(name): str(stored) for name, stored in users.items()}


def current_user() -> str | None:
    """The signed-in name of this session, None in single-user mode."""
    return st.session_state.get(USER_KEY)


def require_sign_in() -> str | None:
    """In team mode: the signed-in user, after showing the sign-in form and stopping the script
    until the session signs in; a Sign out button in the sidebar. Single-user mode: None."""
    users = team_users()
    if not users:
        return None
    user = current_user()
    if user in users:
        with st.sidebar:
            st.caption(f"Signed in as **{user}**")
            if st.button("Sign out", key="sign_out"):
                st.session_state.pop(USER_KEY, None)
                st.rerun()
        return user
    st.title("ISLE Workbench")
    st.write("Team mode: sign in to use the workbench.")
    with st.form("sign_in"):
        name = st.text_input("User", key="sign_in_user")
        password = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        if name in users and verify_password(password, users[name]):
            st.session_state[USER_KEY] = name
            st.rerun()
        st.error("Unknown user or wrong password.")
    st.stop()


def main() -> None:
    """``python -m ui.auth NAME``: print the ``[team.users]`` line for NAME with a new hash."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m ui.auth NAME")
    password = getpass.getpass(f"password for {sys.argv[1]}: ")
    if password != getpass.getpass("again: "):
        raise SystemExit("the passwords differ")
    print(f'{sys.argv[1]} = "{hash_password(password)}"   # under [team.users] in .streamlit/secrets.toml')


if __name__ == "__main__":
    main()
