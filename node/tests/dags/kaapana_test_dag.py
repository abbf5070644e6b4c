"""The test DAG of kaapana-node's Airflow executor tests (node/tests/airflow.rs).

One task reads what the node puts into the DAG run's conf (`conf["kaapana_node"]`: the job,
the staged input folder, the output folder and Kaapana's `data_form` with the dataset's
series identifiers), lists the input and writes `result.json` into the output folder.

Switches in the conf (beside `kaapana_node`):
- `fail`: a message; the task raises it (the node must report the failure with its reason).
- `wait_for`: a file name; the task waits until that file exists in the output folder (at
  most `wait_secs`, default 120) before it writes its result, so that the tests can cancel
  the run or restart the node while it runs, without sleeping.
"""

import json
import os
import time

import pendulum

try:  # Airflow 3
    from airflow.sdk import dag, get_current_context, task
except ImportError:  # Airflow 2 (Kaapana 0.6 ships 2.11)
    from airflow.decorators import dag, task
    from airflow.operators.python import get_current_context


@dag(
    dag_id="kaapana-test",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=16,
    tags=["kaapana-node-test"],
)
def kaapana_test():
    @task(task_id="process")
    def process():
        conf = get_current_context()["dag_run"].conf or {}
        node = conf["kaapana_node"]
        output = node["output"]
        os.makedirs(output, exist_ok=True)
        wait_for = conf.get("wait_for")
        if wait_for:
            path = os.path.join(output, wait_for)
            deadline = time.monotonic() + float(conf.get("wait_secs", 120))
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} did not appear")
                time.sleep(0.1)
            os.remove(path)
        if conf.get("fail"):
            raise RuntimeError(conf["fail"])
        listing = []
        if node.get("input"):
            for root, _dirs, files in os.walk(node["input"]):
                for f in files:
                    listing.append(os.path.relpath(os.path.join(root, f), node["input"]))
        listing.sort()
        result = {
            "job_id": node["job_id"],
            "workflow_id": node["workflow_id"],
            "owner": node["owner"],
            "identifiers": node["data_form"]["identifiers"],
            "dataset_name": node["data_form"]["dataset_name"],
            "input_files": listing,
            "greeting": conf.get("greeting"),
        }
        with open(os.path.join(output, "result.json"), "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        print(f"wrote result.json with {len(listing)} input files")

    process()


kaapana_test()
