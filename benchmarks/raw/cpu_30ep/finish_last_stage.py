"""The 30-epoch run's third stage, run on its own: the first run of
`python -m benchmarks.tools.claims run --profile cpu --epochs 30 --out benchmarks/raw/cpu_30ep
--work /tmp/claims_cpu30_work` finished stages 1 and 2 (every trial in runs.csv) and then
stopped in the sweep's own summary (sweep/results.best_config_yaml compared 3 with 3.0; fixed in
the same commit as this file). This picks up where it stopped, with the same functions:

    .venv/bin/python benchmarks/raw/cpu_30ep/finish_last_stage.py
"""
import dataclasses
import os

import pandas as pd

from benchmarks.tools import claims as C
from online_distill.run.launch import init_ray

out, work = "benchmarks/raw/cpu_30ep", "/tmp/claims_cpu30_work"
p = dataclasses.replace(C.PROFILES["cpu"], epochs=30)
for key, value in C.QUIET_TUNE.items():
    os.environ.setdefault(key, value)
init_ray(workers_print=False)
a, base = C.arms(p), C.base_config(p, None)
runs = pd.read_csv(os.path.join(out, "runs.csv"), keep_default_na=False, na_values=[""])
runs["form"] = runs["form"].astype(object).fillna("")
writer = C.RowWriter(os.path.join(out, "runs.csv"))
writer.rows = runs.to_dict("records")
picks = {n: C.pick(runs, n) for n in ("dml2", "independent2", "plain", "ema", "snapshot", "dlb", "scratch_student",
                                      "kd_student", "born_again")}
picks["dml4"], picks["independent4"] = picks["dml2"], picks["independent2"]
teacher = C.checkpoint_of(runs, "teacher", "search", C.SEARCH_SEED)
plain_by_seed = {s: C.checkpoint_of(runs, "plain", "confirm", s) for s in p.seeds}
s3 = C.confirm_entries("confirm", a["kd_student"], picks["kd_student"], p, {s: teacher for s in p.seeds})
s3 += C.confirm_entries("confirm", a["born_again"], picks["born_again"], p, plain_by_seed)
C.run_stage("confirm-last", s3, p, base, work, writer)
C.write_picks(os.path.join(out, "picks.yaml"), picks, a, p, base)
