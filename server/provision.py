"""Device provisioning: the fleet's certificate authority, each device's broker identity,
and the agent bundle a device is installed from.

- :func:`init_ca` makes the CA (an ECDSA P-256 key, 0600, and a self-signed certificate)
  that signs the broker's TLS certificate (:func:`issue_server_cert`); agents pin it.
- :class:`PasswordFile` edits a mosquitto password file (``$7$``: PBKDF2-SHA512, the
  format ``mosquitto_passwd`` writes in mosquitto 2.0) under a lock, atomically, keeping the
  file's mode and owner, so the broker (reloaded with SIGHUP) never reads half a file.
- :func:`provision_device` gives a device a random broker password (its user name is its
  device id, which the broker ACL keys on) and writes its bundle: ``agent.toml``, the CA
  certificate, the server's public keys and ``broker-password``, every file 0600 in a 0700
  directory. ``deploy/install-agent.sh`` installs a bundle so that only the agent's user
  reads the password, not the group applications join for the local socket.
- :func:`revoke_device` removes the device's password entry; the broker drops its
  connection once told to reload (``systemctl reload mosquitto`` or ``kill -HUP``).

Nothing here talks to the broker or the server; the CLI (``prunefleet ca …``,
``prunefleet devices provision|revoke``) adds the server's side of a revocation.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.topics import check_name
from prunefleet.shared.transport import BrokerAddress

from .errors import ServerError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "Bundle",
    "PasswordFile",
    "ProvisionError",
    "init_ca",
    "issue_server_cert",
    "password_line",
    "provision_device",
    "revoke_device",
    "verify_password_line",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
# What `mosquitto_passwd` uses in mosquitto 2.0. The passwords are 256 random bits, so the
# iteration count does not protect them; it only has to be one the broker accepts.
PBKDF2_ITERATIONS = 101
# User names the broker ACL gives more than a device's own subtree (deploy/mosquitto/acl).
RESERVED_USERS = frozenset({"server"})
# Bundle file names; install-agent.sh installs them under /etc/prunefleet by these names.
BUNDLE_CONFIG = "agent.toml"
BUNDLE_PASSWORD = "broker-password"
BUNDLE_KEYS_DIR = "trusted-keys"


class ProvisionError(ServerError):
    """A CA, password file or bundle operation that cannot be done as asked."""


# -- certificate authority ------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(ca_dir: Path, common_name: str = "prunefleet fleet CA",
            days: int = 3650) -> tuple[Path, bool]:
    """Create the CA in ``ca_dir`` unless it exists; ``(certificate path, created)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_dir = Path(ca_dir)
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    if key_path.exists() and cert_path.exists():
        _load_ca(ca_dir)  # refuse a damaged CA now rather than at the first provisioning
        return cert_path, False
    if key_path.exists() or cert_path.exists():
        raise ProvisionError(f"{ca_dir}: has only one of {CA_KEY} and {CA_CERT}; "
                             "restore the other or remove both")
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, True


