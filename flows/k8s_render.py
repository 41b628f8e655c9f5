"""Render the Job that the Prefect Kubernetes worker would create for a flow run, offline.

This is the worker's own code path in prefect-kubernetes 0.8.0 (``BaseJobConfiguration.resolve_for_flow_run``
without the API reads): the base job template of the work pool and the job variables go through
``KubernetesWorkerJobConfiguration.from_template_and_values`` (a coroutine; it fills the placeholders and
runs the worker's own manifest check), then ``prepare_for_flow_run`` adds the flow run's environment, labels,
generated name and command. The result is ``configuration.job_manifest``, the body the worker posts to the
Kubernetes API. Tests validate it strictly against the Kubernetes schema.
"""

from __future__ import annotations

from typing import Any

from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration


class _NoPrefectApi:
    """Stands in for the worker's Prefect client: only templates that reference Prefect blocks or variables
    (``{{ prefect.blocks.* }}``, ``{{ prefect.variables.* }}``) would need the API, and ours reference none."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"the template needs the Prefect API ({name}): it references Prefect blocks or variables, "
            "which cannot be rendered offline"
        )


async def render_flow_run_job_async(
    template: dict[str, Any],
    values: dict[str, Any],
    flow_run: Any,
    deployment: Any = None,
    flow: Any = None,
    work_pool: Any = None,
    worker_name: str | None = None,
) -> dict[str, Any]:
    """The flow-run Job for ``template`` (a whole base job template: ``job_configuration`` and
    ``variables``) and ``values`` (the deployment's and flow run's job variables, merged)."""
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
        template, values, client=_NoPrefectApi()
    )
    configuration.prepare_for_flow_run(
        flow_run, deployment=deployment, flow=flow, work_pool=work_pool, worker_name=worker_name
    )
    return configuration.job_manifest


def render_flow_run_job(
    template: dict[str, Any],
    values: dict[str, Any],
    flow_run: Any,
    deployment: Any = None,
    flow: Any = None,
    work_pool: Any = None,
    worker_name: str | None = None,
) -> dict[str, Any]:
    """:func:`render_flow_run_job_async`, from synchronous code (or from inside a running event loop)."""
    return run_coro_as_sync(
        render_flow_run_job_async(template, values, flow_run, deployment, flow, work_pool, worker_name)
    )
