"""`ray job submit` entrypoint for `rdml ensemble`; every argument is passed through.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/ensemble.py --config digits --set train.epochs=2

MLflow: add --set tracking.uri=http://MLFLOW:5000 (or MLFLOW_TRACKING_URI in the runtime_env).
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("ensemble"))
