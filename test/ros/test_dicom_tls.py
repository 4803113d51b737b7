"""TLS on the dicom_bridge's Storage SCP, end to end on loopback: a CA, the bridge's server
certificate and callers' client certificates made here with the ``openssl`` command line; the
bridge process (shipped config/dicom_bridge.yaml + tls_cert/tls_key/tls_ca) receives C-STOREs
from pynetdicom SCUs. A caller with a certificate of the configured CA stores; a caller without
TLS, without a client certificate, or with a certificate of a CA the bridge's process would trust
through the system trust store (SSL_CERT_FILE) cannot."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("pynetdicom")

from ros_harness import deadline
from test_dicom_bridge import CALLING, bridge_port, shot, start_bridge

from mvreg_ros.ros import dicom_rules
from mvreg_ros.ros.dicom_tls import server_context

OPENSSL = shutil.which("openssl")
STORE_OK = 0x0000


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d, name):
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=mvreg test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=d,
    )  # fmt: skip


def _issue(d, name, ca, usage):
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={'localhost' if usage == 'serverAuth' else name}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-sha256", "-days", "2", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-extfile", ext.name, cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("no openssl command line to make the test CA and certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other_ca")
    _issue(d, "server", "ca", "serverAuth")
    _issue(d, "client", "ca", "clientAuth")
    _issue(d, "stranger", "other_ca", "clientAuth")  # signed by a CA the bridge must not trust
    return d


def _client_context(pki, cert: str | None):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def _c_store(port, ds, tls=None):
    """The C-STORE status, or None when no association comes about."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = deadline(15)
    for uid in dicom_rules.SOP_CLASSES:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    tls_args = (tls, "localhost") if tls is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="MVREG_BRIDGE", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_server_context_trusts_only_the_configured_ca(pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "other_ca.pem"))
    ctx = server_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [dict(c["subject"][0])["commonName"] for c in ctx.get_ca_certs()] == ["mvreg test ca"]
    assert server_context(str(pki / "server.pem"), str(pki / "server.key")).verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="tls_key"):
        server_context(str(pki / "server.pem"), str(pki / "missing.key"))
    with pytest.raises(ValueError, match="tls_cert/tls_key"):
        server_context(str(pki / "server.pem"), str(pki / "client.key"))  # key of another certificate
    with pytest.raises(ValueError, match="tls_ca"):
        server_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "server.ext"))


@pytest.fixture(scope="module")
def tls_bridge(ros_env, pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicom_tls")
    env = dict(ros_env, SSL_CERT_FILE=str(pki / "other_ca.pem"))  # a trust store the SCP must not use
    proc = start_bridge(
        env,
        tmp,
        name="tls_bridge",
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_ca=str(pki / "ca.pem"),
        store_folder=str(tmp / "store"),
    )
    try:
        port = bridge_port(proc)
        assert "(TLS)" in proc.output()
        yield proc, port, tmp
    finally:
        proc.kill()


def test_tls_caller_with_a_client_certificate_stores(tls_bridge, pki):
    proc, port, tmp = tls_bridge
    ds, _ = shot(10.0, 5.0, instance=1)
    assert _c_store(port, ds, _client_context(pki, "client")) == STORE_OK, proc.tail()
    assert [p.name for p in (tmp / "store").iterdir()] == [
        dicom_rules.storage_path(tmp / "store", ds.SOPInstanceUID).name
    ]


@pytest.mark.parametrize(
    "caller", ["plain TCP, no TLS", "TLS without a client certificate", "client certificate of another CA"]
)
def test_callers_without_an_accepted_certificate_cannot_store(tls_bridge, pki, caller):
    proc, port, _ = tls_bridge
    ds, _ = shot(-20.0, 0.0, instance=2)
    tls = {
        "plain TCP, no TLS": None,
        "TLS without a client certificate": _client_context(pki, None),
        "client certificate of another CA": _client_context(pki, "stranger"),
    }[caller]
    assert _c_store(port, ds, tls) is None
    assert proc.alive(), proc.tail()
