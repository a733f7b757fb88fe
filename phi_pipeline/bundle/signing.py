"""Signing a folder with the OpenSSF model-signing library, with an elliptic-curve key (offline).

bundle.py places the signature (the library's Sigstore-bundle format) inside the bundle; it is
left out of what it signs the way the library's own CLI leaves it out: named in the hashing
config's ignored paths, which the signature records, so `model_signing verify key` accepts a
bundle signed here and the other way round. Every other file is signed, manifest.json included:
a file changed together with its manifest entry still fails.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # the curves model-signing accepts
# The library's mismatch report, one string per difference (model-signing 1.1, verifying.py).
_HASH_MISMATCH = re.compile(r"^Hash mismatch for '(.+?)': ")
_EXTRA = re.compile(r"^Extra files found in model '.*?': (.+)$")
_MISSING = re.compile(r"^Missing files in model '.*?': (.+)$")


def _check_key(path: Path, private: bool) -> list[str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    what = "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{path}: cannot read the {what} key ({exc.strerror})"]
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        return [f"{path}: not an unencrypted PEM {what} key ({exc})"]
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in _CURVES:
        return [f"{path}: model-signing needs an elliptic-curve key on P-256, P-384 or P-521 (see docs/integrity.md)"]
    return []


def check_private_key(path: Path) -> list[str]:
    """Why `path` cannot sign a bundle ([] if it can): checked before a run does any work."""
    return _check_key(path, private=True)


def check_public_key(path: Path) -> list[str]:
    """Why `path` cannot check a bundle's signature ([] if it can): checked before the server starts."""
    return _check_key(path, private=False)


def sign_folder(folder: Path, sig: Path, private_key: Path) -> Path:
    """Sign every file of `folder` but the signature `sig` (inside it), written atomically."""
    from model_signing import hashing, signing

    tmp = sig.with_name(f".{sig.name}.tmp{os.getpid()}")  # written after hashing, so never part of it
    config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[sig.relative_to(folder)]))
    try:
        config.sign(folder, tmp)
        os.replace(tmp, sig)
    finally:
        tmp.unlink(missing_ok=True)
    return sig


def _mismatches(message: str, name: str) -> list[str]:
    """The library's 'Signature mismatch: [...]' as one problem per file."""
    try:
        items = ast.literal_eval(message.split(": ", 1)[1])
    except (IndexError, ValueError, SyntaxError):
        return [f"{name}: {message}"]
    problems = []
    for item in items:
        if m := _HASH_MISMATCH.match(item):
            problems.append(f"{m[1]}: differs from the signed file (modified or corrupted)")
        elif m := _EXTRA.match(item):
            problems += [f"{rel}: present but not signed" for rel in m[1].split(", ")]
        elif m := _MISSING.match(item):
            problems += [f"{rel}: signed but missing" for rel in m[1].split(", ")]
        else:
            problems.append(f"{name}: {item}")
    return problems


def verify_folder(folder: Path, sig: Path, public_key: Path) -> list[str]:
    """Every way `folder` fails its signature `sig` under `public_key`, naming the files; [] if it holds."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    if problems := _check_key(public_key, private=False):
        return problems
    name = sig.relative_to(folder).as_posix()
    if not sig.is_file():
        return [f"{name}: missing; not signed (phi-pipeline sign {folder} --key private.pem)"]
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(folder, sig)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("Signature mismatch"):
            return _mismatches(message, name)
        if message.startswith("Key mismatch"):
            return [f"{name}: signed with another key than {public_key}"]
        return [f"{name}: not a valid signature ({message})"]
    except InvalidSignature:
        return [f"{name}: the signature does not verify with {public_key} (the signature file was altered)"]
    except Exception as exc:  # a damaged signature file fails in protobuf/JSON parsing, with their own types
        return [f"{name}: unreadable ({type(exc).__name__}: {exc})"]
    return []
