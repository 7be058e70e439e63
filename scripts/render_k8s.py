"""Regenerates k8s/ (plain manifests for users without Helm) from the chart's default render.

    .venv/bin/python scripts/render_k8s.py      # after changing helm/b1k-train; tests/chart/test_k8s_sync.py fails
                                                # until the two agree
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chart.support import K8S_DIR, K8S_NAMESPACE, render  # noqa: E402

HEADER = ("# Generated from helm/b1k-train with its default values (release b1k-train, namespace {ns}) by\n"
          "# scripts/render_k8s.py; edit the chart, not this file. Apply with:\n"
          "#   kubectl create namespace {ns} && kubectl apply -n {ns} -f k8s/\n")


def main() -> None:
    rendered = render({}, namespace=K8S_NAMESPACE)
    K8S_DIR.mkdir(exist_ok=True)
    wanted = {}
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        wanted[Path(path).name] = HEADER.format(ns=K8S_NAMESPACE) + text.lstrip("\n")
    for stale in K8S_DIR.glob("*.yaml"):
        if stale.name not in wanted:
            stale.unlink()
            print(f"removed {stale.relative_to(ROOT)}")
    for name, text in wanted.items():
        (K8S_DIR / name).write_text(text)
        print(f"wrote k8s/{name}")


if __name__ == "__main__":
    main()
