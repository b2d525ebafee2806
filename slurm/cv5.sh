#!/usr/bin/env bash
#SBATCH --job-name=fer-dist-cv5
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=00:10:00
# Cross-validation on a SLURM cluster, from the checkout of fer-dist:
#
#   sbatch slurm/cv5.sh                                   # configs/mfm_swin_tiny.yaml, 1 node per fold
#   CONFIG=configs/decoder_fusion.yaml NODES=2 GPUS_PER_NODE=4 sbatch slurm/cv5.sh
#
# This first job only submits the real work and ends:
#   1. an array with one task per fold (fold k is data.holdout_fold=k), each on NODES nodes: srun
#      starts `accelerate launch` on every node with that node's rank and the first node's address;
#   2. the ensemble job, after every task succeeded (afterok): `fer-dist cv` finds the folds
#      finished, predicts the test videos when the shards hold any, ensembles and writes the report.
# A task warned of its time limit (USR1, 300 s before) or preempted (TERM) checkpoints at the next
# optimiser step; the task then requeues itself and, when it runs again, resumes from the checkpoint.
#
# Settings (environment, or `sbatch --export=ALL,NAME=value`):
#   CONFIG         experiment YAML                    (configs/mfm_swin_tiny.yaml)
#   SHARDS         shards to train on                 (the config's data.shards)
#   CV_DIR         fold runs, ensemble and logs       (runs/cv5/<config name>)
#   NODES          nodes per fold                     (1)
#   GPUS_PER_NODE  processes per node: GPUs, or CPU processes on CPU nodes (1)
#   TIME           time limit of each fold task       (24:00:00)
#   FOLDS          how many folds                     (the fold groups of the shards)
#   HOW            vote | mean                        (vote)
#   TRUTH, TEMPLATE  test annotation folder / ABAW5/6 template, passed to fer-dist cv
#   OVERRIDES      extra section.key=value settings, space separated
#   PYTHON         the interpreter with fer-dist      (.venv/bin/python of the checkout, else python3)
#   SBATCH_ARGS    extra sbatch options for the fold and ensemble jobs (partition, account, ...)
# Logs: $CV_DIR/logs/fold<k>.log (the task), fold<k>-node<n>.log (each node), ensemble.log.
set -euo pipefail

REPO=${FER_DIST_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
[[ -f fer_dist/train.py ]] || { echo "error: run from a checkout of fer-dist (or set FER_DIST_HOME)" >&2; exit 2; }
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
CONFIG=${CONFIG:-configs/mfm_swin_tiny.yaml}
CV_DIR=${CV_DIR:-runs/cv5/$(basename "$CONFIG" .yaml)}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
HOW=${HOW:-vote}
read -r -a overrides <<< "${OVERRIDES:-}"
[[ -n ${SHARDS:-} ]] && overrides+=("data.shards=$SHARDS")
LOGS=$CV_DIR/logs
mkdir -p "$LOGS"

submit() {
  local shards folds array
  shards=$("$PYTHON" -c 'import sys; from fer_dist.config import load; print(load(sys.argv[1], sys.argv[2:]).data.shards)' \
    "$CONFIG" "${overrides[@]}")
  folds=${FOLDS:-$("$PYTHON" -c 'import sys; from fer_dist.data.shards.format import read_manifest
print(len(read_manifest(sys.argv[1]).folds()))' "$shards")}
  # shellcheck disable=SC2086
  array=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=fer-dist-fold --array=0-$((folds - 1)) \
    --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$GPUS_PER_NODE" --time="${TIME:-24:00:00}" \
    --requeue --signal=USR1@300 --open-mode=append --output="$LOGS/fold%a.log" \
    --export=ALL,CV5_STAGE=fold,FER_DIST_HOME="$REPO",CONFIG="$CONFIG",CV_DIR="$CV_DIR",PYTHON="$PYTHON" \
    "$REPO/slurm/cv5.sh")
  array=${array%%;*}
  # shellcheck disable=SC2086
  ensemble=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=fer-dist-ensemble --nodes=1 --ntasks=1 --time="${TIME:-24:00:00}" \
    --dependency=afterok:"$array" --kill-on-invalid-dep=yes --output="$LOGS/ensemble.log" \
    --export=ALL,CV5_STAGE=ensemble,FER_DIST_HOME="$REPO",CONFIG="$CONFIG",CV_DIR="$CV_DIR",PYTHON="$PYTHON" \
    "$REPO/slurm/cv5.sh")
  ensemble=${ensemble%%;*}
  printf '{"array": "%s", "ensemble": "%s", "folds": %s}\n' "$array" "$ensemble" "$folds" > "$CV_DIR/jobs.json"
  echo "folds: job $array (array 0-$((folds - 1)), $NODES node(s) each); ensemble: job $ensemble; logs in $LOGS"
}

fold() {
  local k=$SLURM_ARRAY_TASK_ID run first addr port launch procs
  run=$("$PYTHON" -c 'import sys; from fer_dist.engine.rundir import CrossValidation
print(CrossValidation(sys.argv[1]).fold(int(sys.argv[2])).path)' "$CV_DIR" "$k")  # fold k's run folder
  procs=$((NODES * GPUS_PER_NODE))
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  port=$((20000 + (SLURM_ARRAY_JOB_ID * 7 + k) % 20000))
  if ((procs == 1)); then
    launch="--config_file launch/single_gpu.yaml"
  else
    launch="--config_file launch/multi_node.yaml --num_machines $NODES --num_processes $procs"
    launch+=" --main_process_ip $addr --main_process_port $port"
  fi
  echo "fold $k: $NODES node(s) [$SLURM_JOB_NODELIST], $procs process(es), restart ${SLURM_RESTART_COUNT:-0}"
  rm -f "$run/requeue.json"
  # USR1 is ignored by the launcher (inherited through exec) and handled by each rank: checkpoint, exit 75.
  status=0
  srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --open-mode=append \
    --output="$LOGS/fold$k-node%n.log" \
    bash -c 'trap "" USR1; exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' \
    "$PYTHON" $launch -m fer_dist.train --resume "$run" --config "$CONFIG" "${overrides[@]}" \
    "data.holdout_fold=$k" || status=$?
  if [[ -f $run/requeue.json ]]; then
    echo "fold $k: $(cat "$run/requeue.json"); requeueing"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${k}"
    exit 0
  fi
  echo "fold $k: training ended with status $status"
  exit "$status"
}

ensemble() {
  local extra=()
  [[ -n ${TRUTH:-} ]] && extra+=(--truth "$TRUTH")
  [[ -n ${TEMPLATE:-} ]] && extra+=(--template "$TEMPLATE")
  "$PYTHON" -m fer_dist.cli cv --config "$CONFIG" --cv-dir "$CV_DIR" --how "$HOW" "${extra[@]}" "${overrides[@]}"
}

case ${CV5_STAGE:-submit} in
  submit) submit ;;
  fold) fold ;;
  ensemble) ensemble ;;
  *) echo "error: CV5_STAGE=$CV5_STAGE" >&2; exit 2 ;;
esac
