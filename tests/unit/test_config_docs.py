"""docs/configuration.md is generated from lpengine/config.py and must not drift from it."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"
DOC = ROOT / "docs" / "configuration.md"
FIX = "run python scripts/gen_config_docs.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """The generator script, loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(gen: ModuleType) -> str:
    text = gen.render()
    assert isinstance(text, str)
    return text


def test_committed_reference_is_up_to_date(rendered: str) -> None:
    """The committed file equals what the generator renders from the current config models."""
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing: {FIX}"
    committed = DOC.read_text(encoding="utf-8")
    if committed != rendered:
        diff = "\n".join(
            list(difflib.unified_diff(committed.splitlines(), rendered.splitlines(), "committed", "generated", n=1))[
                :40
            ]
        )
        pytest.fail(f"docs/configuration.md is out of date with lpengine/config.py: {FIX}\n{diff}", pytrace=False)


def test_render_is_deterministic(gen: ModuleType, rendered: str) -> None:
    """Two renders are identical, so the comparison above never flaps."""
    assert gen.render() == rendered


def test_every_field_is_in_the_reference(gen: ModuleType, rendered: str) -> None:
    """Each field of every section (every storage backend included) has a row; `base_dir` is internal."""
    sections = list(gen.iter_sections())
    paths = {s.path for s in sections}
    assert {"api.rate_limits", "api.retry", "storage", "concurrency"} <= paths
    backends = {s.variant for s in sections if s.path == "storage"}
    assert backends >= {"fileserver", "s3", "dashscope_temp", "url"}
    for section in sections:
        assert f"## {section.title}\n" in rendered
        for name, field in section.model.model_fields.items():
            if (section.path, name) in gen.EXCLUDED_FIELDS:
                continue
            key = gen.key_of(name, field)
            assert f"| `{key}` |" in rendered, f"{section.path or 'top level'}.{key} has no row: {FIX}"
    assert "base_dir" not in rendered


def test_every_field_has_a_description(gen: ModuleType) -> None:
    """A field without an attribute docstring would show an empty description cell."""
    missing = gen.undocumented()
    assert not missing, f"add attribute docstrings in lpengine/config.py for: {', '.join(missing)}"


class _Sample(BaseModel):
    fps: Annotated[int, Field(ge=15, le=30, strict=True)] = 24
    qps: Annotated[float, Field(gt=0, le=1000)] = 5.0
    price: Annotated[float, Field(ge=0)] = 0.004
    flag: Annotated[bool, Field(strict=True)] = True
    mode: Literal["normal", "calm"] = "normal"
    maybe: Annotated[float, Field(ge=0, le=1)] | None = None
    name: str


@pytest.mark.parametrize(
    ("field", "allowed", "default"),
    [
        ("fps", "15 ≤ x ≤ 30; integers only (strict)", "`24`"),
        ("qps", "0 < x ≤ 1000", "`5`"),
        ("price", "≥ 0", "`0.004`"),
        ("flag", "`true` or `false` only (strict)", "`true`"),
        ("mode", "`normal`, `calm`", "`normal`"),
        ("maybe", "0 ≤ x ≤ 1", "`null`"),
        ("name", "", "**required**"),
    ],
)
def test_allowed_and_default_come_from_the_field_metadata(
    gen: ModuleType, field: str, allowed: str, default: str
) -> None:
    """ge/gt/le, strict and Literal choices reach the 'allowed' column; defaults render as YAML."""
    info = _Sample.model_fields[field]
    assert gen._allowed(info) == allowed
    assert gen._default(info, None, None) == default


def test_check_mode_reports_a_stale_file(gen: ModuleType, rendered: str, tmp_path: Path) -> None:
    """`--check` exits 1 on a stale file, 0 on a current one, and writes nothing."""
    target = tmp_path / "configuration.md"
    target.write_text(rendered.replace("Blink frequency", "Blink rate"), encoding="utf-8")
    assert gen.main(["--check", "--output", str(target)]) == 1
    assert "Blink rate" in target.read_text(encoding="utf-8")
    assert gen.main(["--output", str(target)]) == 0
    assert gen.main(["--check", "--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == rendered


class _Doc(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class _Leaf(_Doc):
    """A leaf section."""

    size: int = 1
    """How big."""


class _Other(_Doc):
    kind: Literal["other"] = "other"
    """Tag."""


class _Tagged(_Doc):
    kind: Literal["tagged"] = "tagged"
    """Tag."""
    leaf: _Leaf = _Leaf()
    """Nested inside a union member."""


class _Root(_Doc):
    """A root with every shape of nesting the generator must follow."""

    required_leaf: _Leaf
    """Required section."""
    optional_leaf: _Leaf | None = None
    """Optional section."""
    leaves: list[_Leaf] = []
    """A list of sections."""
    choice: Annotated[_Tagged | _Other, Field(discriminator="kind")] = _Other()
    """A discriminated union."""
    undocumented: int = 0


def test_walk_follows_optional_list_and_union_members(gen: ModuleType) -> None:
    """Optional models, models in lists and each member of a discriminated union get their own section."""
    found = [(s.path, s.variant) for s in gen.iter_sections(_Root)]
    assert found == [
        ("", None),
        ("required_leaf", None),
        ("optional_leaf", None),
        ("leaves", None),
        ("choice", "tagged"),
        ("choice.leaf", None),
        ("choice", "other"),
    ]
    text = gen.render(_Root)
    assert "| `choice` | one of: [`tagged`](#choice-with-kind-tagged), [`other`](#choice-with-kind-other) |" in text
    assert "## `choice` with `kind: tagged`\n" in text
    assert "| `required_leaf` | [section](#required_leaf) | **required** |" in text
    assert gen.undocumented(_Root) == ["undocumented"]
