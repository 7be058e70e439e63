"""k8s/ holds the chart's default render as plain manifests; they must not drift from the chart."""

from __future__ import annotations

import yaml

from tests.chart.support import K8S_DIR, K8S_NAMESPACE, objects, render, validate_object


def _plain() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S_DIR.glob("*.yaml"))}


def test_plain_manifests_equal_the_default_render():
    rendered = render({}, namespace=K8S_NAMESPACE)
    expected = {path.rsplit("/", 1)[1]: objects({path: text}) for path, text in rendered.items()
                if not path.endswith("NOTES.txt")}
    expected = {k: v for k, v in expected.items() if v}
    plain = _plain()
    assert sorted(plain) == sorted(expected), "k8s/ files differ from the chart's templates: run " \
                                              "scripts/render_k8s.py"
    for name in expected:
        assert plain[name] == expected[name], f"k8s/{name} is stale: run scripts/render_k8s.py"


def test_plain_manifests_are_valid_and_say_they_are_generated():
    for path in sorted(K8S_DIR.glob("*.yaml")):
        assert path.read_text().startswith("# Generated from helm/b1k-train"), path
    objs = [o for docs in _plain().values() for o in docs]
    assert {o["kind"] for o in objs} >= {"RayJob", "Deployment", "Service", "ServiceAccount", "Role"}
    assert {o["metadata"]["name"]: validate_object(o) for o in objs if validate_object(o)} == {}
