"""The Python API: README's example runs as written, without Hydra or an MLflow store."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The first ```python block of README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python example"
    return match.group(1)


@pytest.mark.slow
def test_readme_example_runs_without_hydra_or_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(sys.modules):  # whatever other tests imported, the API must not need them
        if name.split(".")[0] in ("hydra", "mlflow"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hydra", None)  # importing them now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    scope: dict[str, object] = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)
    result, outcome = scope["result"], scope["outcome"]
    assert result.verdict == "not robust" and result.worst_case_robust_accuracy()[-1] <= 0.05
    assert outcome.exit_code == 1 and outcome.results["white_box"] is True  # below the 0.5 gate
    assert outcome.results["model"]["format"] == "torchscript"
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()


def test_api_audit_settings_default_to_the_audit_config() -> None:
    """rc.AuditSettings() audits as `robustcnn audit` does with no override."""
    from robustcnn import AuditSettings
    from robustcnn.config import compose
    from robustcnn.jobs.inputs import to_container

    section = to_container(compose([], config_name="audit"))["audit"]
    assert AuditSettings.from_mapping(section) == AuditSettings()


def test_public_names_resolve_and_unknown_ones_fail() -> None:
    """Every exported name is what it says, even once every subpackage is imported (a subpackage named
    like a function, e.g. ``robustcnn.audit``, would replace the function on the package)."""
    import importlib
    import pkgutil
    import types

    import robustcnn as rc

    for module in pkgutil.walk_packages(rc.__path__, "robustcnn."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in rc.__all__:
        value = getattr(rc, name)
        assert value is not None, name
        assert isinstance(value, types.ModuleType) == (name in ("attacks",)), f"rc.{name} is {value!r}"
    assert callable(rc.evaluate) and callable(rc.audit)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = rc.nope  # type: ignore[attr-defined]
