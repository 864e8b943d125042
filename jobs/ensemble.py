"""`ray job submit` entrypoint for `rdml ensemble`; every argument is passed through.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/ensemble.py --config digits-eat --members 3 --set ensemble.cpus_per_member=0.5 \
           --set train.output_dir=/shared/rdml-runs --set tracking.uri=http://MLFLOW:5000

Checkpoints go to train.output_dir (or --run-dir), which must be storage every node sees (a path inside
the job's working dir is refused at start-up); the final checkpoint and the model are also logged to
MLflow. `ray job stop` checkpoints the last finished step and prints the --resume command.
MLflow: --set tracking.uri=http://MLFLOW:5000 (or MLFLOW_TRACKING_URI in the runtime_env). See docs/cluster.md.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("ensemble"))