def _load_ca(ca_dir: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key((Path(ca_dir) / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((Path(ca_dir) / CA_CERT).read_bytes())
    except FileNotFoundError as e:
        raise ProvisionError(f"no CA in {ca_dir}: run `prunefleet ca init` first") from e
    except (ValueError, TypeError) as e:
        raise ProvisionError(f"{ca_dir}: not a readable CA key and certificate: {e}") from e
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            not isinstance(public, ec.EllipticCurvePublicKey) or \
            key.public_key().public_numbers() != public.public_numbers():
        raise ProvisionError(f"{ca_dir}: {CA_KEY} does not belong to {CA_CERT}")
    return key, cert


def issue_server_cert(ca_dir: Path, names: list[str], out_dir: Path,
                      days: int = 825) -> tuple[Path, Path]:
    """A TLS server certificate for the broker (``names``: DNS names or IP addresses),
    signed by the CA; ``(server.crt, server.key)`` in ``out_dir``, the key 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise ProvisionError("a broker certificate needs at least one host name or address")
    ca_key, ca_cert = _load_ca(ca_dir)
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crt, key_path = out_dir / "server.crt", out_dir / "server.key"
    atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    return crt, key_path


# -- mosquitto password file ----------------------------------------------------------------------


def password_line(user: str, password: str, *, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """``user:$7$ITER$SALT$HASH``: a mosquitto 2.0 password entry (no newline)."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password_line(line: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` entry (as the broker checks it)."""
    _user, _, hashed = line.strip().partition(":")
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(mine, digest)


class PasswordFile:
    """A mosquitto password file, changed one entry at a time.

    Each change holds an exclusive lock (``flock`` on ``<file>.lock``) so two provisioning
    commands never lose each other's entry, and replaces the file atomically with its mode
    and owner kept (mosquitto, running as its own user, must still read it).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def users(self) -> list[str]:
        return [line.partition(":")[0] for line in self._lines()]

    def entry(self, user: str) -> str | None:
        return next((ln for ln in self._lines() if ln.partition(":")[0] == user), None)

    def set(self, user: str, password: str) -> None:
        with self._locked():
            lines = [ln for ln in self._lines() if ln.partition(":")[0] != user]
            self._write([*lines, password_line(user, password)])

    def remove(self, user: str) -> bool:
        """Remove ``user``'s entry; False when there was none."""
        with self._locked():
            lines = self._lines()
            kept = [ln for ln in lines if ln.partition(":")[0] != user]
            if len(kept) == len(lines):
                return False
            self._write(kept)
            return True

    def _lines(self) -> list[str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, lines: list[str]) -> None:
        try:
            st: os.stat_result | None = self.path.stat()
        except FileNotFoundError:
            st = None
        mode = 0o600 if st is None else st.st_mode & 0o777
        atomic_write(self.path, "".join(ln + "\n" for ln in lines).encode(), mode=mode)
        if st is not None and os.geteuid() == 0:
            os.chown(self.path, st.st_uid, st.st_gid)


# -- agent bundle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """What :func:`provision_device` wrote."""

    device_id: str
    directory: Path
    config: Path
    password_file: Path
    broker_url: str


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _check_device_id(device_id: str) -> str:
    check_name(device_id, "device id")
    if device_id in RESERVED_USERS:
        raise ProvisionError(f"device id {device_id!r} is reserved for the server's broker user")
    return device_id


def provision_device(
    device_id: str,
    *,
    passwd_file: Path,
    out_dir: Path,
    broker_url: str,
    ca_dir: Path,
    trusted_keys: list[Path],
    group: str | None = None,
    install_dir: Path = Path("/etc/prunefleet"),
    api_socket: str | None = "/run/prunefleet/agent.sock",
    force: bool = False,
) -> Bundle:
    """Give ``device_id`` a new broker password and write its agent bundle to ``out_dir``.

    ``install_dir`` is where the bundle's files will live on the device: the paths written
    into ``agent.toml`` point there (``deploy/install-agent.sh`` uses ``/etc/prunefleet``).
    Provisioning a device again replaces its password: the old bundle stops working once
    the broker reloads.
    """
    _check_device_id(device_id)
    if group is not None:
        check_name(group, "group")
    address = BrokerAddress.parse(broker_url)
    if address.username or address.password:
        raise ProvisionError("give the broker URL without credentials: the bundle carries "
                             "the device's own user name and password")
    if not address.tls:
        raise ProvisionError(f"{broker_url}: devices reach the broker over TLS (mqtts://): "
                             "their password must not cross the network in clear text")
    keys = [Path(k) for k in trusted_keys]
    for k in keys:
        if not k.is_file():
            raise ProvisionError(f"trusted key not found: {k} (run `prunefleet keys init`)")
    if not keys:
        raise ProvisionError("no trusted key: the agent would trust no manifest")
    _load_ca(ca_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ProvisionError(f"{out_dir} exists and is not empty (--force replaces it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    keys_dir = out_dir / BUNDLE_KEYS_DIR
    if keys_dir.exists():
        shutil.rmtree(keys_dir)
    keys_dir.mkdir(mode=0o700)

    password = secrets.token_urlsafe(32)
    key_names = []
    for i, k in enumerate(keys):
        name = f"server-{i}.pem"
        atomic_write(keys_dir / name, k.read_bytes(), mode=0o600)
        key_names.append(name)
    atomic_write(out_dir / CA_CERT, (Path(ca_dir) / CA_CERT).read_bytes(), mode=0o600)
    atomic_write(out_dir / BUNDLE_PASSWORD, (password + "\n").encode(), mode=0o600)
    lines = [
        f"# prunefleet agent for {device_id}, written by `prunefleet devices provision`.",
        "# The broker password is in its own file, readable by the agent's user only.",
        f"device_id = {_toml_str(device_id)}",
    ]
    if group is not None:
        lines.append(f"group = {_toml_str(group)}")
    lines += [
        f"broker_url = {_toml_str(address.url)}",
        f"broker_password_file = {_toml_str(str(install_dir / BUNDLE_PASSWORD))}",
        f"ca_file = {_toml_str(str(install_dir / CA_CERT))}",
        "trusted_keys = [" + ", ".join(_toml_str(str(install_dir / BUNDLE_KEYS_DIR / n))
                                       for n in key_names) + "]",
    ]
    if api_socket:
        lines.append(f"api_socket = {_toml_str(api_socket)}")
    config = out_dir / BUNDLE_CONFIG
    atomic_write(config, ("\n".join(lines) + "\n").encode(), mode=0o600)
    # The broker learns the password last: a failure above leaves the old identity as it was.
    PasswordFile(passwd_file).set(device_id, password)
    return Bundle(device_id=device_id, directory=out_dir, config=config,
                  password_file=out_dir / BUNDLE_PASSWORD, broker_url=address.url)


def revoke_device(device_id: str, passwd_file: Path) -> bool:
    """Remove the device's broker password entry; False when it had none."""
    _check_device_id(device_id)
    return PasswordFile(passwd_file).remove(device_id)
