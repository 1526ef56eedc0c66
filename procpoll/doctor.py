"""`procpoll doctor`: check the real setup, in order, and say how to fix each failure.

Credentials, the API and its signature check, the event mode, each sub-application,
each sink's destination and the ledger. Nothing is delivered and nothing is confirmed:
webhooks get a TCP (and TLS) connection, files and databases a write probe.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import ssl
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import SplitResult, urlsplit

import requests

from procpoll.config import Config
from procpoll.errors import ApiError, AuthError, ConfigError, LedgerError, TransientApiError
from procpoll.ledger_open import open_ledger
from procpoll.sinks.base import SinkConfig
from procpoll.vod import CredentialChain, Secrets, TencentVod, VodApi

CONNECT_TIMEOUT_S = 5.0

_AUTH_ADVICE = {
    "AuthFailure.SignatureFailure":
        "the SecretKey does not belong to this SecretId: copy the key again from the CAM "
        "console (API keys); look for a stray character or a key of another key pair",
    "AuthFailure.SecretIdNotFound":
        "VOD does not know this SecretId: it was deleted, disabled or mistyped; create or "
        "copy one in the CAM console (API keys)",
    "AuthFailure.InvalidSecretId":
        "the SecretId is malformed: copy it again from the CAM console (API keys)",
    "AuthFailure.SignatureExpire":
        "this host's clock is more than 5 minutes off: enable time sync "
        "(timedatectl set-ntp true) and check `timedatectl status`",
    "AuthFailure.TokenFailure":
        "the session token is missing, expired or belongs to other keys: renew the "
        "temporary credentials (or drop session-token when using permanent keys)",
    "AuthFailure.UnauthorizedOperation":
        "the key's CAM user may not call VOD: grant QcloudVODFullAccess or a policy allowing "
        "vod:PullEvents, vod:ConfirmEvents and vod:DescribeEventConfig",
    "UnauthorizedOperation":
        "the key's CAM user may not call VOD: grant QcloudVODFullAccess or a policy allowing "
        "vod:PullEvents, vod:ConfirmEvents and vod:DescribeEventConfig",
}


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: passed, failed (with what to do) or skipped (with why)."""

    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        """Whether the check ran and passed."""
        return self.status == "ok"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def _skip(name: str, why: str) -> Check:
    return Check(name, "skip", why)


