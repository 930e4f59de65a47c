"""The cluster's own checks, written from Kubernetes' rules and independent of the project under test:

- ``versions()`` / ``validate_all()``: kubernetes-validate (strict) for every supported Kubernetes version;
- ``parse_quantity()``: the resource.Quantity grammar (k8s.io/apimachinery/pkg/api/resource/quantity.go);
- ``image_problem()``: how the kubelet parses an image name (distribution/reference's grammar, as
  ``ParseNormalizedNamed`` applies it, and go-digest's digest checks).

The project validates the same things its own way; were the harness to borrow the project's checks, a bug
in them could never show up here.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate

MIN_MINOR = 31  # the oldest Kubernetes minor version the project supports


@functools.cache
def versions() -> list[str]:
    """Every Kubernetes version kubernetes-validate ships a schema for, from 1.MIN_MINOR on."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = sorted({p.name.split("-")[0].lstrip("v") for p in root.iterdir() if p.name.startswith("v1.")},
                   key=lambda v: tuple(int(x) for x in v.split(".")))
    return [v for v in found if int(v.split(".")[1]) >= MIN_MINOR]


def validate_all(manifest: dict[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError unless ``manifest`` is valid (strict) for every version."""
    for version in versions():
        kubernetes_validate.validate(manifest, version, strict=True)


# --- resource.Quantity -----------------------------------------------------------------------------------
#   <quantity> ::= <signedNumber><suffix>      <signedNumber> ::= [+|-]<number>
#   <number>   ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
#   <suffix>   ::= <binarySI> | <decimalExponent> | <decimalSI>
#   <binarySI> ::= Ki | Mi | Gi | Ti | Pi | Ei    <decimalSI> ::= n | u | m | "" | k | M | G | T | P | E
#   <decimalExponent> ::= e<signedInteger> | E<signedInteger>
# (Go's scanner also lets a lone sign or "." through as zero; the grammar does not, nor does this.)
_QUANTITY = re.compile(r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(?:(?P<binary>[KMGTPE]i)|(?P<exponent>[eE][+-]?[0-9]+)|(?P<decimal>[numkMGTPE]))?",
                       re.ASCII)
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}  # powers of two
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}  # powers of ten
# The API server's own words for a value it cannot decode.
QUANTITY_FORMAT = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"


def parse_quantity(value: object) -> float:
    """A quantity ("100m", "1.5Gi", "2e3", or a JSON number) as a number; ValueError(QUANTITY_FORMAT) if
    malformed. Surrounding spaces are dropped, as the API server's JSON decoding does."""
    match = _QUANTITY.fullmatch((value if isinstance(value, str) else str(value)).strip())
    if match is None:
        raise ValueError(QUANTITY_FORMAT)
    number = Decimal(match["number"])
    if match["binary"]:
        return float(number * 2 ** _BINARY_SI[match["binary"]])
    if match["exponent"]:
        return float(number.scaleb(int(match["exponent"][1:])))
    return float(number.scaleb(_DECIMAL_SI.get(match["decimal"] or "", 0)))


def quantity_problems(obj: dict[str, Any], kind: str) -> list[str]:
    """Resource quantities of a Job's Pod template or a PVC that the API server could not decode."""
    spec = obj.get("spec") or {}
    blocks: list[tuple[str, Any]] = []
    if kind == "jobs":
        pod = ((spec.get("template") or {}).get("spec")) or {}
        for key in ("initContainers", "containers"):
            for index, container in enumerate(pod.get(key) or []):
                blocks.append((f"spec.template.spec.{key}[{index}].resources", (container or {}).get("resources")))
    elif kind == "persistentvolumeclaims":
        blocks.append(("spec.resources", spec.get("resources")))
    problems = []
    for path, resources in blocks:
        for section in ("requests", "limits"):
            for name, amount in ((resources or {}).get(section) or {}).items():
                try:
                    parse_quantity(amount)
                except ValueError as exc:
                    problems.append(f"{path}.{section}[{name}]: {amount!r}: {exc}")
    return problems


# --- image references ------------------------------------------------------------------------------------
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"(?P<name>(?:{_DOMAIN}/)?{_REMOTE_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?",
                        re.ASCII)
_NAME = re.compile(rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_REMOTE_NAME})", re.ASCII)
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}  # the algorithms the kubelet has, and their lengths
NAME_MAX = 255


def image_problem(image: str) -> str | None:
    """Why the kubelet cannot parse ``image`` (the text after "couldn't parse image name ...: "), or None."""
    if _IDENTIFIER.fullmatch(image):
        return f"invalid repository name ({image}), cannot specify 64-byte hexadecimal strings"
    domain, remainder = _split_docker_domain(image)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return f"invalid reference format: repository name ({remote}) must be lowercase"
    full = f"{domain}/{remainder}"
    match = _REFERENCE.fullmatch(full)
    if match is None:
        lower = full.lower()
        return "repository name must be lowercase" if lower != full and _REFERENCE.fullmatch(lower) \
            else "invalid reference format"
    name = _NAME.fullmatch(match["name"])
    if name is not None and len(name["path"]) > NAME_MAX:
        return f"repository name must not be more than {NAME_MAX} characters"
    return _digest_problem(match["digest"]) if match["digest"] else None


def _split_docker_domain(name: str) -> tuple[str, str]:
    """distribution/reference's splitDockerDomain: what counts as a registry, and Docker Hub's defaults."""
    first, slash, rest = name.partition("/")
    if not slash:
        return "docker.io", f"library/{name}"
    if first == "localhost" or any(c in first for c in ".:") or first.lower() != first:
        domain, remote = ("docker.io" if first == "index.docker.io" else first), rest
    else:
        domain, remote = "docker.io", name
    if domain == "docker.io" and "/" not in remote:
        remote = f"library/{remote}"
    return domain, remote


def _digest_problem(digest: str) -> str | None:
    """go-digest's checks of a digest the reference grammar let through."""
    algorithm, _, encoded = digest.partition(":")
    if algorithm not in _DIGEST_HEX:
        return "unsupported digest algorithm"
    if len(encoded) != _DIGEST_HEX[algorithm]:
        return "invalid checksum digest length"
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        return "invalid checksum digest format"
    return None
