"""KerutaSettings is put together from sections: every field and every validator of them is in it, in order."""

from __future__ import annotations

from pydantic import BaseModel

from keruta_prefect.settings import (
    ArtifactSettings,
    ClusterSettings,
    JobSettings,
    KerutaSettings,
    LocalSettings,
    ReconcileSettings,
    TaskSettings,
)

SECTIONS: list[type[BaseModel]] = [ClusterSettings, JobSettings, TaskSettings, ArtifactSettings, LocalSettings,
                                 ReconcileSettings]


def test_the_fields_are_the_sections_fields_in_section_order() -> None:
    expected = [name for section in SECTIONS for name in section.model_fields]
    assert list(KerutaSettings.model_fields) == expected
    assert list(KerutaSettings.model_fields)[:2] == ["enabled", "config_path"]


def test_no_validator_of_a_section_is_shadowed_by_another_of_the_same_name() -> None:
    names = [name for section in SECTIONS for name in section.__pydantic_decorators__.field_validators]
    assert len(names) == len(set(names))
    assert set(KerutaSettings.__pydantic_decorators__.field_validators) == set(names)
