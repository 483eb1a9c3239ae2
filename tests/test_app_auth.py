"""Authentication, roles and CORS (``--conf auth_users``, ``--conf cors_origins``): the user store and its CLI, the
rule table and tokens in-process, then one real server driven as Slicer's plugin and OHIF would."""

from __future__ import annotations

import asyncio
import io
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import requests
from fastapi import FastAPI
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel_server import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))

from lib.auth import ADMIN, ANNOTATOR, PUBLIC, Guard, load_secret, rule_for  # noqa: E402
from lib.security import bound_host, install_security, is_loopback, parse_origins, warn_if_exposed  # noqa: E402
from lib.settings import AppSettings  # noqa: E402
from lib.users import User, UserStore, hash_password, main, verify_password, write_users  # noqa: E402

PASSWORDS = {"alice": "alice-password", "root": "root-password"}
ALLOWED = "https://viewer.example"


def _users_file(folder: Path) -> Path:
    path = folder / "users.json"
    users = {"alice": User("alice", hash_password(PASSWORDS["alice"]), (ANNOTATOR,))}
    users["root"] = User("root", hash_password(PASSWORDS["root"]), (ADMIN,))
    write_users(path, users)
    return path


# --- the user store and its CLI ---


def test_password_hashes_are_salted_and_checked() -> None:
    hashed = hash_password("s3cret-pass")
    assert hashed.startswith("scrypt$") and hashed != hash_password("s3cret-pass")  # a new salt each time
    assert verify_password("s3cret-pass", hashed) and not verify_password("s3cret-pasS", hashed)
    assert not verify_password("s3cret-pass", "bcrypt$garbage") and not verify_password("x", "scrypt$1$2")


def test_cli_writes_a_private_file_and_the_store_checks_roles(tmp_path, monkeypatch) -> None:
    path = tmp_path / "site" / "users.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO("annotator-pass\n"))
    assert main(["--file", str(path), "add", "ann", "--password-stdin"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("boss-password\n"))
    assert main(["--file", str(path), "add", "boss", "--role", "admin", "--password-stdin"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not list(path.parent.glob(".users.json.*"))
    store = UserStore(path)
    assert store.authenticate("ann", "annotator-pass").roles == (ANNOTATOR,)
    assert store.authenticate("ann", "wrong-password") is None and store.authenticate("nobody", "x") is None
    boss = store.get("boss")
    assert boss.may(ADMIN) and boss.may(ANNOTATOR) and not store.get("ann").may(ADMIN)
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    with pytest.raises(SystemExit, match="at least 8"):
        main(["--file", str(path), "add", "ann", "--password-stdin"])
    assert main(["--file", str(path), "remove", "boss"]) == 0
    assert store.get("boss") is None  # the server re-reads the file when it changes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the users file"),
        ("{not json", "not a users file"),
        ('{"users": {"bob": {"password": "x", "roles": ["root"]}}}', "user 'bob' has roles"),
        ('{"users": {}}', "no users; add one with"),
    ],
)
def test_bad_users_file_stops_the_start_up(tmp_path, content, message) -> None:
    path = tmp_path / "users.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        AppSettings.from_conf({"auth_users": str(path)})


def test_options_are_checked() -> None:
    assert parse_origins(" https://a.example , http://b.example:8080/") == [
        "https://a.example",
        "http://b.example:8080",
    ]
    for bad in ("*", "https://a.example/path", "a.example"):
        with pytest.raises(ValueError, match="not web origins"):
            AppSettings.from_conf({"cors_origins": bad})
    with pytest.raises(ValueError, match="auth_token_minutes must be > 0"):
        AppSettings.from_conf({"auth_token_minutes": "0"})


# --- rules, tokens, the bound host ---


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("POST", "/auth/token", PUBLIC),
        ("GET", "/", PUBLIC),
        ("GET", "/ohif/index.html", PUBLIC),
        ("GET", "/authx", ANNOTATOR),
        ("GET", "/info/", ANNOTATOR),
        ("POST", "/infer/medsam3_auto", ANNOTATOR),
        ("PUT", "/datastore/label", ANNOTATOR),
        ("GET", "/train/", ANNOTATOR),
        ("POST", "/train/medsam3", ADMIN),
        ("DELETE", "/datastore/label", ADMIN),
        ("HEAD", "/logs/gpu", ADMIN),
        ("PUT", "/model/medsam3", ADMIN),
    ],
)
def test_rule_table(method, path, role) -> None:
    assert rule_for(method, path).role == role


