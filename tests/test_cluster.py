import json
import os
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.load(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")))
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    for t in config["available_node_types"].values():
        assert all(isinstance(v, int) for v in t["resources"].values())
    assert any("pip install" in c for c in config["setup_commands"])
    assert any("/mnt/shared" in c for c in config["initialization_commands"])
