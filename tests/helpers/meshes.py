"""What the simulated-mesh helpers share: their command line (--model_dir [--workroot] --meshes
"data,model,expert" ...) and one run per mesh, printed as the single line `RESULT {mesh: ...}`
the tests parse."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable


def run_meshes(one: Callable[[str, tuple[int, int, int], str | None], Any], *, workroot: bool = True) -> None:
    """one(model_dir, mesh, workdir) -> that mesh's JSON-able result; workdir is
    WORKROOT/mesh_DxMxE (None without --workroot)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    if workroot:
        ap.add_argument("--workroot", required=True)
    ap.add_argument("--meshes", nargs="+", required=True)
    args = ap.parse_args()
    out = {}
    for m in args.meshes:
        mesh = tuple(int(x) for x in m.split(","))
        wd = os.path.join(args.workroot, "mesh_" + m.replace(",", "x")) if workroot else None
        out[m] = one(args.model_dir, mesh, wd)
    print("RESULT " + json.dumps(out))
