"""`ray job submit` entrypoint for `rdml evaluate`; every argument is passed through.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/evaluate.py /shared/rdml-runs/<run> --profile quick --track

--track logs to the store of the evaluated run's config (else MLFLOW_TRACKING_URI in the runtime_env);
a local sqlite store inside the job's working dir is refused at start-up, before the evaluation, and so
is --json inside it. See docs/cluster.md.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
