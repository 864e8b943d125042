"""`ray job submit` entrypoint for `rdml tune`; every argument is passed through.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/tune.py --space tune_spaces/hm_schedules.yaml --samples 8 \
           --storage /shared/rdml-tune --set tracking.uri=http://MLFLOW:5000

--storage (default <train.output_dir>/tune) must be storage every node sees (a path inside the job's
working dir is refused at start-up).
MLflow: --set tracking.uri=http://MLFLOW:5000 (or MLFLOW_TRACKING_URI in the runtime_env). See docs/cluster.md.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("tune"))
