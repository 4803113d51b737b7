"""TLS of the bridge's DICOM Storage SCP (pure: the standard library's ssl, no ROS).

:func:`server_context` builds the ``ssl.SSLContext`` handed to pynetdicom's
``AE.start_server(..., ssl_context=...)``: TLS 1.2 or newer, the bridge's certificate and key and,
with a CA file, mutual TLS: a caller must present a certificate that this CA signed. Only that CA
is trusted: the system's trust store is **not** loaded (``ssl.create_default_context`` would load
it, and then any certificate a public CA signed would pass). Docs: docs/dicom_bridge.md.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """The SCP's TLS context; ValueError naming the parameter whose file is missing or unusable."""
    for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
        if (path or name != "tls_ca") and not Path(path).is_file():
            raise ValueError(f"{name} {path!r} is not a file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no default trust store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"tls_cert/tls_key cannot be loaded (certificate and key must match, PEM): {e}") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"tls_ca cannot be loaded (PEM CA certificates): {e}") from None
        if not ctx.get_ca_certs():
            raise ValueError(f"tls_ca {ca!r} holds no CA certificate")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