class Doctor:
    """Runs every check of one config against the real world (or the emulator)."""

    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None,
                 client_factory: Callable[[CredentialChain], VodApi] | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.config = config
        self._environ = dict(os.environ if environ is None else environ)
        self.credentials = CredentialChain(config.credentials, self._environ)
        self._factory = client_factory or (lambda chain: TencentVod(config.vod, chain))
        self._connect_timeout_s = connect_timeout_s

    def run(self, out: TextIO) -> bool:
        """Print one line per check (and what to fix under a failure); True if all passed."""
        passed = True
        for check in self.checks():
            out.write(f"[{check.status}]{' ' * (5 - len(check.status))}{check.name}: "
                      f"{check.detail}\n")
            if check.fix:
                out.write(f"       fix: {check.fix}\n")
            out.flush()
            passed = passed and check.passed
        return passed

    def checks(self) -> Iterator[Check]:
        """The checks in order; later ones are skipped when what they need failed."""
        secrets, check = self._credentials()
        yield check
        yield from self._api(secrets)
        for index, sink in enumerate(self.config.sinks):
            yield self._sink(index, sink)
        if self.config.dead_letter.directory is not None:
            yield _writable_check("dead-letter", self.config.dead_letter.directory,
                                  directory=True, key="dead_letter.directory")
        yield self._ledger()

    # --- VOD ----------------------------------------------------------------------------

    def _credentials(self) -> tuple[Secrets | None, Check]:
        try:
            secrets = self.credentials.get()
        except ConfigError as exc:
            return None, _fail(
                "credentials", str(exc),
                "under systemd: put the keys in /etc/procpoll/secret-id and secret-key "
                "(LoadCredential=); by hand: export TENCENTCLOUD_SECRET_ID and "
                "TENCENTCLOUD_SECRET_KEY, or set [credentials] secret_id_file/secret_key_file")
        return secrets, _ok("credentials",
                            f"SecretId {_mask(secrets.secret_id)} from {_source(secrets)}")

    def _api(self, secrets: Secrets | None) -> Iterator[Check]:
        vod = self.config.vod
        apps: list[int | None] = list(vod.sub_app_ids) or [None]
        where = f"{vod.scheme}://{vod.endpoint}"
        if secrets is None:
            yield _skip("api", "no credentials to sign with")
            yield _skip("event mode", "the API was not reached")
            for app in vod.sub_app_ids:
                yield _skip(f"sub-app {app}", "the API was not reached")
            return
        api = self._factory(self.credentials)
        try:
            answers = {apps[0]: _describe(api, apps[0])}
            first = answers[apps[0]]
            if not (isinstance(first, ApiError) and _unanswered(first)):
                for other in apps[1:]:  # not when the API is not answering: a timeout each
                    answers[other] = _describe(api, other)
        finally:
            api.close()
        if isinstance(first, ApiError) and _unanswered(first):
            yield _fail("api", f"DescribeEventConfig at {where}: {first}",
                        _api_advice(first, vod.endpoint, apps[0]))
            yield _skip("event mode", "the API did not answer")
            for app in vod.sub_app_ids:
                yield _skip(f"sub-app {app}", "the API did not answer")
            return
        # Any other answer, even an error about a parameter, passed the signature check.
        yield _ok("api", f"{where} answered DescribeEventConfig; signature accepted")
        yield _mode_check(answers, vod.endpoint)
        for sub_app_id in vod.sub_app_ids:
            answer = answers[sub_app_id]
            if isinstance(answer, ApiError):
                yield _fail(f"sub-app {sub_app_id}", f"DescribeEventConfig: {answer}",
                            _api_advice(answer, vod.endpoint, sub_app_id))
            else:
                yield _ok(f"sub-app {sub_app_id}",
                          f"answers (event mode {answer.get('Mode') or '?'})")

    # --- sinks and storage --------------------------------------------------------------

    def _sink(self, index: int, sink: SinkConfig) -> Check:
        name = f"sink {sink.name!r} ({sink.type})"
        key = f"sinks[{index}]"
        options = sink.options
        url = getattr(options, "url", None)
        argv = getattr(options, "argv", None)
        path = getattr(options, "path", None)
        if isinstance(url, str):
            return self._connect(name, url, verify=bool(getattr(options, "verify_tls", True)))
        if isinstance(argv, tuple | list) and argv:
            return self._executable(name, str(argv[0]), key)
        if path == "-":
            return _ok(name, "writes to standard output (the journal under systemd)")
        if isinstance(path, str | Path):
            return _writable_check(name, Path(path), directory=False, key=f"{key}.path")
        return _ok(name, "nothing to check")

    def _connect(self, name: str, url: str, *, verify: bool) -> Check:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = _proxy_for(url)
        target = (proxy.hostname or "", proxy.port or 80) if proxy else (host, port)
        via = f" via proxy {target[0]}:{target[1]}" if proxy else ""
        try:
            with socket.create_connection(target, timeout=self._connect_timeout_s) as sock:
                if parts.scheme == "https" and not proxy:
                    context = ssl.create_default_context()
                    if not verify:
                        context.check_hostname = False
                        context.verify_mode = ssl.CERT_NONE
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
        except ssl.SSLError as exc:
            return _fail(name, f"TLS handshake with {host}:{port} failed: {exc.reason or exc}",
                         "the receiver's certificate is not trusted here: fix its chain, add "
                         "its CA to the system store, or (test setups only) verify_tls = false")
        except OSError as exc:
            return _fail(name, f"cannot connect to {target[0]}:{target[1]}{via}: "
                               f"{_os_error(exc)}",
                         "check the url, that the receiver is running and listening on that "
                         "port, and that DNS and firewalls let this host reach it")
        tls = " (TLS ok)" if parts.scheme == "https" and not proxy else ""
        return _ok(name, f"connected to {host}:{port}{via}{tls}")

    def _executable(self, name: str, program: str, key: str) -> Check:
        if "/" in program:
            found = program if os.access(program, os.X_OK) and Path(program).is_file() else None
        else:
            found = shutil.which(program, path=self._environ.get("PATH", os.defpath))
        if found is None:
            return _fail(name, f"{program}: no such executable",
                         f"{key}.argv[0]: give the absolute path of an executable file "
                         "(chmod +x), outside /home, /root and /tmp when run by the unit")
        return _ok(name, f"{found} is executable")

    def _ledger(self) -> Check:
        if self.config.ledger.url:
            return _server_ledger_check(self.config)
        path = self.config.ledger.path
        if not path.exists():
            return _writable_check("ledger", path, directory=False, key="ledger.path")
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2.0,
                                 isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
            finally:
                db.close()
        except sqlite3.Error as exc:
            return _fail("ledger", f"{path}: {exc}",
                         "the service user must be able to write the file and its directory "
                         "(WAL files); 'locked' means another writer holds it for long")
        return _ok("ledger", f"{path} is writable")


def _describe(api: VodApi, app: int | None) -> dict[str, Any] | ApiError:
    try:
        return api.describe_event_config(app)
    except ApiError as exc:
        return exc


