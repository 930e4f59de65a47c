"""Prefect Blocks for keruta settings and the keruta API credentials, and `seed()`.

The settings Block *is* :class:`KerutaSettings` (it inherits its fields, descriptions and validators),
so the Prefect UI form edits exactly what `application.properties` sets. Seeding creates a block
document only if none exists: an edit made in the Prefect UI survives every restart and re-seed.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from keruta_prefect.settings import KerutaSettings

DEFAULT_BLOCK = "default"


class KerutaKubernetesSettings(Block, KerutaSettings):
    """keruta-prefect settings: the cluster connection and everything an agent Job is built from.

    Seeded from `application.properties` (`keruta-prefect blocks seed`); edit it here afterwards.
    """

    _block_type_name = "Keruta Kubernetes Settings"
    _block_type_slug = "keruta-kubernetes-settings"
    _description = (
        "How keruta-prefect runs keruta tasks: cluster connection, namespace, agent image, volumes, "
        "resources and artifact limits. Seeded once from application.properties; edits here win."
    )
    _documentation_url = "https://github.com/keruta/keruta-prefect#configuration"

    def settings(self) -> KerutaSettings:
        return KerutaSettings.model_validate(self.model_dump(include=set(KerutaSettings.model_fields)))


class KerutaApiCredentials(Block):
    """Where the keruta API is and the token agents and clients present to it."""

    _block_type_name = "Keruta API"
    _block_type_slug = "keruta-api"
    _description = "The keruta API's URL and bearer token (stored encrypted, shown obfuscated)."

    url: str = Field("http://keruta-api:8080", description="keruta API base URL as flows and the CLI reach it")
    token: SecretStr = Field(description="bearer token of the keruta API (Secret `keruta-api-token` in the cluster)")


def register_block_types() -> None:
    KerutaKubernetesSettings.register_type_and_schema()
    KerutaApiCredentials.register_type_and_schema()


@dataclass
class SeedReport:
    settings_created: bool
    api_created: bool
    token_generated: bool
    name: str

    def lines(self) -> list[str]:
        def word(created: bool) -> str:
            return "created" if created else "kept (already present; use --force to overwrite)"

        out = [
            f"{KerutaKubernetesSettings._block_type_slug}/{self.name}: {word(self.settings_created)}",
            f"{KerutaApiCredentials._block_type_slug}/{self.name}: {word(self.api_created)}",
        ]
        if self.token_generated:
            out.append("a new API token was generated; put it in the cluster's Secret keruta-api-token (key token)")
        return out


def _exists(block_cls: type[Block], name: str) -> bool:
    try:
        block_cls.load(name, validate=False)
    except ValueError:
        return False
    return True


def seed(settings: KerutaSettings, *, name: str = DEFAULT_BLOCK, force: bool = False,
         token: str | None = None) -> SeedReport:
    """Register the block types and create the documents named ``name`` if absent (or if ``force``)."""
    register_block_types()
    settings_created = force or not _exists(KerutaKubernetesSettings, name)
    if settings_created:
        KerutaKubernetesSettings(**settings.model_dump()).save(name, overwrite=True)
    api_created = force or not _exists(KerutaApiCredentials, name)
    generated = False
    if api_created:
        value = token or os.environ.get("KERUTA_API_TOKEN")
        if not value:
            value, generated = secrets.token_urlsafe(32), True
        KerutaApiCredentials(url=settings.api_url, token=SecretStr(value)).save(name, overwrite=True)
    return SeedReport(settings_created, api_created, generated, name)


def load_settings(name: str = DEFAULT_BLOCK, *, properties: str | None = None) -> KerutaSettings:
    """The stored settings; on first use, seed them from ``properties`` (or $KERUTA_PROPERTIES, or the
    defaults) — as the original created its stored copy on first read."""
    try:
        return KerutaKubernetesSettings.load(name).settings()
    except ValueError:
        pass
    from keruta_prefect.settings import load_properties_file

    path = properties or os.environ.get("KERUTA_PROPERTIES")
    settings = load_properties_file(path) if path else KerutaSettings()
    seed(settings, name=name)
    return KerutaKubernetesSettings.load(name).settings()
