"""values.yaml is documented line by line: every setting has a `# --` comment (a commented key documents its
whole value, e.g. a resources block), and every documented key is allowed by values.schema.json."""

from __future__ import annotations

import json
import re

from tests.chart.support import CHART

KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")


def _undocumented() -> list[str]:
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing, stack = [], []  # stack: (indent, key, documented)
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        inherited = any(doc for _, _, doc in stack)
        # A comment block documents the key below it when it starts with "# --" (possibly several lines up).
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = inherited or (above.startswith("#") and j >= 0 and lines[j].strip().startswith("# --"))
        below = next((m2 for line2 in lines[i + 1:] if line2.strip() and not line2.strip().startswith("#")
                      for m2 in [KEY.match(line2)]), None)
        is_parent = rest == "" and below is not None and len(below.group(1)) > indent
        if not documented and not is_parent:
            missing.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, documented))
    return missing


def test_every_value_has_a_comment():
    assert _undocumented() == []


def test_every_top_level_value_is_in_the_schema():
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])
    assert not schema.get("additionalProperties", True)


def test_schema_json_is_generated_from_scripts_values_schema():
    import importlib.util

    from tests.chart.support import ROOT

    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "scripts" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (CHART / "values.schema.json").read_text() == module.render(), \
        "values.schema.json is stale: run .venv/bin/python scripts/values_schema.py"