def test_tokens_expire_and_follow_the_store(tmp_path) -> None:
    secret_file = tmp_path / "key"
    secret = load_secret(secret_file)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and load_secret(secret_file) == secret
    path = _users_file(tmp_path)
    guard = Guard(UserStore(path), secret, minutes=5)
    token = guard.login("alice", PASSWORDS["alice"])
    assert guard.bearer(f"bearer {token}").name == "alice" and guard.login("alice", "nope") is None
    assert guard.bearer(token) is None and guard.bearer(f"Bearer {token}x") is None
    expired = jwt.encode({"sub": "alice", "ver": guard.bearer(f"Bearer {token}").fingerprint, "exp": 1}, secret)
    assert guard.bearer(f"Bearer {expired}") is None
    assert Guard(UserStore(path), b"another-key" * 4, minutes=5).bearer(f"Bearer {token}") is None
    time.sleep(0.01)  # a new mtime for the store's change check
    write_users(path, {"alice": User("alice", hash_password("changed-password"), (ANNOTATOR,))})
    assert guard.bearer(f"Bearer {token}") is None  # a password change revokes earlier tokens


def test_exposed_server_warns_loudly(capsys) -> None:
    assert bound_host(["monailabel", "start_server", "--app", "a"]) == "0.0.0.0"  # start_server's default
    assert bound_host(["x", "--host", "10.0.0.5"]) == "10.0.0.5" and bound_host(["x", "--host=::1"]) == "::1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("server.example")
    warn_if_exposed("127.0.0.1", authenticated=False, tls=False)
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0", authenticated=False, tls=False)
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err
    warn_if_exposed("0.0.0.0", authenticated=True, tls=False)
    assert "unencrypted" in capsys.readouterr().err


def test_without_auth_nothing_changes_but_cors(monkeypatch) -> None:
    """No ``auth_users``: no token is asked for, and another site's page gets no CORS grant (was: any origin)."""
    monkeypatch.setattr(sys, "argv", ["monailabel", "start_server", "--host", "127.0.0.1"])
    app = FastAPI()
    app.get("/info/")(lambda: {"ok": True})
    install_security(AppSettings.from_conf({}), datastore=None, server=app)

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/info/", headers={"Origin": "https://evil.example"})

    response = asyncio.run(get())
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# --- a real server with auth_users ---


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("auth_server")
    conf = ["--conf", "model_size", "tiny", "--conf", "checkpoint", "random"]
    conf += ["--conf", "auth_users", str(_users_file(root)), "--conf", "cors_origins", ALLOWED]
    yield from start_server(root, *conf)


@pytest.fixture(scope="module")
def tokens(server) -> dict[str, dict[str, str]]:
    return {name: {"Authorization": f"Bearer {_login(server[0], name)}"} for name in PASSWORDS}


