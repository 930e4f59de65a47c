"""The settings' documentation, generated from the fields: the README's table and the default properties file."""

from __future__ import annotations

from keruta_prefect.settings.model import KerutaSettings
from keruta_prefect.settings.properties import FIELD_TO_KEY, settings_to_properties


def settings_markdown_table() -> str:
    """The README's configuration table, generated from the fields (a test keeps README in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = settings_to_properties(KerutaSettings())
    for field, key in FIELD_TO_KEY.items():
        info = KerutaSettings.model_fields[field]
        description = (info.description or "").rsplit(" (`", 1)[0]
        default = defaults[key]
        rows.append(f"| `{key}` | {('`' + default + '`') if default else '(empty)'} | {description} |")
    return "\n".join(rows) + "\n"


def settings_properties_file() -> str:
    """blocks/application.properties: every key with its description and default (kept in sync by a test)."""
    defaults = settings_to_properties(KerutaSettings())
    out = [
        "# keruta-prefect settings: every key with its default (`keruta-prefect settings keys --format properties`).",
        "# `keruta-prefect blocks seed --properties blocks/application.properties` stores them in the Prefect",
        "# block `keruta-kubernetes-settings/default` if it does not exist yet; after that the block (editable",
        "# in the Prefect UI) wins over this file. `--force` overwrites the block with this file.",
        '# Empty values mean "not set" (see each description).',
    ]
    section = None
    for field, key in FIELD_TO_KEY.items():
        group = key.rsplit(".", 1)[0]
        if group != section:
            out += ["", f"# --- {group} ---"]
            section = group
        info = KerutaSettings.model_fields[field]
        description = (info.description or "").rsplit(" (`", 1)[0]
        out += [f"# {description}", *(f"# e.g. {key}={example}" for example in info.examples or []),
                f"{key}={defaults[key]}"]
    return "\n".join(out) + "\n"