def _mode_check(answers: Mapping[int | None, dict[str, Any] | ApiError], endpoint: str) -> Check:
    default = answers.get(None)
    if isinstance(default, ApiError):
        return _fail("event mode", f"DescribeEventConfig for the default application: {default}",
                     _api_advice(default, endpoint, None))
    modes = {app: str(reply.get("Mode")) for app, reply in answers.items()
             if isinstance(reply, dict)}
    if not modes:
        return _skip("event mode", "no sub-app answered")
    push = [app for app, mode in modes.items() if mode != "PULL"]
    if not push:
        return _ok("event mode", "PULL (reliable callback)")
    apps = ", ".join("the default application" if app is None else f"sub-app {app}"
                     for app in push)
    commands = "; ".join(
        "tccli vod ModifyEventConfig --Mode PULL" + ("" if app is None else f" --SubAppId {app}")
        for app in push)
    return _fail(
        "event mode", f"{'/'.join(sorted({modes[app] for app in push}))} for {apps}: VOD "
                      "pushes events to a URL instead of keeping them for PullEvents",
        f"switch to reliable callback: {commands} (or the VOD console: Callback settings, "
        "Reliable callback); whatever consumed the push callback must move to procpoll")


def _unanswered(exc: ApiError) -> bool:
    """Whether the error means the API was not reached or refused the credentials."""
    return isinstance(exc, AuthError | TransientApiError)


def _api_advice(exc: ApiError, endpoint: str, app: int | None) -> str:
    if isinstance(exc, AuthError):
        return _AUTH_ADVICE.get(exc.code, "the credentials were refused: check the SecretId/"
                                          "SecretKey pair in the CAM console (API keys)")
    if exc.code == "ClientNetworkError":
        return (f"cannot reach {endpoint}: check [vod] endpoint and scheme, DNS, the firewall "
                "(outbound 443) and HTTPS_PROXY")
    if exc.code == "InvalidResponse":
        return (f"{endpoint} answered, but not like the VOD API: check [vod] endpoint and "
                "scheme, and any proxy in between")
    if isinstance(exc, TransientApiError):
        return ("VOD answered with a temporary error (throttling or an internal error): run "
                "doctor again in a minute")
    if app is not None:
        return (f"sub-app {app} is not an application of this account: check [vod] "
                "sub_app_ids against the VOD console (Application management)")
    return f"VOD answered {exc.code}: see its message above"


def _server_ledger_check(config: Config) -> Check:
    """A PostgreSQL ledger: it opens (schema created or checked) and answers."""
    try:
        ledger = open_ledger(config, shared=True)
    except (LedgerError, ConfigError) as exc:
        return _fail("ledger", str(exc), "check [ledger] url, the server, the role's rights "
                     "(CREATE in the database) and pip install 'procpoll[postgresql]'")
    try:
        ledger.ping()
    except LedgerError as exc:
        return _fail("ledger", str(exc), "check that the PostgreSQL server answers")
    finally:
        ledger.close()
    return _ok("ledger", f"{ledger.name} answers")


def _writable_check(name: str, path: Path, *, directory: bool, key: str) -> Check:
    problem = _write_probe(path, directory=directory)
    if problem is None:
        return _ok(name, f"{path} {'is writable' if path.exists() else 'can be created'}")
    return _fail(name, f"{path}: {problem}",
                 f"{key}: point it at a writable place; under the systemd unit only "
                 "/var/lib/procpoll (StateDirectory) is writable")


def _write_probe(path: Path, *, directory: bool) -> str | None:
    """Why `path` cannot be written (None if it can); leaves nothing behind."""
    target = path if directory else path.parent
    if not directory and path.exists():
        if path.is_dir():
            return "is a directory"
        if not path.is_file():
            # A FIFO or a device: opening it could block or have effects.
            return None if os.access(path, os.W_OK) else "not writable"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            return _os_error(exc)
    # The directory, or its nearest existing ancestor (procpoll creates the rest).
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".procpoll-doctor-"):
            pass
    except OSError as exc:
        return f"cannot create files in {existing}: {_os_error(exc)}"
    return None


def _proxy_for(url: str) -> SplitResult | None:
    """The proxy the webhook sink (requests) would use for `url`, from *_proxy/no_proxy."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    return urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _os_error(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _mask(secret_id: str) -> str:
    return f"{secret_id[:4]}...{secret_id[-4:]}" if len(secret_id) >= 12 else "***"


def _source(secrets: Secrets) -> str:
    return {
        "environment": "the environment (TENCENTCLOUD_SECRET_ID/TENCENTCLOUD_SECRET_KEY)",
        "credentials-directory": "$CREDENTIALS_DIRECTORY (systemd LoadCredential=)",
        "config-files": "the [credentials] files",
    }.get(secrets.source, secrets.source)