def _login(url: str, name: str) -> str:
    form = {"username": name, "password": PASSWORDS[name], "grant_type": "password"}
    response = requests.post(f"{url}/auth/token", data=form, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "bearer"
    return response.json()["access_token"]


@pytest.mark.slow
def test_log_in(server, tokens) -> None:
    url = server[0]
    assert requests.get(f"{url}/auth/", timeout=10).json()["enabled"] is True
    wrong = requests.post(f"{url}/auth/token", data={"username": "alice", "password": "nope"}, timeout=30)
    unknown = requests.post(f"{url}/auth/token", data={"username": "mallory", "password": "nope"}, timeout=30)
    assert wrong.status_code == unknown.status_code == 401 and wrong.json() == unknown.json()  # no hint which
    valid = requests.get(f"{url}/auth/token/valid", headers=tokens["alice"], timeout=10)
    assert valid.status_code == 200 and valid.json()["roles"] == [ANNOTATOR]
    assert requests.get(f"{url}/auth/token/valid", timeout=10).status_code == 401
    assert requests.get(f"{url}/", timeout=10).status_code == 200  # API docs and OHIF's files need no token
    assert requests.get(f"{url}/ohif/", timeout=10).status_code == 200


@pytest.mark.slow
def test_every_route_needs_a_token(server, tokens) -> None:
    url = server[0]
    missing = requests.get(f"{url}/info/", timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{url}/info/", headers={"Authorization": "Bearer not.a.token"}, timeout=10).status_code == 401
    assert requests.get(f"{url}/info/", headers=tokens["alice"], timeout=30).status_code == 200


@pytest.mark.slow
def test_annotator_and_admin_roles(server, tokens) -> None:
    url, studies = server
    alice, root = tokens["alice"], tokens["root"]
    infer = requests.post(
        f"{url}/infer/medsam3_auto?image=ct_ras", data={"params": '{"labels": "liver"}'}, headers=alice, timeout=120
    )
    assert infer.status_code == 200, infer.text
    label = (studies.parent / "phantoms" / "ct_ras_label.nii.gz").read_bytes()
    saved = requests.put(
        f"{url}/datastore/label?image=ct_ras", files={"label": ("ct_ras.nii.gz", label)}, headers=alice, timeout=60
    )
    assert saved.status_code == 200, saved.text
    assert requests.post(f"{url}/train/medsam3", json={}, headers=alice, timeout=10).status_code == 403
    assert requests.delete(f"{url}/datastore/?id=ct_lps", headers=alice, timeout=10).status_code == 403
    assert requests.get(f"{url}/logs/", headers=alice, timeout=10).status_code == 403
    assert requests.get(f"{url}/logs/", headers=root, timeout=10).status_code == 200
    image = (studies / "ct_psr.nii.gz").read_bytes()

    def upload(image_id: str, headers: dict[str, str]) -> int:
        files = {"file": ("upload.nii.gz", image)}
        return requests.put(f"{url}/datastore/?image={image_id}", files=files, headers=headers, timeout=60).status_code

    assert upload("ct_ras", alice) == 403  # labelled: replacing it would drop its label
    assert upload("..%2Fescaped", alice) == 403
    assert upload("new_ct", alice) == 200 and upload("new_ct", alice) == 200  # Slicer re-uploads on every run
    assert requests.delete(f"{url}/datastore/?id=new_ct", headers=root, timeout=30).status_code == 200


@pytest.mark.slow
def test_monailabel_client_with_a_token(server) -> None:
    """The client that Slicer's plugin mirrors: /auth/ says on, log in, then every call carries the token."""
    client = MONAILabelClient(server[0])
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException, match="Status: 401"):
        client.info()
    client.update_auth(client.auth_token("alice", PASSWORDS["alice"]))
    assert client.auth_valid_token() and "medsam3_auto" in client.info()["models"]
    result_file, result = client.infer("medsam3_auto", "ct_lps", {"labels": "liver", "result_extension": ".nrrd"})
    assert Path(result_file).stat().st_size > 0 and "label_names" in result
    assert client.save_label("ct_lps", result_file)["label"] == "ct_lps"
    assert client.datastore()["objects"]["ct_lps"]["labels"]


@pytest.mark.slow
def test_cors_allow_list(server, tokens) -> None:
    url = server[0]
    evil = requests.get(f"{url}/info/", headers={**tokens["alice"], "Origin": "https://evil.example"}, timeout=30)
    assert evil.status_code == 200 and "access-control-allow-origin" not in evil.headers
    allowed = requests.get(f"{url}/info/", headers={**tokens["alice"], "Origin": ALLOWED}, timeout=30)
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "access-control-allow-credentials" not in allowed.headers
    preflight = {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "authorization"}
    ok = requests.options(f"{url}/datastore/label", headers={**preflight, "Origin": ALLOWED}, timeout=10)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    denied = requests.options(
        f"{url}/datastore/label", headers={**preflight, "Origin": "https://evil.example"}, timeout=10
    )
    assert "access-control-allow-origin" not in denied.headers
    assert (
        requests.get(f"{url}/info/", headers={"Origin": ALLOWED}, timeout=10).headers.get("access-control-allow-origin")
        == ALLOWED
    )  # a 401 keeps its CORS headers, so the page can read why


def test_browser_log_in_sets_a_same_site_cookie_for_ohif(server) -> None:
    """OHIF (served by this server at /ohif/) sends no token: the log-in page's cookie authenticates its calls."""
    url = server[0]
    assert "password" in requests.get(f"{url}/auth/login?next=/ohif/", timeout=30).text
    wrong = requests.post(
        f"{url}/auth/login", data={"username": "alice", "password": "nope", "next": "/ohif/"}, timeout=30
    )
    assert wrong.status_code == 401 and "medsam3_token" not in wrong.headers.get("set-cookie", "")
    browser = requests.Session()
    answer = browser.post(
        f"{url}/auth/login",
        data={"username": "alice", "password": PASSWORDS["alice"], "next": "//evil.example/x"},
        allow_redirects=False,
        timeout=30,
    )
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and answer.headers["location"] == "/ohif/"  # never another site
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert browser.get(f"{url}/info/", timeout=30).status_code == 200
    assert browser.get(f"{url}/logs/", timeout=30).status_code == 403  # the annotator's role, as with a token
    token = browser.cookies["medsam3_token"]  # another app's cookies on the same host come first
    others = {"Cookie": f'ui=dark mode; prefs={{"x":1}}; medsam3_token={token}'}
    assert requests.get(f"{url}/info/", headers=others, timeout=30).status_code == 200
    assert requests.get(f"{url}/info/", timeout=30).status_code == 401
