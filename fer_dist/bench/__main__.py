"""`python -m fer_dist.bench JOB ARGS`: one measurement in a fresh process, printed as one line of
JSON (from rank 0 alone when launched on several)."""

import json
import sys

from fer_dist.bench import baseline, gpu, learn, loader, pack, step

JOBS = {
    "time_pack": pack.time_pack,
    "time_stream": loader.time_stream,
    "time_teams": baseline.time_teams,
    "time_decode": baseline.time_decode,
    "time_steps": step.time_steps,
    "time_memory": step.time_memory,
    "time_gpu_step": gpu.time_gpu_step,
    "time_max_batch": gpu.time_max_batch,
    "time_feeding": gpu.time_feeding,
    "plain_loop": learn.plain_loop,
}

result = JOBS[sys.argv[1]](**json.loads(sys.argv[2]))
if result:
    print(json.dumps(result))
