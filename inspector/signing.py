"""Signed bundles: a line that asks for it runs only bundles signed by a key it trusts (Ed25519).

Why on top of the hashes: the hashes prove a bundle is the one its manifest (and the registry's tags) describe, but
whoever can write the artifact store can write a whole new, self-consistent bundle. A signature made with a key that
never leaves the release host (the promotion gate's, say) proves the bundle is one that host approved.

What is signed is the manifest's content digest (``manifest_sha256``), which covers every file's sha256 and every
setting, the threshold included; the signature lives beside it in ``signature.json``, with the public key's
fingerprint (never a key). ``cryptography`` is needed only to sign or to check a signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspector.bundle import MANIFEST_DIGEST, Bundle, load_bundle
from inspector.durable import replace_durably
from inspector.errors import BundleError, InspectorError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FILE = "signature.json"
ALGORITHM = "ed25519"
#: what is signed: this prefix and the manifest digest, so a signature is never valid for another purpose
_CONTEXT = b"inspector-bundle-signature:"


def _serialization() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise InspectorError(
            "signed bundles need the 'cryptography' package (pip install 'siamese-inspector[sign]')"
        ) from None
    return serialization


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (``openssl genpkey -algorithm ed25519 -out key.pem``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _read_key(Path(path), private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise InspectorError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``openssl pkey -in key.pem -pubout -out key.pub``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _read_key(Path(path), private=False)
    if not isinstance(key, Ed25519PublicKey):
        raise InspectorError(f"{path}: not an Ed25519 public key")
    return key


def _read_key(path: Path, *, private: bool) -> Any:
    serialization = _serialization()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InspectorError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    try:
        if private:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:  # never echo the key's bytes
        kind = "private" if private else "public"
        raise InspectorError(f"{path}: not a PEM {kind} key ({type(exc).__name__})") from None


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key: names a key in files and logs without revealing anything."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _digest_of(bundle: Bundle) -> str:
    digest = bundle.manifest.get(MANIFEST_DIGEST)
    if not isinstance(digest, str):
        raise BundleError(
            f"{bundle.path}: schema {bundle.manifest.get('schema_version')} bundles carry no content digest to sign "
            "(write a new bundle from it, e.g. with inspector add-references)"
        )
    return digest


def signature_record(digest: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """What ``signature.json`` holds for a bundle whose content digest is ``digest``: the signature, what it signs,
    and the key's fingerprint (the promotion gate stores the same record as a version tag)."""
    return {
        "algorithm": ALGORITHM,
        "signed": {MANIFEST_DIGEST: digest},
        "key_sha256": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(_CONTEXT + digest.encode("ascii"))).decode("ascii"),
    }


def write_signature(folder: str | Path, text: str) -> Path:
    """``signature.json`` in a bundle folder, written atomically (a line never reads half a signature)."""
    out = Path(folder) / SIGNATURE_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", dir=out.parent)
    with open(fd, "w") as fh:
        fh.write(text)
    replace_durably(tmp, out)
    return out


def sign_bundle(path: str | Path, key_path: str | Path) -> Path:
    """Verify the bundle at ``path``, sign its content digest with the private key, write ``signature.json``
    (atomically); returns the signature file."""
    bundle = load_bundle(path)
    record = signature_record(_digest_of(bundle), load_private_key(key_path))
    return write_signature(bundle.path, json.dumps(record, indent=2) + "\n")


def verify_signature(bundle: Bundle, public_key: Ed25519PublicKey) -> str:
    """Refuse a bundle that is unsigned, signed by another key, or whose signature does not cover its content;
    returns the signing key's fingerprint."""
    from cryptography.exceptions import InvalidSignature

    where = bundle.path / SIGNATURE_FILE
    if not where.is_file():
        raise BundleError(f"{where}: missing: this line runs signed bundles only (inspector sign BUNDLE --key KEY)")
    try:
        record = json.loads(where.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        signed = str(record["signed"][MANIFEST_DIGEST])
        algorithm, key_id = record["algorithm"], str(record["key_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
    if algorithm != ALGORITHM:
        raise BundleError(f"{where}: algorithm {algorithm!r} is not {ALGORITHM!r}")
    trusted = fingerprint(public_key)
    if key_id != trusted:
        raise BundleError(f"{where}: signed by key {key_id[:12]}…, not the trusted key {trusted[:12]}…")
    digest = _digest_of(bundle)
    if signed != digest:
        raise BundleError(f"{where}: signs content {signed[:12]}…, but the bundle's content is {digest[:12]}…")
    try:
        public_key.verify(signature, _CONTEXT + digest.encode("ascii"))
    except InvalidSignature:
        raise BundleError(f"{where}: the signature does not verify with the trusted key {trusted[:12]}…") from None
    return trusted
