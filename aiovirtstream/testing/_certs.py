"""The sandbox's TLS material and the system user its daemon runs as."""

from __future__ import annotations

__all__ = [
    "STANDARD_PATH",
    "default_path",
    "SANDBOX_USER",
    "make_certificates",
    "install_certificates",
    "sandbox_user",
]

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from .._exceptions import (
    DaemonNotInstalledError,
    SandboxError,
)

SANDBOX_USER = "aiovirtstream-sandbox"

#: Where the daemon and its helpers are looked for, after the caller's PATH.
STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def default_path() -> str:
    """The daemon's PATH: the caller's, then the usual folders of programs."""
    own = [folder for folder in os.environ.get("PATH", "").split(os.pathsep) if folder]
    return os.pathsep.join(dict.fromkeys(own + list(STANDARD_PATH)))


_CERT_DAYS = 30


_OPENSSL_CONFIG = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ext]
{extensions}
"""


_CA_EXTENSIONS = "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign"


_LEAF_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature, keyEncipherment\n"
    "extendedKeyUsage = {usage}\n"
)


def _openssl(work: Path, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=work, capture_output=True, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise SandboxError(f"openssl {args[0]} failed making the sandbox's certificates: {message}")


def sandbox_user() -> str:
    """The dedicated user for root's sandboxes, made if missing; ``nobody`` if it cannot be."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SANDBOX_USER).pw_name
    useradd = shutil.which("useradd", path=os.pathsep.join(STANDARD_PATH))
    if useradd is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                 "--comment", "aiovirtstream test sandboxes", SANDBOX_USER],
                capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=False,
            )  # fmt: skip
    try:  # made now, or by a concurrent sandbox
        return pwd.getpwnam(SANDBOX_USER).pw_name
    except KeyError:
        return "nobody"


def make_certificates(work: Path, client_cn: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in work.

    Leaves cacert.pem, servercert.pem, serverkey.pem, clientcert.pem and
    clientkey.pem (keys 0600); the CA's key is deleted once both are signed.
    """
    if shutil.which("openssl") is None:
        raise DaemonNotInstalledError("openssl not found (the TLS listener needs it)", "openssl")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    leaves = {
        "ca": ("aiovirtstream sandbox CA", _CA_EXTENSIONS),
        "server": (
            "127.0.0.1",
            _LEAF_EXTENSIONS.format(usage="serverAuth")
            + "subjectAltName = IP:127.0.0.1, DNS:localhost",
        ),
        "client": (client_cn, _LEAF_EXTENSIONS.format(usage="clientAuth")),
    }
    for name, (cn, extensions) in leaves.items():
        (work / f"{name}.cnf").write_text(_OPENSSL_CONFIG.format(cn=cn, extensions=extensions))
    days = str(_CERT_DAYS)
    _openssl(work, "req", "-x509", "-config", "ca.cnf", "-extensions", "ext", *newkey,
             "-keyout", "cakey.pem", "-out", "cacert.pem", "-days", days)  # fmt: skip
    for serial, name in enumerate(("server", "client"), 1):
        _openssl(work, "req", "-new", "-config", f"{name}.cnf", *newkey,
                 "-keyout", f"{name}key.pem", "-out", f"{name}.csr")  # fmt: skip
        _openssl(work, "x509", "-req", "-in", f"{name}.csr", "-CA", "cacert.pem",
                 "-CAkey", "cakey.pem", "-set_serial", str(serial), "-days", days,
                 "-extfile", f"{name}.cnf", "-extensions", "ext",
                 "-out", f"{name}cert.pem")  # fmt: skip
    for leftover in ("cakey.pem", "ca.cnf", "server.cnf", "client.cnf", "server.csr", "client.csr"):
        (work / leftover).unlink()
    for key in ("serverkey.pem", "clientkey.pem"):
        (work / key).chmod(0o600)


def install_certificates(pki: Path, root: Path, client_cn: str) -> None:
    """Certificates for the TLS listener: the server's in ``root/pki``, the client's in ``pki``."""
    pki.mkdir(mode=0o700)
    make_certificates(pki, client_cn)
    (root / "pki").mkdir(mode=0o700)
    for name in ("servercert.pem", "serverkey.pem"):
        os.replace(pki / name, root / "pki" / name)
    shutil.copyfile(pki / "cacert.pem", root / "pki" / "cacert.pem")
