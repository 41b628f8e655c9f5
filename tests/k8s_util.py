"""Shared by the Kubernetes manifest tests: where the manifests are and which API versions they must pass."""

from pathlib import Path

import kubernetes_validate  # a dev dependency: strict offline validation of core kinds

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Pinned schema versions of kubernetes-validate (1.37.0 installed): a current release and the newest known.
K8S_VERSIONS = ("1.34.0", "1.37.0")

__all__ = ["K8S", "K8S_VERSIONS", "REPO", "kubernetes_validate"]
